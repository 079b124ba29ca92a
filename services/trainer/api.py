"""The trainer's job API (``lastkd serve-trainer``): submit, follow and cancel training jobs, and
list and download the published students.

Endpoints: ``POST /train``, ``GET /jobs``, ``GET /jobs/{id}``, ``POST /jobs/{id}/cancel``,
``GET /jobs/{id}/events`` (server-sent events), ``GET /checkpoints``,
``GET /checkpoints/{name}/{version}``, ``GET /checkpoints/{name}/{version}/files/{path}``,
``GET /health/live``, ``GET /health/ready``, ``GET /metrics``.

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
import hashlib
import json
import logging
import re
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from lastkd.datapaths import DataPathError
from lastkd.ids import check_job_id
from lastkd.jsonsafe import to_jsonable
from lastkd.registry import Registry
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
from lastkd.services.trainer.celery_app import DEFAULT_MAX_ATTEMPTS, DEFAULT_QUEUE, broker_reachable, create_celery_app
from lastkd.services.trainer.jobs import IdempotencyConflict, JobRecord, JobState, JobStore, JobStoreError
from lastkd.services.trainer.tasks import enqueue
from lastkd.sse import format_comment, format_event
from lastkd.student.config import MAX_CONFIG_BYTES, TrainConfig
from lastkd.student.paths import confine_config_paths

log = logging.getLogger(__name__)

IDEMPOTENCY_KEY_RE = re.compile(r"^[\x21-\x7e]{1,200}$")
SSE_POLL_S = 0.5
SSE_KEEPALIVE_S = 15.0
RETRY_AFTER_S = 5
SUBMIT_LEASE_S = 30.0  # how long a submitter may take to hand a job to the broker (as begin_submit)


class _JobCounts(Collector):
    """Jobs per state, read from the job database at scrape time."""

    def __init__(self, store_ref: dict[str, Any]) -> None:
        self.store_ref = store_ref

    def collect(self) -> Iterator[GaugeMetricFamily]:
        gauge = GaugeMetricFamily("lastkd_trainer_jobs", "Training jobs by state.", labels=["state"])
        store: JobStore | None = self.store_ref.get("store")
        if store is not None:
            try:
                for state, n in store.counts().items():
                    gauge.add_metric([state], n)
            except JobStoreError:
                pass
        yield gauge


def _valid_job_id(value: str) -> bool:
    try:
        check_job_id(value)
    except ValueError:
        return False
    return True


def _config_digest(config: TrainConfig) -> str:
    text = json.dumps(config.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _validation_problem(exc: ValidationError) -> ApiError:
    problems = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "config"
        problems.append({"field": field, "msg": err["msg"]})
    summary = "; ".join(f"{p['field']}: {p['msg']}" for p in problems)
    return ApiError(422, "invalid_config", f"invalid training config: {summary}", details=problems)


def check_feature_set(store_path: Path, set_id: str) -> str | None:
    """Refuse a ``distill.feature_set`` the feature store does not hold (422 naming the field and
    listing the sets that exist). Returns None when checked, or a note saying why the API could not
    check (no store at ``store_path``, or it cannot be read): the job is then accepted, and the
    worker, which may see another store, decides."""
    from lastkd.featurestore import FeatureStore
    from lastkd.featurestore.errors import FeatureStoreError

    try:
        store = FeatureStore(store_path, readonly=True)
        try:
            sets = sorted(meta.set_id for meta in store.list_sets())
        finally:
            store.close()
    except (FeatureStoreError, OSError) as exc:
        return f"distill.feature_set {set_id!r} not checked: the API cannot read the feature store ({exc})"
    except Exception as exc:  # lmdb's own errors: still "cannot read", never a 500
        return (
            f"distill.feature_set {set_id!r} not checked: the API cannot read the feature store at "
            f"{store_path} ({type(exc).__name__}: {str(exc)[:200]})"
        )
    if set_id not in sets:
        listed = ", ".join(repr(s) for s in sets) if sets else "none (the store holds no feature sets)"
        raise ApiError(
            422,
            "unknown_feature_set",
            f"distill.feature_set: no feature set {set_id!r} in the feature store at {store_path}; sets that exist: {listed}",
            field="distill.feature_set",
            feature_sets=sets,
        )
    return None


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
    state: dict[str, Any] = {"store": None, "celery": None, "broker_error": None}
    registry_dir = settings.resolved_registry_dir.resolve()
    data_roots = list(settings.resolved_data_roots)
    store_path = settings.resolved_store_path.resolve()
    metrics = HttpMetrics("trainer")
    metrics.registry.register(_JobCounts(state))
    auth = bearer_auth(settings.token())

    def submit(job_id: str, leased: bool = False) -> bool:
        """Hand a PENDING job to the broker; False when the broker refused (job stays PENDING).
        ``leased``: the caller already holds the submit lease (it created the job with it)."""
        store: JobStore = state["store"]
        if not leased and not store.begin_submit(job_id):
            return True  # queued already, or another submitter holds it right now
        try:
            enqueue(state["celery"], job_id)
        except Exception as exc:  # any broker/transport failure: keep PENDING, say why
            state["broker_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            store.end_submit(job_id, queued=False)
            log.warning("job %s: broker unavailable, kept PENDING (%s)", job_id, state["broker_error"])
            return False
        state["broker_error"] = None
        store.end_submit(job_id, queued=True)
        return True

    def sweep() -> None:
        store: JobStore = state["store"]
        for record in store.stale_running(stale_after_s):
            if store.requeue(record.id, f"worker {record.owner} stopped sending heartbeats; requeued"):
                log.warning(
                    "job %s: worker %s lost (no heartbeat for %.0fs), requeued", record.id, record.owner, stale_after_s
                )
        for job_id in store.pending_ids():
            if not submit(job_id):
                break  # broker still down; try again next sweep

    async def sweeper() -> None:
        while True:
            await asyncio.sleep(sweep_interval_s)
            try:
                await run_in_threadpool(sweep)
            except Exception:  # keep sweeping whatever one round hit
                log.exception("re-submitter round failed")

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state["store"] = await run_in_threadpool(JobStore, settings.resolved_jobs_dir)
        state["celery"] = create_celery_app(settings, queue=queue)
        task = asyncio.create_task(sweeper())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    app = FastAPI(title="lastkd trainer", version="1", lifespan=lifespan)
    install_error_handlers(app)
    metrics.install(app)
    add_live_route(app)

    def _store() -> JobStore:
        store = state["store"]
        if store is None:
            raise ApiError(503, "unavailable", "starting up", headers={"Retry-After": str(RETRY_AFTER_S)})
        return store

    def _get_job(job_id: str) -> JobRecord:
        record = _store().get(job_id) if _valid_job_id(job_id) else None
        if record is None:
            raise ApiError(404, "not_found", f"no job {job_id!r}")
        return record

    def _job_body(record: JobRecord, request: Request) -> dict[str, Any]:
        body = record.public()
        # the readers' report of skipped source files, lifted out of the metrics so nobody misses it
        body["data_skipped"] = (record.metrics or {}).get("data_skipped")
        body["status_url"] = str(request.url_for("get_job", job_id=record.id))
        return body

    # --- health ---------------------------------------------------------------------------------
    @app.get("/health/ready", tags=["health"])
    async def ready() -> JSONResponse:
        problems = {}
        try:
            await run_in_threadpool(_store().ping)
        except (ApiError, JobStoreError) as exc:
            problems["job_db"] = str(exc)
        if state["celery"] is not None:
            reason = await run_in_threadpool(broker_reachable, state["celery"])
            if reason:
                problems["broker"] = reason
        else:
            problems["broker"] = "starting up"
        if problems:
            return JSONResponse(
                {"status": "not_ready", "problems": problems},
                status_code=503,
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        return JSONResponse(
            {"status": "ready", "broker": settings.resolved_broker_url.split("://", 1)[0], "queue": queue}
        )

    @app.get("/metrics", tags=["health"])
    async def prometheus() -> Response:
        return metrics_response(metrics.registry)

    # --- jobs -------------------------------------------------------------------------------------
    @app.post("/train", status_code=202, dependencies=[Depends(auth)])
    async def train(request: Request) -> JSONResponse:
        raw = await request.body()
        if len(raw) > MAX_CONFIG_BYTES:
            raise ApiError(413, "too_large", f"config body is {len(raw)} bytes, more than {MAX_CONFIG_BYTES} allowed")
        if not raw.strip():
            raise ApiError(422, "invalid_config", "empty body: send a TrainConfig as JSON")
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, ValueError) as exc:
            raise ApiError(422, "invalid_config", f"body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise ApiError(
                422, "invalid_config", f"body must be a JSON object of TrainConfig fields, got {type(body).__name__}"
            )
        client_id = body.pop("job_id", None)
        if client_id is not None:
            try:
                check_job_id(client_id)
            except ValueError as exc:
                raise ApiError(
                    422, "invalid_config", f"job_id: {exc}", details=[{"field": "job_id", "msg": str(exc)}]
                ) from None
        key = request.headers.get("idempotency-key")
        if key is not None and not IDEMPOTENCY_KEY_RE.match(key):
            raise ApiError(
                422, "invalid_request", "Idempotency-Key: must be 1-200 printable ASCII characters without spaces"
            )
        try:
            config = TrainConfig.model_validate(body)
        except ValidationError as exc:
            raise _validation_problem(exc) from None
        try:
            config = await run_in_threadpool(confine_config_paths, config, data_roots)
        except DataPathError as exc:  # 403 forbidden, 422 missing/invalid (the error carries both)
            raise ApiError(exc.status, exc.code, str(exc), field=exc.field) from None
        warnings: list[str] = []
        if config.distill.feature_set is not None:
            note = await run_in_threadpool(check_feature_set, store_path, config.distill.feature_set)
            if note is not None:
                log.warning("POST /train: %s", note)
                warnings.append(note)
        store = _store()
        try:
            record, created = await run_in_threadpool(
                lambda: store.create(
                    config.name,
                    config.model_dump(mode="json"),
                    _config_digest(config),
                    max_attempts=max_attempts,
                    idempotency_key=key,
                    job_id=client_id,
                    submit_lease_s=SUBMIT_LEASE_S,
                )
            )
        except IdempotencyConflict as exc:
            raise ApiError(409, "conflict", f"{exc}; use a new Idempotency-Key or job_id", job_id=exc.job_id) from None
        # A job this request created is queued by this request (it holds the submit lease), so the
        # answer says QUEUED or later; a replayed PENDING one goes through the usual lease.
        if record.state is JobState.PENDING and not await run_in_threadpool(submit, record.id, created):
            raise ApiError(
                503,
                "broker_unavailable",
                f"the job broker is unreachable ({state['broker_error']}); job {record.id} is recorded as PENDING and "
                "will be queued automatically when the broker is back. Retrying with the same Idempotency-Key "
                "or job_id returns this job.",
                headers={"Retry-After": str(RETRY_AFTER_S)},
                job_id=record.id,
                status_url=str(request.url_for("get_job", job_id=record.id)),
            )
        record = await run_in_threadpool(store.get, record.id) or record
        body_out = _job_body(record, request)
        body_out["created"] = created
        body_out["warnings"] = warnings
        return JSONResponse(body_out, status_code=202)

    @app.get("/jobs")
    async def list_jobs(
        request: Request,
        state_: str | None = Query(None, alias="state"),
        limit: int = Query(100, ge=1, le=1000),
        offset: int = Query(0, ge=0, le=10_000_000),
    ) -> dict[str, Any]:
        wanted = None
        if state_ is not None:
            try:
                wanted = JobState(state_.upper())
            except ValueError:
                raise ApiError(
                    422, "invalid_request", f"state: {state_!r} is not one of {', '.join(s.value for s in JobState)}"
                ) from None
        records = await run_in_threadpool(_store().list, wanted, limit, offset)
        return {"jobs": [_job_body(r, request) for r in records], "count": len(records)}

    @app.get("/jobs/{job_id}", name="get_job")
    async def get_job(job_id: str, request: Request) -> dict[str, Any]:
        return _job_body(await run_in_threadpool(_get_job, job_id), request)

    @app.post("/jobs/{job_id}/cancel", dependencies=[Depends(auth)])
    async def cancel(job_id: str, request: Request) -> JSONResponse:
        record = await run_in_threadpool(_get_job, job_id)
        if record.state in (JobState.COMPLETED, JobState.FAILED):
            raise ApiError(409, "conflict", f"job {job_id} is already {record.state.value}", state=record.state.value)
        record = await run_in_threadpool(_store().request_cancel, job_id)
        assert record is not None
        # 202 while a worker still has to notice the flag (within one step); 200 once CANCELLED
        return JSONResponse(_job_body(record, request), status_code=200 if record.terminal else 202)

    @app.get("/jobs/{job_id}/events")
    async def events(job_id: str, request: Request) -> StreamingResponse:
        await run_in_threadpool(_get_job, job_id)
        store = _store()

        async def stream() -> AsyncIterator[str]:
            last = None
            quiet_since = time.monotonic()
            yield "retry: 2000\n\n"
            while True:
                if await request.is_disconnected():
                    return
                record = await run_in_threadpool(store.get, job_id)
                if record is None:
                    return
                stamp = (
                    record.state,
                    record.updated_at,
                    record.progress and json.dumps(record.progress, sort_keys=True),
                )
                if stamp != last:
                    last = stamp
                    quiet_since = time.monotonic()
                    payload = {
                        "job_id": record.id,
                        "state": record.state.value,
                        "progress": record.progress,
                        "attempts": record.attempts,
                        "error": record.error,
                        "result": record.result,
                    }
                    kind = "end" if record.terminal else "progress"
                    yield format_event(kind, to_jsonable(payload))
                    if record.terminal:
                        return
                elif time.monotonic() - quiet_since > SSE_KEEPALIVE_S:
                    quiet_since = time.monotonic()
                    yield format_comment()
                await asyncio.sleep(SSE_POLL_S)

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    # --- checkpoints -------------------------------------------------------------------------------
    registry = Registry(registry_dir)

    def _version_dir(name: str, version: str) -> tuple[Path, int]:
        folder = registry.path(name, version)  # NotFoundError -> 404
        return folder, int(folder.name[1:])

    def _entry(item: Any, request: Request) -> dict[str, Any]:
        return {
            "name": item.name,
            "version": item.version,
            "job_id": item.job_id,
            "created": item.created,
            "top1": item.top1,
            "url": str(request.url_for("get_checkpoint", name=item.name, version=f"v{item.version}")),
        }

    @app.get("/checkpoints")
    async def checkpoints(request: Request) -> dict[str, Any]:
        items = await run_in_threadpool(registry.entries)
        return {"checkpoints": [_entry(i, request) for i in items], "count": len(items)}

    @app.get("/checkpoints/{name}/{version}", name="get_checkpoint")
    async def checkpoint(name: str, version: str, request: Request) -> dict[str, Any]:
        folder, number = _version_dir(name, version)

        def read() -> dict[str, Any]:
            def load(fname: str) -> Any:
                try:
                    return json.loads((folder / fname).read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    return None

            metrics_doc = load("metrics.json") or {}
            files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and not p.is_symlink())
            return {
                "name": name,
                "version": number,
                "student": load("config.json"),
                "lineage": load("lineage.json"),
                "metrics": metrics_doc.get("final") if isinstance(metrics_doc, dict) else None,
                "files": files,
                "files_url": str(request.url_for("checkpoint_file", name=name, version=f"v{number}", filename="")),
            }

        return await run_in_threadpool(read)

    @app.get("/checkpoints/{name}/{version}/files/{filename:path}", name="checkpoint_file")
    async def checkpoint_file(name: str, version: str, filename: str) -> FileResponse:
        folder, number = _version_dir(name, version)
        parts = Path(filename).parts
        if not filename or "\x00" in filename or Path(filename).is_absolute() or any(p in ("..", ".") for p in parts):
            raise ApiError(404, "not_found", f"no file {filename!r} in {name} v{number}")
        target = folder / filename
        real = target.resolve()
        if target.is_symlink() or folder.resolve() not in real.parents or not real.is_file():
            raise ApiError(404, "not_found", f"no file {filename!r} in {name} v{number}")
        return FileResponse(real, filename=real.name)

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
