"""pnl's copy of its book in Valkey: the key scheme, the one script that writes a batch,
and the sink that keeps the copy current (docs/pnl.md, "Valkey").

Valkey holds a *copy*: the book is rebuilt from its changelog tables after a restart,
so these writes are not part of an agent's commit. The sink's buffer is the book's own
change sets (`PnlBook.cache_changes`, `cache_price_changes`): a key changed many times
between two writes is written once.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import Any

import msgspec
from prometheus_client import CollectorRegistry, Counter, Histogram
from redis.exceptions import ResponseError

from ...agents.pnl import SLICE, Key, PnlBook, refresh_in_slices
from ...app import DEGRADED
from ...sinks import RetryPolicy, Sink, SinkRefused, SinkStopping, SinkUnavailable, wait_set
from ...streams.stream import Stream
from . import VALKEY_AWAY, ValkeyLoss, ValkeyStore, ValkeyWatch

log = logging.getLogger(__name__)

# Characters a key part must not carry as is: the separator, the escape itself, glob
# characters (SCAN MATCH patterns), braces (cluster hash tags), spaces and controls.
_KEY_UNSAFE = re.compile(r"[%:*?\[\]{}\\\s\x00-\x1f\x7f]")


def key_part(value: str) -> str:
    """An account or symbol as one key segment: unsafe characters as %XX (UTF-8)."""
    return _KEY_UNSAFE.sub(lambda m: "".join(f"%{b:02X}" for b in m.group().encode()), value)


class PnlKeys:
    """The Valkey key scheme (docs/pnl.md). `P` is `pnl.key_prefix`."""

    def __init__(self, prefix: str):
        self.base = f"{prefix}:pnl"

    def position(self, account: str, symbol: str) -> str:
        return f"{self.base}:pos:{key_part(account)}:{key_part(symbol)}"

    def account(self, account: str) -> str:
        return f"{self.base}:acct:{key_part(account)}"

    def symbols(self, account: str) -> str:
        return f"{self.base}:symbols:{key_part(account)}"

    @property
    def accounts(self) -> str:
        return f"{self.base}:accounts"

    def sentinel(self, service: str) -> str:
        """The service's sentinel (`stores.valkey.ValkeyWatch`): gone means Valkey was emptied."""
        return f"{self.base}:meta:sentinel:{key_part(service)}"


# One call writes a batch: KEYS are the string keys then the set keys; ARGV is the TTL,
# the number of string keys, their values, then per set key a JSON array of members.
# One command instead of one per key (redis-py packs each command in Python), and
# atomic: a reader never sees a position updated but not its account's totals.
WRITE_BATCH = """
local ttl = ARGV[1]
local strings = tonumber(ARGV[2])
for i = 1, strings do
  redis.call('SET', KEYS[i], ARGV[2 + i], 'EX', ttl)
end
for i = strings + 1, #KEYS do
  local members = cjson.decode(ARGV[2 + i])
  for j = 1, #members, 1000 do
    redis.call('SADD', KEYS[i], unpack(members, j, math.min(j + 999, #members)))
  end
  redis.call('EXPIRE', KEYS[i], ttl)
end
return #KEYS
"""
CHUNK = 500  # keys per script call: bounds one call's packing and Valkey's time in it
_members_json = msgspec.json.Encoder()


class PnlCacheMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.keys_written = Counter("pnl_cache_keys_written_total", "Valkey keys written", ["kind"], registry=registry)
        self.flush_seconds = Histogram(
            "pnl_cache_flush_seconds",
            "One Valkey pipeline of changed P&L",
            registry=registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1),
        )
        self.errors = Counter("pnl_cache_errors_total", "Valkey writes that failed (retried)", registry=registry)
        self.rebuilds = Counter(
            "pnl_cache_rebuilds_total", "Every key rewritten because Valkey lost them (restarted, emptied)", ["reason"],
            registry=registry,
        )


