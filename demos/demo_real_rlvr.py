"""Verifiable rewards in make demo-real: SmolLM2-135M-Instruct learns two-digit addition
from rewards a program computes (rlhf_ext.worlds.smollm2.rlvr), judged on held-out problems.

    python demos/demo_real_rlvr.py --out OUT --name reference|<stage> [--seed 0] [--quick] [--use_vllm]

The problems are made once (``make_problems``: OUT/data/rlvr for the recipe, the held-out
split beside it). The rlvr stages are recipes/ppo.py runs of recipes/smollm2/rlvr.yaml (GRPO;
RLOO and PPO with a value head by one argument). This script is one evaluation, in its own
process: the reference or a trained policy on the held-out problems, written to
OUT/rlvr_eval/<name>.json (rlvr_eval_quick/ with --quick). Accuracy is exact match of the reply's last number with the sum
(what the correctness reward reads): greedy, and pass@k from n samples per problem at the
training temperature (the unbiased estimator of Chen et al. 2021), each with its standard
error over problems; the KL to the reference is sampled at temperature 1, as the sentiment
rows' is.
"""

import argparse
import json
import time
from math import comb
from pathlib import Path

TEMPERATURE = 0.7  # recipes/smollm2/rlvr.yaml's
HELD_OUT = 96
SIZES = {  # held-out problems judged (the first of the 96), samples per problem for pass@k,
    # temperature-1 samples per problem for the KL
    "default": dict(held_out=96, samples=8, pass_at=[1, 4, 8], kl_samples=2),
    "quick": dict(held_out=96, samples=2, pass_at=[1, 2], kl_samples=1),
}


def eval_folder(out: Path, quick: bool) -> Path:
    return out / ("rlvr_eval_quick" if quick else "rlvr_eval")


def make_problems(out: Path, seed: int) -> None:
    """OUT/data/rlvr (a "train" split: prompt, answer) and OUT/data/rlvr_held_out.json."""
    done = out / "data" / "rlvr_held_out.json"
    if done.exists():
        return
    from datasets import Dataset, DatasetDict

    from rlhf_ext.worlds.smollm2.rlvr import addition_problems

    train, held = addition_problems(seed, HELD_OUT)
    DatasetDict({"train": Dataset.from_list(train)}).save_to_disk(str(out / "data" / "rlvr"))
    partial = done.with_suffix(".json.partial")
    partial.write_text(json.dumps(held))
    partial.replace(done)


def pass_at_k(n: int, c: int, k: int) -> float:
    """P(at least one of k draws without replacement from n samples, c of them right, is
    right) = 1 - C(n - c, k) / C(n, k)."""
    return 1.0 - comb(n - c, k) / comb(n, k)


def mean_se(values: list[float]) -> tuple[float, float]:
    from statistics import mean, stdev

    return mean(values), stdev(values) / len(values) ** 0.5


def evaluate(model, reference, tokenizer, rows: list[dict], size: dict, seed: int,
             use_vllm: bool = False) -> dict:
    """Greedy and sampled accuracy, pass@k, format rate, length and KL of ``model`` on
    ``rows`` (``reference`` None: the model is the reference, KL 0). ``size``: "samples" per
    problem at the training temperature (0: none; format and length then read the greedy
    replies), the k of "pass_at", "kl_samples" per problem at temperature 1 (0: no KL).
    ``use_vllm``: sampled on vLLM (``ModelSampler``), the KL's reference forward ours."""
    from rlhf_ext.evaluation import sequence_kl
    from rlhf_ext.vllm_engine import ModelSampler
    from rlhf_ext.worlds.smollm2.rlvr import MAX_COMPLETION_TOKENS, final_number, format_reward

    prompts = [tokenizer.apply_chat_template(r["prompt"], tokenize=False,
                                             add_generation_prompt=True) for r in rows]
    answers = [r["answer"] for r in rows]
    n, p = size["samples"], len(rows)
    sampler = ModelSampler(model, tokenizer, use_vllm, prompts, MAX_COMPLETION_TOKENS,
                           batch_size=128)

    def sample(copies: int, temperature: float, offset: int, logps: bool = False):
        return sampler(  # each problem's copies side by side (one prompt forward)
            [x for x in prompts for _ in range(copies)], MAX_COMPLETION_TOKENS,
            temperature, seed=seed + offset, return_logps=logps)

    greedy = sample(1, 0.0, 0)
    right = [float(final_number(t) == a) for t, a in zip(greedy.texts, answers)]
    result = {"problems": p, "samples": n, "temperature": TEMPERATURE}
    result["greedy"], result["greedy_se"] = mean_se(right)
    sampled = sample(n, TEMPERATURE, 1) if n else greedy  # n = 0: the greedy replies' format
    correct = [sum(final_number(sampled.texts[i * n + j]) == answers[i] for j in range(n))
               for i in range(p)]
    for k in size["pass_at"]:
        result[f"pass@{k}"], result[f"pass@{k}_se"] = mean_se(
            [pass_at_k(n, c, k) for c in correct])
    result["format"] = sum(format_reward(sampled.texts)) / len(sampled.texts)
    result["mean_length"] = sum(map(len, sampled.ids)) / len(sampled.ids)
    if reference is None:
        result["kl_to_reference"] = 0.0
    elif size["kl_samples"]:
        m = size["kl_samples"]
        drawn = sample(m, 1.0, 2, logps=True)
        result["kl_to_reference"] = mean_se(sequence_kl(
            model, reference, tokenizer, [x for x in prompts for _ in range(m)], drawn.ids,
            logps=drawn.logps, group=m))[0]
    sampler.close()
    result["examples"] = [{"question": rows[i]["prompt"][-1]["content"], "answer": answers[i],
                           "greedy": greedy.texts[i], "sampled": sampled.texts[i * max(n, 1)]}
                          for i in range(4)]
    return result


