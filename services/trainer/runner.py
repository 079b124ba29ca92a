"""The runner: the process that trains one job, started per job from the worker's fork server.

Why a separate process. The Celery task is only the messenger: it runs in the worker (a thread of
its ``threads`` pool) and supervises. Training needs a process that may have children (DataLoader
workers, the raw-NTU parse pool), that gives its GPU memory back to the driver when it ends and
that starts fast. The fork server of the worker imports torch and this module once, at worker
start (CUDA is never initialised there: nothing here touches a device at import), and forks one
runner per job, so a job pays neither a torch import nor a fresh interpreter.

The runner owns the job in the job database (``host:runner_pid``): it claims it, writes heartbeat
and progress, polls the cancel flag, publishes and records the end state. It dies with the worker:
a pipe from the supervising worker is watched by a thread, and at EOF (the worker died, even by
SIGKILL) the runner kills itself; its own children (DataLoader workers, parse pool) carry a
parent-death signal (:func:`lastkd.lifeline.die_with_parent`), so nothing is left running.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import threading
import time
import traceback
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

# Heavy imports at module level on purpose: the fork server imports this module once.
import torch  # noqa: F401  (imported for the fork server's preload)

from lastkd.jsonsafe import to_jsonable
from lastkd.lifeline import die_with_parent
from lastkd.services.trainer.jobs import ClaimOutcome, JobKind, JobState, JobStore, owner_id
from lastkd.student.config import TrainConfig
from lastkd.student.paths import confine_config_paths
from lastkd.student.publish import publish
from lastkd.student.training import RunState, TrainHooks, train

log = logging.getLogger(__name__)

FLUSH_INTERVAL_S = 0.5  # progress/heartbeat/cancel-poll period of the reporter thread


class _Reporter(threading.Thread):
    """Heartbeat + progress flush + cancel poll, every FLUSH_INTERVAL_S, off the training thread."""

    def __init__(self, store: JobStore, job_id: str, owner: str) -> None:
        super().__init__(name=f"lastkd-reporter-{job_id}", daemon=True)
        self.store, self.job_id, self.owner = store, job_id, owner
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
        """Write the heartbeat (and new progress/history) to the job database and pick up the
        cancel flag. The job database is the only record of progress (no result-backend mirror)."""
        with self._lock:
            progress = self._progress if self._dirty else None
            history = list(self._history) if self._history_dirty else None
            self._dirty = self._history_dirty = False
            first = self.first_epoch
        try:
            if self.store.heartbeat(
                self.job_id, self.owner, to_jsonable(progress), to_jsonable(history), resumed_from_epoch=first
            ):
                self.cancel.set()
        except Exception:  # a busy or briefly unavailable DB must not kill training
            log.warning("job %s: heartbeat failed", self.job_id, exc_info=True)

    def run(self) -> None:
        """Flush every FLUSH_INTERVAL_S until :meth:`stop`."""
        while not self._stop_event.wait(FLUSH_INTERVAL_S):
            self.flush()

    def stop(self) -> None:
        """Stop the thread and write the last state out."""
        self._stop_event.set()
        if self.is_alive():
            self.join(timeout=10)
        self.flush()


def _watch_supervisor(conn: Connection) -> None:
    """Kill this runner (and, through their parent-death signal, its children) when the
    supervising worker goes away: its end of ``conn`` closes, even when it was SIGKILLed."""
    try:
        while True:
            conn.recv()  # the supervisor sends nothing; recv returns only at EOF (raises)
    except (EOFError, OSError):
        pass
    os.kill(os.getpid(), signal.SIGKILL)


def partial_checkpoint(run_dir: Path) -> str | None:
    """The epoch checkpoint a cancelled run leaves, or None when no epoch was saved yet."""
    from lastkd.student.checkpoints import CHECKPOINT_NAME

    path = run_dir / CHECKPOINT_NAME
    return str(path) if path.is_file() else None


def _finetune_teacher(
    record: Any,
    store: JobStore,
    owner: str,
    reporter: _Reporter,
    run_dir: Path,
    registry_dir: Path,
    data_roots: list[Path],
) -> None:
    """A ``teacher_finetune`` job: fine-tune, then publish to ``<registry>/_teachers``; the end
    state goes to the job record like a training job's (exceptions go to the caller)."""
    from lastkd.finetune.config import FinetuneConfig
    from lastkd.finetune.loop import FinetuneHooks, FinetuneState, finetune, publish_to_registry
    from lastkd.registry import LINEAGE_FILE, TEACHER_FILE

    config = FinetuneConfig.model_validate(record.config).confined(data_roots)  # the worker's own roots

    def on_epoch(entry: dict[str, Any]) -> None:
        val = {k[4:]: v for k, v in entry.items() if k.startswith("val_")}
        reporter.on_progress(
            {
                "epoch": entry["epoch"] - 1,
                "epochs": config.epochs,
                "phase": "eval",
                "losses": {"total": entry["train_loss"]},
                "val": val or None,
            }
        )

    result = finetune(config, run_dir, FinetuneHooks(on_epoch, reporter.should_cancel), roots=data_roots)
    reporter.stop()
    history, metrics = to_jsonable(result.history), to_jsonable(result.metrics)
    if result.state is FinetuneState.CANCELLED:
        summary = {"run_dir": str(run_dir), "epochs_completed": result.epochs_completed}
        store.finish(record.id, owner, JobState.CANCELLED, metrics=metrics, history=history, error=None, result=summary)
        return
    folder = publish_to_registry(result, registry_dir, job_id=record.id)
    summary = {
        "name": config.name,
        "path": str(folder),
        "teacher": str(folder / TEACHER_FILE),
        "teacher_sha256": json.loads((folder / LINEAGE_FILE).read_text())["teacher_sha256"],
        "run_dir": str(run_dir),
        "epochs_completed": result.epochs_completed,
    }
    store.finish(record.id, owner, JobState.COMPLETED, result=summary, metrics=metrics, history=history)
    log.info("job %s: teacher fine-tuned, published %s", record.id, folder)


