"""Benchmark of the job API and the Celery shell around the training engine.

Measures, on real processes (``lastkd serve-trainer`` under uvicorn, ``lastkd worker``):

* ``submit_p50_ms`` / ``submit_p99_ms``: latency of ``POST /train`` over N sequential submissions
  on the embedded SQLite broker (no worker consumes them, so the queue grows as it would under a
  burst); outside ``--quick`` the same on Redis is reported as ``redis_submit_*`` when Redis
  answers on 6379;
* ``queue_to_start_s``: from the API recording a job to a worker process claiming it (median of
  a few jobs on an idle worker; includes the fork of the fresh per-job child);
* ``celery_overhead``: (wall time of a job through API + broker + worker) / (wall time of
  ``engine.train`` + ``publish`` called directly in this process on the same job) - 1. The
  baseline is measured in the same run. ``--quick`` uses a job of a few seconds, where the fixed
  costs (fresh process, imports) weigh far more than on the one-minute job of the full run.

The last line of stdout is one JSON object with these keys.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _redis_up() -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", 6379)) == 0


class _Procs:
    """Child processes in their own process groups, all stopped on exit."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.env, self.log_dir, self.procs = env, log_dir, []

    def spawn(self, name: str, args: list[str], **env: str) -> subprocess.Popen[bytes]:
        log = open(self.log_dir / f"{name}.log", "wb")
        proc = subprocess.Popen([sys.executable, "-m", "services.cli", *args], env={**self.env, **env}, cwd=ROOT,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.procs.append(proc)
        return proc

    def api(self, queue: str, **env: str) -> str:
        port = _free_port()
        proc = self.spawn(f"api-{queue}", ["serve-trainer", "--port", str(port), "--queue", queue], **env)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError((self.log_dir / f"api-{queue}.log").read_text())
            try:
                if httpx.get(f"{url}/health/ready", timeout=5).status_code == 200:
                    return url
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError("trainer API did not become ready")

    def worker(self, queue: str, **env: str) -> Path:
        name = f"worker-{queue}"
        self.spawn(name, ["worker", "--queue", queue, "--name", f"{name}@bench"], **env)
        log = self.log_dir / f"{name}.log"
        deadline = time.monotonic() + 120
        while " ready." not in log.read_text(errors="replace"):
            if time.monotonic() > deadline:
                raise RuntimeError(log.read_text())
            time.sleep(0.2)
        return log

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def _submit_latencies(url: str, config: dict[str, Any], n: int) -> list[float]:
    out = []
    with httpx.Client(base_url=url, timeout=60) as client:
        for i in range(n):
            t0 = time.perf_counter()
            r = client.post("/train", json={**config, "seed": i})
            out.append((time.perf_counter() - t0) * 1000)
            if r.status_code != 202:
                raise RuntimeError(f"submit {i}: {r.status_code} {r.text}")
    return out


def _wait(client: httpx.Client, job_id: str, timeout: float = 600) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get(f"/jobs/{job_id}").json()
        if body["state"] in ("COMPLETED", "FAILED", "CANCELLED"):
            if body["state"] != "COMPLETED":
                raise RuntimeError(f"job {job_id} {body['state']}: {body['error']}")
            return body
        time.sleep(0.1)
    raise RuntimeError(f"job {job_id} did not finish in {timeout}s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short job and fewer runs (under a minute)")
    parser.add_argument("--submissions", type=int, default=200)
    args = parser.parse_args(argv)

    from featurestore import FeatureStore
    from services.trainer.config import TrainConfig
    from services.trainer.engine import train
    from services.trainer.publish import publish
    from services.trainer.synth import generate

    work = Path(tempfile.mkdtemp(prefix="lastkd-bench-jobs-"))
    data_root = work / "datasets"
    names = generate(data_root / "synth", classes=4, samples_per_class=6, frames=60, video=False, seed=1).names
    store_path = work / "features.lmdb"
    with FeatureStore(store_path, map_size=32 << 20) as store:
        meta = store.create_set(teacher="bench", weights_sha256=None, preprocessing={"bench": 1}, dim=16)
        store.put_many(meta.set_id, names, np.random.default_rng(0).standard_normal((len(names), 16)).astype(np.float16))

    epochs, steps = (1, 1) if args.quick else (3, 6)
    config = {
        "name": "bench", "epochs": epochs, "batch_size": 2, "max_steps_per_epoch": steps, "device": "cpu",
        "data": {"path": "synth/skeletons", "num_frames": 16, "max_samples": 2 if args.quick else 12},
        "eval": {"jitter_stds": [], "joint_drop_probs": [], "frame_drop_probs": []},
        "distill": {"feature_set": meta.set_id, "projector_hidden": 32},
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith("LASTKD_")}
    env.update(PYTHONPATH=str(ROOT), LASTKD_DATA_DIR=str(work / "var"), LASTKD_DATA_ROOTS=json.dumps([str(data_root)]),
               LASTKD_STORE_PATH=str(store_path), LASTKD_STORE_MAP_SIZE=str(32 << 20))
    env.setdefault("OMP_NUM_THREADS", "2")
    (work / "logs").mkdir()
    procs = _Procs(env, work / "logs")
    out: dict[str, Any] = {}
    try:
        # 1. submit latency (embedded broker, nobody consuming)
        queue = f"bench-submit-{uuid.uuid4().hex[:6]}"
        url = procs.api(queue)
        _submit_latencies(url, config, 5)  # warm-up
        lat = _submit_latencies(url, config, args.submissions)
        out["submit_p50_ms"] = round(_percentile(lat, 50), 2)
        out["submit_p99_ms"] = round(_percentile(lat, 99), 2)
        if _redis_up() and not args.quick:  # --quick: embedded broker only, to stay under a minute
            rqueue = f"bench-submit-{uuid.uuid4().hex[:6]}"
            db = 1 + os.getpid() % 15
            rurl = procs.api(rqueue, LASTKD_BROKER_URL=f"redis://127.0.0.1:6379/{db}",
                             LASTKD_DATA_DIR=str(work / "var-redis"))
            _submit_latencies(rurl, config, 5)
            rlat = _submit_latencies(rurl, config, args.submissions)
            out["redis_submit_p50_ms"] = round(_percentile(rlat, 50), 2)
            out["redis_submit_p99_ms"] = round(_percentile(rlat, 99), 2)
            import redis

            redis.Redis(host="127.0.0.1", port=6379, db=db).delete(rqueue)  # drop the unconsumed messages

        # 2. the same job through the stack, then directly (baseline)
        rqueue = f"bench-run-{uuid.uuid4().hex[:6]}"
        run_env = {"LASTKD_DATA_DIR": str(work / "var-run")}
        run_url = procs.api(rqueue, **run_env)
        procs.worker(rqueue, **run_env)
        runs = 1 if args.quick else 2
        starts, walls = [], []
        with httpx.Client(base_url=run_url, timeout=60) as client:
            for i in range(runs + (0 if args.quick else 1)):
                body = client.post("/train", json={**config, "seed": 100 + i}).json()
                done = _wait(client, body["job_id"])
                starts.append(done["started_at"] - done["created_at"])
                walls.append(done["finished_at"] - done["created_at"])
        out["queue_to_start_s"] = round(statistics.median(starts), 3)
        # outside --quick the first job is a warm-up (page cache, first broker poll) and not counted
        celery_s = statistics.median(walls if args.quick else walls[1:])

        cfg = TrainConfig.model_validate({**config, "data": {**config["data"], "path": str(data_root / "synth/skeletons")}})
        direct = []
        for i in range(runs):
            cfg_i = cfg.model_copy(update={"seed": 200 + i})
            t0 = time.perf_counter()
            result = train(cfg_i, work / f"direct-{i}", store_path=store_path, data_roots=[data_root])
            publish(result, work / "direct-registry", job_id=f"direct-{i}")
            direct.append(time.perf_counter() - t0)
        direct_s = statistics.median(direct)
        out["celery_overhead"] = round(celery_s / direct_s - 1, 4)
        out["job_s_direct"] = round(direct_s, 2)
        out["job_s_celery"] = round(celery_s, 2)
        out["quick"] = bool(args.quick)
    finally:
        procs.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"submit latency p50 {out['submit_p50_ms']} ms, p99 {out['submit_p99_ms']} ms over {args.submissions} "
          f"(embedded SQLite broker)", file=sys.stderr)
    print(f"queue->start {out['queue_to_start_s']} s; job {out['job_s_celery']} s via Celery vs {out['job_s_direct']} s "
          f"direct: overhead ratio {out['celery_overhead'] + 1:.3f}", file=sys.stderr)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
