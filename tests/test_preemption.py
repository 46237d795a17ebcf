"""Preemption with real signals on real processes: SIGTERM mid-run makes the trainer save a
complete checkpoint at the end of the step, exit with status 143 (non-zero for the launcher)
and say how to resume; resuming gives the uninterrupted run's weights. One process (DPO, and
PPO stopped mid-iteration) and two (DDP). The one-process runs that receive no signal run in
this process (tests/preempt_driver.py's main)."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import MULTIPROCESS, ROOT, processes_env
from preempt_driver import main as train
from safetensors.torch import load_file

from rlhf_ext.trainer_utils import checkpoint_problem

DRIVER = str(ROOT / "tests" / "preempt_driver.py")


def stopped_run(kind, policy_dir, out, steps, processes, after_step=1, resume=False,
                config="ddp"):
    """Launch the run (two processes: under accelerate_configs/``config``.yaml); with
    ``after_step``, send SIGTERM to every training process once that step is done (as
    Slurm signals every task of a job); wait for it to end."""
    launch = [sys.executable]
    if processes == 2:
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                  f"accelerate_configs/{config}.yaml", "--num_processes", "2"]
    cmd = launch + [DRIVER, kind, str(policy_dir), str(out), str(steps),
                    *(["resume"] if resume else [])]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, **processes_env(processes),
                                            "PREEMPT_AT": str(after_step or 0)})
    if after_step:
        deadline, steps_file = time.time() + 600, out / "step-0"
        while not (steps_file.exists() and steps_file.read_text() and
                   int(steps_file.read_text()) >= after_step):
            assert proc.poll() is None, proc.communicate()[1][-4000:]
            assert time.time() < deadline, "the run never reached the step"
            time.sleep(0.05)
        for rank in range(processes):
            os.kill(int((out / f"pid-{rank}").read_text()), signal.SIGTERM)
    _, stderr = proc.communicate(timeout=600)
    return proc.returncode, stderr


def weights(out):
    """The final model's weights, or a LoRA policy's adapter and value head."""
    final = out / "final"
    if (final / "model.safetensors").exists():
        return load_file(final / "model.safetensors")
    return {**load_file(final / "adapter_model.safetensors"),
            **{f"value_head.{k}": v for k, v in
               load_file(final / "value_model" / "value_head.safetensors").items()}}


def checkpoints(out):
    return sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))


@pytest.mark.parametrize("kind", ["dpo", "ppo"])
def test_sigterm_saves_a_checkpoint_and_resume_equals_the_uninterrupted_run(
        kind, policy_dir, tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    train(kind, str(policy_dir), full, 6)
    code, stderr = stopped_run(kind, policy_dir, cut, 6, 1)
    assert code == 143, stderr[-3000:]
    (step,) = checkpoints(cut)
    assert step == 1 and checkpoint_problem(str(cut / f"checkpoint-{step}")) is None
    assert f"SIGTERM received: stopped after step {step} and saved" in stderr
    assert "resume_from_checkpoint=True" in stderr
    if kind == "ppo":  # 4 optimizer steps an iteration: stopped inside one, its rollout kept
        assert (cut / f"checkpoint-{step}" / "ppo_experience_0.pt").exists()
    assert not (cut / "final").exists()
    train(kind, str(policy_dir), cut, 6, resume=True)
    expected, got = weights(full), weights(cut)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6)


@MULTIPROCESS
@pytest.mark.parametrize("config", ["ddp", "fsdp"])
def test_sigterm_stops_two_processes_together(policy_dir, tmp_path, config):
    """Both processes stop after the same step and save one checkpoint; the launcher fails;
    resumed with two processes, the run ends where an uninterrupted two-process run ends.
    Under DDP, and under FSDP2 (each process's optimizer shard and the sharded weights in
    the checkpoint)."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    code, stderr = stopped_run("dpo", policy_dir, full, 5, 2, after_step=None, config=config)
    assert code == 0, stderr[-3000:]
    code, stderr = stopped_run("dpo", policy_dir, cut, 5, 2, config=config)
    assert code != 0, stderr[-3000:]  # the launcher reports its workers' status 143
    (step,) = checkpoints(cut)
    assert step == 1 and checkpoint_problem(str(cut / f"checkpoint-{step}")) is None
    assert stderr.count(f"SIGTERM received: stopped after step {step}") == 2  # each process
    code, stderr = stopped_run("dpo", policy_dir, cut, 5, 2, after_step=None, resume=True,
                               config=config)
    assert code == 0, stderr[-3000:]
    expected, got = weights(full), weights(cut)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6)


@MULTIPROCESS
@pytest.mark.parametrize("config, kind", [("zero3", "ppo"), ("fsdp", "ppo"),
                                          ("fsdp", "ppo_lora")])
def test_ppo_sharded_stopped_mid_iteration_resumes_to_the_uninterrupted_run(policy_dir,
                                                                             tmp_path, config,
                                                                             kind):
    """PPO with a value model (or a LoRA policy with the value a head on it), weights
    partitioned by ZeRO-3 or sharded by FSDP2 on two processes, stopped by SIGTERM inside
    an iteration (each process's rollout kept beside the checkpoint) and resumed: the saved
    policy (or adapter and value head) equals an uninterrupted two-process run's."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    code, stderr = stopped_run(kind, policy_dir, full, 6, 2, after_step=None, config=config)
    assert code == 0, stderr[-3000:]
    code, stderr = stopped_run(kind, policy_dir, cut, 6, 2, config=config)
    assert code != 0, stderr[-3000:]  # the launcher reports its workers' status 143
    (step,) = checkpoints(cut)
    assert step == 1 and checkpoint_problem(str(cut / f"checkpoint-{step}")) is None
    for rank in range(2):  # 4 optimizer steps an iteration: stopped inside one
        assert (cut / f"checkpoint-{step}" / f"ppo_experience_{rank}.pt").exists()
    code, stderr = stopped_run(kind, policy_dir, cut, 6, 2, after_step=None, resume=True,
                               config=config)
    assert code == 0, stderr[-3000:]
    expected, got = weights(full), weights(cut)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6)
