"""pnl (port 8100): real-time P&L of ptrc's positions at market, cached in Valkey,
snapshotted to QuestDB, served at `/pnl/realtime` and `/pnl/history`.

    positions (ptrc's PositionUpdate) ─┐
    quotes / market trades / bars ─────┴─> PnlBook (posttrade.agents.pnl) ──> /pnl/realtime
                                                 │                        (from memory)
                                                 ├─> PnlCacheWriter ─> Valkey   (coalesced)
                                                 └─> PnlSnapshots  ─> QuestDB  (interval)
                                                                        └─> /pnl/history

Valkey and QuestDB hold *copies* of what the book holds; the book itself is rebuilt from
its changelog tables after a restart. So their writes are not part of an agent's
commit: a writer that finds its store down keeps the changes (and QuestDB snapshots)
and retries with back-off while the agents go on. docs/pnl.md has the endpoints, the
Valkey key scheme and the QuestDB tables.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from typing import Any

import msgspec
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from redis.exceptions import BusyLoadingError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.requests import Request
from starlette.responses import Response

from ..agents.pnl import (
    AccountPnl,
    Key,
    PnlBook,
    PnlChannels,
    PositionPnl,
    add_pnl_agents,
    plain_data,
)
from ..app import DEGRADED, App
from ..config import QuestDBSection, RedisSection, ServiceConfig, _Section
from ..core.bars import NS_PER_S, interval_seconds
from ..core.bounds import QUESTDB_DECIMAL, QUESTDB_PRECISION, QUESTDB_SCALE
from ..core.exact import EXACT, format_decimal
from ..core.marks import DEFAULT_PRIORITY, MarkSource, MarkState
from ..streams import subjects
from ..streams.events import PositionUpdate, encode
from ..streams.transport import Transport
from ..stores.questdb import (
    QuestDBClient,
    QuestDBError,
    QuestDBUnavailableError,
    QuestDBWriteError,
    QuestDBWriter,
    check_identifier,
    columns_from_rows,
    sql_literal,
)
from ..stores.valkey import ValkeyLoss, ValkeyStore, ValkeyWatch, open_valkey
from ..web import params as web_params
from ..web.live import History, LiveTopic
from ..web.params import BadRequest
from ..web.server import JSON
from .wiring import new_app

log = logging.getLogger(__name__)


# -- configuration -----------------------------------------------------------------------


class SnapshotSection(_Section):
    """QuestDB history: which tables, how often."""

    table: str = "pnl_snapshots"  # one row per (snapshot, account, symbol)
    account_table: str = "pnl_account_snapshots"  # one row per (snapshot, account)
    interval_s: float = 1.0  # every interval: the rows that changed since the last one
    full_every: int = 60  # ...and every this many intervals: every row (1 = always all)
    max_pending_rows: int = 1_000_000  # kept in memory while QuestDB is down

    def __post_init__(self) -> None:
        check_identifier(self.table)
        check_identifier(self.account_table)
        if self.table == self.account_table:
            raise ValueError("table and account_table must differ")
        if self.interval_s <= 0 or self.full_every < 1 or self.max_pending_rows < 1:
            raise ValueError("snapshots need interval_s > 0, full_every >= 1 and max_pending_rows >= 1")


class HistorySection(_Section):
    default_range_s: int = 3600  # /pnl/history without from/to: the last hour
    default_interval: str = "1m"
    max_points: int = 10_000  # buckets per series a request may ask for
    max_rows: int = 100_000  # rows a response may hold (more: truncated, said so)
    timeout_s: float = 10.0

    def __post_init__(self) -> None:
        interval_seconds(self.default_interval)
        if self.default_range_s < 1 or self.max_points < 1 or self.max_rows < 1 or self.timeout_s <= 0:
            raise ValueError("history needs default_range_s, max_points, max_rows >= 1 and timeout_s > 0")


class PnlSection(_Section):
    key_prefix: str = "pt"  # Valkey keys start `pt:pnl:`
    mark_priority: list[MarkSource] = msgspec.field(default_factory=lambda: list(DEFAULT_PRIORITY))
    # Without any market data mark for a symbol, value it at the mark ptrc sent with
    # the position (its source is then "position"); false: unmarked (null P&L).
    use_position_mark: bool = True
    cache_min_interval_s: float = 0.05  # at most one Valkey write per this long
    # Revaluations by price moves reach Valkey at most this often (position updates
    # go at once): a move rewrites every position in its symbol, and prices move
    # all the time. /pnl/realtime is always current.
    cache_price_interval_s: float = 1.0
    cache_refresh_s: float | None = None  # rewrite every key this often (default: ttl / 3)
    # How often the Valkey writer looks whether Valkey lost its keys (restarted: new
    # run_id; emptied: the sentinel key gone); a loss rewrites every key at once.
    valkey_check_s: float = 1.0
    snapshots: SnapshotSection = msgspec.field(default_factory=SnapshotSection)
    history: HistorySection = msgspec.field(default_factory=HistorySection)

    def __post_init__(self) -> None:
        if not self.key_prefix or any(c.isspace() or c in ":*?[]{}" for c in self.key_prefix):
            raise ValueError("key_prefix must be non-empty, without spaces, ':', braces or glob characters")
        if not self.mark_priority or len(set(self.mark_priority)) != len(self.mark_priority):
            raise ValueError("mark_priority must list each source at most once, and at least one")
        if self.cache_min_interval_s < 0 or self.cache_price_interval_s < 0:
            raise ValueError("cache_min_interval_s and cache_price_interval_s must be >= 0")
        if self.cache_refresh_s is not None and self.cache_refresh_s <= 0:
            raise ValueError("cache_refresh_s must be > 0")
        if self.valkey_check_s <= 0:
            raise ValueError("valkey_check_s must be > 0")


class PnlConfig(ServiceConfig):
    pnl: PnlSection = msgspec.field(default_factory=PnlSection)


CONFIG = PnlConfig


class PnlMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.cache_writes = Counter("pnl_cache_keys_written_total", "Valkey keys written", ["kind"], registry=registry)
        self.cache_flush_seconds = Histogram(
            "pnl_cache_flush_seconds",
            "One Valkey pipeline of changed P&L",
            registry=registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1),
        )
        self.cache_errors = Counter("pnl_cache_errors_total", "Valkey writes that failed (retried)", registry=registry)
        self.cache_rebuilds = Counter(
            "pnl_cache_rebuilds_total", "Every key rewritten because Valkey lost them (restarted, emptied)", ["reason"],
            registry=registry,
        )
        self.snapshot_rows = Counter("pnl_snapshot_rows_total", "Rows written to QuestDB", ["table"], registry=registry)
        self.snapshot_errors = Counter("pnl_snapshot_errors_total", "QuestDB writes that failed", ["kind"], registry=registry)
        self.snapshot_dropped = Counter(
            "pnl_snapshot_rows_dropped_total", "Snapshot rows given up (over max_pending_rows, or unwritable)",
            ["reason"], registry=registry,
        )
        self.snapshot_pending = Gauge("pnl_snapshot_pending_rows", "Snapshot rows waiting for QuestDB", registry=registry)


# -- Valkey ------------------------------------------------------------------------------

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


class ValkeyFull(ConnectionError):
    """Valkey refuses writes for lack of memory (retried like an outage)."""


_VALKEY_TRANSIENT = (RedisConnectionError, RedisTimeoutError, BusyLoadingError, OSError)
RETRY_DELAYS_S = (0.1, 0.5, 1, 2, 5, 10)
_CHUNK = 500  # keys per script call: bounds one call's packing and Valkey's time in it
# Rows a background task (Valkey writer, snapshots) handles before it yields to the
# event loop: a position update waiting behind it waits at most about this much work
# (~64 rows x 30-50 us), not a whole flush or snapshot.
SLICE = 64


async def refresh_in_slices(book: PnlBook) -> None:
    """`book.refresh()`, a slice at a time, yielding to the agents in between."""
    while book.refresh(limit=SLICE):
        await asyncio.sleep(0)


class PnlCacheWriter:
    """Copies changed P&L into Valkey: whole values (`SET ... EX ttl`), a batch per call.

    Runs as a task woken by position updates. A write takes every change made since
    the last one, so changes arriving during a write are coalesced into the next, and
    writes are at least `min_interval_s` apart. Revaluations by price moves are taken
    every `price_interval_s` only: each move rewrites every position in its symbol.
    A failed write gives its changes back and is retried with back-off; every
    `refresh_s` all keys are rewritten, which renews their TTL (a key whose service
    stopped expires instead of showing stale P&L forever).

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
        metrics: PnlMetrics,
        watch: ValkeyWatch | None = None,
        check_s: float = 1.0,
    ):
        if ttl_s < 1:
            raise ValueError("the cache TTL must be >= 1 s")
        self.book = book
        self.store = store
        self.keys = keys
        self.ttl_s = ttl_s
        self.min_interval_s = min_interval_s
        self.price_interval_s = price_interval_s
        self.refresh_s = refresh_s
        self.metrics = metrics
        self.flushes = 0
        self.last_error: str | None = None
        self.last_flush_at: float | None = None
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
        self._script = store.redis.register_script(_WRITE_BATCH)
        book.on_change = self._wake.set

    def start(self) -> None:
        self._stopping = False
        self._mark_all()
        self._wake.set()
        self._task = asyncio.create_task(self._run(), name="pnl:valkey")

    def _mark_all(self) -> None:
        self.book.mark_all_changed(self.book.cache_changes)
        self._all_marked = True

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
        except _VALKEY_TRANSIENT + (ResponseError,) as exc:
            self.check_error = f"{type(exc).__name__}: {exc}"
            return None
        self.check_error = None
        if loss is not None:
            self.metrics.cache_rebuilds.labels(loss.reason).inc()
            log.warning("pnl: Valkey lost its keys (%s: %s); rewriting all %d positions", loss.reason, loss.detail,
                        len(self.book))
            self._mark_all()
            self._wake.set()
        return loss

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, timeout=5)
            except asyncio.TimeoutError:
                self._task.cancel()
            self._task = None

    @property
    def pending(self) -> int:
        book = self.book
        return sum(len(c.keys) + len(c.accounts) for c in (book.cache_changes, book.cache_price_changes))

    async def _run(self) -> None:
        attempt = 0
        now = time.monotonic()
        next_refresh = now + self.refresh_s
        next_prices = now
        next_check = now  # the first look, before the first write
        while True:
            if not self._stopping:
                timeout = max(0.0, min(next_refresh, next_prices, next_check) - time.monotonic())
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout)
                except asyncio.TimeoutError:
                    pass
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
                attempt = 0
            except _VALKEY_TRANSIENT as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                self.metrics.cache_errors.inc()
                if self._stopping:
                    log.warning("pnl: Valkey unavailable at shutdown, %d changes not cached: %s", self.pending, exc)
                    return
                delay = RETRY_DELAYS_S[min(attempt, len(RETRY_DELAYS_S) - 1)]
                attempt += 1
                log.warning("pnl: writing Valkey failed (attempt %d), retrying in %.1fs: %s", attempt, delay, exc)
                if await self._back_off(delay):
                    attempt = 0  # Valkey is back (and lost the keys): rewrite them now
                self._wake.set()
                continue
            except Exception:  # a bug: log it, keep the writer alive
                log.exception("pnl: Valkey writer failed")
                await asyncio.sleep(1)
                continue
            if self._stopping:
                return
            rest = self.min_interval_s - (time.monotonic() - started)
            if rest > 0:
                await asyncio.sleep(rest)

    async def _back_off(self, delay: float) -> bool:
        """Wait `delay` after a failed write, looking at Valkey every `check_s`: True as
        soon as it is back having lost the keys (the rewrite should not wait)."""
        deadline = time.monotonic() + delay
        while (left := deadline - time.monotonic()) > 0:
            await asyncio.sleep(min(left, self.check_s))
            if await self.check_valkey() is not None:
                return True
        return False

    async def flush(self, *, prices: bool = True) -> int:
        """Write what position updates changed since the last flush and, with
        `prices`, what price moves did; return the keys written."""
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
        started = time.perf_counter()
        try:
            written = await self._write(keys, accounts)
        except ResponseError as exc:
            if str(exc).startswith("OOM"):  # Valkey full: like being away, try again
                book.cache_changes.give_back(keys, accounts)
                self._all_marked |= everything
                raise ValkeyFull(str(exc)) from exc
            # Refused (e.g. a foreign key of another type under one of our names):
            # it would be refused again. What the script wrote before stays; the
            # rest waits for the next full rewrite.
            self.metrics.cache_errors.inc()
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.error("pnl: Valkey refused a write: %s", exc)
            return 0
        except BaseException:
            book.cache_changes.give_back(keys, accounts)
            self._all_marked |= everything
            raise
        self.metrics.cache_flush_seconds.observe(time.perf_counter() - started)
        self.flushes += 1
        self.last_error = None
        self.last_flush_at = time.time()
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
        for start in range(0, max(len(names), len(sets)), _CHUNK):
            chunk_names, chunk_values = names[start : start + _CHUNK], values[start : start + _CHUNK]
            chunk_sets = sets[start : start + _CHUNK]
            await self._script(
                keys=[*chunk_names, *(name for name, _ in chunk_sets)],
                args=[self.ttl_s, len(chunk_names), *chunk_values, *(_members(m) for _, m in chunk_sets)],
            )
        self.metrics.cache_writes.labels("position").inc(len(keys))
        self.metrics.cache_writes.labels("account").inc(len(accounts))
        return len(names) + len(sets)


