"""execution_quality (port 8096): slippage and execution analytics stored in ClickHouse.

Wiring: four agents (orders, fills, quotes, market trades) feed one
`ExecutionTracker` (posttrade.agents.execution) whose state is persisted in changelog
tables once its rows are in ClickHouse; an `ExecutionSink` writer does every write
(one insert per table for everything changed, the rollup minutes refreshed): the
orders and fills agents wait for it before acknowledging a batch, the market-data
agents do not (see the agents module). Two timers re-mark open orders to the latest
mid and prune state nothing can change any more. `/metrics/execution` reads the fill
and order tables (`FINAL`: rewritten rows count once); `/analytics/summary` reads the
per-minute rollup when the request's buckets and bounds are whole minutes, else the
fills table; a fill removed by a BUST is in neither answer. Every summary group is in
one currency (the reference data's, `config.reference()`, stored on each row): money of
two currencies is never added. docs/execution_quality.md documents formulas,
currencies, joins, corrections and busts, and endpoints.

ClickHouse is the embedded chdb engine when `databases.clickhouse.dsn` is a `chdb://`
dsn, else the server at `host:port` (or a `clickhouse://` / `http(s)://` dsn). A chdb
data path is exclusive to one process, and the local stack's env points every service
at one shared root (`chdb://$POSTTRADE_HOME/chdb`): a chdb path whose last component
is `chdb` is taken as that root and this service uses `<root>/execution_quality`.
Any other chdb path is used as given.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any
from urllib.parse import urlparse

import msgspec
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.requests import Request

from ..agents.execution import (
    FILLS_TABLE,
    MINUTE_NS,
    MINUTES_TABLE,
    ORDERS_TABLE,
    ExecutionChannels,
    ExecutionSink,
    ExecutionStore,
    ExecutionTracker,
    MarkTracker,
    TrackerSettings,
    declare_tables,
    register_agents,
    start_tracker,
)
from ..app import App
from ..config import ClickHouseSection, ConfigError, ServiceConfig, _Section
from ..core.exact import format_decimal, round_quotient
from ..core.execution import BPS_PLACES, to_bps
from ..stores.clickhouse import ClickHouseError, ClickHouseStore, open_clickhouse
from ..streams import subjects
from ..streams.events import Fill, MarketTrade, Order, Quote
from ..streams.subjects import MARKET_DATA_MAX_AGE_S
from ..streams.transport import Transport
from ..web import params as web_params
from ..web.params import BadRequest, query_int
from ..web.server import JSON
from .wiring import new_app

log = logging.getLogger(__name__)

NS = 1_000_000_000
# A partly filled market-data batch is handled after this long: the join stays current
# on a quiet stream. Orders and fills gather a batch for up to `batch.interval_sec`
# (each of their batches waits for a ClickHouse write).
AGENT_BATCH_WAIT_S = 0.2
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_TOKEN = re.compile(r"^[A-Za-z0-9_-]+$")


# -- config -------------------------------------------------------------------------------


class ExecutionSection(_Section):
    """How the join waits, remembers and forgets (all times are event time)."""

    history_s: float = 600.0  # quote/trade history kept in memory behind each symbol's newest event
    quiet_symbol_grace_s: float = 5.0  # a quiet symbol's pending values are decided this long after every symbol's time passed
    retention_s: float = 3600.0  # how long a finished fill/order stays in state (late fills still join it)
    open_order_ttl_s: float = 86_400.0  # an order with no terminal event is forgotten after this long
    # At most this many fills / orders stay in state: beyond, the oldest finished ones are
    # forgotten before retention_s is up (0: no bound). What retention_s keeps grows with
    # the rate (at 300 events/s, about 50 fills and 22 orders a second); these bound it.
    max_fills: int = 50_000
    max_orders: int = 25_000
    open_order_mark_interval_s: float = 5.0  # how often open orders are re-marked to the latest mid
    prune_interval_s: float = 30.0
    # Rows changed but not yet in ClickHouse beyond which the agents wait (ClickHouse down).
    max_unwritten_rows: int = 100_000
    # Prefixes every consumed stream name and subject (isolation on a shared NATS, tests):
    # stream `<NS>_FILLS` on `<ns>.trading.fills.>`, and so on.
    namespace: str | None = None

    def __post_init__(self) -> None:
        if self.max_fills < 0 or self.max_orders < 0:
            raise ValueError("max_fills and max_orders must be >= 0 (0: no bound)")


class ExecutionQualityConfig(ServiceConfig):
    execution: ExecutionSection = msgspec.field(default_factory=ExecutionSection)


CONFIG = ExecutionQualityConfig


# -- wiring -----------------------------------------------------------------------------------


def execution_channels(app: App, namespace: str | None) -> ExecutionChannels:
    if not namespace:
        return ExecutionChannels(
            orders=subjects.orders(app),
            fills=subjects.fills(app),
            quotes=subjects.quotes(app),
            market_trades=subjects.market_trades(app),
        )
    if not _TOKEN.match(namespace):
        raise ConfigError(f"execution.namespace {namespace!r}: use letters, digits, '-' and '_' only")
    prefix = namespace.upper().replace("-", "_")

    def channel(name, stream, subject, value_type, max_age_s=None):
        return app.channel(
            name, stream=f"{prefix}_{stream}", subjects=[f"{namespace}.{subject}"], value_type=value_type,
            max_age_s=max_age_s,
        )

    return ExecutionChannels(
        orders=channel("orders", "ORDERS", "trading.orders.>", Order),
        fills=channel("fills", "FILLS", "trading.fills.>", Fill),
        quotes=channel("quotes", "QUOTES", "md.quotes.>", Quote, MARKET_DATA_MAX_AGE_S),
        market_trades=channel("market_trades", "TRADES", "md.trades.>", MarketTrade, MARKET_DATA_MAX_AGE_S),
    )


def service_chdb_dsn(dsn: str, service: str) -> str:
    """The chdb dsn this service opens: `<root>/<service>` when `dsn` names the shared
    chdb root (a path ending in `/chdb`), else `dsn` unchanged."""
    parsed = urlparse(dsn)
    if parsed.netloc or not parsed.path:
        return dsn  # chdb://memory, or a malformed dsn open_clickhouse will reject
    path = parsed.path.rstrip("/") or "/"
    if os.path.basename(path) == "chdb":
        path = f"{path}/{service}"
    return f"chdb://{path}" + (f"?{parsed.query}" if parsed.query else "")


def clickhouse_options(config: ServiceConfig) -> dict[str, Any]:
    """Keyword arguments of `open_clickhouse` for this service's config."""
    ch = config.databases.clickhouse or ClickHouseSection()
    if ch.dsn and ch.dsn.startswith("chdb:"):
        return {"dsn": service_chdb_dsn(ch.dsn, config.service.name)}
    options: dict[str, Any] = {"user": ch.user, "password": ch.password, "secure": ch.secure}
    if ch.dsn:
        options["dsn"] = ch.dsn
    else:
        options.update(host=ch.host, port=ch.port)
    return options


