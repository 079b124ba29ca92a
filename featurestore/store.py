"""The LMDB feature store: feature sets of fixed-size vectors keyed by clip id.

One writer process (the teacher) and any number of reader processes (trainer workers and their
DataLoader workers). Every write is one LMDB transaction: a batch is stored whole or not at all,
with the set's count updated inside the same transaction, so a reader or a crash never sees half
a batch. Readers open the environment lazily, on first use, and reopen after a fork, so a
read-only store can be handed to DataLoader workers (it pickles to its path and options).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar, cast

import lmdb
import numpy as np

from lastkd.featurestore import env as envs
from lastkd.featurestore import layout
from lastkd.featurestore.errors import (
    CorruptStoreError,
    FeatureSetConflictError,
    FeatureStoreError,
    InvalidFeatureError,
    NotAStoreError,
    ReadOnlyStoreError,
    StoreFullError,
    UnknownFeatureSetError,
)
from lastkd.featurestore.metadata import FeatureSetMeta, canonical_json, feature_set_id
from lastkd.featurestore.validation import (
    check_clip_id,
    check_dim,
    check_dtype,
    check_set_id,
    check_sha256,
    check_sha256_batch,
    check_teacher,
    check_vectors,
    check_weights_sha256,
    encode_clip_ids,
)

T = TypeVar("T")
MIN_MAP_SIZE = 256 << 10
ITER_CHUNK = 1024


class FeatureStore:
    """Feature sets in one LMDB directory. See ``docs/architecture.md`` for the contract.

    ``map_size`` is the size of the memory map (the most the store can hold; sparse on disk).
    ``max_map_size``, when larger, lets a full writer double the map up to that cap before
    raising :class:`StoreFullError`. ``sync=False`` skips the fsync per commit: faster, still safe
    against a process crash (kill -9), but a power loss may drop the last commits or worse.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        map_size: int = 64 << 30,
        readonly: bool = False,
        *,
        max_map_size: int | None = None,
        sync: bool = True,
    ) -> None:
        if isinstance(map_size, bool) or not isinstance(map_size, int) or map_size < MIN_MAP_SIZE:
            raise InvalidFeatureError(f"map_size must be an integer >= {MIN_MAP_SIZE} bytes, got {map_size!r}")
        if max_map_size is not None and (not isinstance(max_map_size, int) or max_map_size < map_size):
            raise InvalidFeatureError(f"max_map_size must be >= map_size ({map_size}), got {max_map_size!r}")
        self.path = Path(path)
        self.map_size = map_size
        self.max_map_size = max_map_size
        self.readonly = bool(readonly)
        self.sync = sync
        self._handle: envs.EnvHandle | None = None
        self._pid = 0
        self._meta_cache: dict[bytes, tuple[bytes, FeatureSetMeta]] = {}
        if self.readonly:
            # Cheap checks now so a wrong path fails at construction; the environment itself is
            # opened on first use (possibly in a DataLoader worker, after a fork).
            if self.path.exists() and not self.path.is_dir():
                raise NotAStoreError(f"{self.path} is a file, not a feature store directory")
            if not (self.path / layout.DATA_FILE).is_file():
                raise NotAStoreError(f"no feature store at {self.path} (missing {layout.DATA_FILE})")
        else:
            self._h()  # the writer creates the store now and reports a bad path at once

    # --- environment ------------------------------------------------------------------------
    def _h(self) -> envs.EnvHandle:
        pid = os.getpid()
        if self._handle is None or self._pid != pid:
            # A handle inherited across fork is never used: acquire() closes inherited
            # environments and opens this process's own.
            self._handle = envs.acquire(self.path, writable=not self.readonly, map_size=self.map_size, sync=self.sync)
            self._pid = pid
        return self._handle

    @property
    def opened_pid(self) -> int | None:
        """The pid that opened the environment this store uses now (None: not opened yet)."""
        return self._pid if self._handle is not None else None

    def close(self) -> None:
        """Release the environment (the last store on a directory in a process closes it)."""
        handle, self._handle = self._handle, None
        if handle is not None and self._pid == os.getpid():
            envs.release(handle)

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        # Only the recipe travels (spawned DataLoader workers); never an environment.
        return {k: getattr(self, k) for k in ("path", "map_size", "max_map_size", "readonly", "sync")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._handle, self._pid, self._meta_cache = None, 0, {}

    def __repr__(self) -> str:
        mode = "readonly" if self.readonly else "writer"
        return f"FeatureStore({str(self.path)!r}, {mode})"

    def _require_writable(self) -> None:
        if self.readonly:
            raise ReadOnlyStoreError(f"feature store {self.path} is opened read-only")

    def _write(self, what: str, fn: Callable[[lmdb.Transaction[bytes], envs.EnvHandle], T]) -> T:
        """Run ``fn`` in one write transaction; grow the map or raise StoreFullError when full."""
        self._require_writable()
        while True:
            handle = self._h()
            try:
                with handle.write_txn() as txn:
                    return fn(txn, handle)
            except lmdb.MapFullError:
                if self.max_map_size and handle.grow(self.max_map_size):
                    continue
                size = handle.map_size
                raise StoreFullError(
                    f"feature store {self.path} is full (map size {size} bytes = {size / (1 << 20):.1f} MiB): "
                    f"{what} was not written. Raise the map size (store_map_size), or export and "
                    "delete feature sets."
                ) from None
            except lmdb.Error as exc:
                raise FeatureStoreError(f"feature store {self.path}: {what} failed: {exc}") from None

    def _meta(self, txn: lmdb.Transaction, handle: envs.EnvHandle, set_key: bytes) -> FeatureSetMeta:
        """The metadata of a set (count not filled in), parsed once per stored record."""
        raw = txn.get(set_key, db=handle.dbs[layout.DB_SETS])
        if raw is None:
            raise self._unknown(txn, handle, set_key)
        cached = self._meta_cache.get(set_key)
        if cached is not None and cached[0] == raw:
            return cached[1]
        meta = FeatureSetMeta.from_stored(raw, 0)
        self._meta_cache[set_key] = (bytes(raw), meta)
        return meta

    def _unknown(self, txn: lmdb.Transaction, handle: envs.EnvHandle, set_key: bytes) -> UnknownFeatureSetError:
        known = [bytes(k).decode() for k, _ in txn.cursor(db=handle.dbs[layout.DB_SETS])]
        listing = ", ".join(known[:5]) + (", ..." if len(known) > 5 else "") if known else "none"
        return UnknownFeatureSetError(
            f"unknown feature set {set_key.decode()!r} in {self.path} (known sets: {listing})"
        )

    @staticmethod
    def _count(txn: lmdb.Transaction, handle: envs.EnvHandle, set_key: bytes) -> int:
        return layout.unpack_count(txn.get(set_key, db=handle.dbs[layout.DB_COUNTS]))

    # --- feature sets -----------------------------------------------------------------------
    def create_set(
        self,
        teacher: str,
        weights_sha256: str | None,
        preprocessing: dict[str, Any],
        dim: int,
        dtype: str = "float16",
    ) -> FeatureSetMeta:
        """Create the feature set of this teacher + weights + preprocessing, or return it when it
        exists with the same metadata. Conflicting metadata raises FeatureSetConflictError."""
        teacher = check_teacher(teacher)
        weights = check_weights_sha256(weights_sha256)
        dim, dtype = check_dim(dim), check_dtype(dtype)
        set_id = feature_set_id(teacher, weights, preprocessing)
        wanted = FeatureSetMeta(
            set_id=set_id,
            teacher=teacher,
            weights_sha256=weights,
            preprocessing=_json_copy(preprocessing),
            dim=dim,
            dtype=dtype,
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        set_key = set_id.encode()

        def write(txn: lmdb.Transaction, handle: envs.EnvHandle) -> FeatureSetMeta:
            raw = txn.get(set_key, db=handle.dbs[layout.DB_SETS])
            if raw is None:
                txn.put(set_key, wanted.stored_bytes(), db=handle.dbs[layout.DB_SETS])
                txn.put(set_key, layout.pack_count(0), db=handle.dbs[layout.DB_COUNTS])
                return wanted
            existing = FeatureSetMeta.from_stored(raw, self._count(txn, handle, set_key))
            if existing.identity() != wanted.identity():
                diffs = [
                    f"{name}: stored {getattr(existing, name)!r}, requested {getattr(wanted, name)!r}"
                    for name in ("teacher", "weights_sha256", "preprocessing", "dim", "dtype")
                    if getattr(existing, name) != getattr(wanted, name)
                ]
                raise FeatureSetConflictError(
                    f"feature set {set_id!r} already exists with different metadata ({'; '.join(diffs)})"
                )
            return existing

        return self._write(f"creating feature set {set_id!r}", write)

    def get_set(self, set_id: str) -> FeatureSetMeta:
        """The metadata of one set, with its current count."""
        set_key = check_set_id(set_id)
        handle = self._h()
        with handle.read_txn() as txn:
            meta = self._meta(txn, handle, set_key)
            return dataclasses.replace(meta, count=self._count(txn, handle, set_key))

    def list_sets(self) -> list[FeatureSetMeta]:
        """Every feature set in the store, sorted by id, with counts (one consistent snapshot)."""
        handle = self._h()
        with handle.read_txn() as txn:
            return [
                FeatureSetMeta.from_stored(raw, self._count(txn, handle, bytes(key)))
                for key, raw in txn.cursor(db=handle.dbs[layout.DB_SETS])
            ]

    def delete_set(self, set_id: str) -> int:
        """Delete a set with all its vectors and index entries; returns the vectors deleted."""
        set_key = check_set_id(set_id)
        pre = layout.prefix(set_key)

        def write(txn: lmdb.Transaction[bytes], handle: envs.EnvHandle) -> int:
            if txn.get(set_key, db=handle.dbs[layout.DB_SETS]) is None:
                raise self._unknown(txn, handle, set_key)
            deleted = 0
            for name in (layout.DB_VECTORS, layout.DB_SHA, layout.DB_CLIP_SHA, layout.DB_CLIP_INFO):
                cursor = txn.cursor(db=handle.dbs[name])
                if not cursor.set_range(pre):
                    continue
                while cursor.key().startswith(pre):
                    deleted += name == layout.DB_VECTORS
                    if not cursor.delete():
                        break
            txn.delete(set_key, db=handle.dbs[layout.DB_SETS])
            txn.delete(set_key, db=handle.dbs[layout.DB_COUNTS])
            return deleted

        deleted = self._write(f"deleting feature set {set_id!r}", write)
        self._meta_cache.pop(set_key, None)
        return deleted

    # --- vectors ----------------------------------------------------------------------------
    def put_many(
        self,
        set_id: str,
        ids: Sequence[str],
        vectors: np.ndarray,
        sha256s: Sequence[str | None] | None = None,
    ) -> int:
        """Store a batch in one transaction, all or nothing; returns how many ids were new.

        Existing ids are overwritten (the count only grows by the new ones). ``sha256s``, aligned
        with ``ids``, feeds the content-hash dedupe index (see :meth:`lookup_sha256`). Any bad
        input (see :mod:`lastkd.featurestore.validation`) rejects the whole batch.
        """
        set_key = check_set_id(set_id)
        pre = layout.prefix(set_key)
        items, full_keys = encode_clip_ids(ids, unique=True, prefix=pre)
        if not items:
            raise InvalidFeatureError("empty batch: put_many needs at least one id and vector")
        shas = check_sha256_batch(sha256s, len(items))

        def write(txn: lmdb.Transaction, handle: envs.EnvHandle) -> int:
            meta = self._meta(txn, handle, set_key)
            arr = check_vectors(vectors, len(items), meta.dim, meta.np_dtype)
            cursor = txn.cursor(db=handle.dbs[layout.DB_VECTORS])
            existing = {bytes(key) for key, _ in cursor.getmulti(full_keys)}
            rb = meta.row_bytes
            flat = memoryview(arr).cast("B")
            cursor.putmulti([(key, flat[i * rb : (i + 1) * rb]) for i, key in enumerate(full_keys)])
            added = len(full_keys) - len(existing)
            counts = handle.dbs[layout.DB_COUNTS]
            txn.put(set_key, layout.pack_count(self._count(txn, handle, set_key) + added), db=counts)
            if shas is not None or existing:
                clip_keys = [key[len(pre) :] for key in full_keys]
                self._index_sha256(txn, handle, pre, clip_keys, shas, existing)
            return added

        return self._write(f"the batch of {len(items)} vectors for {set_id!r}", write)

    def put_if_absent(
        self,
        set_id: str,
        ids: Sequence[str],
        vectors: np.ndarray,
        sha256s: Sequence[str],
        infos: Sequence[Mapping[str, Any] | None] | None = None,
    ) -> list[str]:
        """Store each vector under its id unless the id is taken; decide and write in ONE transaction.

        The check and the write are one decision, so two writers (or two entries of one batch)
        naming the same id for different content can never both be told "stored". Returns, per
        entry in order: ``"added"`` (written now), ``"same"`` (the id already holds a vector of
        the same content digest, here or earlier in this batch: nothing written) or
        ``"conflict"`` (the id holds a vector of other content, or of unknown content: nothing
        written). Ids may repeat inside the batch; the first occurrence decides. Every entry
        needs its content digest. ``infos`` (aligned, optional): JSON facts about how each vector
        was made, stored with an ``"added"`` entry and read back by :meth:`clip_info`. Bad input
        rejects the whole batch.
        """
        set_key = check_set_id(set_id)
        pre = layout.prefix(set_key)
        items, full_keys = encode_clip_ids(ids, unique=False, prefix=pre)
        if not items:
            raise InvalidFeatureError("empty batch: put_if_absent needs at least one id and vector")
        shas = check_sha256_batch(sha256s, len(items))
        if shas is None or any(s is None for s in shas):
            raise InvalidFeatureError("put_if_absent needs the content sha256 of every entry")
        if infos is not None and len(infos) != len(items):
            raise InvalidFeatureError(f"infos has {len(infos)} entries for {len(items)} ids")
        info_bytes = [None if not info else _info_json(info) for info in (infos or [None] * len(items))]

        def write(txn: lmdb.Transaction, handle: envs.EnvHandle) -> list[str]:
            meta = self._meta(txn, handle, set_key)
            arr = check_vectors(vectors, len(items), meta.dim, meta.np_dtype)
            vecs, fwd, rev = (handle.dbs[n] for n in (layout.DB_VECTORS, layout.DB_SHA, layout.DB_CLIP_SHA))
            rb = meta.row_bytes
            flat = memoryview(arr).cast("B")
            decided: dict[bytes, bytes | None] = {}  # key -> digest it holds after this batch
            outcome: list[str] = []
            for i, key in enumerate(full_keys):
                digest = cast(str, shas[i]).encode()  # every digest was checked present above
                if key not in decided:
                    if txn.get(key, db=vecs) is None:
                        txn.put(key, flat[i * rb : (i + 1) * rb], db=vecs)
                        txn.put(pre + digest, key[len(pre) :], db=fwd, overwrite=False)
                        txn.put(key, digest, db=rev)
                        info = info_bytes[i]
                        if info is not None:
                            txn.put(key, info, db=handle.dbs[layout.DB_CLIP_INFO])
                        decided[key] = digest
                        outcome.append("added")
                        continue
                    held = txn.get(key, db=rev)
                    decided[key] = None if held is None else bytes(held)
                outcome.append("same" if decided[key] == digest else "conflict")
            added = outcome.count("added")
            if added:
                counts = handle.dbs[layout.DB_COUNTS]
                txn.put(set_key, layout.pack_count(self._count(txn, handle, set_key) + added), db=counts)
            return outcome

        return self._write(f"the batch of {len(items)} vectors for {set_id!r}", write)

    def clip_sha256(self, set_id: str, clip_id: str) -> tuple[bool, str | None]:
        """``(present, digest)``: whether the set holds this clip id, and the content sha256 it
        was stored with (None when absent or stored without one)."""
        set_key = check_set_id(set_id)
        key = layout.prefix(set_key) + check_clip_id(clip_id)
        handle = self._h()
        with handle.read_txn() as txn:
            self._meta(txn, handle, set_key)
            if txn.get(key, db=handle.dbs[layout.DB_VECTORS]) is None:
                return False, None
            digest = txn.get(key, db=handle.dbs[layout.DB_CLIP_SHA])
            return True, None if digest is None else bytes(digest).decode("ascii")

    def clip_info(self, set_id: str, clip_id: str) -> dict[str, Any] | None:
        """The facts stored with a clip by :meth:`put_if_absent` (None when absent or none)."""
        set_key = check_set_id(set_id)
        key = layout.prefix(set_key) + check_clip_id(clip_id)
        handle = self._h()
        with handle.read_txn() as txn:
            self._meta(txn, handle, set_key)
            if layout.DB_CLIP_INFO not in handle.dbs:  # a read-only store older than the table
                return None
            raw = txn.get(key, db=handle.dbs[layout.DB_CLIP_INFO])
            return None if raw is None else json.loads(bytes(raw))

    @staticmethod
    def _index_sha256(
        txn: lmdb.Transaction,
        handle: envs.EnvHandle,
        pre: bytes,
        keys: list[bytes],
        shas: list[str | None] | None,
        existing: set[bytes],
    ) -> None:
        """Keep sha256 -> clip id exact: an overwritten clip drops its old digest's entry."""
        fwd, rev = handle.dbs[layout.DB_SHA], handle.dbs[layout.DB_CLIP_SHA]
        for i, key in enumerate(keys):
            clip_key = pre + key
            if clip_key in existing:  # an overwritten vector's facts no longer describe it
                txn.delete(clip_key, db=handle.dbs[layout.DB_CLIP_INFO])
            sha = shas[i] if shas is not None else None
            new = sha.encode() if sha is not None else None
            if clip_key in existing:
                old = txn.get(clip_key, db=rev)
                if old is not None and old != new:
                    if txn.get(pre + old, db=fwd) == key:
                        txn.delete(pre + old, db=fwd)
                    txn.delete(clip_key, db=rev)
            if new is not None:
                txn.put(pre + new, key, db=fwd)
                txn.put(clip_key, new, db=rev)

    def get_many(self, set_id: str, ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Read a batch in one transaction: ``(array (n, dim) in the set dtype, found (n,) bool)``.

        Rows of ids not in the set are zero and ``found`` is False there.
        """
        set_key = check_set_id(set_id)
        _, keys = encode_clip_ids(ids, unique=False, prefix=layout.prefix(set_key))
        handle = self._h()
        with handle.read_txn(layout.DB_VECTORS, buffers=True) as txn:
            meta = self._meta(txn, handle, set_key)
            rb = meta.row_bytes
            out = np.empty((len(keys), meta.dim), dtype=meta.np_dtype)
            flat = out.data.cast("B") if keys else None
            missing: list[int] = []
            get = txn.get
            pos = 0
            for i, key in enumerate(keys):
                value = get(key)
                if value is None:
                    missing.append(i)
                elif len(value) == rb:
                    # One copy, straight from the map into the preallocated row.
                    flat[pos : pos + rb] = value  # type: ignore[index]  # None only when keys is empty
                else:
                    raise CorruptStoreError(
                        f"feature store {self.path}: vector {key[len(set_key) + 1 :].decode()!r} of {set_id!r} has "
                        f"{len(value)} bytes, expected {rb} (dim {meta.dim} {meta.dtype})"
                    )
                pos += rb
        found = np.ones(len(keys), dtype=bool)
        if missing:
            found[missing] = False
            out[missing] = 0
        return out, found

    def get(self, set_id: str, clip_id: str) -> np.ndarray | None:
        """One vector (dim,) in the set dtype, or None when the clip is not in the set."""
        check_clip_id(clip_id)
        arr, found = self.get_many(set_id, [clip_id])
        return arr[0] if found[0] else None

    def contains(self, set_id: str, clip_id: str) -> bool:
        """Whether the set holds a vector for this clip id."""
        set_key = check_set_id(set_id)
        key = layout.prefix(set_key) + check_clip_id(clip_id)
        handle = self._h()
        with handle.read_txn(layout.DB_VECTORS, buffers=True) as txn:
            self._meta(txn, handle, set_key)
            return txn.get(key) is not None

    def count(self, set_id: str) -> int:
        """Number of vectors in the set."""
        set_key = check_set_id(set_id)
        handle = self._h()
        with handle.read_txn() as txn:
            self._meta(txn, handle, set_key)
            return self._count(txn, handle, set_key)

    def iter_ids(self, set_id: str, chunk: int = ITER_CHUNK) -> Iterator[str]:
        """The clip ids of a set in key order. Reads in short transactions of ``chunk`` ids, so a
        slow consumer never pins old pages; ids written meanwhile may or may not appear."""
        set_key = check_set_id(set_id)
        self.get_set(set_id)
        pre = layout.prefix(set_key)
        start = pre
        while True:
            handle = self._h()
            with handle.read_txn(layout.DB_VECTORS) as txn:
                cursor = txn.cursor()
                batch: list[bytes] = []
                if cursor.set_range(start):
                    for key in cursor.iternext(keys=True, values=False):
                        if not key.startswith(pre) or len(batch) >= chunk:
                            break
                        batch.append(key)
            yield from (key[len(pre) :].decode("utf-8") for key in batch)
            if len(batch) < chunk:
                return
            start = batch[-1] + b"\x00"  # the smallest key after the last one seen

    def lookup_sha256(self, set_id: str, sha256: str) -> str | None:
        """The clip id stored for this content digest in the set, or None (dedupe)."""
        set_key = check_set_id(set_id)
        digest = check_sha256(sha256).encode()
        handle = self._h()
        with handle.read_txn() as txn:
            self._meta(txn, handle, set_key)
            clip = txn.get(layout.prefix(set_key) + digest, db=handle.dbs[layout.DB_SHA])
            return None if clip is None else bytes(clip).decode("utf-8")

    # --- whole store ------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Sizes and totals for operators (``lastkd store stats``)."""
        handle = self._h()
        sets = self.list_sets()
        with handle.lock.shared():
            env = handle.require_env()
            info, stat = env.info(), env.stat()
        data = self.path / layout.DATA_FILE
        return {
            "path": str(self.path),
            "map_size": int(info["map_size"]),
            "used_bytes": int((info["last_pgno"] + 1) * stat["psize"]),
            "file_bytes": data.stat().st_size if data.exists() else 0,
            "page_size": int(stat["psize"]),
            "last_txnid": int(info["last_txnid"]),
            "readers": int(info["num_readers"]),
            "max_readers": int(info["max_readers"]),
            "sets": len(sets),
            "vectors": sum(meta.count for meta in sets),
        }

    def export(self, dest_dir: str | os.PathLike[str], set_ids: Sequence[str] | None = None) -> Path:
        """Write a compacted, checksummed snapshot of the store (or of some sets) into
        ``dest_dir`` (new or empty); returns the manifest path. See :mod:`lastkd.featurestore.snapshot`."""
        from lastkd.featurestore.snapshot import export_snapshot

        return export_snapshot(self, Path(dest_dir), set_ids)


def _info_json(info: Mapping[str, Any]) -> bytes:
    try:
        return canonical_json(dict(info)).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise InvalidFeatureError(f"clip info must be JSON data with finite numbers: {exc}") from None


def _json_copy(value: dict[str, Any]) -> dict[str, Any]:
    """A deep, canonical copy of the preprocessing dict (tuples become lists, as in the id)."""
    return json.loads(canonical_json(value))
