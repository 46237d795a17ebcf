"""The tiny world's task: the oracle by hand, determinism, Bradley-Terry labelling."""

import random

import pytest

from rlhf_ext.worlds.tiny import (
    is_well_formed,
    label_pairs,
    oracle_score,
    preference_pairs,
    prompt_dataset,
    sft_dataset,
    to_conversational,
    unpaired_dataset,
)
from rlhf_ext.worlds.tiny.corpus import BT_SCALE, bradley_terry_prefers_first


@pytest.mark.parametrize("text, expected", [
    (" the plot was brilliant .", (1 + 1.0) / 2),
    (" the plot was brilliant . the acting was awful .", 0.5),
    (" the plot was very good .", (1 + 0.75) / 2),        # very: 1.5 * 0.5
    (" the plot was very superb .", 1.0),                 # very: clipped at 1
    (" the plot was not superb .", (1 - 0.5) / 2),        # not: -0.5 * 1
    (" the plot was not boring .", (1 + 0.5) / 2),        # not: -0.5 * -1
    (" i hated the music . four stars . the ending was long .", (1 + (-1 + 0.5 + 0) / 3) / 2),
    (" one star .", 0.0),
    ("", 0.5),
    (" nothing here matters .", 0.5),
])
def test_oracle_by_hand(text, expected):
    assert oracle_score(text) == pytest.approx(expected)


@pytest.mark.parametrize("text, ok", [
    (" the plot was brilliant .", True),
    (" i loved the cast . five stars .", True),
    (" one star .", True),
    (" the plot was brilliant", False),          # unfinished sentence
    (" the plot was purple .", False),           # not a lexicon word
    (" the plot brilliant .", False),
    ("", False),
    (" the plot was brilliant . .", True),       # empty pieces are dropped
])
def test_well_formed(text, ok):
    assert is_well_formed(text) is ok


def test_corpus_is_grammatical_and_balanced():
    data = sft_dataset(2000, seed=3)
    assert all(is_well_formed(c) for c in data["completion"])
    mean = sum(oracle_score(c) for c in data["completion"]) / len(data)
    assert 0.45 < mean < 0.55


def test_same_seed_same_data_other_seed_other_data():
    assert sft_dataset(50, seed=1).to_dict() == sft_dataset(50, seed=1).to_dict()
    assert sft_dataset(50, seed=1).to_dict() != sft_dataset(50, seed=2).to_dict()
    assert preference_pairs(50, seed=1).to_dict() == preference_pairs(50, seed=1).to_dict()
    assert unpaired_dataset(50, seed=1).to_dict() == unpaired_dataset(50, seed=1).to_dict()
    rl, ev = prompt_dataset(100, split="rl")["prompt"], prompt_dataset(100, split="eval")["prompt"]
    assert rl != ev


def test_bradley_terry_probability():
    # P(first) = sigmoid(20 * 0.05) = sigmoid(1) = 0.7311 for a gap of 0.05
    assert BT_SCALE == 20.0
    rng = random.Random(0)
    n = 20000
    hits = sum(bradley_terry_prefers_first(0.55, 0.5, rng) for _ in range(n))
    assert hits / n == pytest.approx(0.7311, abs=0.01)


def test_bradley_terry_large_gap_picks_higher():
    data = preference_pairs(3000, seed=5)
    large = [(oracle_score(c), oracle_score(r)) for c, r in zip(data["chosen"], data["rejected"])
             if abs(oracle_score(c) - oracle_score(r)) >= 0.4]
    assert len(large) > 300
    assert sum(c > r for c, r in large) / len(large) >= 0.9


def test_label_pairs_drops_identical_and_keeps_order():
    data = label_pairs(["p", "q"], [" one star .", " five stars ."], [" one star .", " two stars ."])
    assert data["prompt"] == ["q"]  # the identical pair carries no preference


def test_unpaired_labels_follow_score():
    data = unpaired_dataset(4000, seed=0)
    pos = [oracle_score(c) for c, lab in zip(data["completion"], data["label"]) if lab]
    neg = [oracle_score(c) for c, lab in zip(data["completion"], data["label"]) if not lab]
    assert all(isinstance(lab, bool) for lab in data["label"])
    assert sum(pos) / len(pos) > 0.65 and sum(neg) / len(neg) < 0.35


def test_conversational_variant():
    data = to_conversational(preference_pairs(3, seed=0))
    row = data[0]
    assert row["prompt"][0]["role"] == "user"
    assert row["chosen"][0]["role"] == "assistant"
    assert not row["chosen"][0]["content"].startswith(" ")
