"""Measures of a trained policy against its reference, for evaluations and demos."""

from __future__ import annotations

import torch

from .ppo.rollout import build_batch, response_logps


@torch.no_grad()
def sequence_kl(model, ref_model, tokenizer, prompts: list[str], completion_ids: list[list[int]],
                batch_size: int = 64, logps: list[list[float]] | None = None,
                group: int = 1) -> list[float]:
    """Sampled estimate of KL(pi || ref) per sequence: sum_t log pi(y_t) - log ref(y_t) for
    y sampled from pi (temperature 1).

    ``logps``: pi's log-probs of ``completion_ids`` from the sampling itself
    (``Completions.logps``): pi's forward is skipped. ``group`` > 1: rows come in
    consecutive groups of that many completions of one prompt, and each group's prompt is
    computed once (``response_logps``' prefix sharing)."""
    if len(prompts) % group or any(prompts[i] != prompts[i - i % group]
                                   for i in range(len(prompts))):
        raise ValueError(f"group={group}: the prompts must come in consecutive runs of "
                         f"{group} identical ones")
    device = next(model.parameters()).device
    step = max(group, batch_size // group * group)
    out = []
    for start in range(0, len(prompts), step):
        prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"]
                      for p in prompts[start:start + step]]
        batch = build_batch(tokenizer, prompt_ids, completion_ids[start:start + step], device)
        if logps is None:
            policy = response_logps(model, batch, 1.0, group=group)
        else:
            width = batch.response_mask.shape[1]
            policy = torch.tensor([row + [0.0] * (width - len(row))
                                   for row in logps[start:start + step]], device=device)
        ref = response_logps(ref_model, batch, 1.0, group=group)
        out.extend(((policy - ref) * batch.response_mask).sum(1).tolist())
    return out
