"""ptrc — post-trade, risk and compliance (API 8109, metrics 9109).

Positions and P&L from fills (average cost and FIFO), marks from market data,
compliance alerts, storage of trades and position snapshots in QuestDB and of alerts
in ClickHouse, reconciliation and reports. See docs/ptrc.md.
"""

from __future__ import annotations

import heapq
import time
from collections import OrderedDict
from datetime import time as dtime

import msgspec
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..agents.positions import PositionKeeper
from ..agents.ptrc_storage import ALERTS_TABLE, PtrcStorage
from ..agents.reconciliation import ReconciliationSection, install_reconciliation
from ..agents.reports import ReportsSection, install_reports
from ..app import App
from ..config import ServiceConfig, _Section
from ..core.compliance import ComplianceRules
from ..core.history import DEFAULT_CHECKPOINT_EVERY, DEFAULT_MAX_RECORDS, Amendment, parse_horizon
from ..core.marks import DEFAULT_PRIORITY, MarkSource
from ..core.positions import Position, position_row
from ..core.valuation import PositionValue, sum_known, value_position
from ..stores.questdb import QuestDBClient, QuestDBWriter
from ..web.live import History, LiveLog, LiveTopic, Sample
from ..web.params import query_choice, query_int, query_name
from ..web.server import JSON
from .wiring import clickhouse_store, new_app, object_store


class MarksSection(_Section):
    priority: tuple[MarkSource, ...] = DEFAULT_PRIORITY


class ComplianceSection(ComplianceRules, frozen=True, kw_only=True, forbid_unknown_fields=True):
    check_interval_s: float = 1.0  # how often price moves are checked against account limits


class BooksSection(_Section):
    """The execution history behind every position (`core.history`)."""

    horizon: str = "7d"  # how far back in event time a fill or amendment may still land
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY  # re-derivation replays at most this many extra
    # Executions and amendments held within the horizon, at most (memory: docs/ptrc.md);
    # past it the oldest are folded early, and nothing older than them can land.
    max_records: int = DEFAULT_MAX_RECORDS

    def horizon_ns(self) -> int:
        return parse_horizon(self.horizon)


class TradingDaySection(_Section):
    timezone: str = "UTC"
    roll_at: str = "00:00"  # local time the trading day starts

    def roll_time(self) -> dtime:
        return dtime.fromisoformat(self.roll_at)


class PtrcConfig(ServiceConfig, kw_only=True):
    marks: MarksSection = msgspec.field(default_factory=MarksSection)
    books: BooksSection = msgspec.field(default_factory=BooksSection)
    compliance: ComplianceSection = msgspec.field(default_factory=ComplianceSection)
    trading_day: TradingDaySection = msgspec.field(default_factory=TradingDaySection)
    reconciliation: ReconciliationSection = msgspec.field(default_factory=ReconciliationSection)
    reports: ReportsSection = msgspec.field(default_factory=ReportsSection)


CONFIG = PtrcConfig

METHODS = ("avg", "fifo", "both")

# The page (docs/ptrc.md, "The page"): what it follows live, and the bounds of what is
# kept for it.
LIVE_FIRST_ROWS = 500  # a page starts from the positions filled last, at most this many
LIVE_REVALUED = 500  # re-sent when their mark moves: the positions last sent to a page
ALERTS_KEPT = 500  # the last alerts raised, which a page gets when it opens


