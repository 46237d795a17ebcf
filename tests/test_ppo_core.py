"""PPO math against hand computations."""

import math

import pytest
import torch

from rlhf_ext.ppo import core

T = torch.tensor


def test_gae_gamma_lambda_one_beta_zero_is_score_minus_value():
    mask = T([[1.0, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    values = T([[0.2, 0.5, -0.1, 9.0, 9.0], [0.1, 0.0, 0.3, 0.4, 0.6]])
    scores = T([1.5, -0.5])
    rewards = core.shape_rewards(scores, torch.zeros(2, 5), mask, beta=0.0)
    adv, ret = core.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    expected = (scores[:, None] - values) * mask
    torch.testing.assert_close(adv, expected)
    torch.testing.assert_close(ret, scores[:, None] * mask)  # returns = A + V = score
    assert adv[0, 3:].abs().sum() == 0  # padding: no bootstrapping from the 9.0 values


def test_gae_three_tokens_by_hand():
    gamma, lam = 0.9, 0.8
    r = [0.1, -0.2, 1.0]
    v = [0.5, 0.4, 0.3]
    d2 = r[2] + 0 - v[2]
    d1 = r[1] + gamma * v[2] - v[1]
    d0 = r[0] + gamma * v[1] - v[0]
    a2 = d2
    a1 = d1 + gamma * lam * a2
    a0 = d0 + gamma * lam * a1
    adv, ret = core.gae(T([r]), T([v]), T([[1.0, 1, 1]]), gamma, lam)
    torch.testing.assert_close(adv, T([[a0, a1, a2]]))
    torch.testing.assert_close(ret, T([[a0 + v[0], a1 + v[1], a2 + v[2]]]))


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_estimators(estimator):
    logp, ref = T([[-1.0, -2.0, -0.5]]), T([[-1.5, -1.0, -0.5]])
    d = [0.5, -1.0, 0.0]
    hand = {"k1": d, "k2": [x * x / 2 for x in d], "k3": [math.exp(-x) - 1 + x for x in d]}
    torch.testing.assert_close(core.per_token_kl(logp, ref, estimator), T([hand[estimator]]))
    with pytest.raises(ValueError, match="k1, k2 or k3"):
        core.per_token_kl(logp, ref, "k4")


def test_score_on_last_real_token_with_and_without_eos():
    # row 0 ended with eos at index 2 (then padding); row 1 was truncated (no eos, full row)
    mask = T([[1.0, 1, 1, 0], [1, 1, 1, 1]])
    kl = T([[0.1, 0.2, 0.3, 0.4], [0.1, 0.1, 0.1, 0.1]])
    rewards = core.shape_rewards(T([2.0, -1.0]), kl, mask, beta=0.5)
    torch.testing.assert_close(rewards, T([[-0.05, -0.1, -0.15 + 2.0, 0.0],
                                           [-0.05, -0.05, -0.05, -0.05 - 1.0]]))
    assert rewards[0, 3] == 0  # never on the pad after eos (TRL's old PPO bug)


def test_missing_eos_penalty_and_clip():
    s = core.penalize_missing_eos(T([1.0, 1.0]), T([True, False]), penalty=2.0)
    torch.testing.assert_close(s, T([1.0, -1.0]))
    torch.testing.assert_close(core.clip_scores(T([-12.0, 3.0, 15.0]), 10.0), T([-10.0, 3.0, 10.0]))


def test_policy_loss_clipping_cases():
    old = torch.zeros(1, 4)
    # ratios 1.5 (A>0: clipped to 1.2), 0.5 (A>0: unclipped, worse), 1.5 (A<0: unclipped),
    # 0.5 (A<0: clipped to 0.8)
    logps = torch.log(T([[1.5, 0.5, 1.5, 0.5]]))
    adv = T([[1.0, 1.0, -1.0, -1.0]])
    loss, stats = core.policy_loss(logps, old, adv, torch.ones(1, 4), clip=0.2)
    per_token = [-1.2, -0.5, 1.5, 0.8]  # max(-A r, -A clip(r)) token by token
    assert loss.item() == pytest.approx(sum(per_token) / 4)
    assert stats["clipfrac"].item() == pytest.approx(2 / 4)
    assert stats["ratio"].item() == pytest.approx(1.0)
    d = [math.log(1.5), math.log(0.5)] * 2
    assert stats["approxkl"].item() == pytest.approx(sum(x * x for x in d) / 8)


def test_value_loss_clipping_cases():
    old, ret = T([[0.0, 0.0]]), T([[1.0, -1.0]])
    values = T([[0.5, 0.5]])  # moves 0.5 from old: clipped to 0.2
    loss, stats = core.value_loss(values, old, ret, torch.ones(1, 2), clip=0.2)
    # token 0: max((0.5-1)^2, (0.2-1)^2) = 0.64; token 1: max((0.5+1)^2, (0.2+1)^2) = 2.25
    assert loss.item() == pytest.approx(0.5 * (0.64 + 2.25) / 2)
    assert stats["clipfrac"].item() == pytest.approx(0.5)
    unclipped, _ = core.value_loss(values, old, ret, torch.ones(1, 2), clip=None)
    assert unclipped.item() == pytest.approx(0.5 * (0.25 + 2.25) / 2)


def test_adaptive_kl_controller_one_update():
    ctl = core.AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(current_kl=9.0, n_steps=256)  # error = clip(9/6 - 1, +-0.2) = 0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 256 / 10000))
    ctl.update(current_kl=5.4, n_steps=100)  # error = -0.1
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 256 / 10000) * (1 - 0.1 * 100 / 10000))
    restored = core.AdaptiveKLController(1.0, 1.0, 1)
    restored.load_state_dict(ctl.state_dict())
    assert restored == ctl
    fixed = core.FixedKLController(0.05)
    fixed.update(100.0, 10)
    assert fixed.value == 0.05


def test_masked_whiten_and_running_moments():
    x = T([[1.0, 2.0, 3.0, 100.0]])
    mask = T([[1.0, 1, 1, 0]])
    w = core.masked_whiten(x, mask)
    torch.testing.assert_close(w, T([[-1.0, 0.0, 1.0, 0.0]]), atol=1e-4, rtol=1e-4)  # var 1
    m = core.RunningMoments()
    m.update(T([1.0, 3.0]))
    m.update(T([5.0, 7.0]))
    assert m.mean == pytest.approx(4.0) and m.var == pytest.approx(5.0)  # population var


def test_entropy_from_logits():
    logits = torch.log(T([[[0.5, 0.25, 0.25]]]))
    expected = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    assert core.entropy_from_logits(logits).item() == pytest.approx(expected)
