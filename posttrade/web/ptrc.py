"""ptrc's pages: positions, amendments, P&L summary, marks, stored alerts, counters, and
what the live page follows (docs/ptrc.md, "The page")."""

from __future__ import annotations

import heapq
import time
from collections import OrderedDict

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..agents.positions import PositionKeeper
from ..app import App
from ..core.history import Amendment
from ..core.positions import Position, position_row
from ..core.valuation import PositionValue, sum_known, value_position
from ..stores.clickhouse import ClickHouseStore
from ..stores.clickhouse.alerts import ALERT_FILTERS, AlertSink, stored_alerts
from .live import History, LiveLog, LiveTopic, Sample
from .params import query_choice, query_int, query_name
from .server import JSON

METHODS = ("avg", "fifo", "both")

# What the page follows live, and the bounds of what is kept for it.
LIVE_FIRST_ROWS = 500  # a page starts from the positions filled last, at most this many
LIVE_REVALUED = 500  # re-sent when their mark moves: the positions last sent to a page
ALERTS_KEPT = 500  # the last alerts raised, which a page gets when it opens


def install_pages(
    app: App, keeper: PositionKeeper, *, clickhouse: ClickHouseStore, alert_sink: AlertSink, live_alerts: LiveLog
) -> None:
    """ptrc's pages and the page's live feeds on `app`."""
    app.metrics.registry.register(_BooksCollector(keeper))
    blotter = LivePositions(keeper)
    keeper.live_positions = blotter.topic
    keeper.on_marks_moved = blotter.marks_moved
    blotter.topic.serve(app, "/live/positions")
    live_alerts.serve(app, "/live/alerts")
    History(FlowSample(keeper)).serve(app, "/dashboard/history", public=True)  # counts only, like /stats

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
        filters = {name: value for name in ALERT_FILTERS if (value := query_name(request, name)) is not None}
        rows = await stored_alerts(clickhouse, filters, limit=limit, offset=offset)
        return JSON({"alerts": rows, "limit": limit, "offset": offset})

    @app.page("/stats", public=True)  # counts only, like /metrics
    async def stats(request):
        """Counters: positions, marked symbols, fills by outcome, alerts raised and stored, trading day.

        Rows written to QuestDB are questdb_writer's (its `/stats`: `ptrc_trades`, `position_snapshots`).

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
                "alerts_stored": alert_sink.stats.rows,
                "alert_store_retries": alert_sink.stats.retries,
                "trading_day": keeper.calendar.get("trading_day"),
            }
        )



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

