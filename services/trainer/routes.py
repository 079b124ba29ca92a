"""The trainer's HTTP routes, one router per resource: health, jobs and checkpoints.

Routes reach the running service through dependencies on :class:`TrainerState` (kept on
``app.state.trainer`` by :func:`lastkd.services.trainer.api.create_app`): the job database, the
broker handle and the registry of published students.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import Field, ValidationError
from starlette.concurrency import run_in_threadpool

from lastkd.datapaths import DataPathError
from lastkd.finetune.config import FinetuneConfig
from lastkd.hashing import sha256_json
from lastkd.ids import check_job_id
from lastkd.jsonsafe import to_jsonable
from lastkd.registry import Registry
from lastkd.schemas.trainer import (
    CheckpointDetail,
    CheckpointEntry,
    CheckpointList,
    Experiment,
    ExperimentChild,
    ExperimentList,
    ExperimentSubmitted,
    Job,
    JobEvent,
    JobKind,
    JobList,
    JobState,
    JobSubmitted,
    TrainerReady,
)
from lastkd.services.http import ApiError, Authorized
from lastkd.services.settings import Settings
from lastkd.services.trainer.celery_app import TrainerCelery, broker_reachable
from lastkd.services.trainer.experiments import ExperimentRecord, ExperimentStore
from lastkd.services.trainer.jobs import IdempotencyConflict, JobRecord, JobStore, JobStoreError
from lastkd.services.trainer.tasks import enqueue
from lastkd.sse import format_comment, format_event
from lastkd.student.config import ConfigError, TrainConfig
from lastkd.student.experiment import ExperimentConfig
from lastkd.student.paths import confine_config_paths
from lastkd.validation import problems, summary

log = logging.getLogger(__name__)

__all__ = [
    "FinetuneRequest",
    "TrainRequest",
    "TrainerState",
    "checkpoints_router",
    "experiments_router",
    "health_router",
    "jobs_router",
]

IDEMPOTENCY_KEY_RE = re.compile(r"^[\x21-\x7e]{1,200}$")
SSE_POLL_S = 0.5
SSE_KEEPALIVE_S = 15.0
RETRY_AFTER_S = 5
SUBMIT_LEASE_S = 30.0  # how long a submitter may take to hand a job to the broker (as begin_submit)


class TrainRequest(TrainConfig):
    """``POST /train``: a training config, and optionally the job's id (a client-chosen id makes
    the submission idempotent like an ``Idempotency-Key``)."""

    job_id: str | None = Field(None, description="Client-chosen job id (letters, digits, '-', '_', '.').")


@dataclass
class TrainerState:
    """What the routes and the re-submitter share."""

    settings: Settings
    queue: str
    max_attempts: int
    stale_after_s: float
    registry: Registry
    jobs: JobStore | None = None
    celery: TrainerCelery | None = None
    broker_error: str | None = None
    data_roots: list[Path] = field(default_factory=list)
    experiments: ExperimentStore | None = None

    def submit(self, job_id: str, leased: bool = False) -> bool:
        """Hand a PENDING job to the broker; False when the broker refused (the job stays PENDING).
        ``leased``: the caller already holds the submit lease (it created the job with it)."""
        store = self.jobs
        assert store is not None and self.celery is not None, "submit before the lifespan started"
        if not leased and not store.begin_submit(job_id):
            return True  # queued already, or another submitter holds it right now
        try:
            enqueue(self.celery, job_id)
        except Exception as exc:  # any broker/transport failure: keep PENDING, say why
            self.broker_error = f"{type(exc).__name__}: {str(exc)[:200]}"
            store.end_submit(job_id, queued=False)
            log.warning("job %s: broker unavailable, kept PENDING (%s)", job_id, self.broker_error)
            return False
        self.broker_error = None
        store.end_submit(job_id, queued=True)
        return True

    def sweep(self) -> None:
        """One round of the re-submitter: requeue RUNNING jobs whose worker stopped sending
        heartbeats, hand every PENDING job to the broker (stops at the first refusal), and settle
        the experiments whose children allow it (report, failure, cancel)."""
        store = self.jobs
        assert store is not None
        for record in store.stale_running(self.stale_after_s):
            if store.requeue(record.id, f"worker {record.owner} stopped sending heartbeats; requeued"):
                log.warning(
                    "job %s: worker %s lost (no heartbeat for %.0fs), requeued",
                    record.id,
                    record.owner,
                    self.stale_after_s,
                )
        for job_id in store.pending_ids():
            if not self.submit(job_id):
                break  # broker still down; try again next sweep
        if self.experiments is not None:
            for experiment_id in self.experiments.open_ids():
                self.experiments.settle(experiment_id)


def trainer_state(request: Request) -> TrainerState:
    """The service's :class:`TrainerState`."""
    state: TrainerState = request.app.state.trainer
    return state


