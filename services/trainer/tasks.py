"""The training task: Celery carries the message, a runner process trains, the job database records.

One delivery = one attempt. The task body runs in the worker process (Celery ``threads`` pool) and
only supervises:

1. settle without starting anything what needs no training: a job that is already final, cancelled
   before it started, missing, or over its attempt cap is acknowledged at once (a queue of
   cancelled jobs drains at the speed of a database read, not of a process start);
2. otherwise start a runner (:mod:`lastkd.services.trainer.runner`) from the worker's fork server,
   a non-daemonic process that may have children (DataLoader workers, the parse pool). The runner
   claims the job (owner ``host:runner_pid``), trains in ``jobs_dir/<job_id>`` (resuming from the
   last epoch checkpoint there), publishes once per job id and records the end state;
3. wait for it and make the delivery's Celery result agree with the job: a FAILED job raises
   :class:`JobFailed` (the result backend says FAILURE), a runner that died without recording an
   end state puts the job back to PENDING for the API's re-submitter (attempts stay capped) and
   raises :class:`RunnerLost`.

The job database is the source of truth for state, progress and cancel; the result backend only
keeps each delivery's outcome (no progress mirror). This module imports neither torch nor the
engine: the worker process never loads them, the fork server does (see :func:`start_runner_server`).
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.forkserver
import time
from typing import TYPE_CHECKING, Any, cast

from lastkd.services.trainer.jobs import ClaimOutcome, JobState, JobStore

if TYPE_CHECKING:  # celery_app imports this module to register the task; the types only go back
    from celery import Celery, Task

    from lastkd.services.trainer.celery_app import TrainerCelery

log = logging.getLogger(__name__)

TASK_NAME = "lastkd.train"  # the one task; the API and the worker address it by this name
# What the fork server imports once, before it forks any runner: torch, the engine, publish.
# publish's lazy imports too (plots, FLOP count): a runner is a fresh process each job, so an import
# left to it is paid by every job (about a second for matplotlib), not once.
RUNNER_PRELOAD = [
    "lastkd.services.trainer.tasks",
    "lastkd.services.trainer.runner",
    "matplotlib.figure",
    "matplotlib.backends.backend_agg",
    "torch.utils.flop_counter",
]


class JobFailed(Exception):
    """The job ended FAILED (its error is in the job record); recorded as FAILURE by Celery."""


class RunnerLost(Exception):
    """The runner process died before recording an end state; the job was put back to PENDING."""


def _context() -> multiprocessing.context.ForkServerContext:
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(RUNNER_PRELOAD)
    return ctx


def start_runner_server() -> int:
    """Start the fork server that runners are forked from (preloading torch and the engine) and
    return its pid. The worker calls this before it consumes, so the first job is as fast as the
    rest; when it was not called, the first runner starts the server itself."""
    _context()
    multiprocessing.forkserver.ensure_running()
    return int(multiprocessing.forkserver._forkserver._forkserver_pid)  # type: ignore[attr-defined]  # private, untyped


def _runner_entry(spec: dict[str, Any], conn: Any) -> None:
    """Target of the runner process (a light function: the heavy module is preloaded)."""
    from lastkd.services.trainer.runner import run_job as run_in_runner

    run_in_runner(spec, conn)


def run_job(task: Task, job_id: str) -> dict[str, Any]:
    """Supervise one delivery of job ``job_id``; returns a small summary for the result backend."""
    runtime = cast("TrainerCelery", task.app).runtime
    store = JobStore(runtime.jobs_dir)
    settled = store.settle(job_id)
    if settled is not None:
        outcome, record = settled
        log.info("job %s: acknowledged without running (%s)", job_id, outcome.value)
        return {"job_id": job_id, "outcome": outcome.value, "state": record.state.value if record else None}

    ctx = _context()
    ours, theirs = ctx.Pipe(duplex=True)
    spec = {
        "job_id": job_id,
        "jobs_dir": str(runtime.jobs_dir),
        "registry_dir": str(runtime.registry_dir),
        "store_path": str(runtime.store_path),
        "data_roots": [str(p) for p in runtime.data_roots],
        "log_level": runtime.log_level,
        "server_pid": getattr(multiprocessing.forkserver._forkserver, "_forkserver_pid", None),
    }
    proc = ctx.Process(target=_runner_entry, args=(spec, theirs), name=f"lastkd-runner-{job_id}", daemon=False)
    started = time.monotonic()
    proc.start()
    theirs.close()  # our copy; the runner holds its own (EOF at our end when it exits)
    claim: str | None = None
    try:
        while True:
            kind, value = ours.recv()  # EOFError when the runner exits
            if kind == "claim":
                claim = value
    except (EOFError, OSError):
        pass
    proc.join()
    ours.close()
    code = proc.exitcode
    record = store.get(job_id)
    state = record.state if record else None
    log.info(
        "job %s: runner pid %s exited %s after %.1fs (claim %s, job %s)",
        job_id,
        proc.pid,
        code,
        time.monotonic() - started,
        claim,
        state.value if state else None,
    )
    if claim is not None and claim != ClaimOutcome.RUN.value:
        return {"job_id": job_id, "outcome": claim, "state": state.value if state else None}
    if record is not None and state is JobState.FAILED:
        raise JobFailed(f"job {job_id} failed: {record.error}")
    if record is not None and state in (JobState.COMPLETED, JobState.CANCELLED):
        return {"job_id": job_id, "outcome": state.value.lower(), **(record.result or {})}
    # The runner died without an end state (killed, out of memory, crashed in C code).
    reason = f"runner process {proc.pid} died ({_describe_exit(code)}) before the job ended"
    if state is JobState.RUNNING:
        # It had claimed the job: the next delivery resumes from the last epoch checkpoint.
        if store.requeue(job_id, f"{reason}; requeued"):
            log.warning("job %s: %s; requeued", job_id, reason)
        raise RunnerLost(f"job {job_id}: {reason}")
    if code is not None and code < 0 and store.unqueue(job_id, f"{reason}; requeued"):
        # Killed from outside before it claimed (a worker shutdown): the job waits for the next worker.
        log.warning("job %s: %s; requeued", job_id, reason)
        raise RunnerLost(f"job {job_id}: {reason}")
    # It could not start the job at all (an error at start-up): a retry would fail the same way.
    store.finish(job_id, None, JobState.FAILED, error=reason)
    raise JobFailed(f"job {job_id} failed: {reason}")


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "no exit status"
    if code < 0:
        import signal

        try:
            return f"signal {-code} ({signal.Signals(-code).name})"
        except ValueError:
            return f"signal {-code}"
    return f"exit status {code}"


def register(app: Celery) -> None:
    """Register the training task on ``app`` (name :data:`TASK_NAME`)."""

    # shared=False: the task belongs to this app only, so building a second app in one process
    # (the API builds one per broker it checks) registers it again instead of warning.
    # throws: the two outcomes above are expected ends of a delivery, logged without a traceback.
    @app.task(
        name=TASK_NAME,
        bind=True,
        acks_late=True,
        reject_on_worker_lost=True,
        ignore_result=False,
        shared=False,
        throws=(JobFailed, RunnerLost),
    )
    def train_job(self: Task, job_id: str) -> dict[str, Any]:
        return run_job(self, job_id)

    del train_job


def enqueue(app: TrainerCelery, job_id: str) -> None:
    """Send job ``job_id`` to the broker (raises on a broker error; the caller decides).

    Each send gets its own Celery task id: one job may be sent again after its worker is lost.
    """
    queue = app.runtime.queue
    app.send_task(TASK_NAME, args=[job_id], task_id=f"{job_id}-{time.time_ns()}", queue=queue)
