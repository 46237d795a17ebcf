"""The DPO paper's controlled-sentiment experiment on SmolLM2-135M-Instruct, judged by VADER.

    python demos/demo_real.py [--out outputs/demo_real] [--full] [--quick] [--fresh]
                                [--methods dpo,ppo] [--eval_samples 3] [--seed 0] [--jobs 2]
                                [--use_vllm auto|true|false]

The instruct model is the reference (and the SFT stage). Its own reviews of made-up films,
asked to be glowing or scathing, are paired and labelled by a Bradley-Terry model on VADER
(rlhf_ext.worlds.smollm2.task). Stages, each one recipe run in its own process (LoRA policies):
a reward model on the pairs; PPO against that reward model; PPO against VADER itself;
dpo, ipo, kto, orpo and simpo on the pairs; with --full (or --methods rlaif) DPO on the
pairs as the model itself judges them (demos/demo_real_rlaif.py). Beside the sentiment
experiment, verifiable rewards (demos/demo_real_rlvr.py): GRPO teaches the model two-digit
addition, judged by exact match on held-out problems (RLOO and PPO too with --full or
--methods rlvr; --methods rlvr alone samples no pairs). Best-of-N sampling of the
reference (N = 4, 16, ranked by the reward model) is the baseline that trains nothing.
Every policy is then sampled on prompts about held-out films (demos/demo_real_eval.py, one
process each): mean VADER score, win rate against the
reference, sampled KL to it, length, distinct-2 and the repeated-word rate (VADER is
gameable by "great great great"). --full adds DPO betas and PPO KL coefficients for the
reward-against-KL frontier (the paper's figure 2).

Writes OUT/report.md, OUT/report.json, OUT/frontier.png and OUT/training_curves.png. After
the pairs, training stages and evaluations run --jobs at a time (demos/stage_pool.py),
each as soon as what it reads is done. A finished stage (its summary file, or for
evaluations its JSON) is reused unless --fresh; each stage's output goes to
OUT/<stage>/log.txt, each evaluation's to OUT/logs/. --quick is the reduced run of the
tests. The report is written by demos/demo_real_report.py.
"""

import argparse
import importlib.util
import json
import shutil
import time
from pathlib import Path

from demo_real_eval import MAX_NEW_TOKENS, eval_folder  # demos/ is on the path

