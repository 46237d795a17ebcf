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


class NonFiniteError(FloatingPointError):
    """A NaN or infinity where training cannot go on: raised before anything is saved."""


def check_finite_fields(args, names: tuple[str, ...]) -> None:
    """At config time: each named field (a number, a list of numbers or None) is finite.
    NaN passes every ``<=``/``>`` check, so range checks alone let it through."""
    import math

    for name in names:
        value = getattr(args, name, None)
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, (int, float)) and not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v}: set --{name} "
                                 "to a real value")


def check_finite_loss(trainer, loss, hint: str) -> None:
    """Each step: stop on a non-finite loss, naming the step and likely causes (``hint``),
    before the optimizer applies it and before anything is saved. One device sync."""
    import torch

    finite = torch.isfinite(loss.detach()).all().reshape(1)
    if trainer.args.world_size > 1:  # every process stops, none waits for a dead peer
        finite = trainer.accelerator.gather(finite).all()
    if not bool(finite):
        raise NonFiniteError(
            f"step {trainer.state.global_step + 1}: the loss is {loss.detach().float().item()}. "
            f"Likely causes: {hint}, or a learning rate too high for this model. Nothing "
            "from this step was applied or saved; the last checkpoint is intact.")


def check_finite_weights(model, output_dir: str) -> None:
    """Before a save: refuse to write a model with a non-finite trained parameter. Only
    trained ones: they are what diverges, and a frozen 4-bit weight is packed bytes whose
    storage dtype (bf16 with bnb_4bit_quant_storage) can read as NaN."""
    import torch

    for name, param in model.named_parameters():
        if param.requires_grad and param.numel() and \
                not bool(torch.isfinite(param.detach()).all()):
            raise NonFiniteError(f"not saving to {output_dir}: parameter {name} holds NaN or "
                                 "infinite values (training diverged)")


def keep_token_out_of_args(args) -> None:
    """Move a ``hub_token`` given as an argument into the process environment (HF_TOKEN,
    where huggingface_hub reads it): arguments are pickled into training_args.bin, which
    checkpoints and pushes carry, and a token must never be written anywhere."""
    import os

    if getattr(args, "hub_token", None):
        os.environ["HF_TOKEN"] = args.hub_token
        args.hub_token = None
