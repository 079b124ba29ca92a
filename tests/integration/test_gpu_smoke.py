"""The GPU smoke script runs on a machine without a usable GPU too: it parses its arguments,
checks what it needs, and refuses clearly (exit 3, one JSON line) instead of measuring the CPU."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[2]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": str(PROJECT / ".venv" / "bin" / "python")}
    return subprocess.run(
        ["bash", str(PROJECT / "bench" / "gpu_smoke.sh"), *args], capture_output=True, text=True, env=env, timeout=120
    )


def test_without_cuda_it_refuses_with_exit_3_and_says_so(tmp_path: Path) -> None:
    done = _run("--out", str(tmp_path))
    assert done.returncode == 3, done.stdout + done.stderr
    last = json.loads(done.stdout.strip().splitlines()[-1])
    assert last["ok"] is False and "CUDA is not available" in last["error"]
    assert "CUDA is not available" in done.stderr


def test_a_missing_clip_is_refused_before_anything_runs(tmp_path: Path) -> None:
    done = _run("--out", str(tmp_path), "--clip", str(tmp_path / "nope.avi"))
    assert done.returncode == 2 and "clip not found" in done.stdout and "pass --clip" in done.stderr
