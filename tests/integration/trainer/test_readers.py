"""The four skeleton sources, the parse cache and load_splits, with real files and bad inputs."""

from __future__ import annotations

import os
import pickle
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from lastkd.datapaths import DataPathError
from lastkd.ntu.skeleton import parse_skeleton_file
from lastkd.student.data import readers
from lastkd.student.data.config import DataConfig
from lastkd.student.data.readers import DataSourceError
from lastkd.student.data.sources import load_splits
from lastkd.student.synth import generate
from tests.support.paths import NTU_SAMPLE_SKELETON

# spec ntu_data.md: NTU60 cross-subject training performers
XSUB_TRAIN = {1, 2, 4, 5, 8, 9, 13, 14, 15, 16, 17, 18, 19, 25, 27, 28, 31, 34, 35, 38}


@pytest.fixture(scope="module")
def synth_skeletons(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "ds"
    generate(out, classes=5, samples_per_class=4, frames=40, video=False, seed=3)
    return out / "skeletons"


@pytest.fixture
def raw_folder(tmp_path: Path, synth_skeletons: Path) -> Path:
    folder = tmp_path / "raw"
    shutil.copytree(synth_skeletons, folder)
    return folder


def _cfg(path: Path, **kw: object) -> DataConfig:
    return DataConfig(path=path, **kw)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# raw folders + cache


def test_raw_folder_splits_labels_data_and_reports(tmp_path: Path, raw_folder: Path) -> None:
    bad = raw_folder / "S017C003P040R002A003.skeleton"
    assert not bad.exists()
    lines = NTU_SAMPLE_SKELETON.read_text().splitlines()
    lines[5] = lines[5].replace("0.2323292", "oops")
    bad.write_text("\n".join(lines) + "\n")
    (raw_folder / "notes.skeleton").write_text("1\n0\n")
    on_list = sorted(p.name for p in raw_folder.glob("S*.skeleton"))[0][:-9]
    missing = tmp_path / "missing.txt"
    missing.write_text(f"{on_list}\nS001C002P005R002A008\n")

    train, val = load_splits(_cfg(raw_folder, split="xsub", missing_skeletons=missing, cache_dir=tmp_path / "cache"))
    everything = sorted(p.name[:-9] for p in raw_folder.glob("S*.skeleton"))
    good = [n for n in everything if n not in (on_list, bad.name[:-9])]
    assert sorted(train.names + val.names) == good
    assert train.names == sorted(train.names) and val.names == sorted(val.names)
    assert all(int(n[9:12]) in XSUB_TRAIN for n in train.names)
    assert all(int(n[9:12]) not in XSUB_TRAIN for n in val.names)
    for coll in (train, val):
        assert isinstance(coll.data, np.memmap) and coll.data.dtype == np.float32
        assert coll.labels.tolist() == [int(n[-3:]) - 1 for n in coll.names]
        assert coll.excluded_missing == 1
        assert any(m.startswith(f"{bad.name}:6: non-numeric value 'oops'") for m in coll.malformed), coll.malformed
        assert any(m.startswith("notes.skeleton:0:") for m in coll.malformed)
        for i, name in enumerate(coll.names):
            parsed = parse_skeleton_file(raw_folder / f"{name}.skeleton")
            assert coll.lengths[i] == parsed.frames
            np.testing.assert_array_equal(coll.data[i, :, : parsed.frames], parsed.coords)
            assert not coll.data[i, :, parsed.frames :].any()
    assert len(train.source_hash) == 64 and train.source_hash == val.source_hash


def test_reference_mode_uses_reference_assignment(tmp_path: Path, raw_folder: Path) -> None:
    train, val = load_splits(_cfg(raw_folder, streams_mode="reference", cache_dir=tmp_path / "c"))
    for coll in (train, val):
        for i, name in enumerate(coll.names):
            parsed = parse_skeleton_file(raw_folder / f"{name}.skeleton", "reference")
            np.testing.assert_array_equal(coll.data[i, :, : parsed.frames], parsed.coords)
    tracked, _ = load_splits(_cfg(raw_folder, cache_dir=tmp_path / "c"))
    assert tracked.source_hash != train.source_hash  # the mode is part of the fingerprint


def test_cache_second_load_never_parses_and_changes_rebuild(
    tmp_path: Path, raw_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _cfg(raw_folder, split="xview")
    calls: list[str] = []
    real = readers.parse_skeleton_file

    def counting(path: str, mode: str = "tracked"):  # type: ignore[no-untyped-def]
        calls.append(path)
        return real(path, mode)  # type: ignore[arg-type]

    monkeypatch.setattr(readers, "parse_skeleton_file", counting)
    first_train, first_val = load_splits(cfg, workers=1)
    n_files = len(list(raw_folder.glob("*.skeleton")))
    assert len(calls) == n_files
    assert (raw_folder / ".lastkd_cache").is_dir()  # default location: inside the folder

    def refuse(path: str, mode: str = "tracked"):  # type: ignore[no-untyped-def]
        raise AssertionError(f"parsed {path} although the cache is current")

    monkeypatch.setattr(readers, "parse_skeleton_file", refuse)
    again_train, again_val = load_splits(cfg, workers=1)
    assert again_train.names == first_train.names and again_val.names == first_val.names
    np.testing.assert_array_equal(np.asarray(again_train.data), np.asarray(first_train.data))
    assert again_train.source_hash == first_train.source_hash

    # touching one file (new mtime) invalidates the cache
    monkeypatch.setattr(readers, "parse_skeleton_file", counting)
    calls.clear()
    victim = sorted(raw_folder.glob("*.skeleton"))[3]
    st = victim.stat()
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    touched, _ = load_splits(cfg, workers=1)
    assert len(calls) == n_files and touched.source_hash != first_train.source_hash

    # adding a file invalidates it too, and the new sample shows up
    calls.clear()
    shutil.copy(NTU_SAMPLE_SKELETON, raw_folder / "S002C002P002R001A003.skeleton")
    added_train, _ = load_splits(cfg, workers=1)
    assert len(calls) == n_files + 1
    assert "S002C002P002R001A003" in added_train.names
    leftovers = [p.name for p in (raw_folder / ".lastkd_cache").iterdir() if p.name.startswith(".tmp")]
    assert leftovers == []


def test_crash_during_build_leaves_no_cache(tmp_path: Path, raw_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    cfg = _cfg(raw_folder, cache_dir=cache)
    real = readers.parse_skeleton_file
    count = {"n": 0}

    def dies(path: str, mode: str = "tracked"):  # type: ignore[no-untyped-def]
        count["n"] += 1
        if count["n"] == 5:
            raise RuntimeError("simulated crash")
        return real(path, mode)  # type: ignore[arg-type]

    monkeypatch.setattr(readers, "parse_skeleton_file", dies)
    with pytest.raises(RuntimeError, match="simulated crash"):
        load_splits(cfg, workers=1)
    assert list(cache.iterdir()) == []  # neither a half cache nor a temp folder
    monkeypatch.setattr(readers, "parse_skeleton_file", real)
    train, val = load_splits(cfg, workers=1)
    assert len(train) + len(val) == 20


def test_damaged_cache_is_rebuilt(tmp_path: Path, raw_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    cfg = _cfg(raw_folder, cache_dir=cache)
    train, _ = load_splits(cfg, workers=1)
    expected = np.array(train.data)
    (entry,) = list(cache.iterdir())
    data = entry / "data.npy"
    data.write_bytes(data.read_bytes()[:1000])  # truncated by a full disk, say
    calls: list[str] = []
    real = readers.parse_skeleton_file
    monkeypatch.setattr(readers, "parse_skeleton_file", lambda p, m="tracked": calls.append(p) or real(p, m))
    rebuilt, _ = load_splits(cfg, workers=1)
    assert len(calls) == 20
    np.testing.assert_array_equal(np.asarray(rebuilt.data), expected)


def test_process_pool_parse_matches_serial(tmp_path: Path, synth_skeletons: Path) -> None:
    folder = tmp_path / "big"
    folder.mkdir()
    for p in synth_skeletons.glob("*.skeleton"):  # 20 files x 4 setups = 80 > the pool threshold
        for setup in (1, 3, 5, 7):
            shutil.copy(p, folder / f"S{setup:03d}{p.name[4:]}")
    assert len(list(folder.iterdir())) >= readers.POOL_MIN_FILES
    pooled = load_splits(_cfg(folder, cache_dir=tmp_path / "a"), workers=2)
    serial = load_splits(_cfg(folder, cache_dir=tmp_path / "b"), workers=1)
    for a, b in zip(pooled, serial):
        assert a.names == b.names
        np.testing.assert_array_equal(np.asarray(a.data), np.asarray(b.data))


def test_raw_folder_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataSourceError, match="no .skeleton files"):
        load_splits(_cfg(empty))
    with pytest.raises(DataSourceError, match="not a folder"):
        load_splits(_cfg(tmp_path / "absent"))
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    shutil.copy(NTU_SAMPLE_SKELETON, wrong / "S001C001P001R001A061.skeleton")
    with pytest.raises(DataSourceError, match="outside ntu60"):
        load_splits(_cfg(wrong))
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "S001C001P001R001A001.skeleton").write_bytes(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(DataSourceError, match=r"none of the 1 .skeleton files is usable.*binary data"):
        load_splits(_cfg(junk))
    one_side = tmp_path / "one_side"
    one_side.mkdir()
    shutil.copy(NTU_SAMPLE_SKELETON, one_side / "S001C001P001R001A001.skeleton")
    with pytest.raises(DataSourceError, match="no validation samples"):
        load_splits(_cfg(one_side))


def test_data_roots_refuse_paths_outside(tmp_path: Path, raw_folder: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with pytest.raises(DataPathError, match="outside the configured data roots"):
        load_splits(_cfg(raw_folder), data_roots=[elsewhere])
    link = elsewhere / "sneaky"
    link.symlink_to(raw_folder)
    with pytest.raises(DataPathError, match="outside the configured data roots"):
        load_splits(_cfg(link), data_roots=[elsewhere])
    train, _ = load_splits(_cfg(raw_folder, cache_dir=tmp_path / "c"), data_roots=[tmp_path])
    assert len(train) > 0


def test_max_samples_keeps_every_class(tmp_path: Path, raw_folder: Path) -> None:
    train, val = load_splits(_cfg(raw_folder, split="xview", cache_dir=tmp_path / "c", max_samples=5))
    assert len(train) == 5 and sorted(train.labels.tolist()) == [0, 1, 2, 3, 4]
    assert len(val) == 5 and sorted(val.labels.tolist()) == [0, 1, 2, 3, 4]
    assert train.names == sorted(train.names)


# ---------------------------------------------------------------------------------------------
# CTR-GCN .npz


def _npz_data(n: int, t: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = np.zeros((n, t, 150), dtype=np.float32)
    lengths = rng.integers(3, t + 1, size=n)
    for i, length in enumerate(lengths):
        x[i, :length, :75] = rng.normal(size=(length, 75))
        if i % 2:
            x[i, :length, 75:] = rng.normal(size=(length, 75))  # a second body
    labels = rng.integers(0, classes, size=n)
    return x, np.eye(classes, dtype=np.float32)[labels], lengths


@pytest.mark.parametrize("compressed", [False, True])
def test_ctrgcn_npz_layout(tmp_path: Path, compressed: bool) -> None:
    x_tr, y_tr, len_tr = _npz_data(6, 12, 60, 0)
    x_te, y_te, len_te = _npz_data(4, 12, 60, 1)
    path = tmp_path / "NTU60_CS.npz"
    (np.savez_compressed if compressed else np.savez)(path, x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te)
    train, val = load_splits(_cfg(path, format="ctrgcn_npz"))
    for coll, x, y, lengths, side in ((train, x_tr, y_tr, len_tr, "train"), (val, x_te, y_te, len_te, "test")):
        assert coll.data is not None and coll.data.shape == (len(x), 3, 12, 25, 2)
        n, t, m, v, c = 1, 5, 1, 7, 2  # independent index check: x[n, t, m*75 + v*3 + c]
        assert coll.data[n, c, t, v, m] == x[n, t, m * 75 + v * 3 + c]
        ref = x.reshape(len(x), 12, 2, 25, 3).transpose(0, 4, 1, 3, 2)
        np.testing.assert_array_equal(np.asarray(coll.data), ref)
        assert coll.labels.tolist() == y.argmax(1).tolist()
        assert coll.lengths.tolist() == lengths.tolist()
        assert coll.names[0] == f"npz_{side}_000000"
    if not compressed:
        assert isinstance(train.data.base, np.memmap) or isinstance(train.data, np.memmap)


def test_ctrgcn_npz_drops_all_zero_samples(tmp_path: Path) -> None:
    x, y, _ = _npz_data(5, 8, 60, 2)
    x[2] = 0
    path = tmp_path / "d.npz"
    np.savez(path, x_train=x, y_train=y, x_test=x, y_test=y)
    train, _ = load_splits(_cfg(path, format="ctrgcn_npz"))
    assert len(train) == 4 and "npz_train_000002" not in train.names
    assert train.malformed == ["d.npz:x_train[2]: all-zero sample"]


def _npz_case(tmp_path: Path, case: str) -> tuple[Path, str]:
    x, y, _ = _npz_data(4, 8, 60, 3)
    path = tmp_path / f"{case}.npz"
    arrays = {"x_train": x, "y_train": y, "x_test": x, "y_test": y}
    expect = ""
    if case == "missing_key":
        del arrays["y_test"]
        expect = r"missing arrays \['y_test'\]"
    elif case == "wrong_shape":
        arrays["x_train"] = x[:, :, :149]
        expect = r"shape \(4, 8, 149\), expected \(N, T, 150\)"
    elif case == "int_coords":
        arrays["x_train"] = x.astype(np.int32)
        expect = "dtype int32, expected float"
    elif case == "count_mismatch":
        arrays["y_train"] = y[:3]
        expect = "3 labels for 4 samples"
    elif case == "width":
        arrays["y_test"] = np.eye(120, dtype=np.float32)[[0, 1, 2, 3]]
        expect = "one-hot width 120, but ntu60 has 60 classes"
    elif case == "not_one_hot":
        bad = y.copy()
        bad[1, :] = 0.5
        arrays["y_train"] = bad
        expect = "row 1 is not one-hot"
    elif case == "int_labels_out_of_range":
        arrays["y_train"] = np.array([0, 5, 60, 2])
        expect = "label 60 of sample 2 is outside 0..59"
    np.savez(path, **arrays)
    if case == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        expect = "not a valid .npz archive"
    elif case == "truncated_member":
        # keep the zip directory but cut a member short: rewrite the member with a lying header
        with zipfile.ZipFile(path, "w") as zf:
            header = tmp_path / "member.npy"
            np.save(header, x)
            zf.writestr("x_train.npy", header.read_bytes()[:500])
            for k in ("y_train", "x_test", "y_test"):
                np.save(header, arrays[k])
                zf.writestr(f"{k}.npy", header.read_bytes())
        expect = r"x_train\]: truncated array"
    elif case == "empty":
        path.write_bytes(b"")
        expect = "empty file"
    elif case == "object_array":
        with zipfile.ZipFile(path, "w") as zf:
            tmp = tmp_path / "obj.npy"
            np.save(tmp, np.array([{"a": 1}], dtype=object), allow_pickle=True)
            for k in ("x_train", "y_train", "x_test", "y_test"):
                zf.writestr(f"{k}.npy", tmp.read_bytes())
        expect = "Python objects"
    return path, expect


@pytest.mark.parametrize(
    "case",
    [
        "missing_key",
        "wrong_shape",
        "int_coords",
        "count_mismatch",
        "width",
        "not_one_hot",
        "int_labels_out_of_range",
        "truncated",
        "truncated_member",
        "empty",
        "object_array",
    ],
)
def test_ctrgcn_npz_errors(tmp_path: Path, case: str) -> None:
    path, expect = _npz_case(tmp_path, case)
    with pytest.raises(DataSourceError, match=expect):
        load_splits(_cfg(path, format="ctrgcn_npz"))


# ---------------------------------------------------------------------------------------------
# PYSKL pickle


def _pyskl(n_train: int = 3, n_val: int = 2) -> dict:
    rng = np.random.default_rng(5)
    names = [f"S001C00{1 + i % 3}P00{1 + i}R001A00{1 + i}" for i in range(n_train + n_val)]
    anns = []
    for i, name in enumerate(names):
        m, t = (1 + i % 2), 6 + i
        anns.append(
            {
                "frame_dir": name,
                "label": i,
                "total_frames": t,
                "img_shape": (1080, 1920),
                "keypoint": rng.normal(size=(m, t, 25, 3)).astype(np.float32),
            }
        )
    return {"split": {"xsub_train": names[:n_train], "xsub_val": names[n_train:]}, "annotations": anns}


def _dump(path: Path, obj: object) -> Path:
    path.write_bytes(pickle.dumps(obj, protocol=4))
    return path


def test_pyskl_reads_keypoints(tmp_path: Path) -> None:
    obj = _pyskl()
    path = _dump(tmp_path / "ntu60_3danno.pkl", obj)
    train, val = load_splits(_cfg(path, format="pyskl"), data_roots=[tmp_path])
    assert train.names == obj["split"]["xsub_train"] and val.names == obj["split"]["xsub_val"]
    assert train.labels.tolist() == [0, 1, 2] and val.labels.tolist() == [3, 4]
    for coll, anns in ((train, obj["annotations"][:3]), (val, obj["annotations"][3:])):
        for i, ann in enumerate(anns):
            kp = ann["keypoint"]  # (M, T, V, C)
            m, t = kp.shape[:2]
            assert coll.lengths[i] == t
            np.testing.assert_array_equal(coll.data[i, :, :t, :, :m], kp.transpose(3, 1, 2, 0))
            assert not coll.data[i, :, :, :, m:].any() and not coll.data[i, :, t:].any()


def test_pyskl_missing_list_excludes(tmp_path: Path) -> None:
    obj = _pyskl()
    path = _dump(tmp_path / "a.pkl", obj)
    missing = tmp_path / "missing.txt"
    missing.write_text(obj["split"]["xsub_train"][1] + "\n")
    train, _ = load_splits(_cfg(path, format="pyskl", missing_skeletons=missing), data_roots=[tmp_path])
    assert len(train) == 2 and train.excluded_missing == 1


def test_pyskl_refused_outside_roots_or_without_roots(tmp_path: Path) -> None:
    path = _dump(tmp_path / "a.pkl", _pyskl())
    with pytest.raises(DataSourceError, match="without configured data roots"):
        load_splits(_cfg(path, format="pyskl"))
    other = tmp_path / "roots"
    other.mkdir()
    with pytest.raises(DataPathError, match="outside the configured data roots"):
        load_splits(_cfg(path, format="pyskl"), data_roots=[other])


class _Evil:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, ("touch pwned_by_pickle",))


def test_pyskl_code_in_pickle_is_not_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    obj = _pyskl()
    obj["annotations"][0]["extra"] = _Evil()
    path = _dump(tmp_path / "evil.pkl", obj)
    with pytest.raises(DataSourceError, match=r"refusing to load (posix|os)\.system"):
        load_splits(_cfg(path, format="pyskl"), data_roots=[tmp_path])
    assert not (tmp_path / "pwned_by_pickle").exists()


def _break(obj: dict, case: str) -> tuple[object, str]:
    anns = obj["annotations"]
    if case == "not_dict":
        return [1, 2], r"expected a dict with 'split' and 'annotations', got list"
    if case == "no_annotations":
        return {"split": obj["split"]}, r"got \['split'\]"
    if case == "split_key":
        obj["split"] = {"xview_train": [], "xview_val": []}
        return obj, r"split 'xsub_train' missing .* splits: \['xview_train', 'xview_val'\]"
    if case == "unknown_name":
        obj["split"]["xsub_val"].append("S009C001P009R001A009")
        return obj, "names 1 samples without annotation, e.g. 'S009C001P009R001A009'"
    if case == "keypoint_shape":
        anns[1]["keypoint"] = anns[1]["keypoint"][..., :2]
        return obj, r"keypoint shape \(2, 7, 25, 2\), expected \(M, T, 25, 3\)"
    if case == "keypoint_type":
        anns[1]["keypoint"] = anns[1]["keypoint"].tolist()
        return obj, "'keypoint' is list, expected a numpy array"
    if case == "total_frames":
        anns[0]["total_frames"] = 99
        return obj, "total_frames 99 does not match keypoint length 6"
    if case == "label_range":
        anns[2]["label"] = 60
        return obj, "label 60 of sample 2 is outside 0..59"
    if case == "label_type":
        anns[2]["label"] = "2"
        return obj, "label '2' is not an integer"
    if case == "nan":
        anns[0]["keypoint"][0, 0, 0, 0] = np.nan
        return obj, "NaN or infinite"
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case",
    [
        "not_dict",
        "no_annotations",
        "split_key",
        "unknown_name",
        "keypoint_shape",
        "keypoint_type",
        "total_frames",
        "label_range",
        "label_type",
        "nan",
    ],
)
def test_pyskl_structure_errors(tmp_path: Path, case: str) -> None:
    obj, expect = _break(_pyskl(), case)
    path = _dump(tmp_path / "bad.pkl", obj)
    with pytest.raises(DataSourceError, match=expect):
        load_splits(_cfg(path, format="pyskl"), data_roots=[tmp_path])


@pytest.mark.parametrize("content,expect", [(b"", "empty file"), (b"\x80\x04\x95\x10\x00", "truncated")])
def test_pyskl_empty_or_truncated(tmp_path: Path, content: bytes, expect: str) -> None:
    path = tmp_path / "x.pkl"
    if content:
        content = pickle.dumps(_pyskl(), protocol=4)[:300]
    path.write_bytes(content)
    with pytest.raises(DataSourceError, match=expect):
        load_splits(_cfg(path, format="pyskl"), data_roots=[tmp_path])


# ---------------------------------------------------------------------------------------------
# LAST stream .npy + labels


def _last_dir(
    root: Path, labels: dict[str, object], n: dict[str, int], sub: str = "xsub"
) -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(7)
    folder = root / sub
    folder.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, dict[str, np.ndarray]] = {}
    for side in ("train", "val"):
        arrays[side] = {}
        for stream in ("joint", "velocity", "bone"):
            a = rng.normal(size=(n[side], 3, 10, 25, 2)).astype(np.float32)
            arrays[side][stream] = a
            np.save(folder / f"{side}_{stream}.npy", a)
        _dump(folder / f"{side}_label.pkl", labels[side])
    return arrays


def test_last_npy_streams_memory_mapped(tmp_path: Path) -> None:
    arrays = _last_dir(tmp_path, {"train": [3, 1, 4], "val": [1, 5]}, {"train": 3, "val": 2})
    train, val = load_splits(_cfg(tmp_path, format="last_npy"), data_roots=[tmp_path])
    assert train.data is None and train.streams is not None
    assert isinstance(train.streams["joint"], np.memmap)
    assert train.labels.tolist() == [3, 1, 4] and val.labels.tolist() == [1, 5]
    assert train.names == ["last_train_000000", "last_train_000001", "last_train_000002"]
    for stream in ("joint", "velocity", "bone"):
        np.testing.assert_array_equal(np.asarray(val.streams[stream]), arrays["val"][stream])


def test_last_npy_names_missing_and_zero_samples(tmp_path: Path) -> None:
    names = ["S001C001P001R001A004", "S001C002P005R002A008", "S001C001P002R001A005"]
    _last_dir(tmp_path, {"train": (names, [3, 7, 4]), "val": [0, 1]}, {"train": 3, "val": 2}, sub="")
    zero = np.load(tmp_path / "val_joint.npy")
    zero[1] = 0
    np.save(tmp_path / "val_joint.npy", zero)
    missing = tmp_path / "m.txt"
    missing.write_text("S001C002P005R002A008\n")
    cfg = _cfg(tmp_path, format="last_npy", missing_skeletons=missing)
    train, val = load_splits(cfg, data_roots=[tmp_path])  # files directly in the root (fallback)
    assert train.names == [names[0], names[2]] and train.excluded_missing == 1
    assert train.labels.tolist() == [3, 4]
    assert len(val) == 1 and val.malformed == ["val_joint.npy:1: all-zero sample"]


def test_last_npy_label_path_folder(tmp_path: Path) -> None:
    _last_dir(tmp_path / "data", {"train": [1, 2], "val": [3]}, {"train": 2, "val": 1})
    labels = tmp_path / "labels"
    labels.mkdir()
    _dump(labels / "train_label.pkl", [9, 8])
    _dump(labels / "val_label.pkl", [7])
    train, val = load_splits(_cfg(tmp_path / "data", format="last_npy", label_path=labels), data_roots=[tmp_path])
    assert train.labels.tolist() == [9, 8] and val.labels.tolist() == [7]


def _break_last(root: Path, case: str) -> str:
    folder = root / "xsub"
    if case == "shape_mismatch":
        np.save(folder / "train_bone.npy", np.ones((2, 3, 10, 25, 2), np.float32))
        return "train streams differ in shape"
    if case == "bad_ndim":
        np.save(folder / "val_velocity.npy", np.ones((2, 3, 10, 25), np.float32))
        return r"shape \(2, 3, 10, 25\), expected \(N, 3, T, 25, M\)"
    if case == "int_dtype":
        np.save(folder / "val_joint.npy", np.ones((2, 3, 10, 25, 2), np.int16))
        return "dtype int16, expected float32"
    if case == "truncated":
        p = folder / "train_joint.npy"
        p.write_bytes(p.read_bytes()[:4000])
        return "truncated .npy"
    if case == "empty":
        (folder / "train_velocity.npy").write_bytes(b"")
        return "empty file"
    if case == "not_npy":
        (folder / "train_velocity.npy").write_bytes(b"hello world, not numpy")
        return "not a valid .npy"
    if case == "absent":
        (folder / "val_bone.npy").unlink()
        return "missing val_bone.npy"
    if case == "label_count":
        _dump(folder / "train_label.pkl", [1, 2])
        return "2 labels for 3 samples"
    if case == "label_range":
        _dump(folder / "val_label.pkl", [1, 60])
        return "label 60 of sample 1 is outside 0..59"
    if case == "label_type":
        _dump(folder / "val_label.pkl", {"labels": [1, 2]})
        return "expected a list of labels or a \\(names, labels\\) tuple, got dict"
    if case == "label_float":
        _dump(folder / "val_label.pkl", [1.0, 2.0])
        return "label 0 is 1.0, expected an integer"
    if case == "names_labels_mismatch":
        _dump(folder / "val_label.pkl", (["a", "b", "c"], [1, 2]))
        return "3 names but 2 labels"
    if case == "label_empty":
        (folder / "train_label.pkl").write_bytes(b"")
        return "empty file"
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case",
    [
        "shape_mismatch",
        "bad_ndim",
        "int_dtype",
        "truncated",
        "empty",
        "not_npy",
        "absent",
        "label_count",
        "label_range",
        "label_type",
        "label_float",
        "names_labels_mismatch",
        "label_empty",
    ],
)
def test_last_npy_errors(tmp_path: Path, case: str) -> None:
    _last_dir(tmp_path, {"train": [3, 1, 4], "val": [1, 5]}, {"train": 3, "val": 2})
    expect = _break_last(tmp_path, case)
    with pytest.raises(DataSourceError, match=expect):
        load_splits(_cfg(tmp_path, format="last_npy"), data_roots=[tmp_path])


def test_last_npy_label_pickle_needs_roots(tmp_path: Path) -> None:
    _last_dir(tmp_path, {"train": [3, 1, 4], "val": [1, 5]}, {"train": 3, "val": 2})
    with pytest.raises(DataSourceError, match="without configured data roots"):
        load_splits(_cfg(tmp_path, format="last_npy"))
