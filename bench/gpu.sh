#!/usr/bin/env bash
# GPU readiness benchmark (bench/gpu_bench.py): raw throughput at batch 1/32/256 in float32/float16/bfloat16,
# the largest batch that fits, box-training speed and the serving benchmark, in one JSON file
# (default runs/gpu-bench.json; --json FILE). Bounded to 8 minutes of wall time.
#
#   bench/gpu.sh                          # on a CUDA machine (--device cuda)
#   bench/gpu.sh --device cpu --reduced   # CPU smoke run (tests/bench/test_gpu_bench.py)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
exec timeout --signal=TERM --kill-after=10 "${SDB_GPU_BENCH_TIMEOUT:-480}" "$PYTHON" -m bench.gpu_bench "$@"
