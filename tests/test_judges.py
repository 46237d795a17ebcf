"""RLAIF judges: soft labels by hand (logits set on a tiny model, and against a plain
forward), order averaging, position bias, and labelling with resume."""

import json
import math

import pytest
import torch
from torch import nn

from rlhf_ext.judges import (
    FunctionJudge,
    LMJudge,
    RewardModelJudge,
    average_orders,
    comparisons,
    label_samples,
    option_probability,
    position_bias,
)
from rlhf_ext.worlds.tiny import build_model

OPTIONS = ("A", "B")  # one token each in the tiny tokenizer
PROMPTS = ["the film was", "i think the plot", "the actors"]
FIRST = ["good and warm .", "a dull mess that never ends at all .", "fine ."]
SECOND = ["bad .", "great fun .", "a bright , lovely , moving story ."]


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def test_option_probability_and_orders_by_hand():
    logits = torch.tensor([[2.0, 0.0, 9.0], [-1.0, 0.5, 3.0]])
    p = option_probability(logits, (0, 1))  # the third token's logit plays no part
    assert p.tolist() == pytest.approx([sigmoid(2.0), sigmoid(-1.5)])
    assert option_probability(logits, (1, 0)).tolist() == pytest.approx(
        [sigmoid(-2.0), sigmoid(1.5)])
    p_ab, p_ba = torch.tensor([0.9, 0.6, 0.3]), torch.tensor([0.2, 0.7, 0.6])
    assert average_orders(p_ab, p_ba).tolist() == pytest.approx([0.85, 0.45, 0.35])
    bias = position_bias(p_ab, p_ba)
    # pair 0: a wins both ways; pair 1: the first shown wins both ways; pair 2: b both ways
    assert bias["order_agreement"] == pytest.approx(2 / 3)
    assert bias["first_position_rate"] == pytest.approx(4 / 6)
    assert bias["mean_first_probability"] == pytest.approx(sum([0.9, 0.6, 0.3, 0.2, 0.7,
                                                                0.6]) / 6)


@pytest.fixture(scope="module")
def tiny_lm(tok):
    return build_model("tiny", tok, seed=0).eval()


def test_set_logits_pure_position_bias_cancels(tok, tiny_lm):
    """An LM head whose logits are set (zero weights, a bias): the judge prefers whatever is
    shown first with P = sigma(2.0 - 0.5); averaging both orders gives exactly 0.5."""
    import copy

    model = copy.deepcopy(tiny_lm)
    head = nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    a, b = (tok(o, add_special_tokens=False)["input_ids"][0] for o in OPTIONS)
    with torch.no_grad():
        head.bias[a], head.bias[b] = 2.0, 0.5
    model.set_output_embeddings(head)
    judge = LMJudge(model, tok, options=OPTIONS, batch_size=2)
    verdict = judge.judgement(PROMPTS, FIRST, SECOND)
    assert verdict.forward.tolist() == pytest.approx([sigmoid(1.5)] * 3, abs=1e-6)
    assert verdict.backward.tolist() == pytest.approx([sigmoid(1.5)] * 3, abs=1e-6)
    assert verdict.probabilities.tolist() == pytest.approx([0.5] * 3, abs=1e-6)
    assert position_bias(verdict.forward, verdict.backward) == pytest.approx(
        {"order_agreement": 0.0, "first_position_rate": 1.0,
         "mean_first_probability": sigmoid(1.5)})
    one_order = LMJudge(model, tok, options=OPTIONS, both_orders=False)
    assert one_order.judge(PROMPTS, FIRST, SECOND) == pytest.approx([sigmoid(1.5)] * 3)


def test_lm_judge_equals_a_plain_forward(tok, tiny_lm):
    """Batched, right-padded judging with sampled principles = one unpadded forward per
    rendered comparison, softmax over the two option tokens, both orders averaged."""
    import random

    principles = ["Which review is kinder?", "Which review is more positive?"]
    judge = LMJudge(tiny_lm, tok, options=OPTIONS, principles=principles, batch_size=2,
                    seed=3)
    got = judge.judgement(PROMPTS, FIRST, SECOND)
    rng = random.Random(3)
    drawn = [rng.choice(principles) for _ in PROMPTS]
    ids = [tok(o, add_special_tokens=False)["input_ids"][0] for o in OPTIONS]

    def first_wins(prompt, x, y, principle):
        text = judge.render(prompt, x, y, principle)
        assert principle in text and text.endswith("Preferred response:")
        assert text.index(x) < text.index(y)
        with torch.no_grad():
            logits = tiny_lm(torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
                             ).logits[0, -1]
        za, zb = logits[ids[0]].item(), logits[ids[1]].item()
        return math.exp(za) / (math.exp(za) + math.exp(zb))

    fwd = [first_wins(*row) for row in zip(PROMPTS, FIRST, SECOND, drawn)]
    bwd = [first_wins(*row) for row in zip(PROMPTS, SECOND, FIRST, drawn)]
    assert got.forward.tolist() == pytest.approx(fwd, abs=1e-5)
    assert got.backward.tolist() == pytest.approx(bwd, abs=1e-5)
    assert got.probabilities.tolist() == pytest.approx(
        [(f + 1 - b) / 2 for f, b in zip(fwd, bwd)], abs=1e-5)
    assert got.agreement.tolist() == [(f > 0.5) == (b < 0.5) for f, b in zip(fwd, bwd)]
    rows = label_samples(judge, PROMPTS, [[x, y] for x, y in zip(FIRST, SECOND)],
                         progress=False)
    for row, f, b, x in zip(rows, fwd, bwd, FIRST):
        a_won = row["chosen"] == x
        assert row["chosen_probability_shown_first"] == pytest.approx(f if a_won else b, abs=1e-5)
        assert row["chosen_probability_shown_second"] == pytest.approx(
            1 - b if a_won else 1 - f, abs=1e-5)
        assert row["chosen_probability"] == pytest.approx(
            (row["chosen_probability_shown_first"] + row["chosen_probability_shown_second"]) / 2,
            abs=1e-6)


