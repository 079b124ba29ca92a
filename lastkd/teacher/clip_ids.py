"""Clip ids: how a clip is named inside a feature set, and which names are refused.

A clip id is the NTU sample name (``S001C001P001R001A001``) when the file name carries one, so
the trainer finds teacher features under the same key as its skeletons, otherwise the content
sha256. Ids given by clients are checked against a strict whitelist: they become LMDB keys and
appear in reports, so path separators, control characters and overlong names are refused.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath, PureWindowsPath

__all__ = [
    "MAX_CLIP_ID_LENGTH",
    "VIDEO_EXTENSIONS",
    "InvalidClipIdError",
    "clip_id_from_filename",
    "is_video_filename",
    "validate_clip_id",
]

MAX_CLIP_ID_LENGTH = 128

# File extensions the bulk walker picks up inside folders (files named explicitly are always tried).
VIDEO_EXTENSIONS = frozenset(
    {".avi", ".mp4", ".m4v", ".mkv", ".webm", ".mov", ".mpg", ".mpeg", ".wmv", ".flv", ".ts", ".3gp", ".ogv"}
)

# NTU RGB+D 60/120 sample names: setup, camera, performer, replication, action; the RGB videos
# are named "<sample>_rgb.avi".
_NTU_FILENAME = re.compile(r"^(S\d{3}C\d{3}P\d{3}R\d{3}A\d{3})(?:_rgb)?\.[A-Za-z0-9]{1,8}$")
_ALLOWED = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class InvalidClipIdError(ValueError):
    """A clip id that cannot be used as a key (the message says why)."""


def _basename(filename: str) -> str:
    # Clients may send "C:\\videos\\x.avi" or "../x.avi" as the upload file name: keep the last part.
    return PureWindowsPath(PurePosixPath(filename).name).name


def clip_id_from_filename(filename: str) -> str | None:
    """The NTU sample name carried by ``filename`` (``S001C001P001R001A001_rgb.avi``), else None."""
    match = _NTU_FILENAME.match(_basename(filename))
    return match.group(1) if match else None


def is_video_filename(filename: str) -> bool:
    """True when the extension is one of :data:`VIDEO_EXTENSIONS` (case-insensitive)."""
    return PurePosixPath(filename).suffix.lower() in VIDEO_EXTENSIONS


def validate_clip_id(clip_id: str) -> str:
    """Return ``clip_id`` unchanged if it is safe to use as a key, else raise InvalidClipIdError.

    Allowed: 1 to 128 characters from ``A-Z a-z 0-9 . _ -``, starting with a letter or digit
    (so ``.``/``..`` and hidden names are impossible).
    """
    if not isinstance(clip_id, str):
        raise InvalidClipIdError(f"clip id must be a string, got {type(clip_id).__name__}")
    if not clip_id:
        raise InvalidClipIdError("clip id is empty")
    if len(clip_id) > MAX_CLIP_ID_LENGTH:
        raise InvalidClipIdError(f"clip id is {len(clip_id)} characters long; the limit is {MAX_CLIP_ID_LENGTH}")
    if any(ch in clip_id for ch in "/\\"):
        raise InvalidClipIdError(f"clip id {clip_id[:40]!r} contains a path separator")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in clip_id):
        raise InvalidClipIdError(f"clip id {clip_id[:40]!r} contains a control character")
    if not _ALLOWED.match(clip_id):
        raise InvalidClipIdError(
            f"clip id {clip_id[:40]!r} must start with a letter or digit and use only letters, digits, '.', '_' or '-'"
        )
    return clip_id
