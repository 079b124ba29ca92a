"""Fixtures for every tier, and the tier markers.

Tiers are folders: ``tests/unit`` (no processes, seconds), ``tests/integration`` (in-process apps,
real LMDB / SQLite / PyAV), ``tests/e2e`` (uvicorn, Celery, Redis, the CLI as processes). Each
test gets the marker of its folder, so ``pytest -m "not e2e"`` is the fast loop. Tests run on two
pytest-xdist workers (``addopts``); ``-n 0`` runs them in this process. Helpers live in
``tests/support``; only fixtures live in conftest files.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from lastkd.featurestore import FeatureSetMeta, FeatureStore
from tests.support.paths import SHARED
from tests.support.store import PREPROCESSING, WEIGHTS

TIERS = ("unit", "integration", "e2e")

# Bad-input and fault tests are found by `pytest -m faults`: marked explicitly, or named with the
# words such tests use (a test of a refusal says so in its name). docs/reliability.md lists them.
FAULT_WORDS = re.compile(
    r"reject|refus|corrupt(?!ion)|truncat|malformed|hostile|garbage|invalid|bad_|_bad|kill|crash|"
    r"disconnect|traversal|escape|outside|symlink|too_large|oversize|huge|nan_|not_finite|"
    r"wrong|unknown|conflict|fifo|orphan|left_behind|survive|partial"
)


def pytest_configure(config: pytest.Config) -> None:
    if not SHARED.is_dir():
        raise pytest.UsageError(f"reference material not found at {SHARED} (expected ../shared next to the project)")


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    tests_dir = Path(__file__).parent
    for item in items:
        parts = Path(item.fspath).resolve().relative_to(tests_dir).parts
        if parts and parts[0] in TIERS:
            item.add_marker(getattr(pytest.mark, parts[0]))
        # pytest-xdist groups: one worker runs the whole e2e tier in order (its stacks, Redis
        # databases and process-tree checks assume no other e2e test beside them); elsewhere a
        # module stays on one worker, so its module fixtures (tiny training runs) are built once.
        group = "e2e" if parts and parts[0] == "e2e" else "/".join(parts)
        item.add_marker(pytest.mark.xdist_group(group))
        if FAULT_WORDS.search(item.originalname if isinstance(item, pytest.Function) else item.name):
            item.add_marker(pytest.mark.faults)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return SHARED


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
