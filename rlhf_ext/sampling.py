"""Sampling completions from a causal LM: the one generation helper of the package."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from .logps import token_logps
from .shared_prefix import install_sdpa


@dataclass
class Completions:
    """Sampled completions. ``ids[i]`` stops after the first eos (kept); ``texts`` drop it."""

    texts: list[str]
    ids: list[list[int]]
    finished: list[bool]  # True when an eos ended the completion before max_new_tokens
    # with return_logps: log pi(token) of each of ids[i] under the model's own next-token
    # distribution (softmax of its logits, temperature 1, before any top-k/top-p)
    logps: list[list[float]] | None = None


def inverse_cdf_sample(weights: Tensor, uniform: Tensor, block: int = 256) -> Tensor:
    """One draw per row from the categorical distribution proportional to ``weights``, by
    inverting its CDF at ``uniform * total``; never an index of weight 0.

    weights: [B, V], non-negative (they need not sum to 1); uniform: [B], in [0, 1).
    Returns [B] int64 indices.

    Two levels, so the CDF is exact in float64 without a float64 cumsum over the whole
    vocabulary: the block of ``block`` entries whose interval holds the target (block masses
    summed in float32, accumulated in float64), then the entry inside it. ``torch.multinomial``
    draws one exponential per entry instead: 147 ms for a [96, 49152] step on a 2-core CPU,
    against about 2 ms here.
    """
    rows, width = weights.shape
    blocks = weights.new_zeros(rows, -(-width // block) * block)
    blocks[:, :width] = weights
    blocks = blocks.view(rows, -1, block)  # [B, K, block]
    mass = blocks.sum(-1).double()  # [B, K]
    cdf = mass.cumsum(-1)
    target = uniform.double()[:, None] * cdf[:, -1:]  # [B, 1]
    k = last_positive(mass, torch.searchsorted(cdf, target, right=True))  # [B, 1]
    inside = blocks.gather(1, k[:, :, None].expand(-1, -1, block)).squeeze(1)  # [B, block]
    before = torch.cat([cdf.new_zeros(rows, 1), cdf], 1).gather(1, k)
    fraction = (target - before) / mass.gather(1, k)  # where in the block, in [0, 1)
    inner = inside.double().cumsum(-1)
    j = last_positive(inside, torch.searchsorted(inner, fraction * inner[:, -1:], right=True))
    return (k * block + j).squeeze(1)


def last_positive(weights: Tensor, index: Tensor) -> Tensor:
    """``index`` ([B, 1], possibly one past the end) moved back to the last entry of positive
    weight where it points at none: a target that rounding put on the CDF's very top.
    weights: [B, N]. Returns [B, 1]."""
    width = weights.shape[1]
    index = index.clamp(max=width - 1)
    last = width - 1 - (weights > 0).flip(-1).int().argmax(-1, keepdim=True)
    return torch.where(weights.gather(1, index) > 0, index, last)


_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def row_seed(seed: int, key: int) -> int:
    """The seed of one row's random stream, from the sampling's ``seed`` and the row's
    ``key`` mixed by splitmix64: neighbouring seeds or keys share nothing (``seed + key``
    would give row k + 1 of one rollout the stream of row k of the next). In [0, 2**63)."""
    return _splitmix64(_splitmix64(seed & _MASK64) ^ (key & _MASK64)) >> 1


def row_seeds(seed: int, row_keys: Sequence[int] | None, n: int) -> list[int]:
    """The seeds of ``n`` rows' random streams: ``row_seed(seed, key)`` for each of
    ``row_keys`` (default 0, 1, ..., n - 1). Our sampler and vLLM's requests both use them."""
    keys = range(n) if row_keys is None else list(row_keys)
    if len(keys) != n:
        raise ValueError(f"row_keys has {len(keys)} keys for {n} prompts")
    return [row_seed(seed, k) for k in keys]


class InverseCdfSampling(LogitsProcessor):
    """Sampling as a logits processor for greedy decoding: temperature, top-k and top-p
    (transformers' own warpers, in the order its sampling applies them), then one
    ``inverse_cdf_sample`` draw per row; the returned scores are 0 at the drawn token and
    -inf elsewhere, so the argmax is the draw.

    Each row draws from a random stream of its own (``start(seeds)``), one uniform per
    decoding step: a row's tokens depend on its key and the seed, never on which rows share
    its batch or its process. A batch of 16 rows split over two processes samples what one
    process sampling all 16 does."""

    def __init__(self, temperature: float, top_k: int, top_p: float):
        self.warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
        if top_k > 0:
            self.warpers.append(TopKLogitsWarper(top_k))
        if top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p))
        self.streams: list[torch.Generator] = []

    def start(self, seeds: Sequence[int]) -> None:
        """The streams of the next batch's rows, in order (``row_seeds``)."""
        self.streams = [torch.Generator().manual_seed(s) for s in seeds]

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if len(self.streams) != len(scores):
            raise RuntimeError(f"{len(scores)} rows but {len(self.streams)} random streams: "
                               "call start(seeds) with one seed per row first")
        probs = torch.softmax(self.warpers(input_ids, scores), -1)
        uniform = torch.cat([torch.rand(1, generator=g) for g in self.streams])
        drawn = inverse_cdf_sample(probs, uniform.to(probs.device))
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, drawn[:, None], 0.0)


