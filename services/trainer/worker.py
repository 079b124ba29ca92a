"""``lastkd worker``: one Celery worker process for training jobs.

A Celery worker with a ``threads`` pool (``--concurrency`` jobs at once, default 1). Each job
trains in a fresh runner process forked from this worker's fork server, which imported torch and
the engine once at start-up (CUDA is never initialised in it nor in this process), so a job starts
in a fraction of a second, may use DataLoader workers, and gives its GPU memory back when it ends.
Run one worker per GPU (``CUDA_VISIBLE_DEVICES``), on as many hosts as share the broker, the
job database volume and the registry.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from typing import TYPE_CHECKING

from lastkd.services.trainer.celery_app import DEFAULT_QUEUE, broker_kind, create_celery_app

if TYPE_CHECKING:
    from lastkd.services.settings import Settings


def worker_argv(queue: str, concurrency: int, hostname: str, loglevel: str) -> list[str]:
    """The ``celery worker`` arguments of a training worker."""
    return [
        "worker",
        f"--queues={queue}",
        "--pool=threads",
        f"--concurrency={concurrency}",
        "--prefetch-multiplier=1",
        f"--hostname={hostname}",
        f"--loglevel={loglevel}",
        # no broadcast chatter between workers: jobs are coordinated through the job database
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``lastkd worker``."""
    parser = sub.add_parser("worker", help="run a Celery worker for training jobs", description=__doc__.splitlines()[0])
    parser.add_argument("--queue", default=DEFAULT_QUEUE, help=f"queue to consume (default {DEFAULT_QUEUE})")
    parser.add_argument("--concurrency", type=int, default=1, help="jobs at once in this worker (default 1; one per GPU)")
    parser.add_argument("--name", default=None, help="worker name (default lastkd-<pid>@<host>)")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace, settings: "Settings") -> int:
    """Start the worker in this process; returns when it shuts down."""
    if not 1 <= args.concurrency <= 64:
        print(f"lastkd worker: --concurrency must be 1..64, got {args.concurrency}", file=sys.stderr)
        return 2
    app = create_celery_app(settings, queue=args.queue)
    from lastkd.services.trainer.tasks import start_runner_server

    server_pid = start_runner_server()  # torch + engine imported there once, before the first job
    hostname = args.name or f"lastkd-{os.getpid()}@{socket.gethostname()}"
    kind = broker_kind(settings.resolved_broker_url)
    print(
        f"lastkd worker {hostname}: broker {kind}, queue {args.queue!r}, concurrency {args.concurrency}, "
        f"jobs in {settings.resolved_jobs_dir}, runner fork server pid {server_pid}",
        file=sys.stderr,
        flush=True,
    )
    app.worker_main(worker_argv(args.queue, args.concurrency, hostname, settings.log_level))
    return 0
