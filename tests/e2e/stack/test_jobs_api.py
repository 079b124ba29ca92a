"""The job API against a live stack: real uvicorn, a real Celery worker on the embedded SQLite
broker, httpx. Full flow with distillation, events, checkpoints and downloads, cancel,
idempotent submit, invalid configs and hostile paths."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_safetensors

from lastkd.models.last_v2 import LASTv2
from lastkd.student.publish import load_student
from tests.support.stack import Stack, TinyData, big_raw_folder, sse_events, tiny_config, wait_for


def _jobs_named(stack: Stack, name: str) -> list[dict]:
    with stack.client() as c:
        return [j for j in c.get("/jobs", params={"limit": 1000}).json()["jobs"] if j["name"] == name]


def test_health_and_metrics(embedded_stack: Stack) -> None:
    with embedded_stack.client(token=None) as c:
        ready = c.get("/health/ready")
        assert ready.status_code == 200, ready.text
        assert ready.json()["status"] == "ready"
        assert c.get("/health/live").json() == {"status": "live"}
        text = c.get("/metrics").text
    assert 'lastkd_trainer_jobs{state="RUNNING"}' in text
    assert "lastkd_http_requests_total" in text


def test_full_flow_embedded(embedded_stack: Stack, tiny_data: TinyData) -> None:
    stack = embedded_stack
    name = f"flow-{uuid.uuid4().hex[:6]}"
    with stack.client() as c:
        r = c.post("/train", json=tiny_config(tiny_data, name, epochs=2))
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]
        assert r.json()["status_url"].endswith(f"/jobs/{job_id}")
        # the request that created the job queued it before answering (never PENDING here)
        assert r.json()["state"] in ("QUEUED", "RUNNING", "COMPLETED"), r.json()
        events = sse_events(c, f"/jobs/{job_id}/events")
    # What the event stream guarantees: it samples the job record, so it ends with exactly one
    # "end" event carrying the final state, and every progress event it does deliver is well
    # formed. Which phases it catches depends on timing (a one-step epoch may be missed), so the
    # per-epoch losses are checked on the job's history, which records every epoch.
    kinds = [e for e, _ in events]
    assert kinds[-1] == "end" and kinds.count("end") == 1
    assert events[-1][1]["state"] == "COMPLETED", events[-1]
    for progress in (d["progress"] for e, d in events if d.get("progress")):
        for key in ("epoch", "epochs", "step", "steps_per_epoch", "losses", "alpha", "eta_s", "phase"):
            assert key in progress, progress
        assert progress["epochs"] == 2
        if progress["phase"] == "train":
            assert 0.0 < progress["alpha"] <= 0.5  # distillation on: linear 0.5 -> 0

    job = stack.job(job_id)
    assert job["state"] == "COMPLETED" and job["error"] is None and job["attempts"] == 1
    assert job["progress"]["phase"] == "done"
    assert [h["epoch"] for h in job["history"]] == [1, 2]
    for entry in job["history"]:
        assert entry["train_total"] > 0, entry
        assert len([k for k in entry if k.startswith("train_")]) >= 3, entry  # total, CE, distillation term
    assert job["metrics"]["coverage_train"] == 1.0
    assert job["result"]["name"] == name and job["result"]["version"] == 1

    with stack.client(token=None) as c:
        listed = c.get("/checkpoints").json()["checkpoints"]
        mine = [cp for cp in listed if cp["name"] == name]
        assert [(cp["version"], cp["job_id"]) for cp in mine] == [(1, job_id)]
        detail = c.get(f"/checkpoints/{name}/v1")
        assert detail.status_code == 200, detail.text
        detail = detail.json()
        assert detail["lineage"]["feature_set"] == tiny_data.feature_set
        assert detail["lineage"]["job_id"] == job_id
        assert "model.safetensors" in detail["files"] and "metrics.json" in detail["files"]
        weights = c.get(f"/checkpoints/{name}/1/files/model.safetensors")
        assert weights.status_code == 200
        metrics = c.get(f"/checkpoints/{name}/v1/files/metrics.json").json()
    assert "final" in metrics

    # the download is a plain LAST v2 state dict: strict load, and the same as the registry's copy
    state = load_safetensors(weights.content)
    model = LASTv2(num_classes=60, variant="small")
    model.load_state_dict(state, strict=True)
    registry_model = load_student(Path(job["result"]["path"]))
    for key, value in registry_model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert not any(k.startswith("projector") for k in state)

    with stack.client(token=None) as c:
        assert c.get("/jobs", params={"state": "completed"}).json()["count"] >= 1
        assert all(j["state"] == "COMPLETED" for j in c.get("/jobs", params={"state": "COMPLETED"}).json()["jobs"])


def test_cancel_keeps_partial_checkpoint(embedded_stack: Stack, tiny_data: TinyData) -> None:
    stack = embedded_stack
    name = f"cancel-{uuid.uuid4().hex[:6]}"
    with stack.client() as c:
        job_id = c.post("/train", json=tiny_config(tiny_data, name, epochs=50)).json()["job_id"]

    # wait until epoch 1 has been checkpointed (progress of the second epoch is visible)
    def second_epoch() -> bool:
        body = stack.job(job_id)
        assert body["state"] not in ("FAILED", "COMPLETED"), body
        return bool(body["progress"] and body["progress"]["epoch"] >= 1)

    wait_for(second_epoch, 300, "the second epoch to start")
    with stack.client() as c:
        r = c.post(f"/jobs/{job_id}/cancel")
        assert r.status_code in (200, 202), r.text
        assert r.json()["cancel_requested"] is True
        # without a token, cancelling is refused
        assert c.post(f"/jobs/{job_id}/cancel", headers={"Authorization": ""}).status_code == 401
    body = stack.wait_job(job_id, {"CANCELLED"}, timeout=120)
    assert body["progress"]["epoch"] < 49, "the job ran on instead of stopping"
    partial = Path(body["result"]["partial_checkpoint"])
    assert partial.is_file()
    saved = torch.load(partial, map_location="cpu", weights_only=True)
    assert saved["epoch"] == body["result"]["epochs_completed"] >= 1
    with stack.client(token=None) as c:
        assert not [cp for cp in c.get("/checkpoints").json()["checkpoints"] if cp["name"] == name]
        # a cancelled job cannot be cancelled into another state, and a finished one is a conflict
        assert (
            c.post(f"/jobs/{job_id}/cancel", headers={"Authorization": "Bearer stack-token-0123456789"}).json()["state"]
            == "CANCELLED"
        )


@pytest.mark.faults
def test_cancel_before_the_first_checkpoint_reports_none(embedded_stack: Stack, tiny_data: TinyData) -> None:
    """A job cancelled in its first epoch has no epoch checkpoint: ``partial_checkpoint`` is null,
    never the path of a file that does not exist."""
    stack = embedded_stack
    path, _ = big_raw_folder(tiny_data)  # parsing it keeps the job in epoch 0 for a while
    config = tiny_config(tiny_data, f"cancel0-{uuid.uuid4().hex[:6]}", epochs=50, distill=False)
    config["data"]["path"] = path
    with stack.client() as c:
        job_id = c.post("/train", json=config).json()["job_id"]
        wait_for(lambda: stack.job(job_id)["state"] == "RUNNING", 300, "the job to start", interval=0.05)
        assert c.post(f"/jobs/{job_id}/cancel").status_code in (200, 202)
    body = stack.wait_job(job_id, {"CANCELLED"}, timeout=300)
    assert body["result"]["epochs_completed"] == 0, body["result"]
    assert body["result"]["partial_checkpoint"] is None
    assert not (Path(body["result"]["run_dir"]) / "last.pt").exists()


def test_idempotent_submit(embedded_stack: Stack, tiny_data: TinyData) -> None:
    stack = embedded_stack
    name = f"idem-{uuid.uuid4().hex[:6]}"
    config = tiny_config(tiny_data, name)
    key = f"key-{uuid.uuid4().hex}"
    with stack.client() as c:
        first = c.post("/train", json=config, headers={"Idempotency-Key": key})
        second = c.post("/train", json=config, headers={"Idempotency-Key": key})
        assert first.status_code == second.status_code == 202
        assert first.json()["job_id"] == second.json()["job_id"]
        assert first.json()["created"] is True and second.json()["created"] is False
        # the same key with another config is a conflict, not a silent replay
        other = c.post("/train", json={**config, "seed": 7}, headers={"Idempotency-Key": key})
        assert other.status_code == 409 and other.json()["error"]["job_id"] == first.json()["job_id"]
        # a client job id works the same way
        client_id = f"client-{uuid.uuid4().hex[:8]}"
        a = c.post("/train", json={**config, "job_id": client_id})
        b = c.post("/train", json={**config, "job_id": client_id})
        assert a.status_code == b.status_code == 202
        assert a.json()["job_id"] == b.json()["job_id"] == client_id
        # cancel both while queued/running so they do not occupy the worker
        for jid in (first.json()["job_id"], client_id):
            assert c.post(f"/jobs/{jid}/cancel").status_code in (200, 202)
    assert sorted(j["job_id"] for j in _jobs_named(stack, name)) == sorted([first.json()["job_id"], client_id])
    for jid in (first.json()["job_id"], client_id):
        stack.wait_job(jid, {"CANCELLED"}, timeout=120)


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda c: c.update(epochs=0), "epochs"),
        (lambda c: c.update(batch_size="many"), "batch_size"),
        (lambda c: c.update(learning_rate=0.1), "learning_rate"),
        (lambda c: c["data"].update(num_frames=2), "data.num_frames"),
        (lambda c: c.pop("data"), "data"),
        (lambda c: c["distill"].update(alpha_start=True), "distill.alpha_start"),
        (lambda c: c.update(name="../evil"), "name"),
        (lambda c: c.update(job_id="../../x"), "job_id"),
    ],
)
def test_invalid_config_names_the_field(embedded_stack: Stack, tiny_data: TinyData, mutate, field: str) -> None:
    config = json.loads(json.dumps(tiny_config(tiny_data, f"bad-{uuid.uuid4().hex[:6]}")))
    mutate(config)
    before = len(_jobs_named(embedded_stack, config.get("name", "")))
    with embedded_stack.client() as c:
        r = c.post("/train", json=config)
    assert r.status_code == 422, r.text
    assert field in r.json()["error"]["message"]
    assert len(_jobs_named(embedded_stack, config.get("name", ""))) == before


@pytest.mark.parametrize(
    "body, status, words",
    [
        (b"", 422, "empty"),
        (b"{not json", 422, "not valid JSON"),
        (b"[1, 2]", 422, "JSON object"),
        (b"\xff\xfe\x00garbage", 422, "not valid JSON"),
        (b"{" + b" " * (2 << 20) + b"}", 413, "bytes"),
    ],
)
def test_malformed_bodies(embedded_stack: Stack, body: bytes, status: int, words: str) -> None:
    with embedded_stack.client() as c:
        r = c.post("/train", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    assert words in r.json()["error"]["message"]


@pytest.mark.faults
def test_unknown_feature_set_is_refused_up_front(embedded_stack: Stack, tiny_data: TinyData) -> None:
    """A ``distill.feature_set`` the store does not hold is a 422 naming the field and the sets that
    exist, before any job is recorded (it used to be a 202 and a job failing on the worker)."""
    name = f"noset-{uuid.uuid4().hex[:6]}"
    config = tiny_config(tiny_data, name)
    config["distill"]["feature_set"] = "no-such-set"
    with embedded_stack.client() as c:
        r = c.post("/train", json=config)
        assert r.status_code == 422, r.text
        error = r.json()["error"]
        assert error["code"] == "unknown_feature_set" and error["field"] == "distill.feature_set"
        assert "'no-such-set'" in error["message"] and tiny_data.feature_set in error["message"]
        assert error["feature_sets"] == [tiny_data.feature_set]
        ok = c.post("/train", json=tiny_config(tiny_data, name))  # the set that exists is accepted
        assert ok.status_code == 202 and ok.json()["warnings"] == []
        c.post(f"/jobs/{ok.json()['job_id']}/cancel")
    assert [j["job_id"] for j in _jobs_named(embedded_stack, name)] == [ok.json()["job_id"]]


def test_auth_and_lookups(embedded_stack: Stack, tiny_data: TinyData) -> None:
    with embedded_stack.client(token=None) as c:
        assert c.post("/train", json=tiny_config(tiny_data)).status_code == 401
        assert (
            c.post("/train", json=tiny_config(tiny_data), headers={"Authorization": "Bearer wrong"}).status_code == 401
        )
        assert c.get("/jobs/does-not-exist").status_code == 404
        assert c.get("/jobs/..%2F..%2Fetc").status_code == 404
        assert c.get("/jobs", params={"state": "SLEEPING"}).status_code == 422
        assert c.get("/jobs", params={"limit": 0}).status_code == 422
        assert c.get("/checkpoints/nope/v1").status_code == 404
        assert c.get("/checkpoints/nope/v0").status_code == 404
    with embedded_stack.client() as c:
        r = c.post("/train", json=tiny_config(tiny_data), headers={"Idempotency-Key": "has spaces"})
        assert r.status_code == 422 and "Idempotency-Key" in r.json()["error"]["message"]


def test_hostile_data_paths(embedded_stack: Stack, tiny_data: TinyData, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x.skeleton").write_text("secret")
    link = tiny_data.root / f"escape-{uuid.uuid4().hex[:6]}"
    link.symlink_to(outside, target_is_directory=True)
    try:
        cases = [
            ("../../../../etc", 403, "outside the configured data roots"),
            ("synth/../../..", 403, "outside the configured data roots"),
            ("/etc", 403, "outside the configured data roots"),
            (str(outside), 403, "outside the configured data roots"),
            (link.name, 403, "outside the configured data roots"),
            ("~/data", 403, "outside the configured data roots"),  # ~ is expanded, then confined
            ("synth/no-such-folder", 422, "does not exist"),
        ]
        name = f"paths-{uuid.uuid4().hex[:6]}"
        with embedded_stack.client() as c:
            for path, status, words in cases:
                config = tiny_config(tiny_data, name)
                config["data"]["path"] = path
                r = c.post("/train", json=config)
                assert r.status_code == status, (path, r.text)
                error = r.json()["error"]
                assert error["field"] == "data.path" and words in error["message"], (path, error)
            config = tiny_config(tiny_data, name)
            config["eval"]["label_map"] = "/etc/passwd"
            r = c.post("/train", json=config)
            assert r.status_code == 403 and r.json()["error"]["field"] == "eval.label_map"
        assert _jobs_named(embedded_stack, name) == []
    finally:
        link.unlink()


def test_checkpoint_files_are_path_safe(embedded_stack: Stack) -> None:
    with embedded_stack.client(token=None) as c:
        listed = c.get("/checkpoints").json()["checkpoints"]
        if not listed:
            pytest.fail("test_full_flow_embedded should have published a checkpoint first")
        name, version = listed[0]["name"], listed[0]["version"]
        base = f"/checkpoints/{name}/v{version}/files"
        assert c.get(f"{base}/config.json").status_code == 200
        for bad in ("../../../jobs/jobs.sqlite", "..%2F..%2Flineage.json", "%2Fetc%2Fpasswd", "nope.bin", ""):
            r = c.get(f"{base}/{bad}")
            assert r.status_code == 404, (bad, r.status_code)
        assert c.get(f"/checkpoints/..%2F..%2Fjobs/v{version}/files/jobs.sqlite").status_code == 404


def test_worker_parent_never_loads_torch(embedded_stack: Stack) -> None:
    """Jobs ran in per-job runner processes (test_full_flow_embedded above); the worker process that
    supervises them must not have torch (or CUDA) mapped. (Its fork server has torch but no CUDA:
    tests/e2e/stack/test_runner.py.)"""
    own_maps = Path("/proc/self/maps").read_text()
    assert "libtorch" in own_maps  # this test process imported torch: the probe does see it
    worker = embedded_stack.workers[0]
    assert worker.alive()
    maps = Path(f"/proc/{worker.proc.pid}/maps").read_text()
    assert "libtorch" not in maps and "libcuda.so" not in maps


def test_job_history_survives_an_api_restart(embedded_stack: Stack) -> None:
    """Last in this module: it restarts the module's API. The job records live in their own
    database, so a new API process answers the same history."""
    stack = embedded_stack
    with stack.client() as c:
        before = c.get("/jobs", params={"limit": 1000}).json()["jobs"]
    completed = [j for j in before if j["state"] == "COMPLETED"]
    assert completed, "test_full_flow_embedded should have completed a job first"
    assert stack.api is not None
    old_pid = stack.api.proc.pid
    stack.api.stop()
    stack.start_api()
    assert stack.api.proc.pid != old_pid
    with stack.client() as c:
        after = c.get("/jobs", params={"limit": 1000}).json()["jobs"]
    assert [(j["job_id"], j["state"]) for j in after] == [(j["job_id"], j["state"]) for j in before]
    again = stack.job(completed[0]["job_id"])
    assert again["history"] == completed[0]["history"] and again["result"] == completed[0]["result"]
