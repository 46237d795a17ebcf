"""The DPO family: reference-based losses of paired, summed log-probs."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .base import (
    LossOutput,
    LossParams,
    PairedLogps,
    _dpo_rewards,
    _expand,
    _needs_smoothing,
    _ratios,
    _scores,
    _smoothed_logistic,
    _smoothing_below_half,
    chosen_nll,
    register_loss,
)

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
