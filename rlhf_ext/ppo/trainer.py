"""PPOTrainer: online RL on the transformers Trainer's own loop: PPO (GAE with a value
model) or, by ``advantage_estimator``, the critic-free GRPO, RLOO, REINFORCE++ (fields
and checks: ``config.PPOConfig``).

One Trainer epoch is one iteration: the train dataloader (``ExperienceLoader``) runs a
rollout with the current policy, then yields its experience in shuffled minibatches
``num_ppo_epochs`` times. The Trainer does everything else: optimizer and scheduler over
policy + value parameters, gradient accumulation and clipping, callbacks, logging,
checkpoints (with the KL controller, score statistics and, mid-iteration, the rollout)
and resume from any of them, push_to_hub.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import torch
from torch import nn
from transformers import Trainer

from ..data import validate_prompt_dataset
from ..heads import RewardModel, ValueModel
from ..hub import trainer_model_card
from ..metric_buffer import MetricBuffer
from ..models import (
    adapters_disabled,
    add_adapters,
    disable_dropout,
    is_peft_model,
    is_quantized,
    keep_4bit_differentiable,
    load_tokenizer,
)
from ..sharding import (
    RolloutCopies,
    broadcast_module,
    is_fsdp,
    sharding_requested,
    whole_copy,
    whole_loading,
)
from ..tables import log_table
from ..trainer_utils import (
    CheckedTraining,
    check_finite_loss,
    start_run,
)
from . import core
from .checkpoints import PPOCheckpoints
from .config import PPOConfig
from .controllers import AdaptiveKLController, FixedKLController, RunningMoments
from .experience import ExperienceLoader
from .policy_value import PolicyValueHead
from .reward_funcs import build_reward_functions
from .rollout import (
    Batch,
    check_prompts_fit_model,
    response_logps,
    response_values,
    rollout,
)
from .single_base import AdapterHead
from .vllm_rollouts import VLLMRollouts


class PolicyAndValue(nn.Module):
    """The modules the optimizer updates: the policy and the value model."""

    def __init__(self, policy, value_model):
        super().__init__()
        self.policy, self.value_model = policy, value_model

    def forward(self, input_ids, attention_mask, position_ids, response_mask, prompt_width: int,
                temperature: float, group: int = 1, with_entropy: bool = False):
        """Policy log-probs [B, C] of the response tokens (LM head at response positions
        only), values [B, C] (None without a value model) and, ``with_entropy``, each
        position's entropy [B, C] with its gradient (else None). Training calls this
        through the wrapper (DDP, DeepSpeed), whose forward arms the gradient
        synchronisation; calling the inner modules directly would skip it."""
        batch = Batch(input_ids, attention_mask, position_ids, response_mask, prompt_width)
        entropy = values = None
        if isinstance(self.value_model, PolicyValueHead):  # one forward for both
            out = response_logps(self.policy, batch, temperature, with_entropy, group=group,
                                 value_head=self.value_model)
            logps, values = out[0], out[-1]
            entropy = out[1] if with_entropy else None
            return logps, values, entropy
        if self.value_model is not None:
            values = response_values(self.value_model, batch)
        out = response_logps(self.policy, batch, temperature, with_entropy, group=group)
        logps, entropy = out if with_entropy else (out, None)
        return logps, values, entropy

    @property
    def _no_split_modules(self) -> list[str]:
        """The layer classes FSDP shards one by one (accelerate's transformer wrap policy
        reads this of the model it wraps): the policy's and the value model's."""
        names = set()
        for m in (self.policy, self.value_model):
            names.update(getattr(m, "_no_split_modules", None) or ())
        return sorted(names)

    def tie_weights(self, *args, **kwargs) -> None:
        """Tie each model's tied weights again (the policy's LM head to its embedding).
        accelerate's FSDP2 set-up moves the model to the meta device, which unties them,
        and calls this of the model it wraps: without it the head and the embedding
        trained as two weights under FSDP (gradients 0.7% off one process's at step 1)."""
        for m in (self.policy, self.value_model):
            if m is not None and hasattr(m, "tie_weights"):
                m.tie_weights(*args, **kwargs)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None,
                                      every_n_layers: int = 1, offload: bool = False):
        """What the Trainer calls for ``gradient_checkpointing``: both models recompute
        their activations in the backward pass (a PeftModel passes it to its base)."""
        for m in (self.policy, self.value_model):
            if m is None or isinstance(m, PolicyValueHead):  # the policy's own forward
                continue
            m.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs=gradient_checkpointing_kwargs,
                every_n_layers=every_n_layers, offload=offload)


