"""Each benchmark measurement runs in its own process with one thread, so its peak RSS is
its own and the timings are steady (two threads are noisy on these machines)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
       "TRL_EXPERIMENTAL_SILENCE": "1", "TOKENIZERS_PARALLELISM": "false"}
_TAG = "RESULT "


def report(result: dict) -> None:
    """In the child: hand ``result`` to the parent."""
    print(_TAG + json.dumps(result))


def run_isolated(script: str, args: list[str], name: str, env: dict | None = None) -> dict:
    """In the parent: run ``script args`` in a fresh one-thread process (``env`` added to
    its environment); its ``report``."""
    proc = subprocess.run([sys.executable, script, *args], env={**os.environ, **ENV, **(env or {})},
                          capture_output=True, text=True)
    lines = [x for x in proc.stdout.splitlines() if x.startswith(_TAG)]
    if proc.returncode or not lines:
        sys.exit(f"{name} failed:\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len(_TAG):])
