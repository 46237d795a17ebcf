"""Supervised fine-tuning with TRL's SFTTrainer (rlhf_ext's model card), configured by a
YAML recipe.

    accelerate launch recipes/sft.py --config recipes/tiny/sft.yaml [--key value ...]
    python recipes/sft.py --config recipes/tiny/sft.yaml

Arguments: TRL's ScriptArguments and ModelConfig, rlhf_ext's SFTConfig (TRL's with
disable_dropout) and RecipeArguments (build the tiny world first; judge the result with
its oracle).
"""

import time

from transformers import AutoTokenizer
from trl import ModelConfig, ScriptArguments, get_peft_config

from rlhf_ext.launch import RecipeArguments, finish_run, run_main
from rlhf_ext.models import load_causal_lm
from rlhf_ext.sft import SFTConfig, SFTTrainer

# What the recipe reads: a YAML key must be a field of one of these (tests/test_recipe_yamls.py).
ARGUMENTS = (ScriptArguments, SFTConfig, ModelConfig, RecipeArguments)


def main(script_args, training_args, model_args, recipe_args):
    start = time.time()
    world = recipe_args.ensure()
    train, evaluation = recipe_args.load_datasets(script_args, training_args)
    trainer = SFTTrainer(model=load_causal_lm(model_args.model_name_or_path, model_args),
                         args=training_args, train_dataset=train, eval_dataset=evaluation,
                         processing_class=AutoTokenizer.from_pretrained(
                             model_args.model_name_or_path),
                         peft_config=get_peft_config(model_args))
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    finish_run(trainer, recipe_args, world, start, "sft_summary.json",
               script_args.dataset_name)


if __name__ == "__main__":
    run_main(main, ARGUMENTS)
