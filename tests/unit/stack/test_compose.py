"""docker compose cannot run here (no Docker daemon), so the file's promised properties are
checked by parsing it: health-gated start order, GPU reservations, shared volumes, no secrets."""

from __future__ import annotations

import re

import pytest
import yaml

from tests.support.paths import PROJECT_ROOT

ROOT = PROJECT_ROOT


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _gpu_reserved(service: dict) -> bool:
    devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    return any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)


def test_services_present(compose: dict) -> None:
    assert set(compose["services"]) == {"redis", "teacher-api", "trainer-api", "trainer-worker"}


def test_redis_has_healthcheck(compose: dict) -> None:
    check = compose["services"]["redis"]["healthcheck"]["test"]
    assert "ping" in " ".join(check)


def test_gpu_services_reserve_a_gpu(compose: dict) -> None:
    services = compose["services"]
    assert _gpu_reserved(services["teacher-api"])
    assert _gpu_reserved(services["trainer-worker"])
    assert not _gpu_reserved(services["trainer-api"])


def test_teacher_healthcheck_uses_readiness(compose: dict) -> None:
    check = " ".join(compose["services"]["teacher-api"]["healthcheck"]["test"])
    assert "/health/ready" in check


def test_depends_on_health_conditions(compose: dict) -> None:
    services = compose["services"]
    for name in ("teacher-api", "trainer-api", "trainer-worker"):
        deps = services[name]["depends_on"]
        assert deps["redis"]["condition"] == "service_healthy", name
    worker_deps = services["trainer-worker"]["depends_on"]
    assert worker_deps["teacher-api"]["condition"] == "service_healthy"
    assert worker_deps["trainer-api"]["condition"] == "service_healthy"


def test_worker_scales(compose: dict) -> None:
    worker = compose["services"]["trainer-worker"]
    # --scale needs no fixed container name and no published host port.
    assert "container_name" not in worker
    assert "ports" not in worker


def _mounts(service: dict) -> list[dict]:
    """Every volume of a service in compose's long form (type, source, target, read_only)."""
    out = []
    for spec in service.get("volumes", []):
        if isinstance(spec, dict):
            out.append({"read_only": False, **spec})
            continue
        source, target, *mode = spec.split(":")
        kind = "bind" if source.startswith((".", "/", "$")) else "volume"
        out.append({"type": kind, "source": source, "target": target, "read_only": mode == ["ro"]})
    return out


def _lastkd_services(compose: dict) -> dict[str, dict]:
    return {name: svc for name, svc in compose["services"].items() if svc.get("image") == "lastkd:latest"}


def test_shared_volumes(compose: dict) -> None:
    def mounts(name: str) -> dict[str, str]:
        return {m["source"]: m["target"] for m in _mounts(compose["services"][name]) if m["type"] == "volume"}

    teacher, api, worker = mounts("teacher-api"), mounts("trainer-api"), mounts("trainer-worker")
    assert teacher["store"] == worker["store"] == "/data/store"
    assert api["registry"] == worker["registry"]
    assert api["jobs"] == worker["jobs"]
    for volume in ("store", "registry", "jobs"):
        assert volume in compose["volumes"]


def test_datasets_and_weights_are_read_only_host_folders(compose: dict) -> None:
    # Users put NTU RGB+D and the checkpoint in plain host folders, movable from .env.
    expected = {
        "/data/datasets": "${LASTKD_DATASETS_DIR:-./datasets}",
        "/data/weights": "${LASTKD_WEIGHTS_DIR:-./weights}",
    }
    seen: dict[str, set[str]] = {}
    for name, service in _lastkd_services(compose).items():
        for mount in _mounts(service):
            if mount["target"] in expected:
                assert mount["type"] == "bind", (name, mount)
                assert mount["source"] == expected[mount["target"]], (name, mount)
                assert mount["read_only"] is True, (name, mount)
                seen.setdefault(mount["target"], set()).add(name)
    assert seen["/data/datasets"] == {"teacher-api", "trainer-api", "trainer-worker"}
    assert seen["/data/weights"] == {"teacher-api"}
    assert "datasets" not in compose["volumes"] and "weights" not in compose["volumes"]
    env_example = (ROOT / ".env.example").read_text()
    for variable in ("LASTKD_DATASETS_DIR", "LASTKD_WEIGHTS_DIR"):
        assert variable in env_example
    for folder in ("datasets", "weights"):
        # Never sent to the build context, never committed.
        assert f"/{folder}/" in (ROOT / ".gitignore").read_text().split()
        assert folder in (ROOT / ".dockerignore").read_text().split()


def _dockerfile_owned_dirs() -> tuple[set[str], set[str]]:
    """Directories the Dockerfile creates (`mkdir -p`) and hands to lastkd (`chown -R`)."""
    text = (ROOT / "docker" / "Dockerfile").read_text().replace("\\\n", " ")
    created: set[str] = set()
    owned: set[str] = set()
    for line in text.splitlines():
        if not line.startswith("RUN "):
            continue
        for command in line[4:].split("&&"):
            words = command.split()
            if words[:2] == ["mkdir", "-p"]:
                created.update(words[2:])
            elif words[:3] == ["chown", "-R", "lastkd:lastkd"]:
                owned.update(words[3:])
    return created, owned


