"""The Celery settings of long GPU jobs, checked on the app the trainer really builds, and the
rule that the worker process never loads torch (its fork server does, and forks one runner
process per job from there; CUDA is initialised in neither)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lastkd.services.settings import load_settings
from lastkd.services.trainer.celery_app import DEFAULT_QUEUE, TASK_NAME, broker_kind, create_celery_app
from lastkd.services.trainer.worker import worker_argv
from tests.support.paths import PROJECT_ROOT

WEEK_S = 7 * 24 * 3600


@pytest.mark.parametrize("broker", [None, "redis://127.0.0.1:6379/3"])
def test_long_job_settings(tmp_path: Path, broker: str | None) -> None:
    settings = load_settings(data_dir=tmp_path, broker_url=broker)
    app = create_celery_app(settings, queue="q-test")
    conf = app.conf
    assert broker_kind(conf.broker_url) == ("redis" if broker else "sqlite")
    assert conf.task_acks_late is True and conf.task_reject_on_worker_lost is True
    assert conf.worker_prefetch_multiplier == 1
    # the task body supervises; the fresh process (and GPU context) per job is the runner
    assert conf.worker_concurrency == 1 and conf.worker_pool == "threads"
    assert not conf.task_always_eager, "jobs must run in real worker processes"
    assert conf.task_time_limit is None  # a long job is never killed for its length
    assert conf.task_routes[TASK_NAME]["queue"] == "q-test" and conf.task_default_queue == "q-test"
    if broker:
        # Redis re-delivers an unacknowledged job after the visibility timeout: it must outlast any job.
        assert conf.broker_transport_options["visibility_timeout"] >= WEEK_S
    task = app.tasks[TASK_NAME]
    assert task.acks_late is True and task.reject_on_worker_lost is True
    assert app.runtime.jobs_dir == (tmp_path / "jobs").resolve()


def test_worker_argv_matches_the_app_settings() -> None:
    argv = worker_argv(DEFAULT_QUEUE, 1, "w@h", "INFO")
    assert f"--queues={DEFAULT_QUEUE}" in argv
    assert "--prefetch-multiplier=1" in argv and "--pool=threads" in argv


def test_building_the_worker_app_imports_no_torch(tmp_path: Path) -> None:
    """What the `lastkd worker` parent runs before it forks: the CLI, settings, the app and the task
    registration. None of it may import torch (importing it is the first step to a CUDA context)."""
    code = (
        "import json, sys\n"
        "from lastkd.services.settings import load_settings\n"
        "from lastkd.services.trainer import worker\n"
        "from lastkd.services.trainer.celery_app import create_celery_app\n"
        f"app = create_celery_app(load_settings(data_dir={str(tmp_path)!r}))\n"
        "app.loader.import_default_modules()\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy', 'timm'))))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120, check=True
    )
    assert json.loads(result.stdout.strip().splitlines()[-1]) == [], result.stdout


def test_readiness_notices_a_broken_embedded_broker_file(tmp_path: Path) -> None:
    from lastkd.services.trainer.celery_app import broker_reachable

    app = create_celery_app(load_settings(data_dir=tmp_path))
    assert broker_reachable(app) is None
    broker_file = tmp_path / "broker.sqlite"
    for extra in tmp_path.glob("broker.sqlite-*"):
        extra.unlink()
    broker_file.write_bytes(b"this is not a SQLite database" * 100)
    reason = broker_reachable(app)
    assert reason is not None and "database" in reason.lower(), reason


@pytest.mark.faults
def test_processes_declaring_a_new_queue_at_once_all_start(tmp_path: Path) -> None:
    """Two workers starting at once on a fresh embedded broker both create the queue's row; the
    loser used to die at start-up (UNIQUE constraint failed: kombu_queue.name). Several real
    processes declare the same new queue at the same instant: every one must succeed."""
    import time

    code = (
        "import sys, time\n"
        "from lastkd.services.settings import load_settings\n"
        "from lastkd.services.trainer.celery_app import create_celery_app\n"
        f"app = create_celery_app(load_settings(data_dir={str(tmp_path)!r}), queue='q-race')\n"
        "conn = app.connection_for_write(); channel = conn.channel()\n"
        "channel.session.query(channel.queue_cls).count()  # engine and tables ready before the start line\n"
        "while time.time() < float(sys.argv[1]): time.sleep(0.0005)\n"
        "channel.queue_declare(queue='q-race')\n"
        "print('declared')\n"
    )
    failures = 0
    for _ in range(3):  # a fresh queue name each round: the race is at the row's creation
        code_round = code.replace("q-race", f"q-race-{_}")
        start = time.time() + 15  # every process is waiting at the start line by then
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", code_round, str(start)],
                cwd=PROJECT_ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(6)
        ]
        for p in procs:
            out, err = p.communicate(timeout=120)
            if p.returncode != 0 or "declared" not in out:
                failures += 1
                last = [line for line in err.splitlines() if "Error" in line][-1:] or [err[-300:]]
                print("declare failed:", last[0])
    assert failures == 0, f"{failures} of 18 processes failed to declare a new queue"
