"""Pairwise judges for RLAIF: ``judge(prompts, responses_a, responses_b) -> P(a preferred)``.

Three kinds, one interface (``PairwiseJudge``):
- ``LMJudge``: a causal LM asked which of two responses is better, as in RLAIF (Lee et al.
  2023) and Constitutional AI (Bai et al. 2022): a preamble (the criteria, or a principle
  sampled per comparison), the context, both responses, and an answer prefix such as
  "Preferred response:"; the label is the softmax over the judge's next-token logits of the
  two option tokens (``option_probability``), a soft probability. Each pair is judged in both
  orders and the two averaged (``average_orders``), because judges favour a position;
  ``position_bias`` measures how much.
- ``RewardModelJudge``: sigmoid of the difference of a reward model's scores.
- ``FunctionJudge``: sigmoid of the scaled difference of a Python scoring function's
  scores (a Bradley-Terry labeller on any scorer, e.g. VADER).

``label_samples`` turns prompts and several samples per prompt into a TRL-format
preference dataset with the soft label in ``chosen_probability`` (which the preference and
reward trainers read), batched, with progress, resumable from a JSON-lines file.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

# The preamble asks the question; {principle} is the criteria (or one principle sampled per
# comparison). The answer prefix follows the judge's own generation prompt.
DEFAULT_TEMPLATE = ("{principle}\n\nContext:\n{prompt}\n\nResponse A:\n{response_a}\n\n"
                    "Response B:\n{response_b}\n\nWhich response is better? Answer A or B.")
DEFAULT_PRINCIPLE = "Compare two responses to the same context."
DEFAULT_ANSWER_PREFIX = "Preferred response:"
DEFAULT_OPTIONS = (" A", " B")


# ---------------------------------------------------------------------------------------
# the math: pure functions
# ---------------------------------------------------------------------------------------

def option_probability(logits: Tensor, option_ids: tuple[int, int]) -> Tensor:
    """P(first option) from next-token logits: the softmax over the two option tokens'
    logits alone, sigma(z_a - z_b). Shapes: [N, V] -> [N] (float32)."""
    z = logits[:, list(option_ids)].float()
    return torch.sigmoid(z[:, 0] - z[:, 1])


def average_orders(p_ab: Tensor, p_ba: Tensor) -> Tensor:
    """P(a preferred) from both orders: p_ab = P(first wins) with a shown first, p_ba with b
    shown first; (p_ab + 1 - p_ba) / 2, which cancels a constant bias towards a position.
    Shapes [N], [N] -> [N]."""
    return (p_ab + 1 - p_ba) / 2


def position_bias(p_ab: Tensor, p_ba: Tensor) -> dict[str, float]:
    """How much a judge favours a position, from both orders' P(first shown wins) [N]:
    ``order_agreement``, the fraction of pairs whose winner is the same in both orders (1.0:
    no position effect on any decision); ``first_position_rate``, how often the first shown
    response wins over both orders (0.5: no bias); ``mean_first_probability``."""
    agree = ((p_ab > 0.5) == (p_ba < 0.5)).float().mean().item()
    first = torch.cat([p_ab, p_ba])
    return {"order_agreement": agree, "first_position_rate": (first > 0.5).float().mean().item(),
            "mean_first_probability": first.mean().item()}


def bradley_terry(score_a: Tensor, score_b: Tensor, scale: float = 1.0) -> Tensor:
    """P(a preferred) = sigma(scale * (s_a - s_b)). Shapes [N], [N] -> [N]."""
    return torch.sigmoid(scale * (score_a.float() - score_b.float()))


# ---------------------------------------------------------------------------------------
# judges
# ---------------------------------------------------------------------------------------

@dataclass
class Judgement:
    """A judge's verdicts on N pairs: ``probabilities`` P(a preferred) [N]; for a judge that
    reads the pair in both orders, ``forward`` (a first) and ``backward`` (b first), each
    P(first shown wins) [N]."""

    probabilities: Tensor
    forward: Tensor | None = None
    backward: Tensor | None = None

    @property
    def agreement(self) -> Tensor | None:
        """Per pair: both orders pick the same winner."""
        if self.forward is None or self.backward is None:
            return None
        return (self.forward > 0.5) == (self.backward < 0.5)


class PairwiseJudge:
    """``judge(prompts, responses_a, responses_b)``: P(a preferred) for each pair, floats."""

    def judgement(self, prompts: Sequence, responses_a: Sequence,
                  responses_b: Sequence) -> Judgement:
        raise NotImplementedError

    def judge(self, prompts: Sequence, responses_a: Sequence,
              responses_b: Sequence) -> list[float]:
        if not len(prompts) == len(responses_a) == len(responses_b):
            raise ValueError(f"a judge needs as many prompts as responses of each side, got "
                             f"{len(prompts)}, {len(responses_a)} and {len(responses_b)}")
        return self.judgement(prompts, responses_a, responses_b).probabilities.tolist()

    __call__ = judge


def as_text(value) -> str:
    """A prompt or response as plain text: a string as is; a conversation (list of
    messages) as its turns, one "role: content" line each (a lone reply: its content)."""
    if isinstance(value, str):
        return value
    if len(value) == 1 and value[0].get("role") == "assistant":
        return value[0]["content"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in value)


class LMJudge(PairwiseJudge):
    """A causal LM as a pairwise judge (see the module docstring).

    ``template`` has the fields {principle}, {prompt}, {response_a}, {response_b};
    ``principles``: one is drawn per comparison (the same for both orders) with ``seed``;
    ``options``: the two answer texts, each one token after ``answer_prefix``;
    ``use_chat_template`` (default: when the tokenizer has one): the filled template is the
    user's turn and the answer prefix starts the assistant's; ``both_orders``: judge each
    pair twice, swapped, and average (``average_orders``). Batches of ``batch_size``
    comparisons, right-padded; the LM head runs on each row's last position only.
    """

    def __init__(self, model, tokenizer, template: str = DEFAULT_TEMPLATE,
                 principles: Sequence[str] = (DEFAULT_PRINCIPLE,),
                 answer_prefix: str = DEFAULT_ANSWER_PREFIX,
                 options: tuple[str, str] = DEFAULT_OPTIONS, use_chat_template: bool | None = None,
                 both_orders: bool = True, batch_size: int = 8, seed: int = 0,
                 progress: bool = False):
        if not principles:
            raise ValueError("principles is empty: give at least one (the judging criteria)")
        for name in ("principle", "prompt", "response_a", "response_b"):
            if "{" + name + "}" not in template:
                raise ValueError(f"the judge template has no {{{name}}} field: {template!r}")
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.principles, self.answer_prefix = list(principles), answer_prefix
        self.option_ids = tuple(self._single_token(o) for o in options)
        if self.option_ids[0] == self.option_ids[1]:
            raise ValueError(f"options {options} are the same token")
        self.use_chat_template = (bool(getattr(tokenizer, "chat_template", None))
                                  if use_chat_template is None else use_chat_template)
        self.both_orders, self.batch_size = both_orders, batch_size
        self.seed, self.progress = seed, progress

    def _single_token(self, option: str) -> int:
        ids = self.tokenizer(option, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"judge option {option!r} is {len(ids)} tokens {ids} for this "
                             "tokenizer; give options that are one token each (e.g. ' A', ' B')")
        return ids[0]

    def render(self, prompt, first, second, principle: str) -> str:
        """The judge's full input text for one comparison, ``first`` shown as A."""
        text = self.template.format(principle=principle, prompt=as_text(prompt),
                                    response_a=as_text(first), response_b=as_text(second))
        if self.use_chat_template:
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                      tokenize=False, add_generation_prompt=True)
            return text + self.answer_prefix
        return f"{text}\n{self.answer_prefix}"

    @torch.no_grad()
    def first_probabilities(self, texts: list[str]) -> Tensor:
        """P(first option) for each rendered comparison [N]."""
        from .data import _pad
        from .logps import final_hidden, output_head

        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        out = []
        try:
            starts = range(0, len(texts), self.batch_size)
            for start in tqdm(starts, desc="judging", disable=not self.progress):
                rows = [self.tokenizer(t, add_special_tokens=False)["input_ids"]
                        for t in texts[start:start + self.batch_size]]
                ids = _pad(rows, self.tokenizer.pad_token_id or 0).to(device)
                mask = _pad([[1] * len(r) for r in rows], 0).to(device)
                hidden = final_hidden(self.model, input_ids=ids, attention_mask=mask)
                last = torch.tensor([len(r) - 1 for r in rows], device=device)
                logits = output_head(self.model)(hidden[torch.arange(len(rows)), last])
                out.append(option_probability(logits, self.option_ids).cpu())
        finally:
            self.model.train(was_training)
        return torch.cat(out) if out else torch.zeros(0)

    def judgement(self, prompts, responses_a, responses_b) -> Judgement:
        rng = random.Random(self.seed)
        principles = [rng.choice(self.principles) for _ in prompts]
        forward = self.first_probabilities([self.render(p, a, b, c) for p, a, b, c in
                                            zip(prompts, responses_a, responses_b, principles)])
        if not self.both_orders:
            return Judgement(forward, forward)
        backward = self.first_probabilities([self.render(p, b, a, c) for p, a, b, c in
                                             zip(prompts, responses_a, responses_b, principles)])
        return Judgement(average_orders(forward, backward), forward, backward)


