"""PPO for language models, step by step (Ziegler et al. 2019; Ouyang et al. 2022).

Every function is pure. Shapes: B sequences, T response positions; ``mask`` [B, T] is 1
on real response tokens (up to and including eos) and 0 on padding after them. Per-token
tensors are aligned so that position t holds quantities of the t-th response token.
"""

from __future__ import annotations

import math
from collections.abc import Callable

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


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True,
                  total: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """(x - mean) / std (Bessel) over the masked entries; padding is set to 0.
    [B, T] -> [B, T]. With shift_mean=False the mean is added back (scale only, as for
    rewards). ``total`` sums a [k] tensor over every process (None: this one alone): the
    mean and std are then those of every process's entries together, what one process
    holding all the rows computes (the rows' widths may differ between processes)."""
    total = total or (lambda t: t)
    m = mask.to(x.dtype)
    count, summed = total(torch.stack([m.sum(), (x * m).sum()])).unbind()
    mean = summed / count.clamp(min=1)
    var = total(((x - mean) ** 2 * m).sum().reshape(1))[0] / count.clamp(min=1)
    if count > 1:
        var = var * count / (count - 1)
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


def clip_scores(scores: Tensor, bounds: tuple[float, float] | None) -> Tensor:
    """Scores clipped to [low, high] (OpenRLHF uses +-10), or unchanged when bounds is None.
    [B] -> [B]."""
    return scores if bounds is None else scores.clamp(bounds[0], bounds[1])


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
REWARD_SCALINGS = ("group", "batch", "none")


def nanstd(x: Tensor, dim: int | None = None, keepdim: bool = False) -> Tensor:
    """Bessel-corrected std over the non-NaN entries (along ``dim``, or of all); NaN where
    fewer than two entries are live (as ``torch.std`` of one sample, and TRL's ``nanstd``).
    Callers that divide by it read NaN as 0."""
    if dim is None:
        x, dim = x.flatten(), 0
    live = ~torch.isnan(x)
    n = live.sum(dim, keepdim=True)
    mean = torch.nanmean(x, dim, keepdim=True)
    squares = torch.where(live, (x - mean) ** 2, 0.0).sum(dim, keepdim=True)
    std = torch.where(n > 1, squares / (n - 1).clamp(min=1), math.nan).sqrt()
    return std if keepdim else std.squeeze(dim)


def _spread(std: Tensor) -> Tensor:
    """A std to divide by: one live sample (NaN std) has no spread, 0."""
    return torch.nan_to_num(std, nan=0.0)


def group_baseline_scores(scores: Tensor, group_size: int, estimator: str,
                          scale_rewards: str = "group", all_scores: Tensor | None = None
                          ) -> Tensor:
    """Scores relative to the other samples of their prompt. ``scores`` holds groups of
    ``group_size`` consecutive samples of one prompt each; NaN marks a sample no reward
    function scored: it is left out of its group's statistics and gets 0. With m, s the
    group's mean and (Bessel-corrected) std over its scored samples:

    - grpo (Shao et al. 2024): (x - m) / (s + 1e-4); ``scale_rewards`` "batch" divides by
      the std of ``all_scores`` (every process's, default ``scores``) instead, "none" by
      nothing (Dr. GRPO, Liu et al. 2025);
    - rloo (Ahmadian et al. 2024): x minus the mean of the group's other scored samples;
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
    centred = groups - torch.nanmean(groups, 1, keepdim=True)
    if estimator == "grpo":
        if scale_rewards not in REWARD_SCALINGS:
            raise ValueError(f"scale_rewards must be one of {REWARD_SCALINGS}, "
                             f"got {scale_rewards!r}")
        if scale_rewards == "group":
            centred = centred / (_spread(nanstd(groups, 1, keepdim=True)) + 1e-4)
        elif scale_rewards == "batch":
            centred = centred / (_spread(nanstd(scores if all_scores is None else all_scores))
                                 + 1e-4)
        out = centred
    elif estimator == "rloo":
        n = (~torch.isnan(groups)).sum(1, keepdim=True)
        out = groups - (torch.nansum(groups, 1, keepdim=True) - groups) / (n - 1)
    elif estimator == "reinforce_pp_baseline":
        out = centred
    else:
        raise ValueError(f"unknown advantage_estimator {estimator!r}; choose one of "
                         f"{', '.join(ESTIMATORS)}")
    return torch.nan_to_num(out.reshape(-1), nan=0.0)


def whiten_scores(x: Tensor, all_x: Tensor | None = None) -> Tensor:
    """(x - mean) / (std + 1e-4) with mean and Bessel std over ``all_x`` (every process's,
    default x), NaN left out: RLOO's ``normalize_advantages``. [B] -> [B]."""
    ref = x if all_x is None else all_x
    return (x - torch.nanmean(ref)) / (_spread(nanstd(ref)) + 1e-4)


