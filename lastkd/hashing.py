"""Content hashes: one way to hash a file and one canonical digest of JSON-able data.

Torch-free on purpose: the teacher's decoder processes hash uploads and never import torch.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

__all__ = ["sha256_file", "sha256_json", "canonical_json"]


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes (``hashlib.file_digest``: chunked, no Python loop)."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def canonical_json(obj: Any) -> str:
    """Compact JSON with sorted keys: equal data gives equal text, whatever the insertion order."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def sha256_json(obj: Any) -> str:
    """Hex sha256 of :func:`canonical_json` of ``obj`` (config and preprocessing identities)."""
    return hashlib.sha256(canonical_json(obj).encode("utf-8")).hexdigest()
