"""The teacher as a clumsy or hostile user drives it: one id for two clips, racing requests,
clients that hang up, odd file names, special files, killed processes, a slow start-up and a
wrong model name. Live processes only (uvicorn, ``lastkd embed``), checked from outside."""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from lastkd.featurestore import FeatureStore
from tests.support import media
from tests.support.live import descendants, free_port, kill_all, running, wait_for
from tests.support.paths import NTU_SAMPLE_VIDEO
from tests.support.teacher import LiveTeacher, run_cli, start_teacher, stop_teacher, teacher_env

pytestmark = [pytest.mark.slow, pytest.mark.faults]


def _post(server: LiveTeacher, files: list[tuple[str, bytes]], clip_ids: list[str] | None = None) -> httpx.Response:
    parts = [("files", (name, data, "application/octet-stream")) for name, data in files]
    with server.client() as client:
        return client.post("/embed", files=parts, data={"clip_ids": clip_ids} if clip_ids is not None else None)


def _stored_sha(server: LiveTeacher, clip_id: str) -> str | None:
    """The content digest the live store holds for ``clip_id`` (read with an independent reader)."""
    with FeatureStore(server.data_dir / "features.lmdb", readonly=True) as store:
        present, sha = store.clip_sha256(server.active_set()["set_id"], clip_id)
    assert present
    return sha


# ---- item 1: one clip id, different bytes: exactly one wins --------------------------------


def test_one_request_naming_one_id_twice_stores_one_and_refuses_the_other(
    live_teacher: LiveTeacher, tmp_path: Path
) -> None:
    a = media.make_clip(tmp_path / "a.mp4", frames=12, size=(96, 64)).read_bytes()
    b = media.make_clip(tmp_path / "b.mp4", frames=14, size=(96, 64)).read_bytes()
    before = live_teacher.active_set()["count"]
    resp = _post(live_teacher, [("a.mp4", a), ("b.mp4", b)], clip_ids=["twice-in-one", "twice-in-one"])
    assert resp.status_code == 200, resp.text
    results = resp.json()["results"]
    ok = [r for r in results if "error" not in r]
    refused = [r for r in results if "error" in r]
    assert len(ok) == 1 and len(refused) == 1, results
    assert refused[0]["error"]["code"] == "clip_id_conflict"
    assert live_teacher.active_set()["count"] == before + 1
    assert _stored_sha(live_teacher, "twice-in-one") == ok[0]["sha256"]  # the store holds the winner
    again = _post(live_teacher, [("x.mp4", a if ok[0]["filename"] == "a.mp4" else b)], clip_ids=["twice-in-one"])
    assert again.status_code == 200 and again.json()["results"][0]["cached"] is True


def test_eight_concurrent_requests_for_one_id_store_exactly_one(live_teacher: LiveTeacher, tmp_path: Path) -> None:
    clips = [media.make_clip(tmp_path / f"race{i}.mp4", frames=10 + i, size=(96, 64)).read_bytes() for i in range(8)]
    before = live_teacher.active_set()["count"]

    def one(i: int) -> httpx.Response:
        return _post(live_teacher, [(f"race{i}.mp4", clips[i])], clip_ids=["raced-id"])

    with cf.ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(one, range(8)))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] + [422] * 7, [r.text for r in responses]
    for r in responses:
        if r.status_code == 422:
            assert r.json()["results"][0]["error"]["code"] == "clip_id_conflict"
    (winner,) = [r.json()["results"][0] for r in responses if r.status_code == 200]
    assert live_teacher.active_set()["count"] == before + 1
    assert _stored_sha(live_teacher, "raced-id") == winner["sha256"]


def test_embed_two_files_under_one_ntu_name(tmp_path: Path) -> None:
    name = "S009C001P001R001A001_rgb.mp4"
    for sub in ("one", "two"):
        (tmp_path / "clips" / sub).mkdir(parents=True)
    first = media.make_clip(tmp_path / "clips" / "one" / name, frames=12, size=(96, 64))
    second = media.make_clip(tmp_path / "clips" / "two" / name, frames=16, size=(96, 64))
    report = tmp_path / "report.json"
    done = run_cli(
        ["embed", str(tmp_path / "clips"), "--report", str(report), "--no-progress"],
        teacher_env(tmp_path / "data"),
        cwd=tmp_path,
    )
    assert done.returncode == 1, done.stderr
    body = json.loads(report.read_text())
    assert (body["embedded"], body["failed"]) == (1, 1), body
    assert body["failures"][0]["code"] == "clip_id_conflict"
    loser = Path(body["failures"][0]["path"])
    winner = second if loser == first else first
    with FeatureStore(tmp_path / "data" / "features.lmdb", readonly=True) as store:
        (meta,) = store.list_sets()
        assert meta.count == 1
        assert store.clip_sha256(meta.set_id, "S009C001P001R001A001") == (
            True,
            hashlib.sha256(winner.read_bytes()).hexdigest(),
        )
    # A second run never replaces the stored clip with the other file: it is refused again.
    again = run_cli(
        ["embed", str(tmp_path / "clips"), "--report", str(report), "--no-progress"],
        teacher_env(tmp_path / "data"),
        cwd=tmp_path,
    )
    body = json.loads(report.read_text())
    assert again.returncode == 1 and (body["skipped"], body["failed"]) == (1, 1), body
    assert [f["path"] for f in body["failures"]] == [str(loser)]


