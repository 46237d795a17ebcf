"""Metrics held on the device between two logs, reduced over processes and steps at the log.

A trainer records a few scalars per micro-step (a sum and a count, a minimum...) as device
tensors, with no sync; at a log they are concatenated, all-gathered once and copied to the
host once. (A gather and an ``.item()`` per metric per micro-step would stall a GPU about
35 times a step.) What is logged is unchanged: per micro-step, the value over every
process; then the mean of those values over the micro-steps since the last log.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable

import torch
from torch import Tensor

# kind -> how one micro-step's columns (one list of per-process values each) become a value
_REDUCE = {
    "ratio": lambda c: sum(c[0]) / sum(c[1]) if sum(c[1]) > 0 else None,
    "difference": lambda c: (sum(c[0]) / sum(c[1]) - sum(c[2]) / sum(c[3])
                             if sum(c[1]) > 0 and sum(c[3]) > 0 else None),
    "min": lambda c: min(c[0]),
    "max": lambda c: max(c[0]),
    "sum": lambda c: sum(c[0]),
}


def _mean_skipping_nan(values: list[float]) -> float | None:
    """The mean of the non-NaN values; None (a JSON null, as TRL logs it) if there is none."""
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else None


class MetricBuffer:
    """Per mode ("train" / "eval"): device entries (key, kind, values [k]) and host values
    already reduced (rollout statistics). Every process records the same entries in the
    same order, so the gather lines them up."""

    def __init__(self):
        self._device = {"train": [], "eval": []}
        self._host = {"train": defaultdict(list), "eval": defaultdict(list)}

    def _add(self, mode: str, key: str, kind: str, *values) -> None:
        device = next(v.device for v in values if isinstance(v, Tensor))
        self._device[mode].append((key, kind, torch.stack([
            torch.as_tensor(v, device=device).detach().float().reshape(()) for v in values])))

    def ratio(self, mode: str, key: str, total: Tensor, count: Tensor | int) -> None:
        """sum(total) / sum(count), every process together (skipped where the count is 0)."""
        self._add(mode, key, "ratio", total.sum(), count if isinstance(count, int) else count.sum())

    def mean(self, mode: str, key: str, values: Tensor) -> None:
        """The mean of ``values`` (any shape) over every process."""
        self.ratio(mode, key, values.detach().float().reshape(-1), values.numel())

    def difference(self, mode: str, key: str, a: Tensor, b: Tensor) -> None:
        """mean(a) - mean(b) over every process (skipped where either is empty)."""
        self._add(mode, key, "difference", a.float().sum(), a.numel(), b.float().sum(),
                  b.numel())

    def extreme(self, mode: str, key: str, kind: str, values: Tensor) -> None:
        """``kind`` "min" or "max" of ``values`` over every process."""
        self._add(mode, key, kind, values.amin() if kind == "min" else values.amax())

    def total(self, mode: str, key: str, values: Tensor) -> None:
        """The sum over processes and micro-steps (a count, not averaged)."""
        self._add(mode, key, "sum", values.sum())

    def host(self, mode: str, key: str, value: float) -> None:
        """A number already reduced over processes: averaged over the entries (NaN ones,
        e.g. the std of a reward function that scored one row, left out)."""
        self._host[mode][key].append(value)

    def reduce(self, mode: str, gather: Callable[[Tensor], Tensor]) -> dict[str, float]:
        """What was recorded for ``mode`` since the last call, reduced, then cleared:
        one ``gather`` ([1, n] -> [processes, n]) and one copy to the host."""
        entries, self._device[mode] = self._device[mode], []
        steps = self._host[mode]
        self._host[mode] = defaultdict(list)
        totals = {}
        if entries:
            flat = torch.cat([values for _, _, values in entries])
            columns = list(zip(*gather(flat[None]).reshape(-1, flat.numel()).tolist()))
            start = 0
            for key, kind, values in entries:
                value = _REDUCE[kind](columns[start:start + values.numel()])
                start += values.numel()
                if kind == "sum":
                    totals[key] = totals.get(key, 0.0) + value
                elif value is not None:
                    steps[key].append(value)
        return {**{k: _mean_skipping_nan(v) for k, v in steps.items() if v}, **totals}

    def log_into(self, logs: dict, gather: Callable[[Tensor], Tensor],
                 eval_gather: Callable[[Tensor], Tensor] | None = None) -> str:
        """Add to ``logs`` the metrics of the mode the log belongs to (keys prefixed
        ``eval_`` under evaluation; one of a dict of eval sets logs ``eval_<name>_loss``
        and keeps its name), reduced with ``gather`` (``eval_gather`` for evaluation's,
        if given); returns that mode."""
        mode = "eval" if any(k.startswith("eval_") for k in logs) and "loss" not in logs \
            else "train"
        prefix = "eval_" if mode == "eval" else ""
        for key in logs:
            if mode == "eval" and key.startswith("eval_") and key.endswith("_loss"):
                prefix = key[:-len("loss")]
        if mode == "eval" and eval_gather is not None:
            gather = eval_gather
        for key, value in self.reduce(mode, gather).items():
            logs[prefix + key] = value
        return mode
