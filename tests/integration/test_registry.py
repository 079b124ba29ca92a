"""The torch-free registry: versions allocated under a lock, atomic rename, idempotent per job id,
hostile names refused, concurrent publishers never overwrite each other."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from lastkd.errors import NotFoundError
from lastkd.registry import PublishedStudent, Registry, RegistryError


def _publish(reg: Registry, name: str, job_id: str | None = None, top1: float = 0.5) -> PublishedStudent:
    staged = reg.staging_dir(name)
    (staged / "metrics.json").write_text(json.dumps({"final": {"top1": top1}}))

    def finish(folder: Path, version: int) -> None:
        (folder / "lineage.json").write_text(json.dumps({"job_id": job_id, "version": version, "created": "now"}))

    return reg.commit(name, staged, finish, job_id=job_id)


def test_versions_are_allocated_in_order_and_listed(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "reg")
    assert reg.entries() == [] and reg.versions("a") == []
    first, second = _publish(reg, "a", top1=0.25), _publish(reg, "a")
    other = _publish(reg, "b")
    assert (first.version, second.version, other.version) == (1, 2, 1)
    assert [(e.name, e.version, e.top1) for e in reg.entries()] == [("a", 1, 0.25), ("a", 2, 0.5), ("b", 1, 0.5)]
    assert reg.path("a", "v2") == reg.path("a", 2) == reg.path("a", "2") == tmp_path / "reg" / "a" / "v2"
    assert json.loads((first.path / "lineage.json").read_text())["version"] == 1
    assert not any((tmp_path / "reg" / ".tmp").iterdir())  # nothing left in staging


def test_publishing_is_idempotent_per_job_id(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    once = _publish(reg, "a", job_id="job-1")
    again = _publish(reg, "a", job_id="job-1")
    assert again == once and reg.versions("a") == [1]
    assert reg.find_job("a", "job-1") == once and reg.find_job("a", "job-2") is None


def test_concurrent_publishers_get_distinct_versions(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    with ThreadPoolExecutor(8) as pool:
        versions = sorted(p.version for p in pool.map(lambda i: _publish(reg, "a", job_id=f"j{i}"), range(16)))
    assert versions == list(range(1, 17))


@pytest.mark.parametrize("name", ["../x", "a/b", "", ".hidden", "a" * 65, "a\x00b", "-x"])
def test_hostile_names_are_refused(tmp_path: Path, name: str) -> None:
    reg = Registry(tmp_path)
    with pytest.raises(RegistryError):
        reg.staging_dir(name)
    with pytest.raises(NotFoundError):
        reg.path(name, 1)


@pytest.mark.parametrize("version", ["v0", "0", "-1", "v1x", "1.5", "v99999999999", True])
def test_bad_or_missing_versions_are_not_found(tmp_path: Path, version: object) -> None:
    reg = Registry(tmp_path)
    _publish(reg, "a")
    with pytest.raises(NotFoundError):
        reg.path("a", version)  # type: ignore[arg-type]  # hostile on purpose
    with pytest.raises(NotFoundError):
        reg.path("a", 2)


def test_invalid_job_id_is_refused_before_anything_moves(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    with pytest.raises(RegistryError, match="job id"):
        _publish(reg, "a", job_id="../../etc")
    assert reg.versions("a") == []


def test_the_registry_does_not_import_torch() -> None:
    code = "import sys, lastkd.registry; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "False"
