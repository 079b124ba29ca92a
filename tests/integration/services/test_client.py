"""The typed client against the trainer API in process (Starlette's TestClient is an
``httpx.Client``): idempotent submission, errors with the server's code, the event stream, cancel."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from starlette.testclient import TestClient

from lastkd.services.client import ApiError, TrainerClient, retry_after
from lastkd.services.settings import Settings
from lastkd.services.trainer.api import create_app

TOKEN = "t" * 32


@pytest.fixture
def trainer(tmp_path: Path) -> Iterator[TrainerClient]:
    (tmp_path / "datasets").mkdir()
    settings = Settings(data_dir=tmp_path, api_token=TOKEN)
    with TestClient(create_app(settings, sweep_interval_s=60.0)) as http:
        yield TrainerClient("http://testserver", token=TOKEN, http=http, busy_timeout=5.0)


def _config(tmp_path: Path) -> dict:
    data = tmp_path / "datasets" / "skeletons"
    data.mkdir(exist_ok=True)
    return {
        "name": "client-test",
        "data": {"format": "ntu_raw", "path": str(data), "dataset": "ntu60", "split": "xsub"},
        "epochs": 1,
        "batch_size": 2,
        "workers": 0,
    }


def test_submit_is_idempotent_and_follow_ends_on_cancel(trainer: TrainerClient, tmp_path: Path) -> None:
    first = trainer.submit(_config(tmp_path), idempotency_key="same-key")
    again = trainer.submit(_config(tmp_path), idempotency_key="same-key")
    assert again.job_id == first.job_id and again.created is False  # a retried POST never makes a second job
    assert [j.job_id for j in trainer.jobs()] == [first.job_id]
    trainer.cancel(first.job_id)  # no worker: the queued job is cancelled at once
    seen: list[str] = []
    final = trainer.follow(first.job_id, lambda event: seen.append(event.state))
    assert final.state == "CANCELLED"
    assert seen and seen[-1] == "CANCELLED"  # the stream's "end" event reached the caller


def test_server_errors_keep_their_code_and_message(trainer: TrainerClient, tmp_path: Path) -> None:
    with pytest.raises(ApiError) as info:
        trainer.job("no-such-job")
    assert (info.value.status, info.value.code) == (404, "not_found") and "no-such-job" in info.value.message
    bad = {**_config(tmp_path), "epochs": 0}
    with pytest.raises(ApiError) as info:
        trainer.submit(bad)
    assert info.value.status == 422 and "epochs" in info.value.message


def test_a_wrong_token_is_an_api_error(trainer: TrainerClient, tmp_path: Path) -> None:
    other = TrainerClient("http://testserver", token="w" * 32, http=trainer.http)
    with pytest.raises(ApiError) as info:
        other.submit(_config(tmp_path))
    assert info.value.status in (401, 403)


def test_transport_errors_are_retried_then_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def refuse(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        raise httpx.ConnectError("refused", request=request)

    monkeypatch.setattr("lastkd.services.client.time.sleep", lambda _s: None)
    client = TrainerClient("http://nowhere", http=httpx.Client(transport=httpx.MockTransport(refuse)), retries=2)
    with pytest.raises(ApiError) as info:
        client.job("x")
    assert info.value.code == "transport" and len(calls) == 3


def test_busy_answers_are_retried_after_the_servers_delay(monkeypatch: pytest.MonkeyPatch) -> None:
    answers = iter([httpx.Response(503, headers={"Retry-After": "3"}), httpx.Response(200, json={"job_id": "j"})])
    waits: list[float] = []
    monkeypatch.setattr("lastkd.services.client.time.sleep", waits.append)
    client = TrainerClient("http://x", http=httpx.Client(transport=httpx.MockTransport(lambda _r: next(answers))))
    assert client.request("GET", "/jobs/j").json() == {"job_id": "j"}
    assert waits == [3.0]
    assert retry_after(httpx.Response(503, headers={"Retry-After": "soon"})) == 2.0
    assert retry_after(httpx.Response(503, headers={"Retry-After": "3600"})) == 10.0


def test_an_answer_that_breaks_the_contract_is_an_error() -> None:
    """A 200 whose body is not the documented model is refused, never half-read."""
    client = TrainerClient(
        "http://x",
        http=httpx.Client(transport=httpx.MockTransport(lambda _r: httpx.Response(200, json={"job_id": "j"}))),
    )
    with pytest.raises(ApiError) as info:
        client.job("j")
    assert info.value.code == "invalid_answer" and "Job" in info.value.message and "state" in info.value.message