def run_job(spec: dict[str, Any], conn: Connection) -> None:
    """Body of the runner process for one delivery of job ``spec['job_id']``.

    Sends ``("claim", outcome)`` to the supervisor once the claim is decided; the end state of
    the job goes to the job database (COMPLETED, CANCELLED or FAILED with the error).
    """
    die_with_parent(signal.SIGKILL, spec.get("server_pid"))
    # This process's own children (DataLoader workers, the parse pool) are forked from it, so they
    # are its children and their parent-death signal follows it. A runner inherits the fork-server
    # start method otherwise, and would start a second fork server that outlives it.
    multiprocessing.set_start_method("fork", force=True)
    logging.basicConfig(
        level=spec.get("log_level", "INFO"),
        format="[%(asctime)s: %(levelname)s/runner-%(process)d] %(name)s: %(message)s",
    )
    threading.Thread(target=_watch_supervisor, args=(conn,), name="lastkd-supervisor-watch", daemon=True).start()
    job_id = spec["job_id"]
    jobs_dir, registry_dir = Path(spec["jobs_dir"]), Path(spec["registry_dir"])
    store_path = Path(spec["store_path"])
    data_roots = [Path(p) for p in spec["data_roots"]]

    store = JobStore(jobs_dir)
    owner = owner_id()
    outcome, record = store.claim(job_id, owner)
    conn.send(("claim", outcome.value))
    if outcome is not ClaimOutcome.RUN:
        log.info("job %s: delivery not run (%s)", job_id, outcome.value)
        return
    assert record is not None
    log.info("job %s: attempt %d/%d in runner %s", job_id, record.attempts, record.max_attempts, owner)

    reporter = _Reporter(store, job_id, owner)
    reporter.start()
    run_dir = jobs_dir / job_id
    t_start = time.perf_counter()
    try:
        if record.kind is JobKind.TEACHER_FINETUNE:
            _finetune_teacher(record, store, owner, reporter, run_dir, registry_dir, data_roots)
            return
        config = TrainConfig.model_validate(record.config)
        # Check the paths again on the worker: its data roots rule, and files may have moved.
        config = confine_config_paths(config, data_roots)
        result = train(
            config,
            run_dir,
            store_path=store_path,
            hooks=TrainHooks(on_progress=reporter.on_progress, should_cancel=reporter.should_cancel),
            data_roots=data_roots,
        )
        reporter.stop()
        history = to_jsonable(result.history)
        metrics = to_jsonable(result.metrics)
        if result.state is RunState.CANCELLED:
            store.finish(
                job_id,
                owner,
                JobState.CANCELLED,
                metrics=metrics,
                history=history,
                error=None,
                result={
                    "run_dir": str(run_dir),
                    "epochs_completed": result.epochs_completed,
                    "partial_checkpoint": partial_checkpoint(run_dir),
                },
            )
            log.info("job %s: cancelled after %d epoch(s)", job_id, result.epochs_completed)
            return
        published = publish(result, registry_dir, job_id=job_id)
        summary = {
            "name": published.name,
            "version": published.version,
            "path": str(published.path),
            "run_dir": str(run_dir),
            "epochs_completed": result.epochs_completed,
            # engine + publish time of this attempt: the job's wall time minus this is the shell's cost
            "train_publish_s": round(time.perf_counter() - t_start, 3),
        }
        store.finish(job_id, owner, JobState.COMPLETED, result=summary, metrics=metrics, history=history)
        log.info("job %s: completed, published %s v%d", job_id, published.name, published.version)
    except Exception as exc:
        reporter.stop()
        message = f"{type(exc).__name__}: {exc}"
        log.error("job %s failed: %s\n%s", job_id, message, traceback.format_exc())
        store.finish(job_id, owner, JobState.FAILED, error=message[:4000])
