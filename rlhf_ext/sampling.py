"""Sampling completions from a causal LM: the one generation helper of the package."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm


@dataclass
class Completions:
    """Sampled completions. ``ids[i]`` stops after the first eos (kept); ``texts`` drop it."""

    texts: list[str]
    ids: list[list[int]]
    finished: list[bool]  # True when an eos ended the completion before max_new_tokens


@torch.no_grad()
def generate_completions(model, tokenizer, prompts: list[str], max_new_tokens: int = 32,
                         temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                         batch_size: int = 64, seed: int = 0, progress: bool = False
                         ) -> Completions:
    """Sample one completion per prompt (left-padded batches; greedy when temperature == 0).

    Prompts are plain strings, already rendered (apply a chat template before calling).
    """
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    eos = tokenizer.eos_token_id
    device = next(model.parameters()).device
    out = Completions([], [], [])
    torch.manual_seed(seed)
    try:
        starts = range(0, len(prompts), batch_size)
        for start in tqdm(starts, desc="sampling", disable=not progress):
            batch = tokenizer(prompts[start:start + batch_size], return_tensors="pt",
                              padding=True, add_special_tokens=False).to(device)
            kwargs = dict(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p)
            if temperature == 0:
                kwargs = dict(do_sample=False)
            generated = model.generate(**batch, max_new_tokens=max_new_tokens,
                                       pad_token_id=tokenizer.pad_token_id, eos_token_id=eos,
                                       **kwargs)
            for row in generated[:, batch["input_ids"].shape[1]:].tolist():
                finished = eos in row
                ids = row[: row.index(eos) + 1] if finished else row
                out.ids.append(ids)
                out.finished.append(finished)
                out.texts.append(tokenizer.decode([t for t in ids if t != eos],
                                                  skip_special_tokens=False))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return out
