"""Job kinds in the job database: a database from before kinds opens with its jobs as training
jobs, and one key never names jobs of two kinds."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from lastkd.services.trainer.jobs import DB_NAME, IdempotencyConflict, JobKind, JobStore

# the jobs table as the first release created it (no kind column)
OLD_SCHEMA = """
CREATE TABLE jobs (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, state TEXT NOT NULL, config TEXT NOT NULL,
    config_hash TEXT NOT NULL, idempotency_key TEXT UNIQUE, attempts INTEGER NOT NULL DEFAULT 0,
    max_attempts INTEGER NOT NULL, progress TEXT, metrics TEXT, history TEXT, result TEXT, error TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0, owner TEXT, resumed_from_epoch INTEGER,
    submitting_until REAL, created_at REAL NOT NULL, updated_at REAL NOT NULL, queued_at REAL,
    started_at REAL, finished_at REAL, heartbeat_at REAL
);
INSERT INTO jobs (id, name, state, config, config_hash, max_attempts, created_at, updated_at)
VALUES ('old-job', 'old', 'COMPLETED', '{"name": "old"}', 'h0', 3, 1.0, 1.0);
"""


def test_an_old_database_gains_the_kind_column_and_keeps_its_jobs(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / DB_NAME) as conn:
        conn.executescript(OLD_SCHEMA)
    store = JobStore(tmp_path)
    old = store.get("old-job")
    assert old is not None and old.kind is JobKind.TRAIN and old.name == "old"
    record, created = store.create("t", {"name": "t"}, "h1", max_attempts=3, kind=JobKind.TEACHER_FINETUNE)
    assert created and record.kind is JobKind.TEACHER_FINETUNE
    assert JobStore(tmp_path).get(record.id).kind is JobKind.TEACHER_FINETUNE  # opening again changes nothing


def test_one_key_never_names_jobs_of_two_kinds(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    first, _ = store.create("t", {"name": "t"}, "same-hash", max_attempts=3, idempotency_key="k")
    again, created = store.create("t", {"name": "t"}, "same-hash", max_attempts=3, idempotency_key="k")
    assert again.id == first.id and not created
    with pytest.raises(IdempotencyConflict):
        store.create(
            "t", {"name": "t"}, "same-hash", max_attempts=3, idempotency_key="k", kind=JobKind.TEACHER_FINETUNE
        )
