"""A reduced demo end to end: the report's schema, the plots, and aligned policies beat SFT."""

import json
import math
import shutil

from conftest import run_recipe

METHODS = ["sft", "ppo", "dpo", "ipo", "kto", "orpo", "simpo"]
FIELDS = {"oracle_score": float, "win_rate_vs_sft": float, "kl_to_sft": float,
          "mean_length": float, "well_formed": float, "example": str}


def test_reduced_demo(tmp_path, world_dir, sft_run, reward_run):
    out = tmp_path / "demo"
    # The session's world, SFT and reward runs are the demo's first stages (same recipes,
    # same seed): the demo reuses a stage whose summary exists, so they are not run twice.
    shutil.copytree(world_dir, out / "world")
    shutil.copytree(sft_run[0], out / "sft")
    shutil.copytree(reward_run[0], out / "reward")
    args = ["demos/demo.py", "--out", str(out), "--quick", "--eval_prompts", "128"]
    run_recipe(args, launcher="python", timeout=900)
    report = json.loads((out / "report.json").read_text())
    assert report["schema_version"] == 1 and report["quick"] is True
    assert list(report["methods"]) == METHODS
    for name, metrics in report["methods"].items():
        for key, kind in FIELDS.items():
            assert isinstance(metrics[key], (kind, int) if kind is float else kind), (name, key)
    sft = report["methods"]["sft"]
    assert sft["kl_to_sft"] == 0.0 and sft["win_rate_vs_sft"] == 0.5
    for name in METHODS[1:]:
        assert report["methods"][name]["oracle_score"] > sft["oracle_score"], name
        assert report["methods"][name]["win_rate_vs_sft"] > 0.5, name
    assert 0 <= report["reward_model"]["eval_accuracy"] <= 1
    assert set(report["training"]) == set(METHODS[1:])
    assert len(report["training"]["ppo"]["kl"]) == len(report["training"]["ppo"]["step"]) > 0
    # PPO against the trained reward model: a stated KL bound (nats per sampled sequence,
    # as test_ppo.KL_BOUND) and finite curves for every method
    assert report["methods"]["ppo"]["kl_to_sft"] < 8.0
    # ... and during training too: no early spike of the rollouts' KL to the reference
    assert max(report["training"]["ppo"]["kl"]) < 8.0
    for curve in report["training"].values():
        assert all(math.isfinite(v) for v in curve["reward"] + curve.get("kl", []))
    for png in report["plots"]:
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    assert "| ppo |" in md and "frontier.png" in md
    assert set(report["stage_seconds"]) == {"sft", "reward", *METHODS[1:]}

    # a rerun reuses every finished stage
    run_recipe(args, launcher="python", timeout=300)
    again = json.loads((out / "report.json").read_text())
    assert all(s == 0.0 for s in again["stage_seconds"].values())
    assert again["methods"] == report["methods"]  # deterministic evaluation
