"""The checkpoint registry: layout, strict reload, idempotency, concurrent publishers, bad input,
and ``lastkd train`` end to end on a synthetic dataset."""

from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lastkd.models.last_v2 import LASTv2
from lastkd.services import cli
from lastkd.student import evaluate as ev
from lastkd.student import publish as pub
from lastkd.student.config import TrainConfig
from lastkd.student.data.dataset import DataInfo
from lastkd.student.synth import generate
from lastkd.student.training import RunState, TrainResult
from tests.support.paths import REFERENCE

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _reference_params(variant: str, classes: int) -> int:
    shapes = json.loads((REFERENCE / "last_v2_state_dict_shapes.json").read_text())
    return int(shapes["variants"][variant][str(classes)]["num_params"])


@pytest.fixture(scope="module")
def synth_path(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("d") / "synth"
    generate(out, classes=3, samples_per_class=4, frames=40, video=False, seed=0)
    return out / "skeletons"


def make_result(
    data_path: Path, run_dir: Path, *, feature_set: str | None = None, state=RunState.COMPLETED, seed=0
) -> TrainResult:
    """A result as the engine returns it: real LAST v2 weights, metrics from compute_metrics."""
    torch.manual_seed(seed)
    model = LASTv2(60, "small")
    raw = {"name": "student-a", "data": {"path": str(data_path), "num_frames": 8}, "epochs": 2, "seed": seed}
    if feature_set:
        raw["distill"] = {"feature_set": feature_set}
    cfg = TrainConfig.from_dict(raw)
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=(20, 60))
    logprob = scores - np.log(np.exp(scores).sum(1, keepdims=True))
    metrics = ev.compute_metrics(logprob, rng.integers(0, 60, 20))
    metrics["robustness"] = ev.robustness_summary(metrics["top1"], {"jitter@0.05": 0.0})
    history = [
        {
            "epoch": e,
            "train_total": 4.0 - e,
            "train_ce": 4.0 - e,
            "train_distill": 0.5,
            "val_top1": 0.1 * e,
            "val_top5": 0.2 * e,
            "val_nll": 3.9 - e,
        }
        for e in (1, 2)
    ]
    info = DataInfo(
        60, 6, 6, 0.5 if feature_set else 0.0, 0.5 if feature_set else 0.0, 768 if feature_set else 0, "abc123"
    )
    return TrainResult(
        state,
        {k: v.clone() for k, v in model.state_dict().items()},
        metrics,
        history,
        cfg,
        info,
        run_dir,
        2,
        ev.class_names(60),
    )


def test_publish_layout_and_strict_reload(synth_path, tmp_path) -> None:
    result = make_result(synth_path, tmp_path / "run", feature_set="videomae_v2_vit_b-random-init-0123456789ab")
    p = pub.publish(result, tmp_path / "reg", job_id="job-1", extra_lineage={"requested_by": "test"})
    assert (p.name, p.version, p.path) == ("student-a", 1, tmp_path / "reg" / "student-a" / "v1")
    files = {f.relative_to(p.path).as_posix() for f in p.path.rglob("*") if f.is_file()}
    assert files >= {
        "model.safetensors",
        "config.json",
        "train_config.yaml",
        "metrics.json",
        "lineage.json",
        "README.md",
        "plots/loss.png",
        "plots/accuracy.png",
        "plots/per_class.png",
        "plots/confusion.png",
    }
    for png in p.path.glob("plots/*.png"):
        assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 1000

    # weights only, strict into a fresh LAST v2, identical to the result
    tensors = load_file(str(p.path / "model.safetensors"))
    assert set(tensors) == set(LASTv2(60, "small").state_dict())
    student = pub.load_student(p.path)
    assert not student.training
    assert all(torch.equal(student.state_dict()[k], result.model_state[k]) for k in result.model_state)
    assert TrainConfig.from_yaml(p.path / "train_config.yaml") == result.config

    meta = json.loads((p.path / "config.json").read_text())
    assert meta["params"] == _reference_params("small", 60)
    small = pub.estimate_flops(student, 8, ("joint",))
    assert meta["flops"] == pytest.approx(3 * small, rel=0.01)  # three streams cost three joint passes
    assert pub.estimate_flops(student, 16, ("joint",)) == pytest.approx(2 * small, rel=0.05)  # linear in T

    metrics = json.loads((p.path / "metrics.json").read_text())
    assert len(metrics["final"]["per_class"]) == 60 and len(metrics["history"]) == 2
    lineage = json.loads((p.path / "lineage.json").read_text())
    assert lineage["job_id"] == "job-1" and lineage["feature_set"].endswith("0123456789ab")
    assert lineage["split"] == "xsub" and lineage["data_hash"] == "abc123" and lineage["seed"] == 0
    assert lineage["teacher_random_init"] and lineage["synthetic_data"]
    assert lineage["code_version"].startswith("0.1.0") or lineage["code_version"].startswith("unknown")
    assert lineage["extra"] == {"requested_by": "test"}
    card = (p.path / "README.md").read_text()
    for text in (
        "SYNTHETIC",
        "RANDOM-INIT",
        "variant `small`",
        f"{_reference_params('small', 60):,}",
        "GFLOPs",
        "xsub",
        "job-1",
        "object-interaction",
    ):
        assert text in card, text
    assert not list((tmp_path / "reg" / ".tmp").iterdir())


