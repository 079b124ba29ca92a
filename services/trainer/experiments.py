"""Experiments as groups of ordinary jobs: one record per experiment in the job database, one job
per (arm, seed) child, and the paired report once every child has finished.

An experiment and all its child jobs are recorded in one transaction, so a request either made
the whole experiment or nothing. The children are plain jobs (``<experiment id>-<arm>-s<seed>``):
durable, resumable, cancellable and run by any worker like every other job. Nobody waits on an
experiment: whoever looks at it (the API's re-submitter every round, ``GET /experiments/{id}``)
calls :meth:`ExperimentStore.settle`, which moves it on once its children allow:

* a child FAILED: the experiment is FAILED (naming the child) and the other children are cancelled;
* every child finished and one was cancelled (or the experiment was): CANCELLED;
* every child COMPLETED: the report is built from the children's job records (their final metrics
  and per-epoch history, :func:`lastkd.student.experiment.build_report`) and written under the
  registry (``_experiments/<id>/``: report.json, report.md, plots/), then COMPLETED.

Settling is idempotent: the report is written to a temporary folder and renamed, and the state
changes only from a non-final one, so two settlers at once leave one report.
"""

from __future__ import annotations

import builtins
import json
import os
import shutil
import sqlite3
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lastkd.hashing import sha256_json
from lastkd.schemas.trainer import TERMINAL, JobState
from lastkd.services.trainer.jobs import IdempotencyConflict, JobRecord, JobStore
from lastkd.student.experiment import ChildResult, ExperimentConfig, build_report, expand, write_report

__all__ = ["EXPERIMENTS_DIR", "ChildRef", "ExperimentRecord", "ExperimentStore", "child_job_id"]