class ExecutionQualityService:
    """The app with its tracker, sink, ClickHouse connection, timers and pages."""

    CONNECT_BACKOFF_S = (0.5, 1, 2, 5, 10, 30)

    def __init__(self, config: ExecutionQualityConfig, *, transport: Transport | None = None):
        self.config = config
        ex = config.execution
        self.database = (config.databases.clickhouse or ClickHouseSection()).database
        if not _IDENTIFIER.match(self.database):
            raise ConfigError(f"databases.clickhouse.database {self.database!r} is not a plain identifier")
        self.app = app = new_app(config)
        if transport is not None:
            app.transport = transport
        self.channels = execution_channels(app, ex.namespace)
        self.tables = declare_tables(app)
        self.reference = config.reference()  # each symbol's currency: rows carry it
        self.tracker = ExecutionTracker(
            self.tables,
            TrackerSettings(
                history_ns=int(ex.history_s * NS),
                quiet_grace_ns=int(ex.quiet_symbol_grace_s * NS),
                retention_ns=int(ex.retention_s * NS),
                open_order_ttl_ns=int(ex.open_order_ttl_s * NS),
                max_fills=ex.max_fills,
                max_orders=ex.max_orders,
            ),
            self.reference,
        )
        self.sink = ExecutionSink(
            self.tracker,
            interval_s=config.batch.interval_sec,
            batch_rows=config.batch.size,
            max_unwritten=ex.max_unwritten_rows,
        )
        self.store: ClickHouseStore | None = None
        self.queries = ExecutionQueries(self.database, lambda: self.store)
        self.store_error: str | None = None
        self._connect_task: asyncio.Task | None = None
        self._marks = MarkTracker()
        register_agents(
            app, self.tracker, self.sink, self.channels,
            batch_size=config.runtime.batch_size, within_s=config.batch.interval_sec,
            market_within_s=min(AGENT_BATCH_WAIT_S, config.batch.interval_sec),
        )
        app.on_startup.append(self._start)
        app.on_shutdown.append(self._stop)
        app.timer(ex.open_order_mark_interval_s, name="mark_open_orders")(self._mark_open_orders)
        app.timer(ex.prune_interval_s, name="prune")(self._prune)
        app.health_check("clickhouse")(self._clickhouse_health)
        app.page("/metrics/execution")(self.metrics_execution)
        app.page("/analytics/summary")(self.analytics_summary)
        # For the page only (docs/execution_quality.md, "The page"): not in /openapi.json.
        app.page("/dashboard/slippage_histogram", documented=False)(self.slippage_histogram)
        app.metrics.registry.register(_ExecutionCollector(self))

    # -- lifecycle ----------------------------------------------------------------------------

    async def _start(self) -> None:
        # No row is rewritten as it was: the tables only hold states whose rows are in
        # ClickHouse. What the rebuilt history now decides is written as it progresses.
        await start_tracker(self.app, self.tracker, self.channels)
        # The rollup may have missed the last writes before a crash: redo the minutes
        # of every fill held (retention keeps the fills of minutes not yet refreshed).
        self.sink.stale_minutes |= self.tracker.fill_minutes()
        self.sink.start()
        self._connect_task = asyncio.create_task(self._connect(), name="execution_quality:clickhouse")

    async def _connect(self) -> None:
        """Open ClickHouse and create the tables, retrying until it works. Until then the
        writer waits, and the agents go on until `max_unwritten_rows` rows wait."""
        attempt = 0
        options = clickhouse_options(self.config)
        while True:
            store = None
            try:
                store = await asyncio.to_thread(open_clickhouse, **options)
                tables = ExecutionStore(store, self.database, self.reference)
                await tables.create_schema()
                self.store = store
                self.sink.attach(tables)
                store = None  # owned by the service now: _stop closes it
                self.store_error = None
                log.info("ClickHouse ready at %s (database %s)", self.store.location, self.database)
                return
            except asyncio.CancelledError:
                if store is not None:
                    await store.close()
                raise
            except Exception as exc:
                self.store_error = f"{type(exc).__name__}: {exc}"
                if store is not None:
                    await store.close()
                delay = self.CONNECT_BACKOFF_S[min(attempt, len(self.CONNECT_BACKOFF_S) - 1)]
                attempt += 1
                log.warning("ClickHouse not ready (%s); retrying in %ss", self.store_error, delay)
                await asyncio.sleep(delay)

    async def _stop(self) -> None:
        if self._connect_task is not None:
            self._connect_task.cancel()
            await asyncio.gather(self._connect_task, return_exceptions=True)
        await self.sink.stop()
        if self.store is not None:
            self.sink.detach()
            store, self.store = self.store, None
            await store.close()

    async def _mark_open_orders(self) -> None:
        """Re-mark open orders whose symbol moved (the writer writes them)."""
        moved = self._marks.moved(self.tracker)
        if moved:
            self.tracker.mark_open_orders(moved)

    async def _prune(self) -> None:
        # While rows cannot be written, keep the market-data history whole: what is
        # decided but unwritten must stay re-derivable after a restart.
        writing = self.sink.store is not None and self.sink.stats.consecutive_failures == 0
        self.tracker.prune(history=writing, stale_minutes=self.sink.stale_minutes)

    async def _clickhouse_health(self) -> tuple[bool, Any]:
        if self.store is None:
            return False, self.store_error or "connecting"
        await self.store.ping()
        stats = self.sink.stats
        # The writer never gives up; after `batch.max_retry` failed inserts in a row the
        # service says it is unhealthy while it keeps retrying.
        ok = stats.consecutive_failures < self.config.batch.max_retry
        return ok, {
            "location": self.store.location,
            "database": self.database,
            "rows_written": {"fills": stats.fill_rows, "orders": stats.order_rows},
            "write_errors": stats.write_errors,
            "failing_writes_in_a_row": stats.consecutive_failures,
            "last_error": stats.last_error,
            "unwritten_rows": self.sink.unwritten(),
            "rollup_minutes_stale": len(self.sink.stale_minutes),
        }

    # -- pages -----------------------------------------------------------------------------------

    async def metrics_execution(self, request: Request) -> JSON:
        """Execution metrics per fill or per order, newest first, with filters and pagination.

        Money is in the row's `currency` (the instrument's, from the reference data): a
        fill's `fee` is in its `fee_currency` (the instrument's unless the fill said
        otherwise); an order's `fees` are those charged in its `currency` and
        `fees_other` the rest, by currency (`{"USD": "10"}`), left out of
        `implementation_shortfall`.

        ---
        query:
          level: {enum: [fill, order], default: fill, description: one row per fill or per order}
          account: {$ref: Name, description: only this account}
          symbol: {$ref: Name, description: only this symbol}
          venue: {$ref: Name, description: only this venue}
          side: {enum: [BUY, SELL], description: only this side (lower case is taken too)}
          order_id: {$ref: Id, description: only this order's rows}
          sort: {enum: [newest, worst], default: newest, description: "newest first, or worst first: orders by implementation_shortfall_bps, fills by slippage_bps, highest (costliest) first, rows without one last"}
          from: {$ref: Time, description: "event time from, inclusive (before `to`)"}
          to: {$ref: Time, description: event time to, exclusive}
          limit: {type: integer, minimum: 1, maximum: 1000, default: 100}
          offset: {type: integer, minimum: 0, maximum: 10000000, default: 0}
        responses:
          200: {description: "`total`, `next_offset` and the `rows` (each with its `currency`)", schema: {type: object}}
          503: ClickHouse is not connected or the query failed
        """
        params = request.query_params
        _reject_unknown(params, {"level", "limit", "offset", "order_id", "sort", *Filters.PARAMETERS})
        level = params.get("level", "fill")
        if level not in ("fill", "order"):
            raise BadRequest({"parameter": "level", "error": f"must be fill or order, got {level!r}"})
        sort = params.get("sort", "newest")
        if sort not in ("newest", "worst"):
            raise BadRequest({"parameter": "sort", "error": f"must be newest or worst, got {sort!r}"})
        filters = Filters.parse(request)
        limit = query_int(request, "limit", 100, minimum=1, maximum=1000)
        offset = query_int(request, "offset", 0, minimum=0, maximum=10_000_000)
        total, rows = await self._query(self.queries.rows(level, filters, limit, offset, worst=sort == "worst"))
        return JSON(
            {
                "level": level,
                "sort": sort,
                "filters": filters.describe(),
                "limit": limit,
                "offset": offset,
                "total": total,
                "next_offset": offset + len(rows) if offset + len(rows) < total else None,
                "rows": rows,
            }
        )

    async def analytics_summary(self, request: Request) -> JSON:
        """Slippage, spread, markouts and fill ratio aggregated by group and time bucket.

        Groups are always split by currency as well: each carries `currency`, and its
        money (`fills.notional`, `fills.fees`, `fills.slippage_bps.cost`,
        `orders.implementation_shortfall.total`, and the notional weights of the
        weighted bps) is in it alone: two currencies are never added. Fees charged in
        another currency than the instrument's are in `fills.fees_other`, by currency.

        ---
        query:
          group_by: {pattern: '^(?!(?:[a-z]+,)*(account|symbol|venue|side),(?:[a-z]+,)*\\1(?:,|$))(?:(?:account|symbol|venue|side)(?:,(?:account|symbol|venue|side))*)?$', description: "comma-separated dimensions out of account, symbol, venue, side, each at most once (default all four; empty: one overall group per currency)"}
          bucket: {$ref: Bucket, description: time bucket}
          account: {$ref: Name, description: only this account}
          symbol: {$ref: Name, description: only this symbol}
          venue: {$ref: Name, description: only this venue}
          side: {enum: [BUY, SELL], description: only this side (lower case is taken too)}
          from: {$ref: Time, description: "event time from, inclusive (before `to`)"}
          to: {$ref: Time, description: event time to, exclusive}
          limit: {type: integer, minimum: 1, maximum: 10000, default: 1000}
          offset: {type: integer, minimum: 0, maximum: 10000000, default: 0}
        responses:
          200: {description: "`total` groups and the page of `groups`, one per key, currency (and bucket)", schema: {type: object}}
          503: ClickHouse is not connected or the query failed
        """
        params = request.query_params
        _reject_unknown(params, {"group_by", "bucket", "limit", "offset", *Filters.PARAMETERS})
        group_by = _parse_group_by(params.get("group_by"))
        bucket = params.get("bucket")
        bucket_ns = _parse_bucket(bucket) if bucket is not None else None
        filters = Filters.parse(request)
        limit = query_int(request, "limit", 1000, minimum=1, maximum=10_000)
        offset = query_int(request, "offset", 0, minimum=0, maximum=10_000_000)
        groups = await self._query(self.queries.summary(filters, group_by, bucket_ns))
        page = groups[offset : offset + limit]
        return JSON(
            {
                "group_by": list(group_by),
                "bucket": bucket,
                "filters": filters.describe(),
                "limit": limit,
                "offset": offset,
                "total": len(groups),
                "groups": page,
            }
        )

    async def slippage_histogram(self, request: Request) -> JSON:
        """The distribution of fills' slippage vs arrival (bps) broken down by each key of
        `by` (comma-separated out of account, symbol, venue, side; default venue), for the
        page. One set of bins for every breakdown: `bins` (5-200, default 30) bins of a
        round width (1, 2 or 5 × 10^k bps) over the 1st-99th percentile of the filtered
        fills; a group's fills outside are counted in its `below` / `above`. Same filters
        and the same 400s as /analytics/summary; read from the per-minute rollup when
        `from` / `to` are whole minutes, else from the fills table."""
        params = request.query_params
        _reject_unknown(params, {"by", "bins", "limit", *Filters.PARAMETERS})
        by = _parse_by(params.get("by"))
        bins = query_int(request, "bins", 30, minimum=5, maximum=200)
        limit = query_int(request, "limit", 50, minimum=1, maximum=1000)
        filters = Filters.parse(request)
        answer = await self._query(self.queries.slippage_histogram(filters, by, bins, limit))
        return JSON({"filters": filters.describe(), **answer})

    async def _query(self, coroutine):
        if self.store is None:
            coroutine.close()
            raise BadRequest({"error": "ClickHouse is not connected", "reason": self.store_error}, status_code=503)
        try:
            return await coroutine
        except ClickHouseError as exc:
            raise BadRequest({"error": "ClickHouse query failed", "reason": str(exc)[:2000]}, status_code=503) from None


