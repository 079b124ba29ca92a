"""The registry of published students: folders, versions and locks, without torch.

Layout: ``<root>/<name>/v<N>/`` is one published version (what is inside is publishing's
business: :mod:`lastkd.student.publish`); ``<root>/<name>/.lock`` serialises version allocation;
``<root>/.tmp/`` holds versions being built. A version is built completely in ``.tmp`` and renamed
into place (``rename(2)`` refuses a non-empty destination), so readers never see a partial
version and a version is never overwritten. Publishing is idempotent per job id: the job id is
recorded in the version's ``lineage.json`` and looked up under the lock before allocating.

Torch-free on purpose: the trainer API lists and serves checkpoints with this class alone.
"""

from __future__ import annotations

import fcntl
import json
import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lastkd.errors import InvalidInputError, NotFoundError
from lastkd.ids import check_job_id, check_name, parse_version

__all__ = [
    "LINEAGE_FILE",
    "METRICS_FILE",
    "TEACHERS_FOLDER",
    "TEACHER_FILE",
    "PublishedStudent",
    "Registry",
    "RegistryError",
    "find_teacher",
]

LINEAGE_FILE = "lineage.json"
METRICS_FILE = "metrics.json"
# Fine-tuned teachers: <root>/_teachers/<name>-<sha256[:12]>/{teacher.pth, lineage.json}, beside
# the students in a folder no student name can take (names start with a letter or digit).
TEACHERS_FOLDER = "_teachers"
TEACHER_FILE = "teacher.pth"
_STAGING = ".tmp"
_LOCK = ".lock"


class RegistryError(InvalidInputError):
    """A registry name, version or job id that is not valid."""

    code = "invalid_registry_request"


def find_teacher(root: Path, name: str) -> Path:
    """The weights file of the fine-tuned teacher ``name`` under ``root``: its folder name
    (``<name>-<sha256[:12]>``), or its name alone when exactly one version of it exists.
    Raises NotFoundError listing what exists, or RegistryError when the name is ambiguous."""
    folder = Path(root) / TEACHERS_FOLDER
    found = sorted(p.name for p in folder.iterdir() if (p / TEACHER_FILE).is_file()) if folder.is_dir() else []
    if name in found:
        return folder / name / TEACHER_FILE
    versions = [f for f in found if f.rsplit("-", 1)[0] == name]
    if len(versions) == 1:
        return folder / versions[0] / TEACHER_FILE
    if versions:
        raise RegistryError(f"teacher {name!r} has {len(versions)} versions; name one: {', '.join(versions)}")
    listing = ", ".join(found) if found else "none"
    raise NotFoundError(f"no fine-tuned teacher {name!r} under {folder}; published teachers: {listing}")


@dataclass(frozen=True)
class PublishedStudent:
    """One version in the registry."""

    name: str
    version: int
    path: Path
    job_id: str | None = None
    created: str | None = None
    top1: float | None = None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


class Registry:
    """Versioned, atomically published folders under ``root``."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    # ---- names and versions ------------------------------------------------------------------

    @staticmethod
    def check_name(name: str) -> str:
        """``name`` when it is a valid registry name, else :class:`RegistryError`."""
        try:
            return check_name(name)
        except ValueError as exc:
            raise RegistryError(f"invalid registry name {name!r}: {exc}") from None

    def names(self) -> list[str]:
        """Names with at least one folder, sorted (staging and foreign entries skipped)."""
        if not self.root.is_dir():
            return []
        out = []
        for entry in sorted(self.root.iterdir()):
            try:
                self.check_name(entry.name)
            except RegistryError:
                continue
            if entry.is_dir() and not entry.name.startswith("."):
                out.append(entry.name)
        return out

    def versions(self, name: str) -> list[int]:
        """The published versions of ``name``, ascending."""
        folder = self.root / self.check_name(name)
        if not folder.is_dir():
            return []
        found = []
        for entry in folder.iterdir():
            number = parse_version(entry.name) if entry.name.startswith("v") else None
            if number is not None and entry.is_dir():
                found.append(number)
        return sorted(found)

    def path(self, name: str, version: int | str) -> Path:
        """The folder of ``name`` version ``version`` (``3``, ``"3"`` or ``"v3"``); NotFoundError when absent."""
        number = version if isinstance(version, int) and not isinstance(version, bool) else parse_version(str(version))
        try:
            self.check_name(name)
        except RegistryError:
            number = None
        if number is None or number < 1:
            raise NotFoundError(f"no checkpoint {name!r} version {version!r}")
        folder = self.root / name / f"v{number}"
        if not folder.is_dir():
            raise NotFoundError(f"no checkpoint {name!r} version v{number}")
        return folder

    # ---- reading -----------------------------------------------------------------------------

    def entry(self, name: str, version: int | str) -> PublishedStudent:
        """One version with what its lineage and metrics say (job id, creation time, top-1)."""
        folder = self.path(name, version)
        lineage = _read_json(folder / LINEAGE_FILE)
        final = _read_json(folder / METRICS_FILE).get("final")
        top1 = final.get("top1") if isinstance(final, dict) else None
        number = int(folder.name[1:])
        return PublishedStudent(name, number, folder, lineage.get("job_id"), lineage.get("created"), top1)

    def entries(self) -> list[PublishedStudent]:
        """Every published version, by name then version."""
        return [self.entry(name, v) for name in self.names() for v in self.versions(name)]

    def find_job(self, name: str, job_id: str) -> PublishedStudent | None:
        """The version of ``name`` that job ``job_id`` published, if any."""
        for version in self.versions(name):
            folder = self.root / name / f"v{version}"
            if _read_json(folder / LINEAGE_FILE).get("job_id") == job_id:
                return self.entry(name, version)
        return None

    # ---- writing -----------------------------------------------------------------------------

    @contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """Exclusive lock on ``name`` among all processes sharing the registry's filesystem."""
        lock_path = self.root / self.check_name(name) / _LOCK
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def staging_dir(self, name: str) -> Path:
        """A fresh empty folder in ``.tmp`` to build a version of ``name`` in."""
        staging = self.root / _STAGING
        staging.mkdir(parents=True, exist_ok=True)
        folder = staging / f"{self.check_name(name)}-{uuid.uuid4().hex}"
        folder.mkdir()
        return folder

    def commit(
        self,
        name: str,
        staged: Path,
        finish: Callable[[Path, int], None],
        *,
        job_id: str | None = None,
    ) -> PublishedStudent:
        """Move the built folder ``staged`` into place as the next version of ``name``.

        Under the name's lock: when ``job_id`` already published a version, that version is
        returned and ``staged`` is left for the caller to remove; otherwise the next number is
        allocated, ``finish(staged, version)`` writes the files that name the version (lineage,
        card), and the folder is renamed. A version that appeared meanwhile (another registry
        writer without the lock) moves the number on; nothing is ever overwritten.
        """
        if job_id is not None:
            try:
                check_job_id(job_id)
            except ValueError as exc:
                raise RegistryError(f"invalid job id {job_id!r}: {exc}") from None
        with self.lock(name):
            if job_id is not None:
                existing = self.find_job(name, job_id)
                if existing is not None:
                    return existing
            version = (self.versions(name) or [0])[-1] + 1
            while True:
                finish(staged, version)
                dest = self.root / name / f"v{version}"
                try:
                    os.rename(staged, dest)
                    break
                except OSError:
                    if not dest.exists():
                        raise
                    version += 1
        return self.entry(name, version)
