"""The teacher HTTP service, through a live uvicorn subprocess and httpx only."""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.support import media
from tests.support.paths import NTU_SAMPLE_VIDEO
from tests.support.teacher import TOKEN, LiveTeacher, run_cli, start_teacher, stop_teacher, teacher_env

pytestmark = pytest.mark.slow


def _post(
    server: LiveTeacher,
    files: list[tuple[str, bytes]],
    clip_ids: list[str] | None = None,
    token: str | None = "default",
) -> httpx.Response:
    parts = [("files", (name, data, "application/octet-stream")) for name, data in files]
    data = {"clip_ids": clip_ids} if clip_ids is not None else None
    with server.client(token=token) as client:
        return client.post("/embed", files=parts, data=data)


def _uploads_left(server: LiveTeacher) -> list[Path]:
    folder = server.data_dir / "tmp" / "uploads"
    return sorted(folder.iterdir()) if folder.is_dir() else []


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Small real clips (distinct bytes) and the bad-input corpus."""
    d = tmp_path_factory.mktemp("clips")
    good = media.make_clip(d / "good.mp4", frames=20, size=(160, 120))
    return {
        "good": good,
        "ntu_named": media.make_clip(d / "S002C003P004R001A005_rgb.mp4", frames=18, size=(176, 144)),
        "other": media.make_clip(d / "other.mkv", container="mkv", codec="h264", frames=24, size=(128, 96)),
        "random": media.make_random_bytes(d / "random.mp4"),
        "text": media.make_text_file(d / "notes.txt"),
        "empty": media.make_empty_file(d / "empty.mp4"),
        "truncated": media.truncated_copy(good, d / "truncated.mp4"),
        "audio": media.make_audio(d / "sound.wav"),
        "no_frames": media.make_video_without_frames(d / "noframes.mkv"),
    }


def test_embed_round_trip_json_and_octet_stream(live_teacher: LiveTeacher, clips: dict[str, Path]) -> None:
    data = clips["ntu_named"].read_bytes()
    before = live_teacher.active_set()["count"]
    resp = _post(live_teacher, [(clips["ntu_named"].name, data)])
    assert resp.status_code == 200, resp.text
    (result,) = resp.json()["results"]
    assert result["clip_id"] == "S002C003P004R001A005"  # parsed from the NTU file name
    assert result["sha256"] == hashlib.sha256(data).hexdigest()
    assert result["dim"] == 96 and result["cached"] is False
    assert result["frames_used"] == 16  # 16 distinct frames sampled from the 18 of the clip
    assert "random-init" in result["feature_set"] and result["feature_set"].startswith("videomae_v2_tiny-")
    assert live_teacher.active_set()["count"] == before + 1

    with live_teacher.client(token=None) as client:  # reads need no token
        js = client.get(f"/features/{result['feature_set']}/{result['clip_id']}")
        raw = client.get(
            f"/features/{result['feature_set']}/{result['clip_id']}", headers={"Accept": "application/octet-stream"}
        )
    assert js.status_code == 200 and raw.status_code == 200
    assert js.json()["frames_used"] == 16  # stored with the vector, not only said in the answer
    vector = np.asarray(js.json()["vector"], dtype=np.float32)
    assert vector.shape == (96,) and np.isfinite(vector).all() and np.abs(vector).sum() > 0
    assert raw.headers["content-type"] == "application/octet-stream"
    assert len(raw.content) == 96 * 4
    np.testing.assert_array_equal(np.frombuffer(raw.content, dtype="<f4"), vector)
    # fc_norm output of a fresh model: LayerNorm with unit weight, zero bias -> mean 0, variance 1
    assert abs(float(vector.mean())) < 1e-3 and abs(float(vector.var()) - 1.0) < 1e-2


def test_resubmit_is_cached_without_recompute(live_teacher: LiveTeacher, clips: dict[str, Path]) -> None:
    data = clips["other"].read_bytes()
    first = _post(live_teacher, [("other.mkv", data)])
    assert first.status_code == 200, first.text
    clip = first.json()["results"][0]
    assert clip["clip_id"] == hashlib.sha256(data).hexdigest()  # no NTU name: the content hash
    computed = live_teacher.metric("lastkd_teacher_clips_embedded_total")
    count = live_teacher.active_set()["count"]

    again = _post(live_teacher, [("renamed.mkv", data)])
    assert again.status_code == 200
    assert again.json()["results"][0]["cached"] is True
    assert again.json()["results"][0]["clip_id"] == clip["clip_id"]
    # same bytes under a new id: answered from the store, stored under the new id too
    alias = _post(live_teacher, [("x.mkv", data)], clip_ids=["my-alias-1"])
    assert alias.json()["results"][0]["cached"] is True
    assert live_teacher.metric("lastkd_teacher_clips_embedded_total") == computed  # no forward pass
    assert live_teacher.metric("lastkd_teacher_clips_cached_total") >= 2
    assert live_teacher.active_set()["count"] == count + 1
    with live_teacher.client() as client:
        a = client.get(f"/features/{clip['feature_set']}/{clip['clip_id']}").json()["vector"]
        b = client.get(f"/features/{clip['feature_set']}/my-alias-1").json()["vector"]
    assert a == b


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("random", "not_media"),
        ("text", "not_media"),
        ("empty", "not_media"),
        ("truncated", "corrupt"),
        ("audio", "no_video_stream"),
        ("no_frames", "no_frames"),
    ],
)
def test_bad_clip_is_rejected_and_nothing_stored(
    live_teacher: LiveTeacher, clips: dict[str, Path], name: str, code: str
) -> None:
    count = live_teacher.active_set()["count"]
    resp = _post(live_teacher, [(clips[name].name, clips[name].read_bytes())])
    assert resp.status_code == 422, resp.text
    body = resp.json()
    assert body["error"]["code"] == code
    assert body["results"][0]["error"]["code"] == code and body["results"][0]["error"]["message"]
    assert live_teacher.active_set()["count"] == count
    assert _uploads_left(live_teacher) == []


def test_oversized_upload_is_413_and_nothing_kept(live_teacher: LiveTeacher) -> None:
    count = live_teacher.active_set()["count"]
    resp = _post(live_teacher, [("big.mp4", b"\0" * 3_100_000)])
    assert resp.status_code == 413
    assert resp.json()["error"]["code"] == "too_large"
    assert "3000000" in resp.json()["error"]["message"]
    assert live_teacher.active_set()["count"] == count
    assert _uploads_left(live_teacher) == []


def test_oversized_chunked_upload_is_cut_off(live_teacher: LiveTeacher, clips: dict[str, Path]) -> None:
    """No Content-Length: the limit is enforced while streaming."""
    boundary = "lastkdboundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="a.mp4"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()

    def body():
        yield head
        for _ in range(40):
            yield b"\1" * 100_000
        yield f"\r\n--{boundary}--\r\n".encode()

    count = live_teacher.active_set()["count"]
    with live_teacher.client() as client:
        try:
            resp = client.post(
                "/embed", content=body(), headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
            )
            status = resp.status_code
        except httpx.TransportError:  # the server may close the connection while we still send
            status = 413
    assert status == 413
    assert live_teacher.active_set()["count"] == count
    assert _uploads_left(live_teacher) == []


def test_too_many_files(live_teacher: LiveTeacher, clips: dict[str, Path]) -> None:
    data = clips["good"].read_bytes()
    resp = _post(live_teacher, [(f"c{i}.mp4", data) for i in range(5)])  # the limit is 4
    assert resp.status_code == 413
    assert resp.json()["error"]["code"] == "too_many_files"
    assert _uploads_left(live_teacher) == []


@pytest.mark.parametrize(
    "clip_id",
    ["../../etc/passwd", "a/b", "a\\b", "bad\x00id", "tab\tid", "x" * 129, "", ".hidden", "sp ace"],
)
def test_hostile_clip_ids_are_rejected(live_teacher: LiveTeacher, clips: dict[str, Path], clip_id: str) -> None:
    count = live_teacher.active_set()["count"]
    resp = _post(live_teacher, [("good.mp4", clips["good"].read_bytes())], clip_ids=[clip_id])
    assert resp.status_code == 422, resp.text
    assert resp.json()["results"][0]["error"]["code"] == "invalid_clip_id"
    assert live_teacher.active_set()["count"] == count


@pytest.mark.parametrize(
    ("kwargs", "status", "code"),
    [
        ({"files": [("clip_ids", (None, b"abc"))]}, 400, "no_files"),  # a form without any file part
        ({"json": {"files": ["a.mp4"]}}, 415, "unsupported_media_type"),
        ({"content": b"just bytes", "headers": {"Content-Type": "video/mp4"}}, 415, "unsupported_media_type"),
        (
            {"content": b"--x\r\nbroken", "headers": {"Content-Type": "multipart/form-data; boundary=x"}},
            400,
            "malformed_multipart",
        ),
        ({"files": [("file", ("a.mp4", b"abc"))]}, 400, "unexpected_field"),
        (
            {"files": [("files", ("a.mp4", b"abc")), ("files", ("b.mp4", b"abd"))], "data": {"clip_ids": ["one"]}},
            400,
            "clip_ids_mismatch",
        ),
    ],
)
def test_malformed_requests(live_teacher: LiveTeacher, kwargs: dict, status: int, code: str) -> None:
    count = live_teacher.active_set()["count"]
    with live_teacher.client() as client:
        resp = client.post("/embed", **kwargs)
    assert resp.status_code == status, resp.text
    assert resp.json()["error"]["code"] == code
    assert resp.json()["error"]["message"]
    assert live_teacher.active_set()["count"] == count
    assert _uploads_left(live_teacher) == []


def test_mixed_good_and_bad_clips(live_teacher: LiveTeacher, clips: dict[str, Path]) -> None:
    count = live_teacher.active_set()["count"]
    resp = _post(
        live_teacher,
        [
            ("good.mp4", clips["good"].read_bytes()),
            ("random.mp4", clips["random"].read_bytes()),
            ("sound.wav", clips["audio"].read_bytes()),
        ],
        clip_ids=["mixed-good", "mixed-bad", "mixed-audio"],
    )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    ok, bad, audio = body["results"]
    assert ok["clip_id"] == "mixed-good" and "error" not in ok
    assert bad["error"]["code"] == "not_media" and audio["error"]["code"] == "no_video_stream"
    assert (body["embedded"], body["failed"]) == (1, 2)
    assert live_teacher.active_set()["count"] == count + 1


def test_auth_required_for_post_only(live_teacher: LiveTeacher, clips: dict[str, Path]) -> None:
    data = clips["good"].read_bytes()
    for token in (None, "wrong-token", TOKEN + "x"):
        resp = _post(live_teacher, [("good.mp4", data)], token=token)
        assert resp.status_code == 401
        assert resp.headers["www-authenticate"].startswith("Bearer")
        assert resp.json()["error"]["code"] == "unauthorized"
    with live_teacher.client(token=None) as client:
        assert client.get("/feature-sets").status_code == 200
        assert client.get("/health/live").json() == {"status": "live"}
        assert client.get("/health/ready").json()["status"] == "ready"
        assert client.get("/metrics").status_code == 200
        missing = client.get(f"/features/{live_teacher.active_set()['set_id']}/NOPE")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "unknown_clip"
        assert client.get("/features/no-such-set/abc").json()["error"]["code"] == "unknown_feature_set"


def test_sixteen_concurrent_uploads_all_answered_and_stored(live_teacher: LiveTeacher, tmp_path: Path) -> None:
    paths = [media.make_clip(tmp_path / f"conc{i}.mp4", frames=10 + i, size=(96, 64)) for i in range(16)]
    count = live_teacher.active_set()["count"]

    def one(i: int) -> httpx.Response:
        return _post(live_teacher, [(paths[i].name, paths[i].read_bytes())], clip_ids=[f"concurrent-{i:02d}"])

    with cf.ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(one, range(16)))
    assert [r.status_code for r in responses] == [200] * 16
    assert live_teacher.active_set()["count"] == count + 16
    set_id = live_teacher.active_set()["set_id"]
    with live_teacher.client() as client:
        for i in range(16):
            assert client.get(f"/features/{set_id}/concurrent-{i:02d}").status_code == 200
    text = live_teacher.metrics()
    assert "lastkd_teacher_batch_size_count" in text
    # micro-batching happened: fewer batches than clips
    assert live_teacher.metric("lastkd_teacher_batch_size_count") < live_teacher.metric(
        "lastkd_teacher_clips_embedded_total"
    )
    assert 'lastkd_http_requests_total{method="POST",route="/embed",service="teacher",status="200"}' in text


def test_real_ntu_clip_through_the_service(live_teacher: LiveTeacher) -> None:
    resp = _post(live_teacher, [(NTU_SAMPLE_VIDEO.name, NTU_SAMPLE_VIDEO.read_bytes())])
    assert resp.status_code == 200, resp.text
    result = resp.json()["results"][0]
    assert result["clip_id"] == "S001C001P001R001A001" and result["dim"] == 96


def test_service_and_cli_give_identical_vectors(live_teacher: LiveTeacher, tmp_path: Path) -> None:
    from lastkd.featurestore import FeatureStore

    resp = _post(live_teacher, [(NTU_SAMPLE_VIDEO.name, NTU_SAMPLE_VIDEO.read_bytes())])
    assert resp.status_code == 200
    set_id = resp.json()["results"][0]["feature_set"]
    with live_teacher.client() as client:
        served = np.frombuffer(
            client.get(
                f"/features/{set_id}/S001C001P001R001A001", headers={"Accept": "application/octet-stream"}
            ).content,
            "<f4",
        )

    data_dir = tmp_path / "cli"
    done = run_cli(
        ["embed", str(NTU_SAMPLE_VIDEO), "--no-progress", "--report", str(tmp_path / "r.json")],
        teacher_env(data_dir),
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    with FeatureStore(data_dir / "features.lmdb", readonly=True) as store:
        arr, found = store.get_many(set_id, ["S001C001P001R001A001"])  # same set id: same settings
    assert found.all()
    np.testing.assert_array_equal(arr[0].astype(np.float32), served)


def test_queue_full_answers_503_with_retry_after(tmp_path: Path) -> None:
    server = start_teacher(tmp_path / "q", LASTKD_TEACHER_QUEUE_SIZE="1", LASTKD_DECODE_WORKERS="1")
    try:
        data = NTU_SAMPLE_VIDEO.read_bytes()  # 1080p: decoding keeps the only slot busy for a while
        first: dict[str, httpx.Response] = {}
        worker = threading.Thread(
            target=lambda: first.setdefault("r", _post(server, [("S001C001P001R001A001_rgb.avi", data)]))
        )
        worker.start()
        deadline = time.monotonic() + 60
        while server.metric("lastkd_teacher_queue_depth") < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.metric("lastkd_teacher_queue_depth") >= 1, "the first request never entered the queue"
        second = _post(server, [("other.avi", data[:1000])])
        worker.join(120)
        assert second.status_code == 503
        assert second.json()["error"]["code"] == "queue_full"
        retry = int(second.headers["retry-after"])
        assert 1 <= retry <= 60
        assert first["r"].status_code == 200  # the queued request itself is answered
        assert server.active_set()["count"] == 1
    finally:
        stop_teacher(server)


def test_refuses_public_bind_without_token(tmp_path: Path) -> None:
    env = teacher_env(tmp_path)
    flag = run_cli(["serve-teacher", "--host", "0.0.0.0", "--port", "18999"], env, cwd=tmp_path, timeout=120)
    assert flag.returncode != 0
    assert "0.0.0.0" in flag.stderr and "LASTKD_API_TOKEN" in flag.stderr
    via_env = run_cli(["serve-teacher"], {**env, "LASTKD_TEACHER_HOST": "0.0.0.0"}, cwd=tmp_path, timeout=120)
    assert via_env.returncode != 0 and "LASTKD_API_TOKEN" in via_env.stderr
    no_weights = run_cli(["serve-teacher"], {**env, "LASTKD_TEACHER_RANDOM_INIT": "false"}, cwd=tmp_path, timeout=120)
    assert no_weights.returncode != 0 and "LASTKD_TEACHER_WEIGHTS" in no_weights.stderr


def _octet_vector(server: LiveTeacher, set_id: str, clip_id: str) -> np.ndarray:
    with server.client() as client:
        resp = client.get(f"/features/{set_id}/{clip_id}", headers={"Accept": "application/octet-stream"})
    assert resp.status_code == 200, resp.text
    return np.frombuffer(resp.content, "<f4")


def test_official_protocol_service_matches_cli_with_the_same_flags(live_teacher: LiveTeacher, tmp_path: Path) -> None:
    """LASTKD_TEACHER_PROTOCOL reaches the service: its own feature set, and the vector that
    `lastkd embed --protocol official_extraction` stores for the same clip."""
    from lastkd.featurestore import FeatureStore

    clip_id, data = "S001C001P001R001A001", NTU_SAMPLE_VIDEO.read_bytes()
    default_resp = _post(live_teacher, [(NTU_SAMPLE_VIDEO.name, data)])
    assert default_resp.status_code == 200, default_resp.text
    default_set = default_resp.json()["results"][0]["feature_set"]
    default_vec = _octet_vector(live_teacher, default_set, clip_id)

    server = start_teacher(tmp_path / "official", LASTKD_TEACHER_PROTOCOL="official_extraction")
    try:
        ready = httpx.get(f"{server.url}/health/ready", timeout=30).json()
        assert (ready["sampling"], ready["protocol"]) == ("uniform", "official_extraction")
        resp = _post(server, [(NTU_SAMPLE_VIDEO.name, data)])
        assert resp.status_code == 200, resp.text
        official_set = resp.json()["results"][0]["feature_set"]
        assert official_set == ready["feature_set"] != default_set
        assert server.active_set()["preprocessing"]["spatial"] == "squash"
        served = _octet_vector(server, official_set, clip_id)
    finally:
        stop_teacher(server)
    assert not np.allclose(served, default_vec, atol=1e-3)  # no mean/std, squashed: other inputs

    data_dir = tmp_path / "cli"
    done = run_cli(
        [
            "embed",
            str(NTU_SAMPLE_VIDEO),
            "--protocol",
            "official_extraction",
            "--no-progress",
            "--report",
            str(tmp_path / "r.json"),
        ],
        teacher_env(data_dir),
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert official_set in done.stdout
    with FeatureStore(data_dir / "features.lmdb", readonly=True) as store:
        arr, found = store.get_many(official_set, [clip_id])
    assert found.all()
    np.testing.assert_array_equal(arr[0].astype(np.float32), served)

    # Without the flag the CLI follows the same setting as the service (checked before any work).
    env = teacher_env(tmp_path / "cli-env", LASTKD_TEACHER_PROTOCOL="official_extraction")
    refused = run_cli(["embed", str(NTU_SAMPLE_VIDEO), "--feature-set", default_set], env, cwd=tmp_path)
    assert refused.returncode == 2 and f"produce feature set {official_set!r}" in refused.stderr
