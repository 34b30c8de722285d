"""Execution quality: joining orders, fills, quotes and market trades by event time.

Four agents consume four streams independently, so any of them can be ahead of the
others: a fill can be consumed before its order, a quote after the fill it prices.
`ExecutionTracker` makes the results independent of that interleaving.

How the join works
------------------
* **Series by event time.** Quotes become a per-symbol series of mids, market trades a
  per-symbol series of the cumulative tape `(sum of price x size, sum of size)`. Each
  series has a *watermark*: the newest event time it has seen for the symbol. Points
  arrive in stream order; a point older than the symbol's watermark is *late*, counted
  and dropped (the series only grows forward, so every lookup is reproducible).
* **A value at time t** (the mid at a fill, at an order's arrival, one second after a
  fill; the tape at an order's start and end) is the last point at or before `t`. It
  is *decided* once the symbol's watermark has reached `t` (no earlier point can still
  come), or once the watermark of the whole stream (every symbol) has passed
  `t + quiet_symbol_grace` (the symbol has gone quiet: its last point still holds).
  Until then the fill or order waits in an in-memory heap keyed by `t`; the quote and
  trade agents wake the waiters whose time has come after each batch. A decided value
  can still be *unavailable* (no quote at or before `t` is known): it is then NULL.
* **Fills before their order.** A fill whose order is not yet known creates a
  placeholder order that collects the fill; when the order arrives it completes the
  placeholder and passes its arrival mid down to the fills. Orders are written to
  ClickHouse only once their NEW event (the arrival) is known.
* **Markouts** at +1 s, +5 s, +60 s are values at `fill.ts + horizon`, decided by the
  rule above: they appear when quote event time passes the horizon, not wall time.

State, restarts and replays
---------------------------
The quote book (`BookEntry`), the tape (`TapeEntry`), fills (`FillState`) and orders
(`OrderState`) live in changelog-backed tables. Every handler is idempotent by
content: a fill id already in the table is a duplicate, an order's NEW only sets the
arrival once, a fill joins its order's aggregates once (`fill_ids`), a quote or trade
whose stream sequence is not above the symbol's recorded one is skipped. So
redeliveries and replays through the agents change nothing.

The series history (the last `history_s` of points per symbol) is memory only. On
start it is rebuilt by replaying the QUOTES and TRADES streams from the sequence of
the oldest point kept (`history_from_seq`, recorded in the book/tape entry) up to the
last sequence applied; the waiting heaps are rebuilt by re-evaluating every fill and
order held. Every held fill and order is then written to ClickHouse again: rows are
upserts (ReplacingMergeTree), so this covers a change that reached a changelog but
whose ClickHouse write was cut short by a crash.

Rows
----
`ExecutionSink` turns changed fills and orders into rows (`fill_row`, `order_row`) and
writes them in batched Arrow inserts, one per table for everything changed since its
last write; it runs beside the agents, and why that loses nothing is in its docstring.
Each write carries a `version` (nanosecond clock, strictly increasing in the process);
tables are `ReplacingMergeTree(version)` keyed by the fill/order id, and readers use
`FINAL`, so replays and rewrites never double a row.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from bisect import bisect_right
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import msgspec

from ..core import execution as tca
from ..core.exact import EXACT, ZERO
from ..streams.events import Fill, MarketTrade, Order, Quote
from ..streams.transport import StartPosition
from ..tables.table import Table

if TYPE_CHECKING:
    from ..app import App
    from ..streams.channel import Channel
    from ..streams.stream import Stream
    from ..stores.clickhouse import ClickHouseStore

log = logging.getLogger(__name__)

NS = 1_000_000_000
MARKOUT_HORIZONS: tuple[tuple[str, int], ...] = (("1s", 1 * NS), ("5s", 5 * NS), ("60s", 60 * NS))

# FillState.resolved bits: which inputs are decided (a decided value may be None).
FILL_MID = 1
FILL_MARKOUTS = (2, 4, 8)
FILL_ARRIVAL = 16
_MARKOUT_BITS = FILL_MARKOUTS[0] | FILL_MARKOUTS[1] | FILL_MARKOUTS[2]
FILL_ALL = FILL_MID | _MARKOUT_BITS | FILL_ARRIVAL

# OrderState.resolved bits.
ORDER_ARRIVAL_MID = 1
ORDER_ARRIVAL_TAPE = 2
ORDER_END_MID = 4
ORDER_END_TAPE = 8
ORDER_ALL = ORDER_ARRIVAL_MID | ORDER_ARRIVAL_TAPE | ORDER_END_MID | ORDER_END_TAPE

# ClickHouse columns hold Decimal(38, 18) (money, prices, quantities) and Decimal(38, 8)
# (bps): 20 integer digits either way.
STORE_PLACES = 18
_STORE_QUANTUM = Decimal(1).scaleb(-STORE_PLACES)
_STORE_LIMIT = Decimal(10) ** 20

Tape = tuple[Decimal, Decimal]  # cumulative (sum of price x size, sum of size)


# -- table values ---------------------------------------------------------------------


class BookEntry(msgspec.Struct, frozen=True):
    """The latest quote of a symbol (its top of book) and where its history starts."""

    ts: int
    seq: int  # QUOTES sequence of this quote
    bid: Decimal
    ask: Decimal
    history_from_seq: int  # QUOTES sequence of the oldest point kept in memory


class TapeEntry(msgspec.Struct, frozen=True):
    """A symbol's cumulative tape after its latest trade, and where its history starts."""

    ts: int
    seq: int  # TRADES sequence of the latest trade
    notional: Decimal  # cumulative sum of price x size
    volume: Decimal  # cumulative sum of size
    history_from_seq: int  # TRADES sequence of the oldest point kept in memory
    history_base_notional: Decimal  # the cumulative just before that oldest point
    history_base_volume: Decimal
    history_complete: bool  # no point was ever pruned: before the first, the tape was 0


class FillState(msgspec.Struct, frozen=True):
    fill: Fill
    resolved: int = 0
    mid_at_fill: Decimal | None = None
    markout_mids: tuple[Decimal | None, Decimal | None, Decimal | None] = (None, None, None)
    arrival_ts: int | None = None
    arrival_mid: Decimal | None = None

    @property
    def complete(self) -> bool:
        return self.resolved == FILL_ALL


