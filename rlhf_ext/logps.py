"""Log-probabilities of completion tokens: the one function every trainer of the package uses."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .shared_prefix import SPANS, attention_inputs, check_spans_used, pair_ids, span_calls


def token_logps(logits: Tensor, labels: Tensor, temperature: float = 1.0,
                chunk_size: int = 512) -> Tensor:
    """log softmax(logits / temperature)[label] per position, computed as
    logit[label] - logsumexp(logits) over chunks of ``chunk_size`` positions, so the full
    float32 [B, T, V] log-softmax never exists: one [chunk, V] float32 block at a time, and
    under autograd a low-precision block is recomputed in backward rather than kept.

    Shapes: logits [B, T, V], labels [B, T] -> [B, T] (float32).
    """
    flat, targets = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
    recompute = torch.is_grad_enabled() and flat.requires_grad and flat.dtype != torch.float32
    out = _in_blocks(lambda block, t: _block_outputs(block, t, temperature), flat,
                     targets, chunk_size, recompute)
    return out.reshape(labels.shape)


TOKEN_STATS = ("entropy", "mean_logit", "top1", "log_sum_sq", "entropy_grad")


def head_chunk_size(device: torch.device, vocab: int) -> int:
    """Positions per LM-head block. On a CPU 128: a float32 block of a 49k vocabulary is
    25 MB, under glibc's 32 MB limit for mapping fresh pages, so freed blocks are reused
    rather than faulted in again (512 made a SmolLM2 DPO step about 10% slower). On an
    accelerator the largest power of two (at least 128) whose float32 block fits in 256 MiB:
    1024 for SmolLM2's 49k vocabulary, 512 for Llama 3's 128k: fewer, fuller matmuls, the
    blocks still small beside the model."""
    if device.type == "cpu":
        return 128
    rows = max(1, (256 << 20) // (4 * max(vocab, 1)))
    return max(128, 1 << (rows.bit_length() - 1))


def head_logps(hidden: Tensor, head, targets: Tensor, chunk_size: int | None = None,
               temperature: float = 1.0, stats: tuple[str, ...] = ()):
    """log softmax(head(hidden) / temperature)[target] for K positions, ``chunk_size`` at a
    time (None: ``head_chunk_size`` for the device): the [K, V] logits never exist, only one
    [chunk, V] block, and under autograd each block is recomputed in backward (activation
    checkpointing) instead of kept.

    ``stats`` (names from ``TOKEN_STATS``, no gradient) come from the same blocks: the
    distribution's ``entropy``, the ``mean_logit`` over the vocabulary, ``top1`` (1.0
    where the target is the argmax) and ``log_sum_sq`` = log sum_v p_v^2 (WPO's weights);
    ``entropy_grad`` is the entropy with its gradient (an entropy bonus).

    Shapes: hidden [K, H], targets [K] -> [K] (float32); with ``stats``
    ([K], {name: [K]}).
    """
    from transformers.integrations import is_deepspeed_zero3_enabled

    unknown = set(stats) - set(TOKEN_STATS)
    if unknown:
        raise ValueError(f"unknown token stats {sorted(unknown)}; known: {TOKEN_STATS}")
    # ZeRO-3 releases the head's gathered weight after the call, so a recompute would see
    # a different tensor: there the blocks are kept (the [K, V] logits, still completion
    # positions only).
    if chunk_size is None:  # a ZeRO-3 weight is partitioned: nn.Linear keeps its size
        chunk_size = head_chunk_size(hidden.device, getattr(head, "out_features", 0))
    recompute = torch.is_grad_enabled() and not is_deepspeed_zero3_enabled() and (
        hidden.requires_grad or any(p.requires_grad for p in head.parameters()))
    out = _in_blocks(lambda h, t: _block_outputs(head(h), t, temperature, stats, fresh=True),
                     hidden, targets, chunk_size, recompute)
    if not stats:
        return out
    if out.ndim == 1:  # no positions
        return out, {name: out for name in stats}
    return out[:, 0], {name: out[:, 1 + i] if name == "entropy_grad" else out[:, 1 + i].detach()
                       for i, name in enumerate(stats)}


def _block_outputs(logits: Tensor, targets: Tensor, temperature: float,
                   stats: tuple[str, ...] = (), fresh: bool = False) -> Tensor:
    """Target log-prob per row, then each of ``stats`` (no gradient), with at most two
    [N, V] float32 blocks alive: z, and one temporary (exp(z - lse) written over by p * z
    for the entropy: H = lse - sum softmax(z) z). ``fresh``: the block is the head's new
    output, which without autograd may be overwritten.
    [N, V], [N] -> [N] or [N, 1 + len(stats)]."""
    z = logits.float()
    if temperature != 1.0:
        in_place = fresh and not torch.is_grad_enabled()
        z = z.div_(temperature) if in_place else z / temperature
    lse = torch.logsumexp(z, -1)
    logps = z.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
    if not stats:
        return logps
    columns = [logps]
    if "entropy_grad" in stats:  # the entropy bonus: H = lse - sum softmax(z) z, with gradient
        grad_entropy = lse - (torch.softmax(z, -1) * z).sum(-1)
    with torch.no_grad():
        z, lse = z.detach(), lse.detach()
        for name in stats:
            if name == "entropy":
                columns.append(lse - (z - lse.unsqueeze(-1)).exp_().mul_(z).sum(-1))
            elif name == "mean_logit":
                columns.append(z.mean(-1))
            elif name == "top1":
                columns.append((z.argmax(-1) == targets).float())
            elif name == "entropy_grad":
                columns.append(grad_entropy)
            else:  # log_sum_sq
                columns.append(torch.logsumexp(2 * (z - lse.unsqueeze(-1)), -1))
    return torch.stack(columns, -1)


def _in_blocks(fn, rows: Tensor, targets: Tensor, chunk_size: int, recompute: bool) -> Tensor:
    """``fn(rows_block, targets_block) -> [n]`` over blocks of ``chunk_size`` rows,
    concatenated; with ``recompute`` each block is checkpointed. [N, ...], [N] -> [N]."""
    pieces = []
    for start in range(0, rows.shape[0], chunk_size):
        block, block_targets = rows[start:start + chunk_size], targets[start:start + chunk_size]
        pieces.append(checkpoint(fn, block, block_targets, use_reentrant=False) if recompute
                      else fn(block, block_targets))
    return torch.cat(pieces) if pieces else rows.new_zeros(0, dtype=torch.float32)


def unwrap(model):
    while hasattr(model, "module"):  # DDP, DeepSpeedEngine
        model = model.module
    return model


def attention_implementation(model) -> str | None:
    return getattr(getattr(unwrap(model), "config", None), "_attn_implementation", None)


def final_hidden(model, **inputs) -> Tensor:
    """The last layer's (normalised) hidden states [B, T, H], through ``model``'s own
    forward (so DDP and DeepSpeed wrappers see the call), with the LM head on one position
    only."""
    out = model(**inputs, use_cache=False, output_hidden_states=True, logits_to_keep=1)
    return out.hidden_states[-1]


def output_head(model):
    return unwrap(model).get_output_embeddings()


def head_inputs(model, **inputs) -> tuple[Tensor, torch.nn.Module]:
    """What ``head_logps`` takes for ``model``'s forward on ``inputs``: the final hidden
    states [B, T, H] and the LM head; under FSDP the logits [B, T, V] and an identity.
    FSDP frees a module's gathered weights when its forward returns (the head's and the
    final norm's included), so a head applied after the forward reads freed memory (a
    segfault in backward, seen with FSDP2 on CPU): there the head runs inside the
    forward over every position, as in a plain ``model(...)`` call."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(unwrap(model), FSDPModule):
        return final_hidden(model, **inputs), output_head(model)
    return model(**inputs, use_cache=False).logits, torch.nn.Identity()


