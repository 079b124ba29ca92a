"""Bad input: every malformed batch, id, digest or metadata is refused with a precise message and
nothing of the batch is written."""

from __future__ import annotations

import numpy as np
import pytest

from lastkd.featurestore import FeatureSetMeta, FeatureStore, InvalidFeatureError
from tests.support.store import PREPROCESSING

DIM = 16
GOOD_IDS = ["S001C001P001R001A001", "S001C001P001R001A002"]


def _good(n: int = 2) -> np.ndarray:
    return np.ones((n, DIM), np.float32)


def _nan() -> np.ndarray:
    v = _good()
    v[1, 3] = np.nan
    return v


def _inf(sign: float) -> np.ndarray:
    v = _good()
    v[0, 5] = sign * np.inf
    return v


BAD_BATCHES = [
    pytest.param(GOOD_IDS, np.ones((2, DIM + 1), np.float32), None, "dim 17.*expects dim 16", id="wrong-dim"),
    pytest.param(GOOD_IDS, np.ones(DIM, np.float32), None, r"2-D array.*shape \(16,\)", id="1-d"),
    pytest.param(GOOD_IDS, np.ones((2, 1, DIM), np.float32), None, "2-D array", id="3-d"),
    pytest.param(GOOD_IDS, np.ones((2, DIM), np.int64), None, "floating point.*int64", id="int-dtype"),
    pytest.param(GOOD_IDS, np.ones((2, DIM), bool), None, "floating point.*bool", id="bool-dtype"),
    pytest.param(GOOD_IDS, np.ones((2, DIM), np.complex64), None, "floating point.*complex64", id="complex"),
    pytest.param(GOOD_IDS, [["a"] * DIM] * 2, None, "floating point", id="strings"),
    pytest.param(GOOD_IDS, [[1.0] * DIM, [1.0] * 3], None, "cannot be read as an array|floating point", id="ragged"),
    pytest.param(GOOD_IDS, _nan(), None, r"vectors\[1\]\[3\] is nan", id="nan"),
    pytest.param(GOOD_IDS, _inf(1), None, r"vectors\[0\]\[5\] is inf", id="inf"),
    pytest.param(GOOD_IDS, _inf(-1), None, r"vectors\[0\]\[5\] is -inf", id="-inf"),
    pytest.param([], np.ones((0, DIM), np.float32), None, "empty batch", id="empty"),
    pytest.param(GOOD_IDS, _good(3), None, "3 vectors for 2 ids", id="more-vectors"),
    pytest.param(GOOD_IDS + ["x"], _good(2), None, "2 vectors for 3 ids", id="more-ids"),
    pytest.param(["a", "b", "a"], _good(3), None, r"duplicate clip id 'a'.*ids\[0\] and ids\[2\]", id="duplicate"),
    pytest.param("S001C001P001R001A001", _good(1), None, "not a single str", id="ids-is-str"),
    pytest.param(b"abc", _good(1), None, "not a single bytes", id="ids-is-bytes"),
    pytest.param(42, _good(1), None, "sequence of strings, got int", id="ids-is-int"),
    pytest.param(["a", 7], _good(2), None, r"ids\[1\] must be a str, got int", id="int-id"),
    pytest.param(["a", b"b"], _good(2), None, r"ids\[1\] must be a str, got bytes", id="bytes-id"),
    pytest.param([None, "b"], _good(2), None, r"ids\[0\] must be a str, got NoneType", id="none-id"),
    pytest.param(["a", ""], _good(2), None, r"ids\[1\] is empty", id="empty-id"),
    pytest.param(["a", "x" * 257], _good(2), None, "257 bytes in UTF-8; the limit is 256", id="long-id"),
    pytest.param(["é" * 129, "b"], _good(2), None, "258 bytes in UTF-8", id="long-multibyte-id"),
    pytest.param(["a\x00b", "b"], _good(2), None, r"control character '\\x00' at position 1", id="nul-id"),
    pytest.param(["a", "line\nbreak"], _good(2), None, r"control character '\\n' at position 4", id="newline-id"),
    pytest.param(["a\x7f", "b"], _good(2), None, "control character", id="del-id"),
    pytest.param(["a\x85", "b"], _good(2), None, "control character", id="c1-id"),
    pytest.param(["a\ud800", "b"], _good(2), None, "not valid Unicode", id="surrogate-id"),
    pytest.param(GOOD_IDS, _good(), ["ab" * 32], "sha256s has 1 entries but the batch has 2", id="sha-count"),
    pytest.param(GOOD_IDS, _good(), ["ab" * 32, "xyz"], r"sha256s\[1\] must be 64 hexadecimal", id="sha-short"),
    pytest.param(GOOD_IDS, _good(), ["g" * 64, None], r"sha256s\[0\] must be 64 hexadecimal", id="sha-not-hex"),
    pytest.param(GOOD_IDS, _good(), [1234, None], r"sha256s\[0\] must be 64 hexadecimal", id="sha-int"),
    pytest.param(GOOD_IDS, _good(), "ab" * 32, "sha256s must be a sequence", id="sha-str"),
]


