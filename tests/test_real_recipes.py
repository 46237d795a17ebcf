"""The GPU recipes of recipes/qwen2.5-0.5b and recipes/llama3.1-8b on SmolLM2-135M-Instruct.

Each YAML runs as written (gradient checkpointing, all-linear LoRA targets, 4-bit base,
bf16, save_steps) with only the model, the data (TRL's conversational formats), one step,
short lengths and a CPU-sized batch overridden. Each asserts numbers a hand count gives.
"""

import json

import pytest
from conftest import run_recipe

from rlhf_ext.real import conversational_datasets, smollm2_path

# SmolLM2: 30 layers; LoRA r=16 on all-linear adds r * (in + out) per projection:
# q 576+576, k 576+192, v 576+192, o 576+576, gate 576+1536, up 576+1536, down 1536+576
LORA_ALL_LINEAR = 30 * 16 * (1152 + 768 + 768 + 1152 + 2112 + 2112 + 2112)
LINEAR_LAYERS = 30 * 7
SCORE_HEAD = 576 + 1  # one reward: weight and bias
BASE = 134_515_008  # SmolLM2's parameters (tied embeddings)


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    return str(smollm2_path()), conversational_datasets(tmp_path_factory.mktemp("data"), n=16)


def recipe(real, out, script, config, data, *extra):
    model, datasets = real
    run_recipe([f"recipes/{script}.py", "--config", config, "--model_name_or_path", model,
                "--dataset_name", str(datasets / data), "--output_dir", str(out),
                "--max_steps", "1", "--per_device_train_batch_size", "2",
                "--gradient_accumulation_steps", "1", *extra], launcher="python", timeout=600)
    return json.loads(next(out.glob("*_summary.json")).read_text())


def first(summary, key):
    return next(h[key] for h in summary["log_history"] if key in h)


def test_sft_lora_all_linear(real, tmp_path):
    summary = recipe(real, tmp_path, "sft", "recipes/qwen2.5-0.5b/sft_lora.yaml", "sft",
                     "--max_length", "64")
    assert summary["trainable_parameters"] == LORA_ALL_LINEAR == 4_884_480


@pytest.fixture(scope="module")
def reward_qlora(real, tmp_path_factory):
    out = tmp_path_factory.mktemp("reward_qlora")
    return out, recipe(real, out, "reward", "recipes/llama3.1-8b/reward_qlora.yaml", "pairs",
                       "--max_length", "64")


def test_reward_qlora(reward_qlora):
    out, summary = reward_qlora
    assert summary["quantized_linear_layers"] == LINEAR_LAYERS
    assert summary["trainable_parameters"] == LORA_ALL_LINEAR + SCORE_HEAD
    config = json.loads((out / "adapter_config.json").read_text())
    assert "score" in config["modules_to_save"]


def test_single_base_ppo_qlora(real, reward_qlora, tmp_path):
    """One 4-bit base, three adapters (policy, value, the reward model's)."""
    summary = recipe(real, tmp_path, "ppo", "recipes/llama3.1-8b/ppo_qlora.yaml", "prompts",
                     "--reward_model_path", str(reward_qlora[0]), "--response_length", "8",
                     "--rollout_batch_size", "4")
    assert summary["quantized_linear_layers"] == LINEAR_LAYERS
    assert summary["trainable_parameters"] == 2 * LORA_ALL_LINEAR + SCORE_HEAD  # policy, value
    assert first(summary, "objective/kl") == pytest.approx(0.0, abs=1e-4)  # policy == ref
    # rollout and update in the same precision (bf16 autocast): the first ratio is 1
    assert first(summary, "policy/approxkl_avg") == 0.0


def test_ppo_lora_with_a_reward_function(real, tmp_path):
    summary = recipe(real, tmp_path, "ppo", "recipes/qwen2.5-0.5b/ppo_lora.yaml", "prompts",
                     "--reward", "rlhf_ext.real:vader_reward", "--response_length", "8",
                     "--rollout_batch_size", "4")
    # LoRA policy; a full value model (SmolLM2 backbone + head)
    assert summary["trainable_parameters"] == LORA_ALL_LINEAR + BASE + SCORE_HEAD
    assert -1.0 <= first(summary, "objective/scores") <= 1.0  # VADER's compound range
    assert first(summary, "objective/kl") == pytest.approx(0.0, abs=1e-4)
    assert first(summary, "policy/approxkl_avg") == 0.0 and first(summary, "val/ratio") == 1.0


def test_kto_through_the_dpo_lora_recipe(real, tmp_path):
    """Model == reference at the first step and KTO's KL estimate clamps at 0, so every
    row's loss is 1 - sigmoid(0) = 0.5."""
    summary = recipe(real, tmp_path, "preference", "recipes/qwen2.5-0.5b/dpo_lora.yaml",
                     "unpaired", "--loss_type", "kto", "--max_length", "64")
    assert first(summary, "train_loss") == pytest.approx(0.5, abs=1e-6)
