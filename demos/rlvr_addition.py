"""Verifiable rewards on SmolLM2-135M-Instruct: GRPO on two-digit addition, held-out
exact-match accuracy before and after (the experiment a `make demo-real` stage is to run).

    .venv/bin/python demos/rlvr_addition.py [--iterations 12] [--out outputs/rlvr_addition]

Training prompts and held-out problems share no (a, b) pair
(``rlhf_ext.worlds.smollm2.rlvr``). Accuracy is the share of problems whose reply's last
number is the sum: greedy, and sampled (4 samples a problem at the training temperature),
each with its binomial standard error. Writes ``result.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf_ext import GRPOConfig, GRPOTrainer
from rlhf_ext.sampling import generate_completions
from rlhf_ext.worlds.smollm2 import smollm2_path
from rlhf_ext.worlds.smollm2.rlvr import (
    addition_problems,
    correctness_reward,
    final_number,
    format_reward,
)


def accuracy(model, tok, rows, temperature: float, samples: int, seed: int) -> dict:
    """Greedy and sampled exact-match accuracy on ``rows``, with standard errors."""
    prompts = [tok.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True)
               for r in rows]
    answers = [r["answer"] for r in rows]
    greedy = generate_completions(model, tok, prompts, 16, temperature=0.0, batch_size=48).texts
    sampled = generate_completions(model, tok, [p for p in prompts for _ in range(samples)], 16,
                                   temperature=temperature, batch_size=64, seed=seed).texts
    out = {"examples": greedy[:4]}
    for name, texts, expected in (("greedy", greedy, answers),
                                  ("sampled", sampled, [a for a in answers for _ in range(samples)])):
        p = sum(final_number(t) == a for t, a in zip(texts, expected)) / len(texts)
        out[name] = p
        out[f"{name}_se"] = math.sqrt(p * (1 - p) / len(texts))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=12)
    parser.add_argument("--learning_rate", type=float, default=2e-5)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--held_out", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="outputs/rlvr_addition")
    opts = parser.parse_args()
    out = Path(opts.out)
    path = str(smollm2_path())
    tok = AutoTokenizer.from_pretrained(path)
    train, held = addition_problems(opts.seed, opts.held_out)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    before = accuracy(model, tok, held, opts.temperature, 4, opts.seed + 5)
    print("before", {k: v for k, v in before.items() if k != "examples"}, flush=True)
    # one optimizer step per rollout of 64 samples (8 prompts x 8), plain GRPO, no KL term
    args = GRPOConfig(output_dir=str(out), learning_rate=opts.learning_rate, num_generations=8,
                      per_device_train_batch_size=16, gradient_accumulation_steps=4,
                      max_completion_length=16, temperature=opts.temperature, beta=0.0,
                      max_steps=opts.iterations, logging_steps=1, report_to="none",
                      save_strategy="no", gradient_checkpointing=False,
                      reward_weights=[1.0, 0.5], seed=opts.seed, disable_tqdm=True)
    start = time.time()
    trainer = GRPOTrainer(model=model, reward_funcs=[correctness_reward, format_reward],
                          args=args, train_dataset=Dataset.from_list(train),
                          processing_class=tok)
    trainer.train()
    seconds = time.time() - start
    after = accuracy(trainer.policy, tok, held, opts.temperature, 4, opts.seed + 5)
    print("after", {k: v for k, v in after.items() if k != "examples"}, flush=True)
    curve = [{k: h[k] for k in ("step", "reward", "rewards/correctness_reward/mean",
                                "completions/mean_length") if k in h}
             for h in trainer.state.log_history if "reward" in h]
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(
        {"options": vars(opts), "train_seconds": round(seconds, 1), "before": before,
         "after": after, "curve": curve}, indent=1))
    print(f"greedy {before['greedy']:.3f} -> {after['greedy']:.3f}, sampled "
          f"{before['sampled']:.3f} -> {after['sampled']:.3f} ({seconds:.0f} s of training)")


if __name__ == "__main__":
    main()
