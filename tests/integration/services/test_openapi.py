"""Both services describe every endpoint in ``/openapi.json``: each request body and each answer
has a schema, every ``$ref`` resolves, and the error shape is documented everywhere."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client import CONTENT_TYPE_LATEST

from lastkd.services.settings import Settings
from lastkd.services.teacher_api.app import create_app as create_teacher
from lastkd.services.trainer.api import create_app as create_trainer

# Answers that are not JSON by nature, with the media type they must declare instead.
NOT_JSON = {
    ("get", "/metrics"): CONTENT_TYPE_LATEST,
    ("get", "/checkpoints/{name}/{version}/files/{filename}"): "application/octet-stream",
    ("get", "/experiments/{experiment_id}/files/{filename}"): "application/octet-stream",
}
BODYLESS_POSTS = {"/jobs/{job_id}/cancel", "/experiments/{experiment_id}/cancel"}
EXPECTED = {
    "teacher": {
        ("get", "/health/live"),
        ("get", "/health/ready"),
        ("get", "/metrics"),
        ("get", "/feature-sets"),
        ("get", "/features/{set_id}/{clip_id}"),
        ("post", "/embed"),
    },
    "trainer": {
        ("get", "/health/live"),
        ("get", "/health/ready"),
        ("get", "/metrics"),
        ("post", "/train"),
        ("post", "/teacher/finetune"),
        ("get", "/jobs"),
        ("get", "/jobs/{job_id}"),
        ("post", "/jobs/{job_id}/cancel"),
        ("get", "/jobs/{job_id}/events"),
        ("get", "/checkpoints"),
        ("get", "/checkpoints/{name}/{version}"),
        ("get", "/checkpoints/{name}/{version}/files/{filename}"),
        ("post", "/experiments"),
        ("get", "/experiments"),
        ("get", "/experiments/{experiment_id}"),
        ("post", "/experiments/{experiment_id}/cancel"),
        ("get", "/experiments/{experiment_id}/events"),
        ("get", "/experiments/{experiment_id}/files/{filename}"),
    },
}


@pytest.fixture(params=["teacher", "trainer"])
def service(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, FastAPI]:
    settings = Settings(data_dir=tmp_path)
    factory = create_teacher if request.param == "teacher" else create_trainer
    return request.param, factory(settings)


def _operations(schema: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in schema["paths"].items():
        for method, op in item.items():
            yield method, path, op


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def test_every_endpoint_is_listed(service: tuple[str, FastAPI]) -> None:
    name, app = service
    found = {(m, p) for m, p, _ in _operations(app.openapi())}
    assert found == EXPECTED[name]


def test_every_answer_and_body_has_a_schema(service: tuple[str, FastAPI]) -> None:
    _, app = service
    schema = app.openapi()
    missing = []
    for method, path, op in _operations(schema):
        ok = [code for code in op["responses"] if code.startswith("2")]
        if not ok:
            missing.append(f"{method} {path}: no 2xx answer")
        for code in ok:
            content = op["responses"][code].get("content", {})
            if (method, path) in NOT_JSON:
                if NOT_JSON[(method, path)] not in content:
                    missing.append(f"{method} {path} {code}: media type {NOT_JSON[(method, path)]} not declared")
                continue
            typed = {media: body for media, body in content.items() if media != "application/octet-stream"}
            if not typed or not all(body.get("schema", {}).get("$ref") for body in typed.values()):
                missing.append(f"{method} {path} {code}: answer has no model ({sorted(content)})")
        for code in ("4XX", "5XX"):
            ref = op["responses"].get(code, {}).get("content", {}).get("application/json", {}).get("schema", {})
            if ref.get("$ref") != "#/components/schemas/ErrorResponse":
                missing.append(f"{method} {path}: the {code} error shape is not documented")
        if method == "post" and path not in BODYLESS_POSTS:
            bodies = op.get("requestBody", {}).get("content", {})
            if not bodies or not all(b.get("schema") for b in bodies.values()):
                missing.append(f"{method} {path}: request body has no schema")
    assert not missing, "\n".join(missing)


def test_every_reference_resolves(service: tuple[str, FastAPI]) -> None:
    _, app = service
    schema = app.openapi()
    components = schema.get("components", {}).get("schemas", {})
    dangling = {ref for ref in _refs(schema) if ref.removeprefix("#/components/schemas/") not in components}
    assert not dangling


def test_the_train_body_is_the_training_config(tmp_path: Path) -> None:
    """The documented body of POST /train is TrainConfig's fields plus the client's job id."""
    from lastkd.student.config import TrainConfig

    schema = create_trainer(Settings(data_dir=tmp_path)).openapi()
    body = schema["components"]["schemas"]["TrainRequest"]
    assert set(body["properties"]) == set(TrainConfig.model_fields) | {"job_id"}
    assert set(body["required"]) >= {"name", "data"}


def test_the_served_document_is_the_same(service: tuple[str, FastAPI]) -> None:
    """``GET /openapi.json`` answers the document the checks above read (no lifespan needed)."""
    _, app = service
    client = TestClient(app)  # not entered: the lifespan (model, broker) does not start
    served = client.get("/openapi.json")
    assert served.status_code == 200
    assert served.json()["paths"].keys() == app.openapi()["paths"].keys()
