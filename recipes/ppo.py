"""Online RL with rlhf_ext's PPOTrainer: explicit per-token KL, the score on the last token,

The recipe lives in the package (rlhf_ext/recipes/ppo.py, also run as `rlhf-ext ppo`);
this file keeps the clone's commands working:

    accelerate launch recipes/ppo.py --config recipes/tiny/ppo.yaml [--key value ...]
"""

from rlhf_ext.launch import run_main
from rlhf_ext.recipes.ppo import ARGUMENTS, main

if __name__ == "__main__":
    run_main(main, ARGUMENTS)
