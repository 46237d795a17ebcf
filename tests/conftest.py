"""Shared fixtures: the tiny world and one SFT run, built once per test session."""

import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two workers (pyproject's addopts): one thread each, for this process
    # and the recipes it launches, so two workers on two cores do not fight over them
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"

import pytest  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# tests that launch two processes (a fixed rendezvous port) run on one worker, one at a time
MULTIPROCESS = pytest.mark.xdist_group("multiprocess")


def pytest_configure(config):
    """Stop if pytest-xdist cannot keep a group on one worker: xdist 3.8 tags grouped tests
    through ``Node._nodeid``, which pytest 9.2 no longer has, and then the groups are
    silently spread over both workers (two rendezvous on one port; fixtures built twice)."""
    from _pytest.nodes import Node

    if config.getoption("dist", "no") == "loadgroup" and "_nodeid" not in Node.__slots__:
        raise pytest.UsageError("pytest-xdist's xdist_group marks have no effect with this "
                                "pytest; install the pytest of constraints.txt")


# The longest single tests, in seconds on two workers of an AVX2-only machine (the
# durations of a `make test`). xdist hands out its groups of several tests first, then the
# rest in collection order: a six-minute test collected last keeps one worker busy for six
# minutes after the other has finished, so these are moved to the front, longest first.
LONGEST = {"test_reduced_real_demo": 452,  # a full run of 2026-12-06, AVX2-only
           "test_reduced_demo": 164,
           "test_grpo_lifts_held_out_accuracy": 128,
           "test_reward_model_ranks_held_out_pairs_and_scores_as_it_trains": 85,
           "test_the_smoke_script_passes_on_the_cpu": 70,
           "test_ppo_lora_with_a_reward_function": 46,
           "test_ppo_resumed_mid_iteration_equals_uninterrupted": 41,
           "test_recipe_pushes_adapter_and_card": 33,
           "test_dpo_qlora_with_precomputed_reference": 31}


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: -LONGEST.get(item.originalname, 0))  # stable: the rest keep order


# For a test that asserts an exact equality between a rollout chunk's forward and a
# differently shaped minibatch's (PPO's first ratio is 1, its approximate KL 0): exact on
# a CPU; on a GPU cuBLAS picks kernels by shape and may round differently, by an amount no
# GPU run has measured yet. Such a run sees no GPU (the smoke script checks the same
# invariants on the GPU, printing what it measures).
CPU_EXACT = {"CUDA_VISIBLE_DEVICES": ""}


def processes_env(processes: int) -> dict:
    """Environment for a launch of ``processes`` processes: on a machine with fewer GPUs
    than that (one GPU, or none) the GPUs are hidden, so the processes run on the CPU
    with gloo as on our CPU machines (the recipes add use_cpu), instead of the second one
    asking for a device that is not there."""
    import torch

    if processes > 1 and torch.cuda.device_count() < processes:
        return {"CUDA_VISIBLE_DEVICES": ""}
    return {}


def run_recipe(args: list[str], launcher: str = "accelerate", env: dict | None = None,
               timeout: int = 600) -> subprocess.CompletedProcess:
    """Run a recipe in its own process; fail the test with the tail of its output."""
    if "--num_processes" in args:
        env = {**processes_env(int(args[args.index("--num_processes") + 1])), **(env or {})}
    if launcher == "accelerate":
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    elif launcher == "accelerate_config":  # args start with --config_file
        cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    else:
        cmd = [sys.executable]
    proc = subprocess.run(cmd + args, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        pytest.fail(f"recipe failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                    f"{proc.stderr[-5000:]}")
    return proc


def load_recipe(name: str, folder: str = "recipes"):
    """``<folder>/<name>.py`` imported as a module (a recipe's ``ARGUMENTS`` and ``main``)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"{folder}_{name}", ROOT / folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_demo(name: str):
    """``demos/<name>.py`` imported as a module."""
    return load_recipe(name, "demos")


class StopAt(TrainerCallback):
    """Interrupt training after ``step`` optimizer steps (a stand-in for a killed run)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def shared_root(tmp_path_factory) -> Path:
    """A folder both pytest-xdist workers of this session see (their common temp parent)."""
    root = tmp_path_factory.getbasetemp()
    return (root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root) / "shared"


@pytest.fixture(scope="session")
def world_dir(tmp_path_factory):
    """The tiny world, built once for both pytest-xdist workers (ensure_world's file lock)."""
    from rlhf_ext.worlds.tiny import ensure_world

    return ensure_world(shared_root(tmp_path_factory) / "world")


@pytest.fixture(scope="session")
def tok(world_dir):
    """The tiny world's tokenizer."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(world_dir / "base")


@pytest.fixture(scope="session")
def policy_dir(tok, tmp_path_factory):
    """A freshly initialised tiny model (seed 0) saved with its tokenizer."""
    from rlhf_ext.worlds.tiny import build_model

    path = tmp_path_factory.mktemp("policy") / "tiny"
    build_model("tiny", tok, seed=0).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def run_once(tmp_path_factory, name: str, args: list[str], summary: str, **kwargs):
    """A recipe run shared by both pytest-xdist workers: the first to ask runs it under a
    file lock in the session's common temp folder, the other waits and reads its output
    (the tests only read these). (output dir, summary)."""
    from filelock import FileLock

    out = shared_root(tmp_path_factory) / name
    out.parent.mkdir(exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if not (out / summary).exists():
            run_recipe(args + ["--output_dir", str(out)], **kwargs)
    return out, json.loads((out / summary).read_text())


@pytest.fixture(scope="session")
def sft_run(world_dir, tmp_path_factory):
    """The tiny SFT recipe, run once with `accelerate launch`: (output dir, summary)."""
    return run_once(tmp_path_factory, "sft", [
        "recipes/sft.py", "--config", "recipes/tiny/sft.yaml", "--tiny_world_dir", str(world_dir),
        "--model_name_or_path", str(world_dir / "base"),
        "--dataset_name", str(world_dir / "data" / "sft")], "sft_summary.json")


@pytest.fixture(scope="session")
def reward_run(world_dir, sft_run, tmp_path_factory):
    """The tiny reward recipe on top of the SFT run: (output dir, summary)."""
    return run_once(tmp_path_factory, "reward", [
        "recipes/reward.py", "--config", "recipes/tiny/reward.yaml",
        "--tiny_world_dir", str(world_dir), "--model_name_or_path", str(sft_run[0]),
        "--dataset_name", str(world_dir / "data" / "pairs"),
        "--eval_dataset_name", str(world_dir / "data" / "pairs_eval")],
        "reward_summary.json", launcher="python")
