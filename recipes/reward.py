"""Reward-model training (Bradley-Terry) with rlhf_ext's RewardTrainer and RewardModel head.

The recipe lives in the package (rlhf_ext/recipes/reward.py, also run as `rlhf-ext reward`);
this file keeps the clone's commands working:

    accelerate launch recipes/reward.py --config recipes/tiny/reward.yaml [--key value ...]
"""

from rlhf_ext.launch import run_main
from rlhf_ext.recipes.reward import ARGUMENTS, main

if __name__ == "__main__":
    run_main(main, ARGUMENTS)
