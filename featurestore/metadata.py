"""Feature-set identity and metadata.

A feature set is one teacher + one set of weights + one preprocessing. Its id is derived from
exactly those, so features computed under different teachers or settings can never mix:
``<teacher>-<weights sha256[:12] | random-init>-<sha256(canonical preprocessing JSON)[:12]>``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from lastkd.featurestore.errors import CorruptStoreError, InvalidFeatureError
from lastkd.featurestore.validation import (
    DTYPES,
    check_dtype,
    check_json_value,
    check_teacher,
    check_weights_sha256,
)

HASH_CHARS = 12


def canonical_json(value: Any) -> str:
    """The one JSON spelling of ``value``: sorted keys, no spaces, ASCII, no NaN."""
    check_json_value(value)
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def preprocessing_hash(preprocessing: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of the preprocessing settings (full hex digest)."""
    if not isinstance(preprocessing, dict):
        raise InvalidFeatureError(f"preprocessing must be a dict, got {type(preprocessing).__name__}")
    return hashlib.sha256(canonical_json(preprocessing).encode("ascii")).hexdigest()


def feature_set_id(teacher: str, weights_sha256: str | None, preprocessing: dict[str, Any]) -> str:
    """Deterministic feature-set id, e.g. ``videomae_v2_vit_b-random-init-3f2a9c1b7d0e``.

    ``weights_sha256`` is the hex digest of the loaded weights, or None / "random-init" for a
    randomly initialised teacher (which is then labelled as such in the id).
    """
    teacher = check_teacher(teacher)
    weights = check_weights_sha256(weights_sha256)
    weights_part = weights if weights == "random-init" else weights[:HASH_CHARS]
    return f"{teacher}-{weights_part}-{preprocessing_hash(preprocessing)[:HASH_CHARS]}"


@dataclass(frozen=True)
class FeatureSetMeta:
    """What a feature set records about itself. ``count`` is live (read with the metadata)."""

    set_id: str
    teacher: str
    weights_sha256: str  # full hex digest, or "random-init"
    preprocessing: dict[str, Any]
    dim: int
    dtype: str  # "float16" | "float32"
    created_at: str  # ISO-8601, UTC
    count: int = 0
    format_version: int = 1

    @property
    def np_dtype(self) -> np.dtype:
        """The little-endian numpy dtype vectors are stored in."""
        return DTYPES[self.dtype]

    @property
    def row_bytes(self) -> int:
        """Size in bytes of one stored vector."""
        return self.dim * self.np_dtype.itemsize

    @property
    def random_init(self) -> bool:
        """True when the teacher ran without trained weights."""
        return self.weights_sha256 == "random-init"

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (for APIs, the CLI and snapshot manifests)."""
        return asdict(self)

    def identity(self) -> tuple[str, str, str, int, str]:
        """The fields that must agree for two create_set calls to name the same set."""
        return (self.teacher, self.weights_sha256, canonical_json(self.preprocessing), self.dim, self.dtype)

    def stored_bytes(self) -> bytes:
        """The record kept in the store (count lives in its own table)."""
        record = self.to_dict()
        record.pop("count")
        return canonical_json(record).encode("ascii")

    @classmethod
    def from_stored(cls, raw: bytes | memoryview, count: int) -> FeatureSetMeta:
        """Parse a stored record; a malformed one is reported as corruption."""
        try:
            record = json.loads(bytes(raw))
            meta = cls(count=count, **record)
            check_dtype(meta.dtype)
        except (ValueError, TypeError) as exc:
            raise CorruptStoreError(f"feature-set metadata is unreadable: {exc}") from None
        return meta
