"""Both brokers for real: the full flow on Redis, Redis going down and coming back (clear 503,
nothing lost), and two workers on the embedded SQLite broker running two jobs at once while a
third waits in the queue."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from lastkd.student.publish import load_student
from tests.support.stack import RedisServer, Stack, TinyData, redis_url, require_redis, tiny_config


def test_full_flow_on_redis(stack_factory: Callable[..., Stack], tiny_data: TinyData) -> None:
    require_redis()
    stack = stack_factory(broker_url=redis_url())
    stack.start_api()
    stack.wait_worker_ready(stack.start_worker())
    with stack.client() as c:
        assert c.get("/health/ready").json()["broker"] == "redis"
        name = f"redis-{uuid.uuid4().hex[:6]}"
        job_id = c.post("/train", json=tiny_config(tiny_data, name)).json()["job_id"]
    body = stack.wait_job(job_id, {"COMPLETED"}, timeout=300)
    assert body["attempts"] == 1 and body["metrics"]["coverage_train"] == 1.0
    model = load_student(Path(body["result"]["path"]))  # strict LAST v2 load inside
    assert model.num_classes == 60 and model.feature_dim == 256
    with stack.client(token=None) as c:
        listed = [(cp["name"], cp["version"], cp["job_id"]) for cp in c.get("/checkpoints").json()["checkpoints"]]
    assert listed == [(name, 1, job_id)]


def test_broker_down_then_back(
    stack_factory: Callable[..., Stack], tiny_data: TinyData, private_redis: RedisServer
) -> None:
    stack = stack_factory(broker_url=private_redis.url)
    stack.start_api()
    worker = stack.start_worker()
    stack.wait_worker_ready(worker)
    private_redis.kill()

    name = f"down-{uuid.uuid4().hex[:6]}"
    config = tiny_config(tiny_data, name)
    key = f"down-{uuid.uuid4().hex}"
    with stack.client() as c:
        ready = c.get("/health/ready")
        assert ready.status_code == 503 and "broker" in ready.json()["problems"]
        t0 = time.monotonic()
        r = c.post("/train", json=config, headers={"Idempotency-Key": key})
        assert time.monotonic() - t0 < 20, "a dead broker must be answered quickly"
        assert r.status_code == 503, r.text
        error = r.json()["error"]
        assert error["code"] == "broker_unavailable" and "unreachable" in error["message"]
        assert r.headers["Retry-After"]
        job_id = error["job_id"]
        # the client retries with the same key while the broker is still down: same job, still 503
        again = c.post("/train", json=config, headers={"Idempotency-Key": key})
        assert again.status_code == 503 and again.json()["error"]["job_id"] == job_id
        assert c.get(f"/jobs/{job_id}").json()["state"] == "PENDING"

    private_redis.start()  # same port, same append-only file
    body = stack.wait_job(job_id, {"COMPLETED"}, timeout=300)  # queued by the re-submitter
    assert body["attempts"] == 1
    with stack.client() as c:
        replay = c.post("/train", json=config, headers={"Idempotency-Key": key})
        assert replay.status_code == 202 and replay.json()["job_id"] == job_id
        assert replay.json()["created"] is False and replay.json()["state"] == "COMPLETED"
        assert [j["job_id"] for j in c.get("/jobs").json()["jobs"] if j["name"] == name] == [job_id]
        assert c.get("/health/ready").status_code == 200


def test_two_workers_run_two_jobs_at_once(stack_factory: Callable[..., Stack], tiny_data: TinyData) -> None:
    stack = stack_factory()
    stack.start_api()
    workers = [stack.start_worker(), stack.start_worker()]
    for w in workers:
        stack.wait_worker_ready(w)
    ids = []
    with stack.client() as c:
        for i in range(3):  # three jobs for two workers: one must wait in the SQLite queue
            ids.append(
                c.post("/train", json=tiny_config(tiny_data, f"pair-{i}-{uuid.uuid4().hex[:4]}", epochs=2)).json()[
                    "job_id"
                ]
            )

    seen_running: list[set[str]] = []
    stop = threading.Event()

    def watch() -> None:
        with stack.client(token=None) as c:
            while not stop.is_set():
                running = {j["job_id"] for j in c.get("/jobs", params={"state": "RUNNING"}).json()["jobs"]}
                seen_running.append(running)
                time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        finished = [stack.wait_job(job_id, {"COMPLETED"}, timeout=400) for job_id in ids]
    finally:
        stop.set()
        watcher.join(timeout=10)
    assert max(len(s) for s in seen_running) == 2, "two jobs never ran at the same time"
    assert all(b["attempts"] == 1 for b in finished)
    # each worker ran at least one job, and no job ran twice
    runs_per_worker = [sum(w.log().count(f"job {i}: attempt") for i in ids) for w in workers]
    assert sorted(runs_per_worker)[0] >= 1 and sum(runs_per_worker) == 3, runs_per_worker
    assert all(w.alive() for w in workers)
