"""The verifiable-reward task of the real world: its splits and reward functions by hand."""

import json

import pytest
from conftest import ROOT, load_demo, run_recipe

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


def test_pass_at_k_by_hand():
    pass_at_k = load_demo("demo_real_rlvr").pass_at_k
    assert pass_at_k(8, 0, 4) == 0.0 and pass_at_k(8, 8, 1) == 1.0
    assert pass_at_k(8, 2, 1) == pytest.approx(2 / 8)
    # 1 - P(4 draws from the 6 wrong ones) = 1 - C(6,4)/C(8,4) = 1 - 15/70
    assert pass_at_k(8, 2, 4) == pytest.approx(1 - 15 / 70)


@pytest.mark.slow
def test_grpo_lifts_held_out_accuracy(tmp_path, monkeypatch):
    """The reduced rlvr stage of make demo-real (demos/demo_real.py --quick --methods
    rlvr_grpo): recipes/smollm2/rlvr.yaml, the whole of SmolLM2-135M-Instruct trained by
    GRPO for 4 iterations of 8 prompts x 8 samples at lr 3e-5, judged greedily on the 96
    held-out problems before and after (0.344 at the start).

    How far a few iterations get depends on the samples drawn. Measured 2026-12-07 (one
    thread): after 4 iterations, seeds 0-3, +0.135, +0.29, +0.25, +0.32 (seed 0 is the
    test's: 0.344 -> 0.479); after 2 iterations the lift ranged from -0.30 to +0.33 over
    eight sample streams (the test ran 2 iterations until the sampler's random streams
    became per row, and its one stream had happened to give +0.28). Each accuracy's
    standard error is about 0.05. About 105 s."""
    import torch
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    from rlhf_ext.models import load_causal_lm
    from rlhf_ext.worlds.smollm2 import smollm2_path

    monkeypatch.syspath_prepend(str(ROOT / "demos"))  # demo_real imports its neighbours
    rlvr = load_demo("demo_real_rlvr")
    demo_real = load_demo("demo_real")
    rlvr.make_problems(tmp_path, seed=0)
    rows = json.loads((tmp_path / "data" / "rlvr_held_out.json").read_text())
    assert len(rows) == rlvr.SIZES["quick"]["held_out"] == 96
    asked = {r["prompt"][0]["content"] for r in load_from_disk(str(tmp_path / "data" / "rlvr"))
             ["train"]}
    assert len(asked) == 1600 - 96 and not asked & {r["prompt"][0]["content"] for r in rows}
    path = str(smollm2_path())
    run_recipe(["recipes/ppo.py", "--config", "recipes/smollm2/rlvr.yaml",
                "--model_name_or_path", path, "--dataset_name", str(tmp_path / "data" / "rlvr"),
                "--output_dir", str(tmp_path / "rlvr_grpo"), "--disable_tqdm", "true",
                *demo_real.SIZES["quick"]["rlvr"]], launcher="python", timeout=900)
    summary = json.loads((tmp_path / "rlvr_grpo" / "ppo_summary.json").read_text())
    logs = [h for h in summary["log_history"] if "rewards/correctness_reward/mean" in h]
    assert [h["step"] for h in logs] == [1, 2, 3, 4]  # one optimizer step per rollout
    for h in logs:  # the weighted sum of the three reward functions
        parts = [h[f"rewards/{f}/mean"] for f in ("correctness_reward", "format_reward",
                                                  "overlong_penalty")]
        assert h["reward"] == pytest.approx(parts[0] + 0.5 * parts[1] + 0.5 * parts[2],
                                            abs=1e-5)

    tok = AutoTokenizer.from_pretrained(path)
    reference = load_causal_lm(path, dtype=torch.float32).eval()
    trained = load_causal_lm(str(tmp_path / "rlvr_grpo"), dtype=torch.float32).eval()
    greedy = {"samples": 0, "pass_at": [], "kl_samples": 0}
    before = rlvr.evaluate(reference, None, tok, rows, greedy, seed=0)
    after = rlvr.evaluate(trained, reference, tok, rows, greedy, seed=0)
    print(f"greedy {before['greedy']:.3f} -> {after['greedy']:.3f}")
    assert 0.1 < before["greedy"] < 0.6  # well inside (0, 1) at the start
    # a lift beyond one standard error (0.05): seed 0 measured 0.135 here, and the other
    # CPU kind computes other sums, hence other samples, so the bound sits under the
    # lowest lift of the seeds measured, not at it (the 10 points is the full
    # stage's goal: 0.34 -> 0.82 in docs/rlvr.md)
    assert after["greedy"] >= before["greedy"] + 0.05, (before, after)
    assert after["format"] > before["format"]  # more replies of one line ending in a number


def test_the_ppo_recipe_reads_several_reward_functions():
    """--reward a:f,b:g -> the list, in order (the recipe sums them with reward_weights); a
    part that is not 'module:function' is refused with the part named."""
    from rlhf_ext.recipes.ppo import reward_functions as functions

    spec = ("rlhf_ext.worlds.smollm2.rlvr:correctness_reward, "
            "rlhf_ext.worlds.smollm2.rlvr:format_reward")
    assert functions(spec) == [correctness_reward, format_reward]
    assert functions("rlhf_ext.worlds.smollm2.rlvr:format_reward") is format_reward
    with pytest.raises(ValueError, match="got 'format_reward'"):
        functions("rlhf_ext.worlds.smollm2.rlvr:correctness_reward,format_reward")
