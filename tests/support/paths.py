"""Where the project and the read-only reference material (``../shared``) are, for every test."""

from __future__ import annotations

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
SHARED = PROJECT_ROOT.parent / "shared"
REFERENCE = SHARED / "reference"
NTU_SAMPLE_DIR = SHARED / "data" / "ntu_sample"
NTU_SAMPLE_SKELETON = NTU_SAMPLE_DIR / "S001C001P001R001A001.skeleton"
NTU_SAMPLE_VIDEO = NTU_SAMPLE_DIR / "S001C001P001R001A001_rgb.avi"
