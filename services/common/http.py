"""HTTP conventions shared by the teacher and the trainer services.

One place decides how both services authenticate, refuse unsafe binds, report health, count
requests for Prometheus and shape their errors, so a client sees one API style:

* errors are JSON ``{"error": {"code": "...", "message": "...", ...}}`` with a 4xx for every
  user mistake (validation errors included) and 5xx only for faults of the server;
* mutating endpoints depend on :func:`bearer_auth`; with no token configured they are open,
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
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from lastkd.services.settings import is_loopback

log = logging.getLogger(__name__)

__all__ = [
    "ApiError",
    "BindRefusedError",
    "HttpMetrics",
    "bearer_auth",
    "check_bind",
    "error_body",
    "error_response",
    "install_error_handlers",
    "add_live_route",
    "metrics_response",
    "serve",
]


class ApiError(Exception):
    """An error answered to the client as ``{"error": {"code", "message", ...}}``.

    Raise it anywhere below a route; :func:`install_error_handlers` turns it into the response.
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
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})
        self.extra = extra


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
    """Route ApiError, HTTP exceptions and validation errors through the shared JSON shape."""

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, headers=exc.headers, **exc.extra)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _STATUS_CODES.get(exc.status_code, "error")
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        return error_response(exc.status_code, code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [
            {"loc": [str(p) for p in err.get("loc", ())], "msg": str(err.get("msg", ""))} for err in exc.errors()
        ]
        summary = "; ".join(f"{'.'.join(p['loc'])}: {p['msg']}" for p in problems) or "invalid request"
        return error_response(422, "invalid_request", summary, details=problems)


def bearer_auth(token: str | None) -> Callable[[Request], Awaitable[None]]:
    """A FastAPI dependency that requires ``Authorization: Bearer <token>`` when a token is set.

    With ``token=None`` the dependency lets every request through (the bind check keeps such a
    service on loopback). The comparison is constant-time so the token cannot be guessed byte by
    byte from response timings.
    """
    expected = token.encode("utf-8") if token else None

    async def _require_token(request: Request) -> None:
        if expected is None:
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
        if not hmac.compare_digest(value.strip().encode("utf-8"), expected):
            raise ApiError(
                401,
                "unauthorized",
                "invalid bearer token",
                headers={"WWW-Authenticate": 'Bearer realm="lastkd", error="invalid_token"'},
            )

    return _require_token


def check_bind(host: str, token: str | None) -> None:
    """Refuse to listen on a non-loopback address unless an API token is configured."""
    if not is_loopback(host) and not token:
        raise BindRefusedError(
            f"refusing to listen on {host!r}: it is not a loopback address and no API token is set "
            "(set LASTKD_API_TOKEN, or bind 127.0.0.1)"
        )


def add_bind_arguments(parser: "argparse.ArgumentParser", service: str) -> None:
    """The ``--host``/``--port`` options every ``lastkd serve-*`` command shares."""
    env = f"LASTKD_{service.upper()}"
    parser.add_argument("--host", default=None, help=f"bind address (default: {env}_HOST)")
    parser.add_argument("--port", type=int, default=None, help=f"port (default: {env}_PORT)")


def bind_address(args: "argparse.Namespace", host: str, port: int, token: str | None) -> tuple[str, int]:
    """The (host, port) to listen on: command-line overrides over settings, checked.

    Raises :class:`BindRefusedError` for a port out of range or a public address without a token.
    """
    host = args.host or host
    port = args.port if args.port is not None else port
    if not 0 < port < 65536:
        raise BindRefusedError(f"port must be in 1..65535, got {port}")
    check_bind(host, token)
    return host, port


def add_live_route(app: FastAPI) -> None:
    """``GET /health/live``: the process is up and serving HTTP (says nothing about readiness)."""

    @app.get("/health/live", tags=["health"])
    async def live() -> dict[str, str]:
        return {"status": "live"}


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
        """Add the counting middleware to ``app``."""

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
    server.run()
    # uvicorn sets started=False when the lifespan start-up failed (e.g. bad model settings).
    return 0 if server.started else 1
