"""Single-base PPO: one copy of the base weights for policy, reference, value and reward."""

import pytest
import torch
from peft import AutoPeftModelForSequenceClassification, LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf_ext.ppo import PPOConfig, PPOTrainer
from rlhf_ext.ppo.single_base import build_single_base
from rlhf_ext.reward import RewardConfig, RewardTrainer, score
from rlhf_ext.worlds.tiny import build_model, preference_pairs, prompt_dataset

LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


@pytest.fixture(scope="module")
def setup(world_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("single")
    tok = AutoTokenizer.from_pretrained(world_dir / "base")
    build_model("tiny4bit", tok, seed=0).save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    trainer = RewardTrainer(
        str(root / "base"), processing_class=tok, train_dataset=preference_pairs(64, seed=1),
        peft_config=LoraConfig(**LORA),
        args=RewardConfig(output_dir=str(root / "rm"), max_steps=8, learning_rate=1e-2,
                          per_device_train_batch_size=8, report_to="none", use_cpu=True,
                          save_strategy="no", disable_tqdm=True))
    trainer.train()
    trainer.save_model()
    return root, tok


def test_reward_adapter_matches_the_lora_reward_model(setup):
    root, tok = setup
    # the saved adapter as plain peft + transformers load it: an independent forward
    standalone = AutoPeftModelForSequenceClassification.from_pretrained(
        root / "rm", num_labels=1).eval()
    base = AutoModelForCausalLM.from_pretrained(root / "base")
    policy, value, reward = build_single_base(base, LoraConfig(**LORA), str(root / "rm"))
    prompts = list(prompt_dataset(6, seed=3)["prompt"])
    completions = [" the plot was good .", " one star .", " i hated the cast ."] * 2
    expected = score(standalone, tok, prompts, completions)
    got = score(reward, tok, prompts, completions)
    assert got == pytest.approx(expected, abs=1e-5)
    assert expected[0] != pytest.approx(expected[1])  # the adapter learned something
    # one copy of the base: value and reward own only their heads
    assert sum(p.numel() for p in value.parameters()) == base.config.hidden_size + 1
    assert sum(p.numel() for p in reward.parameters()) == base.config.hidden_size  # no bias
    # the policy's generation still runs the policy adapter after a reward forward
    assert all(m._active_adapter in ("default", ["default"])
               for m in policy.modules() if hasattr(m, "_active_adapter"))


def ppo_args(out, **kw) -> PPOConfig:
    """A short single-base PPO run: rollouts of 16, minibatches of 8, lr 1e-2."""
    return PPOConfig(output_dir=str(out), rollout_batch_size=16, per_device_train_batch_size=8,
                     learning_rate=1e-2, temperature=1.0, report_to="none", use_cpu=True,
                     save_strategy="no", disable_tqdm=True, num_sample_generations=0,
                     logging_steps=1, **kw)


def test_single_base_ppo_trains_policy_and_value_adapters_only(setup, tmp_path):
    root, tok = setup
    base = AutoModelForCausalLM.from_pretrained(root / "base")
    policy, value, reward = build_single_base(base, LoraConfig(**LORA), str(root / "rm"))
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    head_before = value.head.weight.detach().clone()
    args = ppo_args(tmp_path, num_ppo_epochs=2, num_train_epochs=2, response_length=10)
    trainer = PPOTrainer(policy, args, tok, prompt_dataset(32, seed=4), reward=reward,
                         value_model=value)
    assert trainer.ref_model is None  # the reference is the base with adapters off
    trainer.train()
    changed = {n for n, p in policy.named_parameters() if not torch.equal(before[n], p)}
    assert any(".default." in n for n in changed) and any(".value." in n for n in changed)
    assert not any(".reward." in n for n in changed)
    assert not any("lora_" not in n for n in changed)  # base weights untouched
    assert not torch.equal(head_before, value.head.weight)
    logged = {k for h in trainer.state.log_history for k in h}
    assert {"objective/kl", "loss/value_avg", "objective/scores"} <= logged


def test_single_base_ppo_on_a_4bit_base(setup, tmp_path):
    from bitsandbytes.nn import Linear4bit

    from rlhf_ext.models import load_causal_lm, quantization_config

    root, tok = setup
    base = load_causal_lm(str(root / "base"), quantization_config=quantization_config(
        load_in_4bit=True, compute_dtype=torch.float32),
        device_map="cpu")  # where the run is (use_cpu), not bitsandbytes' GPU
    policy, value, reward = build_single_base(base, LoraConfig(**LORA), str(root / "rm"))
    assert any(isinstance(m, Linear4bit) for m in policy.modules())
    before = {n: p.detach().clone() for n, p in policy.named_parameters() if "lora_" in n}
    args = ppo_args(tmp_path, num_ppo_epochs=1, num_train_epochs=1, response_length=8)
    trainer = PPOTrainer(policy, args, tok, prompt_dataset(16, seed=5), reward=reward,
                         value_model=value)
    trainer.train()
    changed = {n for n, p in policy.named_parameters() if n in before and not torch.equal(before[n], p)}
    assert any(".default." in n for n in changed) and any(".value." in n for n in changed)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses and all(loss == loss for loss in losses)  # no NaN
