"""TRL's online trainers by their names: ``GRPOConfig``/``GRPOTrainer`` and
``RLOOConfig``/``RLOOTrainer`` are presets of the one online trainer (``PPOTrainer``).

The configs carry every field of TRL 1.16's, with TRL's defaults (bf16 aside: off on a CPU,
as in all our configs), and translate them into ``PPOConfig``'s: ``max_completion_length`` is
``response_length``, ``epsilon`` ``cliprange``, ``num_iterations`` ``num_ppo_epochs``,
``steps_per_generation`` micro-batches make one rollout, ``num_train_epochs`` counts
passes over the prompts, GRPO's ``beta`` is the weight of a k3 KL loss term, RLOO's the
weight of the summed k1 KL taken off the score, and ``loss_type`` picks the policy loss
and how it is aggregated. A field asking for something not here (tools, another
engine) is refused when the config is built, with the reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .config import PPOConfig
from .trainer import PPOTrainer

# TRL loss_type -> (our policy_loss, our loss_aggregation)
LOSS_TYPES = {"grpo": ("clip", "seq_mean_token_mean"), "bnpo": ("clip", "token_mean"),
              "dr_grpo": ("clip", "seq_mean_token_sum"), "dapo": ("clip", "step_token_mean"),
              "cispo": ("cispo", "step_token_mean"), "sapo": ("sapo", "seq_mean_token_mean")}

_SAMPLER = ("our sampler draws from softmax(logits / temperature) cut by top_k and top_p "
            "only, so that the log-probs the loss uses are those of the sampling "
            "distribution")
# field -> (the value we run, why another is refused)
REFUSED = {
    "vllm_model_impl": ("vllm", "vLLM runs its own model implementation"),
    "vllm_structured_outputs_regex": (None, "structured outputs are not implemented"),
    "use_transformers_continuous_batching": (False, "generation runs on rlhf_ext's sampler"),
    "use_transformers_paged": (False, "generation runs on rlhf_ext's sampler"),
    "transformers_continuous_batching_config": (None, "generation runs on rlhf_ext's sampler"),
    "min_p": (None, _SAMPLER), "repetition_penalty": (1.0, _SAMPLER),
    "generation_kwargs": (None, _SAMPLER), "cache_implementation": (None, _SAMPLER),
    "chat_template_kwargs": (None, "prompts are rendered with the tokenizer's chat template "
                                   "as it is"),
    "router_aux_loss_coef": (None, "the mixture-of-experts auxiliary loss is not implemented"),
    "cast_lm_head_to_fp32": (False, "log-probs are taken in float32 from the head's output; "
                                    "a float32 head matmul is not implemented"),
    "num_generations_eval": (None, "evaluation with sampled completions is not implemented"),
    "ds3_gather_for_generation": (True, "the online trainer does not run under ZeRO-3 yet"),
    "sync_ref_model": (False, "reference syncing (TR-DPO) is not implemented"),
    "multi_objective_aggregation": ("sum_then_normalize",
                                    "normalize_then_sum (GDPO) is not implemented"),
    "use_adaptive_entropy": (False, "adaptive entropy control is not implemented; set "
                                    "entropy_coef for a fixed bonus"),
    "off_policy_mask_threshold": (None, "off-policy sequence masking is not implemented"),
    "max_tool_calling_iterations": (None, "tool calling is not implemented"),
    "log_completions_hub_repo": (None, "completions are logged as a local table "
                                       "(samples.md) and to the trackers, not to a Hub repo"),
}


@dataclass
class _TRLOnlineFields(PPOConfig):
    """The fields TRL's GRPOConfig and RLOOConfig share, with TRL's defaults."""

    learning_rate: float = 1e-6
    logging_steps: float = 10
    gradient_checkpointing: bool = True
    disable_dropout: bool = False
    model_init_kwargs: dict | str | None = field(default=None, metadata={
        "help": "from_pretrained keyword arguments when the model is given as a path."})
    trust_remote_code: bool = False
    router_aux_loss_coef: float | None = None
    num_generations: int = field(default=8, metadata={"help": "Completions per prompt."})
    num_generations_eval: int | None = None
    max_completion_length: int | None = field(default=512, metadata={
        "help": "max_new_tokens of the sampled completions (our response_length)."})
    ds3_gather_for_generation: bool = True
    pad_to_multiple_of: int | str | None = "auto"
    generation_batch_size: int | None = field(default=None, metadata={
        "help": "Completions sampled at once, all processes together; None: "
                "per_device_train_batch_size x processes x steps_per_generation."})
    steps_per_generation: int | None = field(default=None, metadata={
        "help": "Micro-batches per generation; None: gradient_accumulation_steps."})
    temperature: float = 1.0
    min_p: float | None = None
    generation_kwargs: dict | str | None = None
    chat_template_kwargs: dict | str | None = None
    repetition_penalty: float = 1.0
    cache_implementation: str | None = None
    vllm_model_impl: str = "vllm"
    vllm_structured_outputs_regex: str | None = None
    vllm_group_port: int = 51216
    beta: float = field(default=0.0, metadata={"help": "KL coefficient (0: no reference)."})
    num_iterations: int = field(default=1, metadata={
        "help": "Updates per generation (our num_ppo_epochs)."})
    epsilon: float = field(default=0.2, metadata={"help": "Clip range (our cliprange)."})
    sync_ref_model: bool = False
    ref_model_mixup_alpha: float = 0.6
    ref_model_sync_steps: int = 512
    log_completions: bool = field(default=False, metadata={
        "help": "Log a table of completions at every rollout (else num_sample_generations)."})
    log_multimodal: bool = True
    num_completions_to_print: int | None = None
    log_unique_prompts: bool = False
    use_transformers_continuous_batching: bool = False
    transformers_continuous_batching_config: dict | str | None = None
    use_transformers_paged: bool = False
    # what our own fields follow from (set from TRL's in __post_init__)
    rollout_batch_size: int = field(default=0, metadata={
        "help": "Derived: per_device_train_batch_size x steps_per_generation."})

    def __post_init__(self):
        for name, (allowed, reason) in REFUSED.items():
            if hasattr(self, name) and getattr(self, name) != allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not supported: {reason}. "
                                 f"Leave it at {allowed!r}.")
        if self.pad_to_multiple_of not in ("auto", None):
            raise ValueError("pad_to_multiple_of is for Neuron's fixed shapes; leave it 'auto'")
        self.pad_to_multiple_of = None  # TRL: "auto" is None off Neuron
        if getattr(self, "vllm_importance_sampling_cap", None) is not None:  # TRL: deprecated
            self.vllm_importance_sampling_clip_max = self.vllm_importance_sampling_cap
        self.response_length = self.max_completion_length
        self.cliprange = self.epsilon
        self.num_ppo_epochs = self.num_iterations
        self._set_loss()
        self.dataset_epochs = self.num_train_epochs  # passes over the prompts, as in TRL
        if self.log_completions:
            self.num_sample_generations = 10**9  # every rollout
        super().__post_init__()

    def _set_loss(self) -> None:
        raise NotImplementedError

    def _check_estimator(self) -> None:
        """TRL's batch arithmetic first, then ours."""
        world = self.world_size
        if self.generation_batch_size is not None and self.steps_per_generation is not None:
            raise ValueError("'generation_batch_size' and 'steps_per_generation' can not be "
                             "both configured at the same time")
        per_step = self.per_device_train_batch_size * world
        if self.generation_batch_size is not None:
            if self.generation_batch_size % per_step:
                raise ValueError(f"generation_batch_size ({self.generation_batch_size}) must "
                                 f"be divisible by the global batch size ({per_step})")
            self.steps_per_generation = self.generation_batch_size // per_step
        if self.steps_per_generation is None:
            self.steps_per_generation = self.gradient_accumulation_steps
        self.generation_batch_size = per_step * self.steps_per_generation
        self.rollout_batch_size = self.per_device_train_batch_size * self.steps_per_generation
        if self.rollout_batch_size % self.num_generations:
            raise ValueError(
                f"each process samples whole groups: per_device_train_batch_size x "
                f"steps_per_generation ({self.rollout_batch_size}) must be a multiple of "
                f"num_generations ({self.num_generations})")
        super()._check_estimator()


