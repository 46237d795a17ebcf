"""PPOConfig: TrainingArguments plus the online-RL fields (TRL PPOConfig's names where they
exist), checked when built; properties derive what the trainer and rollout run."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from transformers import TrainingArguments

from ..config_fields import VLLMFields
from ..run_record import ResumeFields
from ..trainer_utils import DevicePrecision, check_finite_fields
from . import core


@dataclass
class PPOConfig(DevicePrecision, ResumeFields, VLLMFields, TrainingArguments):
    """TrainingArguments plus PPO's fields (TRL PPOConfig's names where they exist)."""

    rollout_batch_size: int = field(default=64, metadata={
        "help": "Prompts sampled per PPO iteration (per process)."})
    num_ppo_epochs: int = field(default=4, metadata={"help": "Passes over each rollout."})
    total_episodes: int | None = field(default=None, metadata={
        "help": "Total prompts to roll out; sets num_train_epochs (= iterations)."})
    local_rollout_forward_batch_size: int = field(default=64, metadata={
        "help": "Rows per sampling and scoring forward in the rollout: its peak memory "
                "follows this, not rollout_batch_size."})
    advantage_estimator: str = field(default="gae", metadata={
        "help": "gae (PPO with a value model), or critic-free (no value model): grpo, rloo, "
                "reinforce_pp (REINFORCE++), reinforce_pp_baseline (REINFORCE++ with a "
                "group baseline)."})
    num_generations: int = field(default=1, metadata={
        "help": "Samples per prompt (a group); grpo, rloo and reinforce_pp_baseline need >= 2. "
                "rollout_batch_size counts samples and must be a multiple of it."})
    scale_rewards: str = field(default="group", metadata={
        "help": "grpo: divide by the std of the group (group, or True), of the whole batch "
                "(batch), or not at all (none, or False: Dr. GRPO)."})
    normalize_advantages: bool = field(default=False, metadata={
        "help": "Critic-free: whiten the sequence advantages over the batch of every process "
                "(TRL RLOO's option)."})
    kl_in_reward: str = field(default="token", metadata={
        "help": "Where kl_coef's KL enters the reward: token (a -kl_coef KL_t reward on "
                "every token, as in PPO) or score (critic-free only: the summed KL taken off "
                "the score before the baseline, as TRL's RLOO)."})
    loss_aggregation: str = field(default="token_mean", metadata={
        "help": "How per-token policy (and KL and value) losses become one: token_mean "
                "(TRL's bnpo), "
                "seq_mean_token_mean (GRPO), seq_mean_token_sum (Dr. GRPO: token sums / "
                "response_length), step_token_mean (DAPO: the token mean of the whole "
                "optimizer step, every process)."})
    policy_loss: str = field(default="clip", metadata={
        "help": "clip (PPO's clipped ratio), cispo (clipped, stopped importance weight "
                "times log pi; MiniMax-M1) or sapo (a soft sigmoid gate; Gao et al. 2025)."})
    importance_sampling_level: str = field(default="token", metadata={
        "help": "The ratio the policy loss clips: per token, per sequence as the mean "
                "token log-ratio (sequence: GSPO), or the whole sequence's probability ratio "
                "(sequence_sum: TRL's RLOO)."})
    epsilon_high: float | None = field(default=None, metadata={
        "help": "Upper clip range (DAPO's clip-higher, e.g. 0.28); None: cliprange. For "
                "cispo, the cap on the importance weight."})
    delta: float | None = field(default=None, metadata={
        "help": "Dual clip: cap on the unclipped ratio (INTELLECT-2; > 1 + epsilon_high)."})
    sapo_temperature_pos: float = field(default=1.0, metadata={
        "help": "sapo's gate temperature where the advantage is positive."})
    sapo_temperature_neg: float = field(default=1.05, metadata={
        "help": "sapo's gate temperature where the advantage is not positive."})
    use_bias_correction_kl: bool = field(default=False, metadata={
        "help": "Multiply the KL loss term by the importance ratio (DeepSeek-V3.2), making "
                "its gradient the unbiased reverse-KL gradient; TRL GRPO's default."})
    mask_truncated_completions: bool = field(default=False, metadata={
        "help": "Responses that hit response_length without eos get no loss (they still "
                "count in their group's baseline; DAPO's overlong filtering)."})
    top_entropy_quantile: float = field(default=1.0, metadata={
        "help": "Keep in the policy loss only this top fraction of real tokens by entropy "
                "(0.2 in 'Beyond the 80/20 rule'); 1.0 keeps all."})
    entropy_coef: float = field(default=0.0, metadata={
        "help": "Entropy bonus: minus this times the token-mean entropy of the policy "
                "(over the tokens the policy loss keeps)."})
    dynamic_sampling: bool = field(default=False, metadata={
        "help": "DAPO's dynamic sampling (group estimators): groups whose scores are all "
                "equal are replaced by groups of further prompts, sampled up to "
                "dynamic_sampling_max_rounds extra times; groups still uninformative then "
                "stay with no loss."})
    dynamic_sampling_max_rounds: int = field(default=3, metadata={
        "help": "Extra sampling rounds dynamic_sampling may run per rollout."})
    shuffle_dataset: bool = field(default=True, metadata={
        "help": "Visit the prompts in a seeded shuffled order (False: dataset order)."})
    kl_loss_coef: float = field(default=0.0, metadata={
        "help": "KL to the reference as a loss term (GRPO's beta), beside or instead of "
                "kl_coef's KL in the reward."})
    kl_loss_estimator: str = field(default="k3", metadata={"help": "k1, k2 or k3."})
    prefix_sharing: bool = field(default=False, metadata={
        "help": "With num_generations > 1: the samples of one prompt run as one row "
                "[prompt | response 1 | ... | response G] in the policy's and reference's "
                "forwards, so the prompt is computed once per group (sdpa or eager "
                "attention; minibatches then hold whole groups)."})
    vllm_importance_sampling_correction: bool = field(default=True, metadata={
        "help": "With use_vllm: weigh each token's policy loss by exp(old - sampler log-prob), "
                "the gap between the trainer's and vLLM's kernels (ppo.sampler_correction)."})
    vllm_importance_sampling_mode: str = field(default="sequence_mask", metadata={
        "help": "token_truncate, token_mask, sequence_truncate or sequence_mask."})
    vllm_importance_sampling_clip_max: float | None = 3.0
    vllm_importance_sampling_clip_min: float | None = None
    response_length: int = field(default=53, metadata={"help": "max_new_tokens of rollouts."})
    temperature: float = 0.7
    top_k: int = 0
    top_p: float = 1.0
    kl_coef: float = field(default=0.05, metadata={"help": "beta (initial when adaptive)."})
    kl_estimator: str = field(default="k1", metadata={"help": "k1, k2 or k3."})
    kl_target: float | None = field(default=None, metadata={
        "help": "Target KL for the adaptive controller (Ziegler et al.); None = fixed beta."})
    kl_horizon: int = 10000
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float | None = 0.2
    vf_coef: float = 0.1
    value_head_on_policy: bool = field(default=False, metadata={
        "help": "gae only: the value is a linear head on the policy's own hidden states "
                "(TRL 0.x's AutoModelForCausalLMWithValueHead) instead of a value model: one "
                "forward and backward per minibatch serve both losses, no second model is "
                "held, and the value loss trains the policy's weights too."})
    whiten_advantages: bool = field(default=True, metadata={
        "help": "gae only: whiten advantages over the rollout's tokens (the critic-free "
                "estimators normalise as their method defines)."})
    whiten_rewards: bool = field(default=False, metadata={"help": "gae only."})
    reward_weights: list[float] | None = field(default=None, metadata={
        "help": "One weight per reward function (a list of them); None: all 1."})
    missing_eos_penalty: float | None = None
    score_clip: float | None = None
    normalize_scores: bool = False
    disable_dropout: bool = field(default=True, metadata={
        "help": "Turn off dropout in policy, value, reward and reference models: the rollout's "
                "log-probs and the update's must come from the same function."})
    num_sample_generations: int = field(default=10, metadata={
        "help": "How many times to log a table of sample completions (0: never)."})
    remove_unused_columns: bool = False

    def __post_init__(self):
        if isinstance(self.scale_rewards, bool):  # TRL accepts True / False too
            self.scale_rewards = "group" if self.scale_rewards else "none"
        check_finite_fields(self, ("temperature", "kl_coef", "kl_target", "gamma", "lam",
                                   "cliprange", "cliprange_value", "vf_coef",
                                   "missing_eos_penalty", "score_clip", "learning_rate",
                                   "kl_loss_coef", "epsilon_high", "delta", "entropy_coef",
                                   "sapo_temperature_pos", "sapo_temperature_neg"))
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}: PPO's log-probs "
                             "are those of softmax(logits / temperature), which greedy decoding "
                             "does not sample from")
        for name in ("kl_estimator", "kl_loss_estimator"):
            if getattr(self, name) not in ("k1", "k2", "k3"):
                raise ValueError(f"{name} must be k1, k2 or k3, got {getattr(self, name)!r}")
        super().__post_init__()
        self._check_estimator()  # after the device set-up: TRL's presets read world_size
        if self.total_episodes is not None:
            self.num_train_epochs = math.ceil(self.total_episodes / self.rollout_batch_size)
        self._check_loss()

    def _check_loss(self) -> None:
        choices = {"policy_loss": core.POLICY_LOSSES, "kl_in_reward": ("token", "score"),
                   "importance_sampling_level": core.IS_LEVELS,
                   "scale_rewards": core.REWARD_SCALINGS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, "
                                 f"got {getattr(self, name)!r}")
        if self.kl_in_reward == "score" and self.uses_critic:
            raise ValueError("kl_in_reward='score' puts the KL into the score before a group "
                             "baseline; gae takes it per token: use kl_in_reward='token'")
        if not 0.0 <= self.top_entropy_quantile <= 1.0:
            raise ValueError(f"top_entropy_quantile must be in [0, 1], got "
                             f"{self.top_entropy_quantile}")
        high = self.cliprange if self.epsilon_high is None else self.epsilon_high
        if self.delta is not None and self.delta <= 1 + high:
            raise ValueError(f"delta ({self.delta}) caps the unclipped ratio: it must exceed "
                             f"1 + epsilon_high ({1 + high})")
        if self.use_vllm:
            self._check_vllm()
        if self.dynamic_sampling and self.advantage_estimator not in core.GROUP_ESTIMATORS:
            raise ValueError("dynamic_sampling drops groups whose scores are all equal: it "
                             f"needs a group estimator ({', '.join(core.GROUP_ESTIMATORS)})")

    def _check_vllm(self) -> None:
        from .sampler_correction import MODES

        self.check_vllm_mode()
        if self.vllm_importance_sampling_mode not in MODES:
            raise ValueError(f"vllm_importance_sampling_mode must be one of {', '.join(MODES)}, "
                             f"got {self.vllm_importance_sampling_mode!r}")
        low, high = self.vllm_importance_sampling_clip_min, self.vllm_importance_sampling_clip_max
        if low is not None and high is not None and low >= high:
            raise ValueError(f"vllm_importance_sampling_clip_min ({low}) must be less than "
                             f"vllm_importance_sampling_clip_max ({high})")

    def _check_estimator(self) -> None:
        name = self.advantage_estimator
        if name not in core.ESTIMATORS:
            raise ValueError(f"advantage_estimator must be one of {', '.join(core.ESTIMATORS)}, "
                             f"got {name!r}")
        if self.loss_aggregation not in core.AGGREGATIONS:
            raise ValueError(f"loss_aggregation must be one of {', '.join(core.AGGREGATIONS)}, "
                             f"got {self.loss_aggregation!r}")
        if self.num_generations < 1 or self.rollout_batch_size % self.num_generations:
            raise ValueError(f"rollout_batch_size ({self.rollout_batch_size}) counts samples: "
                             f"it must be a multiple of num_generations ({self.num_generations})")
        if name in core.GROUP_ESTIMATORS and self.num_generations < 2:
            raise ValueError(f"{name} compares samples of the same prompt: set "
                             "num_generations >= 2 (e.g. 4 or 8)")
        if name != "gae" and self.value_head_on_policy:
            raise ValueError(f"value_head_on_policy is a gae option; {name} learns no value: "
                             "drop value_head_on_policy")
        if name != "gae" and self.whiten_rewards:
            raise ValueError(f"whiten_rewards is a gae option; {name} normalises its own "
                             "advantages: drop whiten_rewards")
        if self.prefix_sharing:
            g = self.num_generations
            if g < 2:
                raise ValueError("prefix_sharing shares a prompt among its num_generations "
                                 "samples: set num_generations >= 2")
            for name in ("per_device_train_batch_size", "local_rollout_forward_batch_size"):
                if getattr(self, name) % g:
                    raise ValueError(f"prefix_sharing runs whole groups: {name} "
                                     f"({getattr(self, name)}) must be a multiple of "
                                     f"num_generations ({g})")
        if self.kl_loss_coef < 0 or self.kl_coef < 0:
            raise ValueError("kl_coef and kl_loss_coef must be >= 0")

    @property
    def uses_critic(self) -> bool:
        return self.advantage_estimator == "gae"

    @property
    def shared_prompt_group(self) -> int:
        """Rows per packed forward row: num_generations with prefix_sharing, else 1."""
        return self.num_generations if self.prefix_sharing else 1

    @property
    def needs_reference(self) -> bool:
        """A KL to the reference is asked for (in the reward, as a loss, or a KL target)."""
        return self.kl_coef > 0 or self.kl_loss_coef > 0 or self.kl_target is not None

    @property
    def needs_rollout_logps(self) -> bool:
        """False when each rollout is exactly one optimizer step (one epoch, one minibatch
        of it all) and no KL sits in the reward: the update's own log-probs are then the
        old ones (ratio 1), and the rollout's policy forward is skipped (the sampling
        correction then reads the update's own log-probs as the old ones)."""
        one_step = self.num_ppo_epochs == 1 and self.rollout_batch_size == \
            self.per_device_train_batch_size * self.gradient_accumulation_steps
        return not (one_step and self.kl_coef == 0 and self.kl_target is None)

    @property
    def score_bounds(self) -> tuple[float, float] | None:
        """Where scores are clipped: (-score_clip, score_clip), or None."""
        return None if self.score_clip is None else (-self.score_clip, self.score_clip)

    @property
    def steps_per_rollout(self) -> int:
        """Micro-batches per pass over a rollout (TRL's steps_per_generation)."""
        return math.ceil(self.rollout_batch_size / self.per_device_train_batch_size)
