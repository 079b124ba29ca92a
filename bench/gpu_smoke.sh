#!/usr/bin/env bash
# The GPU smoke test (bench/gpu_smoke.py) on whatever Python the machine has: under ten minutes on
# one GPU, outputs under $OUT, one JSON line last. Exit 3 without CUDA, 2 with packages missing.
set -uo pipefail
cd "$(dirname "$0")/.."
. bench/_python.sh
require_modules gpu_smoke.sh torch timm av lmdb numpy pydantic pydantic_settings safetensors yaml lastkd
exec timeout --signal=TERM --kill-after=10 570 "$PY" bench/gpu_smoke.py "$@"