def test_a_published_student_is_a_hugging_face_folder(synth_path, tmp_path) -> None:
    """config.json + model.safetensors + README.md with YAML front matter: the ecosystem's layout,
    loaded by LASTv2.from_pretrained (the PyTorchModelHubMixin entry point), strictly, offline."""
    import yaml

    result = make_result(synth_path, tmp_path / "run")
    p = pub.publish(result, tmp_path / "reg", job_id="hf-1")
    student = LASTv2.from_pretrained(p.path)
    assert isinstance(student, LASTv2) and not student.training
    assert all(torch.equal(student.state_dict()[k], result.model_state[k]) for k in result.model_state)
    card = (p.path / "README.md").read_text()
    assert card.startswith("---\n")
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["library_name"] == "lastkd" and "skeleton-action-recognition" in front["tags"]
    assert front["lastkd"]["version"] == 1 and front["lastkd"]["job_id"] == "hf-1"
    config = json.loads((p.path / "config.json").read_text())
    assert config["architectures"] == ["LASTv2"] and config["num_classes"] == 60


def test_idempotent_per_job_and_increasing_versions(synth_path, tmp_path) -> None:
    reg = tmp_path / "reg"
    result = make_result(synth_path, tmp_path / "run")
    a = pub.publish(result, reg, job_id="j1")
    b = pub.publish(result, reg, job_id="j1")
    assert a.path == b.path and a.version == b.version == 1
    c = pub.publish(result, reg)
    d = pub.publish(result, reg, job_id="j2")
    assert (c.version, d.version) == (2, 3)
    listed = pub.list_published(reg)
    assert [(x.name, x.version, x.job_id) for x in listed] == [
        ("student-a", 1, "j1"),
        ("student-a", 2, None),
        ("student-a", 3, "j2"),
    ]
    card = (a.path / "README.md").read_text()
    assert "RANDOM-INIT" not in card and "SYNTHETIC" in card  # no teacher, synthetic data


def _publish_in_child(args: tuple[str, str, str | None]) -> tuple[int, str]:
    data, reg, job = args
    torch.set_num_threads(1)
    p = pub.publish(make_result(Path(data), Path(reg) / "run"), Path(reg), job_id=job)
    return p.version, str(p.path)


def test_concurrent_publishers(synth_path, tmp_path) -> None:
    reg = tmp_path / "reg"
    jobs = ["a", "b", "c", "same", "same"]
    ctx = mp.get_context("fork")
    with ctx.Pool(len(jobs)) as pool:
        got = pool.map(_publish_in_child, [(str(synth_path), str(reg), j) for j in jobs])
    versions = [v for v, _ in got]
    assert sorted(set(versions)) == [1, 2, 3, 4]  # 4 distinct jobs -> 4 versions, no duplicates
    assert versions[3] == versions[4]  # the job published twice got one version
    assert sorted(p.name for p in (reg / "student-a").iterdir() if p.name.startswith("v")) == ["v1", "v2", "v3", "v4"]
    for v in range(1, 5):
        pub.load_student(reg / "student-a" / f"v{v}")  # each complete


def test_publish_rejects_bad_input(synth_path, tmp_path) -> None:
    reg = tmp_path / "reg"
    with pytest.raises(pub.PublishError, match="only completed runs"):
        pub.publish(make_result(synth_path, tmp_path, state=RunState.CANCELLED), reg)
    good = make_result(synth_path, tmp_path)
    for bad in ("../../x", "", "a b", "x" * 200):
        with pytest.raises(pub.PublishError, match="invalid job id"):
            pub.publish(good, reg, job_id=bad)
    broken = make_result(synth_path, tmp_path)
    del broken.model_state["fc.weight"]
    with pytest.raises(pub.PublishError, match="do not fit"):
        pub.publish(broken, reg)
    assert pub.list_published(reg) == []
    assert not (reg / "student-a").exists() or not any(p.name.startswith("v") for p in (reg / "student-a").iterdir())


