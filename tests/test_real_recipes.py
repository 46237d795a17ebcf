"""The GPU recipes of recipes/qwen2.5-0.5b and recipes/llama3.1-8b on SmolLM2-135M-Instruct.

Each YAML runs as written (gradient checkpointing, all-linear LoRA targets, 4-bit base,
save_steps) with only the model, the data (TRL's conversational formats), one step,
short lengths and a CPU-sized batch overridden. Each asserts numbers a hand count gives.
They run in float32 (`--bf16 false --dtype float32`, which for the QLoRA recipes makes the
4-bit compute float32): CPUs of our kind without bf16 units (AVX2 only) run bf16 2.5 to
6.5x slower (the DPO QLoRA test: 136 s in bf16, the single-base PPO one 117 s, nearly all
of it bitsandbytes' bf16 matmuls). What bf16 changes in these recipes (policy and
reference, rollout and update, under the same autocast: DPO's first loss log 2, PPO's
first ratio 1) is checked with the YAMLs' bf16 as written on the tiny world by
`scripts/gpu_smoke.sh --cpu` (tests/test_gpu_smoke.py), and on SmolLM2 on a GPU by the
same script.
"""

import json
import math

import pytest
import torch
from conftest import CPU_EXACT, run_recipe

from rlhf_ext.worlds.smollm2 import conversational_datasets, smollm2_path

# SmolLM2: 30 layers; LoRA r=16 on all-linear adds r * (in + out) per projection:
# q 576+576, k 576+192, v 576+192, o 576+576, gate 576+1536, up 576+1536, down 1536+576
LORA_ALL_LINEAR = 30 * 16 * (1152 + 768 + 768 + 1152 + 2112 + 2112 + 2112)
LINEAR_LAYERS = 30 * 7
REWARD_HEAD = 576  # one reward: a weight, no bias (transformers' classifier has none)
VALUE_HEAD = 576 + 1  # the value head: weight and bias
BASE = 134_515_008  # SmolLM2's parameters (tied embeddings)


@pytest.fixture(scope="session")  # not module: a worker runs other files' tests in between
def real(tmp_path_factory):
    return str(smollm2_path()), conversational_datasets(tmp_path_factory.mktemp("data"), n=16)


def recipe(real, out, script, config, data, *extra, env=None):
    model, datasets = real
    extra = (*extra, "--bf16", "false", "--dtype", "float32")
    run_recipe([f"recipes/{script}.py", "--config", config, "--model_name_or_path", model,
                "--dataset_name", str(datasets / data), "--output_dir", str(out),
                "--max_steps", "1", "--per_device_train_batch_size", "2",
                "--gradient_accumulation_steps", "1", *extra], launcher="python", timeout=600,
               env=env)
    return json.loads(next(out.glob("*_summary.json")).read_text())


def first(summary, key):
    return next(h[key] for h in summary["log_history"] if key in h)


def test_sft_lora_all_linear(real, tmp_path):
    summary = recipe(real, tmp_path, "sft", "recipes/qwen2.5-0.5b/sft_lora.yaml", "sft",
                     "--max_length", "64")
    assert summary["trainable_parameters"] == LORA_ALL_LINEAR == 4_884_480


def test_sft_full_with_gradient_checkpointing(real, tmp_path):
    summary = recipe(real, tmp_path, "sft", "recipes/qwen2.5-0.5b/sft.yaml", "sft",
                     "--max_length", "64")
    assert summary["trainable_parameters"] == BASE
    assert 0 < first(summary, "train_loss") < math.log(49_152)  # pretrained: below uniform


def test_sft_qlora(real, tmp_path):
    summary = recipe(real, tmp_path, "sft", "recipes/llama3.1-8b/sft_qlora.yaml", "sft",
                     "--max_length", "64")
    assert summary["quantized_linear_layers"] == LINEAR_LAYERS
    assert summary["trainable_parameters"] == LORA_ALL_LINEAR


def test_reward_full(real, tmp_path):
    summary = recipe(real, tmp_path, "reward", "recipes/qwen2.5-0.5b/reward.yaml", "pairs",
                     "--max_length", "64")
    assert summary["trainable_parameters"] == BASE + REWARD_HEAD  # backbone (no LM head)


def reward_run(real, tmp_path_factory, config):
    """(output folder, summary) of a reward recipe that a PPO test then loads."""
    out = tmp_path_factory.mktemp(config.split("/")[-1][:-5])
    return out, recipe(real, out, "reward", config, "pairs", "--max_length", "64")


@pytest.fixture(scope="session")  # not module: a worker runs other files' tests in between
def reward_lora(real, tmp_path_factory):
    return reward_run(real, tmp_path_factory, "recipes/qwen2.5-0.5b/reward_lora.yaml")


# a test and the test that loads its model share a worker (the fixture is built once)
@pytest.mark.xdist_group("reward_lora")
def test_reward_lora(reward_lora):
    out, summary = reward_lora
    assert summary["trainable_parameters"] == LORA_ALL_LINEAR + REWARD_HEAD
    assert json.loads((out / "adapter_config.json").read_text())["modules_to_save"] == ["score"]


