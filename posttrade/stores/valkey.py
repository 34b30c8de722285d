"""Valkey (Redis-compatible) through `redis.asyncio`.

`open_valkey(...)` returns a `ValkeyStore`: `store.redis` is the `redis.asyncio.Redis`
client callers use directly (commands, pipelines, scripts); the store adds the two
things every store in `posttrade.stores` has, `ping()` for `/health` and `close()`.

Threading scheme (the same in every module of `posttrade.stores`): public I/O methods
are `async`. redis.asyncio is natively async, so there are no `_sync` twins here. Its
connections belong to the event loop that first used them: open and use a store
inside one running loop (under pytest-asyncio, one store per test loop).

Credentials (username/password) are used only when given; nothing is defaulted.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as redis_asyncio
from redis.exceptions import RedisError

__all__ = ["ValkeyStore", "ValkeyUnavailableError", "open_valkey"]


class ValkeyUnavailableError(ConnectionError):
    """Valkey does not answer PING."""


class ValkeyStore:
    def __init__(self, client: redis_asyncio.Redis, *, location: str):
        self.redis = client
        self.location = location

    async def ping(self) -> bool:
        """True when Valkey answers PING; raises ValkeyUnavailableError otherwise."""
        try:
            answer = await self.redis.ping()
        except (RedisError, OSError) as exc:
            raise ValkeyUnavailableError(f"Valkey at {self.location} unreachable: {exc!r}") from exc
        if answer is not True:
            raise ValkeyUnavailableError(f"Valkey at {self.location} answered PING with {answer!r}")
        return True

    async def close(self) -> None:
        await self.redis.aclose()

    async def __aenter__(self) -> ValkeyStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def open_valkey(
    *,
    host: str,
    port: int = 6379,
    db: int = 0,
    username: str | None = None,
    password: str | None = None,
    ssl: bool = False,
    ssl_ca_certs: str | None = None,
    ssl_verify: bool = True,
    decode_responses: bool = False,
    max_connections: int | None = None,
    socket_timeout: float | None = 5.0,
    socket_connect_timeout: float | None = 5.0,
    client_name: str | None = None,
) -> ValkeyStore:
    """A Valkey store; no I/O happens until the first command (call `ping()` to check).

    `decode_responses=False` (the default) returns bytes: cheaper, and what msgpack /
    msgspec payloads want; pass True for str replies.
    """
    if username is not None and password is None:
        raise ValueError("a Valkey username needs a password")
    kwargs: dict[str, Any] = {
        "host": host,
        "port": int(port),
        "db": int(db),
        "decode_responses": decode_responses,
        "max_connections": max_connections,
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": socket_connect_timeout,
        "client_name": client_name,
    }
    if username is not None:
        kwargs["username"] = username
    if password is not None:
        kwargs["password"] = password
    if ssl:
        kwargs["ssl"] = True
        kwargs["ssl_cert_reqs"] = "required" if ssl_verify else "none"
        kwargs["ssl_check_hostname"] = ssl_verify
        if ssl_ca_certs is not None:
            kwargs["ssl_ca_certs"] = ssl_ca_certs
    client = redis_asyncio.Redis(**kwargs)
    return ValkeyStore(client, location=f"{'rediss' if ssl else 'redis'}://{host}:{port}/{db}")
