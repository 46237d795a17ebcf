"""Judge a policy with the oracle: sample held-out prompts, score what comes back."""

from __future__ import annotations

from statistics import mean

from ..sampling import generate_completions
from .task import is_well_formed, oracle_score


def evaluate_policy(model, tokenizer, prompts: list[str], max_new_tokens: int = 32,
                    temperature: float = 1.0, seed: int = 0, progress: bool = False) -> dict:
    """Mean oracle score, fraction well formed (finished with eos and grammatical), length.

    Returns floats keyed ``oracle_score``, ``well_formed``, ``mean_length`` (tokens, eos
    included), plus ``completions`` (the texts) for inspection.
    """
    out = generate_completions(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                               temperature=temperature, seed=seed, progress=progress)
    scores = [oracle_score(t) for t in out.texts]
    formed = [f and is_well_formed(t) for t, f in zip(out.texts, out.finished)]
    return {
        "oracle_score": mean(scores),
        "well_formed": mean(formed),
        "mean_length": mean(len(ids) for ids in out.ids),
        "completions": out.texts,
    }
