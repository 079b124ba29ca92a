"""Settings are validated once, at the edge, with messages that name the variable."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lastkd.services.settings import SettingsError, is_loopback, load_settings
from tests.support.paths import PROJECT_ROOT

ROOT = PROJECT_ROOT


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
        ("LASTKD_TEACHER_DEVICE", "cuda:x", "must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'cuda:x'"),
        ("LASTKD_TEACHER_DEVICE", "cuda:\u00b2", "cuda:N"),  # a superscript digit: isdigit() but not a device
        ("LASTKD_TEACHER_DEVICE", "CUDA", "LASTKD_TEACHER_DEVICE"),
        ("LASTKD_TEACHER_SAMPLING", "multi", "LASTKD_TEACHER_SAMPLING: Input should be 'uniform' or 'multiview'"),
        ("LASTKD_TEACHER_PROTOCOL", "official", "'imagenet' or 'official_extraction'"),
        ("LASTKD_MAX_UPLOAD_BYTES", "0", "LASTKD_MAX_UPLOAD_BYTES"),
        ("LASTKD_MAX_CLIP_SECONDS", "-5", "LASTKD_MAX_CLIP_SECONDS"),
        ("LASTKD_MAX_CLIPS_PER_REQUEST", "1000000", "LASTKD_MAX_CLIPS_PER_REQUEST"),
        (
            "LASTKD_BROKER_URL",
            "redsi://localhost:6379/0",
            "LASTKD_BROKER_URL: 'redsi://localhost:6379/0' is not a usable URL",
        ),
        ("LASTKD_BROKER_URL", "localhost:6379", "expected one of amqp://"),
        ("LASTKD_BROKER_URL", "redis://localhost:63a9/0", "has a bad port"),
        ("LASTKD_BROKER_URL", "sqla+sqlite://", "names no database"),
        ("LASTKD_BROKER_URL", "db+sqlite:///x.db", "LASTKD_BROKER_URL"),  # a result-backend URL
        ("LASTKD_RESULT_BACKEND", "sqla+sqlite:///x.db", "LASTKD_RESULT_BACKEND"),  # a broker URL
        ("LASTKD_RESULT_BACKEND", "memory://", "LASTKD_RESULT_BACKEND"),
        ("LASTKD_API_TOKEN", "two words", "LASTKD_API_TOKEN: must not contain whitespace"),
    ],
)
def test_bad_values_name_the_variable(monkeypatch: pytest.MonkeyPatch, var: str, value: str, fragment: str) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert fragment in str(info.value)
    assert "Value error" not in str(info.value)  # pydantic's prefix is noise for a user


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("LASTKD_BROKER_URL", "redis://127.0.0.1:6379/0"),
        ("LASTKD_BROKER_URL", "rediss://:pw@cache.internal:6380/2"),
        ("LASTKD_BROKER_URL", "amqp://guest:guest@rabbit:5672//"),
        ("LASTKD_BROKER_URL", "sqla+sqlite:////var/lib/lastkd/broker.sqlite"),
        ("LASTKD_BROKER_URL", "sqla+postgresql://u:p@db/lastkd"),
        ("LASTKD_RESULT_BACKEND", "redis://redis:6379/1"),
        ("LASTKD_RESULT_BACKEND", "db+sqlite:///results.sqlite"),
        ("LASTKD_RESULT_BACKEND", "rpc://"),
    ],
)
def test_good_broker_urls_pass_unchanged(monkeypatch: pytest.MonkeyPatch, var: str, value: str) -> None:
    monkeypatch.setenv(var, value)
    s = load_settings()
    resolved = s.resolved_broker_url if var == "LASTKD_BROKER_URL" else s.resolved_result_backend
    assert resolved == value


def test_broker_password_is_not_echoed_in_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LASTKD_BROKER_URL", "redis://user:hunter2@cache:notaport/0")
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert "hunter2" not in str(info.value) and "redis://user:***@cache:notaport/0" in str(info.value)


def test_teacher_preprocessing_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    s = load_settings()
    assert (s.teacher_sampling, s.teacher_protocol) == ("uniform", "imagenet")
    monkeypatch.setenv("LASTKD_TEACHER_SAMPLING", "multiview")
    monkeypatch.setenv("LASTKD_TEACHER_PROTOCOL", "official_extraction")
    s = load_settings()
    assert (s.teacher_sampling, s.teacher_protocol) == ("multiview", "official_extraction")


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_good_devices(monkeypatch: pytest.MonkeyPatch, device: str) -> None:
    monkeypatch.setenv("LASTKD_TEACHER_DEVICE", device)
    assert load_settings().teacher_device == device


def test_the_training_config_shares_the_device_rule() -> None:
    from lastkd.student.config import TrainConfig

    fields = {"name": "s", "epochs": 1, "data": {"path": "x"}}
    assert TrainConfig.model_validate(fields | {"device": "cuda:1"}).device == "cuda:1"
    with pytest.raises(ValueError, match="must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'gpu'"):
        TrainConfig.model_validate(fields | {"device": "gpu"})


def test_empty_variables_mean_unset(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # what a copied .env.example with blanks looks like: blanks are defaults, not "" / "."
    (tmp_path / ".env").write_text("LASTKD_API_TOKEN=\nLASTKD_STORE_PATH=\nLASTKD_BROKER_URL=\n")
    s = load_settings(data_dir=tmp_path)
    assert s.token() is None and s.api_token is None
    assert s.resolved_store_path == tmp_path / "features.lmdb"
    assert s.resolved_broker_url.startswith("sqla+sqlite:///")


def test_empty_token_does_not_allow_a_public_bind(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LASTKD_API_TOKEN", "")
    monkeypatch.setenv("LASTKD_TEACHER_HOST", "0.0.0.0")
    with pytest.raises(SettingsError, match="set LASTKD_API_TOKEN"):
        load_settings()
    with pytest.raises(SettingsError, match="set LASTKD_API_TOKEN"):
        load_settings(api_token="   ")


def test_public_bind_requires_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LASTKD_TRAINER_HOST", "0.0.0.0")
    with pytest.raises(SettingsError, match="LASTKD_API_TOKEN"):
        load_settings()
    monkeypatch.setenv("LASTKD_API_TOKEN", "t")
    assert load_settings().trainer_host == "0.0.0.0"


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("127.0.0.1", True),
        ("::1", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("10.1.2.3", False),
        ("example.org", False),
    ],
)
def test_is_loopback(host: str, expected: bool) -> None:
    assert is_loopback(host) is expected


def test_cli_reports_bad_settings(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "LASTKD_TEACHER_PORT": "-1", "HOME": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "lastkd.services.cli", "store", "stats"],
        cwd=tmp_path,
        env=env | {"PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "LASTKD_TEACHER_PORT" in proc.stderr
    assert "Traceback" not in proc.stderr
