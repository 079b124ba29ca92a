"""Durable job records: one SQLite database under ``jobs_dir``, the source of truth for jobs.

The Celery result backend keeps only each delivery's outcome; this store is what the API
answers from (state, progress, cancel), so job history and state survive restarts of the API, the workers and the broker.
Several processes write at once (the API, every worker, every job's runner and its heartbeat thread), so
the database runs in WAL mode with a busy timeout, every read-modify-write happens inside
``BEGIN IMMEDIATE`` and each operation opens its own short-lived connection (safe across fork and
threads).

States::

    PENDING   recorded, not yet handed to the broker (broker down: the re-submitter retries)
    QUEUED    on the broker, waiting for a worker
    RUNNING   a worker process owns it (owner + heartbeat)
    COMPLETED / FAILED / CANCELLED   terminal
"""

from __future__ import annotations

import builtins
import json
import os
import socket
import sqlite3
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from lastkd.schemas.trainer import TERMINAL, JobKind, JobState

__all__ = [
    "TERMINAL",
    "ClaimOutcome",
    "IdempotencyConflict",
    "JobKind",
    "JobRecord",
    "JobState",
    "JobStore",
    "JobStoreError",
    "owner_id",
]

DB_NAME = "jobs.sqlite"
IDEMPOTENCY_KEY_MAX = 200
BUSY_TIMEOUT_MS = 30_000
# A RUNNING job whose owner lives on another host is taken over only when its heartbeat is older
# than this (an owner on this host is checked directly: its pid is gone or a zombie).
REMOTE_LEASE_S = 30.0


class JobStoreError(RuntimeError):
    """The job database cannot be opened or written."""


class IdempotencyConflict(ValueError):
    """An idempotency key (or client job id) reused with a different config."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"job {job_id} was submitted with this key but a different config")
        self.job_id = job_id


class ClaimOutcome(str, Enum):
    """What :meth:`JobStore.claim` decided about one delivery of a job."""

    RUN = "run"  # this process now owns the job
    TERMINAL = "terminal"  # already finished: a duplicate or late delivery
    BUSY = "busy"  # another live process runs it
    CANCELLED = "cancelled"  # cancelled before it started; now CANCELLED
    EXHAUSTED = "exhausted"  # over the attempt cap; now FAILED
    MISSING = "missing"  # no such job record


@dataclass(frozen=True)
class JobRecord:
    """One row of the job table, decoded."""

    id: str
    name: str
    state: JobState
    kind: JobKind
    config: dict[str, Any]
    config_hash: str
    idempotency_key: str | None
    attempts: int
    max_attempts: int
    progress: dict[str, Any] | None
    metrics: dict[str, Any] | None
    history: list[dict[str, Any]]
    result: dict[str, Any] | None
    error: str | None
    cancel_requested: bool
    owner: str | None
    resumed_from_epoch: int | None
    created_at: float
    updated_at: float
    queued_at: float | None
    started_at: float | None
    finished_at: float | None
    heartbeat_at: float | None

    @property
    def terminal(self) -> bool:
        """True once the job is COMPLETED, FAILED or CANCELLED."""
        return self.state in TERMINAL


_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    state TEXT NOT NULL,
    config TEXT NOT NULL,
    config_hash TEXT NOT NULL,
    idempotency_key TEXT UNIQUE,
    attempts INTEGER NOT NULL DEFAULT 0,
    max_attempts INTEGER NOT NULL,
    progress TEXT,
    metrics TEXT,
    history TEXT,
    result TEXT,
    error TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    owner TEXT,
    resumed_from_epoch INTEGER,
    submitting_until REAL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    queued_at REAL,
    started_at REAL,
    finished_at REAL,
    heartbeat_at REAL,
    kind TEXT NOT NULL DEFAULT 'train'
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, created_at);
"""
# Columns added after the first release, with their definitions: a database made by an earlier
# version gets them on open (ALTER TABLE ... ADD COLUMN keeps every row; old jobs are training jobs).
_ADDED_COLUMNS = {"kind": "TEXT NOT NULL DEFAULT 'train'"}


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def _dumps(obj: Any) -> str | None:
    return None if obj is None else json.dumps(obj, separators=(",", ":"), allow_nan=False, default=str)


