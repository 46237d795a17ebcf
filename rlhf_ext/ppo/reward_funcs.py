"""Reward functions as TRL's GRPOTrainer takes them: one or a list of callables, reward
models (a loaded sequence classifier, ``RewardModel``, or a path to one), weighted.

A callable receives, by keyword, ``prompts``, ``completions`` (a list of assistant
messages when the prompts are conversations), ``completion_ids``, ``trainer_state`` and
every other dataset column of the rows, and returns one float per completion, or None
for a completion it does not judge. It takes the keywords it names (all of them with
``**kwargs``); a function naming neither ``prompts`` nor ``completions``, such as
``lambda p, c: ...``, gets the two positionally.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..data import as_replies

Scorer = Callable[..., list]


def completion_text(completion) -> str:
    """A completion's text: itself, or the content of its last message when it comes as a
    list of messages (after chat prompts)."""
    return completion if isinstance(completion, str) else completion[-1]["content"]


def function_name(func) -> str:
    """The name a reward function is logged under (TRL's: a model's path tail)."""
    if isinstance(func, nn.Module):
        path = getattr(getattr(func, "config", None), "_name_or_path", "") or type(func).__name__
        return path.rstrip("/").split("/")[-1]
    return getattr(func, "__name__", None) or type(func).__name__


def _keyword_call(func: Callable, kwargs: dict) -> list:
    try:
        params = inspect.signature(func).parameters
    except (TypeError, ValueError):  # a builtin: positional
        return func(kwargs["prompts"], kwargs["completions"])
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return func(**kwargs)
    if "prompts" in params or "completions" in params:
        return func(**{k: v for k, v in kwargs.items() if k in params})
    return func(kwargs["prompts"], kwargs["completions"])


def checked_values(name: str, values, completions: list) -> list[float]:
    """A reward function's output as floats (None -> NaN), checked: one finite real
    number or None per completion, else an error naming the function and the row."""
    if isinstance(values, Tensor):
        values = values.detach().float().flatten().tolist()
    if not isinstance(values, (list, tuple)) or len(values) != len(completions):
        got = f"{len(values)} values" if hasattr(values, "__len__") else type(values).__name__
        raise ValueError(f"reward function {name} returned {got} for {len(completions)} "
                         "completions: return a list with one float (or None) per completion")
    out = []
    for i, v in enumerate(values):
        if v is None:
            out.append(math.nan)
            continue
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise TypeError(f"reward function {name}: score {i} is {v!r} "
                            f"({type(v).__name__}); return floats, or None to skip")
        if not math.isfinite(v):
            raise ValueError(f"reward function {name}: score {i} is {v} for completion "
                             f"{str(completions[i])[:60]!r}; return finite scores, or None "
                             "for a completion the function does not judge")
        out.append(float(v))
    return out


class RewardFunctions:
    """Several scorers with weights. Calling it gives the per-function scores [B, F]
    (NaN where a function returned None) and the weighted sum [B] (NaN where every
    function returned None: no score, no advantage)."""

    def __init__(self, funcs: list[Scorer], names: list[str], weights: list[float] | None,
                 modules: list[nn.Module] = ()):
        if weights is not None and len(weights) != len(funcs):
            raise ValueError(f"reward_weights has {len(weights)} values for {len(funcs)} reward "
                             "functions: give one weight per function")
        self.funcs, self.names, self.modules = funcs, names, list(modules)
        self.weights = torch.tensor(weights if weights is not None else [1.0] * len(funcs))

    def __call__(self, prompts: list, completions: list[str], completion_ids: list[list[int]],
                 columns: dict[str, list] | None = None, trainer_state=None
                 ) -> tuple[Tensor, Tensor]:
        replies = as_replies(prompts, completions)
        kwargs = {"prompts": prompts, "completions": replies, "completion_ids": completion_ids,
                  "trainer_state": trainer_state, **(columns or {})}
        per_func = torch.tensor([checked_values(name, _keyword_call(func, kwargs), completions)
                                 for func, name in zip(self.funcs, self.names)],
                                dtype=torch.float32).T.reshape(len(completions), len(self.funcs))
        total = (per_func * self.weights).nansum(1)
        total[torch.isnan(per_func).all(1)] = math.nan
        return per_func, total

    def score_rows(self, rows: list[dict], completions: list[str],
                   completion_ids: list[list[int]], trainer_state=None) -> tuple[Tensor, Tensor]:
        """The same, from dataset rows: "prompt" and the columns the functions read."""
        columns = {k: [r[k] for r in rows] for k in rows[0] if k != "prompt"}
        return self([r["prompt"] for r in rows], completions, completion_ids, columns,
                    trainer_state)


def build_reward_functions(reward, reward_tokenizer, tokenizer, args, dtype
                           ) -> RewardFunctions:
    """``reward`` (one or a list: callables, reward models, paths to reward models) as
    one ``RewardFunctions``, each model checked and frozen, with ``args.reward_weights``.
    ``reward_tokenizer``: one tokenizer, or one per function (None: the policy's)."""
    from ..heads import check_scalar_head
    from ..models import disable_dropout, keep_4bit_differentiable
    from ..reward import tokenizer_mismatch

    funcs = list(reward) if isinstance(reward, (list, tuple)) else [reward]
    tokenizers = (list(reward_tokenizer) if isinstance(reward_tokenizer, (list, tuple))
                  else [reward_tokenizer] * len(funcs))
    scorers, names, modules = [], [], []
    for func, tok in zip(funcs, tokenizers):
        if isinstance(func, str):  # a reward model's path, as TRL takes it
            from transformers import AutoModelForSequenceClassification, AutoTokenizer

            tok = tok or AutoTokenizer.from_pretrained(func)
            func = AutoModelForSequenceClassification.from_pretrained(func, num_labels=1,
                                                                      dtype=dtype)
        names.append(function_name(func))
        if not isinstance(func, nn.Module):
            scorers.append(func)
            continue
        check_scalar_head(func)
        keep_4bit_differentiable(func)
        func.eval().requires_grad_(False)
        if args.disable_dropout:
            disable_dropout(func)
        problem = None if tok else tokenizer_mismatch(func, tokenizer)
        if problem:
            raise ValueError(f"the reward model cannot read the policy's tokens: {problem}. "
                             "Pass its own tokenizer as reward_tokenizer= (the PPO recipe "
                             "loads it from --reward_model_path); completions are "
                             "re-tokenized with it before scoring.")
        tok = tok or tokenizer
        config = getattr(func, "config", None)
        if config is not None and getattr(config, "pad_token_id", None) is None:
            config.pad_token_id = tok.pad_token_id  # a sequence classifier pools by it
        modules.append(func)
        scorers.append(reward_model_scorer(func, tok, args.local_rollout_forward_batch_size))
    return RewardFunctions(scorers, names, args.reward_weights, modules)


def reward_model_scorer(model, tokenizer, batch_size: int) -> Scorer:
    """A reward model (``RewardModel`` or a one-label sequence classifier) as a scorer:
    prompt + completion tokenized as the model was trained (``reward.score``)."""
    from ..reward import score

    def scorer(prompts, completions, **_):
        return score(model, tokenizer, prompts, completions, batch_size=batch_size)

    return scorer
