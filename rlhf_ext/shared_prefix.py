"""Attention for prefix-shared rows [prompt | completion 1 | ... | completion G | padding]:
each completion sees the prompt and itself, never another completion. A row may also
hold several such groups one after another (padding-free: ``group_ids`` name each
token's group), and no token sees another group.

Two ways, one result. ``eager`` takes the dense mask (``prefix_sharing_mask``). ``sdpa``
runs without one: a dense mask would make the kernel compute every (query, key) block,
twice the causal work, and the completions' blocks against each other on top; instead
each completion runs as its own causal attention over [prompt | completion], the prompt's
keys and values shared, so the work is that of separate rows less the prompt's repeats.
The model's forward carries the row layout to the attention as a keyword argument
(``SPANS``); transformers hands such arguments down to the attention function. For rows
of one group the dense boolean mask goes along as ``attention_mask``, so a model whose
layers do not pass keyword arguments on still computes the right thing, only slower.
Packed rows (padding-free, several groups) get no dense mask: it would grow with the
square of the whole batch's tokens. A model that drops the spans there is caught after
its forward (``check_spans_used``).

The same registered ``sdpa`` also runs masked inference of grouped-query models on a CPU
without copying keys and values per query head (``grouped_heads_sdpa``): the sampler's
decoding steps, where that copy is the whole KV cache per layer and step.
"""

from __future__ import annotations

import torch
from torch import Tensor

PREFIX_SHARING_ATTENTIONS = ("sdpa", "eager")
SPANS = "shared_prefix_spans"  # the keyword the layout travels under
Span = tuple[int, int]
Spans = tuple[tuple[tuple[Span, tuple[Span, ...]], ...], ...]  # rows, groups, (prompt, completions)


def attention_refusal(implementation: str | None) -> str | None:
    """Why prefix sharing cannot run under this attention implementation, or None."""
    if implementation in PREFIX_SHARING_ATTENTIONS:
        return None
    return (f"prefix_sharing needs an attention that keeps the completions apart "
            f"({' or '.join(PREFIX_SHARING_ATTENTIONS)}); the model uses {implementation!r}")


def prefix_sharing_mask(segment_ids: Tensor, group_ids: Tensor | None = None) -> Tensor:
    """Attention for rows laid out [prompt | chosen | rejected | padding]: causal, and a
    chosen or rejected token sees the prompt and its own completion, never the other one.
    Padding sees the prompt only (a fully masked row would give NaN). With ``group_ids``
    (several such groups in a row, no padding) a token sees its own group only.

    Shapes: segment_ids [B, L] (0 prompt, 1 chosen, 2 rejected, -1 padding), group_ids
    [B, L] or None -> bool [B, 1, L, L], True where query (row) may attend to key (column).
    """
    q, k = segment_ids.unsqueeze(-1), segment_ids.unsqueeze(-2)
    length = segment_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segment_ids.device).tril()
    allowed = causal & (k >= 0) & ((k == 0) | (k == q))
    if group_ids is not None:
        allowed &= group_ids.unsqueeze(-1) == group_ids.unsqueeze(-2)
    return allowed.unsqueeze(1)


def pair_ids(segment_ids: Tensor, sequence_ids: Tensor | None) -> tuple[Tensor, int]:
    """Each token's pair in prefix-shared rows: its row, or (packed rows) its
    ``sequence_ids`` entry; and the number of pairs. [B, L] -> ([B, L] long, P)."""
    if sequence_ids is None:
        rows = torch.arange(segment_ids.shape[0], device=segment_ids.device)
        return rows[:, None].expand_as(segment_ids), segment_ids.shape[0]
    return sequence_ids, int(sequence_ids.max()) + 1 if sequence_ids.numel() else 0


