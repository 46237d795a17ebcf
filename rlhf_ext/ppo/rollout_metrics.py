"""The metrics a rollout logs (TRL's names): completion lengths and reward statistics over
every process's rows, brought to the host in one copy."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from . import core


def metrics_to_host(local: dict[str, Tensor], everyone: dict[str, Tensor],
                    gather: Callable[[Tensor], Tensor] | None, device) -> dict[str, float]:
    """0-dim tensors as floats, in one copy from the device: ``local`` ones (this
    process's rollout) averaged over the processes first, in one gather; ``everyone``
    ones (computed over every process's rows already) as they are."""
    def stack(values: dict[str, Tensor]) -> Tensor:
        return torch.stack([v.to(device, torch.float32).reshape(()) for v in values.values()])

    mine = stack(local)
    if gather is not None:
        mine = gather(mine[None]).reshape(-1, mine.numel()).mean(0)
    return dict(zip([*local, *everyone], torch.cat([mine, stack(everyone)]).tolist()))


def length_metrics(lengths: Tensor, finished: Tensor) -> dict[str, Tensor]:
    """TRL's completion-length metrics over every process's responses (tokens, eos
    included): all, and those that ended with eos ("terminated"); the clipped ratio is
    the share cut at response_length."""
    lengths = lengths.float()
    ended = lengths[finished.bool()]
    ended = ended if ended.numel() else torch.zeros(1, device=lengths.device)
    return {"completions/mean_length": lengths.mean(),
            "completions/min_length": lengths.min(),
            "completions/max_length": lengths.max(),
            "completions/clipped_ratio": 1 - finished.float().mean(),
            "completions/mean_terminated_length": ended.mean(),
            "completions/min_terminated_length": ended.min(),
            "completions/max_terminated_length": ended.max()}


def score_metrics(per_func: Tensor, total: Tensor, every: Callable[[Tensor], Tensor],
                  group: int, names: tuple[str, ...], device) -> dict[str, Tensor]:
    """TRL's reward metrics over every process's rows: each function's mean and std (of
    the rows it scored), the weighted total's mean and std, and the share of groups whose
    scores are all equal (no signal). per_func [B, F], total [B]: this process's rows."""
    per_func = every(per_func.to(device))
    totals = every(total.to(device))
    out = {}
    for i, name in enumerate(names):
        out[f"rewards/{name}/mean"] = torch.nanmean(per_func[:, i])
        out[f"rewards/{name}/std"] = core.nanstd(per_func[:, i])
    out["reward"] = torch.nanmean(totals)
    out["reward_std"] = core.nanstd(totals)
    if group > 1 and totals.numel() % group == 0:
        out["frac_reward_zero_std"] = (~core.informative_groups(totals, group)).float().mean()
    return out
