"""The seed's file format: stored teacher features as ``teacher_features_<split>.npy``.

The original LAST training code reads an ``N x 768`` float32 array aligned row by row with its
dataset's sample order. This writes exactly that for one split of a training config's data,
joined the way the trainer joins (:meth:`TeacherFeatures.from_store` over the split's sample
names, in the order the data pipeline produces them), so a user of that code needs no lastkd.
Clips the feature set does not cover are zero rows and listed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from lastkd.atomic import write_atomic
from lastkd.student.data.config import DataConfig
from lastkd.student.data.dataset import TeacherFeatures
from lastkd.student.data.sources import load_splits

__all__ = ["NpyExport", "export_teacher_npy"]


@dataclass(frozen=True)
class NpyExport:
    """What was written: the array, its ids and missing lists, and the coverage."""

    array: Path
    ids: Path
    missing: Path
    rows: int
    dim: int
    covered: int

    def coverage_line(self) -> str:
        """``covered 1234/1300 (94.9%); 66 missing (zero rows) listed in ...``."""
        missing = self.rows - self.covered
        pct = 100.0 * self.covered / self.rows if self.rows else 0.0
        return (
            f"covered {self.covered}/{self.rows} ({pct:.1f}%); {missing} missing (zero rows) listed in {self.missing}"
        )


def export_teacher_npy(
    data: DataConfig,
    store_path: Path,
    feature_set: str,
    split: Literal["train", "val"],
    out_dir: Path,
    roots: Sequence[Path] | None = None,
) -> NpyExport:
    """Write ``teacher_features_<split>.npy`` (float32, one row per sample of the split, in the
    data pipeline's order), ``..._ids.txt`` (the sample names, one per line) and
    ``..._missing.txt`` (the uncovered ones) into ``out_dir``; each file whole or not at all.
    Raises DatasetError (unknown set, unreadable store) or the data pipeline's errors."""
    train, val = load_splits(data, roots)
    collection = train if split == "train" else val
    feats = TeacherFeatures.from_store(store_path, feature_set, collection.names)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"teacher_features_{split}"
    array, ids, missing = out_dir / f"{stem}.npy", out_dir / f"{stem}_ids.txt", out_dir / f"{stem}_missing.txt"
    vectors = np.ascontiguousarray(feats.vectors, dtype=np.float32)
    write_atomic(array, lambda fh: np.save(fh, vectors, allow_pickle=False))
    write_atomic(ids, lambda fh: fh.write("".join(f"{n}\n" for n in feats.names).encode()))
    absent = [n for n, ok in zip(feats.names, feats.found, strict=True) if not ok]
    write_atomic(missing, lambda fh: fh.write("".join(f"{n}\n" for n in absent).encode()))
    return NpyExport(array, ids, missing, len(feats.names), int(vectors.shape[1]), int(feats.found.sum()))
