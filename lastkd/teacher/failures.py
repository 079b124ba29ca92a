"""Why a clip could not be embedded: one enum of reasons, and the exception that carries one.

Torch-free on purpose: the HTTP schemas, the API and the client name these reasons without
loading the model.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["SERVER_REASONS", "ClipFailure", "ClipFailureReason", "clip_id_conflict"]


class ClipFailureReason(StrEnum):
    """Stable machine-readable codes of a clip's failure (the ``error.code`` of a clip result)."""

    # the file cannot become a clip (lastkd.teacher.video.VideoError)
    NOT_MEDIA = "not_media"
    CORRUPT = "corrupt"
    NO_VIDEO_STREAM = "no_video_stream"
    NO_FRAMES = "no_frames"
    TOO_SHORT = "too_short"
    TOO_LARGE = "too_large"
    TOO_LONG = "too_long"
    RESOLUTION = "resolution"
    # the decoder
    DECODE_FAILED = "decode_failed"
    DECODE_CRASHED = "decode_crashed"
    # the person crop: the clip's .skeleton file is missing, unreadable or has no body
    NO_SKELETON = "no_skeleton"
    # the request
    INVALID_CLIP_ID = "invalid_clip_id"
    CLIP_ID_CONFLICT = "clip_id_conflict"
    # the server
    SHUTDOWN = "shutdown"
    STORE_FULL = "store_full"
    INTERNAL_ERROR = "internal_error"


SERVER_REASONS: dict[ClipFailureReason, int] = {
    ClipFailureReason.SHUTDOWN: 503,
    ClipFailureReason.STORE_FULL: 507,
    ClipFailureReason.INTERNAL_ERROR: 500,
}
"""Reasons caused by the server rather than by the clip, with the HTTP status they stand for."""


class ClipFailure(Exception):
    """One clip could not be embedded; ``reason`` says why in a stable code."""

    def __init__(self, reason: ClipFailureReason | str, message: str) -> None:
        reason = ClipFailureReason(reason)  # an unknown code is a bug here, not a new reason
        super().__init__(reason, message)
        self.reason = reason
        self.message = message

    def __str__(self) -> str:
        return f"{self.reason.value}: {self.message}"


def clip_id_conflict(clip_id: str) -> ClipFailure:
    """The failure of a clip whose id already names a feature of other bytes in the set."""
    return ClipFailure(
        ClipFailureReason.CLIP_ID_CONFLICT,
        f"clip id {clip_id!r} already holds a feature computed from different bytes in this feature set; "
        "give this clip another id",
    )
