"""Preference losses against values computed by hand with scalar math (not the module)."""

import math

import pytest
import torch

from rlhf_ext.losses import (
    LOSSES,
    LossParams,
    PairedLogps,
    UnpairedLogps,
    check_params,
    compute_loss,
    kto_reference_point,
    resolve_loss_types,
)

PI_W = [-5.0, -8.0, -3.0]
PI_L = [-6.0, -7.0, -9.0]
REF_W = [-5.5, -7.5, -4.0]
REF_L = [-5.0, -7.2, -8.0]
N_W = [4, 5, 2]
N_L = [3, 6, 5]
BETA = 0.5


def sig(x):
    return 1 / (1 + math.exp(-x))


def logsig(x):
    return math.log(sig(x))


def batch(requires_grad=False):
    t = lambda v: torch.tensor(v, dtype=torch.float64, requires_grad=requires_grad)  # noqa: E731
    return PairedLogps(t(PI_W), t(PI_L), torch.tensor(N_W, dtype=torch.float64),
                       torch.tensor(N_L, dtype=torch.float64), t(REF_W), t(REF_L))


def rows():
    for pw, pl, rw, rl, nw, nl in zip(PI_W, PI_L, REF_W, REF_L, N_W, N_L):
        yield pw, pl, pw - rw, pl - rl, nw, nl


def run(name, **params):
    specs, weights = resolve_loss_types(name)
    p = LossParams(beta=params.pop("beta", BETA), **params)
    check_params(specs, p)
    return compute_loss(specs, weights, batch(), p)


NLL = -sum(PI_W) / sum(N_W)  # token-level mean NLL of the chosen completions

HAND = {
    "sigmoid": lambda pw, pl, hw, hl, nw, nl: -logsig(BETA * (hw - hl)),
    "hinge": lambda pw, pl, hw, hl, nw, nl: max(0.0, 1 - BETA * (hw - hl)),
    "ipo": lambda pw, pl, hw, hl, nw, nl: (hw / nw - hl / nl - 1 / (2 * BETA)) ** 2,
    "nca_pair": lambda pw, pl, hw, hl, nw, nl: (
        -logsig(BETA * hw) - 0.5 * logsig(-BETA * hw) - 0.5 * logsig(-BETA * hl)),
    "robust": lambda pw, pl, hw, hl, nw, nl: -logsig(BETA * (hw - hl)),  # ls = 0
    "bco_pair": lambda pw, pl, hw, hl, nw, nl: -logsig(BETA * hw) - logsig(-BETA * hl),
    "sppo_hard": lambda pw, pl, hw, hl, nw, nl: (hw - 1 / (2 * BETA)) ** 2 + (hl + 1 / (2 * BETA)) ** 2,
    "apo_zero": lambda pw, pl, hw, hl, nw, nl: 1 - sig(BETA * hw) + sig(BETA * hl),
    "apo_down": lambda pw, pl, hw, hl, nw, nl: sig(BETA * hw) + 1 - sig(BETA * (hw - hl)),
    "discopop": lambda pw, pl, hw, hl, nw, nl: (
        (1 - sig(BETA * (hw - hl) / 0.05)) * -logsig(BETA * (hw - hl))
        + sig(BETA * (hw - hl) / 0.05) * math.exp(-BETA * (hw - hl))),
    "sigmoid_norm": lambda pw, pl, hw, hl, nw, nl: -logsig(BETA * (hw / nw - hl / nl)),
    "sft": lambda pw, pl, hw, hl, nw, nl: NLL,
    "simpo": lambda pw, pl, hw, hl, nw, nl: -logsig(BETA * (pw / nw - pl / nl) - 0.5 * BETA),
    "cpo": lambda pw, pl, hw, hl, nw, nl: -logsig(BETA * (pw - pl)) + NLL,
}


@pytest.mark.parametrize("name", sorted(HAND))
def test_loss_by_hand(name):
    loss, out = run(name)
    expected = [HAND[name](*r) for r in rows()]
    torch.testing.assert_close(out.losses, torch.tensor(expected, dtype=torch.float64))
    assert loss.item() == pytest.approx(sum(expected) / len(expected))


def test_dpo_alias_and_rewards():
    _, out = run("dpo")
    hw = [r[2] for r in rows()]
    hl = [r[3] for r in rows()]
    assert out.chosen_rewards.tolist() == pytest.approx([BETA * h for h in hw])
    assert out.rejected_rewards.tolist() == pytest.approx([BETA * h for h in hl])


