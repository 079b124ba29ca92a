"""Turning results into plain JSON: the one conversion used for metrics, job records and files.

Metrics hold numpy scalars and arrays, tensors and paths, and evaluation can produce NaN or an
infinity (an empty class, a diverged loss). JSON has none of these, and ``json.dumps`` would
write the non-standard ``NaN``/``Infinity`` tokens that strict parsers (browsers, PostgreSQL's
jsonb) refuse. Here every non-finite float becomes ``None``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from enum import Enum
from pathlib import PurePath
from typing import Any

__all__ = ["to_jsonable"]


def to_jsonable(obj: Any) -> Any:
    """``obj`` with only dict/list/str/int/float/bool/None inside (non-finite floats -> None).

    Numpy scalars and arrays and torch tensors are converted through their ``tolist``/``item``
    (duck-typed: this module imports neither), paths become strings, enums their values.
    """
    if obj is None or isinstance(obj, (str, bool, int)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Enum):
        return to_jsonable(obj.value)
    if isinstance(obj, PurePath):
        return str(obj)
    if hasattr(obj, "tolist"):  # numpy arrays and scalars, torch tensors
        return to_jsonable(obj.tolist())
    if hasattr(obj, "item"):
        return to_jsonable(obj.item())
    return str(obj)
