#!/usr/bin/env bash
# The smoke test of the riskiest paths (scripts/gpu_smoke.py has the list):
#   bash scripts/gpu_smoke.sh            on a machine with a GPU (SmolLM2, sized for < 10 min)
#   bash scripts/gpu_smoke.sh --cpu      the reduced form on the CPU (part of `make test`)
# Uses .venv (made by `make setup` if missing), or the python named by $PYTHON.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRL_EXPERIMENTAL_SILENCE=1
PY=${PYTHON:-.venv/bin/python}
if [ ! -x "$PY" ]; then make setup; fi
exec "$PY" scripts/gpu_smoke.py "$@"
