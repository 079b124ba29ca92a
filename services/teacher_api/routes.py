"""The teacher's HTTP routes, one router per resource: health, features (read) and embed (write).

Routes reach the running service through dependencies on :class:`TeacherState` (kept on
``app.state.teacher`` by :func:`lastkd.services.teacher_api.app.create_app`), so each route says
what it needs: a ready embedder, the store, the settings.
"""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from lastkd.schemas.teacher import (
    ClipError,
    ClipResult,
    EmbedError,
    EmbedResponse,
    FeatureResponse,
    FeatureSetInfo,
    FeatureSetsResponse,
    TeacherReady,
)
from lastkd.services.http import ApiError, Authorized
from lastkd.services.settings import Settings
from lastkd.services.teacher_api.uploads import FILE_FIELD, ID_FIELD, ReceivedForm, receive_multipart
from lastkd.teacher.clip_ids import InvalidClipIdError, clip_id_from_filename, validate_clip_id
from lastkd.teacher.failures import SERVER_REASONS, ClipFailure, ClipFailureReason

if TYPE_CHECKING:  # torch loads in the app's lifespan, not on import
    from lastkd.featurestore import FeatureStore
    from lastkd.teacher.embedder import Embedder

log = logging.getLogger(__name__)

__all__ = ["TeacherState", "embed_router", "features_router", "health_router"]

RETRY_AFTER_STARTING = {"Retry-After": "5"}


@dataclass
class TeacherState:
    """What the routes share: the settings, the store and the embedder once they are up."""

    settings: Settings
    upload_dir: Path
    store: FeatureStore | None = None
    embedder: Embedder | None = None
    failed: str | None = None  # why start-up failed (the process is about to exit)

    @property
    def ready(self) -> bool:
        """True once the model is loaded, warmed up and its threads are alive."""
        return self.embedder is not None and self.embedder.ready and self.embedder.alive


def teacher_state(request: Request) -> TeacherState:
    """The service's :class:`TeacherState`."""
    state: TeacherState = request.app.state.teacher
    return state


State = Annotated[TeacherState, Depends(teacher_state)]


def ready_embedder(state: State) -> Embedder:
    """The embedder, or 503 ``not_ready`` while the teacher is still starting."""
    if state.embedder is None or not state.ready:
        raise ApiError(503, "not_ready", "the teacher is still starting", headers=RETRY_AFTER_STARTING)
    return state.embedder


def open_store(state: State) -> FeatureStore:
    """The feature store, or 503 ``not_ready`` before the lifespan opened it."""
    if state.store is None:
        raise ApiError(503, "not_ready", "the teacher is still starting", headers=RETRY_AFTER_STARTING)
    return state.store


if TYPE_CHECKING:
    ReadyEmbedder = Annotated[Embedder, Depends(ready_embedder)]
    Store = Annotated[FeatureStore, Depends(open_store)]
else:  # FastAPI evaluates these at import, before torch is loaded: the dependency is what counts
    ReadyEmbedder = Annotated[Any, Depends(ready_embedder)]
    Store = Annotated[Any, Depends(open_store)]

# --------------------------------------------------------------------------------------------
# health
# --------------------------------------------------------------------------------------------
health_router = APIRouter(tags=["health"])


@health_router.get(
    "/health/ready",
    response_model=TeacherReady,
    response_model_exclude_none=True,
    responses={503: {"model": TeacherReady, "description": "Starting (warming up) or failed."}},
)
async def ready(state: State) -> Any:
    """Ready once the model is loaded and one forward pass has run."""
    embedder = state.embedder
    if state.failed:
        return _json(TeacherReady(status="failed", reason=state.failed), 503)
    if not state.ready or embedder is None:
        return _json(TeacherReady(status="starting"), 503, RETRY_AFTER_STARTING)
    return TeacherReady(
        status="ready",
        model=state.settings.teacher_model,
        random_init=state.settings.teacher_random_init,
        device=str(embedder.device),
        feature_set=embedder.set_id,
        dim=embedder.dim,
        sampling=embedder.preprocess.sampling,
        protocol=embedder.preprocess.protocol,
        decode_workers=embedder.decode_workers,
        queue_depth=embedder.pending,
    )


# --------------------------------------------------------------------------------------------
# features (read)
# --------------------------------------------------------------------------------------------
features_router = APIRouter(tags=["features"])


@features_router.get("/feature-sets", response_model=FeatureSetsResponse)
async def feature_sets(state: State, store: Store) -> FeatureSetsResponse:
    """Every feature set in the store, and the one this teacher writes (``active``)."""
    sets = [FeatureSetInfo(**meta.to_dict()) for meta in store.list_sets()]
    return FeatureSetsResponse(active=state.embedder.set_id if state.embedder else None, feature_sets=sets)


@features_router.get(
    "/features/{set_id}/{clip_id}",
    response_model=FeatureResponse,
    responses={200: {"content": {"application/octet-stream": {}}, "description": "The vector (JSON or raw float32)."}},
)
async def feature(set_id: str, clip_id: str, request: Request, response: Response, store: Store) -> Any:
    """One stored vector: JSON, or raw little-endian float32 with ``Accept: application/octet-stream``."""
    from lastkd.featurestore import FeatureStoreError, InvalidFeatureError, UnknownFeatureSetError

    try:
        validate_clip_id(clip_id)
    except InvalidClipIdError as exc:
        raise ApiError(400, "invalid_clip_id", str(exc)) from None
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
    response.headers.update(headers)
    return FeatureResponse(
        feature_set=set_id,
        clip_id=clip_id,
        dim=meta.dim,
        dtype=meta.dtype,
        frames_used=(info or {}).get("frames_used"),
        vector=vector.tolist(),
    )


