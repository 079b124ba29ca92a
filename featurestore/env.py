"""One LMDB environment per store directory per process, shared, fork-aware.

LMDB forbids opening the same environment twice in one process (py-lmdb refuses it), yet one
process may well hold a writer and several readers of the same store (the embedded stack, the
tests). So every :class:`FeatureStore` on a directory shares one :class:`EnvHandle`, opened in
the strongest mode any of them asked for.

An environment must never be used across ``fork()``. The handle registry remembers the pid it
belongs to; a child finds the pid changed, closes its inherited copies (safe: LMDB's close only
clears reader slots owned by the calling pid) and opens its own. An at-fork hook holds every
handle exclusively while the process forks, so no read transaction of the parent is live in the
child's copy of memory, whose abort would otherwise free the parent's reader slot.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import lmdb

from lastkd.featurestore import layout
from lastkd.featurestore.errors import FeatureStoreError, NotAStoreError

# The named databases of a store, by name (layout.DB_*); lmdb calls their handle type _Database.
Databases = dict[bytes, lmdb._Database]


class RWLock:
    """Many holders of ``shared`` (transactions) or one of ``exclusive`` (remap, reopen, close).

    Readers never wait for a waiting writer, so a thread may nest shared sections safely.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._shared = 0
        self._exclusive = False

    @contextmanager
    def shared(self) -> Iterator[None]:
        """Hold the lock shared for the block (many holders at once; waits out an exclusive one)."""
        with self._cond:
            while self._exclusive:
                self._cond.wait()
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                if not self._shared:
                    self._cond.notify_all()

    def acquire_exclusive(self) -> None:
        """Wait until nobody holds the lock, then hold it alone."""
        with self._cond:
            while self._exclusive or self._shared:
                self._cond.wait()
            self._exclusive = True

    def release_exclusive(self) -> None:
        """Give up the exclusive hold and wake every waiter."""
        with self._cond:
            self._exclusive = False
            self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the lock alone for the block."""
        self.acquire_exclusive()
        try:
            yield
        finally:
            self.release_exclusive()


def open_environment(
    path: Path, *, writable: bool, map_size: int, sync: bool = True, lock: bool = True
) -> tuple[lmdb.Environment, Databases]:
    """Open (or, when writable, create) a store's LMDB environment and its named databases.

    Raises :class:`NotAStoreError` for anything that is not a lastkd feature store.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotAStoreError(f"{path} is a file, not a feature store directory")
    data = path / layout.DATA_FILE
    if not writable and not data.is_file():
        raise NotAStoreError(f"no feature store at {path} (missing {layout.DATA_FILE})")
    if writable and path.is_dir() and not data.exists() and any(p.name != layout.LOCK_FILE for p in path.iterdir()):
        raise NotAStoreError(
            f"{path} is a non-empty directory without {layout.DATA_FILE}: refusing to create a "
            "feature store among other files"
        )
    if writable:
        path.mkdir(parents=True, exist_ok=True)
    try:
        env = lmdb.open(
            str(path),
            map_size=map_size,
            subdir=True,
            readonly=not writable,
            create=writable,
            lock=lock,
            max_dbs=layout.MAX_DBS,
            max_readers=layout.MAX_READERS,
            # A committed batch must survive a crash of the process and of the machine: fsync
            # data and meta pages on every commit (batches amortise the cost).
            sync=sync,
            metasync=sync,
        )
    except (lmdb.InvalidError, lmdb.VersionMismatchError, lmdb.CorruptedError) as exc:
        raise NotAStoreError(f"{path} is not a valid LMDB feature store: {exc}") from None
    except lmdb.Error as exc:
        raise FeatureStoreError(f"cannot open feature store {path}: {exc}") from None
    try:
        dbs = _open_layout(env, path, writable)
        if writable and lock:
            env.reader_check()  # free reader slots of processes that died (kill -9)
    except BaseException:
        env.close()
        raise
    return env, dbs


def _open_layout(env: lmdb.Environment, path: Path, writable: bool) -> Databases:
    try:
        with env.begin(write=writable) as txn:
            for key, _ in txn.cursor():
                if key not in layout.ALL_DBS:
                    raise NotAStoreError(
                        f"{path} is an LMDB environment but not a lastkd feature store "
                        f"(it holds a foreign key {bytes(key)[:40]!r})"
                    )
            if writable:
                dbs = {name: env.open_db(name, txn=txn, create=True) for name in layout.ALL_DBS}
                if txn.get(layout.FORMAT_KEY, db=dbs[layout.DB_INFO]) is None:
                    txn.put(layout.FORMAT_KEY, layout.FORMAT, db=dbs[layout.DB_INFO])
        if not writable:
            # Handles opened inside a read transaction die with it: let py-lmdb open them.
            dbs = {}
            for name in layout.ALL_DBS:
                try:
                    dbs[name] = env.open_db(name, create=False)
                except lmdb.NotFoundError:
                    if name not in layout.OPTIONAL_DBS:
                        raise
        with env.begin() as txn:
            marker = txn.get(layout.FORMAT_KEY, db=dbs[layout.DB_INFO])
        if marker != layout.FORMAT:
            raise NotAStoreError(f"{path} is not a lastkd feature store of a known format (marker {marker!r})")
    except lmdb.NotFoundError:
        raise NotAStoreError(f"{path} is an LMDB environment but not a lastkd feature store") from None
    except lmdb.IncompatibleError:
        raise NotAStoreError(f"{path} is an LMDB environment with an incompatible layout") from None
    except lmdb.Error as exc:
        raise NotAStoreError(f"{path} cannot be read as a feature store: {exc}") from None
    return dbs


