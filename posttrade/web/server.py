"""The web face of a service: its pages, /health, /metrics, JSON errors, auth.

Every error is JSON (`{"error": ..., "detail": ...}`) with a 4xx/5xx status. When an
auth token is configured, requests that change state (anything but GET/HEAD/OPTIONS)
must carry `Authorization: Bearer <token>`.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import msgspec
import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..core.exact import format_decimal
from .openapi import openapi_route

if TYPE_CHECKING:
    from ..app import App

log = logging.getLogger(__name__)

SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}


class BadRequest(HTTPException):
    """Raise from a page for an invalid request: 400 with what is wrong."""

    def __init__(self, detail: Any, status_code: int = 400):
        super().__init__(status_code=status_code, detail=detail)


class JSON(JSONResponse):
    """JSON that accepts msgspec structs and renders every Decimal as its canonical
    exact string (plain notation, no trailing zeros: `"121"`, `"-0.5"`), so the same
    number always reads the same in every answer."""

    def render(self, content: Any) -> bytes:
        return _json.encode(_canonical(msgspec.to_builtins(content, builtin_types=(Decimal,))))


_json = msgspec.json.Encoder()


def _canonical(value: Any) -> Any:
    if isinstance(value, Decimal):
        return format_decimal(value)
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    return value


def query_int(request: Request, name: str, default: int | None = None, *, minimum: int | None = None, maximum: int | None = None) -> int | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest({"parameter": name, "error": f"must be an integer, got {raw!r}"}) from None
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise BadRequest({"parameter": name, "error": f"must be between {minimum} and {maximum}, got {value}"})
    return value


class BearerAuth(BaseHTTPMiddleware):
    def __init__(self, app, token: str):
        super().__init__(app)
        self.token = token.encode()

    async def dispatch(self, request: Request, call_next):
        if request.method not in SAFE_METHODS:
            header = request.headers.get("authorization", "")
            scheme, _, given = header.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), self.token):
                return JSON({"error": "unauthorized", "detail": "this endpoint needs a bearer token"}, 401)
        return await call_next(request)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    return JSON({"error": _reason(exc.status_code), "detail": exc.detail}, status_code=exc.status_code)


async def _unexpected_error(request: Request, exc: Exception) -> Response:
    log.exception("%s %s failed", request.method, request.url.path)
    return JSON({"error": "internal error", "detail": f"{type(exc).__name__}: {exc}"}, status_code=500)


def _reason(status: int) -> str:
    from http import HTTPStatus

    try:
        return HTTPStatus(status).phrase.lower()
    except ValueError:
        return "error"


def build_web_app(app: App, *, auth_token: str | None = None) -> Starlette:
    async def health(request: Request) -> Response:
        """Whether the service works: NATS, every agent (running, lag) and the service's checks.

        ---
        responses:
          200: {description: every check is ok, schema: {$ref: "#/components/schemas/Health"}}
          503: {description: a check is not ok (`checks` says which and why), schema: {$ref: "#/components/schemas/Health"}}
        """
        healthy, checks = await app.health()
        return JSON({"service": app.name, "status": "ok" if healthy else "unhealthy", "checks": checks}, 200 if healthy else 503)

    async def metrics(request: Request) -> Response:
        """Prometheus metrics of the service (text exposition format).

        ---
        responses:
          200: {description: the metrics, content: text/plain}
        """
        await app.health()  # refreshes the lag and table gauges
        return Response(generate_latest(app.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    routes = [Route("/health", health), Route("/metrics", metrics)]
    routes += [Route(p.path, p.handler, methods=list(p.methods)) for p in app.pages]
    routes.append(openapi_route(app.name, routes, auth=bool(auth_token)))
    middleware = [Middleware(BearerAuth, token=auth_token)] if auth_token else []
    return Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers={HTTPException: _http_error, Exception: _unexpected_error},
    )


def build_metrics_app(app: App) -> Starlette:
    async def metrics(request: Request) -> Response:
        return Response(generate_latest(app.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return Starlette(routes=[Route("/metrics", metrics), Route("/", metrics)])


class WebServer(uvicorn.Server):
    """uvicorn without its signal handling: the App owns SIGINT/SIGTERM."""

    def __init__(self, web: Starlette, host: str, port: int):
        super().__init__(uvicorn.Config(web, host=host, port=port, log_level="warning", lifespan="off", access_log=False))

    @contextlib.contextmanager
    def capture_signals(self):
        yield
