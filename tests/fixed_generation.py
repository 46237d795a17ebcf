"""Generation replaced by fixed token ids, in TRL's online trainers and in ours, so that
both train on the same completions: completion k of a prompt is a function of the prompt's
token ids and k alone. Micro-batches keep generation order on both sides."""

import random

import torch

from rlhf_ext.sampling import Completions

MAX_NEW = 8


def completion_table(tok, prompt_ids: list[int], k: int) -> list[int]:
    """The k-th fixed completion of a prompt: 2..MAX_NEW tokens; every third is cut at
    MAX_NEW without eos (truncated)."""
    rng = random.Random(hash((tuple(prompt_ids), k)) % 2**32)
    special = set(tok.all_special_ids)
    body = [t for t in range(len(tok)) if t not in special]
    if k % 3 == 2:
        return [rng.choice(body) for _ in range(MAX_NEW)]
    return [rng.choice(body) for _ in range(rng.randint(1, MAX_NEW - 1))] + [tok.eos_token_id]


def fixed_ids(tok, prompts_ids: list[list[int]]) -> list[list[int]]:
    """One completion per row; consecutive equal prompts get completions 0, 1, ..."""
    out, seen = [], {}
    for i, ids in enumerate(prompts_ids):
        key = tuple(ids)
        k = seen[key] = seen.get(key, -1) + 1 if i and tuple(prompts_ids[i - 1]) == key else 0
        out.append(completion_table(tok, ids, k))
    return out


def patch_generation(monkeypatch, tok):
    """Fixed completions and unshuffled micro-batches in TRL's GRPO/RLOO and in ours."""
    import trl.trainer.grpo_trainer as grpo_module
    import trl.trainer.rloo_trainer as rloo_module

    import rlhf_ext.ppo.experience as experience
    import rlhf_ext.ppo.rollout as rollout

    def trl_generate(self, prompt_ids, images, multimodal_fields, *a, **k):
        return fixed_ids(tok, prompt_ids), None

    def rloo_generate(self, prompt_ids, images, multimodal_fields):
        return fixed_ids(tok, prompt_ids)

    def our_generate(policy, tokenizer, texts, max_new_tokens, **kwargs):
        prompt_ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        ids = fixed_ids(tok, prompt_ids)
        return Completions([tokenizer.decode(i, skip_special_tokens=True) for i in ids], ids,
                           [i[-1] == tok.eos_token_id for i in ids])

    monkeypatch.setattr(grpo_module.GRPOTrainer, "_generate_single_turn", trl_generate)
    monkeypatch.setattr(rloo_module.RLOOTrainer, "_generate_single_turn", rloo_generate)
    monkeypatch.setattr(rollout, "generate_completions", our_generate)
    identity = lambda batch: batch  # noqa: E731
    monkeypatch.setattr(grpo_module, "shuffle_sequence_dict", identity)
    monkeypatch.setattr(rloo_module, "shuffle_sequence_dict", identity)
    monkeypatch.setattr(experience, "minibatch_order",
                        lambda n, unit, generator: torch.arange(n))