def build(config: PtrcConfig) -> App:
    app = new_app(config)
    rules = ComplianceRules(**{f: getattr(config.compliance, f) for f in ComplianceRules.__struct_fields__})
    reference = config.reference()
    live_alerts = LiveLog("alerts", keep=ALERTS_KEPT)
    keeper = PositionKeeper(
        app,
        reference=reference,
        mark_priority=config.marks.priority,
        rules=rules,
        compliance_check_interval_s=config.compliance.check_interval_s,
        day_timezone=config.trading_day.timezone,
        day_roll_at=config.trading_day.roll_time(),
        horizon_ns=config.books.horizon_ns(),
        checkpoint_every=config.books.checkpoint_every,
        max_records=config.books.max_records,
        live_alerts=live_alerts,
    )
    app.metrics.registry.register(_BooksCollector(keeper))
    blotter = LivePositions(keeper)
    keeper.live_positions = blotter.topic
    keeper.on_marks_moved = blotter.marks_moved
    blotter.topic.serve(app, "/live/positions")
    live_alerts.serve(app, "/live/alerts")
    History(FlowSample(keeper)).serve(app, "/dashboard/history", public=True)  # counts only, like /stats
    qdb = config.databases.questdb
    questdb = QuestDBClient(host=qdb.host, port=qdb.port, username=qdb.user, password=qdb.password, tls=qdb.tls)
    writer = QuestDBWriter(host=qdb.host, port=qdb.port, username=qdb.user, password=qdb.password, tls=qdb.tls)
    ch = config.databases.clickhouse
    clickhouse = clickhouse_store(config)
    storage = PtrcStorage(
        app,
        keeper,
        questdb=questdb,
        writer=writer,
        clickhouse=clickhouse,
        batch_size=config.batch.size,
        interval_s=config.batch.interval_sec,
    )

    multipliers = reference.multipliers
    install_reconciliation(
        app,
        fills=keeper.fills,
        positions=keeper.positions,
        multipliers=multipliers,
        mark_of=keeper.mark_of,
        settings=config.reconciliation,
        new_book=keeper.new_book,
    )
    install_reports(
        app,
        positions=keeper.positions,
        mark_of=keeper.mark_of,
        fx=keeper.fx,
        multipliers=multipliers,
        object_store=object_store(config),
        questdb=questdb,
        clickhouse=clickhouse,
        settings=config.reports,
        day_timezone=config.trading_day.timezone,
        day_starts_at=config.trading_day.roll_time(),
    )

    @app.health_check("questdb")
    async def questdb_health():
        return await questdb.ping(), f"{qdb.host}:{qdb.port}"

    @app.health_check("clickhouse")
    async def clickhouse_health():
        return await clickhouse.ping(), ch.dsn or f"{ch.host}:{ch.port}"

    async def close_stores() -> None:
        await writer.close()
        await questdb.close()
        await clickhouse.close()

    app.on_shutdown.append(close_stores)

    @app.page("/positions")
    async def positions(request):
        """Positions with P&L at the current marks, one row per account and symbol.

        ---
        query:
          account: {$ref: Name, description: only this account}
          symbol: {$ref: Name, description: only this symbol}
          method: {enum: [avg, fifo, both], default: both, description: "P&L method: average cost, FIFO, or both"}
        responses:
          200: {description: "`positions` (one row per account and symbol), `count`, `method`", schema: {type: object}}
        """
        method = query_choice(request, "method", METHODS, "both")
        account = query_name(request, "account")
        symbol = query_name(request, "symbol")
        rows = [position_view(keeper, position, method) for position in keeper.book.positions(account, symbol)]
        return JSON({"positions": rows, "count": len(rows), "method": method})

    @app.page("/amendments")
    async def amendments(request):
        """Corrections and busts waiting for their original, and those refused (within the horizon).

        ---
        query:
          account: {$ref: Name, description: only this account}
          symbol: {$ref: Name, description: only this symbol}
        responses:
          200: {description: "`pending` and `refused` amendments in arrival order, and the book's counts", schema: {type: object}}
        """
        account = query_name(request, "account")
        symbol = query_name(request, "symbol")
        book = keeper.executions

        def rows(items: list[Amendment]) -> list[dict]:
            return [
                amendment_row(a) for a in items
                if (account is None or a.message.account == account) and (symbol is None or a.message.symbol == symbol)
            ]

        return JSON({"pending": rows(book.pending()), "refused": rows(book.refused()), "counts": dict(keeper.outcomes)})

    @app.page("/pnl/summary")
    async def pnl_summary(request):
        """P&L by account (totals) and by symbol (summed over accounts).

        ---
        query:
          account: {$ref: Name, description: only this account}
        responses:
          200: {description: "`by_account` in each account's base currency (a total that needs a missing mark or rate is null; `missing_rates` names the currencies) and `by_symbol` in each symbol's currency", schema: {type: object}}
        """
        account = query_name(request, "account")
        accounts = [account] if account else keeper.book.accounts()
        by_account = [keeper.book.account_totals(a) for a in accounts if keeper.book.positions(a)]
        by_symbol: dict[str, list[PositionValue]] = {}
        for position in keeper.book.positions(account):
            by_symbol.setdefault(position.symbol, []).append(value_position(position, keeper.mark_of(position.symbol), keeper.fx))
        symbols = [symbol_totals(symbol, values) for symbol, values in sorted(by_symbol.items())]
        return JSON({"by_account": by_account, "by_symbol": symbols})

    @app.page("/marks")
    async def marks(request):
        """The current mark per symbol, with its source and event time.

        ---
        query:
          symbol: {$ref: Name, description: only this symbol}
        responses:
          200: {description: "`marks`: symbol → mark detail", schema: {type: object}}
        """
        symbol = query_name(request, "symbol")
        symbols = [symbol] if symbol else sorted(keeper.marks.keys())
        return JSON({"marks": {s: keeper.mark_detail(s) for s in symbols}})

    @app.page("/compliance/alerts")
    async def compliance_alerts(request):
        """Stored compliance alerts, newest first.

        ---
        query:
          account: {$ref: Name, description: only this account}
          rule: {$ref: Name, description: "only this rule (e.g. `restricted_symbol`, `max_position`)"}
          severity: {$ref: Name, description: "only this severity (`info`, `warning`, `critical`)"}
          symbol: {$ref: Name, description: only this symbol}
          limit: {type: integer, minimum: 1, maximum: 10000, default: 100}
          offset: {type: integer, minimum: 0, maximum: 10000000, default: 0}
        responses:
          200: {description: "`alerts`, `limit`, `offset`", schema: {type: object}}
          503: ClickHouse is unavailable
        """
        limit = query_int(request, "limit", 100, minimum=1, maximum=10_000)
        offset = query_int(request, "offset", 0, minimum=0, maximum=10_000_000)
        where, params = [], {}
        for name in ("account", "rule", "severity", "symbol"):
            value = query_name(request, name)
            if value is not None:
                where.append(f"{'`limit`' if name == 'limit' else name} = {{{name}:String}}")
                params[name] = value
        sql = (
            f"SELECT alert_id, toUnixTimestamp64Nano(ts) AS ts, rule, severity, account, symbol, message, "
            f"observed, `limit`, fill_id FROM {ALERTS_TABLE} FINAL"
            + (f" WHERE {' AND '.join(where)}" if where else "")
            + f" ORDER BY ts DESC, alert_id LIMIT {limit} OFFSET {offset}"
        )
        rows = await clickhouse.query(sql, parameters=params)
        return JSON({"alerts": rows.dicts(), "limit": limit, "offset": offset})

    @app.page("/stats", public=True)  # counts only, like /metrics
    async def stats(request):
        """Counters: positions, marked symbols, alerts raised, rows written, storage retries, trading day.

        ---
        responses:
          200: {description: the counters, schema: {type: object}}
        """
        return JSON(
            {
                "positions": len(keeper.positions),
                "symbols_marked": len(keeper.marks),
                "alerts_raised": keeper.alerts_raised,
                "fills": dict(keeper.outcomes),
                "dead_lettered": keeper.dead_lettered,
                "rows_written": storage.rows_written,
                "storage_retries": storage.retries,
                "trading_day": keeper.calendar.get("trading_day"),
            }
        )

    @app.health_check("books")
    async def books_health():
        # Resends, conflicts and refusals are the feed's doing, not a fault of ptrc: they
        # are reported here and alerted, and never make the service unhealthy.
        return True, {"fills": dict(keeper.outcomes), "pending_amendments": len(keeper.executions.pending())}

    return app


