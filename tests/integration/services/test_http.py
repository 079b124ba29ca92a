"""The HTTP conventions both services share, on a small in-process app built by the factory."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi import APIRouter
from fastapi.testclient import TestClient
from pydantic import BaseModel, ConfigDict, Field

from lastkd.errors import NotFoundError
from lastkd.services.http import Authorized, create_service_app

pytestmark = pytest.mark.faults


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    n: int = Field(ge=0, le=10)
    payload: Any = None


def _app() -> Any:
    router = APIRouter()

    @router.post("/things")
    async def make(body: Body, _: Authorized) -> dict[str, int]:
        return {"n": body.n}

    @router.get("/things/{name}")
    async def get(name: str) -> dict[str, str]:
        raise NotFoundError(f"no thing {name!r}")

    return create_service_app(service="test", title="test", token="tok", routers=[router], max_json_bytes=4096)


@pytest.fixture
def client() -> Any:
    with TestClient(_app()) as c:
        yield c


AUTH = {"Authorization": "Bearer tok"}


def test_library_errors_become_their_status_and_shape(client: TestClient) -> None:
    r = client.get("/things/x")
    assert r.status_code == 404
    assert r.json() == {"error": {"code": "not_found", "message": "no thing 'x'"}}


def test_auth_is_required_and_checked(client: TestClient) -> None:
    assert (client.post("/things", json={"n": 1})).status_code == 401
    assert (client.post("/things", json={"n": 1}, headers={"Authorization": "Bearer nope"})).status_code == 401
    assert (client.post("/things", json={"n": 1}, headers=AUTH)).json() == {"n": 1}


def test_validation_names_the_field_without_the_body_prefix(client: TestClient) -> None:
    r = client.post("/things", json={"n": "2"}, headers=AUTH)
    assert r.status_code == 422
    assert r.json()["error"]["details"][0]["field"] == "n"


def test_declared_length_over_the_limit_is_refused_before_reading(client: TestClient) -> None:
    r = client.post("/things", content=b"{" + b" " * 5000 + b"}", headers={**AUTH, "content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"


def test_undeclared_length_is_cut_at_the_limit(client: TestClient) -> None:
    def chunks() -> Any:
        for _ in range(10):
            yield b" " * 1000

    r = client.post("/things", content=chunks(), headers={**AUTH, "content-type": "application/json"})
    assert r.status_code == 413


def test_deeply_nested_json_is_a_4xx(client: TestClient) -> None:
    body = '{"n": 1, "payload": ' + "[" * 1000 + "]" * 1000 + "}"
    r = client.post("/things", content=body, headers={**AUTH, "content-type": "application/json"})
    assert 400 <= r.status_code < 500, r.text