DEMOS = Path(__file__).resolve().parent
RECIPES = DEMOS.parent / "recipes"
SCHEMA_VERSION = 1
PREFERENCE_LOSSES = ["dpo", "ipo", "kto", "orpo", "simpo"]
# the reference-free losses off their papers' defaults, chosen on prompts about train films
# that no pair used (never the held-out films), 20 LoRA steps each, mean VADER 0.116 for the
# reference there: ORPO's lambda (beta) 0.1 -> 0.143, 1.0 -> 0.213, 2.0 -> 0.265 (at 0.1
# its NLL term on the chosen reviews outweighs the preference term); SimPO at lr 1e-4 0.272,
# at the recipe's 2e-4 0.260 (SimPO is known to want a lower learning rate)
LOSS_ARGS = {"orpo": ["--beta", "2.0"], "simpo": ["--learning_rate", "1e-4"]}
# the frontier of --full: (family, knob, values); the first value is the default run's point
FRONTIER = {"dpo": ("beta", [0.1, 0.05, 0.5]), "ppo": ("kl_coef", [0.05, 0.02, 0.2])}
SIZES = {  # what --quick shrinks; the default: 26.1 minutes on a 2-core CPU (2026-12-07)
    "default": dict(pair_films=30, samples=2, eval_asks=2, eval_samples=3, reference_samples=16,
                    best_of=[4, 16], reward=["--num_train_epochs", "1"],
                    preference=["--max_steps", "20"], ppo=["--num_train_epochs", "10"],
                    rlvr=[]),
    # --quick (the suite runs its ppo_vader; 2026-12-06): no reward model (nor best-of-N); dpo
    # for 24 steps at the default's learning rate on the pairs of 4 films, judged on 4 samples
    # of each of 22 held-out prompts (2026-12-03, with the sampler before its inverse-CDF draws,
    # 2 threads: +0.27 over the reference's 0.294, s.e. of the difference 0.066; 16 steps +0.14,
    # 20 +0.18; 8 at 5e-4 -0.11 at a KL of 5.9; with the new sampler, one thread a stage: +0.17
    # over 0.200, s.e. 0.071);
    # ppo_vader (PPO against VADER, the value head on the policy) for 4 iterations of 16
    # rollouts at lr 5e-4 with 2 epochs and lam 1 (each token credited with the whole
    # final score: at 0.95 the first of 32 tokens, where a review's tone is set, gets a
    # fifth of it while the fresh value head knows nothing): +0.16, +0.25, +0.14, +0.12 at KL
    # 2.3 to 5.7 with PPO seeds 0-3 (2026-12-03, 2 threads, 130-150 s of training, the
    # sampler before; with the new one, one thread a stage: +0.28 at KL 3.8, s.e. 0.064). At
    # lam 0.95 it did not move reliably: two to four iterations, lr 2e-4 to 1e-3, 1 to 4
    # epochs gave -0.06 to +0.21 (+0.17 and -0.06 for one setting with two seeds)
    "quick": dict(pair_films=6, samples=2, eval_asks=1, eval_samples=4, reference_samples=4,
                  best_of=[], reward=["--max_steps", "4"],
                  preference=["--max_steps", "24", "--per_device_train_batch_size", "4",
                              "--logging_steps", "4", "--prefix_sharing", "true"],
                  ppo=["--num_train_epochs", "4", "--learning_rate", "5e-4",
                       "--num_ppo_epochs", "2", "--lam", "1.0"],
                  # GRPO on addition, 4 iterations: lifts of +0.14..+0.32 over 4 seeds
                  # (tests/test_rlvr_task.py); 2 iterations ranged -0.30..+0.33
                  rlvr=["--num_train_epochs", "4", "--learning_rate", "3e-5",
                        "--lr_scheduler_type", "constant"]),
}
# critic-free stages against VADER: 4 samples of each of 4 prompts per iteration, each
# group's prompt computed once; GRPO with its KL as a loss term (k3), RLOO with the KL in
# the reward as PPO has it; no value, so not the recipe's value head on the policy
CRITIC_FREE = {
    "grpo_vader": ["--advantage_estimator", "grpo", "--num_generations", "4",
                   "--prefix_sharing", "true", "--kl_coef", "0", "--kl_loss_coef", "0.05",
                   "--value_head_on_policy", "false"],
    "rloo_vader": ["--advantage_estimator", "rloo", "--num_generations", "4",
                   "--prefix_sharing", "true", "--kl_coef", "0.05",
                   "--value_head_on_policy", "false"],
}

# verifiable rewards (demos/demo_real_rlvr.py): GRPO on two-digit addition in the default run,
# RLOO and PPO (a value head on the policy, one sample a prompt) with --full or by name;
# "rlvr" names all three
RLVR = {"rlvr_grpo": [], "rlvr_rloo": ["--advantage_estimator", "rloo"],
        "rlvr_ppo": ["--advantage_estimator", "gae", "--num_generations", "1",
                     "--prefix_sharing", "false", "--value_head_on_policy", "true",
                     "--lam", "1.0"]}

# RLAIF (demos/demo_real_rlaif.py): DPO at the dpo row's settings on the pairs as the model
# itself judged them, with its soft labels and without
RLAIF = {"dpo_rlaif": "pairs_rlaif", "dpo_rlaif_hard": "pairs_rlaif_hard"}


