"""One-time parse cache for raw NTU ``.skeleton`` folders.

Parsing tens of thousands of text files takes minutes; training reads the result many times. The
first load parses the folder into memory-mappable ``.npy`` arrays plus a JSON index (names,
labels, lengths, malformed files, missing-list exclusions) under
``<cache_dir or folder/.lastkd_cache>/<fingerprint>/``. Later loads map those arrays and never
touch the text again.

The fingerprint covers every source file (name, size, mtime), the body-assignment mode, the
dataset, the missing-skeleton list, the split (rows are stored training side first, so each side is
one contiguous memory-mapped slice) and the cache format version, so any change to the sources
gives a new cache. It doubles as the collection's ``source_hash`` (data lineage). A cache is
written into a temporary folder and renamed into place, so a crash never leaves a half cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path

import numpy as np

from lastkd.datapaths import confine
from lastkd.ntu.skeleton import NUM_JOINTS, NUM_SLOTS, BodyAssignment, read_missing_list
from lastkd.student.data.collection import SkeletonCollection
from lastkd.student.data.readers import DataRoots, DataSourceError, list_skeleton_files, open_npy, read_ntu_folder

log = logging.getLogger(__name__)

CACHE_VERSION = 1  # bump when parsing or the cache layout changes: old caches are then ignored
CACHE_FOLDER = ".lastkd_cache"
STALE_TMP_SECONDS = 24 * 3600
CACHE_FILES = ("index.json", "data.npy", "labels.npy", "lengths.npy")


def fingerprint(
    files: list[Path], *, body_assignment: str, dataset: str, missing: frozenset[str], split: str | None = None
) -> str:
    """sha256 over the source files' names, sizes and mtimes plus every parse option."""
    h = hashlib.sha256()
    options = {"v": CACHE_VERSION, "mode": body_assignment, "dataset": dataset, "split": split}
    h.update(json.dumps(options, sort_keys=True).encode())
    h.update(hashlib.sha256("\n".join(sorted(missing)).encode()).digest())
    for path in files:
        st = path.stat()
        h.update(f"{path.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def cache_root(folder: Path, cache_dir: Path | None) -> Path:
    """Where caches for ``folder`` live: ``cache_dir`` if configured, else inside the folder."""
    return cache_dir if cache_dir is not None else folder / CACHE_FOLDER


def _load(target: Path, fp: str) -> SkeletonCollection | None:
    """The cached collection, or None when the cache is absent, foreign or damaged."""
    index_path = target / "index.json"
    if not index_path.is_file():
        return None
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        if index.get("version") != CACHE_VERSION or index.get("fingerprint") != fp:
            return None
        n = int(index["n"])
        names = list(index["names"])
        data = open_npy(target / "data.npy", "cached coordinates")
        labels = np.load(target / "labels.npy", allow_pickle=False)
        lengths = np.load(target / "lengths.npy", allow_pickle=False)
        if (
            len(names) != n
            or data.ndim != 5
            or data.shape[0] < n
            or data.shape[1:2] + data.shape[3:] != (3, NUM_JOINTS, NUM_SLOTS)
            or data.dtype != np.float32
        ):
            return None
        return SkeletonCollection(
            names=names,
            labels=labels.astype(np.int64),
            data=data[:n],
            lengths=lengths.astype(np.int64),
            source_hash=fp,
            excluded_missing=int(index["excluded_missing"]),
            malformed=list(index["malformed"]),
        )
    except (OSError, ValueError, KeyError, TypeError, DataSourceError) as exc:
        log.warning("parse cache %s is damaged (%s); rebuilding it", target, exc)
        return None


def _clean_stale(root: Path) -> None:
    now = time.time()
    for entry in root.glob(".tmp-*"):
        try:
            if now - entry.stat().st_mtime > STALE_TMP_SECONDS:
                shutil.rmtree(entry, ignore_errors=True)
        except OSError:
            pass


def _write(tmp: Path, folder: Path, fp: str, coll_kwargs: dict) -> SkeletonCollection:
    """Parse into ``tmp`` (data memmap filled as files are parsed), then write the index."""
    data_path = tmp / "data.npy"

    def allocate(n: int, frames: int) -> np.ndarray:
        return np.lib.format.open_memmap(
            data_path, mode="w+", dtype=np.float32, shape=(n, 3, frames, NUM_JOINTS, NUM_SLOTS)
        )

    coll = read_ntu_folder(folder, allocate=allocate, source_hash=fp, **coll_kwargs)
    if isinstance(coll.data, np.memmap):
        coll.data.flush()
    np.save(tmp / "labels.npy", coll.labels)
    np.save(tmp / "lengths.npy", coll.lengths)
    index = {
        "version": CACHE_VERSION,
        "fingerprint": fp,
        "folder": str(folder),
        "n": len(coll),
        "names": coll.names,
        "excluded_missing": coll.excluded_missing,
        "malformed": coll.malformed,
        "options": {k: v for k, v in coll_kwargs.items() if k in ("body_assignment", "dataset", "split")},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    # index.json is written last: its presence marks a complete cache even inside tmp
    (tmp / "index.json").write_text(json.dumps(index), encoding="utf-8")
    return coll


def load_ntu_folder(
    folder: Path,
    *,
    body_assignment: BodyAssignment = "tracked",
    dataset: str = "ntu60",
    missing_path: Path | None = None,
    cache_dir: Path | None = None,
    workers: int = 1,
    split: str | None = None,
    roots: DataRoots = None,
) -> SkeletonCollection:
    """The whole raw folder as a collection, from the parse cache when it is current.

    With ``split`` the rows are ordered training side first (see :func:`read_ntu_folder`), so that
    each side is a contiguous slice of the memory-mapped array; the split is part of the key.

    Builds the cache on first use (or after any source file changed). When the cache location is
    not writable the folder is parsed in memory and a warning is logged.

    With ``roots`` every source file and every cache file read must resolve inside them
    (:class:`~lastkd.datapaths.DataPathError` names the file): a cache folder or cache file that
    is a symlink out of the roots is refused, not read.
    """
    folder = Path(folder)
    files = list_skeleton_files(folder, roots)
    if not files:
        raise DataSourceError(f"{folder}: no .skeleton files")
    missing = read_missing_list(missing_path) if missing_path is not None else frozenset()
    fp = fingerprint(files, body_assignment=body_assignment, dataset=dataset, missing=missing, split=split)
    root = cache_root(folder, cache_dir)
    target = root / fp[:24]
    if roots is not None:
        for item in (root, target, *(target / name for name in CACHE_FILES)):
            confine(item, roots, field="data.cache_dir")
    cached = _load(target, fp)
    if cached is not None:
        return cached
    kwargs = {
        "body_assignment": body_assignment,
        "dataset": dataset,
        "missing": missing,
        "workers": workers,
        "split": split,
        "roots": roots,
    }
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".tmp-{fp[:24]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
    except OSError as exc:
        log.warning("cannot write the parse cache under %s (%s); parsing %s in memory", root, exc, folder)
        return read_ntu_folder(folder, source_hash=fp, **kwargs)  # type: ignore[arg-type]  # kwargs: the caller's own typed options
    try:
        _clean_stale(root)
        _write(tmp, folder, fp, kwargs)
        if target.exists():  # a damaged or concurrently built cache: move it aside first
            aside = root / f".tmp-old-{uuid.uuid4().hex[:8]}"
            try:
                os.rename(target, aside)
                shutil.rmtree(aside, ignore_errors=True)
            except OSError:
                pass
        try:
            os.rename(tmp, target)
        except OSError:
            # another process renamed its (identical) cache into place first; use that one
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    loaded = _load(target, fp)
    if loaded is None:
        raise DataSourceError(f"{target}: parse cache unreadable right after it was written")
    return loaded
