"""PPO math against hand computations."""

import math

import pytest
import torch

from rlhf_ext.ppo import controllers, core

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
    torch.testing.assert_close(core.clip_scores(T([-12.0, 3.0, 15.0]), (-10.0, 10.0)), T([-10.0, 3.0, 10.0]))


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
    # aggregated as the policy loss: DAPO's step token mean divides the sum by 4 tokens
    step, _ = core.value_loss(values, old, ret, torch.ones(1, 2), clip=0.2,
                              aggregation="step_token_mean", tokens=4.0)
    assert step.item() == pytest.approx(0.5 * (0.64 + 2.25) / 4)


def test_adaptive_kl_controller_one_update():
    ctl = controllers.AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(current_kl=9.0, n_steps=256)  # error = clip(9/6 - 1, +-0.2) = 0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 256 / 10000))
    ctl.update(current_kl=5.4, n_steps=100)  # error = -0.1
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 256 / 10000) * (1 - 0.1 * 100 / 10000))
    restored = controllers.AdaptiveKLController(1.0, 1.0, 1)
    restored.load_state_dict(ctl.state_dict())
    assert restored == ctl
    fixed = controllers.FixedKLController(0.05)
    fixed.update(100.0, 10)
    assert fixed.value == 0.05


def test_masked_whiten_and_running_moments():
    x = T([[1.0, 2.0, 3.0, 100.0]])
    mask = T([[1.0, 1, 1, 0]])
    w = core.masked_whiten(x, mask)
    torch.testing.assert_close(w, T([[-1.0, 0.0, 1.0, 0.0]]), atol=1e-4, rtol=1e-4)  # var 1
    # two processes' rows (of different widths) whitened together, as one process would:
    # [1, 2] and [3, 4, 5] -> mean 3, Bessel var 2.5; each call of ``total`` adds what the
    # other process contributes at that call (its count and sum, then its squares)
    a, ma = T([[1.0, 2.0, 0.0]]), T([[1.0, 1, 0]])
    b, mb = T([[3.0, 4.0], [5.0, 9.0]]), T([[1.0, 1], [1, 0]])
    others = {id(a): [T([3.0, 12.0]), T([5.0])], id(b): [T([2.0, 3.0]), T([5.0])]}

    def total(x):
        def add(t):
            return t + others[id(x)].pop(0)
        return add

    std = 2.5 ** 0.5
    torch.testing.assert_close(core.masked_whiten(a, ma, total=total(a)),
                               T([[-2 / std, -1 / std, 0.0]]))
    torch.testing.assert_close(core.masked_whiten(b, mb, total=total(b)),
                               T([[0.0, 1 / std], [2 / std, 0.0]]))
    m = controllers.RunningMoments()
    m.update(T([1.0, 3.0]))
    m.update(T([5.0, 7.0]))
    assert m.mean == pytest.approx(4.0) and m.var == pytest.approx(5.0)  # population var


# ---------------------------------------------------------------------------------------
# critic-free estimators and loss aggregation
# ---------------------------------------------------------------------------------------

SCORES = T([1.0, 3.0, 2.0, 6.0, 0.0, 0.0])  # two groups of three: [1, 3, 2], [6, 0, 0]


def test_group_baselines_by_hand():
    std0 = 1.0                       # [1, 3, 2]: mean 2, unbiased var ((1 + 1 + 0) / 2) = 1
    std1 = math.sqrt((16 + 4 + 4) / 2)  # [6, 0, 0]: mean 2, var 12
    grpo = core.group_baseline_scores(SCORES, 3, "grpo")
    torch.testing.assert_close(grpo, T([-1 / (std0 + 1e-4), 1 / (std0 + 1e-4), 0.0,
                                        4 / (std1 + 1e-4), -2 / (std1 + 1e-4),
                                        -2 / (std1 + 1e-4)]))
    torch.testing.assert_close(core.group_baseline_scores(SCORES, 3, "grpo", "none"),
                               T([-1.0, 1, 0, 4, -2, -2]))
    # rloo: each minus the mean of the other two
    torch.testing.assert_close(core.group_baseline_scores(SCORES, 3, "rloo"),
                               T([1 - 2.5, 3 - 1.5, 2 - 2.0, 6 - 0.0, 0 - 3.0, 0 - 3.0]))
    torch.testing.assert_close(core.group_baseline_scores(SCORES, 3, "reinforce_pp_baseline"),
                               T([-1.0, 1, 0, 4, -2, -2]))
    assert core.group_baseline_scores(SCORES, 1, "reinforce_pp") is SCORES
    with pytest.raises(ValueError, match="groups of >= 2"):
        core.group_baseline_scores(SCORES, 4, "grpo")


