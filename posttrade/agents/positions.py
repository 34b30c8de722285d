"""ptrc's positions: fills → the position book → position updates and compliance alerts.

The book (`PositionBook`, pure and exact) is the working copy; the `positions` table
(changelog-backed, keyed (account, symbol), values `PositionState`) is the durable
truth it is rebuilt from whenever the agent (re)starts. Per fill:

1. skip it if the position's key already applied this stream sequence (redelivery);
2. apply it to the book, write the new state to the table;
3. publish a `PositionUpdate` (msg id `pos:<fill_id>`) and any compliance alerts
   (msg id `alert:<alert_id>`) — both part of the batch's commit.

Marks come from quotes, market trades and bars (priority in config). They re-value
positions on read and drive the account-level compliance checks on a timer. The
trading day rolls at a configured local time: every position gets a start-of-day
snapshot and a `PositionUpdate` with reason "roll".
"""

from __future__ import annotations

import logging
import time
from datetime import date, datetime, time as dtime, timedelta
from decimal import Decimal
from typing import Mapping
from zoneinfo import ZoneInfo

import msgspec

from ..app import App
from ..core.compliance import Alert, ComplianceEvaluator, ComplianceRules, ComplianceState
from ..core.exact import EXACT
from ..core.marks import DEFAULT_PRIORITY, MarkSource, MarkState
from ..core.positions import Position, PositionBook, PositionState
from ..streams import subjects
from ..streams.events import Bar, Fill, MarketTrade, PositionUpdate, Quote
from ..streams.stream import Stream
from ..streams.transport import StartPosition

log = logging.getLogger(__name__)


class ComplianceAlert(Alert, frozen=True):
    """An `Alert` as published on `posttrade.alerts.<rule>` (same fields)."""


def position_update(position: Position, mark: Decimal | None, reason: str, ts: int, fill: Fill | None = None,
                    realized: Decimal | None = None) -> PositionUpdate:
    return PositionUpdate(
        ts=ts,
        account=position.account,
        symbol=position.symbol,
        reason=reason,
        multiplier=position.multiplier,
        net_qty=position.net_qty,
        avg_open_price=position.avg_open_price,
        open_cost=position.open_cost,
        realized_pnl_gross=position.realized_pnl_gross,
        fees=position.fees,
        realized_pnl_net=position.realized_pnl_net,
        fifo_open_cost=position.fifo_open_cost,
        fifo_realized_pnl_gross=position.fifo_realized_pnl_gross,
        sod_realized_pnl_net=position.sod_realized_pnl_net,
        sod_unrealized_pnl=position.sod_unrealized_pnl,
        mark=mark,
        unrealized_pnl=position.unrealized_pnl(mark),
        fifo_unrealized_pnl=position.fifo_unrealized_pnl(mark),
        day_pnl=position.day_pnl(mark),
        fill_count=position.fill_count,
        fill_id=fill.fill_id if fill else None,
        side=fill.side if fill else None,
        qty=fill.qty if fill else None,
        price=fill.price if fill else None,
        fee=fill.fee if fill else None,
        realized_pnl_fill=realized,
        order_id=fill.order_id if fill else None,
        venue=fill.venue if fill else None,
    )


