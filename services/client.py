"""A typed client for both lastkd APIs: the teacher (``POST /embed``, features) and the trainer
(``POST /train``, jobs, events, checkpoints).

What every caller needs and would otherwise write again: the bearer token, retries on transport
errors and on "busy" answers (503 with ``Retry-After``), an ``Idempotency-Key`` on job
submission (so a retried POST never makes a second job), the server-sent event stream read with
the one parser (:mod:`lastkd.sse`), and server errors turned into :class:`ApiError` with the
server's code and message. Answers come back as the very models the services declare
(:mod:`lastkd.schemas`), so a client and a server cannot drift apart unnoticed. Used by the demo,
the benchmarks and the tests.

Any ``httpx.Client`` can carry the requests (``http=``): a Starlette ``TestClient`` runs them
against an in-process app.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from lastkd.schemas.teacher import EmbedResponse, FeatureResponse, FeatureSetInfo, FeatureSetsResponse
from lastkd.schemas.trainer import (
    TERMINAL,
    CheckpointEntry,
    CheckpointList,
    Experiment,
    ExperimentSubmitted,
    Job,
    JobEvent,
    JobList,
    JobSubmitted,
)
from lastkd.sse import Event, parse_events

__all__ = ["ApiError", "TeacherClient", "TrainerClient"]

_MAX_RETRY_AFTER_S = 10.0


class ApiError(Exception):
    """A request the server refused or could not answer: HTTP status, the server's error code
    (``transport`` when no answer came) and its message."""

    def __init__(self, status: int, code: str, message: str, body: Any = None) -> None:
        super().__init__(f"{code}: {message}" if status == 0 else f"HTTP {status} {code}: {message}")
        self.status, self.code, self.message, self.body = status, code, message, body

    @classmethod
    def from_response(cls, response: httpx.Response) -> ApiError:
        """The server's ``{"error": {"code", "message"}}`` when it sent one, else the raw text."""
        try:
            body = response.json()
        except ValueError:
            return cls(response.status_code, f"http_{response.status_code}", response.text[:300])
        err = body.get("error") if isinstance(body, dict) else None
        if isinstance(err, dict):
            return cls(
                response.status_code, str(err.get("code", response.status_code)), str(err.get("message", "")), body
            )
        return cls(response.status_code, f"http_{response.status_code}", response.text[:300], body)


Answer = TypeVar("Answer", bound=BaseModel)
Followed = TypeVar("Followed", Job, Experiment)  # the records a client follows to a terminal state


def _answer(model: type[Answer], body: Any) -> Answer:
    """``body`` as ``model``; an answer that breaks the services' contract is an :class:`ApiError`
    (``invalid_answer``), not a record with fields silently missing."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise ApiError(0, "invalid_answer", f"the server's answer is not a {model.__name__}: {exc}", body) from None


def retry_after(response: httpx.Response, default: float = 2.0) -> float:
    """The server's ``Retry-After`` in seconds (capped), or ``default`` when absent or not a number."""
    try:
        return min(_MAX_RETRY_AFTER_S, max(0.0, float(response.headers.get("retry-after", default))))
    except ValueError:
        return default


