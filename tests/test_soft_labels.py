"""Soft preference labels (RLAIF's chosen_probability): the losses against hand math, the
trainers end to end (p = 0 is the swapped pair, p = 1 the pair itself), refusals."""

import math

import pytest
import torch
from datasets import Dataset

from rlhf_ext import losses as L
from rlhf_ext.data import DataError
from rlhf_ext.preference import PreferenceConfig, PreferenceTrainer
from rlhf_ext.reward import RewardConfig, RewardTrainer, reward_loss, score
from rlhf_ext.worlds.tiny import preference_pairs

P = torch.tensor([0.9, 0.5, 0.2])
BATCH = L.PairedLogps(chosen=torch.tensor([-5.0, -7.0, -3.0]),
                      rejected=torch.tensor([-6.0, -4.0, -9.0]),
                      chosen_tokens=torch.tensor([4.0, 5.0, 2.0]),
                      rejected_tokens=torch.tensor([3.0, 6.0, 7.0]),
                      ref_chosen=torch.tensor([-5.5, -6.0, -4.0]),
                      ref_rejected=torch.tensor([-5.0, -5.0, -8.0]))


def logsig(x):
    return -math.log1p(math.exp(-x))


def loss_of(name, batch, beta=0.1, **kw):
    spec = L.LOSSES[name]
    return L.compute_loss([spec], [1.0], batch, L.LossParams(beta=beta, **kw))[0].item()


def test_soft_sigmoid_is_the_label_weighted_logistic_loss():
    soft = L.PairedLogps(**{**BATCH.__dict__, "soft_labels": P})
    deltas = [(-5 + 5.5) - (-6 + 5), (-7 + 6) - (-4 + 5), (-3 + 4) - (-9 + 8)]  # h_w - h_l
    hand = [-(p * logsig(0.1 * d) + (1 - p) * logsig(-0.1 * d)) for p, d in zip(P.tolist(),
                                                                              deltas)]
    assert loss_of("sigmoid", soft) == pytest.approx(sum(hand) / 3, rel=1e-6)
    ones = L.PairedLogps(**{**BATCH.__dict__, "soft_labels": torch.ones(3)})
    assert loss_of("sigmoid", ones) == pytest.approx(loss_of("sigmoid", BATCH), rel=1e-6)
    # label smoothing still applies inside each order
    ls = 0.1
    smooth = [-(p * ((1 - ls) * logsig(0.1 * d) + ls * logsig(-0.1 * d))
                + (1 - p) * ((1 - ls) * logsig(-0.1 * d) + ls * logsig(0.1 * d)))
              for p, d in zip(P.tolist(), deltas)]
    assert loss_of("sigmoid", soft, label_smoothing=ls) == pytest.approx(sum(smooth) / 3,
                                                                         rel=1e-6)


def test_soft_ipo_is_the_papers_target_up_to_a_constant():
    """E over the order drawn from p of (m - (I - 1/2) / beta)^2 =
    (m - (2p - 1) / (2 beta))^2 + p (1 - p) / beta^2, m the length-normalised margin."""
    beta = 0.5
    soft = L.PairedLogps(**{**BATCH.__dict__, "soft_labels": P})
    h_w = (BATCH.chosen - BATCH.ref_chosen) / BATCH.chosen_tokens
    h_l = (BATCH.rejected - BATCH.ref_rejected) / BATCH.rejected_tokens
    hand = [(m - (2 * p - 1) / (2 * beta)) ** 2 + p * (1 - p) / beta ** 2
            for m, p in zip((h_w - h_l).tolist(), P.tolist())]
    assert loss_of("ipo", soft, beta=beta) == pytest.approx(sum(hand) / 3, rel=1e-6)


def test_soft_simpo_and_swapped_order():
    """Reference-free too; p = 0 is the pair swapped."""
    zeros = L.PairedLogps(**{**BATCH.__dict__, "soft_labels": torch.zeros(3)})
    assert loss_of("simpo", zeros, beta=2.0) == pytest.approx(
        loss_of("simpo", L.swapped(BATCH), beta=2.0), rel=1e-6)
    a_w, a_l = BATCH.chosen / BATCH.chosen_tokens, BATCH.rejected / BATCH.rejected_tokens
    soft = L.PairedLogps(**{**BATCH.__dict__, "soft_labels": P})
    hand = [-(p * logsig(2 * (w - lo) - 1) + (1 - p) * logsig(2 * (lo - w) - 1))
            for w, lo, p in zip(a_w.tolist(), a_l.tolist(), P.tolist())]
    assert loss_of("simpo", soft, beta=2.0) == pytest.approx(sum(hand) / 3, rel=1e-6)


def test_which_losses_take_soft_labels():
    hard = sorted(name for name, spec in L.LOSSES.items() if spec.paired and not spec.soft)
    assert hard == ["aot", "aot_unpaired", "cpo", "orpo", "robust", "sft"]
    with pytest.raises(ValueError, match=r"\['cpo'\] cannot read soft labels.*sigmoid"):
        L.check_soft_labels([L.LOSSES["cpo"]])
    L.check_soft_labels([L.LOSSES["sigmoid"], L.LOSSES["ipo"]])


