"""`ExecutionTracker`: the join of orders, fills, quotes and market trades by event time,
its corrections and busts, what it hands to the ClickHouse sink and persists after,
and what it forgets (retention, the bounds). Synchronous and without I/O but its tables
and the history replay at start; see the package docstring for the rules.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import msgspec

from ...core import execution as tca
from ...core.exact import EXACT, ZERO
from ...core.reference import Reference
from ...streams.events import Fill, MarketTrade, Order, Quote
from ...streams.transport import StartPosition
from ...tables.table import Table, outside_batch
from .series import EventTimeSeries, Waits
from .state import (
    AMENDS_BUSTED,
    AMENDS_FORGOTTEN,
    AMENDS_OPENING,
    APPLIED,
    FILL_ALL,
    FILL_ARRIVAL,
    FILL_KINDS,
    FILL_MARKOUTS,
    FILL_MID,
    MARKOUT_BITS,
    MARKOUT_HORIZONS,
    MISMATCH,
    NS,
    OPENING,
    ORDER_ALL,
    ORDER_ARRIVAL_MID,
    ORDER_ARRIVAL_TAPE,
    ORDER_END_MID,
    ORDER_END_TAPE,
    AppliedAmendment,
    BookEntry,
    FillState,
    OrderState,
    Progress,
    SeenFill,
    Tape,
    TapeEntry,
    WaitingAmendment,
    charge,
    covers,
    fill_progress,
    merge_order,
    minute_of,
    order_progress,
)

if TYPE_CHECKING:
    from ...app import App
    from ...streams.channel import Channel

log = logging.getLogger(__name__)

_replace = msgspec.structs.replace


@dataclass
class TrackerSettings:
    history_ns: int = 600 * NS
    quiet_grace_ns: int = 5 * NS
    retention_ns: int = 3600 * NS
    open_order_ttl_ns: int = 86_400 * NS
    # Finished state held beyond which the oldest is forgotten before `retention_ns` is
    # up (0: no bound): what is held after retention_ns grows with the rate, and these
    # bound it whatever the rate (see `ExecutionTracker.prune`).
    max_fills: int = 50_000
    max_orders: int = 25_000


@dataclass
class TrackerStats:
    fills: int = 0  # executions (NEW) joined
    corrections: int = 0  # CORRECTs applied
    busts: int = 0  # BUSTs applied
    orders: int = 0
    quotes: int = 0
    market_trades: int = 0
    # Fill messages that changed nothing, by (FILL_KINDS value, reason): "duplicate" (a
    # fill_id that came before, in another message), "redelivered" (the same message
    # again: a crash, a replay), or an outcome other than APPLIED.
    skipped_fills: Counter[tuple[str, str]] = field(default_factory=Counter)
    duplicate_quotes: int = 0
    duplicate_trades: int = 0
    late_quotes: int = 0
    late_trades: int = 0
    unavailable_mids: int = 0  # values decided as unknown: no quote at or before the time
    pruned_fills: int = 0  # forgotten, for either reason
    pruned_orders: int = 0
    pruned_fills_capacity: int = 0  # ...of which before their retention was up (max_fills / max_orders)
    pruned_orders_capacity: int = 0
    # ...of which placeholders whose NEW never came, with their fills (no arrival values):
    # the bounds' second tier, see `ExecutionTracker._over_capacity`.
    pruned_unjoined_orders: int = 0
    pruned_unjoined_fills: int = 0
    rows_rejected: int = 0


@dataclass
class ExecutionTables:
    fills: Table
    orders: Table
    quote_book: Table
    tape: Table
    amendments: Table  # WaitingAmendment by the amendment's fill_id


def declare_tables(app: App) -> ExecutionTables:
    # Declared after fills: tables are flushed in this order, so a crash between the two
    # flushes leaves an applied amendment still waiting (applied again, a no-op), never
    # an amendment gone from both.
    return ExecutionTables(
        fills=app.table("fills", value_type=FillState, key_type=str),
        orders=app.table("orders", value_type=OrderState, key_type=str),
        quote_book=app.table("quote_book", value_type=BookEntry, key_type=str),
        tape=app.table("tape", value_type=TapeEntry, key_type=str),
        amendments=app.table("amendments", value_type=WaitingAmendment, key_type=str),
    )


@dataclass
class PendingWrite:
    """The fills and orders one ClickHouse write takes, as they were when it took them:
    the rows are built from these states, and these states are what gets persisted."""

    fills: dict[str, FillState] = field(default_factory=dict)
    orders: dict[str, OrderState] = field(default_factory=dict)
    seen: dict[str, SeenFill] = field(default_factory=dict)  # ledger rows
    # Waiting amendments to persist (None: no longer waiting). They have no rows, but
    # go with the write so that one leaves the table only once it is applied in one.
    waiting: dict[str, WaitingAmendment | None] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.fills or self.orders or self.seen or self.waiting)


class ExecutionTracker:
    """The join of orders, fills, quotes and market trades (see the package docstring).

    Synchronous: agents call `on_*` for each event and `resolve_due()` after a batch.
    Changed fill and order ids collect in `changed_fills` / `changed_orders` until the
    sink takes them (`take_changes`), writes their rows and persists them (`persist`).
    """

    def __init__(
        self, tables: ExecutionTables, settings: TrackerSettings | None = None, reference: Reference | None = None
    ):
        self.tables = tables
        self.settings = settings or TrackerSettings()
        # The currency of each symbol (rows carry it; fees in another one are kept apart).
        self.reference = reference or Reference()
        # The working state: what the tables hold plus changes not persisted yet.
        self.fills: dict[str, FillState] = {}
        self.orders: dict[str, OrderState] = {}
        self.book: dict[str, BookEntry] = {}
        self.tape: dict[str, TapeEntry] = {}
        self.quotes = EventTimeSeries(base=None)
        self.trades = EventTimeSeries(base=(ZERO, ZERO))
        self.quote_waits = Waits()
        self.trade_waits = Waits()
        self.changed_fills: set[str] = set()  # rows to write, then states to persist
        self.changed_orders: set[str] = set()
        self.changed_book: set[str] = set()  # book / tape entries to persist (they have no rows)
        self.changed_tape: set[str] = set()
        self.writing_fills: set[str] = set()  # taken by a write that has not finished
        self.writing_orders: set[str] = set()
        # After a restart ClickHouse may hold rows further along than the state the
        # tables kept (see `hold`): ids to compare before their first write, and ids
        # whose rows wait until their state has caught up with ClickHouse's.
        self.replayed_up_to: dict[str, int] = {}  # stream kind -> last seq at start
        self.unverified_fills: set[str] = set()
        self.unverified_orders: set[str] = set()
        self.held_fills: dict[str, Progress] = {}
        self.held_orders: dict[str, Progress] = {}
        # Which fill_ids came before (first arrival wins, however late a resend is):
        # the executions held (`fills`), the amendments applied to them (`aliases`:
        # amendment id -> execution id), the amendments waiting for their execution,
        # and the ledger in ClickHouse for everything else. `recent` holds this
        # process's decisions until the fills batch that made them is written (the
        # ledger answers after that), `recorded` the ledger's answers for the batch.
        self.aliases: dict[str, str] = {}
        self.waiting: dict[str, WaitingAmendment] = {}
        self.waiting_on: dict[str, list[str]] = {}  # referenced fill_id -> waiting amendment ids
        self.recent: dict[str, SeenFill] = {}
        self.recorded: dict[str, SeenFill] = {}
        self.changed_seen: dict[str, SeenFill] = {}  # ledger rows to write
        self.changed_waiting: set[str] = set()  # waiting amendments to persist
        self.stats = TrackerStats()
        self.event_time = -1  # newest event time of any stream (retention clock)
        self._advanced_quotes: set[str] = set()
        self._advanced_trades: set[str] = set()

    def load(self) -> None:
        """Start from what the (opened) tables hold. Their rows may be further along in
        ClickHouse (a crash after a write, before the commit): each is compared before
        its first write here. A waiting amendment whose execution is held (a crash
        between the two tables' flushes) is applied now, or dropped if it already was."""
        self.fills = dict(self.tables.fills.items())
        self.orders = dict(self.tables.orders.items())
        self.book = dict(self.tables.quote_book.items())
        self.tape = dict(self.tables.tape.items())
        self.unverified_fills = set(self.fills)
        self.unverified_orders = set(self.orders)
        self.aliases = {a.fill_id: key for key, state in self.fills.items() for a in state.amendments}
        self.waiting, self.waiting_on = {}, {}
        for key, waiting in sorted(self.tables.amendments.items(), key=lambda item: item[1].seq):
            if key in self.aliases:
                self.changed_waiting.add(key)
                continue
            self.waiting[key] = waiting
            self.waiting_on.setdefault(waiting.fill.ref_fill_id, []).append(key)
        for ref in [ref for ref in self.waiting_on if ref in self.fills or ref in self.aliases]:
            self._release_waiting(ref, replayed=False)

    # -- market data ------------------------------------------------------------------

    def on_quote(self, quote: Quote, seq: int) -> None:
        symbol = quote.symbol
        entry = self.book.get(symbol)
        if entry is not None and seq <= entry.seq:
            self.stats.duplicate_quotes += 1
            return
        verdict = self.quotes.check(symbol, quote.ts, seq)
        if verdict == "late":
            self.quotes.skip(symbol, seq)
            self.stats.late_quotes += 1
            return
        if verdict == "new":
            self.quotes.append(symbol, quote.ts, tca.mid_price(quote.bid, quote.ask), seq)
        # 'duplicate' here: the series has the point but the book entry does not (the
        # entry was never persisted before a crash); the entry must still be written.
        self.stats.quotes += 1
        self.book[symbol] = BookEntry(
            ts=quote.ts,
            seq=seq,
            bid=quote.bid,
            ask=quote.ask,
            history_from_seq=entry.history_from_seq if entry is not None else seq,
        )
        self.changed_book.add(symbol)
        self._advanced_quotes.add(symbol)
        self._see(quote.ts)

    def on_trade(self, trade: MarketTrade, seq: int) -> None:
        symbol = trade.symbol
        entry = self.tape.get(symbol)
        if entry is not None and seq <= entry.seq:
            self.stats.duplicate_trades += 1
            return
        verdict = self.trades.check(symbol, trade.ts, seq)
        if verdict == "late":
            self.trades.skip(symbol, seq)
            self.stats.late_trades += 1
            return
        before = (entry.notional, entry.volume) if entry is not None else (ZERO, ZERO)
        after = (EXACT.add(before[0], EXACT.multiply(trade.price, trade.size)), EXACT.add(before[1], trade.size))
        if verdict == "new":
            self.trades.append(symbol, trade.ts, after, seq)
        self.stats.market_trades += 1
        self.tape[symbol] = TapeEntry(
            ts=trade.ts,
            seq=seq,
            notional=after[0],
            volume=after[1],
            history_from_seq=entry.history_from_seq if entry is not None else seq,
            history_base_notional=entry.history_base_notional if entry is not None else ZERO,
            history_base_volume=entry.history_base_volume if entry is not None else ZERO,
            history_complete=entry.history_complete if entry is not None else True,
        )
        self.changed_tape.add(symbol)
        self._advanced_trades.add(symbol)
        self._see(trade.ts)

    # -- orders and fills -------------------------------------------------------------

    def on_order(self, order: Order, replayed: bool = False) -> None:
        """`replayed`: the event was in the stream before this process started (it may
        be a redelivery whose rows a previous process wrote)."""
        self._see(order.ts)
        if replayed:
            self.unverified_orders.add(order.order_id)
        state = self.orders.get(order.order_id)
        merged = merge_order(state, order)
        if merged is state:
            return
        self.stats.orders += 1
        self.orders[order.order_id] = merged
        self.changed_orders.add(order.order_id)
        self._refresh_order(order.order_id)

    def on_fill(self, fill: Fill, seq: int, replayed: bool = False) -> None:
        """Fold one message of the FILLS stream in (`seq`: its stream sequence). The
        fill_ids it names that memory does not know must be in `recorded` (the ledger's
        answer, see `unknown_ids`)."""
        self._see(fill.ts)
        kind = FILL_KINDS[fill.exec_type]
        arrival = self._arrival(fill.fill_id, seq)
        if arrival != "new":
            self.stats.skipped_fills[kind, arrival] += 1
            self._repair(fill.fill_id, replayed)
            return
        if fill.exec_type == "NEW":
            self._join(fill, seq, replayed)
        elif fill.exec_type == "OPENING":
            self.stats.skipped_fills[kind, OPENING] += 1
            self._record(fill, seq, fill.fill_id, OPENING)
        else:
            self._amend(fill, seq, replayed)
            return  # it released what waited for it
        self._release_waiting(fill.fill_id, replayed)

    def unknown_ids(self, fills: Iterable[Fill]) -> set[str]:
        """The fill_ids these messages name (their own, the ones they amend) that memory
        cannot place: the ledger must say whether they came before."""
        unknown = set()
        for fill in fills:
            for fill_id in (fill.fill_id, fill.ref_fill_id):
                if fill_id is not None and self._first_seq(fill_id) is None:
                    unknown.add(fill_id)
        return unknown

    def end_fills_batch(self) -> None:
        """The fills batch is written (ledger rows included): the ledger answers for
        this process's decisions from now on."""
        self.recent.clear()
        self.recorded.clear()

    def _first_seq(self, fill_id: str) -> int | None:
        """The stream sequence of the fill_id's first arrival, if memory knows it."""
        state = self.fills.get(fill_id)
        if state is not None:
            return state.seq
        original = self.aliases.get(fill_id)
        if original is not None:
            return self.fills[original].amendment(fill_id).seq
        waiting = self.waiting.get(fill_id)
        if waiting is not None:
            return waiting.seq
        seen = self.recent.get(fill_id)
        return seen.seq if seen is not None else None

    def _arrival(self, fill_id: str, seq: int) -> str:
        """'new', 'redelivered' (this very message came before) or 'duplicate' (the
        fill_id came before in another message: the first arrival wins)."""
        first = self._first_seq(fill_id)
        if first is None:
            seen = self.recorded.get(fill_id)
            # The ledger having this very message means its state was lost in a crash
            # before the commit, or a new service replays the stream: either way it is
            # handled again as the first arrival it is.
            return "new" if seen is None or seen.seq == seq else "duplicate"
        return "redelivered" if first == seq else "duplicate"

    def _record(self, fill: Fill, seq: int, original_fill_id: str, outcome: str) -> None:
        seen = SeenFill(seq=seq, exec_type=fill.exec_type, original_fill_id=original_fill_id, outcome=outcome)
        self.recent[fill.fill_id] = seen
        self.changed_seen[fill.fill_id] = seen

    def _join(self, fill: Fill, seq: int, replayed: bool) -> None:
        """A new execution."""
        if replayed:
            self.unverified_fills.add(fill.fill_id)
            if fill.order_id is not None:
                self.unverified_orders.add(fill.order_id)
        self.stats.fills += 1
        self.fills[fill.fill_id] = FillState(
            fill=fill, resolved=0 if fill.order_id is not None else FILL_ARRIVAL, seq=seq
        )
        self.changed_fills.add(fill.fill_id)
        self._record(fill, seq, fill.fill_id, APPLIED)
        if fill.order_id is not None:
            self._attach(fill)
        self._refresh_fill(fill.fill_id)

    def _repair(self, fill_id: str, replayed: bool) -> None:
        """A message that came before came again: a no-op, unless a crash cut the
        changelog between the fills and the orders table, and the order lacks it."""
        state = self.fills.get(fill_id)
        if state is not None:
            if replayed:
                self.unverified_fills.add(fill_id)
            order_id = state.fill.order_id
            if order_id is not None and not state.busted:
                if replayed:
                    self.unverified_orders.add(order_id)
                self._attach(state.fill)  # joins its order once
            return
        original = self.aliases.get(fill_id)
        if original is not None:
            state = self.fills[original]
            before = state.amendment(fill_id).order_id
            for order_id in dict.fromkeys((before, state.fill.order_id)):
                if order_id is not None:
                    if replayed:
                        self.unverified_orders.add(order_id)
                    self._resync_order(order_id, fill_id, original, state.fill.ts)

    # -- corrections and busts ----------------------------------------------------------

    def _locate(self, ref: str, seq: int) -> tuple[str, str | None]:
        """Where the execution an amendment (of stream sequence `seq`) names is:
        ("held", id), ("wait", None) (not arrived yet), ("opening", id) or
        ("forgotten", id) (it left the state)."""
        if ref in self.fills:
            return "held", ref
        original = self.aliases.get(ref)
        if original is not None:
            return "held", original
        if ref in self.waiting:
            return "wait", None
        seen = self.recent.get(ref)
        if seen is None:
            seen = self.recorded.get(ref)
            # A ledger entry from further on in the stream: this is a redelivery after a
            # crash, and that message will come again after this one.
            if seen is None or seen.seq > seq:
                return "wait", None
        if seen.outcome in (OPENING, AMENDS_OPENING):
            return "opening", seen.original_fill_id
        if seen.original_fill_id in self.fills:
            return "held", seen.original_fill_id
        return "forgotten", seen.original_fill_id

    def _amend(self, amendment: Fill, seq: int, replayed: bool) -> None:
        where, original = self._locate(amendment.ref_fill_id, seq)
        if where == "wait":
            self.waiting[amendment.fill_id] = WaitingAmendment(fill=amendment, seq=seq)
            self.waiting_on.setdefault(amendment.ref_fill_id, []).append(amendment.fill_id)
            self.changed_waiting.add(amendment.fill_id)
            return
        self._settle(amendment, seq, where, original, replayed)

    def _settle(self, amendment: Fill, seq: int, where: str, original: str, replayed: bool) -> None:
        """Apply an amendment whose execution is located, or count why it changes nothing."""
        outcome = APPLIED
        if where == "opening":
            outcome = AMENDS_OPENING
        elif where == "forgotten":
            outcome = AMENDS_FORGOTTEN
        else:
            state = self.fills[original]
            if state.busted:
                outcome = AMENDS_BUSTED
            elif amendment.account != state.fill.account or amendment.symbol != state.fill.symbol:
                outcome = MISMATCH
            else:
                self._apply(state, amendment, seq, replayed)
        kind = FILL_KINDS[amendment.exec_type]
        if outcome == APPLIED:
            if amendment.exec_type == "BUST":
                self.stats.busts += 1
            else:
                self.stats.corrections += 1
        else:
            self.stats.skipped_fills[kind, outcome] += 1
            log.warning("%s %s of %s (execution %s) changes nothing: %s",
                        kind, amendment.fill_id, amendment.ref_fill_id, original, outcome)
        self._record(amendment, seq, original, outcome)
        if self.waiting.pop(amendment.fill_id, None) is not None:
            self.changed_waiting.add(amendment.fill_id)
        self._release_waiting(amendment.fill_id, replayed)

    def _release_waiting(self, fill_id: str, replayed: bool) -> None:
        """`fill_id` has just been decided: settle the amendments that waited for it, in
        stream order (a later correction overrides an earlier one)."""
        waiting_ids = self.waiting_on.pop(fill_id, None)
        if not waiting_ids:
            return
        for amendment_id in sorted(waiting_ids, key=lambda i: self.waiting[i].seq):
            waiting = self.waiting[amendment_id]
            where, original = self._locate(fill_id, waiting.seq)
            self._settle(waiting.fill, waiting.seq, where, original, replayed)

    def _apply(self, state: FillState, amendment: Fill, seq: int, replayed: bool) -> None:
        """A CORRECT replaces the execution's economics (order, venue and liquidity too
        when it gives them), a BUST removes it; its place in time stays. The orders it
        left and joined are recomputed from their executions."""
        fill = state.fill
        key = fill.fill_id
        changes: dict[str, Any] = {
            "amendments": state.amendments
            + (AppliedAmendment(fill_id=amendment.fill_id, seq=seq, exec_type=amendment.exec_type,
                                order_id=fill.order_id),)
        }
        if amendment.exec_type == "BUST":
            changes["busted"] = True
            order_after = None
        else:
            corrected = fill.corrected_by(amendment)
            changes["fill"] = corrected
            order_after = corrected.order_id
            if order_after != fill.order_id:
                # Its arrival is now the new order's (none without an order).
                resolved = state.resolved & ~FILL_ARRIVAL
                changes.update(
                    resolved=resolved if order_after is not None else resolved | FILL_ARRIVAL,
                    arrival_ts=None,
                    arrival_mid=None,
                )
        self.fills[key] = _replace(state, **changes)
        self.aliases[amendment.fill_id] = key
        self.changed_fills.add(key)
        if replayed:
            self.unverified_fills.add(key)
        for order_id in dict.fromkeys((fill.order_id, order_after)):
            if order_id is not None:
                if replayed:
                    self.unverified_orders.add(order_id)
                self._resync_order(order_id, amendment.fill_id, key, amendment.ts)
        self._refresh_fill(key)

    def _resync_order(self, order_id: str, amendment_id: str, fill_id: str, ts: int) -> None:
        """Recompute an order's fill aggregates from its executions after an amendment
        of `fill_id` (once per amendment). Every execution of a held order is held too
        (retention keeps them while their order is), so the sums are exact."""
        state = self.orders.get(order_id)
        if state is not None and amendment_id in state.amendment_ids:
            return
        if state is None:
            fill = self.fills[fill_id].fill
            if fill.order_id != order_id or self.fills[fill_id].busted:
                return  # the order left the state: nothing of it to recompute
            state = OrderState(order_id=order_id, account=fill.account, symbol=fill.symbol, last_event_ts=ts)
        members = []
        qty = notional = fees = ZERO
        fees_other: tuple[tuple[str, Decimal], ...] = ()
        currency = self.reference.currency(state.symbol)
        times = []
        for member in dict.fromkeys(state.fill_ids + (fill_id,)):
            held = self.fills.get(member)
            if held is None or held.busted or held.fill.order_id != order_id:
                continue
            fill = held.fill
            members.append(member)
            qty = EXACT.add(qty, fill.qty)
            notional = EXACT.add(notional, EXACT.multiply(fill.qty, fill.price))
            fees, fees_other = charge(fees, fees_other, fill, currency)
            times.append(fill.ts)
        self.orders[order_id] = _replace(
            state,
            fill_ids=tuple(members),
            filled_qty=qty,
            filled_notional=notional,
            fees=fees,
            fees_other=fees_other,
            first_fill_ts=min(times) if times else None,
            last_fill_ts=max(times) if times else None,
            amendment_ids=state.amendment_ids + (amendment_id,),
            last_event_ts=max(state.last_event_ts, ts),
        )
        self.changed_orders.add(order_id)

    def _attach(self, fill: Fill) -> None:
        """Add the fill to its order's aggregates, once."""
        order_id = fill.order_id
        state = self.orders.get(order_id)
        if state is None:
            state = OrderState(order_id=order_id, account=fill.account, symbol=fill.symbol, last_event_ts=fill.ts)
        if fill.fill_id in state.fill_ids:
            return
        fees, fees_other = charge(state.fees, state.fees_other, fill, self.reference.currency(state.symbol))
        state = _replace(
            state,
            fill_ids=state.fill_ids + (fill.fill_id,),
            filled_qty=EXACT.add(state.filled_qty, fill.qty),
            filled_notional=EXACT.add(state.filled_notional, EXACT.multiply(fill.qty, fill.price)),
            fees=fees,
            fees_other=fees_other,
            first_fill_ts=fill.ts if state.first_fill_ts is None else min(state.first_fill_ts, fill.ts),
            last_fill_ts=fill.ts if state.last_fill_ts is None else max(state.last_fill_ts, fill.ts),
            last_event_ts=max(state.last_event_ts, fill.ts),
        )
        self.orders[order_id] = state
        self.changed_orders.add(order_id)

    # -- deciding values ----------------------------------------------------------------

    def _mid_at(self, symbol: str, t: int) -> Decimal | None:
        value = self.quotes.value_at(symbol, t)
        if value is None:
            self.stats.unavailable_mids += 1
        return value

    def _refresh_fill(self, fill_id: str) -> None:
        state = self.fills.get(fill_id)
        if state is None or state.complete or state.busted:
            return
        fill = state.fill
        symbol = fill.symbol
        grace = self.settings.quiet_grace_ns
        resolved = state.resolved
        changes: dict[str, Any] = {}
        earliest_wait: int | None = None
        if not resolved & FILL_MID:
            if self.quotes.decided(symbol, fill.ts, grace):
                changes["mid_at_fill"] = self._mid_at(symbol, fill.ts)
                resolved |= FILL_MID
            else:
                earliest_wait = fill.ts
        mids = list(state.markout_mids)
        for i, (_, horizon) in enumerate(MARKOUT_HORIZONS):
            bit = FILL_MARKOUTS[i]
            if resolved & bit:
                continue
            t = fill.ts + horizon
            if self.quotes.decided(symbol, t, grace):
                mids[i] = self._mid_at(symbol, t)
                resolved |= bit
            elif earliest_wait is None or t < earliest_wait:
                earliest_wait = t
        if resolved & MARKOUT_BITS != state.resolved & MARKOUT_BITS:
            changes["markout_mids"] = tuple(mids)
        if not resolved & FILL_ARRIVAL:
            order = self.orders.get(fill.order_id)
            if order is not None and order.resolved & ORDER_ARRIVAL_MID:
                changes["arrival_ts"] = order.arrival_ts
                changes["arrival_mid"] = order.arrival_mid
                resolved |= FILL_ARRIVAL
        if earliest_wait is not None:
            self.quote_waits.add(symbol, earliest_wait, "fill", fill_id)
        if resolved != state.resolved:
            self.fills[fill_id] = _replace(state, resolved=resolved, **changes)
            self.changed_fills.add(fill_id)

    def _refresh_order(self, order_id: str) -> None:
        state = self.orders.get(order_id)
        if state is None or state.resolved == ORDER_ALL:
            return
        symbol = state.symbol
        grace = self.settings.quiet_grace_ns
        resolved = state.resolved
        changes: dict[str, Any] = {}
        quote_wait: int | None = None
        trade_wait: int | None = None
        for ts, mid_bit, tape_bit, mid_field, tape_field in (
            (state.arrival_ts, ORDER_ARRIVAL_MID, ORDER_ARRIVAL_TAPE, "arrival_mid", "arrival_tape"),
            (state.end_ts, ORDER_END_MID, ORDER_END_TAPE, "end_mid", "end_tape"),
        ):
            if ts is None:
                continue
            if not resolved & mid_bit:
                if self.quotes.decided(symbol, ts, grace):
                    changes[mid_field] = self._mid_at(symbol, ts)
                    resolved |= mid_bit
                elif quote_wait is None:
                    quote_wait = ts
            if not resolved & tape_bit:
                if self.trades.decided(symbol, ts, grace):
                    changes[tape_field] = self.trades.value_at(symbol, ts)
                    resolved |= tape_bit
                elif trade_wait is None:
                    trade_wait = ts
        if quote_wait is not None:
            self.quote_waits.add(symbol, quote_wait, "order", order_id)
        if trade_wait is not None:
            self.trade_waits.add(symbol, trade_wait, "order", order_id)
        if resolved == state.resolved:
            return
        state = _replace(state, resolved=resolved, **changes)
        self.orders[order_id] = state
        self.changed_orders.add(order_id)
        if "arrival_mid" in changes:
            for fill_id in state.fill_ids:
                self._refresh_fill(fill_id)

    def resolve_due(self) -> None:
        """Wake the fills and orders whose waited-for time the series have now passed."""
        grace = self.settings.quiet_grace_ns
        due = self.quote_waits.due(self.quotes, self._advanced_quotes, grace)
        due += self.trade_waits.due(self.trades, self._advanced_trades, grace)
        self._advanced_quotes.clear()
        self._advanced_trades.clear()
        for kind, key in due:
            if kind == "fill":
                self._refresh_fill(key)
            else:
                self._refresh_order(key)

    def _see(self, ts: int) -> None:
        if ts > self.event_time:
            self.event_time = ts

    # -- writing and persisting -----------------------------------------------------------

    def unwritten(self) -> int:
        return (
            len(self.changed_fills) + len(self.changed_orders) + len(self.writing_fills) + len(self.writing_orders)
            + len(self.changed_seen) + len(self.changed_waiting)
        )

    def take_changes(self) -> PendingWrite:
        """Hand every changed fill and order, as it is now, to a write. The ids stay
        protected from pruning until `persist` (written) or `restore_changes` (failed)."""
        taken = PendingWrite(
            fills={k: self.fills[k] for k in self.changed_fills if k in self.fills},
            orders={k: self.orders[k] for k in self.changed_orders if k in self.orders},
            seen=self.changed_seen,
            waiting={k: self.waiting.get(k) for k in self.changed_waiting},
        )
        self.writing_fills |= self.changed_fills
        self.writing_orders |= self.changed_orders
        self.changed_fills, self.changed_orders = set(), set()
        self.changed_seen, self.changed_waiting = {}, set()
        return taken

    def restore_changes(self, taken: PendingWrite) -> None:
        """A write failed: its fills and orders are changed again (the next write takes them)."""
        self.changed_fills |= taken.fills.keys()
        self.changed_orders |= taken.orders.keys()
        self.changed_seen = {**taken.seen, **self.changed_seen}
        self.changed_waiting |= taken.waiting.keys()
        self._release(taken)

    def persist(self, taken: PendingWrite) -> None:
        """The rows of `taken` are in ClickHouse: copy those states to the tables (the
        next commit makes them durable). A state changed again since then stays changed
        and is persisted after its own write."""
        fills, orders = self.tables.fills, self.tables.orders
        with outside_batch():
            for key, state in taken.fills.items():
                if fills.get(key) is not state:
                    fills[key] = state
            for key, state in taken.orders.items():
                if orders.get(key) is not state:
                    orders[key] = state
            for key, waiting in taken.waiting.items():
                if waiting is None:
                    self.tables.amendments.pop(key, None)
                else:
                    self.tables.amendments[key] = waiting
        self._release(taken)

    def _release(self, taken: PendingWrite) -> None:
        self.writing_fills.difference_update(taken.fills.keys())
        self.writing_orders.difference_update(taken.orders.keys())

    def persist_market(self) -> None:
        """Copy changed book and tape entries to their tables. They have no rows: the
        quote and trade agents persist them at the end of every batch, so a restart
        rebuilds the history up to everything acknowledged."""
        with outside_batch():
            for symbol in self.changed_book:
                self.tables.quote_book[symbol] = self.book[symbol]
            for symbol in self.changed_tape:
                self.tables.tape[symbol] = self.tape[symbol]
        self.changed_book.clear()
        self.changed_tape.clear()

    # -- restarts: no row goes back behind what ClickHouse has ---------------------------------

    def unverified(self, taken: PendingWrite) -> tuple[dict[str, int], dict[str, int]]:
        """The taken fills and orders (id -> time, the tables' first key column) whose
        rows must be compared with ClickHouse's before they are written: not yet
        compared in this process (a complete fill is never behind within its revision,
        and a row of an earlier revision loses to the stored one anyway, see
        `row_version`; a final order can still lack a fill the stored row has)."""
        fills = {k: st.fill.ts for k, st in taken.fills.items() if k in self.unverified_fills and not st.complete}
        orders = {k: st.arrival_ts for k, st in taken.orders.items() if k in self.unverified_orders and st.known}
        return fills, orders

    def hold(
        self, checked: tuple[dict, dict], stored_fills: dict[str, Progress], stored_orders: dict[str, Progress]
    ) -> None:
        """Record how far along ClickHouse's rows of the `checked` ids are: until a state
        has caught up with its stored row, the row is kept (`writable_*` say no)."""
        fill_ids, order_ids = checked
        self.unverified_fills.difference_update(fill_ids)
        self.unverified_orders.difference_update(order_ids)
        self.held_fills.update(stored_fills)
        self.held_orders.update(stored_orders)

    def writable_fill(self, key: str, state: FillState) -> bool:
        """Whether a row of the fill at `state` may be written (not behind ClickHouse's)."""
        stored = self.held_fills.get(key)
        if stored is None:
            return True
        if covers(fill_progress(state), stored):
            del self.held_fills[key]
            return True
        return False

    def writable_order(self, key: str, state: OrderState) -> bool:
        stored = self.held_orders.get(key)
        if stored is None:
            return True
        if covers(order_progress(state), stored):
            del self.held_orders[key]
            return True
        return False

    def mark_open_orders(self, symbols: set[str]) -> int:
        """Mark the open orders of `symbols` changed: their mark to the latest mid moved."""
        marked = 0
        for order_id, state in self.orders.items():
            if state.end_ts is None and state.known and state.symbol in symbols:
                self.changed_orders.add(order_id)
                marked += 1
        return marked

    # -- restart and retention ---------------------------------------------------------------

    def reevaluate_all(self) -> None:
        """Rebuild the waiting heaps from the state (after `load` and the history
        rebuild). Only what progresses is marked changed (a value that has become
        decidable); nothing is rewritten as it was: ClickHouse already has it."""
        for order in self.orders.values():
            self._see(order.last_event_ts)
        for order_id in list(self.orders):
            self._refresh_order(order_id)
        for fill_id, state in list(self.fills.items()):
            self._see(state.fill.ts)
            self._refresh_fill(fill_id)

    def fill_minutes(self) -> set[int]:
        """The rollup minutes of every fill held."""
        return {minute_of(state.fill.ts) for state in self.fills.values()}

    def prune(self, *, history: bool = True, stale_minutes: set[int] = frozenset()) -> None:
        """Forget what no event can change any more (by event time), and old history.

        `history=False` keeps the series history whole (the writes are failing: values
        decided but not yet written must stay re-derivable after a restart). Fills of
        `stale_minutes` (rollup rows not yet refreshed) are kept: a restart refreshes
        the minutes of the fills it holds."""
        s = self.settings
        now = self.event_time
        unwritten_fills = self.changed_fills | self.writing_fills
        unwritten_orders = self.changed_orders | self.writing_orders
        gone_fills, gone_orders = [], []
        for order_id, state in self.orders.items():
            if order_id in unwritten_orders:
                continue
            ttl = s.retention_ns if state.end_ts is not None or not state.known else s.open_order_ttl_ns
            if state.last_event_ts < now - ttl:
                gone_orders.append(order_id)
        kept_orders = self.orders.keys() - gone_orders
        for fill_id, state in self.fills.items():
            if fill_id in unwritten_fills or state.fill.ts >= now - s.retention_ns:
                continue
            if stale_minutes and minute_of(state.fill.ts) in stale_minutes:
                continue
            if state.fill.order_id in kept_orders:
                continue  # an amendment recomputes its order from the order's executions
            # Complete fills are done; incomplete ones (no quotes came) are abandoned.
            gone_fills.append(fill_id)
        over_fills = len(self.fills) - len(gone_fills) - s.max_fills if s.max_fills else 0
        over_orders = len(self.orders) - len(gone_orders) - s.max_orders if s.max_orders else 0
        if over_fills > 0 or over_orders > 0:
            more_orders, more_fills = self._over_capacity(
                over_fills, over_orders, set(gone_fills), set(gone_orders),
                unwritten_fills, unwritten_orders, stale_minutes,
            )
            gone_orders += more_orders
            gone_fills += more_fills
            self.stats.pruned_orders_capacity += len(more_orders)
            self.stats.pruned_fills_capacity += len(more_fills)
        with outside_batch():
            for fill_id in gone_fills:
                for amendment in self.fills.pop(fill_id).amendments:
                    del self.aliases[amendment.fill_id]
                self.tables.fills.pop(fill_id, None)
                self.held_fills.pop(fill_id, None)
                self.unverified_fills.discard(fill_id)
            for order_id in gone_orders:
                del self.orders[order_id]
                self.tables.orders.pop(order_id, None)
                self.held_orders.pop(order_id, None)
                self.unverified_orders.discard(order_id)
        self.stats.pruned_fills += len(gone_fills)
        self.stats.pruned_orders += len(gone_orders)
        if history:
            self._prune_history()
        self.quote_waits.drop_decided(self.quotes, s.quiet_grace_ns)
        self.trade_waits.drop_decided(self.trades, s.quiet_grace_ns)

    def _over_capacity(
        self,
        over_fills: int,
        over_orders: int,
        gone_fills: set[str],
        gone_orders: set[str],
        unwritten_fills: set[str],
        unwritten_orders: set[str],
        stale_minutes: set[int],
    ) -> tuple[list[str], list[str]]:
        """More than `max_fills` fills or `max_orders` orders would stay: the oldest
        finished ones go before their retention is up, until both bounds hold. An order
        goes with its executions (an amendment recomputes an order from all of them),
        oldest last event first; a fill without a held order on its own, by its `ts`.
        Finished: a final order whose fills are all complete or busted, a complete or
        busted fill; written, and its rollup minute refreshed. Open orders and fills
        waiting for quotes are never cut short.

        Only when the finished ones are not enough, *unjoined* orders go next, oldest
        last event first, with their executions: placeholders whose NEW has not been
        seen, whose fills have every value decided but the arrival (which only that NEW
        can bring) and are written. Without this tier the bounds did not hold when the
        orders stream ran ahead of the fills stream (one agent lagging): orders were
        forgotten as finished before their fills came, each late fill then made a
        placeholder that waited `retention_s` for a NEW already gone, and at 3,000
        events/s the state grew by ~25 MB a minute for the whole hour (300,000 fills
        held with max_fills at 10,000). Cut, such a placeholder's fills keep their rows
        as written (no arrival values); should its NEW still come, the order starts
        again without them. Counted in `pruned_unjoined_orders` / `_fills`."""

        def settled(fill_id: str, missing: int = 0) -> bool:
            """Every value but `missing` decided (or busted), written, minute refreshed."""
            state = self.fills[fill_id]
            return (
                (state.resolved | missing == FILL_ALL or state.busted)
                and fill_id not in unwritten_fills
                and not (stale_minutes and minute_of(state.fill.ts) in stale_minutes)
            )

        held_orders = self.orders.keys() - gone_orders
        by_order: dict[str, list[str]] = {}  # held order -> the held fills that name it
        units: list[tuple[int, str | None, list[str]]] = []  # (time, order or None, fills)
        unjoined: list[tuple[int, str, list[str]]] = []  # the second tier, same shape
        for fill_id, state in self.fills.items():
            if fill_id in gone_fills:
                continue
            order_id = state.fill.order_id
            if order_id in held_orders:
                by_order.setdefault(order_id, []).append(fill_id)
            elif settled(fill_id):
                units.append((state.fill.ts, None, [fill_id]))
        for order_id in held_orders:
            state = self.orders[order_id]
            if order_id in unwritten_orders:
                continue
            members = by_order.get(order_id, [])
            if state.final:
                if all(settled(f) for f in members):
                    units.append((state.last_event_ts, order_id, members))
            elif state.arrival_ts is None and all(settled(f, FILL_ARRIVAL) for f in members):
                unjoined.append((state.last_event_ts, order_id, members))
        more_orders: list[str] = []
        more_fills: list[str] = []
        unjoined_orders = unjoined_fills = 0
        units.sort(key=lambda unit: unit[0])
        unjoined.sort(key=lambda unit: unit[0])
        for tier, (_, order_id, members) in [(0, u) for u in units] + [(1, u) for u in unjoined]:
            if over_fills <= 0 and over_orders <= 0:
                break
            if order_id is not None:
                more_orders.append(order_id)
                over_orders -= 1
            more_fills += members
            over_fills -= len(members)
            if tier:
                unjoined_orders += 1
                unjoined_fills += len(members)
        self.stats.pruned_unjoined_orders += unjoined_orders
        self.stats.pruned_unjoined_fills += unjoined_fills
        return more_orders, more_fills

    def _prune_history(self) -> None:
        keep = self.settings.history_ns
        for symbol in list(self.quotes.symbols()):
            cut = self.quotes.prune(symbol, keep)
            entry = self.book.get(symbol)
            if cut is not None and entry is not None:
                self.book[symbol] = _replace(entry, history_from_seq=cut[0])
                self.changed_book.add(symbol)
        for symbol in list(self.trades.symbols()):
            cut = self.trades.prune(symbol, keep)
            entry = self.tape.get(symbol)
            if cut is not None and entry is not None:
                first_seq, (base_notional, base_volume) = cut
                self.tape[symbol] = _replace(
                    entry,
                    history_from_seq=first_seq,
                    history_base_notional=base_notional,
                    history_base_volume=base_volume,
                    history_complete=False,
                )
                self.changed_tape.add(symbol)
        self.persist_market()

    async def rebuild_history(self, app: App, quotes: Channel, trades: Channel) -> None:
        """Re-read the kept history of quotes and trades from their streams (on start)."""
        await self._rebuild(app, quotes, self.book, self.changed_book, self.quotes, _quote_point)
        await self._rebuild(app, trades, self.tape, self.changed_tape, self.trades, _trade_point)
        self.persist_market()

    async def _rebuild(
        self,
        app: App,
        channel: Channel,
        entries: dict[str, Any],
        changed: set[str],
        series: EventTimeSeries,
        point: Callable[[Any, Any, Any], Any],
    ) -> None:
        if not entries:
            return
        for symbol, entry in entries.items():
            base = (entry.history_base_notional, entry.history_base_volume) if isinstance(entry, TapeEntry) else None
            series.seed(symbol, base=base, complete=getattr(entry, "history_complete", True))
        start = min(e.history_from_seq for e in entries.values())
        end = max(e.seq for e in entries.values())
        try:
            async for record in app.replay(channel, StartPosition(seq=max(start, 1))):
                if record.seq > end:
                    break
                event = record.value
                entry = entries.get(event.symbol)
                if entry is None or not entry.history_from_seq <= record.seq <= entry.seq:
                    continue
                verdict = series.check(event.symbol, event.ts, record.seq)
                if verdict == "new":
                    series.append(event.symbol, event.ts, point(event, series, event.symbol), record.seq)
                elif verdict == "late":
                    series.skip(event.symbol, record.seq)
        except Exception:
            log.exception("rebuilding the %s history failed; keeping only the latest points", channel.name)
        for symbol, entry in list(entries.items()):
            latest = series.latest(symbol)
            value = (entry.notional, entry.volume) if isinstance(entry, TapeEntry) else tca.mid_price(entry.bid, entry.ask)
            if latest is None or latest[0] != entry.ts or latest[1] != value:
                # The stream no longer holds that history (retention): keep the latest
                # point, and start the next rebuild after it.
                series.reset_to(symbol, entry.ts, value, entry.seq)
                if isinstance(entry, TapeEntry):
                    entries[symbol] = _replace(
                        entry,
                        history_from_seq=entry.seq + 1,
                        history_base_notional=entry.notional,
                        history_base_volume=entry.volume,
                        history_complete=False,
                    )
                else:
                    entries[symbol] = _replace(entry, history_from_seq=entry.seq)
                changed.add(symbol)


def _quote_point(quote: Quote, series: EventTimeSeries, symbol: str) -> Decimal:
    return tca.mid_price(quote.bid, quote.ask)


def _trade_point(trade: MarketTrade, series: EventTimeSeries, symbol: str) -> Tape:
    before = series.current(symbol)
    if before is None:
        before = (ZERO, ZERO)
    return (EXACT.add(before[0], EXACT.multiply(trade.price, trade.size)), EXACT.add(before[1], trade.size))
