"""The main job: the whole RLHF pipeline on the tiny world, judged by its oracle.

    python demos/demo.py [--out outputs/demo] [--fresh] [--quick] [--seed 0]

Stages, each one recipe run in its own process, one at a time (demos/stage_pool.py): SFT -> reward model -> PPO against that
reward model, and dpo, ipo, kto, orpo, simpo from the same SFT model on the same
oracle-labelled pairs. Then every policy is evaluated on the same held-out prompts (mean
oracle score, win rate against SFT, sampled KL to SFT, mean length), and the report is
written to OUT/report.json, OUT/report.md and OUT/*.png; each stage's output goes to
OUT/<stage>/log.txt. A finished stage (its summary file exists) is reused unless --fresh;
--quick shortens every stage (used by the tests).
"""

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

DEMOS = Path(__file__).resolve().parent
RECIPES = DEMOS.parent / "recipes"
PREFERENCE_LOSSES = ["dpo", "ipo", "kto", "orpo", "simpo"]
SCHEMA_VERSION = 1


def stages(out: Path, world: Path, quick: bool) -> list[tuple[str, str, str, str, list[str]]]:
    """(name, recipe, config, summary file, extra args) in running order."""
    common = ["--tiny_world_dir", str(world)]
    sft = str(out / "sft")
    short = {"sft": ["--num_train_epochs", "3"], "reward": ["--num_train_epochs", "2"],
             "ppo": ["--num_train_epochs", "6"], "pref": ["--max_steps", "60"]}
    plan = [("sft", "sft.py", "tiny/sft.yaml", "sft_summary.json",
             common + ["--model_name_or_path", str(world / "base"),
                       "--dataset_name", str(world / "data" / "sft")]
             + (short["sft"] if quick else [])),
            ("reward", "reward.py", "tiny/reward.yaml", "reward_summary.json",
             common + ["--model_name_or_path", sft, "--tiny_eval_prompts", "0",
                       "--dataset_name", str(world / "data" / "pairs"),
                       "--eval_dataset_name", str(world / "data" / "pairs_eval")]
             + (short["reward"] if quick else [])),
            ("ppo", "ppo.py", "tiny/ppo.yaml", "ppo_summary.json",
             common + ["--model_name_or_path", sft, "--reward_model_path", str(out / "reward"),
                       "--dataset_name", str(world / "data" / "prompts_rl"),
                       "--tiny_eval_prompts", "0"] + (short["ppo"] if quick else []))]
    for loss in PREFERENCE_LOSSES:
        plan.append((loss, "preference.py", f"tiny/{loss}.yaml", "preference_summary.json",
                     common + ["--model_name_or_path", sft, "--tiny_eval_prompts", "0",
                               "--dataset_name", str(world / "data" / "pairs")]
                     + (short["pref"] if quick else [])))
    return plan


def stage_command(name, recipe, config, extra, out: Path, seed: int) -> list[str]:
    """One stage's recipe as a command: its config, then the demo's overrides."""
    return [sys.executable, str(RECIPES / recipe), "--config", str(RECIPES / config),
            "--output_dir", str(out / name), "--seed", str(seed), "--disable_tqdm", "true",
            *extra]


def evaluate_all(out: Path, world: Path, methods: list[str], n_prompts: int, seed: int) -> dict:
    """Every policy on the same held-out prompts and sampling seed, against SFT."""
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_ext.worlds.tiny.evaluate import evaluate_policy
    from rlhf_ext.worlds.tiny.world import load_split

    torch.manual_seed(seed)
    prompts = list(load_split(world, "prompts_eval")["prompt"][:n_prompts])
    tokenizer = AutoTokenizer.from_pretrained(out / "sft")
    sft = AutoModelForCausalLM.from_pretrained(out / "sft").eval()
    results, sft_scores = {}, None
    for method in tqdm(["sft", *methods], desc="evaluating policies"):
        model = sft if method == "sft" else AutoModelForCausalLM.from_pretrained(out / method)
        report = evaluate_policy(model.eval(), tokenizer, prompts, seed=seed + 1, ref_model=sft)
        scores = report["scores"]
        if sft_scores is None:
            sft_scores = scores
        wins = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores, sft_scores)]
        results[method] = {"oracle_score": report["oracle_score"],
                           "win_rate_vs_sft": sum(wins) / len(wins),
                           "kl_to_sft": report["kl_to_ref"],
                           "mean_length": report["mean_length"],
                           "well_formed": report["well_formed"],
                           "example": report["completions"][0]}
    return results


def curves(summary: dict) -> dict[str, list]:
    """Training curves from a stage's log history: the reward signal and, for PPO, the KL."""
    history = [h for h in summary.get("log_history", []) if "loss" in h]
    key = "objective/scores" if any("objective/scores" in h for h in history) \
        else "rewards/margins"
    history = [h for h in history if key in h]  # PPO: the logs whose steps held a rollout
    out = {"step": [h["step"] for h in history], "reward_key": key,
           "reward": [h[key] for h in history]}
    if any("objective/kl" in h for h in history):
        out["kl"] = [h["objective/kl"] for h in history]
    return out


