"""Feature sets, round trips, counts, iteration, deletion and the sha256 dedupe index."""

from __future__ import annotations

import hashlib
import json
import pickle
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

from lastkd.featurestore import (
    FeatureSetConflictError,
    FeatureSetMeta,
    FeatureStore,
    InvalidFeatureError,
    UnknownFeatureSetError,
    feature_set_id,
)
from tests.support.store import PREPROCESSING, WEIGHTS


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_feature_set_id_is_deterministic_and_derived_from_its_inputs() -> None:
    prep_hash = hashlib.sha256(json.dumps(PREPROCESSING, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[
        :12
    ]
    assert (
        feature_set_id("videomae_v2_vit_b", WEIGHTS, PREPROCESSING) == f"videomae_v2_vit_b-{WEIGHTS[:12]}-{prep_hash}"
    )
    assert feature_set_id("videomae_v2_vit_b", None, PREPROCESSING) == f"videomae_v2_vit_b-random-init-{prep_hash}"
    assert feature_set_id("videomae_v2_vit_b", "random-init", PREPROCESSING).endswith(f"-random-init-{prep_hash}")
    # key order and tuple/list spelling do not matter; values, teacher and weights do
    reordered = dict(reversed(list(PREPROCESSING.items())))
    reordered["mean"] = tuple(reordered["mean"])
    assert feature_set_id("t", WEIGHTS, reordered) == feature_set_id("t", WEIGHTS, PREPROCESSING)
    assert feature_set_id("t", WEIGHTS, {**PREPROCESSING, "crop": 160}) != feature_set_id("t", WEIGHTS, PREPROCESSING)
    assert feature_set_id("t", "b4" * 32, PREPROCESSING) != feature_set_id("t", WEIGHTS, PREPROCESSING)
    assert feature_set_id("u", WEIGHTS, PREPROCESSING) != feature_set_id("t", WEIGHTS, PREPROCESSING)
    # upper-case hex names the same weights
    assert feature_set_id("t", WEIGHTS.upper(), PREPROCESSING) == feature_set_id("t", WEIGHTS, PREPROCESSING)


def test_create_set_records_metadata_and_is_idempotent(store: FeatureStore) -> None:
    meta = store.create_set("videomae_v2_vit_b", WEIGHTS, PREPROCESSING, dim=768, dtype="float16")
    assert isinstance(meta, FeatureSetMeta)
    assert meta.set_id == feature_set_id("videomae_v2_vit_b", WEIGHTS, PREPROCESSING)
    assert (meta.teacher, meta.weights_sha256, meta.dim, meta.dtype, meta.count) == (
        "videomae_v2_vit_b",
        WEIGHTS,
        768,
        "float16",
        0,
    )
    assert meta.preprocessing == PREPROCESSING
    assert datetime.fromisoformat(meta.created_at).tzinfo is not None
    again = store.create_set("videomae_v2_vit_b", WEIGHTS, dict(PREPROCESSING), dim=768, dtype="float16")
    assert again == meta  # same record, same created time
    random_init = store.create_set("videomae_v2_vit_b", None, PREPROCESSING, dim=768, dtype="float16")
    assert random_init.weights_sha256 == "random-init" and random_init.random_init
    assert [m.set_id for m in store.list_sets()] == sorted([meta.set_id, random_init.set_id])
    assert store.get_set(meta.set_id) == meta


@pytest.mark.parametrize("change", [{"dim": 512}, {"dtype": "float32"}])
def test_create_set_with_conflicting_metadata_is_refused(store: FeatureStore, change: dict) -> None:
    args = {"dim": 768, "dtype": "float16"}
    meta = store.create_set("videomae_v2_vit_b", WEIGHTS, PREPROCESSING, **args)
    with pytest.raises(FeatureSetConflictError, match=f"{meta.set_id}.*already exists.*{next(iter(change))}"):
        store.create_set("videomae_v2_vit_b", WEIGHTS, PREPROCESSING, **{**args, **change})
    assert store.get_set(meta.set_id).dim == 768 and store.get_set(meta.set_id).dtype == "float16"


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_round_trip(store: FeatureStore, dtype: str) -> None:
    meta = store.create_set("videomae_v2_vit_b", None, PREPROCESSING, dim=768, dtype=dtype)
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((50, 768)).astype(dtype)
    ids = [f"S001C001P001R001A{i:03d}" for i in range(50)]
    assert store.put_many(meta.set_id, ids, vectors) == 50
    query = ids[::-1] + ["S999C999P999R999A999"] + ids[:3]
    arr, found = store.get_many(meta.set_id, query)
    assert arr.dtype == np.dtype(dtype) and arr.shape == (len(query), 768)
    assert found.dtype == bool and found.tolist() == [True] * 50 + [False] + [True] * 3
    np.testing.assert_array_equal(arr[:50], vectors[::-1])
    np.testing.assert_array_equal(arr[51:], vectors[:3])
    assert not arr[50].any()
    np.testing.assert_array_equal(store.get(meta.set_id, ids[7]), vectors[7])
    assert store.get(meta.set_id, "absent") is None
    assert store.count(meta.set_id) == 50
    assert store.contains(meta.set_id, ids[0]) and not store.contains(meta.set_id, "absent")
    empty, none_found = store.get_many(meta.set_id, [])
    assert empty.shape == (0, 768) and none_found.shape == (0,)


def test_float32_input_is_stored_as_float16(store: FeatureStore) -> None:
    meta = store.create_set("t", None, {}, dim=4, dtype="float16")
    vectors = np.array([[0.1, 0.2, 0.3, 1e-3]], dtype=np.float64)
    store.put_many(meta.set_id, ["a"], vectors)
    arr, _ = store.get_many(meta.set_id, ["a"])
    np.testing.assert_array_equal(arr[0], vectors[0].astype(np.float16))


def test_overwrite_keeps_count_and_replaces_vector(store: FeatureStore, fset: FeatureSetMeta) -> None:
    ones, twos = np.ones((3, 16), np.float32), np.full((3, 16), 2, np.float32)
    assert store.put_many(fset.set_id, ["a", "b", "c"], ones) == 3
    assert store.put_many(fset.set_id, ["c", "d", "a"], twos) == 1  # only "d" is new
    assert store.count(fset.set_id) == 4
    arr, found = store.get_many(fset.set_id, ["a", "b", "c", "d"])
    assert found.all()
    assert arr[:, 0].tolist() == [2, 1, 2, 2]


def test_iter_ids_walks_every_id_of_its_set_only(store: FeatureStore, fset: FeatureSetMeta) -> None:
    other = store.create_set("videomae_v2_vit_b", WEIGHTS, {**PREPROCESSING, "crop": 160}, dim=16, dtype="float32")
    ids = [f"clip{i:04d}" for i in range(2500)]
    for start in range(0, 2500, 500):
        store.put_many(fset.set_id, ids[start : start + 500], np.zeros((500, 16), np.float32))
    store.put_many(other.set_id, ["zzz", "clip0000x"], np.zeros((2, 16), np.float32))
    assert list(store.iter_ids(fset.set_id, chunk=300)) == sorted(ids)
    assert list(store.iter_ids(other.set_id)) == ["clip0000x", "zzz"]


def test_sets_do_not_mix(store: FeatureStore, fset: FeatureSetMeta) -> None:
    other = store.create_set("videomae_v2_vit_b", None, PREPROCESSING, dim=16, dtype="float32")
    store.put_many(fset.set_id, ["x"], np.ones((1, 16), np.float32))
    _, found = store.get_many(other.set_id, ["x"])
    assert not found[0] and store.count(other.set_id) == 0


def test_dedupe_index_maps_content_sha256_to_clip_id(store: FeatureStore, fset: FeatureSetMeta) -> None:
    clip_a, clip_b, clip_c = b"video bytes A", b"video bytes B", b"video bytes C"
    sha_a, sha_b, sha_c = _digest(clip_a), _digest(clip_b), _digest(clip_c)
    store.put_many(fset.set_id, ["a", "b"], np.ones((2, 16), np.float32), sha256s=[sha_a, sha_b])
    assert store.lookup_sha256(fset.set_id, sha_a) == "a"
    assert store.lookup_sha256(fset.set_id, sha_b.upper()) == "b"
    assert store.lookup_sha256(fset.set_id, sha_c) is None
    # the index is per set
    other = store.create_set("videomae_v2_vit_b", None, PREPROCESSING, dim=16, dtype="float32")
    assert store.lookup_sha256(other.set_id, sha_a) is None
    # re-embedding clip "a" from other bytes retires the old digest
    store.put_many(fset.set_id, ["a"], np.ones((1, 16), np.float32), sha256s=[sha_c])
    assert store.lookup_sha256(fset.set_id, sha_a) is None
    assert store.lookup_sha256(fset.set_id, sha_c) == "a"
    assert store.count(fset.set_id) == 2


def test_delete_set_removes_everything_of_that_set(store: FeatureStore, fset: FeatureSetMeta) -> None:
    keep = store.create_set("videomae_v2_vit_b", None, PREPROCESSING, dim=16, dtype="float32")
    sha = _digest(b"x")
    store.put_many(fset.set_id, ["a", "b", "c"], np.ones((3, 16), np.float32), sha256s=[sha, None, None])
    store.put_many(keep.set_id, ["a"], np.ones((1, 16), np.float32), sha256s=[sha])
    assert store.delete_set(fset.set_id) == 3
    with pytest.raises(UnknownFeatureSetError, match="unknown feature set"):
        store.count(fset.set_id)
    assert [m.set_id for m in store.list_sets()] == [keep.set_id]
    assert store.lookup_sha256(keep.set_id, sha) == "a" and store.count(keep.set_id) == 1
    # the id can be created again, empty, with a new dim
    again = store.create_set("videomae_v2_vit_b", WEIGHTS, PREPROCESSING, dim=8, dtype="float16")
    assert again.set_id == fset.set_id and again.count == 0
    assert list(store.iter_ids(again.set_id)) == []
    _, found = store.get_many(again.set_id, ["a"])
    assert not found.any()


@pytest.mark.parametrize(
    "call",
    [
        lambda s: s.get_many("nope-random-init-000000000000", ["a"]),
        lambda s: s.put_many("nope-random-init-000000000000", ["a"], np.ones((1, 16), np.float32)),
        lambda s: s.count("nope-random-init-000000000000"),
        lambda s: s.contains("nope-random-init-000000000000", "a"),
        lambda s: s.get_set("nope-random-init-000000000000"),
        lambda s: s.delete_set("nope-random-init-000000000000"),
        lambda s: list(s.iter_ids("nope-random-init-000000000000")),
        lambda s: s.lookup_sha256("nope-random-init-000000000000", "0" * 64),
    ],
)
def test_unknown_set_is_a_clear_error(store: FeatureStore, fset: FeatureSetMeta, call) -> None:
    with pytest.raises(UnknownFeatureSetError) as info:
        call(store)
    message = str(info.value)
    assert "unknown feature set 'nope-random-init-000000000000'" in message and fset.set_id in message


def test_data_persists_across_reopen_and_readers_share_the_writer(store_path: Path) -> None:
    writer = FeatureStore(store_path, map_size=32 << 20)
    meta = writer.create_set("t", None, {}, dim=4, dtype="float32")
    reader = FeatureStore(store_path, readonly=True)  # same process: shares the environment
    writer.put_many(meta.set_id, ["a"], np.arange(4, dtype=np.float32)[None])
    assert reader.count(meta.set_id) == 1
    writer.close()
    assert reader.get(meta.set_id, "a").tolist() == [0, 1, 2, 3]  # still open for the reader
    reader.close()
    reopened = FeatureStore(store_path, readonly=True)
    assert reopened.get(meta.set_id, "a").tolist() == [0, 1, 2, 3]
    reopened.close()


def test_store_pickles_to_its_recipe(store_path: Path, store: FeatureStore, fset: FeatureSetMeta) -> None:
    store.put_many(fset.set_id, ["a"], np.ones((1, 16), np.float32))
    reader = FeatureStore(store_path, readonly=True)
    reader.count(fset.set_id)
    clone = pickle.loads(pickle.dumps(reader))
    assert clone.opened_pid is None  # nothing opened until used
    assert clone.readonly and clone.get(fset.set_id, "a").sum() == 16


def test_stats_reports_totals(store: FeatureStore, fset: FeatureSetMeta) -> None:
    store.put_many(fset.set_id, ["a", "b"], np.ones((2, 16), np.float32))
    stats = store.stats()
    assert stats["sets"] == 1 and stats["vectors"] == 2
    assert 0 < stats["used_bytes"] <= stats["map_size"] == 64 << 20
    assert stats["file_bytes"] == (Path(stats["path"]) / "data.mdb").stat().st_size


def test_reader_first_then_writer_in_one_process(store_path: Path) -> None:
    with FeatureStore(store_path, map_size=8 << 20) as seed:
        meta = seed.create_set("t", None, {}, dim=4, dtype="float32")
    reader = FeatureStore(store_path, readonly=True)
    assert reader.count(meta.set_id) == 0  # the process holds a read-only environment now
    writer = FeatureStore(store_path, map_size=8 << 20)  # upgrades the shared environment
    writer.put_many(meta.set_id, ["a", "b"], np.ones((2, 4), np.float32))
    assert reader.count(meta.set_id) == 2 and writer.count(meta.set_id) == 2
    writer.close()
    reader.close()


def test_clip_info_is_stored_with_an_added_vector_only(store: FeatureStore, fset: FeatureSetMeta) -> None:
    a, b = _digest(b"a"), _digest(b"b")
    vecs = np.ones((3, 16), np.float32)
    outcome = store.put_if_absent(
        fset.set_id, ["x", "x", "y"], vecs, sha256s=[a, b, b], infos=[{"frames_used": 1}, {"frames_used": 9}, None]
    )
    assert outcome == ["added", "conflict", "added"]
    assert store.clip_info(fset.set_id, "x") == {"frames_used": 1}  # the loser's facts are not kept
    assert store.clip_info(fset.set_id, "y") is None and store.clip_info(fset.set_id, "nope") is None
    with pytest.raises(InvalidFeatureError, match="infos has 1 entries"):
        store.put_if_absent(fset.set_id, ["z", "w"], vecs[:2], sha256s=[a, b], infos=[{"frames_used": 2}])
    with pytest.raises(InvalidFeatureError):
        store.put_if_absent(fset.set_id, ["z"], vecs[:1], sha256s=[a], infos=[{"frames_used": float("nan")}])
    assert not store.contains(fset.set_id, "z")  # a refused batch writes nothing
    # an overwrite (put_many) drops facts that no longer describe the vector; deleting the set drops all
    store.put_many(fset.set_id, ["x"], vecs[:1] * 2, sha256s=[b])
    assert store.clip_info(fset.set_id, "x") is None
    store.put_if_absent(fset.set_id, ["q"], vecs[:1], sha256s=[_digest(b"q")], infos=[{"frames_used": 4}])
    store.delete_set(fset.set_id)
    again = store.create_set(fset.teacher, None, fset.preprocessing, dim=fset.dim, dtype=fset.dtype)
    store.put_if_absent(again.set_id, ["q"], vecs[:1], sha256s=[_digest(b"q")])
    assert store.clip_info(again.set_id, "q") is None


def test_a_store_written_before_clip_info_opens_read_only(tmp_path: Path) -> None:
    import lmdb

    from lastkd.featurestore import layout

    path = tmp_path / "old.lmdb"
    writer = FeatureStore(path, map_size=32 << 20)
    meta = writer.create_set("t", None, {}, dim=4, dtype="float32")
    writer.put_many(meta.set_id, ["a"], np.arange(4, dtype=np.float32)[None])
    writer.close()
    env = lmdb.open(str(path), max_dbs=layout.MAX_DBS)  # drop the table, as format-1 stores lack it
    with env.begin(write=True) as txn:
        txn.drop(env.open_db(layout.DB_CLIP_INFO, txn=txn), delete=True)
    env.close()
    reader = FeatureStore(path, readonly=True)
    assert reader.get(meta.set_id, "a").tolist() == [0, 1, 2, 3] and reader.clip_info(meta.set_id, "a") is None
    reader.close()
