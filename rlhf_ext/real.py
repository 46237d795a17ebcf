"""``rlhf_ext.real`` is ``rlhf_ext.worlds.smollm2``: the real world moved there with the other
worlds, and this name keeps earlier imports, reward specs (``rlhf_ext.real:vader_reward``)
and ``python -m rlhf_ext.real`` (build SmolLM2's directory, print its path) working."""

import importlib
import sys

if __name__ == "__main__":
    from rlhf_ext.worlds.smollm2.model import smollm2_path

    print(smollm2_path())
else:
    sys.modules[__name__] = importlib.import_module("rlhf_ext.worlds.smollm2")
