"""Supervised fine-tuning with TRL's SFTTrainer (rlhf_ext's model card), configured by a

The recipe lives in the package (rlhf_ext/recipes/sft.py, also run as `rlhf-ext sft`);
this file keeps the clone's commands working:

    accelerate launch recipes/sft.py --config recipes/tiny/sft.yaml [--key value ...]
"""

from rlhf_ext.launch import run_main
from rlhf_ext.recipes.sft import ARGUMENTS, main

if __name__ == "__main__":
    run_main(main, ARGUMENTS)