class OrderState(msgspec.Struct, frozen=True):
    """An order as the fills and order events seen so far describe it.

    `arrival_ts is None` means its NEW event has not been seen: a placeholder collecting
    fills that arrived first (side/qty may still be unknown)."""

    order_id: str
    account: str
    symbol: str
    last_event_ts: int  # newest event time of anything about this order (retention)
    side: str | None = None
    qty: Decimal | None = None
    order_type: str | None = None
    limit_price: Decimal | None = None
    venue: str | None = None
    status: str | None = None
    arrival_ts: int | None = None
    end_ts: int | None = None
    resolved: int = 0
    arrival_mid: Decimal | None = None
    arrival_tape: Tape | None = None
    end_mid: Decimal | None = None
    end_tape: Tape | None = None
    fill_ids: tuple[str, ...] = ()
    filled_qty: Decimal = ZERO
    filled_notional: Decimal = ZERO
    fees: Decimal = ZERO
    first_fill_ts: int | None = None
    last_fill_ts: int | None = None

    @property
    def known(self) -> bool:
        return self.arrival_ts is not None and self.side is not None and self.qty is not None

    @property
    def final(self) -> bool:
        return self.end_ts is not None and self.resolved == ORDER_ALL


_replace = msgspec.structs.replace


# -- event-time series -------------------------------------------------------------------


class _Series:
    __slots__ = ("times", "values", "seqs", "watermark", "last_seq", "base", "complete")

    def __init__(self, base: Any, complete: bool):
        self.times: list[int] = []
        self.values: list[Any] = []
        self.seqs: list[int] = []
        self.watermark = -1
        self.last_seq = 0
        self.base = base  # the value just before the first point (None: unknown)
        self.complete = complete  # nothing was pruned: `base` is the value at any earlier time


class EventTimeSeries:
    """Per-symbol values over event time with a bounded history, appended in order.

    `base` is the value of a symbol before its first point while nothing has been
    pruned (the tape: zero; quotes: None, no mid before the first quote)."""

    def __init__(self, base: Any = None):
        self._base = base
        self._series: dict[str, _Series] = {}
        self.watermark = -1  # newest event time of any symbol
        self.late = 0
        self.duplicates = 0

    def __contains__(self, symbol: str) -> bool:
        return symbol in self._series

    def symbols(self) -> Iterable[str]:
        return self._series.keys()

    def points(self, symbol: str) -> int:
        s = self._series.get(symbol)
        return len(s.times) if s else 0

    def total_points(self) -> int:
        return sum(len(s.times) for s in self._series.values())

    def seed(self, symbol: str, *, base: Any, complete: bool) -> None:
        """Start a symbol's series (used when rebuilding from a changelog entry)."""
        self._series[symbol] = _Series(base, complete)

    def reset_to(self, symbol: str, ts: int, value: Any, seq: int) -> None:
        """Forget the symbol's history but its one latest point (rebuild fallback)."""
        s = self._series[symbol] = _Series(None, False)
        s.times.append(ts)
        s.values.append(value)
        s.seqs.append(seq)
        s.watermark = ts
        s.last_seq = seq
        self.watermark = max(self.watermark, ts)

    def _get(self, symbol: str) -> _Series:
        s = self._series.get(symbol)
        if s is None:
            s = self._series[symbol] = _Series(self._base, True)
        return s

    def check(self, symbol: str, ts: int, seq: int) -> str:
        """'new', 'duplicate' (sequence already applied) or 'late' (older than the watermark)."""
        s = self._series.get(symbol)
        if s is None:
            return "new"
        if seq <= s.last_seq:
            return "duplicate"
        if ts < s.watermark:
            return "late"
        return "new"

    def append(self, symbol: str, ts: int, value: Any, seq: int) -> None:
        """Add a point that `check` called new."""
        s = self._get(symbol)
        s.times.append(ts)
        s.values.append(value)
        s.seqs.append(seq)
        s.watermark = ts
        s.last_seq = seq
        if ts > self.watermark:
            self.watermark = ts

    def skip(self, symbol: str, seq: int) -> None:
        """Record that `seq` was seen (late) without adding a point."""
        s = self._get(symbol)
        s.last_seq = max(s.last_seq, seq)

    def watermark_of(self, symbol: str) -> int:
        s = self._series.get(symbol)
        return s.watermark if s else -1

    def decided(self, symbol: str, t: int, quiet_grace_ns: int) -> bool:
        """Whether the value at `t` can no longer change (see the module docstring)."""
        return self.watermark_of(symbol) >= t or self.watermark >= t + quiet_grace_ns

    def value_at(self, symbol: str, t: int) -> Any:
        """The last point at or before `t`; before the first point the base (None: unknown)."""
        s = self._series.get(symbol)
        if s is None:
            return self._base
        i = bisect_right(s.times, t) - 1
        if i >= 0:
            return s.values[i]
        return s.base if s.complete else None

    def latest(self, symbol: str) -> tuple[int, Any] | None:
        s = self._series.get(symbol)
        if not s or not s.times:
            return None
        return s.times[-1], s.values[-1]

    def current(self, symbol: str) -> Any:
        """The value now: after the newest point, or the base when there is none."""
        s = self._series.get(symbol)
        if s is None:
            return self._base
        return s.values[-1] if s.values else s.base

    def prune(self, symbol: str, keep_ns: int) -> tuple[int, Any] | None:
        """Drop points older than `watermark - keep_ns`, keeping the last point at or
        before that cut (it is still the value there). Returns (first seq kept, value
        before it) when something was dropped."""
        s = self._series.get(symbol)
        if s is None or len(s.times) < 2:
            return None
        i = bisect_right(s.times, s.watermark - keep_ns) - 1
        if i <= 0:
            return None
        s.base = s.values[i - 1]
        s.complete = False
        del s.times[:i], s.values[:i], s.seqs[:i]
        return s.seqs[0], s.base


