"""The exceptions of the feature store: one base class, one subclass per way things go wrong.

Every error raised by :mod:`featurestore` is a :class:`FeatureStoreError`, so callers at the
edge (HTTP handlers, the CLI) can turn all of them into a clean message with one ``except``.
"""

from __future__ import annotations


class FeatureStoreError(Exception):
    """Base class of every error the feature store raises."""


class NotAStoreError(FeatureStoreError):
    """The path is not a lastkd feature store (a plain file, a foreign LMDB, garbage, missing)."""


class StoreFullError(FeatureStoreError):
    """The LMDB map is full; the batch that did not fit was not written."""


class InvalidFeatureError(FeatureStoreError, ValueError):
    """Bad input: malformed vectors, clip ids, sha256 digests or feature-set metadata."""


class UnknownFeatureSetError(FeatureStoreError, LookupError):
    """The feature-set id names no set in this store."""

    def __str__(self) -> str:  # LookupError would quote the message like a dict key
        return str(self.args[0]) if self.args else "unknown feature set"


class FeatureSetConflictError(FeatureStoreError):
    """A feature set with this id exists already with different metadata."""


class ReadOnlyStoreError(FeatureStoreError):
    """A write was attempted through a store opened with ``readonly=True``."""


class CorruptStoreError(FeatureStoreError):
    """Stored bytes do not have the shape their metadata promises."""


class SnapshotError(FeatureStoreError):
    """A snapshot is missing, malformed, or fails verification (tampering, truncation)."""
