"""The files of a run folder: names, the format marker, atomic writes and validated reads.

``run_dir/last.pt`` is the epoch checkpoint the loop resumes from, ``run_dir/result.pt`` the
result of a finished run; both are written whole or not at all and read with ``weights_only``.
What goes into them is the training loop's business (:mod:`lastkd.student.training`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lastkd.atomic import write_atomic
from lastkd.student.config import TrainConfig
from lastkd.student.errors import ResumeError

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_NAME",
    "RESULT_NAME",
    "atomic_torch_save",
    "check_config_hash",
    "load_checkpoint_file",
]

CHECKPOINT_NAME = "last.pt"
RESULT_NAME = "result.pt"
CHECKPOINT_FORMAT = 1


def atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save to ``path`` as a whole file or not at all (:func:`lastkd.atomic.write_atomic`)."""
    write_atomic(path, lambda fh: torch.save(obj, fh))


def load_checkpoint_file(path: Path) -> dict[str, Any]:
    """Load a checkpoint written by a training run (weights_only), or raise ResumeError saying why."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, corrupt or foreign file: say which and why
        raise ResumeError(f"{path}: unreadable checkpoint ({type(exc).__name__}: {str(exc)[:200]})") from None
    if not isinstance(obj, dict) or obj.get("format") != CHECKPOINT_FORMAT:
        raise ResumeError(
            f"{path}: not a lastkd training checkpoint (format {obj.get('format') if isinstance(obj, dict) else type(obj).__name__})"
        )
    return obj


def check_config_hash(obj: dict[str, Any], config: TrainConfig, path: Path) -> None:
    """Raise ResumeError unless the checkpoint ``obj`` (read from ``path``) was written under ``config``."""
    want = config.config_hash()
    if obj.get("config_hash") != want:
        raise ResumeError(
            f"{path} was written by a different training config (hash {str(obj.get('config_hash'))[:12]} != "
            f"{want[:12]}); use a new run directory, or delete the file to start over"
        )