def owner_id() -> str:
    """``host:pid`` of the calling process, the owner recorded for a RUNNING job."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _owner_alive(owner: str | None, heartbeat_at: float | None, now: float) -> bool:
    """Whether the process that owns a RUNNING job may still be running it."""
    if not owner:
        return False
    host, _, pid_text = owner.rpartition(":")
    if host != socket.gethostname() or not pid_text.isdigit():
        return heartbeat_at is not None and now - heartbeat_at < REMOTE_LEASE_S
    pid = int(pid_text)
    if pid == os.getpid():
        return False  # a redelivery to the very process that owned it (cannot be running it)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed child may linger as a zombie until its parent reaps it
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (OSError, IndexError):
        return True


class JobStore:
    """The job database at ``jobs_dir/jobs.sqlite`` (created on first use)."""

    def __init__(self, jobs_dir: Path) -> None:
        self.jobs_dir = Path(jobs_dir)
        self.path = self.jobs_dir / DB_NAME
        try:
            self.jobs_dir.mkdir(parents=True, exist_ok=True)
            with self.connect() as conn:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.executescript(_SCHEMA)
                have = {row["name"] for row in conn.execute("PRAGMA table_info(jobs)")}
                for column, definition in _ADDED_COLUMNS.items():
                    if column not in have:
                        conn.execute(f"ALTER TABLE jobs ADD COLUMN {column} {definition}")
        except (OSError, sqlite3.Error) as exc:
            raise JobStoreError(f"cannot open the job database {self.path}: {exc}") from None

    # --- plumbing ---------------------------------------------------------------------------------
    @contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        """A short-lived connection (autocommit; rows as ``sqlite3.Row``)."""
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        try:
            conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.row_factory = sqlite3.Row
            yield conn
        finally:
            conn.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A connection inside ``BEGIN IMMEDIATE`` (the write lock taken up front, no upgrade races);
        committed on exit, rolled back on an exception. Other tables of this database (the
        experiments of :mod:`lastkd.services.trainer.experiments`) write through it too, so a group
        of jobs is created in one decision."""
        with self.connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    @staticmethod
    def _record(row: sqlite3.Row) -> JobRecord:
        return JobRecord(
            id=row["id"],
            name=row["name"],
            state=JobState(row["state"]),
            kind=JobKind(row["kind"]),
            config=_loads(row["config"]),
            config_hash=row["config_hash"],
            idempotency_key=row["idempotency_key"],
            attempts=row["attempts"],
            max_attempts=row["max_attempts"],
            progress=_loads(row["progress"]),
            metrics=_loads(row["metrics"]),
            history=_loads(row["history"]) or [],
            result=_loads(row["result"]),
            error=row["error"],
            cancel_requested=bool(row["cancel_requested"]),
            owner=row["owner"],
            resumed_from_epoch=row["resumed_from_epoch"],
            created_at=row["created_at"],
            updated_at=row["updated_at"],
            queued_at=row["queued_at"],
            started_at=row["started_at"],
            finished_at=row["finished_at"],
            heartbeat_at=row["heartbeat_at"],
        )

    def ping(self) -> None:
        """Raise JobStoreError unless the database answers a query (readiness)."""
        try:
            with self.connect() as conn:
                conn.execute("SELECT 1 FROM jobs LIMIT 1").fetchall()
        except sqlite3.Error as exc:
            raise JobStoreError(f"job database {self.path} does not answer: {exc}") from None

    # --- submission ---------------------------------------------------------------------------------
    def create(
        self,
        name: str,
        config: dict[str, Any],
        config_hash: str,
        *,
        max_attempts: int,
        idempotency_key: str | None = None,
        job_id: str | None = None,
        submit_lease_s: float | None = None,
        kind: JobKind = JobKind.TRAIN,
    ) -> tuple[JobRecord, bool]:
        """Record a new PENDING job of ``kind``, or return the existing one for the same key / job id.

        Returns ``(record, created)``. Raises :class:`IdempotencyConflict` when the key or id is
        already taken by a job with a different config. With ``submit_lease_s`` a new job is
        created with the submit lease held (as :meth:`begin_submit` takes it), so the caller hands
        it to the broker itself and the re-submitter cannot race it in between.
        """
        with self.transaction() as conn:
            return self.create_in(
                conn,
                name,
                config,
                config_hash,
                max_attempts=max_attempts,
                idempotency_key=idempotency_key,
                job_id=job_id,
                submit_lease_s=submit_lease_s,
                kind=kind,
            )

    def create_in(
        self,
        conn: sqlite3.Connection,
        name: str,
        config: dict[str, Any],
        config_hash: str,
        *,
        max_attempts: int,
        idempotency_key: str | None = None,
        job_id: str | None = None,
        submit_lease_s: float | None = None,
        kind: JobKind = JobKind.TRAIN,
    ) -> tuple[JobRecord, bool]:
        """:meth:`create` inside the caller's :meth:`transaction`."""
        now = time.time()
        new_id = job_id or uuid.uuid4().hex
        row = None
        if job_id is not None:
            row = conn.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        if row is None and idempotency_key is not None:
            row = conn.execute("SELECT * FROM jobs WHERE idempotency_key=?", (idempotency_key,)).fetchone()
        if row is not None:
            if row["config_hash"] != config_hash or row["kind"] != kind.value:
                raise IdempotencyConflict(row["id"])
            return self._record(row), False
        conn.execute(
            "INSERT INTO jobs (id, name, state, kind, config, config_hash, idempotency_key, max_attempts,"
            " created_at, updated_at, submitting_until) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (
                new_id,
                name,
                JobState.PENDING.value,
                kind.value,
                _dumps(config),
                config_hash,
                idempotency_key,
                max_attempts,
                now,
                now,
                None if submit_lease_s is None else now + submit_lease_s,
            ),
        )
        row = conn.execute("SELECT * FROM jobs WHERE id=?", (new_id,)).fetchone()
        return self._record(row), True

    def begin_submit(self, job_id: str, lease_s: float = 30.0) -> bool:
        """Claim the right to hand a PENDING job to the broker (False: not PENDING, or another
        process is submitting it right now). Prevents the API and the re-submitter from queueing
        one job twice."""
        now = time.time()
        with self.transaction() as conn:
            cur = conn.execute(
                "UPDATE jobs SET submitting_until=? WHERE id=? AND state=? AND cancel_requested=0"
                " AND (submitting_until IS NULL OR submitting_until < ?)",
                (now + lease_s, job_id, JobState.PENDING.value, now),
            )
            return cur.rowcount == 1

    def end_submit(self, job_id: str, queued: bool) -> None:
        """Record the outcome of a submission started with :meth:`begin_submit`."""
        now = time.time()
        with self.transaction() as conn:
            if queued:
                conn.execute(
                    "UPDATE jobs SET state=?, queued_at=?, updated_at=?, submitting_until=NULL WHERE id=? AND state=?",
                    (JobState.QUEUED.value, now, now, job_id, JobState.PENDING.value),
                )
            else:
                conn.execute("UPDATE jobs SET submitting_until=NULL WHERE id=?", (job_id,))

    def requeue(self, job_id: str, reason: str) -> bool:
        """Put a RUNNING job whose owner died back to PENDING so the re-submitter queues it again."""
        now = time.time()
        with self.transaction() as conn:
            row = conn.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is None or row["state"] != JobState.RUNNING.value:
                return False
            if _owner_alive(row["owner"], row["heartbeat_at"], now):
                return False
            conn.execute(
                "UPDATE jobs SET state=?, owner=NULL, error=?, updated_at=? WHERE id=?",
                (JobState.PENDING.value, reason, now, job_id),
            )
            return True

    # --- queries ------------------------------------------------------------------------------------
    def get(self, job_id: str) -> JobRecord | None:
        """The job, or None."""
        with self.connect() as conn:
            row = conn.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        return None if row is None else self._record(row)

    def get_many(self, job_ids: Sequence[str]) -> dict[str, JobRecord]:
        """The jobs of ``job_ids`` that exist, by id, read in one query."""
        if not job_ids:
            return {}
        marks = ",".join("?" * len(job_ids))
        with self.connect() as conn:
            rows = conn.execute(f"SELECT * FROM jobs WHERE id IN ({marks})", tuple(job_ids)).fetchall()
        return {row["id"]: self._record(row) for row in rows}

    # Signatures below this method say builtins.list: in the class body, `list` is this method.
    def list(self, state: JobState | None = None, limit: int = 100, offset: int = 0) -> list[JobRecord]:
        """Jobs, newest first, optionally of one state."""
        sql = "SELECT * FROM jobs"
        args: list[str | int] = []
        if state is not None:
            sql += " WHERE state=?"
            args.append(state.value)
        sql += " ORDER BY created_at DESC, id LIMIT ? OFFSET ?"
        args += [limit, offset]
        with self.connect() as conn:
            return [self._record(r) for r in conn.execute(sql, args).fetchall()]

    def pending_ids(self) -> builtins.list[str]:
        """PENDING jobs not cancelled (to be handed to the broker), oldest first."""
        with self.connect() as conn:
            rows = conn.execute(
                "SELECT id FROM jobs WHERE state=? AND cancel_requested=0 ORDER BY created_at",
                (JobState.PENDING.value,),
            ).fetchall()
        return [r["id"] for r in rows]

    def stale_running(self, stale_after_s: float) -> builtins.list[JobRecord]:
        """RUNNING jobs whose heartbeat is older than ``stale_after_s``."""
        cutoff = time.time() - stale_after_s
        with self.connect() as conn:
            rows = conn.execute(
                "SELECT * FROM jobs WHERE state=? AND (heartbeat_at IS NULL OR heartbeat_at < ?)",
                (JobState.RUNNING.value, cutoff),
            ).fetchall()
        return [self._record(r) for r in rows]

    def counts(self) -> dict[str, int]:
        """Number of jobs per state (for /metrics)."""
        with self.connect() as conn:
            rows = conn.execute("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state").fetchall()
        found = {r["state"]: r["n"] for r in rows}
        return {s.value: found.get(s.value, 0) for s in JobState}

    # --- the worker side -----------------------------------------------------------------------------
    def _settle_row(self, conn: sqlite3.Connection, row: sqlite3.Row | None, now: float) -> ClaimOutcome | None:
        """The outcome of a delivery that must not run (applied to the row), or None when it may run."""
        if row is None:
            return ClaimOutcome.MISSING
        job_id = row["id"]
        state = JobState(row["state"])
        if state in TERMINAL:
            return ClaimOutcome.TERMINAL
        if state is JobState.RUNNING and _owner_alive(row["owner"], row["heartbeat_at"], now):
            return ClaimOutcome.BUSY
        if row["cancel_requested"]:
            conn.execute(
                "UPDATE jobs SET state=?, finished_at=?, updated_at=?, owner=NULL WHERE id=?",
                (JobState.CANCELLED.value, now, now, job_id),
            )
            return ClaimOutcome.CANCELLED
        if row["attempts"] >= row["max_attempts"]:
            error = (
                f"gave up after {row['attempts']} attempt(s): the worker running this job was lost each "
                f"time (redelivery cap max_attempts={row['max_attempts']})"
                + (f"; last error: {row['error']}" if row["error"] else "")
            )
            conn.execute(
                "UPDATE jobs SET state=?, error=?, finished_at=?, updated_at=?, owner=NULL WHERE id=?",
                (JobState.FAILED.value, error, now, now, job_id),
            )
            return ClaimOutcome.EXHAUSTED
        return None

    def settle(self, job_id: str) -> tuple[ClaimOutcome, JobRecord | None] | None:
        """Decide a delivery that needs no training (the rules of :meth:`claim`, without taking
        ownership): ``(outcome, record)`` when the job is missing, final, run by another live
        process, cancelled or over its attempt cap; None when a runner should be started."""
        now = time.time()
        with self.transaction() as conn:
            row = conn.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
            outcome = self._settle_row(conn, row, now)
            if outcome is None:
                return None
            row = conn.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        return outcome, (None if row is None else self._record(row))

    def claim(self, job_id: str, owner: str) -> tuple[ClaimOutcome, JobRecord | None]:
        """Take ownership of a job for one attempt (attempts + 1, state RUNNING).

        A delivery of a finished job, or of a job another live process runs, is refused; one that
        would exceed the attempt cap marks the job FAILED instead.
        """
        now = time.time()
        with self.transaction() as conn:
            row = conn.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
            outcome = self._settle_row(conn, row, now)
            if outcome is ClaimOutcome.MISSING:
                return outcome, None
            if outcome is None:
                conn.execute(
                    "UPDATE jobs SET state=?, attempts=attempts+1, owner=?, heartbeat_at=?, updated_at=?,"
                    " started_at=COALESCE(started_at, ?), queued_at=COALESCE(queued_at, ?),"
                    " resumed_from_epoch=NULL WHERE id=?",
                    (JobState.RUNNING.value, owner, now, now, now, now, job_id),
                )
                outcome = ClaimOutcome.RUN
            row = conn.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        return outcome, self._record(row)

    def unqueue(self, job_id: str, reason: str) -> bool:
        """Put a QUEUED job whose delivery ended before any process claimed it back to PENDING, so
        the re-submitter sends it again (its message is gone)."""
        now = time.time()
        with self.transaction() as conn:
            cur = conn.execute(
                "UPDATE jobs SET state=?, error=?, updated_at=? WHERE id=? AND state=?",
                (JobState.PENDING.value, reason, now, job_id, JobState.QUEUED.value),
            )
            return cur.rowcount == 1

    def heartbeat(
        self,
        job_id: str,
        owner: str,
        progress: dict[str, Any] | None = None,
        history: builtins.list[dict[str, Any]] | None = None,
        metrics: dict[str, Any] | None = None,
        resumed_from_epoch: int | None = None,
    ) -> bool:
        """Refresh the owner's heartbeat (and progress when given); returns the cancel flag.

        Writes nothing when ``owner`` no longer owns the job (it was taken over).
        """
        now = time.time()
        sets = ["heartbeat_at=?", "updated_at=?"]
        args: list[float | str | None] = [now, now]
        for column, value in (("progress", progress), ("history", history), ("metrics", metrics)):
            if value is not None:
                sets.append(f"{column}=?")
                args.append(_dumps(value))
        if resumed_from_epoch is not None:
            sets.append("resumed_from_epoch=COALESCE(resumed_from_epoch, ?)")
            args.append(resumed_from_epoch)
        with self.transaction() as conn:
            conn.execute(
                f"UPDATE jobs SET {', '.join(sets)} WHERE id=? AND owner=? AND state=?",
                (*args, job_id, owner, JobState.RUNNING.value),
            )
            row = conn.execute("SELECT cancel_requested FROM jobs WHERE id=?", (job_id,)).fetchone()
        return bool(row and row["cancel_requested"])

    def cancel_requested(self, job_id: str) -> bool:
        """The cancel flag (one indexed read)."""
        with self.connect() as conn:
            row = conn.execute("SELECT cancel_requested FROM jobs WHERE id=?", (job_id,)).fetchone()
        return bool(row and row["cancel_requested"])

    def finish(
        self,
        job_id: str,
        owner: str | None,
        state: JobState,
        *,
        error: str | None = None,
        result: dict[str, Any] | None = None,
        metrics: dict[str, Any] | None = None,
        history: builtins.list[dict[str, Any]] | None = None,
        progress: dict[str, Any] | None = None,
    ) -> bool:
        """Move a job to a terminal state (only its current owner may, when ``owner`` is given)."""
        if state not in TERMINAL:
            raise ValueError(f"finish() needs a terminal state, got {state}")
        now = time.time()
        sets = ["state=?", "finished_at=?", "updated_at=?", "error=?", "owner=NULL"]
        args: list[Any] = [state.value, now, now, error]
        for column, value in (("result", result), ("metrics", metrics), ("history", history), ("progress", progress)):
            if value is not None:
                sets.append(f"{column}=?")
                args.append(_dumps(value))
        where, wargs = "id=? AND state NOT IN (?,?,?)", [job_id, *(s.value for s in TERMINAL)]
        if owner is not None:
            where += " AND owner=?"
            wargs.append(owner)
        with self.transaction() as conn:
            cur = conn.execute(f"UPDATE jobs SET {', '.join(sets)} WHERE {where}", (*args, *wargs))
            return cur.rowcount == 1

    def request_cancel(self, job_id: str) -> JobRecord | None:
        """Set the cancel flag; a job not yet running becomes CANCELLED at once. None if unknown."""
        now = time.time()
        with self.transaction() as conn:
            row = conn.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is None:
                return None
            state = JobState(row["state"])
            if state not in TERMINAL:
                if state in (JobState.PENDING, JobState.QUEUED):
                    conn.execute(
                        "UPDATE jobs SET cancel_requested=1, state=?, finished_at=?, updated_at=? WHERE id=?",
                        (JobState.CANCELLED.value, now, now, job_id),
                    )
                else:
                    conn.execute("UPDATE jobs SET cancel_requested=1, updated_at=? WHERE id=?", (now, job_id))
            row = conn.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        return self._record(row)