def position_view(keeper: PositionKeeper, position: Position, method: str = "both") -> dict:
    """One row of `/positions` (and of the page's blotter): `position_row` at the current
    mark and rates, with the day's and the total P&L and the book's counts."""
    mark = keeper.mark_of(position.symbol)
    row = position_row(position, mark, method, keeper.fx)  # type: ignore[arg-type]
    row["total_pnl"] = position.total_pnl(mark)
    row["multiplier"] = position.multiplier
    row["day_pnl"] = position.day_pnl(mark)
    row["fill_count"] = position.fill_count
    row["corrections"] = position.corrections
    row["busts"] = position.busts
    row["revision"] = position.revision
    row["last_fill_ts"] = position.last_ts
    row["mark_source"] = (keeper.mark_detail(position.symbol) or {}).get("source")
    return row


class LivePositions:
    """The blotter a page follows (`/live/positions`, web/live.py): one `/positions` row
    per (account, symbol), sent when a fill, an amendment or the day's roll changes the
    position (the keeper marks its key) and when its mark moves.

    A page starts from the `first_rows` positions filled last (not a whole book of tens of
    thousands: `/positions?account=` lists an account's). Mark moves re-send the positions
    last sent to a page, at most `revalued` of them: the keys are remembered in sending
    order, bounded, and nothing is done while no page is open."""

    def __init__(self, keeper: PositionKeeper, *, first_rows: int = LIVE_FIRST_ROWS, revalued: int = LIVE_REVALUED):
        self.keeper = keeper
        self.first_rows = first_rows
        self.revalued = revalued
        self.sent: OrderedDict[tuple[str, str], None] = OrderedDict()
        self.topic = LiveTopic("positions", lookup=self.lookup, snapshot=self.snapshot)

    def lookup(self, key: tuple[str, str]) -> dict | None:
        position = self.keeper.book.get(*key)
        if position is None:
            self.sent.pop(key, None)
            return None
        self._sent(key)
        return position_view(self.keeper, position)

    def snapshot(self) -> list[dict]:
        latest = heapq.nlargest(self.first_rows, self.keeper.book, key=lambda p: p.last_ts or 0)
        for position in reversed(latest):  # the newest remembered last
            self._sent((position.account, position.symbol))
        return [position_view(self.keeper, position) for position in latest]

    def _sent(self, key: tuple[str, str]) -> None:
        sent = self.sent
        sent[key] = None
        sent.move_to_end(key)
        if len(sent) > self.revalued:
            sent.popitem(last=False)

    def marks_moved(self, symbols: set[str]) -> None:
        if not self.topic.followed:
            return
        for key in [k for k in self.sent if k[1] in symbols]:
            self.topic.mark(key)


