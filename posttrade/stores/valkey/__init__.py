"""Valkey (Redis-compatible) through `redis.asyncio`.

`open_valkey(...)` returns a `ValkeyStore`: `store.redis` is the `redis.asyncio.Redis`
client callers use directly (commands, pipelines, scripts); the store adds the two
things every store in `posttrade.stores` has, `ping()` for `/health` and `close()`.

Threading scheme (the same in every module of `posttrade.stores`): public I/O methods
are `async`. redis.asyncio is natively async, so there are no `_sync` twins here. Its
connections belong to the event loop that first used them: open and use a store
inside one running loop (under pytest-asyncio, one store per test loop).

Credentials (username/password) are used only when given; nothing is defaulted.

`ValkeyWatch` notices a Valkey that lost what a service copied into it (restarted, or
emptied): services whose Valkey keys are copies of their own state (pnl, hot_cache)
rewrite them at once instead of waiting for their keys' next refresh.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as redis_asyncio
from redis.exceptions import BusyLoadingError, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

__all__ = ["VALKEY_AWAY", "ValkeyLoss", "ValkeyStore", "ValkeyUnavailableError", "ValkeyWatch", "open_valkey"]


class ValkeyUnavailableError(ConnectionError):
    """Valkey does not answer PING."""


#: What a request raises while Valkey is away, restarting or loading its data: a sink
#: tries again (`posttrade.sinks`); a refused command (`ResponseError`) is not among them.
VALKEY_AWAY = (RedisConnectionError, RedisTimeoutError, BusyLoadingError, OSError)


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


# -- noticing a Valkey that lost its data ------------------------------------------------


@dataclass(frozen=True)
class ValkeyLoss:
    """What a service copied into Valkey may be gone: why, and which server (`run_id`)
    the copy has to be rewritten into."""

    reason: str  # "restarted", "emptied" or "first look" (see ValkeyWatch.check)
    detail: str
    run_id: str
    noticed_at: float = field(default_factory=time.time)  # epoch seconds

    def describe(self) -> dict[str, Any]:
        return {"reason": self.reason, "detail": self.detail, "run_id": self.run_id, "noticed_at": self.noticed_at}


class ValkeyWatch:
    """Notices that Valkey no longer holds what a service wrote into it.

    Two signs, read in one round trip (`INFO server` and a GET):

    * **restarted**: the server's `run_id` (new at every start of a Valkey process) is not
      the one the copy was written into. Whether it came back empty, or with an older
      RDB/AOF image than what was written last, the copy cannot be trusted;
    * **emptied**: the service's *sentinel* key is gone while the server kept running
      (FLUSHDB, FLUSHALL, a key eviction under memory pressure). The sentinel holds the
      `run_id` it was written under and has no TTL; each service (by name) has its own.

    On the first look after the service starts, a sentinel holding the current `run_id`
    means Valkey still has what this service wrote before it stopped (nothing to redo);
    one holding another `run_id` means Valkey was restarted while the service was down
    (a loss, "first look"). No sentinel at all is taken as the service's first start
    against this Valkey (it is written, nothing is lost) unless `first_start_is_loss`:
    it cannot be told from a Valkey emptied, or restarted without persistence, while the
    service was down.

    When a look finds a loss the sentinel is written again at once, before the service
    rewrites its copy: an emptying or restart *during* the rewrite is then noticed by the
    next look as a loss of its own (the rewrite starts over). `rebuilt(loss)` says the
    rewrite for `loss` is done; `lost` is the loss being rebuilt (None when the copy is
    whole). Looks are serialised (a health check and a background task may both look).
    """

    def __init__(self, store: ValkeyStore, sentinel: str, *, first_start_is_loss: bool = False):
        self.store = store
        self.sentinel = sentinel
        self.first_start_is_loss = first_start_is_loss
        self.run_id: str | None = None  # of the server the copy is being kept in
        self.lost: ValkeyLoss | None = None
        self.losses = 0  # losses noticed since the start (the first look's included)
        self.last_checked_at: float | None = None
        self._lock = asyncio.Lock()

    async def check(self) -> ValkeyLoss | None:
        """Look once; return a loss noticed by this look (None otherwise, also while an
        earlier loss is still being rebuilt). Raises RedisError/OSError when Valkey
        cannot be reached (it may be restarting: look again later)."""
        async with self._lock:
            pipe = self.store.redis.pipeline(transaction=False)
            pipe.info("server")
            pipe.get(self.sentinel)
            server, marker = await pipe.execute()
            run_id = str(server["run_id"])
            if isinstance(marker, bytes):
                marker = marker.decode()
            self.last_checked_at = time.time()
            if self.run_id is None:
                if marker == run_id:
                    self.run_id = run_id
                    return None
                if marker is None and not self.first_start_is_loss:
                    await self.store.redis.set(self.sentinel, run_id)
                    self.run_id = run_id
                    return None
                reason = "first look"
                detail = (
                    "no sentinel of this service: a first start against this Valkey, or it was emptied or "
                    "restarted while the service was down" if marker is None
                    else f"Valkey was restarted while the service was down (run_id {marker} -> {run_id})"
                )
            elif run_id != self.run_id:
                reason, detail = "restarted", f"Valkey's run_id changed ({self.run_id} -> {run_id})"
            elif marker != run_id:
                reason, detail = "emptied", f"the sentinel key {self.sentinel} is gone (FLUSHDB/FLUSHALL or eviction)"
            else:
                return None
            # The sentinel first: an emptying or restart during the rewrite is a loss again.
            await self.store.redis.set(self.sentinel, run_id)
            self.run_id = run_id
            self.lost = ValkeyLoss(reason, detail, run_id)
            self.losses += 1
            return self.lost

    def rebuilt(self, loss: ValkeyLoss) -> bool:
        """The copy lost in `loss` is whole again. False when another loss was noticed
        since (that one still needs its rewrite)."""
        if self.lost is not loss:
            return False
        self.lost = None
        return True