class _Waits:
    """Fills and orders waiting for a series to decide the value at some time.

    Each waiter has one current wait (the earliest time it still needs); it sits in its
    symbol's heap and in a heap over all symbols (the quiet-symbol rule), and whichever
    serves it first wins: entries that are no longer a waiter's current wait are stale
    and skipped."""

    def __init__(self) -> None:
        self.by_symbol: dict[str, list[tuple[int, str, str]]] = {}
        self.everywhere: list[tuple[int, str, str]] = []
        self.current: dict[tuple[str, str], int] = {}

    def add(self, symbol: str, t: int, kind: str, key: str) -> None:
        if self.current.get((kind, key)) == t:
            return  # already waiting for exactly this
        self.current[(kind, key)] = t
        item = (t, kind, key)
        heapq.heappush(self.by_symbol.setdefault(symbol, []), item)
        heapq.heappush(self.everywhere, item)

    def _serve(self, item: tuple[int, str, str], out: list[tuple[str, str]]) -> None:
        t, kind, key = item
        if self.current.get((kind, key)) == t:
            del self.current[(kind, key)]
            out.append((kind, key))

    def due(self, series: EventTimeSeries, symbols: Iterable[str], quiet_grace_ns: int) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        for symbol in symbols:
            heap = self.by_symbol.get(symbol)
            if not heap:
                continue
            watermark = series.watermark_of(symbol)
            while heap and heap[0][0] <= watermark:
                self._serve(heapq.heappop(heap), out)
            if not heap:
                del self.by_symbol[symbol]
        heap = self.everywhere
        limit = series.watermark - quiet_grace_ns
        while heap and heap[0][0] <= limit:
            self._serve(heapq.heappop(heap), out)
        return out

    def drop_decided(self, series: EventTimeSeries, quiet_grace_ns: int) -> None:
        """Forget per-symbol entries the quiet-symbol rule has already served."""
        limit = series.watermark - quiet_grace_ns
        for symbol in list(self.by_symbol):
            heap = self.by_symbol[symbol]
            while heap and heap[0][0] <= limit:
                heapq.heappop(heap)
            if not heap:
                del self.by_symbol[symbol]

    def __len__(self) -> int:
        return len(self.current)


# -- the tracker ----------------------------------------------------------------------


@dataclass
class TrackerSettings:
    history_ns: int = 600 * NS
    quiet_grace_ns: int = 5 * NS
    retention_ns: int = 3600 * NS
    open_order_ttl_ns: int = 86_400 * NS


@dataclass
class TrackerStats:
    fills: int = 0
    orders: int = 0
    quotes: int = 0
    market_trades: int = 0
    duplicate_fills: int = 0
    duplicate_quotes: int = 0
    duplicate_trades: int = 0
    late_quotes: int = 0
    late_trades: int = 0
    unavailable_mids: int = 0  # values decided as unknown: no quote at or before the time
    pruned_fills: int = 0
    pruned_orders: int = 0
    rows_rejected: int = 0


@dataclass
class ExecutionTables:
    fills: Table
    orders: Table
    quote_book: Table
    tape: Table


def declare_tables(app: App) -> ExecutionTables:
    return ExecutionTables(
        fills=app.table("fills", value_type=FillState, key_type=str),
        orders=app.table("orders", value_type=OrderState, key_type=str),
        quote_book=app.table("quote_book", value_type=BookEntry, key_type=str),
        tape=app.table("tape", value_type=TapeEntry, key_type=str),
    )


def unstorable_reason(event: Fill | Order) -> str | None:
    """Why a fill or order can never be written to the Decimal(38, 18) columns, if so."""
    if isinstance(event, Fill):
        numbers = {"qty": event.qty, "price": event.price, "fee": event.fee}
    else:
        numbers = {"qty": event.qty, "limit_price": event.limit_price}
    for name, value in numbers.items():
        if value is None:
            continue
        if value.as_tuple().exponent < -STORE_PLACES:
            return f"{name} {value} has more than {STORE_PLACES} decimal places"
        if EXACT.abs(value) >= _STORE_LIMIT:
            return f"{name} {value} is too large to store (limit 1e20)"
    return None


