"""Supervised fine-tuning with TRL's SFTTrainer, configured by a YAML recipe.

    accelerate launch recipes/sft.py --config recipes/tiny/sft.yaml [--key value ...]
    python recipes/sft.py --config recipes/tiny/sft.yaml

Arguments: TRL's ScriptArguments, SFTConfig and ModelConfig, plus rlhf_ext's
TinyWorldArguments (build the tiny world first; judge the result with its oracle).
"""

import json
import time

from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import ModelConfig, ScriptArguments, SFTConfig, SFTTrainer, TrlParser, get_peft_config

from rlhf_ext.data import load_dataset_any, train_eval_split
from rlhf_ext.launch import TinyWorldArguments, with_machine_args


def main(script_args, training_args, model_args, tiny_args):
    start = time.time()
    world = tiny_args.ensure()
    data = load_dataset_any(script_args.dataset_name, script_args.dataset_config)
    train, evaluation = train_eval_split(data, script_args.dataset_train_split,
                                         script_args.dataset_test_split)
    if training_args.eval_strategy == "no":
        evaluation = None
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    model = AutoModelForCausalLM.from_pretrained(
        model_args.model_name_or_path, dtype=model_args.dtype,
        attn_implementation=model_args.attn_implementation)
    trainer = SFTTrainer(model=model, args=training_args, train_dataset=train,
                         eval_dataset=evaluation, processing_class=tokenizer,
                         peft_config=get_peft_config(model_args))
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    summary = {"train_loss": result.training_loss, "train_seconds": time.time() - start}
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    if losses:
        summary["first_logged_loss"], summary["last_logged_loss"] = losses[0], losses[-1]
    if world is not None and tiny_args.tiny_eval_prompts and trainer.accelerator.is_main_process:
        from rlhf_ext.tiny.evaluate import evaluate_policy
        from rlhf_ext.tiny.world import load_split

        prompts = load_split(world, "prompts_eval")["prompt"][: tiny_args.tiny_eval_prompts]
        report = evaluate_policy(trainer.model, tokenizer, prompts, seed=training_args.seed)
        summary.update({f"tiny/{k}": v for k, v in report.items() if k != "completions"})
        summary["tiny/examples"] = report["completions"][:3]
    if trainer.accelerator.is_main_process:
        with open(f"{training_args.output_dir}/sft_summary.json", "w") as f:
            json.dump(summary, f, indent=2)
        trainer.accelerator.print(json.dumps(summary, indent=2))
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    trainer.end()


if __name__ == "__main__":
    parser = TrlParser((ScriptArguments, SFTConfig, ModelConfig, TinyWorldArguments))
    main(*parser.parse_args_and_config(args=with_machine_args()))
