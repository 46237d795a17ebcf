"""PPO for language models, step by step (Ziegler et al. 2019; Ouyang et al. 2022).

Every function is pure. Shapes: B sequences, T response positions; ``mask`` [B, T] is 1
on real response tokens (up to and including eos) and 0 on padding after them. Per-token
tensors are aligned so that position t holds quantities of the t-th response token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

# ---------------------------------------------------------------------------------------
# masked statistics
# ---------------------------------------------------------------------------------------


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of x where mask is 1. [B, T], [B, T] -> scalar (or [B] with dim=1)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of x where mask is 1 (Bessel-corrected by default). -> scalar."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = mask.sum()
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """(x - mean) / std over the masked entries; padding is set to 0. [B, T] -> [B, T].
    With shift_mean=False the mean is added back (scale only, as for rewards)."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


# ---------------------------------------------------------------------------------------
# KL, reward shaping, advantages
# ---------------------------------------------------------------------------------------


def per_token_kl(logps: Tensor, ref_logps: Tensor, estimator: str = "k1") -> Tensor:
    """KL(pi || ref) estimate per sampled token, with d = log pi(y_t) - log ref(y_t):
    k1 = d;  k2 = d^2 / 2;  k3 = exp(-d) - 1 + d  (Schulman 2020). [B, T] -> [B, T]."""
    d = logps - ref_logps
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d**2
    if estimator == "k3":
        return torch.expm1(-d) + d
    raise ValueError(f"unknown kl_estimator {estimator!r}; choose k1, k2 or k3")


def last_real_index(mask: Tensor) -> Tensor:
    """Index of the last 1 in each row of mask (the eos, or the last token if none). -> [B]."""
    positions = torch.arange(mask.shape[1], device=mask.device)
    return (mask.long() * positions).argmax(1)


def shape_rewards(scores: Tensor, kl: Tensor, mask: Tensor, beta: float) -> Tensor:
    """r_t = -beta * KL_t on real tokens, plus the sequence score on the last real token
    (the eos, or the final token of a truncated response), never on the padding after it.
    scores [B], kl [B, T], mask [B, T] -> [B, T]."""
    rewards = -beta * kl * mask
    rows = torch.arange(scores.shape[0], device=scores.device)
    rewards[rows, last_real_index(mask)] += scores
    return rewards


def penalize_missing_eos(scores: Tensor, finished: Tensor, penalty: float | None) -> Tensor:
    """scores - penalty for responses that ended without eos (truncated). [B] -> [B]."""
    if penalty is None:
        return scores
    return torch.where(finished.bool(), scores, scores - penalty)


