"""The documentation site: it builds strictly (a broken link, a broken anchor or a missing API
object fails the build), and every page's Python blocks run as written, in order, in a
fresh process per page (forked from one that imported the libraries once), and train what
they say they train (the blocks assert their own first-step invariants; the epilogues below
read what they left behind)."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")
               if "```python" in p.read_text())

# what each page's blocks must have left behind, printed after them as JSON
EPILOGUES = {
    "getting-started.md": ("{'steps': trainer.state.global_step}", {"steps": 4}),
    "preference.md": ("{'steps': trainer.state.global_step}", {"steps": 2}),
    "trl.md": ("{'steps': dpo.state.global_step, 'ld_alpha': dpo.args.ld_alpha, "
               "'grpo': grpo.state.global_step, 'loss': grpo.args.loss_aggregation}",
               {"steps": 2, "ld_alpha": 0.5, "grpo": 2, "loss": "step_token_mean"}),
    "reward.md": ("{'steps': reward.state.global_step}", {"steps": 4}),
    "online-rl.md": ("{'ppo': ppo.state.global_step, 'grpo': grpo.state.global_step, "
                     "'value': ppo.value_model is not None, 'grpo_value': grpo.value_model}",
                     {"ppo": 2, "grpo": 2, "value": True, "grpo_value": None}),
    "rlaif.md": ("{'rounds': [r['round'] for r in online.rounds], "
                 "'steps': online.trainer.state.global_step, 'pairs': len(judged)}",
                 {"rounds": [0, 1], "steps": 2, "pairs": 3}),
    "tiny-world.md": ("{'pairs': len(pairs)}", {"pairs": 1000}),
    "guards.md": ("{'caught': 'worse' in message}", {"caught": True}),
}


def mkdocs(*args, cwd=ROOT, timeout=300):
    return subprocess.run([sys.executable, "-m", "mkdocs", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})


def test_every_page_with_code_is_checked():
    """A new page with Python blocks must say here what its blocks leave behind."""
    assert set(PAGES) == set(EPILOGUES), set(PAGES) ^ set(EPILOGUES)


def test_every_pages_python_blocks_run(tmp_path):
    """Each page's blocks, in order, then its epilogue: in a process of its own, forked from
    one that imported the libraries (tests/page_runner.py), in a folder of its own."""
    jobs = []
    for page in PAGES:
        blocks = re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(), re.S)
        epilogue = EPILOGUES[page][0]
        folder = tmp_path / page.replace("/", "_")
        folder.mkdir()
        jobs.append({"name": page, "cwd": str(folder), "code": "\n".join(blocks)
                     + f"\nimport json\nprint('STATE', json.dumps({epilogue}))\n"})
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "page_runner.py"),
                           str(tmp_path / "jobs.json")], cwd=tmp_path, capture_output=True,
                          text=True, timeout=900,
                          env={"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
                               "TRL_EXPERIMENTAL_SILENCE": "1", "PATH": "/usr/bin:/bin",
                               "HOME": str(tmp_path), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    exits = dict(line.split()[1:] for line in proc.stdout.splitlines()
                 if line.startswith("PAGE "))
    assert list(exits) == PAGES
    failed = {}
    for job in jobs:
        folder, page = Path(job["cwd"]), job["name"]
        out = (folder / "stdout.txt").read_text()
        if exits[page] != "0" or "STATE " not in out:
            failed[page] = (folder / "stderr.txt").read_text()[-3000:]
        elif json.loads(out.split("STATE ", 1)[1]) != EPILOGUES[page][1]:
            failed[page] = f"left behind {out.split('STATE ', 1)[1]}"
    assert not failed, failed


def test_site_builds_strictly_with_the_api_reference(tmp_path):
    proc = mkdocs("build", "--strict", "--site-dir", str(tmp_path / "site"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    site = tmp_path / "site"
    api = (site / "api" / "trainers" / "index.html").read_text()
    for name in ("PreferenceTrainer", "RewardTrainer", "PPOTrainer", "OnlineDPOTrainer"):
        assert 'id="rlhf_ext.' in api and f">{name}<" in api
    # config fields carry their help text and default (docs/tooling/field_help.py)
    assert "Passes over each rollout." in api and "num_ppo_epochs" in api
    losses = (site / "api" / "losses" / "index.html").read_text()
    assert "rlhf_ext.losses.paired.ipo_loss" in losses  # a docstring's formula is rendered
    assert "h_w / n_w - h_l / n_l - 1 / (2 beta)" in losses
    # the README's links into the docs point at pages that exist
    linked = re.findall(r"\]\(docs/([^)#]+)\)", (ROOT / "README.md").read_text())
    assert len(linked) >= 10 and all((DOCS / page).is_file() for page in linked), linked


@pytest.mark.parametrize("breakage, expect", [
    ("See [the losses](no-such-page.md).", "no-such-page.md"),
    ("See [the formulas](preference.md#no-such-heading).", "no-such-heading"),
    ("::: rlhf_ext.losses.no_such_function", "no_such_function"),
])
def test_a_broken_link_or_missing_api_object_fails_the_build(breakage, expect, tmp_path):
    """The strict build is what catches these: the same site with one bad line fails."""
    shutil.copytree(DOCS, tmp_path / "docs")
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    concepts = tmp_path / "docs" / "concepts.md"
    concepts.write_text(concepts.read_text() + "\n" + breakage + "\n")
    config = (tmp_path / "mkdocs.yml").read_text().replace("paths: [.]", f"paths: [{ROOT}]")
    (tmp_path / "mkdocs.yml").write_text(config)
    proc = mkdocs("build", "--strict", "--site-dir", str(tmp_path / "site"), cwd=tmp_path)
    assert proc.returncode != 0
    assert expect in proc.stderr
