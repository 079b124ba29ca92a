"""``lastkd demo --finetune-teacher``: a teacher that knows the demo's classes.

The tiny VideoMAE V2 is fine-tuned in this process on the demo dataset's RGB train split (the
skeleton side's xsub rule, so the student's val clips stay unseen), with the skeleton-guided
person crop, and published to ``<registry>/_teachers``; the demo's stack then embeds with it
(``LASTKD_TEACHER_NAME``, same geometry and crop). Re-running the demo resumes or reuses the run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lastkd.services.demo_console import Console, fmt_s, pct
from lastkd.services.demo_data import DemoDataset
from lastkd.services.demo_errors import DemoError

if TYPE_CHECKING:
    from lastkd.finetune.config import FinetuneConfig

__all__ = ["DEMO_TEACHER", "FineTunedTeacher", "finetune_demo_teacher", "synthetic_recipe", "teacher_settings"]

DEMO_TEACHER = "videomae_v2_tiny"
# The recipe of synthetic_recipe (crop 0.94 val top-1 on 3 synthetic classes at 100 epochs,
# bench/finetune.py): small input, no flip (the synthetic classes differ by side), no mixup.
FRAMES, SIZE = 8, 48


@dataclass(frozen=True)
class FineTunedTeacher:
    """The published demo teacher: its registry folder name and its own val top-1."""

    folder: Path
    top1: float
    chance: float
    seconds: float


def synthetic_recipe(
    videos: Path,
    skeletons: Path,
    *,
    crop: bool,
    epochs: int,
    seed: int = 0,
    size: int = SIZE,
    frames: int = FRAMES,
    rate: int = 2,
    name: str = "demo-teacher",
) -> FinetuneConfig:
    """The tiny teacher's recipe for the synthetic set (the demo's, and what bench/finetune.py
    measures, with and without the crop and at other geometries)."""
    from lastkd.finetune.config import FinetuneConfig

    return FinetuneConfig.from_dict(
        {
            "name": name,
            "data": {"path": str(videos), "person_crop": crop, "skeletons": str(skeletons)},
            "model": DEMO_TEACHER,
            "num_frames": frames,
            "sampling_rate": rate,
            "size": size,
            "epochs": epochs,
            "batch_size": 6,
            "drop_path": 0.0,
            "seed": seed,
            "optimizer": {"lr": 3e-3, "warmup_epochs": 2, "layer_decay": 1.0, "min_lr": 1e-4},
            "augment": {"mixup": 0.0, "cutmix": 0.0, "scale": [0.8, 1.0], "flip": False, "label_smoothing": 0.0},
            "eval": {"temporal_views": 2, "spatial_crops": 1, "every_epochs": epochs},
            "device": "cpu",
        }
    )


def finetune_demo_teacher(
    dataset: DemoDataset, registry_dir: Path, run_dir: Path, epochs: int, seed: int, console: Console
) -> FineTunedTeacher:
    """Fine-tune, evaluate and publish the demo teacher (progress on ``console``)."""
    from lastkd.finetune.loop import FinetuneError, FinetuneHooks, finetune, publish_to_registry
    from lastkd.teacher.video import VideoError

    t0 = time.monotonic()
    config = synthetic_recipe(dataset.videos, dataset.skeletons, crop=True, epochs=epochs, seed=seed)

    def on_epoch(entry: dict[str, Any]) -> None:
        console.progress(f"  teacher epoch {entry['epoch']}/{epochs}: loss {entry['train_loss']:.3f}")

    try:
        result = finetune(config, run_dir / config.config_hash()[:12], FinetuneHooks(on_epoch=on_epoch))
        folder = publish_to_registry(result, registry_dir)
    except (FinetuneError, VideoError, ValueError, OSError) as exc:
        raise DemoError(f"fine-tuning the demo teacher failed: {exc}") from None
    seconds = time.monotonic() - t0
    top1, chance = float(result.metrics["top1"]), 1.0 / result.num_classes
    console.finish(
        f"  teacher {DEMO_TEACHER} fine-tuned in {fmt_s(seconds)}: val top-1 {pct(top1)} over "
        f"{result.val_clips} clips (chance {pct(chance)}); published {folder.name}"
    )
    return FineTunedTeacher(folder, top1, chance, seconds)


def teacher_settings(teacher: FineTunedTeacher, dataset: DemoDataset) -> dict[str, Any]:
    """The teacher_* settings of a stack that embeds with ``teacher`` as it was trained."""
    return {
        "teacher_model": DEMO_TEACHER,
        "teacher_weights": None,
        "teacher_random_init": False,
        "teacher_name": teacher.folder.name,
        "teacher_num_frames": FRAMES,
        "teacher_size": SIZE,
        "teacher_person_crop": True,
        "teacher_skeletons": dataset.skeletons,
    }