State = Annotated[TrainerState, Depends(trainer_state)]


def job_store(state: State) -> JobStore:
    """The job database, or 503 before the lifespan opened it."""
    if state.jobs is None:
        raise ApiError(503, "unavailable", "starting up", headers={"Retry-After": str(RETRY_AFTER_S)})
    return state.jobs


Jobs = Annotated[JobStore, Depends(job_store)]


def _job(record: JobRecord, request: Request) -> Job:
    # The answer's fields are the schema's: the record's columns of the same names (never owner
    # or config_hash, which the schema does not name), its id as job_id, and two derived fields.
    columns = {name: getattr(record, name) for name in Job.model_fields if hasattr(record, name)}
    return Job(
        **columns,
        job_id=record.id,
        # the readers' report of skipped source files, lifted out of the metrics so nobody misses it
        data_skipped=(record.metrics or {}).get("data_skipped"),
        status_url=str(request.url_for("get_job", job_id=record.id)),
    )


def _get_job(jobs: JobStore, job_id: str) -> JobRecord:
    try:
        check_job_id(job_id)
    except ValueError:
        record = None
    else:
        record = jobs.get(job_id)
    if record is None:
        raise ApiError(404, "not_found", f"no job {job_id!r}")
    return record


# --------------------------------------------------------------------------------------------
# health
# --------------------------------------------------------------------------------------------
health_router = APIRouter(tags=["health"])


@health_router.get(
    "/health/ready",
    response_model=TrainerReady,
    response_model_exclude_none=True,
    responses={503: {"model": TrainerReady, "description": "The job database or the broker does not answer."}},
)
async def ready(state: State) -> Any:
    """Ready when the job database and the broker answer."""
    found: dict[str, str] = {}
    try:
        await run_in_threadpool(job_store(state).ping)
    except (ApiError, JobStoreError) as exc:
        found["job_db"] = str(exc)
    if state.celery is not None:
        reason = await run_in_threadpool(broker_reachable, state.celery)
        if reason:
            found["broker"] = reason
    else:
        found["broker"] = "starting up"
    if found:
        body = TrainerReady(status="not_ready", problems=found).model_dump(exclude_none=True)
        return JSONResponse(body, status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)})
    return TrainerReady(status="ready", broker=state.settings.resolved_broker_url.split("://", 1)[0], queue=state.queue)


# --------------------------------------------------------------------------------------------
# jobs
# --------------------------------------------------------------------------------------------
jobs_router = APIRouter(tags=["jobs"])

_TRAIN_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/TrainRequest"}}},
    }
}


def _invalid_config(message: str, details: list[dict[str, str]] | None = None) -> ApiError:
    return ApiError(422, "invalid_config", message, **({"details": details} if details is not None else {}))


def _idempotency_key(request: Request) -> str | None:
    key = request.headers.get("idempotency-key")
    if key is not None and not IDEMPOTENCY_KEY_RE.match(key):
        raise ApiError(
            422, "invalid_request", "Idempotency-Key: must be 1-200 printable ASCII characters without spaces"
        )
    return key


def _broker_unavailable(state: TrainerState, what: str, **ids: str) -> ApiError:
    return ApiError(
        503,
        "broker_unavailable",
        f"the job broker is unreachable ({state.broker_error}); {what} recorded as PENDING and will be queued "
        "automatically when the broker is back. Retrying with the same Idempotency-Key returns the same record.",
        headers={"Retry-After": str(RETRY_AFTER_S)},
        **ids,
    )