def stage_plan(out: Path, model: str, size: dict, full: bool, methods: list[str] | None,
               use_vllm: bool = False):
    """(name, recipe, config, summary file, extra args, family, knob value), in running
    order; the reward model comes first (PPO and best-of-N use it). ``use_vllm``: the
    online stages (PPO, GRPO, RLOO) sample their rollouts on vLLM."""
    data = out / "data"
    plan = [("reward", "reward.py", "smollm2/reward.yaml", "reward_summary.json",
             ["--dataset_name", str(data / "pairs"), *size["reward"]], "reward", None)]
    ppo = ["--dataset_name", str(data / "prompts"), *size["ppo"]]
    knob, values = FRONTIER["ppo"]
    for i, value in enumerate(values if full else values[:1]):
        name = "ppo" if i == 0 else f"ppo_{knob}{value}"
        plan.append((name, "ppo.py", "smollm2/ppo.yaml", "ppo_summary.json",
                     ppo + ["--reward_model_path", str(out / "reward"), f"--{knob}", str(value)],
                     "ppo", value))
    plan.append(("ppo_vader", "ppo.py", "smollm2/ppo.yaml", "ppo_summary.json",
                 ppo + ["--reward", "rlhf_ext.worlds.smollm2:vader_reward"], "ppo_vader", None))
    for name, extra in CRITIC_FREE.items():  # --full or by name: the default keeps 30 min
        if full or (methods is not None and name in methods):
            plan.append((name, "ppo.py", "smollm2/ppo.yaml", "ppo_summary.json",
                         ppo + ["--reward", "rlhf_ext.worlds.smollm2:vader_reward", *extra], name, None))
    for name, extra in RLVR.items():
        if name == "rlvr_grpo" or full or (methods is not None and (name in methods
                                                                    or "rlvr" in methods)):
            plan.append((name, "ppo.py", "smollm2/rlvr.yaml", "ppo_summary.json",
                         ["--dataset_name", str(data / "rlvr"), *size["rlvr"], *extra],
                         "rlvr", None))
    pref = ["--dataset_name", str(data / "pairs"), *size["preference"]]
    knob, values = FRONTIER["dpo"]
    for loss in PREFERENCE_LOSSES:
        dpo = loss == "dpo"
        plan.append((loss, "preference.py", "smollm2/preference.yaml", "preference_summary.json",
                     pref + (["--loss_type", "sigmoid", f"--{knob}", str(values[0])] if dpo
                             else ["--loss_type", loss, *LOSS_ARGS.get(loss, [])]),
                     loss, values[0] if dpo else None))
    for name, pairs in RLAIF.items():  # --full or by name (or "rlaif" for both)
        if full or (methods is not None and (name in methods or "rlaif" in methods)):
            plan.append((name, "preference.py", "smollm2/preference.yaml",
                         "preference_summary.json",
                         ["--dataset_name", str(data / pairs), *size["preference"],
                          "--loss_type", "sigmoid", f"--{knob}", str(values[0])], name, None))
    for value in values[1:] if full else []:
        plan.append((f"dpo_{knob}{value}", "preference.py", "smollm2/preference.yaml",
                     "preference_summary.json", pref + ["--loss_type", "sigmoid",
                                                        f"--{knob}", str(value)], "dpo", value))
    for entry in plan:
        entry[4].extend(["--model_name_or_path", model])
        if use_vllm and entry[1] == "ppo.py":
            entry[4].extend(["--use_vllm", "true"])
    if methods is not None:
        plan = [p for p in plan if p[0] == "reward" or p[5] in methods or p[0] in methods
                or (p[0] in RLAIF and "rlaif" in methods)]
    sentiment = any(p[5] not in ("reward", "rlvr") for p in plan)
    if not (size["best_of"] and sentiment) and not any(p[5] == "ppo" for p in plan):
        plan = plan[1:]  # nothing reads the reward model
    return plan


