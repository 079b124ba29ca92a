"""Small annotated types shared by the typed configs of both services (settings, TrainConfig).

Only pydantic here: importing this module must stay cheap (no torch), because the settings of
every command import it.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator

DEVICE_HELP = "auto, cpu, cuda or cuda:N"
# ASCII digits only: str.isdigit() would also take digits such as "²" that torch cannot parse.
_DEVICE = re.compile(r"auto|cpu|cuda(:[0-9]{1,4})?")


def check_device(value: str) -> str:
    """Accept ``auto``, ``cpu``, ``cuda`` or ``cuda:N``; anything else is a ValueError.

    Only the spelling is checked here (validated at the edge); whether that CUDA device exists is
    decided where the device is resolved, on the machine that runs the model.
    """
    if _DEVICE.fullmatch(value):
        return value
    raise ValueError(f"must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {value!r}")


DeviceSpec = Annotated[str, AfterValidator(check_device)]
"""A device string as written in settings and configs: ``auto | cpu | cuda | cuda:N``."""