# Under the registry, beside the students: not a valid student name, so never mistaken for one.
EXPERIMENTS_DIR = "_experiments"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS experiments (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    state TEXT NOT NULL,
    config TEXT NOT NULL,
    config_hash TEXT NOT NULL,
    idempotency_key TEXT UNIQUE,
    children TEXT NOT NULL,
    report_dir TEXT,
    error TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    finished_at REAL
);
CREATE INDEX IF NOT EXISTS experiments_state ON experiments(state, created_at);
"""


def child_job_id(experiment_id: str, arm: str, seed: int) -> str:
    """The job id of one child: deterministic, so creating the children twice creates them once."""
    return f"{experiment_id}-{arm}-s{seed}"


@dataclass(frozen=True)
class ChildRef:
    """Which job runs one (arm, seed) of an experiment."""

    arm: str
    seed: int
    job_id: str


@dataclass(frozen=True)
class ExperimentRecord:
    """One row of the experiments table, decoded."""

    id: str
    name: str
    state: JobState  # PENDING until settled into a terminal state (the live state comes from the children)
    config: dict[str, Any]
    config_hash: str
    idempotency_key: str | None
    children: list[ChildRef]
    report_dir: str | None
    error: str | None
    cancel_requested: bool
    created_at: float
    updated_at: float
    finished_at: float | None

    @property
    def terminal(self) -> bool:
        """True once COMPLETED, FAILED or CANCELLED."""
        return self.state in TERMINAL

    def experiment(self) -> ExperimentConfig:
        """The validated experiment config it runs."""
        return ExperimentConfig.model_validate(self.config)


class ExperimentStore:
    """Experiments in the job database of ``jobs`` (the table is created on first use)."""

    def __init__(self, jobs: JobStore, registry_dir: Path) -> None:
        self.jobs = jobs
        self.registry_dir = Path(registry_dir)
        with jobs.connect() as conn:
            conn.executescript(_SCHEMA)

    @staticmethod
    def _record(row: sqlite3.Row) -> ExperimentRecord:
        return ExperimentRecord(
            id=row["id"],
            name=row["name"],
            state=JobState(row["state"]),
            config=json.loads(row["config"]),
            config_hash=row["config_hash"],
            idempotency_key=row["idempotency_key"],
            children=[ChildRef(**c) for c in json.loads(row["children"])],
            report_dir=row["report_dir"],
            error=row["error"],
            cancel_requested=bool(row["cancel_requested"]),
            created_at=row["created_at"],
            updated_at=row["updated_at"],
            finished_at=row["finished_at"],
        )

    # --- creation ---------------------------------------------------------------------------------
    def create(
        self,
        exp: ExperimentConfig,
        *,
        max_attempts: int,
        idempotency_key: str | None = None,
    ) -> tuple[ExperimentRecord, bool]:
        """Record ``exp`` and one PENDING job per child, in one transaction.

        Returns ``(record, created)``; the same ``idempotency_key`` with the same
        experiment returns the existing one (``created`` False), with another raises
        :class:`~lastkd.services.trainer.jobs.IdempotencyConflict`.
        """
        config = exp.model_dump(mode="json")
        digest = sha256_json(config)
        now = time.time()
        with self.jobs.transaction() as conn:
            if idempotency_key is not None:
                row = conn.execute("SELECT * FROM experiments WHERE idempotency_key=?", (idempotency_key,)).fetchone()
                if row is not None:
                    if row["config_hash"] != digest:
                        raise IdempotencyConflict(row["id"])
                    return self._record(row), False
            exp_id = uuid.uuid4().hex
            refs = []
            for spec in expand(exp):
                job_id = child_job_id(exp_id, spec.arm, spec.seed)
                child_config = spec.config.model_dump(mode="json")
                self.jobs.create_in(
                    conn,
                    spec.config.name,
                    child_config,
                    sha256_json(child_config),
                    max_attempts=max_attempts,
                    job_id=job_id,
                )
                refs.append({"arm": spec.arm, "seed": spec.seed, "job_id": job_id})
            conn.execute(
                "INSERT INTO experiments (id, name, state, config, config_hash, idempotency_key, children,"
                " created_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?)",
                (exp_id, exp.name, JobState.PENDING.value, json.dumps(config), digest, idempotency_key,
                 json.dumps(refs), now, now),
            )  # fmt: skip
            row = conn.execute("SELECT * FROM experiments WHERE id=?", (exp_id,)).fetchone()
        return self._record(row), True

    # --- reading ------------------------------------------------------------------------------------
    def get(self, experiment_id: str) -> ExperimentRecord | None:
        """The experiment, or None."""
        with self.jobs.connect() as conn:
            row = conn.execute("SELECT * FROM experiments WHERE id=?", (experiment_id,)).fetchone()
        return None if row is None else self._record(row)

    # Signatures below this method say builtins.list: in the class body, `list` is this method.
    def list(self, limit: int = 100, offset: int = 0) -> list[ExperimentRecord]:
        """Experiments, newest first."""
        with self.jobs.connect() as conn:
            rows = conn.execute(
                "SELECT * FROM experiments ORDER BY created_at DESC, id LIMIT ? OFFSET ?", (limit, offset)
            ).fetchall()
        return [self._record(r) for r in rows]

    def open_ids(self) -> builtins.list[str]:
        """Experiments not yet settled into a terminal state, oldest first."""
        with self.jobs.connect() as conn:
            rows = conn.execute(
                "SELECT id FROM experiments WHERE state NOT IN (?,?,?) ORDER BY created_at",
                tuple(s.value for s in TERMINAL),
            ).fetchall()
        return [r["id"] for r in rows]

    def child_jobs(self, record: ExperimentRecord) -> builtins.list[JobRecord]:
        """The child jobs, in the experiment's order (seed-major), read in one query (settling and
        every event of a followed experiment read them)."""
        jobs = self.jobs.get_many([ref.job_id for ref in record.children])
        missing = [ref.job_id for ref in record.children if ref.job_id not in jobs]
        if missing:  # created in the experiment's own transaction: never missing
            raise RuntimeError(f"experiment {record.id}: child job(s) {', '.join(missing)} missing")
        return [jobs[ref.job_id] for ref in record.children]

    def report(self, record: ExperimentRecord) -> dict[str, Any] | None:
        """The written report (report.json) of a COMPLETED experiment, else None."""
        if record.state is not JobState.COMPLETED or record.report_dir is None:
            return None
        try:
            report: dict[str, Any] = json.loads((Path(record.report_dir) / "report.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return report

    # --- moving on ------------------------------------------------------------------------------------
    def request_cancel(self, experiment_id: str) -> ExperimentRecord | None:
        """Flag the experiment and cancel each unfinished child; None if unknown."""
        with self.jobs.transaction() as conn:
            conn.execute(
                "UPDATE experiments SET cancel_requested=1, updated_at=? WHERE id=?", (time.time(), experiment_id)
            )
        record = self.get(experiment_id)
        if record is None:
            return None
        for ref in record.children:
            self.jobs.request_cancel(ref.job_id)
        return self.settle(experiment_id)

    def settle(self, experiment_id: str) -> ExperimentRecord | None:
        """Move the experiment on as far as its children allow (see the module docstring)."""
        record = self.get(experiment_id)
        if record is None or record.terminal:
            return record
        children = self.child_jobs(record)
        failed = [
            (ref, job) for ref, job in zip(record.children, children, strict=True) if job.state is JobState.FAILED
        ]
        if failed:
            for job in children:
                if not job.terminal:
                    self.jobs.request_cancel(job.id)
            ref, job = failed[0]
            error = f"child {ref.arm}-s{ref.seed} (job {job.id}) failed: {job.error or 'no error recorded'}"
            return self._finish(record, JobState.FAILED, error=error)
        if not all(job.terminal for job in children):
            return record
        if record.cancel_requested or any(job.state is JobState.CANCELLED for job in children):
            return self._finish(record, JobState.CANCELLED)
        return self._finish(record, JobState.COMPLETED, report_dir=self._write_report(record, children))

    def _write_report(self, record: ExperimentRecord, children: builtins.list[JobRecord]) -> str:
        results = [
            ChildResult(ref.arm, ref.seed, dict(job.metrics or {}), list(job.history or []))
            for ref, job in zip(record.children, children, strict=True)
        ]
        report = build_report(record.experiment(), results)
        report["experiment_id"] = record.id
        job_ids = {(ref.arm, ref.seed): ref.job_id for ref in record.children}
        for child in report["children"]:  # the report's own per-child figures, plus which job ran it
            child["job_id"] = job_ids[(child["arm"], child["seed"])]
        final = self.registry_dir / EXPERIMENTS_DIR / record.id
        if final.is_dir():  # another settler wrote it first: one report
            return str(final)
        staging = final.with_name(f".{record.id}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
        try:
            write_report(report, staging)
            try:
                staging.rename(final)
            except OSError:
                if not final.is_dir():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return str(final)

    def _finish(
        self, record: ExperimentRecord, state: JobState, *, error: str | None = None, report_dir: str | None = None
    ) -> ExperimentRecord:
        now = time.time()
        with self.jobs.transaction() as conn:
            conn.execute(
                "UPDATE experiments SET state=?, error=?, report_dir=?, finished_at=?, updated_at=?"
                " WHERE id=? AND state NOT IN (?,?,?)",
                (state.value, error, report_dir, now, now, record.id, *(s.value for s in TERMINAL)),
            )
        settled = self.get(record.id)
        assert settled is not None
        return settled
