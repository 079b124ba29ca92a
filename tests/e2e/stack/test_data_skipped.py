"""Through the real stack (uvicorn API + Celery worker): a job on a folder with corrupt skeleton
files completes, and the job record, the published metrics.json and the worker log say which
files were skipped (issue 8, item 11)."""

from __future__ import annotations

import json
import shutil
import uuid

import pytest

from tests.support.paths import NTU_SAMPLE_SKELETON
from tests.support.stack import Stack, TinyData, tiny_config

pytestmark = pytest.mark.faults


def test_job_on_corrupt_files_reports_them(embedded_stack: Stack, tiny_data: TinyData) -> None:
    folder = tiny_data.root / f"corrupt-{uuid.uuid4().hex[:6]}"
    shutil.copytree(tiny_data.skeletons, folder, ignore=shutil.ignore_patterns(".lastkd_cache"))
    real = NTU_SAMPLE_SKELETON.read_bytes()
    corrupt = {
        "S010C001P001R001A001": (real[: len(real) // 3], "truncated file"),
        "S010C001P002R001A002": (bytes(range(256)) * 8, "binary data"),
        "S010C001P003R001A001": (b"", "empty file"),
    }
    for name, (data, _) in corrupt.items():
        (folder / f"{name}.skeleton").write_bytes(data)
    name = f"skips-{uuid.uuid4().hex[:6]}"
    config = tiny_config(tiny_data, name, distill=False)
    config["data"]["path"] = str(folder.relative_to(tiny_data.root))
    try:
        with embedded_stack.client() as c:
            r = c.post("/train", json=config)
            assert r.status_code == 202, r.text
            job_id = r.json()["job_id"]
        job = embedded_stack.wait_job(job_id, {"COMPLETED", "FAILED", "CANCELLED"})
        assert job["state"] == "COMPLETED", job["error"]
        report = job["data_skipped"]
        assert report == job["metrics"]["data_skipped"]
        assert report["count"] == len(corrupt)
        for sample, (_, words) in corrupt.items():
            assert any(r.startswith(f"{sample}.skeleton:") and words in r for r in report["first"]), report

        published = embedded_stack.data_dir / "registry" / name / "v1"
        metrics = json.loads((published / "metrics.json").read_text())
        assert metrics["data_skipped"] == report
        assert f"skipped {len(corrupt)} unusable" in (published / "README.md").read_text()
        assert f"{len(corrupt)} data file(s)/sample(s) skipped as unusable" in embedded_stack.logs()
    finally:
        shutil.rmtree(folder)
