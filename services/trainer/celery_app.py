"""The Celery application of the trainer, built from settings by one factory.

Two broker modes, both with real out-of-process workers:

* embedded (default, no server): kombu's SQLAlchemy transport over a SQLite file and a SQLite
  result backend under ``data_dir``;
* Redis (``redis://...``): docker compose and workers on several hosts.

The options are those of long GPU jobs: late acks and requeue when the worker process is lost
(the job database caps the redeliveries), prefetch 1, a visibility timeout longer than any job.
The pool is ``threads``: a task body only supervises; each job trains in a fresh runner process
forked from the worker's fork server (see :mod:`lastkd.services.trainer.tasks`), which may have
children of its own and returns its GPU memory to the driver when it exits. This module imports
neither torch nor the engine: the worker process never touches CUDA.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from celery import Celery
from kombu import transport as kombu_transport
from kombu.transport import sqlalchemy as kombu_sqla

from lastkd.services.settings import Settings
from lastkd.services.trainer.tasks import TASK_NAME, register

if TYPE_CHECKING:  # sqlalchemy loads lazily, inside the transport's methods
    from sqlalchemy.engine import Engine

DEFAULT_QUEUE = "lastkd.train"
# Longer than the longest job: Redis re-delivers an unacknowledged message after this long.
VISIBILITY_TIMEOUT_S = 7 * 24 * 3600
DEFAULT_MAX_ATTEMPTS = 3
_SQLA_ALIAS = "lastkd-sqla"


class SQLiteTransport(kombu_sqla.Transport):
    """kombu's SQLAlchemy transport, tuned for a SQLite file shared by several processes.

    Upstream passes every transport option to ``create_engine`` (so ``polling_interval`` would
    break it) and opens SQLite with a 5 s lock timeout; here the engine gets a long busy timeout
    and the Celery-level options are kept away from SQLAlchemy.
    """

    class Channel(kombu_sqla.Channel):
        def _engine_from_config(self) -> Engine:
            from sqlalchemy import create_engine

            hostname = self.connection.client.hostname
            return create_engine(hostname, connect_args={"timeout": 30})

        def _open(self) -> Any:
            # Upstream creates the broker's tables with a check-then-CREATE per process: processes
            # opening a fresh broker file at once lose with "table kombu_queue already exists".
            # The tables exist then: open again (the check now sees them).
            from sqlalchemy.exc import OperationalError

            try:
                return super()._open()
            except OperationalError as exc:
                if "already exists" not in str(exc):
                    raise
                return super()._open()

        def _get_or_create(self, queue: str) -> Any:
            # Upstream checks then inserts the queue row under a thread lock only: two processes
            # declaring a new queue at once (two workers starting on a fresh broker, or a worker
            # and the API's first send) both insert, and the loser died with "UNIQUE constraint
            # failed: kombu_queue.name". The row exists then: roll back and read it.
            from sqlalchemy.exc import IntegrityError

            try:
                return super()._get_or_create(queue)
            except IntegrityError:
                self.session.rollback()
                return super()._get_or_create(queue)

    polling_interval = 0.25


kombu_transport.TRANSPORT_ALIASES[_SQLA_ALIAS] = f"{__name__}:SQLiteTransport"


@dataclass(frozen=True)
class TrainerRuntime:
    """What the task and the API need from settings, carried by :class:`TrainerCelery`."""

    jobs_dir: Path
    registry_dir: Path
    store_path: Path
    data_roots: list[Path] = field(default_factory=list)
    queue: str = DEFAULT_QUEUE
    log_level: str = "INFO"


def broker_kind(url: str) -> str:
    """'sqlite' for the embedded broker, 'redis' for Redis, else the URL scheme."""
    scheme = url.split("://", 1)[0]
    # sqla+ as configured, lastkd-sqla+ once create_celery_app routed it to SQLiteTransport
    if scheme.startswith(("sqla+", f"{_SQLA_ALIAS}+")):
        return "sqlite"
    if scheme in ("redis", "rediss"):
        return "redis"
    return scheme


def _use_wal(path: str) -> None:
    """Create the folder of a SQLite file and switch the file to WAL (a property of the file,
    set once), so readers and the writer of several processes do not block each other."""
    if not path:
        return  # in-memory database: nothing to prepare
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, timeout=30)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
    finally:
        conn.close()


def _prepare_sqlite(url: str) -> str:
    """WAL for a ``sqla+sqlite:///`` broker file, routed through :class:`SQLiteTransport`."""
    target = url.split("+", 1)[1]
    _use_wal(target[len("sqlite:///") :] if target.startswith("sqlite:///") else "")
    return f"{_SQLA_ALIAS}+{target}"