@dataclass
class GRPOConfig(_TRLOnlineFields):
    """TRL's GRPOConfig: every field, TRL's defaults (``loss_type='dapo'``, ``beta=0``,
    ``use_bias_correction_kl=True``), as a preset of ``PPOConfig``."""

    cast_lm_head_to_fp32: bool = False
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
    multi_objective_aggregation: str = "sum_then_normalize"
    loss_type: str = field(default="dapo", metadata={
        "help": "grpo, bnpo, dr_grpo, dapo, cispo or sapo (luspo and vespo are refused)."})
    use_adaptive_entropy: bool = False
    entropy_coef_min: float = 0.0
    entropy_coef_max: float = 1.0
    entropy_coef_delta: float = 0.005
    entropy_target: float = 0.2
    max_tool_calling_iterations: int | None = None
    off_policy_mask_threshold: float | None = None
    use_bias_correction_kl: bool = True
    log_completions_hub_repo: str | None = None
    vllm_importance_sampling_cap: float | None = None

    def _set_loss(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type {self.loss_type!r} is not supported; choose one of "
                             f"{', '.join(LOSS_TYPES)} (luspo and vespo are not implemented)")
        self.policy_loss, self.loss_aggregation = LOSS_TYPES[self.loss_type]
        self.advantage_estimator = "grpo"
        self.kl_coef, self.kl_loss_coef, self.kl_loss_estimator = 0.0, self.beta, "k3"


