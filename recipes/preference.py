"""Offline preference optimisation with rlhf_ext's PreferenceTrainer; the loss is a name.

The recipe lives in the package (rlhf_ext/recipes/preference.py, also run as `rlhf-ext preference`);
this file keeps the clone's commands working:

    accelerate launch recipes/preference.py --config recipes/tiny/dpo.yaml [--key value ...]
"""

from rlhf_ext.launch import run_main
from rlhf_ext.recipes.preference import ARGUMENTS, main

if __name__ == "__main__":
    run_main(main, ARGUMENTS)
