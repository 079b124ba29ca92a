"""``lastkd up`` as a user runs it: a real process tree (teacher API, trainer API, Celery worker)
started from the CLI in a subprocess, stopped with Ctrl-C (SIGINT), and torn down when one of
its children dies. Every process the stack started must be gone afterwards.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from lastkd.services.settings import Settings, load_settings
from lastkd.services.stack import settings_env
from tests.support.live import descendants, free_port, kill_all, lastkd_env, port_free, running
from tests.support.paths import PROJECT_ROOT

READY_TIMEOUT_S = 180.0
EXIT_TIMEOUT_S = 60.0


def up_env(data_dir: Path, **overrides: str) -> dict[str, str]:
    """A clean environment: no inherited LASTKD_*, tiny random-init teacher, free ports."""
    defaults = {
        "LASTKD_DECODE_WORKERS": "1",
        "LASTKD_TEACHER_PORT": str(free_port()),
        "LASTKD_TRAINER_PORT": str(free_port()),
        "OMP_NUM_THREADS": "1",
    }
    return lastkd_env(data_dir, **(defaults | overrides))


class Up:
    """``lastkd up`` in a subprocess, its combined output in a file."""

    def __init__(self, tmp_path: Path, *args: str, **env_overrides: str) -> None:
        self.env = up_env(tmp_path / "data", **env_overrides)
        self.log_path = tmp_path / "up.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "lastkd.services.cli", "up", *args],
                cwd=tmp_path,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.teacher = f"http://127.0.0.1:{self.env['LASTKD_TEACHER_PORT']}"
        self.trainer = f"http://127.0.0.1:{self.env['LASTKD_TRAINER_PORT']}"

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"lastkd up exited with {self.proc.returncode}:\n{self.output()}"
            if "press Ctrl-C to stop" in self.output() and all(self._ready(u) for u in (self.teacher, self.trainer)):
                return
            time.sleep(0.3)
        raise AssertionError(f"lastkd up not ready within {READY_TIMEOUT_S:.0f}s:\n{self.output()}")

    @staticmethod
    def _ready(url: str) -> bool:
        try:
            return httpx.get(f"{url}/health/ready", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def child_pid(self, name: str) -> int:
        match = re.search(rf"started {name} \(pid (\d+)\)", self.output())
        assert match, f"no pid announced for {name}:\n{self.output()}"
        return int(match.group(1))

    def wait_exit(self) -> int:
        try:
            return self.proc.wait(timeout=EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"lastkd up did not exit within {EXIT_TIMEOUT_S:.0f}s:\n{self.output()}") from None

    def kill_all(self, pids: set[int]) -> None:
        """Last-resort cleanup so a failing test leaves no processes behind."""
        kill_all(pids | {self.proc.pid})
        self.proc.wait(timeout=10)


@pytest.fixture
def started(tmp_path: Path) -> Iterator[tuple[Up, set[int]]]:
    up = Up(tmp_path)
    pids: set[int] = set()
    try:
        up.wait_ready()
        pids = descendants(up.proc.pid)
        yield up, pids
    finally:
        if up.proc.poll() is None or any(running(p) for p in pids):
            up.kill_all(pids)


@pytest.mark.timeout(300)
def test_ctrl_c_stops_every_process_and_exits_zero(started: tuple[Up, set[int]]) -> None:
    up, pids = started
    names = {name: up.child_pid(name) for name in ("teacher", "trainer", "worker")}
    assert set(names.values()) <= pids, "the three components must be children of `lastkd up`"
    # The worker's Celery pool process and the teacher's decoder processes are grandchildren.
    assert len(pids) > 3, f"expected sub-processes below the components, found {sorted(pids)}"

    up.proc.send_signal(signal.SIGINT)
    assert up.wait_exit() == 0, up.output()

    left = sorted(p for p in pids if running(p))
    assert not left, f"processes left running after Ctrl-C: {left}\n{up.output()}"
    assert port_free(int(up.env["LASTKD_TEACHER_PORT"])) and port_free(int(up.env["LASTKD_TRAINER_PORT"]))
    out = up.output()
    assert "stopping (signal received)" in out and "stopped" in out
    # Each child's log is kept on disk too.
    logs = Path(up.env["LASTKD_DATA_DIR"]) / "logs"
    assert "Application startup complete" in (logs / "teacher.log").read_text()
    assert re.search(r"@\S+ ready\.", (logs / "worker.log").read_text())


@pytest.mark.timeout(300)
def test_a_dead_child_stops_the_others_and_exits_nonzero(started: tuple[Up, set[int]]) -> None:
    up, pids = started
    worker = up.child_pid("worker")
    os.kill(worker, signal.SIGKILL)

    code = up.wait_exit()
    assert code != 0, up.output()
    out = up.output()
    assert re.search(rf"worker \(pid {worker}\) was killed by signal 9", out), out
    assert "stopping the other components" in out
    left = sorted(p for p in pids if running(p))
    assert not left, f"processes left running after the worker died: {left}\n{out}"


@pytest.mark.faults
@pytest.mark.timeout(300)
def test_kill9_of_up_leaves_no_process(started: tuple[Up, set[int]]) -> None:
    up, pids = started
    assert len(pids) > 3, f"expected the components and their sub-processes, found {sorted(pids)}"
    os.kill(up.proc.pid, signal.SIGKILL)
    up.proc.wait(timeout=10)
    deadline = time.monotonic() + EXIT_TIMEOUT_S  # each component shuts down in order, then exits
    while time.monotonic() < deadline and any(running(p) for p in pids):
        time.sleep(0.2)
    left = sorted(p for p in pids if running(p))
    assert not left, f"processes left running after kill -9 of lastkd up: {left}"
    assert port_free(int(up.env["LASTKD_TEACHER_PORT"])) and port_free(int(up.env["LASTKD_TRAINER_PORT"]))


@pytest.mark.timeout(240)
def test_a_child_failing_at_start_up_is_named_and_nothing_is_left(tmp_path: Path) -> None:
    # The teacher refuses an unknown model during its lifespan start-up.
    up = Up(tmp_path, LASTKD_TEACHER_MODEL="videomae_v2_nonexistent")
    try:
        code = up.wait_exit()
    finally:
        if up.proc.poll() is None:
            up.kill_all(descendants(up.proc.pid))
    out = up.output()
    assert code == 1, out
    assert re.search(r"teacher \(pid \d+\) exited with code \d+ during start-up", out), out
    assert "videomae_v2_nonexistent" in out  # the teacher's own reason, quoted from its log
    for name in ("trainer", "worker"):
        pid = up.child_pid(name)
        assert not running(pid), f"{name} (pid {pid}) still running:\n{out}"


@pytest.mark.parametrize(
    ("args", "env", "needle"),
    [
        ((), {"LASTKD_TEACHER_PORT": "18555", "LASTKD_TRAINER_PORT": "18555"}, "need different ports"),
        ((), {"LASTKD_TEACHER_RANDOM_INIT": "false"}, "no teacher weights"),
        (("--ready-timeout", "0"), {}, "--ready-timeout must be"),
        (("--grace", "-1"), {}, "--grace must be"),
        ((), {"LASTKD_TEACHER_PORT": "70000"}, "LASTKD_TEACHER_PORT"),
    ],
)
def test_bad_settings_are_refused_before_anything_starts(
    tmp_path: Path, args: tuple[str, ...], env: dict[str, str], needle: str
) -> None:
    full_env = up_env(tmp_path / "data", **env)
    result = subprocess.run(
        [sys.executable, "-m", "lastkd.services.cli", "up", *args],
        cwd=tmp_path,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert needle in result.stderr
    assert "started" not in result.stdout  # no child was spawned
    assert not (tmp_path / "data" / "logs").exists()


def test_children_get_exactly_the_parents_settings(tmp_path: Path) -> None:
    parent = load_settings(
        data_dir=tmp_path / "d",
        teacher_port=18001,
        trainer_port=18002,
        teacher_random_init=True,
        api_token="secret-token-123",
        data_roots=[tmp_path / "r1", tmp_path / "r2"],
        log_level="WARNING",
        max_clip_seconds=12.5,
    )
    env = settings_env(parent, base={"PATH": "/bin", "LASTKD_TEACHER_PORT": "1", "LASTKD_BROKER_URL": "redis://x"})
    assert env["PATH"] == "/bin"
    child = _settings_from_env(env, tmp_path)
    for name in Settings.model_fields:
        if name == "api_token":
            assert child.token() == "secret-token-123"
        elif name in ("data_dir", "data_roots"):
            continue
        elif name in ("store_path", "registry_dir", "jobs_dir", "broker_url", "result_backend"):
            continue  # None in the parent, explicit in the child: compared resolved below
        else:
            assert getattr(child, name) == getattr(parent, name), name
    assert child.data_dir == (tmp_path / "d").resolve()
    assert child.resolved_data_roots == [(tmp_path / "r1").resolve(), (tmp_path / "r2").resolve()]
    assert child.resolved_store_path == (tmp_path / "d" / "features.lmdb").resolve()
    assert child.resolved_registry_dir == (tmp_path / "d" / "registry").resolve()
    assert child.resolved_jobs_dir == (tmp_path / "d" / "jobs").resolve()
    # the inherited redis broker must not leak into a stack whose settings say "embedded"
    assert child.resolved_broker_url == f"sqla+sqlite:///{(tmp_path / 'd' / 'broker.sqlite').resolve()}"
    assert child.resolved_result_backend == parent.resolved_result_backend


def _settings_from_env(env: dict[str, str], cwd: Path) -> Settings:
    """Load Settings in a fresh interpreter with exactly ``env`` (as a child would)."""
    code = (
        "import json; from lastkd.services.settings import load_settings; s = load_settings(); "
        "d = json.loads(s.model_dump_json()); d['api_token'] = s.token(); print(json.dumps(d))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        env={**env, "PYTHONPATH": str(PROJECT_ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return Settings(**json.loads(result.stdout))


@pytest.mark.timeout(240)
def test_stack_gives_the_trainer_api_and_the_worker_one_queue(tmp_path: Path) -> None:
    from lastkd.services.stack import Stack

    settings = load_settings(data_dir=tmp_path / "d", trainer_port=free_port(), log_level="INFO")
    queue = "lastkd-test-shared-queue"
    stack = Stack(
        settings,
        components=("trainer", "worker"),
        echo=False,
        announce=False,
        cwd=PROJECT_ROOT,
        queue=queue,
        extra_env={"PYTHONPATH": str(PROJECT_ROOT), "OMP_NUM_THREADS": "1"},
    )
    try:
        stack.start()
        ready = httpx.get(f"{stack.trainer_url}/health/ready", timeout=10).json()
        assert ready["queue"] == queue
        assert f"queue {queue!r}" in stack.children["worker"].log_path.read_text()
        assert all(c.argv[c.argv.index("--queue") + 1] == queue for c in stack.children.values())
    finally:
        stack.stop()


def test_the_worker_is_ready_when_celery_says_so_at_any_log_level(tmp_path: Path) -> None:
    """Readiness comes from Celery's worker_ready signal (a file the worker writes), not from a log
    line: at WARNING nothing is logged, yet the stack sees the worker ready, and the file is gone
    once the worker stopped."""
    from lastkd.services.stack import Stack

    settings = load_settings(data_dir=tmp_path / "d", trainer_port=free_port(), log_level="WARNING")
    stack = Stack(
        settings,
        components=("worker",),
        echo=False,
        announce=False,
        cwd=PROJECT_ROOT,
        ready_timeout=120,
        extra_env={"PYTHONPATH": str(PROJECT_ROOT), "OMP_NUM_THREADS": "1"},
    )
    ready_file = stack.log_dir / "worker.ready"
    try:
        assert stack.start()
        assert ready_file.read_text().strip().isdigit()
        assert " ready." not in stack.children["worker"].log_path.read_text()  # no INFO line to parse
    finally:
        stack.stop()
    assert not ready_file.exists()
