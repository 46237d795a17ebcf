"""The main job: run the tiny-world pipeline stage by stage and report what it achieved.

    python recipes/demo.py [--out outputs/demo] [--fresh]

Each stage is one recipe run as its own process; a finished stage (its summary file
exists) is reused unless --fresh is given. Stages so far: SFT.
"""

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

RECIPES = Path(__file__).resolve().parent


def run_stage(name: str, recipe: str, config: str, out: Path, summary_file: str,
              extra: list[str], fresh: bool) -> tuple[dict, float, bool]:
    """Run one recipe unless its summary exists; return (summary, seconds, reused)."""
    stage_dir = out / name
    summary = stage_dir / summary_file
    if fresh:
        shutil.rmtree(stage_dir, ignore_errors=True)
    if summary.exists():
        return json.loads(summary.read_text()), 0.0, True
    start = time.time()
    cmd = [sys.executable, str(RECIPES / recipe), "--config", str(RECIPES / config),
           "--output_dir", str(stage_dir), *extra]
    print(f"\n=== stage {name}: {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, check=True)
    return json.loads(summary.read_text()), time.time() - start, False


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/demo")
    parser.add_argument("--fresh", action="store_true", help="rerun finished stages")
    args = parser.parse_args(argv)
    out = Path(args.out)
    world = out / "world"
    total = time.time()
    sft, seconds, reused = run_stage(
        "sft", "sft.py", "tiny/sft.yaml", out, "sft_summary.json",
        ["--tiny_world_dir", str(world), "--model_name_or_path", str(world / "base"),
         "--dataset_name", str(world / "data" / "sft")], args.fresh)
    rows = [("sft", sft["tiny/oracle_score"], sft["tiny/well_formed"],
             sft["tiny/mean_length"], "reused" if reused else f"{seconds:.0f} s")]
    print("\n| stage | oracle score | well formed | mean length | time |")
    print("|---|---|---|---|---|")
    for name, score, formed, length, t in rows:
        print(f"| {name} | {score:.3f} | {formed:.1%} | {length:.1f} | {t} |")
    print(f"\nSFT loss {sft['first_logged_loss']:.2f} -> {sft['last_logged_loss']:.2f}; "
          f"demo total {time.time() - total:.0f} s")


if __name__ == "__main__":
    main()
