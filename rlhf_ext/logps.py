"""Log-probabilities of completion tokens: the one function every trainer of the package uses."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint


def token_logps(logits: Tensor, labels: Tensor, temperature: float = 1.0,
                chunk_size: int = 512) -> Tensor:
    """log softmax(logits / temperature)[label] per position, computed as
    logit[label] - logsumexp(logits) over chunks of ``chunk_size`` positions, so the full
    float32 [B, T, V] log-softmax never exists: one [chunk, V] float32 block at a time, and
    under autograd each block is recomputed in backward rather than kept.

    Shapes: logits [B, T, V], labels [B, T] -> [B, T] (float32).
    """
    flat, targets = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
    pieces = []
    for start in range(0, flat.shape[0], chunk_size):
        block, block_targets = flat[start:start + chunk_size], targets[start:start + chunk_size]
        if torch.is_grad_enabled() and block.requires_grad and block.dtype != torch.float32:
            pieces.append(checkpoint(_block_logps, block, block_targets, temperature,
                                     use_reentrant=False))
        else:
            pieces.append(_block_logps(block, block_targets, temperature))
    if not pieces:
        return logits.new_zeros(labels.shape, dtype=torch.float32)
    return torch.cat(pieces).reshape(labels.shape)


def _block_logps(block: Tensor, targets: Tensor, temperature: float) -> Tensor:
    """[N, V], [N] -> [N] float32."""
    block = block.float()
    if temperature != 1.0:
        block = block / temperature
    return block.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(block, -1)


def sequence_logps(model, input_ids: Tensor, attention_mask: Tensor | None,
                   completion_mask: Tensor, position_ids: Tensor | None = None,
                   sequence_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Summed completion log-probs and completion token counts of each sequence.

    Padded batches: [B, T] inputs -> ([B], [B]). Padding-free batches: one row [1, N] of
    concatenated sequences, ``position_ids`` restarting at 0 for each (the attention then
    stays within each sequence) and ``sequence_ids`` [1, N] naming each token's sequence
    -> ([S], [S]) for S sequences.

    The LM head runs only at the positions that predict a completion token of some row
    (``logits_to_keep``): prompt and padding positions never become [V] logits. Packed
    rows keep exactly their completion positions; padded rows keep the union over rows.
    """
    predicts = completion_mask[:, 1:].any(0)                 # [T-1]: position t predicts t+1
    keep = predicts.nonzero().squeeze(-1)                    # [K]
    logits = model(input_ids=input_ids, attention_mask=attention_mask,
                   position_ids=position_ids, use_cache=False, logits_to_keep=keep).logits
    targets = keep + 1
    mask = completion_mask[:, targets].to(torch.float32)     # [B, K]
    per_token = token_logps(logits, input_ids[:, targets]) * mask
    if sequence_ids is None:
        return per_token.sum(-1), mask.sum(-1)
    index = sequence_ids[0, targets]
    n = int(sequence_ids.max()) + 1
    sums = per_token.new_zeros(n).index_add(0, index, per_token[0])
    return sums, mask.new_zeros(n).index_add(0, index, mask[0])


def batch_logps(model, inputs: dict, prefix: str = "") -> tuple[Tensor, Tensor]:
    """``sequence_logps`` of a collated batch (padded or padding-free); ``prefix`` picks
    another set of sequences in it (``kl_`` for KTO's mismatched pairs)."""
    return sequence_logps(model, inputs[f"{prefix}input_ids"],
                          inputs.get(f"{prefix}attention_mask"),
                          inputs[f"{prefix}completion_mask"],
                          inputs.get(f"{prefix}position_ids"),
                          inputs.get(f"{prefix}sequence_ids"))
