"""The riskiest paths, one step each, every one checked against what its first step must
give; one table at the end. Run through ``scripts/gpu_smoke.sh``:

    bash scripts/gpu_smoke.sh          # a GPU machine: SmolLM2-135M-Instruct, the YAMLs as
                                       # written (bf16), sized for under 10 minutes
    bash scripts/gpu_smoke.sh --cpu    # reduced: the tiny world on the CPU, bf16 as written
                                       # (in `make test`, so the script never rots)

Each check is a recipe run with the recipe YAMLs of recipes/qwen2.5-0.5b and
recipes/llama3.1-8b, only the model, the data, one step and short lengths overridden: the
one-process ones in this process, one after another (a process start is most of a tiny
run), the ZeRO and FSDP2 ones through ``accelerate launch`` and their configs. A failed run
is reported (its traceback or log kept) and the others still run; the exit status is 1 if
any check failed. ``--only NAME,NAME`` runs some; ``--out DIR`` keeps the runs there.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOG2 = math.log(2)


@dataclass
class Check:
    name: str
    recipe: str  # recipes/<recipe>.py
    config: str  # its YAML
    data: str  # "pairs" or "prompts"
    what: str  # the invariant, in words
    measure: list[tuple[str, float, float]]  # (logged key, expected, tolerance)
    args: list[str] = field(default_factory=list)
    launch: str | None = None  # accelerate_configs/<launch>.yaml, else one plain process
    float32: bool = False  # run in float32, not the YAML's bf16 (the invariant needs it)
    needs: str | None = None  # the check whose output is --reward_model_path


def checks(cpu: bool) -> list[Check]:
    reward = ["--reward", "oracle"] if cpu else [
        "--reward", "rlhf_ext.worlds.smollm2:vader_reward"]
    ppo = ["--response_length", "8", "--rollout_batch_size", "4"]
    first_kl = [("objective/kl", 0.0, 1e-4), ("policy/approxkl_avg", 0.0, 1e-4)]
    log2 = [("train_loss", LOG2, 1e-5)]
    dpo = ("preference", "recipes/qwen2.5-0.5b/dpo.yaml", "pairs")
    same = "policy == reference at step 1: loss log 2"
    return [
        Check("dpo_full_padding_free", *dpo, same, log2, ["--max_length", "64"]),
        Check("dpo_qlora_precomputed_ref", "preference", "recipes/llama3.1-8b/dpo_qlora.yaml",
              "pairs", "reference log-probs precomputed before training: loss log 2",
              [("train_loss", LOG2, 1e-4)], ["--max_length", "64"], float32=True),
        Check("reward_qlora", "reward", "recipes/llama3.1-8b/reward_qlora.yaml", "pairs",
              "4-bit backbone, LoRA and a new head: finite loss, accuracy in [0, 1]",
              [("train_loss", math.nan, 0.0), ("accuracy", math.nan, 0.0)],
              ["--max_length", "64"]),
        Check("ppo_single_base_qlora", "ppo", "recipes/llama3.1-8b/ppo_qlora.yaml", "prompts",
              "one 4-bit base, three adapters: first KL and approximate KL 0", first_kl, ppo,
              needs="reward_qlora"),
        Check("ppo_value_model_checkpointing", "ppo", "recipes/qwen2.5-0.5b/ppo.yaml",
              "prompts", "full policy and value model, gradient checkpointing: first KL 0",
              first_kl + [("val/ratio", 1.0, 1e-4)], [*reward, *ppo]),
        Check("grpo_prefix_sharing", "ppo", "recipes/qwen2.5-0.5b/ppo_lora.yaml", "prompts",
              "GRPO, 4 samples per prompt sharing its forward: first KL 0, ratio 1",
              first_kl + [("val/ratio", 1.0, 1e-4)],
              [*reward, "--response_length", "8", "--rollout_batch_size", "8",
               "--advantage_estimator", "grpo", "--num_generations", "4",
               "--prefix_sharing", "true", "--kl_coef", "0.0", "--kl_loss_coef", "0.04",
               "--per_device_train_batch_size", "4"]),  # whole groups
        Check("dpo_zero2", *dpo, same, log2, ["--max_length", "64"], launch="zero2"),
        Check("dpo_zero3", *dpo, same, log2, ["--max_length", "64"], launch="zero3"),
        Check("dpo_fsdp2", *dpo, same, log2, ["--max_length", "64"], launch="fsdp"),
    ]


def data_and_model(cpu: bool, root: Path) -> tuple[str, dict[str, str]]:
    """The model and the datasets: the tiny world's base model and data on a CPU,
    SmolLM2-135M-Instruct and its chat-formatted sets on a GPU."""
    if cpu:
        from rlhf_ext.worlds.tiny import ensure_world

        world = ensure_world(root / "world")
        return str(world / "base"), {"pairs": str(world / "data" / "pairs"),
                                     "prompts": str(world / "data" / "prompts_rl")}
    from rlhf_ext.worlds.smollm2 import conversational_datasets, smollm2_path

    data = conversational_datasets(root / "data", n=16)
    return str(smollm2_path()), {k: str(data / k) for k in ("pairs", "prompts")}


def recipe_args(check: Check, cpu: bool, model: str, data: dict, out: Path,
                outputs: dict) -> list[str]:
    args = [*check.args]
    if check.float32:  # float32 weights and 4-bit compute, no autocast
        args += ["--bf16", "false", "--dtype", "float32"]
    if cpu:
        args += ["--tiny_world_dir", str(Path(data["pairs"]).parent.parent)]
    if check.needs:
        args += ["--reward_model_path", str(outputs[check.needs])]
    return ["--config", check.config, "--model_name_or_path", model,
            "--dataset_name", data[check.data], "--output_dir", str(out), "--max_steps", "1",
            "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
            "--logging_steps", "1", "--save_strategy", "no", "--eval_strategy", "no",
            "--report_to", "none", "--tiny_eval_prompts", "0", "--disable_tqdm", "true", *args]


def free_port() -> int:
    """A port no other run on this machine holds (not accelerate's fixed 29500)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(check: Check, args: list[str], log: Path, timeout: int) -> str | None:
    """Run the recipe; None, or what went wrong."""
    if check.launch:
        proc = subprocess.run(
            [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
             f"accelerate_configs/{check.launch}.yaml", "--num_processes", "1",
             "--main_process_port", str(free_port()), f"recipes/{check.recipe}.py", *args],
            cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        log.write_text(proc.stdout + proc.stderr)
        return f"exit {proc.returncode}: {log}" if proc.returncode else None
    import importlib.util
    import traceback

    from trl import TrlParser

    from rlhf_ext.launch import with_machine_args

    path = ROOT / "recipes" / f"{check.recipe}.py"
    spec = importlib.util.spec_from_file_location(f"recipe_{check.recipe}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        module.main(*TrlParser(module.ARGUMENTS).parse_args_and_config(
            args=with_machine_args(args)))
    except Exception as error:  # reported in the table; the next check runs
        log.write_text(traceback.format_exc())
        return f"{type(error).__name__}: {log}"
    finally:
        import gc

        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return None


def first(summary: dict, key: str) -> float | None:
    return next((h[key] for h in summary["log_history"] if key in h), None)


def judge(check: Check, summary: dict) -> tuple[list[str], bool]:
    """Each measured value and whether all hold (an expected NaN: finite, and for
    accuracy in [0, 1])."""
    shown, ok = [], True
    for key, expected, tol in check.measure:
        value = first(summary, key)
        if value is None:
            shown.append(f"{key}=missing")
            ok = False
            continue
        if math.isnan(expected):
            good = math.isfinite(value) and (key != "accuracy" or 0 <= value <= 1)
        else:
            good = abs(value - expected) <= tol
        ok &= good
        shown.append(f"{key}={value:.7g}" + ("" if good else " (!)"))
    return shown, ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu", action="store_true", help="the reduced run on the CPU")
    parser.add_argument("--out", default=None, help="keep the runs here")
    parser.add_argument("--only", default=None, help="comma-separated check names")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per check")
    opts = parser.parse_args(argv)
    if opts.cpu:  # on any machine: a GPU is hidden (before torch looks for one)
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    root = Path(opts.out or tempfile.mkdtemp(prefix="rlhf_ext_smoke_"))
    root.mkdir(parents=True, exist_ok=True)
    if not opts.cpu:
        import torch

        if not torch.cuda.is_available():
            parser.error("no CUDA device here: run with --cpu for the reduced form")
    todo = checks(opts.cpu)
    if opts.only:
        names = opts.only.split(",")
        unknown = set(names) - {c.name for c in todo}
        if unknown:
            parser.error(f"unknown checks {sorted(unknown)}; known: {[c.name for c in todo]}")
        todo = [c for c in todo if c.name in names or any(
            c.name == d.needs for d in todo if d.name in names)]
    model, data = data_and_model(opts.cpu, root)
    rows, outputs, failed = [], {}, 0
    for check in todo:
        out = outputs[check.name] = root / check.name
        start = time.time()
        error = run(check, recipe_args(check, opts.cpu, model, data, out, outputs),
                    root / f"{check.name}.log", opts.timeout)
        seconds = time.time() - start
        if error:
            shown, ok, wrapper = [error], False, "-"
        else:
            summary = json.loads(next(out.glob("*_summary.json")).read_text())
            shown, ok = judge(check, summary)
            wrapper = summary.get("wrapper") or "-"
        failed += not ok
        rows.append({"check": check.name, "launch": check.launch or "1 process",
                     "wrapper": wrapper, "invariant": check.what, "measured": shown,
                     "seconds": round(seconds, 1), "ok": ok})
        print(f"{check.name}: {'ok' if ok else 'FAILED'} ({seconds:.0f} s) {'; '.join(shown)}",
              flush=True)
    (root / "smoke.json").write_text(json.dumps(rows, indent=1))
    print("\n| check | launch | wrapper | measured | s | result |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['check']} | {r['launch']} | {r['wrapper']} | {'; '.join(r['measured'])} "
              f"| {r['seconds']:.0f} | {'ok' if r['ok'] else 'FAILED'} |")
    print(f"\n{len(rows) - failed}/{len(rows)} checks hold ({'CPU, reduced' if opts.cpu else 'GPU'});"
          f" runs in {root}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