@pytest.mark.xdist_group("reward_lora")
def test_ppo_full_against_a_lora_reward_model(real, reward_lora, tmp_path):
    """ppo.yaml: full policy and value model, gradient checkpointing; the reward
    model is the LoRA adapter of reward_lora.yaml on its base."""
    summary = recipe(real, tmp_path, "ppo", "recipes/qwen2.5-0.5b/ppo.yaml", "prompts",
                     "--reward_model_path", str(reward_lora[0]), "--response_length", "8",
                     "--rollout_batch_size", "4", env=CPU_EXACT)
    assert summary["trainable_parameters"] == BASE + BASE + VALUE_HEAD  # policy, value
    assert first(summary, "objective/kl") == pytest.approx(0.0, abs=1e-4)
    assert first(summary, "policy/approxkl_avg") == 0.0 and first(summary, "val/ratio") == 1.0


def test_dpo_full_padding_free_starts_at_log_2(real, tmp_path):
    """At the first step the policy is its (frozen copy) reference, so the sigmoid loss is
    log 2 exactly: both forwards run alike on the same batch."""
    summary = recipe(real, tmp_path, "preference", "recipes/qwen2.5-0.5b/dpo.yaml", "pairs",
                     "--max_length", "64")
    assert summary["trainable_parameters"] == BASE
    assert first(summary, "train_loss") == pytest.approx(math.log(2), abs=1e-6)


def test_dpo_qlora_with_precomputed_reference(real, tmp_path):
    """The reference log-probs are computed once before training, in other batches; the
    policy at step 1 (LoRA B is zero) then matches them up to padding, so its loss is log 2
    (measured in float32: 0.6931462, log 2 = 0.6931472; the 4-bit compute in bf16 gave
    0.685)."""
    summary = recipe(real, tmp_path, "preference", "recipes/llama3.1-8b/dpo_qlora.yaml",
                     "pairs", "--max_length", "64", "--ref_logps_cache_dir",
                     str(tmp_path / "ref_cache"))
    assert summary["quantized_linear_layers"] == LINEAR_LAYERS
    assert summary["trainable_parameters"] == LORA_ALL_LINEAR
    cached = [torch.load(f, weights_only=True)["columns"]
              for f in (tmp_path / "ref_cache").glob("*.pt")]
    assert all(sorted(c) == ["ref_chosen_logps", "ref_rejected_logps"] for c in cached)
    assert sorted(len(c["ref_chosen_logps"]) for c in cached) == [4, 12]  # eval, train pairs
    assert first(summary, "train_loss") == pytest.approx(math.log(2), abs=1e-5)


@pytest.fixture(scope="session")  # not module: a worker runs other files' tests in between
def reward_qlora(real, tmp_path_factory):
    return reward_run(real, tmp_path_factory, "recipes/llama3.1-8b/reward_qlora.yaml")


@pytest.mark.xdist_group("reward_qlora")
def test_reward_qlora(reward_qlora):
    out, summary = reward_qlora
    assert summary["quantized_linear_layers"] == LINEAR_LAYERS
    assert summary["trainable_parameters"] == LORA_ALL_LINEAR + REWARD_HEAD
    config = json.loads((out / "adapter_config.json").read_text())
    assert "score" in config["modules_to_save"]


@pytest.mark.xdist_group("reward_qlora")
def test_single_base_ppo_qlora(real, reward_qlora, tmp_path):
    """One 4-bit base, three adapters (policy, value, the reward model's)."""
    summary = recipe(real, tmp_path, "ppo", "recipes/llama3.1-8b/ppo_qlora.yaml", "prompts",
                     "--reward_model_path", str(reward_qlora[0]), "--response_length", "8",
                     "--rollout_batch_size", "4", env=CPU_EXACT)
    assert summary["quantized_linear_layers"] == LINEAR_LAYERS
    assert summary["trainable_parameters"] == 2 * LORA_ALL_LINEAR + VALUE_HEAD  # policy, value
    assert first(summary, "objective/kl") == pytest.approx(0.0, abs=1e-4)  # policy == ref
    # rollout and update in the same precision: the first ratio is 1
    assert first(summary, "policy/approxkl_avg") == 0.0


def test_ppo_lora_with_a_reward_function(real, tmp_path):
    summary = recipe(real, tmp_path, "ppo", "recipes/qwen2.5-0.5b/ppo_lora.yaml", "prompts",
                     "--reward", "rlhf_ext.worlds.smollm2:vader_reward", "--response_length", "8",
                     "--rollout_batch_size", "4", env=CPU_EXACT)
    # LoRA policy; a full value model (SmolLM2 backbone + head)
    assert summary["trainable_parameters"] == LORA_ALL_LINEAR + BASE + VALUE_HEAD
    assert -1.0 <= first(summary, "objective/scores") <= 1.0  # VADER's compound range
    assert first(summary, "objective/kl") == pytest.approx(0.0, abs=1e-4)
    assert first(summary, "policy/approxkl_avg") == 0.0 and first(summary, "val/ratio") == 1.0


def test_kto_through_the_dpo_lora_recipe(real, tmp_path):
    """Model == reference at the first step and KTO's KL estimate clamps at 0, so every
    row's loss is 1 - sigmoid(0) = 0.5."""
    summary = recipe(real, tmp_path, "preference", "recipes/qwen2.5-0.5b/dpo_lora.yaml",
                     "unpaired", "--loss_type", "kto", "--max_length", "64")
    assert first(summary, "train_loss") == pytest.approx(0.5, abs=1e-6)
