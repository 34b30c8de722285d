"""ptrc's positions: fills → the execution history → position updates and alerts.

The book (`ExecutionBook`, pure and exact: `core.history`) keeps every position equal
to a fresh book over its effective history: resends dropped, corrections and busts
applied, late fills placed in time, openings first. Its durable truth is two tables,
rebuilt into the book whenever the agent (re)starts:

- `book`: the book's records, in one atomic table (a crash mid-write leaves it as after
  the last commit, never half of one: `tables.table`): fill_id → `IdRecord`, one per
  execution or amendment within the horizon; (account, symbol) → `HistoryRecord`, the
  base the history folds into (only for keys with executions older than the horizon);
  and "" → `BookMark`, the sequence of the last message the records hold, so that a
  message delivered again after a restart is known for one;
- `positions`: (account, symbol) → `PositionState`, the figures every reader uses. What
  the book derives is derived again at a restart; only the start of day and the
  revision are taken from it.

Per message:

1. hand it to the book (a redelivered message is a resend to it: its id is known) and write what changed to the tables;
2. when the position changed, publish a `PositionUpdate` with the next revision of the
   key (msg id `pos:<revision>:<account>:<symbol>`), and the compliance alerts of a new
   execution; a conflicting resend, a pending amendment and a refusal raise an alert
   of their own (msg id `alert:<alert_id>`); a refused message (by the feed's rules, or
   because its effects would not fit the bounds: `core.bounds`, docs/ptrc.md "Bounds"),
   or a pending one that is refused or expires later, goes to the dead-letter subject
   with the reason. All of it is part of the batch's commit.

Marks come from quotes, market trades and bars (priority in config). They re-value
positions on read and drive the account-level compliance checks on a timer. The
trading day rolls at a configured local time: every position gets a start-of-day
snapshot and a `PositionUpdate` with reason "roll".
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable
from datetime import date, datetime, time as dtime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

import msgspec

from ..app import App, recovering
from ..core.bounds import figure_fits
from ..core.compliance import Alert, ComplianceEvaluator, ComplianceRules, ComplianceState, alert_id
from ..core.fx import FxRates
from ..core.history import (
    DEFAULT_CHECKPOINT_EVERY,
    DEFAULT_HORIZON_NS,
    DEFAULT_MAX_RECORDS,
    Amendment,
    ExecutionBook,
    HistoryRecord,
    IdRecord,
    Result,
)
from ..core.marks import DEFAULT_PRIORITY, MarkSource, MarkState
from ..core.positions import Position, PositionState
from ..core.reference import Reference
from ..streams import subjects
from ..streams.events import Bar, ComplianceAlert, Fill, MarketTrade, PositionUpdate, Quote, encode
from ..streams.stream import EventRecord, Stream
from ..streams.transport import StartPosition
from ..web.live import LiveLog, LiveTopic

log = logging.getLogger(__name__)


def _valued(value: Decimal | None) -> Decimal | None:
    """A valuation at a mark as published: null (unknown) when it does not fit the bound
    of a figure (`core.bounds`). The book keeps its own figures within it; a valuation
    moves with the market, which no fill can be refused for."""
    return value if figure_fits(value) else None


def position_update(position: Position, mark: Decimal | None, reason: str, ts: int, fill: Fill | None = None,
                    result: Result | None = None) -> PositionUpdate:
    """The update of `position` after `fill` (the book's `result` of it), or a roll."""
    execution = result.execution if result is not None else None
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
        sod_unrealized_pnl=_valued(position.sod_unrealized_pnl),
        mark=mark,
        unrealized_pnl=_valued(position.unrealized_pnl(mark)),
        fifo_unrealized_pnl=_valued(position.fifo_unrealized_pnl(mark)),
        day_pnl=_valued(position.day_pnl(mark)),
        fill_count=position.fill_count,
        currency=position.currency,
        foreign_fees=position.foreign_fees,
        sod_foreign_fees=position.sod_foreign_fees,
        revision=position.revision,
        corrections=position.corrections,
        busts=position.busts,
        fill_id=fill.fill_id if fill else None,
        side=fill.side if fill else None,
        qty=fill.qty if fill else None,
        price=fill.price if fill else None,
        fee=fill.fee if fill else None,
        realized_pnl_fill=result.realized if result is not None else None,
        order_id=fill.order_id if fill else None,
        venue=fill.venue if fill else None,
        exec_type=fill.exec_type if fill else None,
        ref_fill_id=fill.ref_fill_id if fill else None,
        execution=execution.fill if execution is not None else None,
        execution_state=None if execution is None else "busted" if execution.busted else "corrected",
        released=[s.amendment.message for s in result.settled if s.applied] if execution is not None else [],
    )


class BookMark(msgspec.Struct, kw_only=True, tag=True):
    """The arrival sequence of the last message the `book` table's records hold."""

    received_through: int


BOOK_MARK = ""  # its key in the `book` table (never a fill_id: those are not empty)