# --------------------------------------------------------------------------------------------
# embed (write)
# --------------------------------------------------------------------------------------------
embed_router = APIRouter(tags=["embed"])

_MULTIPART_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": [FILE_FIELD],
                    "properties": {
                        FILE_FIELD: {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "description": "One part per clip (any container FFmpeg reads).",
                        },
                        ID_FIELD: {
                            "type": "array",
                            "items": {"type": "string"},
                            "description": "Optional: one clip id per file, in order (default: the NTU name "
                            "in the file name, else the sha256 of the bytes).",
                        },
                    },
                }
            }
        },
    }
}


@embed_router.post(
    "/embed",
    response_model=EmbedResponse,
    response_model_exclude_unset=True,
    openapi_extra=_MULTIPART_BODY,
    responses={
        422: {"model": EmbedResponse, "description": "Every clip failed because of its input."},
        503: {"description": "Not ready, or the queue cannot take the clips now (Retry-After)."},
    },
)
async def embed(request: Request, _: Authorized, state: State, embedder: ReadyEmbedder) -> Any:
    """Embed the uploaded clips into the active feature set; one result per clip, in order.

    The body is streamed to disk under the size and count limits (nothing is kept on refusal).
    """
    settings = state.settings
    queue_size = settings.teacher_queue_size
    if embedder.pending >= queue_size:
        raise _queue_full(embedder, queue_size)  # refused before reading a byte of the body
    form = await receive_multipart(
        request,
        state.upload_dir,
        max_bytes=settings.max_upload_bytes,
        max_files=min(settings.max_clips_per_request, queue_size),
    )
    try:
        body = await _embed_form(embedder, form, queue_size)
    finally:
        form.cleanup()
    if body.error is None:
        return body
    codes = [r.error.code for r in body.results if r.error is not None]
    server = [SERVER_REASONS[c] for c in codes if c in SERVER_REASONS]
    return _json(body, max(server) if len(server) == len(codes) else 422)


def _queue_full(embedder: Embedder, queue_size: int) -> ApiError:
    # Time for the queue ahead to drain at the recent rate, at least a second, at most a minute.
    wait = min(60, max(1, math.ceil(embedder.pending * embedder.seconds_per_clip())))
    return ApiError(
        503,
        "queue_full",
        f"the teacher queue is full ({embedder.pending} of {queue_size} clips); retry later",
        headers={"Retry-After": str(wait)},
    )


async def _embed_form(embedder: Embedder, form: ReceivedForm, queue_size: int) -> EmbedResponse:
    files = form.files
    if not files:
        raise ApiError(400, "no_files", f"send one or more clips as multipart '{FILE_FIELD}' parts")
    ids = form.fields.get(ID_FIELD, [])
    if ids and len(ids) != len(files):
        raise ApiError(
            400,
            "clip_ids_mismatch",
            f"{len(ids)} clip_ids for {len(files)} files: give one id per file, in order, or none",
        )
    results: list[ClipResult | None] = [None] * len(files)
    work = []
    for i, upload in enumerate(files):
        if ids:
            try:
                clip_id = validate_clip_id(ids[i])
            except InvalidClipIdError as exc:
                error = ClipError(code=ClipFailureReason.INVALID_CLIP_ID, message=str(exc))
                results[i] = ClipResult(filename=upload.filename, clip_id=None, sha256=upload.sha256, error=error)
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
            results[i] = ClipResult(**base, error=_clip_error(outcome))
        else:
            results[i] = ClipResult(
                **base,
                feature_set=outcome.feature_set,
                dim=outcome.dim,
                cached=outcome.cached,
                frames_used=outcome.frames_used,
            )

    done = [r for r in results if r is not None]
    failed = [r.error for r in done if r.error is not None]
    body = EmbedResponse(
        feature_set=embedder.set_id, embedded=len(done) - len(failed), failed=len(failed), results=done
    )
    if failed and len(failed) == len(done):
        first = failed[0]
        noun = "the clip" if len(done) == 1 else f"all {len(done)} clips"
        body.error = EmbedError(
            code="all_clips_failed" if len(done) > 1 else first.code.value,
            message=f"{noun} failed; first: {first.code.value}: {first.message}",
        )
    return body


def _clip_error(exc: BaseException) -> ClipError:
    from lastkd.featurestore import StoreFullError

    if isinstance(exc, ClipFailure):
        return ClipError(code=exc.reason, message=exc.message)
    if isinstance(exc, StoreFullError):
        return ClipError(code=ClipFailureReason.STORE_FULL, message=str(exc))
    log.error("embedding failed: %r", exc)
    return ClipError(code=ClipFailureReason.INTERNAL_ERROR, message=f"{type(exc).__name__}: {exc}")


def _json(model: TeacherReady | EmbedResponse, status: int, headers: dict[str, str] | None = None) -> JSONResponse:
    # For answers whose status is not the route's default: the fields the route set, as it serializes them.
    content = model.model_dump(mode="json", exclude_unset=True)
    return JSONResponse(content, status_code=status, headers=headers)