class _ExecutionCollector:
    """The tracker's and sink's counters as Prometheus metrics, read at scrape time."""

    def __init__(self, service: ExecutionQualityService):
        self.service = service

    def collect(self):
        tracker, sink = self.service.tracker, self.service.sink
        t, s = tracker.stats, sink.stats
        events = CounterMetricFamily("posttrade_execution_events", "Events folded into the join", labels=["kind"])
        for kind, value in (
            ("fill", t.fills), ("correction", t.corrections), ("bust", t.busts), ("order", t.orders),
            ("quote", t.quotes), ("market_trade", t.market_trades),
        ):
            events.add_metric([kind], value)
        yield events
        skipped = CounterMetricFamily(
            "posttrade_execution_skipped_events", "Events that changed nothing", labels=["kind", "reason"]
        )
        for (kind, reason), value in sorted(t.skipped_fills.items()):
            skipped.add_metric([kind, reason], value)
        for kind, reason, value in (
            ("quote", "duplicate", t.duplicate_quotes),
            ("market_trade", "duplicate", t.duplicate_trades),
            ("quote", "late", t.late_quotes),
            ("market_trade", "late", t.late_trades),
        ):
            skipped.add_metric([kind, reason], value)
        yield skipped
        yield CounterMetricFamily(
            "posttrade_execution_unavailable_mids", "Mids decided as unknown (no quote at or before the time)",
            value=t.unavailable_mids,
        )
        rows = CounterMetricFamily("posttrade_execution_rows_written", "Rows written to ClickHouse", labels=["table"])
        rows.add_metric([FILLS_TABLE], s.fill_rows)
        rows.add_metric([ORDERS_TABLE], s.order_rows)
        yield rows
        yield CounterMetricFamily("posttrade_execution_write_errors", "Failed ClickHouse writes (retried)", value=s.write_errors)
        yield CounterMetricFamily("posttrade_execution_rows_rejected", "Rows that could never be written", value=t.rows_rejected)
        yield CounterMetricFamily(
            "posttrade_execution_rows_held",
            "Rows not written because ClickHouse has the row further along (after a restart)",
            value=s.rows_held,
        )
        yield GaugeMetricFamily(
            "posttrade_execution_rollup_minutes_stale", "Rollup minutes waiting for their refresh",
            value=len(sink.stale_minutes),
        )
        yield CounterMetricFamily(
            "posttrade_execution_write_seconds", "Time spent in ClickHouse writes", value=s.write_seconds_total
        )
        pending = GaugeMetricFamily("posttrade_execution_waiting", "Fills and orders waiting for event time", labels=["series"])
        pending.add_metric(["quotes"], len(tracker.quote_waits))
        pending.add_metric(["market_trades"], len(tracker.trade_waits))
        yield pending
        yield GaugeMetricFamily(
            "posttrade_execution_amendments_waiting", "Corrections and busts kept until their execution arrives",
            value=len(tracker.waiting),
        )
        held = GaugeMetricFamily("posttrade_execution_held", "Fills and orders held in state", labels=["kind"])
        held.add_metric(["fill"], len(tracker.fills))
        held.add_metric(["order"], len(tracker.orders))
        yield held
        pruned = CounterMetricFamily(
            "posttrade_execution_pruned", "Fills and orders forgotten: retention_s up, or beyond max_fills / max_orders",
            labels=["kind", "reason"],
        )
        pruned.add_metric(["fill", "retention"], t.pruned_fills - t.pruned_fills_capacity)
        pruned.add_metric(["fill", "capacity"], t.pruned_fills_capacity)
        pruned.add_metric(["order", "retention"], t.pruned_orders - t.pruned_orders_capacity)
        pruned.add_metric(["order", "capacity"], t.pruned_orders_capacity)
        yield pruned
        # Of the capacity ones: orders whose NEW was never seen, with their fills (rows
        # without arrival values). Rising: the orders stream runs ahead of the fills
        # stream by more than max_orders covers (docs/execution_quality.md, "Bounded state").
        unjoined = CounterMetricFamily(
            "posttrade_execution_pruned_unjoined",
            "Of the capacity prunes: orders whose NEW was never seen, and their fills", labels=["kind"],
        )
        unjoined.add_metric(["fill"], t.pruned_unjoined_fills)
        unjoined.add_metric(["order"], t.pruned_unjoined_orders)
        yield unjoined
        history = GaugeMetricFamily("posttrade_execution_history_points", "Series points kept in memory", labels=["series"])
        history.add_metric(["quotes"], tracker.quotes.total_points())
        history.add_metric(["market_trades"], tracker.trades.total_points())
        yield history