class ExecutionTracker:
    """The join of orders, fills, quotes and market trades (see the module docstring).

    Synchronous: agents call `on_*` for each event and `resolve_due()` after a batch;
    the changed fill and order ids collect in `dirty_fills` / `dirty_orders` for the sink.
    """

    def __init__(self, tables: ExecutionTables, settings: TrackerSettings | None = None):
        self.tables = tables
        self.settings = settings or TrackerSettings()
        self.quotes = EventTimeSeries(base=None)
        self.trades = EventTimeSeries(base=(ZERO, ZERO))
        self.quote_waits = _Waits()
        self.trade_waits = _Waits()
        self.dirty_fills: set[str] = set()  # changed since handed to the writer
        self.dirty_orders: set[str] = set()
        self.writing_fills: set[str] = set()  # handed to the writer, not yet written
        self.writing_orders: set[str] = set()
        self.stats = TrackerStats()
        self.event_time = -1  # newest event time of any stream (retention clock)
        self._advanced_quotes: set[str] = set()
        self._advanced_trades: set[str] = set()

    # -- market data ------------------------------------------------------------------

    def on_quote(self, quote: Quote, seq: int) -> None:
        symbol = quote.symbol
        book = self.tables.quote_book
        entry: BookEntry | None = book.get(symbol)
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
        # 'duplicate' here: the series kept the point although the table change was
        # rolled back (an agent crashed); the book entry must still be written.
        self.stats.quotes += 1
        book[symbol] = BookEntry(
            ts=quote.ts,
            seq=seq,
            bid=quote.bid,
            ask=quote.ask,
            history_from_seq=entry.history_from_seq if entry is not None else seq,
        )
        self._advanced_quotes.add(symbol)
        self._see(quote.ts)

    def on_trade(self, trade: MarketTrade, seq: int) -> None:
        symbol = trade.symbol
        tape = self.tables.tape
        entry: TapeEntry | None = tape.get(symbol)
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
        tape[symbol] = TapeEntry(
            ts=trade.ts,
            seq=seq,
            notional=after[0],
            volume=after[1],
            history_from_seq=entry.history_from_seq if entry is not None else seq,
            history_base_notional=entry.history_base_notional if entry is not None else ZERO,
            history_base_volume=entry.history_base_volume if entry is not None else ZERO,
            history_complete=entry.history_complete if entry is not None else True,
        )
        self._advanced_trades.add(symbol)
        self._see(trade.ts)

    # -- orders and fills -------------------------------------------------------------

    def on_order(self, order: Order) -> None:
        self._see(order.ts)
        orders = self.tables.orders
        state: OrderState | None = orders.get(order.order_id)
        merged = _merge_order(state, order)
        if merged is state:
            return
        self.stats.orders += 1
        orders[order.order_id] = merged
        self.dirty_orders.add(order.order_id)
        self._refresh_order(order.order_id)

    def on_fill(self, fill: Fill) -> None:
        self._see(fill.ts)
        fills = self.tables.fills
        if fill.fill_id in fills:
            self.stats.duplicate_fills += 1
            if fill.order_id is not None:
                # A crash may have cut the commit between the fills and orders changelogs.
                self._attach(fills[fill.fill_id].fill)
            return
        self.stats.fills += 1
        fills[fill.fill_id] = FillState(fill=fill, resolved=0 if fill.order_id is not None else FILL_ARRIVAL)
        self.dirty_fills.add(fill.fill_id)
        if fill.order_id is not None:
            self._attach(fill)
        self._refresh_fill(fill.fill_id)

    def _attach(self, fill: Fill) -> None:
        """Add the fill to its order's aggregates, once."""
        orders = self.tables.orders
        order_id = fill.order_id
        state: OrderState | None = orders.get(order_id)
        if state is None:
            state = OrderState(order_id=order_id, account=fill.account, symbol=fill.symbol, last_event_ts=fill.ts)
        if fill.fill_id in state.fill_ids:
            return
        state = _replace(
            state,
            fill_ids=state.fill_ids + (fill.fill_id,),
            filled_qty=EXACT.add(state.filled_qty, fill.qty),
            filled_notional=EXACT.add(state.filled_notional, EXACT.multiply(fill.qty, fill.price)),
            fees=EXACT.add(state.fees, fill.fee),
            first_fill_ts=fill.ts if state.first_fill_ts is None else min(state.first_fill_ts, fill.ts),
            last_fill_ts=fill.ts if state.last_fill_ts is None else max(state.last_fill_ts, fill.ts),
            last_event_ts=max(state.last_event_ts, fill.ts),
        )
        orders[order_id] = state
        self.dirty_orders.add(order_id)

    # -- deciding values ----------------------------------------------------------------

    def _mid_at(self, symbol: str, t: int) -> Decimal | None:
        value = self.quotes.value_at(symbol, t)
        if value is None:
            self.stats.unavailable_mids += 1
        return value

    def _refresh_fill(self, fill_id: str) -> None:
        state: FillState | None = self.tables.fills.get(fill_id)
        if state is None or state.complete:
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
        if resolved & _MARKOUT_BITS != state.resolved & _MARKOUT_BITS:
            changes["markout_mids"] = tuple(mids)
        if not resolved & FILL_ARRIVAL:
            order: OrderState | None = self.tables.orders.get(fill.order_id)
            if order is not None and order.resolved & ORDER_ARRIVAL_MID:
                changes["arrival_ts"] = order.arrival_ts
                changes["arrival_mid"] = order.arrival_mid
                resolved |= FILL_ARRIVAL
        if earliest_wait is not None:
            self.quote_waits.add(symbol, earliest_wait, "fill", fill_id)
        if resolved != state.resolved:
            self.tables.fills[fill_id] = _replace(state, resolved=resolved, **changes)
            self.dirty_fills.add(fill_id)

    def _refresh_order(self, order_id: str) -> None:
        state: OrderState | None = self.tables.orders.get(order_id)
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
        self.tables.orders[order_id] = state
        self.dirty_orders.add(order_id)
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

    # -- rows -------------------------------------------------------------------------

    def fill_row(self, fill_id: str, version: int) -> tuple | None:
        state: FillState | None = self.tables.fills.get(fill_id)
        if state is None:
            return None
        f = state.fill
        qty, price = f.qty, f.price
        arrival_mid = state.arrival_mid
        slippage = cost = arrival_notional = None
        if arrival_mid is not None:
            slippage = tca.slippage_bps(f.side, price, arrival_mid)
            cost = tca.slippage_cost(f.side, qty, price, arrival_mid)
            arrival_notional = EXACT.multiply(qty, arrival_mid)
        mid = state.mid_at_fill
        spread = tca.effective_spread_bps(price, mid) if mid is not None else None
        markouts = [tca.markout_bps(f.side, price, m) if m is not None else None for m in state.markout_mids]
        return (
            f.fill_id,
            f.order_id,
            f.account,
            f.symbol,
            f.venue or "",
            f.side,
            f.liquidity or "",
            f.ts,
            qty,
            price,
            f.fee,
            EXACT.multiply(qty, price),
            state.arrival_ts,
            arrival_mid,
            arrival_notional,
            slippage,
            cost,
            mid,
            spread,
            state.markout_mids[0],
            state.markout_mids[1],
            state.markout_mids[2],
            markouts[0],
            markouts[1],
            markouts[2],
            1 if state.complete else 0,
            version,
        )

    def order_row(self, order_id: str, version: int) -> tuple | None:
        state: OrderState | None = self.tables.orders.get(order_id)
        if state is None or not state.known:
            return None  # orders are reported from their NEW event on
        symbol = state.symbol
        if state.end_ts is not None:
            unfilled_price = state.end_mid
            unfilled_price_ts = state.end_ts if unfilled_price is not None else None
            window_end = state.end_tape if state.resolved & ORDER_END_TAPE else None
        else:
            # An open order's unfilled part is valued at the latest mid (evaluation time).
            latest = self.quotes.latest(symbol)
            unfilled_price, unfilled_price_ts = (latest[1], latest[0]) if latest else (None, None)
            window_end = self.trades.current(symbol)
        window_start = state.arrival_tape if state.resolved & ORDER_ARRIVAL_TAPE else None
        market_vwap, market_volume = tca.market_vwap(window_start, window_end)
        metrics = tca.order_metrics(
            tca.OrderInputs(
                side=state.side,
                order_qty=state.qty,
                filled_qty=state.filled_qty,
                filled_notional=state.filled_notional,
                fees=state.fees,
                arrival_ts=state.arrival_ts,
                arrival_mid=state.arrival_mid,
                first_fill_ts=state.first_fill_ts,
                last_fill_ts=state.last_fill_ts,
                unfilled_price=unfilled_price,
                market_vwap=market_vwap,
            )
        )
        return (
            state.order_id,
            state.account,
            symbol,
            state.venue or "",
            state.side,
            state.order_type or "",
            state.limit_price,
            state.status or "",
            state.qty,
            state.arrival_ts,
            state.end_ts,
            state.arrival_mid,
            len(state.fill_ids),
            state.filled_qty,
            metrics.unfilled_qty,
            metrics.fill_ratio,
            state.filled_notional,
            state.fees,
            metrics.avg_fill_price,
            state.first_fill_ts,
            state.last_fill_ts,
            metrics.time_to_first_fill_ns,
            metrics.time_to_last_fill_ns,
            market_vwap,
            market_volume,
            metrics.vwap_slippage_bps,
            unfilled_price,
            unfilled_price_ts,
            metrics.benchmark_notional,
            metrics.execution_cost,
            metrics.opportunity_cost,
            metrics.implementation_shortfall,
            metrics.implementation_shortfall_bps,
            1 if state.final else 0,
            version,
        )

    def begin_write(self) -> tuple[set[str], set[str]]:
        """Hand the changed ids to the writer; they stay protected from pruning until
        `end_write` (written) or go back to the changed set on `abort_write`."""
        self.writing_fills, self.dirty_fills = self.dirty_fills, set()
        self.writing_orders, self.dirty_orders = self.dirty_orders, set()
        return self.writing_fills, self.writing_orders

    def end_write(self) -> None:
        self.writing_fills, self.writing_orders = set(), set()

    def abort_write(self) -> None:
        self.dirty_fills |= self.writing_fills
        self.dirty_orders |= self.writing_orders
        self.end_write()

    def mark_open_orders(self, symbols: set[str]) -> int:
        """Mark the open orders of `symbols` changed: their mark to the latest mid moved."""
        marked = 0
        for order_id, state in self.tables.orders.items():
            if state.end_ts is None and state.known and state.symbol in symbols:
                self.dirty_orders.add(order_id)
                marked += 1
        return marked

    # -- restart and retention ---------------------------------------------------------------

    def reevaluate_all(self) -> None:
        """Rebuild the waiting heaps from the tables and mark every row for rewriting."""
        for order in self.tables.orders.values():
            self._see(order.last_event_ts)
        for order_id in list(self.tables.orders.keys()):
            self._refresh_order(order_id)
        for fill_id, state in list(self.tables.fills.items()):
            self._see(state.fill.ts)
            self._refresh_fill(fill_id)
        self.dirty_fills |= set(self.tables.fills.keys())
        self.dirty_orders |= set(self.tables.orders.keys())

    def prune(self) -> None:
        """Forget what no event can change any more (by event time), and old history."""
        s = self.settings
        now = self.event_time
        fills, orders = self.tables.fills, self.tables.orders
        unwritten_fills = self.dirty_fills | self.writing_fills
        unwritten_orders = self.dirty_orders | self.writing_orders
        for fill_id, state in list(fills.items()):
            if fill_id in unwritten_fills or state.fill.ts >= now - s.retention_ns:
                continue
            # Complete fills are done; incomplete ones (no quotes came) are abandoned.
            del fills[fill_id]
            self.stats.pruned_fills += 1
        for order_id, state in list(orders.items()):
            if order_id in unwritten_orders:
                continue
            ttl = s.retention_ns if state.end_ts is not None or not state.known else s.open_order_ttl_ns
            if state.last_event_ts < now - ttl:
                del orders[order_id]
                self.stats.pruned_orders += 1
        for symbol in list(self.quotes.symbols()):
            cut = self.quotes.prune(symbol, s.history_ns)
            entry = self.tables.quote_book.get(symbol)
            if cut is not None and entry is not None:
                self.tables.quote_book[symbol] = _replace(entry, history_from_seq=cut[0])
        for symbol in list(self.trades.symbols()):
            cut = self.trades.prune(symbol, s.history_ns)
            entry = self.tables.tape.get(symbol)
            if cut is not None and entry is not None:
                first_seq, (base_notional, base_volume) = cut
                self.tables.tape[symbol] = _replace(
                    entry,
                    history_from_seq=first_seq,
                    history_base_notional=base_notional,
                    history_base_volume=base_volume,
                    history_complete=False,
                )
        self.quote_waits.drop_decided(self.quotes, s.quiet_grace_ns)
        self.trade_waits.drop_decided(self.trades, s.quiet_grace_ns)

    async def rebuild_history(self, app: App, quotes: Channel, trades: Channel) -> None:
        """Re-read the kept history of quotes and trades from their streams (on start)."""
        await self._rebuild(app, quotes, self.tables.quote_book, self.quotes, _quote_point)
        await self._rebuild(app, trades, self.tables.tape, self.trades, _trade_point)

    async def _rebuild(
        self,
        app: App,
        channel: Channel,
        table: Table,
        series: EventTimeSeries,
        point: Callable[[Any, Any, Any], Any],
    ) -> None:
        entries = dict(table.items())
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
        for symbol, entry in entries.items():
            latest = series.latest(symbol)
            value = (entry.notional, entry.volume) if isinstance(entry, TapeEntry) else tca.mid_price(entry.bid, entry.ask)
            if latest is None or latest[0] != entry.ts or latest[1] != value:
                # The stream no longer holds that history (retention): keep the latest
                # point, and start the next rebuild after it.
                series.reset_to(symbol, entry.ts, value, entry.seq)
                if isinstance(entry, TapeEntry):
                    table[symbol] = _replace(
                        entry,
                        history_from_seq=entry.seq + 1,
                        history_base_notional=entry.notional,
                        history_base_volume=entry.volume,
                        history_complete=False,
                    )
                else:
                    table[symbol] = _replace(entry, history_from_seq=entry.seq)


