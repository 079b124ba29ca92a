"""`lastkd synth`: synthetic NTU-format skeletons and videos that the real readers accept."""

from __future__ import annotations

import math
from pathlib import Path

import av
import numpy as np
import pytest

from lastkd.ntu.skeleton import parse_sample_name, parse_skeleton_file
from lastkd.ntu.splits import split_indices
from lastkd.services.cli import main as cli_main
from lastkd.student import synth

CLASSES, PER_CLASS, FRAMES = 6, 8, 60


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> synth.SynthResult:
    out = tmp_path_factory.mktemp("synth") / "demo"
    return synth.generate(out, classes=CLASSES, samples_per_class=PER_CLASS, frames=FRAMES, video=True, seed=0)


@pytest.fixture(scope="module")
def parsed(dataset: synth.SynthResult) -> dict[str, object]:
    return {name: parse_skeleton_file(dataset.skeleton_dir / f"{name}.skeleton") for name in dataset.names}


def test_layout_and_manifest(dataset: synth.SynthResult) -> None:
    out = dataset.out_dir
    assert sorted(p.name for p in out.iterdir()) == ["label_map.txt", "skeletons", "synthetic.json", "videos"]
    assert len(list((out / "skeletons").glob("*.skeleton"))) == CLASSES * PER_CLASS
    assert len(list((out / "videos").glob("*_rgb.avi"))) == CLASSES * PER_CLASS
    assert '"synthetic": true' in (out / "synthetic.json").read_text()
    assert len((out / "label_map.txt").read_text().splitlines()) == CLASSES
    assert not list(out.parent.glob(".demo.tmp-*"))


def test_files_parse_with_valid_names_bodies_and_lengths(dataset: synth.SynthResult, parsed: dict) -> None:
    assert len(set(dataset.names)) == len(dataset.names)
    lengths = []
    for name, label in zip(dataset.names, dataset.labels):
        sample = parse_sample_name(name, "ntu60")
        assert sample.label == label
        p = parsed[name]
        lengths.append(p.frames)
        assert math.ceil(FRAMES / 3) <= p.frames <= FRAMES
        assert all(isinstance(b, int) and b > 2**56 for b in p.body_ids)
        assert p.n_bodies_seen == (2 if label % 5 == 4 else 1)
        xyz = p.coords[..., 0]
        assert 1.5 < xyz[2].mean() < 5.0  # metres in front of the camera, like Kinect data
        head_above_feet = xyz[1, :, 3] - xyz[1, :, 14]  # joint 4 head vs joint 15 ankle (0-based 3, 14)
        assert (head_above_feet > 0.5).all() and head_above_feet.max() > 1.3
    assert len(set(lengths)) > 5  # clip lengths vary


def test_reference_parse_of_two_body_sample(dataset: synth.SynthResult) -> None:
    name = next(n for n, label in zip(dataset.names, dataset.labels) if label == 4)
    ref = parse_skeleton_file(dataset.skeleton_dir / f"{name}.skeleton", "reference")
    assert ref.coords[..., 1].any() and ref.coords[..., 0].all(axis=(0, 2)).all()


@pytest.mark.parametrize("split", ["xsub", "xview"])
def test_every_split_has_both_sides_and_all_classes(dataset: synth.SynthResult, split: str) -> None:
    train, val = split_indices(dataset.names, split)
    labels = np.asarray(dataset.labels)
    assert set(labels[train]) == set(range(CLASSES)) == set(labels[val])


def test_ntu120_layout_covers_the_ntu120_splits(tmp_path: Path) -> None:
    result = synth.generate(tmp_path / "d120", classes=4, samples_per_class=4, frames=40, video=False, dataset="ntu120")
    labels = np.asarray(result.labels)
    for name in result.names:
        parse_sample_name(name, "ntu120")
    for split in ("xsub", "xview", "xsub120", "xset120"):
        train, val = split_indices(result.names, split)
        assert set(labels[train]) == set(range(4)) == set(labels[val]), split


def test_videos_decode_with_matching_frames_and_drawn_skeleton(dataset: synth.SynthResult, parsed: dict) -> None:
    background = np.array([40, 44, 52])
    for name in dataset.names[::4]:
        path = dataset.video_dir / f"{name}_rgb.avi"
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            assert (stream.codec_context.width, stream.codec_context.height) == synth.VIDEO_SIZE
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        p = parsed[name]
        assert len(frames) == p.frames
        # the head (joint 4) is drawn where its colour-pixel projection says, scaled to the video
        text = (dataset.skeleton_dir / f"{name}.skeleton").read_text().splitlines()
        head = text[3 + 4].split()  # frame 1, first body, joint 4
        x, y = float(head[5]) * 160 / 1920, float(head[6]) * 120 / 1080
        patch = frames[0][int(y) - 1 : int(y) + 3, int(x) - 1 : int(x) + 3].reshape(-1, 3).astype(int)
        assert np.abs(patch - background).sum(axis=1).max() > 150, name