def test_returns_to_go_by_hand():
    rewards = T([[0.1, -0.2, 1.0, 0.0], [0.5, 0.5, 0.5, 0.5]])
    mask = T([[1.0, 1, 1, 0], [1, 1, 1, 1]])
    g = 0.9
    expected = T([[0.1 + g * (-0.2) + g * g * 1.0, -0.2 + g * 1.0, 1.0, 0.0],
                  [0.5 * (1 + g + g**2 + g**3), 0.5 * (1 + g + g**2), 0.5 * (1 + g), 0.5]])
    torch.testing.assert_close(core.returns_to_go(rewards, mask, g), expected)


def test_critic_free_advantages_with_kl_in_the_reward():
    # one group of two: scores 1 and 3, grpo without scaling -> -1, +1 on the last token;
    # kl 0.2 per token with coefficient 0.5 -> -0.1 per token, summed to go
    scores, mask = T([1.0, 3.0]), T([[1.0, 1, 1], [1, 1, 0]])
    kl = 0.2 * mask
    adv = core.critic_free_advantages(scores, kl, mask, 0.5, "grpo", 2, scale_rewards="none")
    torch.testing.assert_close(adv, T([[-1.3, -1.2, -1.1], [0.8, 0.9, 0.0]]))
    # kl_coef 0: every token of a response carries its baselined score
    adv = core.critic_free_advantages(scores, kl, mask, 0.0, "rloo", 2)
    torch.testing.assert_close(adv, T([[-2.0, -2.0, -2.0], [2.0, 2.0, 0.0]]))
    # REINFORCE++: whitened over the batch's 5 real tokens, padding 0
    adv = core.critic_free_advantages(scores, kl, mask, 0.0, "reinforce_pp", 1)
    x = T([1.0, 1, 1, 3, 3])
    w = (x - x.mean()) / x.std()
    torch.testing.assert_close(adv, T([[w[0], w[1], w[2]], [w[3], w[4], 0.0]]), atol=1e-4,
                               rtol=1e-4)


def test_loss_aggregations_by_hand():
    loss = T([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0]])
    mask = T([[1.0, 1, 1, 0], [1, 0, 0, 0]])
    assert core.aggregate(loss, mask, "token_mean").item() == pytest.approx(10 / 4)
    assert core.aggregate(loss, mask, "seq_mean_token_mean").item() == pytest.approx((2 + 4) / 2)
    assert core.aggregate(loss, mask, "seq_mean_token_sum", horizon=4).item() == \
        pytest.approx((6 + 4) / 2 / 4)
    with pytest.raises(ValueError, match="token_mean"):
        core.aggregate(loss, mask, "sum")
    # the policy loss uses it: at ratio 1 the loss is -A aggregated
    adv = T([[1.0, 1.0, 1.0, 0.0], [-2.0, 0.0, 0.0, 0.0]])
    pg, _ = core.policy_loss(torch.zeros(2, 4), torch.zeros(2, 4), adv, mask, 0.2,
                             "seq_mean_token_mean")
    assert pg.item() == pytest.approx(-(1.0 + -2.0) / 2)


