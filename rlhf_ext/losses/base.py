"""What every loss shares: the log-prob batches, parameters, outputs, the registry
(``LOSSES``, ``register_loss``) and the small helpers the losses are built from."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class PairedLogps:
    """Sequence log-probs of a batch of preference pairs; every tensor has shape [B]."""

    chosen: Tensor
    rejected: Tensor
    chosen_tokens: Tensor
    rejected_tokens: Tensor
    ref_chosen: Tensor | None = None
    ref_rejected: Tensor | None = None
    weights: Tensor | None = None  # per-pair loss weights (WPO), no gradient
    soft_labels: Tensor | None = None  # P(chosen preferred) per pair (RLAIF), no gradient


@dataclass
class UnpairedLogps:
    """Sequence log-probs of a batch of labelled completions (KTO); tensors of shape [B].

    ``kl_reference`` is KTO's reference point z0, a detached scalar (``kto_reference_point``).
    """

    logps: Tensor
    tokens: Tensor
    labels: Tensor  # bool, True = desirable
    ref_logps: Tensor | None = None
    kl_reference: Tensor | None = None


@dataclass
class LossParams:
    """Hyperparameters shared by the losses (names as in TRL's configs)."""

    beta: float | None = None  # None: each loss's own default (LossSpec.default_beta)
    label_smoothing: float = 0.0
    simpo_gamma: float | None = None  # None: 0.5 * beta, the SimPO paper's gamma/beta
    cpo_alpha: float = 1.0
    discopop_tau: float = 0.05
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5


@dataclass
class LossOutput:
    """Per-example ``losses`` [B]; implicit rewards of chosen/desirable and rejected/
    undesirable examples; extra scalar ``metrics`` under TRL's names."""

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class LossSpec:
    name: str
    fn: Callable[..., LossOutput]
    needs_reference: bool
    paired: bool
    logps: str  # "sum" or "mean": how the loss reads sequence log-probs
    default_beta: float = 0.1
    check: Callable[[LossParams], None] | None = None
    smooths: bool = False  # reads label_smoothing
    f_divergence: bool = False  # reads f_divergence_type (through _scores)
    weighable: bool = True  # per-pair weights (WPO) apply: false where pairs are coupled
    soft: bool = True  # reads soft labels (``soft_label_losses``): false where it cannot


LOSSES: dict[str, LossSpec] = {}
ALIASES = {"dpo": "sigmoid"}


def register_loss(name: str, *, needs_reference: bool = True, paired: bool = True,
                  logps: str = "sum", default_beta: float = 0.1, check=None,
                  smooths: bool = False, f_divergence: bool = False, weighable: bool = True,
                  soft: bool = True):
    """Decorator: add a loss function to ``LOSSES`` under ``name``."""

    def wrap(fn):
        LOSSES[name] = LossSpec(name, fn, needs_reference, paired, logps, default_beta, check,
                                smooths, f_divergence, weighable, soft and paired)
        return fn

    return wrap


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------

def _smoothed_logistic(x: Tensor, ls: float) -> Tensor:
    """-(1 - ls) log sigma(x) - ls log sigma(-x): the logistic loss with label smoothing."""
    return -(1 - ls) * F.logsigmoid(x) - ls * F.logsigmoid(-x)


def _ratios(b: PairedLogps) -> tuple[Tensor, Tensor]:
    return b.chosen - b.ref_chosen, b.rejected - b.ref_rejected


F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


def f_divergence_scores(h: Tensor, kind: str, alpha: float = 0.5) -> Tensor:
    """f-DPO (Wang et al. 2023): the log-ratio h = log(pi / ref) replaced by f'(u) at
    u = pi / ref, for the f-divergence that regularises the policy instead of reverse KL:
    reverse_kl log u (DPO itself); forward_kl 1 - 1/u; js_divergence log(2u / (1 + u)) =
    log 2 + log sigma(h); alpha_divergence (u^(alpha - 1) - 1) / (alpha - 1) (TRL's
    parametrisation; alpha = 1 is reverse KL), exponent clamped at 80. [B] -> [B]."""
    if kind == "reverse_kl" or (kind == "alpha_divergence" and abs(alpha - 1) < 1e-6):
        return h
    if kind == "forward_kl":
        return 1 - torch.exp(-h)
    if kind == "js_divergence":
        return math.log(2) + F.logsigmoid(h)
    if kind == "alpha_divergence":
        return torch.expm1(((alpha - 1) * h.float()).clamp(max=80.0)).to(h.dtype) / (alpha - 1)
    raise ValueError(f"unknown f_divergence_type {kind!r}; valid: {', '.join(F_DIVERGENCES)}")


def _scores(b: PairedLogps, p: LossParams) -> tuple[Tensor, Tensor]:
    """Log-ratios through ``f_divergence_scores`` (the identity for DPO's reverse KL)."""
    h_w, h_l = _ratios(b)
    kind, alpha = p.f_divergence_type, p.f_alpha_divergence_coef
    return f_divergence_scores(h_w, kind, alpha), f_divergence_scores(h_l, kind, alpha)


def _dpo_rewards(b: PairedLogps, beta: float, losses: Tensor, **metrics) -> LossOutput:
    h_w, h_l = _ratios(b)
    return LossOutput(losses, beta * h_w.detach(), beta * h_l.detach(), metrics)


def chosen_nll(b: PairedLogps) -> Tensor:
    """Token-level mean NLL of the chosen completions over the batch: -sum(pi_w) / sum(n_w).

    Returns a scalar (the same value TRL's SFT term and CPO's NLL term compute).
    """
    return -b.chosen.sum() / b.chosen_tokens.sum().clamp(min=1)


def wpo_weights(logps: Tensor, log_sum_sq: Tensor, counts: Tensor) -> Tensor:
    """WPO's pair weights (Zhou et al. 2024, eq. 2, as TRL computes them): each completion's
    w = exp(mean over its tokens of log p(y_t) - log sum_v p(v)^2), the probability of the
    completion under the policy relative to its own sampling distribution, length-normalised;
    a pair's weight is w_chosen * w_rejected, without gradient.

    Shapes: per-sequence sums over completion tokens [2B] (chosen first), counts [2B] -> [B].
    """
    w = ((logps - log_sum_sq) / counts.clamp(min=1)).detach().exp()
    b = w.shape[0] // 2
    return w[:b] * w[b:]


def _expand(scalar: Tensor, like: Tensor) -> Tensor:
    """A batch-level scalar as a per-example tensor whose mean is the scalar."""
    return scalar.expand_as(like)


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, stable at both ends (Maechler 2012)."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _needs_smoothing(p: LossParams) -> None:
    if not 0 < p.label_smoothing < 0.5:
        raise ValueError("loss 'exo_pair' needs 0 < label_smoothing < 0.5 (the EXO paper uses "
                         "1e-3): set label_smoothing=1e-3")


def _smoothing_below_half(p: LossParams) -> None:
    if not 0 <= p.label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {p.label_smoothing}")


def _simpo_params(p: LossParams) -> None:
    _smoothing_below_half(p)
    if p.simpo_gamma is not None and p.simpo_gamma < 0:
        raise ValueError(f"simpo_gamma is SimPO's target reward margin and must be >= 0, got "
                         f"{p.simpo_gamma} (the paper uses 0.5 * beta, the default)")