def _quote_point(quote: Quote, series: EventTimeSeries, symbol: str) -> Decimal:
    return tca.mid_price(quote.bid, quote.ask)


def _trade_point(trade: MarketTrade, series: EventTimeSeries, symbol: str) -> Tape:
    before = series.current(symbol)
    if before is None:
        before = (ZERO, ZERO)
    return (EXACT.add(before[0], EXACT.multiply(trade.price, trade.size)), EXACT.add(before[1], trade.size))


def _merge_order(state: OrderState | None, order: Order) -> OrderState:
    """Fold an order event into what is known of the order; returns `state` itself
    when the event changes nothing (a duplicate)."""
    if state is None:
        state = OrderState(
            order_id=order.order_id, account=order.account, symbol=order.symbol, last_event_ts=order.ts
        )
    changes: dict[str, Any] = {}
    details = {
        "side": order.side,
        "qty": order.qty,
        "order_type": order.order_type,
        "limit_price": order.limit_price,
        "venue": order.venue,
    }
    if order.status == "NEW":
        if state.arrival_ts is None:
            changes.update(details, arrival_ts=order.ts)
            if state.end_ts is None:
                changes["status"] = "NEW"
    elif state.end_ts is None:
        changes.update(end_ts=order.ts, status=order.status)
        if state.side is None:  # the NEW was never seen: take what the terminal event says
            changes.update(details)
    if not changes:
        return state
    changes["last_event_ts"] = max(state.last_event_ts, order.ts)
    return _replace(state, **changes)