class EnvHandle:
    """An open environment shared by the stores of one process; see the module docstring."""

    def __init__(self, path: Path, key: str) -> None:
        self.path = path
        self.key = key
        self.pid = os.getpid()
        self.env: lmdb.Environment | None = None
        self.dbs: Databases = {}
        self.writable = False
        self.sync = True
        self.lock = RWLock()
        self.refs = 0

    def open(self, *, writable: bool, map_size: int, sync: bool) -> None:
        """(Re)open in the given mode; the caller holds the registry lock."""
        old = self.env
        if old is not None:
            with self.lock.exclusive():
                previous = (self.writable, self.map_size, self.sync)
                old.close()
                self.env = None
                try:
                    self.env, self.dbs = open_environment(self.path, writable=writable, map_size=map_size, sync=sync)
                except BaseException:
                    self.env, self.dbs = open_environment(
                        self.path, writable=previous[0], map_size=previous[1], sync=previous[2]
                    )
                    raise
        else:
            self.env, self.dbs = open_environment(self.path, writable=writable, map_size=map_size, sync=sync)
        self.writable, self.sync = writable, sync

    @property
    def map_size(self) -> int:
        """The current size of the memory map, in bytes."""
        return int(self.env.info()["map_size"]) if self.env is not None else 0

    def require_env(self) -> lmdb.Environment:
        """The open environment (FeatureStoreError once closed)."""
        if self.env is None:
            raise FeatureStoreError(f"feature store {self.path} is closed")
        return self.env

    @contextmanager
    def read_txn(self, db: bytes | None = None, *, buffers: bool = False) -> Iterator[lmdb.Transaction]:
        """A read transaction; follows a map grown by another process (MDB_MAP_RESIZED)."""
        for attempt in range(2):
            with self.lock.shared():
                env = self.require_env()
                try:
                    handle = self.dbs[db] if db else None
                    # Two calls, not buffers=buffers: lmdb's type stubs overload on the literal.
                    txn = env.begin(db=handle, buffers=True) if buffers else env.begin(db=handle)
                except lmdb.MapResizedError:
                    if attempt:
                        raise FeatureStoreError(f"feature store {self.path}: map keeps being resized") from None
                else:
                    try:
                        yield txn
                    finally:
                        txn.abort()
                    return
            with self.lock.exclusive():
                self.require_env().set_mapsize(0)  # 0 = adopt the size the writer recorded

    @contextmanager
    def write_txn(self) -> Iterator[lmdb.Transaction[bytes]]:
        """A write transaction: committed when the block ends normally, aborted on any error."""
        with self.lock.shared():
            with self.require_env().begin(write=True) as txn:
                yield txn

    def grow(self, cap: int) -> bool:
        """Double the map (up to ``cap`` bytes); False when it is already at the cap."""
        with self.lock.exclusive():
            env = self.require_env()
            current = int(env.info()["map_size"])
            if current >= cap:
                return False
            env.set_mapsize(min(cap, current * 2))
            return True

    def close(self) -> None:
        """Close the environment (waits for running transactions of this process)."""
        with self.lock.exclusive():
            if self.env is not None:
                self.env.close()
                self.env = None


_registry: dict[str, EnvHandle] = {}
_registry_lock = threading.Lock()
_registry_pid = os.getpid()


def _forget_inherited() -> None:
    """In a forked child: close the parent's environments and start an empty registry."""
    global _registry_pid
    pid = os.getpid()
    if pid == _registry_pid:
        return
    for handle in _registry.values():
        if handle.env is not None:
            handle.env.close()  # touches only this pid's reader slots and mappings
            handle.env = None
    _registry.clear()
    _registry_pid = pid


def acquire(path: Path, *, writable: bool, map_size: int, sync: bool = True) -> EnvHandle:
    """The shared handle of ``path`` in this process, opened at least as ``writable`` asks."""
    key = os.path.realpath(path)
    with _registry_lock:
        _forget_inherited()
        handle = _registry.get(key)
        if handle is None:
            handle = EnvHandle(Path(path), key)
            handle.open(writable=writable, map_size=map_size, sync=sync)
            _registry[key] = handle
        elif writable and not handle.writable:
            handle.open(writable=True, map_size=max(map_size, handle.map_size), sync=sync)
        elif writable and map_size > handle.map_size:
            with handle.lock.exclusive():
                handle.require_env().set_mapsize(map_size)
        handle.refs += 1
        return handle


def release(handle: EnvHandle) -> None:
    """Drop one reference; the last one closes the environment."""
    with _registry_lock:
        if handle.pid != os.getpid():
            return  # inherited: already abandoned by _forget_inherited
        handle.refs -= 1
        if handle.refs <= 0:
            handle.close()
            if _registry.get(handle.key) is handle:
                del _registry[handle.key]


def _before_fork() -> None:
    _registry_lock.acquire()
    for handle in _registry.values():
        handle.lock.acquire_exclusive()


def _after_fork_in_parent() -> None:
    for handle in _registry.values():
        handle.lock.release_exclusive()
    _registry_lock.release()


def _after_fork_in_child() -> None:
    global _registry_lock
    for handle in _registry.values():
        handle.lock = RWLock()
    _registry_lock = threading.Lock()


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child)
