"""``lastkd up``: the whole embedded stack in one terminal.

Starts the teacher API (``lastkd serve-teacher``), the trainer API (``lastkd serve-trainer``) and
one Celery worker (``lastkd worker``) as child processes on the embedded defaults (LMDB store,
SQLite broker and result backend, no server to install), with the ports from the settings.
Each child's output is shown prefixed with its name (coloured on a terminal) and kept in
``<data dir>/logs/<name>.log``; ``up`` waits until both APIs answer ``/health/ready`` and the
worker says it is ready, then prints the URLs.

Ctrl-C (SIGINT) or SIGTERM stops every child: SIGTERM to each child first, SIGKILL for whatever
is left of its process group after a grace period. A worker busy with a job does not finish it;
once the stack runs again the trainer API requeues the job whose heartbeat stopped, and it
resumes from its last epoch checkpoint.
If one child dies on its own, the others are stopped and ``up`` exits non-zero, naming the child
and showing the end of its log.

:class:`Stack` is the same machinery as a context manager, used by ``lastkd demo`` and the tests::

    with Stack(settings) as stack:
        httpx.post(f"{stack.teacher_url}/embed", ...)
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any

import httpx
from pydantic import SecretStr

from lastkd.lifeline import LIFELINE_ENV
from lastkd.services.settings import Settings

__all__ = [
    "COMPONENTS",
    "Child",
    "Stack",
    "StackError",
    "add_parser",
    "free_port",
    "port_free",
    "run",
    "settings_env",
]

COMPONENTS: tuple[str, ...] = ("teacher", "trainer", "worker")
_COMMANDS = {"teacher": "serve-teacher", "trainer": "serve-trainer", "worker": "worker"}
_COLOURS = {"teacher": "\033[36m", "trainer": "\033[35m", "worker": "\033[33m", "up": "\033[1m"}
_RESET = "\033[0m"
_TAIL_LINES = 40
DEFAULT_READY_TIMEOUT_S = 300.0
DEFAULT_GRACE_S = 15.0


class StackError(RuntimeError):
    """The stack could not start, or one of its processes died."""


# --------------------------------------------------------------------------------------------
# ports
# --------------------------------------------------------------------------------------------
def _bind_host(host: str) -> str:
    return "127.0.0.1" if host in ("localhost", "") else host


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when ``host:port`` can be bound right now (nothing listens there).

    SO_REUSEADDR, as uvicorn sets it: connections of a server that just stopped linger in
    TIME_WAIT for a minute, which blocks a plain bind but not a server's, so without it a port
    would look taken for a while after everything on it is gone.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((_bind_host(host), port))
            return True
        except OSError:
            return False


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that the kernel reported free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_bind_host(host), 0))
        return int(sock.getsockname()[1])


# --------------------------------------------------------------------------------------------
# settings -> child environment
# --------------------------------------------------------------------------------------------
def _env_value(value: Any) -> str:
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Path):
        return str(value.resolve())
    if isinstance(value, (list, tuple)):
        return json.dumps([str(Path(v).resolve()) if isinstance(v, Path) else v for v in value])
    return str(value)


def settings_env(settings: Settings, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment that makes a child process load exactly ``settings``.

    Inherited ``LASTKD_*`` variables are dropped and every setting is written out again, with the
    derived locations (store, registry, jobs, data roots, broker, result backend) made explicit
    and absolute, so every child agrees on them whatever its working directory.
    """
    env = {k: v for k, v in (os.environ if base is None else base).items() if not k.startswith("LASTKD_")}
    for name in Settings.model_fields:
        value = getattr(settings, name)
        if value is None or (isinstance(value, list) and not value):
            continue
        env[f"LASTKD_{name.upper()}"] = _env_value(value)
    env.update(
        LASTKD_DATA_DIR=_env_value(Path(settings.data_dir)),
        LASTKD_STORE_PATH=_env_value(settings.resolved_store_path),
        LASTKD_REGISTRY_DIR=_env_value(settings.resolved_registry_dir),
        LASTKD_JOBS_DIR=_env_value(settings.resolved_jobs_dir),
        LASTKD_DATA_ROOTS=_env_value(settings.resolved_data_roots),
        LASTKD_BROKER_URL=settings.resolved_broker_url,
        LASTKD_RESULT_BACKEND=settings.resolved_result_backend,
        # Line-by-line logs through the pipe, not 8 KiB blocks.
        PYTHONUNBUFFERED="1",
    )
    return env