def loss_mask(response_mask: Tensor, live: Tensor, finished: Tensor,
              mask_truncated: bool) -> Tensor:
    """Which response tokens take loss: the real ones, of rows still ``live`` (dynamic
    sampling), and with ``mask_truncated`` only of responses that ended with eos (DAPO's
    overlong filtering: a cut response is not penalised for being cut).
    [B, T], [B], [B] -> [B, T]."""
    keep = live.bool() & (finished.bool() if mask_truncated else torch.ones_like(live).bool())
    return response_mask * keep[:, None].to(response_mask.dtype)


def informative_groups(scores: Tensor, group_size: int) -> Tensor:
    """DAPO's dynamic sampling test (Yu et al. 2025): True for groups whose scores are not
    all equal (a group of equal scores has zero advantage everywhere and only dilutes the
    batch). [B] -> [B / group_size] bool."""
    groups = scores.view(-1, group_size)
    return ~torch.isclose(groups, groups[:, :1]).all(1)


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
                           scale_rewards: str = "group", kl_in_reward: str = "token",
                           all_scores: Tensor | None = None,
                           total: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Advantages without a value model.

    ``kl_in_reward`` "token": the baselined score (``group_baseline_scores``) on the last
    real token, -kl_coef * KL_t on every real token (``shape_rewards``), summed to go
    (``returns_to_go``); REINFORCE++ then whitens them over the batch's tokens (every
    process's, with ``total``: see ``masked_whiten``). With
    kl_coef = 0 every token of a response gets its baselined score.
    ``kl_in_reward`` "score" (TRL's RLOO): kl_coef times the response's summed KL is taken
    off its score before the baseline, and every token gets the result.

    Shapes: scores [B] (NaN: unscored), kl [B, T], mask [B, T] -> [B, T].
    """
    if kl_in_reward == "score":
        scores = scores - kl_coef * (kl * mask).sum(1)
        baselined = group_baseline_scores(scores, group_size, estimator, scale_rewards,
                                          all_scores)
        return baselined[:, None] * mask
    baselined = group_baseline_scores(scores, group_size, estimator, scale_rewards,
                                      all_scores)
    advantages = returns_to_go(shape_rewards(baselined, kl, mask, kl_coef), mask, gamma)
    if estimator in ("reinforce_pp", "reinforce_pp_baseline"):
        advantages = masked_whiten(advantages, mask, total=total)
    return advantages


# ---------------------------------------------------------------------------------------
# losses
# ---------------------------------------------------------------------------------------


AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "step_token_mean")
POLICY_LOSSES = ("clip", "cispo", "sapo")
IS_LEVELS = ("token", "sequence", "sequence_sum")


def aggregate(loss: Tensor, mask: Tensor, mode: str = "token_mean",
              horizon: int | None = None, tokens: Tensor | float | None = None) -> Tensor:
    """A per-token loss as one number:

    - token_mean: mean over every real token of the micro-batch (long responses weigh
      more; TRL's ``bnpo``);
    - seq_mean_token_mean: mean over sequences of each sequence's token mean (GRPO's paper);
    - seq_mean_token_sum: mean over sequences of each sequence's token sum divided by the
      constant ``horizon`` (the response length): Dr. GRPO (Liu et al. 2025), no length bias;
    - step_token_mean: the token sum divided by ``tokens``, the mean real-token count of a
      micro-batch over the whole rollout of every process: after the Trainer's division
      by the accumulation steps, the token mean of the optimizer step (DAPO, Yu et al. 2025).

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
    if mode == "step_token_mean":
        if tokens is None:
            raise ValueError("step_token_mean needs the rollout's tokens per micro-batch")
        return (loss * mask.to(loss.dtype)).sum() / torch.as_tensor(tokens).clamp(min=1.0)
    raise ValueError(f"unknown loss aggregation {mode!r}; choose {', '.join(AGGREGATIONS)}")


def importance_log_weights(logps: Tensor, old_logps: Tensor, mask: Tensor,
                           level: str = "token") -> Tensor:
    """log(pi / pi_old) per token ("token", [B, T]); its mean over each sequence's real
    tokens ("sequence": GSPO, Zheng et al. 2025, [B, 1]); or its sum, the log-ratio of the
    whole sequence's probabilities ("sequence_sum": TRL's RLOO, [B, 1])."""
    log_ratio = logps - old_logps
    if level == "token":
        return log_ratio
    mask = mask.to(log_ratio.dtype)
    total = (log_ratio * mask).sum(1, keepdim=True)
    if level == "sequence":
        return total / mask.sum(1, keepdim=True).clamp(min=1)
    if level == "sequence_sum":
        return total
    raise ValueError(f"importance_sampling_level must be one of {IS_LEVELS}, got {level!r}")


def surrogate(ratio: Tensor, logps: Tensor, advantages: Tensor, kind: str = "clip",
              clip_low: float = 0.2, clip_high: float | None = None,
              dual_clip: float | None = None,
              sapo_temperatures: tuple[float, float] = (1.0, 1.05)) -> Tensor:
    """The per-token policy loss from the importance ratio r (per token or per sequence):

    - clip (PPO): max(-A min(r, dual_clip), -A clip(r, 1 - clip_low, 1 + clip_high));
      ``clip_high`` > ``clip_low`` is DAPO's clip-higher, ``dual_clip`` caps the unclipped
      ratio (INTELLECT-2's two-sided clip);
    - cispo (MiniMax-M1): -sg(min(r, clip_high)) A log pi: the weight is clipped, not the
      update, so every token keeps a gradient;
    - sapo (Gao et al. 2025): -A (4 / tau) sigmoid(tau (r - 1)), a soft gate with
      tau = sapo_temperatures[0] where A > 0, else [1].

    Shapes: ratio [B, T] or [B, 1], logps and advantages [B, T] -> [B, T].
    """
    clip_high = clip_low if clip_high is None else clip_high
    if kind == "clip":
        clipped = ratio.clamp(1 - clip_low, 1 + clip_high) * advantages
        if dual_clip is not None:
            ratio = ratio.clamp(max=dual_clip)
        return -torch.minimum(ratio * advantages, clipped)
    if kind == "cispo":
        return -ratio.clamp(max=clip_high).detach() * advantages * logps
    if kind == "sapo":
        pos, neg = sapo_temperatures
        tau = torch.where(advantages > 0, pos, neg)
        return -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * advantages
    raise ValueError(f"policy loss must be one of {POLICY_LOSSES}, got {kind!r}")


def policy_loss(logps: Tensor, old_logps: Tensor, advantages: Tensor, mask: Tensor,
                clip: float, aggregation: str = "token_mean", horizon: int | None = None, *,
                clip_high: float | None = None, dual_clip: float | None = None,
                kind: str = "clip", level: str = "token",
                sapo_temperatures: tuple[float, float] = (1.0, 1.05),
                token_weights: Tensor | None = None, tokens: Tensor | float | None = None
                ) -> tuple[Tensor, dict[str, Tensor]]:
    """``surrogate`` of the importance ratio exp(``importance_log_weights``) per token,
    times ``token_weights`` (e.g. the high-entropy mask), aggregated (``aggregate``).
    Shapes: [B, T] each -> (loss, stats: clip fractions low/high/region (shares of
    tokens, or of sequences for a sequence-level ratio), approxkl and ratio as token
    means)."""
    log_weights = importance_log_weights(logps, old_logps, mask, level)
    ratio = torch.exp(log_weights)
    per_token = surrogate(ratio, logps, advantages, kind, clip, clip_high, dual_clip,
                          sapo_temperatures)
    if token_weights is not None:
        per_token = per_token * token_weights
    loss = aggregate(per_token, mask, aggregation, horizon, tokens)
    with torch.no_grad():
        high = clip if clip_high is None else clip_high
        # per token, or with one ratio per sequence per sequence (its first token's advantage)
        adv = advantages if ratio.shape[1] == mask.shape[1] else advantages[:, :1]
        low_clipped = ((ratio < 1 - clip) & (adv < 0)).float()
        high_clipped = ((ratio > 1 + high) & (adv > 0)).float()
        share = (lambda x: masked_mean(x, mask)) if adv is advantages else torch.mean
        log_ratio = logps - old_logps
        stats = {"clipfrac": share(low_clipped + high_clipped),
                 "clipfrac_low": share(low_clipped), "clipfrac_high": share(high_clipped),
                 "approxkl": 0.5 * masked_mean(log_ratio**2, mask),
                 "ratio": masked_mean(ratio.expand_as(mask), mask)}
    return loss, stats


def high_entropy_mask(entropy: Tensor, mask: Tensor, quantile: float,
                      all_entropies: Tensor | None = None) -> Tensor:
    """1 on real tokens whose entropy is at least the (1 - quantile) quantile of the real
    tokens' entropies (``all_entropies``: every process's, default these), else 0: the
    top-``quantile`` "forking" tokens that carry the learning signal (Wang et al. 2025,
    "Beyond the 80/20 rule"). [B, T] -> [B, T] float."""
    pool = entropy[mask.bool()] if all_entropies is None else all_entropies
    if pool.numel() == 0:
        return torch.zeros_like(mask, dtype=torch.float32)
    threshold = torch.quantile(pool.float(), 1 - quantile)
    return ((entropy >= threshold) & mask.bool()).float()


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor,
               clip: float | None, aggregation: str = "token_mean", horizon: int | None = None,
               tokens: Tensor | float | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """0.5 * max((V - R)^2, (V_clip - R)^2) with V_clip = V_old + clip(V - V_old, +-c),
    aggregated as the policy loss is (``aggregate``: by default the token mean).
    Shapes: [B, T] each. Returns (loss, stats: clipfrac)."""
    err = (values - returns) ** 2
    if clip is None:
        return 0.5 * aggregate(err, mask, aggregation, horizon, tokens), \
            {"clipfrac": torch.zeros((), device=values.device)}
    clipped_values = old_values + (values - old_values).clamp(-clip, clip)
    err_clipped = (clipped_values - returns) ** 2
    loss = 0.5 * aggregate(torch.maximum(err, err_clipped), mask, aggregation, horizon, tokens)
    return loss, {"clipfrac": masked_mean((err_clipped > err).float(), mask).detach()}
