"""What the trainers share around the Trainer: metrics averaged between two logs."""

from __future__ import annotations


def add_averaged_metrics(metrics: dict[str, dict[str, list]], logs: dict) -> None:
    """Add to ``logs`` the mean of each metric collected since the last log, for the mode
    the log belongs to (keys prefixed ``eval_`` under evaluation), then clear them."""
    mode = "eval" if any(k.startswith("eval_") for k in logs) and "loss" not in logs else "train"
    prefix = "eval_" if mode == "eval" else ""
    for key, values in metrics[mode].items():
        if values:
            logs[prefix + key] = sum(values) / len(values)
    metrics[mode].clear()