def _json_object(raw: bytes, what: str) -> dict[str, Any]:
    """The JSON object of a request body, or 422 ``invalid_config`` saying why not."""
    if not raw.strip():
        raise _invalid_config(f"empty body: send a {what} as JSON")
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise _invalid_config(f"body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise _invalid_config(f"body must be a JSON object of {what} fields, got {type(body).__name__}")
    return body


def _parse_train_body(raw: bytes) -> tuple[TrainConfig, str | None]:
    """The config and the client's job id of a ``POST /train`` body; 422 ``invalid_config`` naming
    every invalid field otherwise. Parsed here, not by FastAPI, so that every refusal of a config
    (YAML on the command line or JSON here) reads the same."""
    body = _json_object(raw, "TrainConfig")
    client_id = _client_job_id(body)
    try:
        return TrainConfig.model_validate(body), client_id
    except ValidationError as exc:
        found = problems(exc)
        raise _invalid_config(f"invalid training config: {summary(found)}", [p.as_dict() for p in found]) from None


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


@jobs_router.post(
    "/train",
    status_code=202,
    response_model=JobSubmitted,
    openapi_extra=_TRAIN_BODY,
    responses={503: {"description": "The broker is down: the job is recorded PENDING and queued when it is back."}},
)
async def train(request: Request, _: Authorized, state: State, jobs: Jobs) -> JobSubmitted:
    """Record a training job and queue it. The same ``Idempotency-Key`` (or ``job_id``) with the
    same config returns the same job; with another config, 409."""
    config, client_id = _parse_train_body(await request.body())
    key = _idempotency_key(request)
    try:
        config = await run_in_threadpool(confine_config_paths, config, state.data_roots)
    except DataPathError as exc:  # 403 forbidden, 422 missing/invalid (the error carries both)
        raise ApiError(exc.status, exc.code, str(exc), field=exc.field) from None
    warnings: list[str] = []
    if config.distill.feature_set is not None:
        store_path = state.settings.resolved_store_path.resolve()
        note = await run_in_threadpool(check_feature_set, store_path, config.distill.feature_set)
        if note is not None:
            log.warning("POST /train: %s", note)
            warnings.append(note)
    return await _record_and_queue(
        request, state, jobs, config.name, config.model_dump(mode="json"), JobKind.TRAIN, client_id, key, warnings
    )


async def _record_and_queue(
    request: Request,
    state: TrainerState,
    jobs: JobStore,
    name: str,
    config: dict[str, Any],
    kind: JobKind,
    client_id: str | None,
    key: str | None,
    warnings: list[str],
) -> JobSubmitted:
    """Record a job (idempotent per key / job id and config) and hand it to the broker: the one
    submission path of every job kind."""
    try:
        record, created = await run_in_threadpool(
            lambda: jobs.create(
                name,
                config,
                sha256_json(config),
                max_attempts=state.max_attempts,
                idempotency_key=key,
                job_id=client_id,
                submit_lease_s=SUBMIT_LEASE_S,
                kind=kind,
            )
        )
    except IdempotencyConflict as exc:
        raise ApiError(409, "conflict", f"{exc}; use a new Idempotency-Key or job_id", job_id=exc.job_id) from None
    # A job this request created is queued by this request (it holds the submit lease), so the
    # answer says QUEUED or later; a replayed PENDING one goes through the usual lease. When the
    # lease is held elsewhere (the re-submitter) the job may still be PENDING afterwards: with the
    # broker failing, that is a 503 too, never a 202 for a job nobody could queue.
    if record.state is JobState.PENDING:
        queued = await run_in_threadpool(state.submit, record.id, created)
        current = await run_in_threadpool(jobs.get, record.id) or record
        if not queued or (current.state is JobState.PENDING and state.broker_error is not None):
            raise _broker_unavailable(
                state,
                f"job {record.id} is",
                job_id=record.id,
                status_url=str(request.url_for("get_job", job_id=record.id)),
            )
    record = await run_in_threadpool(jobs.get, record.id) or record
    return JobSubmitted(**_job(record, request).model_dump(), created=created, warnings=warnings)


class FinetuneRequest(FinetuneConfig):
    """``POST /teacher/finetune``: a teacher fine-tuning config, and optionally the job's id."""

    job_id: str | None = Field(None, description="Client-chosen job id (letters, digits, '-', '_', '.').")


def _client_job_id(body: dict[str, Any]) -> str | None:
    """Pop and check the client's ``job_id`` of a submission body (422 naming it when invalid)."""
    client_id = body.pop("job_id", None)
    if client_id is not None:
        try:
            check_job_id(client_id)
        except ValueError as exc:
            raise _invalid_config(f"job_id: {exc}", [{"field": "job_id", "msg": str(exc)}]) from None
    return client_id


@jobs_router.post(
    "/teacher/finetune",
    status_code=202,
    response_model=JobSubmitted,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/FinetuneRequest"}}},
        }
    },
    responses={503: {"description": "The broker is down: the job is recorded PENDING and queued when it is back."}},
)
async def finetune_teacher(request: Request, _: Authorized, state: State, jobs: Jobs) -> JobSubmitted:
    """Record a teacher fine-tuning job (``lastkd finetune-teacher`` as a job: durable, resumable,
    cancellable, followed at ``/jobs/{id}/events``) and queue it; the worker publishes the teacher
    to ``<registry>/_teachers/<name>-<sha256[:12]>``."""
    body = _json_object(await request.body(), "FinetuneConfig")
    client_id = _client_job_id(body)
    key = _idempotency_key(request)
    try:
        config = FinetuneConfig.model_validate(body)
    except ValidationError as exc:
        found = problems(exc)
        raise _invalid_config(f"invalid fine-tuning config: {summary(found)}", [p.as_dict() for p in found]) from None
    try:
        config = await run_in_threadpool(config.confined, state.data_roots)
    except DataPathError as exc:
        raise ApiError(exc.status, exc.code, str(exc), field=exc.field) from None
    return await _record_and_queue(
        request, state, jobs, config.name, config.model_dump(mode="json"), JobKind.TEACHER_FINETUNE, client_id, key, []
    )


