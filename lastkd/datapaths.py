"""The one data-root rule: every file lastkd reads for training lies inside a configured root.

Used by every entry point that takes a path (``lastkd train``, ``POST /train``, the worker before
it trains, the readers for each file they open), so a path gets the same answer everywhere:

* a NUL byte is refused (``invalid``);
* ``~`` is expanded, then the path is confined like any other (it grants nothing);
* a relative path is taken from the first data root;
* ``..`` is collapsed and every symlink followed (``realpath``), and the real path must lie inside
  one of the real data roots (``forbidden`` otherwise): naming a file is not enough, what is read
  counts, so a link inside a root that points out of it is refused too;
* with ``must_exist``, a path that does not exist is ``missing``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from lastkd.errors import LastkdError

__all__ = ["DataPathError", "confine", "real_roots"]

PathKind = Literal["forbidden", "missing", "invalid"]
_STATUS = {"forbidden": 403, "missing": 422, "invalid": 422}


class DataPathError(LastkdError, ValueError):
    """A path refused by the data-root rule; ``field`` names where it came from, ``kind`` why."""

    def __init__(self, field: str, message: str, kind: PathKind) -> None:
        super().__init__(f"{field}: {message}", code=f"path_{kind}", status=_STATUS[kind], field=field)
        self.field = field
        self.kind = kind


def real_roots(roots: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """The data roots as real absolute paths (symlinks followed), in order."""
    return [Path(os.path.realpath(os.path.expanduser(os.fspath(r)))) for r in roots]


def _inside(real: Path, roots: Sequence[Path]) -> bool:
    return any(real == root or real.is_relative_to(root) for root in roots)


def confine(
    path: str | os.PathLike[str],
    roots: Sequence[str | os.PathLike[str]],
    *,
    field: str = "path",
    must_exist: bool = False,
) -> Path:
    """The real path of ``path`` when the data-root rule allows it, else :class:`DataPathError`.

    ``roots`` are the configured data roots (any form; they are resolved here); ``field`` names
    the config field or file in the message.
    """
    text = os.fspath(path)
    if "\x00" in text:
        raise DataPathError(field, "path contains a NUL byte", "invalid")
    resolved_roots = real_roots(roots)
    if not resolved_roots:
        raise DataPathError(field, f"{text!r}: no data roots are configured (set LASTKD_DATA_ROOTS)", "forbidden")
    candidate = Path(os.path.expanduser(text))
    if not candidate.is_absolute():
        candidate = resolved_roots[0] / candidate
    real = Path(os.path.realpath(candidate))
    if not _inside(real, resolved_roots):
        listing = ", ".join(str(r) for r in resolved_roots)
        raise DataPathError(
            field,
            f"{text!r} resolves to {real}, which is outside the configured data roots ({listing}); "
            "add its folder to LASTKD_DATA_ROOTS to allow it",
            "forbidden",
        )
    if must_exist and not real.exists():
        raise DataPathError(field, f"{text!r} does not exist under the data roots", "missing")
    return real