def _stored(value: Decimal | None) -> Decimal | None:
    """A value as the Decimal(38, 18) columns hold it: rounded half to even at 18 places
    only if it has more (products of two finely quoted numbers), never silently clipped."""
    if value is None:
        return None
    if value.as_tuple().exponent < -STORE_PLACES:
        value = value.quantize(_STORE_QUANTUM, context=EXACT)
    if EXACT.abs(value) >= _STORE_LIMIT:
        raise ValueError(f"{value} does not fit Decimal(38, 18)")
    return value


def storable_row(columns: tuple[Column, ...], row: tuple) -> tuple:
    """`row` with every Decimal(38, 18) value made to fit (see `_stored`); raises
    ValueError for a value that cannot."""
    return tuple(_stored(v) if c.arrow == "d18" else v for c, v in zip(columns, row))


# -- ClickHouse ------------------------------------------------------------------------------

FILLS_TABLE = "execution_fills"
ORDERS_TABLE = "execution_orders"


@dataclass(frozen=True)
class Column:
    name: str
    clickhouse: str
    arrow: str  # "string", "ts", "d18", "bps", "int64", "uint8", "uint32", "uint64"


_D18 = "Decimal(38, 18)"
_BPS = "Decimal(38, 8)"
_TS = "DateTime64(9, 'UTC')"

FILL_COLUMNS: tuple[Column, ...] = (
    Column("fill_id", "String", "string"),
    Column("order_id", "Nullable(String)", "string"),
    Column("account", "LowCardinality(String)", "string"),
    Column("symbol", "LowCardinality(String)", "string"),
    Column("venue", "LowCardinality(String)", "string"),
    Column("side", "LowCardinality(String)", "string"),
    Column("liquidity", "LowCardinality(String)", "string"),
    Column("ts", _TS, "ts"),
    Column("qty", _D18, "d18"),
    Column("price", _D18, "d18"),
    Column("fee", _D18, "d18"),
    Column("notional", _D18, "d18"),
    Column("arrival_ts", f"Nullable({_TS})", "ts"),
    Column("arrival_mid", f"Nullable({_D18})", "d18"),
    Column("arrival_notional", f"Nullable({_D18})", "d18"),
    Column("slippage_bps", f"Nullable({_BPS})", "bps"),
    Column("slippage_cost", f"Nullable({_D18})", "d18"),
    Column("mid_at_fill", f"Nullable({_D18})", "d18"),
    Column("effective_spread_bps", f"Nullable({_BPS})", "bps"),
    Column("mid_1s", f"Nullable({_D18})", "d18"),
    Column("mid_5s", f"Nullable({_D18})", "d18"),
    Column("mid_60s", f"Nullable({_D18})", "d18"),
    Column("markout_1s_bps", f"Nullable({_BPS})", "bps"),
    Column("markout_5s_bps", f"Nullable({_BPS})", "bps"),
    Column("markout_60s_bps", f"Nullable({_BPS})", "bps"),
    Column("complete", "UInt8", "uint8"),
    Column("version", "UInt64", "uint64"),
)

ORDER_COLUMNS: tuple[Column, ...] = (
    Column("order_id", "String", "string"),
    Column("account", "LowCardinality(String)", "string"),
    Column("symbol", "LowCardinality(String)", "string"),
    Column("venue", "LowCardinality(String)", "string"),
    Column("side", "LowCardinality(String)", "string"),
    Column("order_type", "LowCardinality(String)", "string"),
    Column("limit_price", f"Nullable({_D18})", "d18"),
    Column("status", "LowCardinality(String)", "string"),
    Column("qty", _D18, "d18"),
    Column("arrival_ts", _TS, "ts"),
    Column("end_ts", f"Nullable({_TS})", "ts"),
    Column("arrival_mid", f"Nullable({_D18})", "d18"),
    Column("fills", "UInt32", "uint32"),
    Column("filled_qty", _D18, "d18"),
    Column("unfilled_qty", _D18, "d18"),
    Column("fill_ratio", _D18, "d18"),
    Column("filled_notional", _D18, "d18"),
    Column("fees", _D18, "d18"),
    Column("avg_fill_price", f"Nullable({_D18})", "d18"),
    Column("first_fill_ts", f"Nullable({_TS})", "ts"),
    Column("last_fill_ts", f"Nullable({_TS})", "ts"),
    Column("time_to_first_fill_ns", "Nullable(Int64)", "int64"),
    Column("time_to_last_fill_ns", "Nullable(Int64)", "int64"),
    Column("market_vwap", f"Nullable({_D18})", "d18"),
    Column("market_volume", f"Nullable({_D18})", "d18"),
    Column("vwap_slippage_bps", f"Nullable({_BPS})", "bps"),
    Column("unfilled_price", f"Nullable({_D18})", "d18"),
    Column("unfilled_price_ts", f"Nullable({_TS})", "ts"),
    Column("benchmark_notional", f"Nullable({_D18})", "d18"),
    Column("execution_cost", f"Nullable({_D18})", "d18"),
    Column("opportunity_cost", f"Nullable({_D18})", "d18"),
    Column("implementation_shortfall", f"Nullable({_D18})", "d18"),
    Column("implementation_shortfall_bps", f"Nullable({_BPS})", "bps"),
    Column("is_final", "UInt8", "uint8"),
    Column("version", "UInt64", "uint64"),
)


