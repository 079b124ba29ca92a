"""Settings are validated once, at the edge, with messages that name the variable."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from services.settings import SettingsError, is_loopback, load_settings

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("LASTKD_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)  # no stray .env from the developer's checkout


def test_defaults_need_no_server(tmp_path: Path) -> None:
    s = load_settings(data_dir=tmp_path)
    assert s.resolved_store_path == tmp_path / "features.lmdb"
    assert s.resolved_broker_url.startswith("sqla+sqlite:///")
    assert s.resolved_result_backend.startswith("db+sqlite:///")
    assert s.resolved_data_roots == [(tmp_path / "datasets").resolve()]
    assert s.token() is None


def test_env_prefix_and_dotenv(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("LASTKD_TEACHER_BATCH_SIZE=12\nLASTKD_API_TOKEN=s3cret\n")
    monkeypatch.setenv("LASTKD_TEACHER_PORT", "9000")
    s = load_settings()
    assert s.teacher_batch_size == 12
    assert s.teacher_port == 9000
    assert s.token() == "s3cret"
    assert "s3cret" not in repr(s)


@pytest.mark.parametrize(
    ("var", "value", "fragment"),
    [
        ("LASTKD_TEACHER_PORT", "70000", "LASTKD_TEACHER_PORT"),
        ("LASTKD_TEACHER_BATCH_SIZE", "lots", "LASTKD_TEACHER_BATCH_SIZE"),
        ("LASTKD_STORE_MAP_SIZE", "10", "LASTKD_STORE_MAP_SIZE"),
        ("LASTKD_TEACHER_DEVICE", "tpu", "LASTKD_TEACHER_DEVICE"),
        ("LASTKD_DATA_ROOTS", "not-json", "LASTKD_DATA_ROOTS"),
    ],
)
def test_bad_values_name_the_variable(monkeypatch: pytest.MonkeyPatch, var: str, value: str, fragment: str) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert fragment in str(info.value)


def test_public_bind_requires_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LASTKD_TRAINER_HOST", "0.0.0.0")
    with pytest.raises(SettingsError, match="LASTKD_API_TOKEN"):
        load_settings()
    monkeypatch.setenv("LASTKD_API_TOKEN", "t")
    assert load_settings().trainer_host == "0.0.0.0"


@pytest.mark.parametrize(("host", "expected"), [("127.0.0.1", True), ("::1", True), ("localhost", True),
                                                 ("0.0.0.0", False), ("10.1.2.3", False), ("example.org", False)])
def test_is_loopback(host: str, expected: bool) -> None:
    assert is_loopback(host) is expected


def test_cli_reports_bad_settings(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "LASTKD_TEACHER_PORT": "-1", "HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "services.cli", "store", "stats"], cwd=tmp_path, env=env | {"PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "LASTKD_TEACHER_PORT" in proc.stderr
    assert "Traceback" not in proc.stderr
