"""Confine the filesystem paths of a training config to the operator's data roots.

A config arriving over HTTP names files on the worker's disk, so every path field is resolved
(relative paths against the first data root, ``..`` collapsed, symlinks followed) and must land
inside one of the configured roots. The API checks this at submit time and the worker checks it
again just before training (the filesystem may have changed in between).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from lastkd.student.config import TrainConfig

# Fields that must exist when given; the parse cache is created on demand.
MUST_EXIST = ("data.path", "data.label_path", "data.missing_skeletons", "eval.label_map")


class DataPathError(ValueError):
    """A config path that is outside the data roots (``forbidden``) or absent (``missing``)."""

    def __init__(self, field: str, message: str, kind: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.kind = kind


@dataclass(frozen=True)
class _Resolved:
    field: str
    given: Path
    real: Path


def _inside(real: Path, roots: list[Path]) -> bool:
    return any(real == root or root in real.parents for root in roots)


def _resolve_one(field: str, given: Path, roots: list[Path]) -> _Resolved:
    text = os.fspath(given)
    if "\x00" in text:
        raise DataPathError(field, "path contains a NUL byte", "invalid")
    if text.startswith("~"):
        raise DataPathError(field, f"{text!r}: '~' is not expanded; give a path inside the data roots", "forbidden")
    candidate = given if given.is_absolute() else roots[0] / given
    # resolve() collapses '..' and follows every symlink, so a link pointing out of a root is caught
    real = candidate.resolve()
    if not _inside(real, roots):
        listing = ", ".join(str(r) for r in roots)
        raise DataPathError(
            field,
            f"{text!r} resolves to {real}, which is outside the configured data roots ({listing})",
            "forbidden",
        )
    return _Resolved(field, given, real)


def confine_config_paths(config: TrainConfig, roots: list[Path], *, check_exists: bool = True) -> TrainConfig:
    """A copy of ``config`` whose paths are absolute, resolved and inside ``roots``.

    Raises :class:`DataPathError` naming the first offending field: ``kind='forbidden'`` for a
    path outside every root, ``'missing'`` for a required file or folder that does not exist.
    """
    real_roots = [Path(r).resolve() for r in roots]
    if not real_roots:
        raise DataPathError("data.path", "no data roots are configured (set LASTKD_DATA_ROOTS)", "forbidden")
    resolved = {field: _resolve_one(field, path, real_roots) for field, path in config.path_fields().items()}
    if check_exists:
        for field in MUST_EXIST:
            item = resolved.get(field)
            if item is not None and not item.real.exists():
                raise DataPathError(field, f"{os.fspath(item.given)!r} does not exist under the data roots", "missing")
    data = config.data.model_copy(
        update={
            key.split(".", 1)[1]: item.real for key, item in resolved.items() if key.startswith("data.")
        }
    )
    ev = config.eval.model_copy(update={"label_map": resolved["eval.label_map"].real} if "eval.label_map" in resolved else {})
    return config.model_copy(update={"data": data, "eval": ev})