class PnlCacheSink(Sink[Key]):
    """Copies changed P&L into Valkey: whole values (`SET ... EX ttl`), a batch per write.

    A task woken by position updates writes every change made since the last write, so
    changes arriving during a write are coalesced into the next, and writes are at least
    `min_interval_s` apart. Revaluations by price moves are taken every
    `price_interval_s` only: each move rewrites every position in its symbol. A write
    Valkey does not take is retried under the service's retry policy (`posttrade.sinks`);
    every `refresh_s` all keys are rewritten, which renews their TTL (a key whose
    service stopped expires instead of showing stale P&L forever).

    Every `check_s` (and at every /health) `watch` looks whether Valkey lost the keys
    (restarted, emptied: `stores.valkey.ValkeyWatch`). A loss marks every key changed and
    wakes the writer: the next write rewrites them all (the book is the state, Valkey a
    copy). Until a write that took all of them has succeeded, `rebuilding` is the loss
    (/health: degraded, with the reason).
    """

    def __init__(
        self,
        book: PnlBook,
        store: ValkeyStore,
        keys: PnlKeys,
        *,
        ttl_s: int,
        min_interval_s: float,
        price_interval_s: float,
        refresh_s: float,
        metrics: PnlCacheMetrics,
        watch: ValkeyWatch | None = None,
        check_s: float = 1.0,
        retry: RetryPolicy | None = None,
    ):
        if ttl_s < 1:
            raise ValueError("the cache TTL must be >= 1 s")
        super().__init__("valkey", retry)
        self.book = book
        self.store = store
        self.keys = keys
        self.ttl_s = ttl_s
        self.min_interval_s = min_interval_s
        self.price_interval_s = price_interval_s
        self.refresh_s = refresh_s
        self.cache_metrics = metrics
        self.watch = watch
        self.check_s = check_s
        self.check_error: str | None = None
        # The last rewrite after a loss: reason, seconds from noticing to done, keys.
        self.last_rebuild: dict[str, Any] | None = None
        # Every key is marked changed and no write has taken them yet (a write that does
        # and succeeds ends a rebuild).
        self._all_marked = False
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._stopping = False
        # redis-py's Script runs EVALSHA and loads the script when Valkey lacks it.
        self._script = store.redis.register_script(WRITE_BATCH)
        book.on_change = self._wake.set

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        self._stopping = False
        self._mark_all()
        self._wake.set()
        self._task = asyncio.create_task(self._run(), name="pnl:valkey")

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, timeout=5)
            except asyncio.TimeoutError:
                self._task.cancel()
            self._task = None

    def _mark_all(self) -> None:
        self.book.mark_all_changed(self.book.cache_changes)
        self._all_marked = True

    @property
    def pending(self) -> int:
        book = self.book
        return sum(len(c.keys) + len(c.accounts) for c in (book.cache_changes, book.cache_price_changes))

    async def health(self) -> tuple[bool | str, Any]:
        ok, detail = await super().health()
        detail["pending"] = self.pending
        return ok, detail

    # -- Valkey's losses ----------------------------------------------------------------

    @property
    def rebuilding(self) -> ValkeyLoss | None:
        """The loss whose rewrite is not done yet (None: Valkey has every key)."""
        return self.watch.lost if self.watch is not None else None

    async def check_valkey(self) -> ValkeyLoss | None:
        """Look whether Valkey lost the keys; on a loss, have every key rewritten now.
        Valkey unreachable: nothing to decide (the writes fail and are retried)."""
        if self.watch is None:
            return None
        try:
            loss = await self.watch.check()
        except VALKEY_AWAY + (ResponseError,) as exc:
            self.check_error = f"{type(exc).__name__}: {exc}"
            return None
        self.check_error = None
        if loss is not None:
            self.cache_metrics.rebuilds.labels(loss.reason).inc()
            log.warning("pnl: Valkey lost its keys (%s: %s); rewriting all %d positions", loss.reason, loss.detail,
                        len(self.book))
            self._mark_all()
            self._wake.set()
        return loss

    async def valkey_health(self) -> tuple[bool | str, Any]:
        """/health's `valkey`: unhealthy while Valkey does not answer, degraded while it
        is being rewritten after a loss."""
        detail: dict[str, Any] = {"location": self.store.location, "pending_changes": self.pending}
        if self.stats.last_error and self.stats.failing_since is not None:
            detail["last_error"] = self.stats.last_error
        if self.last_rebuild is not None:
            detail["last_rebuild"] = self.last_rebuild
        try:
            await self.store.ping()
        except Exception as exc:  # noqa: BLE001 - any failure means not healthy
            detail["error"] = str(exc)
            return False, detail
        # Look now too: a Valkey back empty is said at once, not a check interval later.
        await self.check_valkey()
        loss = self.rebuilding
        if loss is not None:
            detail["rebuilding"] = {**loss.describe(), "positions": len(self.book)}
            return DEGRADED, detail
        return True, detail

    # -- writing ---------------------------------------------------------------------------

    async def _run(self) -> None:
        """The writer's schedule: a write when woken (at most every `min_interval_s`),
        price moves every `price_interval_s`, every key every `refresh_s`, a look at
        Valkey every `check_s`."""
        now = time.monotonic()
        next_refresh = now + self.refresh_s
        next_prices = now
        next_check = now  # the first look, before the first write
        while True:
            if not self._stopping:
                timeout = max(0.0, min(next_refresh, next_prices, next_check) - time.monotonic())
                await wait_set(self._wake, timeout)
            self._wake.clear()
            now = time.monotonic()
            if now >= next_check and not self._stopping:
                await self.check_valkey()
                next_check = time.monotonic() + self.check_s
            if now >= next_refresh:
                self._mark_all()
                next_refresh = now + self.refresh_s
            prices = now >= next_prices or self._stopping
            if prices:
                next_prices = now + self.price_interval_s
            started = time.monotonic()
            try:
                await self.flush(prices=prices)
            except SinkStopping:
                log.warning("pnl: Valkey unavailable at shutdown, %d changes not cached", self.pending)
                return
            if self._stopping:
                return
            rest = self.min_interval_s - (time.monotonic() - started)
            if rest > 0:
                await asyncio.sleep(rest)

    async def flush(self, stream: Stream | None = None, *, prices: bool = True) -> int:
        """Write what position updates changed since the last flush and, with `prices`,
        what price moves did, retrying while Valkey is away; return the keys written.
        A batch Valkey refuses (not for want of memory) is dropped: it would be refused
        again, and the next full rewrite carries its keys."""
        book = self.book
        if prices:
            await refresh_in_slices(book)
        # A write that takes every key after a loss ends its rebuild once it succeeds.
        rebuild, everything = self.rebuilding, self._all_marked
        self._all_marked = False
        keys, accounts = book.cache_changes.take()
        if prices:
            price_keys, price_accounts = book.cache_price_changes.take()
            keys |= price_keys
            accounts |= price_accounts
        if not keys and not accounts:
            if rebuild is not None and everything:
                self._rebuilt(rebuild, 0)
            return 0
        try:
            written = await self.retrying(
                lambda: self.write_keys(keys, accounts), what="write", rows=len(keys) + len(accounts), stream=stream
            )
        except SinkRefused:
            return 0
        except BaseException:
            book.cache_changes.give_back(keys, accounts)
            self._all_marked |= everything
            raise
        if rebuild is not None and everything:
            self._rebuilt(rebuild, len(keys))
        return written

    def _rebuilt(self, loss: ValkeyLoss, positions: int) -> None:
        assert self.watch is not None
        if self.watch.rebuilt(loss):  # else a newer loss: its own rewrite is under way
            seconds = round(time.time() - loss.noticed_at, 3)
            self.last_rebuild = {"reason": loss.reason, "noticed_at": loss.noticed_at, "seconds": seconds,
                                 "positions": positions}
            log.warning("pnl: Valkey has every key again (%d positions rewritten %.3f s after the loss was noticed)",
                        positions, seconds)

    async def write_keys(self, keys: set[Key], accounts: set[str]) -> int:
        """One attempt: the rows of `keys`, the totals of `accounts`, and the symbol and
        account sets, in script calls of `CHUNK` keys; returns the keys written."""
        started = time.perf_counter()
        try:
            written = await self._write(keys, accounts)
        except ResponseError as exc:
            self.cache_metrics.errors.inc()
            if str(exc).startswith("OOM"):  # Valkey full: like being away, try again
                raise SinkUnavailable(f"Valkey is full: {exc}") from exc
            # Refused (e.g. a foreign key of another type under one of our names). What
            # the script wrote before stays; the rest waits for the next full rewrite.
            raise SinkRefused(f"Valkey refused a write: {exc}") from exc
        except Exception:
            self.cache_metrics.errors.inc()
            raise
        self.cache_metrics.flush_seconds.observe(time.perf_counter() - started)
        self.cache_metrics.keys_written.labels("position").inc(len(keys))
        self.cache_metrics.keys_written.labels("account").inc(len(accounts))
        return written

    def unavailable(self, exc: Exception) -> bool:
        return super().unavailable(exc) or isinstance(exc, VALKEY_AWAY)

    async def _write(self, keys: set[Key], accounts: set[str]) -> int:
        book, scheme = self.book, self.keys
        names: list[str] = []
        values: list[bytes] = []
        by_account: dict[str, list[str]] = {}
        for done, key in enumerate(keys, 1):
            value = book.row_json(key)
            if value is not None:
                names.append(scheme.position(*key))
                values.append(value)
                by_account.setdefault(key[0], []).append(key[1])
            if not done % SLICE:
                await asyncio.sleep(0)  # let the agents in
        for done, account in enumerate(accounts, 1):
            value = book.totals_json(account)
            if value is not None:
                names.append(scheme.account(account))
                values.append(value)
            if not done % SLICE:
                await asyncio.sleep(0)
        sets = [(scheme.symbols(account), symbols) for account, symbols in by_account.items()]
        if by_account:
            sets.append((scheme.accounts, list(by_account)))
        for start in range(0, max(len(names), len(sets)), CHUNK):
            chunk_names, chunk_values = names[start : start + CHUNK], values[start : start + CHUNK]
            chunk_sets = sets[start : start + CHUNK]
            await self._script(
                keys=[*chunk_names, *(name for name, _ in chunk_sets)],
                args=[self.ttl_s, len(chunk_names), *chunk_values, *(_members_json.encode(m) for _, m in chunk_sets)],
            )
        return len(names) + len(sets)
