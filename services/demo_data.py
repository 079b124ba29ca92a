"""The data of ``lastkd demo``: a small SYNTHETIC NTU-format dataset (``lastkd synth``:
skeletons + rendered videos) plus the real NTU samples of a folder, with a 60-line label map.

Kept apart from the command so the dataset can be built without the stack or any HTTP (the
learning benchmark and the tests build it directly). Building is idempotent: a complete folder
with the same parameters is reused, and a new one is assembled beside its final name and renamed
into place, so an interrupted run leaves nothing half-made.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from lastkd.services.demo_errors import DemoError

__all__ = [
    "DATASET_MARKER",
    "NTU60_CLASSES",
    "NTU_NAME",
    "DemoDataset",
    "dataset_name",
    "prepare_dataset",
    "real_pairs",
]

NTU60_CLASSES = 60
DATASET_MARKER = "demo.json"
NTU_NAME = re.compile(r"^S\d{3}C\d{3}P\d{3}R\d{3}A(\d{3})$")


@dataclass(frozen=True)
class DemoDataset:
    """A prepared demo dataset: NTU-format skeletons, their videos and a 60-line label map."""

    root: Path
    skeletons: Path
    videos: Path
    label_map: Path
    clips: tuple[Path, ...]
    real_samples: tuple[str, ...]
    reused: bool


def real_pairs(sample_dir: Path) -> list[tuple[str, Path, Path]]:
    """(name, skeleton, video) for every complete NTU sample in ``sample_dir``."""
    pairs = []
    for skeleton in sorted(sample_dir.glob("*.skeleton")):
        video = sample_dir / f"{skeleton.stem}_rgb.avi"
        if NTU_NAME.match(skeleton.stem) and video.is_file():
            pairs.append((skeleton.stem, skeleton, video))
    return pairs


def _label_map_text(classes: int) -> str:
    from lastkd.student.synth import class_description

    # The student is an NTU-60 model (60 outputs); classes without demo samples get a placeholder.
    names = [class_description(c) for c in range(classes)]
    names += [f"A{c + 1:03d} (no samples in the demo data)" for c in range(classes, NTU60_CLASSES)]
    return "\n".join(names) + "\n"


def dataset_name(classes: int, samples_per_class: int, frames: int, seed: int, with_real: bool) -> str:
    """Folder name of a demo dataset; it encodes every parameter, so variants never collide."""
    return f"demo-c{classes}-k{samples_per_class}-f{frames}-s{seed}" + ("-ntu" if with_real else "")


def prepare_dataset(
    data_root: Path,
    *,
    classes: int,
    samples_per_class: int,
    frames: int = 120,
    seed: int = 0,
    ntu_sample: Path | None = None,
) -> DemoDataset:
    """Build (or reuse) the demo dataset in ``data_root/demo-c<classes>-k<k>-f<frames>-s<seed>``.

    The folder is assembled beside its final name and renamed into place, so an interrupted run
    leaves nothing half-made; a complete folder with the same parameters is reused as it is.
    Raises :class:`DemoError` (bad parameters, or a foreign folder in the way).
    """
    from lastkd.student.synth import SynthError, generate

    real = real_pairs(ntu_sample) if ntu_sample is not None and ntu_sample.is_dir() else []
    name = dataset_name(classes, samples_per_class, frames, seed, bool(real))
    final = Path(data_root) / name
    params = {
        "format": 1,
        "classes": classes,
        "samples_per_class": samples_per_class,
        "max_frames": frames,
        "seed": seed,
        "real_samples": [r[0] for r in real],
    }
    marker = final / DATASET_MARKER
    if final.exists():
        try:
            found = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            found = None
        if isinstance(found, dict) and found.get("params") == params:
            return _dataset(final, [r[0] for r in real], reused=True)
        if found is None and not (final / "synthetic.json").is_file():
            raise DemoError(f"{final} exists and was not made by `lastkd demo`; move it away or use --out elsewhere")
        shutil.rmtree(final)  # ours, but stale or incomplete: rebuild it

    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.parent / f".{name}.staging-{uuid.uuid4().hex[:8]}"
    try:
        try:
            generate(staging, classes=classes, samples_per_class=samples_per_class, frames=frames, seed=seed)
        except SynthError as exc:
            raise DemoError(str(exc)) from None
        replaced = []
        for sample, skeleton, video in real:
            if (staging / "skeletons" / skeleton.name).exists():
                replaced.append(sample)
            shutil.copyfile(skeleton, staging / "skeletons" / skeleton.name)
            shutil.copyfile(video, staging / "videos" / video.name)
        (staging / "label_map_ntu60.txt").write_text(_label_map_text(classes), encoding="utf-8")
        manifest = {
            "synthetic": True,
            "note": "lastkd demo data: synthetic samples from `lastkd synth` plus the real NTU samples listed.",
            "params": params,
            "real_samples_replaced_synthetic": replaced,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (staging / DATASET_MARKER).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        os.rename(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return _dataset(final, [r[0] for r in real], reused=False)


def _dataset(root: Path, real: list[str], reused: bool) -> DemoDataset:
    clips = tuple(sorted((root / "videos").glob("*_rgb.avi")))
    return DemoDataset(
        root, root / "skeletons", root / "videos", root / "label_map_ntu60.txt", clips, tuple(real), reused
    )