class PositionKeeper:
    """Declares ptrc's channels, tables, agents and timers on `app`, and serves reads."""

    def __init__(
        self,
        app: App,
        *,
        multipliers: Mapping[str, Decimal],
        mark_priority: tuple[MarkSource, ...] = DEFAULT_PRIORITY,
        rules: ComplianceRules | None = None,
        compliance_check_interval_s: float = 1.0,
        day_timezone: str = "UTC",
        day_roll_at: dtime = dtime(0, 0),
    ):
        self.app = app
        self.multipliers = dict(multipliers)
        self.mark_priority = mark_priority
        self.rules = rules or ComplianceRules()
        self.zone = ZoneInfo(day_timezone)
        self.roll_at = day_roll_at
        self.book = PositionBook(self.multipliers)
        self.evaluator = ComplianceEvaluator(self.rules)
        self.alerts_raised = 0
        self._marks_changed: set[str] = set()

        self.fills = subjects.fills(app)
        self.quotes = subjects.quotes(app)
        self.trades = subjects.market_trades(app)
        self.bars = subjects.bars(app)
        self.position_updates = subjects.output(app, "positions", "POSITIONS", "posttrade.positions.>", PositionUpdate)
        self.alerts = subjects.output(app, "alerts", "ALERTS", "posttrade.alerts.>", ComplianceAlert)

        self.positions = app.table("positions", value_type=PositionState, key_type=tuple[str, str])
        self.marks = app.table("marks", value_type=MarkState, default=MarkState)
        # One key ("state"): the wash-trade memory and which limits are in breach.
        self.compliance = app.table("compliance", value_type=ComplianceState)
        # One key ("trading_day"): the ISO date the book was last rolled to.
        self.calendar = app.table("calendar", value_type=str)

        app.agent(self.fills, name="track_positions")(self._track_positions)
        # A new marks consumer needs only the latest price per symbol, not days of ticks.
        latest = StartPosition(last_per_subject=True)
        app.agent(self.quotes, name="marks_from_quotes", start=latest)(self._marks_from_quotes)
        app.agent(self.trades, name="marks_from_trades", start=latest)(self._marks_from_trades)
        app.agent(self.bars, name="marks_from_bars", start=latest)(self._marks_from_bars)
        app.timer(compliance_check_interval_s, name="check_limits_at_marks")(self._check_limits_at_marks)
        app.timer(5.0, name="roll_trading_day")(self._roll_if_new_day)
        app.on_startup.append(self._recover)

    # -- recovery ------------------------------------------------------------------------

    async def _recover(self) -> None:
        """Rebuild the in-memory book, marks and compliance memory from the tables."""
        self.book = PositionBook(self.multipliers)
        for state in self.positions.values():
            self.book.restore(Position.from_state(state))
        for symbol, state in self.marks.items():
            chosen = state.mark(self.mark_priority)
            if chosen is not None:
                self.book.set_mark(symbol, chosen[0])
        state = self.compliance.get("state")
        self.evaluator = ComplianceEvaluator(self.rules, msgspec.convert(msgspec.to_builtins(state), ComplianceState) if state else None)
        if "trading_day" not in self.calendar:
            self.calendar["trading_day"] = self.trading_day().isoformat()
            await self.calendar.flush()

    # -- agents --------------------------------------------------------------------------

    async def _track_positions(self, stream: Stream) -> None:
        # A restart after a crash rolled the tables back: rebuild the book from them.
        await self._recover()
        book, positions, app = self.book, self.positions, self.app
        async for event in stream.events():
            fill: Fill = event.value
            key = (fill.account, fill.symbol)
            if positions.already_applied(key):
                continue  # redelivered: this fill is in the position already
            before = book.get(*key)
            realized_before = before.realized_pnl_gross if before is not None else Decimal(0)
            position = book.apply(fill)
            positions[key] = position.to_state()
            mark = book.mark(fill.symbol)
            realized = EXACT.subtract(position.realized_pnl_gross, realized_before)  # never rounds
            update = position_update(position, mark, "fill", fill.ts, fill, realized)
            await app.send(subjects.position_subject(*key), update, msg_id=f"pos:{fill.fill_id}")
            alerts = self.evaluator.check_fill(fill, book)
            self.compliance["state"] = self.evaluator.state
            for alert in alerts:
                await self._raise(alert)

    async def _raise(self, alert: Alert) -> None:
        payload = ComplianceAlert(**msgspec.structs.asdict(alert))
        await self.app.send(subjects.alert_subject(alert.rule), payload, msg_id=f"alert:{alert.alert_id}")
        self.alerts_raised += 1
        log.warning("compliance alert %s: %s", alert.rule, alert.message)

    def _set_mark(self, symbol: str, update) -> None:
        before = self.marks.get(symbol)
        state = self.marks.apply(symbol, update)
        if state is before:
            return
        chosen = state.mark(self.mark_priority)
        if chosen is not None and self.book.mark(symbol) != chosen[0]:
            self.book.set_mark(symbol, chosen[0])
            self._marks_changed.add(symbol)

    async def _marks_from_quotes(self, stream: Stream) -> None:
        async for quote in stream:
            quote: Quote
            self._set_mark(quote.symbol, lambda m: m.with_quote(quote.mid, quote.ts))

    async def _marks_from_trades(self, stream: Stream) -> None:
        async for trade in stream:
            trade: MarketTrade
            self._set_mark(trade.symbol, lambda m: m.with_trade(trade.price, trade.ts))

    async def _marks_from_bars(self, stream: Stream) -> None:
        async for bar in stream:
            bar: Bar
            self._set_mark(bar.symbol, lambda m: m.with_bar_close(bar.close, bar.ts))

    # -- timers -------------------------------------------------------------------------

    async def _check_limits_at_marks(self) -> None:
        """Account limits (gross notional, daily loss) can be breached by prices alone."""
        if not self._marks_changed:
            return
        symbols, self._marks_changed = self._marks_changed, set()
        alerts = self.evaluator.check_marks(self.book, time.time_ns(), symbols)
        if alerts:
            self.compliance["state"] = self.evaluator.state
            await self.app.flush_tables()
            for alert in alerts:
                await self._raise(alert)

    def trading_day(self, now: datetime | None = None) -> date:
        """The trading day `now` belongs to: it starts at `roll_at` local time."""
        local = (now or datetime.now(self.zone)).astimezone(self.zone)
        day = local.date()
        return day if local.time() >= self.roll_at else day - timedelta(days=1)

    async def _roll_if_new_day(self) -> None:
        today = self.trading_day()
        if self.calendar.get("trading_day") == today.isoformat():
            return
        await self.roll_day(today)

    async def roll_day(self, day: date) -> int:
        """Snapshot every position for the start of `day`; returns how many rolled."""
        ts = time.time_ns()
        rolled = 0
        for position in list(self.book):
            mark = self.book.mark(position.symbol)
            position.roll_day(mark)
            key = (position.account, position.symbol)
            self.positions[key] = position.to_state()
            update = position_update(position, mark, "roll", ts)
            await self.app.send(
                subjects.position_subject(*key), update, msg_id=f"roll:{day.isoformat()}:{key[0]}:{key[1]}"
            )
            rolled += 1
        self.calendar["trading_day"] = day.isoformat()
        await self.app.flush_tables()
        log.info("rolled %d positions to trading day %s", rolled, day)
        return rolled

    # -- reads --------------------------------------------------------------------------

    def mark_of(self, symbol: str) -> Decimal | None:
        return self.book.mark(symbol)

    def mark_detail(self, symbol: str) -> dict | None:
        state = self.marks.get(symbol)
        chosen = state.mark(self.mark_priority) if state else None
        if chosen is None:
            return None
        price, source, ts = chosen
        return {"price": price, "source": source, "ts": ts}
