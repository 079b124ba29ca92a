"""Workers killed with SIGKILL in the middle of a job: the job resumes from its last epoch
checkpoint on a restarted/replacement worker and completes, published exactly once; over the
redelivery cap it fails with a clear error."""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.live import descendants, kill_all, running
from tests.support.stack import Stack, TinyData, cmdline, redis_url, require_redis, tiny_config, wait_for


def _wait_epoch(stack: Stack, job_id: str, epoch: int) -> dict:
    """Wait until the job reports progress in ``epoch`` (0-based): the epochs before it are checkpointed."""

    def reached() -> dict | None:
        body = stack.job(job_id)
        assert body["state"] not in ("COMPLETED", "FAILED", "CANCELLED"), (body, stack.logs())
        progress = body["progress"]
        return body if progress and progress["epoch"] >= epoch and body["state"] == "RUNNING" else None

    return wait_for(reached, 300, f"job {job_id} to reach epoch {epoch + 1}")


def _published_versions(stack: Stack, name: str) -> list[tuple[int, str]]:
    with stack.client(token=None) as c:
        return [
            (cp["version"], cp["job_id"]) for cp in c.get("/checkpoints").json()["checkpoints"] if cp["name"] == name
        ]


def test_kill_runner_resumes_from_checkpoint(stack_factory: Callable[..., Stack], tiny_data: TinyData) -> None:
    stack = stack_factory()
    stack.start_api()
    worker = stack.start_worker()
    stack.wait_worker_ready(worker)
    name = f"kill-child-{uuid.uuid4().hex[:6]}"
    with stack.client() as c:
        job_id = c.post("/train", json=tiny_config(tiny_data, name, epochs=3)).json()["job_id"]
    _wait_epoch(stack, job_id, 1)
    runners = worker.runners()
    assert len(runners) == 1, runners
    os.kill(runners[0], signal.SIGKILL)  # the runner process training the job dies mid-epoch

    body = stack.wait_job(job_id, {"COMPLETED"}, timeout=300)
    assert body["attempts"] == 2
    assert body["resumed_from_epoch"] >= 1, "the second attempt started from scratch instead of the checkpoint"
    assert [h["epoch"] for h in body["history"]] == [1, 2, 3]
    assert worker.alive(), "the worker should survive the loss of its runner"
    assert "signal 9 (SIGKILL)" in worker.log() and "requeued" in worker.log()
    assert _published_versions(stack, name) == [(1, job_id)]


def test_kill_whole_worker_then_restart_resumes(stack_factory: Callable[..., Stack], tiny_data: TinyData) -> None:
    require_redis()
    stack = stack_factory(broker_url=redis_url())
    stack.start_api()
    first = stack.start_worker()
    stack.wait_worker_ready(first)
    name = f"kill-worker-{uuid.uuid4().hex[:6]}"
    with stack.client() as c:
        job_id = c.post("/train", json=tiny_config(tiny_data, name, epochs=3)).json()["job_id"]
    _wait_epoch(stack, job_id, 1)
    first.kill()  # kill -9 of the worker and its runner together: nobody acks or requeues
    assert not first.alive()

    second = stack.start_worker()
    body = stack.wait_job(job_id, {"COMPLETED"}, timeout=300)
    assert body["attempts"] == 2
    assert body["resumed_from_epoch"] >= 1
    assert [h["epoch"] for h in body["history"]] == [1, 2, 3]
    assert "lost" in stack.api.log() and job_id in stack.api.log()  # the re-submitter requeued it
    assert job_id in second.log()
    assert _published_versions(stack, name) == [(1, job_id)]


def test_redelivery_cap_fails_the_job(stack_factory: Callable[..., Stack], tiny_data: TinyData) -> None:
    stack = stack_factory(api_args=["--max-attempts", "1", "--stale-after", "4", "--sweep-interval", "0.5"])
    stack.start_api()
    worker = stack.start_worker()
    stack.wait_worker_ready(worker)
    with stack.client() as c:
        job_id = c.post("/train", json=tiny_config(tiny_data, f"cap-{uuid.uuid4().hex[:6]}", epochs=50)).json()[
            "job_id"
        ]

    def running() -> bool:
        body = stack.job(job_id)
        return body["state"] == "RUNNING" and bool(body["progress"])

    wait_for(running, 300, "the job to start training")
    os.kill(worker.runners()[0], signal.SIGKILL)
    body = stack.wait_job(job_id, {"FAILED"}, timeout=120)
    assert body["attempts"] == 1
    assert "gave up after 1 attempt" in body["error"] and "max_attempts=1" in body["error"]


