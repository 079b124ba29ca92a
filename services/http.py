"""HTTP conventions shared by the teacher and the trainer services.

One place decides how both services authenticate, refuse unsafe binds, report health, count
requests for Prometheus and shape their errors, so a client sees one API style:

* errors are JSON ``{"error": {"code": "...", "message": "...", ...}}`` with a 4xx for every
  user mistake (validation errors included) and 5xx only for faults of the server;
* mutating endpoints take ``_: Authorized`` (bearer token); with no token configured they are open,
  which :func:`check_bind` allows only on loopback addresses;
* ``GET /health/live`` answers as soon as the process serves HTTP;
* :class:`HttpMetrics` counts requests and latency per route template (never per raw path, so a
  client cannot blow up label cardinality).
"""

from __future__ import annotations

import argparse
import hmac
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lastkd.errors import LastkdError
from lastkd.schemas.common import ERROR_RESPONSES, Health
from lastkd.services.settings import is_loopback
from lastkd.validation import Problem, summary

log = logging.getLogger(__name__)

CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that hung up; counted, never sent

__all__ = [
    "ApiError",
    "Authorized",
    "BindRefusedError",
    "HttpMetrics",
    "add_bind_arguments",
    "bind_address",
    "check_bind",
    "create_service_app",
    "error_body",
    "error_response",
    "install_error_handlers",
    "metrics_response",
    "require_token",
    "serve",
]


class ApiError(LastkdError):
    """A :class:`~lastkd.errors.LastkdError` raised by a route, with HTTP headers to send.

    Library errors need no wrapping: every LastkdError is answered as
    ``{"error": {"code", "message", ...details}}`` with its own status. This class only adds
    ``headers`` (``Retry-After``, ``WWW-Authenticate``) and takes the status first, as routes
    write it.
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        headers: Mapping[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(message, code=code, status=status, **extra)
        self.headers = dict(headers or {})

    @property
    def extra(self) -> dict[str, Any]:
        """The details sent beside code and message."""
        return self.details


class BindRefusedError(RuntimeError):
    """Raised when a service is asked to listen on a public address without an API token."""


def error_body(code: str, message: str, **extra: Any) -> dict[str, Any]:
    """The JSON error shape of both services."""
    return {"error": {"code": code, "message": message, **extra}}


def error_response(
    status: int, code: str, message: str, *, headers: Mapping[str, str] | None = None, **extra: Any
) -> JSONResponse:
    """A JSON error response in the shared shape."""
    return JSONResponse(error_body(code, message, **extra), status_code=status, headers=dict(headers or {}))


_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "too_many_requests",
    503: "unavailable",
}


def install_error_handlers(app: FastAPI) -> None:
    """Route every error through the shared JSON shape: LastkdError (ApiError included) with its
    own status, HTTP exceptions, request validation (422, one problem per field) and JSON nested
    too deeply to parse (422 instead of a RecursionError's 500)."""

    @app.exception_handler(LastkdError)
    async def _lastkd_error(_: Request, exc: LastkdError) -> JSONResponse:
        if exc.status >= 500:
            log.error("%s: %s", exc.code, exc.message)
        return error_response(exc.status, exc.code, exc.message, headers=getattr(exc, "headers", None), **exc.details)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _STATUS_CODES.get(exc.status_code, "error")
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        return error_response(exc.status_code, code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        found = [_request_problem(err) for err in exc.errors()]
        return error_response(422, "invalid_request", summary(found), details=[p.as_dict() for p in found])

    @app.exception_handler(ClientDisconnect)
    async def _client_gone(request: Request, _: ClientDisconnect) -> Response:
        # Nobody is left to read an answer; whatever the route had received is cleaned up by it.
        log.info("client disconnected during %s %s", request.method, request.url.path)
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    @app.exception_handler(RecursionError)
    async def _too_deep(_: Request, exc: RecursionError) -> JSONResponse:
        return error_response(422, "invalid_request", "the JSON body is nested too deeply to be a lastkd request")


def _request_problem(err: Mapping[str, Any]) -> Problem:
    # FastAPI prefixes body fields with "body"; a user wrote the field, not the transport.
    loc = [str(p) for p in err.get("loc", ())]
    if loc and loc[0] == "body":
        loc = loc[1:]
    msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
    if err.get("type") == "json_invalid":
        msg = f"body is not valid JSON: {err.get('ctx', {}).get('error', msg)}"
    return Problem(".".join(loc) or "body", msg)


def check_bind(host: str, token: str | None) -> None:
    """Refuse to listen on a non-loopback address unless an API token is configured."""
    if not is_loopback(host) and not token:
        raise BindRefusedError(
            f"refusing to listen on {host!r}: it is not a loopback address and no API token is set "
            "(set LASTKD_API_TOKEN, or bind 127.0.0.1)"
        )


def add_bind_arguments(parser: argparse.ArgumentParser, service: str) -> None:
    """The ``--host``/``--port`` options every ``lastkd serve-*`` command shares."""
    env = f"LASTKD_{service.upper()}"
    parser.add_argument("--host", default=None, help=f"bind address (default: {env}_HOST)")
    parser.add_argument("--port", type=int, default=None, help=f"port (default: {env}_PORT)")


def bind_address(args: argparse.Namespace, host: str, port: int, token: str | None) -> tuple[str, int]:
    """The (host, port) to listen on: command-line overrides over settings, checked.

    Raises :class:`BindRefusedError` for a port out of range or a public address without a token.
    """
    host = args.host or host
    port = args.port if args.port is not None else port
    if not 0 < port < 65536:
        raise BindRefusedError(f"port must be in 1..65535, got {port}")
    check_bind(host, token)
    return host, port


class HttpMetrics:
    """Prometheus request count and latency per route template, on a registry of its own.

    Each app gets its own :class:`CollectorRegistry` so that several apps in one process (tests)
    never clash on metric names.
    """

    def __init__(self, service: str, registry: CollectorRegistry | None = None) -> None:
        self.service = service
        self.registry = registry or CollectorRegistry()
        self.requests = Counter(
            "lastkd_http_requests",
            "HTTP requests answered.",
            ["service", "method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "lastkd_http_request_seconds",
            "HTTP request latency in seconds.",
            ["service", "method", "route"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
            registry=self.registry,
        )

    def install(self, app: FastAPI) -> None:
        """Add the counting middleware to ``app``.

        A client that hangs up before its request is read is not a server error: it is counted
        with the status ``499`` (nginx's "client closed request"), never as a 500.
        """

        @app.middleware("http")
        async def _count(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
            start = time.perf_counter()
            status = 500
            try:
                response = await call_next(request)
                status = response.status_code
                return response
            finally:
                route = request.scope.get("route")
                # The template ("/features/{set_id}/{clip_id}"), not the raw path: bounded labels.
                template = getattr(route, "path", None) or "unmatched"
                self.requests.labels(self.service, request.method, template, str(status)).inc()
                self.latency.labels(self.service, request.method, template).observe(time.perf_counter() - start)


def metrics_response(registry: CollectorRegistry) -> Response:
    """The Prometheus text exposition of ``registry``."""
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


def serve(app: FastAPI, host: str, port: int, token: str | None, log_level: str = "INFO") -> int:
    """Run ``app`` under uvicorn after the bind check; returns a process exit code."""
    import uvicorn

    check_bind(host, token)
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level.lower(), access_log=False)
    server = uvicorn.Server(config)

    def request_exit(code: int) -> None:
        # For start-up that continues behind the open port: an orderly shutdown, then exit `code`.
        app.state.exit_code = code
        server.should_exit = True

    app.state.request_exit = request_exit
    server.run()
    # uvicorn sets started=False when the lifespan start-up failed; an app whose start-up
    # continues behind an open port (the teacher's warm-up) sets app.state.exit_code instead.
    failed = getattr(app.state, "exit_code", 0)
    return failed or (0 if server.started else 1)


# --------------------------------------------------------------------------------------------
# the app factory both services build on
# --------------------------------------------------------------------------------------------
async def require_token(request: Request) -> None:
    """Dependency of mutating routes: ``Authorization: Bearer <app.state.token>`` when a token is
    set (with none every request passes; :func:`check_bind` keeps such a service on loopback)."""
    token: str | None = request.app.state.token
    if not token:
        return
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value:
        raise ApiError(
            401,
            "unauthorized",
            "this endpoint requires 'Authorization: Bearer <token>'",
            headers={"WWW-Authenticate": 'Bearer realm="lastkd"'},
        )
    # constant-time: the token cannot be guessed byte by byte from response timings
    if not hmac.compare_digest(value.strip().encode("utf-8"), token.encode("utf-8")):
        raise ApiError(
            401,
            "unauthorized",
            "invalid bearer token",
            headers={"WWW-Authenticate": 'Bearer realm="lastkd", error="invalid_token"'},
        )


Authorized = Annotated[None, Depends(require_token)]
"""Add ``_: Authorized`` to a route (or ``dependencies=[Depends(require_token)]``) to protect it."""


class JsonBodyLimit:
    """ASGI middleware: refuse request bodies over ``max_bytes`` without reading them.

    A declared ``Content-Length`` over the limit is answered 413 before a byte is read; a body
    without one (chunked) is cut off as soon as the bytes received pass the limit. Multipart
    uploads are left to :mod:`lastkd.services.teacher_api.uploads`, which streams them to disk
    under a limit of its own.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        if headers.get(b"content-type", b"").lower().startswith(b"multipart/"):
            await self.app(scope, receive, send)
            return
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            response = error_response(
                413, "too_large", f"the body is {int(declared)} bytes; this service takes at most {self.max_bytes}"
            )
            await response(scope, receive, send)
            return
        received = 0
        exceeded = False
        too_large = error_response(413, "too_large", f"the body passed the limit of {self.max_bytes} bytes")

        async def limited() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    exceeded = True
                    # Whatever the app makes of this (FastAPI answers 400 to a body it cannot
                    # read), the answer is replaced by the 413 below.
                    raise ApiError(413, "too_large", f"the body passed the limit of {self.max_bytes} bytes")
            return message

        async def answer(message: Message) -> None:
            if not exceeded:
                await send(message)
            elif message["type"] == "http.response.start":
                await too_large(scope, receive, send)

        await self.app(scope, limited, answer)


Lifespan = Callable[[FastAPI], AbstractAsyncContextManager[None]]


def create_service_app(
    *,
    service: str,
    title: str,
    token: str | None,
    lifespan: Lifespan | None = None,
    routers: list[APIRouter] | None = None,
    max_json_bytes: int = 1 << 20,
    description: str = "",
    component_schemas: Sequence[type[BaseModel]] = (),
) -> FastAPI:
    """A FastAPI app with what both services share: the JSON error shape, bearer auth
    (``app.state.token``, see :data:`Authorized`), request metrics (``app.state.metrics``,
    served at ``GET /metrics``), ``GET /health/live`` and a body limit for JSON requests.

    Routers come with the service; its own ``/health/ready`` lives in them.
    ``component_schemas``: models that routes reference by ``#/components/schemas/<Name>`` in
    ``openapi_extra`` without taking them as a FastAPI parameter (a body a route parses itself,
    the data of an event stream); they are added to ``/openapi.json``.
    """
    app = FastAPI(title=title, version="1", lifespan=lifespan, description=description, responses=ERROR_RESPONSES)
    app.state.token = token or None
    metrics = HttpMetrics(service)
    app.state.metrics = metrics
    install_error_handlers(app)
    metrics.install(app)
    app.add_middleware(JsonBodyLimit, max_bytes=max_json_bytes)

    @app.get("/health/live", tags=["health"], response_model=Health)
    async def live() -> Health:
        """The process is up and serving HTTP (says nothing about readiness)."""
        return Health(status="live")

    @app.get(
        "/metrics",
        tags=["health"],
        response_class=Response,
        responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format"}},
    )
    async def prometheus() -> Response:
        return metrics_response(metrics.registry)

    for router in routers or []:
        app.include_router(router)
    if component_schemas:
        _add_component_schemas(app, component_schemas)
    return app


def _add_component_schemas(app: FastAPI, models: Sequence[type[BaseModel]]) -> None:
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()  # FastAPI caches this very dict in app.openapi_schema
            found = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in models:
                own = model.model_json_schema(ref_template="#/components/schemas/{model}")
                found.update(own.pop("$defs", {}))
                found[model.__name__] = own
        return app.openapi_schema  # type: ignore[return-value]  # set by generate() above

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to extend the schema