@pytest.mark.parametrize(("ids", "vectors", "shas", "message"), BAD_BATCHES)
def test_bad_batch_is_rejected_and_nothing_written(
    store: FeatureStore, fset: FeatureSetMeta, ids, vectors, shas, message: str
) -> None:
    store.put_many(fset.set_id, ["before"], _good(1))
    with pytest.raises(InvalidFeatureError, match=message):
        store.put_many(fset.set_id, ids, vectors, sha256s=shas)
    assert store.count(fset.set_id) == 1
    assert list(store.iter_ids(fset.set_id)) == ["before"]
    assert store.lookup_sha256(fset.set_id, "ab" * 32) is None


def test_float16_overflow_is_rejected(store: FeatureStore) -> None:
    meta = store.create_set("t", None, {}, dim=4, dtype="float16")
    vectors = np.array([[1.0, 2.0, 70000.0, 0.0]], np.float32)  # float16 max is 65504
    with pytest.raises(InvalidFeatureError, match=r"vectors\[0\]\[2\] = .*70000.*overflows float16"):
        store.put_many(meta.set_id, ["a"], vectors)
    assert store.count(meta.set_id) == 0


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        ("abc", "not a single str"),
        (["ok", 3], r"ids\[1\] must be a str"),
        (["x" * 300], "300 bytes"),
        (["a\tb"], "control character"),
        ([""], "is empty"),
    ],
)
def test_bad_ids_on_read_are_rejected(store: FeatureStore, fset: FeatureSetMeta, ids, message: str) -> None:
    with pytest.raises(InvalidFeatureError, match=message):
        store.get_many(fset.set_id, ids)


@pytest.mark.parametrize("clip_id", ["", "a\nb", 5, "x" * 257])
def test_bad_single_ids_are_rejected(store: FeatureStore, fset: FeatureSetMeta, clip_id) -> None:
    with pytest.raises(InvalidFeatureError):
        store.contains(fset.set_id, clip_id)
    with pytest.raises(InvalidFeatureError):
        store.get(fset.set_id, clip_id)


@pytest.mark.parametrize("sha", ["", "abc", "z" * 64, None, 12])
def test_bad_lookup_digest(store: FeatureStore, fset: FeatureSetMeta, sha) -> None:
    with pytest.raises(InvalidFeatureError, match="64 hexadecimal"):
        store.lookup_sha256(fset.set_id, sha)


@pytest.mark.parametrize("set_id", ["", None, 7, "a\x00b", "x" * 200])
def test_bad_set_id_type(store: FeatureStore, set_id) -> None:
    with pytest.raises(InvalidFeatureError, match="feature set id"):
        store.count(set_id)


BAD_METADATA = [
    pytest.param({"teacher": ""}, "teacher must be", id="empty-teacher"),
    pytest.param({"teacher": "video mae"}, "teacher must be", id="space-teacher"),
    pytest.param({"teacher": "../etc"}, "teacher must be", id="path-teacher"),
    pytest.param({"teacher": "t" * 65}, "teacher must be", id="long-teacher"),
    pytest.param({"teacher": None}, "teacher must be", id="none-teacher"),
    pytest.param({"weights_sha256": "abc"}, "weights_sha256 must be 64 hexadecimal", id="short-weights"),
    pytest.param({"weights_sha256": 5}, "weights_sha256 must be 64 hexadecimal", id="int-weights"),
    pytest.param({"preprocessing": [1, 2]}, "preprocessing must be a dict", id="list-prep"),
    pytest.param({"preprocessing": {"x": float("nan")}}, "only finite numbers", id="nan-prep"),
    pytest.param({"preprocessing": {"x": {1, 2}}}, "set, which is not JSON", id="set-prep"),
    pytest.param({"preprocessing": {1: "a"}}, "non-string key", id="int-key-prep"),
    pytest.param({"preprocessing": {"x": object()}}, "object, which is not JSON", id="object-prep"),
    pytest.param({"dim": 0}, "dim must be an integer in 1..65536", id="dim-0"),
    pytest.param({"dim": -3}, "dim must be", id="dim-negative"),
    pytest.param({"dim": 70000}, "dim must be", id="dim-huge"),
    pytest.param({"dim": 1.5}, "dim must be", id="dim-float"),
    pytest.param({"dim": True}, "dim must be", id="dim-bool"),
    pytest.param({"dim": "768"}, "dim must be", id="dim-str"),
    pytest.param({"dtype": "float64"}, "dtype must be 'float16' or 'float32'", id="float64"),
    pytest.param({"dtype": "int8"}, "dtype must be", id="int8"),
    pytest.param({"dtype": np.float64}, "dtype must be", id="np-float64"),
    pytest.param({"dtype": None}, "dtype must be", id="none-dtype"),
]


@pytest.mark.parametrize(("change", "message"), BAD_METADATA)
def test_bad_metadata_is_rejected(store: FeatureStore, change: dict, message: str) -> None:
    args = {
        "teacher": "videomae_v2_vit_b",
        "weights_sha256": None,
        "preprocessing": PREPROCESSING,
        "dim": 768,
        "dtype": "float16",
    }
    with pytest.raises(InvalidFeatureError, match=message):
        store.create_set(**{**args, **change})
    assert store.list_sets() == []


def test_numpy_dtype_objects_are_accepted(store: FeatureStore) -> None:
    meta = store.create_set("t", None, {}, dim=np.int64(8), dtype=np.float16)
    assert (meta.dim, meta.dtype) == (8, "float16")