def build_service(config: ExecutionQualityConfig, *, transport: Transport | None = None) -> ExecutionQualityService:
    return ExecutionQualityService(config, transport=transport)


def build(config: ExecutionQualityConfig) -> App:
    return build_service(config).app


# -- request parsing -------------------------------------------------------------------------

_GROUP_KEYS = ("account", "symbol", "venue", "side")
_BUCKET = re.compile(r"^([1-9][0-9]{0,5})(s|m|h|d)$")
_UNIT_NS = {"s": NS, "m": 60 * NS, "h": 3600 * NS, "d": 86_400 * NS}


def _reject_unknown(params, allowed: set[str]) -> None:
    unknown = sorted(set(params.keys()) - allowed)
    if unknown:
        raise BadRequest({"parameter": unknown[0], "error": f"unknown parameter; allowed: {', '.join(sorted(allowed))}"})


# What the OpenAPI document says of `group_by` (tests/unit/test_auth.py compares them).
GROUP_BY_PATTERN = (
    r"^(?!(?:[a-z]+,)*(account|symbol|venue|side),(?:[a-z]+,)*\1(?:,|$))"
    r"(?:(?:account|symbol|venue|side)(?:,(?:account|symbol|venue|side))*)?$"
)
_group_by = re.compile(GROUP_BY_PATTERN)