@jobs_router.get("/jobs", response_model=JobList)
async def list_jobs(
    request: Request,
    jobs: Jobs,
    state_: Annotated[str | None, Query(alias="state", description="Only jobs in this state.")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
) -> JobList:
    """Jobs, newest first."""
    wanted = None
    if state_ is not None:
        try:
            wanted = JobState(state_.upper())
        except ValueError:
            raise ApiError(
                422, "invalid_request", f"state: {state_!r} is not one of {', '.join(s.value for s in JobState)}"
            ) from None
    records = await run_in_threadpool(jobs.list, wanted, limit, offset)
    return JobList(jobs=[_job(r, request) for r in records], count=len(records))


@jobs_router.get("/jobs/{job_id}", name="get_job", response_model=Job)
async def get_job(job_id: str, request: Request, jobs: Jobs) -> Job:
    """One job: state, progress, metrics, history, result."""
    return _job(await run_in_threadpool(_get_job, jobs, job_id), request)


@jobs_router.post(
    "/jobs/{job_id}/cancel",
    response_model=Job,
    responses={202: {"model": Job, "description": "Cancel requested; the worker stops within one step."}},
)
async def cancel(job_id: str, request: Request, response: Response, _: Authorized, jobs: Jobs) -> Job:
    """Cancel a job: 200 once CANCELLED, 202 while its worker has yet to notice; 409 when finished."""
    record = await run_in_threadpool(_get_job, jobs, job_id)
    if record.state in (JobState.COMPLETED, JobState.FAILED):
        raise ApiError(409, "conflict", f"job {job_id} is already {record.state.value}", state=record.state.value)
    updated = await run_in_threadpool(jobs.request_cancel, job_id)
    assert updated is not None
    response.status_code = 200 if updated.terminal else 202
    return _job(updated, request)


@jobs_router.get(
    "/jobs/{job_id}/events",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "Server-sent events: `progress` on every change, then one `end`; each `data` is a JobEvent.",
            "content": {"text/event-stream": {"schema": {"$ref": "#/components/schemas/JobEvent"}}},
        }
    },
)
async def events(job_id: str, request: Request, jobs: Jobs) -> StreamingResponse:
    """Follow a job as server-sent events until it ends (comments keep the stream alive)."""
    await run_in_threadpool(_get_job, jobs, job_id)

    def look() -> tuple[Any, dict[str, Any], bool] | None:
        record = jobs.get(job_id)
        if record is None:
            return None
        stamp = (record.state, record.updated_at, record.progress and json.dumps(record.progress, sort_keys=True))
        event = JobEvent(
            job_id=record.id,
            state=record.state,
            progress=record.progress,
            attempts=record.attempts,
            error=record.error,
            result=record.result,
        )
        return stamp, event.model_dump(mode="json"), record.terminal

    return _event_stream(request, look)