def schema_sql(database: str) -> list[str]:
    """DDL of the two result tables: upserts keyed by id, newest `version` wins.

    Fills are partitioned by month of the fill's time (immutable per fill, so a fill's
    rewrites always meet in one partition and deduplicate)."""

    def columns(cols: tuple[Column, ...]) -> str:
        return ",\n  ".join(f"{c.name} {c.clickhouse}" for c in cols)

    return [
        f"CREATE DATABASE IF NOT EXISTS {database}",
        f"CREATE TABLE IF NOT EXISTS {database}.{FILLS_TABLE} (\n  {columns(FILL_COLUMNS)}\n) "
        "ENGINE = ReplacingMergeTree(version) PARTITION BY toYYYYMM(ts) ORDER BY (account, symbol, fill_id)",
        f"CREATE TABLE IF NOT EXISTS {database}.{ORDERS_TABLE} (\n  {columns(ORDER_COLUMNS)}\n) "
        "ENGINE = ReplacingMergeTree(version) ORDER BY (account, symbol, order_id)",
    ]


def arrow_table(columns: tuple[Column, ...], rows: list[tuple]):
    """Rows (tuples in column order) as a pyarrow Table for one batched insert.

    Raises (pyarrow.ArrowInvalid) when a value does not fit its column exactly; see
    `rows_to_arrow` for the forgiving version."""
    import pyarrow as pa

    types = {
        "string": pa.string(),
        "ts": pa.timestamp("ns", tz="UTC"),
        "d18": pa.decimal128(38, STORE_PLACES),
        "bps": pa.decimal128(38, tca.BPS_PLACES),
        "int64": pa.int64(),
        "uint8": pa.uint8(),
        "uint32": pa.uint32(),
        "uint64": pa.uint64(),
    }
    values = list(zip(*rows)) if rows else [()] * len(columns)
    return pa.table({c.name: pa.array(values[i], type=types[c.arrow]) for i, c in enumerate(columns)})


@dataclass
class SinkStats:
    fill_rows: int = 0
    order_rows: int = 0
    writes: int = 0
    write_errors: int = 0
    consecutive_failures: int = 0  # failed attempts since the last successful insert
    last_error: str | None = None
    last_write_seconds: float = 0.0
    write_seconds_total: float = 0.0