# --------------------------------------------------------------------------------------------
# one child process
# --------------------------------------------------------------------------------------------
@dataclass
class Child:
    """One process of the stack and what it printed."""

    name: str
    argv: list[str]
    proc: subprocess.Popen[bytes]
    log_path: Path
    tail: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=_TAIL_LINES))
    reader: threading.Thread | None = None

    @property
    def pid(self) -> int:
        """Process id of the child (also its process group id)."""
        return self.proc.pid

    def alive(self) -> bool:
        """True while the child has not exited."""
        return self.proc.poll() is None

    def tail_text(self) -> str:
        """The last lines the child printed, indented for an error message."""
        return "\n".join(f"    {line}" for line in self.tail) or "    (no output)"


def _kill_group(pid: int, sig: int) -> None:
    # Each child leads its own process group (start_new_session), which also holds its decode
    # workers / Celery pool processes; signalling the group reaches all of them.
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _group_alive(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


# --------------------------------------------------------------------------------------------
# the stack
# --------------------------------------------------------------------------------------------
class Stack:
    """The teacher API, the trainer API and one worker as child processes.

    ``echo`` writes each child's lines, prefixed, to ``out`` (all lines always go to
    ``<log_dir>/<name>.log``); ``announce`` writes the stack's own lines (started, ready...).
    ``components`` selects a subset (tests, benchmarks); ``queue`` names the Celery queue of the
    trainer API and the worker (default: the trainer's own default). Use as a context manager
    or call :meth:`start` / :meth:`stop`.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        components: Iterable[str] = COMPONENTS,
        echo: bool = True,
        announce: bool = True,
        out: IO[str] | None = None,
        colour: bool | None = None,
        log_dir: Path | None = None,
        ready_timeout: float = DEFAULT_READY_TIMEOUT_S,
        grace: float = DEFAULT_GRACE_S,
        python: str | None = None,
        cwd: Path | None = None,
        extra_env: Mapping[str, str] | None = None,
        queue: str | None = None,
    ) -> None:
        self.settings = settings
        self.components = tuple(components)
        unknown = [c for c in self.components if c not in COMPONENTS]
        if unknown or not self.components:
            raise ValueError(f"components must be a non-empty subset of {COMPONENTS}, got {self.components}")
        self.echo = echo
        self.announce = announce
        self.out = out or sys.stdout
        self.colour = (
            colour
            if colour is not None
            else bool(getattr(self.out, "isatty", lambda: False)()) and "NO_COLOR" not in os.environ
        )
        self.log_dir = Path(log_dir) if log_dir is not None else Path(settings.data_dir) / "logs"
        self._worker_ready_file = self.log_dir / "worker.ready"
        self.ready_timeout = ready_timeout
        self.grace = grace
        self.python = python or sys.executable
        self.cwd = Path(cwd) if cwd is not None else Path.cwd()
        self.env = settings_env(settings)
        self.env.update(extra_env or {})
        # The trainer API sends to this Celery queue and the worker consumes it: one value for both.
        self.queue = queue
        self.children: dict[str, Child] = {}
        self._print_lock = threading.Lock()
        self._stopped = False

    # --- addresses ---------------------------------------------------------------------------
    @property
    def teacher_url(self) -> str:
        """Base URL of the teacher API."""
        return f"http://{_url_host(self.settings.teacher_host)}:{self.settings.teacher_port}"

    @property
    def trainer_url(self) -> str:
        """Base URL of the trainer API."""
        return f"http://{_url_host(self.settings.trainer_host)}:{self.settings.trainer_port}"

    def urls(self) -> dict[str, str]:
        """The HTTP base URL of each running API."""
        found = {"teacher": self.teacher_url, "trainer": self.trainer_url}
        return {k: v for k, v in found.items() if k in self.components}

    # --- output ------------------------------------------------------------------------------
    def say(self, message: str, name: str = "up") -> None:
        """Print one line of the stack's own (when ``announce``), prefixed like the children's."""
        if self.announce:
            self._emit(name, message)

    def _emit(self, name: str, line: str) -> None:
        prefix = f"{name:<7}|"
        if self.colour:
            prefix = f"{_COLOURS.get(name, '')}{prefix}{_RESET}"
        with self._print_lock:
            try:
                self.out.write(f"{prefix} {line}\n")
                self.out.flush()
            except (OSError, ValueError):
                pass  # a closed terminal must not take the stack down

    def _pump(self, child: Child) -> None:
        assert child.proc.stdout is not None
        with open(child.log_path, "ab") as log:
            for raw in iter(child.proc.stdout.readline, b""):
                log.write(raw)
                log.flush()
                line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
                child.tail.append(line)
                if self.echo:
                    self._emit(child.name, line)

    # --- lifecycle ---------------------------------------------------------------------------
    def start(self, cancel: threading.Event | None = None) -> bool:
        """Start every component and wait until all are ready; on failure stop what started.

        Returns False (with the children still running) when ``cancel`` is set before everything
        is ready, True once all are ready. Raises :class:`StackError` when a child exits during
        start-up or is not ready within ``ready_timeout`` seconds; the message names the child
        and shows the end of its log.
        """
        if self.children:
            raise StackError("this stack was already started; make a new Stack")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            for name in self.components:
                self._spawn(name)
            return self._wait_ready(cancel)
        except BaseException:
            self.stop()
            raise

    def _spawn(self, name: str) -> Child:
        argv = [self.python, "-m", "lastkd.services.cli", _COMMANDS[name]]
        if self.queue is not None and name in ("trainer", "worker"):
            argv += ["--queue", self.queue]
        if name == "worker":
            argv += ["--ready-file", str(self._worker_ready_file)]
        log_path = self.log_dir / f"{name}.log"
        log_path.write_bytes(b"")
        proc = subprocess.Popen(
            # LIFELINE_ENV: the child shuts itself down if this process dies without stopping
            # it (kill -9), so a killed `lastkd up` leaves no service running.
            argv,
            cwd=self.cwd,
            env={**self.env, LIFELINE_ENV: str(os.getpid())},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            # Own process group: the terminal's Ctrl-C reaches `up` only, which then stops the
            # children in order; and killpg reaches a child's own sub-processes too.
            start_new_session=True,
        )
        child = Child(name, argv, proc, log_path)
        child.reader = threading.Thread(target=self._pump, args=(child,), name=f"log-{name}", daemon=True)
        child.reader.start()
        self.children[name] = child
        self.say(f"started {name} (pid {proc.pid}): lastkd {_COMMANDS[name]}")
        return child

    def _wait_ready(self, cancel: threading.Event | None) -> bool:
        deadline = time.monotonic() + self.ready_timeout
        pending = set(self.components)
        with httpx.Client(timeout=5.0) as client:
            while pending:
                if cancel is not None and cancel.is_set():
                    return False
                dead = self.dead_child()
                if dead is not None:
                    raise StackError(self.death_message(dead, during="start-up"))
                for name in sorted(pending):
                    if self._is_ready(client, name):
                        pending.discard(name)
                        self.say(f"{name} ready" + (f" at {self.urls()[name]}" if name in self.urls() else ""))
                if not pending:
                    break
                if time.monotonic() > deadline:
                    name = sorted(pending)[0]
                    child = self.children[name]
                    raise StackError(
                        f"{name} was not ready within {self.ready_timeout:.0f}s "
                        f"(log: {child.log_path}); last lines:\n{child.tail_text()}"
                    )
                time.sleep(0.25)
        return True

    def _is_ready(self, client: httpx.Client, name: str) -> bool:
        if name == "worker":  # the worker writes this file once it consumes (Celery's worker_ready)
            return self.children[name].alive() and self._worker_ready_file.exists()
        try:
            return client.get(f"{self.urls()[name]}/health/ready").status_code == 200
        except httpx.HTTPError:
            return False

    def dead_child(self) -> Child | None:
        """The first child that has exited, or None while all run."""
        for child in self.children.values():
            if not child.alive():
                return child
        return None

    def death_message(self, child: Child, during: str = "") -> str:
        """One message naming a dead child, how it ended, its log file and its last lines."""
        code = child.proc.returncode
        how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}"
        when = f" during {during}" if during else ""
        if child.reader is not None:
            child.reader.join(timeout=2.0)  # collect its last words before quoting them
        return f"{child.name} (pid {child.pid}) {how}{when}; log: {child.log_path}; last lines:\n{child.tail_text()}"

    def check(self) -> None:
        """Raise :class:`StackError` if any child has exited."""
        dead = self.dead_child()
        if dead is not None:
            raise StackError(self.death_message(dead))

    def wait(self, stop: threading.Event, poll: float = 0.25) -> Child | None:
        """Block until ``stop`` is set (returns None) or a child exits (returns it)."""
        while not stop.wait(poll):
            dead = self.dead_child()
            if dead is not None:
                return dead
        return None

    def stop(self, grace: float | None = None) -> dict[str, int | None]:
        """Stop every child: SIGTERM to each, then SIGKILL to its process group when it is still
        alive after ``grace`` seconds (and to any sub-process that outlived it). Returns each
        child's exit code. Safe to call more than once."""
        grace = self.grace if grace is None else grace
        if self._stopped:
            return {name: c.proc.returncode for name, c in self.children.items()}
        self._stopped = True
        # The worker first: it should stop taking jobs before the trainer API goes away.
        order = sorted(self.children.values(), key=lambda c: 0 if c.name == "worker" else 1)
        for child in order:
            if child.alive():
                # The leader only: uvicorn and Celery stop their own sub-processes in order
                # (a group-wide SIGTERM would kill a Celery pool child under its parent's feet).
                try:
                    child.proc.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace
        for child in order:
            try:
                child.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.say(f"{child.name} (pid {child.pid}) did not stop within {grace:.0f}s; killing it")
                _kill_group(child.pid, signal.SIGKILL)
                child.proc.wait()
        for child in order:
            # Sub-processes (decoders, pool workers) that outlived their leader.
            if _group_alive(child.pid):
                _kill_group(child.pid, signal.SIGTERM)
                end = time.monotonic() + 3.0
                while _group_alive(child.pid) and time.monotonic() < end:
                    time.sleep(0.05)
                _kill_group(child.pid, signal.SIGKILL)
            if child.reader is not None:
                child.reader.join(timeout=2.0)
            if child.proc.stdout is not None:
                child.proc.stdout.close()
        return {name: c.proc.returncode for name, c in self.children.items()}

    def __enter__(self) -> Stack:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _url_host(host: str) -> str:
    # A wildcard bind is reachable on loopback; IPv6 literals need brackets in URLs.
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------
def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``lastkd up``."""
    parser = subparsers.add_parser(
        "up",
        help="start teacher API + trainer API + one worker (embedded defaults); Ctrl-C stops all",
        description=(
            "Start the whole embedded stack: the teacher API, the trainer API and one Celery worker, "
            "on the LMDB store and the SQLite broker under LASTKD_DATA_DIR (no server to install), "
            "ports from LASTKD_TEACHER_PORT / LASTKD_TRAINER_PORT. Ctrl-C or SIGTERM stops every "
            "process; if one dies, the others are stopped and the exit status is 1."
        ),
    )
    parser.add_argument(
        "--ready-timeout",
        type=float,
        default=DEFAULT_READY_TIMEOUT_S,
        help=f"seconds to wait for every component to be ready (default {DEFAULT_READY_TIMEOUT_S:.0f})",
    )
    parser.add_argument(
        "--grace",
        type=float,
        default=DEFAULT_GRACE_S,
        help=f"seconds a component gets to stop before it is killed (default {DEFAULT_GRACE_S:.0f})",
    )
    parser.add_argument(
        "--quiet", action="store_true", help="do not echo the components' logs (they still go to <data dir>/logs)"
    )
    parser.set_defaults(func=run)
    return parser


def _preflight(settings: Settings, ready_timeout: float, grace: float) -> str | None:
    """A message naming the first setting or flag that prevents start-up, else None."""
    if not 0 < ready_timeout <= 86_400:
        return f"--ready-timeout must be in (0, 86400] seconds, got {ready_timeout}"
    if not 0 <= grace <= 3600:
        return f"--grace must be in [0, 3600] seconds, got {grace}"
    if settings.teacher_port == settings.trainer_port and settings.teacher_host == settings.trainer_host:
        return (
            f"LASTKD_TEACHER_PORT and LASTKD_TRAINER_PORT are both {settings.teacher_port}: "
            "the two APIs need different ports"
        )
    if settings.teacher_weights is None and not settings.teacher_random_init:
        return (
            "no teacher weights: set LASTKD_TEACHER_WEIGHTS to an official VideoMAE V2 checkpoint, "
            "or LASTKD_TEACHER_RANDOM_INIT=true for a random-init teacher (tests/demo only)"
        )
    return None


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Run the stack until Ctrl-C/SIGTERM (exit 0) or until a component dies (exit 1)."""
    problem = _preflight(settings, args.ready_timeout, args.grace)
    if problem:
        print(f"lastkd up: {problem}", file=sys.stderr)
        return 2
    stop = threading.Event()
    signals = {"count": 0}

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        signals["count"] += 1
        stop.set()
        if signals["count"] > 1:
            # A second Ctrl-C: no more patience for graceful shutdown.
            for child in stack.children.values():
                _kill_group(child.pid, signal.SIGKILL)

    stack = Stack(settings, echo=not args.quiet, ready_timeout=args.ready_timeout, grace=args.grace)
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _run_stack(stack, stop, settings)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run_stack(stack: Stack, stop: threading.Event, settings: Settings) -> int:
    random_init = settings.teacher_random_init and settings.teacher_weights is None
    stack.say(
        f"starting the embedded stack in {Path(settings.data_dir).resolve()} "
        f"(teacher {settings.teacher_model}{', RANDOM-INIT' if random_init else ''}; Ctrl-C stops everything)"
    )
    try:
        stack.start(cancel=stop)
    except StackError as exc:
        stack.say(f"error: {exc}")
        stack.say("stopped the other components")
        print(f"lastkd up: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 1
    if stop.is_set():
        stack.say("stopping (signal received)")
        stack.stop()
        stack.say("stopped")
        return 0
    stack.say(f"teacher API  {stack.teacher_url}  (POST /embed, GET /health/ready, /metrics)")
    stack.say(f"trainer API  {stack.trainer_url}  (POST /train, GET /jobs, /checkpoints)")
    stack.say(f"logs in {stack.log_dir.resolve()}; press Ctrl-C to stop")
    dead = stack.wait(stop)
    if dead is None:
        stack.say("stopping (signal received)")
        stack.stop()
        stack.say("stopped")
        return 0
    message = stack.death_message(dead)
    stack.say(f"error: {message}")
    stack.say("stopping the other components")
    stack.stop()
    print(f"lastkd up: {message.splitlines()[0]}", file=sys.stderr)
    return 1