def _event_stream(request: Request, look: Callable[[], tuple[Any, dict[str, Any], bool] | None]) -> StreamingResponse:
    """Server-sent events of one record: ``look()`` gives (stamp, data, terminal) or None when the
    record is gone; a ``progress`` event whenever the stamp changes, one ``end`` when terminal,
    comments to keep quiet streams open."""

    async def stream() -> AsyncIterator[str]:
        last = None
        quiet_since = time.monotonic()
        yield "retry: 2000\n\n"
        while True:
            if await request.is_disconnected():
                return
            seen = await run_in_threadpool(look)
            if seen is None:
                return
            stamp, data, terminal = seen
            if stamp != last:
                last = stamp
                quiet_since = time.monotonic()
                yield format_event("end" if terminal else "progress", to_jsonable(data))
                if terminal:
                    return
            elif time.monotonic() - quiet_since > SSE_KEEPALIVE_S:
                quiet_since = time.monotonic()
                yield format_comment()
            await asyncio.sleep(SSE_POLL_S)

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


# --------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------
checkpoints_router = APIRouter(tags=["checkpoints"])


def published(state: State) -> Registry:
    """The registry of published students."""
    return state.registry


Published = Annotated[Registry, Depends(published)]


@checkpoints_router.get("/checkpoints", response_model=CheckpointList)
async def checkpoints(request: Request, registry: Published) -> CheckpointList:
    """Every published student version."""
    items = await run_in_threadpool(registry.entries)
    entries = [
        CheckpointEntry(
            name=i.name,
            version=i.version,
            job_id=i.job_id,
            created=i.created,
            top1=i.top1,
            url=str(request.url_for("get_checkpoint", name=i.name, version=f"v{i.version}")),
        )
        for i in items
    ]
    return CheckpointList(checkpoints=entries, count=len(entries))


@checkpoints_router.get("/checkpoints/{name}/{version}", name="get_checkpoint", response_model=CheckpointDetail)
async def checkpoint(name: str, version: str, request: Request, registry: Published) -> CheckpointDetail:
    """One version: its config, lineage, final metrics and the files it holds."""
    folder = registry.path(name, version)  # NotFoundError -> 404
    number = int(folder.name[1:])

    def read() -> CheckpointDetail:
        def load(fname: str) -> Any:
            try:
                return json.loads((folder / fname).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                return None

        metrics_doc = load("metrics.json") or {}
        return CheckpointDetail(
            name=name,
            version=number,
            student=load("config.json"),
            lineage=load("lineage.json"),
            metrics=metrics_doc.get("final") if isinstance(metrics_doc, dict) else None,
            files=sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and not p.is_symlink()),
            files_url=str(request.url_for("checkpoint_file", name=name, version=f"v{number}", filename="")),
        )

    return await run_in_threadpool(read)


@checkpoints_router.get(
    "/checkpoints/{name}/{version}/files/{filename:path}",
    name="checkpoint_file",
    response_class=FileResponse,
    responses={200: {"content": {"application/octet-stream": {}}, "description": "The file's bytes."}},
)
async def checkpoint_file(name: str, version: str, filename: str, registry: Published) -> FileResponse:
    """Download one file of a published version (no path leaves the version's folder)."""
    folder = registry.path(name, version)
    return _file_in(folder, filename, f"{name} {folder.name}")


def _file_in(folder: Path, filename: str, label: str) -> FileResponse:
    """A regular file under ``folder`` named by a relative path from a URL; 404 for anything else
    (absolute, ``..``, NUL, a symlink, a folder), so no request reads outside ``folder``."""
    parts = Path(filename).parts
    refused = ApiError(404, "not_found", f"no file {filename!r} in {label}")
    if not filename or "\x00" in filename or Path(filename).is_absolute() or any(p in ("..", ".") for p in parts):
        raise refused
    target = folder / filename
    real = target.resolve()
    if target.is_symlink() or folder.resolve() not in real.parents or not real.is_file():
        raise refused
    return FileResponse(real, filename=real.name)


