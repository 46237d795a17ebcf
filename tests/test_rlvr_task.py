"""The verifiable-reward task of the real world: its splits and reward functions by hand."""

import pytest

from rlhf_ext.worlds.smollm2.rlvr import (
    addition_problems,
    correctness_reward,
    final_number,
    format_reward,
    overlong_penalty,
)


def test_splits_share_no_problem_and_follow_the_seed():
    train, held = addition_problems(seed=3, held_out=96)
    assert len(held) == 96 and len(train) == 40 * 40 - 96
    questions = [r["prompt"][0]["content"] for r in train + held]
    assert len(set(questions)) == len(questions)  # every (a, b) once, in one split
    for row in held[:5] + train[:5]:
        a, b = map(int, row["prompt"][0]["content"][len("What is "):].split("?")[0].split(" + "))
        assert row["answer"] == str(a + b) and 10 <= a <= 49 and 10 <= b <= 49
    assert addition_problems(seed=3)[1] == held and addition_problems(seed=4)[1] != held
    with pytest.raises(ValueError, match="held_out"):
        addition_problems(held_out=1600)


def test_rewards_by_hand():
    replies = ["27 + 48 = 75", [{"role": "assistant", "content": "75"}], "It is 104.",
               "75\n\nThis is a classic", "no number"]
    assert [final_number(t) for t in ("27 + 48 = 75", "It is 104.", "75\n\nThis is a classic",
                                      "no number", "-3 apples")] == ["75", "104", "75", None, "-3"]
    assert correctness_reward(replies, answer=["75"] * 5) == [1.0, 1.0, 0.0, 1.0, 0.0]
    assert format_reward(replies) == [1.0, 1.0, 0.0, 0.0, 0.0]
    penalty = overlong_penalty(max_tokens=16, soft=4)
    assert penalty([[0] * n for n in (3, 12, 13, 14, 16, 20)]) == [0.0, 0.0, -0.25, -0.5,
                                                                   -1.0, -1.0]
