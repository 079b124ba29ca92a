"""`lastkd worker --claim-gpu`: which GPUs may be claimed, and the claim reaching CUDA_VISIBLE_DEVICES.
No GPU exists here: the driver's answer is replaced (the one thing mocked)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lastkd.devices import GpuProbe
from lastkd.services.settings import Settings
from lastkd.services.trainer import worker


def test_gpu_candidates() -> None:
    assert worker.gpu_candidates("all", 3) == [0, 1, 2]
    assert worker.gpu_candidates("2, 1,2", 3) == [1, 2]
    assert worker.gpu_candidates("all", 0) == []


@pytest.mark.parametrize(
    "spec, message", [("1,x", "indices"), ("", "indices"), ("-1", "indices"), ("3", "lists 3 GPU"), ("0,²", "indices")]
)
def test_bad_gpu_lists_are_refused(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        worker.gpu_candidates(spec, 3)


def test_claims_set_cuda_visible_devices(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr("lastkd.devices.probe_gpus", lambda: GpuProbe(True, "NVRM 550", False, count=2))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    settings = Settings(data_dir=tmp_path)
    assert worker._claim_gpu("all", settings) == "claimed GPU 0"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0"
    assert worker._claim_gpu("all", settings) == "claimed GPU 1"
    assert worker._claim_gpu("1", settings) == "claimed GPU 1, shared with 1 other worker(s)"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "1"
    for fd in worker._HELD:
        os.close(fd)
    worker._HELD.clear()


def test_no_gpu_means_the_cpu(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr("lastkd.devices.probe_gpus", lambda: GpuProbe(False, None, False, count=0))
    assert "CPU" in worker._claim_gpu("all", Settings(data_dir=tmp_path))
