"""What every recipe shares: machine-dependent defaults and the tiny-world arguments."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

import torch


def machine_args() -> list[str]:
    """Command-line defaults a machine without a GPU needs (prepended, so explicit flags win).

    On CPU: ``use_cpu`` (else TRL's bf16 default fails), and the gloo backend when several
    processes run (else accelerate sees a world of one: ../shared/NOTES.md).
    """
    if torch.cuda.is_available():
        return []
    args = ["--use_cpu", "true"]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        args += ["--ddp_backend", "gloo"]
    return args


def with_machine_args(argv: list[str] | None = None) -> list[str]:
    """``argv`` (default ``sys.argv[1:]``) with ``machine_args`` in front."""
    return machine_args() + list(sys.argv[1:] if argv is None else argv)


@dataclass
class TinyWorldArguments:
    """Build the tiny world before training (seconds, cached): ``rlhf_ext.tiny.world``."""

    tiny_world_dir: str | None = field(
        default=None, metadata={"help": "Build/reuse the tiny world here before training."})
    tiny_world_seed: int = field(default=0, metadata={"help": "Seed of the tiny world."})
    tiny_model_size: str = field(default="small", metadata={"help": "tiny, small or base."})
    tiny_eval_prompts: int = field(
        default=256, metadata={"help": "After training, sample this many held-out prompts and "
                               "report oracle score and well-formedness (0 to skip)."})

    def ensure(self):
        """Build the world if asked; return its path or None."""
        if self.tiny_world_dir is None:
            return None
        from .tiny import WorldSpec, ensure_world

        return ensure_world(self.tiny_world_dir,
                            WorldSpec(seed=self.tiny_world_seed, size=self.tiny_model_size))