# ---- item 5: a client that hangs up mid-upload ----------------------------------------------


def test_client_disconnect_mid_upload_is_a_quiet_499(live_teacher: LiveTeacher) -> None:
    port = int(live_teacher.url.rsplit(":", 1)[1])
    label = 'lastkd_http_requests_total{method="POST",route="/embed",service="teacher",status="%s"}'
    before_499, before_500 = live_teacher.metric(label % "499"), live_teacher.metric(label % "500")
    boundary = "xXbOuNdArYx"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="cut.mp4"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            (
                f"POST /embed HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {live_teacher.token}\r\n"
                f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: 200000\r\n\r\n"
            ).encode()
            + head
            + os.urandom(20_000)
        )
        time.sleep(0.5)  # the server is now reading the body
    wait_for(lambda: live_teacher.metric(label % "499") == before_499 + 1, 30, "the aborted upload to be counted")
    assert live_teacher.metric(label % "500") == before_500
    log = live_teacher.log()
    assert "Exception in ASGI application" not in log and "Traceback" not in log, log[-3000:]
    uploads = live_teacher.data_dir / "tmp" / "uploads"
    assert wait_for(lambda: not any(uploads.iterdir()), 10, "the partial upload to be deleted")


# ---- item 6: RFC 2231 file names -------------------------------------------------------------


