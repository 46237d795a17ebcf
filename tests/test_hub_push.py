"""Pushing to the Hub, against a local server on 127.0.0.1 speaking the Hub API, with the
real huggingface_hub client: adapters (not base weights) and model cards, loaded back."""

import contextlib
import io
import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT
from hub_server import LocalHub

TOKEN = "hf_rlhfExtTestToken0123456789"


def hub_env(hub):
    """The client's environment: this test's server, and a download cache of its own (the
    machine's ~/.cache/huggingface must neither serve nor keep these files)."""
    return {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_TOKEN": TOKEN, "HF_HUB_OFFLINE": "0",
            "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_ETAG_TIMEOUT": "5",
            "HF_HUB_CACHE": str(hub.state.root.parent / "hf_cache")}


def run(cmd, env):
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode != 0:
        pytest.fail(proc.stdout[-3000:] + proc.stderr[-5000:])
    return proc.stdout + proc.stderr


# Load an adapter (a Hub id or a directory) on its base; print one number from it.
PROBE = """
import torch, rlhf_ext
from peft import PeftModel
kind, base, adapter = ARGS
if kind == "reward":
    from rlhf_ext.reward import load_reward_model
    model = PeftModel.from_pretrained(load_reward_model(base, new_head=True), adapter).eval()
    value = model(torch.tensor([[3, 4, 5, 6]])).rewards.sum()
else:
    from transformers import AutoModelForCausalLM
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
    value = model(torch.tensor([[3, 4, 5, 6]])).logits.float().std()
print("PROBE", type(model).__name__, f"{value.item():.5f}")
"""