def _parse_group_by(raw: str | None) -> tuple[str, ...]:
    if raw is None:
        return _GROUP_KEYS
    if not _group_by.fullmatch(raw):
        raise BadRequest(
            {"parameter": "group_by", "error": f"comma-separated keys out of {', '.join(_GROUP_KEYS)}, each at most once; got {raw!r}"}
        )
    return tuple(raw.split(",")) if raw else ()


def _parse_by(raw: str | None) -> tuple[str, ...]:
    """`by` of the slippage histogram: one or more breakdowns, each key at most once."""
    if raw is None:
        return ("venue",)
    if not raw or not _group_by.fullmatch(raw):
        raise BadRequest(
            {"parameter": "by", "error": f"comma-separated keys out of {', '.join(_GROUP_KEYS)}, each at most once; got {raw!r}"}
        )
    return tuple(raw.split(","))


def _parse_bucket(raw: str) -> int:
    web_params.check_interval("bucket", raw, bucket=True)  # the published pattern, exactly
    match = _BUCKET.match(raw)
    if not match:
        raise BadRequest({"parameter": "bucket", "error": f"must look like 30s, 5m, 1h or 1d, got {raw!r}"})
    value = int(match.group(1)) * _UNIT_NS[match.group(2)]
    if value > 366 * _UNIT_NS["d"]:
        raise BadRequest({"parameter": "bucket", "error": "at most 366 days"})
    return value


def _parse_time(name: str, raw: str) -> int:
    """Epoch nanoseconds, or ISO 8601 (a time without an offset is UTC): web/params.py `Time`."""
    return web_params.parse_time(name, raw)


@dataclass(frozen=True)
class Filters:
    PARAMETERS = ("account", "symbol", "venue", "side", "from", "to")

    account: str | None = None
    symbol: str | None = None
    venue: str | None = None
    side: str | None = None
    order_id: str | None = None
    from_ns: int | None = None  # inclusive
    to_ns: int | None = None  # exclusive

    @classmethod
    def parse(cls, request: Request) -> Filters:
        p = request.query_params
        values: dict[str, Any] = {}
        for name in ("account", "symbol", "venue", "order_id"):
            raw = p.get(name)
            if raw is not None:
                max_length = web_params.ID_MAX if name == "order_id" else web_params.NAME_MAX
                values[name] = web_params.check_name(name, raw, max_length=max_length)
        side = p.get("side")
        if side is not None:
            if side.upper() not in ("BUY", "SELL"):
                raise BadRequest({"parameter": "side", "error": f"must be BUY or SELL, got {side!r}"})
            values["side"] = side.upper()
        if "from" in p:
            values["from_ns"] = _parse_time("from", p["from"])
        if "to" in p:
            values["to_ns"] = _parse_time("to", p["to"])
        if "from_ns" in values and "to_ns" in values and values["from_ns"] >= values["to_ns"]:
            raise BadRequest({"parameter": "to", "error": "must be after from"})
        return cls(**values)

    def describe(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in ("account", "symbol", "venue", "side", "order_id")}
        out.update({"from": self.from_ns, "to": self.to_ns})
        return {k: v for k, v in out.items() if v is not None}

    def where(self, time_column: str, *conditions: str) -> tuple[str, dict[str, Any]]:
        """The WHERE clause (with `conditions` of the caller's own) and its parameters."""
        parts, params = list(conditions), {}
        for name in ("account", "symbol", "venue", "side", "order_id"):
            value = getattr(self, name)
            if value is not None:
                parts.append(f"{name} = {{{name}:String}}")
                params[name] = value
        if self.from_ns is not None:
            parts.append(f"{time_column} >= fromUnixTimestamp64Nano({{from_ns:Int64}}, 'UTC')")
            params["from_ns"] = self.from_ns
        if self.to_ns is not None:
            parts.append(f"{time_column} < fromUnixTimestamp64Nano({{to_ns:Int64}}, 'UTC')")
            params["to_ns"] = self.to_ns
        return (" WHERE " + " AND ".join(parts)) if parts else "", params


# -- queries ---------------------------------------------------------------------------------