def test_conservative_dpo_and_robust_with_smoothing():
    ls = 0.2
    _, cdpo = run("sigmoid", label_smoothing=ls)
    _, rob = run("robust", label_smoothing=ls)
    for i, (_, _, hw, hl, _, _) in enumerate(rows()):
        z = BETA * (hw - hl)
        assert cdpo.losses[i].item() == pytest.approx(-(1 - ls) * logsig(z) - ls * logsig(-z))
        assert rob.losses[i].item() == pytest.approx(
            (-(1 - ls) * logsig(z) + ls * logsig(-z)) / (1 - 2 * ls))


def test_exo_pair_by_hand():
    ls = 1e-3
    _, out = run("exo_pair", label_smoothing=ls)
    for i, (_, _, hw, hl, _, _) in enumerate(rows()):
        z = BETA * (hw - hl)
        expected = (sig(z) * (logsig(z) - math.log(1 - ls))
                    + sig(-z) * (logsig(-z) - math.log(ls)))
        assert out.losses[i].item() == pytest.approx(expected)


def test_aot_sorts_across_the_batch():
    _, paired = run("aot")
    _, unpaired = run("aot_unpaired")
    pol = sorted(pw - pl for pw, pl, *_ in rows())
    ref = sorted((rw - rl) for rw, rl in zip(REF_W, REF_L))
    assert paired.losses.tolist() == pytest.approx([-logsig(BETA * (a - b)) for a, b in zip(pol, ref)])
    hw = sorted(r[2] for r in rows())
    hl = sorted(r[3] for r in rows())
    assert unpaired.losses.tolist() == pytest.approx(
        [-logsig(BETA * (a - b)) for a, b in zip(hw, hl)])


def test_orpo_by_hand():
    _, out = run("orpo", beta=0.1)
    ratios, log_odds_all = [], []
    for i, (pw, pl, _, _, nw, nl) in enumerate(rows()):
        aw, al = pw / nw, pl / nl
        odds = lambda a: math.exp(a) / (1 - math.exp(a))  # noqa: E731
        log_odds = math.log(odds(aw) / odds(al))
        ratios.append(logsig(log_odds))
        log_odds_all.append(log_odds)
        assert out.losses[i].item() == pytest.approx(NLL - 0.1 * logsig(log_odds))
        assert out.chosen_rewards[i].item() == pytest.approx(0.1 * aw)
    assert out.metrics["log_odds_ratio"].item() == pytest.approx(sum(ratios) / 3)
    assert out.metrics["log_odds_chosen"].item() == pytest.approx(sum(log_odds_all) / 3)
    assert out.metrics["nll_loss"].item() == pytest.approx(NLL)


def test_simpo_paper_defaults_and_explicit_gamma():
    specs, w = resolve_loss_types("simpo")
    _, out = compute_loss(specs, w, batch(), LossParams())  # beta 2.0, gamma 1.0
    for i, (pw, pl, _, _, nw, nl) in enumerate(rows()):
        assert out.losses[i].item() == pytest.approx(-logsig(2.0 * (pw / nw - pl / nl) - 1.0))
    _, out = run("simpo", simpo_gamma=0.3)
    for i, (pw, pl, _, _, nw, nl) in enumerate(rows()):
        assert out.losses[i].item() == pytest.approx(-logsig(BETA * (pw / nw - pl / nl) - 0.3))


def test_length_normalisation():
    """Doubling every token count (same sums) halves the per-token terms of ipo/simpo/orpo."""
    b = batch()
    doubled = PairedLogps(b.chosen, b.rejected, 2 * b.chosen_tokens, 2 * b.rejected_tokens,
                          b.ref_chosen, b.ref_rejected)
    p = LossParams(beta=BETA)
    for name in ("ipo", "simpo", "orpo", "sigmoid_norm"):
        spec = LOSSES[name]
        base, longer = spec.fn(b, p).losses, spec.fn(doubled, p).losses
        assert not torch.allclose(base, longer), name
    # summed losses do not see the counts at all
    torch.testing.assert_close(LOSSES["sigmoid"].fn(b, p).losses,
                               LOSSES["sigmoid"].fn(doubled, p).losses)
    # ipo by hand with the doubled counts
    for i, (_, _, hw, hl, nw, nl) in enumerate(rows()):
        expected = (hw / (2 * nw) - hl / (2 * nl) - 1 / (2 * BETA)) ** 2
        assert LOSSES["ipo"].fn(doubled, p).losses[i].item() == pytest.approx(expected)


