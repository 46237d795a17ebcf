"""PreferenceTrainer: one transformers Trainer for every offline loss.

The loss is a name (``loss_type: simpo``) looked up in ``rlhf_ext.losses``; the trainer
only orchestrates: validate and tokenize the data, one forward pass for chosen and
rejected together, reference log-probs (none, a model, adapters disabled, or precomputed
and cached), the loss, TRL-named metrics. Everything else is the Trainer's own.
"""

from __future__ import annotations

import os

import torch
from datasets import IterableDataset
from transformers import Trainer, TrainerCallback
from transformers.integrations import is_deepspeed_zero3_enabled

from . import losses as L
from .config_fields import (
    TRAINING_COLUMNS,
    activation_offloading,
    apply_tokenizer_fields,
    model_init,
)
from .data import (
    SOFT_LABEL,
    DataError,
    PreferenceCollator,
    check_fits_model,
    check_soft_labels,
    prepare_preference_dataset,
    validate_preference_dataset,
)
from .hub import trainer_model_card
from .logps import attention_implementation, batch_logps
from .models import (
    adapters_disabled,
    add_adapters,
    disable_dropout,
    keep_4bit_differentiable,
    load_causal_lm,
    load_tokenizer,
)
from .pref_metrics import PreferenceMetrics
from .preference_config import PreferenceConfig
from .reference import ReferenceLogps
from .shared_prefix import attention_refusal
from .tables import log_table
from .trainer_utils import (
    CheckedTraining,
    check_finite_loss,
    start_run,
)


def _named(eval_dataset) -> list:
    """(name, dataset) pairs of an eval dataset: none, one, or a dict of them."""
    if isinstance(eval_dataset, dict):
        return [(f"eval {k}", v) for k, v in eval_dataset.items()]
    return [] if eval_dataset is None else [("eval", eval_dataset)]


def resolve_prefix_sharing(model, args: PreferenceConfig) -> None:
    """prefix_sharing None becomes on where the loss is paired and the attention keeps
    completions apart (sdpa, eager); an explicit True with another attention is refused.
    padding_free None becomes on where the attention is sdpa: every sequence (or pair)
    then attends on its own from the row's spans, with no mask over the packed row."""
    implementation = attention_implementation(model)
    refusal = attention_refusal(implementation)
    if args.prefix_sharing is None:
        args.prefix_sharing = args.paired and refusal is None
    elif args.prefix_sharing and args.paired and refusal:
        raise ValueError(f"{refusal}. Load it with attn_implementation='sdpa', or use "
                         "padding_free=True instead")
    if args.padding_free is None:
        args.padding_free = implementation == "sdpa"


