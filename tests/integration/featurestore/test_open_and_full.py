"""Opening things that are not a feature store, read-only stores, and a full map."""

from __future__ import annotations

import os
from pathlib import Path

import lmdb
import numpy as np
import pytest

from lastkd.featurestore import (
    FeatureStore,
    InvalidFeatureError,
    NotAStoreError,
    ReadOnlyStoreError,
    StoreFullError,
)


@pytest.mark.parametrize("readonly", [False, True])
def test_plain_file_is_not_a_store(tmp_path: Path, readonly: bool) -> None:
    path = tmp_path / "features.lmdb"
    path.write_bytes(b"hello")
    with pytest.raises(NotAStoreError, match="is a file, not a feature store directory"):
        FeatureStore(path, map_size=1 << 20, readonly=readonly)
    assert path.read_bytes() == b"hello"


@pytest.mark.parametrize("readonly", [False, True])
def test_garbage_data_file_is_not_a_store(tmp_path: Path, readonly: bool) -> None:
    path = tmp_path / "features.lmdb"
    path.mkdir()
    garbage = np.random.default_rng(1).integers(0, 256, 16384, dtype=np.uint8).tobytes()
    (path / "data.mdb").write_bytes(garbage)
    with pytest.raises(NotAStoreError, match="not a valid LMDB feature store"):
        store = FeatureStore(path, map_size=1 << 20, readonly=readonly)
        store.list_sets()  # a reader opens on first use
    assert (path / "data.mdb").read_bytes() == garbage


@pytest.mark.parametrize("readonly", [False, True])
def test_foreign_lmdb_is_not_a_store(tmp_path: Path, readonly: bool) -> None:
    path = tmp_path / "other.lmdb"
    env = lmdb.open(str(path), map_size=1 << 20)
    with env.begin(write=True) as txn:
        txn.put(b"image-0001", b"jpeg bytes")
    env.close()
    with pytest.raises(NotAStoreError, match="not a lastkd feature store"):
        store = FeatureStore(path, map_size=1 << 20, readonly=readonly)
        store.list_sets()
    env = lmdb.open(str(path), readonly=True)
    with env.begin() as txn:
        assert list(txn.cursor()) == [(b"image-0001", b"jpeg bytes")]
    env.close()


def test_writer_refuses_a_directory_of_other_files(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(NotAStoreError, match="non-empty directory without data.mdb"):
        FeatureStore(tmp_path, map_size=1 << 20)
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]


def test_reader_of_a_missing_store(tmp_path: Path) -> None:
    with pytest.raises(NotAStoreError, match="no feature store at .*missing data.mdb"):
        FeatureStore(tmp_path / "nothing-here", readonly=True)
    assert not (tmp_path / "nothing-here").exists()


def test_writer_creates_missing_parents(tmp_path: Path) -> None:
    store = FeatureStore(tmp_path / "a" / "b" / "features.lmdb", map_size=1 << 20)
    assert (tmp_path / "a" / "b" / "features.lmdb" / "data.mdb").is_file()
    store.close()


def test_readonly_store_refuses_writes(store_path: Path, store: FeatureStore) -> None:
    meta = store.create_set("t", None, {}, dim=4, dtype="float32")
    reader = FeatureStore(store_path, readonly=True)
    with pytest.raises(ReadOnlyStoreError, match="read-only"):
        reader.put_many(meta.set_id, ["a"], np.ones((1, 4), np.float32))
    with pytest.raises(ReadOnlyStoreError):
        reader.create_set("u", None, {}, dim=4, dtype="float32")
    with pytest.raises(ReadOnlyStoreError):
        reader.delete_set(meta.set_id)
    assert store.count(meta.set_id) == 0


@pytest.mark.parametrize("map_size", [0, 1000, -1, "big", True])
def test_bad_map_size(tmp_path: Path, map_size) -> None:
    with pytest.raises(InvalidFeatureError, match="map_size"):
        FeatureStore(tmp_path / "s", map_size=map_size)


def test_full_map_raises_store_full_and_keeps_committed_batches(store_path: Path) -> None:
    store = FeatureStore(store_path, map_size=512 << 10)
    meta = store.create_set("t", None, {}, dim=768, dtype="float32")
    rng = np.random.default_rng(2)
    written: dict[str, np.ndarray] = {}
    batch = 0
    with pytest.raises(StoreFullError, match=r"is full \(map size 524288 bytes.*batch of 16 vectors.*not written"):
        while batch < 1000:
            ids = [f"b{batch}-{i}" for i in range(16)]
            vectors = rng.standard_normal((16, 768)).astype(np.float32)
            store.put_many(meta.set_id, ids, vectors)
            written.update(zip(ids, vectors))
            batch += 1
    assert 0 < batch < 1000
    failed = [f"b{batch}-{i}" for i in range(16)]
    assert store.count(meta.set_id) == len(written) == 16 * batch
    arr, found = store.get_many(meta.set_id, list(written) + failed)
    assert found[: len(written)].all() and not found[len(written) :].any()
    np.testing.assert_array_equal(arr[: len(written)], np.stack(list(written.values())))
    store.close()
    reopened = FeatureStore(store_path, readonly=True)
    assert reopened.count(meta.set_id) == len(written)
    reopened.close()


def test_full_map_grows_up_to_the_cap(store_path: Path) -> None:
    store = FeatureStore(store_path, map_size=256 << 10, max_map_size=2 << 20)
    meta = store.create_set("t", None, {}, dim=768, dtype="float32")
    vectors = np.ones((64, 768), np.float32)  # 192 KiB a batch: the first one already grows
    batches = 0
    with pytest.raises(StoreFullError, match="is full"):
        for batches in range(100):
            store.put_many(meta.set_id, [f"b{batches}-{i}" for i in range(64)], vectors)
    assert 3 <= batches < 100  # several batches fit only because the map grew
    assert store.stats()["map_size"] == 2 << 20
    assert store.count(meta.set_id) == 64 * batches
    store.close()


def test_threads_keep_reading_while_the_map_grows(store_path: Path) -> None:
    import threading

    store = FeatureStore(store_path, map_size=256 << 10, max_map_size=16 << 20)
    meta = store.create_set("t", None, {}, dim=768, dtype="float32")
    store.put_many(meta.set_id, ["seed"], np.full((1, 768), 7, np.float32))
    reader = FeatureStore(store_path, readonly=True)
    stop, errors, reads = threading.Event(), [], [0]

    def read() -> None:
        while not stop.is_set():
            try:
                arr, found = reader.get_many(meta.set_id, ["seed", "b0-0"])
                assert found[0] and (arr[0] == 7).all()
                assert reader.count(meta.set_id) >= 1
                reads[0] += 1
            except Exception as exc:  # noqa: BLE001 - surfaced below
                errors.append(exc)
                return

    threads = [threading.Thread(target=read) for _ in range(3)]
    for t in threads:
        t.start()
    for b in range(20):  # 20 x 192 KiB: the map doubles several times under the readers
        store.put_many(meta.set_id, [f"b{b}-{i}" for i in range(64)], np.ones((64, 768), np.float32))
    stop.set()
    for t in threads:
        t.join(timeout=30)
    assert errors == [] and reads[0] > 0
    assert store.stats()["map_size"] > 256 << 10 and store.count(meta.set_id) == 1 + 20 * 64
    reader.close()
    store.close()
