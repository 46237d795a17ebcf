"""TRL users' scripts, run twice: as written for TRL 1.16, and with only the import lines
changed to rlhf_ext. At learning rate 0 both runs log the same numbers (each script names
the ones it prints), so the swap is a changed import and nothing else. The online scripts
(GRPO, RLOO) sample from fixed completions on both sides (``fixed_generation``)."""

import pytest
from fixed_generation import patch_generation

import rlhf_ext  # noqa: F401  (the package under test must import cleanly first)

SETTINGS = ("learning_rate=0.0, max_steps=1, per_device_train_batch_size=8, logging_steps=1, "
            "report_to='none', use_cpu=True, bf16=False, gradient_checkpointing=False, "
            "save_strategy='no', disable_tqdm=True, max_length=128, output_dir=OUT")

# name: (TRL's imports, ours, the script, the logged key both runs must agree on)
SCRIPTS = {
    "dpo-conversational": (
        "from trl import DPOConfig, DPOTrainer", "from rlhf_ext import DPOConfig, DPOTrainer",
        f"""
from transformers import AutoModelForCausalLM
data = to_conversational(preference_pairs(8, seed=1))
args = DPOConfig(beta=0.1, {SETTINGS})
trainer = DPOTrainer(model=POLICY, ref_model=AutoModelForCausalLM.from_pretrained(REF),
                     args=args, train_dataset=data, processing_class=TOK)
""", "loss"),
    "dpo-lora": (
        "from trl import DPOConfig, DPOTrainer", "from rlhf_ext import DPOConfig, DPOTrainer",
        f"""
from peft import LoraConfig
args = DPOConfig(beta=0.1, {SETTINGS})
trainer = DPOTrainer(model=POLICY, args=args, train_dataset=preference_pairs(8, seed=2),
                     processing_class=TOK,
                     peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
""", "rewards/margins"),
    "kto": (
        "from trl import KTOConfig, KTOTrainer", "from rlhf_ext import KTOConfig, KTOTrainer",
        f"""
from transformers import AutoModelForCausalLM
args = KTOConfig(beta=0.1, {SETTINGS})
trainer = KTOTrainer(model=POLICY, ref_model=AutoModelForCausalLM.from_pretrained(REF), args=args,
                     train_dataset=unpaired_dataset(8, seed=2), processing_class=TOK)
""", "loss"),
    "reward-sequence-classifier": (
        "from trl import RewardConfig, RewardTrainer",
        "from rlhf_ext import RewardConfig, RewardTrainer",
        f"""
import torch
from transformers import AutoModelForSequenceClassification
torch.manual_seed(0)
model = AutoModelForSequenceClassification.from_pretrained(POLICY, num_labels=1)
args = RewardConfig({SETTINGS})
trainer = RewardTrainer(model=model, args=args, train_dataset=preference_pairs(8, seed=3),
                        processing_class=TOK)
""", "loss"),
    "simpo-by-config-name": (
        "from trl.experimental.cpo import CPOConfig, CPOTrainer",
        "from rlhf_ext import CPOConfig, CPOTrainer",
        f"""
args = CPOConfig(loss_type="simpo", cpo_alpha=0.0, beta=2.0, simpo_gamma=1.0, {SETTINGS})
trainer = CPOTrainer(model=POLICY, args=args, train_dataset=preference_pairs(8, seed=4),
                     processing_class=TOK)
""", "loss"),
    "orpo-by-config-name": (
        "from trl.experimental.orpo import ORPOConfig, ORPOTrainer",
        "from rlhf_ext import ORPOConfig, ORPOTrainer",
        f"""
args = ORPOConfig(beta=0.1, {SETTINGS})
trainer = ORPOTrainer(model=POLICY, args=args, train_dataset=preference_pairs(8, seed=5),
                      processing_class=TOK)
""", "log_odds_ratio"),  # the NLL term differs on purpose (docs/trl.md): the odds term must not
}

ONLINE = ("learning_rate=0.0, max_steps=1, per_device_train_batch_size=8, logging_steps=1, "
          "report_to='none', use_cpu=True, bf16=False, gradient_checkpointing=False, "
          "save_strategy='no', disable_tqdm=True, max_completion_length=8, output_dir=OUT")
REWARDS = ("reward", "reward_std", "frac_reward_zero_std", "loss", "grad_norm",
           "completions/mean_length", "completions/clipped_ratio",
           "completions/mean_terminated_length", "clip_ratio/region_mean")