class _Client:
    """Shared mechanics: one ``httpx.Client``, auth header, retries."""

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        timeout: float = 60.0,
        retries: int = 3,
        busy_timeout: float = 600.0,
        http: httpx.Client | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.retries = retries
        self.busy_timeout = busy_timeout
        self._own = http is None
        self.http = http or httpx.Client(timeout=httpx.Timeout(timeout, connect=10.0))
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}

    def close(self) -> None:
        """Close the connection pool (only when this client made it)."""
        if self._own:
            self.http.close()

    def __enter__(self) -> _Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _url(self, path: str) -> str:
        return f"{self.base_url}{path}"

    def request(
        self,
        method: str,
        path: str,
        *,
        ok: Sequence[int] = (200,),
        headers: dict[str, str] | None = None,
        body: Callable[[], dict[str, Any]] | None = None,
    ) -> httpx.Response:
        """One request with retries: transport errors up to ``retries`` times, 503 answers until
        ``busy_timeout``. ``body`` builds the keyword arguments of each try (files are re-opened).
        Statuses outside ``ok`` raise :class:`ApiError`."""
        deadline = time.monotonic() + self.busy_timeout
        failures = 0
        while True:
            with contextlib.ExitStack() as stack:
                kwargs = body() if body is not None else {}
                for handle in kwargs.pop("_close", []):
                    stack.callback(handle.close)
                try:
                    response = self.http.request(
                        method, self._url(path), headers={**self._headers, **(headers or {})}, **kwargs
                    )
                except httpx.TransportError as exc:
                    failures += 1
                    if failures > self.retries:
                        raise ApiError(
                            0, "transport", f"{method} {self._url(path)}: {type(exc).__name__}: {exc}"
                        ) from None
                    time.sleep(min(5.0, 0.5 * 2**failures))
                    continue
            if response.status_code == 503 and time.monotonic() < deadline:
                time.sleep(retry_after(response))
                continue
            if response.status_code not in ok:
                raise ApiError.from_response(response)
            return response

    def ready(self) -> bool:
        """True when ``/health/ready`` answers 200 (no retries: a probe)."""
        try:
            return self.http.get(self._url("/health/ready"), timeout=5.0).status_code == 200
        except httpx.TransportError:
            return False

    def wait_ready(self, timeout: float = 120.0, interval: float = 0.5) -> None:
        """Block until :meth:`ready`, or raise :class:`ApiError` after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not self.ready():
            if time.monotonic() > deadline:
                raise ApiError(0, "not_ready", f"{self.base_url} was not ready within {timeout:.0f} s")
            time.sleep(interval)


class TeacherClient(_Client):
    """The teacher API: embed clips, read features and feature sets."""

    def embed(
        self,
        paths: Sequence[str | Path],
        clip_ids: Sequence[str] | None = None,
        content_type: str = "application/octet-stream",
    ) -> EmbedResponse:
        """``POST /embed`` of ``paths`` (one request); the answer has one result per file, each
        with either ``feature_set``/``cached`` or an ``error``. A request whose clips all failed
        (422) is returned too: the per-clip reasons are in it."""
        if clip_ids is not None and len(clip_ids) != len(paths):
            raise ValueError(f"{len(clip_ids)} clip ids for {len(paths)} files")

        def body() -> dict[str, Any]:
            handles = [open(p, "rb") for p in paths]  # noqa: SIM115 - closed by request() after the try
            files = [("files", (Path(p).name, h, content_type)) for p, h in zip(paths, handles, strict=True)]
            data = {"clip_ids": list(clip_ids)} if clip_ids is not None else None
            return {"files": files, "data": data, "_close": handles}

        response = self.request("POST", "/embed", ok=(200, 422), body=body)
        answer = response.json()
        if response.status_code == 422 and "results" not in answer:
            raise ApiError.from_response(response)
        return _answer(EmbedResponse, answer)

    def feature_sets(self) -> list[FeatureSetInfo]:
        """``GET /feature-sets``: the sets in the store with their metadata."""
        return _answer(FeatureSetsResponse, self.request("GET", "/feature-sets").json()).feature_sets

    def feature(self, set_id: str, clip_id: str) -> FeatureResponse:
        """``GET /features/{set}/{clip}``: one stored vector with its metadata."""
        return _answer(FeatureResponse, self.request("GET", f"/features/{set_id}/{clip_id}").json())


class TrainerClient(_Client):
    """The trainer API: submit, follow and cancel jobs, list checkpoints."""

    def submit(self, config: dict[str, Any], *, idempotency_key: str | None = None) -> JobSubmitted:
        """``POST /train``; the job record. Retries carry the same ``Idempotency-Key`` (made here
        when not given), so a lost answer never creates a second job."""
        return _answer(JobSubmitted, self._post_once("/train", config, idempotency_key))

    def _post_once(self, path: str, body: dict[str, Any], idempotency_key: str | None) -> Any:
        key = idempotency_key or f"client-{uuid.uuid4().hex}"
        headers = {"Idempotency-Key": key}
        return self.request("POST", path, ok=(200, 202), headers=headers, body=lambda: {"json": body}).json()

    def job(self, job_id: str) -> Job:
        """``GET /jobs/{id}``."""
        return _answer(Job, self.request("GET", f"/jobs/{job_id}").json())

    def jobs(self, state: str | None = None) -> list[Job]:
        """``GET /jobs`` (optionally one state)."""
        params = {"state": state} if state else None
        return _answer(JobList, self.request("GET", "/jobs", body=lambda: {"params": params}).json()).jobs

    def cancel(self, job_id: str) -> Job:
        """``POST /jobs/{id}/cancel``: 202 while the worker has still to notice, 200 once cancelled."""
        return _answer(Job, self.request("POST", f"/jobs/{job_id}/cancel", ok=(200, 202)).json())

    def events(self, job_id: str) -> Iterator[Event]:
        """The job's server-sent events (``progress`` ..., then one ``end``) as they come; the
        data of each is a :class:`~lastkd.schemas.trainer.JobEvent` as JSON."""
        return self._events(f"/jobs/{job_id}/events")

    def _events(self, path: str) -> Iterator[Event]:
        with self.http.stream("GET", self._url(path), headers=self._headers) as response:
            if response.status_code != 200:
                response.read()
                raise ApiError.from_response(response)
            yield from parse_events(response.iter_lines())

    def follow(
        self,
        job_id: str,
        on_update: Callable[[JobEvent], None] | None = None,
        *,
        timeout: float = 24 * 3600.0,
        poll_s: float = 1.0,
    ) -> Job:
        """Follow a job to a terminal state and return its final record: over the event stream,
        then by polling ``GET /jobs/{id}`` if the stream breaks. ``on_update`` sees every state
        the stream or the polling delivers (it may raise to stop following)."""

        def update(data: Any) -> None:
            if on_update is not None:
                on_update(_answer(JobEvent, data))

        def polled(record: Job) -> None:
            if on_update is not None:
                on_update(JobEvent.model_validate(record.model_dump(include=set(JobEvent.model_fields))))

        return self._follow(
            self.events(job_id), lambda: self.job(job_id), update, polled, f"job {job_id}", timeout, poll_s
        )

    def _follow(
        self,
        events: Iterator[Event],
        read: Callable[[], Followed],
        on_event: Callable[[Any], None],
        on_poll: Callable[[Followed], None],
        what: str,
        timeout: float,
        poll_s: float,
    ) -> Followed:
        """Events until ``end``, then ``read()`` until its ``state`` is terminal (polling when the
        stream broke or is not offered)."""
        deadline = time.monotonic() + timeout
        try:
            for event in events:
                if event.event not in ("progress", "end"):
                    continue
                on_event(event.data)
                if event.event == "end":
                    break
        except (httpx.TransportError, ApiError):
            pass  # the stream broke or is not offered: poll
        while True:
            record = read()
            if record.state in TERMINAL:
                return record
            on_poll(record)
            if time.monotonic() > deadline:
                raise ApiError(0, "timeout", f"{what} did not finish within {timeout:.0f} s")
            time.sleep(poll_s)

    def checkpoints(self) -> list[CheckpointEntry]:
        """``GET /checkpoints``: the published students."""
        return _answer(CheckpointList, self.request("GET", "/checkpoints").json()).checkpoints

    # --- experiments ------------------------------------------------------------------------------
    def submit_experiment(self, config: dict[str, Any], *, idempotency_key: str | None = None) -> ExperimentSubmitted:
        """``POST /experiments`` (an experiment, or a training config for the default arms); retried
        like :meth:`submit`, under one ``Idempotency-Key``."""
        return _answer(ExperimentSubmitted, self._post_once("/experiments", config, idempotency_key))

    def experiment(self, experiment_id: str) -> Experiment:
        """``GET /experiments/{id}`` (with the report once COMPLETED)."""
        return _answer(Experiment, self.request("GET", f"/experiments/{experiment_id}").json())

    def cancel_experiment(self, experiment_id: str) -> Experiment:
        """``POST /experiments/{id}/cancel``: every unfinished child is cancelled."""
        return _answer(Experiment, self.request("POST", f"/experiments/{experiment_id}/cancel", ok=(200, 202)).json())

    def experiment_events(self, experiment_id: str) -> Iterator[Event]:
        """The experiment's server-sent events; the data of each is an Experiment as JSON."""
        return self._events(f"/experiments/{experiment_id}/events")

    def follow_experiment(
        self,
        experiment_id: str,
        on_update: Callable[[Experiment], None] | None = None,
        *,
        timeout: float = 24 * 3600.0,
        poll_s: float = 1.0,
    ) -> Experiment:
        """Follow an experiment to a terminal state, as :meth:`follow` does a job; its final
        record (with the report once COMPLETED)."""

        def update(data: Any) -> None:
            if on_update is not None:
                on_update(_answer(Experiment, data))

        def polled(record: Experiment) -> None:
            if on_update is not None:
                on_update(record)

        return self._follow(
            self.experiment_events(experiment_id),
            lambda: self.experiment(experiment_id),
            update,
            polled,
            f"experiment {experiment_id}",
            timeout,
            poll_s,
        )
