"""Judge a policy with the oracle: sample held-out prompts, score what comes back."""

from __future__ import annotations

from statistics import mean

import torch

from ..sampling import generate_completions
from .task import is_well_formed, oracle_score


@torch.no_grad()
def sequence_kl(model, ref_model, tokenizer, prompts: list[str], completion_ids: list[list[int]],
                batch_size: int = 64) -> list[float]:
    """Sampled estimate of KL(pi || ref) per sequence: sum_t log pi(y_t) - log ref(y_t) for
    y sampled from pi (temperature 1)."""
    from ..ppo.rollout import build_batch, response_logits, response_logps

    device = next(model.parameters()).device
    out = []
    for start in range(0, len(prompts), batch_size):
        prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"]
                      for p in prompts[start:start + batch_size]]
        batch = build_batch(tokenizer, prompt_ids, completion_ids[start:start + batch_size],
                            device)
        logps = response_logps(response_logits(model, batch), batch, 1.0)
        ref = response_logps(response_logits(ref_model, batch), batch, 1.0)
        out.extend(((logps - ref) * batch.response_mask).sum(1).tolist())
    return out


def evaluate_policy(model, tokenizer, prompts: list[str], max_new_tokens: int = 32,
                    temperature: float = 1.0, seed: int = 0, progress: bool = False,
                    ref_model=None) -> dict:
    """Mean oracle score, fraction well formed (finished with eos and grammatical), length,
    and with ``ref_model`` the sampled sequence-level KL to it (nats).

    Returns floats keyed ``oracle_score``, ``well_formed``, ``mean_length`` (tokens, eos
    included), ``kl_to_ref``, plus ``completions`` (the texts) and ``scores`` per sample.
    """
    was_training = model.training
    model.eval()
    out = generate_completions(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                               temperature=temperature, seed=seed, progress=progress)
    scores = [oracle_score(t) for t in out.texts]
    formed = [f and is_well_formed(t) for t, f in zip(out.texts, out.finished)]
    report = {
        "oracle_score": mean(scores),
        "well_formed": mean(formed),
        "mean_length": mean(len(ids) for ids in out.ids),
        "completions": out.texts,
        "scores": scores,
    }
    if ref_model is not None and temperature == 1.0:
        report["kl_to_ref"] = mean(sequence_kl(model, ref_model, tokenizer, prompts, out.ids))
    model.train(was_training)
    return report
