"""The teacher HTTP service (``lastkd serve-teacher``): a thin FastAPI shell over the Embedder.

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
import math
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from lastkd.services.http import (
    ApiError,
    BindRefusedError,
    HttpMetrics,
    add_bind_arguments,
    add_live_route,
    bearer_auth,
    bind_address,
    install_error_handlers,
    metrics_response,
    serve,
)
from lastkd.services.settings import Settings
from lastkd.services.teacher_api.uploads import UploadError, receive_multipart
from lastkd.teacher.clip_ids import InvalidClipIdError, clip_id_from_filename, validate_clip_id

if TYPE_CHECKING:  # torch and the engine load in create_app: `lastkd serve-teacher --help` stays fast
    from lastkd.teacher.embedder import Embedder

log = logging.getLogger(__name__)

__all__ = ["add_parser", "create_app", "run"]

# ClipFailure reasons caused by the server rather than by the clip.
_SERVER_REASONS = {"shutdown": 503, "store_full": 507, "internal_error": 500}


class _EngineCounters(Collector):
    """Exposes the engine's own counters, so clips finished after a client hung up still count."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state

    def collect(self) -> Iterator[CounterMetricFamily]:
        embedder: Embedder | None = self.state.get("embedder")
        c = embedder.counters if embedder is not None else None
        for name, doc, attr in (
            ("lastkd_teacher_clips_embedded", "Clips run through the teacher model.", "computed"),
            ("lastkd_teacher_clips_cached", "Clips answered from the store (same bytes seen before).", "cached"),
            ("lastkd_teacher_clips_failed", "Clips that could not be embedded.", "failed"),
            ("lastkd_teacher_batches", "Inference batches run.", "batches"),
        ):
            yield CounterMetricFamily(name, doc, value=float(getattr(c, attr)) if c else 0.0)


