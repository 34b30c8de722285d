"""The web face of a service: its pages, /health, /metrics, JSON errors, auth.

Every error is JSON (`{"error": ..., "detail": ...}`) with a 4xx/5xx status: a 405
carries `Allow` (every method the path answers), a store or bus that is down is a 503
and one that refuses a query a 502, never a 500 with the store's traceback. When a token
is configured, confidential pages and every state change need
`Authorization: Bearer <token>` (web/auth.py decides per route).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import msgspec
import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from ..core.exact import format_decimal
from .auth import AccessPolicy, BearerAuth, Tokens
from .openapi import openapi_route

if TYPE_CHECKING:
    from ..app import App

log = logging.getLogger(__name__)

GRACEFUL_SHUTDOWN_S = 3.0

class JSON(JSONResponse):
    """JSON that accepts msgspec structs and renders every Decimal as its canonical
    exact string (plain notation, no trailing zeros: `"121"`, `"-0.5"`), so the same
    number always reads the same in every answer."""

    def render(self, content: Any) -> bytes:
        return encode_json(content)


_json = msgspec.json.Encoder()


def encode_json(content: Any) -> bytes:
    """`content` as the services' JSON: structs as objects, every Decimal canonical."""
    return _json.encode(_canonical(msgspec.to_builtins(content, builtin_types=(Decimal,))))


def _canonical(value: Any) -> Any:
    if isinstance(value, Decimal):
        return format_decimal(value)
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    return value


async def _http_error(request: Request, exc: HTTPException) -> Response:
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        # Starlette names the methods of the one route it tried; the path may have more.
        headers["Allow"] = ", ".join(allowed_methods(request.app.router.routes, request.url.path))
    return JSON({"error": _reason(exc.status_code), "detail": exc.detail}, status_code=exc.status_code, headers=headers)


def allowed_methods(routes: list[BaseRoute], path: str) -> list[str]:
    methods: set[str] = set()
    for route in routes:
        if isinstance(route, Route) and route.path_regex.match(path):
            methods |= route.methods or {"GET", "HEAD"}
    return sorted(methods)


