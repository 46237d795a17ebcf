"""Log-probabilities of completion tokens: the one function every trainer of the package uses."""

from __future__ import annotations

import torch
from torch import Tensor


def token_logps(logits: Tensor, labels: Tensor, temperature: float = 1.0) -> Tensor:
    """log softmax(logits / temperature)[label] per position, without materialising the
    full [B, T, V] log-softmax: logit[label] - logsumexp(logits), row by row.

    Shapes: logits [B, T, V], labels [B, T] -> [B, T] (float32).
    """
    if temperature != 1.0:
        logits = logits / temperature
    out = torch.empty(labels.shape, dtype=torch.float32, device=logits.device)
    for i in range(logits.shape[0]):  # one row at a time bounds the fp32 copy to [T, V]
        row = logits[i].float()
        out[i] = row.gather(-1, labels[i].unsqueeze(-1)).squeeze(-1) - torch.logsumexp(row, -1)
    return out


def sequence_logps(model, input_ids: Tensor, attention_mask: Tensor | None,
                   completion_mask: Tensor, position_ids: Tensor | None = None,
                   sequence_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Summed completion log-probs and completion token counts of each sequence.

    Padded batches: [B, T] inputs -> ([B], [B]). Padding-free batches: one row [1, N] of
    concatenated sequences, ``position_ids`` restarting at 0 for each (the attention then
    stays within each sequence) and ``sequence_ids`` [1, N] naming each token's sequence
    -> ([S], [S]) for S sequences. The shifted prediction that crosses from one sequence
    into the next lands on a prompt token, which the completion mask drops.
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask,
                   position_ids=position_ids, use_cache=False).logits
    mask = completion_mask[:, 1:].to(torch.float32)
    per_token = token_logps(logits[:, :-1], input_ids[:, 1:]) * mask
    if sequence_ids is None:
        return per_token.sum(-1), mask.sum(-1)
    index = sequence_ids[0, 1:]
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
