"""lastkd feature store: teacher features in LMDB, shared by one writer and many readers.

Knows nothing of models or services. See ``docs/architecture.md`` for the contract::

    from lastkd.featurestore import FeatureStore, FeatureSetMeta, feature_set_id
    from lastkd.featurestore import FeatureStoreError, StoreFullError, InvalidFeatureError
"""

from lastkd.featurestore.errors import (
    CorruptStoreError,
    FeatureSetConflictError,
    FeatureStoreError,
    InvalidFeatureError,
    NotAStoreError,
    ReadOnlyStoreError,
    SnapshotError,
    StoreFullError,
    UnknownFeatureSetError,
)
from lastkd.featurestore.metadata import FeatureSetMeta, canonical_json, feature_set_id
from lastkd.featurestore.snapshot import SnapshotReport, verify_snapshot
from lastkd.featurestore.store import FeatureStore

__all__ = [
    "CorruptStoreError",
    "FeatureSetConflictError",
    "FeatureSetMeta",
    "FeatureStore",
    "FeatureStoreError",
    "InvalidFeatureError",
    "NotAStoreError",
    "ReadOnlyStoreError",
    "SnapshotError",
    "SnapshotReport",
    "StoreFullError",
    "UnknownFeatureSetError",
    "canonical_json",
    "feature_set_id",
    "verify_snapshot",
]
