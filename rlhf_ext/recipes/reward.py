"""Reward-model training (Bradley-Terry) with rlhf_ext's RewardTrainer and RewardModel head.

    accelerate launch recipes/reward.py --config recipes/tiny/reward.yaml

Arguments: TRL's ScriptArguments and ModelConfig (LoRA, 4-bit), rlhf_ext's RewardConfig
and RecipeArguments. In the tiny world the summary adds the Spearman correlation of the
model's rewards with the oracle on held-out completions.
"""

import time

from transformers import AutoTokenizer
from trl import ModelConfig, ScriptArguments, get_peft_config

from rlhf_ext.launch import RecipeArguments, finish_run, run_main, whole_model
from rlhf_ext.models import model_init_kwargs
from rlhf_ext.reward import RewardConfig, RewardTrainer, load_reward_model, score


def oracle_agreement(model, tokenizer, evaluation) -> dict:
    """Spearman correlation of rewards with the oracle over held-out completions."""
    from scipy.stats import spearmanr

    from rlhf_ext.worlds.tiny import oracle_score

    completions = list(evaluation["chosen"]) + list(evaluation["rejected"])
    prompts = list(evaluation["prompt"]) * 2
    rewards = score(model, tokenizer, prompts, completions)
    rho = spearmanr(rewards, [oracle_score(c) for c in completions]).statistic
    return {"tiny/spearman_oracle": float(rho)}


# What the recipe reads: a YAML key must be a field of one of these (tests/test_recipe_yamls.py).
ARGUMENTS = (ScriptArguments, RewardConfig, ModelConfig, RecipeArguments)


def main(script_args, training_args, model_args, recipe_args):
    start = time.time()
    world = recipe_args.ensure()
    train, evaluation = recipe_args.load_datasets(script_args, training_args)
    model = load_reward_model(model_args.model_name_or_path, new_head=True,
                              **model_init_kwargs(model_args))
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    trainer = RewardTrainer(model=model, args=training_args, train_dataset=train,
                            eval_dataset=evaluation, processing_class=tokenizer,
                            peft_config=get_peft_config(model_args))
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    extra = trainer.evaluate() if evaluation is not None else {}
    oracle = None
    if evaluation is not None and world is not None:  # process 0, on the saved model
        def oracle():
            return oracle_agreement(whole_model(trainer, trainer.model, "reward"), tokenizer,
                                    evaluation)
    recipe_args.tiny_eval_prompts = 0  # a reward model samples nothing
    finish_run(trainer, recipe_args, world, start, "reward_summary.json",
               script_args.dataset_name, extra, evaluate=oracle)


if __name__ == "__main__":
    run_main(main, ARGUMENTS)
