"""``POST /teacher/finetune``: the teacher's fine-tuning as a job of the same system (records,
queue, worker processes, SSE), published beside the students under ``_teachers``."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from lastkd.hashing import sha256_file
from lastkd.student.synth import generate
from tests.support.live import wait_for
from tests.support.stack import Stack, TinyData, redis_url, require_redis, sse_events, tiny_config


@pytest.fixture(scope="module")
def rgb(tiny_data: TinyData) -> str:
    """A synthetic RGB set inside the stack's data root; its path relative to the root."""
    name = f"rgb-{uuid.uuid4().hex[:6]}"
    generate(tiny_data.root / name, classes=2, samples_per_class=4, frames=36, video=True, seed=2)
    return name


def finetune_config(rgb: str, name: str, **extra: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "name": name,
        "data": {"path": f"{rgb}/videos", "person_crop": True, "skeletons": f"{rgb}/skeletons"},
        "model": "videomae_v2_tiny",
        "num_frames": 4,
        "sampling_rate": 2,
        "size": 32,
        "epochs": 2,
        "batch_size": 2,
        "max_steps_per_epoch": 1,
        "augment": {"flip": False},
        "eval": {"temporal_views": 1, "spatial_crops": 1},
        "device": "cpu",
    }
    config.update(extra)
    return config


def test_a_fine_tuning_job_runs_on_a_worker_and_publishes_the_teacher(
    embedded_stack: Stack, rgb: str, tiny_data: TinyData
) -> None:
    stack = embedded_stack
    name = f"teacher-{uuid.uuid4().hex[:6]}"
    with stack.client() as c:
        r = c.post("/teacher/finetune", json=finetune_config(rgb, name), headers={"Idempotency-Key": name})
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]
        assert r.json()["kind"] == "teacher_finetune" and r.json()["created"] is True
        events = sse_events(c, f"/jobs/{job_id}/events")
        again = c.post("/teacher/finetune", json=finetune_config(rgb, name), headers={"Idempotency-Key": name})
        assert again.json()["job_id"] == job_id and again.json()["created"] is False
        # the same key for a training job is another job's key: a conflict, not a silent replay
        other = c.post("/train", json=tiny_config(tiny_data, name), headers={"Idempotency-Key": name})
        assert other.status_code == 409 and other.json()["error"]["job_id"] == job_id
        listed = c.get("/jobs").json()["jobs"]
    assert events[-1][0] == "end" and events[-1][1]["state"] == "COMPLETED", events[-1]
    job = stack.job(job_id)
    assert job["kind"] == "teacher_finetune" and job["attempts"] == 1
    assert [h["epoch"] for h in job["history"]] == [1, 2]
    assert 0.0 <= job["metrics"]["top1"] <= 1.0
    folder = Path(job["result"]["path"])
    lineage = json.loads((folder / "lineage.json").read_text())
    assert folder.parent.name == "_teachers" and folder.name == f"{name}-{lineage['teacher_sha256'][:12]}"
    assert lineage["job_id"] == job_id and lineage["teacher_sha256"] == sha256_file(folder / "teacher.pth")
    assert job["result"]["teacher_sha256"] == lineage["teacher_sha256"]
    assert any(j["job_id"] == job_id and j["kind"] == "teacher_finetune" for j in listed)
    # the students' listing does not show the teacher
    with stack.client(token=None) as c:
        assert all(cp["name"] != name for cp in c.get("/checkpoints").json()["checkpoints"])


@pytest.mark.parametrize(
    ("mutate", "status", "words"),
    [
        (lambda c: c.update(epochs=0), 422, "epochs"),
        (lambda c: c.update(model="resnet"), 422, "unknown VideoMAE V2 model"),
        (lambda c: c["data"].update(path="/etc"), 403, "outside the configured data roots"),
        (lambda c: c["data"].update(skeletons="no/such/folder"), 422, "does not exist"),
        (lambda c: c.update(job_id="../x"), 422, "job_id"),
    ],
)
def test_bad_fine_tuning_configs_are_refused_before_anything_runs(
    embedded_stack: Stack, rgb: str, mutate: Any, status: int, words: str
) -> None:
    config = finetune_config(rgb, f"bad-{uuid.uuid4().hex[:6]}")
    mutate(config)
    with embedded_stack.client() as c:
        before = c.get("/jobs").json()["count"]
        r = c.post("/teacher/finetune", json=config)
        assert r.status_code == status, r.text
        assert words in r.text
        assert c.get("/jobs").json()["count"] == before  # nothing recorded
        assert c.post("/teacher/finetune", content=b"[1, 2]").status_code == 422


def test_kill_9_of_the_worker_mid_fine_tuning_resumes_to_the_same_teacher(
    stack_factory: Callable[..., Stack], rgb: str
) -> None:
    """The worker dies with the job half done; another worker resumes it from its last epoch
    checkpoint, and the teacher it publishes is bit for bit the one an uninterrupted job publishes."""
    require_redis()
    stack = stack_factory(broker_url=redis_url())
    stack.start_api()
    first = stack.start_worker()
    stack.wait_worker_ready(first)
    config = finetune_config(rgb, f"killed-{uuid.uuid4().hex[:6]}", epochs=40, eval={"every_epochs": 40})
    with stack.client() as c:
        job_id = c.post("/teacher/finetune", json=config).json()["job_id"]

    def past_epoch_two() -> bool:
        progress = stack.job(job_id)["progress"]
        return bool(progress) and progress["epoch"] >= 2

    wait_for(past_epoch_two, 300, "the fine-tuning job to finish two epochs")
    first.kill()  # kill -9 of the worker and its runner together
    second = stack.start_worker()
    body = stack.wait_job(job_id, {"COMPLETED"}, timeout=300)
    assert body["attempts"] == 2 and body["resumed_from_epoch"] >= 2
    assert [h["epoch"] for h in body["history"]][-1] == 40
    # the same config without the interruption (another name: names do not enter the training)
    with stack.client() as c:
        clean_id = c.post("/teacher/finetune", json={**config, "name": config["name"] + "-clean"}).json()["job_id"]
    clean = stack.wait_job(clean_id, {"COMPLETED"}, timeout=300)
    assert clean["attempts"] == 1 and job_id in second.log()
    assert body["result"]["teacher_sha256"] == clean["result"]["teacher_sha256"]
