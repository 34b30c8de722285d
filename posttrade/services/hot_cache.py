"""hot_cache (port 8088): recent bars, last quotes and current positions served from Valkey.

The wiring. Where the feed runs (`hot_cache.consume`, the default), four agents keep
Valkey current through sinks (bars built from trades, bar messages, quotes, ptrc's
positions), a warmer fills new bars keys from QuestDB and a rebuilder writes everything
back when Valkey lost the keys; `consume: false` runs the read API alone (read
replicas). Every process answers reads from Valkey and, on a miss, from the source
(QuestDB for bars and quotes, ptrc's POSITIONS stream for positions).

The code: `posttrade.agents.hot_cache` (agents, warmer, rebuild, reads, stats),
`posttrade.agents.bars` (the bar agents), `posttrade.stores.valkey.hot_cache` (key
scheme, Lua, sinks), `posttrade.stores.questdb.read_through` (the queries of a miss).
docs/hot_cache.md has the endpoints, the key scheme and the read-through queries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec
from starlette.exceptions import HTTPException
from starlette.requests import Request

from ..agents.bars import BarMessageCounters, TradeBarBuilder, add_bar_message_agent, add_trade_bar_agent
from ..agents.hot_cache import (
    CacheRebuilder,
    CacheWarmer,
    HotCacheSection,
    PublishedPositions,
    add_position_agent,
    add_quote_agent,
    valkey_health,
)
from ..config import QuestDBSection, RedisSection, ServiceConfig
from ..core.bars import interval_seconds
from ..sinks import RetryPolicy, SinkUnavailable
from ..stores.questdb import QuestDBClient
from ..stores.questdb.read_through import QuestDBReadThrough
from ..stores.valkey import ValkeyStore, ValkeyWatch, open_valkey
from ..stores.valkey.hot_cache import (
    CacheKeys,
    ValkeyBarsSink,
    ValkeyCache,
    ValkeyPositionsSink,
    ValkeyQuotesSink,
    ValkeyRestoreSink,
)
from ..streams import subjects
from ..streams.channel import Channel
from ..streams.transport import Transport
from ..web.hot_cache import CachedJSON, HotCacheReads, StatsSampler
from ..web.live import History
from ..web.params import BadRequest, check_interval, path_name, query_int
from ..web.server import JSON
from .base import Service
from .wiring import new_app

DASHBOARD_SYMBOLS = 2000  # symbols the page's picker lists at most


# -- configuration --------------------------------------------------------------------


class HotCacheConfig(ServiceConfig):
    hot_cache: HotCacheSection = msgspec.field(default_factory=HotCacheSection)


CONFIG = HotCacheConfig


# -- the service -------------------------------------------------------------------------


@dataclass(frozen=True)
class HotCacheChannels:
    """The platform's streams hot_cache reads (`posttrade.streams.subjects`), in the
    service's namespace. All four are declared on a read replica too: its positions
    misses read the POSITIONS stream."""

    trades: Channel
    bars: Channel
    quotes: Channel
    positions: Channel


@dataclass
class HotCacheService(Service):
    config: HotCacheConfig
    channels: HotCacheChannels
    store: ValkeyStore
    cache: ValkeyCache
    questdb: QuestDBClient
    reads: HotCacheReads
    # The feed's parts: None on a read replica (or `warm_concurrency: 0` for the warmer).
    builder: TradeBarBuilder | None = None
    bar_messages: BarMessageCounters | None = None
    warmer: CacheWarmer | None = None
    rebuilder: CacheRebuilder | None = None


def build(config: HotCacheConfig, *, transport: Transport | None = None) -> HotCacheService:
    """The hot_cache service: on NATS as configured, or on `transport` (unit tests)."""
    section = config.hot_cache
    app = new_app(config, transport)
    redis = config.cache.redis or RedisSection()
    store = open_valkey(
        host=redis.host, port=redis.port, db=redis.db, username=redis.username, password=redis.password,
        ssl=redis.ssl, client_name=f"posttrade-{config.service.name}",
    )  # fmt: skip
    cache = ValkeyCache(store, CacheKeys(section.key_prefix), ttl_s=redis.ttl, bars_kept=section.bars_kept)
    qdb = config.databases.questdb or QuestDBSection()
    questdb = QuestDBClient(
        host=qdb.host, port=qdb.port, username=qdb.user, password=qdb.password, tls=qdb.tls,
        timeout=section.read_through.timeout_s,
    )  # fmt: skip
    channels = HotCacheChannels(
        trades=subjects.market_trades(app), bars=subjects.bars(app), quotes=subjects.quotes(app),
        positions=subjects.positions(app),
    )  # fmt: skip
    published = PublishedPositions(app.transport, channels.positions, timeout_s=section.read_through.timeout_s)
    read_through = QuestDBReadThrough(questdb, section.read_through.tables, built_intervals=section.bar_intervals)
    reads = HotCacheReads(app, cache, read_through, published, bars_kept=section.bars_kept)
    service = HotCacheService(
        app=app, config=config, channels=channels, store=store, cache=cache, questdb=questdb, reads=reads
    )
    if section.consume:
        _wire_feed(service)
    _wire_pages(service)

    async def close_clients() -> None:
        await store.close()
        await questdb.close()

    app.on_shutdown.append(close_clients)
    return service


def _wire_feed(service: HotCacheService) -> None:
    """The agents and their sinks, the warmer, the rebuilder (the feed's process only:
    a read replica holds nothing of its own to rebuild from)."""
    app, cache, channels, config = service.app, service.cache, service.channels, service.config
    section = config.hot_cache
    retry = RetryPolicy.from_config(config.batch)
    if section.warm_concurrency:
        service.warmer = CacheWarmer(cache, service.reads, concurrency=section.warm_concurrency)
        app.on_startup.append(service.warmer.start)
        app.on_shutdown.append(service.warmer.stop)
    offer = service.warmer.offer if service.warmer is not None else None
    batching = {"max_events": section.write_batch, "within_s": section.write_within_s}
    service.builder = TradeBarBuilder(app, section.bar_intervals, grace_s=section.grace_s)
    built_sink = ValkeyBarsSink("valkey-built-bars", cache, retry, on_written=offer)
    add_trade_bar_agent(app, channels.trades, service.builder, built_sink, **batching)
    messages_sink = ValkeyBarsSink("valkey-bar-messages", cache, retry, on_written=offer)
    service.bar_messages = add_bar_message_agent(
        app, channels.bars, messages_sink, built_intervals=section.bar_intervals, **batching
    )
    add_quote_agent(app, channels.quotes, ValkeyQuotesSink("valkey-quotes", cache, retry), **batching)
    add_position_agent(app, channels.positions, ValkeyPositionsSink("valkey-positions", cache, retry), **batching)
    service.reads.builder, service.reads.bar_messages = service.builder, service.bar_messages
    service.reads.warmer = service.warmer
    restore = ValkeyRestoreSink("valkey-rebuild", cache, retry)
    app.sink(restore)
    service.rebuilder = CacheRebuilder(
        restore, service.reads.published, channels.quotes, ValkeyWatch(service.store, cache.keys.sentinel(config.service.name)),
        builder=service.builder, warmer=service.warmer, check_s=section.valkey_check_s,
        timeout_s=section.read_through.timeout_s,
    )  # fmt: skip
    app.on_startup.append(service.rebuilder.start)
    app.on_shutdown.append(service.rebuilder.stop)


def _wire_pages(service: HotCacheService) -> None:
    app, reads, section = service.app, service.reads, service.config.hot_cache

    @app.page("/bars/{symbol:path}")
    async def get_bars(request: Request) -> CachedJSON:
        """The newest bars of a symbol and interval: Valkey, or QuestDB on a miss.

        ---
        path:
          symbol: {$ref: Name, description: the symbol}
        query:
          interval: {$ref: Interval, description: "bar interval; default `hot_cache.default_bar_interval`"}
          limit: {type: integer, minimum: 1, maximum: BARS_KEPT, description: "bars to return, newest last; at most `hot_cache.bars_kept` (BARS_KEPT); default `hot_cache.default_bar_limit`"}
        responses:
          200: {description: "the bars, with `hit` (answered from Valkey alone) and `source` (cache or questdb)", schema: {type: object}}
          404: nothing in Valkey nor QuestDB
          502: "QuestDB's answer cannot be used"
          503: QuestDB is needed for a miss and cannot be reached
        """
        return CachedJSON(await reads.bars(*bars_query(request)))

    # The documented maximum is this service's configured one.
    get_bars.__doc__ = (get_bars.__doc__ or "").replace("BARS_KEPT", str(section.bars_kept))

    def bars_query(request: Request) -> tuple[str, str, int]:
        """(symbol, interval, limit) of a bars read, or the 400 of /bars."""
        symbol = path_name(request, "symbol")
        interval = check_interval("interval", request.query_params.get("interval", section.default_bar_interval))
        try:
            interval_seconds(interval)
        except ValueError as exc:
            raise BadRequest({"parameter": "interval", "error": str(exc)}) from None
        limit = query_int(request, "limit", section.default_bar_limit, minimum=1, maximum=section.bars_kept)
        return symbol, interval, limit

    # -- the page's own reads (undocumented; web/dashboard). A separate path, not a flag
    # on /bars: an API client cannot skip the count by accident (a header or a parameter
    # copied along would silently take its reads out of the hit rate), and the path says
    # in every access log which reads were the page's.

    @app.page("/dashboard/bars/{symbol:path}", documented=False)
    async def dashboard_bars(request: Request) -> CachedJSON:
        # /bars exactly (answer, errors, read-through and fill), not counted as a hit or
        # a miss: a page looking at the cache must not move the desk's hit rate.
        return CachedJSON(await reads.bars(*bars_query(request), counted=False))

    @app.page("/dashboard/symbols", documented=False)
    async def dashboard_symbols(request: Request) -> JSON:
        # The picker: symbol -> intervals of the bars keys held, and the built intervals.
        try:
            series = await service.cache.bar_series(DASHBOARD_SYMBOLS)
        except SinkUnavailable as exc:
            raise HTTPException(503, detail={"error": "Valkey unavailable", "valkey": str(exc)}) from None
        return JSON({"symbols": series, "limit": DASHBOARD_SYMBOLS, "built_intervals": list(section.bar_intervals),
                     "default_interval": section.default_bar_interval, "default_limit": section.default_bar_limit,
                     "bars_kept": section.bars_kept})

    # The page's charts over time: the last hour at one sample per 2 s (1,800 samples of
    # nine figures, a few hundred KB at most).
    History(StatsSampler(reads)).serve(app, "/dashboard/history", public=True)

    @app.page("/quotes/{symbol:path}")
    async def get_quote(request: Request) -> CachedJSON:
        """The last quote of a symbol: Valkey, or QuestDB on a miss.

        ---
        path:
          symbol: {$ref: Name, description: the symbol}
        responses:
          200: {description: "`symbol`, `quote`, with `hit` and `source`", schema: {type: object}}
          404: nothing in Valkey nor QuestDB
          502: "QuestDB's answer cannot be used"
          503: QuestDB is needed for a miss and cannot be reached
        """
        return CachedJSON(await reads.quote(path_name(request, "symbol")))

    @app.page("/positions/{account:path}")
    async def get_positions(request: Request) -> CachedJSON:
        """The current positions of an account as ptrc published them: Valkey, or on a miss
        the last message of each of the account's subjects in the POSITIONS stream.

        ---
        path:
          account: {$ref: Name, description: the account}
        responses:
          200: {description: "`account`, `positions` (ptrc's PositionUpdates) sorted by symbol, with `hit` and `source` (cache or stream)", schema: {type: object}}
          404: nothing in Valkey nor in the POSITIONS stream
          502: "a message on the account's subjects is not a PositionUpdate of that account"
          503: the POSITIONS stream is needed for a miss and cannot be read
        """
        return CachedJSON(await reads.positions(path_name(request, "account")))

    @app.page("/cache/stats", public=True)  # counters, no account data
    async def cache_stats(request: Request) -> JSON:
        """Hits, misses, hit rate, key count, memory and freshness lag of the cache.

        ---
        responses:
          200: {description: the statistics, schema: {type: object}}
        """
        return JSON(await reads.stats())

    @app.health_check("valkey")
    async def valkey_check() -> tuple[bool | str, Any]:
        return await valkey_health(service.store, service.rebuilder)

    @app.health_check("questdb")
    async def questdb_check() -> tuple[bool, Any]:
        try:
            await service.questdb.ping()
            return True, service.questdb.base_url
        except Exception as exc:  # noqa: BLE001
            return False, str(exc)
