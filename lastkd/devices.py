"""Devices: how a device is written in settings and configs, and the one way it is resolved.

The spelling check (:data:`DeviceSpec`) is pydantic only and cheap: every command's settings
import it. :func:`resolve_device` imports torch when called, on the machine that runs the model.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

from pydantic import AfterValidator

from lastkd.errors import LastkdError

if TYPE_CHECKING:
    import torch

__all__ = [
    "DEVICE_HELP",
    "DeviceError",
    "DeviceSpec",
    "GpuClaim",
    "GpuProbe",
    "check_device",
    "claim_gpu",
    "probe_gpus",
    "resolve_device",
]

DEVICE_HELP = "auto, cpu, cuda or cuda:N"
# ASCII digits only: str.isdigit() would also take digits such as "²" that torch cannot parse.
_DEVICE = re.compile(r"auto|cpu|cuda(:[0-9]{1,4})?")


class DeviceError(LastkdError, ValueError):
    """The requested device cannot be used on this machine (the message says why)."""

    code = "device_unavailable"
    status = 422


def check_device(value: str) -> str:
    """Accept ``auto``, ``cpu``, ``cuda`` or ``cuda:N``; anything else is a ValueError.

    Only the spelling is checked here (validated at the edge); whether that CUDA device exists is
    decided by :func:`resolve_device`, on the machine that runs the model.
    """
    if isinstance(value, str) and _DEVICE.fullmatch(value):
        return value
    raise ValueError(f"must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {value!r}")


DeviceSpec = Annotated[str, AfterValidator(check_device)]
"""A device string as written in settings and configs: ``auto | cpu | cuda | cuda:N``."""


@dataclass(frozen=True)
class GpuProbe:
    """What the machine says about NVIDIA GPUs, independently of whether torch can use them."""

    present: bool  # the kernel driver lists at least one GPU
    driver: str | None  # the driver's version line, when readable
    hidden: bool  # CUDA_VISIBLE_DEVICES hides every GPU on purpose
    count: int = 0  # GPUs the kernel driver lists


def probe_gpus(root: str | os.PathLike[str] = "/", environ: Mapping[str, str] | None = None) -> GpuProbe:
    """Read the NVIDIA kernel driver's view (``/proc/driver/nvidia``): is a GPU there at all?

    ``root`` and ``environ`` exist for tests (a simulated driver tree); callers use the defaults.
    """
    env = os.environ if environ is None else environ
    base = Path(root) / "proc" / "driver" / "nvidia"
    gpus = base / "gpus"
    count = sum(1 for _ in gpus.iterdir()) if gpus.is_dir() else 0
    present = count > 0
    driver = None
    try:
        driver = (base / "version").read_text(encoding="utf-8", errors="replace").splitlines()[0].strip()
    except (OSError, IndexError):
        pass
    visible = env.get("CUDA_VISIBLE_DEVICES")
    hidden = visible is not None and visible.strip() in ("", "-1", "none", "NoDevFiles")
    return GpuProbe(present, driver, hidden, count)


def _unusable_reason(probe: GpuProbe) -> str:
    import torch

    try:
        torch.cuda.init()  # raises with torch's own reason (driver too old, no device node...)
        why = "torch.cuda.is_available() is False"
    except Exception as exc:  # noqa: BLE001 - any failure here is the reason we report
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return (
        f"an NVIDIA GPU is present but CUDA cannot use it: {why}. Driver: {probe.driver or 'unknown'}; "
        f"this torch {torch.__version__} is built for CUDA {torch.version.cuda or 'none (CPU-only build)'}. "
        "Install a driver that supports that CUDA version (or a torch build for your driver), "
        "or set the device to 'cpu' to run on the CPU on purpose."
    )


def resolve_device(
    spec: str, *, local_rank: int = 0, distributed: bool = False, probe: GpuProbe | None = None
) -> torch.device:
    """The torch device for ``spec``.

    ``auto`` is CUDA when it is usable and the CPU when the machine has no GPU; a GPU that is
    present but unusable (driver too old for this torch's CUDA, broken device nodes) is refused
    with the reason instead of silently falling back to the CPU (a GPU job on a CPU is hours
    late, not a detail). ``cuda`` is this process's GPU: the local rank's under DDP (torchrun's
    ``LOCAL_RANK``, passed by the caller), GPU 0 otherwise; ``cuda:N`` is GPU N, refused under
    DDP (``distributed``), where it would put every rank on one GPU. Only ``cpu`` never looks at
    GPUs. A CUDA device that is absent raises :class:`DeviceError`.
    """
    import torch

    check_device(spec)
    if distributed and spec.startswith("cuda:"):
        raise DeviceError(
            f"device {spec!r} names one GPU, but under DDP every rank uses its own (its LOCAL_RANK): use "
            "'cuda' or 'auto', and choose the GPUs with CUDA_VISIBLE_DEVICES"
        )
    if spec == "cpu":
        return torch.device("cpu")
    has_cuda = torch.cuda.is_available()
    if not has_cuda:
        probe = probe or probe_gpus()
        if probe.present and not probe.hidden:
            raise DeviceError(f"device {spec!r}: {_unusable_reason(probe)}")
        if spec == "auto":
            return torch.device("cpu")
        raise DeviceError(f"device {spec!r} requested but CUDA is not available on this machine")
    if spec == "auto":
        return torch.device("cuda", local_rank)
    index = local_rank if spec == "cuda" else int(spec.split(":", 1)[1])
    count = torch.cuda.device_count()
    if index >= count:
        raise DeviceError(f"device {spec!r} requested but only {count} CUDA device(s) exist")
    return torch.device("cuda", index)


@dataclass(frozen=True)
class GpuClaim:
    """A GPU this process holds among the workers of one host, until the process ends."""

    index: int  # the driver's GPU index (what CUDA_VISIBLE_DEVICES names)
    slot: int  # 0 when this process is the GPU's first holder, 1 for the second, ...
    fd: int  # the flock'ed file that is the claim; closing it (or dying) releases it


def claim_gpu(lock_dir: str | os.PathLike[str], candidates: list[int], max_per_gpu: int = 64) -> GpuClaim:
    """Claim the least-used of ``candidates`` among the processes sharing ``lock_dir``.

    Why: Docker gives every replica of a scaled service the same device reservation, so
    ``docker compose up --scale trainer-worker=4`` on a 4-GPU host would put four workers on one
    GPU. Each worker instead sees the host's GPUs and claims one here, before CUDA starts; claims
    are ``flock``s on ``lock_dir/gpu<i>-<slot>.lock`` (released by the kernel when the process dies,
    so a killed worker never leaks its GPU). Slots are tried as slot 0 of every GPU, then slot 1
    of every GPU, ..., so replicas spread evenly and share only when they outnumber the GPUs.
    """
    import fcntl

    if not candidates:
        raise DeviceError("no GPU to claim: the list of candidate GPUs is empty")
    folder = Path(lock_dir)
    folder.mkdir(parents=True, exist_ok=True)
    for slot in range(max_per_gpu):
        for index in candidates:
            fd = os.open(folder / f"gpu{index}-{slot}.lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            os.set_inheritable(fd, False)
            return GpuClaim(index, slot, fd)
    raise DeviceError(f"all {max_per_gpu} slots of GPUs {candidates} are claimed in {folder}")
