"""Online RL with rlhf_ext's PPOTrainer: explicit per-token KL, the score on the last token,
GAE with a value model, or a critic-free estimator (grpo, rloo, reinforce_pp...).

    accelerate launch recipes/ppo.py --config recipes/tiny/ppo.yaml
    accelerate launch recipes/ppo.py --config recipes/tiny/ppo.yaml --reward oracle
    accelerate launch recipes/ppo.py --config recipes/tiny/grpo_oracle.yaml

Arguments: TRL's ScriptArguments (dataset_name: a prompt dataset) and ModelConfig (the
policy; LoRA, 4-bit), rlhf_ext's PPOConfig, RecipeArguments and PPOModelArguments.
"""

import time
from dataclasses import dataclass, field

from transformers import AutoTokenizer
from trl import ModelConfig, ScriptArguments, get_peft_config

from rlhf_ext.heads import ValueModel
from rlhf_ext.launch import RecipeArguments, finish_run, run_main
from rlhf_ext.models import load_causal_lm, model_init_kwargs
from rlhf_ext.ppo import PPOConfig, PPOTrainer
from rlhf_ext.ppo.reward_funcs import completion_text
from rlhf_ext.reward import adapter_base, load_reward_model


@dataclass
class PPOModelArguments:
    reward: str = field(default="model", metadata={
        "help": "'model' (reward_model_path), 'oracle' (the tiny world's scorer) or reward "
                "functions 'module:function[,module:function...]' taking (prompts, "
                "completions, **columns) -> list of floats (TRL's reward-function "
                "arguments; after chat prompts each completion is a list holding the "
                "assistant message; the dataset's other columns arrive by name), summed "
                "with reward_weights, e.g. rlhf_ext.worlds.smollm2:vader_reward."})
    reward_model_path: str | None = field(default=None, metadata={
        "help": "A RewardModel saved by recipes/reward.py."})
    value_model_path: str | None = field(default=None, metadata={
        "help": "Backbone of the value model (default: the reward model, else the policy)."})
    single_base: bool = field(default=False, metadata={
        "help": "One copy of the base model: policy, value and reward are LoRA adapters on "
                "it (needs use_peft and a reward_model_path trained with LoRA on the same "
                "base). The large-model set-up, e.g. with load_in_4bit."})


def reward_functions(spec: str):
    """'module:function' -> that function; several, comma-separated -> their list."""
    import importlib

    funcs = []
    for part in spec.split(","):
        module, _, name = part.strip().partition(":")
        if not module or not name:
            raise ValueError(f"reward {spec!r}: each of its comma-separated parts must be "
                             f"'module:function', got {part!r}")
        funcs.append(getattr(importlib.import_module(module), name))
    return funcs[0] if len(funcs) == 1 else funcs


# What the recipe reads: a YAML key must be a field of one of these (tests/test_recipe_yamls.py).
ARGUMENTS = (ScriptArguments, PPOConfig, ModelConfig, RecipeArguments, PPOModelArguments)


def main(script_args, training_args, model_args, recipe_args, ppo_args):
    start = time.time()
    world = recipe_args.ensure()
    train, evaluation = recipe_args.load_datasets(script_args, training_args)
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    policy = load_causal_lm(model_args.model_name_or_path, model_args)
    peft_config = get_peft_config(model_args)
    if ppo_args.single_base and training_args.value_head_on_policy:
        raise ValueError("single_base gives the value its own adapter; value_head_on_policy "
                         "puts it on the policy: choose one")
    if ppo_args.single_base:
        if peft_config is None or ppo_args.reward_model_path is None:
            raise ValueError("single_base needs use_peft: true and a reward_model_path saved "
                             "by recipes/reward.py with use_peft on the same base model")
        from rlhf_ext.ppo.single_base import build_single_base

        policy, value_model, reward = build_single_base(
            policy, peft_config, ppo_args.reward_model_path)
        reward_tokenizer, peft_config = None, None
    elif ppo_args.reward == "oracle":
        from rlhf_ext.worlds.tiny import oracle_score

        reward, reward_tokenizer = (lambda p, c: [oracle_score(completion_text(x))
                                                  for x in c]), None
    elif ppo_args.reward == "model":
        if ppo_args.reward_model_path is None:
            raise ValueError("reward: model needs --reward_model_path (or use --reward oracle)")
        reward = load_reward_model(ppo_args.reward_model_path)
        reward_tokenizer = AutoTokenizer.from_pretrained(ppo_args.reward_model_path)
    elif ":" in ppo_args.reward:
        reward, reward_tokenizer = reward_functions(ppo_args.reward), None
    else:
        raise ValueError(f"reward must be 'model', 'oracle' or 'module:function', "
                         f"got {ppo_args.reward!r}")
    if not training_args.uses_critic or training_args.value_head_on_policy:
        value_model = None  # critic-free (grpo, rloo...), or the trainer's head on the policy
    elif not ppo_args.single_base:
        reward_path = ppo_args.reward_model_path if ppo_args.reward == "model" else None
        value_path = (ppo_args.value_model_path or reward_path
                      or model_args.model_name_or_path)
        value_path = adapter_base(value_path) or value_path  # a LoRA reward model: its base
        # in the policy's dtype and attention (float32 by default, not a bf16 checkpoint's
        # own dtype: it is trained), unquantized (all of it is trained, no adapters)
        policy_load = model_init_kwargs(model_args)
        load = {k: policy_load[k] for k in ("dtype", "attn_implementation") if k in policy_load}
        value_model = ValueModel.from_backbone(value_path, seed=training_args.seed, **load)
    trainer = PPOTrainer(policy, training_args, tokenizer, train, reward=reward,
                         value_model=value_model, reward_tokenizer=reward_tokenizer,
                         eval_dataset=evaluation, peft_config=peft_config)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    finish_run(trainer, recipe_args, world, start, "ppo_summary.json",
               script_args.dataset_name, {"reward": ppo_args.reward},
               reference_path=model_args.model_name_or_path, model=trainer.policy)


if __name__ == "__main__":
    run_main(main, ARGUMENTS)