def _prepare_result_backend(url: str) -> str:
    """WAL for a ``db+sqlite:///`` result backend file; other backends pass through."""
    if url.startswith("db+sqlite:///"):
        _use_wal(url[len("db+sqlite:///") :])
    return url


def celery_config(broker_url: str, result_backend: str, queue: str = DEFAULT_QUEUE) -> dict[str, Any]:
    """The Celery configuration of the trainer for these URLs (pure; no I/O)."""
    kind = broker_kind(broker_url)
    transport_options: dict[str, Any] = {}
    if kind == "redis":
        transport_options = {
            "visibility_timeout": VISIBILITY_TIMEOUT_S,
            "socket_connect_timeout": 3,
            "socket_timeout": 10,
        }
    return {
        "broker_url": broker_url,
        "result_backend": result_backend,
        "broker_transport_options": transport_options,
        "result_backend_transport_options": {"visibility_timeout": VISIBILITY_TIMEOUT_S} if kind == "redis" else {},
        "broker_connection_retry_on_startup": True,
        "broker_connection_timeout": 3,
        # producer side: fail fast so the API can answer 503 instead of hanging
        "task_publish_retry": True,
        "task_publish_retry_policy": {
            "max_retries": 1,
            "interval_start": 0.1,
            "interval_step": 0.2,
            "interval_max": 0.3,
        },
        "task_default_queue": queue,
        "task_routes": {TASK_NAME: {"queue": queue}},
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_track_started": True,
        "task_time_limit": None,
        "result_extended": True,
        "worker_prefetch_multiplier": 1,
        "worker_concurrency": 1,
        # threads: the task body supervises a runner process (tasks.py); a final job's message is
        # acknowledged without starting any process
        "worker_pool": "threads",
        "worker_send_task_events": False,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
    }


class TrainerCelery(Celery):
    """The trainer's Celery app: a plain Celery app that also carries its :class:`TrainerRuntime`
    (a typed attribute, so the task body and the API read settings without globals)."""

    def __init__(self, runtime: TrainerRuntime) -> None:
        # set_as_current=False: several apps may live in one process (the API, tests)
        super().__init__("lastkd", set_as_current=False)
        self.runtime = runtime


def create_celery_app(settings: Settings, *, queue: str = DEFAULT_QUEUE) -> TrainerCelery:
    """The trainer's Celery app for ``settings`` (broker and result backend from there), with the
    training task registered on it."""
    broker = settings.resolved_broker_url
    backend = settings.resolved_result_backend
    if broker_kind(broker) == "sqlite":
        broker = _prepare_sqlite(broker)
    backend = _prepare_result_backend(backend)
    app = TrainerCelery(
        TrainerRuntime(
            jobs_dir=settings.resolved_jobs_dir.resolve(),
            registry_dir=settings.resolved_registry_dir.resolve(),
            store_path=settings.resolved_store_path.resolve(),
            data_roots=list(settings.resolved_data_roots),
            queue=queue,
            log_level=settings.log_level,
        )
    )
    app.conf.update(celery_config(broker, backend, queue))
    register(app)
    return app


def broker_reachable(app: TrainerCelery, timeout: float = 2.0) -> str | None:
    """None when the broker answers, else a one-line reason (readiness check)."""
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=0, timeout=timeout)
            if broker_kind(app.conf.broker_url) == "sqlite":
                # the SQLAlchemy transport connects lazily: touch the queue table for real
                with conn.channel() as channel:
                    # no public way to make this transport touch its table: _size is the cheapest query
                    channel._size(app.runtime.queue)
        return None
    except Exception as exc:  # any transport error means "not reachable"; say which
        return f"{type(exc).__name__}: {str(exc)[:200]}"
