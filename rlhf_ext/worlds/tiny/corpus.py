"""Datasets of the tiny world, in TRL's standard formats (and the conversational variant).

Every generator is deterministic given its seed. Moods are drawn uniformly in [0, 1], so
the corpora are balanced and their mean oracle score is 0.5: an SFT model starts near the
middle and alignment has room to move it.

| generator            | columns                         | TRL format               |
|----------------------|---------------------------------|--------------------------|
| ``sft_dataset``      | prompt, completion              | prompt-completion        |
| ``prompt_dataset``   | prompt                          | prompt-only              |
| ``preference_pairs`` | prompt, chosen, rejected        | preference (explicit)    |
| ``unpaired_dataset`` | prompt, completion, label       | unpaired preference      |

``to_conversational`` turns any of them into lists of messages.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from datasets import Dataset

from .task import oracle_score, sample_completion, sample_prompt

# Bradley-Terry scale: P(a preferred to b) = sigmoid(BT_SCALE * (score_a - score_b)).
# A gap of 0.15 in oracle score is preferred with probability 0.95.
BT_SCALE = 20.0


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def sft_dataset(n: int, seed: int = 0) -> Dataset:
    """``n`` reviews split into prompt and completion; each review has its own mood."""
    rng = random.Random(f"sft-{seed}")
    rows = {"prompt": [], "completion": []}
    for _ in range(n):
        mood = rng.random()
        rows["prompt"].append(sample_prompt(rng, mood))
        rows["completion"].append(sample_completion(rng, mood))
    return Dataset.from_dict(rows)


def prompt_dataset(n: int, seed: int = 0, split: str = "rl") -> Dataset:
    """``n`` review openings (for RL or evaluation: different ``split`` names never collide)."""
    rng = random.Random(f"prompts-{split}-{seed}")
    return Dataset.from_dict({"prompt": [sample_prompt(rng, rng.random()) for _ in range(n)]})


def bradley_terry_prefers_first(score_a: float, score_b: float, rng: random.Random,
                                scale: float = BT_SCALE) -> bool:
    """Sample a labeller's choice: True with probability sigmoid(scale * (score_a - score_b))."""
    return rng.random() < _sigmoid(scale * (score_a - score_b))


def label_pairs(prompts: Sequence[str], completions_a: Sequence[str],
                completions_b: Sequence[str], seed: int = 0,
                scale: float = BT_SCALE) -> Dataset:
    """Label given completion pairs by Bradley-Terry sampling on the oracle score.

    Pairs of identical completions carry no preference and are dropped.
    """
    rng = random.Random(f"bt-{seed}")
    rows = {"prompt": [], "chosen": [], "rejected": []}
    for prompt, a, b in zip(prompts, completions_a, completions_b, strict=True):
        if a == b:
            continue
        first = bradley_terry_prefers_first(oracle_score(a), oracle_score(b), rng, scale)
        rows["prompt"].append(prompt)
        rows["chosen"].append(a if first else b)
        rows["rejected"].append(b if first else a)
    return Dataset.from_dict(rows)


def preference_pairs(n: int, seed: int = 0, scale: float = BT_SCALE) -> Dataset:
    """``n`` prompts, each with two corpus continuations of independent moods, BT-labelled."""
    rng = random.Random(f"pairs-{seed}")
    prompts, a, b = [], [], []
    while len(prompts) < n:
        prompt = sample_prompt(rng, rng.random())
        ca, cb = sample_completion(rng, rng.random()), sample_completion(rng, rng.random())
        if ca != cb:
            prompts.append(prompt)
            a.append(ca)
            b.append(cb)
    return label_pairs(prompts, a, b, seed=seed, scale=scale)


def policy_preference_pairs(model, tokenizer, prompts: Sequence[str], seed: int = 0,
                            scale: float = BT_SCALE, **sampling) -> Dataset:
    """Two samples of ``model`` per prompt, BT-labelled (the on-policy pairs of the DPO paper)."""
    from ...sampling import generate_completions

    prompts = list(prompts)
    first = generate_completions(model, tokenizer, prompts, seed=seed, **sampling)
    second = generate_completions(model, tokenizer, prompts, seed=seed + 1, **sampling)
    return label_pairs(prompts, first.texts, second.texts, seed=seed, scale=scale)


def unpaired_dataset(n: int, seed: int = 0, scale: float = BT_SCALE) -> Dataset:
    """Thumbs-up/down data for KTO: label True with probability sigmoid(scale * (score - 0.5))."""
    rng = random.Random(f"unpaired-{seed}")
    rows = {"prompt": [], "completion": [], "label": []}
    for _ in range(n):
        prompt = sample_prompt(rng, rng.random())
        completion = sample_completion(rng, rng.random())
        rows["prompt"].append(prompt)
        rows["completion"].append(completion)
        rows["label"].append(rng.random() < _sigmoid(scale * (oracle_score(completion) - 0.5)))
    return Dataset.from_dict(rows)


def to_conversational(dataset: Dataset) -> Dataset:
    """The same rows as lists of messages: the prompt as a user turn, answers as assistant turns.

    The chat template puts the space before an assistant turn, so answers lose their own.
    """

    def convert(row):
        out = {"prompt": [{"role": "user", "content": row["prompt"]}]}
        for key in ("completion", "chosen", "rejected"):
            if key in row:
                out[key] = [{"role": "assistant", "content": row[key].strip()}]
        return out

    return dataset.map(convert)
