"""The one internal form every skeleton reader produces."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class SkeletonCollection:
    """A set of skeleton samples, whatever file format they came from.

    ``data`` holds raw coordinates (N, C=3, T, V=25, M=2) float32 (possibly a read-only
    ``np.memmap``), zero after each sample's valid length. ``streams`` is set instead of (or beside)
    ``data`` only by sources that store ready-made MIB streams (LAST ``.npy``): stream name ->
    (N, 3, T, 25, M) arrays that bypass stream computation.
    """

    names: list[str]
    labels: np.ndarray  # int64 (N,), 0-based
    data: np.ndarray | None  # float32 (N, 3, T, 25, 2)
    lengths: np.ndarray  # int64 (N,), valid frames per sample
    source_hash: str  # fingerprint of the sources (files, sizes, mtimes, parse options)
    streams: dict[str, np.ndarray] | None = None
    excluded_missing: int = 0  # samples dropped because they are on the missing-skeleton list
    malformed: list[str] = field(default_factory=list)  # "file:line: reason" for skipped files

    def __post_init__(self) -> None:
        n = len(self.names)
        if self.labels.shape != (n,) or self.lengths.shape != (n,):
            raise ValueError(f"collection of {n} names has labels {self.labels.shape}, lengths {self.lengths.shape}")
        if self.data is None and not self.streams:
            raise ValueError("a collection needs raw data or ready-made streams")
        for name, arr in ({"data": self.data} | (self.streams or {})).items():
            if arr is not None and (arr.ndim != 5 or arr.shape[0] != n or arr.shape[1] != 3):
                raise ValueError(f"{name} has shape {arr.shape}, expected ({n}, 3, T, 25, M)")

    def __len__(self) -> int:
        return len(self.names)

    def subset(self, indices: np.ndarray) -> SkeletonCollection:
        """A collection of the given rows (arrays are fancy-indexed, i.e. copied)."""
        idx = np.asarray(indices, dtype=np.int64)
        return SkeletonCollection(
            names=[self.names[i] for i in idx],
            labels=self.labels[idx],
            data=None if self.data is None else self.data[idx],
            lengths=self.lengths[idx],
            source_hash=self.source_hash,
            streams=None if self.streams is None else {k: v[idx] for k, v in self.streams.items()},
            excluded_missing=self.excluded_missing,
            malformed=list(self.malformed),
        )
