"""Rollouts: prompts -> sampled responses -> scores, old/reference log-probs, values ->
shaped rewards and advantages: the experience the Trainer then learns from.

Sequences are laid out as [prompt, left-padded to P | response, right-padded to C], so
every response starts at column P. Per-token tensors have C columns: column j holds
quantities of response token j (its log-prob comes from the logits at column P + j - 1).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..logps import token_logps
from ..sampling import generate_completions
from . import core


@dataclass
class Batch:
    input_ids: Tensor        # [B, P + C]
    attention_mask: Tensor   # [B, P + C]
    position_ids: Tensor     # [B, P + C]
    response_mask: Tensor    # [B, C]: 1 up to and including eos
    prompt_width: int        # P


def build_batch(tokenizer, prompt_ids: list[list[int]], response_ids: list[list[int]],
                device) -> Batch:
    """Left-pad prompts, right-pad responses, positions counted over real tokens only."""
    pad = tokenizer.pad_token_id
    p_width = max(len(p) for p in prompt_ids)
    c_width = max(1, max(len(r) for r in response_ids))
    ids, attn, resp = [], [], []
    for p, r in zip(prompt_ids, response_ids):
        ids.append([pad] * (p_width - len(p)) + p + r + [pad] * (c_width - len(r)))
        attn.append([0] * (p_width - len(p)) + [1] * (len(p) + len(r)) + [0] * (c_width - len(r)))
        resp.append([1] * len(r) + [0] * (c_width - len(r)))
    attention = torch.tensor(attn, device=device)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    return Batch(torch.tensor(ids, device=device), attention, positions,
                 torch.tensor(resp, device=device, dtype=torch.float32), p_width)


def response_logits(model, batch: Batch) -> Tensor:
    """Logits that predict the response tokens. -> [B, C, V]."""
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                position_ids=batch.position_ids, use_cache=False)
    p = batch.prompt_width
    return out.logits[:, p - 1:-1]


def response_logps(logits: Tensor, batch: Batch, temperature: float) -> Tensor:
    """log pi(response token) at the sampling temperature. [B, C, V] -> [B, C]."""
    return token_logps(logits, batch.input_ids[:, batch.prompt_width:], temperature)


def response_values(value_model, batch: Batch) -> Tensor:
    """V of the state before each response token. -> [B, C]."""
    out = value_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                      position_ids=batch.position_ids)
    p = batch.prompt_width
    return out.values[:, p - 1:-1].float()


@dataclass
class RolloutResult:
    experience: dict[str, Tensor]   # tensors with B rows, ready for minibatches
    metrics: dict[str, float]
    prompts: list           # as given: strings or conversations
    completions: list[str]
    scores: list[float]


def render_prompt(tokenizer, prompt) -> str:
    """A prompt as the text the policy continues: a plain string as it is; a conversation
    (TRL's conversational format, a list of role/content messages) through the tokenizer's
    chat template with the generation prompt (the assistant turn's opening) appended."""
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def check_prompts_fit_model(model, tokenizer, prompts: list, response_length: int,
                            name: str = "train") -> None:
    """Before any sampling: every prompt, rendered and tokenized as the rollout does, has
    token ids inside the model's vocabulary and leaves room for ``response_length`` new
    tokens within its positions. Raises ``DataError`` naming the row."""
    from ..data import DataError, check_in_vocabulary, model_limits

    vocab, positions = model_limits(model)
    texts = [render_prompt(tokenizer, p) for p in prompts]
    for row, ids in enumerate(tokenizer(texts, add_special_tokens=False)["input_ids"]):
        where = f"{name} dataset, row {row}, column 'prompt'"
        check_in_vocabulary(ids, vocab, where)
        if positions is not None and len(ids) + response_length > positions:
            raise DataError(f"{where}: {len(ids)} tokens plus "
                            f"response_length={response_length} exceed the model's {positions} "
                            "positions. Shorten or drop the prompt, or lower response_length.")


def _mean_over_processes(value: float, reduce: Callable[[Tensor], Tensor] | None,
                         device) -> float:
    if reduce is None:
        return value
    return reduce(torch.tensor([value], device=device)).mean().item()


def checked_scores(reward: Callable, prompts: list, completions: list[str]) -> list[float]:
    """``reward(prompts, completions)``, checked: one finite real number per completion."""
    import math
    import numbers

    name = getattr(reward, "__qualname__", None) or type(reward).__name__
    values = reward(prompts, completions)
    if isinstance(values, Tensor):
        values = values.detach().float().flatten().tolist()
    if not isinstance(values, (list, tuple)) or len(values) != len(completions):
        got = f"{len(values)} values" if hasattr(values, "__len__") else type(values).__name__
        raise ValueError(f"reward function {name} returned {got} for {len(completions)} "
                         "completions: return a list with one float per completion")
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise TypeError(f"reward function {name}: score {i} is {v!r} "
                            f"({type(v).__name__}); return floats")
        if not math.isfinite(v):
            raise ValueError(f"reward function {name}: score {i} is {v} for completion "
                             f"{completions[i][:60]!r}; return finite scores (clip or "
                             "replace NaN in the function)")
    return [float(v) for v in values]


@torch.no_grad()
def rollout(*, policy, reference: Callable[[Batch], Tensor], value_model, tokenizer,
            prompts: list, reward: Callable[[list, list[str]], list[float]],
            args, kl_coef: float, moments: core.RunningMoments | None, seed: int,
            gather: Callable[[Tensor], Tensor] | None = None) -> RolloutResult:
    """One rollout: sample, score, compute the per-token KL penalty and GAE advantages.
    ``prompts``: strings or conversations. ``gather`` (``accelerator.gather``) makes the
    score statistics and the logged metrics those of all processes' rollouts together."""
    device = next(policy.parameters()).device
    texts = [render_prompt(tokenizer, p) for p in prompts]
    sampled = generate_completions(
        policy, tokenizer, texts, max_new_tokens=args.response_length,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        batch_size=args.local_rollout_forward_batch_size, seed=seed)
    prompt_ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    batch = build_batch(tokenizer, prompt_ids, sampled.ids, device)
    mask = batch.response_mask

    policy.eval()
    value_model.eval()
    logits = response_logits(policy, batch)
    old_logps = response_logps(logits, batch, args.temperature)
    entropy = core.masked_mean(core.entropy_from_logits(logits / args.temperature), mask)
    ref_logps = reference(batch)
    values = response_values(value_model, batch)

    raw = torch.tensor(checked_scores(reward, prompts, sampled.texts), dtype=torch.float32,
                       device=device)
    finished = torch.tensor(sampled.finished, device=device)
    scores = core.penalize_missing_eos(raw, finished, args.missing_eos_penalty)
    scores = core.clip_scores(scores, args.score_clip)
    if moments is not None:
        moments.update(gather(scores) if gather is not None else scores)
        scores = moments.normalize(scores)

    kl = core.per_token_kl(old_logps, ref_logps, args.kl_estimator) * mask
    rewards = core.shape_rewards(scores, kl, mask, kl_coef)
    if args.whiten_rewards:
        rewards = core.masked_whiten(rewards, mask, shift_mean=False)
    advantages, returns = core.gae(rewards, values, mask, args.gamma, args.lam)
    if args.whiten_advantages:
        advantages = core.masked_whiten(advantages, mask)

    sequence_kl = kl.sum(1)
    non_score = (-kl_coef * kl).sum(1)
    metrics = {  # means over every process's rollout (the KL controller reads objective/kl)
        "objective/kl": sequence_kl.mean().item(),
        "objective/entropy": entropy.item(),
        "objective/non_score_reward": non_score.mean().item(),
        "objective/rlhf_reward": (scores + non_score).mean().item(),
        "objective/scores": raw.mean().item(),
        "val/num_eos_tokens": finished.float().sum().item(),
        "response_length": mask.sum(1).mean().item(),
    }
    metrics = {k: _mean_over_processes(v, gather, device) for k, v in metrics.items()}
    experience = {
        "input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
        "position_ids": batch.position_ids, "response_mask": mask,
        "old_logps": old_logps, "old_values": values, "advantages": advantages,
        "returns": returns,
        "prompt_width": torch.full((len(prompts),), batch.prompt_width, device=device),
    }
    return RolloutResult(experience, metrics, prompts, sampled.texts, raw.tolist())
