"""Build the tiny world on disk: tokenizer, base model and datasets, reusable offline.

Layout of ``out_dir``::

    world.json            the spec it was built from (a changed spec rebuilds)
    base/                 untrained Llama + tokenizer (AutoModelForCausalLM / AutoTokenizer)
    data/<name>/          datasets.save_to_disk: sft, prompts_rl, prompts_eval, pairs,
                          pairs_eval, unpaired (standard format)
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from filelock import FileLock

from . import corpus
from .models import build_model
from .tokenizer import build_tokenizer

WORLD_VERSION = 2


@dataclass(frozen=True)
class WorldSpec:
    seed: int = 0
    size: str = "small"
    vocab_size: int = 512
    n_sft: int = 4000
    n_prompts_rl: int = 512
    n_prompts_eval: int = 256
    n_pairs: int = 2000
    n_pairs_eval: int = 400
    n_unpaired: int = 4000
    version: int = WORLD_VERSION


def _datasets(spec: WorldSpec) -> dict:
    s = spec.seed
    return {
        "sft": corpus.sft_dataset(spec.n_sft, seed=s),
        "prompts_rl": corpus.prompt_dataset(spec.n_prompts_rl, seed=s, split="rl"),
        "prompts_eval": corpus.prompt_dataset(spec.n_prompts_eval, seed=s, split="eval"),
        "pairs": corpus.preference_pairs(spec.n_pairs, seed=s),
        "pairs_eval": corpus.preference_pairs(spec.n_pairs_eval, seed=s + 10_000),
        "unpaired": corpus.unpaired_dataset(spec.n_unpaired, seed=s),
    }


def build_world(out_dir: str | os.PathLike, spec: WorldSpec = WorldSpec()) -> Path:
    """Write the world described by ``spec`` to ``out_dir`` (replacing what is there)."""
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = build_tokenizer(spec.vocab_size, seed=spec.seed)
    model = build_model(spec.size, tokenizer, seed=spec.seed)
    model.save_pretrained(tmp / "base")
    tokenizer.save_pretrained(tmp / "base")
    for name, data in _datasets(spec).items():
        data.save_to_disk(str(tmp / "data" / name))
    (tmp / "world.json").write_text(json.dumps(asdict(spec), indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)  # the world appears whole or not at all
    return out


def ensure_world(out_dir: str | os.PathLike, spec: WorldSpec = WorldSpec()) -> Path:
    """Build the world unless ``out_dir`` already holds one with the same spec.

    Safe under several processes (a file lock): one builds, the others wait and reuse it.
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        meta = out / "world.json"
        if meta.exists() and json.loads(meta.read_text()) == asdict(spec):
            return out
        return build_world(out, spec)


def load_split(world_dir: str | os.PathLike, name: str):
    """One dataset of a built world, e.g. ``load_split(dir, "prompts_eval")``."""
    from datasets import load_from_disk

    return load_from_disk(str(Path(world_dir) / "data" / name))
