"""TRL users' scripts, run twice: as written for TRL 1.16, and with only the import lines
changed to rlhf_ext. At learning rate 0 both runs log the same numbers (each script names
the one it prints), so the swap is a changed import and nothing else."""

import pytest

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

    from rlhf_ext.worlds.tiny import preference_pairs, to_conversational, unpaired_dataset

    scope = {"POLICY": str(paths / "policy"), "REF": str(paths / "ref"), "OUT": str(out),
             "TOK": AutoTokenizer.from_pretrained(paths / "policy"),
             "preference_pairs": preference_pairs, "to_conversational": to_conversational,
             "unpaired_dataset": unpaired_dataset}
    exec(compile(imports + "\n" + script + "\ntrainer.train()\n", "script", "exec"), scope)
    return scope["trainer"].state.log_history[0]


@pytest.mark.parametrize("name", SCRIPTS)
def test_a_trl_script_runs_with_the_import_changed(name, paths, tmp_path):
    theirs_import, ours_import, script, key = SCRIPTS[name]
    theirs = run(theirs_import, script, paths, tmp_path / "trl")
    ours = run(ours_import, script, paths, tmp_path / "ours")
    assert ours[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-5), (key, ours, theirs)
