#!/usr/bin/env bash
# Teacher GPU benchmark: VideoMAE V2 ViT-B, bf16 autocast, batch 32 on CUDA, plus the decode-bound
# limit of this machine (one decoder process per core) and the lastkd engine end to end.
# Short by design (< 4 minutes; hard stop at 220 s). Prints progress on stderr and one JSON
# object as the last line of stdout. Extra arguments go to bench/teacher.py (e.g. --clips 32).
set -uo pipefail
cd "$(dirname "$0")/.."
. bench/_python.sh
require_modules teacher_gpu.sh torch timm av lmdb numpy pydantic pydantic_settings tqdm
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 3)" || {
  echo "teacher_gpu.sh: CUDA is not available to $PY" >&2; exit 3; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >&2 || true
exec timeout --signal=TERM --kill-after=10 220 "$PY" bench/teacher.py --gpu --batch 32 "$@"
