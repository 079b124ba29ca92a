"""Live teacher services for the tests: ``lastkd serve-teacher`` in a real subprocess.

Each server gets its own data dir (store, uploads) and a free port, runs the tiny VideoMAE V2
config with an explicitly random-initialised teacher, and is torn down with SIGTERM (so the
lifespan shutdown runs). A test talks to it with httpx only.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.support.live import free_port, lastkd_env, wait_http

TOKEN = "test-token-0123456789"
STARTUP_TIMEOUT_S = 180.0


def teacher_env(data_dir: Path, **overrides: str) -> dict[str, str]:
    """A clean environment for a lastkd process: no inherited LASTKD_*, tiny random-init teacher."""
    return lastkd_env(data_dir, **overrides)


def run_cli(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run ``lastkd ARGS`` (as ``python -m lastkd.services.cli``) and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "lastkd.services.cli", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@dataclass
class LiveTeacher:
    """A running teacher service."""

    url: str
    data_dir: Path
    token: str | None
    proc: subprocess.Popen[bytes]
    log_path: Path

    def client(self, token: str | None = "default", timeout: float = 120.0) -> httpx.Client:
        """An httpx client; ``token="default"`` sends the server's token (None sends none)."""
        token = self.token if token == "default" else token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def metrics(self) -> str:
        """The /metrics text."""
        return httpx.get(f"{self.url}/metrics", timeout=30).text

    def metric(self, name: str, labels: str = "") -> float:
        """The value of one sample in /metrics (0.0 when absent)."""
        pattern = re.compile(rf"^{re.escape(name)}{re.escape(labels)}\s+([0-9.eE+-]+)$", re.MULTILINE)
        match = pattern.search(self.metrics())
        return float(match.group(1)) if match else 0.0

    def active_set(self) -> dict:
        """The metadata (with count) of the feature set this server writes."""
        body = httpx.get(f"{self.url}/feature-sets", timeout=30).json()
        return next(s for s in body["feature_sets"] if s["set_id"] == body["active"])

    def log(self) -> str:
        """Everything the server wrote so far."""
        return self.log_path.read_text(errors="replace")


def start_teacher(data_dir: Path, **env_overrides: str) -> LiveTeacher:
    """Start ``lastkd serve-teacher`` and wait until /health/ready answers 200."""
    data_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = teacher_env(data_dir, LASTKD_TEACHER_PORT=str(port), **env_overrides)
    log_path = data_dir / "server.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "lastkd.services.cli", "serve-teacher"],
        env=env,
        cwd=data_dir,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    server = LiveTeacher(f"http://127.0.0.1:{port}", data_dir, env.get("LASTKD_API_TOKEN"), proc, log_path)
    try:
        wait_http(f"{server.url}/health/ready", STARTUP_TIMEOUT_S, proc=proc, log=server.log)
    except AssertionError:
        stop_teacher(server)
        raise
    return server


def stop_teacher(server: LiveTeacher) -> None:
    """SIGTERM (graceful: lifespan shutdown), then SIGKILL if it hangs."""
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait(timeout=30)
