"""PreferenceConfig and PreferenceTrainer: one transformers Trainer for every offline loss.

The loss is a name (``loss_type: simpo``) looked up in ``rlhf_ext.losses``; the trainer
only orchestrates: validate and tokenize the data, one forward pass for chosen and
rejected together, reference log-probs (none, a model, adapters disabled, or precomputed
and cached), the loss, TRL-named metrics. Everything else is the Trainer's own.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
from transformers import Trainer, TrainingArguments

from . import losses as L
from .data import (
    PreferenceCollator,
    check_fits_model,
    prepare_preference_dataset,
    validate_preference_dataset,
)
from .hub import trainer_model_card
from .logps import PREFIX_SHARING_ATTENTIONS, attention_implementation, batch_logps
from .models import (
    add_adapters,
    disable_dropout,
    keep_4bit_differentiable,
    load_causal_lm,
    load_tokenizer,
)
from .reference import ReferenceLogps
from .trainer_utils import (
    CheckedTraining,
    add_averaged_metrics,
    check_finite_fields,
    check_finite_loss,
    keep_token_out_of_args,
)


@dataclass
class PreferenceConfig(TrainingArguments):
    """TrainingArguments plus the preference-loss fields (TRL DPOConfig's names)."""

    loss_type: list[str] = field(default_factory=lambda: ["sigmoid"], metadata={
        "help": f"Loss name(s): {', '.join(sorted(L.LOSSES) + sorted(L.ALIASES))}. "
                "Several with loss_weights combine them (e.g. sigmoid sft = RPO)."})
    loss_weights: list[float] | None = field(default=None, metadata={
        "help": "One weight per loss_type (default 1 each)."})
    beta: float | None = field(default=None, metadata={
        "help": "Temperature / KL strength; default: the loss's own (0.1; simpo 2.0). For orpo "
                "it is lambda, for ipo tau."})
    label_smoothing: float = field(default=0.0, metadata={
        "help": "Label-noise rate for sigmoid (cDPO), robust, exo_pair, aot, simpo, cpo."})
    simpo_gamma: float | None = field(default=None, metadata={
        "help": "SimPO target margin gamma; default 0.5 * beta (the paper's gamma/beta)."})
    cpo_alpha: float = field(default=1.0, metadata={"help": "Weight of CPO's NLL term."})
    discopop_tau: float = field(default=0.05, metadata={"help": "DiscoPOP temperature."})
    desirable_weight: float = field(default=1.0, metadata={"help": "KTO lambda_D."})
    undesirable_weight: float = field(default=1.0, metadata={"help": "KTO lambda_U."})
    max_length: int | None = field(default=1024, metadata={
        "help": "Maximum prompt + completion tokens; longer sequences are truncated."})
    truncation_mode: str = field(default="keep_start", metadata={
        "help": "keep_start or keep_end."})
    pad_to_multiple_of: int | None = None
    padding_free: bool = field(default=False, metadata={
        "help": "Pack each batch into one row without padding (positions restart per "
                "sequence); needs an attention that honours packed position_ids (sdpa, "
                "flash-attention)."})
    prefix_sharing: bool = field(default=False, metadata={
        "help": "Paired losses: one row per pair, [prompt | chosen | rejected], so the prompt "
                "goes through the model once; an attention mask keeps the completions apart "
                "(needs an attention that takes a dense 4D mask: sdpa or eager; others are "
                "refused at start). keep_start only."})
    precompute_ref_log_probs: bool = field(default=False, metadata={
        "help": "Compute reference log-probs once before training (cached on disk)."})
    precompute_ref_batch_size: int | None = None
    ref_logps_cache_dir: str | None = field(default=None, metadata={
        "help": "Where precomputed reference log-probs are cached "
                "(default $RLHF_EXT_CACHE or ~/.cache/rlhf_ext)."})
    disable_dropout: bool = field(default=True, metadata={
        "help": "Turn off dropout in the model and the reference (LoRA's and attention's too)."})
    model_init_kwargs: dict | None = None
    remove_unused_columns: bool = False

    def __post_init__(self):
        if isinstance(self.loss_type, str):
            self.loss_type = [self.loss_type]
        self.loss_specs, self.resolved_loss_weights = L.resolve_loss_types(
            self.loss_type, self.loss_weights)
        check_finite_fields(self, ("beta", "loss_weights", "label_smoothing", "simpo_gamma",
                                   "cpo_alpha", "discopop_tau", "desirable_weight",
                                   "undesirable_weight", "learning_rate"))
        L.check_params(self.loss_specs, self.loss_params())
        if self.prefix_sharing and self.truncation_mode != "keep_start":
            raise ValueError("prefix_sharing keeps one prompt for chosen and rejected, which "
                             "keep_end truncation could cut differently: use keep_start")
        if self.prefix_sharing and self.padding_free:
            raise ValueError("prefix_sharing and padding_free are two layouts; pick one")
        if self.truncation_mode not in ("keep_start", "keep_end"):
            raise ValueError(f"truncation_mode must be keep_start or keep_end, "
                             f"got {self.truncation_mode!r}")
        super().__post_init__()

    def loss_params(self) -> L.LossParams:
        return L.LossParams(beta=self.beta, label_smoothing=self.label_smoothing,
                            simpo_gamma=self.simpo_gamma, cpo_alpha=self.cpo_alpha,
                            discopop_tau=self.discopop_tau,
                            desirable_weight=self.desirable_weight,
                            undesirable_weight=self.undesirable_weight)

    @property
    def needs_reference(self) -> bool:
        return any(s.needs_reference for s in self.loss_specs)

    @property
    def paired(self) -> bool:
        return self.loss_specs[0].paired


def _named(eval_dataset) -> list:
    """(name, dataset) pairs of an eval dataset: none, one, or a dict of them."""
    if isinstance(eval_dataset, dict):
        return [(f"eval {k}", v) for k, v in eval_dataset.items()]
    return [] if eval_dataset is None else [("eval", eval_dataset)]


def check_prefix_sharing_attention(model, args: PreferenceConfig) -> None:
    """prefix_sharing hands the model a dense 4D mask; only some attentions take one."""
    impl = attention_implementation(model)
    if args.prefix_sharing and args.paired and impl not in PREFIX_SHARING_ATTENTIONS:
        raise ValueError(
            f"prefix_sharing needs an attention that takes a dense 4D mask "
            f"({' or '.join(PREFIX_SHARING_ATTENTIONS)}); the model uses {impl!r}. Load it "
            f"with attn_implementation='sdpa', or use padding_free=True instead")


class PreferenceTrainer(CheckedTraining, Trainer):
    """Offline preference optimisation; the constructor takes trl.DPOTrainer's arguments."""

    _tag_names = ["rlhf-ext", "preference"]

    def __init__(self, model, ref_model=None, args: PreferenceConfig | None = None,
                 data_collator=None, train_dataset=None, eval_dataset=None,
                 processing_class=None, compute_metrics=None, callbacks=None,
                 optimizers=(None, None), peft_config=None):
        if args is None:
            args = PreferenceConfig(output_dir="preference-output")
        keep_token_out_of_args(args)
        self.base_model_name = model if isinstance(model, str) else \
            getattr(model.config, "_name_or_path", None)
        if isinstance(model, str):
            model = load_causal_lm(model, **(args.model_init_kwargs or {}))
        if isinstance(ref_model, str):
            ref_model = load_causal_lm(ref_model, **(args.model_init_kwargs or {}))
        processing_class = load_tokenizer(processing_class, self.base_model_name)
        check_prefix_sharing_attention(model, args)
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
            data_collator = PreferenceCollator(processing_class.pad_token_id, args.max_length,
                                               args.truncation_mode, args.pad_to_multiple_of,
                                               args.padding_free,
                                               args.prefix_sharing and args.paired)

        # Reference: none, an explicit model, the base with adapters off, or a frozen copy.
        self.reference = ReferenceLogps.choose(model, ref_model, args)
        self.ref_model = self.reference.model
        super().__init__(model=model, args=args, data_collator=data_collator,
                         train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=processing_class, compute_metrics=compute_metrics,
                         callbacks=callbacks, optimizers=optimizers)
        self.reference.prepare(self.accelerator)
        self.ref_model = self.reference.model
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        if args.precompute_ref_log_probs and args.needs_reference:
            self.train_dataset = self.reference.precompute(self, self.train_dataset, "train")
            if isinstance(self.eval_dataset, dict):
                self.eval_dataset = {k: self.reference.precompute(self, v, f"eval {k}")
                                     for k, v in self.eval_dataset.items()}
            elif self.eval_dataset is not None:
                self.eval_dataset = self.reference.precompute(self, self.eval_dataset, "eval")

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        """As Trainer.evaluate; a dataset given here is validated and tokenized first."""
        if eval_dataset is not None and not isinstance(eval_dataset, dict) \
                and "prompt_ids" not in eval_dataset.column_names:
            eval_dataset = self._prepare(eval_dataset, self.processing_class, self.args,
                                         [s.name for s in self.loss_specs], "eval")
            if self.args.precompute_ref_log_probs and self.args.needs_reference:
                eval_dataset = self.reference.precompute(self, eval_dataset, "eval")
        return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)

    @staticmethod
    def _prepare(dataset, tokenizer, args, names, name):
        if dataset is None:
            return None
        kind = validate_preference_dataset(dataset, args.paired, names, name)
        return prepare_preference_dataset(dataset, tokenizer, kind=kind,
                                          unpair=not args.paired, max_length=args.max_length,
                                          name=name, truncation_mode=args.truncation_mode)

    # -----------------------------------------------------------------------------------
    # loss
    # -----------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if model.training else "eval"
        if "desirable" in inputs:
            batch = self._unpaired_batch(model, inputs)
        else:
            batch = self._paired_batch(model, inputs)
        loss, out = L.compute_loss(self.loss_specs, self.loss_weights, batch, self.loss_params)
        if mode == "train":
            check_finite_loss(self, loss, "log-probs that overflowed (check the model's dtype)")
        self._record(mode, batch, out)
        return (loss, out) if return_outputs else loss

    def _paired_batch(self, model, inputs) -> L.PairedLogps:
        logps, counts = batch_logps(model, inputs)
        b = logps.shape[0] // 2
        ref_chosen = ref_rejected = None
        if "ref_chosen_logps" in inputs:
            ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        elif self.args.needs_reference:
            ref, _ = self.reference.logps(model, inputs)
            ref_chosen, ref_rejected = ref[:b], ref[b:]
        return L.PairedLogps(logps[:b], logps[b:], counts[:b], counts[b:],
                             ref_chosen, ref_rejected)

    def _unpaired_batch(self, model, inputs) -> L.UnpairedLogps:
        logps, counts = batch_logps(model, inputs)
        if "ref_logps" in inputs:
            ref, ref_kl = inputs["ref_logps"], inputs["ref_kl_logps"]
        else:
            ref, _ = self.reference.logps(model, inputs)
            ref_kl, _ = self.reference.logps(model, inputs, prefix="kl_")
        with torch.no_grad():
            kl_logps, _ = batch_logps(model, inputs, prefix="kl_")
        gather = self.accelerator.gather
        z0 = L.kto_reference_point(gather(kl_logps), gather(ref_kl))
        return L.UnpairedLogps(logps, counts, inputs["desirable"], ref, z0)

    # -----------------------------------------------------------------------------------
    # metrics (TRL's names), averaged over the steps between two logs and over processes
    # -----------------------------------------------------------------------------------

    def _mean(self, mode: str, key: str, values: torch.Tensor) -> None:
        values = values.detach().float().reshape(-1)
        total = self.accelerator.gather(values.sum().reshape(1)).sum()
        count = self.accelerator.gather(torch.tensor([values.numel()], device=values.device,
                                                     dtype=torch.float32)).sum()
        if count > 0:
            self._metrics[mode][key].append((total / count).item())

    def _record(self, mode: str, batch, out: L.LossOutput) -> None:
        spec = self.loss_specs[0]
        if isinstance(batch, L.PairedLogps):
            chosen, rejected = batch.chosen, batch.rejected
            if spec.logps == "mean":
                chosen = chosen / batch.chosen_tokens.clamp(min=1)
                rejected = rejected / batch.rejected_tokens.clamp(min=1)
            self._mean(mode, "rewards/accuracies",
                       (out.chosen_rewards > out.rejected_rewards).float())
            self._mean(mode, "rewards/margins", out.chosen_rewards - out.rejected_rewards)
        else:
            labels = batch.labels.bool()
            chosen, rejected = batch.logps[labels], batch.logps[~labels]
        self._mean(mode, "rewards/chosen", out.chosen_rewards)
        self._mean(mode, "rewards/rejected", out.rejected_rewards)
        self._mean(mode, "logps/chosen", chosen)
        self._mean(mode, "logps/rejected", rejected)
        if not isinstance(batch, L.PairedLogps) and self._metrics[mode]["rewards/rejected"] \
                and self._metrics[mode]["rewards/chosen"]:
            self._metrics[mode]["rewards/margins"].append(
                self._metrics[mode]["rewards/chosen"][-1]
                - self._metrics[mode]["rewards/rejected"][-1])
        for key, value in out.metrics.items():
            self._mean(mode, key, value)

    def log(self, logs: dict, start_time: float | None = None) -> None:
        add_averaged_metrics(self._metrics, logs)
        super().log(logs, start_time)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    # -----------------------------------------------------------------------------------
    # saving
    # -----------------------------------------------------------------------------------

    def create_model_card(self, model_name: str | None = None, dataset_name=None, tags=None,
                          **kwargs) -> None:
        """Write README.md to output_dir: base model, loss, hyperparameters, final metrics."""
        if not self.is_world_process_zero():
            return
        args = self.args
        hyper = {"loss_type": args.loss_type, "loss_weights": self.loss_weights,
                 "beta": [L.params_for(s, self.loss_params).beta for s in self.loss_specs],
                 "learning_rate": args.learning_rate, "num_train_epochs": args.num_train_epochs,
                 "max_steps": args.max_steps, "per_device_train_batch_size":
                 args.per_device_train_batch_size, "gradient_accumulation_steps":
                 args.gradient_accumulation_steps, "max_length": args.max_length,
                 "label_smoothing": args.label_smoothing, "seed": args.seed}
        names = "+".join(args.loss_type)
        trainer_model_card(
            self, method="preference", model_name=model_name, dataset_name=dataset_name,
            summary=f"Preference-optimised with loss `{names}` from `{self.base_model_name}`.",
            hyperparameters=hyper, tags=[*args.loss_type, *(tags or [])])

