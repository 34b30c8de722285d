"""Who may call what: bearer tokens decided per route.

A service has up to two tokens (`service.auth_token`, `service.read_token`, both from the
environment only). With neither, every route is open. With one:

* a **confidential** route — every page unless it was registered `public=True` — needs
  a token for reading (GET/HEAD): the full token or the read-only one;
* a **state-changing** request (anything but GET/HEAD/OPTIONS, on any route) needs the
  full token; the read-only token gets 403;
* a **public** route (`/health`, `/metrics`, `/openapi.json`, pages registered
  `public=True`: counters that carry no account data) stays open, unless
  `service.protect_health` is set, which puts them behind a token too.

The decision is made for the route the request reaches, before its handler runs, so a
page nobody thought about is confidential by default. A request that reaches no route
(404) or a route without its method (405) passes through: it gets nothing but the error.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import msgspec
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Receive, Scope, Send

Access = Literal["public", "read", "write"]
PUBLIC: Access = "public"
READ: Access = "read"
WRITE: Access = "write"

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

UNAUTHORIZED_DETAIL = "this endpoint needs `Authorization: Bearer <token>`"
FORBIDDEN_DETAIL = "the read-only token cannot change state; use the service's auth token"


@dataclass(frozen=True)
class Tokens:
    """A service's bearer tokens (`service.auth_token`, `service.read_token`)."""

    full: str | None = None
    read: str | None = None
    protect_health: bool = False

    @property
    def enabled(self) -> bool:
        return bool(self.full or self.read)


@dataclass
class AccessPolicy:
    """What each (route, method) of one web app needs, given its tokens and which of its
    routes are public. Routes are compared by identity (Starlette routes are unhashable)."""

    tokens: Tokens = field(default_factory=Tokens)
    public_routes: list[BaseRoute] = field(default_factory=list)

    def is_public(self, route: BaseRoute) -> bool:
        return any(route is r for r in self.public_routes)

    def access(self, route: BaseRoute, method: str) -> Access:
        """What the route and method are: public, a read of confidential data, a change."""
        if method.upper() not in SAFE_METHODS:
            return WRITE
        return PUBLIC if self.is_public(route) else READ

    def required(self, route: BaseRoute, method: str) -> Access:
        """What a request must carry: PUBLIC (nothing), READ (either token), WRITE (the full token)."""
        if not self.tokens.enabled:
            return PUBLIC
        access = self.access(route, method)
        if access == PUBLIC and self.tokens.protect_health:
            return READ
        return access

    def check(self, authorization: str | None, required: Access) -> tuple[int, str] | None:
        """None when `authorization` (the header) grants `required`; else (status, detail)."""
        if required == PUBLIC:
            return None
        given = bearer_token(authorization)
        if given is not None:
            if _same(given, self.tokens.full):
                return None
            if _same(given, self.tokens.read):
                return None if required == READ else (403, FORBIDDEN_DETAIL)
        return 401, UNAUTHORIZED_DETAIL


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def _same(given: str, expected: str | None) -> bool:
    # Constant-time: how much of a guess was right must not show in the timing.
    return expected is not None and hmac.compare_digest(given.encode(), expected.encode())


_json = msgspec.json.Encoder()


class BearerAuth:
    """ASGI middleware: finds the route a request reaches and applies the policy to it."""

    def __init__(self, app: ASGIApp, *, policy: AccessPolicy, routes: Sequence[BaseRoute]):
        self.app = app
        self.policy = policy
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            route = _full_match(self.routes, scope)
            if route is not None:
                required = self.policy.required(route, scope["method"])
                refusal = self.policy.check(_header(scope, b"authorization"), required)
                if refusal is not None:
                    await _refuse(send, *refusal)
                    return
        await self.app(scope, receive, send)


def _full_match(routes: Iterable[BaseRoute], scope: Scope) -> BaseRoute | None:
    for route in routes:
        match, _ = route.matches(scope)
        if match is Match.FULL:
            return route
    return None


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers") or ():
        if key.lower() == name:
            return value.decode("latin-1")
    return None


async def _refuse(send: Send, status: int, detail: str) -> None:
    body = _json.encode({"error": "unauthorized" if status == 401 else "forbidden", "detail": detail})
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b'Bearer realm="posttrade"'))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
