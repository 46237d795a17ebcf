"""Run a demo's stages as processes, several at once, each after the stages it reads.

On a 2-core CPU a 135M-parameter model gains little from a second thread: a LoRA training
step of SmolLM2-135M at batch 4 x 96 tokens took 4.9 s on one thread and 3.4 s on two, and
two one-thread processes side by side took 4.8 s each, so they did 1.4x the work of one
two-thread process (a no-grad forward of 16 rows: 1.25x; 2026-12-03, AVX2-only AMD EPYC). A stage is reused when its ``done`` file exists; its output goes to its log.
"""

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Job:
    name: str
    cmd: list[str]
    done: Path                  # written by the process when it has finished
    log: Path
    after: list[str] = field(default_factory=list)  # jobs whose output it reads


def threads_each(workers: int) -> int:
    """The machine's cores split among ``workers`` processes, one thread each at least."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // workers)


def run_jobs(jobs: list[Job], workers: int, threads: int | None, bar=None) -> dict[str, float]:
    """Run every job not yet done, at most ``workers`` at once, each with ``threads`` threads
    (OMP_NUM_THREADS; None: as this process's environment says), in list order as their
    ``after`` jobs finish. Returns each job's wall seconds (0.0 when reused). A failure stops
    new starts, lets the running jobs finish (their output is kept for a rerun), then exits
    with the failed job's log tail."""
    names = [j.name for j in jobs]
    unknown = {a for j in jobs for a in j.after} - set(names)
    if unknown or len(set(names)) != len(names):
        raise ValueError(f"jobs {names}: unknown 'after' {sorted(unknown)} or repeated names")
    env = dict(os.environ)
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    seconds = {j.name: 0.0 for j in jobs if j.done.exists()}
    pending = [j for j in jobs if j.name not in seconds]
    for name in seconds:
        _report(bar, f"{name}: reused")
    if bar is not None:
        bar.update(len(seconds))
    running, failed = {}, []
    while pending or running:
        for job in list(pending):
            if failed or len(running) >= workers:
                break
            if all(a in seconds for a in job.after):
                job.log.parent.mkdir(parents=True, exist_ok=True)
                log = open(job.log, "w")
                proc = subprocess.Popen(job.cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
                running[job.name] = (job, proc, log, time.time())
                pending.remove(job)
        if not running:
            if not failed:  # nothing runs, nothing can start
                raise ValueError(f"jobs {[j.name for j in pending]} wait on each other")
            break  # only jobs after a failed one are left
        time.sleep(0.5)
        for name, (job, proc, log, start) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[name]
            if proc.returncode != 0 or not job.done.exists():
                failed.append(job)
                _report(bar, f"{name}: FAILED ({proc.returncode}); log: {job.log}")
                continue
            seconds[name] = time.time() - start
            _report(bar, f"{name}: {seconds[name]:.0f} s")
            if bar is not None:
                bar.update(1)
    if failed:
        job = failed[0]
        sys.stderr.write(job.log.read_text()[-8000:])
        left = [j.name for j in pending]
        raise SystemExit(f"stage {job.name} failed; its log: {job.log}"
                         + (f"; not started: {', '.join(left)}" if left else ""))
    return seconds


def _report(bar, line: str):
    (bar.write if bar is not None else print)(line)
