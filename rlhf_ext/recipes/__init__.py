"""The training recipes and their YAML configs, installed with the package.

Each module has ``ARGUMENTS`` (the dataclasses its YAML and command line fill) and
``main``. Run one with ``rlhf-ext <recipe> --config <yaml>`` (``rlhf_ext.cli``), with
``accelerate launch -m rlhf_ext.cli <recipe> ...``, or from a clone as
``accelerate launch recipes/<recipe>.py ...``. The configs sit beside them, one folder per
model (tiny, smollm2, qwen2.5-0.5b, llama3.1-8b); ``--config tiny/dpo.yaml`` finds them
from any folder.
"""
