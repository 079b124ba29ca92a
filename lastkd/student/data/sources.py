"""One entry point from a :class:`DataConfig` to the (train, val) skeleton collections.

Picks the reader for ``cfg.format``, applies the split (raw folders: from sample names; the other
formats carry their split), drops samples on the missing-skeleton list and caps each side at
``cfg.max_samples``. Paths are confined to the operator's data roots when they are given (the one
rule, :func:`lastkd.datapaths.confine`, applied to every file read); pickle formats are refused
without them.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import overload

import numpy as np

from lastkd.datapaths import confine
from lastkd.ntu.skeleton import parse_sample_name, read_missing_list
from lastkd.ntu.splits import is_train
from lastkd.student.data.cache import load_ntu_folder
from lastkd.student.data.collection import SkeletonCollection
from lastkd.student.data.config import DataConfig
from lastkd.student.data.readers import (
    DataRoots,
    DataSourceError,
    read_ctrgcn_npz,
    read_last_npy,
    read_pyskl,
)

MAX_PARSE_WORKERS = 8


def _rows(coll: SkeletonCollection, start: int, stop: int) -> SkeletonCollection:
    """Rows start..stop as views (no copy of a memory-mapped array)."""
    return SkeletonCollection(
        names=coll.names[start:stop],
        labels=coll.labels[start:stop],
        data=None if coll.data is None else coll.data[start:stop],
        lengths=coll.lengths[start:stop],
        source_hash=coll.source_hash,
        streams=None if coll.streams is None else {k: v[start:stop] for k, v in coll.streams.items()},
        excluded_missing=coll.excluded_missing,
        malformed=list(coll.malformed),
    )


def cap_samples(coll: SkeletonCollection, limit: int | None) -> SkeletonCollection:
    """At most ``limit`` samples, taken round-robin over classes (so small caps keep every class),
    in their original order."""
    if limit is None or len(coll) <= limit:
        return coll
    labels = coll.labels
    rank = np.zeros(len(labels), dtype=np.int64)  # position of each sample within its class
    seen: dict[int, int] = {}
    for i, label in enumerate(labels.tolist()):
        rank[i] = seen.get(label, 0)
        seen[label] = rank[i] + 1
    chosen = np.sort(np.lexsort((np.arange(len(labels)), rank))[:limit])
    if chosen[-1] == len(chosen) - 1:  # a leading block: keep views
        return _rows(coll, 0, len(chosen))
    return coll.subset(chosen)


def _files_hash(paths: Sequence[Path], options: dict) -> str:
    h = hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode())
    for path in paths:
        st = path.stat()
        h.update(f"{path.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _split_raw(full: SkeletonCollection, split: str, where: Path) -> tuple[SkeletonCollection, SkeletonCollection]:
    flags = [is_train(parse_sample_name(n), split) for n in full.names]
    n_train = sum(flags)
    if flags != [True] * n_train + [False] * (len(flags) - n_train):
        raise DataSourceError(f"{where}: parse cache rows are not ordered by split; delete the cache folder")
    return _rows(full, 0, n_train), _rows(full, n_train, len(full))


def load_splits(
    cfg: DataConfig, data_roots: DataRoots = None, *, workers: int | None = None
) -> tuple[SkeletonCollection, SkeletonCollection]:
    """(train, val) collections for ``cfg``, whatever the source format.

    ``data_roots`` are the configured data roots. When given, every path named by ``cfg`` and
    every file read (each ``.skeleton`` of a folder, the parse cache, each array and pickle) must
    resolve inside them (:class:`~lastkd.datapaths.DataPathError` naming the field and file);
    pickle sources (PYSKL, LAST labels) are refused without them. ``workers`` parse raw
    folders in parallel (default: up to 8 processes, used only for big folders).

    Raw folders: both sides are slices of one memory-mapped parse cache, and both carry the
    folder-wide ``malformed`` list and ``excluded_missing`` count. The npz and PYSKL/LAST formats
    define the split themselves (``cfg.split`` picks the PYSKL split key / LAST sub-folder).
    """
    roots = None if data_roots is None else [Path(r) for r in data_roots]
    if roots is not None and not roots:
        raise DataSourceError("no data roots configured: set LASTKD_DATA_ROOTS")

    @overload
    def real(value: Path, field: str, must_exist: bool = True) -> Path: ...
    @overload
    def real(value: Path | None, field: str, must_exist: bool = True) -> Path | None: ...
    def real(value: Path | None, field: str, must_exist: bool = True) -> Path | None:
        if value is None or roots is None:
            return value
        return confine(value, roots, field=field, must_exist=must_exist)

    path = real(cfg.path, "data.path")
    label_dir = real(cfg.label_path, "data.label_path")
    missing_path = real(cfg.missing_skeletons, "data.missing_skeletons")
    cache_dir = real(cfg.cache_dir, "data.cache_dir", must_exist=False)
    missing = read_missing_list(missing_path) if missing_path else frozenset()
    options = {"format": cfg.format, "dataset": cfg.dataset, "split": cfg.split, "missing": sorted(missing)}
    if cfg.format == "ntu_raw":
        full = load_ntu_folder(
            Path(path),
            body_assignment="reference" if cfg.streams_mode == "reference" else "tracked",
            dataset=cfg.dataset,
            missing_path=missing_path,
            cache_dir=cache_dir,
            workers=workers if workers is not None else min(MAX_PARSE_WORKERS, os.cpu_count() or 1),
            split=cfg.split,
            roots=roots,
        )
        train, val = _split_raw(full, cfg.split, Path(path))
    elif cfg.format == "ctrgcn_npz":
        train, val = read_ctrgcn_npz(Path(path), dataset=cfg.dataset, source_hash=_files_hash([Path(path)], options))
    elif cfg.format == "pyskl":
        if roots is None:
            raise DataSourceError(
                f"{path}: refusing to load a PYSKL pickle without configured data roots (pickles run code when loaded)"
            )
        train, val = read_pyskl(
            Path(path),
            split=cfg.split,
            dataset=cfg.dataset,
            missing=missing,
            roots=roots,
            source_hash=_files_hash([Path(path)], options),
        )
    elif cfg.format == "last_npy":
        root = Path(path)
        files = sorted(p for pattern in ("*.npy", "*.pkl", "*/*.npy", "*/*.pkl") for p in root.glob(pattern))
        train, val = read_last_npy(
            root,
            split_type=cfg.split,
            dataset=cfg.dataset,
            label_dir=label_dir,
            missing=missing,
            roots=roots,
            source_hash=_files_hash(files, options),
        )
    else:  # unreachable through a validated DataConfig
        raise DataSourceError(f"unknown data format {cfg.format!r}")
    for side, coll in (("training", train), ("validation", val)):
        if len(coll) == 0:
            raise DataSourceError(f"{path}: split {cfg.split!r} leaves no {side} samples")
    return cap_samples(train, cfg.max_samples), cap_samples(val, cfg.max_samples)