# TRL's GRPO and RLOO documentation: a reward function over completions, a dataset
# column as ground truth, a multi-task mix where each function scores its own rows
SCRIPTS.update({
    "grpo-quickstart": (
        "from trl import GRPOConfig, GRPOTrainer", "from rlhf_ext import GRPOConfig, GRPOTrainer",
        f"""
def reward_num_unique_chars(completions, **kwargs):
    return [float(len(set(c))) for c in completions]

trainer = GRPOTrainer(model=POLICY, reward_funcs=reward_num_unique_chars,
                      args=GRPOConfig(num_generations=4, {ONLINE}),
                      train_dataset=prompt_dataset(2, seed=1), processing_class=TOK)
""", (*REWARDS, "rewards/reward_num_unique_chars/mean")),
    "grpo-conversational-ground-truth": (
        "from trl import GRPOConfig, GRPOTrainer", "from rlhf_ext import GRPOConfig, GRPOTrainer",
        f"""
data = to_conversational(prompt_dataset(2, seed=2)).add_column("ground_truth", ["a", "e"])

def reward_contains_answer(completions, ground_truth, **kwargs):
    contents = [completion[0]["content"] for completion in completions]
    return [1.0 if gt in content else 0.0 for content, gt in zip(contents, ground_truth)]

trainer = GRPOTrainer(model=POLICY, reward_funcs=reward_contains_answer,
                      args=GRPOConfig(num_generations=4, loss_type="grpo", {ONLINE}),
                      train_dataset=data, processing_class=TOK)
""", (*REWARDS, "rewards/reward_contains_answer/mean")),
    "grpo-multi-task-none": (
        "from trl import GRPOConfig, GRPOTrainer", "from rlhf_ext import GRPOConfig, GRPOTrainer",
        f"""
data = prompt_dataset(2, seed=3).add_column("task", ["length", "letters"])

def length_reward(completions, task, **kwargs):
    return [float(len(c)) if t == "length" else None for c, t in zip(completions, task)]

def letters_reward(completions, task, **kwargs):
    return [float(c.count("e")) if t == "letters" else None for c, t in zip(completions, task)]

args = GRPOConfig(num_generations=4, reward_weights=[0.1, 1.0], {ONLINE})
trainer = GRPOTrainer(model=POLICY, reward_funcs=[length_reward, letters_reward], args=args,
                      train_dataset=data, processing_class=TOK)
""", (*REWARDS, "rewards/length_reward/mean", "rewards/letters_reward/std")),
    "rloo": (
        "from trl import RLOOConfig, RLOOTrainer", "from rlhf_ext import RLOOConfig, RLOOTrainer",
        f"""
def reward_num_unique_chars(completions, **kwargs):
    return [float(len(set(c))) for c in completions]

trainer = RLOOTrainer(model=POLICY, reward_funcs=reward_num_unique_chars,
                      args=RLOOConfig(num_generations=4, {ONLINE}),
                      train_dataset=prompt_dataset(2, seed=4), processing_class=TOK)
""", ("reward", "reward_std", "rewards/reward_num_unique_chars/mean", "grad_norm", "kl",
      "completions/mean_length", "clip_ratio/region_mean")),
})


@pytest.fixture(scope="module")
def paths(tok, tmp_path_factory):
    from rlhf_ext.worlds.tiny import build_model

    root = tmp_path_factory.mktemp("scripts")
    for name, seed in (("policy", 0), ("ref", 1)):
        build_model("tiny", tok, seed=seed).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return root


def run(imports: str, script: str, paths, out) -> dict:
    from transformers import AutoTokenizer

    from rlhf_ext.worlds.tiny import (
        preference_pairs,
        prompt_dataset,
        to_conversational,
        unpaired_dataset,
    )

    scope = {"POLICY": str(paths / "policy"), "REF": str(paths / "ref"), "OUT": str(out),
             "TOK": AutoTokenizer.from_pretrained(paths / "policy"),
             "preference_pairs": preference_pairs, "to_conversational": to_conversational,
             "unpaired_dataset": unpaired_dataset, "prompt_dataset": prompt_dataset}
    exec(compile(imports + "\n" + script + "\ntrainer.train()\n", "script", "exec"), scope)
    return scope["trainer"].state.log_history[0]


@pytest.mark.parametrize("name", SCRIPTS)
def test_a_trl_script_runs_with_the_import_changed(name, paths, tmp_path, tok, monkeypatch):
    theirs_import, ours_import, script, keys = SCRIPTS[name]
    patch_generation(monkeypatch, tok)  # used by the online scripts only
    theirs = run(theirs_import, script, paths, tmp_path / "trl")
    ours = run(ours_import, script, paths, tmp_path / "ours")
    for key in [keys] if isinstance(keys, str) else keys:
        assert ours[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-5), (key, ours, theirs)