def test_every_volume_target_is_created_and_owned_in_the_image(compose: dict) -> None:
    created, owned = _dockerfile_owned_dirs()
    assert created, "the Dockerfile creates no directory"
    targets = {m["target"] for svc in _lastkd_services(compose).values() for m in _mounts(svc)}
    assert targets, "no lastkd service mounts anything"
    for target in sorted(targets):
        assert target in created, f"{target} is mounted but not created in the image (Docker would make it root-owned)"
        assert any(target == d or target.startswith(d.rstrip("/") + "/") for d in owned), (
            f"{target} is created but not owned by lastkd in the image"
        )
    # The user the services run as is the owner.
    assert "USER lastkd" in (ROOT / "docker" / "Dockerfile").read_text()


def test_broker_is_redis(compose: dict) -> None:
    env = compose["services"]["trainer-worker"]["environment"]
    assert env["LASTKD_BROKER_URL"].startswith("redis://redis:")


def test_no_secrets_baked_in(compose: dict) -> None:
    token = compose["services"]["teacher-api"]["environment"]["LASTKD_API_TOKEN"]
    assert re.fullmatch(r"\$\{LASTKD_API_TOKEN:\?.+\}", token), "token must come from .env, required"
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    assert "LASTKD_API_TOKEN" not in dockerfile
    assert ".env" in (ROOT / ".dockerignore").read_text().split()
    assert ".env" in (ROOT / ".gitignore").read_text().split()


def test_public_bind_needs_token(compose: dict) -> None:
    # Services listen on 0.0.0.0 inside containers; settings refuse that without a token,
    # so the compose file must always provide one.
    for name in ("teacher-api", "trainer-api"):
        env = compose["services"][name]["environment"]
        host_key = "LASTKD_TEACHER_HOST" if name == "teacher-api" else "LASTKD_TRAINER_HOST"
        assert env[host_key] == "0.0.0.0"
        assert "LASTKD_API_TOKEN" in env


def _queue(command: list[str]) -> str:
    assert "--queue" in command, command
    return command[command.index("--queue") + 1]


def test_api_and_workers_share_one_queue(compose: dict) -> None:
    from lastkd.services.trainer.celery_app import DEFAULT_QUEUE

    services = compose["services"]
    api_queue = _queue(services["trainer-api"]["command"])
    worker_queue = _queue(services["trainer-worker"]["command"])
    # A mismatch would leave every job QUEUED forever with nobody consuming it.
    assert api_queue == worker_queue
    match = re.fullmatch(r"\$\{LASTKD_QUEUE:-(.+)\}", api_queue)
    assert match and match.group(1) == DEFAULT_QUEUE, api_queue
    assert services["trainer-api"]["command"][0] == "serve-trainer"
    assert services["trainer-worker"]["command"][0] == "worker"


def test_redis_keeps_its_queue_across_restarts(compose: dict) -> None:
    redis = compose["services"]["redis"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert any(m["target"] == "/data" for m in _mounts(redis))  # the AOF lives on a volume


def test_job_database_and_registry_are_shared_volumes(compose: dict) -> None:
    env = compose["services"]["trainer-api"]["environment"]
    worker_env = compose["services"]["trainer-worker"]["environment"]
    # API and workers must agree on where the job DB and the registry are, and that place must be
    # a named volume both mount (not the container's own filesystem).
    assert env["LASTKD_JOBS_DIR"] == worker_env["LASTKD_JOBS_DIR"] == "/data/jobs"
    assert env["LASTKD_REGISTRY_DIR"] == worker_env["LASTKD_REGISTRY_DIR"] == "/data/registry"
    for name in ("trainer-api", "trainer-worker"):
        targets = {m["target"] for m in _mounts(compose["services"][name])}
        assert {"/data/jobs", "/data/registry", "/data/store"} <= targets, name


def test_gpus_are_assigned_not_all_mapped_to_device_0(compose: dict) -> None:
    # "count: 1" is mapped to the first GPU for every container: the teacher names its device,
    # the workers see all GPUs and claim one each (lastkd.devices.claim_gpu).
    def devices(name: str) -> dict:
        (device,) = compose["services"][name]["deploy"]["resources"]["reservations"]["devices"]
        return device

    teacher, worker = devices("teacher-api"), devices("trainer-worker")
    assert "count" not in teacher and teacher["device_ids"] == ["${LASTKD_TEACHER_GPU:-0}"]
    assert worker["count"] == "all" and "device_ids" not in worker
    command = compose["services"]["trainer-worker"]["command"]
    assert command[command.index("--claim-gpu") + 1] == "${LASTKD_WORKER_GPUS:-all}"
    assert compose["services"]["trainer-worker"]["shm_size"]
    env_example = (ROOT / ".env.example").read_text()
    assert "LASTKD_TEACHER_GPU" in env_example and "LASTKD_WORKER_GPUS" in env_example


def test_worker_healthcheck_reads_the_ready_file_it_is_told_to_write(compose: dict) -> None:
    """Healthy once Celery's worker_ready signal wrote the file, not when the process merely runs."""
    worker = compose["services"]["trainer-worker"]
    command = worker["command"]
    ready_file = command[command.index("--ready-file") + 1]
    assert ready_file in " ".join(worker["healthcheck"]["test"])
