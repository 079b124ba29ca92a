#!/usr/bin/env bash
# The GPU smoke test (bench/gpu_smoke.py) on whatever Python the machine has: under ten minutes on
# one GPU, outputs under $OUT, one JSON line last. Exit 3 without CUDA, 2 with packages missing.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
missing=$("$PY" - <<'PYEOF'
import importlib.util
mods = ["torch", "timm", "av", "lmdb", "numpy", "pydantic", "pydantic_settings", "safetensors", "yaml", "lastkd"]
print(" ".join(m for m in mods if importlib.util.find_spec(m) is None))
PYEOF
)
if [ -n "$missing" ]; then
  echo "gpu_smoke.sh: missing Python packages for $PY: $missing (pip install -e . --no-deps plus these)" >&2
  exit 2
fi
exec timeout --signal=TERM --kill-after=10 570 "$PY" bench/gpu_smoke.py "$@"