def plot(report: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = report["methods"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for name in PREFERENCE_LOSSES:
        c = report["training"][name]
        axes[0].plot(c["step"], c["reward"], label=name)
    axes[0].set(title="Preference training: implicit reward margin\n(each loss on its own scale)", xlabel="step",
                ylabel="rewards/margins")
    ppo = report["training"]["ppo"]
    axes[1].plot(ppo["step"], ppo["reward"], color="black")
    axes[1].set(title="PPO: reward-model score of rollouts", xlabel="step",
                ylabel="objective/scores")
    axes[2].plot(ppo["step"], ppo.get("kl", []), color="firebrick")
    axes[2].set(title="PPO: KL to the reference (nats/sequence)", xlabel="step",
                ylabel="objective/kl")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out / "training_curves.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 5))
    for name, m in methods.items():
        ax.scatter(m["kl_to_sft"], m["oracle_score"], s=60)
        ax.annotate(name, (m["kl_to_sft"], m["oracle_score"]), textcoords="offset points",
                    xytext=(6, 4))
    ax.set(title="Oracle score against KL to the SFT model (held-out prompts)",
           xlabel="sampled KL(policy || SFT), nats per completion", ylabel="mean oracle score")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "frontier.png", dpi=110)
    plt.close(fig)
    return ["training_curves.png", "frontier.png"]


def markdown(report: dict) -> str:
    lines = ["# rlhf_ext tiny-world demo", "",
             f"Seed {report['seed']}, {report['n_eval_prompts']} held-out prompts; "
             f"total {report['total_seconds']:.0f} s.", "",
             "| method | oracle score | win rate vs SFT | KL to SFT | mean length | well formed | train time |",
             "|---|---|---|---|---|---|---|"]
    for name, m in report["methods"].items():
        t = report["stage_seconds"].get(name)
        lines.append(f"| {name} | {m['oracle_score']:.3f} | {m['win_rate_vs_sft']:.2f} | "
                     f"{m['kl_to_sft']:.2f} | {m['mean_length']:.1f} | {m['well_formed']:.0%} | "
                     f"{'reused' if t == 0 else f'{t:.0f} s' if t else '-'} |")
    rm = report["reward_model"]
    lines += ["", f"Reward model: held-out pair accuracy {rm['eval_accuracy']:.3f}, Spearman "
              f"correlation with the oracle {rm['spearman_oracle']:.3f} "
              f"(trained in {report['stage_seconds']['reward']:.0f} s).", "",
              "![training curves](training_curves.png)", "", "![frontier](frontier.png)", ""]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/demo")
    parser.add_argument("--fresh", action="store_true", help="rerun finished stages")
    parser.add_argument("--quick", action="store_true", help="shorter stages (tests)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval_prompts", type=int, default=256)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    total = time.time()

    from stage_pool import Job, run_jobs
    from tqdm.auto import tqdm

    from rlhf_ext.worlds.tiny import WorldSpec, ensure_world

    world = ensure_world(out / "world", WorldSpec(seed=args.seed))
    plan = stages(out, world, args.quick)
    if args.fresh:
        for name, *_ in plan:
            shutil.rmtree(out / name, ignore_errors=True)
    # one at a time, in the plan's order, on this process's threads
    after = {"sft": [], "ppo": ["reward"]}  # PPO against the reward model; the rest on SFT
    jobs = [Job(name, stage_command(name, recipe, config, extra, out, args.seed),
                out / name / summary_file, out / name / "log.txt", after.get(name, ["sft"]))
            for name, recipe, config, summary_file, extra in plan]
    print(f"stages: one at a time; logs in {out}/<stage>/log.txt")
    with tqdm(total=len(jobs), desc="demo stages", unit="stage") as bar:
        wall = run_jobs(jobs, workers=1, threads=None, bar=bar)
    seconds = {name: wall[name] for name, *_ in plan}
    summaries = {name: json.loads((out / name / summary_file).read_text())
                 for name, _, _, summary_file, _ in plan}
    methods = ["ppo", *PREFERENCE_LOSSES]
    results = evaluate_all(out, world, methods, args.eval_prompts, args.seed)
    report = {
        "schema_version": SCHEMA_VERSION, "seed": args.seed, "quick": args.quick,
        "n_eval_prompts": args.eval_prompts, "methods": results,
        "reward_model": {"eval_accuracy": summaries["reward"]["eval_accuracy"],
                         "spearman_oracle": summaries["reward"]["tiny/spearman_oracle"]},
        "training": {m: curves(summaries[m]) for m in methods},
        "stage_seconds": seconds, "total_seconds": time.time() - total,
    }
    report["plots"] = plot(report, out)
    report["total_seconds"] = time.time() - total
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(markdown(report))
    print("\n" + markdown(report).split("![")[0])
    print(f"report: {out / 'report.md'}, {out / 'report.json'}; plots: "
          f"{', '.join(str(out / p) for p in report['plots'])}")


if __name__ == "__main__":
    main()
