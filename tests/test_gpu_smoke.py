"""scripts/gpu_smoke.sh --cpu: the GPU smoke test's reduced form, so the script never rots.

Each of its checks asserts its own first-step invariant (DPO's loss log 2 with the policy
its own reference, PPO's and GRPO's first KL 0...): here the script must pass, list every
check in order, and report the numbers it judged."""

import json
import math
import os
import subprocess
import sys

import pytest
from conftest import ROOT

CHECKS = ["dpo_full_padding_free", "dpo_qlora_precomputed_ref", "reward_qlora",
          "ppo_single_base_qlora", "ppo_value_model_checkpointing", "grpo_prefix_sharing",
          "dpo_zero2", "dpo_zero3", "dpo_fsdp2"]


def test_the_smoke_script_passes_on_the_cpu(tmp_path):
    proc = subprocess.run(["bash", "scripts/gpu_smoke.sh", "--cpu", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = {r["check"]: r for r in json.loads((tmp_path / "smoke.json").read_text())}
    assert list(rows) == CHECKS and all(r["ok"] for r in rows.values())
    measured = {name: dict(m.split("=") for m in r["measured"]) for name, r in rows.items()}
    for name in ("dpo_full_padding_free", "dpo_zero2", "dpo_zero3", "dpo_fsdp2"):
        assert float(measured[name]["train_loss"]) == pytest.approx(math.log(2), abs=1e-5)
    assert float(measured["grpo_prefix_sharing"]["objective/kl"]) == pytest.approx(0, abs=1e-4)
    assert rows["dpo_zero3"]["wrapper"] == "DeepSpeedEngine"
    assert all(f"| {name} |" in proc.stdout for name in CHECKS)