def test_classes_are_separable_by_motion(dataset: synth.SynthResult, parsed: dict) -> None:
    def features(name: str) -> np.ndarray:
        xyz = parsed[name].coords[..., 0]  # (3, T, 25), first body
        rel = xyz - xyz[:, :, :1]  # relative to the spine base
        speed = np.abs(np.diff(rel, axis=1)).mean(axis=1)
        return np.concatenate([rel.std(axis=1).ravel(), 10 * speed.ravel()])

    train, val = split_indices(dataset.names, "xsub")
    x = np.stack([features(n) for n in dataset.names])
    y = np.asarray(dataset.labels)
    centroids = np.stack([x[train][y[train] == c].mean(axis=0) for c in range(CLASSES)])
    pred = np.argmin(((x[val][:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (pred == y[val]).mean() >= 0.9


def test_deterministic_for_a_seed(tmp_path: Path) -> None:
    kw = dict(classes=3, samples_per_class=4, frames=40, video=False)
    a = synth.generate(tmp_path / "a", seed=11, **kw)
    b = synth.generate(tmp_path / "b", seed=11, **kw)
    c = synth.generate(tmp_path / "c", seed=12, **kw)
    assert a.names == b.names == c.names
    same = [
        (a.skeleton_dir / f"{n}.skeleton").read_bytes() == (b.skeleton_dir / f"{n}.skeleton").read_bytes()
        for n in a.names
    ]
    diff = [
        (a.skeleton_dir / f"{n}.skeleton").read_bytes() != (c.skeleton_dir / f"{n}.skeleton").read_bytes()
        for n in a.names
    ]
    assert all(same) and all(diff)


def test_failure_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    real = synth._write_video

    def flaky(path: Path, frames: np.ndarray) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full")
        real(path, frames)

    monkeypatch.setattr(synth, "_write_video", flaky)
    with pytest.raises(OSError, match="disk full"):
        synth.generate(tmp_path / "out", classes=2, samples_per_class=4, frames=40)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "kw,expect",
    [
        ({"classes": 1}, "--classes must be 2..60"),
        ({"classes": 61}, "--classes must be 2..60"),
        ({"samples_per_class": 3}, "--samples-per-class must be 4..200"),
        ({"frames": 20}, "--frames must be 36..300"),
        ({"seed": -1}, "--seed"),
        ({"dataset": "kinetics"}, "dataset must be"),
    ],
)
def test_bad_parameters_rejected(tmp_path: Path, kw: dict, expect: str) -> None:
    with pytest.raises(synth.SynthError, match=expect):
        synth.generate(tmp_path / "x", **kw)
    assert not (tmp_path / "x").exists()


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    argv = [
        "synth",
        str(out),
        "--classes",
        "3",
        "--samples-per-class",
        "4",
        "--frames",
        "40",
        "--no-video",
        "--seed",
        "2",
    ]
    assert cli_main(argv) == 0
    assert "SYNTHETIC" in capsys.readouterr().out
    assert len(list((out / "skeletons").iterdir())) == 12 and not (out / "videos").exists()
    before = sorted(p.name for p in (out / "skeletons").iterdir())
    assert cli_main(argv) == 2  # refuses to overwrite
    assert "already exists" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "skeletons").iterdir()) == before
    assert cli_main(["synth", str(tmp_path / "y"), "--samples-per-class", "2"]) == 2
    assert not (tmp_path / "y").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (
        cli_main(["synth", str(empty), "--classes", "2", "--samples-per-class", "4", "--frames", "40", "--no-video"])
        == 0
    )
    assert (empty / "skeletons").is_dir()


def test_demo_sized_data_is_learnable_through_the_model_input_pipeline(tmp_path: Path) -> None:
    """The demo's dataset (5 classes x 6 clips) as the student sees it (parse, cache, standard
    streams, 16 frames, training augmentations on): a nearest-centroid rule on per-joint motion
    energy of the joint stream separates the xsub validation clips, so a student at chance level
    on it is an optimisation problem (too few steps), not a data problem."""
    from lastkd.student.data.config import DataConfig
    from lastkd.student.data.dataset import build_datasets
    from lastkd.student.data.sources import load_splits

    out = tmp_path / "demo"
    synth.generate(out, classes=5, samples_per_class=6, frames=120, video=False, seed=0)
    cfg = DataConfig(path=out / "skeletons", num_frames=16, streams=("joint",))
    train_col, val_col = load_splits(cfg, None)
    train_ds, val_ds, info = build_datasets(cfg, train_col, val_col, teacher_store_path=None, feature_set=None, seed=0)
    assert (info.train_size, info.val_size) == (15, 15)

    def features(ds) -> tuple[np.ndarray, np.ndarray]:
        items = [ds[i] for i in range(len(ds))]
        x = np.stack([it["joint"].numpy()[..., 0].std(axis=1).ravel() for it in items])  # (N, 3*25)
        return x, np.array([int(it["label"]) for it in items])

    xt, yt = features(train_ds)  # augmented items, as training sees them
    xv, yv = features(val_ds)
    assert set(yt) == set(yv) == set(range(5))
    centroids = np.stack([xt[yt == c].mean(axis=0) for c in range(5)])
    pred = np.argmin(((xv[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (pred == yv).mean() >= 0.8  # chance is 0.2
