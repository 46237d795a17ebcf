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


def completion_token_logps(model, input_ids: Tensor, attention_mask: Tensor,
                           completion_mask: Tensor, temperature: float = 1.0) -> Tensor:
    """Per-token log-probs of the completion tokens, zero elsewhere (prompt and padding).

    Position t of the result holds log p(input_ids[t + 1] | input_ids[:t + 1]).
    Shapes: input_ids, attention_mask, completion_mask [B, T] -> [B, T - 1].
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    mask = completion_mask[:, 1:].to(torch.float32)
    return token_logps(logits[:, :-1], input_ids[:, 1:], temperature) * mask


def sequence_logps(model, input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor
                   ) -> tuple[Tensor, Tensor]:
    """Summed completion log-probs and completion token counts of each sequence.

    Shapes: [B, T] inputs -> ([B], [B]).
    """
    per_token = completion_token_logps(model, input_ids, attention_mask, completion_mask)
    return per_token.sum(-1), completion_mask[:, 1:].sum(-1).to(per_token.dtype)
