"""The README's Python block runs as written in a fresh process (outputs go to a temporary
folder) and trains what it says it trains. The docs' blocks: tests/test_docs.py."""

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# printed after the README's code: what the block left behind
EPILOGUE = """
import json
print("STATE", json.dumps({
    "simpo": [h["loss"] for h in trainer.state.log_history if "loss" in h],
    "simpo_steps": trainer.state.global_step,
}))
"""


def test_readme_python_blocks_run(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert len(blocks) >= 1
    proc = subprocess.run([sys.executable, "-c", "\n".join(blocks) + EPILOGUE], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600,
                          env={"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
                               "TRL_EXPERIMENTAL_SILENCE": "1", "PATH": "/usr/bin:/bin",
                               "HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-4000:]
    state = json.loads(proc.stdout.split("STATE ", 1)[1])
    assert state["simpo_steps"] == 4
    assert all(0 < loss < 10 for loss in state["simpo"])  # -log sigmoid(...) of real margins
    assert (tmp_path / "outputs" / "tiny" / "world" / "base" / "config.json").exists()


def test_readme_stays_short():
    """The README is a front page (what it is, the commands, a quick start, the headline
    numbers, links); everything else lives on a page of docs/."""
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250
