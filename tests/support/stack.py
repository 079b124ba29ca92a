"""Live trainer stacks for the tests: real ``lastkd serve-trainer`` (uvicorn) and real
``lastkd worker`` (Celery prefork) subprocesses, on the embedded SQLite broker or on Redis.

The data is tiny and real: a synthetic NTU-format skeleton set from ``synth.generate`` and a
feature store (LMDB) holding one random vector per sample name, written directly through
``featurestore`` (the teacher's POST /embed path is exercised by the demo test). Each stack has
its own data dir (job DB, broker file, registry), a free port and, on Redis, its own queue name
and database number, so concurrent runs never see each other's jobs.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.support.live import free_port, port_open, wait_for, wait_http
from tests.support.paths import PROJECT_ROOT

TOKEN = "stack-token-0123456789"
REDIS_PORT = 6379
TEACHER_DIM = 16
START_TIMEOUT_S = 120.0


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TinyData:
    """A synthetic dataset inside a data root plus a feature store covering its samples."""

    root: Path  # the data root
    skeletons: Path
    store_path: Path
    feature_set: str
    names: list[str]


def tiny_config(
    data: TinyData,
    name: str = "tiny",
    *,
    epochs: int = 1,
    steps: int = 1,
    distill: bool = True,
    samples: int = 2,
    **extra: Any,
) -> dict[str, Any]:
    """A TrainConfig (JSON) for a job of a few seconds: small variant, 16 frames, 2-sample splits."""
    config: dict[str, Any] = {
        "name": name,
        "epochs": epochs,
        "batch_size": 2,
        "max_steps_per_epoch": steps,
        "device": "cpu",
        "data": {"path": "synth/skeletons", "num_frames": 16, "max_samples": samples},
        "eval": {"jitter_stds": [], "joint_drop_probs": [], "frame_drop_probs": []},
    }
    if distill:
        config["distill"] = {"feature_set": data.feature_set, "projector_hidden": 32}
    config.update(extra)
    return config


def make_tiny_data(base: Path) -> TinyData:
    """Generate the synthetic set under ``base/datasets`` and a feature store covering it."""
    from lastkd.featurestore import FeatureStore
    from lastkd.student.synth import generate

    root = base / "datasets"
    result = generate(root / "synth", classes=2, samples_per_class=4, frames=40, video=False, seed=3)
    store_path = base / "features.lmdb"
    store = FeatureStore(store_path, map_size=32 << 20)
    try:
        meta = store.create_set(
            teacher="videomae_v2_tiny",
            weights_sha256=None,
            preprocessing={"test": "stack"},
            dim=TEACHER_DIM,
            dtype="float16",
        )
        vectors = np.random.default_rng(0).standard_normal((len(result.names), TEACHER_DIM)).astype(np.float16)
        store.put_many(meta.set_id, result.names, vectors)
    finally:
        store.close()
    return TinyData(root, result.skeleton_dir, store_path, meta.set_id, list(result.names))


def big_raw_folder(data: TinyData) -> tuple[str, int]:
    """A new (so uncached) raw-NTU folder inside the data root with enough files for the parallel
    parse pool; returns its path relative to the root and its file count."""
    from lastkd.student.data.readers import POOL_MIN_FILES
    from lastkd.student.synth import generate

    name = f"big-{uuid.uuid4().hex[:8]}"
    per_class = POOL_MIN_FILES // 2 + 2
    result = generate(data.root / name, classes=2, samples_per_class=per_class, frames=36, video=False, seed=5)
    return f"{name}/skeletons", len(result.names)


# --------------------------------------------------------------------------------------------
# processes
# --------------------------------------------------------------------------------------------
def stack_env(data_dir: Path, data: TinyData, **overrides: str) -> dict[str, str]:
    """A clean environment for a lastkd process (no inherited LASTKD_*)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LASTKD_")}
    env.update(
        PYTHONPATH=str(PROJECT_ROOT),
        LASTKD_DATA_DIR=str(data_dir),
        LASTKD_DATA_ROOTS=json.dumps([str(data.root)]),
        LASTKD_STORE_PATH=str(data.store_path),
        LASTKD_STORE_MAP_SIZE=str(32 << 20),
        LASTKD_API_TOKEN=TOKEN,
        OMP_NUM_THREADS="1",
    )
    env.update(overrides)
    return env


