"""``lastkd store export-npy``: the seed's teacher_features_<split>.npy, aligned with the dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lastkd.featurestore import FeatureStore
from lastkd.ntu.splits import split_indices
from lastkd.services import cli
from lastkd.student.synth import generate


@pytest.fixture()
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, str, list[str]]:
    root = tmp_path / "datasets"
    result = generate(root / "synth", classes=3, samples_per_class=4, frames=40, video=False, seed=1)
    names = sorted(result.names)
    store_path = tmp_path / "features.lmdb"
    store = FeatureStore(store_path, map_size=32 << 20)
    meta = store.create_set("videomae_v2_vit_b", None, {"test": "npy"}, dim=8, dtype="float16")
    covered = names[::2]  # every other clip has a vector; the rest must come out as zero rows
    store.put_many(meta.set_id, covered, np.arange(len(covered) * 8, dtype=np.float16).reshape(-1, 8))
    store.close()
    monkeypatch.setenv("LASTKD_DATA_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("LASTKD_DATA_ROOTS", json.dumps([str(root)]))
    monkeypatch.setenv("LASTKD_STORE_PATH", str(store_path))
    config = tmp_path / "train.yaml"
    config.write_text(json.dumps({"name": "x", "epochs": 1, "data": {"path": "synth/skeletons", "split": "xsub"}}))
    return config, meta.set_id, covered


def test_rows_follow_the_split_order_and_missing_clips_are_zero(
    setup: tuple[Path, str, list[str]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, set_id, covered = setup
    out = tmp_path / "out"
    assert (
        cli.main(["store", "export-npy", "--set", set_id, "--data", str(config), "--split", "train", "--out", str(out)])
        == 0
    )
    printed = capsys.readouterr().out
    array = np.load(out / "teacher_features_train.npy")
    ids = (out / "teacher_features_train_ids.txt").read_text().split()
    missing = (out / "teacher_features_train_missing.txt").read_text().split()
    # the rows are the xsub training side, in the data pipeline's (sorted-name) order
    all_names = sorted(p.stem for p in (config.parent / "datasets" / "synth" / "skeletons").glob("*.skeleton"))
    train_idx, _ = split_indices(all_names, "xsub")
    assert ids == [all_names[i] for i in train_idx]
    assert array.dtype == np.float32 and array.shape == (len(ids), 8)
    store = FeatureStore(Path(config.parent / "features.lmdb"), readonly=True)
    try:
        expected, found = store.get_many(set_id, ids)
    finally:
        store.close()
    np.testing.assert_array_equal(array, expected.astype(np.float32))
    assert missing == [n for n, ok in zip(ids, found, strict=True) if not ok] and missing
    assert not array[~found].any() and set(np.array(ids)[found]) <= set(covered)
    assert f"covered {int(found.sum())}/{len(ids)}" in printed


def test_bad_requests_are_refused_and_write_nothing(
    setup: tuple[Path, str, list[str]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, set_id, _ = setup
    out = tmp_path / "out"
    base = ["store", "export-npy", "--data", str(config), "--split", "val", "--out", str(out)]
    assert cli.main([*base, "--set", "no-such-set"]) == 1
    assert "feature set 'no-such-set' is not in the store" in capsys.readouterr().err
    outside = tmp_path / "outside.yaml"
    outside.write_text(json.dumps({"name": "x", "epochs": 1, "data": {"path": "/etc"}}))
    assert (
        cli.main(["store", "export-npy", "--set", set_id, "--data", str(outside), "--split", "val", "--out", str(out)])
        == 2
    )
    assert "outside the configured data roots" in capsys.readouterr().err
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [")
    assert cli.main(["store", "export-npy", "--set", set_id, "--data", str(broken), "--split", "val"]) == 2
    assert not out.exists() or not any(out.iterdir())
