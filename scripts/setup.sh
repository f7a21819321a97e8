#!/usr/bin/env bash
# Set up a fresh clone: a local virtual environment in .venv with the project (and, by default, its dev tools).
#   SDB_EXTRAS=dev (default) installs the dev extra; SDB_EXTRAS= (empty) installs the runtime only.
# Installs the CPU build of torch first on machines without CUDA, so pip never pulls a multi-GB CUDA wheel.
# A second run with an unchanged pyproject.toml skips pip entirely (stamp file in .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRAS=${SDB_EXTRAS-dev}
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "sdb: Python 3.11+ is required ('$PY' is $("$PY" -V 2>&1)); set PYTHON=python3.11 or newer" >&2
  exit 1
fi
# Real data for the evaluation: Debian's Fashion-MNIST package (IDX files under /usr/share/datasets).
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    { apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; }; } \
      && echo "sdb: installed Fashion-MNIST (dataset-fashion-mnist)" \
      || echo "sdb: warning: could not install dataset-fashion-mnist; the Fashion-MNIST tests will skip" >&2
  else
    echo "sdb: Fashion-MNIST is not installed; for the evaluation run: sudo apt-get install dataset-fashion-mnist" >&2
  fi
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python
STAMP=".venv/.sdb-setup-${EXTRAS:-runtime}"
WANT=$(cat pyproject.toml scripts/setup.sh | "$VPY" -c 'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())')
# A dev install also satisfies a runtime-only request.
if { [ "$(cat "$STAMP" 2>/dev/null)" = "$WANT" ] || { [ -z "$EXTRAS" ] && [ "$(cat .venv/.sdb-setup-dev 2>/dev/null)" = "$WANT" ]; }; } \
   && "$VPY" -c "import torch, sdb" 2>/dev/null; then
  echo "sdb: environment in .venv is up to date"
  exit 0
fi
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
echo "$WANT" > "$STAMP"
echo "sdb: environment ready in .venv"
