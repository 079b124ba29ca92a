"""Facts recorded about a published student: its FLOPs, the code that trained it, and whether
its data was synthetic (the lineage and the model card carry them)."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
from pathlib import Path

import torch

from lastkd.models.last_v2 import LASTv2

__all__ = ["SYNTHETIC_MARKER", "code_version", "estimate_flops", "is_synthetic"]

SYNTHETIC_MARKER = "synthetic.json"  # written by `lastkd synth` (lastkd.student.synth)


def estimate_flops(model: LASTv2, num_frames: int, streams: tuple[str, ...], bodies: int = 2) -> int:
    """FLOPs (2 x multiply-accumulates, as counted by torch's FlopCounterMode) of one clip's
    eval-mode forward with all ``streams``, ``bodies`` bodies and ``num_frames`` frames."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    x = {s: torch.zeros(1, 3, num_frames, 25, bodies) for s in streams}
    counter = FlopCounterMode(display=False)
    try:
        with torch.no_grad(), counter:
            model(x)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def code_version() -> str:
    """Package version plus ``git describe`` of the source tree when it is a git checkout."""
    try:
        version = importlib.metadata.version("lastkd")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "-C", str(here), "describe", "--always", "--dirty", "--tags"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
        if out.returncode == 0 and out.stdout.strip():
            return f"{version}+git.{out.stdout.strip()}"
    except (OSError, subprocess.SubprocessError):
        pass
    return version


def is_synthetic(data_path: Path) -> bool:
    """True when the data folder or its parent carries the marker ``lastkd synth`` writes."""
    base = Path(data_path)
    folder = base if base.is_dir() else base.parent
    for candidate in (folder, folder.parent):
        marker = candidate / SYNTHETIC_MARKER
        if marker.is_file():
            try:
                return bool(json.loads(marker.read_text(encoding="utf-8")).get("synthetic", True))
            except (OSError, ValueError, AttributeError):
                return True
    return False
