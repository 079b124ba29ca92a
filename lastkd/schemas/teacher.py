"""The teacher service's contract: ``POST /embed``, features, feature sets, readiness."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from lastkd.teacher.failures import ClipFailureReason

__all__ = [
    "ClipError",
    "ClipResult",
    "EmbedResponse",
    "FeatureResponse",
    "FeatureSetInfo",
    "FeatureSetsResponse",
    "TeacherReady",
]


class ClipError(BaseModel):
    """Why one clip of a request was not embedded."""

    code: ClipFailureReason
    message: str


class ClipResult(BaseModel):
    """One clip of ``POST /embed``, in request order: embedded (``feature_set``, ``dim``,
    ``cached``, ``frames_used``) or failed (``error``). Fields that do not apply are left out."""

    filename: str | None = Field(description="The multipart part's file name, as sent.")
    clip_id: str | None = Field(description="The id the feature is stored under (None: the id given was invalid).")
    sha256: str = Field(description="SHA-256 of the bytes received.")
    feature_set: str | None = None
    dim: int | None = None
    cached: bool | None = Field(None, description="True: these bytes were embedded before; no forward pass ran.")
    frames_used: int | None = Field(None, description="Frames the clip had for sampling (after the trim).")
    error: ClipError | None = None

    @property
    def ok(self) -> bool:
        """True when the clip was embedded."""
        return self.error is None


class EmbedError(BaseModel):
    """Top-level error of an ``/embed`` answer in which every clip failed."""

    code: str
    message: str


class EmbedResponse(BaseModel):
    """``POST /embed``: 200 when at least one clip was embedded; 422 (or the server's 5xx) with the
    same body plus ``error`` when every clip failed."""

    feature_set: str
    embedded: int
    failed: int
    results: list[ClipResult]
    error: EmbedError | None = None


class FeatureResponse(BaseModel):
    """``GET /features/{set_id}/{clip_id}`` as JSON (``Accept: application/octet-stream`` gives
    the raw little-endian float32 bytes instead)."""

    feature_set: str
    clip_id: str
    dim: int
    dtype: str
    frames_used: int | None
    vector: list[float]


class FeatureSetInfo(BaseModel):
    """What a feature set records about itself (lastkd.featurestore.FeatureSetMeta)."""

    model_config = ConfigDict(extra="allow")

    set_id: str
    teacher: str
    weights_sha256: str = Field(description="Full hex digest of the weights, or 'random-init'.")
    preprocessing: dict[str, Any]
    dim: int
    dtype: str
    created_at: str
    count: int
    format_version: int


class FeatureSetsResponse(BaseModel):
    """``GET /feature-sets``: every set in the store and the one this teacher writes."""

    active: str | None
    feature_sets: list[FeatureSetInfo]


class TeacherReady(BaseModel):
    """``GET /health/ready``: 200 ``ready`` with what is served; 503 ``starting`` (warming up) or
    ``failed`` (with ``reason``; the process is about to exit)."""

    status: Literal["ready", "starting", "failed"]
    reason: str | None = None
    model: str | None = None
    random_init: bool | None = None
    device: str | None = None
    feature_set: str | None = None
    dim: int | None = None
    sampling: str | None = None
    protocol: str | None = None
    decode_workers: int | None = None
    queue_depth: int | None = None
