"""Sampling completions from a causal LM: the one generation helper of the package."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig

from .logps import token_logps


@dataclass
class Completions:
    """Sampled completions. ``ids[i]`` stops after the first eos (kept); ``texts`` drop it."""

    texts: list[str]
    ids: list[list[int]]
    finished: list[bool]  # True when an eos ended the completion before max_new_tokens
    # with return_logps: log pi(token) of each of ids[i] under the model's own next-token
    # distribution (softmax of its logits, temperature 1, before any top-k/top-p)
    logps: list[list[float]] | None = None


def decoding_config(tokenizer, max_new_tokens: int, temperature: float, top_k: int,
                    top_p: float) -> GenerationConfig:
    """The whole decoding, every field that changes the token distribution set explicitly
    (sampling from softmax(logits / T) with top-k/top-p, or greedy when temperature == 0)."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature}")
    sampling = dict(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p)
    return GenerationConfig(
        max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
        num_beams=1, repetition_penalty=1.0, no_repeat_ngram_size=0, min_length=0,
        **(sampling if temperature > 0 else dict(do_sample=False)))


@torch.no_grad()
def generate_completions(model, tokenizer, prompts: list[str], max_new_tokens: int = 32,
                         temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                         batch_size: int = 64, seed: int = 0, progress: bool = False,
                         return_logps: bool = False) -> Completions:
    """Sample one completion per prompt (left-padded batches; greedy when temperature == 0).

    Prompts are plain strings, already rendered (apply a chat template before calling).
    Exactly this decoding is used: nothing of the model's own ``generation_config`` (a
    shipped repetition penalty, top-k, min-p...) applies, so the samples come from
    softmax(logits / temperature) restricted by ``top_k``/``top_p`` alone.

    ``return_logps``: also each sampled token's log-probability at temperature 1, read
    from the logits the sampling step computed (what ``sequence_kl`` needs of the
    sampling policy, without a forward of its own).
    """
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    eos = tokenizer.eos_token_id
    device = next(model.parameters()).device
    out = Completions([], [], [], [] if return_logps else None)
    config = decoding_config(tokenizer, max_new_tokens, temperature, top_k, top_p)
    config.output_logits = config.return_dict_in_generate = return_logps
    torch.manual_seed(seed)
    owners = [m for m in model.modules() if isinstance(getattr(m, "generation_config", None),
                                                       GenerationConfig)]
    shipped = [m.generation_config for m in owners]
    for m in owners:  # generate() fills unset fields from the model's own defaults
        m.generation_config = GenerationConfig()
    try:
        starts = range(0, len(prompts), batch_size)
        for start in tqdm(starts, desc="sampling", disable=not progress):
            batch = tokenizer(prompts[start:start + batch_size], return_tensors="pt",
                              padding=True, add_special_tokens=False).to(device)
            generated = model.generate(**batch, generation_config=config)
            sequences = generated.sequences if return_logps else generated
            new = sequences[:, batch["input_ids"].shape[1]:]
            # one [B, 1, V] step at a time: the steps are never stacked into [B, T, V]
            logps = (torch.cat([token_logps(step[:, None], new[:, t:t + 1])
                                for t, step in enumerate(generated.logits)], 1).tolist()
                     if return_logps else [None] * len(new))
            for row, row_logps in zip(new.tolist(), logps):
                finished = eos in row
                ids = row[: row.index(eos) + 1] if finished else row
                out.ids.append(ids)
                if return_logps:
                    out.logps.append(row_logps[:len(ids)])
                out.finished.append(finished)
                out.texts.append(tokenizer.decode([t for t in ids if t != eos],
                                                  skip_special_tokens=False))
    finally:
        for m, shipped_config in zip(owners, shipped):
            m.generation_config = shipped_config
        tokenizer.padding_side = side
        model.train(was_training)
    return out


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
    from .ppo.rollout import build_batch, response_logps

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
