"""``import lastkd`` registers the teacher with timm in either import order, and stays torch-free
until timm is in use (fresh interpreters: the registration is an import-time effect)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PROBE = """
import json, sys
{imports}
before = {{"torch": "torch" in sys.modules, "timm": "timm" in sys.modules}}
import timm
model = timm.create_model("videomae_v2_vit_b", num_classes=0)
print(json.dumps({{"before": before, "dim": model.num_features, "names": timm.list_models("videomae_v2_*")}}))
"""


def _probe(imports: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(imports=imports)], capture_output=True, text=True, timeout=120, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("imports", ["import timm, lastkd", "import lastkd, timm", "import lastkd"])
def test_timm_knows_the_teacher_after_import_lastkd(imports: str) -> None:
    result = _probe(imports)
    assert result["dim"] == 768
    assert "videomae_v2_vit_b" in result["names"] and "videomae_v2_tiny" in result["names"]


def test_import_lastkd_alone_does_not_import_torch() -> None:
    # Decoder processes and the settings-only commands import lastkd; torch would cost them
    # seconds and hundreds of MB each.
    result = _probe("import lastkd, lastkd.hashing, lastkd.devices")
    assert result["before"] == {"torch": False, "timm": False}