def create_app(settings: Settings) -> FastAPI:
    """Build the teacher app; the model, the store and the decoders start in its lifespan."""
    from lastkd.teacher.embedder import (
        Embedder,
        EngineConfig,
        EngineError,
        limits_from_settings,
        preprocess_from_settings,
    )

    state: dict[str, Any] = {"embedder": None, "store": None}
    metrics = HttpMetrics("teacher")
    registry: CollectorRegistry = metrics.registry
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
    queue_depth.set_function(lambda: float(state["embedder"].pending) if state["embedder"] else 0.0)
    ready_gauge = Gauge("lastkd_teacher_ready", "1 once the model is loaded and warmed up.", registry=registry)
    ready_gauge.set_function(lambda: 1.0 if _ready(state) else 0.0)
    registry.register(_EngineCounters(state))

    def on_batch(size: int, seconds: float) -> None:
        batch_sizes.observe(size)
        batch_seconds.observe(seconds)

    upload_dir = Path(settings.data_dir) / "tmp" / "uploads"

    async def warm(embedder: Embedder, app: FastAPI) -> None:
        """Load the model, start the decoders and run one forward pass, while the port is open
        and /health/ready says 503 "starting". A teacher that cannot start stops the process."""
        try:
            await run_in_threadpool(embedder.start)
            state["embedder"] = embedder
            await run_in_threadpool(embedder.warm_up)
        except Exception as exc:  # noqa: BLE001 - any start-up failure ends the service cleanly
            message = str(exc) if isinstance(exc, EngineError) else f"{type(exc).__name__}: {exc}"
            log.error("teacher start-up failed: %s", message)
            state["failed"] = message  # /health/ready says so meanwhile
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

        upload_dir.mkdir(parents=True, exist_ok=True)
        for stale in upload_dir.glob("upload-*"):  # left by a previous process that was killed
            stale.unlink(missing_ok=True)
        store_path = settings.resolved_store_path
        store_path.parent.mkdir(parents=True, exist_ok=True)
        store = FeatureStore(store_path, map_size=settings.store_map_size)
        state["store"] = store
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

    app = FastAPI(title="lastkd teacher", version="1", lifespan=lifespan)
    install_error_handlers(app)
    metrics.install(app)
    add_live_route(app)
    auth = bearer_auth(settings.token())
    max_files = min(settings.max_clips_per_request, settings.teacher_queue_size)

    @app.get("/health/ready", tags=["health"])
    async def ready() -> JSONResponse:
        embedder: Embedder | None = state["embedder"]
        if state.get("failed"):
            return JSONResponse({"status": "failed", "reason": state["failed"]}, status_code=503)
        if not _ready(state) or embedder is None:
            return JSONResponse({"status": "starting"}, status_code=503, headers={"Retry-After": "5"})
        return JSONResponse(
            {
                "status": "ready",
                "model": settings.teacher_model,
                "random_init": settings.teacher_random_init,
                "device": str(embedder.device),
                "feature_set": embedder.set_id,
                "dim": embedder.dim,
                "sampling": embedder.preprocess.sampling,
                "protocol": embedder.preprocess.protocol,
                "decode_workers": embedder.decode_workers,
                "queue_depth": embedder.pending,
            }
        )

    @app.get("/metrics", tags=["health"])
    async def prometheus() -> Response:
        return metrics_response(registry)

    @app.get("/feature-sets")
    async def feature_sets() -> dict[str, Any]:
        store = _store(state)
        embedder: Embedder | None = state["embedder"]
        sets = [meta.to_dict() for meta in store.list_sets()]
        return {"active": embedder.set_id if embedder else None, "feature_sets": sets}

    @app.get("/features/{set_id}/{clip_id}")
    async def feature(set_id: str, clip_id: str, request: Request) -> Response:
        from lastkd.featurestore import FeatureStoreError, InvalidFeatureError, UnknownFeatureSetError

        try:
            validate_clip_id(clip_id)
        except InvalidClipIdError as exc:
            raise ApiError(400, "invalid_clip_id", str(exc)) from None
        store = _store(state)
        try:
            meta = store.get_set(set_id)
            arr, found = store.get_many(set_id, [clip_id])
            info = store.clip_info(set_id, clip_id) if bool(found[0]) else None
        except UnknownFeatureSetError:
            raise ApiError(404, "unknown_feature_set", f"no feature set {set_id!r}") from None
        except InvalidFeatureError as exc:
            raise ApiError(400, "invalid_request", str(exc)) from None
        except FeatureStoreError as exc:
            raise ApiError(500, "store_error", str(exc)) from None
        if not bool(found[0]):
            raise ApiError(404, "unknown_clip", f"no feature for clip {clip_id!r} in feature set {set_id!r}")
        vector = np.asarray(arr[0], dtype="<f4")
        headers = {"X-Feature-Set": set_id, "X-Feature-Dim": str(meta.dim), "X-Clip-Id": clip_id}
        if "application/octet-stream" in request.headers.get("accept", ""):
            return Response(vector.tobytes(), media_type="application/octet-stream", headers=headers)
        return JSONResponse(
            {
                "feature_set": set_id,
                "clip_id": clip_id,
                "dim": meta.dim,
                "dtype": meta.dtype,
                "frames_used": (info or {}).get("frames_used"),
                "vector": vector.tolist(),
            },
            headers=headers,
        )

    @app.post("/embed", dependencies=[Depends(auth)])
    async def embed(request: Request) -> JSONResponse:
        embedder: Embedder | None = state["embedder"]
        if embedder is None or not _ready(state):
            raise ApiError(503, "not_ready", "the teacher is still starting", headers={"Retry-After": "5"})
        if embedder.pending >= settings.teacher_queue_size:
            # Refuse before reading a byte of the body: the queue is full now.
            raise _queue_full(embedder, settings.teacher_queue_size)
        try:
            form = await receive_multipart(
                request, upload_dir, max_bytes=settings.max_upload_bytes, max_files=max_files
            )
        except UploadError as exc:
            raise ApiError(exc.status, exc.code, exc.message) from None
        try:
            return await _embed_form(embedder, form, settings.teacher_queue_size)
        finally:
            form.cleanup()

    return app


def _ready(state: dict[str, Any]) -> bool:
    embedder: Embedder | None = state.get("embedder")
    return embedder is not None and embedder.ready and embedder.alive


def _store(state: dict[str, Any]) -> Any:
    if state.get("store") is None:
        raise ApiError(503, "not_ready", "the teacher is still starting", headers={"Retry-After": "5"})
    return state["store"]


