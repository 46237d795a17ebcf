"""Sampling speed on SmolLM2-135M-Instruct: ``rlhf_ext.sampling.generate_completions``
against transformers' own ``generate(do_sample=True)`` (torch.multinomial, every row's
prompt computed), at the shapes of make demo-real's evaluation: held-out review prompts,
32 new tokens at temperature 1, float32, one thread.

    python benchmarks/sampling.py [--shapes eval,reference] [--threads 1]

Shapes: ``eval``, 3 samples of each of 44 prompts in one batch of 132 (a policy's
evaluation); ``reference``, 16 samples of each of 11 prompts in one batch of 176 (a
quarter of the reference's 704). Both samplers draw from softmax(logits) and stop at eos,
so their completions differ in tokens, not in distribution: new tokens per second is the
fair column, seconds a batch the one a user sees. The middle row of each shape is
``generate_completions`` on transformers' own attention, without the package's
``grouped_heads_sdpa`` (the same tokens, the keys and values copied per query head).
"""

from __future__ import annotations

import argparse
import os
import time


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="eval,reference")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch
    from transformers import AutoTokenizer

    from rlhf_ext.models import load_causal_lm
    from rlhf_ext.sampling import generate_completions
    from rlhf_ext.worlds.smollm2 import smollm2_path
    from rlhf_ext.worlds.smollm2.task import films, review_prompts

    torch.set_num_threads(args.threads)
    path = str(smollm2_path())
    tok = AutoTokenizer.from_pretrained(path)
    model = load_causal_lm(path).eval()
    asks = review_prompts(films(0)[1], 2)  # the demo's 44 held-out prompts
    rendered = [tok.apply_chat_template(a, tokenize=False, add_generation_prompt=True)
                for a in asks]
    shapes = {"eval": (rendered, 3), "reference": (rendered[:11], 16)}
    eos = tok.eos_token_id

    def transformers_generate(prompts):
        batch = tok(prompts, return_tensors="pt", padding=True, padding_side="left",
                    add_special_tokens=False)
        torch.manual_seed(0)
        out = model.generate(**batch, max_new_tokens=32, do_sample=True, temperature=1.0,
                             top_k=0, top_p=1.0, pad_token_id=tok.pad_token_id)
        rows = out[:, batch["input_ids"].shape[1]:].tolist()
        return sum(row.index(eos) + 1 if eos in row else len(row) for row in rows)

    def ours(prompts):
        out = generate_completions(model, tok, prompts, 32, batch_size=len(prompts), seed=0)
        return sum(map(len, out.ids))

    def with_transformers_attention(run):
        """``run`` with transformers' own SDPA (which copies a grouped-query model's keys
        and values to every query head under a mask), not the package's
        ``grouped_heads_sdpa``, which ``generate_completions`` installs for the process."""
        from transformers import AttentionInterface
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        from rlhf_ext.shared_prefix import install_sdpa

        def wrapped(prompts):
            install_sdpa()  # first, so that the sampler's own call installs nothing
            mapping = AttentionInterface._global_mapping
            installed, mapping["sdpa"] = mapping["sdpa"], sdpa_attention_forward
            try:
                return run(prompts)
            finally:
                mapping["sdpa"] = installed
        return wrapped

    print(f"{'shape':<10} {'sampler':<24} {'rows':>5} {'s':>7} {'new tok/s':>10} {'vs':>6}")
    for name in args.shapes.split(","):
        prompts, copies = shapes[name]
        rows = [p for p in prompts for _ in range(copies)]
        rates = {}
        for label, run in (
                ("transformers generate", with_transformers_attention(transformers_generate)),
                ("ours, their attention", with_transformers_attention(ours)),
                ("generate_completions", ours)):
            start = time.perf_counter()
            tokens = run(rows)
            seconds = time.perf_counter() - start
            rates[label] = tokens / seconds
            ratio = rates[label] / rates["transformers generate"]
            print(f"{name:<10} {label:<24} {len(rows):>5} {seconds:>7.1f} "
                  f"{tokens / seconds:>10.1f} {ratio:>5.2f}x", flush=True)


if __name__ == "__main__":
    main()
