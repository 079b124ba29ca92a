"""``lastkd embed``: real subprocesses, real files, the store read back independently."""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lastkd.featurestore import FeatureStore, NotAStoreError
from lastkd.services.teacher_api.bulk import discover
from tests.support import media
from tests.support.paths import NTU_SAMPLE_VIDEO
from tests.support.teacher import run_cli, teacher_env

pytestmark = pytest.mark.slow


def _only_set(store_path: Path) -> tuple[str, int]:
    with FeatureStore(store_path, readonly=True) as store:
        (meta,) = store.list_sets()
        return meta.set_id, meta.count


def test_discover_walks_folders_and_reports_missing(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "S001C001P001R001A002_rgb.avi").write_bytes(b"x")
    (tmp_path / "a" / "clip.MP4").write_bytes(b"x")
    (tmp_path / "a" / "notes.txt").write_text("x")
    (tmp_path / "a" / ".hidden.mp4").write_bytes(b"x")
    explicit = tmp_path / "explicit.bin"
    explicit.write_bytes(b"x")
    found, missing, not_files = discover([tmp_path / "a", explicit, tmp_path / "a" / "clip.MP4", tmp_path / "nope"])
    assert not_files == []
    assert [p.relative_to(tmp_path).as_posix() for p in found] == [
        "a/clip.MP4",
        "a/b/S001C001P001R001A002_rgb.avi",
        "explicit.bin",
    ]
    assert missing == [str(tmp_path / "nope")]


def test_embed_report_and_resume(tmp_path: Path) -> None:
    clips = tmp_path / "clips"
    (clips / "nested").mkdir(parents=True)
    a = media.make_clip(clips / "S003C001P002R002A010_rgb.mp4", frames=16, size=(128, 96))
    b = media.make_clip(clips / "nested" / "plain.webm", container="webm", codec="vp9", frames=12, size=(96, 64))
    media.make_clip(clips / "nested" / "other.avi", container="avi", codec="mpeg4", frames=14, size=(112, 80))
    bad = media.make_random_bytes(clips / "broken.mp4")
    cut = media.truncated_copy(a, clips / "nested" / "cut.mp4")
    env = teacher_env(tmp_path / "data")
    report = tmp_path / "report.json"

    first = run_cli(
        ["embed", str(clips), "--workers", "2", "--batch-size", "2", "--report", str(report), "--no-progress"],
        env,
        cwd=tmp_path,
    )
    assert first.returncode == 1, first.stderr  # some clips failed
    assert "embedded 3, skipped 0, failed 2 of 5" in first.stdout
    body = json.loads(report.read_text())
    assert (body["embedded"], body["skipped"], body["failed"], body["interrupted"]) == (3, 0, 2, False)
    failures = {Path(f["path"]).name: f for f in body["failures"]}
    assert set(failures) == {bad.name, cut.name}
    assert failures[bad.name]["code"] == "not_media" and failures[cut.name]["code"] == "corrupt"
    assert all(f["message"] for f in body["failures"])
    assert body["clips_per_s"] > 0

    set_id, count = _only_set(tmp_path / "data" / "features.lmdb")
    assert count == 3 and "random-init" in set_id and body["feature_set"] == set_id
    with FeatureStore(tmp_path / "data" / "features.lmdb", readonly=True) as store:
        assert store.contains(set_id, "S003C001P002R002A010")  # NTU name
        assert store.contains(set_id, hashlib.sha256(b.read_bytes()).hexdigest())  # else content hash
        assert store.lookup_sha256(set_id, hashlib.sha256(a.read_bytes()).hexdigest()) == "S003C001P002R002A010"

    second = run_cli(
        ["embed", str(clips), "--report", str(report), "--no-progress", "--feature-set", set_id], env, cwd=tmp_path
    )
    assert second.returncode == 1
    body = json.loads(report.read_text())
    assert (body["embedded"], body["skipped"], body["failed"]) == (0, 3, 2)
    assert _only_set(tmp_path / "data" / "features.lmdb")[1] == 3


def test_embed_argument_errors(tmp_path: Path) -> None:
    env = teacher_env(tmp_path / "data")
    missing = run_cli(["embed", str(tmp_path / "nowhere")], env, cwd=tmp_path)
    assert missing.returncode == 2 and "no such file or folder" in missing.stderr
    (tmp_path / "empty").mkdir()
    empty = run_cli(["embed", str(tmp_path / "empty")], env, cwd=tmp_path)
    assert empty.returncode == 2 and "no video files" in empty.stderr
    clip = media.make_clip(tmp_path / "c.mp4", frames=8, size=(64, 48))
    wrong = run_cli(
        ["embed", str(clip), "--feature-set", "videomae_v2_tiny-random-init-000000000000"], env, cwd=tmp_path
    )
    assert wrong.returncode == 2 and "produce feature set" in wrong.stderr
    bad_batch = run_cli(["embed", str(clip), "--batch-size", "0"], env, cwd=tmp_path)
    assert bad_batch.returncode == 2 and "1..4096" in bad_batch.stderr
    no_weights = run_cli(["embed", str(clip)], {**env, "LASTKD_TEACHER_RANDOM_INIT": "false"}, cwd=tmp_path)
    assert no_weights.returncode == 2 and "LASTKD_TEACHER_WEIGHTS" in no_weights.stderr
    assert not (tmp_path / "data" / "features.lmdb").exists() or _only_set(tmp_path / "data" / "features.lmdb")[1] == 0


def test_interrupted_run_resumes(tmp_path: Path) -> None:
    clips = tmp_path / "ntu"
    clips.mkdir()
    total = 6
    for i in range(total):  # 1080p copies: each takes a while to decode on one worker
        shutil.copy(NTU_SAMPLE_VIDEO, clips / f"S001C001P001R001A{i + 1:03d}_rgb.avi")
    env = teacher_env(tmp_path / "data")
    store_path = tmp_path / "data" / "features.lmdb"
    report = tmp_path / "report.json"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lastkd.services.cli",
            "embed",
            str(clips),
            "--workers",
            "1",
            "--batch-size",
            "1",
            "--report",
            str(report),
            "--no-progress",
        ],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 240
    stored = 0
    while time.monotonic() < deadline and proc.poll() is None:
        if (store_path / "data.mdb").exists():
            try:
                stored = _only_set(store_path)[1]
            except (ValueError, NotAStoreError):  # the store or the set is still being created
                stored = 0
            if stored >= 1:
                break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be interrupted"
    proc.send_signal(signal.SIGINT)  # Ctrl-C
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in out
    body = json.loads(report.read_text())
    assert body["interrupted"] is True
    kept = _only_set(store_path)[1]
    # a batch finishing while Ctrl-C lands is stored but may miss the report
    assert 1 <= kept < total and 1 <= body["embedded"] <= kept

    again = run_cli(["embed", str(clips), "--report", str(report), "--no-progress"], env, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    body = json.loads(report.read_text())
    assert (body["skipped"], body["embedded"], body["failed"]) == (kept, total - kept, 0)
    assert _only_set(store_path)[1] == total