def _queue_full(embedder: Embedder, queue_size: int) -> ApiError:
    # Time for the queue ahead to drain at the recent rate, at least a second, at most a minute.
    wait = min(60, max(1, math.ceil(embedder.pending * embedder.seconds_per_clip())))
    return ApiError(
        503,
        "queue_full",
        f"the teacher queue is full ({embedder.pending} of {queue_size} clips); retry later",
        headers={"Retry-After": str(wait)},
    )


async def _embed_form(embedder: Embedder, form: Any, queue_size: int) -> JSONResponse:
    files = form.files
    if not files:
        raise ApiError(400, "no_files", "send one or more clips as multipart 'files' parts")
    ids = form.fields.get("clip_ids", [])
    if ids and len(ids) != len(files):
        raise ApiError(
            400,
            "clip_ids_mismatch",
            f"{len(ids)} clip_ids for {len(files)} files: give one id per file, in order, or none",
        )
    results: list[dict[str, Any] | None] = [None] * len(files)
    work: list[tuple[int, Any, str]] = []
    for i, upload in enumerate(files):
        base = {"filename": upload.filename, "sha256": upload.sha256}
        if ids:
            try:
                clip_id = validate_clip_id(ids[i])
            except InvalidClipIdError as exc:
                results[i] = {**base, "clip_id": None, "error": {"code": "invalid_clip_id", "message": str(exc)}}
                continue
        else:
            clip_id = clip_id_from_filename(upload.filename) or upload.sha256
        work.append((i, upload, clip_id))

    new = sum(1 for _, upload, _ in work if embedder.lookup_sha256(upload.sha256) is None)
    if new and embedder.pending + new > queue_size:
        raise _queue_full(embedder, queue_size)
    futures = [embedder.submit(upload.path, clip_id, upload.sha256) for _, upload, clip_id in work]
    outcomes = await asyncio.gather(*(asyncio.wrap_future(f) for f in futures), return_exceptions=True)

    for (i, upload, clip_id), outcome in zip(work, outcomes, strict=True):
        base = {"filename": upload.filename, "clip_id": clip_id, "sha256": upload.sha256}
        if isinstance(outcome, BaseException):
            results[i] = {**base, "error": _clip_error(outcome)}
        else:
            results[i] = {
                **base,
                "feature_set": outcome.feature_set,
                "dim": outcome.dim,
                "cached": outcome.cached,
                "frames_used": outcome.frames_used,
            }

    done = [r for r in results if r is not None]
    failed = [r for r in done if "error" in r]
    body: dict[str, Any] = {
        "feature_set": embedder.set_id,
        "embedded": len(done) - len(failed),
        "failed": len(failed),
        "results": done,
    }
    if failed and len(failed) == len(done):
        codes = [r["error"]["code"] for r in failed]
        server = [_SERVER_REASONS[c] for c in codes if c in _SERVER_REASONS]
        status = max(server) if len(server) == len(codes) else 422
        first = failed[0]["error"]
        noun = "the clip" if len(done) == 1 else f"all {len(done)} clips"
        body["error"] = {
            "code": "all_clips_failed" if len(done) > 1 else first["code"],
            "message": f"{noun} failed; first: {first['code']}: {first['message']}",
        }
        return JSONResponse(body, status_code=status)
    return JSONResponse(body)


def _clip_error(exc: BaseException) -> dict[str, str]:
    from lastkd.featurestore import StoreFullError
    from lastkd.teacher.embedder import ClipFailure

    if isinstance(exc, ClipFailure):
        return {"code": exc.reason, "message": exc.message}
    if isinstance(exc, StoreFullError):
        return {"code": "store_full", "message": str(exc)}
    log.error("embedding failed: %r", exc)
    return {"code": "internal_error", "message": f"{type(exc).__name__}: {exc}"}


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
    from lastkd.teacher.embedder import EngineConfig, EngineError

    try:
        EngineConfig.from_settings(settings)  # the model name and weights rule, before any loading
    except EngineError as exc:
        print(f"lastkd serve-teacher: {exc}", file=sys.stderr)
        return 2
    return serve(create_app(settings), host, port, settings.token(), settings.log_level)