def probe_here(kind, base, adapter) -> str:
    """PROBE's line, computed in this process."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(PROBE, {"ARGS": (kind, str(base), str(adapter))})
    line = printed.getvalue().strip()
    assert line.startswith("PROBE") and "PeftModel" in line, line
    return line


def recipe_cases(world_dir, sft_dir):
    data = world_dir / "data"
    return {
        "sft": ("recipes/sft.py", "recipes/tiny/sft.yaml", world_dir / "base", data / "sft",
                "sft_summary.json", ["sft"]),
        "reward": ("recipes/reward.py", "recipes/tiny/reward.yaml", sft_dir, data / "pairs",
                   "reward_summary.json", ["reward-model", "center_rewards_coefficient"]),
        # QLoRA: load_in_4bit and LoRA straight from the recipe's flags
        "dpo-qlora": ("recipes/preference.py", "recipes/tiny/dpo.yaml", sft_dir, data / "pairs",
                      "preference_summary.json", ["preference", "sigmoid", "beta"]),
    }


@pytest.mark.parametrize("name", ["sft", "reward", "dpo-qlora"])
def test_recipe_pushes_adapter_and_card(name, sft_run, world_dir, tmp_path):
    recipe, config, base, data, summary_file, needles = recipe_cases(world_dir, sft_run[0])[name]
    out, repo_id = tmp_path / name, f"tester/tiny-{name}"
    extra = ["--load_in_4bit", "true"] if name == "dpo-qlora" else []
    with LocalHub(tmp_path / "hub") as hub:
        env = hub_env(hub)
        logs = run([sys.executable, recipe, "--config", config, "--tiny_world_dir",
                    str(world_dir), "--model_name_or_path", str(base), "--dataset_name",
                    str(data), "--output_dir", str(out), "--eval_strategy", "no",
                    "--use_peft", "true", "--lora_r", "4", "--lora_target_modules", "q_proj",
                    "v_proj", "--max_steps", "3", "--logging_steps", "1",
                    "--tiny_eval_prompts", "0", "--push_to_hub", "true",
                    "--hub_model_id", repo_id, *extra], env)
        summary = json.loads((out / summary_file).read_text())
        assert summary["trainable_parameters"] < summary["parameters"] / 5
        assert summary["quantized_linear_layers"] == (14 if extra else 0)  # 2 layers x 7
        repo = tmp_path / "hub" / repo_id
        pushed = {p.name for p in repo.rglob("*") if p.is_file()}
        assert {"adapter_model.safetensors", "adapter_config.json", "README.md"} <= pushed
        assert "model.safetensors" not in pushed  # the adapter, not the base weights
        card = (repo / "README.md").read_text()
        for needle in ("rlhf-ext", "library_name: peft", "learning_rate", "train_loss",
                       str(base), str(data), *needles):
            assert needle in card, needle
        # download through the real client, load on the base, and get the local numbers
        kind = "reward" if name == "reward" else "lm"
        remote = run([sys.executable, "-c", "import sys; ARGS = sys.argv[1:4]\n" + PROBE,
                      kind, str(base), repo_id], env)
        assert probe_here(kind, base, out) in remote
        # the token travels only in the Authorization header
        auth = [h.get("authorization") or h.get("Authorization") for _, _, h in hub.state.requests]
        assert f"Bearer {TOKEN}" in auth
    assert TOKEN not in logs
    for path in list(out.rglob("*")) + list((tmp_path / "hub").rglob("*")):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path


def test_reward_model_push_and_plain_transformers_load(world_dir, tmp_path):
    """A scalar RewardModel pushed to the Hub is a plain LlamaForSequenceClassification
    there: a process that never imports rlhf_ext loads it and gets the same reward."""
    import torch
    from transformers import AutoTokenizer

    from rlhf_ext.heads import RewardModel
    from rlhf_ext.worlds.tiny import build_model

    tok = AutoTokenizer.from_pretrained(world_dir / "base")
    build_model("tiny", tok, seed=0).save_pretrained(tmp_path / "lm")
    with LocalHub(tmp_path / "hub") as hub:
        env = hub_env(hub)
        run([sys.executable, "-c", (
            "from rlhf_ext.heads import RewardModel; "
            f"RewardModel.from_backbone({str(tmp_path / 'lm')!r}, seed=2)"
            ".push_to_hub('tester/tiny-rm')")], env)
        out = run([sys.executable, "-c", (
            "import sys, torch; from transformers import AutoModelForSequenceClassification; "
            "m = AutoModelForSequenceClassification.from_pretrained('tester/tiny-rm'); "
            "assert 'rlhf_ext' not in sys.modules; "
            "print('REWARD', type(m).__name__, round(m(torch.tensor([[3, 4, 5]])).logits.item(), 5))")],
            env)
    local = RewardModel.from_backbone(str(tmp_path / "lm"), seed=2).eval()
    with torch.no_grad():
        expected = round(local(torch.tensor([[3, 4, 5]])).rewards.item(), 5)
    assert f"REWARD LlamaForSequenceClassification {expected}" in out


def test_ppo_recipe_pushes_policy_value_and_card(sft_run, world_dir, tmp_path):
    sft_dir, _ = sft_run
    out = tmp_path / "ppo"
    with LocalHub(tmp_path / "hub") as hub:
        logs = run([sys.executable, "recipes/ppo.py", "--config", "recipes/tiny/ppo_oracle.yaml",
                    "--tiny_world_dir", str(world_dir), "--model_name_or_path", str(sft_dir),
                    "--dataset_name", str(world_dir / "data" / "prompts_rl"),
                    "--output_dir", str(out), "--num_train_epochs", "1",
                    "--rollout_batch_size", "16", "--tiny_eval_prompts", "0",
                    "--push_to_hub", "true", "--hub_model_id", "tester/tiny-ppo"], hub_env(hub))
        repo = tmp_path / "hub" / "tester" / "tiny-ppo"
        pushed = {str(p.relative_to(repo)) for p in repo.rglob("*") if p.is_file()}
        assert {"model.safetensors", "value_model/model.safetensors", "README.md",
                "ppo_state.json"} <= pushed
        card = (repo / "README.md").read_text()
        assert "ppo" in card and "kl_coef" in card and "rlhf-ext" in card
    assert TOKEN not in logs
    for path in list(out.rglob("*")) + list((tmp_path / "hub").rglob("*")):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path


ONLINE_DPO = """
import sys
from peft import LoraConfig
from rlhf_ext import FunctionJudge, OnlineDPOConfig, OnlineDPOTrainer
from rlhf_ext.worlds.tiny import oracle_score, prompt_dataset
model, out = sys.argv[1:3]
args = OnlineDPOConfig(output_dir=out, num_rounds=2, num_generations=2, max_new_tokens=8,
                       max_steps=1, per_device_train_batch_size=4, report_to="none",
                       use_cpu=True, save_strategy="no", hub_model_id="tester/tiny-online")
judge = FunctionJudge(lambda prompts, texts: [oracle_score(t) for t in texts], scale=4.0)
trainer = OnlineDPOTrainer(model, judge, args, train_dataset=prompt_dataset(4),
                           peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
trainer.train()
trainer.push_to_hub()
"""


def test_online_dpo_pushes_final_adapter_labels_and_card(sft_run, tmp_path):
    out = tmp_path / "online"
    with LocalHub(tmp_path / "hub") as hub:
        run([sys.executable, "-c", ONLINE_DPO, str(sft_run[0]), str(out)], hub_env(hub))
        repo = tmp_path / "hub" / "tester" / "tiny-online"
        pushed = {str(p.relative_to(repo)) for p in repo.rglob("*") if p.is_file()}
        assert {"adapter_model.safetensors", "adapter_config.json", "README.md", "labels.jsonl",
                "samples.json"} <= pushed
        assert "model.safetensors" not in pushed
        # the last round's adapter, the same as the one saved in output_dir itself
        assert (repo / "adapter_model.safetensors").read_bytes() == \
            (out / "round-1" / "adapter_model.safetensors").read_bytes() == \
            (out / "adapter_model.safetensors").read_bytes()
        card = (repo / "README.md").read_text()
        assert "rlhf-ext" in card and "sigmoid" in card