def decoding(tokenizer, max_new_tokens: int, temperature: float, top_k: int,
             top_p: float) -> tuple[GenerationConfig, LogitsProcessorList]:
    """The whole decoding, every field that changes the token distribution set explicitly:
    greedy decoding, with ``InverseCdfSampling`` drawing each token from softmax(logits / T)
    restricted by top-k/top-p unless temperature == 0 (plain greedy)."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature}")
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
        num_beams=1, repetition_penalty=1.0, no_repeat_ngram_size=0, min_length=0,
        do_sample=False)
    sampling = [InverseCdfSampling(temperature, top_k, top_p)] if temperature > 0 else []
    return config, LogitsProcessorList(sampling)


def shared_prompt_inputs(model, tokenizer, prompts: list[str]) -> dict:
    """``generate()``'s inputs for a batch whose identical prompts sit side by side: each
    distinct prompt but its last token goes through the model once, and its KV cache is
    repeated for its rows (``past_key_values``); generate() then computes only the last
    prompt token of every row: three samples of a 48-token prompt compute its first 47
    tokens once instead of three times. A batch of distinct prompts gets the plain inputs.

    Left padding, and positions counted from each row's first real token, as generate()
    counts them."""
    device = next(model.parameters()).device
    distinct = {p: k for k, p in enumerate(dict.fromkeys(prompts))}
    batch = tokenizer(list(distinct), return_tensors="pt", padding=True,
                      add_special_tokens=False).to(device)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    index = torch.tensor([distinct[p] for p in prompts], device=device)
    inputs = {"input_ids": ids[index], "attention_mask": mask[index]}
    if len(distinct) == len(prompts) or ids.shape[1] < 2:
        return inputs
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    cache = model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1],
                  position_ids=positions[:, :-1], use_cache=True).past_key_values
    cache.reorder_cache(index)  # row i of the cache becomes distinct prompt index[i]'s
    return {**inputs, "past_key_values": cache}


@torch.no_grad()
def generate_completions(model, tokenizer, prompts: list[str], max_new_tokens: int = 32,
                         temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                         batch_size: int = 64, seed: int = 0, progress: bool = False,
                         return_logps: bool = False,
                         row_keys: Sequence[int] | None = None) -> Completions:
    """Sample one completion per prompt (left-padded batches; greedy when temperature == 0).

    Prompts are plain strings, already rendered (apply a chat template before calling).
    Exactly this decoding is used: nothing of the model's own ``generation_config`` (a
    shipped repetition penalty, top-k, min-p...) applies, so the samples come from
    softmax(logits / temperature) restricted by ``top_k``/``top_p`` alone, drawn by
    ``InverseCdfSampling``. Identical prompts are batched together and each is computed
    once per batch (``shared_prompt_inputs``); the results keep the order of ``prompts``.

    Prompt i's tokens are drawn from its own random stream, keyed by ``seed`` and
    ``row_keys[i]`` (default i): the same whatever the batches (``batch_size``) or the
    processes that split the prompts, when each process passes the prompts' global
    positions as keys. The global torch generator is neither read nor reseeded.

    ``return_logps``: also each sampled token's log-probability at temperature 1, read
    from the logits the sampling step computed (what ``sequence_kl`` needs of the
    sampling policy, without a forward of its own).
    """
    install_sdpa()  # a grouped-query model's decoding steps without copying its KV cache
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    eos = tokenizer.eos_token_id
    out = Completions([], [], [], [] if return_logps else None)
    config, processors = decoding(tokenizer, max_new_tokens, temperature, top_k, top_p)
    config.output_logits = config.return_dict_in_generate = return_logps
    seeds = row_seeds(seed, row_keys, len(prompts))
    owners = [m for m in model.modules() if isinstance(getattr(m, "generation_config", None),
                                                       GenerationConfig)]
    shipped = [m.generation_config for m in owners]
    for m in owners:  # generate() fills unset fields from the model's own defaults
        m.generation_config = GenerationConfig()
    try:
        # identical prompts side by side, so a batch computes each of its prompts once
        first = {}
        order = sorted(range(len(prompts)), key=lambda i: first.setdefault(prompts[i], i))
        rows: list = [None] * len(prompts)
        starts = range(0, len(prompts), batch_size)
        for start in tqdm(starts, desc="sampling", disable=not progress):
            where = order[start:start + batch_size]
            inputs = shared_prompt_inputs(model, tokenizer, [prompts[i] for i in where])
            for processor in processors:
                processor.start([seeds[i] for i in where])
            generated = model.generate(**inputs, generation_config=config,
                                       logits_processor=processors)
            sequences = generated.sequences if return_logps else generated
            new = sequences[:, inputs["input_ids"].shape[1]:]
            # one [B, 1, V] step at a time: the steps are never stacked into [B, T, V]
            logps = (torch.cat([token_logps(step[:, None], new[:, t:t + 1])
                                for t, step in enumerate(generated.logits)], 1).tolist()
                     if return_logps else [None] * len(new))
            for i, row, row_logps in zip(where, new.tolist(), logps):
                finished = eos in row
                ids = row[: row.index(eos) + 1] if finished else row
                rows[i] = (ids, finished, row_logps[:len(ids)] if return_logps else None)
        for ids, finished, row_logps in rows:
            out.ids.append(ids)
            out.finished.append(finished)
            if return_logps:
                out.logps.append(row_logps)
            out.texts.append(tokenizer.decode([t for t in ids if t != eos],
                                              skip_special_tokens=False))
    finally:
        for m, shipped_config in zip(owners, shipped):
            m.generation_config = shipped_config
        tokenizer.padding_side = side
        model.train(was_training)
    return out