def sequence_logps(model, input_ids: Tensor, attention_mask: Tensor | None,
                   completion_mask: Tensor, position_ids: Tensor | None = None,
                   sequence_ids: Tensor | None = None, segment_ids: Tensor | None = None,
                   ld_alpha: float | None = None, stats: tuple[str, ...] = ()):
    """Summed completion log-probs and completion token counts of each sequence; with
    ``stats`` also a dict of per-sequence sums over completion tokens of each named
    ``TOKEN_STATS`` value and of ``logps`` (the plain log-prob sum, detached).

    ``ld_alpha`` (LD-DPO, paired batches, chosen first): tokens past the shorter
    completion of the pair count ``ld_alpha`` times (``length_desensitized_weights``).

    Three layouts (``data.PreferenceCollator``):
    - padded: [B, T] rows -> ([B], [B]);
    - padding-free: one row [1, N] of concatenated sequences, ``position_ids`` restarting
      at 0 for each (the attention then stays within each sequence: under sdpa each
      sequence attends on its own, from spans), ``sequence_ids`` [1, N] naming each
      token's sequence -> ([S], [S]);
    - prefix sharing: one row per pair [prompt | chosen | rejected], ``segment_ids`` [B, L]
      (0/1/2, -1 padding), both completions positioned right after the prompt and kept
      apart by ``shared_prefix.attention_inputs`` -> ([2B], [2B]), chosen first then rejected;
      padding-free, all P pairs in one row [1, N] with ``sequence_ids`` naming each token's
      pair -> ([2P], [2P]).

    The LM head runs only at the positions that predict a completion token (the first
    rejected token is predicted from the prompt's last token), in chunks (``head_logps``).
    """
    implementation = attention_implementation(model)
    if segment_ids is not None or (sequence_ids is not None and implementation == "sdpa"):
        # prefix sharing, or padding-free under sdpa: attention from the row's spans (each
        # sequence its own causal attention), never a mask over the whole packed row
        before = span_calls()
        layout = segment_ids if segment_ids is not None else torch.zeros_like(sequence_ids)
        attention = attention_inputs(implementation, layout, unwrap(model).dtype, sequence_ids)
        hidden, head = head_inputs(model, input_ids=input_ids, position_ids=position_ids,
                                   **attention)
        if sequence_ids is not None and SPANS in attention:  # packed: spans are the only guard
            check_spans_used(before)
    else:
        hidden, head = head_inputs(model, input_ids=input_ids, attention_mask=attention_mask,
                                   position_ids=position_ids)
    rows, cols = completion_mask.nonzero(as_tuple=True)       # [K] target tokens
    keep = cols > 0
    rows, cols = rows[keep], cols[keep]
    predictors = cols - 1
    if segment_ids is not None:  # pair p: chosen sequence p, rejected sequence pairs + p
        pair, pairs = pair_ids(segment_ids, sequence_ids)
        prompt_rows, prompt_cols = (segment_ids == 0).nonzero(as_tuple=True)
        prompt_end = torch.full((pairs,), -1, dtype=cols.dtype, device=cols.device)
        prompt_end = prompt_end.scatter_reduce(0, pair[prompt_rows, prompt_cols], prompt_cols,
                                               "amax")
        first_rejected = (segment_ids[rows, cols] == 2) & (segment_ids[rows, cols - 1] == 1)
        predictors = torch.where(first_rejected, prompt_end[pair[rows, cols]], predictors)
        index = pair[rows, cols] + pairs * (segment_ids[rows, cols] == 2)
        n = 2 * pairs
    elif sequence_ids is not None:
        index, n = sequence_ids[rows, cols], int(sequence_ids.max()) + 1
    else:
        index, n = rows, input_ids.shape[0]
    head_stats = tuple(name for name in stats if name != "logps")
    logps = head_logps(hidden[rows, predictors], head, input_ids[rows, cols],
                       stats=head_stats)
    per_token = {}
    if head_stats:
        logps, per_token = logps
    counts = torch.zeros(n, dtype=torch.float32, device=logps.device).index_add(
        0, index, torch.ones_like(logps))
    weighted = logps
    if ld_alpha is not None:
        weighted = logps * length_desensitized_weights(index, n, ld_alpha)
    sums = logps.new_zeros(n).index_add(0, index, weighted)
    if not stats:
        return sums, counts
    per_token["logps"] = logps.detach()
    return sums, counts, {name: logps.new_zeros(n).index_add(0, index, per_token[name])
                          for name in stats}


