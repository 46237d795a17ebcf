"""Offline preference losses: small pure functions of sequence log-probs, registered by name.

Every loss reads the same inputs: per-example log-probs *summed* over completion tokens,
their token counts, and (for reference-based losses) the reference model's sums. A loss
that works on averaged log-probs divides by the counts itself, so the trainer computes
one thing, always. Notation in the docstrings, all tensors of shape [B]:

    pi_w, pi_l     policy log-probs of the chosen (w) and rejected (l) completions (sums)
    ref_w, ref_l   the same under the reference model
    n_w, n_l       completion token counts
    h_w = pi_w - ref_w,  h_l = pi_l - ref_l        log-ratios
    delta = h_w - h_l                              DPO's implicit reward margin / beta
    sigma = logistic function, ls = label_smoothing

Each loss returns per-example losses (the batch loss is their mean, times the loss
weight) and the per-example implicit rewards the trainer logs. ``LOSSES`` maps a name to
a ``LossSpec`` declaring what the loss needs, so the trainer can skip the reference
forward pass for reference-free losses and refuse data that does not fit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

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


# ---------------------------------------------------------------------------------------
# the DPO family (reference-based, paired, summed log-probs)
# ---------------------------------------------------------------------------------------

@register_loss("sigmoid", check=_smoothing_below_half, smooths=True, f_divergence=True)
def sigmoid_loss(b: PairedLogps, p: LossParams) -> LossOutput:
    """DPO (Rafailov et al. 2023, eq. 7): -log sigma(beta * delta).

    With label_smoothing ls > 0 it is conservative DPO (cDPO, Mitchell 2023):
    -(1 - ls) log sigma(beta delta) - ls log sigma(-beta delta).
    """
    h_w, h_l = _scores(b, p)
    return _dpo_rewards(b, p.beta, _smoothed_logistic(p.beta * (h_w - h_l), p.label_smoothing))


@register_loss("hinge", f_divergence=True)
def hinge_loss(b: PairedLogps, p: LossParams) -> LossOutput:
    """SLiC hinge (Zhao et al. 2023): max(0, 1 - beta * delta)."""
    h_w, h_l = _scores(b, p)
    return _dpo_rewards(b, p.beta, torch.relu(1 - p.beta * (h_w - h_l)))


@register_loss("ipo", f_divergence=True)
def ipo_loss(b: PairedLogps, p: LossParams) -> LossOutput:
    """IPO (Azar et al. 2023, eq. 17): (h_w / n_w - h_l / n_l - 1 / (2 beta))^2.

    Each side's log-ratio is divided by its own token count, as TRL does (the IPO authors'
    length-normalised form); beta is the paper's tau.
    """
    h_w, h_l = _scores(b, p)
    margin = h_w / b.chosen_tokens.clamp(min=1) - h_l / b.rejected_tokens.clamp(min=1)
    return _dpo_rewards(b, p.beta, (margin - 1 / (2 * p.beta)) ** 2)


@register_loss("exo_pair", check=_needs_smoothing, smooths=True, f_divergence=True)
def exo_pair_loss(b: PairedLogps, p: LossParams) -> LossOutput:
    """EXO (Ji et al. 2024, eq. 16), pairwise: KL(q || p_rh) with q = softmax over the pair of
    beta * log-ratios and p_rh = (1 - ls, ls):
    sigma(z) (log sigma(z) - log(1 - ls)) + sigma(-z) (log sigma(-z) - log ls), z = beta delta.
    """
    h_w, h_l = _scores(b, p)
    z = p.beta * (h_w - h_l)
    ls = p.label_smoothing
    losses = (torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-ls))
              + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(ls)))
    return _dpo_rewards(b, p.beta, losses)


@register_loss("nca_pair")
def nca_pair_loss(b: PairedLogps, p: LossParams) -> LossOutput:
    """NCA (Chen et al. 2024), pairwise:
    -log sigma(beta h_w) - 0.5 log sigma(-beta h_w) - 0.5 log sigma(-beta h_l)."""
    h_w, h_l = _ratios(b)
    losses = (-F.logsigmoid(p.beta * h_w) - 0.5 * F.logsigmoid(-p.beta * h_w)
              - 0.5 * F.logsigmoid(-p.beta * h_l))
    return _dpo_rewards(b, p.beta, losses)


@register_loss("robust", check=_smoothing_below_half, smooths=True, f_divergence=True,
               soft=False)
def robust_loss(b: PairedLogps, p: LossParams) -> LossOutput:
    """Robust DPO (Chowdhury et al. 2024, eq. 8), unbiased under label-flip rate ls:
    (-(1 - ls) log sigma(beta delta) + ls log sigma(-beta delta)) / (1 - 2 ls)."""
    h_w, h_l = _scores(b, p)
    z, ls = p.beta * (h_w - h_l), p.label_smoothing
    losses = (-(1 - ls) * F.logsigmoid(z) + ls * F.logsigmoid(-z)) / (1 - 2 * ls)
    return _dpo_rewards(b, p.beta, losses)


@register_loss("bco_pair")
def bco_pair_loss(b: PairedLogps, p: LossParams) -> LossOutput:
    """BCO (Jung et al. 2024), pairwise, without the running reward shift:
    -log sigma(beta h_w) - log sigma(-beta h_l)."""
    h_w, h_l = _ratios(b)
    return _dpo_rewards(b, p.beta, -F.logsigmoid(p.beta * h_w) - F.logsigmoid(-p.beta * h_l))


@register_loss("sppo_hard")
def sppo_hard_loss(b: PairedLogps, p: LossParams) -> LossOutput:
    """SPPO (Wu et al. 2024, eq. 4.7) with hard win probabilities 1 and 0:
    (h_w - 1 / (2 beta))^2 + (h_l + 1 / (2 beta))^2."""
    h_w, h_l = _ratios(b)
    return _dpo_rewards(b, p.beta, (h_w - 0.5 / p.beta) ** 2 + (h_l + 0.5 / p.beta) ** 2)


@register_loss("aot", check=_smoothing_below_half, smooths=True, weighable=False,
               soft=False)
def aot_loss(b: PairedLogps, p: LossParams) -> LossOutput:
    """AOT (Melnyk et al. 2024), paired: the batch's sorted policy margins pi_w - pi_l against
    the sorted reference margins ref_w - ref_l; d = sort(pi_w - pi_l) - sort(ref_w - ref_l);
    smoothed logistic loss of beta * d."""
    d = (torch.sort(b.chosen - b.rejected).values
         - torch.sort(b.ref_chosen - b.ref_rejected).values)
    return _dpo_rewards(b, p.beta, _smoothed_logistic(p.beta * d, p.label_smoothing))


@register_loss("aot_unpaired", check=_smoothing_below_half, smooths=True,
               weighable=False, soft=False)
def aot_unpaired_loss(b: PairedLogps, p: LossParams) -> LossOutput:
    """AOT, unpaired: d = sort(h_w) - sort(h_l); smoothed logistic loss of beta * d."""
    h_w, h_l = _ratios(b)
    d = torch.sort(h_w).values - torch.sort(h_l).values
    return _dpo_rewards(b, p.beta, _smoothed_logistic(p.beta * d, p.label_smoothing))


@register_loss("apo_zero")
def apo_zero_loss(b: PairedLogps, p: LossParams) -> LossOutput:
    """APO-zero (D'Oosterlinck et al. 2024, eq. 7): 1 - sigma(beta h_w) + sigma(beta h_l).
    Pushes the chosen likelihood up and the rejected down."""
    h_w, h_l = _ratios(b)
    return _dpo_rewards(b, p.beta, 1 - torch.sigmoid(p.beta * h_w) + torch.sigmoid(p.beta * h_l))


@register_loss("apo_down")
def apo_down_loss(b: PairedLogps, p: LossParams) -> LossOutput:
    """APO-down (eq. 8): sigma(beta h_w) + 1 - sigma(beta delta). For chosen answers worse
    than the model's own: pushes both likelihoods down, the rejected one more."""
    h_w, h_l = _ratios(b)
    losses = torch.sigmoid(p.beta * h_w) + 1 - torch.sigmoid(p.beta * (h_w - h_l))
    return _dpo_rewards(b, p.beta, losses)


@register_loss("discopop", f_divergence=True)
def discopop_loss(b: PairedLogps, p: LossParams) -> LossOutput:
    """DiscoPOP (Chris Lu et al. 2024, eq. 5): with z = beta delta and m = sigma(z / tau),
    (1 - m) * (-log sigma(z)) + m * exp(-z)."""
    h_w, h_l = _scores(b, p)
    z = p.beta * (h_w - h_l)
    m = torch.sigmoid(z / p.discopop_tau)
    return _dpo_rewards(b, p.beta, (1 - m) * -F.logsigmoid(z) + m * torch.exp(-z))


@register_loss("sigmoid_norm", f_divergence=True)
def sigmoid_norm_loss(b: PairedLogps, p: LossParams) -> LossOutput:
    """Length-normalised DPO: -log sigma(beta (h_w / n_w - h_l / n_l))."""
    h_w, h_l = _scores(b, p)
    margin = h_w / b.chosen_tokens.clamp(min=1) - h_l / b.rejected_tokens.clamp(min=1)
    return _dpo_rewards(b, p.beta, -F.logsigmoid(p.beta * margin))


@register_loss("sft", needs_reference=False, f_divergence=True, soft=False)
def sft_loss(b: PairedLogps, p: LossParams) -> LossOutput:
    """NLL of the chosen completions, the token-level mean over the batch (``chosen_nll``).
    Combined with sigmoid it gives RPO (Pang et al. 2024): loss_type [sigmoid, sft]."""
    nll = chosen_nll(b)
    rewards = p.beta * b.chosen.detach(), p.beta * b.rejected.detach()
    return LossOutput(_expand(nll, b.chosen), *rewards, {"nll_loss": nll.detach()})


# ---------------------------------------------------------------------------------------
# reference-free losses
# ---------------------------------------------------------------------------------------

@register_loss("orpo", needs_reference=False, logps="mean", soft=False)
def orpo_loss(b: PairedLogps, p: LossParams) -> LossOutput:
    """ORPO (Hong et al. 2024, eqs. 4-7): NLL(chosen) - lambda * log sigma(log odds ratio),
    lambda = beta. With averaged log-probs a = pi / n, odds(y) = p / (1 - p), p = exp(a):
    log odds ratio = (a_w - a_l) - (log(1 - exp(a_w)) - log(1 - exp(a_l))).

    The NLL is over completion tokens, as in the paper. (TRL's ORPOTrainer includes the
    prompt tokens in it.) Rewards are beta * a; logged: nll_loss, log_odds_ratio (mean of
    log sigma(log odds)), log_odds_chosen (mean log odds), as TRL names them.
    """
    a_w = b.chosen / b.chosen_tokens.clamp(min=1)
    a_l = b.rejected / b.rejected_tokens.clamp(min=1)
    log_odds = (a_w - a_l) - (log1mexp(a_w) - log1mexp(a_l))
    ratio = F.logsigmoid(log_odds)
    nll = chosen_nll(b)
    metrics = {"nll_loss": nll.detach(), "log_odds_ratio": ratio.detach().mean(),
               "log_odds_chosen": log_odds.detach().mean()}
    return LossOutput(nll - p.beta * ratio, p.beta * a_w.detach(), p.beta * a_l.detach(), metrics)


@register_loss("simpo", needs_reference=False, logps="mean", default_beta=2.0,
               check=_simpo_params, smooths=True)
def simpo_loss(b: PairedLogps, p: LossParams) -> LossOutput:
    """SimPO (Meng et al. 2024, eq. 6): -log sigma(beta (a_w - a_l) - gamma), a = pi / n.

    Defaults from the paper: beta 2.0, gamma = 0.5 beta (``simpo_gamma`` sets gamma itself).
    With label_smoothing, the smoothed logistic loss. Rewards are beta * a.
    """
    a_w = b.chosen / b.chosen_tokens.clamp(min=1)
    a_l = b.rejected / b.rejected_tokens.clamp(min=1)
    gamma = 0.5 * p.beta if p.simpo_gamma is None else p.simpo_gamma
    losses = _smoothed_logistic(p.beta * (a_w - a_l) - gamma, p.label_smoothing)
    return LossOutput(losses, p.beta * a_w.detach(), p.beta * a_l.detach())


@register_loss("cpo", needs_reference=False, check=_smoothing_below_half, smooths=True,
               soft=False)
def cpo_loss(b: PairedLogps, p: LossParams) -> LossOutput:
    """CPO (Xu et al. 2024, eq. 3 + BC term): -log sigma(beta (pi_w - pi_l)) + alpha * NLL(chosen),
    summed log-probs, alpha = cpo_alpha. Rewards are beta * pi."""
    nll = chosen_nll(b)
    losses = _smoothed_logistic(p.beta * (b.chosen - b.rejected), p.label_smoothing)
    losses = losses + p.cpo_alpha * nll
    return LossOutput(losses, p.beta * b.chosen.detach(), p.beta * b.rejected.detach(),
                      {"nll_loss": nll.detach()})


# ---------------------------------------------------------------------------------------
# unpaired
# ---------------------------------------------------------------------------------------

def kto_reference_point(kl_logps: Tensor, ref_kl_logps: Tensor) -> Tensor:
    """KTO's z0 (Ethayarajh et al. 2024, sec. 4.1): the batch estimate of KL(pi || ref) from
    mismatched (prompt, completion) pairs, mean(pi(y'|x) - ref(y'|x)), detached, clamped at 0.
    Shapes: [B], [B] -> scalar. (Average across processes before clamping under DDP.)"""
    return (kl_logps - ref_kl_logps).mean().detach().clamp(min=0)


@register_loss("kto", paired=False)
def kto_loss(b: UnpairedLogps, p: LossParams) -> LossOutput:
    """KTO (Ethayarajh et al. 2024, eq. 7) with h = pi - ref and reference point z0:
    desirable: w_D (1 - sigma(beta (h - z0))); undesirable: w_U (1 - sigma(beta (z0 - h))).
    Rewards beta * h of each group; metric ``kl`` = z0."""
    h = b.logps - b.ref_logps
    z0 = b.kl_reference if b.kl_reference is not None else torch.zeros((), device=h.device)
    desirable = p.desirable_weight * (1 - torch.sigmoid(p.beta * (h - z0)))
    undesirable = p.undesirable_weight * (1 - torch.sigmoid(p.beta * (z0 - h)))
    labels = b.labels.bool()
    losses = torch.where(labels, desirable, undesirable)
    rewards = p.beta * h.detach()
    return LossOutput(losses, rewards[labels], rewards[~labels], {"kl": z0.detach()})


@register_loss("apo_zero_unpaired", paired=False)
def apo_zero_unpaired_loss(b: UnpairedLogps, p: LossParams) -> LossOutput:
    """APO-zero for unpaired data (D'Oosterlinck et al. 2024; TRL KTO's loss_type of that
    name), h = pi - ref, no reference point: desirable 1 - sigma(beta h), undesirable
    sigma(beta h), weighted by desirable_weight / undesirable_weight."""
    h = b.logps - b.ref_logps
    labels = b.labels.bool()
    losses = torch.where(labels, p.desirable_weight * (1 - torch.sigmoid(p.beta * h)),
                         p.undesirable_weight * torch.sigmoid(p.beta * h))
    rewards = p.beta * h.detach()
    return LossOutput(losses, rewards[labels], rewards[~labels])


# ---------------------------------------------------------------------------------------
# names, checks and composition
# ---------------------------------------------------------------------------------------

def resolve_loss_types(loss_type: str | Sequence[str],
                       loss_weights: Sequence[float] | None = None
                       ) -> tuple[list[LossSpec], list[float]]:
    """Names (or one name) and weights -> specs and weights; fails early on bad input."""
    names = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    if not names:
        raise ValueError("loss_type is empty; give one name or a list, e.g. [sigmoid, sft]")
    specs = []
    for name in names:
        canonical = ALIASES.get(name, name)
        if canonical not in LOSSES:
            valid = sorted(LOSSES) + sorted(ALIASES)
            raise ValueError(f"unknown loss_type {name!r}; valid names: {', '.join(valid)}")
        specs.append(LOSSES[canonical])
    weights = [1.0] * len(specs) if loss_weights is None else [float(w) for w in loss_weights]
    if len(weights) != len(specs):
        raise ValueError(f"loss_weights has {len(weights)} values for {len(specs)} loss types "
                         f"{names}; give one weight per loss")
    if len({s.paired for s in specs}) > 1:
        raise ValueError(f"cannot combine paired and unpaired losses: {names}")
    return specs, weights


def params_for(spec: LossSpec, params: LossParams) -> LossParams:
    """``params`` with beta resolved to the loss's own default when unset."""
    return params if params.beta is not None else replace(params, beta=spec.default_beta)


def check_params(specs: Sequence[LossSpec], params: LossParams) -> None:
    """Run each loss's own parameter check (at config time, before any training)."""
    if params.label_smoothing and not any(spec.smooths for spec in specs):
        smoothing = sorted(name for name, spec in LOSSES.items() if spec.smooths)
        raise ValueError(f"label_smoothing={params.label_smoothing} is ignored by loss "
                         f"{[s.name for s in specs]}: set it to 0, or use a loss that reads it "
                         f"({', '.join(smoothing)})")
    if params.f_divergence_type != "reverse_kl":
        if params.f_divergence_type not in F_DIVERGENCES:
            raise ValueError(f"unknown f_divergence_type {params.f_divergence_type!r}; valid: "
                             f"{', '.join(F_DIVERGENCES)}")
        plain = [s.name for s in specs if not s.f_divergence]
        if plain:
            able = sorted(name for name, spec in LOSSES.items() if spec.f_divergence)
            raise ValueError(f"f_divergence_type={params.f_divergence_type!r} replaces the "
                             f"log-ratio of DPO-style losses ({', '.join(able)}); loss(es) "
                             f"{plain} use the log-ratios otherwise. Use reverse_kl with them.")
    for spec in specs:
        p = params_for(spec, params)
        if p.beta <= 0:
            raise ValueError(f"beta must be > 0 for loss {spec.name!r}, got {p.beta}")
        if spec.check is not None:
            spec.check(p)


def swapped(b: PairedLogps) -> PairedLogps:
    """The same pairs with chosen and rejected exchanged (soft labels become 1 - p)."""
    flip = None if b.soft_labels is None else 1 - b.soft_labels
    return PairedLogps(b.rejected, b.chosen, b.rejected_tokens, b.chosen_tokens,
                       b.ref_rejected, b.ref_chosen, b.weights, flip)


def soft_label_losses(spec: LossSpec, b: PairedLogps, p: LossParams) -> LossOutput:
    """A loss under soft labels p = P(chosen preferred), [B]: its expectation when each
    pair's order is drawn from its label, p L(w, l) + (1 - p) L(l, w), so no label is
    rounded away. For sigmoid this is the label-weighted logistic loss
    -p log sigma(beta delta) - (1 - p) log sigma(-beta delta) (cDPO with ls = 1 - p per
    pair; the Bradley-Terry cross-entropy against the soft target); for ipo it is, up to the
    constant p (1 - p) / beta^2, (margin - (2p - 1) / (2 beta))^2, IPO's regression target
    for preference probability p; for sppo_hard, SPPO with win probabilities p and 1 - p.
    p = 1 gives the loss itself. Rewards and metrics are those of the pairs as given.
    Losses whose pairs are coupled across the batch (aot), that train on the chosen
    completion's likelihood (sft, cpo, orpo) or model label noise themselves (robust) have
    ``soft`` False and are refused soft labels (``check_soft_labels``)."""
    out = spec.fn(b, p)
    if b.soft_labels is None:
        return out
    other = spec.fn(swapped(b), p)
    q = b.soft_labels.to(out.losses.dtype)
    return replace(out, losses=q * out.losses + (1 - q) * other.losses)


def check_soft_labels(specs: Sequence[LossSpec]) -> None:
    """Refuse soft labels (a ``chosen_probability`` column) for losses that cannot read them."""
    hard = [s.name for s in specs if not s.soft]
    if hard:
        able = sorted(name for name, spec in LOSSES.items() if spec.soft)
        raise ValueError(
            f"loss(es) {hard} cannot read soft labels (the dataset's 'chosen_probability' "
            f"column): aot couples pairs across the batch, sft/cpo/orpo train on the chosen "
            f"completion's likelihood, robust models label noise itself. Use one of "
            f"{', '.join(able)}, or round the labels (drop the column).")


def compute_loss(specs: Sequence[LossSpec], weights: Sequence[float],
                 batch: PairedLogps | UnpairedLogps, params: LossParams
                 ) -> tuple[Tensor, LossOutput]:
    """Weighted sum of the losses' batch means (each example's loss times the batch's
    per-pair ``weights`` when it has them: WPO), and the first loss's output for logging.

    Returns (scalar loss, LossOutput of the first loss with every loss's metrics merged).
    """
    total, first, metrics = None, None, {}
    pair_weights = getattr(batch, "weights", None)
    for spec, weight in zip(specs, weights, strict=True):
        p = params_for(spec, params)
        out = soft_label_losses(spec, batch, p) if spec.paired else spec.fn(batch, p)
        losses = out.losses if pair_weights is None else out.losses * pair_weights
        term = weight * losses.mean()
        total = term if total is None else total + term
        first = first or out
        metrics.update(out.metrics)
    return total, replace(first, metrics=metrics)
