"""Shapes shared by both services."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["ErrorDetail", "ErrorResponse", "ERROR_RESPONSES", "Health"]


class ErrorDetail(BaseModel):
    """An error: a stable machine-readable code, a message for people, and optional extras
    (``details`` lists one problem per invalid field; others name a job id, a field...)."""

    model_config = ConfigDict(extra="allow")

    code: str = Field(description="Stable machine-readable code, e.g. invalid_request, not_found, clip_id_conflict.")
    message: str = Field(description="What went wrong, for people.")


class ErrorResponse(BaseModel):
    """Every 4xx and 5xx answer of both services."""

    error: ErrorDetail


class Health(BaseModel):
    """``GET /health/live``."""

    status: str


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    "4XX": {"model": ErrorResponse, "description": "The request was refused; the error says why."},
    "5XX": {"model": ErrorResponse, "description": "The service could not answer (down, full, starting)."},
}
"""``responses=`` for routes and routers: documents the error shape in ``/openapi.json``."""
