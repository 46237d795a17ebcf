"""rlhf_ext against TRL on the same work: tokens per second, step time, peak memory.

    OMP_NUM_THREADS=1 python benchmarks/vs_trl.py [--methods dpo simpo kto reward]

One Llama-style model (32k vocabulary), one dataset of random-token pairs with a realistic
spread of lengths (prompts 32-512 tokens, completions 16-512, log-uniform), one batch size.
Each (method, trainer) pair runs in its own process with one thread, each trainer with its
own default settings; the learning rate is 0 so both see the same model at every step
and their logged numbers must agree (the parity column: speed is never bought with
different math). Printed: a table with the ratios ours / TRL, and JSON with --json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

from isolated import report, run_isolated

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("dpo", "simpo", "kto", "reward")


# -------------------------------------------------------------------------------------
# the shared world: tokenizer, model, data (built once by the parent process)
# -------------------------------------------------------------------------------------

def log_uniform(rng: random.Random, low: int, high: int) -> int:
    return int(round(math.exp(rng.uniform(math.log(low), math.log(high)))))


def build(root: Path, args) -> None:
    """A word-level tokenizer (one word = one token, so lengths are exact), a random
    Llama, and the pair and unpaired datasets."""
    import torch
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, args.vocab)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>")
    tok.save_pretrained(root / "model")
    torch.manual_seed(args.seed)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                         intermediate_size=args.hidden * 2, num_hidden_layers=args.layers,
                         num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 64,
                         max_position_embeddings=2048, pad_token_id=0, eos_token_id=1,
                         bos_token_id=1, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(root / "model")

    rng = random.Random(args.seed)
    words = lambda n: "".join(f" w{rng.randrange(2, args.vocab)}" for _ in range(n))  # noqa: E731
    rows = [{"prompt": words(log_uniform(rng, 32, 512)).strip(),
             "chosen": words(log_uniform(rng, 16, 512)),
             "rejected": words(log_uniform(rng, 16, 512))} for _ in range(args.pairs)]
    Dataset.from_list(rows).save_to_disk(root / "pairs")
    unpaired = [{"prompt": r["prompt"], "completion": r[k], "label": k == "chosen"}
                for r in rows for k in ("chosen", "rejected")][: args.pairs]
    Dataset.from_list(unpaired).save_to_disk(root / "unpaired")
    tokens = sum(2 * len(r["prompt"].split()) + len(r["chosen"].split())
                 + len(r["rejected"].split()) for r in rows)
    (root / "world.json").write_text(json.dumps({"pair_tokens": tokens}))


# -------------------------------------------------------------------------------------
# one run (child process)
# -------------------------------------------------------------------------------------

def common(args, out: str) -> dict:
    return dict(output_dir=out, learning_rate=0.0, num_train_epochs=1,
                per_device_train_batch_size=args.batch, logging_steps=1, report_to="none",
                use_cpu=True, bf16=False, save_strategy="no", disable_tqdm=True, seed=0)


# Our settings, each named by what it sets (DPO): "ours" is the defaults (gradient
# checkpointing on, prefix sharing wherever it applies, and under sdpa the shared pairs
# packed into one row without padding); the rest set all three explicitly ("padded" rows:
# one per sequence or per pair).
_PADDED = {"prefix_sharing": False, "padding_free": False}
VARIANTS = {"ours": {},
            "ours+no_checkpointing": {"gradient_checkpointing": False, **_PADDED},
            "ours+gradient_checkpointing": {"gradient_checkpointing": True, **_PADDED},
            "ours+gradient_checkpointing+prefix_sharing": {
                "gradient_checkpointing": True, "prefix_sharing": True, "padding_free": False},
            "ours+prefix_sharing": {"gradient_checkpointing": False, "prefix_sharing": True,
                                    "padding_free": False},
            "ours+padding_free": {"gradient_checkpointing": False, "prefix_sharing": False,
                                  "padding_free": True},
            "ours+precompute_ref": {"precompute_ref_log_probs": True}}


def make_trainer(method: str, impl: str, root: Path, args, out: str):
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(root / "model")
    model = str(root / "model")
    pairs, unpaired = load_from_disk(root / "pairs"), load_from_disk(root / "unpaired")
    kw = common(args, out)
    if impl.startswith("ours"):
        if method == "reward":
            from rlhf_ext.reward import RewardConfig, RewardTrainer, load_reward_model

            rm = load_reward_model(model, new_head=True)
            rm.score.weight.data.fill_(0.01)
            return RewardTrainer(rm, args=RewardConfig(max_length=args.max_length,
                                                       **VARIANTS[impl], **kw),
                                 train_dataset=pairs, processing_class=tok)
        from rlhf_ext.preference import PreferenceConfig, PreferenceTrainer

        loss = {"dpo": "sigmoid", "simpo": "simpo", "kto": "kto"}[method]
        extra = {"beta": 2.0, "simpo_gamma": 1.0} if method == "simpo" else {}
        return PreferenceTrainer(model, args=PreferenceConfig(
            loss_type=loss, max_length=args.max_length, **extra, **VARIANTS[impl],
            ref_logps_cache_dir=os.path.join(out, "cache"), **kw),
            train_dataset=unpaired if method == "kto" else pairs, processing_class=tok)
    if impl == "trl+no_checkpointing":  # TRL without its default gradient checkpointing
        kw["gradient_checkpointing"] = False
    if method == "dpo":
        from trl import DPOConfig, DPOTrainer

        return DPOTrainer(model, args=DPOConfig(loss_type="sigmoid", max_length=args.max_length,
                                                **kw),
                          train_dataset=pairs, processing_class=tok)
    if method == "simpo":
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        return CPOTrainer(model, args=CPOConfig(loss_type="simpo", beta=2.0, simpo_gamma=1.0,
                                                cpo_alpha=0.0, max_length=args.max_length, **kw),
                          train_dataset=pairs, processing_class=tok)
    if method == "kto":
        from trl import KTOConfig, KTOTrainer

        return KTOTrainer(model, args=KTOConfig(max_length=args.max_length, **kw),
                          train_dataset=unpaired, processing_class=tok)
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    rm = AutoModelForSequenceClassification.from_pretrained(model, num_labels=1)
    rm.score.weight.data.fill_(0.01)
    return RewardTrainer(rm, args=RewardConfig(max_length=args.max_length, **kw),
                         train_dataset=pairs, processing_class=tok)


def child(method: str, impl: str, root: Path, args) -> dict:
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()  # construction included: tokenizing, a precomputed reference
        trainer = make_trainer(method, impl, root, args, out)
        trainer.train()
        seconds = time.perf_counter() - start
    logs = [h for h in trainer.state.log_history if "loss" in h]
    mean = lambda key: sum(h[key] for h in logs) / len(logs) if key in logs[0] else None  # noqa: E731
    tokens = json.loads((root / "world.json").read_text())["pair_tokens"]
    if method == "kto":  # unpaired rows: prompt + one completion each
        from datasets import load_from_disk
        from transformers import AutoTokenizer

        data, tok = load_from_disk(root / "unpaired"), AutoTokenizer.from_pretrained(root / "model")
        n = lambda text: len(tok(text, add_special_tokens=False)["input_ids"])  # noqa: E731
        tokens = sum(n(p) + n(c) for p, c in zip(data["prompt"], data["completion"]))
    return {"method": method, "impl": impl, "seconds": seconds, "steps": len(logs),
            "step_seconds": seconds / max(1, len(logs)), "tokens_per_second": tokens / seconds,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "loss": mean("loss"),
            "logps_chosen": mean("logps/chosen")}


# -------------------------------------------------------------------------------------
# the parent: build, run each pair in its own process, print the table
# -------------------------------------------------------------------------------------

def rel(a, b):
    if a is None or b is None:
        return None
    return abs(a - b) / max(abs(b), 1e-12)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--max_length", type=int, default=1100)  # longer than any pair
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", nargs="*", default=[],
                        choices=[*list(VARIANTS)[1:], "trl+no_checkpointing"],
                        help="dpo only: also run our optimisations one at a time, or TRL "
                             "without gradient checkpointing")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--child", nargs=3, metavar=("METHOD", "IMPL", "ROOT"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        method, impl, root = args.child
        report(child(method, impl, Path(root), args))
        return

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build(root, args)
        passthrough = [f"--{k}={getattr(args, k)}" for k in
                       ("pairs", "batch", "vocab", "hidden", "layers", "max_length", "seed")]
        for method in args.methods:
            for impl in ("trl", "ours", *(args.variants if method == "dpo" else [])):
                results.append(run_isolated(
                    __file__, [*passthrough, "--child", method, impl, str(root)],
                    f"{method}/{impl}"))
                print(f"  {method} {impl}: {results[-1]['seconds']:.1f} s", file=sys.stderr)
    print(table(results, args))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def table(results: list[dict], args) -> str:
    by = {(r["method"], r["impl"]): r for r in results}
    lines = [f"model: Llama, vocab {args.vocab}, hidden {args.hidden}, {args.layers} layers; "
             f"{args.pairs} pairs, batch {args.batch}, one thread",
             "| method | trainer | tokens/s | step s | peak RSS MB | speed x | memory x "
             "| parity (loss, logps) |", "|---|---|---|---|---|---|---|---|"]
    for method in dict.fromkeys(r["method"] for r in results):
        trl = by[(method, "trl")]
        for r in [r for r in results if r["method"] == method]:
            speed = r["tokens_per_second"] / trl["tokens_per_second"]
            memory = r["peak_rss_mb"] / trl["peak_rss_mb"]
            parity = ""
            if r is not trl:
                diffs = [rel(r[k], trl[k]) for k in ("loss", "logps_chosen")]
                parity = " / ".join("-" if d is None else f"{d:.1e}" for d in diffs)
            lines.append(f"| {method} | {r['impl']} | {r['tokens_per_second']:.0f} | "
                         f"{r['step_seconds']:.2f} | {r['peak_rss_mb']:.0f} | {speed:.2f} | "
                         f"{memory:.2f} | {parity} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
