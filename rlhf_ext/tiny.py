"""``rlhf_ext.tiny`` is ``rlhf_ext.worlds.tiny``: the tiny world moved there with the other
worlds, and this name keeps earlier imports working (``from rlhf_ext.tiny import ...``,
``rlhf_ext.tiny.world`` and the other submodules): the same module objects, not copies."""

import importlib
import sys

for _name in ("corpus", "evaluate", "models", "task", "tokenizer", "world"):
    sys.modules[f"{__name__}.{_name}"] = importlib.import_module(f"rlhf_ext.worlds.tiny.{_name}")
sys.modules[__name__] = importlib.import_module("rlhf_ext.worlds.tiny")