def _claim_in_process(jobs_dir: str, job_id: str, barrier, results) -> None:  # type: ignore[no-untyped-def]
    from lastkd.services.trainer.jobs import JobStore, owner_id

    store = JobStore(Path(jobs_dir))
    barrier.wait()
    outcome, _ = store.claim(job_id, owner_id())
    results.put(outcome.value)
    barrier.wait()  # stay alive until every process has claimed: the owner must look alive


def test_concurrent_deliveries_claim_once(tmp_path: Path) -> None:
    """Four processes receive the same job at the same instant: exactly one runs it."""
    import multiprocessing as mp

    from lastkd.services.trainer.jobs import JobStore

    store = JobStore(tmp_path)
    record, created = store.create("dup", {"name": "dup"}, "h", max_attempts=3)
    assert created
    ctx = mp.get_context("fork")
    barrier, results = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_claim_in_process, args=(str(tmp_path), record.id, barrier, results)) for _ in range(4)]
    for p in procs:
        p.start()
    outcomes = sorted(results.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert outcomes == ["busy", "busy", "busy", "run"]
    after = store.get(record.id)
    assert after is not None and after.attempts == 1 and after.state.value == "RUNNING"
    # its owner has exited now: the next delivery takes over as attempt 2
    outcome, again = store.claim(record.id, "next-delivery")
    assert outcome.value == "run" and again is not None and again.attempts == 2


def _session(sid: int) -> list[int]:
    """Live processes of session ``sid`` (the tests start each worker in a session of its own)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] not in ("Z", "X"):
                found.append(int(entry.name))
    return found


@pytest.mark.faults
def test_kill_worker_leaves_no_runner_or_loader_processes(
    stack_factory: Callable[..., Stack], tiny_data: TinyData
) -> None:
    """kill -9 of the worker process alone (not its group): the fork server, the runner and the
    runner's DataLoader workers all go with it, and the job is requeued for the next worker."""
    stack = stack_factory()
    stack.start_api()
    worker = stack.start_worker()
    stack.wait_worker_ready(worker)
    name = f"orphans-{uuid.uuid4().hex[:6]}"
    with stack.client() as c:
        job_id = c.post("/train", json=tiny_config(tiny_data, name, epochs=200, workers=2)).json()["job_id"]
    _wait_epoch(stack, job_id, 0)

    def loaders_up() -> set[int] | None:
        runners = worker.runners()
        below = {p for r in runners for p in descendants(r)}
        return (set(runners) | below) if runners and len(below) >= 2 else None

    job_procs = wait_for(loaders_up, 120, "the runner's DataLoader workers to start", interval=0.05)
    tree = descendants(worker.proc.pid)
    assert job_procs <= tree and worker.fork_server() in tree
    os.kill(worker.proc.pid, signal.SIGKILL)  # the worker only: its children are not signalled
    worker.proc.wait(timeout=30)
    # every process the worker ever started lives in its session (loader workers come and go)
    try:
        wait_for(
            lambda: not _session(worker.proc.pid),
            # generous: under load the parent-death chain (worker -> pool / fork server ->
            # runner -> loaders) has been seen to take more than 20 s; the point is that it ends
            60,
            "every process of the killed worker to exit",
            describe=lambda: "\n".join(
                f"{p}: {cmdline(p)[:150]} {Path(f'/proc/{p}/stat').read_text()[:80]}" for p in _session(worker.proc.pid)
            ),
        )
    finally:
        kill_all(_session(worker.proc.pid))  # never leave them behind for the next test
    assert not any(running(p) for p in tree)
    # the job is not lost: the API requeues it once its runner is gone, and a new worker resumes it
    second = stack.start_worker()
    stack.wait_worker_ready(second)

    def rerun() -> dict | None:
        body = stack.job(job_id)
        ok = body["attempts"] == 2 and body["state"] == "RUNNING" and body["resumed_from_epoch"] is not None
        return body if ok else None

    wait_for(rerun, 120, "the job to run again on the new worker")
    with stack.client() as c:
        c.post(f"/jobs/{job_id}/cancel")
    stack.wait_job(job_id, {"CANCELLED"}, timeout=120)
