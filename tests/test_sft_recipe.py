"""The SFT recipe end to end on the tiny world (accelerate launch, TRL's SFTTrainer)."""

from statistics import mean

from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf_ext.worlds.tiny import oracle_score
from rlhf_ext.worlds.tiny.evaluate import evaluate_policy
from rlhf_ext.worlds.tiny.world import load_split


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


def test_sft_turns_dropout_off_after_adding_adapters(policy_dir, tok, tmp_path):
    """Attention dropout and LoRA dropout set, as real checkpoints and recipes have them:
    after the trainer is built, two train-mode forwards agree exactly."""
    import torch
    from peft import LoraConfig

    from rlhf_ext.sft import SFTConfig, SFTTrainer
    from rlhf_ext.worlds.tiny import sft_dataset

    model = AutoModelForCausalLM.from_pretrained(policy_dir, attention_dropout=0.3)
    args = SFTConfig(output_dir=str(tmp_path), max_length=64, report_to="none", use_cpu=True)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, target_modules=["q_proj", "v_proj"],
                      task_type="CAUSAL_LM")
    trainer = SFTTrainer(model, args=args, train_dataset=sft_dataset(4), processing_class=tok,
                         peft_config=lora)
    trained = trainer.model.train()
    with torch.no_grad():  # LoRA's B starts at 0: give the adapters an effect to drop
        for name, p in trained.named_parameters():
            if "lora_B" in name:
                p.normal_()
    ids = torch.tensor([tok("the film was good .")["input_ids"]])
    with torch.no_grad():
        a, b = trained(input_ids=ids).logits, trained(input_ids=ids).logits
    assert torch.equal(a, b)
    assert trained.base_model.model.config.attention_dropout == 0.0
