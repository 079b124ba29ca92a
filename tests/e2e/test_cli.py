"""The `lastkd` dispatcher, run as the installed console script in real subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lastkd.services.cli import COMMANDS, SUMMARIES
from tests.support.paths import PROJECT_ROOT

ROOT = PROJECT_ROOT
CONSOLE_SCRIPT = Path(sys.executable).parent / "lastkd"


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LASTKD_")}
    # wide enough that argparse does not wrap a summary across lines
    return env | {"LASTKD_DATA_DIR": str(tmp_path / "var"), "COLUMNS": "200"}


def lastkd(*args: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(CONSOLE_SCRIPT), *args], cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=120
    )


def test_console_script_is_installed() -> None:
    assert CONSOLE_SCRIPT.is_file() and os.access(CONSOLE_SCRIPT, os.X_OK)


def test_top_level_help_lists_every_command(tmp_path: Path) -> None:
    result = lastkd("--help", tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: lastkd")
    flat = " ".join(result.stdout.split())  # a long name puts its summary on the next line
    for name in COMMANDS:
        assert f" {name} {SUMMARIES[name]} " in flat, name


def test_every_command_has_a_summary() -> None:
    assert list(SUMMARIES) == list(COMMANDS)


def test_no_command_prints_usage_and_exits_2(tmp_path: Path) -> None:
    result = lastkd(tmp_path=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("usage: lastkd") and result.stdout == ""


@pytest.mark.parametrize("args", [("bogus",), ("Store",), ("bogus", "--help")])
def test_unknown_command_is_a_usage_error(tmp_path: Path, args: tuple[str, ...]) -> None:
    result = lastkd(*args, tmp_path=tmp_path)
    assert result.returncode == 2
    assert f"invalid choice: '{args[0]}'" in result.stderr and "Traceback" not in result.stderr


def test_version(tmp_path: Path) -> None:
    from importlib.metadata import version

    result = lastkd("--version", tmp_path=tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == f"lastkd {version('lastkd')}"


def test_every_registered_command_help_works(tmp_path: Path) -> None:
    """`lastkd NAME --help` imports the command's module and prints its own usage (run side by
    side: several of them import torch)."""
    procs = {
        name: subprocess.Popen(
            [str(CONSOLE_SCRIPT), name, "--help"],
            cwd=tmp_path,
            env=_env(tmp_path),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in COMMANDS
    }
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, f"lastkd {name} --help: {err}"
        assert out.startswith(f"usage: lastkd {name}"), (name, out[:200])
        assert "Traceback" not in err
    assert not (tmp_path / "var").exists()  # asking for help writes nothing


def test_help_of_store_does_not_import_torch() -> None:
    code = (
        "import sys\n"
        "from lastkd.services.cli import main\n"
        "try:\n    main(['store', 'stats', '--help'])\nexcept SystemExit as exc:\n    assert exc.code == 0\n"
        "print('torch' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "False"


def test_bad_settings_stop_every_command_before_it_runs(tmp_path: Path) -> None:
    env = _env(tmp_path) | {"LASTKD_BROKER_URL": "redsi://localhost"}
    result = subprocess.run(
        [str(CONSOLE_SCRIPT), "store", "ls"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("lastkd: invalid lastkd settings:") and "LASTKD_BROKER_URL" in result.stderr


@pytest.mark.parametrize("command", ["serve-teacher", "serve-trainer"])
@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--host", "0.0.0.0"], "LASTKD_API_TOKEN"),
        (["--port", "70000"], "port must be in 1..65535, got 70000"),
    ],
)
def test_serve_commands_refuse_bad_binds(command: str, flags: list[str], message: str, tmp_path: Path) -> None:
    # Both services share one bind check; neither may start listening on these.
    result = lastkd(command, *flags, tmp_path=tmp_path)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
