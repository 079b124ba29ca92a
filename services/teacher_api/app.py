"""The teacher HTTP service (``lastkd serve-teacher``): a thin FastAPI shell over the Embedder.

This module builds the app (lifespan, metrics) and the command; the routes are in
:mod:`lastkd.services.teacher_api.routes` and their bodies in :mod:`lastkd.schemas.teacher`.

Endpoints
---------
``POST /embed``  (bearer token when configured) multipart ``files`` parts (one per clip) and
    optional ``clip_ids`` text parts in the same order. Answers per clip, in order::

        {"filename", "clip_id", "sha256", "feature_set", "dim", "cached", "frames_used"}  # embedded
        {"filename", "clip_id", "sha256", "error": {"code", "message"}}        # this clip failed

    Status: 200 when at least one clip succeeded (the others carry their own error); 422 with the
    same ``results`` plus a top-level ``error`` when every clip failed because of its input (503,
    507 or 500 when they failed because of the server); 400/413/415 when the request itself is
    malformed or over a limit (no clip is looked at, nothing is kept); 503 + Retry-After when the
    queue cannot take the request's clips now.
``GET /features/{set_id}/{clip_id}``  JSON ``{"feature_set", "clip_id", "dim", "dtype", "frames_used", "vector"}``,
    or raw little-endian float32 bytes with ``Accept: application/octet-stream``.
``GET /feature-sets``, ``GET /health/live``, ``GET /health/ready``, ``GET /metrics``.

The service is the single writer of the LMDB store. The port opens at once and the model is
loaded and warmed up behind it: ``/health/ready`` answers 503 ``{"status": "starting"}`` until a
forward pass has run, then 200; a teacher that cannot start ends the process (exit 2).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from prometheus_client import CollectorRegistry, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from lastkd.services.http import BindRefusedError, add_bind_arguments, bind_address, create_service_app, serve
from lastkd.services.settings import Settings
from lastkd.services.teacher_api.routes import TeacherState, embed_router, features_router, health_router

if TYPE_CHECKING:  # torch and the engine load in create_app: `lastkd serve-teacher --help` stays fast
    from lastkd.teacher.embedder import Embedder

log = logging.getLogger(__name__)

__all__ = ["add_parser", "create_app", "run"]


class _EngineCounters(Collector):
    """Exposes the engine's own counters, so clips finished after a client hung up still count."""

    def __init__(self, state: TeacherState) -> None:
        self.state = state

    def collect(self) -> Iterator[CounterMetricFamily]:
        embedder = self.state.embedder
        c = embedder.counters if embedder is not None else None
        for name, doc, attr in (
            ("lastkd_teacher_clips_embedded", "Clips run through the teacher model.", "computed"),
            ("lastkd_teacher_clips_cached", "Clips answered from the store (same bytes seen before).", "cached"),
            ("lastkd_teacher_clips_failed", "Clips that could not be embedded.", "failed"),
            ("lastkd_teacher_batches", "Inference batches run.", "batches"),
        ):
            yield CounterMetricFamily(name, doc, value=float(getattr(c, attr)) if c else 0.0)


def _engine_metrics(registry: CollectorRegistry, state: TeacherState) -> Callable[[int, float], None]:
    """Register the teacher's own metrics; returns the per-batch callback the embedder calls."""
    batch_sizes = Histogram(
        "lastkd_teacher_batch_size",
        "Clips per inference batch.",
        buckets=(1, 2, 4, 8, 16, 32, 64, 128),
        registry=registry,
    )
    batch_seconds = Histogram(
        "lastkd_teacher_batch_seconds",
        "Seconds per inference batch (forward + store write).",
        buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
        registry=registry,
    )
    queue_depth = Gauge("lastkd_teacher_queue_depth", "Clips accepted and not yet answered.", registry=registry)
    queue_depth.set_function(lambda: float(state.embedder.pending) if state.embedder else 0.0)
    ready_gauge = Gauge("lastkd_teacher_ready", "1 once the model is loaded and warmed up.", registry=registry)
    ready_gauge.set_function(lambda: 1.0 if state.ready else 0.0)
    registry.register(_EngineCounters(state))

    def on_batch(size: int, seconds: float) -> None:
        batch_sizes.observe(size)
        batch_seconds.observe(seconds)

    return on_batch


