"""Device resolution: spelling, and no silent CPU fallback when a GPU is there but unusable.

No GPU exists on the test machines, so the driver's view is simulated with a folder laid out like
``/proc/driver/nvidia`` and torch's CUDA answers are replaced (the one thing mocked: a GPU).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lastkd.devices import DeviceError, GpuProbe, check_device, probe_gpus, resolve_device

pytestmark = pytest.mark.faults


def _driver_tree(root: Path, gpus: int = 1) -> Path:
    base = root / "proc" / "driver" / "nvidia"
    (base / "gpus").mkdir(parents=True)
    for i in range(gpus):
        (base / "gpus" / f"0000:0{i}:00.0").mkdir()
    (base / "version").write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  470.57.02  Tue Jul 13 2021\n")
    return root


@pytest.mark.parametrize("bad", ["gpu", "cuda:", "cuda:x", "CUDA", " cpu", "cuda:²", "", "cuda:12345"])
def test_spelling_is_checked(bad: str) -> None:
    with pytest.raises(ValueError):
        check_device(bad)


def test_probe_reads_the_driver_tree(tmp_path: Path) -> None:
    probe = probe_gpus(_driver_tree(tmp_path), environ={})
    assert probe.present and "470.57.02" in (probe.driver or "") and not probe.hidden
    assert not probe_gpus(tmp_path / "empty", environ={}).present
    assert probe_gpus(_driver_tree(tmp_path / "h"), environ={"CUDA_VISIBLE_DEVICES": ""}).hidden


def test_auto_on_a_machine_without_gpu_is_the_cpu() -> None:
    no_gpu = GpuProbe(present=False, driver=None, hidden=False)
    assert resolve_device("auto", probe=no_gpu) == torch.device("cpu")
    assert resolve_device("cpu", probe=no_gpu) == torch.device("cpu")
    with pytest.raises(DeviceError, match="not available"):
        resolve_device("cuda", probe=no_gpu)


@pytest.mark.parametrize("spec", ["auto", "cuda", "cuda:1"])
def test_a_present_but_unusable_gpu_is_refused_with_the_reason(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, spec: str
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def too_old() -> None:
        raise RuntimeError("The NVIDIA driver on your system is too old (found version 11040).")

    monkeypatch.setattr(torch.cuda, "init", too_old)
    probe = probe_gpus(_driver_tree(tmp_path), environ={})
    with pytest.raises(DeviceError) as err:
        resolve_device(spec, probe=probe)
    text = str(err.value)
    assert "too old (found version 11040)" in text and "470.57.02" in text and "cpu" in text
    # Asking for the CPU on purpose never looks at the GPU.
    assert resolve_device("cpu", probe=probe) == torch.device("cpu")


def test_hidden_gpus_mean_the_cpu_for_auto(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    probe = probe_gpus(_driver_tree(tmp_path), environ={"CUDA_VISIBLE_DEVICES": "-1"})
    assert resolve_device("auto", probe=probe) == torch.device("cpu")


def test_probe_counts_the_gpus(tmp_path: Path) -> None:
    assert probe_gpus(_driver_tree(tmp_path, gpus=3), environ={}).count == 3
    assert probe_gpus(tmp_path / "none", environ={}).count == 0


@pytest.mark.parametrize("spec", ["cuda:0", "cuda:3"])
def test_one_named_gpu_is_refused_under_ddp(spec: str) -> None:
    """cuda:N under DDP would put every rank on GPU N: refused before any GPU is looked at."""
    with pytest.raises(DeviceError, match="every rank uses its own"):
        resolve_device(spec, local_rank=1, distributed=True)