class RewardModelJudge(PairwiseJudge):
    """P(a preferred) = sigmoid(r(a) - r(b)) from a reward model (rlhf_ext.RewardModel or
    any one-label sequence classifier), scored as in training (``reward.score``)."""

    def __init__(self, model, tokenizer, batch_size: int = 32, max_length: int | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.max_length = batch_size, max_length

    def judgement(self, prompts, responses_a, responses_b) -> Judgement:
        from .reward import score

        n = len(prompts)
        rewards = torch.tensor(score(self.model, self.tokenizer, list(prompts) * 2,
                                     list(responses_a) + list(responses_b), self.batch_size,
                                     self.max_length))
        return Judgement(bradley_terry(rewards[:n], rewards[n:]))


class FunctionJudge(PairwiseJudge):
    """P(a preferred) = sigmoid(scale * (f(a) - f(b))) for a scoring function
    ``f(prompts, completions) -> list[float]`` (a reward function's signature)."""

    def __init__(self, score_fn: Callable[[list, list], list[float]], scale: float = 1.0):
        self.score_fn, self.scale = score_fn, scale

    def judgement(self, prompts, responses_a, responses_b) -> Judgement:
        a = torch.tensor(self.score_fn(list(prompts), list(responses_a)), dtype=torch.float32)
        b = torch.tensor(self.score_fn(list(prompts), list(responses_b)), dtype=torch.float32)
        return Judgement(bradley_terry(a, b, self.scale))


# ---------------------------------------------------------------------------------------
# labelling
# ---------------------------------------------------------------------------------------

def comparisons(samples: Sequence[Sequence], pairing: str = "all") -> list[tuple[int, int, int]]:
    """(prompt index, i, j) for the pairs of each prompt's samples to judge: ``all`` every
    two of them; ``disjoint`` (0, 1), (2, 3), ... (each sample in one pair)."""
    if pairing not in ("all", "disjoint"):
        raise ValueError(f"pairing must be 'all' or 'disjoint', got {pairing!r}")
    out = []
    for k, group in enumerate(samples):
        n = len(group)
        pairs = combinations(range(n), 2) if pairing == "all" else \
            ((i, i + 1) for i in range(0, n - 1, 2))
        out.extend((k, i, j) for i, j in pairs)
    return out


def label_samples(judge: PairwiseJudge, prompts: Sequence, samples: Sequence[Sequence],
                  pairing: str = "all", batch_size: int = 64, path: str | Path | None = None,
                  progress: bool = True):
    """Prompts and each prompt's samples -> a preference Dataset: prompt, chosen, rejected,
    ``chosen_probability`` (the judge's P(chosen preferred), >= 0.5: the likelier winner is
    chosen), ``confidence`` |2p - 1|, ``order_agreement`` (both orders picked the chosen
    one; True for judges that read one order) and, for judges that read both orders,
    ``chosen_probability_shown_first`` / ``_shown_second``: each order's own P(chosen
    preferred), whose mean is the soft label. Judged ``batch_size`` comparisons at a time;
    with ``path`` every finished batch is appended there as JSON lines and a rerun judges
    only what is missing (the comparisons must be the same)."""
    from datasets import Dataset

    from .data import as_replies

    if len(prompts) != len(samples):
        raise ValueError(f"{len(prompts)} prompts but {len(samples)} groups of samples")
    todo = comparisons(samples, pairing)
    rows: list[dict] = []
    path = Path(path) if path is not None else None
    if path is not None and path.exists():
        rows = _read_labels(path)
        if len(rows) > len(todo):
            raise ValueError(f"{path} holds {len(rows)} labels for {len(todo)} comparisons: "
                             "it belongs to other samples; delete it")
    starts = range(len(rows), len(todo), batch_size)
    for start in tqdm(starts, desc="labelling", disable=not progress):
        batch = todo[start:start + batch_size]
        ps = [prompts[k] for k, _, _ in batch]
        a = [samples[k][i] for k, i, _ in batch]
        b = [samples[k][j] for k, _, j in batch]
        verdict = judge.judgement(ps, a, b)
        agree = verdict.agreement
        new = []
        for n, (prompt, x, y) in enumerate(zip(ps, a, b)):
            p = float(verdict.probabilities[n])
            if not math.isfinite(p):
                raise ValueError(f"the judge returned {p} for comparison {start + n}")
            a_wins = p >= 0.5
            win, lose = (x, y) if a_wins else (y, x)
            chosen, rejected = as_replies([prompt] * 2, [as_text(win), as_text(lose)])
            row = {"prompt": prompt, "chosen": chosen, "rejected": rejected,
                   "chosen_probability": max(p, 1 - p), "confidence": abs(2 * p - 1),
                   "order_agreement": True if agree is None else bool(agree[n])}
            if agree is not None:  # each order's own verdict on the chosen response
                fwd, bwd = float(verdict.forward[n]), float(verdict.backward[n])
                row["chosen_probability_shown_first"] = fwd if a_wins else bwd
                row["chosen_probability_shown_second"] = 1 - bwd if a_wins else 1 - fwd
            new.append(row)
        rows.extend(new)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as f:
                f.writelines(json.dumps(r) + "\n" for r in new)
    return Dataset.from_list(rows)


def _read_labels(path: Path) -> list[dict]:
    """The labels a run appended to ``path``, one JSON object a line. A kill during an
    append can leave the last line cut short: it is dropped (with a warning) and the file
    rewritten without it, so that comparison is judged again. A bad line anywhere else
    means the file was edited or belongs to something else: refused, naming the line."""
    import warnings

    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows = []
    for n, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if n < len(lines) - 1:
                raise ValueError(f"{path}, line {n + 1}: not a JSON label ({line[:60]!r}); "
                                 "the file was edited or damaged: delete it to judge again"
                                 ) from None
            warnings.warn(f"{path}: its last line was cut short (a run stopped while writing "
                          "it); dropping it and judging that comparison again", stacklevel=3)
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows
