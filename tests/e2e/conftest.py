"""Fixtures of the end-to-end tier: live servers, workers and whole stacks as real processes."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.live import free_port
from tests.support.stack import RedisServer, Stack, TinyData, make_stack, make_tiny_data
from tests.support.teacher import TOKEN, LiveTeacher, start_teacher, stop_teacher


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> TinyData:
    """A synthetic NTU-format set inside a data root, and a feature store covering its samples."""
    return make_tiny_data(tmp_path_factory.mktemp("stackdata"))


@pytest.fixture
def stack_factory(tmp_path: Path, tiny_data: TinyData) -> Iterator[Callable[..., Stack]]:
    """Make stacks (API + workers) that are all stopped at the end of the test."""
    made: list[Stack] = []

    def factory(broker_url: str | None = None, api_args: list[str] | None = None) -> Stack:
        stack = make_stack(tmp_path, tiny_data, broker_url, api_args)
        made.append(stack)
        return stack

    yield factory
    for stack in made:
        stack.stop()


@pytest.fixture(scope="module")
def embedded_stack(tmp_path_factory: pytest.TempPathFactory, tiny_data: TinyData) -> Iterator[Stack]:
    """One API and one worker on the embedded SQLite broker, shared by a module's tests."""
    stack = make_stack(tmp_path_factory.mktemp("embedded"), tiny_data)
    try:
        stack.start_api()
        stack.wait_worker_ready(stack.start_worker())
        yield stack
    finally:
        stack.stop()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own, which it may kill and restart."""
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed (needed for the broker-down test)")
    server = RedisServer(free_port(), tmp_path / "redis")
    server.dir.mkdir()
    server.start()
    yield server
    server.kill()


@pytest.fixture(scope="session")
def live_teacher(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveTeacher]:
    """The main live server: token required for POST, small upload limit, 4 clips per request."""
    server = start_teacher(
        tmp_path_factory.mktemp("teacher"),
        LASTKD_API_TOKEN=TOKEN,
        LASTKD_MAX_UPLOAD_BYTES=str(3_000_000),
        LASTKD_MAX_CLIPS_PER_REQUEST="4",
    )
    yield server
    stop_teacher(server)
