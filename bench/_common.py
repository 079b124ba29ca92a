"""What several benchmarks share: the real NTU clip they measure on, and the ViT-B teacher they
build (registry size, or the same width with 2 blocks for ``--quick``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lastkd.models.videomae import VideoMAEv2

ROOT = Path(__file__).resolve().parents[1]
_SAMPLE = Path("data") / "ntu_sample" / "S001C001P001R001A001_rgb.avi"
# The real NTU clip: LASTKD_BENCH_NTU_CLIP (a machine that carried it elsewhere, e.g. a GPU box),
# else ../shared next to the project, else a shared/ inside it.
NTU_CLIP = next(
    (
        p
        for p in (
            Path(os.environ.get("LASTKD_BENCH_NTU_CLIP", "/nonexistent")),
            ROOT.parent / "shared" / _SAMPLE,
            ROOT / "shared" / _SAMPLE,
        )
        if p.is_file()
    ),
    ROOT.parent / "shared" / _SAMPLE,
)


def vit_b_teacher(shallow: bool, weights: Path | None = None, num_frames: int = 16) -> tuple[VideoMAEv2, str]:
    """The benchmarks' ViT-B teacher in eval mode, and its weights' sha256 (or ``random-init``).

    ``shallow``: the ViT-B width with 2 blocks (a registered size cannot be shortened by name), for
    runs that must finish in seconds; only without weights (an official file has 12 blocks).
    """
    from lastkd.models.checkpoint_io import load_checkpoint
    from lastkd.models.videomae import MODEL_CONFIGS, VideoMAEv2, create_videomae

    if shallow and weights is not None:
        raise ValueError("a shallow teacher cannot load the official 12-block weights")
    if shallow:
        arch = {**MODEL_CONFIGS["videomae_v2_vit_b"], "depth": 2}
        model = VideoMAEv2(num_frames=num_frames, num_classes=0, **arch)
    else:
        model = create_videomae("videomae_v2_vit_b", num_frames=num_frames, num_classes=0)
    label = load_checkpoint(model, weights) if weights is not None else "random-init"
    return model.eval(), label
