"""Shared test fixtures: where the read-only reference material lives, and torch threads."""

from __future__ import annotations

from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED = PROJECT_ROOT.parent / "shared"
REFERENCE = SHARED / "reference"
NTU_SAMPLE_DIR = SHARED / "data" / "ntu_sample"
NTU_SAMPLE_SKELETON = NTU_SAMPLE_DIR / "S001C001P001R001A001.skeleton"
NTU_SAMPLE_VIDEO = NTU_SAMPLE_DIR / "S001C001P001R001A001_rgb.avi"


def pytest_configure(config: pytest.Config) -> None:
    if not SHARED.is_dir():
        raise pytest.UsageError(f"reference material not found at {SHARED} (expected ../shared next to the project)")


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return SHARED