def test_group_baselines_leave_unscored_samples_out_and_scale_by_the_batch():
    nan = float("nan")
    scores = T([1.0, nan, 3.0, 6.0, 0.0, 0.0])
    # group 1 scored [1, 3]: mean 2, std sqrt(2); the unscored sample gets 0
    grpo = core.group_baseline_scores(scores, 3, "grpo")
    s = math.sqrt(2) + 1e-4
    torch.testing.assert_close(grpo[:3], T([-1 / s, 0.0, 1 / s]))
    # rloo: the mean of the *scored* others: 1 - 3, 3 - 1
    torch.testing.assert_close(core.group_baseline_scores(scores, 3, "rloo")[:3],
                               T([-2.0, 0.0, 2.0]))
    # batch scaling: the std of every score (here 5 scored ones), group means unchanged
    everyone = T([1.0, 3.0, 6.0, 0.0, 0.0, 2.0, 2.0])  # e.g. two more from another process
    sd = torch.tensor([1.0, 3.0, 6.0, 0.0, 0.0, 2.0, 2.0]).std().item()
    batch = core.group_baseline_scores(scores, 3, "grpo", "batch", all_scores=everyone)
    torch.testing.assert_close(batch, T([-1, 0, 1, 4, -2, -2]) / (sd + 1e-4))
    assert core.nanstd(T([1.0, nan, 3.0])).item() == pytest.approx(math.sqrt(2))
    # one scored sample has no std (TRL logs NaN), none neither; per row along a dim
    assert math.isnan(core.nanstd(T([nan, 4.0, nan]))) and math.isnan(core.nanstd(T([nan])))
    rows = core.nanstd(T([[1.0, 3.0], [5.0, nan]]), 1)
    assert rows[0].item() == pytest.approx(math.sqrt(2)) and math.isnan(rows[1])
    # a group with one scored sample: its advantage is 0, not NaN, under every scaling
    lone = T([nan, 4.0, nan, 1.0, 2.0, 3.0])
    for scaling in ("group", "batch"):
        adv = core.group_baseline_scores(lone, 3, "grpo", scaling)
        assert torch.isfinite(adv).all() and adv[:3].abs().max() == 0
    torch.testing.assert_close(core.whiten_scores(T([4.0, nan])), T([0.0, nan]), equal_nan=True)


def test_rloo_kl_in_the_score_and_whitened_advantages():
    # scores 1 and 3, summed KL 0.4 and 0.2 at coefficient 0.5 -> 0.8 and 2.9;
    # leave-one-out: 0.8 - 2.9, 2.9 - 0.8 on every real token
    scores, mask = T([1.0, 3.0]), T([[1.0, 1, 0], [1, 0, 0]])
    kl = T([[0.1, 0.3, 0.0], [0.2, 0.0, 0.0]])
    adv = core.critic_free_advantages(scores, kl, mask, 0.5, "rloo", 2, kl_in_reward="score")
    torch.testing.assert_close(adv, T([[-2.1, -2.1, 0.0], [2.1, 0.0, 0.0]]))
    w = core.whiten_scores(T([1.0, 2.0, 6.0]))
    torch.testing.assert_close(w, (T([1.0, 2.0, 6.0]) - 3) / (math.sqrt(7) + 1e-4))


def test_informative_groups():
    assert core.informative_groups(T([1.0, 1.0, 0.0, 1.0, 2.0, 2.0]), 2).tolist() == \
        [False, True, False]


def test_importance_weights_per_token_and_per_sequence():
    logps, old = T([[-1.0, -2.0, -3.0]]), T([[-1.5, -1.5, -1.0]])
    mask = T([[1.0, 1, 0]])
    torch.testing.assert_close(core.importance_log_weights(logps, old, mask, "token"),
                               T([[0.5, -0.5, -2.0]]))
    # GSPO: the mean over real tokens (0.5 - 0.5) / 2; RLOO's sequence ratio: the sum
    assert core.importance_log_weights(logps, old, mask, "sequence").tolist() == [[0.0]]
    logps2 = T([[-1.0, -1.0, 0.0]])
    assert core.importance_log_weights(logps2, old, mask, "sequence_sum").item() == \
        pytest.approx(1.0)


def test_surrogates_by_hand():
    ratio = T([[1.5, 0.5, 3.0, 0.5]])
    adv = T([[1.0, 1.0, 1.0, -1.0]])
    logps = torch.log(T([[0.5, 0.25, 0.5, 0.5]]))
    # clip-higher (low 0.2, high 0.28): 1.5 -> 1.28; 0.5 with A > 0 not clipped (min);
    # dual clip 2.0: the unclipped 3.0 becomes 2.0 but the clipped 1.28 is smaller;
    # A < 0 at 0.5: max(-A r, -A 0.8) = 0.8
    out = core.surrogate(ratio, logps, adv, "clip", 0.2, 0.28, dual_clip=2.0)
    torch.testing.assert_close(out, T([[-1.28, -0.5, -1.28, 0.8]]))
    # dual clip with A < 0 caps a large ratio: r = 3, A = -1 -> -A min(r, 2) = 2
    out = core.surrogate(T([[3.0]]), T([[0.0]]), T([[-1.0]]), "clip", 0.2, 0.2, dual_clip=2.0)
    assert out.item() == pytest.approx(2.0)
    # cispo: -min(r, high) A log pi with the weight detached
    lp = logps.clone().requires_grad_(True)
    out = core.surrogate(ratio, lp, adv, "cispo", 0.2, 2.0)
    torch.testing.assert_close(out, -T([[1.5, 0.5, 2.0, 0.5]]) * adv * logps)
    out.sum().backward()
    torch.testing.assert_close(lp.grad, -T([[1.5, 0.5, 2.0, 0.5]]) * adv)
    # sapo: -A (4 / tau) sigmoid(tau (r - 1)); tau 1 for A > 0, 1.05 otherwise
    out = core.surrogate(T([[1.5, 0.5]]), T([[0.0, 0.0]]), T([[1.0, -1.0]]), "sapo")
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected = [-4 * sig(0.5), 4 / 1.05 * sig(1.05 * -0.5)]
    torch.testing.assert_close(out, T([expected]))


