"""The training task: a thin shell over ``engine.train`` and ``publish``.

One delivery = one attempt: claim the job in the job database (attempt + 1, RUNNING), train in
``jobs_dir/<job_id>`` (the engine resumes from that folder's last epoch checkpoint, so a
redelivered job continues where the lost worker stopped), publish the student (idempotent per
job id) and mark the job COMPLETED. A background thread keeps the heartbeat, flushes progress to
the job database and the Celery result backend, and polls the cancel flag, so the engine's
per-step hooks cost a memory write and a flag read.

torch and the engine are imported inside the task: the worker parent never loads CUDA.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from typing import TYPE_CHECKING, Any

from lastkd.services.trainer.jobs import ClaimOutcome, JobState, JobStore, owner_id

if TYPE_CHECKING:
    from celery import Celery, Task

log = logging.getLogger(__name__)

TASK_NAME = "lastkd.train"  # the one task; the API and the worker address it by this name

FLUSH_INTERVAL_S = 0.5  # progress/heartbeat/cancel-poll period of the reporter thread
PROGRESS_STATE = "PROGRESS"


class _Reporter(threading.Thread):
    """Heartbeat + progress flush + cancel poll, every FLUSH_INTERVAL_S, off the training thread."""

    def __init__(self, task: "Task", store: JobStore, job_id: str, owner: str) -> None:
        super().__init__(name=f"lastkd-reporter-{job_id}", daemon=True)
        self.task, self.store, self.job_id, self.owner = task, store, job_id, owner
        self.cancel = threading.Event()
        self._stop_event = threading.Event()
        self._lock = threading.Lock()
        self._progress: dict[str, Any] | None = None
        self._history: list[dict[str, Any]] = []
        self._dirty = False
        self._history_dirty = False
        self.first_epoch: int | None = None

    def on_progress(self, progress: Any) -> None:
        """Engine hook: keep the latest snapshot (the thread writes it out)."""
        snap = progress.as_dict() if hasattr(progress, "as_dict") else dict(progress)
        with self._lock:
            if self.first_epoch is None:
                self.first_epoch = int(snap.get("epoch", 0))
            self._progress = snap
            self._dirty = True
            if snap.get("phase") == "eval":
                self._history.append({"epoch": snap["epoch"] + 1, "losses": snap.get("losses"), "val": snap.get("val")})
                self._history_dirty = True

    def should_cancel(self) -> bool:
        """Engine hook: the cancel flag as last polled (at most FLUSH_INTERVAL_S old)."""
        return self.cancel.is_set()

    def flush(self) -> None:
        """Write the heartbeat (and new progress/history) to the job DB, mirror progress to the
        result backend, and pick up the cancel flag."""
        with self._lock:
            progress = self._progress if self._dirty else None
            history = list(self._history) if self._history_dirty else None
            self._dirty = self._history_dirty = False
            first = self.first_epoch
        try:
            if self.store.heartbeat(self.job_id, self.owner, progress, history, resumed_from_epoch=first):
                self.cancel.set()
        except Exception:  # a busy or briefly unavailable DB must not kill training
            log.warning("job %s: heartbeat failed", self.job_id, exc_info=True)
        if progress is not None:
            try:
                self.task.update_state(state=PROGRESS_STATE, meta=progress)
            except Exception:  # the result backend is a mirror; the job DB is the record
                log.warning("job %s: result backend progress update failed", self.job_id, exc_info=True)

    def run(self) -> None:
        """Flush every FLUSH_INTERVAL_S until :meth:`stop`."""
        while not self._stop_event.wait(FLUSH_INTERVAL_S):
            self.flush()

    def stop(self) -> None:
        """Stop the thread and write the last state out."""
        self._stop_event.set()
        self.join(timeout=10)
        self.flush()

    @property
    def history(self) -> list[dict[str, Any]]:
        """The per-epoch records seen so far."""
        with self._lock:
            return list(self._history)


def _jsonable(obj: Any) -> Any:
    """Plain JSON types only (metrics may hold numpy scalars or arrays)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, float) and obj != obj:  # NaN is not JSON
        return None
    return obj