def test_load_student_rejects_bad_files(synth_path, tmp_path) -> None:
    with pytest.raises(pub.PublishError, match="not a published student"):
        pub.load_student(tmp_path / "nothing")
    p = pub.publish(make_result(synth_path, tmp_path), tmp_path / "reg")
    weights = p.path / "model.safetensors"
    blob = weights.read_bytes()
    weights.write_bytes(blob[: len(blob) // 3])
    with pytest.raises(pub.PublishError, match="cannot load the student"):
        pub.load_student(p.path)
    weights.write_bytes(blob)
    meta = json.loads((p.path / "config.json").read_text())
    (p.path / "config.json").write_text(json.dumps({**meta, "variant": "base"}))
    with pytest.raises(pub.PublishError, match="Missing key"):
        pub.load_student(p.path)
    (p.path / "config.json").write_text("{not json")
    with pytest.raises(pub.PublishError, match="JSONDecodeError"):
        pub.load_student(p.path)
    (p.path / "config.json").write_text(json.dumps({**meta, "variant": "huge"}))
    with pytest.raises(pub.PublishError, match="unknown LAST v2 variant 'huge'"):
        pub.load_student(p.path)
    (p.path / "config.json").write_text(json.dumps({**meta, "format": "something-else"}))
    with pytest.raises(pub.PublishError, match="not a lastkd student description"):
        pub.load_student(p.path)
    # junk in the registry is ignored by the listing
    (tmp_path / "reg" / "student-a" / "vX").mkdir()
    (tmp_path / "reg" / "..hidden").mkdir()
    assert [(x.name, x.version) for x in pub.list_published(tmp_path / "reg")] == [("student-a", 1)]


def test_lastkd_train_cli_end_to_end(tmp_path, monkeypatch, capsys) -> None:
    torch.set_num_threads(1)
    roots = tmp_path / "datasets"
    generate(roots / "synth", classes=3, samples_per_class=4, frames=40, video=False, seed=0)
    monkeypatch.setenv("LASTKD_DATA_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("LASTKD_DATA_ROOTS", f'["{roots}"]')
    cfg = tmp_path / "train.yaml"
    cfg.write_text(
        "name: cli-student\nepochs: 1\nbatch_size: 2\nmax_steps_per_epoch: 1\ndevice: cpu\n"
        "data: {path: synth/skeletons, num_frames: 8}\n"
        "eval: {jitter_stds: [], joint_drop_probs: [], frame_drop_probs: [0.2]}\n"
    )
    assert cli.main(["train", str(cfg)]) == 0
    out = capsys.readouterr().out
    reg = tmp_path / "var" / "registry"
    assert f"published cli-student v1 at {reg / 'cli-student' / 'v1'}" in out
    # same command again: finished run, same job id -> same version, nothing retrained or duplicated
    assert cli.main(["train", str(cfg)]) == 0
    assert "published cli-student v1" in capsys.readouterr().out
    assert [(p.name, p.version) for p in pub.list_published(reg)] == [("cli-student", 1)]
    metrics = json.loads((reg / "cli-student" / "v1" / "metrics.json").read_text())["final"]
    assert set(metrics["robustness"]) == {"frame_drop@0.2"}

    # bad inputs: a clear message and exit status 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nepochs: 1\ndata: {path: synth/skeletons}\noptimizer: {lr: 0}\n")
    assert cli.main(["train", str(bad)]) == 2
    assert "optimizer.lr" in capsys.readouterr().err
    outside = tmp_path / "outside.yaml"
    outside.write_text("name: x\nepochs: 1\ndata: {path: /etc}\n")
    assert cli.main(["train", str(outside)]) == 2
    assert "data.path: '/etc' resolves to /etc, which is outside the configured data roots" in capsys.readouterr().err


def test_class_plots_show_only_the_classes_in_the_data() -> None:
    """A 60-way head evaluated on 3 classes: the plots cover those 3 (plus any class predicted), by name."""
    from lastkd.student import evaluate as ev
    from lastkd.student.plots import confusion_view, present_classes

    labels = np.array([0, 0, 4, 4, 9, 9])
    logprob = np.full((6, 60), -10.0)
    logprob[np.arange(6), [0, 0, 4, 7, 9, 9]] = 0.0  # one sample of class 4 predicted as class 7
    names = [f"class {i}" for i in range(60)]
    metrics = ev.compute_metrics(logprob, labels, names)
    assert present_classes(metrics) == [0, 4, 9]
    used, shown, cm = confusion_view(metrics)
    assert used == [0, 4, 7, 9] and shown == ["class 0", "class 4", "class 7", "class 9"]
    assert cm.tolist() == [[2, 0, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0], [0, 0, 0, 2]]
