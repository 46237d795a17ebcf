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

from collections.abc import Sequence
from dataclasses import replace

from torch import Tensor

from .base import (
    ALIASES,
    F_DIVERGENCES,
    LOSSES,
    LossOutput,
    LossParams,
    LossSpec,
    PairedLogps,
    UnpairedLogps,
    chosen_nll,
    f_divergence_scores,
    log1mexp,
    register_loss,
    wpo_weights,
)

# importing the loss modules registers their losses
from .paired import (
    aot_loss,
    aot_unpaired_loss,
    apo_down_loss,
    apo_zero_loss,
    bco_pair_loss,
    discopop_loss,
    exo_pair_loss,
    hinge_loss,
    ipo_loss,
    nca_pair_loss,
    robust_loss,
    sft_loss,
    sigmoid_loss,
    sigmoid_norm_loss,
    sppo_hard_loss,
)
from .reference_free import (
    apo_zero_unpaired_loss,
    cpo_loss,
    kto_loss,
    kto_reference_point,
    orpo_loss,
    simpo_loss,
)

__all__ = [
    "ALIASES",
    "F_DIVERGENCES",
    "LOSSES",
    "LossOutput",
    "LossParams",
    "LossSpec",
    "PairedLogps",
    "UnpairedLogps",
    "chosen_nll",
    "f_divergence_scores",
    "log1mexp",
    "register_loss",
    "wpo_weights",
    "sigmoid_loss",
    "hinge_loss",
    "ipo_loss",
    "exo_pair_loss",
    "nca_pair_loss",
    "robust_loss",
    "bco_pair_loss",
    "sppo_hard_loss",
    "aot_loss",
    "aot_unpaired_loss",
    "apo_zero_loss",
    "apo_down_loss",
    "discopop_loss",
    "sigmoid_norm_loss",
    "sft_loss",
    "orpo_loss",
    "simpo_loss",
    "cpo_loss",
    "kto_reference_point",
    "kto_loss",
    "apo_zero_unpaired_loss",
    "resolve_loss_types",
    "params_for",
    "check_params",
    "swapped",
    "soft_label_losses",
    "check_soft_labels",
    "compute_loss",
]

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