class ExecutionSink:
    """Writes the tracker's changed fills and orders to ClickHouse: batched, retried,
    off the agents' path.

    Why the agents do not wait for ClickHouse: the fills and orders tables are the
    truth and the ClickHouse rows a projection of them. An agent's commit makes its
    table changes durable (the changelog) before it acknowledges; this writer then
    turns the changed entries into rows, one insert per table for everything changed
    since its last write (every `interval_s`, sooner once `batch_rows` wait). If the
    process dies before a change reached ClickHouse, the next start rewrites every
    entry the tables hold (`ExecutionTracker.reevaluate_all`), and pruning never
    forgets an entry whose row is not written yet. So every acknowledged event's rows
    reach ClickHouse, and inserts are as large as the backlog instead of two small ones
    per agent batch (an embedded chdb insert costs ~10-50 ms whatever its size).

    Backpressure: `after_batch` holds an agent (its batch unacknowledged, the server
    told it is in progress) while more than `max_unwritten` rows wait, e.g. while
    ClickHouse is down; a failing write is retried with back-off, never dropped.
    """

    BACKOFF_S = (0.2, 0.5, 1, 2, 5, 10)

    def __init__(
        self,
        tracker: ExecutionTracker,
        database: str,
        *,
        interval_s: float = 1.0,
        batch_rows: int = 1000,
        max_unwritten: int = 100_000,
    ):
        self.tracker = tracker
        self.database = database
        self.interval_s = interval_s
        self.batch_rows = batch_rows
        self.max_unwritten = max_unwritten
        self.store: ClickHouseStore | None = None
        self.stats = SinkStats()
        self._lock = asyncio.Lock()
        self._last_version = 0
        self._attached = asyncio.Event()
        self._wake = asyncio.Event()
        self._written = asyncio.Event()
        self._task: asyncio.Task | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def attach(self, store: ClickHouseStore) -> None:
        self.store = store
        self._attached.set()
        self._wake.set()

    def detach(self) -> None:
        self.store = None
        self._attached.clear()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="execution:writer")

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop the writer, then try once more to write what is left (a restart
        rewrites it anyway when ClickHouse does not answer in time)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self.store is not None:
            try:
                await asyncio.wait_for(self.flush(), timeout)
            except (asyncio.TimeoutError, Exception):
                log.warning("the last ClickHouse write did not finish; the next start rewrites it")

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.interval_s)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            try:
                await self.flush()
            except asyncio.CancelledError:
                raise
            except Exception:  # flush retries ClickHouse itself: this is a bug, keep writing
                log.exception("execution writer failed")
                await asyncio.sleep(self.BACKOFF_S[-1])

    def unwritten(self) -> int:
        t = self.tracker
        return len(t.dirty_fills) + len(t.dirty_orders) + len(t.writing_fills) + len(t.writing_orders)

    async def after_batch(self, stream: Stream) -> None:
        """An agent's batch is handled: wake the writer when enough rows wait, and hold
        the agent while too many do."""
        if self.unwritten() >= self.batch_rows:
            self._wake.set()
        while self.unwritten() > self.max_unwritten:
            self._wake.set()
            await stream.keep_alive()
            self._written.clear()
            try:
                await asyncio.wait_for(self._written.wait(), timeout=5)
            except asyncio.TimeoutError:
                pass

    # -- writing ---------------------------------------------------------------------------

    async def _wait_for_store(self) -> ClickHouseStore:
        """Until ClickHouse is connected (start-up): not an error, just a wait."""
        while self.store is None:
            await self._attached.wait()
        return self.store

    def _next_version(self) -> int:
        self._last_version = max(self._last_version + 1, time.time_ns())
        return self._last_version

    def _rows(self, ids: Iterable[str], build: Callable[[str, int], tuple | None], version: int) -> list[tuple]:
        rows = []
        for key in ids:
            row = build(key, version)
            if row is not None:
                rows.append(row)
        return rows

    def rows_to_arrow(self, columns: tuple[Column, ...], rows: list[tuple]):
        """One Arrow table for the rows. Nearly always every exact value fits its column
        and the fast path holds; otherwise each row is made to fit (`storable_row`) and
        a row that cannot be is left out, counted and logged."""
        try:
            return arrow_table(columns, rows)
        except (ArithmeticError, ValueError, TypeError):  # pyarrow's errors derive from these
            pass
        fitted = []
        for row in rows:
            try:
                fitted.append(storable_row(columns, row))
            except ValueError:
                self.tracker.stats.rows_rejected += 1
                log.error("execution row %s cannot be written: %s", row[0], row)
        return arrow_table(columns, fitted)

    async def flush(self) -> None:
        """Write every changed fill and order now; returns once they are written."""
        async with self._lock:
            fill_ids, order_ids = self.tracker.begin_write()
            if not fill_ids and not order_ids:
                return
            try:
                version = self._next_version()
                fills = self._rows(fill_ids, self.tracker.fill_row, version)
                orders = self._rows(order_ids, self.tracker.order_row, version)
                await self._write(fills, orders)
            except BaseException:
                self.tracker.abort_write()
                raise
            self.tracker.end_write()
            self._written.set()

    async def _write(self, fills: list[tuple], orders: list[tuple]) -> None:
        payload = []
        if fills:
            payload.append((FILLS_TABLE, self.rows_to_arrow(FILL_COLUMNS, fills)))
        if orders:
            payload.append((ORDERS_TABLE, self.rows_to_arrow(ORDER_COLUMNS, orders)))
        payload = [(table, data) for table, data in payload if data.num_rows]
        attempt = 0
        while payload:
            store = await self._wait_for_store()
            started = time.perf_counter()
            try:
                table, data = payload[0]
                await store.insert_arrow(f"{self.database}.{table}", data)
                payload.pop(0)
                elapsed = time.perf_counter() - started
                self.stats.writes += 1
                self.stats.last_write_seconds = elapsed
                self.stats.write_seconds_total += elapsed
                if table == FILLS_TABLE:
                    self.stats.fill_rows += data.num_rows
                else:
                    self.stats.order_rows += data.num_rows
                self.stats.consecutive_failures = 0
                attempt = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.stats.write_errors += 1
                self.stats.consecutive_failures += 1
                self.stats.last_error = f"{type(exc).__name__}: {exc}"
                delay = self.BACKOFF_S[min(attempt, len(self.BACKOFF_S) - 1)]
                attempt += 1
                log.warning("ClickHouse write failed (attempt %d), retrying in %ss: %s", attempt, delay, exc)
                await asyncio.sleep(delay)


# -- agents ------------------------------------------------------------------------------------


@dataclass
class ExecutionChannels:
    orders: Channel
    fills: Channel
    quotes: Channel
    market_trades: Channel


def register_agents(
    app: App,
    tracker: ExecutionTracker,
    sink: ExecutionSink,
    channels: ExecutionChannels,
    *,
    batch_size: int,
    within_s: float,
) -> None:
    """One agent per input stream. Each folds a batch into the tracker and wakes the
    waiters; asking for the next batch then commits the tables and acknowledges.
    ClickHouse rows follow from the tables (see `ExecutionSink`)."""

    async def finish(stream: Stream) -> None:
        tracker.resolve_due()
        await sink.after_batch(stream)

    @app.agent(channels.orders, name="orders")
    async def consume_orders(stream: Stream) -> None:
        async for records in stream.take_events(batch_size, within_s):
            for record in records:
                reason = unstorable_reason(record.value)
                if reason is not None:
                    await stream.dead_letter(record.delivery, reason)
                    continue
                tracker.on_order(record.value)
            await finish(stream)

    @app.agent(channels.fills, name="fills")
    async def consume_fills(stream: Stream) -> None:
        async for records in stream.take_events(batch_size, within_s):
            for record in records:
                reason = unstorable_reason(record.value)
                if reason is not None:
                    await stream.dead_letter(record.delivery, reason)
                    continue
                tracker.on_fill(record.value)
            await finish(stream)

    @app.agent(channels.quotes, name="quotes")
    async def consume_quotes(stream: Stream) -> None:
        async for records in stream.take_events(batch_size, within_s):
            for record in records:
                tracker.on_quote(record.value, record.seq)
            await finish(stream)

    @app.agent(channels.market_trades, name="market_trades")
    async def consume_market_trades(stream: Stream) -> None:
        async for records in stream.take_events(batch_size, within_s):
            for record in records:
                tracker.on_trade(record.value, record.seq)
            await finish(stream)


@dataclass
class MarkTracker:
    """Which symbols' latest mid or tape moved since open orders were last re-marked."""

    quote_marks: dict[str, int] = field(default_factory=dict)
    trade_marks: dict[str, int] = field(default_factory=dict)

    def moved(self, tracker: ExecutionTracker) -> set[str]:
        moved = set()
        for series, marks in ((tracker.quotes, self.quote_marks), (tracker.trades, self.trade_marks)):
            for symbol in series.symbols():
                watermark = series.watermark_of(symbol)
                if marks.get(symbol) != watermark:
                    marks[symbol] = watermark
                    moved.add(symbol)
        return moved
