"""PPO's saving and resuming: the policy (or its adapter) at the top of a folder, the value
model beside it in ``value_model/``, the KL controller and score statistics in
``ppo_state.json``, and, mid-iteration, each process's rollout so that a resumed run trains
the rest of the iteration on the same experience."""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file
from torch import nn

from ..models import is_peft_model
from ..sharding import state_part
from ..trainer_utils import check_finite_weights


class PPOCheckpoints:
    """The PPOTrainer's ``_save`` and checkpoint hooks (a mixin: it reads the trainer's
    ``accelerator``, ``model``, ``args``, ``state``, ``kl_ctl``, ``moments``,
    ``_experience``, ``_whole`` and ``processing_class``)."""

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        output_dir = output_dir or self.args.output_dir
        wrapper = self.accelerator.unwrap_model(self.model)
        check_finite_weights(wrapper, output_dir, state_dict)
        os.makedirs(output_dir, exist_ok=True)
        whole = bool(state_dict) and self._whole is not None  # gathered from the shards
        wrapper.policy.save_pretrained(
            output_dir, **({"state_dict": state_part(state_dict, "policy")} if whole else {}))
        if wrapper.value_model is not None:
            wrapper.value_model.save_pretrained(
                os.path.join(output_dir, "value_model"),
                **({"state_dict": state_part(state_dict, "value_model")} if whole else {}))
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        state = {"kl_ctl": self.kl_ctl.state_dict(),
                 "moments": self.moments.state_dict() if self.moments else None}
        with open(os.path.join(output_dir, "ppo_state.json"), "w") as f:
            json.dump(state, f)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _save_checkpoint(self, model, trial):
        """The Trainer's checkpoint, plus, mid-iteration, this process's rollout: resuming
        trains the rest of the iteration on the same experience. The rollout goes first, so
        trainer_state.json, written last, still marks a complete checkpoint."""
        steps_per_iteration = len(self.get_train_dataloader()) // \
            self.args.gradient_accumulation_steps
        if self._experience is not None and self.state.global_step % steps_per_iteration:
            folder = os.path.join(self._get_output_dir(trial=trial),
                                  f"checkpoint-{self.state.global_step}")
            os.makedirs(folder, exist_ok=True)
            experience = {"epoch": self._experience["epoch"], "tensors": {
                k: v.cpu() for k, v in self._experience["tensors"].items()}}
            torch.save(experience, os.path.join(folder,
                                                _experience_file(self.args.process_index)))
            if self.args.world_size > 1:  # every rank's rollout is down before the state
                self.accelerator.wait_for_everyone()
        super()._save_checkpoint(model, trial)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """The policy and value model from the folder's files; under FSDP the Trainer's own
        loading of the sharded model's state (``pytorch_model_fsdp.bin``, both models),
        since the wrapped parameters are DTensors a plain state dict cannot be copied into."""
        if self.is_fsdp_enabled:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        wrapper = self.accelerator.unwrap_model(model or self.model)
        if is_peft_model(wrapper.policy):
            from peft import set_peft_model_state_dict

            weights = load_file(os.path.join(resume_from_checkpoint, "adapter_model.safetensors"))
            set_peft_model_state_dict(wrapper.policy, weights)
        else:
            _load_weights(wrapper.policy, os.path.join(resume_from_checkpoint, "model.safetensors"))
        value_dir = os.path.join(resume_from_checkpoint, "value_model")
        if wrapper.value_model is None:
            pass
        elif hasattr(wrapper.value_model, "load_checkpoint"):  # AdapterHead, PolicyValueHead
            wrapper.value_model.load_checkpoint(value_dir)
        else:
            _load_weights(wrapper.value_model, os.path.join(value_dir, "model.safetensors"))

    def _load_optimizer_and_scheduler(self, checkpoint) -> None:
        """With the optimizer, what PPO keeps beside the weights: this process's rollout of
        an unfinished iteration, the KL controller and the score statistics. Here, not in
        ``_load_from_checkpoint``: under DeepSpeed the Trainer restores the weights with
        the engine's own checkpoint and never calls that (a ZeRO-3 run resumed with a new
        rollout, its weights 4e-3 from the uninterrupted run's)."""
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        experience = os.path.join(checkpoint, _experience_file(self.args.process_index))
        if os.path.exists(experience):
            self._resumed_experience = torch.load(experience, weights_only=True)
        with open(os.path.join(checkpoint, "ppo_state.json")) as f:
            state = json.load(f)
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        if self.moments is not None and state["moments"]:
            self.moments.load_state_dict(state["moments"])


def _experience_file(process_index: int) -> str:
    return f"ppo_experience_{process_index}.pt"


def _load_weights(module: nn.Module, path: str) -> None:
    """Load safetensors weights; only tied weights (absent from the file) may be missing."""
    missing, unexpected = module.load_state_dict(load_file(path), strict=False)
    tied = set(getattr(module, "_tied_weights_keys", None) or {})
    if unexpected or any(k not in tied and "lm_head" not in k for k in missing):
        raise RuntimeError(f"checkpoint {path} does not fit: missing {missing}, "
                           f"unexpected {unexpected}")
