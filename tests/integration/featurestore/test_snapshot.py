"""Export of compacted, checksummed snapshots, and verification that catches tampering."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import lmdb
import numpy as np
import pytest

from lastkd.featurestore import FeatureSetMeta, FeatureStore, SnapshotError, UnknownFeatureSetError, verify_snapshot
from tests.support.store import PREPROCESSING


@pytest.fixture
def filled(store: FeatureStore, fset: FeatureSetMeta) -> tuple[FeatureStore, FeatureSetMeta, FeatureSetMeta]:
    other = store.create_set("videomae_v2_vit_b", None, PREPROCESSING, dim=8, dtype="float16")
    rng = np.random.default_rng(3)
    for start in range(0, 300, 100):
        ids = [f"clip{i:04d}" for i in range(start, start + 100)]
        store.put_many(fset.set_id, ids, rng.standard_normal((100, 16)).astype(np.float32))
    store.put_many(other.set_id, ["a", "b"], np.ones((2, 8), np.float16), sha256s=["ab" * 32, None])
    # deleting a set leaves free pages behind: the export must compact them away
    scratch = store.create_set("scratch", None, {}, dim=512, dtype="float32")
    store.put_many(scratch.set_id, [f"s{i}" for i in range(200)], np.zeros((200, 512), np.float32))
    store.delete_set(scratch.set_id)
    return store, fset, other


def test_export_whole_store_is_compact_and_verifies(filled, tmp_path: Path) -> None:
    store, fset, other = filled
    manifest_path = store.export(tmp_path / "snap")
    assert manifest_path == tmp_path / "snap" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    data = tmp_path / "snap" / "data.mdb"
    assert manifest["files"]["data.mdb"] == {
        "bytes": data.stat().st_size,
        "sha256": hashlib.sha256(data.read_bytes()).hexdigest(),
    }
    assert {k: v["count"] for k, v in manifest["sets"].items()} == {fset.set_id: 300, other.set_id: 2}
    assert manifest["sets"][fset.set_id]["dim"] == 16 and manifest["vectors"] == 302
    assert data.stat().st_size < (store.path / "data.mdb").stat().st_size  # compacted
    report = verify_snapshot(tmp_path / "snap")
    assert report.sets == {fset.set_id: 300, other.set_id: 2} and report.vectors == 302
    # the snapshot is a working store: same vectors, same dedupe index
    copy = FeatureStore(tmp_path / "snap", readonly=True)
    ids = list(store.iter_ids(fset.set_id))
    np.testing.assert_array_equal(copy.get_many(fset.set_id, ids)[0], store.get_many(fset.set_id, ids)[0])
    assert copy.lookup_sha256(other.set_id, "ab" * 32) == "a"
    copy.close()


def test_export_some_sets(filled, tmp_path: Path) -> None:
    store, fset, other = filled
    store.export(tmp_path / "snap", set_ids=[other.set_id])
    report = verify_snapshot(tmp_path / "snap")
    assert report.sets == {other.set_id: 2}
    copy = FeatureStore(tmp_path / "snap", readonly=True)
    assert [m.set_id for m in copy.list_sets()] == [other.set_id]
    assert copy.lookup_sha256(other.set_id, "ab" * 32) == "a"
    np.testing.assert_array_equal(copy.get_many(other.set_id, ["a", "b"])[0], np.ones((2, 8), np.float16))
    copy.close()


def test_verify_catches_flipped_bytes(filled, tmp_path: Path) -> None:
    store, _, _ = filled
    store.export(tmp_path / "snap")
    verify_snapshot(tmp_path / "snap")
    data = tmp_path / "snap" / "data.mdb"
    raw = bytearray(data.read_bytes())
    for offset in (len(raw) // 2, len(raw) // 2 + 1, len(raw) - 100):
        raw[offset] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(SnapshotError, match="data.mdb: sha256 .* does not match the manifest"):
        verify_snapshot(tmp_path / "snap")


def test_verify_catches_truncation_and_missing_files(filled, tmp_path: Path) -> None:
    store, _, _ = filled
    store.export(tmp_path / "snap")
    data = tmp_path / "snap" / "data.mdb"
    data.write_bytes(data.read_bytes()[:-4096])
    with pytest.raises(SnapshotError, match="truncated or modified"):
        verify_snapshot(tmp_path / "snap")
    data.unlink()
    with pytest.raises(SnapshotError, match="data.mdb: missing"):
        verify_snapshot(tmp_path / "snap")


def test_verify_rereads_vectors_and_catches_count_mismatch(filled, tmp_path: Path) -> None:
    """Tamper inside LMDB and re-sign the file hash: only re-reading the data can notice."""
    store, fset, _ = filled
    store.export(tmp_path / "snap")
    env = lmdb.open(str(tmp_path / "snap"), max_dbs=8, lock=False)
    vectors = env.open_db(b"vectors")
    with env.begin(write=True, db=vectors) as txn:
        assert txn.delete(fset.set_id.encode() + b"\x00clip0007")
        txn.put(fset.set_id.encode() + b"\x00clip0008", b"\x00" * 10)  # wrong length
    env.close()
    manifest_path = tmp_path / "snap" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    data = tmp_path / "snap" / "data.mdb"
    manifest["files"]["data.mdb"] = {
        "bytes": data.stat().st_size,
        "sha256": hashlib.sha256(data.read_bytes()).hexdigest(),
    }
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(SnapshotError) as info:
        verify_snapshot(tmp_path / "snap")
    message = str(info.value)
    assert "299 vectors stored but the count record says 300" in message
    assert "299 vectors stored but the manifest says 300" in message
    assert "'clip0008' has 10 bytes, expected 64" in message


def test_verify_catches_manifest_count_edit(filled, tmp_path: Path) -> None:
    store, fset, _ = filled
    store.export(tmp_path / "snap")
    manifest_path = tmp_path / "snap" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["sets"][fset.set_id]["count"] = 301
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(SnapshotError, match="300 vectors stored but the manifest says 301"):
        verify_snapshot(tmp_path / "snap")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "has no manifest.json"),
        ("{not json", "not valid JSON"),
        ("[1, 2]", "not a lastkd snapshot manifest"),
        ('{"format": "something-else"}', "not a lastkd snapshot manifest"),
        ('{"format": "lastkd-featurestore-snapshot/1", "files": {}, "sets": {}}', "must list data.mdb"),
        (
            '{"format": "lastkd-featurestore-snapshot/1", "sets": {}, "files": '
            '{"data.mdb": {"bytes": 1, "sha256": "00"}, "../../etc/passwd": {"bytes": 1, "sha256": "00"}}}',
            "not a plain file name",
        ),
    ],
)
def test_verify_rejects_bad_manifests(filled, tmp_path: Path, content: str | None, message: str) -> None:
    store, _, _ = filled
    store.export(tmp_path / "snap")
    manifest_path = tmp_path / "snap" / "manifest.json"
    if content is None:
        manifest_path.unlink()
    else:
        manifest_path.write_text(content)
    with pytest.raises(SnapshotError, match=message):
        verify_snapshot(tmp_path / "snap")


def test_verify_of_a_missing_directory_or_a_file(tmp_path: Path) -> None:
    with pytest.raises(SnapshotError, match="nope does not exist"):
        verify_snapshot(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(SnapshotError, match="file is not a directory"):
        verify_snapshot(tmp_path / "file")


def test_export_refuses_bad_destinations_and_sets(filled, tmp_path: Path) -> None:
    store, _, _ = filled
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(SnapshotError, match="exists and is not an empty directory"):
        store.export(tmp_path / "full")
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == ["keep.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(SnapshotError, match="exists and is not an empty directory"):
        store.export(tmp_path / "file")
    with pytest.raises(SnapshotError, match="inside the store"):
        store.export(store.path / "snap")
    with pytest.raises(SnapshotError, match=r"file is a file, not a directory"):
        store.export(tmp_path / "file" / "deeper" / "snap")
    with pytest.raises(UnknownFeatureSetError, match="unknown feature set 'nope'"):
        store.export(tmp_path / "s1", set_ids=["nope"])
    with pytest.raises(SnapshotError, match="not a single string"):
        store.export(tmp_path / "s2", set_ids="abc")
    with pytest.raises(SnapshotError, match="set_ids is empty"):
        store.export(tmp_path / "s3", set_ids=[])
    assert not any(p.name.startswith((".s", "s1", "s2", "s3")) for p in tmp_path.iterdir())
    # an existing empty directory is fine
    (tmp_path / "empty").mkdir()
    store.export(tmp_path / "empty")
    verify_snapshot(tmp_path / "empty")