def curves(summary: dict) -> dict[str, list]:
    """Per iteration: the summed reward, the correctness reward's mean, the mean length."""
    rows = [h for h in summary.get("log_history", []) if "rewards/correctness_reward/mean" in h]
    return {"step": [h["step"] for h in rows], "reward": [h["reward"] for h in rows],
            "correctness": [h["rewards/correctness_reward/mean"] for h in rows],
            "mean_length": [h["completions/mean_length"] for h in rows]}


def plot(rlvr: dict, out: Path) -> str:
    import matplotlib
    from demo_real_report import save_figure

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for name, c in rlvr["training"].items():
        axes[0].plot(c["step"], c["correctness"], marker="o", markersize=3, label=name)
        axes[1].plot(c["step"], c["reward"], marker="o", markersize=3, label=name)
    axes[0].set(title="Rollouts: share of correct sums", xlabel="iteration",
                ylabel="rewards/correctness_reward/mean")
    axes[1].set(title="Rollouts: weighted reward (correctness + format + overlong)",
                xlabel="iteration", ylabel="reward")
    save_figure(fig, axes, out / "rlvr_curves.png")
    return "rlvr_curves.png"


def markdown(rlvr: dict, stage_seconds: dict) -> list[str]:
    """The verifiable-rewards section of report.md."""
    from demo_real_report import short

    base = rlvr["methods"]["reference"]
    ks = [k[5:] for k in base if k.startswith("pass@") and not k.endswith("_se")]
    lines = ["## Verifiable rewards: two-digit addition", "",
             f"\"What is a + b? Answer with the number only.\" for 10 <= a, b <= 49; "
             f"{base['problems']} held-out problems that no training prompt asks. A reply is "
             f"right when its last number is the sum. Greedy, and pass@k from "
             f"{base['samples']} samples a problem at temperature {base['temperature']}; "
             f"± one standard error over problems. Rewards: correctness 1.0, format 0.5, "
             f"overlong penalty 0.5 (recipes/smollm2/rlvr.yaml).", "",
             "| method | greedy | " + " | ".join(f"pass@{k}" for k in ks)
             + " | format | length | KL to reference | train s |",
             "|---|---|" + "---|" * len(ks) + "---|---|---|---|"]
    for name, m in rlvr["methods"].items():
        train = stage_seconds.get(name)
        lines.append(f"| {name} | {m['greedy']:.3f} ± {m['greedy_se']:.3f} | " + " | ".join(
            f"{m[f'pass@{k}']:.3f} ± {m[f'pass@{k}_se']:.3f}" for k in ks)
            + f" | {m['format']:.2f} | {m['mean_length']:.1f} | {m['kl_to_reference']:.2f} | "
            f"{'-' if train is None else f'{train:.0f}'} |")
    lines += ["", "![verifiable-reward curves](rlvr_curves.png)", "",
              "| question | method | greedy reply | a sampled reply |", "|---|---|---|---|"]
    for i, ex in enumerate(base["examples"][:2]):
        for name, m in rlvr["methods"].items():
            e = m["examples"][i]
            lines.append(f"| {short(ex['question'], 40)} (= {ex['answer']}) | {name} | "
                         f"{short(e['greedy'], 50)} | {short(e['sampled'], 50)} |")
    return lines + [""]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--name", required=True, help="reference, or an rlvr stage's folder")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--use_vllm", action="store_true", help="sample on vLLM")
    args = parser.parse_args(argv)
    import torch
    from transformers import AutoTokenizer

    from rlhf_ext.models import load_causal_lm
    from rlhf_ext.worlds.smollm2 import smollm2_path

    out, size = Path(args.out), SIZES["quick" if args.quick else "default"]
    rows = json.loads((out / "data" / "rlvr_held_out.json").read_text())[:size["held_out"]]
    path = str(smollm2_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    reference = load_causal_lm(path, dtype=torch.float32).eval()
    start = time.time()
    if args.name == "reference":
        result = evaluate(reference, None, tokenizer, rows, size, args.seed, args.use_vllm)
    else:
        model = load_causal_lm(str(out / args.name), dtype=torch.float32).eval()
        result = evaluate(model, reference, tokenizer, rows, size, args.seed, args.use_vllm)
    result["seconds"] = time.time() - start
    folder = eval_folder(out, args.quick)
    folder.mkdir(exist_ok=True)
    partial = folder / f"{args.name}.json.partial"  # the finished file appears whole or not
    partial.write_text(json.dumps(result, indent=2))
    partial.replace(folder / f"{args.name}.json")


if __name__ == "__main__":
    main()
