"""Augmentations, the SkeletonDataset (both stream modes, ready-made streams) and the teacher-feature join."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from lastkd.featurestore import FeatureStore
from lastkd.ntu.skeleton import parse_skeleton_file
from lastkd.student.data import augment as aug
from lastkd.student.data import streams as st
from lastkd.student.data.collection import SkeletonCollection
from lastkd.student.data.config import AugmentConfig, DataConfig
from lastkd.student.data.dataset import (
    DatasetError,
    SkeletonDataset,
    TeacherFeatures,
    build_datasets,
)
from tests.support.paths import NTU_SAMPLE_SKELETON, REFERENCE

STREAM_KEYS = ("joint", "velocity", "bone")
NO_AUG = AugmentConfig(rotate=False, scale=False, shear=False, flip=False, noise=False)


@pytest.fixture(scope="module")
def tracked() -> np.ndarray:
    return parse_skeleton_file(NTU_SAMPLE_SKELETON, body_assignment="tracked").coords


@pytest.fixture(scope="module")
def reference_coords() -> np.ndarray:
    return parse_skeleton_file(NTU_SAMPLE_SKELETON, body_assignment="reference").coords


def _collection(coords: np.ndarray, n: int = 6, t_stored: int = 300) -> SkeletonCollection:
    """n samples made from the real clip: varied lengths (one of 20 frames), every other one with a
    second body that appears late, labels 0..n-1."""
    data = np.zeros((n, 3, t_stored, 25, 2), np.float32)
    lengths = np.zeros(n, np.int64)
    for i in range(n):
        length = 20 if i == 1 else min(t_stored, 60 + 45 * i)
        idx = np.linspace(0, coords.shape[1] - 1, length).astype(int)
        sample = data[i]  # a view: mixing an integer and slices in one index would move axes
        sample[:, :length, :, 0] = coords[:, idx][..., 0]
        if i % 2 == 0:
            sample[:, 5:length, :, 1] = (
                coords[:, idx[5:]][..., 0] + np.array([1.0, 0.0, 0.3], np.float32)[:, None, None]
            )
        lengths[i] = length
    names = [f"S001C001P{i + 1:03d}R001A{i + 1:03d}" for i in range(n)]
    return SkeletonCollection(
        names=names, labels=np.arange(n, dtype=np.int64), data=data, lengths=lengths, source_hash="test"
    )


def _cfg(**kw) -> DataConfig:
    return DataConfig(path="/nonexistent", **kw)


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a if isinstance(a[k], torch.Tensor))


# ------------------------------------------------------------------------------------------------
# Augmentations
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sample_streams(reference_coords: np.ndarray) -> dict[str, np.ndarray]:
    return st.reference_window(reference_coords, 0, 64)


ONLY = {
    "rotate": dict(rotate=True),
    "scale": dict(scale=True, scale_range=(0.5, 0.6)),
    "shear": dict(shear=True, shear_max=0.5),
    "flip": dict(flip=True, flip_prob=1.0),
    "noise": dict(noise=True),
    "joint_drop": dict(joint_drop=True, joint_drop_prob=0.5),
    "part_drop": dict(part_drop=True, part_drop_prob=1.0),
}


def test_all_augmentations_off_leave_streams_unchanged(sample_streams: dict) -> None:
    out = aug.augment(sample_streams, np.random.default_rng(0), NO_AUG)
    for k in STREAM_KEYS:
        assert np.array_equal(out[k], sample_streams[k])


@pytest.mark.parametrize("name", list(ONLY))
def test_each_augmentation_changes_data_deterministically(name: str, sample_streams: dict) -> None:
    cfg = NO_AUG.model_copy(update=ONLY[name])
    out = aug.augment(sample_streams, np.random.default_rng(7), cfg)
    again = aug.augment(sample_streams, np.random.default_rng(7), cfg)
    other = aug.augment(sample_streams, np.random.default_rng(8), cfg)
    for k in STREAM_KEYS:
        assert np.array_equal(out[k], again[k])
        assert not np.array_equal(out[k], sample_streams[k]), (name, k)
    if name != "flip":  # flip is always drawn with probability 1: same output for every seed
        assert not np.array_equal(out["joint"], other["joint"])


def test_augmentation_semantics(sample_streams: dict) -> None:
    x = sample_streams["joint"]
    rng = np.random.default_rng(11)
    params = aug.draw_params(rng, AugmentConfig())
    # rotation about Y: y unchanged, horizontal radius unchanged, angle as drawn
    rot = aug.transform({"j": x}, params, NO_AUG.model_copy(update={"rotate": True}))["j"]
    np.testing.assert_allclose(rot[1], x[1], atol=1e-6)
    np.testing.assert_allclose(np.hypot(rot[0], rot[2]), np.hypot(x[0], x[2]), atol=1e-5)
    a = np.radians(params.angle_deg)
    np.testing.assert_allclose(rot[0], np.cos(a) * x[0] + np.sin(a) * x[2], atol=1e-5)
    assert -15 <= params.angle_deg <= 15
    # scale multiplies, shear moves x by s*y only, flip reverses time
    sc = aug.transform({"j": x}, params, NO_AUG.model_copy(update={"scale": True}))["j"]
    np.testing.assert_allclose(sc, params.scale * x, atol=1e-6)
    sh = aug.transform({"j": x}, params, NO_AUG.model_copy(update={"shear": True}))["j"]
    np.testing.assert_allclose(sh[0], x[0] + params.shear * x[1], atol=1e-6)
    np.testing.assert_array_equal(sh[1:], x[1:])
    fl = aug.apply_flip(x, dataclasses.replace(params, flip=True), NO_AUG.model_copy(update={"flip": True}))
    np.testing.assert_array_equal(fl, x[:, ::-1])
    # noise: zero-mean, std as configured, independent per stream
    noisy = aug.add_noise(
        {"a": np.zeros_like(x), "b": np.zeros_like(x)}, rng, NO_AUG.model_copy(update={"noise": True})
    )
    assert noisy["a"].std() == pytest.approx(0.01, rel=0.05) and abs(noisy["a"].mean()) < 1e-3
    assert not np.array_equal(noisy["a"], noisy["b"])


def test_drops_zero_whole_joints_and_parts(sample_streams: dict) -> None:
    cfg = NO_AUG.model_copy(update={"part_drop": True, "part_drop_prob": 1.0})
    seen_parts = set()
    for seed in range(30):
        out = aug.augment(sample_streams, np.random.default_rng(seed), cfg)
        zero = [v for v in range(25) if not out["joint"][:, :, v].any()]
        part = next(p for p, joints in aug.BODY_PARTS.items() if set(joints) == set(zero))
        seen_parts.add(part)
        for k in STREAM_KEYS:
            assert not out[k][:, :, list(aug.BODY_PARTS[part])].any()
    assert seen_parts == set(aug.BODY_PARTS)
    assert sorted(v for joints in aug.BODY_PARTS.values() for v in joints) == list(range(25))
    cfg = NO_AUG.model_copy(update={"joint_drop": True, "joint_drop_prob": 0.3})
    out = aug.augment(sample_streams, np.random.default_rng(5), cfg)
    dropped = [v for v in range(25) if not out["joint"][:, :, v].any()]
    assert 0 < len(dropped) < 25
    for k in STREAM_KEYS:
        assert not out[k][:, :, dropped].any()


def test_switching_one_augmentation_off_keeps_the_others(sample_streams: dict) -> None:
    full = AugmentConfig()
    with_noise = aug.augment(sample_streams, np.random.default_rng(3), full)
    without = aug.augment(sample_streams, np.random.default_rng(3), full.model_copy(update={"noise": False}))
    diff = with_noise["joint"] - without["joint"]
    assert 0.005 < diff.std() < 0.02  # they differ by the noise alone


# ------------------------------------------------------------------------------------------------
# Dataset
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["standard", "reference"])
@pytest.mark.parametrize("train", [True, False])
def test_items_have_the_contracted_shapes(mode: str, train: bool, tracked: np.ndarray) -> None:
    col = _collection(tracked)
    ds = SkeletonDataset(col, _cfg(streams_mode=mode, streams=("joint", "bone")), train=train, seed=1)
    assert len(ds) == 6
    item = ds[3]
    assert list(item) == ["joint", "bone", "label", "teacher", "has_teacher", "index"]
    for k in ("joint", "bone"):
        assert item[k].dtype == torch.float32 and item[k].shape == (3, 64, 25, 2)
        assert torch.isfinite(item[k]).all()
    assert item["label"].dtype == torch.int64 and int(item["label"]) == 3
    assert item["teacher"].shape == (0,) and item["has_teacher"].item() is False and item["index"] == 3
    assert _same(ds[-3], ds[3])  # negative indexing is the same sample (and the same draw)
    batch = next(iter(DataLoader(ds, batch_size=4)))
    assert batch["joint"].shape == (4, 3, 64, 25, 2) and batch["label"].tolist() == [0, 1, 2, 3]
    assert batch["index"].tolist() == [0, 1, 2, 3]


def test_reference_val_item_matches_golden(reference_coords: np.ndarray) -> None:
    golden = torch.load(REFERENCE / "last_v2_small_golden.pt", weights_only=True)["mib_sample"]["val_center_crop"]
    data = np.zeros((1, 3, 300, 25, 2), np.float32)
    data[0, :, :103] = reference_coords
    col = SkeletonCollection(["S001C001P001R001A001"], np.zeros(1, np.int64), data, np.array([103]), "x")
    item = SkeletonDataset(col, _cfg(streams_mode="reference"), train=False)[0]
    for k in STREAM_KEYS:
        torch.testing.assert_close(item[k], golden[k], atol=1e-5, rtol=0)


def test_standard_items_keep_absent_body_zero_and_short_clips_moving(tracked: np.ndarray) -> None:
    col = _collection(tracked)
    for train in (False, True):
        ds = SkeletonDataset(col, _cfg(), train=train, seed=4)
        short = ds[1]  # 20 frames, one body
        for k in STREAM_KEYS:
            assert not short[k][..., 1].any(), (train, k)  # noise is not added to an absent body
        moving = short["velocity"][..., 0].abs().amax(dim=(0, 2)) > 1e-4
        assert moving.float().mean() > 0.9
        # the reference centre crop of the same clip is frozen
    ref = SkeletonDataset(col, _cfg(streams_mode="reference"), train=False)[1]
    assert not ref["velocity"].any()


def test_augmentation_is_deterministic_per_seed_epoch_index(tracked: np.ndarray) -> None:
    col = _collection(tracked)
    for mode in ("standard", "reference"):
        ds = SkeletonDataset(col, _cfg(streams_mode=mode), train=True, seed=5)
        twin = SkeletonDataset(col, _cfg(streams_mode=mode), train=True, seed=5)
        other_seed = SkeletonDataset(col, _cfg(streams_mode=mode), train=True, seed=6)
        e0 = ds[2]
        assert _same(e0, twin[2]) and _same(e0, ds[2])
        assert not torch.equal(e0["joint"], other_seed[2]["joint"])
        ds.set_epoch(1)
        assert ds.epoch == 1 and not torch.equal(e0["joint"], ds[2]["joint"])
        ds.set_epoch(0)
        assert _same(e0, ds[2])
    val = SkeletonDataset(col, _cfg(), train=False)
    first = val[2]
    val.set_epoch(3)
    assert _same(first, val[2])  # validation items never change


def test_standard_flip_gives_the_velocity_of_the_reversed_motion(tracked: np.ndarray) -> None:
    col = _collection(tracked)
    flipped = SkeletonDataset(
        col, _cfg(augment=NO_AUG.model_copy(update={"flip": True, "flip_prob": 1.0})), train=True, seed=2
    )[4]
    plain = SkeletonDataset(col, _cfg(augment=NO_AUG), train=True, seed=2)[4]  # same window, no flip
    torch.testing.assert_close(flipped["joint"], plain["joint"].flip(1), atol=0, rtol=0)
    torch.testing.assert_close(flipped["bone"], plain["bone"].flip(1), atol=0, rtol=0)
    # reversed time: the velocity is the negated, reversed forward velocity (not reversed as-is)
    torch.testing.assert_close(flipped["velocity"][:, :-1], -plain["velocity"][:, :-1].flip(1), atol=1e-6, rtol=0)
    assert plain["velocity"].abs().max() > 0.01


def test_dataloader_workers_give_the_same_items(tracked: np.ndarray) -> None:
    col = _collection(tracked)
    train_ds, val_ds, _ = build_datasets(_cfg(), col, col, seed=9)

    def collect(loader: DataLoader) -> dict[str, torch.Tensor]:
        batches = list(loader)
        return {k: torch.cat([b[k] for b in batches]) for k in ("joint", "velocity", "bone", "index")}

    serial = collect(DataLoader(val_ds, batch_size=2, num_workers=0))
    parallel = collect(DataLoader(val_ds, batch_size=2, num_workers=2))
    for k in serial:
        assert torch.equal(serial[k], parallel[k]), k
    # training: persistent workers must see set_epoch (shared-memory epoch)
    loader = DataLoader(train_ds, batch_size=3, num_workers=2, persistent_workers=True)
    got = {}
    for epoch in (0, 1):
        train_ds.set_epoch(epoch)
        got[epoch] = collect(loader)
    for epoch in (0, 1):
        train_ds.set_epoch(epoch)
        expect = collect(DataLoader(train_ds, batch_size=3, num_workers=0))
        assert torch.equal(got[epoch]["joint"], expect["joint"]), epoch
    assert not torch.equal(got[0]["joint"], got[1]["joint"])


def test_ready_made_streams_are_cropped_like_the_reference(tracked: np.ndarray) -> None:
    rng = np.random.default_rng(0)
    streams = {k: rng.normal(size=(3, 3, 300, 25, 2)).astype(np.float32) for k in STREAM_KEYS}
    col = SkeletonCollection(
        ["a", "b", "c"], np.array([0, 1, 2]), None, np.array([300, 300, 120]), "npy", streams=streams
    )
    item = SkeletonDataset(col, _cfg(streams_mode="reference"), train=False)[1]
    for k in STREAM_KEYS:
        np.testing.assert_array_equal(item[k].numpy(), streams[k][1][:, 118:182])
    item = SkeletonDataset(col, _cfg(streams_mode="standard"), train=False)[2]
    idx = np.rint(np.linspace(0, 119, 64)).astype(int)
    np.testing.assert_array_equal(item["joint"].numpy(), streams["joint"][2][:, idx])
    train_item = SkeletonDataset(col, _cfg(streams_mode="reference"), train=True)[0]
    assert train_item["joint"].shape == (3, 64, 25, 2)


def test_bad_collections_and_arguments_are_rejected(tracked: np.ndarray) -> None:
    col = _collection(tracked)
    with pytest.raises(DatasetError, match=r"labels must lie in \[0, 60\)"):
        bad = _collection(tracked)
        bad.labels[0] = 60
        SkeletonDataset(bad, _cfg(), train=True)
    with pytest.raises(DatasetError, match="lengths"):
        bad = _collection(tracked)
        bad.lengths[0] = 301
        SkeletonDataset(bad, _cfg(), train=True)
    wrong = SkeletonCollection(
        ["a"], np.zeros(1, np.int64), np.zeros((1, 3, 10, 17, 2), np.float32), np.array([10]), "x"
    )
    with pytest.raises(DatasetError, match=r"expected \(N, 3, T, 25, 2\)"):
        SkeletonDataset(wrong, _cfg(), train=False)
    only_joint = SkeletonCollection(
        ["a"],
        np.zeros(1, np.int64),
        None,
        np.array([10]),
        "x",
        streams={"joint": np.zeros((1, 3, 10, 25, 2), np.float32)},
    )
    with pytest.raises(DatasetError, match="no raw data"):
        SkeletonDataset(only_joint, _cfg(), train=False)
    with pytest.raises(DatasetError, match="SkeletonCollection"):
        SkeletonDataset(col.data, _cfg(), train=False)  # type: ignore[arg-type]
    ds = SkeletonDataset(col, _cfg(), train=True)
    with pytest.raises(DatasetError, match="epoch"):
        ds.set_epoch(-1)
    with pytest.raises(IndexError):
        ds[6]
    with pytest.raises(TypeError):
        ds["0"]  # type: ignore[index]
    with pytest.raises(DatasetError, match="seed"):
        SkeletonDataset(col, _cfg(), train=True, seed=-2)
    with pytest.raises(DatasetError, match="together"):
        build_datasets(_cfg(), col, col, teacher_store_path="/tmp/x")
    empty = col.subset(np.array([], dtype=np.int64))
    with pytest.raises(DatasetError, match="empty split"):
        build_datasets(_cfg(), col, empty)


# ------------------------------------------------------------------------------------------------
# Teacher features
# ------------------------------------------------------------------------------------------------


@pytest.fixture()
def store_with_half(tmp_path, tracked: np.ndarray):
    col = _collection(tracked)
    path = tmp_path / "features.lmdb"
    store = FeatureStore(path, map_size=1 << 24)
    meta = store.create_set(
        teacher="videomae_v2_vit_b", weights_sha256=None, preprocessing={"frames": 16}, dim=8, dtype="float32"
    )
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(3, 8)).astype(np.float32)
    covered = [col.names[i] for i in (0, 2, 4)]
    store.put_many(meta.set_id, covered, vectors)
    store.close()
    return path, meta.set_id, col, dict(zip(covered, vectors))


def test_teacher_join_coverage_stats_and_items(store_with_half) -> None:
    path, set_id, col, vectors = store_with_half
    teacher = TeacherFeatures.from_store(path, set_id, col.names)
    assert teacher.dim == 8 and teacher.coverage.found == 3 and teacher.coverage.total == 6
    assert teacher.coverage.fraction == 0.5
    mean, std = teacher.stats()
    stacked = np.stack(list(vectors.values()))
    np.testing.assert_allclose(mean, stacked.mean(axis=0), atol=1e-6)
    np.testing.assert_allclose(std, stacked.std(axis=0), atol=1e-6)
    # no flip: a flipped training sample has no teacher target (tested below), the join is tested here
    cfg = _cfg(augment=NO_AUG)
    train_ds, val_ds, info = build_datasets(cfg, col, col.subset(np.array([1, 2])), path, set_id, seed=3)
    assert info.coverage_train == 0.5 and info.coverage_val == 0.5 and info.feature_dim == 8
    assert (info.num_classes, info.train_size, info.val_size) == (60, 6, 2)
    for ds in (train_ds, val_ds):
        for i in range(len(ds)):
            item = ds[i]
            name = ds.collection.names[i]
            assert item["teacher"].dtype == torch.float32 and item["teacher"].shape == (8,)
            if name in vectors:
                assert item["has_teacher"].item() is True
                np.testing.assert_array_equal(item["teacher"].numpy(), vectors[name])
            else:
                assert item["has_teacher"].item() is False and not item["teacher"].any()
    batch = next(iter(DataLoader(train_ds, batch_size=6)))
    assert batch["teacher"].shape == (6, 8) and batch["has_teacher"].tolist() == [True, False] * 3


@pytest.mark.parametrize("mode", ["standard", "reference"])
def test_flipped_samples_leave_the_distillation_term_unless_reuse_is_asked(store_with_half, mode: str) -> None:
    """A flipped view is the clip time-reversed, but the stored vector is of the clip played
    forwards: by default a flipped sample keeps its label and streams but gets no teacher target."""
    path, set_id, col, vectors = store_with_half
    always = AugmentConfig(rotate=False, scale=False, shear=False, flip=True, flip_prob=1.0, noise=False)
    never = always.model_copy(update={"flip_prob": 0.0})
    covered = [i for i, name in enumerate(col.names) if name in vectors]
    items = {}
    for policy in ("skip", "reuse"):
        for label, aug_cfg in (("flip", always), ("plain", never)):
            cfg = _cfg(streams_mode=mode, augment=aug_cfg)
            train_ds, _, _ = build_datasets(cfg, col, col, path, set_id, seed=3, flipped_views=policy)
            items[(policy, label)] = [train_ds[i] for i in covered]
    assert all(not it["has_teacher"].item() for it in items[("skip", "flip")])
    assert all(it["has_teacher"].item() for it in items[("reuse", "flip")])
    assert all(it["has_teacher"].item() for key in (("skip", "plain"), ("reuse", "plain")) for it in items[key])
    # the policy decides the target only: the streams a flipped sample trains on are the same
    for a, b in zip(items[("skip", "flip")], items[("reuse", "flip")], strict=True):
        assert _same(
            {k: v for k, v in a.items() if k != "has_teacher"}, {k: v for k, v in b.items() if k != "has_teacher"}
        )
    if mode == "standard":  # really the reversed clip (a reference crop may lie in the padded tail)
        assert not torch.equal(items[("skip", "flip")][0]["joint"], items[("skip", "plain")][0]["joint"])
    with pytest.raises(DatasetError, match="flipped_views"):
        build_datasets(_cfg(), col, col, path, set_id, flipped_views="sometimes")  # type: ignore[arg-type]


def test_teacher_join_errors(store_with_half, tmp_path) -> None:
    path, set_id, col, _ = store_with_half
    with pytest.raises(DatasetError, match=rf"not in the store .*available: \['{set_id}'\]"):
        TeacherFeatures.from_store(path, "videomae_v2_vit_b-random-init-000000000000", col.names)
    with pytest.raises(DatasetError, match="does not exist"):
        TeacherFeatures.from_store(tmp_path / "nope", set_id, col.names)
    not_store = tmp_path / "plain"
    not_store.mkdir()
    with pytest.raises(DatasetError, match="cannot open teacher feature store"):
        TeacherFeatures.from_store(not_store, set_id, col.names)
    nan = np.ones((2, 4), np.float32)
    nan[1, 2] = np.nan
    with pytest.raises(DatasetError, match="non-finite"):
        TeacherFeatures(["a", "b"], nan, np.array([True, True]), "s")
    empty = TeacherFeatures(["a"], np.zeros((1, 4)), np.array([False]), "s")
    with pytest.raises(DatasetError, match="covers none"):
        empty.stats()
    teacher = TeacherFeatures.from_store(path, set_id, col.names[::-1])
    with pytest.raises(DatasetError, match="not aligned"):
        SkeletonDataset(col, _cfg(), train=True, teacher=teacher)


def test_data_hash_tracks_stream_settings(tracked: np.ndarray) -> None:
    col = _collection(tracked)
    hashes = {
        build_datasets(cfg, col, col)[2].data_hash
        for cfg in (_cfg(), _cfg(streams_mode="reference"), _cfg(num_frames=32), _cfg(streams=("joint",)))
    }
    assert len(hashes) == 4
    assert build_datasets(_cfg(), col, col)[2].data_hash == build_datasets(_cfg(), col, col)[2].data_hash


# ------------------------------------------------------------------------------------------------
# Issue 10: time-crop switch, velocity scale, classes sized for the data
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["standard", "reference"])
def test_time_crop_switch(mode: str, tracked: np.ndarray) -> None:
    col = _collection(tracked)
    off = SkeletonDataset(
        col, _cfg(streams_mode=mode, augment=NO_AUG.model_copy(update={"time_crop": False})), train=True
    )
    on = SkeletonDataset(col, _cfg(streams_mode=mode, augment=NO_AUG), train=True)
    val = SkeletonDataset(col, _cfg(streams_mode=mode, augment=NO_AUG), train=False)
    for i in range(len(col)):
        assert _same(off[i], val[i])  # crop off (and nothing else on): the validation window
    assert not all(_same(on[i], val[i]) for i in range(len(col)))


def test_switching_the_time_crop_off_keeps_the_other_draws(tracked: np.ndarray) -> None:
    col = _collection(tracked)
    aug = AugmentConfig()  # rotation, scale, shear, flip, noise all on
    off = SkeletonDataset(col, _cfg(augment=aug.model_copy(update={"time_crop": False})), train=True)
    ref = SkeletonDataset(col, _cfg(augment=NO_AUG.model_copy(update={"time_crop": False})), train=True)
    a, b = off.rng(0), ref.rng(0)
    # the same number of crop draws is made either way, so the augmentation draws line up
    st.standard_positions(0, 99, 16, a, None)
    st.standard_positions(0, 99, 16, b, (0.5, 1.0))
    assert a.random() == b.random()


def test_standard_velocity_is_per_second(tracked: np.ndarray) -> None:
    """Velocity per raw frame x 30: its variance is in the range of the other streams, not ~1e-4."""
    col = _collection(tracked)
    item = SkeletonDataset(col, _cfg(augment=NO_AUG), train=False)[3]
    joint, present, step = st.standard_joint(np.asarray(col.data[3, :, : col.lengths[3]]), 64, None)
    per_frame = st.standard_velocity(joint, present, step)
    np.testing.assert_allclose(item["velocity"].numpy(), per_frame * st.STANDARD_VELOCITY_SCALE, rtol=1e-5, atol=1e-6)
    present_var = item["velocity"][..., 0].var().item()
    assert present_var > 1e-2, present_var


def test_classes_sized_for_the_data(tracked: np.ndarray) -> None:
    col = _collection(tracked, n=4)  # labels 0..3
    assert _cfg().num_classes == 60 and _cfg(dataset="ntu120").num_classes == 120
    assert _cfg(classes=4).num_classes == 4
    SkeletonDataset(col, _cfg(classes=4), train=False)
    with pytest.raises(DatasetError, match=r"labels must lie in \[0, 3\)"):
        SkeletonDataset(col, _cfg(classes=3), train=False)
    with pytest.raises(ValueError, match="classes"):
        _cfg(classes=1)
    with pytest.raises(ValueError, match="time_crop_range"):
        AugmentConfig(time_crop_range=(0.0, 1.0))
