"""The trainer's job API (``lastkd serve-trainer``): submit, follow and cancel training jobs, and
list and download the published students.

This module builds the app (lifespan, the re-submitter, metrics) and the command; the routes are
in :mod:`lastkd.services.trainer.routes` and their bodies in :mod:`lastkd.schemas.trainer`.

Endpoints: ``POST /train``, ``GET /jobs``, ``GET /jobs/{id}``, ``POST /jobs/{id}/cancel``,
``GET /jobs/{id}/events`` (server-sent events), ``POST /experiments``, ``GET /experiments``,
``GET /experiments/{id}``, ``POST /experiments/{id}/cancel``, ``GET /experiments/{id}/events``,
``GET /experiments/{id}/files/{path}``, ``GET /checkpoints``, ``GET /checkpoints/{name}/{version}``,
``GET /checkpoints/{name}/{version}/files/{path}``, ``GET /health/live``, ``GET /health/ready``,
``GET /metrics``.

Submission and the broker. ``POST /train`` first records the job (PENDING) in the job database,
then hands it to the broker (QUEUED). When the broker is down the answer is ``503`` with the job
id and a ``Retry-After``; the job stays recorded as PENDING and the API's re-submitter queues it
as soon as the broker answers again, so nothing is lost. Retrying the request with the same
``Idempotency-Key`` (or client ``job_id``) returns that same job, never a second one.

The re-submitter also watches RUNNING jobs: one whose heartbeat stopped for ``stale_after_s``
(its worker was killed outright) goes back to PENDING and is queued again; the next worker resumes
it from its last epoch checkpoint. Redeliveries count as attempts, capped by ``max_attempts``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
from collections.abc import AsyncIterator, Iterator

from fastapi import FastAPI
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.concurrency import run_in_threadpool

from lastkd.registry import Registry
from lastkd.schemas.trainer import JobEvent
from lastkd.services.http import BindRefusedError, add_bind_arguments, bind_address, create_service_app, serve
from lastkd.services.settings import Settings
from lastkd.services.trainer.celery_app import DEFAULT_MAX_ATTEMPTS, DEFAULT_QUEUE, create_celery_app
from lastkd.services.trainer.experiments import ExperimentStore
from lastkd.services.trainer.jobs import JobStore, JobStoreError
from lastkd.services.trainer.routes import (
    FinetuneRequest,
    TrainerState,
    TrainRequest,
    checkpoints_router,
    experiments_router,
    health_router,
    jobs_router,
)
from lastkd.student.experiment import ExperimentConfig
from lastkd.validation import MAX_CONFIG_BYTES

log = logging.getLogger(__name__)

__all__ = ["add_parser", "create_app", "run"]


class _JobCounts(Collector):
    """Jobs per state, read from the job database at scrape time."""

    def __init__(self, state: TrainerState) -> None:
        self.state = state

    def collect(self) -> Iterator[GaugeMetricFamily]:
        gauge = GaugeMetricFamily("lastkd_trainer_jobs", "Training jobs by state.", labels=["state"])
        if self.state.jobs is not None:
            try:
                for state, n in self.state.jobs.counts().items():
                    gauge.add_metric([state], n)
            except JobStoreError:
                pass
        yield gauge


def create_app(
    settings: Settings,
    *,
    queue: str = DEFAULT_QUEUE,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    stale_after_s: float = 120.0,
    sweep_interval_s: float = 2.0,
) -> FastAPI:
    """Build the job API for ``settings``.

    ``max_attempts`` caps deliveries per job; ``stale_after_s`` is how long a RUNNING job may go
    without a heartbeat before it is requeued; ``sweep_interval_s`` paces the re-submitter.
    """
    state = TrainerState(
        settings=settings,
        queue=queue,
        max_attempts=max_attempts,
        stale_after_s=stale_after_s,
        registry=Registry(settings.resolved_registry_dir.resolve()),
        data_roots=list(settings.resolved_data_roots),
    )

    async def resubmitter() -> None:
        while True:
            await asyncio.sleep(sweep_interval_s)
            try:
                await run_in_threadpool(state.sweep)
            except Exception:  # keep sweeping whatever one round hit
                log.exception("re-submitter round failed")

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state.jobs = await run_in_threadpool(JobStore, settings.resolved_jobs_dir)
        state.experiments = await run_in_threadpool(ExperimentStore, state.jobs, state.registry.root)
        state.celery = create_celery_app(settings, queue=queue)
        task = asyncio.create_task(resubmitter())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    app = create_service_app(
        service="trainer",
        title="lastkd trainer",
        description="Training jobs for LAST v2 students (submit, follow, cancel) and the students they published.",
        token=settings.token(),
        lifespan=lifespan,
        routers=[health_router, jobs_router, checkpoints_router, experiments_router],
        max_json_bytes=MAX_CONFIG_BYTES,
        component_schemas=[TrainRequest, FinetuneRequest, JobEvent, ExperimentConfig],
    )
    app.state.trainer = state
    app.state.metrics.registry.register(_JobCounts(state))
    return app


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``lastkd serve-trainer``."""
    parser = subparsers.add_parser(
        "serve-trainer",
        help="run the trainer job API (POST /train)",
        description="Serve the training job API over HTTP. Settings come from LASTKD_* variables; "
        "--host/--port override LASTKD_TRAINER_HOST/PORT.",
    )
    add_bind_arguments(parser, "trainer")
    parser.add_argument("--queue", default=DEFAULT_QUEUE, help=f"Celery queue for jobs (default {DEFAULT_QUEUE})")
    parser.add_argument(
        "--max-attempts",
        type=int,
        default=DEFAULT_MAX_ATTEMPTS,
        help="deliveries per job before it is FAILED (worker lost each time)",
    )
    parser.add_argument(
        "--stale-after",
        type=float,
        default=120.0,
        help="seconds without a heartbeat after which a RUNNING job is requeued",
    )
    parser.add_argument("--sweep-interval", type=float, default=2.0, help="seconds between re-submitter rounds")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Check the bind address and options, then serve until interrupted."""
    problems = []
    if not 1 <= args.max_attempts <= 100:
        problems.append(f"--max-attempts must be 1..100, got {args.max_attempts}")
    if not 1 <= args.stale_after <= 7 * 24 * 3600:
        problems.append(f"--stale-after must be 1..604800 seconds, got {args.stale_after}")
    if not 0.05 <= args.sweep_interval <= 3600:
        problems.append(f"--sweep-interval must be 0.05..3600 seconds, got {args.sweep_interval}")
    if problems:
        for p in problems:
            print(f"lastkd serve-trainer: {p}", file=sys.stderr)
        return 2
    try:
        host, port = bind_address(args, settings.trainer_host, settings.trainer_port, settings.token())
    except BindRefusedError as exc:
        print(f"lastkd serve-trainer: {exc}", file=sys.stderr)
        return 2
    app = create_app(
        settings,
        queue=args.queue,
        max_attempts=args.max_attempts,
        stale_after_s=args.stale_after,
        sweep_interval_s=args.sweep_interval,
    )
    return serve(app, host, port, settings.token(), settings.log_level)