class PositionKeeper:
    """Declares ptrc's channels, tables, agents and timers on `app`, and serves reads."""

    def __init__(
        self,
        app: App,
        *,
        reference: Reference | None = None,
        mark_priority: tuple[MarkSource, ...] = DEFAULT_PRIORITY,
        rules: ComplianceRules | None = None,
        compliance_check_interval_s: float = 1.0,
        day_timezone: str = "UTC",
        day_roll_at: dtime = dtime(0, 0),
        horizon_ns: int = DEFAULT_HORIZON_NS,
        checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
        max_records: int = DEFAULT_MAX_RECORDS,
        live_positions: LiveTopic | None = None,
        live_alerts: LiveLog | None = None,
    ):
        self.app = app
        # What the page follows (web/live.py): a changed position's key is marked, a
        # raised alert appended. Both cost nothing while no page is open.
        self.live_positions = live_positions or LiveTopic("positions", lookup=lambda key: None, snapshot=list)
        self.live_alerts = live_alerts or LiveLog("alerts")
        # Told (once per compliance check) which symbols' marks moved since the last one:
        # the service re-sends the valuations its page shows.
        self.on_marks_moved: Callable[[set[str]], None] | None = None
        self.reference = reference or Reference()
        self.horizon_ns = horizon_ns
        self.checkpoint_every = checkpoint_every
        self.max_records = max_records
        self.mark_priority = mark_priority
        self.rules = rules or ComplianceRules()
        self.fx = FxRates(self.reference, self.mark_reading)
        self.zone = ZoneInfo(day_timezone)
        self.roll_at = day_roll_at
        self.executions = self.new_book()
        self.book = self.executions.positions
        self.evaluator = ComplianceEvaluator(self.rules)
        self.alerts_raised = 0
        self.dead_lettered = 0
        # What became of each fills message: the reason of an applied one (fill, late,
        # correction, bust, opening), else duplicate / conflict / pending / refused.
        self.outcomes: collections.Counter[str] = collections.Counter()
        self._marks_changed: set[str] = set()

        self.fills = subjects.fills(app)
        self.quotes = subjects.quotes(app)
        self.trades = subjects.market_trades(app)
        self.bars = subjects.bars(app)
        self.position_updates = subjects.positions(app)
        self.alerts = subjects.alerts(app)

        self.positions = app.table("positions", value_type=PositionState, key_type=tuple[str, str])
        self.records = app.table(
            "book", value_type=IdRecord | HistoryRecord | BookMark, key_type=str | tuple[str, str], atomic=True
        )
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

    def new_book(self) -> ExecutionBook:
        book = ExecutionBook(
            reference=self.reference, horizon_ns=self.horizon_ns, checkpoint_every=self.checkpoint_every,
            max_records=self.max_records,
        )
        # Rates from the marks table, so that each leg shows its mark's source and time.
        book.positions.fx = self.fx
        return book

    async def _recover(self) -> None:
        """At start-up: the trading day (the book and the compliance memory are rebuilt by
        the position agent, at every start of its own)."""
        if "trading_day" not in self.calendar:
            self.calendar["trading_day"] = self.trading_day().isoformat()
            await self.calendar.flush()

    def _rebuild_book(self) -> None:
        """The book and the compliance memory from the tables, as of their last commit
        (after a crash they were rolled back to it), with the current marks."""
        state = self.compliance.get("state")
        self.evaluator = ComplianceEvaluator(self.rules, msgspec.convert(msgspec.to_builtins(state), ComplianceState) if state else None)
        self.executions = self.new_book()
        ids = {key: record for key, record in self.records.items() if isinstance(record, IdRecord)}
        histories = [record for record in self.records.values() if isinstance(record, HistoryRecord)]
        mark = self.records.get(BOOK_MARK)
        with recovering():
            self.executions.restore(
                histories, ids, self.positions.values(), mark.received_through if isinstance(mark, BookMark) else 0
            )
        self.book = self.executions.positions
        for symbol, state in self.marks.items():
            chosen = state.mark(self.mark_priority)
            if chosen is not None:
                self.book.set_mark(symbol, chosen[0])

    # -- agents --------------------------------------------------------------------------

    async def _track_positions(self, stream: Stream) -> None:
        # Also after a crash, which rolled the tables back.
        self._rebuild_book()
        async for event in stream.events():
            fill: Fill = event.value
            # A redelivered message is a resend to the book (its id is known): the id index,
            # not the position's last sequence, says whether it was applied.
            executions = self.executions
            result = executions.receive(fill, event.seq, event.delivery.data)
            self._store_changes()
            status = result.status
            self.outcomes[result.reason if status == "applied" else status] += 1  # type: ignore[index]
            if status == "applied":
                await self._publish(result, fill)
            elif status == "duplicate":
                continue
            elif status == "conflict":
                await self._feed_alert("conflicting_duplicate", fill, [result.first, fill], (
                    f"{fill.fill_id} arrived again with other contents; the first arrival stands"
                ))
            elif status == "pending":
                await self._feed_alert("pending_amendment", fill, [fill], (
                    f"{fill.exec_type} {fill.fill_id} waits: {result.reason}"
                ))
            else:
                await self._refuse(fill, event, result.reason or "refused")
            for settled in result.settled:
                if not settled.applied:
                    await self._refuse_amendment(settled.amendment, event)
            for amendment in result.expired:
                await self._refuse_amendment(amendment, event)

    def _store_changes(self) -> None:
        """Write what the book changed, and the message it has received through, to the
        `book` table."""
        records = self.records
        for key, record in self.executions.records_changed():
            if record is None:
                records.pop(key, None)
            else:
                records[key] = record
        records[BOOK_MARK] = BookMark(received_through=self.executions.received_through)

    async def _publish(self, result: Result, fill: Fill) -> None:
        position = result.position
        assert position is not None
        position.revision += 1
        key = (position.account, position.symbol)
        self.positions[key] = position.to_state()
        self.live_positions.mark(key)
        mark = self.book.mark(position.symbol)
        update = position_update(position, mark, result.reason or "fill", fill.ts, fill, result)
        await self.app.send(
            subjects.position_subject(*key), update, msg_id=f"pos:{position.revision}:{key[0]}:{key[1]}"
        )
        if fill.exec_type == "NEW":
            alerts = self.evaluator.check_fill(fill, self.book)
            self.compliance["state"] = self.evaluator.state
            for alert in alerts:
                await self._raise(alert)

    async def _refuse(self, fill: Fill, event: EventRecord, reason: str) -> None:
        await self.app.dead_letter(
            event.delivery.data, reason=reason, agent="track_positions", stream=event.stream,
            subject=event.subject, seq=event.seq,
        )
        self.dead_lettered += 1
        await self._feed_alert("refused_execution", fill, [fill], f"{fill.exec_type} {fill.fill_id} refused: {reason}")

    async def _refuse_amendment(self, amendment: Amendment, event: EventRecord) -> None:
        """A pending amendment decided against (or expired) while `event` was handled:
        its own bytes go to the dead-letter subject, under its own sequence."""
        fill = amendment.message
        reason = amendment.reason or "refused"
        await self.app.dead_letter(
            amendment.raw if amendment.raw is not None else encode(fill), reason=reason,
            agent="track_positions", stream=event.stream,
            subject=subjects.fill_subject(fill.account, fill.symbol), seq=amendment.seq,
        )
        self.dead_lettered += 1
        await self._feed_alert("refused_execution", fill, [fill], f"{fill.exec_type} {fill.fill_id} refused: {reason}")

    async def _feed_alert(self, rule: str, fill: Fill, versions: list, message: str) -> None:
        """An alert about the feed itself, keyed by the message that raised it."""
        alert = ComplianceAlert(
            alert_id=alert_id(rule, fill.fill_id, fill.account, fill.symbol),
            rule=rule,
            severity=self.rules.severity_of(rule),
            account=fill.account,
            symbol=fill.symbol,
            message=message,
            observed=None,
            limit=None,
            ts=fill.ts,
            fill_id=fill.fill_id,
            versions=[v for v in versions if v is not None],
        )
        await self._raise(alert)

    async def _raise(self, alert: Alert) -> None:
        payload = alert if isinstance(alert, ComplianceAlert) else ComplianceAlert(**msgspec.structs.asdict(alert))
        await self.app.send(subjects.alert_subject(alert.rule), payload, msg_id=f"alert:{alert.alert_id}")
        self.live_alerts.append(payload)
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
        if self.on_marks_moved is not None:
            self.on_marks_moved(symbols)
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
            position.revision += 1
            key = (position.account, position.symbol)
            self.positions[key] = position.to_state()
            self.live_positions.mark(key)
            try:
                update = position_update(position, mark, "roll", ts)
            except ValueError as exc:  # a state from before the bounds (core.bounds): rolled, not publishable
                log.error("%s/%s is beyond the bounds; its roll is not published (bust what put it there): %s",
                          key[0], key[1], exc)
                continue
            # The rates of this moment go with the roll: its snapshot is the close the
            # past day's reports show, at these rates and not at later ones.
            base = self.reference.base_currency(position.account)
            currencies = (position.currency or self.reference.currency(position.symbol), *position.foreign_fees)
            rates = {c: rate.rate for c in currencies if (rate := self.fx.rate(c, base)) is not None}
            update = msgspec.structs.replace(update, base_currency=base, fx_rates=rates)
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

    def mark_reading(self, symbol: str) -> tuple[Decimal, str, int] | None:
        """(price, source, event time) of `symbol`'s mark: what FX rates are read from."""
        state = self.marks.get(symbol)
        return state.mark(self.mark_priority) if state else None

    def mark_detail(self, symbol: str) -> dict | None:
        state = self.marks.get(symbol)
        chosen = state.mark(self.mark_priority) if state else None
        if chosen is None:
            return None
        price, source, ts = chosen
        return {"price": price, "source": source, "ts": ts}
