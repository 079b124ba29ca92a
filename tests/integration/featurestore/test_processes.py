"""Real processes on a real store: one writer with concurrent readers, kill -9 of a writer in the
middle of a run, and a torch DataLoader whose forked workers read from the store."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lastkd.featurestore import FeatureStore
from tests.support.paths import PROJECT_ROOT
from tests.support.store_workers import batch_ids, batch_vectors, check_snapshot


def _worker(*args: object) -> list[str]:
    return [sys.executable, "-m", "tests.support.store_workers", *map(str, args)]


def _make_set(path: Path, dim: int) -> str:
    with FeatureStore(path, map_size=1 << 30) as store:
        return store.create_set("t", None, {"test": "processes"}, dim=dim, dtype="float32").set_id


def test_readers_only_ever_see_whole_committed_batches(store_path: Path) -> None:
    batches, size, dim = 40, 64, 32
    set_id = _make_set(store_path, dim)
    writer = subprocess.Popen(
        _worker("writer", store_path, set_id, batches, size, dim, 0.02, 2),
        cwd=PROJECT_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # the writer waits for both readers' first read, so they watch the store fill up
    readers = [
        subprocess.Popen(
            _worker("reader", store_path, set_id, batches, size, dim, 60),
            cwd=PROJECT_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    out, err = writer.communicate(timeout=120)
    assert writer.returncode == 0, err
    assert out.split("\n")[-2] == f"committed {batches - 1}"
    for reader in readers:
        out, err = reader.communicate(timeout=120)
        summary = json.loads(out.strip().splitlines()[-1])
        assert reader.returncode == 0 and summary["problems"] == [], (summary, err)
        assert summary["final"] == batches * size
        assert all(c % size == 0 for c in summary["counts"])
        assert len(summary["counts"]) >= 2  # it saw the store between batches, not just the end
    with FeatureStore(store_path, readonly=True) as store:
        ids = [clip for b in range(batches) for clip in batch_ids(b, size)]
        arr, found = store.get_many(set_id, ids)
        assert found.all() and check_snapshot(arr, found, batches, size) == []


def test_kill_9_mid_write_leaves_only_whole_batches(store_path: Path) -> None:
    size, dim, many = 256, 256, 100_000
    set_id = _make_set(store_path, dim)
    writer = subprocess.Popen(
        _worker("writer", store_path, set_id, many, size, dim, 0),
        cwd=PROJECT_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    reported = -1
    deadline = time.monotonic() + 120
    assert writer.stdout is not None
    while reported < 25 and time.monotonic() < deadline:
        line = writer.stdout.readline()
        assert line, writer.stderr.read() if writer.stderr else "writer died"
        reported = int(line.split()[1])
    os.kill(writer.pid, signal.SIGKILL)  # mid-way: most of its time is spent inside a batch
    writer.wait(timeout=30)
    assert writer.returncode == -signal.SIGKILL
    with FeatureStore(store_path, map_size=1 << 30) as store:  # reopen as the writer would
        count = store.count(set_id)
        assert count % size == 0
        committed = count // size
        assert committed >= reported + 1  # every reported commit survived
        probe = committed + 2
        ids = [clip for b in range(probe) for clip in batch_ids(b, size)]
        arr, found = store.get_many(set_id, ids)
        assert found[: committed * size].all() and not found[committed * size :].any()
        assert check_snapshot(arr, found, probe, size) == []
        assert len(list(store.iter_ids(set_id))) == count
        # the store keeps working after the crash
        store.put_many(set_id, batch_ids(committed, size), batch_vectors(committed, size, dim))
        assert store.count(set_id) == count + size


class _StoreDataset:
    """A map-style Dataset over stored vectors, as the trainer uses one."""

    def __init__(self, store: FeatureStore, set_id: str, ids: list[str]) -> None:
        self.store, self.set_id, self.ids = store, set_id, ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int):  # type: ignore[no-untyped-def]
        import torch

        arr, found = self.store.get_many(self.set_id, [self.ids[index]])
        return torch.from_numpy(arr[0]), bool(found[0]), os.getpid(), self.store.opened_pid


@pytest.mark.parametrize("writer_in_parent", [False, True])
def test_forked_dataloader_workers_reopen_the_store(store_path: Path, writer_in_parent: bool) -> None:
    import torch
    from torch.utils.data import DataLoader

    size, dim = 16, 24
    writer = FeatureStore(store_path, map_size=1 << 28)
    set_id = writer.create_set("t", None, {"test": "dataloader"}, dim=dim, dtype="float32").set_id
    for b in range(4):
        writer.put_many(set_id, batch_ids(b, size), batch_vectors(b, size, dim))
    if not writer_in_parent:
        writer.close()
    reader = FeatureStore(store_path, readonly=True)
    ids = [clip for b in range(4) for clip in batch_ids(b, size)] + ["absent"]
    assert reader.count(set_id) == 64  # opened in the parent before the fork
    parent = os.getpid()
    loader = DataLoader(_StoreDataset(reader, set_id, ids), batch_size=5, num_workers=2, multiprocessing_context="fork")
    vectors, found, pids, opened = [], [], [], []
    for vec, hit, pid, opened_pid in loader:
        vectors.append(vec)
        found += hit.tolist()
        pids += pid.tolist()
        opened += opened_pid.tolist()
    expected = np.concatenate([batch_vectors(b, size, dim) for b in range(4)] + [np.zeros((1, dim), np.float32)])
    np.testing.assert_array_equal(torch.cat(vectors).numpy(), expected)
    assert found == [True] * 64 + [False]
    assert parent not in pids and len(set(pids)) == 2
    assert opened == pids  # every worker used an environment it opened itself
    # the parent's handles are untouched by the workers
    assert reader.opened_pid == parent and reader.count(set_id) == 64
    if writer_in_parent:
        writer.put_many(set_id, batch_ids(4, size), batch_vectors(4, size, dim))
        assert reader.count(set_id) == 80
    writer.close()
    reader.close()


def test_reader_follows_a_map_grown_by_another_process(store_path: Path) -> None:
    with FeatureStore(store_path, map_size=256 << 10) as store:
        set_id = store.create_set("t", None, {}, dim=768, dtype="float32").set_id
        store.put_many(set_id, ["first"], np.ones((1, 768), np.float32))
    reader = FeatureStore(store_path, readonly=True, map_size=256 << 10)
    assert reader.count(set_id) == 1  # opened with the small map
    script = (
        "import numpy as np\n"
        "from lastkd.featurestore import FeatureStore\n"
        f"s = FeatureStore({str(store_path)!r}, map_size=256 << 10, max_map_size=8 << 20)\n"
        "for b in range(10):\n"
        f"    s.put_many({set_id!r}, [f'b{{b}}-{{i}}' for i in range(64)], np.full((64, 768), b, np.float32))\n"
        "print(s.stats()['map_size'])\n"
    )
    grown = subprocess.run(
        [sys.executable, "-c", script], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120
    )
    assert grown.returncode == 0, grown.stderr
    assert int(grown.stdout) > 256 << 10
    assert reader.count(set_id) == 1 + 640
    arr, found = reader.get_many(set_id, ["b9-63", "b0-0", "first"])
    assert found.all() and arr[:, 0].tolist() == [9, 0, 1]
    reader.close()
