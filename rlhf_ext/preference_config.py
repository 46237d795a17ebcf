"""PreferenceConfig: TrainingArguments plus the preference-loss fields (PreferenceTrainer's
arguments, in rlhf_ext.preference), under TRL DPOConfig's names and defaults."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from . import losses as L
from .config_fields import DataFields, pad_multiple
from .run_record import ResumeFields
from .trainer_utils import DevicePrecision, check_finite_fields


@dataclass
class PreferenceConfig(DevicePrecision, ResumeFields, DataFields, TrainingArguments):
    """TrainingArguments plus the preference-loss fields, under TRL DPOConfig's names and
    defaults (learning rate 1e-6, a log every 10 steps). The defaults that differ on purpose
    (bf16 off on a CPU, beta the loss's own, padding-free on under sdpa, ...) are listed in
    docs/trl.md, "What differs from TRL"."""

    # not a field: True where the completions are the policy's own samples (online DPO),
    # so an empty one is the policy stopping at once, a sample to learn from; in a given
    # dataset an empty completion is an error
    completions_are_samples = False

    learning_rate: float = field(default=1e-6, metadata={
        "help": "Initial AdamW learning rate (TRL DPOConfig's default, 1e-6)."})
    logging_steps: float = field(default=10, metadata={
        "help": "Log every X steps (an integer), or every X of the run (a float below 1)."})
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
    max_prompt_length: int | None = field(default=None, metadata={
        "help": "Keep at most this many prompt tokens (the last ones, next to the completion)."})
    max_completion_length: int | None = field(default=None, metadata={
        "help": "Keep at most this many completion tokens (the first ones)."})
    rpo_alpha: float | None = field(default=None, metadata={
        "help": "RPO (Pang et al. 2024): add rpo_alpha x the chosen completions' NLL "
                "(the same as loss_type [..., sft] with loss_weights [..., rpo_alpha])."})
    use_weighting: bool = field(default=False, metadata={
        "help": "WPO (Zhou et al. 2024): weight each pair by the policy's own probability of "
                "its two completions (length-normalised, no gradient)."})
    ld_alpha: float | None = field(default=None, metadata={
        "help": "LD-DPO (Liu et al. 2024): completion tokens past the shorter completion of "
                "the pair count ld_alpha times in the log-probs (0 to 1; None = plain sums)."})
    f_divergence_type: str = field(default="reverse_kl", metadata={
        "help": "f-DPO (Wang et al. 2023): reverse_kl (DPO), forward_kl, js_divergence or "
                "alpha_divergence."})
    f_alpha_divergence_coef: float = field(default=0.5, metadata={
        "help": "alpha of alpha_divergence."})
    sync_ref_model: bool = field(default=False, metadata={
        "help": "TR-DPO (Gorbatovski et al. 2024): every ref_model_sync_steps steps the "
                "reference becomes alpha x policy + (1 - alpha) x reference."})
    ref_model_mixup_alpha: float = field(default=0.6, metadata={
        "help": "TR-DPO's alpha."})
    ref_model_sync_steps: int = field(default=512, metadata={
        "help": "TR-DPO's tau: optimizer steps between two reference updates."})
    padding_free: bool | None = field(default=None, metadata={
        "help": "Pack each batch into one row without padding (positions restart per "
                "sequence); needs an attention that honours packed position_ids (sdpa, "
                "flash-attention). With prefix_sharing the row is the pairs' "
                "[prompt | chosen | rejected] one after another. None (the default): on "
                "where the attention is sdpa, which then attends per sequence (or pair) "
                "without a mask; eager would need a dense mask over the whole batch, so "
                "it keeps padded rows."})
    prefix_sharing: bool | None = field(default=None, metadata={
        "help": "Paired losses: one row per pair, [prompt | chosen | rejected], so the prompt "
                "goes through the model once; the completions are kept apart in attention "
                "(sdpa or eager; others are refused at start). keep_start only. None (the "
                "default): on wherever it applies (a paired loss, keep_start, an sdpa or "
                "eager attention)."})
    gradient_checkpointing: bool = field(default=True, metadata={
        "help": "Recompute each layer's activations in backward instead of keeping them "
                "(TRL's default too): on SmolLM2-135M about 45% less peak memory at no "
                "measured cost in time; turn it off for small models or LoRA runs where "
                "memory is plenty."})
    precompute_ref_log_probs: bool = field(default=False, metadata={
        "help": "Compute reference log-probs once before training (cached on disk)."})
    precompute_ref_batch_size: int | None = None
    ref_logps_cache_dir: str | None = field(default=None, metadata={
        "help": "Where precomputed reference log-probs are cached "
                "(default $RLHF_EXT_CACHE or ~/.cache/rlhf_ext)."})
    disable_dropout: bool = field(default=True, metadata={
        "help": "Turn off dropout in the model and the reference (LoRA's and attention's too)."})
    model_init_kwargs: dict | None = None
    router_aux_loss_coef: float | None = field(default=None, metadata={
        "help": "Mixture-of-experts router loss weight: not implemented, leave None."})
    generate_during_eval: bool = field(default=False, metadata={
        "help": "At each evaluation, sample completions to a batch of eval prompts from the "
                "policy and the reference, and log them: completions.md in output_dir and a "
                "table for TensorBoard / Weights & Biases."})
    is_encoder_decoder: bool | None = field(default=None, metadata={
        "help": "Decoder-only models only: True is refused."})

    def __post_init__(self):
        if isinstance(self.loss_type, str):
            self.loss_type = [self.loss_type]
        check_finite_fields(self, ("beta", "loss_weights", "label_smoothing", "simpo_gamma",
                                   "cpo_alpha", "discopop_tau", "desirable_weight",
                                   "undesirable_weight", "learning_rate", "rpo_alpha",
                                   "ld_alpha", "f_alpha_divergence_coef",
                                   "ref_model_mixup_alpha"))
        self.pad_to_multiple_of = pad_multiple(self.pad_to_multiple_of)
        self.loss_specs, self.resolved_loss_weights = L.resolve_loss_types(*self._losses())
        L.check_params(self.loss_specs, self.loss_params())
        self._check_trl_fields()
        if self.prefix_sharing is None and self.truncation_mode != "keep_start":
            self.prefix_sharing = False  # "wherever it applies": not here
        if self.prefix_sharing and self.truncation_mode != "keep_start":
            raise ValueError("prefix_sharing keeps one prompt for chosen and rejected, which "
                             "keep_end truncation could cut differently: use keep_start")
        if self.truncation_mode not in ("keep_start", "keep_end"):
            raise ValueError(f"truncation_mode must be keep_start or keep_end, "
                             f"got {self.truncation_mode!r}")
        super().__post_init__()

    def _losses(self) -> tuple[list[str], list[float] | None]:
        """The loss names and weights this config trains with: loss_type and loss_weights,
        plus the sft term of ``rpo_alpha``. (TRL-named presets translate their names here.)"""
        names, weights = list(self.loss_type), self.loss_weights
        if self.rpo_alpha is not None:  # RPO as TRL had it: the NLL term by another name
            if "sft" in names:
                raise ValueError("rpo_alpha adds the sft (NLL) term and loss_type already has "
                                 "sft: drop rpo_alpha and weight sft in loss_weights")
            if self.rpo_alpha < 0:
                raise ValueError(f"rpo_alpha must be >= 0, got {self.rpo_alpha}")
            weights = [*(weights or [1.0] * len(names)), self.rpo_alpha]
            names.append("sft")
        return names, weights

    def _check_trl_fields(self) -> None:
        paired, names = self.loss_specs[0].paired, [s.name for s in self.loss_specs]
        if self.is_encoder_decoder:
            raise ValueError("is_encoder_decoder=True: this trainer trains decoder-only "
                             "(causal) language models")
        if self.router_aux_loss_coef is not None:
            raise ValueError("router_aux_loss_coef weights a mixture-of-experts router loss, "
                             "which this trainer does not add: leave it None")
        for name in ("max_prompt_length", "max_completion_length", "dataset_num_proc",
                     "ref_model_sync_steps"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.ld_alpha is not None:
            if not 0 <= self.ld_alpha <= 1:
                raise ValueError(f"ld_alpha must be in [0, 1] (LD-DPO uses 0.3-0.8), got "
                                 f"{self.ld_alpha}")
            if not paired:
                raise ValueError(f"ld_alpha compares the two completions of a pair; loss "
                                 f"{names} trains on unpaired completions")
        if self.use_weighting:
            unweighable = [s.name for s in self.loss_specs if not s.weighable or not s.paired]
            if unweighable:
                raise ValueError(f"use_weighting (WPO) weights each preference pair; loss(es) "
                                 f"{unweighable} couple the examples of a batch or have no "
                                 "pairs. Turn it off for them.")
        if self.sync_ref_model:
            if not self.needs_reference:
                raise ValueError(f"sync_ref_model updates the reference model, and loss "
                                 f"{names} uses none")
            if self.precompute_ref_log_probs:
                raise ValueError("sync_ref_model changes the reference during training, so "
                                 "its log-probs cannot be precomputed: turn one of them off")
            if not 0 <= self.ref_model_mixup_alpha <= 1:
                raise ValueError(f"ref_model_mixup_alpha must be in [0, 1], got "
                                 f"{self.ref_model_mixup_alpha}")

    def loss_params(self) -> L.LossParams:
        return L.LossParams(beta=self.beta, label_smoothing=self.label_smoothing,
                            simpo_gamma=self.simpo_gamma, cpo_alpha=self.cpo_alpha,
                            discopop_tau=self.discopop_tau,
                            desirable_weight=self.desirable_weight,
                            undesirable_weight=self.undesirable_weight,
                            f_divergence_type=self.f_divergence_type,
                            f_alpha_divergence_coef=self.f_alpha_divergence_coef)

    @property
    def needs_reference(self) -> bool:
        return any(s.needs_reference for s in self.loss_specs)

    @property
    def paired(self) -> bool:
        return self.loss_specs[0].paired