def make_data(out: Path, model_path: str, size: dict, seed: int, use_vllm: bool) -> dict:
    """The pairs (train: noisy Bradley-Terry labels; test, on other films: VADER's order),
    the PPO prompts (every ask of every train film) and the held-out prompts."""
    done = out / "data" / "data.json"
    if done.exists():
        return json.loads(done.read_text())
    import torch
    from datasets import Dataset, DatasetDict
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_ext.worlds.smollm2.task import films, review_prompts, self_sampled_pairs

    start = time.time()
    torch.manual_seed(seed)
    train_films, held_out = films(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    pair_films = train_films[:size["pair_films"]]
    n_test = max(2, len(pair_films) // 5)  # the reward model's held-out films
    pairs = {split: self_sampled_pairs(model, tokenizer, names, size["samples"],
                                       MAX_NEW_TOKENS, scale=None if split == "test" else 5.0,
                                       seed=seed + i, progress=True, use_vllm=use_vllm)
             for i, (split, names) in enumerate((("train", pair_films[n_test:]),
                                                 ("test", pair_films[:n_test])))}
    DatasetDict(pairs).save_to_disk(str(out / "data" / "pairs"))
    prompts = Dataset.from_dict({"prompt": review_prompts(train_films)})
    DatasetDict({"train": prompts}).save_to_disk(str(out / "data" / "prompts"))
    asks = review_prompts(held_out, size["eval_asks"])
    train = pairs["train"]
    facts = {"train_pairs": len(train), "test_pairs": len(pairs["test"]),
             "pair_films": len(pair_films), "ppo_prompts": len(prompts),
             "held_out_prompts": asks,
             "label_noise": sum(c < r for c, r in zip(train["chosen_vader"],
                                                      train["rejected_vader"])) / len(train),
             "seconds": time.time() - start}
    done.write_text(json.dumps(facts, indent=2))
    return facts


def jobs(out: Path, plan, size: dict, seed: int, with_reward_model: bool, quick: bool,
         use_vllm: bool = False) -> list:
    """Every training stage and evaluation as a stage_pool Job, longest first where the
    order is free: the reward model, the PPO and rlvr stages, the reference's evaluations
    (its best-of-N ranks by the reward model; every win rate reads its samples), the offline
    losses, then each policy's evaluation after its training (sampled on vLLM with
    ``use_vllm``)."""
    import sys

    from demo import stage_command
    from demo_real_rlvr import eval_folder as rlvr_folder
    from stage_pool import Job

    first = {"reward.py": 0, "ppo.py": 1}  # the longest; the offline losses after them
    plan = sorted(plan, key=lambda p: first.get(p[1], 2))  # stable: the plan's order within
    training = [Job(name, stage_command(name, recipe, config, extra, out, seed),
                    out / name / summary, out / name / "log.txt",
                    ["reward"] if "--reward_model_path" in extra else [])
                for name, recipe, config, summary, extra, _, _ in plan]
    rlvr = {p[0] for p in plan if p[5] == "rlvr"}
    engine = ["--use_vllm"] if use_vllm else []
    logs = out / "logs"  # OUT/logs/eval_samples<n>_<name>.txt, OUT/logs/rlvr_eval_<name>.txt
    references, policies = [], []
    if any(j.name not in rlvr | {"reward"} for j in training):  # the sentiment rows
        folder = eval_folder(out, size["eval_samples"])
        evaluate = [sys.executable, str(DEMOS / "demo_real_eval.py"), "--out", str(out),
                    "--samples", str(size["eval_samples"]), "--seed", str(seed),
                    "--reference_samples", str(size["reference_samples"]),
                    "--best_of", ",".join(map(str, size["best_of"]))] + engine
        ranked = ["--reward_model"] if with_reward_model else []  # only best-of-N reads it
        references.append(Job("eval reference", evaluate + ranked + ["--name", "reference"],
                              folder / "reference.json", logs / f"{folder.name}_reference.txt",
                              ["reward"] if with_reward_model else []))
        policies += [Job(f"eval {j.name}", evaluate + ["--name", j.name],
                         folder / f"{j.name}.json", logs / f"{folder.name}_{j.name}.txt",
                         [j.name, "eval reference"])
                     for j in training if j.name not in rlvr | {"reward"}]
    if rlvr:
        folder = rlvr_folder(out, quick)
        evaluate = [sys.executable, str(DEMOS / "demo_real_rlvr.py"), "--out", str(out),
                    "--seed", str(seed)] + (["--quick"] if quick else []) + engine
        references.append(Job("eval rlvr reference", evaluate + ["--name", "reference"],
                              folder / "reference.json", logs / f"{folder.name}_reference.txt"))
        policies += [Job(f"eval {j.name}", evaluate + ["--name", j.name],
                         folder / f"{j.name}.json", logs / f"{folder.name}_{j.name}.txt",
                         [j.name]) for j in training if j.name in rlvr]
    long = sum(p[1] in first for p in plan)
    return training[:long] + references + training[long:] + policies


def rlvr_report(out: Path, names: list[str], summaries: dict, quick: bool) -> dict:
    """The rlvr rows: the reference's and each stage's evaluation, training curves."""
    from demo_real_rlvr import curves as rlvr_curves
    from demo_real_rlvr import eval_folder as rlvr_folder

    folder = rlvr_folder(out, quick)
    methods = {name: json.loads((folder / f"{name}.json").read_text())
               for name in ["reference", *names]}
    return {"methods": methods,
            "eval_seconds": {name: m.pop("seconds") for name, m in methods.items()},
            "training": {name: rlvr_curves(summaries[name]) for name in names}}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/demo_real")
    parser.add_argument("--fresh", action="store_true", help="rerun finished stages")
    parser.add_argument("--quick", action="store_true", help="the reduced run of the tests")
    parser.add_argument("--full", action="store_true",
                        help="three DPO betas and three PPO KL coefficients (the frontier), "
                             "GRPO and RLOO against VADER, and the RLAIF rows")
    parser.add_argument("--methods", default=None,
                        help="comma-separated subset, e.g. dpo,ppo (the reward model always runs)")
    parser.add_argument("--eval_samples", type=int, default=None,
                        help="samples per held-out prompt and policy (default 3, s.e. about "
                             "0.03 a policy; one sample's 0.05 is as large as most gains; 8 "
                             "take about 1.5 minutes a policy)")
    parser.add_argument("--use_vllm", choices=["auto", "true", "false"], default="auto",
                        help="sample the pairs, the online stages' rollouts and every "
                             "evaluation on vLLM (auto: on a GPU where vLLM is installed; on "
                             "a CPU vLLM samples these short replies slower than the "
                             "package's sampler, which computes each prompt once for its "
                             "copies: docs/demo-real.md)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=2,
                        help="stages run at once, the CPU cores split among them (default 2: "
                             "on 2 cores, two one-thread stages side by side do 1.25-1.4x "
                             "the work of one two-thread stage)")
    args = parser.parse_args(argv)
    import torch

    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    if args.eval_samples is not None and args.eval_samples < 1:
        parser.error(f"--eval_samples must be at least 1, got {args.eval_samples}")
    use_vllm = args.use_vllm == "true" or (args.use_vllm == "auto" and torch.cuda.is_available()
                                           and importlib.util.find_spec("vllm") is not None)
    out = Path(args.out)
    if args.fresh:
        shutil.rmtree(out, ignore_errors=True)
    sampler = out / "sampler.json"  # what sampled the finished stages this run reuses
    if sampler.exists() and json.loads(sampler.read_text())["use_vllm"] != use_vllm:
        parser.error(f"{out} was sampled with use_vllm="
                     f"{json.loads(sampler.read_text())['use_vllm']}; add --fresh, another "
                     f"--out, or the same --use_vllm")
    out.mkdir(parents=True, exist_ok=True)
    sampler.write_text(json.dumps({"use_vllm": use_vllm}))
    total = time.time()

    from demo import curves  # the tiny-world demo's
    from demo_real_report import frontier, markdown, plot, verdict
    from stage_pool import run_jobs, threads_each
    from tqdm.auto import tqdm

    from rlhf_ext.worlds.smollm2 import smollm2_path

    model = str(smollm2_path())
    size = dict(SIZES["quick" if args.quick else "default"])
    if args.eval_samples is not None:
        size["eval_samples"] = args.eval_samples
    methods = args.methods.split(",") if args.methods else None
    plan = stage_plan(out, model, size, args.full, methods, use_vllm)
    sentiment = [p[0] for p in plan if p[5] not in ("reward", "rlvr")]  # VADER-judged rows
    rlvr = [p[0] for p in plan if p[5] == "rlvr"]
    data = None
    if sentiment:
        print("pairs: sampling the reference (cached after the first run)")
        data = make_data(out, model, size, args.seed, use_vllm)
    if rlvr:
        from demo_real_rlvr import make_problems

        make_problems(out, args.seed)
    rlaif = None
    if any(p[0] in RLAIF for p in plan):
        from demo_real_rlaif import judge_pairs

        print("RLAIF: the model judges the pairs (cached after the first run)")
        rlaif = judge_pairs(out, model, args.seed)
    trained_reward = plan[0][0] == "reward"
    todo = jobs(out, plan, size, args.seed, trained_reward, args.quick, use_vllm)
    threads = threads_each(args.jobs)
    print(f"stages and evaluations: {args.jobs} at a time, {threads} thread(s) each, "
          f"sampling on {'vLLM' if use_vllm else 'generate_completions'}; "
          f"logs in {out}/<stage>/log.txt and {out}/logs/")
    with tqdm(total=len(todo), desc="demo-real stages", unit="stage") as bar:
        wall = run_jobs(todo, args.jobs, threads, bar)
    summaries = {p[0]: json.loads((out / p[0] / p[3]).read_text()) for p in plan}
    seconds = {p[0]: wall[p[0]] for p in plan}
    results, eval_seconds, base = {}, {}, {}
    if sentiment:
        folder = eval_folder(out, size["eval_samples"])
        base = json.loads((folder / "reference.json").read_text())
        results = dict(base["methods"])
        eval_seconds = {"reference_and_best_of": base["seconds"]}
        for name in sentiment:
            results[name] = json.loads((folder / f"{name}.json").read_text())
            eval_seconds[name] = results[name].pop("seconds")
    report = {
        "schema_version": SCHEMA_VERSION, "seed": args.seed, "quick": args.quick,
        "full": args.full, "size": size, "data": data, "methods": results,
        "family": {p[0]: p[5] for p in plan if p[0] != "reward"},
        "knob": {p[0]: p[6] for p in plan if p[6] is not None},
        "reward_model": {"eval_accuracy": summaries["reward"]["eval_accuracy"],
                         "spearman_vader": base["reward_spearman_vader"],
                         "spearman_samples": base["reward_spearman_samples"]}
        if trained_reward else None,
        "rlaif": rlaif,
        "training": {name: curves(summaries[name]) for name in sentiment},
        "rlvr": rlvr_report(out, rlvr, summaries, args.quick) if rlvr else None,
        "stage_seconds": seconds, "eval_seconds": eval_seconds,
        "parallel": {"jobs": args.jobs, "threads_each": threads}, "use_vllm": use_vllm,
    }
    report["frontier"] = frontier(report)
    report["verdict"] = verdict(report)
    report["plots"] = plot(report, out) if sentiment else []
    if rlvr:
        from demo_real_rlvr import plot as rlvr_plot

        report["plots"].append(rlvr_plot(report["rlvr"], out))
    report["total_seconds"] = time.time() - total
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(markdown(report, MAX_NEW_TOKENS))
    print("\n" + markdown(report, MAX_NEW_TOKENS).split("![")[0])
    print(f"report: {out / 'report.md'}, {out / 'report.json'}; plots: "
          f"{', '.join(str(out / p) for p in report['plots'])}")


if __name__ == "__main__":
    main()