@dataclass
class Proc:
    """A lastkd subprocess in its own process group, with its log file."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def children(self) -> list[int]:
        """Pids of this process's direct children (a worker's fork server and resource tracker)."""
        return _children(self.proc.pid)

    def fork_server(self) -> int | None:
        """The pid of a worker's runner fork server (the child that runs multiprocessing.forkserver)."""
        servers = [pid for pid in self.children() if "forkserver" in cmdline(pid)]
        assert len(servers) <= 1, servers
        return servers[0] if servers else None

    def runners(self) -> list[int]:
        """Pids of a worker's runner processes (one per job in training), children of its fork server."""
        server = self.fork_server()
        return _children(server) if server is not None else []

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM the group (graceful), SIGKILL if it hangs."""
        if self.proc.poll() is None:
            with _suppress():
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        with _suppress():
            os.killpg(self.proc.pid, signal.SIGKILL)  # any child left behind

    def kill(self) -> None:
        """kill -9 the whole process group (parent, fork server, runners)."""
        with _suppress():
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def cmdline(pid: int) -> str:
    """The command line of ``pid`` ('' when it is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class _suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return exc[0] is not None and issubclass(exc[0], (ProcessLookupError, PermissionError))  # type: ignore[arg-type]


def spawn(name: str, args: list[str], env: dict[str, str], log_dir: Path) -> Proc:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lastkd.services.cli", *args],
            env=env,
            cwd=PROJECT_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Proc(name, proc, log_path)


@dataclass
class Stack:
    """One trainer API plus its workers, sharing a data dir and a queue."""

    data_dir: Path
    data: TinyData
    env: dict[str, str]
    queue: str
    api_args: list[str]
    api: Proc | None = None
    port: int = 0
    workers: list[Proc] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, token: str | None = TOKEN, timeout: float = 60.0) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def start_api(self) -> Proc:
        self.port = self.port or free_port()
        self.api = spawn(
            f"api-{self.port}",
            ["serve-trainer", "--port", str(self.port), "--queue", self.queue, *self.api_args],
            self.env,
            self.data_dir / "logs",
        )

        wait_http(f"{self.url}/health/live", START_TIMEOUT_S, proc=self.api.proc, log=self.api.log)
        return self.api

    def start_worker(self, name: str | None = None) -> Proc:
        name = name or f"w{len(self.workers)}-{uuid.uuid4().hex[:6]}"
        worker = spawn(
            f"worker-{name}",
            ["worker", "--queue", self.queue, "--name", f"{name}@test"],
            self.env,
            self.data_dir / "logs",
        )
        self.workers.append(worker)
        return worker

    def wait_worker_ready(self, worker: Proc, timeout: float = START_TIMEOUT_S) -> None:
        def ready() -> bool:
            if not worker.alive():
                raise AssertionError(f"worker exited during start-up:\n{worker.log()}")
            return " ready." in worker.log()

        wait_for(ready, timeout, f"{worker.name} to be ready")

    def job(self, job_id: str) -> dict[str, Any]:
        with self.client() as c:
            r = c.get(f"/jobs/{job_id}")
        assert r.status_code == 200, r.text
        return r.json()

    def wait_job(self, job_id: str, states: set[str], timeout: float = 300.0) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            body = self.job(job_id)
            if body["state"] in {"COMPLETED", "FAILED", "CANCELLED"} and body["state"] not in states:
                raise AssertionError(f"job {job_id} ended {body['state']}: {body['error']}\n{self.logs()}")
            return body if body["state"] in states else None

        return wait_for(reached, timeout, f"job {job_id} to reach {sorted(states)}\n", interval=0.3)

    def logs(self) -> str:
        parts = []
        for p in ([self.api] if self.api else []) + self.workers:
            parts.append(f"----- {p.name} -----\n{p.log()[-6000:]}")
        return "\n".join(parts)

    def stop(self) -> None:
        for w in self.workers:
            w.stop()
        if self.api is not None:
            self.api.stop()


def make_stack(base: Path, data: TinyData, broker_url: str | None = None, api_args: list[str] | None = None) -> Stack:
    data_dir = base / f"stack-{uuid.uuid4().hex[:8]}"
    data_dir.mkdir(parents=True)
    overrides = {"LASTKD_BROKER_URL": broker_url} if broker_url else {}
    queue = f"lastkd-test-{uuid.uuid4().hex[:10]}"
    return Stack(
        data_dir,
        data,
        stack_env(data_dir, data, **overrides),
        queue,
        api_args if api_args is not None else ["--stale-after", "4", "--sweep-interval", "0.5"],
    )


def redis_url(port: int = REDIS_PORT) -> str:
    """A Redis URL on a database number of this run (queue names are unique per stack as well)."""
    return f"redis://127.0.0.1:{port}/{random.Random(os.getpid()).randint(1, 15)}"


@dataclass
class RedisServer:
    """A private redis-server on a free port that a test may kill and restart (AOF on: it keeps
    its queues across the restart, as a compose Redis with a volume does)."""

    port: int
    dir: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--dir",
                str(self.dir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_for(lambda: port_open(self.port), 20, f"redis-server on port {self.port}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


def require_redis() -> None:
    """Skip (locally) or fail (in CI, ``CI=true``) a test that needs Redis when none answers."""
    if not port_open(REDIS_PORT):
        reason = f"Redis is not answering on 127.0.0.1:{REDIS_PORT} (this test needs a real Redis)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(reason)
        pytest.skip(reason + "; start one with: redis-server --daemonize yes --port 6379 --save ''")


def sse_events(client: httpx.Client, path: str, timeout: float = 300.0) -> list[tuple[str, dict[str, Any]]]:
    """Read a server-sent-event stream to its end; returns (event, data) pairs."""
    out: list[tuple[str, dict[str, Any]]] = []
    event = "message"
    with client.stream("GET", path, timeout=timeout) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                out.append((event, json.loads(line[5:])))
                event = "message"
    return out
