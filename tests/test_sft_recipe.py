"""The SFT recipe end to end on the tiny world (accelerate launch, TRL's SFTTrainer)."""

from statistics import mean

from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf_ext.tiny import oracle_score
from rlhf_ext.tiny.evaluate import evaluate_policy
from rlhf_ext.tiny.world import load_split


def test_sft_learns_the_task(sft_run, world_dir):
    out, summary = sft_run
    assert summary["last_logged_loss"] < 0.5 * summary["first_logged_loss"]
    assert summary["tiny/well_formed"] >= 0.9
    corpus_mean = mean(oracle_score(c) for c in load_split(world_dir, "sft")["completion"])
    assert abs(summary["tiny/oracle_score"] - corpus_mean) < 0.06


def test_sft_output_reloads_and_samples(sft_run, world_dir):
    out, summary = sft_run
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    prompts = load_split(world_dir, "prompts_eval")["prompt"][:64]
    report = evaluate_policy(model, tok, prompts, seed=1)
    assert report["well_formed"] >= 0.85
    assert 0.35 < report["oracle_score"] < 0.65