def clip_scores(scores: Tensor, clip: float | None) -> Tensor:
    """Scores clipped to [-clip, clip] (OpenRLHF uses 10), or unchanged when clip is None."""
    return scores if clip is None else scores.clamp(-clip, clip)


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float
        ) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) that respects the mask.

    delta_t = r_t + gamma * V_{t+1} * m_{t+1} - V_t;  A_t = delta_t + gamma * lam * A_{t+1};
    nothing is bootstrapped past the last real token (m_{t+1} = 0 there), and A = 0 on
    padding. Returns (advantages, returns = advantages + values), both [B, T]."""
    mask = mask.to(rewards.dtype)
    values = values * mask
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_adv = torch.zeros_like(rewards[:, 0])
    for t in range(rewards.shape[1] - 1, -1, -1):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = (delta + gamma * lam * next_adv) * mask[:, t]
        advantages[:, t] = next_adv
        next_value = values[:, t]
    return advantages, (advantages + values) * mask


# ---------------------------------------------------------------------------------------
# critic-free estimators: a baseline from the other samples of the same prompt (or none),
# the score shaped into per-token rewards as for GAE, then the reward-to-go
# ---------------------------------------------------------------------------------------

ESTIMATORS = ("gae", "grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline")
GROUP_ESTIMATORS = ("grpo", "rloo", "reinforce_pp_baseline")


def group_baseline_scores(scores: Tensor, group_size: int, estimator: str,
                          scale_rewards: bool = True) -> Tensor:
    """Scores relative to the other samples of their prompt. ``scores`` holds groups of
    ``group_size`` consecutive samples of one prompt each; with m, s the group's mean and
    (Bessel-corrected) std:

    - grpo (Shao et al. 2024): (x - m) / (s + 1e-4); without ``scale_rewards``, x - m
      (Dr. GRPO, Liu et al. 2025);
    - rloo (Ahmadian et al. 2024): x minus the mean of the group's other samples,
      = (x - m) G / (G - 1);
    - reinforce_pp_baseline (REINFORCE++ with a group baseline, Hu 2025): x - m;
    - reinforce_pp: x unchanged (no baseline; its advantages are whitened over the batch).

    Shapes: scores [B] (B = groups x G) -> [B].
    """
    if estimator == "reinforce_pp":
        return scores
    if group_size < 2 or scores.shape[0] % group_size:
        raise ValueError(f"{estimator} needs groups of >= 2 samples per prompt; got "
                         f"{scores.shape[0]} scores in groups of {group_size}")
    groups = scores.view(-1, group_size)
    centred = groups - groups.mean(1, keepdim=True)
    if estimator == "grpo":
        out = centred / (groups.std(1, keepdim=True) + 1e-4) if scale_rewards else centred
    elif estimator == "rloo":
        out = centred * group_size / (group_size - 1)
    elif estimator == "reinforce_pp_baseline":
        out = centred
    else:
        raise ValueError(f"unknown advantage_estimator {estimator!r}; choose one of "
                         f"{', '.join(ESTIMATORS)}")
    return out.reshape(-1)


def returns_to_go(rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """G_t = sum over k >= t of gamma^(k - t) r_k within each row's real tokens, 0 on
    padding. [B, T], [B, T] -> [B, T]."""
    mask = mask.to(rewards.dtype)
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in range(rewards.shape[1] - 1, -1, -1):
        running = (rewards[:, t] + gamma * running) * mask[:, t]
        out[:, t] = running
    return out


def critic_free_advantages(scores: Tensor, kl: Tensor, mask: Tensor, kl_coef: float,
                           estimator: str, group_size: int, gamma: float = 1.0,
                           scale_rewards: bool = True) -> Tensor:
    """Advantages without a value model: the baselined score (``group_baseline_scores``)
    on the last real token, -kl_coef * KL_t on every real token (``shape_rewards``), summed
    to go (``returns_to_go``); REINFORCE++ then whitens them over the batch's tokens.
    With kl_coef = 0 every token of a response gets its baselined score.

    Shapes: scores [B], kl [B, T], mask [B, T] -> [B, T].
    """
    baselined = group_baseline_scores(scores, group_size, estimator, scale_rewards)
    advantages = returns_to_go(shape_rewards(baselined, kl, mask, kl_coef), mask, gamma)
    if estimator in ("reinforce_pp", "reinforce_pp_baseline"):
        advantages = masked_whiten(advantages, mask)
    return advantages


# ---------------------------------------------------------------------------------------
# losses
# ---------------------------------------------------------------------------------------


AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum")


def aggregate(loss: Tensor, mask: Tensor, mode: str = "token_mean",
              horizon: int | None = None) -> Tensor:
    """A per-token loss as one number:

    - token_mean: mean over every real token of the batch (long responses weigh more);
    - seq_mean_token_mean: mean over sequences of each sequence's token mean (GRPO's paper);
    - seq_mean_token_sum: mean over sequences of each sequence's token sum divided by the
      constant ``horizon`` (the response length): Dr. GRPO (Liu et al. 2025), no length bias.

    Shapes: loss [B, T], mask [B, T] -> scalar.
    """
    if mode == "token_mean":
        return masked_mean(loss, mask)
    if mode == "seq_mean_token_mean":
        return masked_mean(loss, mask, dim=1).mean()
    if mode == "seq_mean_token_sum":
        if not horizon:
            raise ValueError("seq_mean_token_sum needs the horizon (response_length)")
        return (loss * mask.to(loss.dtype)).sum(1).mean() / horizon
    raise ValueError(f"unknown loss aggregation {mode!r}; choose {', '.join(AGGREGATIONS)}")


def policy_loss(logps: Tensor, old_logps: Tensor, advantages: Tensor, mask: Tensor,
                clip: float, aggregation: str = "token_mean", horizon: int | None = None
                ) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps)) per token,
    ratio = exp(logps - old_logps), aggregated (``aggregate``).
    Shapes: [B, T] each -> (loss, stats: clipfrac, approxkl, ratio as token means)."""
    log_ratio = logps - old_logps
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip, 1 + clip)
    loss = aggregate(torch.maximum(unclipped, clipped), mask, aggregation, horizon)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((clipped > unclipped).float(), mask),
                 "approxkl": 0.5 * masked_mean(log_ratio**2, mask),
                 "ratio": masked_mean(ratio, mask)}
    return loss, stats


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor,
               clip: float | None) -> tuple[Tensor, dict[str, Tensor]]:
    """0.5 * mean max((V - R)^2, (V_clip - R)^2) with V_clip = V_old + clip(V - V_old, +-c).
    Returns (loss, stats: clipfrac)."""
    err = (values - returns) ** 2
    if clip is None:
        return 0.5 * masked_mean(err, mask), {"clipfrac": torch.zeros((), device=values.device)}
    clipped_values = old_values + (values - old_values).clamp(-clip, clip)
    err_clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask)
    return loss, {"clipfrac": masked_mean((err_clipped > err).float(), mask).detach()}


# ---------------------------------------------------------------------------------------
# KL controllers and running score statistics (state saved with checkpoints)
# ---------------------------------------------------------------------------------------


@dataclass
class FixedKLController:
    """A constant beta."""

    value: float

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


@dataclass
class AdaptiveKLController:
    """Ziegler et al. 2019, sec. 2.2: e = clip(KL / target - 1, -0.2, 0.2);
    beta <- beta * (1 + e * n_steps / horizon)."""

    value: float
    target: float
    horizon: int

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value, self.target, self.horizon = state["value"], state["target"], state["horizon"]


@dataclass
class RunningMoments:
    """Running mean and std of scores across rollouts (parallel-variance merge of batches)."""

    mean: float = 0.0
    var: float = 1.0
    count: float = 1e-8

    def update(self, x: Tensor) -> None:
        n = x.numel()
        batch_mean, batch_var = x.float().mean().item(), x.float().var(unbiased=False).item()
        total = self.count + n
        delta = batch_mean - self.mean
        self.var = (self.var * self.count + batch_var * n + delta**2 * self.count * n / total) / total
        self.mean += delta * n / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(max(self.var, 1e-12))

    def normalize(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.var, self.count = state["mean"], state["var"], state["count"]
