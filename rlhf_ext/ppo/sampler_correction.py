"""The importance-sampling correction for a sampler whose kernels differ from the trainer's
(vLLM): the rollout's responses were drawn by the sampler, with log-probs
``sampler_logps``, while the update's old log-probs come from the trainer's own forward.
Each token's (or sequence's) policy loss is weighted by exp(old - sampler), truncated or
masked outside [clip_min, clip_max] (TRL's ``vllm_importance_sampling_*`` fields)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def sampler_weights(old_logps: Tensor, sampler_logps: Tensor, mask: Tensor, mode: str,
                    clip_min: float | None, clip_max: float | None) -> Tensor:
    """The weight of each token's policy loss. Shapes: [B, C] each -> [B, C].

    token_*: exp(old_t - sampler_t) per token; sequence_*: exp of the sum over the
    sequence's real tokens, the same for all of them. *_truncate clamps it to
    [clip_min, clip_max]; *_mask sets it to 0 outside (a bound of None is no bound).
    A NaN sampler log-prob (a token the sampler did not score) counts as no difference.
    Padding gets weight 0."""
    if mode not in MODES:
        raise ValueError(f"importance sampling mode must be one of {', '.join(MODES)}, "
                         f"got {mode!r}")
    diff = torch.nan_to_num((old_logps - sampler_logps) * mask, nan=0.0)
    if mode.startswith("sequence"):
        diff = diff.sum(-1, keepdim=True).expand_as(mask)
    weights = torch.exp(diff)
    if mode.endswith("truncate"):
        if clip_min is not None or clip_max is not None:
            weights = weights.clamp(min=clip_min, max=clip_max)
    else:
        low = -math.inf if clip_min is None else clip_min
        high = math.inf if clip_max is None else clip_max
        weights = weights.masked_fill((weights < low) | (weights > high), 0.0)
    return weights * mask


def sampler_gaps(old_logps: Tensor, sampler_logps: Tensor, weights: Tensor, mask: Tensor,
                 mode: str) -> tuple[Tensor, Tensor]:
    """What TRL's sampling metrics summarise: the absolute log-prob gap between trainer and
    sampler on each real token the sampler scored ([N]; their mean and max are
    ``sampling/sampling_logp_difference/{mean,max}``), and the weights, one per real token
    or, for sequence_* modes, one per sequence ([M]; their min, mean and max are
    ``sampling/importance_sampling_ratio/*``). [B, C] each."""
    live = mask.bool()
    gaps = (old_logps - sampler_logps).abs()[live]
    gaps = gaps[~torch.isnan(gaps)]
    if mode.startswith("sequence"):
        return gaps, weights.amax(-1)[live.any(-1)]  # one per sequence
    return gaps, weights[live]
