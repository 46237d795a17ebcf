"""Worlds: the tasks, data and scorers that the demos, tests and benchmarks train on. They
use the library; the library never imports them.

- ``tiny``: a synthetic controlled-sentiment task with an exact oracle, a tokenizer and
  small Llama models built locally in seconds.
- ``smollm2``: SmolLM2-135M-Instruct offline, VADER as the ground truth, and the DPO
  paper's sentiment experiment on them.
"""