class PPOTrainer(PPOCheckpoints, VLLMRollouts, CheckedTraining, Trainer):
    """Online RL on one trainer: PPO with explicit per-token KL and GAE
    (``advantage_estimator='gae'``, needs ``value_model``), or the critic-free GRPO, RLOO,
    REINFORCE++ (no value model). ``reward``: one reward function or a list, weighted by
    ``args.reward_weights``: a RewardModel, a sequence classifier or a path to one, or a
    callable scoring completions (``ppo.reward_funcs``: TRL's reward-function API). For
    single-base mode pass the three models of ``single_base.build_single_base`` (policy,
    value, reward)."""

    # what a checkpoint must be resumed with (rlhf_ext.run_record)
    RESUME_FIELDS = ("advantage_estimator", "num_generations", "scale_rewards",
                     "loss_aggregation", "kl_loss_coef", "kl_loss_estimator", "response_length",
                     "temperature", "top_k", "top_p", "kl_coef", "kl_estimator", "kl_target",
                     "gamma", "lam", "cliprange", "cliprange_value", "vf_coef",
                     "value_head_on_policy", "whiten_advantages", "whiten_rewards",
                     "missing_eos_penalty", "score_clip", "normalize_scores",
                     "rollout_batch_size", "num_ppo_epochs", "normalize_advantages",
                     "kl_in_reward", "policy_loss", "importance_sampling_level", "epsilon_high",
                     "delta", "sapo_temperature_pos", "sapo_temperature_neg",
                     "use_bias_correction_kl", "mask_truncated_completions",
                     "top_entropy_quantile", "entropy_coef", "dynamic_sampling",
                     "reward_weights")

    def __init__(self, model, args: PPOConfig, processing_class, train_dataset,
                 reward: RewardModel | Callable | list, value_model: ValueModel | None = None,
                 ref_model=None, reward_tokenizer=None, eval_dataset=None, callbacks=None,
                 optimizers=(None, None), peft_config=None):
        sharded = sharding_requested()
        if sharded and (args.use_vllm or is_quantized(model)
                        or isinstance(value_model, AdapterHead)):
            raise ValueError(f"PPOTrainer under {sharded} samples with transformers (not "
                             "vLLM), from a policy that is not quantized nor single-base: "
                             "launch vLLM, 4-bit and single-base policies with "
                             "accelerate_configs/zero2.yaml or ddp.yaml")
        start_run(args)
        processing_class = load_tokenizer(processing_class, model.config._name_or_path)
        validate_prompt_dataset(train_dataset)
        self._longest_prompt = check_prompts_fit_model(
            model, processing_class, list(train_dataset["prompt"]), args.response_length)
        if args.value_head_on_policy and value_model is not None:
            raise ValueError("value_head_on_policy=True puts the value head on the policy: "
                             "pass no value_model (or set value_head_on_policy=False)")
        if args.uses_critic and value_model is None and not args.value_head_on_policy:
            raise ValueError("advantage_estimator='gae' learns a value model: pass value_model="
                             "ValueModel.from_backbone(path), set value_head_on_policy=True, "
                             "or choose a critic-free estimator (grpo, rloo, reinforce_pp, "
                             "reinforce_pp_baseline)")
        if not args.uses_critic and value_model is not None:
            import warnings

            warnings.warn(f"advantage_estimator={args.advantage_estimator!r} uses no value "
                          "model: the value_model passed is not trained or saved", stacklevel=2)
            value_model = None
        if args.prefix_sharing:
            from ..logps import attention_implementation
            from ..shared_prefix import attention_refusal

            refusal = attention_refusal(attention_implementation(model))
            if refusal:
                raise ValueError(f"{refusal}: load the policy with "
                                 "attn_implementation='sdpa'")
        self.base_model_name = getattr(model.config, "_name_or_path", None)
        for m in (model, value_model, reward if isinstance(reward, nn.Module) else None):
            if m is not None:
                keep_4bit_differentiable(m)
        if peft_config is not None:
            model = add_adapters(model, peft_config, args.gradient_checkpointing, args.seed)
        if args.value_head_on_policy:
            value_model = PolicyValueHead(model, model.config.get_text_config().hidden_size)
        if args.disable_dropout:  # after the adapters: LoRA has its own dropout
            for m in (model, value_model, ref_model,
                      reward if isinstance(reward, nn.Module) else None):
                if m is not None:
                    disable_dropout(m)
        if not args.needs_reference:
            ref_model = None  # no KL asked for: no reference kept or run
        elif ref_model is None and not is_peft_model(model):
            ref_model = whole_copy(model)
        if ref_model is not None:
            ref_model.eval().requires_grad_(False)
        self.ref_model = ref_model
        # ZeRO-3, FSDP: the rollout runs whole copies, refreshed from the shards
        self._whole = RolloutCopies({"policy": model, "value_model": value_model}) \
            if sharded else None
        if sharded == "DeepSpeed ZeRO-3":  # partitioned at loading: each process scores its
            reward = [whole_copy(r) if isinstance(r, nn.Module) else r  # rows with a whole one
                      for r in _as_list(reward)]
        with whole_loading():  # a reward model's path loads whole (ZeRO-3 would partition it)
            self.rewards = build_reward_functions(reward, reward_tokenizer, processing_class,
                                                  args, model.dtype)
        self.reward_model = next(iter(self.rewards.modules), None)
        self.policy, self.value_model = model, value_model
        self.dataset = train_dataset
        self.kl_ctl = (AdaptiveKLController(args.kl_coef, args.kl_target, args.kl_horizon)
                       if args.kl_target else FixedKLController(args.kl_coef))
        self.moments = RunningMoments() if args.normalize_scores else None
        self._metrics = MetricBuffer()  # on the device, reduced once per log
        self._experience = self._resumed_experience = None
        super().__init__(model=PolicyAndValue(model, value_model), args=args,
                         train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=processing_class, callbacks=callbacks,
                         optimizers=optimizers)
        # DeepSpeed trains the policy's weights in bf16/fp16 themselves (no autocast): the
        # frozen models and the rollout's copies compute in that precision too (a float32
        # reference made the first KL 2e-3, not 0, under ZeRO-2 + bf16)
        cast = (torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None) \
            if self.is_deepspeed_enabled else None
        copies = self._whole.copies.values() if self._whole is not None else ()
        for m in (self.ref_model, *self.rewards.modules, *copies):
            if m is not None:
                m.to(self.args.device)
                if cast is not None and not is_quantized(m):
                    m.to(cast)
                if is_fsdp(self.accelerator):  # whole on each process, process 0's weights
                    broadcast_module(m)
        # the rewards of two tiny completions now, not after the first rollout's sampling
        first = [self.dataset[i] for i in range(min(2, len(self.dataset)))]
        self.rewards.score_rows(first, ["ok"] * len(first), [[0]] * len(first), self.state)
        self.engine, self._synced_step = None, 0  # vLLM, started by the first rollout

    # -----------------------------------------------------------------------------------
    # experience
    # -----------------------------------------------------------------------------------

    def get_train_dataloader(self):
        return ExperienceLoader(self.args, self.make_experience)

    def _iteration_rows(self, epoch: int) -> list[dict]:
        """The dataset rows of iteration ``epoch``: a seeded pass over the data (in order
        without ``shuffle_dataset``), this process's share, each row ``num_generations``
        times in a row (one group)."""
        size = self.args.rollout_batch_size // self.args.num_generations
        world, rank = self.args.world_size, self.args.process_index
        return self._rows_from((epoch * world + rank) * size, size)

    def _rows_from(self, start: int, count: int) -> list[dict]:
        """``count`` groups from position ``start`` of the endless sequence of passes."""
        n, out = len(self.dataset), []
        for i in range(start, start + count):
            pass_index, offset = divmod(i, n)
            order = list(range(n))
            if self.args.shuffle_dataset:
                random.Random(self.args.seed * 7919 + pass_index).shuffle(order)
            out.extend([self.dataset[order[offset]]] * self.args.num_generations)
        return out

    def _more_rows(self, epoch: int, n_groups: int, round_: int) -> list[dict]:
        """Further rows for dynamic sampling: drawn from a seeded order of the data, its
        own stream per iteration, round and process."""
        rng = random.Random(hash((self.args.seed, epoch, round_, self.args.process_index)))
        picks = [rng.randrange(len(self.dataset)) for _ in range(n_groups)]
        return [self.dataset[i] for i in picks for _ in range(self.args.num_generations)]

    def _reference_logps(self, batch: Batch, policy) -> torch.Tensor:
        """The reference model's log-probs, or (LoRA) ``policy``'s with its adapters off."""
        temperature, group = self.args.temperature, self.args.shared_prompt_group
        if self.ref_model is not None:
            return response_logps(self.ref_model, batch, temperature, group=group)
        with adapters_disabled(policy):
            return response_logps(policy, batch, temperature, group=group)

    def make_experience(self, epoch: int) -> dict[str, torch.Tensor]:
        resumed, self._resumed_experience = self._resumed_experience, None
        if resumed is not None and resumed["epoch"] == epoch:  # a mid-iteration checkpoint's
            self._experience = resumed                        # rollout, not a new one
            return {k: v.to(self.args.device) for k, v in resumed["tensors"].items()}
        rows = self._iteration_rows(epoch)
        self._sync_engine()
        was_training = self.model.training
        gather = self.accelerator.gather if self.args.world_size > 1 else None
        with self.accelerator.autocast():  # the precision of the update's forward (bf16...)
            policy, value_model = self._rollout_models()
            reference = (lambda batch: self._reference_logps(batch, policy)) \
                if self.args.needs_reference else None
            result = rollout(policy=policy, reference=reference,
                             value_model=value_model, tokenizer=self.processing_class,
                             rows=rows, score=lambda r, c, ids: self.rewards.score_rows(
                                 r, c, ids, self.state),
                             args=self.args, kl_coef=self.kl_ctl.value, moments=self.moments,
                             seed=self.args.seed * 1000 + epoch, gather=gather,
                             more_rows=lambda n, r: self._more_rows(epoch, n, r),
                             reward_names=tuple(self.rewards.names), engine=self.engine,
                             first_row=self.args.process_index * len(rows))
        self.model.train(was_training)
        for key, value in {**result.metrics, "kl_coef": self.kl_ctl.value}.items():
            self._metrics.host("train", key, value)  # reduced over processes already
        self.kl_ctl.update(result.metrics.get("objective/kl", 0.0),
                           self.args.rollout_batch_size * self.args.world_size)
        self._maybe_keep_samples(epoch, result)
        self._experience = {"epoch": epoch, "tensors": result.experience}
        return result.experience

    def _rollout_models(self):
        """The policy and value model the rollout runs: themselves, or under ZeRO-3 and
        FSDP whole copies holding their current weights (``sharding.RolloutCopies``)."""
        if self._whole is None:
            return self.policy, self.value_model
        copies = self._whole.refresh(self.model, self.accelerator)
        return copies["policy"], copies.get("value_model")

    def _maybe_keep_samples(self, epoch: int, result) -> None:
        every = max(1, int(self.args.num_train_epochs) // max(1, self.args.num_sample_generations))
        if not self.args.num_sample_generations or epoch % every:
            return
        rows = [{"prompt": p, "completion": c, "score": s}
                for p, c, s in list(zip(result.prompts, result.completions, result.scores))[:4]]
        log_table(self, "samples", rows)  # samples.md and the trackers

    # -----------------------------------------------------------------------------------
    # loss
    # -----------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args = self.args
        mask = inputs["loss_mask"]
        entropy_needed = args.top_entropy_quantile < 1.0 or args.entropy_coef
        logps, values, entropy = model(
            inputs["input_ids"], inputs["attention_mask"], inputs["position_ids"],
            inputs["response_mask"], int(inputs["prompt_width"][0]), args.temperature,
            args.shared_prompt_group, with_entropy=bool(entropy_needed))
        old_logps = inputs["old_logps"] if "old_logps" in inputs else logps.detach()
        keep = None
        if args.top_entropy_quantile < 1.0:
            live = entropy.detach()[mask.bool()]
            every = self.accelerator.gather(self.accelerator.pad_across_processes(
                live, pad_index=-1.0)) if args.world_size > 1 else live
            keep = core.high_entropy_mask(entropy.detach(), mask, args.top_entropy_quantile,
                                          every[every >= 0])
        token_weights = keep
        if "sampler_logps" in inputs:  # vLLM sampled: its kernels' gap, corrected
            weights = self._sampler_weights(old_logps, inputs)
            token_weights = weights if keep is None else keep * weights
        tokens = inputs["step_tokens"][0] if "step_tokens" in inputs else None
        pg_loss, pg = core.policy_loss(
            logps, old_logps, inputs["advantages"], mask, args.cliprange, args.loss_aggregation,
            args.response_length, clip_high=args.epsilon_high, dual_clip=args.delta,
            kind=args.policy_loss, level=args.importance_sampling_level,
            sapo_temperatures=(args.sapo_temperature_pos, args.sapo_temperature_neg),
            token_weights=token_weights, tokens=tokens)
        loss, logged = pg_loss, {"policy/approxkl_avg": pg["approxkl"],
                                 "policy/clipfrac_avg": pg["clipfrac"],
                                 "clip_ratio/low_mean": pg["clipfrac_low"],
                                 "clip_ratio/high_mean": pg["clipfrac_high"],
                                 "clip_ratio/region_mean": pg["clipfrac"],
                                 "val/ratio": pg["ratio"], "loss/policy_avg": pg_loss}
        if values is not None:
            vf_loss, vf = core.value_loss(values, inputs["old_values"], inputs["returns"], mask,
                                          args.cliprange_value, args.loss_aggregation,
                                          args.response_length, tokens)
            loss = loss + args.vf_coef * vf_loss
            logged.update({"loss/value_avg": vf_loss, "val/clipfrac_avg": vf["clipfrac"]})
        if args.kl_loss_coef:
            kl = core.per_token_kl(logps, inputs["ref_logps"], args.kl_loss_estimator)
            if args.use_bias_correction_kl:
                kl = kl * torch.exp(core.importance_log_weights(
                    logps, old_logps, mask, args.importance_sampling_level))
            kl_loss = core.aggregate(kl, mask, args.loss_aggregation, args.response_length,
                                     tokens)
            loss = loss + args.kl_loss_coef * kl_loss
            logged["loss/kl_avg"] = kl_loss
            logged["kl"] = core.masked_mean(kl, mask)  # TRL's: the token mean
        if args.entropy_coef:
            entropy_loss = core.masked_mean(entropy, mask if keep is None else mask * keep)
            loss = loss - args.entropy_coef * entropy_loss
            logged["entropy"] = entropy_loss
        check_finite_loss(self, loss, "non-finite rewards or values")
        for key, value in logged.items():
            self._metrics.mean("train", key, value)
        return loss

    def log(self, logs: dict, start_time: float | None = None) -> None:
        self._metrics.log_into(logs, self.accelerator.gather)
        if "train_runtime" not in logs and start_time is not None:
            import time

            elapsed = max(time.time() - start_time, 1e-9)
            logs["eps"] = self.state.epoch * self.args.rollout_batch_size * \
                self.args.world_size / elapsed if self.state.epoch else 0.0
        super().log(logs, start_time)

    def create_model_card(self, model_name=None, dataset_name=None, tags=None, **kwargs):
        reward = "a reward model" if self.reward_model is not None else "a reward function"
        estimator = self.args.advantage_estimator
        method = "PPO (per-token KL, GAE)" if estimator == "gae" else \
            f"{estimator} (critic-free, clipped policy loss)"
        trainer_model_card(
            self, method="ppo", model_name=model_name, dataset_name=dataset_name, tags=tags,
            summary=f"{method} from `{self.base_model_name}` against {reward}.",
            hyperparameters={k: getattr(self.args, k) for k in (
                "learning_rate", "advantage_estimator", "num_generations", "loss_aggregation",
                "kl_loss_coef", "rollout_batch_size", "num_ppo_epochs", "kl_coef", "kl_target",
                "kl_estimator", "gamma", "lam", "cliprange", "cliprange_value", "vf_coef",
                "response_length", "temperature", "per_device_train_batch_size")},
            model=self.policy, kind="ppo" if self.value_model is not None else "causal-lm",
            papers=[estimator])


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]
