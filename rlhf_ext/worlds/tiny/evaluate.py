"""Judge a policy with the oracle: sample held-out prompts, score what comes back."""

from __future__ import annotations

from statistics import mean

from ...evaluation import sequence_kl
from ...sampling import generate_completions
from .task import is_well_formed, oracle_score


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