@pytest.mark.parametrize("name", sorted(n for n, s in LOSSES.items() if s.paired))
def test_gradient_direction(name):
    """Raising a chosen log-prob lowers the loss; raising a rejected one does not lower it.

    apo_down is the exception by design: it pushes the chosen likelihood down too.
    DiscoPOP is non-monotone near a zero margin (its blend weight sigma(z / 0.05) moves the
    loss from log(2) towards exp(0) = 1 as z crosses 0: the non-convexity its paper reports),
    so it is checked at margins |beta * delta| >= 1.4, where it is monotone.
    """
    b = batch(requires_grad=True)
    specs, weights = resolve_loss_types(name)
    beta = 2.0 if name == "discopop" else 0.1
    p = LossParams(beta=beta, label_smoothing=1e-3 if name == "exo_pair" else 0.0)
    loss, _ = compute_loss(specs, weights, b, p)
    loss.backward()
    if name == "apo_down":
        assert (b.rejected.grad > 0).all()
        return
    assert (b.chosen.grad < 0).all(), b.chosen.grad
    if name == "sft":  # the NLL of the chosen side only
        assert b.rejected.grad is None
        return
    assert (b.rejected.grad >= 0).all(), b.rejected.grad


def unpaired(labels, kl=0.3):
    logps = torch.tensor([-4.0, -6.0, -5.0, -7.0], dtype=torch.float64)
    ref = torch.tensor([-4.5, -5.0, -5.5, -6.0], dtype=torch.float64)
    return UnpairedLogps(logps, torch.tensor([3.0, 4, 2, 5]), torch.tensor(labels), ref,
                         torch.tensor(kl, dtype=torch.float64))


def test_kto_all_desirable_and_all_undesirable():
    specs, w = resolve_loss_types("kto")
    p = LossParams(beta=BETA, desirable_weight=1.5, undesirable_weight=0.7)
    h = [0.5, -1.0, 0.5, -1.0]
    _, out = compute_loss(specs, w, unpaired([True] * 4), p)
    assert out.losses.tolist() == pytest.approx([1.5 * (1 - sig(BETA * (x - 0.3))) for x in h])
    assert out.rejected_rewards.numel() == 0 and out.chosen_rewards.numel() == 4
    loss, out = compute_loss(specs, w, unpaired([False] * 4), p)
    assert out.losses.tolist() == pytest.approx([0.7 * (1 - sig(BETA * (0.3 - x))) for x in h])
    assert out.chosen_rewards.numel() == 0
    assert out.metrics["kl"].item() == pytest.approx(0.3)
    loss, out = compute_loss(specs, w, unpaired([True, False, True, False]), p)
    assert out.losses.tolist() == pytest.approx([1.5 * (1 - sig(BETA * (0.5 - 0.3))),
                                                 0.7 * (1 - sig(BETA * (0.3 + 1.0))),
                                                 1.5 * (1 - sig(BETA * (0.5 - 0.3))),
                                                 0.7 * (1 - sig(BETA * (0.3 + 1.0)))])


def test_kto_reference_point_detached_and_clamped():
    kl = torch.tensor([-1.0, -2.0], requires_grad=True)
    ref = torch.tensor([-1.5, -2.1])
    z0 = kto_reference_point(kl, ref)
    assert z0.item() == pytest.approx((0.5 + 0.1) / 2) and not z0.requires_grad
    assert kto_reference_point(ref, kl).item() == 0.0  # negative estimate clamped at 0


def test_composition_weights_rpo():
    specs, weights = resolve_loss_types(["sigmoid", "sft"], [1.0, 0.2])
    loss, out = compute_loss(specs, weights, batch(), LossParams(beta=BETA))
    dpo = sum(-logsig(BETA * (hw - hl)) for _, _, hw, hl, _, _ in rows()) / 3
    assert loss.item() == pytest.approx(dpo + 0.2 * NLL)
    assert "nll_loss" in out.metrics  # metrics of every term are kept
    assert out.chosen_rewards.tolist() == pytest.approx([BETA * r[2] for r in rows()])


def test_declarations():
    assert not LOSSES["orpo"].needs_reference and not LOSSES["simpo"].needs_reference
    assert not LOSSES["cpo"].needs_reference and LOSSES["sigmoid"].needs_reference
    assert LOSSES["simpo"].logps == "mean" and LOSSES["orpo"].logps == "mean"
    assert LOSSES["cpo"].logps == "sum" and not LOSSES["kto"].paired
    assert LOSSES["simpo"].default_beta == 2.0


def test_bad_names_and_params_fail_early():
    with pytest.raises(ValueError, match="unknown loss_type 'dpoo'.*sigmoid"):
        resolve_loss_types("dpoo")
    with pytest.raises(ValueError, match="loss_weights has 1 values for 2"):
        resolve_loss_types(["sigmoid", "sft"], [1.0])
    with pytest.raises(ValueError, match="cannot combine paired and unpaired"):
        resolve_loss_types(["kto", "sigmoid"])
    specs, _ = resolve_loss_types("exo_pair")
    with pytest.raises(ValueError, match="label_smoothing=1e-3"):
        check_params(specs, LossParams())
    with pytest.raises(ValueError, match="beta must be > 0"):
        check_params(resolve_loss_types("ipo")[0], LossParams(beta=0.0))
