#!/usr/bin/env bash
# Teacher GPU benchmark: VideoMAE V2 ViT-B, bf16 autocast, batch 32 on CUDA, plus the decode-bound
# limit of this machine (one decoder process per core) and the lastkd engine end to end.
# Short by design (< 4 minutes; hard stop at 220 s). Prints progress on stderr and one JSON
# object as the last line of stdout. Extra arguments go to bench/teacher.py (e.g. --clips 32).
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
missing=$("$PY" - <<'PYEOF'
import importlib
mods = ["torch", "timm", "av", "lmdb", "numpy", "pydantic", "pydantic_settings", "tqdm"]
print(" ".join(m for m in mods if importlib.util.find_spec(m) is None))
PYEOF
)
if [ -n "$missing" ]; then
  echo "teacher_gpu.sh: missing Python packages: $missing (install the project: pip install -e .)" >&2
  exit 2
fi
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 3)" || {
  echo "teacher_gpu.sh: CUDA is not available to $PY" >&2; exit 3; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >&2 || true
exec timeout --signal=TERM --kill-after=10 220 "$PY" bench/teacher.py --gpu --batch 32 "$@"
