"""The tiny world's task: controlled-sentiment continuation of short movie reviews.

Modelled on the DPO paper's IMDb experiment (Rafailov et al. 2023, sec. 6.1): a prompt is
the opening of a review, the policy continues it, and a sentiment scorer plays the human.
Here the reviews come from a small grammar, so the scorer (the *oracle*) is exact and
documented, and every stage of the pipeline can be judged offline in seconds.

A review is sentences of three shapes, each carrying exactly one sentiment word:

    the <aspect> was [very|not] <adjective> .      e.g. "the plot was very slow ."
    i <verb> the <aspect> .                        e.g. "i loved the music ."
    <count> stars .                                e.g. "four stars ."

The oracle (``oracle_score``) reads a completion sentence by sentence. A sentence's
polarity p is the lexicon value of its sentiment word (``LEXICON``, in [-1, 1]); "very"
before it multiplies p by 1.5 (clipped to [-1, 1]); "not" before it gives -0.5 * p. A
sentence with no sentiment word has p = 0. The score is (1 + mean p) / 2, in [0, 1];
text with no sentence scores 0.5. Only the completion is scored, never the prompt.
"""

from __future__ import annotations

import random
import re

ASPECTS = (
    "acting", "plot", "script", "music", "ending", "pacing",
    "dialogue", "cast", "story", "direction", "soundtrack", "editing",
)
TITLES = (
    "the film", "this movie", "the sequel", "this drama",
    "the comedy", "this thriller", "the documentary", "this western",
)
OPENERS = (
    "i watched {t} last night .",
    "i saw {t} with friends .",
    "we rented {t} on friday .",
    "{t} opened this week .",
    "my sister picked {t} .",
)

ADJECTIVES = {
    "brilliant": 1.0, "superb": 1.0, "wonderful": 1.0, "excellent": 1.0,
    "good": 0.5, "charming": 0.5, "solid": 0.5, "pleasant": 0.5,
    "ordinary": 0.0, "long": 0.0, "loud": 0.0, "simple": 0.0,
    "weak": -0.5, "flat": -0.5, "slow": -0.5, "messy": -0.5,
    "awful": -1.0, "terrible": -1.0, "dreadful": -1.0, "boring": -1.0,
}
VERBS = {"loved": 1.0, "liked": 0.5, "disliked": -0.5, "hated": -1.0}
STARS = {"five": 1.0, "four": 0.5, "three": 0.0, "two": -0.5, "one": -1.0}
LEXICON: dict[str, float] = {**ADJECTIVES, **VERBS, **STARS}

_ASPECT = "(?:" + "|".join(ASPECTS) + ")"
_SENTENCES = (
    re.compile(rf"the {_ASPECT} was (?:(?:very|not) )?(?:{'|'.join(ADJECTIVES)})"),
    re.compile(rf"i (?:{'|'.join(VERBS)}) the {_ASPECT}"),
    re.compile(rf"(?:{'|'.join(STARS)}) stars?"),
)


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text``: the pieces between '.' marks, stripped, empty ones dropped."""
    return [s.strip() for s in text.split(".") if s.strip()]


def sentence_polarity(sentence: str) -> float:
    """Polarity in [-1, 1] of one sentence: its last sentiment word, with "very"/"not"."""
    words = sentence.split()
    for i in range(len(words) - 1, -1, -1):
        value = LEXICON.get(words[i])
        if value is None:
            continue
        before = words[i - 1] if i > 0 else ""
        if before == "very":
            return max(-1.0, min(1.0, 1.5 * value))
        if before == "not":
            return -0.5 * value
        return value
    return 0.0


def oracle_score(completion: str) -> float:
    """Sentiment of a completion in [0, 1]: (1 + mean sentence polarity) / 2; 0.5 if empty."""
    sentences = split_sentences(completion)
    if not sentences:
        return 0.5
    return (1.0 + sum(sentence_polarity(s) for s in sentences) / len(sentences)) / 2.0


def is_well_formed(completion: str) -> bool:
    """True when the completion is one or more complete grammar sentences, each ending in '.'."""
    text = completion.strip()
    if not text.endswith("."):
        return False
    sentences = split_sentences(text)
    return bool(sentences) and all(
        any(p.fullmatch(s) for p in _SENTENCES) for s in sentences
    )


# ---------------------------------------------------------------------------------------
# Review generation
# ---------------------------------------------------------------------------------------

def _words_with(table: dict[str, float], cond) -> list[str]:
    return [w for w, v in table.items() if cond(v)]


def sample_sentence(rng: random.Random, mood: float) -> str:
    """One sentence whose sign is positive with probability ``mood`` (15% neutral)."""
    u = rng.random()
    sign = 0 if u < 0.15 else (1 if rng.random() < mood else -1)
    aspect = rng.choice(ASPECTS)
    shape = rng.random()
    if sign == 0:
        if shape < 0.85:
            return f"the {aspect} was {rng.choice(_words_with(ADJECTIVES, lambda v: v == 0))} ."
        return "three stars ."
    if shape < 0.55:
        if sign < 0 and rng.random() < 0.2:  # negation of a positive word
            return f"the {aspect} was not {rng.choice(_words_with(ADJECTIVES, lambda v: v > 0))} ."
        adj = rng.choice(_words_with(ADJECTIVES, lambda v: v * sign > 0))
        very = "very " if rng.random() < 0.2 else ""
        return f"the {aspect} was {very}{adj} ."
    if shape < 0.85:
        return f"i {rng.choice(_words_with(VERBS, lambda v: v * sign > 0))} the {aspect} ."
    count = rng.choice(_words_with(STARS, lambda v: v * sign > 0))
    return f"{count} {'star' if count == 'one' else 'stars'} ."


def sample_prompt(rng: random.Random, mood: float) -> str:
    """A review opening: a neutral opener naming the title, then one sentence of the mood."""
    opener = rng.choice(OPENERS).format(t=rng.choice(TITLES))
    return f"{opener} {sample_sentence(rng, mood)}"


def sample_completion(rng: random.Random, mood: float, min_sentences: int = 2,
                      max_sentences: int = 3) -> str:
    """A continuation: 2-3 sentences of the same mood, with a leading space."""
    n = rng.randint(min_sentences, max_sentences)
    return " " + " ".join(sample_sentence(rng, mood) for _ in range(n))