def create_app(settings: Settings) -> FastAPI:
    """Build the teacher app; the model, the store and the decoders start in its lifespan."""
    from lastkd.teacher.embedder import Embedder
    from lastkd.teacher.engine_config import EngineConfig, EngineError, limits_from_settings, preprocess_from_settings

    state = TeacherState(settings=settings, upload_dir=Path(settings.data_dir) / "tmp" / "uploads")

    async def warm(embedder: Embedder, app: FastAPI) -> None:
        """Load the model, start the decoders and run one forward pass, while the port is open
        and /health/ready says 503 "starting". A teacher that cannot start stops the process."""
        try:
            await run_in_threadpool(embedder.start)
            state.embedder = embedder
            await run_in_threadpool(embedder.warm_up)
        except Exception as exc:  # noqa: BLE001 - any start-up failure ends the service cleanly
            message = str(exc) if isinstance(exc, EngineError) else f"{type(exc).__name__}: {exc}"
            log.error("teacher start-up failed: %s", message)
            state.failed = message  # /health/ready says so meanwhile
            request_exit = getattr(app.state, "request_exit", None)
            if request_exit is not None:  # under `lastkd serve-teacher`: stop serving, exit 2
                request_exit(2)
            return
        log.info(
            "teacher ready: model=%s device=%s feature_set=%s decode_workers=%d",
            settings.teacher_model,
            embedder.device,
            embedder.set_id,
            embedder.decode_workers,
        )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        from lastkd.featurestore import FeatureStore

        state.upload_dir.mkdir(parents=True, exist_ok=True)
        for stale in state.upload_dir.glob("upload-*"):  # left by a previous process that was killed
            stale.unlink(missing_ok=True)
        store_path = settings.resolved_store_path
        store_path.parent.mkdir(parents=True, exist_ok=True)
        store = FeatureStore(store_path, map_size=settings.store_map_size)
        state.store = store
        try:
            embedder = Embedder(
                EngineConfig.from_settings(settings),
                preprocess_from_settings(settings),
                limits_from_settings(settings),
                store,
                on_batch=on_batch,
            )
        except EngineError as exc:
            log.error("teacher start-up failed: %s", exc)
            store.close()
            raise
        # The port opens now; the model warms up behind it (compose healthchecks and `lastkd up`
        # wait on /health/ready, which answers 503 "starting" until the warm-up is done).
        warming = asyncio.create_task(warm(embedder, app))
        try:
            yield
        finally:
            await asyncio.wait([warming])  # a start-up thread cannot be interrupted: let it finish
            await run_in_threadpool(embedder.close)
            store.close()

    app = create_service_app(
        service="teacher",
        title="lastkd teacher",
        description="Embeds video clips with the frozen VideoMAE V2 teacher into the LMDB feature store.",
        token=settings.token(),
        lifespan=lifespan,
        routers=[health_router, features_router, embed_router],
    )
    app.state.teacher = state
    on_batch = _engine_metrics(app.state.metrics.registry, state)
    return app


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``lastkd serve-teacher``."""
    parser = subparsers.add_parser(
        "serve-teacher",
        help="run the teacher HTTP service (POST /embed)",
        description="Serve the VideoMAE V2 teacher over HTTP. Settings come from LASTKD_* variables; "
        "--host/--port override LASTKD_TEACHER_HOST/PORT.",
    )
    add_bind_arguments(parser, "teacher")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Check the bind address and the teacher settings, then serve until interrupted."""
    import sys

    try:
        host, port = bind_address(args, settings.teacher_host, settings.teacher_port, settings.token())
    except BindRefusedError as exc:
        print(f"lastkd serve-teacher: {exc}", file=sys.stderr)
        return 2
    from lastkd.teacher.engine_config import EngineConfig, EngineError

    try:
        EngineConfig.from_settings(settings)  # the model name and weights rule, before any loading
    except EngineError as exc:
        print(f"lastkd serve-teacher: {exc}", file=sys.stderr)
        return 2
    return serve(create_app(settings), host, port, settings.token(), settings.log_level)
