"""The preference recipe end to end on the tiny world: the loss is one flag, the output
reloads, the card names the loss. (Every loss beating SFT through this same recipe is
checked by the reduced demo in test_demo.py.)"""

import json
import math

import pytest
from conftest import run_recipe
from transformers import AutoModelForCausalLM


def run_loss(config, world_dir, sft_dir, out, *extra):
    # the clone's recipes/preference.py, or the installed command with a packaged config
    # name (tiny/dpo.yaml is no file in the folder it runs from)
    launch = ["-m", "rlhf_ext.cli", "dpo"] if not config.startswith("recipes/") \
        else ["recipes/preference.py"]
    run_recipe([*launch, "--config", config,
                "--tiny_world_dir", str(world_dir), "--model_name_or_path", str(sft_dir),
                "--dataset_name", str(world_dir / "data" / "pairs"), "--output_dir", str(out),
                *extra], launcher="python")
    return json.loads((out / "preference_summary.json").read_text())


@pytest.mark.parametrize("config, extra", [
    ("recipes/tiny/kto.yaml", []),  # paired data unpaired on the fly
    ("tiny/dpo.yaml", ["--loss_type", "simpo"]),  # one flag swaps the loss; rlhf-ext dpo
])
def test_each_recipe_trains_its_loss(sft_run, world_dir, tmp_path, config, extra):
    sft_dir, sft = sft_run
    summary = run_loss(config, world_dir, sft_dir, tmp_path / "out", *extra,
                       "--max_steps", "4", "--logging_steps", "1", "--tiny_eval_prompts", "0")
    expected = extra[-1] if extra else config.split("/")[-1][:-5].replace("dpo", "sigmoid")
    assert summary["loss_type"] == [expected]
    first = summary["log_history"][0]
    if expected == "simpo":  # reference-free: the first step already sees a margin
        assert first["rewards/margins"] != 0 and first["loss"] != pytest.approx(math.log(2))
    else:  # policy == reference at step 1: sigmoid gives log 2, kto 1 - sigmoid(0)
        assert first["rewards/margins"] == 0
        assert first["loss"] == pytest.approx({"sigmoid": math.log(2), "kto": 0.5}[expected])
    card = (tmp_path / "out" / "README.md").read_text()
    assert expected in card and str(sft_dir) in card
    assert (tmp_path / "out" / "tokenizer.json").exists()
    AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # the output reloads


def test_resume_true_skips_a_checkpoint_cut_short(sft_run, world_dir, tmp_path):
    """A kill during the second save leaves checkpoint-2 without trainer_state.json:
    `--resume_from_checkpoint true` takes checkpoint-1, the newest complete one."""
    sft_dir, _ = sft_run
    out = tmp_path / "out"
    common = ("--max_steps", "2", "--save_strategy", "steps", "--save_steps", "1",
              "--logging_steps", "1",
              "--tiny_eval_prompts", "0")
    run_loss("recipes/tiny/dpo.yaml", world_dir, sft_dir, out, *common)
    (out / "checkpoint-2" / "trainer_state.json").unlink()
    state_file = out / "checkpoint-1" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["log_history"].append({"step": 1, "resumed_from": "checkpoint-1"})  # a marker
    state_file.write_text(json.dumps(state))
    proc = run_recipe(["recipes/preference.py", "--config", "recipes/tiny/dpo.yaml",
                       "--tiny_world_dir", str(world_dir), "--model_name_or_path", str(sft_dir),
                       "--dataset_name", str(world_dir / "data" / "pairs"),
                       "--output_dir", str(out), *common, "--resume_from_checkpoint", "true"],
                      launcher="python")
    assert "skipping incomplete checkpoint" in proc.stderr and "checkpoint-2" in proc.stderr
    history = json.loads((out / "preference_summary.json").read_text())["log_history"]
    assert {"step": 1, "resumed_from": "checkpoint-1"} in history
    assert [h["step"] for h in history if "loss" in h] == [1, 2]  # step 2 trained again