def length_desensitized_weights(index: Tensor, n: int, alpha: float) -> Tensor:
    """LD-DPO's token weights (Liu et al. 2024): 1 for a completion's first tokens, as many
    as the shorter completion of its pair has, ``alpha`` for the rest, so a verbose
    completion's excess counts less. Sequences 0..n/2-1 are the chosen, n/2.. the rejected
    (pair i = sequences i and n/2 + i); tokens of a sequence come in order.

    Shapes: index [K] (each token's sequence) -> [K] float32.
    """
    counts = torch.bincount(index, minlength=n)
    shared = torch.minimum(counts[:n // 2], counts[n // 2:]).repeat(2)
    order = torch.sort(index, stable=True).indices
    starts = torch.cumsum(counts, 0) - counts
    ordinal = torch.empty_like(index)
    ordinal[order] = torch.arange(index.numel(), device=index.device) - starts[index[order]]
    ones = torch.ones(index.shape, dtype=torch.float32, device=index.device)
    return torch.where(ordinal < shared[index], ones, ones * alpha)


def batch_logps(model, inputs: dict, prefix: str = "", **kwargs):
    """``sequence_logps`` of a collated batch (any layout); ``prefix`` picks another set of
    sequences in it (``kl_`` for KTO's mismatched pairs); ``kwargs``: ld_alpha, stats."""
    return sequence_logps(model, inputs[f"{prefix}input_ids"],
                          inputs.get(f"{prefix}attention_mask"),
                          inputs[f"{prefix}completion_mask"],
                          inputs.get(f"{prefix}position_ids"),
                          inputs.get(f"{prefix}sequence_ids"),
                          inputs.get(f"{prefix}segment_ids"), **kwargs)
