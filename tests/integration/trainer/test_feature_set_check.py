"""The job API's up-front check of ``distill.feature_set`` against a real LMDB feature store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lastkd.featurestore import FeatureStore
from lastkd.services.http import ApiError
from lastkd.services.trainer.routes import check_feature_set

pytestmark = pytest.mark.faults


def _store(path: Path, sets: int) -> list[str]:
    ids = []
    with FeatureStore(path, map_size=32 << 20) as store:
        for i in range(sets):
            meta = store.create_set(teacher=f"t{i}", weights_sha256=None, preprocessing={"i": i}, dim=4)
            store.put_many(meta.set_id, ["a"], np.zeros((1, 4), np.float16))
            ids.append(meta.set_id)
    return sorted(ids)


def test_existing_set_passes(tmp_path: Path) -> None:
    ids = _store(tmp_path / "s", 2)
    assert check_feature_set(tmp_path / "s", ids[1]) is None


@pytest.mark.parametrize("sets", [0, 2])
def test_unknown_set_is_422_listing_the_sets(tmp_path: Path, sets: int) -> None:
    ids = _store(tmp_path / "s", sets)
    with pytest.raises(ApiError) as info:
        check_feature_set(tmp_path / "s", "nope")
    err = info.value
    assert err.status == 422 and err.details["field"] == "distill.feature_set"
    assert err.details["feature_sets"] == ids
    assert "'nope'" in err.message
    assert all(i in err.message for i in ids) if ids else "holds no feature sets" in err.message


@pytest.mark.parametrize("make", ["missing", "file", "garbage"])
def test_unreadable_store_is_accepted_with_a_note(tmp_path: Path, make: str) -> None:
    path = tmp_path / "s"
    if make == "file":
        path.write_text("not a store")
    elif make == "garbage":
        path.mkdir()
        (path / "data.mdb").write_bytes(b"\0garbage" * 1000)
    note = check_feature_set(path, "some-set")
    assert note is not None and "not checked" in note and "'some-set'" in note
