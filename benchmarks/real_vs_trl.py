"""rlhf_ext against TRL on SmolLM2-135M-Instruct with English text at chat-like lengths.

    OMP_NUM_THREADS=1 python benchmarks/real_vs_trl.py [--methods dpo] [--json out.json]

The real-model table of docs/benchmarks.md. The model is SmolLM2-135M-Instruct (30 layers,
hidden 576, vocabulary 49,152; ``python -m rlhf_ext.worlds.smollm2``); the text is English prose
(the docstrings of Python's standard library read from its source, tokenized by SmolLM2's tokenizer) cut into
prompts of about 160 tokens and completions of about 220, log-normal, batch 4 pairs.
Every (method, setting) runs in its own one-thread process through
``benchmarks/vs_trl.py``'s child (the same trainers, learning rate 0, the parity column);
settings: each trainer's defaults, and each at the other's checkpointing, plus our layouts.

MFU: the model FLOPs a step needs (6 N per trained token and 2 N per reference token for
the N non-embedding weights, plus the LM head where the loss reads it: completion
positions; attention's own FLOPs, a few percent at these lengths, are left out) over the
measured time, against the machine's single-thread float32 matmul rate measured here on
the model's own shapes. The same FLOPs count for both trainers: work one of them does
that the math does not need (logits at prompt positions, recomputation under
checkpointing) lowers its MFU.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from isolated import run_isolated  # noqa: E402

VS_TRL = Path(__file__).resolve().parent / "vs_trl.py"
# (method, setting); the first of each method is TRL's default, the ratios' base
SETTINGS = {
    "dpo": ["trl", "trl+no_checkpointing", "ours", "ours+gradient_checkpointing+prefix_sharing",
            "ours+gradient_checkpointing", "ours+no_checkpointing", "ours+prefix_sharing",
            "ours+padding_free"],
    "simpo": ["trl", "ours", "ours+gradient_checkpointing+prefix_sharing",
              "ours+gradient_checkpointing", "ours+no_checkpointing"],
    "kto": ["trl", "ours", "ours+no_checkpointing"],
    "reward": ["trl", "ours", "ours+gradient_checkpointing+prefix_sharing",
               "ours+gradient_checkpointing", "ours+no_checkpointing"],
}


def english(limit_chars: int = 2_000_000) -> str:
    """Prose from the docstrings of the standard library's top-level modules, read from
    their source (nothing imported): the same text on every machine with this Python."""
    import ast
    import sysconfig

    texts, size = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        if size > limit_chars:
            break
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 200:
                    texts.append(" ".join(doc.split()))
                    size += len(texts[-1])
    return "\n".join(texts)


def build(root: Path, args) -> dict:
    """root/model (SmolLM2's folder, linked), root/pairs and root/unpaired, root/world.json."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    from rlhf_ext.worlds.smollm2 import smollm2_path

    (root / "model").symlink_to(smollm2_path())
    tok = AutoTokenizer.from_pretrained(root / "model")
    ids = tok(english(), add_special_tokens=False)["input_ids"]
    rng = random.Random(args.seed)
    draw = lambda mean: max(8, int(rng.lognormvariate(math.log(mean), 0.4)))  # noqa: E731

    def window(n):
        start = rng.randrange(0, len(ids) - n)
        return tok.decode(ids[start:start + n])

    rows = [{"prompt": window(draw(args.prompt_tokens)),
             "chosen": " " + window(draw(args.completion_tokens)),
             "rejected": " " + window(draw(args.completion_tokens))} for _ in range(args.pairs)]
    Dataset.from_list(rows).save_to_disk(root / "pairs")
    unpaired = [{"prompt": r["prompt"], "completion": r[k], "label": k == "chosen"}
                for r in rows for k in ("chosen", "rejected")][: args.pairs]
    Dataset.from_list(unpaired).save_to_disk(root / "unpaired")
    n = lambda text: len(tok(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    prompt = sum(n(r["prompt"]) for r in rows)
    completion = sum(n(r["chosen"]) + n(r["rejected"]) for r in rows)
    world = {"pair_tokens": 2 * prompt + completion, "completion_tokens": completion,
             "unpaired_tokens": sum(n(u["prompt"]) + n(u["completion"]) for u in unpaired),
             "unpaired_completion_tokens": sum(n(u["completion"]) for u in unpaired),
             "pairs": args.pairs}
    (root / "world.json").write_text(json.dumps(world))
    return world


def model_shapes() -> dict:
    from transformers import AutoConfig

    from rlhf_ext.worlds.smollm2 import smollm2_path

    c = AutoConfig.from_pretrained(smollm2_path())
    kv = c.hidden_size // c.num_attention_heads * c.num_key_value_heads
    per_layer = (c.hidden_size * (2 * c.hidden_size + 2 * kv)  # q, o; k, v
                 + 3 * c.hidden_size * c.intermediate_size)  # gate, up, down
    return {"body": c.num_hidden_layers * per_layer, "head": c.hidden_size * c.vocab_size,
            "hidden": c.hidden_size, "intermediate": c.intermediate_size}


def step_flops(method: str, world: dict, shapes: dict) -> float:
    """The model FLOPs of the whole run (see the module docstring)."""
    tokens, completion = world["pair_tokens"], world["completion_tokens"]
    if method == "kto":  # one completion per row, plus KTO's mismatched pairs forward
        tokens, completion = world["unpaired_tokens"], world["unpaired_completion_tokens"]
    train = 6 * (shapes["body"] * tokens + shapes["head"] * completion)
    if method == "reward":  # no LM head; a 1-wide head: nothing
        return 6 * shapes["body"] * tokens
    if method in ("dpo", "kto"):  # the reference forward
        train += 2 * (shapes["body"] * tokens + shapes["head"] * completion)
    if method == "kto":
        train += 4 * (shapes["body"] * tokens + shapes["head"] * completion)  # policy+ref, KL
    return train


def matmul_rate(shapes: dict, seconds: float = 5.0) -> float:
    """Single-thread float32 FLOP/s on the MLP's shapes, [512 tokens, hidden] x [hidden,
    intermediate]."""
    import torch

    torch.set_num_threads(1)
    a = torch.randn(512, shapes["hidden"])
    b = torch.randn(shapes["hidden"], shapes["intermediate"])
    for _ in range(3):
        a @ b
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        n += 1
    return 2 * 512 * shapes["hidden"] * shapes["intermediate"] * n / (time.perf_counter() - start)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["dpo"], choices=list(SETTINGS))
    parser.add_argument("--settings", nargs="*", help="a subset of each method's settings")
    parser.add_argument("--pairs", type=int, default=12)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt_tokens", type=int, default=160)
    parser.add_argument("--completion_tokens", type=int, default=220)
    parser.add_argument("--max_length", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)

    import torch

    shapes = model_shapes()
    peak = matmul_rate(shapes)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        world = build(root, args)
        passthrough = [f"--pairs={args.pairs}", f"--batch={args.batch}",
                       f"--max_length={args.max_length}", f"--seed={args.seed}"]
        for method in args.methods:
            for setting in SETTINGS[method]:
                if args.settings and setting not in args.settings and setting != "trl":
                    continue
                try:
                    r = run_isolated(str(VS_TRL), [*passthrough, "--child", method, setting,
                                                   str(root)], f"{method}/{setting}")
                except SystemExit as failure:  # e.g. killed for memory: say so, go on
                    print(f"  {method} {setting} FAILED: {str(failure)[-300:]}",
                          file=sys.stderr)
                    continue
                r["mfu"] = step_flops(method, world, shapes) / r["seconds"] / peak
                results.append(r)
                print(f"  {method} {setting}: {r['seconds']:.1f} s, "
                      f"{r['peak_rss_mb']:.0f} MB", file=sys.stderr)
    from vs_trl import table

    header = (f"SmolLM2-135M-Instruct, English text, {args.pairs} pairs (prompt ~"
              f"{args.prompt_tokens}, completions ~{args.completion_tokens} tokens, "
              f"log-normal; {world['pair_tokens']} tokens), batch {args.batch}, one thread; "
              f"matmul peak {peak / 1e9:.1f} GFLOP/s single-thread float32, torch "
              f"{torch.__version__}")
    lines = table(results, argparse.Namespace(vocab=0, hidden=0, layers=0, pairs=args.pairs,
                                              batch=args.batch)).splitlines()[1:]
    lines[0] += " MFU |"
    lines[1] += "---|"
    for i, r in enumerate(results):
        lines[2 + i] += f" {r['mfu']:.2f} |"
    print(header + "\n" + "\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps({"world": world, "peak_flops": peak,
                                               "results": results}, indent=2))


if __name__ == "__main__":
    main()
