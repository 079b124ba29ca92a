"""Fixtures of the feature-store tests: real LMDB stores in temporary directories."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from lastkd.featurestore import FeatureSetMeta, FeatureStore

PREPROCESSING = {"num_frames": 16, "short_side": 224, "crop": 224, "mean": [0.485, 0.456, 0.406]}
WEIGHTS = "a3" * 32


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    return tmp_path / "features.lmdb"


@pytest.fixture
def store(store_path: Path) -> Iterator[FeatureStore]:
    st = FeatureStore(store_path, map_size=64 << 20)
    yield st
    st.close()


@pytest.fixture
def fset(store: FeatureStore) -> FeatureSetMeta:
    """A float32 set of dim 16."""
    return store.create_set("videomae_v2_vit_b", WEIGHTS, PREPROCESSING, dim=16, dtype="float32")
