"""pnl (port 8100): real-time P&L of ptrc's positions at market, cached in Valkey,
snapshotted on the PNL stream, served at `/pnl/realtime` and `/pnl/history`.

    positions (ptrc's PositionUpdate) ─┐
    quotes / market trades / bars ─────┴─> PnlBook (agents/pnl.py) ──> /pnl/realtime (from memory)
                                                 │
                                                 ├─> PnlCacheSink ─> Valkey        (coalesced)
                                                 └─> PnlSnapshots ─> PNL stream    (interval)
                                                                       └─> questdb_writer ─> QuestDB
                                                                                   /pnl/history <─┘

Valkey and the snapshots hold *copies* of what the book holds; the book itself is
rebuilt from its changelog tables after a restart. So their writes are not part of an
agent's commit: a sink whose store is away keeps its changes (snapshots) and retries
while the agents go on. pnl only reads QuestDB. docs/pnl.md has the endpoints, the
Valkey key scheme and the tables.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgspec

from ..agents.pnl import PnlAgentMetrics, PnlBook, PnlChannels, PnlSnapshots, add_pnl_agents
from ..app import App
from ..config import RedisSection, ServiceConfig, _Section
from ..core.bars import interval_seconds
from ..core.marks import DEFAULT_PRIORITY, MarkSource, MarkState
from ..sinks import RetryPolicy
from ..stores.questdb import QuestDBClient, check_identifier
from ..stores.questdb.pnl_history import HistoryTables
from ..stores.valkey import ValkeyWatch, open_valkey
from ..stores.valkey.pnl import PnlCacheMetrics, PnlCacheSink, PnlKeys
from ..streams import subjects
from ..streams.events import PositionUpdate
from ..streams.transport import Transport
from ..web.pnl import PnlPage, install_pages
from .base import Service
from .wiring import new_app

# -- configuration -----------------------------------------------------------------------


class SnapshotSection(_Section):
    """History: how often the book is snapshotted, and the QuestDB tables questdb_writer
    stores the snapshots in (its routes for PNL must name the same)."""

    table: str = "pnl_snapshots"  # one row per (snapshot, account, symbol)
    account_table: str = "pnl_account_snapshots"  # one row per (snapshot, account)
    interval_s: float = 1.0  # every interval: the rows that changed since the last one
    full_every: int = 60  # ...and every this many intervals: every row (1 = always all)
    max_pending_rows: int = 1_000_000  # kept in memory while NATS is away

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


# -- the service -------------------------------------------------------------------------


@dataclass
class PnlService(Service):
    book: PnlBook
    agent_metrics: PnlAgentMetrics
    snapshots: PnlSnapshots
    page: PnlPage
    cache: PnlCacheSink | None = None  # None without `cache.redis`
    questdb: QuestDBClient | None = None  # /pnl/history's reader; None without `databases.questdb`


def bus_channels(app: App) -> PnlChannels:
    """What pnl reads (posttrade.streams.subjects)."""
    return PnlChannels(
        positions=subjects.positions(app),
        quotes=subjects.quotes(app),
        trades=subjects.market_trades(app),
        bars=subjects.bars(app),
    )


def build(config: PnlConfig, *, transport: Transport | None = None) -> PnlService:
    """The pnl service; `transport` replaces NATS (unit tests). Without `cache.redis`
    nothing is cached; without `databases.questdb` /pnl/history answers 503."""
    section = config.pnl
    app = new_app(config, transport)
    retry = RetryPolicy.from_config(config.batch)
    positions = app.table("positions", value_type=PositionUpdate, key_type=tuple[str, str])
    marks = app.table("marks", value_type=MarkState, key_type=str, default=MarkState)
    book = PnlBook(
        positions, marks, priority=tuple(section.mark_priority), use_position_mark=section.use_position_mark,
        reference=config.reference(),
    )
    agent_metrics = add_pnl_agents(app, bus_channels(app), book)

    async def resync() -> None:
        book.resync()

    app.on_startup.append(resync)

    shots = section.snapshots
    subjects.pnl_snapshots(app)  # the PNL stream, declared at start
    snapshots = PnlSnapshots(
        app, book, tables=(shots.table, shots.account_table), full_every=shots.full_every,
        max_pending_rows=shots.max_pending_rows, retry=retry,
    )
    app.sink(snapshots)
    app.timer(shots.interval_s, name="snapshot")(snapshots.take)
    _lifecycle(app, snapshots.start, snapshots.stop)

    cache: PnlCacheSink | None = None
    if config.cache.redis is not None:
        cache = _cache_sink(app, config, config.cache.redis, book, retry)
        app.sink(cache)
        app.health_check("valkey")(cache.valkey_health)
        _lifecycle(app, cache.start, cache.stop, cache.store.close)

    questdb: QuestDBClient | None = None
    if config.databases.questdb is not None:
        q = config.databases.questdb
        questdb = QuestDBClient(
            host=q.host, port=q.port, username=q.user, password=q.password, tls=q.tls, timeout=section.history.timeout_s
        )
        app.health_check("questdb")(_questdb_check(questdb))
        _lifecycle(app, None, questdb.close)

    page = install_pages(
        app, book, questdb=questdb, tables=HistoryTables(shots.table, shots.account_table), history=section.history
    )
    return PnlService(app, config, book, agent_metrics, snapshots, page, cache, questdb)


def _lifecycle(app: App, start: Callable[[], None] | None, *stops: Callable[[], Awaitable[Any]]) -> None:
    """`start()` when the app has started; `stops` awaited, in order, when it stops."""
    if start is not None:

        async def started() -> None:
            start()

        app.on_startup.append(started)

    async def stopped() -> None:
        for stop in stops:
            await stop()

    app.on_shutdown.append(stopped)


def _cache_sink(app: App, config: PnlConfig, redis: RedisSection, book: PnlBook, retry: RetryPolicy) -> PnlCacheSink:
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
    return PnlCacheSink(
        book, store, keys, ttl_s=redis.ttl,
        min_interval_s=section.cache_min_interval_s, price_interval_s=section.cache_price_interval_s,
        refresh_s=refresh_s, metrics=PnlCacheMetrics(app.metrics.registry),
        watch=ValkeyWatch(store, keys.sentinel(config.service.name)), check_s=section.valkey_check_s, retry=retry,
    )  # fmt: skip


def _questdb_check(client: QuestDBClient):
    async def check() -> tuple[bool, Any]:
        detail: dict[str, Any] = {"location": client.base_url}
        try:
            await client.ping()
        except Exception as exc:  # noqa: BLE001 - any failure means /pnl/history cannot answer
            detail["error"] = str(exc)
            return False, detail
        return True, detail

    return check