def _members(members: list[str]) -> bytes:
    return _members_json.encode(members)


_members_json = msgspec.json.Encoder()

# One call writes a batch: KEYS are the string keys then the set keys; ARGV is the TTL,
# the number of string keys, their values, then per set key a JSON array of members.
# One command instead of one per key (redis-py packs each command in Python), and
# atomic: a reader never sees a position updated but not its account's totals.
_WRITE_BATCH = """
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


# -- QuestDB snapshots --------------------------------------------------------------------

DECIMAL_SQL = QUESTDB_DECIMAL  # core.bounds: every figure ptrc keeps fits it
_QUANTUM = Decimal(1).scaleb(-QUESTDB_SCALE)
_MAX_ADJUSTED = QUESTDB_PRECISION - QUESTDB_SCALE - 1  # 26 integer digits: adjusted exponent <= 25

POSITION_MONEY = (
    "net_qty", "avg_open_price", "multiplier", "mark", "realized_pnl_gross", "fees", "realized_pnl_net",
    "unrealized_pnl", "fifo_realized_pnl_gross", "fifo_unrealized_pnl", "total_pnl", "day_pnl",
    "sod_realized_pnl_net", "sod_unrealized_pnl", "gross_notional",
    # In the account's base currency (`core.valuation`, "Base currency").
    "realized_pnl_gross_base", "fees_base", "realized_pnl_net_base", "unrealized_pnl_base", "total_pnl_base",
    "day_pnl_base", "gross_notional_base",
)
ACCOUNT_MONEY = (
    "realized_pnl_gross", "fees", "realized_pnl_net", "unrealized_pnl", "fifo_realized_pnl_gross",
    "fifo_unrealized_pnl", "total_pnl", "day_pnl", "gross_notional",
)
POSITION_COLUMNS: dict[str, str] = {
    "ts": "TIMESTAMP",
    "account": "SYMBOL",
    "symbol": "SYMBOL",
    "as_of": "TIMESTAMP_NS",
    "mark_source": "SYMBOL",
    "fill_count": "LONG",
    "currency": "SYMBOL",
    "base_currency": "SYMBOL",
    "fx_rate": "VARCHAR",  # exact: a cross rate has more places than DECIMAL(38, 12) keeps
    **{name: DECIMAL_SQL for name in POSITION_MONEY},
}
ACCOUNT_COLUMNS: dict[str, str] = {
    "ts": "TIMESTAMP",
    "account": "SYMBOL",
    "as_of": "TIMESTAMP_NS",
    "positions": "LONG",
    "open_positions": "LONG",
    "base_currency": "SYMBOL",  # every money column of the row is in it
    "missing_rates": "VARCHAR",  # comma-separated currencies; NULL when none
    **{name: DECIMAL_SQL for name in ACCOUNT_MONEY},
}
#: Rows per `write_batch` call: a snapshot is usually one request (one QuestDB commit;
#: each commit costs QuestDB far more CPU than its rows do, and on a small machine that
#: CPU is taken from the agents). A full snapshot of a big book is split so a retry
#: resumes from the failed part. Batches go column-wise (`columns_from_rows`), so the
#: writer thread holds the GIL briefly.
WRITE_ROWS = 10_000


class Unfit(ValueError):
    """A value DECIMAL(38, 12) cannot hold (26 integer digits or more)."""


def snapshot_decimal(value: Decimal | None) -> Decimal | None:
    """A value as DECIMAL(38, 12) stores it: rounded half to even at 12 places when it
    has more (history only; /pnl/realtime and Valkey keep every digit). Raises Unfit
    for a value of 26 integer digits or more."""
    if value is None:
        return None
    value = value.quantize(_QUANTUM, ROUND_HALF_EVEN, EXACT)
    if value and value.adjusted() > _MAX_ADJUSTED:
        raise Unfit(f"{value} does not fit {DECIMAL_SQL}")
    return value


@dataclass
class PendingSnapshot:
    table: str
    ts: int  # the snapshot's time (epoch ns, whole microseconds)
    rows: list[PositionPnl] | list[AccountPnl]
    account_level: bool
    prepared: list[dict[str, Any]] | None = None  # the rows as the writer takes them
    written: int = 0  # how many of `prepared` QuestDB has (a retry resumes there)


async def snapshot_rows(snapshot: PendingSnapshot) -> tuple[list[dict[str, Any]], list[tuple[Any, str]]]:
    """The snapshot's rows as `QuestDBWriter.write_batch` takes them, and the rows left
    out as unwritable (with why). Built a slice at a time, yielding to the agents."""
    money = ACCOUNT_MONEY if snapshot.account_level else POSITION_MONEY
    ts = snapshot.ts
    out: list[dict[str, Any]] = []
    dropped: list[tuple[Any, str]] = []
    for done, row in enumerate(snapshot.rows, 1):
        figures = row.value
        data: dict[str, Any] = {"ts": ts, "account": figures.account, "as_of": row.as_of}
        data["base_currency"] = figures.base_currency
        if snapshot.account_level:
            data["positions"] = figures.positions
            data["open_positions"] = figures.open_positions
            if figures.missing_rates:
                data["missing_rates"] = ",".join(figures.missing_rates)
        else:
            data["symbol"] = figures.symbol
            data["fill_count"] = figures.fill_count
            data["currency"] = figures.currency
            if figures.fx_rate is not None:
                data["fx_rate"] = format_decimal(figures.fx_rate)
            if row.mark_source is not None:  # absent: NULL
                data["mark_source"] = row.mark_source
        try:
            for name in money:
                value = snapshot_decimal(getattr(figures, name))
                if value is not None:
                    data[name] = value
        except (Unfit, InvalidOperation) as exc:
            dropped.append((row, str(exc)))
        else:
            out.append(data)
        if not done % SLICE:
            await asyncio.sleep(0)
    return out, dropped


class PnlSnapshots:
    """Periodic snapshots of the book into QuestDB.

    Every `interval_s` (`tick`): one row per position whose P&L changed since the last
    snapshot and one per account whose totals did, all stamped with the snapshot's time;
    every `full_every`-th tick (and the first) every position and account, so history
    has a point at least that often for positions that do not move. Rows carry `as_of`
    (the event time of the values) beside `ts` (when the snapshot was taken).

    Snapshots queue in memory and a writer task sends them in order, `WRITE_ROWS`
    rows per request. QuestDB down: the write is retried with back-off from the chunk
    that failed (DEDUP UPSERT KEYS(ts, account[, symbol]) makes a retry of a write that
    did land harmless) and new snapshots queue behind it, up to `max_pending_rows`
    (then the oldest are dropped, counted and logged).
    """

    def __init__(
        self,
        app: App,
        book: PnlBook,
        client: QuestDBClient,
        writer: QuestDBWriter,
        section: SnapshotSection,
        metrics: PnlMetrics,
    ):
        self.app = app
        self.book = book
        self.client = client
        self.writer = writer
        self.section = section
        self.metrics = metrics
        self.pending: deque[PendingSnapshot] = deque()
        self.pending_rows = 0
        self.ticks = 0
        self.last_ts = 0
        self.rows_written = 0
        self.last_error: str | None = None
        self.last_write_at: float | None = None
        self.tables_ready = False
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._stopping = False

    # -- taking snapshots --------------------------------------------------------------

    async def take(self, now_ns: int | None = None) -> list[PendingSnapshot]:
        """Snapshot what changed (everything on a full tick) and queue it."""
        book = self.book
        await refresh_in_slices(book)
        full = self.ticks % self.section.full_every == 0
        self.ticks += 1
        changes = book.snapshot_changes
        if full:
            changes.take()
            keys: Iterable[Key] = book.keys()
            accounts: Iterable[str] = book.accounts()
        else:
            keys, accounts = changes.take()
        # Whole microseconds (the column's unit), strictly increasing: one snapshot, one ts.
        now = (time.time_ns() if now_ns is None else now_ns) // 1000 * 1000
        ts = self.last_ts = max(now, self.last_ts + 1000)
        taken = []
        position_rows = [row for row in map(book.row, sorted(keys)) if row is not None]
        if position_rows:
            taken.append(PendingSnapshot(self.section.table, ts, position_rows, account_level=False))
        account_rows = [t for t in map(book.totals, sorted(accounts)) if t is not None]
        if account_rows:
            taken.append(PendingSnapshot(self.section.account_table, ts, account_rows, account_level=True))
        for snapshot in taken:
            self._queue(snapshot)
        if taken:
            self._wake.set()
        return taken

    def _queue(self, snapshot: PendingSnapshot) -> None:
        self.pending.append(snapshot)
        self.pending_rows += len(snapshot.rows)
        # The newest snapshot always stays; the one in flight is not in the deque.
        while self.pending_rows > self.section.max_pending_rows and len(self.pending) > 1:
            oldest = self.pending.popleft()
            self.pending_rows -= len(oldest.rows)
            self.metrics.snapshot_dropped.labels("backlog").inc(len(oldest.rows))
            log.error(
                "pnl: QuestDB backlog over %d rows: dropped the %s snapshot of %d rows taken at %d",
                self.section.max_pending_rows, oldest.table, len(oldest.rows), oldest.ts,
            )
        self.metrics.snapshot_pending.set(self.pending_rows)

    # -- writing them --------------------------------------------------------------------

    def start(self) -> None:
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name="pnl:snapshots")

    async def stop(self) -> None:
        """Take a last snapshot and give the writer a few seconds to send the queue."""
        await self.take()
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, timeout=5)
            except asyncio.TimeoutError:
                self._task.cancel()
                log.warning("pnl: %d snapshot rows not written at shutdown", self.pending_rows)
            self._task = None

    async def ensure_tables(self) -> None:
        if self.tables_ready:
            return
        keys = ("ts", "account", "symbol")
        await self.client.create_table(self.section.table, POSITION_COLUMNS, dedup_keys=keys)
        await self.client.create_table(self.section.account_table, ACCOUNT_COLUMNS, dedup_keys=keys[:2])
        self.tables_ready = True

    async def _run(self) -> None:
        attempt = 0
        while True:
            if not self.pending:
                if self._stopping:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                await self.write_next()
                attempt = 0
            except (QuestDBUnavailableError, QuestDBError, OSError) as exc:
                # Not the data's fault (that case is handled in write_next): try again.
                self.last_error = f"{type(exc).__name__}: {exc}"
                self.metrics.snapshot_errors.labels("unavailable").inc()
                if self._stopping:
                    return
                delay = RETRY_DELAYS_S[min(attempt, len(RETRY_DELAYS_S) - 1)]
                attempt += 1
                log.warning("pnl: QuestDB write failed (attempt %d), retrying in %.1fs: %s", attempt, delay, exc)
                await asyncio.sleep(delay)
            except Exception:  # a bug: log it, keep the writer alive
                log.exception("pnl: snapshot writer failed")
                await asyncio.sleep(1)

    async def write_next(self) -> None:
        """Write the oldest queued snapshot; it leaves the queue once QuestDB has it
        (or, for rows that can never be written, once they are dead-lettered)."""
        await self.ensure_tables()
        # Out of the queue while in flight, so that a backlog trim cannot drop it
        # underneath the write; back at the front if the write fails.
        snapshot = self.pending.popleft()
        try:
            await self._write(snapshot)
        except BaseException:
            self.pending.appendleft(snapshot)
            raise
        self.pending_rows -= len(snapshot.rows)
        self.metrics.snapshot_pending.set(self.pending_rows)

    async def _write(self, snapshot: PendingSnapshot) -> None:
        if snapshot.prepared is None:
            snapshot.prepared, dropped = await snapshot_rows(snapshot)
            if dropped:
                await self._dead_letter(snapshot, [plain_data(row) for row, _ in dropped], [r for _, r in dropped])
        rows = snapshot.prepared
        symbols = self._symbols(snapshot)
        while snapshot.written < len(rows):
            chunk = rows[snapshot.written : snapshot.written + WRITE_ROWS]
            refused: str | None = None
            try:
                columns = columns_from_rows(chunk, ACCOUNT_COLUMNS if snapshot.account_level else POSITION_COLUMNS)
                await self.writer.write_batch(snapshot.table, columns, symbols=symbols, at="ts", timestamp_columns=("as_of",))
            except ValueError as exc:  # a value the column cannot hold
                refused = str(exc)
            except QuestDBWriteError as exc:
                if not exc.bad_data:
                    raise
                refused = str(exc)
            if refused is not None:
                # QuestDB refuses these rows (e.g. someone changed the table's
                # columns): retrying cannot help. Keep them, with why.
                self.metrics.snapshot_errors.labels("bad_data").inc()
                await self._dead_letter(snapshot, chunk, [refused])
            else:
                self.rows_written += len(chunk)
                self.metrics.snapshot_rows.labels(snapshot.table).inc(len(chunk))
                self.last_write_at = time.time()
            snapshot.written += len(chunk)
        self.last_error = None

    @staticmethod
    def _symbols(snapshot: PendingSnapshot) -> tuple[str, ...]:
        return ("account",) if snapshot.account_level else ("account", "symbol", "mark_source")

    async def _dead_letter(self, snapshot: PendingSnapshot, rows: list[dict[str, Any]], reasons: list[str]) -> None:
        self.metrics.snapshot_dropped.labels("unwritable").inc(len(rows))
        reason = "; ".join(sorted(set(reasons)))
        log.error("pnl: %d snapshot rows for %s cannot be written: %s", len(rows), snapshot.table, reason)
        data = encode({"table": snapshot.table, "ts": snapshot.ts, "rows": rows})
        try:
            await self.app.dead_letter(
                data, reason=reason[:4000], agent="snapshots", stream=snapshot.table,
                subject=snapshot.table, seq=snapshot.ts // 1000 + snapshot.written,
            )
        except Exception:  # noqa: BLE001 - the log above keeps the rows' story
            log.exception("pnl: could not dead-letter unwritable snapshot rows")


# -- /pnl/history ------------------------------------------------------------------------

def parse_time(parameter: str, raw: str) -> int:
    """ISO-8601 (a zone or Z; none means UTC) or integer epoch ns → epoch ns, 1990..2200
    as for events (web/params.py `Time`)."""
    return web_params.parse_time(parameter, raw)


def iso(ns: int) -> str:
    seconds, rest = divmod(ns, NS_PER_S)
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.") + f"{rest // 1000:06d}Z"


@dataclass(frozen=True)
class HistoryQuery:
    account: str | None
    symbol: str | None
    start: int  # epoch ns, inclusive
    end: int  # epoch ns, exclusive
    interval: str

    @property
    def account_level(self) -> bool:
        """Without a symbol the series are account totals; with one, positions."""
        return self.symbol is None


def name_parameter(request: Request, parameter: str) -> str | None:
    """An account or symbol filter (web/params.py `Name`); None when absent."""
    return web_params.query_name(request, parameter)


def history_query(request: Request, section: HistorySection, now_ns: int | None = None) -> HistoryQuery:
    params = request.query_params
    interval = web_params.check_interval("interval", params.get("interval", section.default_interval))
    try:
        step = interval_seconds(interval) * NS_PER_S
    except ValueError as exc:
        raise BadRequest({"parameter": "interval", "error": str(exc)}) from None
    now = time.time_ns() if now_ns is None else now_ns
    raw_from, raw_to = params.get("from"), params.get("to")
    end = parse_time("to", raw_to) if raw_to is not None else now
    start = parse_time("from", raw_from) if raw_from is not None else end - section.default_range_s * NS_PER_S
    if start >= end:
        raise BadRequest({"parameter": "from", "error": f"must be before to ({iso(start)} >= {iso(end)})"})
    points = math.ceil((end - start) / step)
    if points > section.max_points:
        raise BadRequest(
            {"parameter": "interval", "error": f"{interval} makes {points} points over the range; at most {section.max_points}"}
        )
    return HistoryQuery(name_parameter(request, "account"), name_parameter(request, "symbol"), start, end, interval)


#: The figures a history point has. A position's are in its currency, with the two
#: headline figures also in the base; an account's are all in its base currency.
POSITION_HISTORY = (
    "net_qty", "mark", "realized_pnl_net", "unrealized_pnl", "fifo_unrealized_pnl", "total_pnl", "day_pnl",
    "currency", "base_currency", "total_pnl_base", "day_pnl_base",
)
ACCOUNT_HISTORY = (
    "base_currency", "realized_pnl_net", "unrealized_pnl", "fifo_unrealized_pnl", "total_pnl", "day_pnl",
    "gross_notional",
)


def history_sql(query: HistoryQuery, section: SnapshotSection, limit: int) -> str:
    """SAMPLE BY the interval: per bucket and key, each value's last one (P&L is a
    level: the bucket's closing value), the total's low and high, the newest as_of."""
    fields = ACCOUNT_HISTORY if query.account_level else POSITION_HISTORY
    table = section.account_table if query.account_level else section.table
    keys = "account" if query.account_level else "account, symbol"
    select = ", ".join(
        [f"ts, {keys}"]
        + [f"last({name}) {name}" for name in fields]
        + ["min(total_pnl) total_pnl_low", "max(total_pnl) total_pnl_high", "last(as_of) as_of", "count() snapshots"]
    )
    where = [f"ts >= {sql_literal(iso(query.start))}", f"ts < {sql_literal(iso(query.end))}"]
    if query.account is not None:
        where.append(f"account = {sql_literal(query.account)}")
    if query.symbol is not None:
        where.append(f"symbol = {sql_literal(query.symbol)}")
    return (
        f"SELECT {select} FROM {table} WHERE {' AND '.join(where)} "
        f"SAMPLE BY {query.interval} ALIGN TO CALENDAR LIMIT {int(limit)}"
    )


def _history_value(value: Any) -> Any:
    if isinstance(value, str) and value and (value[0].isdigit() or value[0] == "-"):
        try:
            return format_decimal(Decimal(value))
        except InvalidOperation:
            return value
    return value


async def read_history(client: QuestDBClient, query: HistoryQuery, snapshots: SnapshotSection, history: HistorySection) -> dict[str, Any]:
    sql = history_sql(query, snapshots, history.max_rows + 1)
    try:
        result = await client.query(sql)
    except QuestDBError as exc:
        if "does not exist" in exc.message:  # nothing snapshotted yet
            result = None
        elif isinstance(exc, QuestDBUnavailableError):
            raise BadRequest({"error": "QuestDB unavailable", "questdb": exc.message}, status_code=503) from None
        else:
            raise
    rows = result.dicts() if result is not None else []
    truncated = len(rows) > history.max_rows
    del rows[history.max_rows :]
    numbers = ACCOUNT_HISTORY if query.account_level else POSITION_HISTORY
    series: dict[tuple, dict[str, Any]] = {}
    for row in rows:
        key = (row["account"],) if query.account_level else (row["account"], row["symbol"])
        entry = series.get(key)
        if entry is None:
            entry = series[key] = {"account": row["account"], "points": []}
            if not query.account_level:
                entry["symbol"] = row["symbol"]
        point = {"ts": row["ts"], "as_of": row["as_of"], "snapshots": row["snapshots"]}
        for name in (*numbers, "total_pnl_low", "total_pnl_high"):
            point[name] = _history_value(row[name])
        entry["points"].append(point)
    for entry in series.values():
        entry["points"].sort(key=lambda p: p["ts"])
    return {
        "level": "account" if query.account_level else "position",
        "account": query.account,
        "symbol": query.symbol,
        "from": iso(query.start),
        "to": iso(query.end),
        "interval": query.interval,
        "series": [series[k] for k in sorted(series)],
        "truncated": truncated,
    }


# -- the page (web/dashboard; pages/pnl.js) ------------------------------------------------
#
# What the page needs beyond /pnl/realtime and /pnl/history, kept off the agents' path:
# * `/live/accounts`: every account's totals, then each account revalued since (a
#   LiveTopic: the book's `on_row_change` marks the row's account, a set insert while a
#   page is open and nothing otherwise; a page gets at most two lines a second);
# * `/dashboard/history`: the desk's totals per base currency every 2 s for the last
#   hour (a History ring: 1,800 samples of a few figures);
# * `/dashboard/movers`: the symbols with the largest day (or total) P&L, summed over
#   the positions in each, re-summed only for the symbols that moved (the same hook adds
#   the row's symbol to a set); /pnl/realtime is unpaged: a whole book per poll.
# All three are undocumented (for the page, not API clients) and need the token.

ACCOUNTS_LIVE_INTERVAL_S = 0.5  # the account table moves at most twice a second per page
MOVERS_MAX_AGE_S = 2.0  # the desk-wide sums are recomputed at most this often
MOVERS_SLICE = 128  # rows summed between two yields to the agents (well under a millisecond)
MOVER_FIGURES = ("day_pnl", "total_pnl")


class SymbolSums:
    """One symbol's positions summed: all in the symbol's currency, so the sums are
    sums of one currency (exact; None while any term is unknown)."""

    __slots__ = ("symbol", "currency", "positions", "open_positions", "net_qty", "mark", "mark_ts",
                 "day_pnl", "total_pnl", "unknown_day", "unknown_total", "as_of")

    def __init__(self, symbol: str, currency: str):
        self.symbol = symbol
        self.currency = currency
        self.positions = self.open_positions = 0
        self.net_qty = Decimal(0)
        self.mark: Decimal | None = None
        self.mark_ts = -1
        self.day_pnl = self.total_pnl = Decimal(0)
        self.unknown_day = self.unknown_total = 0
        self.as_of = 0

    def add(self, row: PositionPnl) -> None:
        value = row.value
        self.positions += 1
        if value.net_qty:
            self.open_positions += 1
            self.net_qty = EXACT.add(self.net_qty, value.net_qty)
        if value.day_pnl is None:
            self.unknown_day += 1
        else:
            self.day_pnl = EXACT.add(self.day_pnl, value.day_pnl)
        if value.total_pnl is None:
            self.unknown_total += 1
        else:
            self.total_pnl = EXACT.add(self.total_pnl, value.total_pnl)
        if value.mark is not None and (row.mark_ts or 0) >= self.mark_ts:
            self.mark, self.mark_ts = value.mark, row.mark_ts or 0
        if row.as_of > self.as_of:
            self.as_of = row.as_of

    def figure(self, name: str) -> Decimal | None:
        if name == "day_pnl":
            return None if self.unknown_day else self.day_pnl
        return None if self.unknown_total else self.total_pnl

    def data(self) -> dict[str, Any]:
        return {
            "symbol": self.symbol,
            "currency": self.currency,
            "positions": self.positions,
            "open_positions": self.open_positions,
            "net_qty": format_decimal(self.net_qty),
            "mark": None if self.mark is None else format_decimal(self.mark),
            "day_pnl": _maybe_decimal(self.figure("day_pnl")),
            "total_pnl": _maybe_decimal(self.figure("total_pnl")),
            "as_of": self.as_of,
        }


def _maybe_decimal(value: Decimal | None) -> str | None:
    return None if value is None else format_decimal(value)


async def sum_by_symbol(book: PnlBook, accounts: Iterable[str]) -> dict[str, SymbolSums]:
    """The positions of `accounts` summed per symbol, `MOVERS_SLICE` rows at a time with
    the event loop free in between (the book may move meanwhile: the sums are of rows
    a few milliseconds apart, as any reader of a moving book sees them)."""
    sums: dict[str, SymbolSums] = {}
    done = 0
    for account in accounts:
        for key in book.keys(account):
            row = book.row(key)
            if row is None:
                continue
            entry = sums.get(key[1])
            if entry is None:
                entry = sums[key[1]] = SymbolSums(key[1], row.value.currency)
            entry.add(row)
            done += 1
            if done % MOVERS_SLICE == 0:
                await asyncio.sleep(0)
    return sums


def rank_movers(sums: Iterable[SymbolSums], by: str, limit: int) -> list[SymbolSums]:
    """The `limit` symbols with the largest |figure| (each in its own currency), unknown
    figures last, ties by symbol."""

    def order(entry: SymbolSums) -> tuple:
        value = entry.figure(by)
        return (value is None, -abs(value) if value is not None else 0, entry.symbol)

    return sorted(sums, key=order)[:limit]


class SymbolMovers:
    """The desk's P&L per symbol for the page's top movers, summed when a page asks (at
    most every `max_age_s`, one pass shared by every page asking meanwhile). The first
    pass sums the whole book; later ones only the symbols with a row revalued since
    (`dirty`, filled by the book's `on_row_change`): on a desk where a few symbols
    move, a pass costs those symbols' positions, not the book. Holds one `SymbolSums`
    per symbol held, and `dirty` at most every symbol."""

    def __init__(self, book: PnlBook, *, max_age_s: float = MOVERS_MAX_AGE_S):
        self.book = book
        self.max_age_s = max_age_s
        self.dirty: set[str] = set()  # symbols with a row revalued since the last pass
        self.summed_rows = 0  # rows summed by all passes (tests, and what a pass costs)
        self._sums: dict[str, SymbolSums] | None = None  # None until the first pass
        self._at = -math.inf  # monotonic time of the last pass
        self._taken = 0.0  # its epoch time
        self._pass: asyncio.Task | None = None

    async def desk(self) -> tuple[dict[str, SymbolSums], float]:
        """Every symbol's sums and when (epoch s) they were taken."""
        if time.monotonic() - self._at > self.max_age_s:
            if self._pass is None:
                self._pass = asyncio.create_task(self._sum_desk(), name="pnl:movers")
            task = self._pass
            try:
                await asyncio.shield(task)
            finally:
                if task.done() and self._pass is task:
                    self._pass = None
        assert self._sums is not None
        return self._sums, self._taken

    async def _sum_desk(self) -> None:
        book = self.book
        await refresh_in_slices(book)
        taken = time.time()
        if self._sums is None:
            self.dirty.clear()
            sums = await sum_by_symbol(book, book.accounts())
            self.summed_rows += sum(entry.positions for entry in sums.values())
        else:
            sums = self._sums
            symbols = list(self.dirty)  # the book's hook holds this very set: empty it, keep it
            self.dirty.clear()
            done = 0
            for symbol in symbols:
                entry = None
                for key in book.keys(symbol=symbol):
                    row = book.row(key)
                    if row is None:
                        continue
                    if entry is None:
                        entry = SymbolSums(symbol, row.value.currency)
                    entry.add(row)
                    done += 1
                    if done % MOVERS_SLICE == 0:
                        await asyncio.sleep(0)
                if entry is None:
                    sums.pop(symbol, None)
                else:
                    sums[symbol] = entry
            self.summed_rows += done
        self._sums = sums
        self._at = time.monotonic()
        self._taken = taken

    async def account(self, account: str) -> dict[str, SymbolSums]:
        # Not `book.refresh(symbols)`: a stale symbol revalues every holder of it, in
        # every account, and in one go; in slices it stays off the agents' path.
        await refresh_in_slices(self.book)
        return await sum_by_symbol(self.book, (account,))


async def desk_sample(book: PnlBook, state: dict[str, Any]) -> dict[str, float | None]:
    """The desk's figures now, for the page's chart: per base currency the sum of the
    total and of the day P&L of its accounts **whose figure is known**
    (`total_pnl.<base>`, `day_pnl.<base>`) and how many accounts have none
    (`unknown_total.<base>`: an account with one unmarked position has no total, and a
    desk of hundreds of accounts nearly always has one, so the strict sum would be
    unknown for good; the page says what the line sums); positions, accounts, and
    revaluations per second since the previous sample (`state` keeps the count)."""
    await refresh_in_slices(book)
    sums: dict[str, list] = {}  # base -> [total, unknown totals, day, unknown days]
    accounts = book.accounts()
    for i, account in enumerate(accounts):
        if i and i % SLICE == 0:
            await asyncio.sleep(0)
        totals = book.totals(account)
        if totals is None:
            continue
        value = totals.value
        entry = sums.get(value.base_currency)
        if entry is None:
            entry = sums[value.base_currency] = [Decimal(0), 0, Decimal(0), 0]
        if value.total_pnl is None:
            entry[1] += 1
        else:
            entry[0] = EXACT.add(entry[0], value.total_pnl)
        if value.day_pnl is None:
            entry[3] += 1
        else:
            entry[2] = EXACT.add(entry[2], value.day_pnl)
    figures: dict[str, float | None] = {}
    for base, (total, unknown_total, day, _) in sorted(sums.items()):
        figures[f"total_pnl.{base}"] = float(total)
        figures[f"day_pnl.{base}"] = float(day)
        figures[f"unknown_total.{base}"] = float(unknown_total)
    now, count = time.monotonic(), book.revaluations
    last = state.get("last")
    figures["revaluations_per_s"] = round((count - last[1]) / (now - last[0]), 1) if last and now > last[0] else None
    state["last"] = (now, count)
    figures["positions"] = float(len(book))
    figures["accounts"] = float(len(accounts))
    return figures


def add_page_data(app: App, book: PnlBook) -> tuple[LiveTopic, History, SymbolMovers]:
    """The page's live account figures, desk history and top movers (above)."""

    def lookup(account: str) -> Any:
        data = book.totals_json(account)
        return None if data is None else msgspec.json.decode(data)

    def snapshot() -> list[Any]:
        return [msgspec.json.decode(data) for data in map(book.totals_json, book.accounts()) if data is not None]

    accounts = LiveTopic("accounts", lookup=lookup, snapshot=snapshot, interval_s=ACCOUNTS_LIVE_INTERVAL_S)
    accounts.serve(app, "/live/accounts")
    movers = SymbolMovers(book)
    mark_account, dirty = accounts.mark, movers.dirty

    def row_changed(key: Key) -> None:
        # On the agents' path (every revalued row): two set inserts at most.
        mark_account(key[0])
        dirty.add(key[1])

    book.on_row_change = row_changed

    state: dict[str, Any] = {}

    async def sample() -> dict[str, float | None]:
        return await desk_sample(book, state)

    history = History(sample, every_s=2.0, keep=1800)
    history.serve(app, "/dashboard/history")

    @app.page("/dashboard/movers", documented=False)
    async def top_movers(request: Request) -> JSON:
        account = name_parameter(request, "account")
        by = web_params.query_choice(request, "by", MOVER_FIGURES, "day_pnl")
        limit = web_params.query_int(request, "limit", 10, minimum=1, maximum=100)
        if account is None:
            sums, taken = await movers.desk()
        else:
            sums, taken = await movers.account(account), time.time()
        return JSON(
            {
                "account": account,
                "by": by,
                "symbols": len(sums),
                "taken_at": taken,
                "movers": [entry.data() for entry in rank_movers(sums.values(), by, limit)],
            }
        )

    return accounts, history, movers


# -- assembly ----------------------------------------------------------------------------


_raw_json = msgspec.json.Encoder()


def bus_channels(app: App) -> PnlChannels:
    """The platform's streams (posttrade.streams.subjects)."""
    return PnlChannels(
        positions=subjects.positions(app),
        quotes=subjects.quotes(app),
        trades=subjects.market_trades(app),
        bars=subjects.bars(app),
    )


def build(
    config: PnlConfig,
    *,
    channels: Callable[[App], PnlChannels] = bus_channels,
    transport: Transport | None = None,
) -> App:
    """The pnl App. `channels` picks the streams (tests use uniquely named ones);
    `transport` replaces NATS (unit tests). Without `cache.redis` nothing is cached;
    without `databases.questdb` nothing is snapshotted and /pnl/history answers 503."""
    section = config.pnl
    app = new_app(config)
    if transport is not None:
        app.transport = transport  # nothing has used the NATS one yet: it connects at start
    positions = app.table("positions", value_type=PositionUpdate, key_type=tuple[str, str])
    marks = app.table("marks", value_type=MarkState, key_type=str, default=MarkState)
    book = PnlBook(
        positions, marks, priority=tuple(section.mark_priority), use_position_mark=section.use_position_mark,
        reference=config.reference(),
    )
    agent_metrics = add_pnl_agents(app, channels(app), book)
    metrics = PnlMetrics(app.metrics.registry)
    app.pnl_book = book  # type: ignore[attr-defined]  # for tests and benchmarks
    app.pnl_agent_metrics = agent_metrics  # type: ignore[attr-defined]

    async def resync() -> None:
        book.resync()

    app.on_startup.append(resync)
    app.pnl_page = add_page_data(app, book)  # type: ignore[attr-defined]  # for tests

    cache: PnlCacheWriter | None = None
    if config.cache.redis is not None:
        cache = _cache_writer(config, config.cache.redis, book, metrics)
        app.pnl_cache = cache  # type: ignore[attr-defined]
        _register_cache(app, cache)

    snapshots: PnlSnapshots | None = None
    client: QuestDBClient | None = None
    if config.databases.questdb is not None:
        client, writer = _questdb(config.databases.questdb, section.history.timeout_s)
        snapshots = PnlSnapshots(app, book, client, writer, section.snapshots, metrics)
        app.pnl_snapshots = snapshots  # type: ignore[attr-defined]
        _register_snapshots(app, snapshots, client, writer)

    @app.page("/pnl/realtime")
    async def realtime(request: Request) -> JSON:
        """Real-time P&L per position and per account, from memory (current to the last message).

        ---
        query:
          account: {$ref: Name, description: only this account}
          symbol: {$ref: Name, description: only this symbol}
        responses:
          200: {description: "`as_of`, `count`, `positions` (sorted by account, symbol) and `accounts` (totals)", schema: {type: object}}
        """
        account = name_parameter(request, "account")
        symbol = name_parameter(request, "symbol")
        if symbol is not None:
            book.refresh((symbol,))
        elif account is not None:
            book.refresh(book.symbols(account))
        else:
            book.refresh()
        keys = book.keys(account, symbol)
        rows = [msgspec.Raw(book.row_json(k)) for k in keys]
        accounts = sorted({k[0] for k in keys})
        as_of = max((book.row(k).as_of for k in keys), default=None)
        # Rows and totals are JSON already (encoded once per change, shared with the
        # Valkey writer): splice them in rather than decode and re-encode.
        body = _raw_json.encode(
            {
                "as_of": as_of,
                "count": len(rows),
                "positions": rows,
                "accounts": [msgspec.Raw(book.totals_json(a)) for a in accounts],
            }
        )
        return Response(body, media_type="application/json")

    @app.page("/pnl/history")
    async def history(request: Request) -> JSON:
        """P&L history from QuestDB snapshots, one point per interval bucket per key.

        With `symbol`: one series per position; without: one series per account (totals).
        `from` must be before `to`, and the range at most `history.max_points` intervals
        long: otherwise a 400 says which.

        ---
        query:
          account: {$ref: Name, description: only this account}
          symbol: {$ref: Name, description: only this symbol (position series instead of account totals)}
          from: {$ref: Time, description: "start, inclusive; default `to` minus `history.default_range_s`"}
          to: {$ref: Time, description: "end, exclusive; default now"}
          interval: {$ref: Interval, description: "bucket size (default `history.default_interval`)"}
        responses:
          200: {description: "`level`, `from`, `to`, `interval`, `series` (points per key), `truncated`", schema: {type: object}}
          503: QuestDB is not configured or unreachable
        """
        query = history_query(request, section.history)
        if client is None:
            raise BadRequest({"error": "no QuestDB configured (databases.questdb)"}, status_code=503)
        return JSON(await read_history(client, query, section.snapshots, section.history))

    return app


def _cache_writer(config: PnlConfig, redis: RedisSection, book: PnlBook, metrics: PnlMetrics) -> PnlCacheWriter:
    store = open_valkey(
        host=redis.host,
        port=redis.port,
        db=redis.db,
        username=redis.username,
        password=redis.password,
        ssl=redis.ssl,
        client_name=f"posttrade-{config.service.name}",
    )
    section = config.pnl
    refresh_s = section.cache_refresh_s if section.cache_refresh_s is not None else max(1.0, redis.ttl / 3)
    keys = PnlKeys(section.key_prefix)
    return PnlCacheWriter(
        book, store, keys, ttl_s=redis.ttl,
        min_interval_s=section.cache_min_interval_s, price_interval_s=section.cache_price_interval_s,
        refresh_s=refresh_s, metrics=metrics,
        watch=ValkeyWatch(store, keys.sentinel(config.service.name)), check_s=section.valkey_check_s,
    )


def _register_cache(app: App, cache: PnlCacheWriter) -> None:
    async def start() -> None:
        cache.start()

    async def stop() -> None:
        await cache.stop()
        await cache.store.close()

    app.on_startup.append(start)
    app.on_shutdown.append(stop)

    @app.health_check("valkey")
    async def valkey_check() -> tuple[bool | str, Any]:
        detail: dict[str, Any] = {"location": cache.store.location, "pending_changes": cache.pending}
        if cache.last_error:
            detail["last_error"] = cache.last_error
        if cache.last_rebuild is not None:
            detail["last_rebuild"] = cache.last_rebuild
        try:
            await cache.store.ping()
        except Exception as exc:  # noqa: BLE001 - any failure means not healthy
            detail["error"] = str(exc)
            return False, detail
        # Look now too: a Valkey back empty is said at once, not a check interval later.
        await cache.check_valkey()
        loss = cache.rebuilding
        if loss is not None:
            detail["rebuilding"] = {**loss.describe(), "positions": len(cache.book)}
            return DEGRADED, detail
        return True, detail


def _questdb(section: QuestDBSection, timeout_s: float) -> tuple[QuestDBClient, QuestDBWriter]:
    client = QuestDBClient(
        host=section.host, port=section.port, username=section.user, password=section.password,
        tls=section.tls, timeout=timeout_s,
    )
    writer = QuestDBWriter(
        host=section.host, port=section.port, username=section.user, password=section.password,
        tls=section.tls, retry_timeout_ms=2_000,
    )
    return client, writer


def _register_snapshots(app: App, snapshots: PnlSnapshots, client: QuestDBClient, writer: QuestDBWriter) -> None:
    async def start() -> None:
        snapshots.start()

    async def stop() -> None:
        await snapshots.stop()
        await writer.close()
        await client.close()

    app.on_startup.append(start)
    app.on_shutdown.append(stop)

    @app.timer(snapshots.section.interval_s, name="snapshot")
    async def snapshot() -> None:
        await snapshots.take()

    @app.health_check("questdb")
    async def questdb_check() -> tuple[bool, Any]:
        detail: dict[str, Any] = {
            "location": client.base_url,
            "pending_rows": snapshots.pending_rows,
            "rows_written": snapshots.rows_written,
        }
        if snapshots.last_error:
            detail["last_error"] = snapshots.last_error
        try:
            await client.ping()
        except Exception as exc:  # noqa: BLE001
            detail["error"] = str(exc)
            return False, detail
        return True, detail
