"""The log-prob optimisations one at a time, on one DPO-shaped batch: time and peak memory
of forward + backward through the model for each way of getting completion log-probs.

    OMP_NUM_THREADS=1 python benchmarks/logps_paths.py

Ways, each in its own process (one thread), all giving the same numbers (checked here):
  full_log_softmax   logits at every position, log_softmax over [B, T, V] in float32
  chunked_softmax    logits at every position, log-softmax 512 positions at a time
  completion_head    LM head only at completion positions, chunked, recomputed in backward
                     (rlhf_ext's default: ``logps.sequence_logps``)
  + padding_free     the same, the batch packed into one row
  + prefix_sharing   the same, one row per pair over one prompt
"""

from __future__ import annotations

import argparse
import random
import resource
import time

from isolated import report, run_isolated

WAYS = ["full_log_softmax", "chunked_softmax", "completion_head", "padding_free",
        "prefix_sharing"]


def batch_and_model(args):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhf_ext.data import PreferenceCollator

    rng = random.Random(args.seed)
    ids = lambda lo, hi: [rng.randrange(2, args.vocab) for _ in range(rng.randint(lo, hi))]  # noqa: E731
    rows = [{"prompt_ids": ids(32, 512), "chosen_ids": ids(16, 512),
             "rejected_ids": ids(16, 512)} for _ in range(args.batch)]
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64, max_position_embeddings=2048,
        tie_word_embeddings=False))
    return rows, model, PreferenceCollator


def run(way: str, args) -> dict:
    import torch

    from rlhf_ext.logps import sequence_logps, token_logps

    torch.set_num_threads(1)
    rows, model, collator = batch_and_model(args)
    layout = {"padding_free": {"padding_free": True},
              "prefix_sharing": {"prefix_sharing": True}}.get(way, {})
    batch = collator(0, None, **layout)(rows)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    if way in ("full_log_softmax", "chunked_softmax"):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       use_cache=False).logits[:, :-1]
        labels = batch["input_ids"][:, 1:]
        if way == "full_log_softmax":
            per_token = torch.log_softmax(logits.float(), -1).gather(
                -1, labels.unsqueeze(-1)).squeeze(-1)
        else:
            per_token = token_logps(logits, labels)
        logps = (per_token * batch["completion_mask"][:, 1:]).sum(-1)
    else:
        logps, _ = sequence_logps(model, batch["input_ids"], batch.get("attention_mask"),
                                  batch["completion_mask"], batch.get("position_ids"),
                                  batch.get("sequence_ids"), batch.get("segment_ids"))
    logps.sum().backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"way": way, "seconds": seconds, "peak_rss_mb": peak, "increase_mb": peak - base,
            "tokens": int(batch["input_ids"].numel()), "logps": logps.tolist()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--way", choices=WAYS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.way:
        report(run(args.way, args))
        return
    flags = [f"--{k}={getattr(args, k)}" for k in ("batch", "vocab", "hidden", "layers", "seed")]
    results = [run_isolated(__file__, [*flags, "--way", way], way) for way in WAYS]
    first = results[0]
    print(f"forward + backward of one DPO batch ({args.batch} pairs, vocab {args.vocab}, "
          f"hidden {args.hidden}, {args.layers} layers), one thread")
    print("| way | tokens in the batch | seconds | peak RSS MB | memory added MB | speed x "
          "| max relative logp difference |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        diff = max(abs(a - b) / abs(b) for a, b in zip(r["logps"], first["logps"]))
        print(f"| {r['way']} | {r['tokens']} | {r['seconds']:.2f} | {r['peak_rss_mb']:.0f} | "
              f"{r['increase_mb']:.0f} | {first['seconds'] / r['seconds']:.2f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