# --------------------------------------------------------------------------------------------
# experiments
# --------------------------------------------------------------------------------------------
experiments_router = APIRouter(tags=["experiments"])

_EXPERIMENT_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ExperimentConfig"}}},
    }
}


def experiment_store(state: State) -> ExperimentStore:
    """The experiments of the job database, or 503 before the lifespan opened it."""
    if state.experiments is None:
        raise ApiError(503, "unavailable", "starting up", headers={"Retry-After": str(RETRY_AFTER_S)})
    return state.experiments


Experiments = Annotated[ExperimentStore, Depends(experiment_store)]


def _live_state(record: ExperimentRecord, children: list[JobRecord]) -> JobState:
    if record.terminal:
        return record.state
    if any(c.state is JobState.RUNNING or c.terminal for c in children):
        return JobState.RUNNING
    return JobState.PENDING if all(c.state is JobState.PENDING for c in children) else JobState.QUEUED


def _experiment(store: ExperimentStore, record: ExperimentRecord, request: Request, *, report: bool) -> Experiment:
    children = store.child_jobs(record)
    config = record.config
    return Experiment(
        experiment_id=record.id,
        name=record.name,
        state=_live_state(record, children),
        arms=list(config["arms"]),
        seeds=list(config["seeds"]),
        baseline=config["baseline"],
        children=[
            ExperimentChild(
                arm=ref.arm,
                seed=ref.seed,
                job_id=ref.job_id,
                state=job.state,
                top1=(job.metrics or {}).get("top1") if job.state is JobState.COMPLETED else None,
            )
            for ref, job in zip(record.children, children, strict=True)
        ],
        done=sum(1 for c in children if c.terminal),
        error=record.error,
        cancel_requested=record.cancel_requested,
        created_at=record.created_at,
        updated_at=record.updated_at,
        finished_at=record.finished_at,
        report=store.report(record) if report else None,
        report_dir=record.report_dir,
        status_url=str(request.url_for("get_experiment", experiment_id=record.id)),
    )


def _get_experiment(store: ExperimentStore, experiment_id: str) -> ExperimentRecord:
    try:
        check_job_id(experiment_id)
    except ValueError:
        record = None
    else:
        record = store.settle(experiment_id)  # whoever looks moves it on
    if record is None:
        raise ApiError(404, "not_found", f"no experiment {experiment_id!r}")
    return record


@experiments_router.post(
    "/experiments",
    status_code=202,
    response_model=ExperimentSubmitted,
    openapi_extra=_EXPERIMENT_BODY,
    responses={
        503: {"description": "The broker is down: the children are recorded PENDING and queued when it is back."}
    },
)
async def submit_experiment(request: Request, _: Authorized, state: State, store: Experiments) -> ExperimentSubmitted:
    """Record an experiment (arms x seeds of one config) and queue its child jobs. The body is an
    experiment (``name``, ``base``, ``arms``, ``seeds``, ``baseline``) or a plain training config
    (then the default arms ``ce``, ``kd``, ``kd-shuffled``)."""
    body = _json_object(await request.body(), "ExperimentConfig")
    try:
        exp = ExperimentConfig.from_dict(body, source="body")
    except ConfigError as exc:
        lines = str(exc).splitlines()
        raise _invalid_config("; ".join(line.strip() for line in lines)) from None
    key = _idempotency_key(request)
    try:
        exp = await run_in_threadpool(exp.confined, state.data_roots)
    except DataPathError as exc:
        raise ApiError(exc.status, exc.code, str(exc), field=exc.field) from None
    warnings: list[str] = []
    if exp.base.distill.feature_set is not None:
        store_path = state.settings.resolved_store_path.resolve()
        note = await run_in_threadpool(check_feature_set, store_path, exp.base.distill.feature_set)
        if note is not None:
            warnings.append(note)
    try:
        record, created = await run_in_threadpool(
            lambda: store.create(exp, max_attempts=state.max_attempts, idempotency_key=key)
        )
    except IdempotencyConflict as exc:
        raise ApiError(409, "conflict", f"{exc}; use a new Idempotency-Key", experiment_id=exc.job_id) from None
    children = await run_in_threadpool(store.child_jobs, record)
    refused = False
    for job in children:
        if job.state is JobState.PENDING and not await run_in_threadpool(state.submit, job.id):
            refused = True
            break  # the broker is down: the re-submitter queues the rest
    if refused:
        raise _broker_unavailable(
            state,
            f"experiment {record.id} and its {len(children)} child jobs are",
            experiment_id=record.id,
            status_url=str(request.url_for("get_experiment", experiment_id=record.id)),
        )
    # read again: the answer shows the children as queued by this request
    answer = await run_in_threadpool(lambda: _experiment(store, record, request, report=False))
    return ExperimentSubmitted(**answer.model_dump(), created=created, warnings=warnings)


