"""Helpers shared by the tests that run live processes (servers, workers, whole stacks): free
ports, waiting for a condition or an HTTP endpoint, and finding / killing a process tree.

One copy for ``tests/stack`` and ``tests/teacher``; the port helpers are the ones
``lastkd.services.stack`` uses itself, so a test and the stack agree on what "free" means.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import httpx

from lastkd.services.stack import free_port, port_free
from tests.support.paths import PROJECT_ROOT


def lastkd_env(data_dir: Path, **overrides: str) -> dict[str, str]:
    """A clean environment for a lastkd child process: no inherited LASTKD_*, the tiny
    random-init teacher on the CPU, the store map kept small; ``overrides`` win."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LASTKD_")}
    env.update(
        PYTHONPATH=str(PROJECT_ROOT),
        LASTKD_DATA_DIR=str(data_dir),
        LASTKD_STORE_MAP_SIZE=str(64 << 20),
        LASTKD_TEACHER_MODEL="videomae_v2_tiny",
        LASTKD_TEACHER_RANDOM_INIT="true",
        LASTKD_TEACHER_DEVICE="cpu",
        LASTKD_DECODE_WORKERS="2",
        OMP_NUM_THREADS="2",
    )
    env.update(overrides)
    return env


__all__ = [
    "descendants",
    "free_port",
    "kill_all",
    "lastkd_env",
    "port_free",
    "port_open",
    "running",
    "wait_for",
    "wait_http",
]


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """True when something accepts TCP connections on ``host:port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def wait_for(
    predicate: Callable[[], Any],
    timeout: float,
    what: str,
    interval: float = 0.2,
    describe: Callable[[], str] | None = None,
) -> Any:
    """Poll ``predicate`` until it returns something truthy (returned); AssertionError naming
    ``what`` (and what ``describe`` says then) after ``timeout`` seconds. The predicate may raise
    to fail early."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}" + (f"\n{describe()}" if describe else ""))


def wait_http(
    url: str,
    timeout: float,
    *,
    proc: subprocess.Popen[Any] | None = None,
    log: Callable[[], str] = lambda: "",
) -> None:
    """Wait until ``GET url`` answers 200. When ``proc`` exits first, raise AssertionError with
    its exit code and ``log()`` (the server's output) instead of waiting out the timeout."""

    def answered() -> bool:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited with {proc.returncode} before {url} answered:\n{log()}")
        try:
            return httpx.get(url, timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_for(answered, timeout, f"{url} to answer 200")
    except AssertionError as exc:
        if "timed out" in str(exc):
            raise AssertionError(f"{exc}\n{log()}") from None
        raise


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (children, grandchildren, ...), read from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def kill_all(pids: Iterable[int]) -> None:
    """SIGKILL each of ``pids`` (by id, never by name): last-resort cleanup after a failed test."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
