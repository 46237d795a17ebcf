"""Verifiable rewards on the real model: two-digit addition, every answer checked exactly.

Problems are "What is a + b? Answer with the number only." for 10 <= a, b <= 49 (1600 of
them), shuffled with a seed; the first ``held_out`` are the held-out split, the rest the
training split, so the two share no problem. SmolLM2-135M-Instruct starts well inside
(0, 1) on them: on 96 held-out problems 34% greedily and 16% sampled at temperature 0.7,
mostly answering as "27 + 48 = 75", a reply the correctness reward reads.

The reward functions are written as TRL's GRPOTrainer takes them (keyword arguments, one
float per completion; the ``answer`` column arrives by name):
``correctness_reward`` (1 if the reply's last number is the answer), ``format_reward``
(1 for a one-line reply that ends in a number) and ``overlong_penalty`` (DAPO's soft
punishment of replies near the length limit).
"""

from __future__ import annotations

import random
import re

INSTRUCTION = "Answer with the number only."
LOW, HIGH = 10, 49  # both terms
MAX_COMPLETION_TOKENS = 16  # recipes/smollm2/rlvr.yaml's response_length


def addition_problems(seed: int = 0, held_out: int = 96) -> tuple[list[dict], list[dict]]:
    """(train, held-out) rows: ``prompt`` (one user message) and ``answer`` (the sum, as
    text). Every (a, b) pair is in exactly one split; ``seed`` decides which."""
    pairs = [(a, b) for a in range(LOW, HIGH + 1) for b in range(LOW, HIGH + 1)]
    random.Random(seed).shuffle(pairs)
    if not 0 < held_out < len(pairs):
        raise ValueError(f"held_out must be between 1 and {len(pairs) - 1}, got {held_out}")
    rows = [{"prompt": [{"role": "user", "content": f"What is {a} + {b}? {INSTRUCTION}"}],
             "answer": str(a + b)} for a, b in pairs]
    return rows[held_out:], rows[:held_out]


def _text(completion) -> str:
    return completion if isinstance(completion, str) else completion[-1]["content"]


def final_number(text: str) -> str | None:
    """The last integer written in ``text`` (its digits, sign kept), or None."""
    found = re.findall(r"-?\d+", text)
    return found[-1] if found else None


def correctness_reward(completions: list, answer: list[str], **kwargs) -> list[float]:
    """1.0 where the reply's last number is the answer, else 0.0."""
    return [1.0 if final_number(_text(c)) == a else 0.0 for c, a in zip(completions, answer)]


def format_reward(completions: list, **kwargs) -> list[float]:
    """1.0 for a reply of one line ending in a number ("75", "27 + 48 = 75"), else 0.0."""
    return [1.0 if re.fullmatch(r"[^\n]*?-?\d+\s*", _text(c)) else 0.0 for c in completions]


def overlong_penalty(max_tokens: int, soft: int):
    """DAPO's soft overlong punishment as a reward function: 0 up to ``max_tokens - soft``
    completion tokens, then falling linearly to -1 at ``max_tokens`` (and beyond)."""
    if not 0 < soft <= max_tokens:
        raise ValueError(f"need 0 < soft <= max_tokens, got soft={soft}, max_tokens={max_tokens}")

    def overlong_penalty(completion_ids: list[list[int]], **kwargs) -> list[float]:
        start = max_tokens - soft
        return [-min(1.0, max(0, len(ids) - start) / soft) for ids in completion_ids]

    return overlong_penalty


# the penalty of recipes/smollm2/rlvr.yaml (a reward given by 'module:function'): from 12
# completion tokens on; "27 + 48 = 75" and its end-of-sequence token take 11
overlong_reward = overlong_penalty(MAX_COMPLETION_TOKENS, 4)
