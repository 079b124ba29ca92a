"""The one data-root rule: every file lastkd reads for training lies inside a configured root.

Used by every entry point that takes a path (``lastkd train``, ``POST /train``, the worker before
it trains, the readers for each file they open), so a path gets the same answer everywhere:

* a NUL byte, a path longer than PATH_MAX (4095 bytes) or a component longer than NAME_MAX (255
  bytes) is refused (``invalid``): no filesystem call could succeed with it;
* ``~`` and ``~user`` are expanded (on the machine that reads the file), then the path is confined
  like any other: expansion grants nothing, a home folder outside the roots is ``forbidden``;
* a relative path is taken from the first data root;
* ``..`` is collapsed and every symlink followed (``realpath``), and the real path must lie inside
  one of the real data roots (``forbidden`` otherwise): naming a file is not enough, what is read
  counts, so a link inside a root that points out of it is refused too;
* with ``must_exist``, a path that does not exist is ``missing``.

:func:`confine_entries` applies the same rule to the data files *inside* a folder: a data file
that is a symlink resolving outside the roots is refused, naming the file (the job fails; it is
not skipped, because training on a silently smaller dataset is worse than not training).
Entries that are not symlinks lie physically inside an already confined folder, so only
symlinks cost a ``realpath``. (Hard links cannot be told from ordinary files; an operator who
lets untrusted users hard-link into a data root has granted them those files.)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from lastkd.errors import LastkdError

__all__ = ["DATA_SUFFIXES", "DataPathError", "confine", "confine_entries", "real_roots"]

PATH_MAX = 4095  # bytes, Linux PATH_MAX less the terminating NUL
NAME_MAX = 255  # bytes per path component
DATA_SUFFIXES = (".skeleton", ".npy", ".npz", ".pkl", ".pickle")
"""Names of the files a training job reads from a data folder (raw NTU, arrays, pickles)."""

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
    _check_length(text, field)
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
    if must_exist and not os.path.exists(real):
        raise DataPathError(field, f"{text!r} does not exist under the data roots", "missing")
    return real


def _check_length(text: str, field: str) -> None:
    encoded = os.fsencode(text)
    if len(encoded) > PATH_MAX:
        raise DataPathError(field, f"path is {len(encoded)} bytes long, more than the {PATH_MAX} allowed", "invalid")
    longest = max(encoded.split(b"/"), key=len)
    if len(longest) > NAME_MAX:
        raise DataPathError(
            field, f"a path component is {len(longest)} bytes long, more than the {NAME_MAX} allowed", "invalid"
        )


def confine_entries(
    folder: str | os.PathLike[str],
    roots: Sequence[str | os.PathLike[str]],
    *,
    field: str = "path",
    suffixes: tuple[str, ...] = DATA_SUFFIXES,
) -> list[Path]:
    """The entries of ``folder`` whose names end with ``suffixes``, sorted by name, each allowed.

    ``folder`` must already be confined (:func:`confine`). An entry that is a symlink must
    resolve inside ``roots``; otherwise :class:`DataPathError` (``forbidden``) names the file.
    The entries are returned as they are named in the folder (a sample's name is its link name);
    callers that open one re-confine it to read its real path.
    """
    found: list[Path] = []
    with os.scandir(folder) as it:
        for entry in it:
            if not entry.name.endswith(suffixes):
                continue
            if entry.is_symlink():
                confine(entry.path, roots, field=field)
            found.append(Path(entry.path))
    return sorted(found, key=lambda p: p.name)