# What /metrics/execution returns per level: (name, SQL expression, kind). Timestamps
# leave as epoch nanoseconds (clickhouse-connect would truncate DateTime64 to µs).
_FILL_FIELDS = (
    ("fill_id", "fill_id", "str"), ("order_id", "order_id", "str"), ("account", "account", "str"),
    ("symbol", "symbol", "str"), ("currency", "currency", "str"), ("venue", "venue", "str"), ("side", "side", "str"),
    ("liquidity", "liquidity", "str"), ("ts", "toUnixTimestamp64Nano(ts)", "int"),
    ("qty", "qty", "dec"), ("price", "price", "dec"), ("fee", "fee", "dec"), ("fee_currency", "fee_currency", "str"),
    ("notional", "notional", "dec"),
    ("arrival_ts", "toUnixTimestamp64Nano(arrival_ts)", "int"), ("arrival_mid", "arrival_mid", "dec"),
    ("slippage_bps", "slippage_bps", "dec"), ("slippage_cost", "slippage_cost", "dec"),
    ("mid_at_fill", "mid_at_fill", "dec"), ("effective_spread_bps", "effective_spread_bps", "dec"),
    ("mid_1s", "mid_1s", "dec"), ("mid_5s", "mid_5s", "dec"), ("mid_60s", "mid_60s", "dec"),
    ("markout_1s_bps", "markout_1s_bps", "dec"), ("markout_5s_bps", "markout_5s_bps", "dec"),
    ("markout_60s_bps", "markout_60s_bps", "dec"), ("complete", "complete", "bool"),
    ("amendments", "amendments", "int"),
)
_ORDER_FIELDS = (
    ("order_id", "order_id", "str"), ("account", "account", "str"), ("symbol", "symbol", "str"),
    ("currency", "currency", "str"), ("venue", "venue", "str"), ("side", "side", "str"),
    ("order_type", "order_type", "str"),
    ("limit_price", "limit_price", "dec"), ("status", "status", "str"), ("qty", "qty", "dec"),
    ("arrival_ts", "toUnixTimestamp64Nano(arrival_ts)", "int"), ("end_ts", "toUnixTimestamp64Nano(end_ts)", "int"),
    ("arrival_mid", "arrival_mid", "dec"), ("fills", "fills", "int"), ("filled_qty", "filled_qty", "dec"),
    ("unfilled_qty", "unfilled_qty", "dec"), ("fill_ratio", "fill_ratio", "dec"),
    ("filled_notional", "filled_notional", "dec"), ("fees", "fees", "dec"), ("fees_other", "fees_other", "map"),
    ("avg_fill_price", "avg_fill_price", "dec"),
    ("first_fill_ts", "toUnixTimestamp64Nano(first_fill_ts)", "int"),
    ("last_fill_ts", "toUnixTimestamp64Nano(last_fill_ts)", "int"),
    ("time_to_first_fill_ns", "time_to_first_fill_ns", "int"), ("time_to_last_fill_ns", "time_to_last_fill_ns", "int"),
    ("market_vwap", "market_vwap", "dec"), ("market_volume", "market_volume", "dec"),
    ("vwap_slippage_bps", "vwap_slippage_bps", "dec"), ("unfilled_price", "unfilled_price", "dec"),
    ("unfilled_price_ts", "toUnixTimestamp64Nano(unfilled_price_ts)", "int"),
    ("benchmark_notional", "benchmark_notional", "dec"), ("execution_cost", "execution_cost", "dec"),
    ("opportunity_cost", "opportunity_cost", "dec"), ("implementation_shortfall", "implementation_shortfall", "dec"),
    ("implementation_shortfall_bps", "implementation_shortfall_bps", "dec"), ("is_final", "is_final", "bool"),
    ("amendments", "amendments", "int"),
)


# A fill removed by a BUST keeps its row (flagged, at a higher version, so FINAL sees the
# flag): every reader of the fills table leaves it out.
_LIVE_FILLS = "busted = 0"


def _out(kind: str, value: Any) -> Any:
    if value is None:
        return None
    if kind == "dec":
        return format_decimal(value)
    if kind == "map":
        return _amounts(value)
    if kind == "bool":
        return bool(value)
    return value


def _amounts(by_currency: dict[str, Decimal]) -> dict[str, str]:
    """Money by currency (fees charged in other currencies), sorted by currency."""
    return {currency: format_decimal(by_currency[currency]) for currency in sorted(by_currency)}


def _mean(total: Decimal | None, count: int) -> str | None:
    if not count or total is None:
        return None
    return format_decimal(round_quotient(total, Decimal(count), BPS_PLACES))


