"""Small conversational datasets about films in TRL's formats, for the real-model recipe
tests (``conversational_datasets``)."""

from __future__ import annotations

import os
from pathlib import Path

from .task import ASKS

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