def test_soft_bradley_terry_by_hand():
    c, r, p = torch.tensor([1.0, -0.5]), torch.tensor([0.0, 0.5]), torch.tensor([0.8, 0.3])
    hand = -(0.8 * logsig(1) + 0.2 * logsig(-1) + 0.3 * logsig(-1) + 0.7 * logsig(1)) / 2
    assert reward_loss(c, r, soft_labels=p).item() == pytest.approx(hand, rel=1e-6)
    m = torch.tensor([0.5, 0.0])  # a margin shifts each order's logit
    hand = -(0.8 * logsig(0.5) + 0.2 * logsig(-1.5) + 0.3 * logsig(-1) + 0.7 * logsig(1)) / 2
    assert reward_loss(c, r, m, soft_labels=p).item() == pytest.approx(hand, rel=1e-6)


ARGS = dict(max_steps=1, per_device_train_batch_size=8, logging_steps=1, report_to="none",
            use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0, max_length=64,
            learning_rate=0.0)
PAIRS = preference_pairs(8, seed=1)
SWAPPED = PAIRS.rename_columns({"chosen": "rejected", "rejected": "chosen"})


def first_loss(trainer) -> float:
    trainer.train()
    return trainer.state.log_history[0]["loss"]


@pytest.mark.parametrize("loss, prefix_sharing", [("simpo", False), ("simpo", True),
                                                   ("sigmoid", False)])
def test_preference_trainer_reads_soft_labels(policy_dir, tok, tmp_path, loss, prefix_sharing):
    """Through the collator and the trainer: p = 1 gives the hard loss, p = 0 the swapped
    pairs' loss, p = 0.3 their mixture (the loss is linear in p). DPO's reference is another
    model, so that its margins are not zero at the first step."""
    from rlhf_ext.worlds.tiny import build_model

    ref = build_model("tiny", tok, seed=5) if loss == "sigmoid" else None

    def run(data, name):
        args = PreferenceConfig(output_dir=str(tmp_path / name), prefix_sharing=prefix_sharing,
                                loss_type=loss, **ARGS)
        return first_loss(PreferenceTrainer(str(policy_dir), ref, args=args, train_dataset=data,
                                            processing_class=tok))

    hard, swapped = run(PAIRS, "hard"), run(SWAPPED, "swapped")
    assert hard != pytest.approx(swapped)
    labelled = lambda p: PAIRS.add_column("chosen_probability", [p] * 8)  # noqa: E731
    assert run(labelled(1.0), "one") == pytest.approx(hard, rel=1e-5)
    assert run(labelled(0.0), "zero") == pytest.approx(swapped, rel=1e-5)
    assert run(labelled(0.3), "mix") == pytest.approx(0.3 * hard + 0.7 * swapped, rel=1e-5)


def test_reward_trainer_reads_soft_labels(policy_dir, tok, tmp_path):
    from rlhf_ext.heads import RewardModel

    p = [0.1 * i for i in range(8)]
    rm = RewardModel.from_backbone(str(policy_dir), seed=2)
    trainer = RewardTrainer(rm, args=RewardConfig(output_dir=str(tmp_path), **ARGS),
                            train_dataset=PAIRS.add_column("chosen_probability", p),
                            processing_class=tok)
    loss = first_loss(trainer)
    rewards = score(trainer.model, tok, list(PAIRS["prompt"]) * 2,
                    list(PAIRS["chosen"]) + list(PAIRS["rejected"]))
    hand = -sum(q * logsig(c - r) + (1 - q) * logsig(r - c)
                for q, c, r in zip(p, rewards[:8], rewards[8:])) / 8
    assert loss == pytest.approx(hand, rel=1e-5)


@pytest.mark.parametrize("column, loss, error, message", [
    ([0.5, 1.5] + [0.5] * 6, "sigmoid", DataError,
     r"row 1, column 'chosen_probability': 1.5 is not a probability in \[0, 1\]"),
    (["high"] * 8, "sigmoid", DataError, r"row 0, column 'chosen_probability': 'high'"),
    ([0.7] * 8, "orpo", ValueError, r"\['orpo'\] cannot read soft labels"),
    ([0.7] * 8, "kto", DataError, r"soft labels .* rates single completions"),
])
def test_bad_soft_labels_fail_before_training(policy_dir, tok, tmp_path, column, loss, error,
                                              message):
    data = Dataset.from_dict({**PAIRS.to_dict(), "chosen_probability": column})
    args = PreferenceConfig(output_dir=str(tmp_path / "out"), loss_type=loss, **ARGS)
    with pytest.raises(error, match=message):
        PreferenceTrainer(str(policy_dir), args=args, train_dataset=data, processing_class=tok)
    assert not (tmp_path / "out").exists()