class ExecutionQueries:
    """The read side: rows and summaries computed in ClickHouse SQL.

    Sums and exact quantiles come from ClickHouse as Decimals; the few divisions
    (means, weighted means, ratios) are done here exactly (ClickHouse's Decimal
    division truncates at the dividend's scale).

    The fill half of a summary reads the per-minute rollup (`execution_fill_minutes`:
    sums, counts and every slippage value per minute and account / symbol / venue /
    side) when every bucket and bound is a whole number of minutes, since each minute
    then lies wholly inside one bucket and inside or outside the bounds; otherwise it
    reads the fills themselves. Both give the same numbers (a test compares them).
    Busted fills are in neither: the fills table's readers leave out `busted` rows,
    and the rollup is computed without them.

    Every group is also split by `currency` (the instrument's, stored on each row):
    money is only ever summed in one currency. Fees charged in another currency than
    the instrument's (a fill's `fee_currency`) are summed apart, by currency
    (`fees_other`)."""

    def __init__(self, database: str, connection: Callable[[], ClickHouseStore | None]):
        self.database = database
        self.connection = connection

    @property
    def store(self) -> ClickHouseStore:
        store = self.connection()
        if store is None:
            raise ClickHouseError("ClickHouse is not connected")
        return store

    async def rows(
        self, level: str, filters: Filters, limit: int, offset: int, *, worst: bool = False
    ) -> tuple[int, list[dict]]:
        """Newest first, or with `worst` the costliest first (orders by shortfall bps,
        fills by slippage bps; rows without one last, then newest first)."""
        if level == "fill":
            table, fields, order = FILLS_TABLE, _FILL_FIELDS, "ts DESC, fill_id"
            where, params = filters.where("ts", _LIVE_FILLS)
            if worst:
                order = "slippage_bps DESC NULLS LAST, " + order
        else:
            table, fields, order = ORDERS_TABLE, _ORDER_FIELDS, "arrival_ts DESC, order_id"
            where, params = filters.where("arrival_ts")
            if worst:
                order = "implementation_shortfall_bps DESC NULLS LAST, " + order
        source = f"{self.database}.{table} FINAL{where}"
        total = (await self.store.query(f"SELECT count() FROM {source}", params)).scalar()
        select = ", ".join(f"{expr} AS out_{name}" for name, expr, _ in fields)
        result = await self.store.query(
            f"SELECT {select} FROM {source} ORDER BY {order} LIMIT {{limit:UInt64}} OFFSET {{offset:UInt64}}",
            {**params, "limit": limit, "offset": offset},
        )
        rows = [{name: _out(kind, value) for (name, _, kind), value in zip(fields, row)} for row in result.rows]
        return int(total), rows

    async def summary(
        self, filters: Filters, group_by: tuple[str, ...], bucket_ns: int | None, *, use_rollup: bool = True
    ) -> list[dict]:
        """`use_rollup=False` reads the fills table even when the rollup could answer."""
        rollup = use_rollup and whole_minutes(filters, bucket_ns)
        fills = await self._fill_groups(filters, group_by, bucket_ns, rollup)
        orders = await self._order_groups(filters, group_by, bucket_ns)
        keys = sorted(set(fills) | set(orders), key=lambda k: tuple((v is None, v) for v in k))
        out = []
        for key in keys:
            group: dict[str, Any] = dict(zip(group_by, key[: len(group_by)]))
            group["currency"] = key[len(group_by)]
            if bucket_ns is not None:
                group["bucket_start"] = key[-1]
            group["fills"] = fills.get(key, _EMPTY_FILLS)
            group["orders"] = orders.get(key, _EMPTY_ORDERS)
            out.append(group)
        return out

    def _group_sql(self, group_by: tuple[str, ...], bucket_ns: int | None, time_ns: str) -> tuple[str, str]:
        """SELECT prefix and GROUP BY of the keys, then the currency (every group is in
        one), then the bucket; `time_ns` is the row's time in epoch ns."""
        exprs = [*group_by, "currency"]
        if bucket_ns is not None:
            exprs.append(f"intDiv({time_ns}, {{bucket_ns:Int64}}) * {{bucket_ns:Int64}}")
        select = "".join(f"{e} AS g{i}, " for i, e in enumerate(exprs))
        group = (" GROUP BY " + ", ".join(f"g{i}" for i in range(len(exprs)))) if exprs else ""
        return select, group

    # The fill aggregates, in the order `_fill_groups` reads them: over the fills
    # themselves, and the same figures over the rollup's per-minute partial sums.
    _FILL_AGGREGATES = (
        "count() AS n, sum(qty), sum(notional), sumIf(fee, fee_currency = currency), "
        "sumMapIf(map(fee_currency, fee), fee_currency != currency), "
        "count(slippage_bps), sum(slippage_bps), quantilesExact(0.5, 0.95)(slippage_bps), "
        "sum(slippage_cost), sum(arrival_notional), "
        "count(effective_spread_bps), sum(effective_spread_bps), "
        "count(markout_1s_bps), sum(markout_1s_bps), count(markout_5s_bps), sum(markout_5s_bps), "
        "count(markout_60s_bps), sum(markout_60s_bps)"
    )
    _ROLLUP_AGGREGATES = (
        "sum(fills) AS n, sum(qty), sum(notional), sum(fee), sumMap(fees_other), "
        "sum(slippage_count), sum(slippage_sum), quantilesExactArray(0.5, 0.95)(slippage_values), "
        "sum(slippage_cost), sum(arrival_notional), "
        "sum(effective_spread_count), sum(effective_spread_sum), "
        "sum(markout_1s_count), sum(markout_1s_sum), sum(markout_5s_count), sum(markout_5s_sum), "
        "sum(markout_60s_count), sum(markout_60s_sum)"
    )

    async def _fill_groups(self, filters: Filters, group_by, bucket_ns, rollup: bool) -> dict[tuple, dict]:
        if rollup:
            table, time_ns, aggregates = (
                MINUTES_TABLE, "toInt64(toUnixTimestamp(minute)) * 1000000000", self._ROLLUP_AGGREGATES
            )
            where, params = filters.where("minute")
        else:
            table, time_ns, aggregates = FILLS_TABLE, "toUnixTimestamp64Nano(ts)", self._FILL_AGGREGATES
            where, params = filters.where("ts", _LIVE_FILLS)
        select, group = self._group_sql(group_by, bucket_ns, time_ns)
        if bucket_ns is not None:
            params["bucket_ns"] = bucket_ns
        sql = f"SELECT {select}{aggregates} FROM {self.database}.{table} FINAL{where}{group}"
        result = await self.store.query(sql, params)
        width = len(group_by) + 1 + (bucket_ns is not None)
        groups = {}
        for row in result.rows:
            key, v = tuple(row[:width]), row[width:]
            (n, qty, notional, fees, fees_other, slip_n, slip_sum, slip_q, slip_cost, slip_weight, es_n, es_sum,
             m1_n, m1_sum, m5_n, m5_sum, m60_n, m60_sum) = v
            if not n:
                continue  # the one row an ungrouped query returns over nothing
            groups[key] = {
                "count": n,
                "qty": format_decimal(qty),
                "notional": format_decimal(notional),
                "fees": format_decimal(fees),
                "fees_other": _amounts(fees_other),
                "slippage_bps": {
                    "count": slip_n,
                    "mean": _mean(slip_sum, slip_n),
                    "median": format_decimal(slip_q[0]) if slip_n else None,
                    "p95": format_decimal(slip_q[1]) if slip_n else None,
                    "notional_weighted": format_decimal(to_bps(slip_cost, slip_weight)) if slip_n and slip_weight else None,
                    "cost": format_decimal(slip_cost) if slip_n else None,
                },
                "effective_spread_bps": {"count": es_n, "mean": _mean(es_sum, es_n)},
                "markout_bps": {
                    "1s": {"count": m1_n, "mean": _mean(m1_sum, m1_n)},
                    "5s": {"count": m5_n, "mean": _mean(m5_sum, m5_n)},
                    "60s": {"count": m60_n, "mean": _mean(m60_sum, m60_n)},
                },
            }
        return groups

    async def _order_groups(self, filters: Filters, group_by, bucket_ns) -> dict[tuple, dict]:
        where, params = filters.where("arrival_ts")
        select, group = self._group_sql(group_by, bucket_ns, "toUnixTimestamp64Nano(arrival_ts)")
        if bucket_ns is not None:
            params["bucket_ns"] = bucket_ns
        sql = (
            f"SELECT {select}count() AS n, countIf(end_ts IS NOT NULL), sum(qty), sum(filled_qty), sum(fill_ratio), "
            "count(implementation_shortfall), sum(implementation_shortfall), "
            "sumIf(benchmark_notional, implementation_shortfall IS NOT NULL), "
            "count(vwap_slippage_bps), sum(vwap_slippage_bps), "
            "count(time_to_first_fill_ns), sum(time_to_first_fill_ns), "
            "count(time_to_last_fill_ns), sum(time_to_last_fill_ns) "
            f"FROM {self.database}.{ORDERS_TABLE} FINAL{where}{group}"
        )
        result = await self.store.query(sql, params)
        width = len(group_by) + 1 + (bucket_ns is not None)
        groups = {}
        for row in result.rows:
            key, v = tuple(row[:width]), row[width:]
            (n, ended, qty, filled, ratio_sum, is_n, is_sum, is_weight, vw_n, vw_sum,
             first_n, first_sum, last_n, last_sum) = v
            if not n:
                continue
            groups[key] = {
                "count": n,
                "ended": ended,
                "qty": format_decimal(qty),
                "filled_qty": format_decimal(filled),
                "fill_ratio": format_decimal(round_quotient(filled, qty, 12)) if qty else None,
                "mean_fill_ratio": format_decimal(round_quotient(ratio_sum, Decimal(n), 12)),
                "implementation_shortfall": {
                    "count": is_n,
                    "total": format_decimal(is_sum) if is_n else None,
                    "bps": format_decimal(to_bps(is_sum, is_weight)) if is_n and is_weight else None,
                },
                "vwap_slippage_bps": {"count": vw_n, "mean": _mean(vw_sum, vw_n)},
                "time_to_first_fill_ns": {"count": first_n, "mean": first_sum // first_n if first_n else None},
                "time_to_last_fill_ns": {"count": last_n, "mean": last_sum // last_n if last_n else None},
            }
        return groups


    async def slippage_histogram(self, filters: Filters, by: tuple[str, ...], bins: int, limit: int) -> dict:
        """Counts of fills' slippage bps per bin, per group of each key of `by`.

        The bins are chosen once over all filtered fills (`histogram_bins`) and counted
        in ClickHouse with integer arithmetic on the values in units of 10^-8 bps (their
        exact scale), so a value on an edge falls in the bin it starts, never beside it."""
        if whole_minutes(filters, None):
            where, params = filters.where("minute")
            values = (
                f"SELECT account, symbol, venue, side, arrayJoin(slippage_values) AS v "
                f"FROM {self.database}.{MINUTES_TABLE} FINAL{where}"
            )
        else:
            where, params = filters.where("ts", _LIVE_FILLS, "slippage_bps IS NOT NULL")
            values = (
                f"SELECT account, symbol, venue, side, assumeNotNull(slippage_bps) AS v "
                f"FROM {self.database}.{FILLS_TABLE} FINAL{where}"
            )
        stats = await self.store.query(f"SELECT count(), quantilesExact(0.01, 0.5, 0.99)(v) FROM ({values})", params)
        count, (p01, median, p99) = stats.rows[0]
        answer: dict[str, Any] = {"count": int(count), "bin_bps": None, "edges": [], "quantiles": None, "by": {}}
        if not count:
            answer["by"] = {key: [] for key in by}
            return answer
        width, first, last = histogram_bins(Decimal(p01), Decimal(p99), bins)
        units = int(width * BPS_UNITS)
        answer.update(
            bin_bps=format_decimal(width),
            edges=[format_decimal(k * width) for k in range(first, last + 2)],
            quantiles={"p1": format_decimal(p01), "median": format_decimal(median), "p99": format_decimal(p99)},
        )
        # One pass over the values, grouped by every key asked for and the bin; each
        # breakdown is then summed here (a few thousand rows: keys × bins).
        k = bin_sql("v", units)
        keys = ", ".join(by)
        result = await self.store.query(
            f"SELECT {keys}, greatest(least({k}, {last + 1}), {first - 1}) AS b, count() "
            f"FROM ({values}) GROUP BY {keys}, b",
            params,
        )
        breakdowns: dict[str, dict[str, dict]] = {key: {} for key in by}
        for row in result.rows:
            b, n = row[-2], row[-1]
            for key, g in zip(by, row):
                group = breakdowns[key].setdefault(
                    g, {"key": g, "count": 0, "counts": [0] * (last - first + 1), "below": 0, "above": 0}
                )
                group["count"] += n
                if b < first:
                    group["below"] += n
                elif b > last:
                    group["above"] += n
                else:
                    group["counts"][b - first] += n
        for key, groups in breakdowns.items():
            answer["by"][key] = sorted(groups.values(), key=lambda grp: (-grp["count"], grp["key"]))[:limit]
        return answer


BPS_UNITS = 10**8  # slippage bps are stored with 8 decimals (Decimal(38, 8))


def bin_sql(value: str, units: int) -> str:
    """ClickHouse: the index of the bin of `units` × 10^-8 bps that the bps `value` falls
    in, floor(value / width), in integers (exact; `intDiv` truncates toward zero)."""
    a = f"toInt128({value} * {BPS_UNITS})"
    return f"(intDiv({a}, {units}) - if({a} % {units} < 0, 1, 0))"


_NICE = (1, 2, 5)  # bin widths are these × 10^k bps


def histogram_bins(low: Decimal, high: Decimal, bins: int) -> tuple[Decimal, int, int]:
    """A round bin width (1, 2 or 5 × 10^k bps, at least 10^-8) giving at most about
    `bins` bins over [low, high], and the first and last bin index (bin k is
    [k × width, (k + 1) × width)), so that low and high both fall in a bin."""
    span = max(high - low, Decimal(0))
    target = span / bins if span else Decimal(1)
    width = None
    exponent = max(target.adjusted(), -8)
    while width is None:
        for nice in _NICE:
            candidate = Decimal(nice).scaleb(exponent)
            if candidate >= target:
                width = candidate
                break
        exponent += 1
    return width, int((low / width).to_integral_value(rounding="ROUND_FLOOR")), int(
        (high / width).to_integral_value(rounding="ROUND_FLOOR")
    )


def whole_minutes(filters: Filters, bucket_ns: int | None) -> bool:
    """Whether the rollup answers exactly: buckets and bounds on whole minutes."""
    return all(
        value is None or value % MINUTE_NS == 0 for value in (bucket_ns, filters.from_ns, filters.to_ns)
    )


_EMPTY_FILLS = {"count": 0}
_EMPTY_ORDERS = {"count": 0}
