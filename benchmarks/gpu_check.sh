#!/usr/bin/env bash
# The GPU check: install the project, run the tests marked `cuda`, then print the GPU figures as JSON
# (benchmarks/gpu_bench.py). Under 8 minutes on one H200. Fails at once, with a message, without a GPU.
#     bash benchmarks/gpu_check.sh > gpu_check.json
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu_check: no NVIDIA GPU found (nvidia-smi); run this on a machine with a CUDA GPU" >&2
  exit 2
fi
if ! [ -x "$PY" ] || ! "$PY" -c "import neurospec, pytest" >/dev/null 2>&1; then
  timeout 300 make install >&2 || { echo "gpu_check: make install failed (see above)" >&2; exit 2; }
fi
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: torch $("$PY" -c 'import torch; print(torch.__version__)') sees no CUDA device; install a CUDA build of torch" >&2
  exit 2
fi
export NEUROSPEC_NO_PROGRESS=1
echo "gpu_check: tests marked cuda" >&2
timeout 180 "$PY" -m pytest -q -m cuda -p no:cacheprovider >&2
echo "gpu_check: benchmark" >&2
timeout 300 "$PY" benchmarks/gpu_bench.py --json
