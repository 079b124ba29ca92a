"""Benchmark of the job API and the Celery shell around the training engine.

Measures, on real processes (``lastkd serve-trainer`` under uvicorn, ``lastkd worker``, started
through :class:`lastkd.services.stack.Stack` as ``lastkd up`` does):

* ``submit_p50_ms`` / ``submit_p99_ms``: latency of ``POST /train`` over N sequential submissions
  on the embedded SQLite broker (no worker consumes them, so the queue grows as it would under a
  burst); outside ``--quick`` the same on Redis is reported as ``redis_submit_*`` when Redis
  answers on 6379;
* ``queue_to_start_s``: from the API recording a job to a worker process claiming it (median of
  a few jobs on an idle worker; includes the fork of the job's runner from the fork server);
* ``celery_overhead``: median over pairs of (wall time of a job through API + broker + worker) /
  (wall time of ``engine.train`` + ``publish`` called directly in this process on the same job
  and seed, right after it) - 1. The baseline is measured in the same run, interleaved, so a
  change of the machine's load hits both sides of a pair. ``--quick`` uses a job of a few seconds, where the fixed
  costs (fresh process, imports) weigh far more than on the one-minute job of the full run.
* ``job_fixed_overhead_s``: median of (job wall time, recorded -> COMPLETED) minus the engine +
  publish time the runner measured for that job (``result.train_publish_s``): the shell's own cost
  per job (queue, runner fork, job database), much less sensitive to the machine's load.

The last line of stdout is one JSON object with these keys.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lastkd.schemas.trainer import Job, JobState  # noqa: E402  (after the path setup above)
from lastkd.services.client import TrainerClient  # noqa: E402


def _redis_up() -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", 6379)) == 0


class _Stacks:
    """Trainer APIs (and workers) as ``lastkd.services.stack.Stack`` children, all stopped on exit."""

    def __init__(self, base: dict[str, Any], work: Path) -> None:
        self.base, self.work, self.stacks = base, work, []

    def start(self, name: str, queue: str, components: tuple[str, ...], **overrides: Any) -> str:
        """Start ``components`` in their own data dir on ``queue``; returns the trainer URL."""
        from lastkd.services.settings import load_settings
        from lastkd.services.stack import Stack, free_port

        settings = load_settings(
            **{
                **self.base,
                "data_dir": self.work / name,
                "trainer_port": free_port(),
                "teacher_port": free_port(),
                **overrides,
            }
        )
        stack = Stack(
            settings,
            components=components,
            echo=False,
            announce=False,
            cwd=ROOT,
            queue=queue,
            extra_env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")},
        )
        self.stacks.append(stack)
        stack.start()
        return stack.trainer_url

    def stop(self) -> None:
        """Stop every stack started (children, then their process groups)."""
        for stack in self.stacks:
            stack.stop()


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def _submit_latencies(url: str, config: dict[str, Any], n: int) -> list[float]:
    out = []
    with TrainerClient(url, retries=0) as client:
        for i in range(n):
            t0 = time.perf_counter()
            client.submit({**config, "seed": i})  # a refusal raises ApiError with the server's reason
            out.append((time.perf_counter() - t0) * 1000)
    return out


def _run(client: TrainerClient, config: dict[str, Any], timeout: float = 600) -> Job:
    done = client.follow(client.submit(config).job_id, timeout=timeout)
    if done.state is not JobState.COMPLETED:
        raise RuntimeError(f"job {done.job_id} {done.state.value}: {done.error}")
    return done


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; prints the figures as one JSON object on the last line of stdout."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short job and fewer runs (under a minute)")
    parser.add_argument("--submissions", type=int, default=200)
    args = parser.parse_args(argv)

    from lastkd.featurestore import FeatureStore
    from lastkd.student.config import TrainConfig
    from lastkd.student.publish import publish
    from lastkd.student.synth import generate
    from lastkd.student.training import train

    work = Path(tempfile.mkdtemp(prefix="lastkd-bench-jobs-"))
    data_root = work / "datasets"
    names = generate(data_root / "synth", classes=4, samples_per_class=6, frames=60, video=False, seed=1).names
    store_path = work / "features.lmdb"
    with FeatureStore(store_path, map_size=32 << 20) as store:
        meta = store.create_set(teacher="bench", weights_sha256=None, preprocessing={"bench": 1}, dim=16)
        store.put_many(
            meta.set_id, names, np.random.default_rng(0).standard_normal((len(names), 16)).astype(np.float16)
        )

    epochs, steps = (1, 1) if args.quick else (3, 6)
    config = {
        "name": "bench",
        "epochs": epochs,
        "batch_size": 2,
        "max_steps_per_epoch": steps,
        "device": "cpu",
        "data": {"path": "synth/skeletons", "num_frames": 16, "max_samples": 2 if args.quick else 12},
        "eval": {"jitter_stds": [], "joint_drop_probs": [], "frame_drop_probs": []},
        "distill": {"feature_set": meta.set_id, "projector_hidden": 32},
    }
    base = {"data_roots": [data_root], "store_path": store_path, "store_map_size": 32 << 20}
    stacks = _Stacks(base, work)
    out: dict[str, Any] = {}
    try:
        # 1. submit latency (embedded broker, nobody consuming)
        url = stacks.start("var", f"bench-submit-{uuid.uuid4().hex[:6]}", ("trainer",))
        _submit_latencies(url, config, 5)  # warm-up
        lat = _submit_latencies(url, config, args.submissions)
        out["submit_p50_ms"] = round(_percentile(lat, 50), 2)
        out["submit_p99_ms"] = round(_percentile(lat, 99), 2)
        if _redis_up() and not args.quick:  # --quick: embedded broker only, to stay under a minute
            rqueue = f"bench-submit-{uuid.uuid4().hex[:6]}"
            db = 1 + os.getpid() % 15
            rurl = stacks.start("var-redis", rqueue, ("trainer",), broker_url=f"redis://127.0.0.1:6379/{db}")
            _submit_latencies(rurl, config, 5)
            rlat = _submit_latencies(rurl, config, args.submissions)
            out["redis_submit_p50_ms"] = round(_percentile(rlat, 50), 2)
            out["redis_submit_p99_ms"] = round(_percentile(rlat, 99), 2)
            import redis

            redis.Redis(host="127.0.0.1", port=6379, db=db).delete(rqueue)  # drop the unconsumed messages

        # 2. the same job through the stack and directly (baseline), in pairs: the machine's load
        # drifts over minutes, and a pair sees (nearly) the same load on both sides.
        run_url = stacks.start("var-run", f"bench-run-{uuid.uuid4().hex[:6]}", ("trainer", "worker"))
        cfg = TrainConfig.model_validate(
            {**config, "data": {**config["data"], "path": str(data_root / "synth/skeletons")}}
        )
        runs = 3 if args.quick else 2
        starts, walls, direct, fixed = [], [], [], []
        with TrainerClient(run_url) as client:
            if not args.quick:  # warm-up job (page cache, first broker poll), not counted
                _run(client, {**config, "seed": 99})
            for i in range(runs):
                done = _run(client, {**config, "seed": 100 + i})
                assert done.started_at is not None and done.finished_at is not None and done.result is not None
                starts.append(done.started_at - done.created_at)
                walls.append(done.finished_at - done.created_at)
                fixed.append(walls[-1] - done.result["train_publish_s"])
                t0 = time.perf_counter()
                result = train(
                    cfg.model_copy(update={"seed": 100 + i}),
                    work / f"direct-{i}",
                    store_path=store_path,
                    data_roots=[data_root],
                )
                publish(result, work / "direct-registry", job_id=f"direct-{i}")
                direct.append(time.perf_counter() - t0)
        out["queue_to_start_s"] = round(statistics.median(starts), 3)
        out["job_fixed_overhead_s"] = round(statistics.median(fixed), 3)
        out["celery_overhead"] = round(statistics.median(w / d for w, d in zip(walls, direct)) - 1, 4)
        celery_s, direct_s = statistics.median(walls), statistics.median(direct)
        out["pairs"] = [[round(w, 2), round(d, 2)] for w, d in zip(walls, direct)]
        out["loadavg_1m_end"] = round(os.getloadavg()[0], 2)
        out["job_s_direct"] = round(direct_s, 2)
        out["job_s_celery"] = round(celery_s, 2)
        out["quick"] = bool(args.quick)
    finally:
        stacks.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"submit latency p50 {out['submit_p50_ms']} ms, p99 {out['submit_p99_ms']} ms over {args.submissions} "
        f"(embedded SQLite broker)",
        file=sys.stderr,
    )
    print(
        f"queue->start {out['queue_to_start_s']} s; job {out['job_s_celery']} s via Celery vs {out['job_s_direct']} s "
        f"direct: overhead ratio {out['celery_overhead'] + 1:.3f}",
        file=sys.stderr,
    )
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