def test_rfc2231_filename_is_decoded(live_teacher: LiveTeacher, tmp_path: Path) -> None:
    data = media.make_clip(tmp_path / "v.mp4", frames=11, size=(96, 64)).read_bytes()
    boundary = "b0undary2231"
    body = (
        (
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename*=UTF-8''vid%C3%A9o.mp4\r\n"
            "Content-Type: video/mp4\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    with live_teacher.client() as client:
        resp = client.post("/embed", content=body, headers=headers)
        assert resp.status_code == 200, resp.text
        assert resp.json()["results"][0]["filename"] == "vidéo.mp4"
        bad = body.replace(b"UTF-8''vid%C3%A9o", b"UTF-8''vid%E9o")  # latin-1 bytes under a UTF-8 label
        resp = client.post("/embed", content=bad, headers=headers)
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "malformed_multipart"
    assert "filename*" in resp.json()["error"]["message"]


# ---- item 14: special files in a folder ------------------------------------------------------


def test_embed_skips_a_fifo_with_its_kind_and_does_not_hang(tmp_path: Path) -> None:
    clips = tmp_path / "clips"
    clips.mkdir()
    media.make_clip(clips / "real.mp4", frames=12, size=(96, 64))
    os.mkfifo(clips / "pipe.avi")
    report = tmp_path / "report.json"
    done = run_cli(
        ["embed", str(clips), "--report", str(report), "--no-progress"],
        teacher_env(tmp_path / "data"),
        cwd=tmp_path,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr
    assert f"skipped {clips / 'pipe.avi'}: not a regular file (named pipe (fifo))" in done.stderr
    body = json.loads(report.read_text())
    assert body["embedded"] == 1 and body["not_files"] == [
        {"path": str(clips / "pipe.avi"), "kind": "named pipe (fifo)"}
    ]
    # named on the command line, it is reported the same way, not as "no such file"
    alone = run_cli(
        ["embed", str(clips / "pipe.avi"), "--no-progress"], teacher_env(tmp_path / "data"), cwd=tmp_path, timeout=240
    )
    assert alone.returncode == 2 and "named pipe (fifo)" in alone.stderr and "no such file" not in alone.stderr


# ---- item 10: frames used, and a minimum --------------------------------------------------


def test_min_clip_frames_setting_refuses_a_one_frame_clip_in_lastkd_embed(tmp_path: Path) -> None:
    clips = tmp_path / "clips"
    clips.mkdir()
    media.make_clip(clips / "one.mp4", frames=1, size=(96, 64))
    media.make_clip(clips / "many.mp4", frames=12, size=(96, 64))
    report = tmp_path / "report.json"
    done = run_cli(
        ["embed", str(clips), "--report", str(report), "--no-progress"],
        teacher_env(tmp_path / "data", LASTKD_MIN_CLIP_FRAMES="2"),
        cwd=tmp_path,
        timeout=240,
    )
    assert done.returncode == 1, done.stderr  # one clip failed, the other was embedded
    body = json.loads(report.read_text())
    assert body["embedded"] == 1 and [f["code"] for f in body["failures"]] == ["too_short"]
    assert body["failures"][0]["path"] == str(clips / "one.mp4")
    assert "1 frame(s)" in body["failures"][0]["message"] and "minimum of 2" in body["failures"][0]["message"]


# ---- item 13: kill -9 leaves no decoder, forkserver or resource tracker ---------------------


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:200]
    except OSError:
        return "?"


def _assert_tree_dies(pid: int, proc: subprocess.Popen, min_children: int) -> None:
    tree = wait_for(
        lambda: (lambda d: d if len(d) >= min_children else None)(descendants(pid)),
        120,
        f"{min_children} helper processes under {pid}",
    )
    os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=30)
    try:
        wait_for(
            lambda: not [p for p in tree if running(p)],
            10,
            "every helper process to exit: " + "; ".join(f"{p}: {_cmdline(p)}" for p in tree if running(p)),
        )
    finally:
        kill_all(p for p in tree if running(p))


def test_kill9_of_lastkd_embed_leaves_no_process(tmp_path: Path) -> None:
    clips = tmp_path / "ntu"
    clips.mkdir()
    for i in range(8):  # 1080p: long enough to still be decoding when killed
        shutil.copy(NTU_SAMPLE_VIDEO, clips / f"S001C001P001R001A{i + 1:03d}_rgb.avi")
    proc = subprocess.Popen(
        [sys.executable, "-m", "lastkd.services.cli", "embed", str(clips), "--workers", "2", "--no-progress"],
        env=teacher_env(tmp_path / "data"),
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # forkserver + resource tracker + 2 decoders
    _assert_tree_dies(proc.pid, proc, min_children=4)


def test_kill9_of_serve_teacher_leaves_no_process_and_a_restart_starts_clean(tmp_path: Path) -> None:
    server = start_teacher(tmp_path / "t")
    try:
        _assert_tree_dies(server.proc.pid, server.proc, min_children=4)
    finally:
        stop_teacher(server)
    again = start_teacher(tmp_path / "t")  # same data dir, same store
    try:
        assert again.client().get("/health/ready").status_code == 200
    finally:
        stop_teacher(again)


# ---- item 16: the port opens first; readiness says "starting" until the model is warm --------


def test_ready_is_503_starting_until_the_model_is_warm(tmp_path: Path) -> None:
    port = free_port()
    # A ViT-S at 224 px, random-init on the CPU: seconds of build and warm-up forward.
    env = teacher_env(tmp_path, LASTKD_TEACHER_PORT=str(port), LASTKD_TEACHER_MODEL="videomae_v2_vit_s")
    log = open(tmp_path / "server.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "lastkd.services.cli", "serve-teacher"],
        env=env,
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    url = f"http://127.0.0.1:{port}"
    seen: list[tuple[int, str]] = []
    try:

        def answered() -> bool:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()
            try:
                r = httpx.get(f"{url}/health/ready", timeout=5)
            except httpx.TransportError:
                return False
            seen.append((r.status_code, r.json().get("status")))
            return r.status_code == 200

        wait_for(answered, 300, "/health/ready to answer 200", interval=0.05)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    assert seen[0] == (503, "starting"), seen[:3]
    assert seen[-1] == (200, "ready")


# ---- item 17: an unknown model name: one message, exit 2, before loading ---------------------


def test_unknown_model_name_same_message_and_exit_code_for_both_commands(tmp_path: Path) -> None:
    clip = media.make_clip(tmp_path / "c.mp4", frames=8, size=(64, 48))
    env = teacher_env(tmp_path / "data", LASTKD_TEACHER_MODEL="resnet50", LASTKD_TEACHER_PORT=str(free_port()))
    embed = run_cli(["embed", str(clip), "--no-progress"], env, cwd=tmp_path, timeout=120)
    serve = run_cli(["serve-teacher"], env, cwd=tmp_path, timeout=120)
    assert embed.returncode == 2 and serve.returncode == 2, (embed.stderr, serve.stderr)
    for done, command in ((embed, "embed"), (serve, "serve-teacher")):
        assert "Traceback" not in done.stderr + done.stdout
        assert done.stderr.startswith(f"lastkd {command}: cannot build teacher 'resnet50': unknown VideoMAE V2 model")
    assert embed.stderr.split(": ", 1)[1] == serve.stderr.split(": ", 1)[1]
    assert not (tmp_path / "data" / "features.lmdb").exists()  # nothing opened or created


def test_start_up_failure_behind_the_open_port_exits_2_without_traceback(tmp_path: Path) -> None:
    weights = tmp_path / "garbage.pth"
    weights.write_bytes(b"not a checkpoint at all")
    env = teacher_env(
        tmp_path / "data",
        LASTKD_TEACHER_RANDOM_INIT="false",
        LASTKD_TEACHER_WEIGHTS=str(weights),
        LASTKD_TEACHER_PORT=str(free_port()),
    )
    done = run_cli(["serve-teacher"], env, cwd=tmp_path, timeout=180)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    assert f"teacher start-up failed: cannot load teacher weights {weights}" in done.stderr
