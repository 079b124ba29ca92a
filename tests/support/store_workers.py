"""Helper processes for the concurrency and crash tests (real processes on a real LMDB store).

    python -m tests.support.store_workers writer PATH SET_ID BATCHES BATCH DIM DELAY_S [READERS]
    python -m tests.support.store_workers reader PATH SET_ID BATCHES BATCH DIM TIMEOUT_S

Batch ``b`` holds ids ``b{b:05d}-{i:04d}`` whose vectors are filled with ``b * 1000 + i``, so
a reader can tell from any row which batch and position it belongs to. The writer prints
``committed B`` after each commit; given READERS it first waits until that many readers have
made their first read (each touches ``PATH.ready-<pid>``), so the readers watch the store fill
up. The reader prints one JSON summary line and exits 1 if it ever saw part of a batch, a wrong
vector, or a count that is not a whole number of batches.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import time

import numpy as np

from lastkd.featurestore import FeatureStore


def batch_ids(batch: int, size: int) -> list[str]:
    """The clip ids of one batch."""
    return [f"b{batch:05d}-{i:04d}" for i in range(size)]


def batch_vectors(batch: int, size: int, dim: int) -> np.ndarray:
    """The vectors of one batch: row i is filled with batch * 1000 + i (exact in float32)."""
    values = batch * 1000 + np.arange(size, dtype=np.float32)
    return np.repeat(values[:, None], dim, axis=1)


def writer(path: str, set_id: str, batches: int, size: int, dim: int, delay: float, readers: int = 0) -> int:
    store = FeatureStore(path, map_size=1 << 30)
    deadline = time.monotonic() + 60
    while len(glob.glob(glob.escape(path) + ".ready-*")) < readers and time.monotonic() < deadline:
        time.sleep(0.01)
    for batch in range(batches):
        store.put_many(set_id, batch_ids(batch, size), batch_vectors(batch, size, dim))
        print(f"committed {batch}", flush=True)
        if delay:
            time.sleep(delay)
    return 0


def check_snapshot(arr: np.ndarray, found: np.ndarray, batches: int, size: int) -> list[str]:
    """Problems in one read of every id: partial batches or wrong values."""
    problems = []
    per_batch = found.reshape(batches, size)
    expected = (np.arange(batches)[:, None] * 1000 + np.arange(size)[None, :]).reshape(-1)
    for batch in range(batches):
        row = per_batch[batch]
        if row.any() and not row.all():
            problems.append(f"batch {batch} partially visible ({int(row.sum())}/{size})")
    rows = np.flatnonzero(found)
    if rows.size and not (arr[rows] == expected[rows, None]).all():
        problems.append("a visible vector does not hold its batch's values")
    if (arr[~found] != 0).any():
        problems.append("a missing row is not zero")
    return problems


def reader(path: str, set_id: str, batches: int, size: int, dim: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    store = FeatureStore(path, readonly=True)
    ids = [clip for batch in range(batches) for clip in batch_ids(batch, size)]
    observations, counts, problems = 0, set(), []
    last = 0
    while time.monotonic() < deadline:
        count = store.count(set_id)
        arr, found = store.get_many(set_id, ids)
        observations += 1
        if observations == 1:
            open(f"{path}.ready-{os.getpid()}", "w").close()
        counts.add(count)
        if count % size:
            problems.append(f"count {count} is not a multiple of the batch size {size}")
        if count < last:
            problems.append(f"count went back from {last} to {count}")
        if int(found.sum()) < count:
            problems.append(f"count {count} but only {int(found.sum())} vectors visible afterwards")
        last = count
        problems += check_snapshot(arr, found, batches, size)
        if problems or count == batches * size:
            break
    print(
        json.dumps({"observations": observations, "counts": sorted(counts), "final": last, "problems": problems[:10]})
    )
    return 1 if problems else 0


def main(argv: list[str]) -> int:
    role, path, set_id = argv[0], argv[1], argv[2]
    batches, size, dim = int(argv[3]), int(argv[4]), int(argv[5])
    extra = float(argv[6])
    if role == "writer":
        return writer(path, set_id, batches, size, dim, extra, int(argv[7]) if len(argv) > 7 else 0)
    if role == "reader":
        return reader(path, set_id, batches, size, dim, extra)
    raise SystemExit(f"unknown role {role!r}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
