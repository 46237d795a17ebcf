"""Reference-free losses (ORPO, SimPO, CPO) and the unpaired ones (KTO, APO-zero unpaired)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import (
    LossOutput,
    LossParams,
    PairedLogps,
    UnpairedLogps,
    _simpo_params,
    _smoothed_logistic,
    _smoothing_below_half,
    chosen_nll,
    log1mexp,
    register_loss,
)

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
