"""TRL's trainer and config names, as thin presets of our one preference trainer.

A TRL script keeps working with its import changed: ``DPOConfig``/``DPOTrainer`` are
``PreferenceConfig``/``PreferenceTrainer`` under TRL's name; ``KTOConfig``, ``CPOConfig``
and ``ORPOConfig`` preset the loss and read ``loss_type`` with the meaning it has in
TRL's trainer of that name. Defaults are TRL 1.16's (learning rate 1e-6, logging every 10
steps), except those docs/trl.md lists under "What differs from TRL" (bf16 off, beta the
loss's own, ...).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .preference import PreferenceConfig, PreferenceTrainer


@dataclass
class DPOConfig(PreferenceConfig):
    """TRL's DPOConfig: every field of ``PreferenceConfig`` (which uses TRL's names)."""


class DPOTrainer(PreferenceTrainer):
    """TRL's DPOTrainer: ``PreferenceTrainer`` with its loss from ``DPOConfig``."""


@dataclass
class KTOConfig(PreferenceConfig):
    """TRL's KTOConfig: loss_type ``kto`` (default) or ``apo_zero_unpaired``."""

    loss_type: list[str] = field(default_factory=lambda: ["kto"], metadata={
        "help": "kto or apo_zero_unpaired."})

    def _losses(self):
        names, weights = super()._losses()
        if names not in (["kto"], ["apo_zero_unpaired"]):
            raise ValueError(f"KTOConfig.loss_type is kto or apo_zero_unpaired, got {names}; "
                             "other losses: PreferenceConfig(loss_type=...)")
        return names, weights


class KTOTrainer(PreferenceTrainer):
    """TRL's KTOTrainer: ``PreferenceTrainer`` on unpaired (or unpaired-from-paired) data."""


@dataclass
class CPOConfig(PreferenceConfig):
    """TRL's CPOConfig. Its loss names mean what they mean in TRL's CPOTrainer: ``sigmoid``
    is CPO (our ``cpo``: -log sigma(beta (pi_w - pi_l)) + cpo_alpha x NLL); ``simpo`` is
    SimPO with gamma = ``simpo_gamma`` (0.5, absolute as in TRL), plus cpo_alpha x NLL
    when cpo_alpha > 0 (CPO-SimPO). TRL CPO's reference-free hinge and ipo, and AlphaPO
    (``alpha`` != 0), are not implemented and are refused."""

    loss_type: list[str] = field(default_factory=lambda: ["sigmoid"], metadata={
        "help": "sigmoid (CPO) or simpo (SimPO; CPO-SimPO with cpo_alpha > 0)."})
    beta: float | None = 0.1
    simpo_gamma: float | None = 0.5
    alpha: float = field(default=0.0, metadata={"help": "AlphaPO's alpha; only 0 is supported."})

    def _losses(self):
        names, weights = super()._losses()
        if self.alpha != 0:
            raise ValueError(f"alpha={self.alpha} asks for AlphaPO, which is not implemented; "
                             "set alpha=0")
        head, extra = names[0], names[1:]
        if head not in ("sigmoid", "simpo", "cpo") or any(n != "sft" for n in extra):
            raise ValueError(f"CPOConfig.loss_type is sigmoid (CPO) or simpo, got {names}; "
                             "TRL CPO's hinge and ipo (reference-free) are not implemented")
        weights = weights or [1.0] * len(names)
        if head == "simpo" and self.cpo_alpha > 0:  # CPO-SimPO: SimPO plus the NLL term
            return [*names, "sft"], [*weights, self.cpo_alpha]
        return ["cpo" if head == "sigmoid" else head, *extra], weights


class CPOTrainer(PreferenceTrainer):
    """TRL's CPOTrainer: ``PreferenceTrainer`` with CPOConfig's losses (no reference)."""


@dataclass
class ORPOConfig(PreferenceConfig):
    """TRL's ORPOConfig: ORPO, beta is its lambda (0.1). Our NLL term covers completion
    tokens only, as in the paper (TRL's includes the prompt)."""

    loss_type: list[str] = field(default_factory=lambda: ["orpo"], metadata={
        "help": "orpo."})

    def _losses(self):
        names, weights = super()._losses()
        if names[0] != "orpo":
            raise ValueError(f"ORPOConfig trains ORPO, got loss_type {names}; other losses: "
                             "PreferenceConfig(loss_type=...)")
        return names, weights


class ORPOTrainer(PreferenceTrainer):
    """TRL's ORPOTrainer: ``PreferenceTrainer`` with the orpo loss (no reference)."""
