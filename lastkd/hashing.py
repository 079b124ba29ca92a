"""Content hashes: one way to hash a file and one canonical digest of JSON-able data.

Torch-free on purpose: the teacher's decoder processes hash uploads and never import torch.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
from typing import Any

__all__ = ["sha256_file", "sha256_json", "canonical_json", "file_kind"]

_KINDS = (
    (stat.S_ISDIR, "directory"),
    (stat.S_ISFIFO, "named pipe (fifo)"),
    (stat.S_ISSOCK, "socket"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
)


def file_kind(mode: int) -> str:
    """What an ``st_mode`` describes, in words: ``"regular file"``, ``"named pipe (fifo)"``, ...

    Only regular files are ever read as content: opening a fifo blocks until a writer appears,
    and a device may never end.
    """
    if stat.S_ISREG(mode):
        return "regular file"
    return next((kind for test, kind in _KINDS if test(mode)), "special file")


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a regular file's bytes (``hashlib.file_digest``: chunked, no Python loop).

    Raises ``OSError(EINVAL)`` naming the kind for anything else (fifo, socket, device, folder).
    """
    # O_NONBLOCK: a fifo put in place of a file must not block the open; fstat then refuses it.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as fh:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise OSError(errno.EINVAL, f"not a regular file: a {file_kind(mode)}", os.fspath(path))
        return hashlib.file_digest(fh, "sha256").hexdigest()


def canonical_json(obj: Any) -> str:
    """Compact JSON with sorted keys: equal data gives equal text, whatever the insertion order."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def sha256_json(obj: Any) -> str:
    """Hex sha256 of :func:`canonical_json` of ``obj`` (config and preprocessing identities)."""
    return hashlib.sha256(canonical_json(obj).encode("utf-8")).hexdigest()
