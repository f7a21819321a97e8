#!/usr/bin/env bash
# Set up a fresh clone: a local virtual environment in .venv with the project and its dev tools.
# Installs the CPU build of torch first on machines without CUDA, so pip never pulls a multi-GB CUDA wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRAS=${SDB_EXTRAS:-dev}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python
"$VPY" -m pip install -q --upgrade pip
if ! "$VPY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    "$VPY" -m pip install -q "torch>=2.3,<2.15"
  else
    # PyTorch's CPU index when it answers; otherwise the registry or a local wheel (find-links) of 2.13.0.
    "$VPY" -m pip install -q --retries 0 --timeout 5 "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu 2>/dev/null \
      || "$VPY" -m pip install -q "torch==2.13.0"
  fi
fi
if [ -n "$EXTRAS" ]; then
  "$VPY" -m pip install -q -e ".[$EXTRAS]"
else
  "$VPY" -m pip install -q -e .
fi
echo "sdb: environment ready in .venv"