def test_judge_refuses_bad_setup(tok, tiny_lm):
    with pytest.raises(ValueError, match="one token each"):
        LMJudge(tiny_lm, tok, options=(" first", " second"))
    with pytest.raises(ValueError, match=r"no \{response_b\} field"):
        LMJudge(tiny_lm, tok, template="{principle} {prompt} {response_a}", options=OPTIONS)
    with pytest.raises(ValueError, match="as many prompts"):
        FunctionJudge(lambda p, c: [0.0] * len(c)).judge(["x"], ["a", "b"], ["c"])


def test_function_and_reward_model_judges(tok, policy_dir):
    from rlhf_ext.heads import RewardModel
    from rlhf_ext.reward import score

    judge = FunctionJudge(lambda prompts, texts: [float(len(t)) for t in texts], scale=0.5)
    assert judge(["p", "q"], ["abcd", "a"], ["ab", "abc"]) == pytest.approx(
        [sigmoid(0.5 * 2), sigmoid(0.5 * -2)])
    rm = RewardModel.from_backbone(str(policy_dir), seed=3).eval()
    rewards = score(rm, tok, PROMPTS * 2, FIRST + SECOND)
    got = RewardModelJudge(rm, tok).judge(PROMPTS, FIRST, SECOND)
    assert got == pytest.approx([sigmoid(rewards[i] - rewards[i + 3]) for i in range(3)],
                                abs=1e-5)


class Counting(FunctionJudge):
    """Length judge that counts its calls and can fail on the n-th (a killed run)."""

    def __init__(self, fail_at=None):
        super().__init__(lambda prompts, texts: [float(len(t)) for t in texts], scale=0.25)
        self.calls, self.fail_at = 0, fail_at

    def judgement(self, *args):
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt
        return super().judgement(*args)


def test_label_samples_soft_labels_and_resume(tmp_path):
    prompts = ["p0", "p1"]
    samples = [["aaaa", "a", "aa"], ["bb", "bbbbbb", "b"]]
    assert comparisons(samples, "all") == [(0, 0, 1), (0, 0, 2), (0, 1, 2),
                                           (1, 0, 1), (1, 0, 2), (1, 1, 2)]
    assert comparisons(samples, "disjoint") == [(0, 0, 1), (1, 0, 1)]
    full = label_samples(Counting(), prompts, samples, batch_size=2, progress=False)
    assert len(full) == 6
    first = full[0]  # "aaaa" vs "a": the longer wins, P = sigma(0.25 * 3)
    assert (first["prompt"], first["chosen"], first["rejected"]) == ("p0", "aaaa", "a")
    assert first["chosen_probability"] == pytest.approx(sigmoid(0.75))
    assert first["confidence"] == pytest.approx(2 * sigmoid(0.75) - 1)
    assert (full[3]["chosen"], full[3]["rejected"]) == ("bbbbbb", "bb")
    assert full[3]["chosen_probability"] == pytest.approx(sigmoid(0.25 * 4))
    chat = label_samples(Counting(), [[{"role": "user", "content": "p1"}]], samples[1:],
                         progress=False)  # a conversational prompt: replies as assistant turns
    assert chat[0]["chosen"] == [{"role": "assistant", "content": "bbbbbb"}]
    assert min(full["chosen_probability"]) >= 0.5 and all(full["order_agreement"])

    path = tmp_path / "labels.jsonl"
    with pytest.raises(KeyboardInterrupt):
        label_samples(Counting(fail_at=2), prompts, samples, batch_size=2, path=path,
                      progress=False)
    assert len(path.read_text().splitlines()) == 2  # the first batch survived
    judge = Counting()
    resumed = label_samples(judge, prompts, samples, batch_size=2, path=path, progress=False)
    assert judge.calls == 2  # only the two missing batches were judged
    assert resumed.to_list() == full.to_list()
    assert [json.loads(line)["chosen"] for line in path.read_text().splitlines()] == \
        full["chosen"]
