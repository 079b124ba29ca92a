"""Snapshots: a compacted copy of the store (or of some feature sets) plus a checksum manifest,
for copying features to other hosts (LMDB must not be shared over NFS).

A snapshot directory holds ``data.mdb`` and ``manifest.json`` (sha256 and size of every file,
and per set its metadata and count). :func:`verify_snapshot` checks the files against the
manifest *before* opening them (a corrupted LMDB file must never be traversed), then re-reads
every vector and checks it against its set's shape, the stored count and the manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lmdb
import numpy as np

from lastkd.featurestore import layout
from lastkd.featurestore.env import Databases, open_environment
from lastkd.featurestore.errors import FeatureStoreError, NotAStoreError, SnapshotError
from lastkd.featurestore.metadata import FeatureSetMeta
from lastkd.featurestore.validation import check_set_id

if TYPE_CHECKING:
    from lastkd.featurestore.store import FeatureStore

MANIFEST = "manifest.json"
SNAPSHOT_FORMAT = "lastkd-featurestore-snapshot/1"
_READ_CHUNK = 1 << 20


@dataclass
class SnapshotReport:
    """What a successful verification saw."""

    path: Path
    sets: dict[str, int] = field(default_factory=dict)  # set id -> vectors re-read
    vectors: int = 0
    files: dict[str, int] = field(default_factory=dict)  # file name -> bytes checked

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form for the CLI."""
        return {"path": str(self.path), "ok": True, "sets": self.sets, "vectors": self.vectors, "files": self.files}


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_READ_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def export_snapshot(store: FeatureStore, dest: Path, set_ids: Sequence[str] | None = None) -> Path:
    """Write a snapshot of ``store`` (all sets, or ``set_ids``) into ``dest``; return the manifest.

    The snapshot is built in a temporary sibling directory and renamed into place, so ``dest``
    either holds a complete snapshot or nothing new.
    """
    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise SnapshotError(f"export destination {dest} exists and is not an empty directory")
    if dest.resolve() == store.path.resolve() or store.path.resolve() in dest.resolve().parents:
        raise SnapshotError(f"export destination {dest} lies inside the store {store.path}")
    blocker = next((p for p in dest.parents if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise SnapshotError(f"export destination {dest}: {blocker} is a file, not a directory")
    wanted: list[str] | None = None
    if set_ids is not None:
        if isinstance(set_ids, (str, bytes)):
            raise SnapshotError("set_ids must be a list of feature-set ids, not a single string")
        wanted = sorted({check_set_id(s).decode() for s in set_ids})
        if not wanted:
            raise SnapshotError("set_ids is empty: name at least one feature set, or None for all")
        for set_id in wanted:
            store.get_set(set_id)  # UnknownFeatureSetError names the culprit
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}"
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as exc:
        raise SnapshotError(f"cannot create the export destination {dest}: {exc.strerror or exc}") from None
    try:
        if wanted is None:
            handle = store._h()
            with handle.lock.shared():
                handle.require_env().copy(str(tmp), compact=True)
        else:
            _rewrite_sets(store, tmp, wanted)
        manifest = _build_manifest(tmp, source=store.path)
        _write_json(tmp / MANIFEST, manifest)
        _fsync_dir(tmp)
        if dest.exists():
            dest.rmdir()
        os.rename(tmp, dest)
        _fsync_dir(dest.parent)
    except (lmdb.Error, OSError) as exc:  # disk full, permissions: nothing of it is left behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise SnapshotError(f"export of {store.path} to {dest} failed: {exc}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest / MANIFEST


def _rewrite_sets(store: FeatureStore, out_dir: Path, set_ids: list[str]) -> None:
    """Copy the chosen sets, from one read transaction, into a fresh store in ``out_dir``."""
    handle = store._h()
    with handle.read_txn() as rtxn:
        used = (handle.require_env().info()["last_pgno"] + 1) * handle.require_env().stat()["psize"]
        out_env, out_dbs = open_environment(out_dir, writable=True, map_size=int(used * 1.25) + (8 << 20), sync=False)
        try:
            with out_env.begin(write=True) as wtxn:
                # Sorted set keys give globally sorted prefixed keys (NUL sorts first), so every
                # table can be appended in order, which also packs its pages full.
                for name in (layout.DB_SETS, layout.DB_COUNTS):
                    for set_id in set_ids:
                        key = set_id.encode()
                        wtxn.put(key, rtxn.get(key, db=handle.dbs[name]), db=out_dbs[name])
                for name in (layout.DB_VECTORS, layout.DB_SHA, layout.DB_CLIP_SHA, layout.DB_CLIP_INFO):
                    if name not in handle.dbs:  # an optional table the source store predates
                        continue
                    out_cursor = wtxn.cursor(db=out_dbs[name])
                    for set_id in set_ids:
                        out_cursor.putmulti(_prefixed_items(rtxn, handle.dbs[name], set_id), append=True)
            out_env.sync(True)
        finally:
            out_env.close()


def _prefixed_items(txn: lmdb.Transaction, db: lmdb._Database, set_id: str) -> Iterator[tuple[bytes, bytes]]:
    pre = layout.prefix(set_id.encode())
    cursor = txn.cursor(db=db)
    if not cursor.set_range(pre):
        return
    for key, value in cursor:
        if not bytes(key).startswith(pre):
            return
        yield bytes(key), bytes(value)


def _read_sets(data_dir: Path) -> tuple[lmdb.Environment, Databases]:
    # lock=False: a snapshot is immutable and may live on read-only media; no lock file.
    return open_environment(data_dir, writable=False, map_size=1 << 20, lock=False)


def _build_manifest(snapshot_dir: Path, source: Path) -> dict[str, Any]:
    env, dbs = _read_sets(snapshot_dir)
    try:
        with env.begin() as txn:
            sets = {
                bytes(key).decode(): FeatureSetMeta.from_stored(
                    raw, layout.unpack_count(txn.get(key, db=dbs[layout.DB_COUNTS]))
                ).to_dict()
                for key, raw in txn.cursor(db=dbs[layout.DB_SETS])
            }
    finally:
        env.close()
    for meta in sets.values():
        meta.pop("set_id")
    data = snapshot_dir / layout.DATA_FILE
    return {
        "format": SNAPSHOT_FORMAT,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "source": str(source),
        "files": {layout.DATA_FILE: {"bytes": data.stat().st_size, "sha256": file_sha256(data)}},
        "sets": sets,
        "vectors": sum(meta["count"] for meta in sets.values()),
    }


def _write_json(path: Path, value: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(value, fh, indent=2, sort_keys=True)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_manifest(snapshot_dir: Path) -> dict[str, Any]:
    """Read and structurally check a snapshot manifest."""
    snapshot_dir = Path(snapshot_dir)
    if not snapshot_dir.exists():
        raise SnapshotError(f"snapshot {snapshot_dir} does not exist")
    if not snapshot_dir.is_dir():
        raise SnapshotError(f"snapshot {snapshot_dir} is not a directory")
    path = snapshot_dir / MANIFEST
    if not path.is_file():
        raise SnapshotError(f"snapshot {snapshot_dir} has no {MANIFEST}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SnapshotError(f"{path} is not valid JSON: {exc}") from None
    except OSError as exc:
        raise SnapshotError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != SNAPSHOT_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise SnapshotError(f"{path} is not a lastkd snapshot manifest (format {found!r})")
    files, sets = manifest.get("files"), manifest.get("sets")
    if not isinstance(files, dict) or layout.DATA_FILE not in files:
        raise SnapshotError(f"{path}: 'files' must list {layout.DATA_FILE}")
    for name, entry in files.items():
        if not isinstance(name, str) or name != os.path.basename(name) or name in ("", ".", ".."):
            raise SnapshotError(f"{path}: file entry {name!r} is not a plain file name")
        if not (
            isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and isinstance(entry.get("bytes"), int)
        ):
            raise SnapshotError(f"{path}: file entry {name!r} needs 'sha256' and 'bytes'")
    if not isinstance(sets, dict) or not all(
        isinstance(v, dict) and isinstance(v.get("count"), int) for v in sets.values()
    ):
        raise SnapshotError(f"{path}: 'sets' must map set ids to metadata with a 'count'")
    return manifest


def verify_snapshot(snapshot_dir: str | os.PathLike[str]) -> SnapshotReport:
    """Verify a snapshot; raise :class:`SnapshotError` naming every problem found.

    Checks: every manifest file exists with the recorded size and sha256 (tampering, truncation);
    then, only if those pass, every set's metadata against the manifest, and every vector re-read:
    byte length = dim x itemsize, finite values, number of vectors = stored count = manifest
    count; every dedupe-index entry points at a stored clip.
    """
    snapshot_dir = Path(snapshot_dir)
    manifest = load_manifest(snapshot_dir)
    report = SnapshotReport(path=snapshot_dir)
    problems: list[str] = []
    for name, entry in manifest["files"].items():
        path = snapshot_dir / name
        if not path.is_file():
            problems.append(f"{name}: missing")
            continue
        size = path.stat().st_size
        if size != entry["bytes"]:
            problems.append(f"{name}: {size} bytes, manifest says {entry['bytes']} (truncated or modified)")
            continue
        try:
            digest = file_sha256(path)
        except OSError as exc:
            problems.append(f"{name}: cannot be read ({exc.strerror or exc})")
            continue
        if digest != entry["sha256"].lower():
            problems.append(
                f"{name}: sha256 {digest[:16]}... does not match the manifest's {entry['sha256'][:16]}... "
                "(the file was modified or corrupted)"
            )
        report.files[name] = size
    if problems:
        _fail(snapshot_dir, problems)
    try:
        env, dbs = _read_sets(snapshot_dir)
    except NotAStoreError as exc:
        _fail(snapshot_dir, [str(exc)])
    try:
        with env.begin(buffers=True) as txn:
            problems += _verify_contents(txn, dbs, manifest["sets"], report)
    except (lmdb.Error, FeatureStoreError) as exc:
        problems.append(f"reading the snapshot failed: {exc}")
    finally:
        env.close()
    if problems:
        _fail(snapshot_dir, problems)
    return report


def _verify_contents(
    txn: lmdb.Transaction, dbs: Databases, expected: dict[str, Any], report: SnapshotReport
) -> list[str]:
    problems: list[str] = []
    stored = {bytes(k).decode(): bytes(v) for k, v in txn.cursor(db=dbs[layout.DB_SETS])}
    for set_id in sorted(set(expected) - set(stored)):
        problems.append(f"set {set_id}: in the manifest but not in the data")
    for set_id in sorted(set(stored) - set(expected)):
        problems.append(f"set {set_id}: in the data but not in the manifest")
    for set_id in sorted(set(stored) & set(expected)):
        set_key = set_id.encode()
        count = layout.unpack_count(txn.get(set_key, db=dbs[layout.DB_COUNTS]))
        meta = FeatureSetMeta.from_stored(stored[set_id], count)
        want = expected[set_id]
        for name in ("dim", "dtype", "teacher", "weights_sha256", "preprocessing"):
            if want.get(name) != getattr(meta, name):
                problems.append(f"set {set_id}: {name} is {getattr(meta, name)!r}, manifest says {want.get(name)!r}")
        seen, bad = _reread_vectors(txn, dbs[layout.DB_VECTORS], set_key, meta)
        problems += [f"set {set_id}: {p}" for p in bad]
        if seen != count:
            problems.append(f"set {set_id}: {seen} vectors stored but the count record says {count}")
        if seen != want["count"]:
            problems.append(f"set {set_id}: {seen} vectors stored but the manifest says {want['count']}")
        problems += [f"set {set_id}: {p}" for p in _check_sha_index(txn, dbs, set_key)]
        report.sets[set_id] = seen
        report.vectors += seen
    return problems


def _reread_vectors(
    txn: lmdb.Transaction, db: lmdb._Database, set_key: bytes, meta: FeatureSetMeta
) -> tuple[int, list[str]]:
    pre = layout.prefix(set_key)
    cursor = txn.cursor(db=db)
    seen, bad = 0, []
    if cursor.set_range(pre):
        for key, value in cursor:
            if not bytes(key[: len(pre)]) == pre:
                break
            seen += 1
            clip = bytes(key[len(pre) :]).decode("utf-8", "replace")
            if len(value) != meta.row_bytes:
                bad.append(f"vector {clip!r} has {len(value)} bytes, expected {meta.row_bytes}")
            elif not np.isfinite(np.frombuffer(value, dtype=meta.np_dtype)).all():
                bad.append(f"vector {clip!r} holds NaN or Inf")
            if len(bad) >= 20:
                bad.append("(further problems not listed)")
                break
    return seen, bad


def _check_sha_index(txn: lmdb.Transaction, dbs: Databases, set_key: bytes) -> list[str]:
    pre = layout.prefix(set_key)
    cursor = txn.cursor(db=dbs[layout.DB_SHA])
    problems: list[str] = []
    if cursor.set_range(pre):
        for key, clip in cursor:
            if not bytes(key[: len(pre)]) == pre:
                break
            if txn.get(pre + bytes(clip), db=dbs[layout.DB_VECTORS]) is None:
                problems.append(f"dedupe entry {bytes(key[len(pre) :]).decode()[:16]}... points at missing clip")
    return problems


def _fail(snapshot_dir: Path, problems: list[str]) -> None:
    raise SnapshotError(f"snapshot {snapshot_dir} failed verification:\n" + "\n".join(f"  - {p}" for p in problems))
