"""Offline preference optimisation with rlhf_ext's PreferenceTrainer; the loss is a name.

    accelerate launch recipes/preference.py --config recipes/tiny/dpo.yaml
    accelerate launch recipes/preference.py --config recipes/tiny/dpo.yaml --loss_type simpo

Arguments: TRL's ScriptArguments and ModelConfig (LoRA: use_peft, lora_r, ...; 4-bit:
load_in_4bit), rlhf_ext's PreferenceConfig and RecipeArguments.
"""

import time

from transformers import AutoTokenizer
from trl import ModelConfig, ScriptArguments, get_peft_config

from rlhf_ext.launch import RecipeArguments, finish_run, run_main
from rlhf_ext.models import load_causal_lm
from rlhf_ext.preference import PreferenceConfig, PreferenceTrainer

# What the recipe reads: a YAML key must be a field of one of these (tests/test_recipe_yamls.py).
ARGUMENTS = (ScriptArguments, PreferenceConfig, ModelConfig, RecipeArguments)


def main(script_args, training_args, model_args, recipe_args):
    start = time.time()
    world = recipe_args.ensure()
    train, evaluation = recipe_args.load_datasets(script_args, training_args)
    trainer = PreferenceTrainer(
        model=load_causal_lm(model_args.model_name_or_path, model_args), args=training_args,
        train_dataset=train, eval_dataset=evaluation,
        processing_class=AutoTokenizer.from_pretrained(model_args.model_name_or_path),
        peft_config=get_peft_config(model_args))
    trainer.base_model_name = model_args.model_name_or_path
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    finish_run(trainer, recipe_args, world, start, "preference_summary.json",
               script_args.dataset_name, {"loss_type": training_args.loss_type},
               reference_path=model_args.model_name_or_path)


if __name__ == "__main__":
    run_main(main, ARGUMENTS)