def additive_mask(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """A boolean mask as the additive one eager attention expects: 0 where allowed, the
    dtype's lowest value where blocked (eager adds a boolean mask as 0/1, blocking nothing).

    Shapes: allowed bool [B, 1, L, L] -> [B, 1, L, L] of ``dtype``.
    """
    blocked = torch.full_like(allowed, torch.finfo(dtype).min, dtype=dtype)
    return torch.where(allowed, torch.zeros((), dtype=dtype), blocked)


def segment_spans(segment_ids: Tensor, group_ids: Tensor | None = None) -> Spans | None:
    """Each row's groups, each its prompt and completions as [start, end) column spans:
    (((prompt span, (completion spans in order)), ...), ...), or None when some segment is
    not one contiguous run, or does not follow its prompt (then only the dense mask
    describes the row). Without ``group_ids`` a row is one group.

    Shapes: segment_ids [B, L] (0 prompt, k > 0 completion k, -1 padding), group_ids
    [B, L] or None.
    """
    groups_of = group_ids.tolist() if group_ids is not None else None
    rows = []
    for r, row in enumerate(segment_ids.tolist()):
        runs: dict[tuple[int, int], list[int]] = {}  # (group, segment) -> [start, end)
        for col, seg in enumerate(row):
            if seg >= 0:
                key = (groups_of[r][col] if groups_of else 0, seg)
                run = runs.setdefault(key, [col, col])
                if run[1] != col:  # a gap inside one segment
                    return None
                run[1] = col + 1
        groups = []
        for g in dict.fromkeys(group for group, _ in runs):  # in order of appearance
            prompt = tuple(runs.get((g, 0), (0, 0)))
            completions = tuple(tuple(runs[key]) for key in sorted(runs)
                                if key[0] == g and key[1] > 0)
            if any(start < prompt[1] for start, _ in completions):
                return None
            groups.append((prompt, completions))
        rows.append(tuple(groups))
    return tuple(rows)


def shared_prefix_sdpa(module, query: Tensor, key: Tensor, value: Tensor, spans: Spans,
                       **kwargs) -> tuple[Tensor, None]:
    """Attention of prefix-shared rows from ``spans``: per row and completion, causal SDPA
    over [prompt | completion] (transformers' own SDPA call, so grouped-query heads and
    scaling are the model's); the prompt's outputs come from the first completion's call.
    Padding columns get zeros (nothing reads them: no real token attends to padding).

    Shapes: query [B, H, L, D], key and value [B, Hkv, L, D] -> ([B, L, H, D], None), as
    transformers' attention functions return.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    kwargs.pop("is_causal", None)
    (_, heads, length, dim), device = query.shape, query.device

    def attend(b: int, cols: Tensor | slice) -> Tensor:  # -> [1, n, H, D]
        q, k, v = (t[b:b + 1, :, cols] for t in (query, key, value))
        return sdpa_attention_forward(module, q, k, v, None, is_causal=True, **kwargs)[0]

    rows = []
    for b, groups in enumerate(spans):
        pieces = []  # (start column, [1, n, H, D])
        for (p0, p1), completions in groups:
            for i, (c0, c1) in enumerate(completions):
                cols = slice(p0, c1) if c0 == p1 else torch.cat(  # made where it is read
                    [torch.arange(p0, p1, device=device), torch.arange(c0, c1, device=device)])
                out = attend(b, cols)
                if i == 0:
                    pieces.append((p0, out[:, :p1 - p0]))
                pieces.append((c0, out[:, p1 - p0:]))
            if not completions and p1 > p0:
                pieces.append((p0, attend(b, slice(p0, p1))))
        pieces.sort(key=lambda piece: piece[0])
        row, at = [], 0
        for start, piece in pieces:
            if start > at:
                row.append(query.new_zeros(1, start - at, heads, dim))
            row.append(piece)
            at = start + piece.shape[1]
        if at < length:
            row.append(query.new_zeros(1, length - at, heads, dim))
        rows.append(torch.cat(row, 1))
    return torch.cat(rows, 0), None


_installed = False
_span_calls = 0  # attention calls that read spans, so far


def span_calls() -> int:
    return _span_calls


def check_spans_used(before: int) -> None:
    """Raise if no attention call read the spans since ``span_calls()`` was ``before``:
    the model's layers did not pass them on, and packed rows had no other guard."""
    if _span_calls == before:
        raise RuntimeError("padding_free rows need the model's attention to receive the row "
                           "layout, and this model's layers did not pass it on (they drop "
                           "keyword arguments): set padding_free=False")


def grouped_heads_sdpa(module, query: Tensor, key: Tensor, value: Tensor,
                       attention_mask: Tensor | None, dropout: float = 0.0,
                       scaling: float | None = None, **kwargs) -> tuple[Tensor, None] | None:
    """Masked attention of a grouped-query model (fewer key/value heads than query heads)
    without copying the keys and values once per query head: torch's SDPA reads each
    key/value head for its group of query heads (``enable_gqa``). transformers copies them
    whenever a mask is given (a padded batch; every decoding step of ``generate``), since
    on CUDA the masked grouped call leaves the fast kernels; on a CPU it is the same kernel
    and the same numbers, without the copy of the whole KV cache per layer and step. Only
    for that case: a CPU tensor, no gradient, a mask, no dropout and nothing else asked of
    the attention; otherwise None (the caller runs transformers' own function).

    Shapes: query [B, H, Lq, D], key and value [B, Hkv, Lk, D] with H a multiple of Hkv,
    attention_mask broadcastable to [B, H, Lq, Lk] -> ([B, Lq, H, D], None).
    """
    plain = not kwargs.get("output_attentions") and all(
        kwargs.get(name) is None for name in ("position_bias", "cache", "s_aux"))
    if not (plain and attention_mask is not None and dropout == 0.0
            and query.device.type == "cpu" and not torch.is_grad_enabled()
            and key.shape[1] < query.shape[1] and query.shape[1] % key.shape[1] == 0):
        return None
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def install_sdpa() -> None:
    """Route transformers' ``sdpa`` through ``shared_prefix_sdpa`` when a forward carries
    ``SPANS``, through ``grouped_heads_sdpa`` where it applies (same outputs, fewer
    copies), and every other call to transformers' own function unchanged. Once per
    process; prefix sharing and the sampler install it."""
    global _installed
    if _installed:
        return
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def sdpa(module, query, key, value, attention_mask, *args, **kwargs):
        global _span_calls
        spans = kwargs.pop(SPANS, None)
        if spans is None:
            grouped = None if args else grouped_heads_sdpa(module, query, key, value,
                                                           attention_mask, **kwargs)
            return grouped if grouped is not None else sdpa_attention_forward(
                module, query, key, value, attention_mask, *args, **kwargs)
        _span_calls += 1
        return shared_prefix_sdpa(module, query, key, value, spans, **kwargs)

    AttentionInterface.register("sdpa", sdpa)
    _installed = True


def attention_inputs(implementation: str | None, segment_ids: Tensor,
                     dtype: torch.dtype, group_ids: Tensor | None = None) -> dict:
    """The keyword arguments a prefix-shared forward gives the model: the dense mask
    (additive for eager, which adds it to the scores), and for sdpa the spans as well;
    for sdpa with ``group_ids`` (packed rows) the spans and a [1, 1, 1, 1] stand-in mask
    (a 4D mask keeps transformers from building its own [N, N] one for packed positions).
    Shapes: segment_ids, group_ids [B, L] -> attention_mask [B, 1, L, L]."""
    if implementation == "sdpa" and group_ids is not None:
        spans = segment_spans(segment_ids, group_ids)
        if spans is not None:
            install_sdpa()
            stand_in = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=segment_ids.device)
            return {"attention_mask": stand_in, SPANS: spans}
    mask = prefix_sharing_mask(segment_ids, group_ids)
    if implementation == "eager":
        return {"attention_mask": additive_mask(mask, dtype)}
    spans = segment_spans(segment_ids, group_ids) if implementation == "sdpa" else None
    if spans is None:
        return {"attention_mask": mask}
    install_sdpa()
    return {"attention_mask": mask, SPANS: spans}
