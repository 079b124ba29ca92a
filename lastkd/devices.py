"""Devices: how a device is written in settings and configs, and the one way it is resolved.

The spelling check (:data:`DeviceSpec`) is pydantic only and cheap: every command's settings
import it. :func:`resolve_device` imports torch when called, on the machine that runs the model.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Annotated

from pydantic import AfterValidator

from lastkd.errors import LastkdError

if TYPE_CHECKING:
    import torch

__all__ = ["DEVICE_HELP", "DeviceError", "DeviceSpec", "check_device", "resolve_device"]

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


def resolve_device(spec: str, *, local_rank: int = 0) -> torch.device:
    """The torch device for ``spec``.

    ``auto`` is CUDA when it is usable, else the CPU; ``cuda`` is this process's GPU: the local
    rank's under DDP (torchrun's ``LOCAL_RANK``, passed by the caller), GPU 0 otherwise;
    ``cuda:N`` is GPU N. A CUDA device that is absent raises :class:`DeviceError`.
    """
    import torch

    check_device(spec)
    if spec == "cpu":
        return torch.device("cpu")
    has_cuda = torch.cuda.is_available()
    if spec == "auto":
        return torch.device("cuda", local_rank) if has_cuda else torch.device("cpu")
    if not has_cuda:
        raise DeviceError(f"device {spec!r} requested but CUDA is not available on this machine")
    index = local_rank if spec == "cuda" else int(spec.split(":", 1)[1])
    count = torch.cuda.device_count()
    if index >= count:
        raise DeviceError(f"device {spec!r} requested but only {count} CUDA device(s) exist")
    return torch.device("cuda", index)