class StoreErrors:
    """A store or the bus failing a request is a JSON 503 (down, timed out) or 502 (it
    refused the query: a request that should have been refused before), never a 500.

    The store modules are looked up, not imported: a service that never loaded
    clickhouse_connect cannot be failed by it, and importing it costs a quarter second.
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            failure = store_failure(exc)
            if failure is None or started:
                raise
            status, store, reason = failure
            log.warning("%s %s: %s %s: %s", scope["method"], scope["path"], store, "unavailable" if status == 503 else "refused", reason)
            error = "store unavailable" if status == 503 else "store refused the query"
            await JSON({"error": error, "detail": {"store": store, "reason": reason[:500]}}, status)(scope, receive, send)


def store_failure(exc: BaseException) -> tuple[int, str, str] | None:
    """(status, store, reason) when `exc` is a store's or the bus's failure, else None."""
    reason = f"{type(exc).__name__}: {exc}"
    modules = sys.modules
    questdb = modules.get("posttrade.stores.questdb")
    if questdb is not None and isinstance(exc, questdb.QuestDBError):
        return (503 if isinstance(exc, questdb.QuestDBUnavailableError) else 502), "questdb", exc.message
    clickhouse = modules.get("clickhouse_connect.driver.exceptions")
    if clickhouse is not None and isinstance(exc, clickhouse.Error):
        down = isinstance(exc, clickhouse.OperationalError) or type(exc).__name__ == "ClickHouseUnavailableError"
        return (503 if down else 502), "clickhouse", reason
    valkey = modules.get("posttrade.stores.valkey")
    if valkey is not None and isinstance(exc, valkey.ValkeyUnavailableError):
        return 503, "valkey", reason
    redis = modules.get("redis.exceptions")
    if redis is not None and isinstance(exc, redis.RedisError):
        down = isinstance(exc, (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError))
        return (503 if down else 502), "valkey", reason
    nats = modules.get("nats.errors")
    if nats is not None and isinstance(exc, nats.Error):
        return 503, "nats", reason
    botocore = modules.get("botocore.exceptions")
    if botocore is not None and isinstance(exc, botocore.BotoCoreError):
        return 503, "object storage", reason
    if botocore is not None and isinstance(exc, botocore.ClientError):
        return 502, "object storage", reason
    httpx = modules.get("httpx")
    if httpx is not None and isinstance(exc, httpx.TransportError):
        return 503, "a store", reason
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return 503, "a store", reason
    return None


async def _unexpected_error(request: Request, exc: Exception) -> Response:
    log.exception("%s %s failed", request.method, request.url.path)
    return JSON({"error": "internal error", "detail": f"{type(exc).__name__}: {exc}"}, status_code=500)


def _reason(status: int) -> str:
    from http import HTTPStatus

    try:
        return HTTPStatus(status).phrase.lower()
    except ValueError:
        return "error"


def build_web_app(
    app: App,
    *,
    auth_token: str | None = None,
    read_token: str | None = None,
    protect_health: bool = False,
) -> Starlette:
    async def health(request: Request) -> Response:
        """Whether the service works: NATS, every agent (running, lag, crash loops, dead-letter rate) and the service's checks.

        ---
        responses:
          200: {description: "`status` ok, or degraded (works, but `reasons` says what is not right)", schema: {$ref: "#/components/schemas/Health"}}
          503: {description: "`status` unhealthy: a check is not ok (`reasons` says which and why)", schema: {$ref: "#/components/schemas/Health"}}
        """
        report = await app.health_report()
        return JSON({"service": app.name, **report}, 503 if report["status"] == "unhealthy" else 200)

    async def metrics(request: Request) -> Response:
        """Prometheus metrics of the service (text exposition format).

        ---
        responses:
          200: {description: the metrics, content: text/plain}
        """
        await app.health()  # refreshes the lag and table gauges
        return Response(generate_latest(app.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    routes = [Route("/health", health), Route("/metrics", metrics)]
    # The service's own routes are open (no account data); its pages are confidential
    # unless registered public (web/auth.py).
    public: list[BaseRoute] = list(routes)
    for page in app.pages:
        route = Route(page.path, page.handler, methods=list(page.methods), include_in_schema=page.documented)
        routes.append(route)
        if page.public:
            public.append(route)
    policy = AccessPolicy(Tokens(auth_token, read_token, protect_health), public)
    routes.append(openapi_route(app.name, routes, policy=policy))
    public.append(routes[-1])
    return _starlette(routes, policy)


def build_metrics_app(
    app: App, *, auth_token: str | None = None, read_token: str | None = None, protect_health: bool = False
) -> Starlette:
    async def metrics(request: Request) -> Response:
        await app.health()  # refreshes the lag and table gauges, as the main port's /metrics does
        return Response(generate_latest(app.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    routes: list[BaseRoute] = [Route("/metrics", metrics), Route("/", metrics)]
    return _starlette(routes, AccessPolicy(Tokens(auth_token, read_token, protect_health), list(routes)))


def _starlette(routes: list[BaseRoute], policy: AccessPolicy) -> Starlette:
    middleware = [Middleware(StoreErrors)]
    if policy.tokens.enabled:
        middleware.insert(0, Middleware(BearerAuth, policy=policy, routes=routes))
    return Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers={HTTPException: _http_error, Exception: _unexpected_error},
    )


class WebServer(uvicorn.Server):
    """uvicorn without its signal handling: the App owns SIGINT/SIGTERM."""

    def __init__(self, web: Starlette, host: str, port: int):
        # A dashboard's live stream never ends by itself: at a stop, open ones are cut
        # after a grace period instead of holding the stop for ever.
        config = uvicorn.Config(
            web, host=host, port=port, log_level="warning", lifespan="off", access_log=False,
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        )  # fmt: skip
        super().__init__(config)

    @contextlib.contextmanager
    def capture_signals(self):
        yield
