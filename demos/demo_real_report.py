"""The report of demos/demo_real.py: the reward-against-KL frontier, its plots, the
verdict on DPO against PPO, and report.md."""

from pathlib import Path


def dominates(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> bool:
    """Whether every (kl, reward) point of b has a point of a with no more KL and no less
    reward."""
    return all(any(ka <= kb and ra >= rb for ka, ra in a) for kb, rb in b)


def frontier(report: dict) -> dict:
    """(kl, vader) points per family, sorted by KL; best-of-N from the reference."""
    points = {}
    for name, m in report["methods"].items():
        family = report["family"].get(name, name)
        if name == "reference" or name.startswith("best_of_"):
            family = "best_of_n"
        points.setdefault(family, []).append((m["kl_to_reference"], m["vader"]))
    return {k: sorted(v) for k, v in points.items()}


def save_figure(fig, axes, path: Path) -> None:
    """Grid and legend on each of ``axes``, then ``fig`` written to ``path`` and closed."""
    import matplotlib.pyplot as plt

    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot(report: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    colors, markers = plt.get_cmap("tab20").colors, "osD^vPX<>"
    for i, (family, points) in enumerate(report["frontier"].items()):  # 20 told apart
        kl, reward = zip(*points)
        ax.plot(kl, reward, "-" if len(points) > 1 else "", marker=markers[i % len(markers)],
                color=colors[2 * i % 20 + i // 10 % 2], label=family, markersize=7)
    for name, value in report["knob"].items():  # beta / kl_coef beside each frontier point
        m = report["methods"][name]
        ax.annotate(str(value), (m["kl_to_reference"], m["vader"]), textcoords="offset points",
                    xytext=(5, 4), fontsize=7)
    ax.set(title="SmolLM2-135M-Instruct: VADER score against KL to the reference\n"
                 "(held-out films; each point one trained policy)",
           xlabel="sampled KL(policy || reference), nats per completion",
           ylabel="mean VADER compound score")
    save_figure(fig, [ax], out / "frontier.png")

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for name, c in report["training"].items():
        ax = axes[0] if c["reward_key"] == "objective/scores" else axes[1]
        ax.plot(c["step"], c["reward"], label=name)
    axes[0].set(title="PPO: reward of rollouts (reward model or VADER)", xlabel="step",
                ylabel="objective/scores")
    axes[1].set(title="Preference training: implicit reward margin (own scales)",
                xlabel="step", ylabel="rewards/margins")
    save_figure(fig, axes, out / "training_curves.png")
    return ["frontier.png", "training_curves.png"]


def verdict(report: dict) -> str:
    points = report["frontier"]
    if "dpo" not in points or "ppo" not in points:
        return "DPO or PPO was not run: no frontier comparison."
    if dominates(points["dpo"], points["ppo"]):
        return ("DPO's frontier dominates PPO's here: every PPO point has a DPO point with "
                "no more KL and no less VADER score.")
    if dominates(points["ppo"], points["dpo"]):
        return "PPO's frontier dominates DPO's here: the reverse of the paper's IMDb result."
    return "Neither frontier dominates the other here: they cross."


def short(text: str, limit: int = 110) -> str:
    text = " ".join(text.split()).replace("|", "/")
    return text if len(text) <= limit else text[:limit - 1] + "…"


def markdown(report: dict, max_new_tokens: int) -> str:
    """report.md: the sentiment rows (when run), the verifiable-reward rows (when run), and
    where the time went."""
    data = report["data"]
    if data is not None:
        lines = sentiment_markdown(report, max_new_tokens)
    else:
        lines = ["# rlhf_ext on a real model: verifiable rewards", "",
                 f"SmolLM2-135M-Instruct. Seed {report['seed']}"
                 f"{', --quick' if report['quick'] else ''}; "
                 f"{report['total_seconds'] / 60:.1f} minutes in all (stages reused from an "
                 f"earlier run count 0).", ""]
    if report.get("rlvr"):
        from demo_real_rlvr import markdown as rlvr_markdown

        lines += rlvr_markdown(report["rlvr"], report["stage_seconds"])
    par = report.get("parallel", {"jobs": 1, "threads_each": "all the"})
    lines += ["## Where the time went", "",
              f"{'After the pairs, ' if data else ''}{par['jobs']} stage(s) ran at once with "
              f"{par['threads_each']} thread(s) each: each row is one stage's wall time (an "
              f"evaluation's without loading its models), so the rows add up to more than "
              f"the run. Sampling (the pairs, the online stages' rollouts, every "
              f"evaluation) ran on "
              f"{'vLLM' if report.get('use_vllm') else 'the package sampler (transformers)'}.",
              "", "| stage | seconds |", "|---|---|"]
    if data is not None:
        lines.append(f"| pairs (sampling, VADER) | {data['seconds']:.0f} |")
    lines += [f"| train {k} | {v:.0f} |" for k, v in report["stage_seconds"].items()]
    lines += [f"| evaluate {k} | {v:.0f} |" for k, v in report["eval_seconds"].items()]
    if report.get("rlvr"):
        lines += [f"| evaluate {k} (addition) | {v:.0f} |"
                  for k, v in report["rlvr"]["eval_seconds"].items()]
    return "\n".join(lines) + "\n"


def sentiment_markdown(report: dict, max_new_tokens: int) -> list[str]:
    """The sentiment experiment's part of report.md."""
    data, rm, size = report["data"], report["reward_model"], report["size"]
    lines = ["# rlhf_ext on a real model: the DPO paper's sentiment experiment", "",
             f"SmolLM2-135M-Instruct (the reference), VADER compound score as the ground "
             f"truth; {len(data['held_out_prompts'])} held-out prompts about films never "
             f"trained on, {size['eval_samples']} sample(s) per prompt and policy at "
             f"temperature 1 ({size['reference_samples']} of the reference: its VADER and "
             f"length are means over all of them, and win rates count how often a policy's "
             f"sample beats one of them), {max_new_tokens} new tokens at most. "
             f"Seed {report['seed']}{', --quick' if report['quick'] else ''}"
             f"{', --full' if report['full'] else ''}; {report['total_seconds'] / 60:.1f} "
             f"minutes in all (stages reused from an earlier run count 0).", "",
             "| method | VADER | ± s.e. | win rate vs reference | KL to reference | length "
             "| distinct-2 | repeated words | train s | eval s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in report["methods"].items():
        train = report["stage_seconds"].get(name)
        ev = report["eval_seconds"].get(name, "")
        lines.append(
            f"| {name} | {m['vader']:.3f} | {m['vader_se']:.3f} | "
            f"{m['win_rate_vs_reference']:.2f} | {m['kl_to_reference']:.2f} | "
            f"{m['mean_length']:.1f} | {m['distinct_2']:.2f} | {m['repeated_word_rate']:.3f} | "
            f"{'-' if train is None else f'{train:.0f}'} | {ev if ev == '' else f'{ev:.0f}'} |")
    lines += ["", f"Pairs: {data['train_pairs']} training pairs from {data['pair_films']} films "
              f"(the reference's own samples, Bradley-Terry labels on VADER with scale 5: "
              f"{data['label_noise']:.0%} of them prefer the lower VADER score), "
              f"{data['test_pairs']} held-out pairs on other films labelled by VADER's order; "
              f"made in {data['seconds']:.0f} s.", ""]
    if rm is not None:
        lines += [f"Reward model: held-out pair accuracy {rm['eval_accuracy']:.3f}, Spearman "
                  f"correlation with VADER {rm['spearman_vader']:.3f} over "
                  f"{rm['spearman_samples']} reference samples of the held-out prompts. "
                  f"Best-of-N keeps the reward model's favourite of N reference samples; its "
                  f"KL is the analytic log N - (N-1)/N.", ""]
    if report.get("rlaif"):
        from demo_real_rlaif import markdown as rlaif_markdown

        lines += rlaif_markdown(report["rlaif"])
    lines += [f"**Frontier.** {report['verdict']}", "",
              "![frontier](frontier.png)", "", "![training curves](training_curves.png)", "",
              "## Samples (held-out prompts)", "", "| prompt | method | VADER | completion |",
              "|---|---|---|---|"]
    for i, prompt in enumerate(data["held_out_prompts"][:2]):
        for name, m in report["methods"].items():
            lines.append(f"| {short(prompt[-1]['content'], 60)} | {name} | "
                         f"{m['scores'][i]:.2f} | {short(m['completions'][i])} |")
    return lines + [""]