class SyncReference(TrainerCallback):
    """TR-DPO: after every ``ref_model_sync_steps`` optimizer steps the reference becomes
    ``ref_model_mixup_alpha`` x policy + (1 - alpha) x reference."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % args.ref_model_sync_steps == 0:
            trainer = self.trainer
            trainer.reference.mix_from(trainer.accelerator.unwrap_model(trainer.model),
                                       args.ref_model_mixup_alpha)


class PreferenceTrainer(CheckedTraining, PreferenceMetrics, Trainer):
    """Offline preference optimisation; the constructor takes trl.DPOTrainer's arguments."""

    _tag_names = ["rlhf-ext", "preference"]
    # what a checkpoint must be resumed with (rlhf_ext.run_record)
    RESUME_FIELDS = ("loss_type", "loss_weights", "beta", "label_smoothing", "simpo_gamma",
                     "cpo_alpha", "discopop_tau", "desirable_weight", "undesirable_weight",
                     "f_divergence_type", "f_alpha_divergence_coef", "ld_alpha",
                     "use_weighting", "rpo_alpha", "sync_ref_model", "max_length",
                     "truncation_mode", "max_prompt_length", "max_completion_length")

    def __init__(self, model, ref_model=None, args: PreferenceConfig | None = None,
                 data_collator=None, train_dataset=None, eval_dataset=None,
                 processing_class=None, compute_metrics=None, callbacks=None,
                 optimizers=(None, None), peft_config=None):
        if args is None:
            args = PreferenceConfig(output_dir="preference-output")
        start_run(args)
        self.base_model_name = model if isinstance(model, str) else \
            getattr(model.config, "_name_or_path", None)
        init = model_init(args)
        if isinstance(model, str):
            model = load_causal_lm(model, **init)
        if isinstance(ref_model, str):
            ref_model = load_causal_lm(ref_model, **init)
        processing_class = load_tokenizer(processing_class, self.base_model_name)
        pad_id = apply_tokenizer_fields(processing_class, args)
        resolve_prefix_sharing(model, args)
        keep_4bit_differentiable(model)
        if peft_config is not None:
            model = add_adapters(model, peft_config, args.gradient_checkpointing, args.seed)
        if args.disable_dropout:  # after the adapters: LoRA has its own dropout
            for m in (model, ref_model):
                if m is not None:
                    disable_dropout(m)

        # Data first: a bad dataset fails here, before any model work.
        self.loss_specs, self.loss_weights = args.loss_specs, args.resolved_loss_weights
        self.loss_params = args.loss_params()
        names = [s.name for s in self.loss_specs]
        train_dataset = self._prepare(train_dataset, processing_class, args, names, "train")
        if isinstance(eval_dataset, dict):
            eval_dataset = {k: self._prepare(v, processing_class, args, names, f"eval {k}")
                            for k, v in eval_dataset.items()}
        else:
            eval_dataset = self._prepare(eval_dataset, processing_class, args, names, "eval")
        for split, data in (("train", train_dataset), *_named(eval_dataset)):
            if data is not None:
                check_fits_model(data, model, args.max_length, split)
        if data_collator is None:
            data_collator = PreferenceCollator(pad_id, args.max_length,
                                               args.truncation_mode, args.pad_to_multiple_of,
                                               args.padding_free,
                                               args.prefix_sharing and args.paired)

        # Reference: none, an explicit model, the base with adapters off, or a frozen copy.
        self.reference = ReferenceLogps.choose(model, ref_model, args)
        self.ref_model = self.reference.model
        if args.sync_ref_model and is_deepspeed_zero3_enabled():
            raise ValueError("sync_ref_model mixes whole weights, which DeepSpeed ZeRO-3 keeps "
                             "partitioned: use ZeRO-2 or DDP with it")
        if args.sync_ref_model and self.reference.mode != "model":
            raise ValueError("sync_ref_model mixes the policy's weights into a reference model, "
                             "and with LoRA the reference is the base model with adapters off "
                             "(no weights of its own): train without LoRA, or turn it off")
        super().__init__(model=model, args=args, data_collator=data_collator,
                         train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=processing_class, compute_metrics=compute_metrics,
                         callbacks=callbacks, optimizers=optimizers)
        self.reference.prepare(self.accelerator)
        self.ref_model = self.reference.model
        self._init_metrics()
        if args.sync_ref_model:
            self.add_callback(SyncReference(self))
        if args.precompute_ref_log_probs and args.needs_reference:
            if isinstance(self.train_dataset, IterableDataset):
                raise DataError("precompute_ref_log_probs runs the reference over the whole "
                                "dataset before training, and an IterableDataset has no end: "
                                "load it into memory, or turn precomputing off")
            self.train_dataset = self.reference.precompute(self, self.train_dataset, "train")
            if isinstance(self.eval_dataset, dict):
                self.eval_dataset = {k: self.reference.precompute(self, v, f"eval {k}")
                                     for k, v in self.eval_dataset.items()}
            elif self.eval_dataset is not None:
                self.eval_dataset = self.reference.precompute(self, self.eval_dataset, "eval")

    def _set_signature_columns_if_needed(self):
        """remove_unused_columns (TRL's default True) keeps the tokenized columns."""
        self._signature_columns = TRAINING_COLUMNS

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        """As Trainer.evaluate; a dataset given here is validated and tokenized first. (For
        a dict of eval datasets the Trainer passes each one's key.)"""
        if eval_dataset is not None and not isinstance(eval_dataset, (dict, str)) \
                and "prompt_ids" not in eval_dataset.column_names:
            eval_dataset = self._prepare(eval_dataset, self.processing_class, self.args,
                                         [s.name for s in self.loss_specs], "eval")
            if self.args.precompute_ref_log_probs and self.args.needs_reference:
                eval_dataset = self.reference.precompute(self, eval_dataset, "eval")
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        data = self.eval_dataset if eval_dataset is None else eval_dataset
        data = self.eval_dataset[data] if isinstance(data, str) else data
        if self.args.generate_during_eval and not isinstance(data, dict):  # a dict: done per set
            self._log_completions(data)
        return metrics

    def _log_completions(self, dataset) -> None:
        """Sampled completions (temperature 1) of the policy and the reference to the first
        per_device_eval_batch_size prompts of an eval dataset."""
        from .sampling import generate_completions

        tok, args = self.processing_class, self.args
        rows = dataset.select(range(min(len(dataset), args.per_device_eval_batch_size)))
        prompts = [tok.decode(ids) for ids in rows["prompt_ids"]]
        longest = max(len(ids) for ids in rows["prompt_ids"])
        new_tokens = args.max_completion_length or max(1, (args.max_length or 2 * longest)
                                                       - longest)
        policy = self.accelerator.unwrap_model(self.model)
        sample = lambda model: generate_completions(  # noqa: E731
            model, tok, prompts, new_tokens, temperature=1.0,
            seed=args.seed + self.state.global_step).texts
        table = {"prompt": prompts, "policy": sample(policy)}
        if self.reference.mode == "model":
            table["reference"] = sample(self.accelerator.unwrap_model(self.reference.model))
        elif self.reference.mode == "adapters_off":
            with adapters_disabled(policy):
                table["reference"] = sample(policy)
        log_table(self, "completions", [dict(zip(table, values))
                                        for values in zip(*table.values())])

    @staticmethod
    def _prepare(dataset, tokenizer, args, names, name):
        if dataset is None:
            return None
        kind = validate_preference_dataset(dataset, args.paired, names, name,
                                           args.completions_are_samples)
        soft = check_soft_labels(dataset, name)
        if soft and not args.paired:
            raise DataError(f"{name} dataset has soft labels ('{SOFT_LABEL}'), which rate a "
                            f"pair, but loss {names} rates single completions: use a paired "
                            "loss, or round the labels (drop the column)")
        if soft:
            L.check_soft_labels(args.loss_specs)
        return prepare_preference_dataset(dataset, tokenizer, kind=kind,
                                          unpair=not args.paired, max_length=args.max_length,
                                          name=name, truncation_mode=args.truncation_mode,
                                          keep=(SOFT_LABEL,) if soft else (),
                                          max_prompt_length=args.max_prompt_length,
                                          max_completion_length=args.max_completion_length,
                                          num_proc=args.dataset_num_proc)

    # -----------------------------------------------------------------------------------
    # loss
    # -----------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if model.training else "eval"
        with activation_offloading(model, self.args):
            if "desirable" in inputs:
                batch = self._unpaired_batch(model, inputs)
            else:
                batch = self._paired_batch(model, inputs)
        self._count_tokens(mode, inputs)
        loss, out = L.compute_loss(self.loss_specs, self.loss_weights, batch, self.loss_params)
        if mode == "train":
            check_finite_loss(self, loss, "log-probs that overflowed (check the model's dtype)")
        self._record(mode, batch, out)
        return (loss, out) if return_outputs else loss

    def _paired_batch(self, model, inputs) -> L.PairedLogps:
        wpo = ("log_sum_sq", "logps") if self.args.use_weighting else ()
        logps, counts, stats = batch_logps(model, inputs, ld_alpha=self.args.ld_alpha,
                                           stats=("entropy", "mean_logit", "top1", *wpo))
        b = logps.shape[0] // 2
        self._record_token_stats("train" if model.training else "eval", stats, counts, b)
        ref_chosen = ref_rejected = None
        if "ref_chosen_logps" in inputs:
            ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        elif self.args.needs_reference:
            ref, _ = self.reference.logps(model, inputs)
            ref_chosen, ref_rejected = ref[:b], ref[b:]
        weights = None
        if self.args.use_weighting:
            weights = L.wpo_weights(stats["logps"], stats["log_sum_sq"], counts)
        return L.PairedLogps(logps[:b], logps[b:], counts[:b], counts[b:],
                             ref_chosen, ref_rejected, weights, inputs.get(SOFT_LABEL))

    def _unpaired_batch(self, model, inputs) -> L.UnpairedLogps:
        logps, counts, stats = batch_logps(model, inputs, stats=("entropy",))
        self._record_token_stats("train" if model.training else "eval", stats, counts, None)
        if "ref_logps" in inputs:
            ref, ref_kl = inputs["ref_logps"], inputs["ref_kl_logps"]
        else:
            ref, _ = self.reference.logps(model, inputs)
            ref_kl = self.reference.logps(model, inputs, prefix="kl_")[0] \
                if self._kto_reference_point else None
        z0 = None
        if self._kto_reference_point:
            with torch.no_grad():
                kl_logps, _ = batch_logps(model, inputs, prefix="kl_")
            gather = self.accelerator.gather
            z0 = L.kto_reference_point(gather(kl_logps), gather(ref_kl))
        return L.UnpairedLogps(logps, counts, inputs["desirable"], ref, z0)

    @property
    def _kto_reference_point(self) -> bool:
        """KTO's z0 needs the mismatched pairs' forwards; apo_zero_unpaired has none."""
        return any(s.name == "kto" for s in self.loss_specs)

    def autocast_smart_context_manager(self, cache_enabled: bool | None = True):
        """The run's mixed precision (accelerate's autocast: bf16, fp16 or none) over the
        whole loss, not only inside the model's forward: the LM head, applied after the
        forward in blocks (``logps.head_logps``), then runs in it too (on a GPU a bf16
        matmul, not a float32 one). The reference log-probs, live or precomputed, are
        computed in the same context."""
        return self.accelerator.autocast()

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, out = self.compute_loss(model, inputs, return_outputs=True)
        if prediction_loss_only:
            return loss.detach(), None, None
        if "desirable" in inputs:  # unpaired: each example's implicit reward [B], its label
            desirable = inputs["desirable"].bool()
            rewards = torch.empty(desirable.shape, dtype=out.chosen_rewards.dtype,
                                  device=desirable.device)
            rewards[desirable], rewards[~desirable] = out.chosen_rewards, out.rejected_rewards
            return loss.detach(), rewards, desirable.long()
        # for compute_metrics, as the reward trainer: the implicit rewards of chosen and
        # rejected [B, 2], every label 0 (chosen wins)
        rewards = torch.stack([out.chosen_rewards, out.rejected_rewards], -1)
        return loss.detach(), rewards, torch.zeros(rewards.shape[0], dtype=torch.long,
                                                   device=rewards.device)

    # -----------------------------------------------------------------------------------
    # saving; with sync_ref_model the reference is part of the training state
    # -----------------------------------------------------------------------------------

    def _save_checkpoint(self, model, trial):
        if self.args.sync_ref_model:  # before the state file that marks the checkpoint done
            folder = os.path.join(self._get_output_dir(trial=trial),
                                  f"checkpoint-{self.state.global_step}")
            self.reference.save_weights(folder, self.accelerator)
        super()._save_checkpoint(model, trial)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if self.args.sync_ref_model:
            self.reference.load_weights(resume_from_checkpoint)

    def create_model_card(self, model_name: str | None = None, dataset_name=None, tags=None,
                          **kwargs) -> None:
        """Write README.md to output_dir: base model, loss, hyperparameters, final metrics."""
        if not self.is_world_process_zero():
            return
        args = self.args
        losses = [s.name for s in self.loss_specs]  # as trained (rpo_alpha, CPO's names)
        hyper = {"loss_type": losses, "loss_weights": self.loss_weights,
                 "beta": [L.params_for(s, self.loss_params).beta for s in self.loss_specs],
                 "learning_rate": args.learning_rate, "num_train_epochs": args.num_train_epochs,
                 "max_steps": args.max_steps, "per_device_train_batch_size":
                 args.per_device_train_batch_size, "gradient_accumulation_steps":
                 args.gradient_accumulation_steps, "max_length": args.max_length,
                 "label_smoothing": args.label_smoothing, "seed": args.seed}
        names = "+".join(losses)
        trainer_model_card(
            self, method="preference", model_name=model_name, dataset_name=dataset_name,
            summary=f"Preference-optimised with loss `{names}` from `{self.base_model_name}`.",
            hyperparameters=hyper, tags=[*losses, *(tags or [])], papers=[
                *losses, *(["f_divergence"] if args.f_divergence_type != "reverse_kl" else []),
                *(name for name in ("ld_alpha", "use_weighting", "sync_ref_model")
                  if getattr(args, name) not in (None, False))])