def test_step_token_mean_and_clip_fractions():
    loss = T([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0]])
    mask = T([[1.0, 1, 1, 0], [1, 0, 0, 0]])
    # the token sum over this micro-batch / the rollout's mean tokens per micro-batch (5)
    assert core.aggregate(loss, mask, "step_token_mean", tokens=5.0).item() == \
        pytest.approx(10 / 5)
    with pytest.raises(ValueError, match="tokens per micro-batch"):
        core.aggregate(loss, mask, "step_token_mean")
    logps = torch.log(T([[1.5, 0.5, 1.5, 0.5]]))
    _, stats = core.policy_loss(logps, torch.zeros(1, 4), T([[1.0, 1.0, -1.0, -1.0]]),
                                torch.ones(1, 4), clip=0.2, clip_high=0.6)
    # high: r 1.5 > 1.6? no; low: r 0.5 < 0.8 with A < 0: the last token
    assert stats["clipfrac_high"].item() == 0.0
    assert stats["clipfrac_low"].item() == pytest.approx(1 / 4)


def test_high_entropy_mask_keeps_the_top_quantile():
    entropy = T([[0.1, 0.9, 0.5, 7.0], [0.3, 0.7, 0.0, 0.0]])
    mask = T([[1.0, 1, 1, 0], [1, 1, 0, 0]])
    # real entropies 0.1 0.9 0.5 0.3 0.7: the 0.6 quantile is 0.58 -> keep 0.9 and 0.7
    keep = core.high_entropy_mask(entropy, mask, 0.4)
    assert keep.tolist() == [[0.0, 1.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]]


def test_dynamic_sampling_replaces_uninformative_groups_in_order():
    from rlhf_ext.ppo.rollout import Sampled, dynamic_sampling

    def sampled(tag: str, scores: list[float]) -> Sampled:
        n = len(scores)
        return Sampled([{"prompt": f"{tag}{i // 2}"} for i in range(n)], [tag] * n,
                       [f"{tag}{i}" for i in range(n)], [[i] for i in range(n)], [True] * n,
                       None, T(scores)[:, None], T(scores), T(scores))

    first = sampled("a", [1, 1, 0, 1, 2, 2])  # groups of 2: a0 and a2 say nothing
    calls = []

    def more(n_groups: int, round_: int) -> Sampled:
        calls.append((n_groups, round_))
        # round 1: one informative group (b1) of two; round 2: the informative c0
        return sampled("b", [3, 3, 0, 5]) if round_ == 1 else sampled("c", [1, 0])

    out, live = dynamic_sampling(first, more, group=2, max_rounds=3)
    assert calls == [(2, 1), (1, 2)]
    assert [r["prompt"] for r in out.rows] == ["b1", "b1", "a1", "a1", "c0", "c0"]
    assert out.scores.tolist() == [0, 5, 0, 1, 1, 0] and live.all()
    # out of rounds: the group that stays uninformative takes no loss
    out, live = dynamic_sampling(first, lambda n, r: sampled("d", [4, 4] * n), 2, 1)
    assert live.tolist() == [False, False, True, True, False, False]


def test_loss_mask_drops_dead_groups_and_optionally_truncated_responses():
    mask = T([[1.0, 1, 0], [1, 1, 1], [1, 0, 0]])
    live, finished = T([1.0, 1, 0]), T([1.0, 0, 1])
    torch.testing.assert_close(core.loss_mask(mask, live, finished, False),
                               T([[1.0, 1, 0], [1, 1, 1], [0, 0, 0]]))
    torch.testing.assert_close(core.loss_mask(mask, live, finished, True),
                               T([[1.0, 1, 0], [0, 0, 0], [0, 0, 0]]))
