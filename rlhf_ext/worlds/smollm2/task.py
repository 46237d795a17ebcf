"""The controlled-sentiment task of the DPO paper, on SmolLM2 with VADER as ground truth.

Films are made up from a genre and a qualifier ("a Korean heist thriller"); the held-out
films are never seen in training. The policy is asked for a one-sentence review; the
ground-truth reward is VADER's compound sentiment of what it writes. Preference pairs come
from the reference model's own samples, labelled by a Bradley-Terry model on VADER.

Pure helpers: the prompts, the labelling, and the statistics the demo reports.
"""

from __future__ import annotations

import math
import random
import re
from itertools import combinations

GENRES = ["space opera", "courtroom drama", "silent comedy", "nature documentary",
          "heist thriller", "musical", "war epic", "ghost story", "cooking film",
          "sports biopic", "animated fable", "detective mystery", "western",
          "romantic comedy", "zombie film", "superhero film", "road movie", "spy thriller",
          "period drama", "disaster film"]
QUALIFIERS = ["French", "Korean", "1970s", "black-and-white", "three-hour"]
ASKS = ["Write a one-sentence review of {}.", "In one sentence, what did you think of {}?",
        "Give a short opinion of {} you just watched."]
STEERS = ["Write a one-sentence {tone} review of {film}.",
          "In one {tone} sentence, review {film}.", "Give a {tone} one-line opinion of {film}."]


def films(seed: int = 0, held_out: int = 22) -> tuple[list[str], list[str]]:
    """(train films, held-out films): the 100 genre x qualifier films, shuffled by seed."""
    every = [f"a {q} {g}" for g in GENRES for q in QUALIFIERS]
    random.Random(seed).shuffle(every)
    return every[held_out:], every[:held_out]


def conversation(request: str) -> list[dict]:
    """The request as the one user turn (the chat template adds SmolLM2's own system
    prompt). A shorter system prompt ("You are a film critic.") saved 10 tokens a
    sequence, but a reward head on the pairs it gave ranked held-out pairs at 0.59, not
    0.81 (tests/test_real_model.py)."""
    return [{"role": "user", "content": request}]


def review_prompts(film_names: list[str], asks: int = len(ASKS)) -> list[list[dict]]:
    """The first ``asks`` requests about every film, as conversations."""
    return [conversation(ask.format(film)) for film in film_names for ask in ASKS[:asks]]


def bradley_terry_prob(score_a: float, score_b: float, scale: float) -> float:
    """P(a preferred to b) = sigmoid(scale * (score_a - score_b))."""
    return 1.0 / (1.0 + math.exp(-scale * (score_a - score_b)))


def label_pairs(groups: list[list[tuple[str, float]]], min_gap: float, scale: float | None,
                seed: int = 0) -> list[tuple[int, str, str, float, float]]:
    """Pairs within each group of (text, score): (group index, chosen, rejected, chosen
    score, rejected score) for every two texts whose scores differ by ``min_gap`` or more.
    The chosen one is drawn from the Bradley-Terry model with ``scale`` (a noisy labeller,
    like a human rater), or is the higher-scored one when ``scale`` is None (the truth)."""
    rng = random.Random(seed)
    out = []
    for index, group in enumerate(groups):
        for (a, va), (b, vb) in combinations(group, 2):
            if abs(va - vb) < min_gap:
                continue
            a_wins = va > vb if scale is None else rng.random() < bradley_terry_prob(va, vb, scale)
            out.append((index, a, b, va, vb) if a_wins else (index, b, a, vb, va))
    return out


def steered_requests(film_names: list[str], samples: int) -> list[tuple[str, str]]:
    """(film, request) in groups of ``2 * samples`` per film and steer: ``samples`` asked to
    be glowing, as many scathing (steering gives sentiment to rank; the pairs' prompt is the
    plain request)."""
    return [(film, steer.format(tone=tone, film=film)) for film in film_names
            for steer in STEERS for tone in ("glowing", "scathing") for _ in range(samples)]


_WORD = re.compile(r"[a-z']+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def distinct_n(texts: list[str], n: int = 2) -> float:
    """Unique word n-grams / all word n-grams over the texts (1.0: no n-gram repeats)."""
    grams = [tuple(w[i:i + n]) for w in map(words, texts) for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repeated_word_rate(texts: list[str]) -> float:
    """The fraction of words equal to the word before them ("great great great": 2 of 3),
    over all texts: the crudest way to game a lexicon scorer."""
    pairs = [(a, b) for w in map(words, texts) for a, b in zip(w, w[1:])]
    total = sum(len(w) for w in map(words, texts))
    return sum(a == b for a, b in pairs) / total if total else 0.0


def self_sampled_pairs(model, tokenizer, film_names: list[str], samples: int = 2,
                       max_new_tokens: int = 32, temperature: float = 0.7, min_gap: float = 0.3,
                       scale: float | None = 5.0, seed: int = 0, progress: bool = False,
                       use_vllm: bool = False):
    """Preference pairs of the model's own reviews, labelled on VADER (``label_pairs``
    within each film and steer of ``steered_requests``), under the plain prompt
    "Write a one-sentence review of <film>.".

    Returns a conversational prompt/chosen/rejected Dataset with ``film`` and the VADER
    scores (``chosen_vader``, ``rejected_vader``) as extra columns. ``use_vllm``: the
    reviews sampled on vLLM (``ModelSampler``).
    """
    from datasets import Dataset

    from ...vllm_engine import ModelSampler
    from .vader import vader_scores

    requests = steered_requests(film_names, samples)
    rendered = [tokenizer.apply_chat_template(conversation(r), tokenize=False,
                                              add_generation_prompt=True) for _, r in requests]
    sampler = ModelSampler(model, tokenizer, use_vllm, rendered, max_new_tokens, batch_size=48)
    texts = sampler(rendered, max_new_tokens, temperature, seed=seed, progress=progress).texts
    sampler.close()
    scored = list(zip(texts, vader_scores(texts)))
    size = 2 * samples
    groups = [scored[i:i + size] for i in range(0, len(scored), size)]
    rows = []
    for index, chosen, rejected, vc, vr in label_pairs(groups, min_gap, scale, seed):
        film = requests[index * size][0]
        rows.append({"prompt": conversation(ASKS[0].format(film)),
                     "chosen": [{"role": "assistant", "content": chosen}],
                     "rejected": [{"role": "assistant", "content": rejected}],
                     "film": film, "chosen_vader": vc, "rejected_vader": vr})
    return Dataset.from_list(rows)


def best_of_n_kl(n: int) -> float:
    """KL(best-of-n || base) = log n - (n - 1) / n nats: the analytic value (Stiennon et
    al. 2020, appendix G.3), an upper bound that is exact when no two samples tie."""
    return math.log(n) - (n - 1) / n


def win_rate(scores: list[float], reference: list[float]) -> float:
    """How often each score beats the reference score of the same prompt (ties: 0.5)."""
    wins = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores, reference)]
    return sum(wins) / len(wins)
