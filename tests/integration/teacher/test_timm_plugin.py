"""``import lastkd`` registers the teacher with timm in either import order, and stays torch-free
until timm is in use (fresh interpreters: the registration is an import-time effect)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

IMPORT_ORDERS = ("import timm, lastkd", "import lastkd, timm", "import lastkd")
TORCH_FREE = "import lastkd, lastkd.hashing, lastkd.devices"

PROBE = """
import json, sys
{imports}
before = {{"torch": "torch" in sys.modules, "timm": "timm" in sys.modules}}
import timm
model = timm.create_model("videomae_v2_vit_b", num_classes=0)
print(json.dumps({{"before": before, "dim": model.num_features, "names": timm.list_models("videomae_v2_*")}}))
"""


@pytest.fixture(scope="module")
def probes() -> dict[str, dict]:
    """Each probe's answer, keyed by its import line (the interpreters run side by side)."""
    procs = {
        imports: subprocess.Popen(
            [sys.executable, "-c", PROBE.format(imports=imports)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for imports in (*IMPORT_ORDERS, TORCH_FREE)
    }
    answers = {}
    for imports, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"{imports!r} failed:\n{err}"
        answers[imports] = json.loads(out.strip().splitlines()[-1])
    return answers


@pytest.mark.parametrize("imports", IMPORT_ORDERS)
def test_timm_knows_the_teacher_after_import_lastkd(probes: dict[str, dict], imports: str) -> None:
    result = probes[imports]
    assert result["dim"] == 768
    assert "videomae_v2_vit_b" in result["names"] and "videomae_v2_tiny" in result["names"]


def test_import_lastkd_alone_does_not_import_torch(probes: dict[str, dict]) -> None:
    # Decoder processes and the settings-only commands import lastkd; torch would cost them
    # seconds and hundreds of MB each.
    result = probes[TORCH_FREE]
    assert result["before"] == {"torch": False, "timm": False}