@experiments_router.get("/experiments", response_model=ExperimentList)
async def list_experiments(
    request: Request,
    store: Experiments,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
) -> ExperimentList:
    """Experiments, newest first (without their reports)."""

    def read() -> list[Experiment]:
        return [_experiment(store, r, request, report=False) for r in store.list(limit, offset)]

    found = await run_in_threadpool(read)
    return ExperimentList(experiments=found, count=len(found))


@experiments_router.get("/experiments/{experiment_id}", name="get_experiment", response_model=Experiment)
async def get_experiment(experiment_id: str, request: Request, store: Experiments) -> Experiment:
    """One experiment: its children's states and, once COMPLETED, the paired report."""

    def read() -> Experiment:
        return _experiment(store, _get_experiment(store, experiment_id), request, report=True)

    return await run_in_threadpool(read)


@experiments_router.post(
    "/experiments/{experiment_id}/cancel",
    response_model=Experiment,
    responses={202: {"model": Experiment, "description": "Cancel requested; running children stop within a step."}},
)
async def cancel_experiment(
    experiment_id: str, request: Request, response: Response, _: Authorized, store: Experiments
) -> Experiment:
    """Cancel the experiment and every unfinished child: 200 once CANCELLED, 202 while children
    still have to stop; 409 when it already finished."""

    def cancel() -> Experiment:
        record = _get_experiment(store, experiment_id)
        if record.state in (JobState.COMPLETED, JobState.FAILED):
            raise ApiError(
                409, "conflict", f"experiment {experiment_id} is already {record.state.value}", state=record.state.value
            )
        updated = store.request_cancel(experiment_id)
        assert updated is not None
        response.status_code = 200 if updated.terminal else 202
        return _experiment(store, updated, request, report=False)

    return await run_in_threadpool(cancel)


@experiments_router.get(
    "/experiments/{experiment_id}/events",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "Server-sent events: `progress` when a child changes state, then one `end`; "
            "each `data` is an Experiment (without its report).",
            "content": {"text/event-stream": {"schema": {"$ref": "#/components/schemas/Experiment"}}},
        }
    },
)
async def experiment_events(experiment_id: str, request: Request, store: Experiments) -> StreamingResponse:
    """Follow an experiment as server-sent events until it ends."""
    await run_in_threadpool(_get_experiment, store, experiment_id)

    def look() -> tuple[Any, dict[str, Any], bool] | None:
        record = store.settle(experiment_id)
        if record is None:
            return None
        answer = _experiment(store, record, request, report=False)
        stamp = (answer.state, tuple(c.state for c in answer.children), answer.updated_at)
        return stamp, answer.model_dump(mode="json"), record.terminal

    return _event_stream(request, look)


@experiments_router.get(
    "/experiments/{experiment_id}/files/{filename:path}",
    name="experiment_file",
    response_class=FileResponse,
    responses={200: {"content": {"application/octet-stream": {}}, "description": "A report file's bytes."}},
)
async def experiment_file(experiment_id: str, filename: str, store: Experiments) -> FileResponse:
    """A file of a COMPLETED experiment's report (report.json, report.md, plots/*.png)."""
    record = await run_in_threadpool(_get_experiment, store, experiment_id)
    if record.report_dir is None:
        raise ApiError(404, "not_found", f"experiment {experiment_id} has no report yet ({record.state.value})")
    return _file_in(Path(record.report_dir), filename, f"the report of experiment {experiment_id}")
