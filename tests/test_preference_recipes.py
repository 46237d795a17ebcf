"""The preference recipe end to end on the tiny world. (Every loss beating SFT through
this same recipe is also checked by the reduced demo in test_demo.py.)"""

import json

import pytest
from conftest import run_recipe
from peft import PeftModel
from transformers import AutoModelForCausalLM


def run_loss(config, world_dir, sft_dir, out, *extra):
    run_recipe(["recipes/preference.py", "--config", config,
                "--tiny_world_dir", str(world_dir), "--model_name_or_path", str(sft_dir),
                "--dataset_name", str(world_dir / "data" / "pairs"), "--output_dir", str(out),
                *extra])
    return json.loads((out / "preference_summary.json").read_text())


@pytest.mark.parametrize("config, extra", [
    ("recipes/tiny/dpo.yaml", []),
    ("recipes/tiny/kto.yaml", []),  # paired data unpaired on the fly
    ("recipes/tiny/dpo.yaml", ["--loss_type", "simpo"]),  # one flag swaps the loss
])
def test_each_loss_beats_sft(sft_run, world_dir, tmp_path, config, extra):
    sft_dir, sft = sft_run
    summary = run_loss(config, world_dir, sft_dir, tmp_path / "out", *extra)
    expected = extra[-1] if extra else config.split("/")[-1][:-5].replace("dpo", "sigmoid")
    assert summary["loss_type"] == [expected]
    assert summary["tiny/oracle_score"] > sft["tiny/oracle_score"] + 0.08, summary
    card = (tmp_path / "out" / "README.md").read_text()
    assert expected in card and str(sft_dir) in card
    assert (tmp_path / "out" / "tokenizer.json").exists()
    AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # the output reloads


def test_lora_recipe_saves_an_adapter(sft_run, world_dir, tmp_path):
    sft_dir, _ = sft_run
    out = tmp_path / "lora"
    run_loss("recipes/tiny/dpo.yaml", world_dir, sft_dir, out, "--use_peft", "--lora_r", "4",
             "--lora_target_modules", "q_proj", "v_proj", "--max_steps", "3",
             "--tiny_eval_prompts", "0")
    assert (out / "adapter_config.json").exists() and not (out / "model.safetensors").exists()
    base = AutoModelForCausalLM.from_pretrained(sft_dir)
    assert isinstance(PeftModel.from_pretrained(base, out), PeftModel)
    assert "library_name: peft" in (out / "README.md").read_text()