class FlowSample:
    """What the page charts over time (`/dashboard/history`): fills per second by outcome,
    alerts per second, pending amendments and positions. Counts only."""

    GROUPS = {
        "fills_per_s": ("fill", "opening"),
        "late_per_s": ("late",),
        "amendments_per_s": ("correction", "bust"),
        "resends_per_s": ("duplicate", "conflict"),
        "refused_per_s": ("refused",),
    }

    def __init__(self, keeper: PositionKeeper):
        self.keeper = keeper
        self.last: tuple[float, dict[str, int]] | None = None

    def counts(self) -> dict[str, int]:
        outcomes = self.keeper.outcomes
        counts = {name: sum(outcomes[o] for o in group) for name, group in self.GROUPS.items()}
        counts["alerts_per_s"] = self.keeper.alerts_raised
        return counts

    def __call__(self) -> Sample:
        now, counts = time.monotonic(), self.counts()
        sample: Sample = {"positions": len(self.keeper.positions), "pending_amendments": len(self.keeper.executions.pending())}
        if self.last is not None and now > self.last[0]:
            elapsed = now - self.last[0]
            sample.update({name: (count - self.last[1][name]) / elapsed for name, count in counts.items()})
        self.last = (now, counts)
        return sample


def symbol_totals(symbol: str, values: list[PositionValue]) -> dict:
    """One symbol's positions summed over accounts (a sum with an unknown term is null)."""
    return {
        "symbol": symbol,
        "currency": values[0].currency,
        "net_qty": sum_known(v.net_qty for v in values),
        "realized_pnl_gross": sum_known(v.realized_pnl_gross for v in values),
        "fees": sum_known(v.fees for v in values),
        "realized_pnl_net": sum_known(v.realized_pnl_net for v in values),
        "unrealized_pnl": sum_known(v.unrealized_pnl for v in values),
        "total_pnl": sum_known(v.total_pnl for v in values),
        "day_pnl": sum_known(v.day_pnl for v in values),
        "mark": values[0].mark,
    }


def amendment_row(amendment: Amendment) -> dict:
    """A CORRECT or BUST as /amendments lists it."""
    fill = amendment.message
    return {
        "fill_id": fill.fill_id,
        "exec_type": fill.exec_type,
        "ref_fill_id": fill.ref_fill_id,
        "account": fill.account,
        "symbol": fill.symbol,
        "ts": fill.ts,
        "seq": amendment.seq,
        "status": amendment.status,
        "reason": amendment.reason,
        "side": fill.side,
        "qty": fill.qty,
        "price": fill.price,
        "fee": fill.fee,
    }


class _BooksCollector:
    """What became of each fills message, as a Prometheus counter read at scrape time."""

    def __init__(self, keeper: PositionKeeper):
        self.keeper = keeper

    def collect(self):
        family = CounterMetricFamily(
            "posttrade_ptrc_fill_messages", "Fills messages by outcome (fill, late, correction, bust, opening, "
            "duplicate, conflict, pending, refused)", labels=["outcome"],
        )
        for outcome, count in sorted(self.keeper.outcomes.items()):
            family.add_metric([outcome], count)
        yield family
        yield GaugeMetricFamily(
            "posttrade_ptrc_pending_amendments", "Corrections and busts waiting for their original",
            value=len(self.keeper.executions.pending()),
        )
        yield CounterMetricFamily(
            "posttrade_ptrc_executions_shed", "Executions folded within the horizon to keep at most "
            "books.max_records records", value=self.keeper.executions.shed,
        )