@dataclass
class RLOOConfig(_TRLOnlineFields):
    """TRL's RLOOConfig: every field, TRL's defaults (``beta=0.05``, ``num_generations=2``):
    the leave-one-out baseline, one clipped ratio per sequence (the ratio of the sequence
    probabilities), the summed k1 KL taken off the score."""

    num_generations: int = 2
    beta: float = 0.05
    reward_clip_range: tuple[float, float] | None = field(default=None, metadata={
        "help": "Clip the rewards to this range, before the KL and the baseline."})

    def _set_loss(self) -> None:
        self.advantage_estimator, self.kl_in_reward = "rloo", "score"
        self.kl_coef, self.kl_estimator, self.kl_loss_coef = self.beta, "k1", 0.0
        self.importance_sampling_level, self.loss_aggregation = "sequence_sum", "seq_mean_token_mean"

    @property
    def score_bounds(self) -> tuple[float, float] | None:
        return tuple(self.reward_clip_range) if self.reward_clip_range else None


class _TRLOnlineTrainer(PPOTrainer):
    """TRL's signature on the one online trainer: ``model`` a model or a path,
    ``reward_funcs`` one reward function or a list (``ppo.reward_funcs``)."""

    config_class = GRPOConfig
    suffix = "GRPO"

    def __init__(self, model, reward_funcs=None, args=None, train_dataset=None,
                 eval_dataset=None, processing_class=None, reward_processing_classes=None,
                 callbacks=None, optimizers=(None, None), quantization_config=None,
                 peft_config=None, **unsupported):
        if unsupported:
            raise ValueError(f"{sorted(unsupported)} not supported: tools, rollout functions "
                             "and environments are not implemented")
        if reward_funcs is None:
            raise ValueError("pass reward_funcs: a function, a reward model (or its path), "
                             "or a list of them")
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            args = self.config_class(output_dir=f"{name.rstrip('/').split('/')[-1]}-{self.suffix}")
        if isinstance(model, str):
            from transformers import AutoModelForCausalLM

            from ..config_fields import model_init

            kwargs = model_init(args)
            if quantization_config is not None:
                kwargs["quantization_config"] = quantization_config
            model = AutoModelForCausalLM.from_pretrained(model, **kwargs)
        if train_dataset is None:
            raise ValueError("pass train_dataset: a dataset with a 'prompt' column")
        if args.max_steps <= 0:  # TRL's epochs are passes over the prompts
            prompts_per_rollout = args.rollout_batch_size // args.num_generations * args.world_size
            args.num_train_epochs = math.ceil(args.dataset_epochs * len(train_dataset)
                                              / prompts_per_rollout)
        super().__init__(model, args, processing_class, train_dataset, reward=reward_funcs,
                         reward_tokenizer=reward_processing_classes, eval_dataset=eval_dataset,
                         callbacks=callbacks, optimizers=optimizers, peft_config=peft_config)


class GRPOTrainer(_TRLOnlineTrainer):
    """TRL's GRPOTrainer: ``PPOTrainer`` with ``GRPOConfig``'s preset."""


class RLOOTrainer(_TRLOnlineTrainer):
    """TRL's RLOOTrainer: ``PPOTrainer`` with ``RLOOConfig``'s preset."""

    config_class = RLOOConfig
    suffix = "RLOO"
