"""Where PPO's resident memory goes, phase by phase: the settings of
benchmarks/online_vs_trl.py's ppo-ours-head run (SmolLM2-135M-Instruct, full fine-tune,
the value a head on the policy, rollout 16, minibatch 4, forward chunk 8, response 48,
float32, one thread).

    python benchmarks/ppo_memory_profile.py [--iterations 3] [--lora 0]

A thread samples the process's resident set every 20 ms; the run (the benchmark's own
``ours``) is marked once its models are built, around each sampling and scoring call and
each optimizer step. Printed: one line per mark with the resident memory there and the
highest sample until the next mark, then the kernel's high-water mark (VmHWM, what the
benchmark reports).
"""

from __future__ import annotations

import argparse
import os
import threading
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")


def resident_mib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Profile:
    """Marks (time, label, resident MiB) and background samples (time, resident MiB)."""

    def __init__(self, every: float = 0.02):
        self.marks, self.samples, self.every = [], [], every
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self):
        while True:
            self.samples.append((time.perf_counter(), resident_mib()))
            time.sleep(self.every)

    def mark(self, label: str):
        self.marks.append((time.perf_counter(), label, resident_mib()))

    def wrap(self, owner, name: str, label: str):
        """Mark before and after every call of ``owner.name``."""
        inner = getattr(owner, name)

        def marked(*args, **kwargs):
            self.mark(label + " >")
            out = inner(*args, **kwargs)
            self.mark(label + " <")
            return out

        setattr(owner, name, marked)

    def table(self) -> str:
        lines = [f"{'mark':28s} {'MiB':>7s} {'max until next':>15s}"]
        for i, (start, label, mib) in enumerate(self.marks):
            stop = self.marks[i + 1][0] if i + 1 < len(self.marks) else float("inf")
            between = [m for t, m in self.samples if start <= t < stop]
            lines.append(f"{label:28s} {mib:7.0f} {max(between, default=mib):15.0f}")
        return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--lora", type=int, default=0, help="LoRA rank of the policy (0: full)")
    a = parser.parse_args()
    profile = Profile()
    profile.mark("start")

    import tempfile

    import torch
    from online_vs_trl import ours, peak_mib

    import rlhf_ext.ppo.rollout as rollout
    from rlhf_ext.ppo import PPOTrainer

    torch.set_num_threads(1)
    profile.mark("imports")
    profile.wrap(rollout, "generate_completions", "sampling")
    profile.wrap(rollout, "response_logps", "scoring forward")
    profile.wrap(torch.optim.AdamW, "step", "optimizer step")
    profile.wrap(PPOTrainer, "train", "train (models built)")
    with tempfile.TemporaryDirectory() as out:  # the benchmark's run, its defaults
        ours(argparse.Namespace(mode="ppo-ours-head", out=out, iterations=a.iterations,
                                rollout=16, minibatch=4, chunk=8, response=48, group=4,
                                checkpointing=False, lora=a.lora))
    profile.mark("end")
    print(profile.table())
    print(f"high-water mark (VmHWM): {peak_mib():.0f} MiB")


if __name__ == "__main__":
    main()
