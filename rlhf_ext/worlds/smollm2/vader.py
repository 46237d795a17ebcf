"""VADER's compound sentiment as a scorer and a reward function: the real world's ground
truth, which nobody here wrote (``pip install vaderSentiment``, the ``real`` extra)."""

from __future__ import annotations

import functools


@functools.cache
def _vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def vader_scores(texts: list[str]) -> list[float]:
    """VADER's compound sentiment of each text, in [-1, 1] (lexicon and rules: gameable by
    repeating positive words)."""
    return [_vader().polarity_scores(t)["compound"] for t in texts]


def vader_reward(prompts: list, completions: list) -> list[float]:
    """A reward function: the completion's VADER compound score. Completions come as
    text, or after chat prompts as TRL passes them, a list holding the assistant message."""
    from ...ppo.reward_funcs import completion_text

    return vader_scores([completion_text(c) for c in completions])
