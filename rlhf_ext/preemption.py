"""Preemption: SIGTERM, what Slurm and cloud schedulers send some time before they kill a
job, makes every trainer of the package save a complete checkpoint at the end of the step
it is in (PPO mid-iteration included: its checkpoint holds the rollout's experience), then
stop and exit with status 143 (128 + SIGTERM, a shell's code for death by that signal),
saying where the checkpoint is and how to resume.

Several processes: each one's handler only raises a flag; at every step's end the flags are
combined across processes, so all of them stop after the same step and save together.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading

import torch
from transformers import TrainerCallback

EXIT_CODE = 128 + signal.SIGTERM
logger = logging.getLogger(__name__)


class Preempted(SystemExit):
    """Raised by ``train()`` after the checkpoint of a SIGTERM was saved: the process exits
    with status 143 unless the caller catches it."""

    def __init__(self, message: str, checkpoint: str):
        super().__init__(EXIT_CODE)
        self.message, self.checkpoint = message, checkpoint

    def __str__(self) -> str:
        return self.message


class StopOnSigterm(TrainerCallback):
    """At the end of each optimizer step: if any process got SIGTERM, save a checkpoint
    and stop training (the Trainer's own save and stop, so the checkpoint is complete)."""

    def __init__(self, trainer):
        self.trainer, self.requested, self.stopped_at = trainer, False, None

    def on_step_end(self, args, state, control, **kwargs):
        if self._any_process_requested():
            control.should_save = control.should_training_stop = True
            self.stopped_at = state.global_step

    def _any_process_requested(self) -> bool:
        if self.trainer.args.world_size <= 1:
            return self.requested
        flag = torch.tensor([float(self.requested)], device=self.trainer.args.device)
        return bool(self.trainer.accelerator.gather(flag).max() > 0)


@contextlib.contextmanager
def sigterm_stops(callback: StopOnSigterm):
    """While training: SIGTERM sets ``callback.requested`` instead of killing the process
    (a second SIGTERM kills it as before). Only the main thread can own a signal handler;
    elsewhere SIGTERM keeps its usual meaning."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)

    def handler(signum, frame):
        if callback.requested:  # asked twice: stop waiting for the step to end
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.raise_signal(signal.SIGTERM)
        callback.requested = True
        print("SIGTERM received: saving a checkpoint at the end of this step, then stopping",
              file=sys.stderr, flush=True)

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def raise_if_preempted(callback: StopOnSigterm, output_dir: str) -> None:
    """After ``train()`` returned: if it stopped for SIGTERM, say so and exit non-zero."""
    import os

    if callback.stopped_at is None:
        return
    folder = os.path.join(output_dir, f"checkpoint-{callback.stopped_at}")
    message = (f"SIGTERM received: stopped after step {callback.stopped_at} and saved "
               f"{folder}. Resume with resume_from_checkpoint=True (recipes: "
               "--resume_from_checkpoint true) to continue where it stopped.")
    logger.error(message)  # to stderr even where logging is not configured (lastResort)
    raise Preempted(message, folder)
