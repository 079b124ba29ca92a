"""Skipped skeleton files reach the user (issue 8, item 11): a folder with real corrupt files
(truncated, garbage, empty) trains, and the count and the first reasons (file:line: why) are in
what ``lastkd train`` prints, the engine's result (what the job record stores), the published
``metrics.json`` and the model card, and the job API's answer."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from fastapi.testclient import TestClient

from lastkd.services import cli
from lastkd.services.settings import Settings
from lastkd.services.trainer.api import create_app
from lastkd.services.trainer.jobs import JobState, JobStore
from lastkd.student.data.config import DataConfig
from lastkd.student.data.dataset import SKIPPED_SHOWN, build_datasets
from lastkd.student.data.sources import load_splits
from lastkd.student.publish import list_published
from lastkd.student.synth import generate
from lastkd.student.training import load_result
from tests.support.paths import NTU_SAMPLE_SKELETON

pytestmark = pytest.mark.faults

TOKEN = "skipped-token-0123456789"
# name -> (what is wrong, words of the parser's reason, line it must name)
CORRUPT = {
    "S010C001P001R001A001": ("truncated", "truncated file", None),
    "S010C001P002R001A002": ("garbage", "binary data", 1),
    "S010C001P003R001A001": ("empty", "empty file", 1),
}


def _corrupt(folder: Path) -> None:
    real = NTU_SAMPLE_SKELETON.read_bytes()
    for name, (kind, _, _) in CORRUPT.items():
        data = {"truncated": real[: len(real) // 3], "garbage": bytes(range(256)) * 8, "empty": b""}[kind]
        (folder / f"{name}.skeleton").write_bytes(data)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "datasets"
    generate(root / "synth", classes=2, samples_per_class=4, frames=40, video=False, seed=2)
    _corrupt(root / "synth" / "skeletons")
    return root


def _check_reasons(reasons: list[str]) -> None:
    assert len(reasons) == len(CORRUPT), reasons
    for name, (_, words, line) in CORRUPT.items():
        hit = [r for r in reasons if r.startswith(f"{name}.skeleton:")]
        assert len(hit) == 1 and words in hit[0], reasons
        if line is not None:
            assert hit[0].startswith(f"{name}.skeleton:{line}:"), hit
        else:  # truncated: the line where the file ends, past the header
            assert int(hit[0].split(":")[1]) > 1, hit


def test_lastkd_train_reports_skipped_files_everywhere(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LASTKD_DATA_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("LASTKD_DATA_ROOTS", json.dumps([str(root)]))
    config = {
        "name": "skips",
        "epochs": 1,
        "batch_size": 2,
        "max_steps_per_epoch": 1,
        "device": "cpu",
        "data": {"path": "synth/skeletons", "num_frames": 8, "max_samples": 2},
        "eval": {"jitter_stds": [], "joint_drop_probs": [], "frame_drop_probs": []},
    }
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(config), encoding="utf-8")
    run_dir = tmp_path / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 2-sample step: more threads only contend
    try:
        rc = cli.main(["train", str(cfg), "--run-dir", str(run_dir)])
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err
    assert rc == 0, err

    # what `lastkd train` prints
    assert f"warning: {len(CORRUPT)} unusable data file(s)/sample(s) were skipped" in err, err
    printed = [ln.strip() for ln in err.splitlines() if ln.startswith("  S010")]
    _check_reasons(printed)

    # the engine's result: the metrics a job record stores (the worker passes result.metrics on)
    result = load_result(run_dir)
    assert result.metrics["data_skipped"]["count"] == len(CORRUPT)
    _check_reasons(result.metrics["data_skipped"]["first"])

    # the published metrics.json and model card
    (published,) = list_published(tmp_path / "var" / "registry")
    metrics = json.loads((published.path / "metrics.json").read_text())
    assert metrics["data_skipped"] == result.metrics["data_skipped"]
    assert "data_skipped" not in metrics["final"]  # one copy in the file
    card = (published.path / "README.md").read_text()
    assert f"skipped {len(CORRUPT)} unusable source file(s)/sample(s)" in card, card
    for reason in metrics["data_skipped"]["first"]:
        assert f"`{reason}`" in card


def test_count_is_exact_and_reasons_capped(tmp_path: Path) -> None:
    root = tmp_path / "datasets"
    generate(root / "synth", classes=2, samples_per_class=4, frames=40, video=False, seed=2)
    folder = root / "synth" / "skeletons"
    for i in range(SKIPPED_SHOWN + 3):
        (folder / f"S011C001P{i + 1:03d}R001A001.skeleton").write_bytes(b"")
    cfg = DataConfig(path=folder, num_frames=8)  # type: ignore[arg-type]
    train, val = load_splits(cfg, [root])
    _, _, info = build_datasets(cfg, train, val)
    assert info.data_skipped()["count"] == SKIPPED_SHOWN + 3
    assert len(info.data_skipped()["first"]) == SKIPPED_SHOWN
    assert all("empty file" in r for r in info.data_skipped()["first"])
    clean = tmp_path / "clean"
    shutil.copytree(folder, clean, ignore=shutil.ignore_patterns("S011*", ".lastkd_cache"))
    train, val = load_splits(DataConfig(path=clean, num_frames=8), [tmp_path])  # type: ignore[arg-type]
    assert build_datasets(cfg, train, val)[2].data_skipped() == {"count": 0, "first": []}


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[TestClient, Settings]]:
    (tmp_path / "datasets").mkdir()
    settings = Settings(data_dir=tmp_path / "var", data_roots=[tmp_path / "datasets"], api_token=TOKEN)  # type: ignore[arg-type]
    with TestClient(create_app(settings, sweep_interval_s=3600)) as client:
        yield client, settings


def test_job_api_lifts_data_skipped_out_of_the_metrics(api: tuple[TestClient, Settings]) -> None:
    """What the worker stores as the job's metrics (``result.metrics``) shows as ``data_skipped``."""
    client, settings = api
    store = JobStore(settings.resolved_jobs_dir)
    record, _ = store.create("skips", {"name": "skips"}, "0" * 64, max_attempts=1)
    store.claim(record.id, "test-owner")
    report = {"count": 3, "first": ["a.skeleton:1: empty file"]}
    store.finish(record.id, "test-owner", JobState.COMPLETED, metrics={"top1": 0.5, "data_skipped": report}, result={})
    body = client.get(f"/jobs/{record.id}").json()
    assert body["state"] == "COMPLETED"
    assert body["data_skipped"] == report
