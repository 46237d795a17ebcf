"""make demo-real, reduced (recipes/demo_real.py --quick --methods dpo): SmolLM2-135M-Instruct,
VADER as the judge, the pairs sampled and labelled, DPO trained 8 steps, judged on prompts
about films no stage trained on. (PPO on the real model: tests/test_real_recipes.py and
tests/test_real_model.py; the demo's PPO stages run the same recipe.)

Too short to move held-out VADER reliably on 2 cores (measured with 12 steps: DPO +0.11
at a KL of 7.6, PPO against VADER for two iterations -0.19 at a KL of 0.16, both within
the noise of 44 samples; on 2026-12-02, with 132 samples a policy and 264 of the reference
(s.e. about 0.035 and 0.027): DPO's 8 steps -0.10 at a KL of 3.2, PPO against VADER +0.02
after four iterations at lr 5e-4 and +0.08 after three at 1e-3, in runs of 10-11 minutes),
so what is asserted is the pipeline: the pairs and their labels,
the held-out split, the report's schema and its exact parts (the reference's KL 0 and win
rate 0.5, DPO's training margins), and that a rerun reuses every stage and evaluation.
"""

import json
import math

from conftest import run_recipe
from datasets import load_from_disk

from rlhf_ext.real_task import bradley_terry_prob, films

METRICS = {"vader", "vader_se", "win_rate_vs_reference", "kl_to_reference", "mean_length",
           "distinct_2", "repeated_word_rate", "scores", "completions"}


def test_reduced_real_demo(tmp_path):
    out = tmp_path / "demo_real"
    args = ["recipes/demo_real.py", "--out", str(out), "--quick", "--methods", "dpo"]
    run_recipe(args, launcher="python", timeout=900)
    report = json.loads((out / "report.json").read_text())
    assert report["schema_version"] == 1 and report["quick"] is True
    assert list(report["methods"]) == ["reference", "dpo"]
    assert report["reward_model"] is None  # neither PPO against it nor best-of-N asked
    assert set(report["stage_seconds"]) == {"dpo"}

    # the pairs: the reference's own reviews, chosen and rejected differing by >= 0.3 VADER;
    # the training labels are Bradley-Terry draws (some prefer the lower score), the
    # held-out ones VADER's order
    pairs = load_from_disk(str(out / "data" / "pairs"))
    train, test = pairs["train"], pairs["test"]
    assert all(abs(c - r) >= 0.3 for c, r in zip(train["chosen_vader"], train["rejected_vader"]))
    assert all(c > r for c, r in zip(test["chosen_vader"], test["rejected_vader"]))
    flipped = sum(c < r for c, r in zip(train["chosen_vader"], train["rejected_vader"]))
    expected = sum(1 - bradley_terry_prob(max(c, r), min(c, r), 5.0)
                   for c, r in zip(train["chosen_vader"], train["rejected_vader"]))
    assert abs(flipped - report["data"]["label_noise"] * len(train)) < 1e-9
    assert abs(flipped - expected) < 3 * math.sqrt(expected) + 1  # a binomial's spread
    assert not set(train["film"]) & set(test["film"])

    # held-out films: no training prompt (pairs, PPO prompts) names one, every eval prompt does
    seen = " ".join(row["prompt"][-1]["content"] for split in ("pairs", "prompts")
                    for part in load_from_disk(str(out / "data" / split)).values() for row in part)
    _, held_out = films(report["seed"])
    prompts = report["data"]["held_out_prompts"]
    assert len(prompts) == len(held_out) and all(film not in seen for film in held_out)
    assert all(any(film in p[-1]["content"] for film in held_out) for p in prompts)

    size = report["size"]
    for name, m in report["methods"].items():
        assert set(m) == METRICS, name
        assert len(m["scores"]) == len(m["completions"]) == size["eval_samples"] * len(prompts)
        assert all(-1 <= s <= 1 for s in m["scores"]) and 0 < m["distinct_2"] <= 1, name
        assert 0 <= m["win_rate_vs_reference"] <= 1 and m["mean_length"] > 0, name
    ref = report["methods"]["reference"]
    assert ref["kl_to_reference"] == 0.0 and ref["win_rate_vs_reference"] == 0.5
    assert report["methods"]["dpo"]["kl_to_reference"] > 0  # trained: it moved

    # DPO learned its pairs: the implicit reward margin (logged every 2 of 8 steps) grew
    dpo = report["training"]["dpo"]
    assert dpo["reward_key"] == "rewards/margins" and len(dpo["reward"]) == 4
    assert dpo["reward"][-1] > dpo["reward"][0] + 0.2, dpo["reward"]
    for png in report["plots"]:
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    assert "| dpo |" in md and "frontier.png" in md and "Where the time went" in md

    # a rerun reuses every finished stage and evaluation
    run_recipe(args, launcher="python", timeout=300)
    again = json.loads((out / "report.json").read_text())
    assert all(s == 0.0 for s in again["stage_seconds"].values())
    assert again["methods"] == report["methods"]


def test_eval_samples_must_be_positive(tmp_path):
    """Refused by the argument parser, before any folder is made or model loaded."""
    import subprocess
    import sys

    from conftest import ROOT

    proc = subprocess.run([sys.executable, str(ROOT / "recipes" / "demo_real.py"), "--out",
                           str(tmp_path / "d"), "--eval_samples", "0"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    assert "--eval_samples must be at least 1, got 0" in proc.stderr
    assert not (tmp_path / "d").exists()