def run_job(task: "Task", job_id: str) -> dict[str, Any]:
    """Execute one delivery of job ``job_id``; returns a small summary for the result backend."""
    runtime = task.app.lastkd  # type: ignore[attr-defined]
    store = JobStore(runtime.jobs_dir)
    owner = owner_id()
    outcome, record = store.claim(job_id, owner)
    if outcome is not ClaimOutcome.RUN:
        log.info("job %s: delivery not run (%s)", job_id, outcome.value)
        return {"job_id": job_id, "outcome": outcome.value, "state": record.state.value if record else None}
    assert record is not None
    log.info("job %s: attempt %d/%d on %s", job_id, record.attempts, record.max_attempts, owner)

    reporter = _Reporter(task, store, job_id, owner)
    reporter.start()
    try:
        # Heavy imports here, in the per-job child process (never in the worker parent).
        from lastkd.student.config import TrainConfig
        from lastkd.student.training import RunState, TrainHooks, train
        from lastkd.student.paths import confine_config_paths
        from lastkd.student.publish import publish

        config = TrainConfig.model_validate(record.config)
        # Check the paths again on the worker: its data roots rule, and files may have moved.
        config = confine_config_paths(config, runtime.data_roots)
        run_dir = runtime.jobs_dir / job_id
        result = train(
            config,
            run_dir,
            store_path=runtime.store_path,
            hooks=TrainHooks(on_progress=reporter.on_progress, should_cancel=reporter.should_cancel),
            data_roots=runtime.data_roots,
        )
        reporter.stop()
        history = _jsonable(result.history)
        metrics = _jsonable(result.metrics)
        if result.state is RunState.CANCELLED:
            store.finish(job_id, owner, JobState.CANCELLED, metrics=metrics, history=history,
                         error=None, result={"run_dir": str(run_dir), "epochs_completed": result.epochs_completed,
                                             "partial_checkpoint": str(run_dir / "last.pt")})
            log.info("job %s: cancelled after %d epoch(s)", job_id, result.epochs_completed)
            return {"job_id": job_id, "outcome": "cancelled"}
        published = publish(result, runtime.registry_dir, job_id=job_id)
        summary = {
            "name": published.name,
            "version": published.version,
            "path": str(published.path),
            "run_dir": str(run_dir),
            "epochs_completed": result.epochs_completed,
        }
        store.finish(job_id, owner, JobState.COMPLETED, result=summary, metrics=metrics, history=history)
        log.info("job %s: completed, published %s v%d", job_id, published.name, published.version)
        return {"job_id": job_id, "outcome": "completed", **summary}
    except Exception as exc:
        reporter.stop()
        message = f"{type(exc).__name__}: {exc}"
        log.error("job %s failed: %s\n%s", job_id, message, traceback.format_exc())
        store.finish(job_id, owner, JobState.FAILED, error=message[:4000])
        # Returned, not raised: the failure is recorded, and a raise would only add a traceback
        # to the result backend (there is nothing to retry: the same input fails the same way).
        return {"job_id": job_id, "outcome": "failed", "error": message[:4000]}


def register(app: "Celery") -> None:
    """Register the training task on ``app`` (name :data:`TASK_NAME`)."""

    # shared=False: the task belongs to this app only, so building a second app in one process
    # (the API builds one per broker it checks) registers it again instead of warning.
    @app.task(name=TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=False,
              shared=False)
    def train_job(self: "Task", job_id: str) -> dict[str, Any]:
        return run_job(self, job_id)

    del train_job


def enqueue(app: "Celery", job_id: str) -> None:
    """Send job ``job_id`` to the broker (raises on a broker error; the caller decides).

    Each send gets its own Celery task id: one job may be sent again after its worker is lost.
    """
    queue = app.lastkd.queue  # type: ignore[attr-defined]
    app.send_task(TASK_NAME, args=[job_id], task_id=f"{job_id}-{time.time_ns()}", queue=queue)
