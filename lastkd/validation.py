"""One way to report a pydantic ValidationError: a list of (field, message) problems.

Settings, training configs (YAML and HTTP), request bodies and job configs all validate with
pydantic; they all report through :func:`problems` so a user reads the same words whether the
mistake came through an environment variable, a file or an API call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

__all__ = ["Problem", "problems", "summary"]


@dataclass(frozen=True)
class Problem:
    """One invalid field: its dotted location and what is wrong (with the offending value)."""

    field: str
    msg: str

    def as_dict(self) -> dict[str, str]:
        """JSON form (API error details)."""
        return {"field": self.field, "msg": self.msg}


def _message(err: Any) -> str:
    msg = str(err.get("msg", "invalid"))
    # pydantic prefixes messages of our own validators; the prefix says nothing to a user.
    msg = msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")
    value = err.get("input")
    if err.get("type") == "missing" or isinstance(value, (dict, list)) or "input" not in err:
        return msg
    return f"{msg} (got {value!r:.80})"


def problems(exc: ValidationError, *, prefix: str = "", root: str = "config") -> list[Problem]:
    """The problems of ``exc``, each with its dotted field name (``root`` for the object itself).

    ``prefix`` is put before every field name (``data.`` when a sub-object was validated alone).
    """
    found = []
    for err in exc.errors():
        loc = ".".join(str(part) for part in err.get("loc", ()) if part != "__root__")
        found.append(Problem(prefix + loc if loc else (prefix.rstrip(".") or root), _message(err)))
    return found


def summary(found: list[Problem]) -> str:
    """All problems on one line: ``a.b: msg; c: msg``."""
    return "; ".join(f"{p.field}: {p.msg}" for p in found) or "invalid input"
