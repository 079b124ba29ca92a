"""``lastkd worker``: one Celery worker process for training jobs.

A Celery worker with a ``threads`` pool (``--concurrency`` jobs at once, default 1). Each job
trains in a fresh runner process forked from this worker's fork server, which imported torch and
the engine once at start-up (CUDA is never initialised in it nor in this process), so a job starts
in a fraction of a second, may use DataLoader workers, and gives its GPU memory back when it ends.
Run one worker per GPU (``CUDA_VISIBLE_DEVICES``, or ``--claim-gpu`` to let the workers of one
host spread over its GPUs by themselves), on as many hosts as share the broker, the job database
volume and the registry.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path
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
    parser.add_argument(
        "--concurrency", type=int, default=1, help="jobs at once in this worker (default 1; one per GPU)"
    )
    parser.add_argument("--name", default=None, help="worker name (default lastkd-<pid>@<host>)")
    parser.add_argument(
        "--claim-gpu",
        default=None,
        metavar="all|I,J,...",
        help="claim the least-used GPU of these (all = every GPU the driver lists) among the workers sharing "
        "the jobs folder, and train on it only (sets CUDA_VISIBLE_DEVICES); for `docker compose --scale`",
    )
    parser.add_argument(
        "--ready-file",
        type=Path,
        default=None,
        metavar="PATH",
        help="write PATH once the worker consumes from its queue, remove it at shutdown "
        "(what `lastkd up` and container healthchecks wait on)",
    )
    parser.set_defaults(func=run)
    return parser


def announce_ready(path: Path) -> None:
    """Write ``path`` when Celery says the worker consumes (its public ``worker_ready`` signal),
    and remove it when the worker shuts down. Written atomically: a reader never sees half a file."""
    from celery.signals import worker_ready, worker_shutdown

    def ready(**_: object) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(f"{os.getpid()}\n", encoding="utf-8")
        os.replace(tmp, path)

    def gone(**_: object) -> None:
        path.unlink(missing_ok=True)

    path.unlink(missing_ok=True)  # left by a worker that was killed
    worker_ready.connect(ready, weak=False)
    worker_shutdown.connect(gone, weak=False)


def gpu_candidates(spec: str, gpu_count: int) -> list[int]:
    """The GPU indices ``--claim-gpu`` names: ``all`` or a comma-separated list; ValueError says why not."""
    if spec.strip() == "all":
        return list(range(gpu_count))
    parts = [p.strip() for p in spec.split(",")]
    if not parts or not all(p.isascii() and p.isdigit() for p in parts):
        raise ValueError(f"--claim-gpu must be 'all' or GPU indices such as 0,1,2; got {spec!r}")
    indices = sorted({int(p) for p in parts})
    missing = [i for i in indices if i >= gpu_count]
    if missing:
        raise ValueError(f"--claim-gpu names GPU {missing[0]}, but the driver lists {gpu_count} GPU(s)")
    return indices


def _claim_gpu(spec: str, settings: Settings) -> str:
    """Claim a GPU for this worker before anything can start CUDA; the line to print about it."""
    from lastkd.devices import claim_gpu, probe_gpus

    probe = probe_gpus()
    candidates = gpu_candidates(spec, probe.count)
    if not candidates:
        return "no GPU on this host: training on the CPU"
    claim = claim_gpu(settings.resolved_jobs_dir / ".gpu-claims", candidates)
    # Kept open for the life of the worker (the fd is the claim); the runners inherit the variable.
    os.environ["CUDA_VISIBLE_DEVICES"] = str(claim.index)
    _HELD.append(claim.fd)
    shared = f", shared with {claim.slot} other worker(s)" if claim.slot else ""
    return f"claimed GPU {claim.index}{shared}"


_HELD: list[int] = []


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Start the worker in this process; returns when it shuts down."""
    if not 1 <= args.concurrency <= 64:
        print(f"lastkd worker: --concurrency must be 1..64, got {args.concurrency}", file=sys.stderr)
        return 2
    if args.claim_gpu is not None:
        try:
            print(f"lastkd worker: {_claim_gpu(args.claim_gpu, settings)}", file=sys.stderr, flush=True)
        except ValueError as exc:  # DeviceError is a ValueError too
            print(f"lastkd worker: {exc}", file=sys.stderr)
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
    if args.ready_file is not None:
        announce_ready(args.ready_file)
    app.worker_main(worker_argv(args.queue, args.concurrency, hostname, settings.log_level))
    return 0
