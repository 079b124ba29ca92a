"""GPU claims between the workers of one host: real flocks, a real holder process killed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lastkd.devices import DeviceError, claim_gpu


def test_claims_spread_over_gpus_then_share_and_die_with_their_holder(tmp_path: Path) -> None:
    locks = tmp_path / "claims"
    first, second = claim_gpu(locks, [1, 2, 3]), claim_gpu(locks, [1, 2, 3])
    third, fourth = claim_gpu(locks, [1, 2, 3]), claim_gpu(locks, [1, 2, 3])
    assert [(c.index, c.slot) for c in (first, second, third, fourth)] == [(1, 0), (2, 0), (3, 0), (1, 1)]
    # A holder that dies (kill -9 included) frees its GPU: the kernel drops the flock.
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys,time; from lastkd.devices import claim_gpu; "
            f"c = claim_gpu({str(locks / 'other')!r}, [0, 1]); print(c.index, flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "0"
        assert claim_gpu(locks / "other", [0, 1]).index == 1  # 0 is held by the child
    finally:
        holder.kill()
        holder.wait()
    assert claim_gpu(locks / "other", [0, 1]).index == 0  # freed by the kill
    os.close(second.fd)
    assert claim_gpu(locks, [1, 2, 3]).index == 2  # a released claim is taken again first
    with pytest.raises(DeviceError, match="empty"):
        claim_gpu(locks, [])
