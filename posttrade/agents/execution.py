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

Executions, corrections, busts, resends
---------------------------------------
The FILLS stream carries executions (NEW), amendments of them (CORRECT, BUST: each a
message of its own fill_id, naming the execution in `ref_fill_id`, directly or through
an earlier amendment of it) and openings (positions held before the feed: not
executions, ignored and counted). One rule for every metric:

* **A fill_id counts once**: its first arrival wins, and any later message with the
  same fill_id (a resend, however late, identical or not) changes nothing. Memory
  knows the fill_ids of the state it holds; the **ledger** (`execution_fill_ids` in
  ClickHouse: each fill_id's first stream sequence, what it amends and what became of
  it) knows every other. The fills agent asks it once per batch for the fill_ids
  memory cannot place. The same message again (a redelivery: same sequence) is not a
  resend: when the ledger has it but memory does not, a crash lost its state before
  the commit, and it is handled again.
* **An amendment is applied to the execution's state**, and everything derives from
  that state: a CORRECT replaces side, qty, price and fee (order, venue and liquidity
  when it gives them; a new order means a new arrival), so the fill's row is rebuilt
  from it and the orders it left and joined are recomputed from their executions; a
  BUST marks it busted: its row stays in ClickHouse with `busted = 1` (readers and the
  rollup leave it out) and its order is recomputed without it. The row of an amended
  fill or order ranks above every row written before the amendment (`row_version`).
* **An amendment whose execution has not arrived** waits, durably (the `amendments`
  table), and is applied when it does; amendments of one execution apply in stream
  order. One whose execution was busted, is an opening, has left the state
  (retention) or is of another account or symbol changes nothing and is counted.

State, writes and restarts
--------------------------
The tracker works on its own dictionaries (`fills`, `orders`, `book`, `tape`); the
changelog tables are their durable copy, and what reaches a table follows one rule:

    a fill's or order's state is copied to its table (persisted) only after the
    ClickHouse row built from that state is written.

So the changelog never holds a state newer than ClickHouse's row, and a restart has
nothing to rewrite: it loads the tables, rebuilds the series history (below) and the
waiting heaps, and writes only what then *progresses* (a value that has become
decidable). Before this rule the service rewrote every row it held at start, from a
changelog that could be older than ClickHouse (rows written, then the commit lost with
a crash or an agent's roll-back), and a final order briefly became unsettled again.
The tables also never see the agents' uncommitted work, so the runtime's roll-back of
a crashed agent has nothing of ours to undo: persisting happens outside any agent's
ownership (`_unowned`).

ClickHouse can still be *ahead* of the changelog after a crash (a write done, its
commit lost); the unacknowledged events then come again and re-derive the newer
states step by step. So that no step writes a row behind the stored one, every fill
and order loaded at start, or touched by an event that was in its stream before the
process started, is compared with its stored row (`progress`) before its first write
here; a row further along is kept (`hold`) until the state has caught up with it.

Who waits for ClickHouse: the orders and fills agents acknowledge a batch only after
its rows are in ClickHouse and its state is persisted (`ExecutionSink.write_through`:
one write, i.e. one insert per table, for everything changed so far). The quote and
trade agents persist the book and tape (which have no rows) at the end of each batch
and do not wait: what their events change in fills and orders (a decided mid, a
markout, a market VWAP) can be re-derived from the market-data history, which a
restart rebuilds; the writer writes it within `interval_s`, and the agents are held
only when more than `max_unwritten` rows wait (ClickHouse down).

Every handler is idempotent by content: a fill_id that came before changes nothing,
an order's NEW only sets the arrival once, a fill joins its order's aggregates once
(`fill_ids`), an amendment changes an order once (`amendment_ids`), a quote or trade
whose stream sequence is not above the symbol's recorded one is skipped.

The series history (the last `history_s` of points per symbol) is memory only. On
start it is rebuilt by replaying the QUOTES and TRADES streams from the sequence of
the oldest point kept (`history_from_seq`, recorded in the book/tape entry) up to the
last sequence applied.

Rows
----
`fill_row` / `order_row` build a row from a state; `ExecutionStore` owns the
ClickHouse tables (`ReplacingMergeTree(version)`, readers use `FINAL`), the
per-minute rollup the summary reads and the ledger of fill_ids. Each write carries a
`version`: a nanosecond clock, strictly increasing in the process, with bit 62
(`SETTLED`) set when the row is settled (a complete fill, a final order). A settled row
therefore always outranks an unsettled one: whatever path tried to write a less settled
row later (a replay, an operator's reset), readers keep seeing the settled one. Rows
of amended fills and orders rank by their amendment count first (`row_version`).

Every row carries its instrument's `currency` (the tracker's reference data): all its
money is in it. Nothing adds two currencies: a fee charged in another one (a fill's
`fee_currency`) stays out of the order's `fees` and shortfall (`fees_other`), and the
rollup has `currency` in its key (docs/execution_quality.md, "Currencies").
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import time
from bisect import bisect_right
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import msgspec

from ..core import execution as tca
from ..core.bounds import CLICKHOUSE_DECIMAL, CLICKHOUSE_PRECISION, CLICKHOUSE_SCALE
from ..core.exact import EXACT, ZERO
from ..core.reference import Reference
from ..stores.clickhouse import ClickHouseError
from ..streams.events import Fill, MarketTrade, Order, Quote
from ..streams.stream import current_agent, current_event
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
MINUTE_NS = 60 * NS

# Bit 62 of a row's `version`: the row is settled (a complete fill, a final order).
# Below it a nanosecond clock (< 2**62 until the year 2116). ReplacingMergeTree keeps
# the highest version, so no unsettled row can ever replace a settled one.
SETTLED = 1 << 62

# The row of an amended fill or order (a CORRECT or BUST applied) must outrank every row
# written before that amendment, settled or not, and rank by amendment count first:
# bit 63 set, the count in bits 53-62, the settled bit at 52, and a microsecond clock
# (< 2**52 until the year 2112) below. Rows without amendments keep the layout above, so
# rows written before amendments existed still compare as they did.
AMENDED = 1 << 63
_REVISION_SHIFT = 53
REVISION_MAX = (1 << 10) - 1  # amendments beyond this many rank by clock alone
_AMENDED_SETTLED = 1 << 52
_MICROS_MASK = (1 << 52) - 1


def row_version(clock: int, revision: int, settled: bool) -> int:
    """A row's `version` from the write's nanosecond clock, how many amendments its fill
    or order has had (`revision`) and whether it is settled (see SETTLED, AMENDED)."""
    if not revision:
        return clock | SETTLED if settled else clock
    version = AMENDED | min(revision, REVISION_MAX) << _REVISION_SHIFT | (clock // 1000 & _MICROS_MASK)
    return version | _AMENDED_SETTLED if settled else version

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
# (bps): 20 integer digits either way (core.bounds: every value an event carries fits).
STORE_PLACES = CLICKHOUSE_SCALE
_STORE_QUANTUM = Decimal(1).scaleb(-STORE_PLACES)
_STORE_LIMIT = Decimal(10) ** (CLICKHOUSE_PRECISION - CLICKHOUSE_SCALE)

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


class AppliedAmendment(msgspec.Struct, frozen=True, array_like=True):
    """A CORRECT or BUST applied to an execution."""

    fill_id: str  # the amendment's own fill_id
    seq: int  # its FILLS stream sequence (a redelivery of it has the same)
    exec_type: str  # "CORRECT" or "BUST"
    order_id: str | None  # the order the execution belonged to before it


class FillState(msgspec.Struct, frozen=True):
    """An execution: `fill` is the NEW message with the economics of its latest
    correction (its fill_id, account, symbol and ts never change)."""

    fill: Fill
    resolved: int = 0
    mid_at_fill: Decimal | None = None
    markout_mids: tuple[Decimal | None, Decimal | None, Decimal | None] = (None, None, None)
    arrival_ts: int | None = None
    arrival_mid: Decimal | None = None
    seq: int = 0  # FILLS stream sequence of the NEW message (0 in states persisted before it was kept)
    amendments: tuple[AppliedAmendment, ...] = ()  # in the order they were applied
    busted: bool = False

    @property
    def complete(self) -> bool:
        return self.resolved == FILL_ALL

    @property
    def revision(self) -> int:
        return len(self.amendments)

    def amendment(self, fill_id: str) -> AppliedAmendment:
        return next(a for a in self.amendments if a.fill_id == fill_id)


class WaitingAmendment(msgspec.Struct, frozen=True):
    """A CORRECT or BUST whose execution has not arrived yet (kept until it does)."""

    fill: Fill
    seq: int


class SeenFill(msgspec.Struct, frozen=True):
    """What the ledger keeps of a fill_id: its first arrival on the FILLS stream, the
    execution it is or amends, and what became of it (APPLIED, OPENING, AMENDS_*,
    MISMATCH)."""

    seq: int
    exec_type: str
    original_fill_id: str
    outcome: str


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
    fill_ids: tuple[str, ...] = ()  # the executions it holds (busted or moved ones leave)
    filled_qty: Decimal = ZERO
    filled_notional: Decimal = ZERO
    fees: Decimal = ZERO  # in the instrument's currency (states persisted before currencies: every fee)
    # Fees charged in another currency (a fill's `fee_currency`), by currency, sorted:
    # never added to `fees` nor to the shortfall (nothing adds two currencies).
    fees_other: tuple[tuple[str, Decimal], ...] = ()
    first_fill_ts: int | None = None
    last_fill_ts: int | None = None
    amendment_ids: tuple[str, ...] = ()  # the CORRECTs and BUSTs that changed its fills

    @property
    def revision(self) -> int:
        return len(self.amendment_ids)

    @property
    def known(self) -> bool:
        return self.arrival_ts is not None and self.side is not None and self.qty is not None

    @property
    def final(self) -> bool:
        return self.end_ts is not None and self.resolved == ORDER_ALL


_replace = msgspec.structs.replace


def _charge(
    fees: Decimal, fees_other: tuple[tuple[str, Decimal], ...], fill: Fill, currency: str
) -> tuple[Decimal, tuple[tuple[str, Decimal], ...]]:
    """An order's fees with `fill`'s added: to `fees` when it is charged in the order's
    `currency` (a fill without `fee_currency` is), else to its own currency's entry of
    `fees_other`."""
    fee_currency = fill.fee_currency
    if fee_currency is None or fee_currency == currency:
        return EXACT.add(fees, fill.fee), fees_other
    others = dict(fees_other)
    others[fee_currency] = EXACT.add(others.get(fee_currency, ZERO), fill.fee)
    return fees, tuple(sorted(others.items()))


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
    # Finished state held beyond which the oldest is forgotten before `retention_ns` is
    # up (0: no bound): what is held after retention_ns grows with the rate, and these
    # bound it whatever the rate (see `ExecutionTracker.prune`).
    max_fills: int = 50_000
    max_orders: int = 25_000


# What a message of the FILLS stream is, for the counters: its exec_type in lower case
# words ("fill" is an execution, NEW).
FILL_KINDS = {"NEW": "fill", "CORRECT": "correction", "BUST": "bust", "OPENING": "opening"}

# What became of a fill message the first time it came (SeenFill.outcome, and the reason
# a message that changed nothing is counted under).
APPLIED = "applied"  # an execution joined, or an amendment applied
OPENING = "opening"  # a position held before the feed: not an execution, no metric
AMENDS_OPENING = "amends_opening"  # an amendment of an opening: nothing to amend here
AMENDS_BUSTED = "amends_busted"  # the execution was busted before it
AMENDS_FORGOTTEN = "amends_forgotten"  # the execution left the state (retention) before it
MISMATCH = "mismatch"  # its account or symbol is not the execution's


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


def unstorable_reason(event: Fill | Order) -> str | None:
    """Why a fill or order can never be written to the Decimal(38, 18) columns, if so."""
    if isinstance(event, Fill):
        if event.exec_type in ("OPENING", "BUST"):
            return None  # their numbers are never stored: an opening is not measured, a bust removes
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


def minute_of(ts: int) -> int:
    """Start (epoch ns) of the minute `ts` falls in: the rollup row a fill counts in."""
    return ts - ts % MINUTE_NS


@contextlib.contextmanager
def _unowned() -> Iterator[None]:
    """Table writes that belong to no agent. Persisted states record rows already in
    ClickHouse: a crashed agent's roll-back must not take them back (the runtime rolls
    back the keys an agent wrote since its last commit)."""
    agent, event = current_agent.set(None), current_event.set(None)
    try:
        yield
    finally:
        current_event.reset(event)
        current_agent.reset(agent)


class ExecutionTracker:
    """The join of orders, fills, quotes and market trades (see the module docstring).

    Synchronous: agents call `on_*` for each event and `resolve_due()` after a batch.
    Changed fill and order ids collect in `changed_fills` / `changed_orders` until the
    writer takes them (`take_changes`), writes their rows and persists them (`persist`).
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
        self.quote_waits = _Waits()
        self.trade_waits = _Waits()
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
        merged = _merge_order(state, order)
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
            fees, fees_other = _charge(fees, fees_other, fill, currency)
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
        fees, fees_other = _charge(state.fees, state.fees_other, fill, self.reference.currency(state.symbol))
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
        if resolved & _MARKOUT_BITS != state.resolved & _MARKOUT_BITS:
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

    # -- rows -------------------------------------------------------------------------

    def fill_row(self, state: FillState, clock: int) -> tuple:
        """The ClickHouse row of a fill (FILL_COLUMNS order); `clock` is the write's
        version clock (see `row_version`: a busted fill's row is settled, nothing more
        can change it)."""
        f = state.fill
        qty, price, side = f.qty, f.price, f.side
        arrival_mid = state.arrival_mid
        slippage = cost = arrival_notional = None
        if arrival_mid is not None:
            slippage = tca.slippage_bps(side, price, arrival_mid)
            cost = tca.slippage_cost(side, qty, price, arrival_mid)
            arrival_notional = EXACT.multiply(qty, arrival_mid)
        mid = state.mid_at_fill
        spread = tca.effective_spread_bps(price, mid) if mid is not None else None
        m1, m5, m60 = state.markout_mids
        complete = state.complete
        currency = self.reference.currency(f.symbol)
        return (
            f.fill_id,
            f.order_id,
            f.account,
            f.symbol,
            currency,
            f.venue or "",
            side,
            f.liquidity or "",
            f.ts,
            qty,
            price,
            f.fee,
            f.fee_currency or currency,
            EXACT.multiply(qty, price),
            state.arrival_ts,
            arrival_mid,
            arrival_notional,
            slippage,
            cost,
            mid,
            spread,
            m1,
            m5,
            m60,
            tca.markout_bps(side, price, m1) if m1 is not None else None,
            tca.markout_bps(side, price, m5) if m5 is not None else None,
            tca.markout_bps(side, price, m60) if m60 is not None else None,
            1 if complete else 0,
            state.revision,
            1 if state.busted else 0,
            state.resolved,
            row_version(clock, state.revision, complete or state.busted),
        )

    def order_row(self, state: OrderState, clock: int) -> tuple | None:
        """The ClickHouse row of an order (ORDER_COLUMNS order), None before its NEW
        event is known; settled (`is_final`) rows carry the SETTLED bit in `version`."""
        if not state.known:
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
        final = state.final
        return (
            state.order_id,
            state.account,
            symbol,
            self.reference.currency(symbol),
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
            state.fees_other,
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
            1 if final else 0,
            state.revision,
            state.resolved,
            row_version(clock, state.revision, final),
        )

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
        with _unowned():
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
        with _unowned():
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
        if _covers(_fill_progress(state), stored):
            del self.held_fills[key]
            return True
        return False

    def writable_order(self, key: str, state: OrderState) -> bool:
        stored = self.held_orders.get(key)
        if stored is None:
            return True
        if _covers(_order_progress(state), stored):
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

        `history=False` keeps the series history whole (the writer is failing: values
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
        with _unowned():
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


# How far along a row is: (amendments applied, decided values as a bit mask, fills
# joined, ended). States only move forward in a process; after a restart one can start
# behind ClickHouse. An amendment can take fills away, so fills joined only count up
# within one revision.
Progress = tuple[int, int, int, bool]


def _fill_progress(state: FillState) -> Progress:
    return state.revision, state.resolved, 0, False


def _order_progress(state: OrderState) -> Progress:
    return state.revision, state.resolved, len(state.fill_ids), state.end_ts is not None


def _covers(progress: Progress, stored: Progress) -> bool:
    """Whether a row at `progress` has everything a row at `stored` has."""
    revision, mask, fills, ended = progress
    stored_revision, stored_mask, stored_fills, stored_ended = stored
    if revision != stored_revision:
        return revision > stored_revision
    return mask & stored_mask == stored_mask and fills >= stored_fills and (ended or not stored_ended)


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
    return tuple(
        _stored(v) if c.arrow == "d18" else tuple((k, _stored(x)) for k, x in v) if c.arrow == "d18_map" else v
        for c, v in zip(columns, row)
    )


# -- ClickHouse ------------------------------------------------------------------------------

FILLS_TABLE = "execution_fills"
ORDERS_TABLE = "execution_orders"
MINUTES_TABLE = "execution_fill_minutes"  # the per-minute rollup of the fills
FILL_IDS_TABLE = "execution_fill_ids"  # the ledger: every fill_id of the FILLS stream, once


@dataclass(frozen=True)
class Column:
    name: str
    clickhouse: str
    arrow: str  # "string", "ts", "d18", "d18_map" (currency -> d18), "bps", "int64", "uint8", ..., "uint64"


_D18 = CLICKHOUSE_DECIMAL
_BPS = "Decimal(38, 8)"
_TS = "DateTime64(9, 'UTC')"

FILL_COLUMNS: tuple[Column, ...] = (
    Column("fill_id", "String", "string"),
    Column("order_id", "Nullable(String)", "string"),
    Column("account", "LowCardinality(String)", "string"),
    Column("symbol", "LowCardinality(String)", "string"),
    Column("currency", "LowCardinality(String)", "string"),  # the instrument's (reference data)
    Column("venue", "LowCardinality(String)", "string"),
    Column("side", "LowCardinality(String)", "string"),
    Column("liquidity", "LowCardinality(String)", "string"),
    Column("ts", _TS, "ts"),
    Column("qty", _D18, "d18"),
    Column("price", _D18, "d18"),
    Column("fee", _D18, "d18"),
    Column("fee_currency", "LowCardinality(String)", "string"),  # the fill's, else the instrument's
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
    Column("amendments", "UInt16", "uint16"),  # CORRECTs and BUSTs applied
    Column("busted", "UInt8", "uint8"),  # 1: removed by a BUST (readers leave it out)
    Column("progress", "UInt8", "uint8"),  # FillState.resolved: which values are decided
    Column("version", "UInt64", "uint64"),
)

ORDER_COLUMNS: tuple[Column, ...] = (
    Column("order_id", "String", "string"),
    Column("account", "LowCardinality(String)", "string"),
    Column("symbol", "LowCardinality(String)", "string"),
    Column("currency", "LowCardinality(String)", "string"),  # the instrument's: every money column's
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
    Column("fees", _D18, "d18"),  # in `currency`
    Column("fees_other", f"Map(String, {_D18})", "d18_map"),  # fees charged in other currencies
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
    Column("amendments", "UInt16", "uint16"),  # CORRECTs and BUSTs that changed its fills
    Column("progress", "UInt8", "uint8"),  # OrderState.resolved: which values are decided
    Column("version", "UInt64", "uint64"),
)

# The ledger of fill_ids (first arrival wins, however late a resend comes): one row per
# message of the FILLS stream the first time it came, written with the rows it caused.
FILL_ID_COLUMNS: tuple[Column, ...] = (
    Column("fill_id", "String", "string"),
    Column("seq", "UInt64", "uint64"),  # FILLS stream sequence of its first arrival
    Column("exec_type", "LowCardinality(String)", "string"),
    Column("original_fill_id", "String", "string"),  # the execution it is, or amends
    Column("outcome", "LowCardinality(String)", "string"),  # APPLIED, OPENING, AMENDS_*, MISMATCH
    Column("version", "UInt64", "uint64"),
)


# The per-minute rollup of the fills the summary reads: (column, type, aggregate over
# the fills of one minute and one account / symbol / venue / side / currency). Sums and
# counts add up exactly across minutes; `slippage_values` keeps every slippage of the
# minute, so quantiles over any set of minutes are exact (`quantilesExactArray`). Money
# is in the row's `currency`, except `fees_other`: the fees charged in other currencies,
# by currency (never added to `fee`).
MINUTE_AGGREGATES: tuple[tuple[str, str, str], ...] = (
    ("fills", "UInt64", "count()"),
    ("qty", _D18, "sum(qty)"),
    ("notional", _D18, "sum(notional)"),
    ("fee", _D18, "sumIf(fee, fee_currency = currency)"),
    ("fees_other", f"Map(String, {_D18})", "sumMapIf(map(fee_currency, fee), fee_currency != currency)"),
    ("slippage_count", "UInt64", "count(slippage_bps)"),
    ("slippage_sum", _BPS, "ifNull(sum(slippage_bps), 0)"),
    ("slippage_values", f"Array({_BPS})", "groupArray(slippage_bps)"),  # NULLs are left out
    ("slippage_cost", _D18, "ifNull(sum(slippage_cost), 0)"),
    ("arrival_notional", _D18, "ifNull(sum(arrival_notional), 0)"),
    ("effective_spread_count", "UInt64", "count(effective_spread_bps)"),
    ("effective_spread_sum", _BPS, "ifNull(sum(effective_spread_bps), 0)"),
    ("markout_1s_count", "UInt64", "count(markout_1s_bps)"),
    ("markout_1s_sum", _BPS, "ifNull(sum(markout_1s_bps), 0)"),
    ("markout_5s_count", "UInt64", "count(markout_5s_bps)"),
    ("markout_5s_sum", _BPS, "ifNull(sum(markout_5s_bps), 0)"),
    ("markout_60s_count", "UInt64", "count(markout_60s_bps)"),
    ("markout_60s_sum", _BPS, "ifNull(sum(markout_60s_bps), 0)"),
)
# `currency` is a key: money of two currencies never shares a row (nothing adds them).
MINUTE_KEYS = ("account", "symbol", "venue", "side", "currency")

# The sorting key of each table (ClickHouse's spelling in system.tables): a table
# created by an older version with another key is migrated at start.
_SORTING_KEYS = {FILLS_TABLE: "ts, fill_id", ORDERS_TABLE: "arrival_ts, order_id",
                 MINUTES_TABLE: "minute, account, symbol, venue, side, currency", FILL_IDS_TABLE: "fill_id"}


def schema_sql(database: str) -> dict[str, str]:
    """CREATE TABLE statements of the four tables, by table name.

    Upserts keyed by id, the highest `version` wins (readers use FINAL). Fills and
    orders are sorted by their time (immutable per row) then id: inserts arrive in time
    order, so parts overlap only where rows were rewritten, and FINAL merges just those
    ranges instead of the whole table. Partitions are months of that time, so a row's
    versions always meet in one partition. The ledger is looked up by fill_id alone
    (a resend need not carry the original's time), so it is sorted by it."""

    def columns(cols: Iterable[tuple[str, str]]) -> str:
        return ",\n  ".join(f"{name} {kind}" for name, kind in cols)

    fills = ((c.name, c.clickhouse) for c in FILL_COLUMNS)
    orders = ((c.name, c.clickhouse) for c in ORDER_COLUMNS)
    minutes = (
        ("minute", "DateTime('UTC')"),
        *((key, "LowCardinality(String)") for key in MINUTE_KEYS),
        *((name, kind) for name, kind, _ in MINUTE_AGGREGATES),
        ("version", "UInt64"),
    )
    return {
        FILLS_TABLE: f"CREATE TABLE IF NOT EXISTS {database}.{FILLS_TABLE} (\n  {columns(fills)}\n) "
        f"ENGINE = ReplacingMergeTree(version) PARTITION BY toYYYYMM(ts) ORDER BY ({_SORTING_KEYS[FILLS_TABLE]})",
        ORDERS_TABLE: f"CREATE TABLE IF NOT EXISTS {database}.{ORDERS_TABLE} (\n  {columns(orders)}\n) "
        "ENGINE = ReplacingMergeTree(version) PARTITION BY toYYYYMM(arrival_ts) "
        f"ORDER BY ({_SORTING_KEYS[ORDERS_TABLE]})",
        MINUTES_TABLE: f"CREATE TABLE IF NOT EXISTS {database}.{MINUTES_TABLE} (\n  {columns(minutes)}\n) "
        "ENGINE = ReplacingMergeTree(version) PARTITION BY toYYYYMM(minute) "
        f"ORDER BY ({_SORTING_KEYS[MINUTES_TABLE]})",
        FILL_IDS_TABLE: f"CREATE TABLE IF NOT EXISTS {database}.{FILL_IDS_TABLE} (\n  "
        f"{columns((c.name, c.clickhouse) for c in FILL_ID_COLUMNS)}\n) "
        f"ENGINE = ReplacingMergeTree(version) ORDER BY {_SORTING_KEYS[FILL_IDS_TABLE]}",
    }


def _sql_string(value: str) -> str:
    """A ClickHouse string literal of `value` (symbols are free text)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def minute_ranges(minutes: Iterable[int]) -> list[tuple[int, int]]:
    """Minute starts (epoch ns) as sorted, merged `[start, end)` ranges."""
    ranges: list[tuple[int, int]] = []
    for start in sorted(set(minutes)):
        if ranges and ranges[-1][1] == start:
            ranges[-1] = (ranges[-1][0], start + MINUTE_NS)
        else:
            ranges.append((start, start + MINUTE_NS))
    return ranges


class ExecutionStore:
    """The service's ClickHouse tables: fills, orders, the per-minute rollup and the
    ledger of fill_ids.

    `refresh_minutes` recomputes the rollup rows of some minutes from the fills table
    (FINAL, so each fill counts once at its newest version; busted fills not at all)
    and writes them with a newer version: the rollup is always a function of the fills
    table, never a running total that a rewrite or a replay could double. The writer
    calls it after each fills insert, for the minutes that insert touched.

    `reference` gives the currency of the rows an older version wrote without one (see
    `_add_missing_columns`)."""

    def __init__(self, clickhouse: ClickHouseStore, database: str, reference: Reference | None = None):
        self.clickhouse = clickhouse
        self.database = database
        self.reference = reference or Reference()

    @property
    def location(self) -> str:
        return self.clickhouse.location

    async def ping(self) -> bool:
        return await self.clickhouse.ping()

    def table(self, name: str) -> str:
        return f"{self.database}.{name}"

    async def create_schema(self) -> None:
        """Create the database and tables if missing; migrate a table an older version
        created with another sorting key; fill a new rollup from the fills held."""
        ch = self.clickhouse
        try:
            await ch.command(f"CREATE DATABASE IF NOT EXISTS {self.database}")
        except ClickHouseError:
            # A server account without the right to create databases: fine if it exists.
            if not await ch.command(f"EXISTS DATABASE {self.database}"):
                raise
        existing = {
            name: key
            for name, key in (
                await ch.query(
                    "SELECT name, sorting_key FROM system.tables WHERE database = {db:String}", {"db": self.database}
                )
            ).rows
        }
        statements = schema_sql(self.database)
        for name, columns in ((FILLS_TABLE, FILL_COLUMNS), (ORDERS_TABLE, ORDER_COLUMNS)):
            if name in existing:
                await self._add_missing_columns(name, columns)
                if existing[name] != _SORTING_KEYS[name]:
                    await self._migrate(name, statements[name])
        for statement in statements.values():
            await ch.command(statement)
        if existing.get(MINUTES_TABLE, _SORTING_KEYS[MINUTES_TABLE]) != _SORTING_KEYS[MINUTES_TABLE]:
            # Other keys (before `currency`, say): the rollup is a function of the fills table.
            await self._rebuild_rollup(statements[MINUTES_TABLE])
        elif MINUTES_TABLE not in existing or existing.get(FILLS_TABLE) != _SORTING_KEYS[FILLS_TABLE]:
            await self._refresh(None, time.time_ns())  # the rollup of what the fills table already holds

    async def _add_missing_columns(self, name: str, columns: tuple[Column, ...]) -> None:
        """Add the columns a table created by an older version lacks (amendments, busted:
        0 for every row it has), each at its place in `columns`. The rows it has read
        `currency` as the reference data gives their symbol now, at the upgrade (the
        expression is the column's DEFAULT, fixed then), `fee_currency` as that currency
        (the older version did not record a fill's), `fees_other` empty."""
        defaults = {"currency": self._currency_of_symbol(), "fee_currency": "currency"}
        present = {
            column
            for (column,) in (
                await self.clickhouse.query(
                    "SELECT name FROM system.columns WHERE database = {db:String} AND table = {table:String}",
                    {"db": self.database, "table": name},
                )
            ).rows
        }
        for previous, column in zip(columns, columns[1:]):
            if column.name not in present:
                default = f" DEFAULT {defaults[column.name]}" if column.name in defaults else ""
                await self.clickhouse.command(
                    f"ALTER TABLE {self.table(name)} ADD COLUMN IF NOT EXISTS {column.name} {column.clickhouse}"
                    f"{default} AFTER {previous.name}"
                )

    def _currency_of_symbol(self) -> str:
        """SQL: the reference data's currency of the row's `symbol`."""
        reference = self.reference
        default = reference.default_base_currency
        named = {s: c for s in reference.instruments if (c := reference.currency(s)) != default}
        if not named:
            return _sql_string(default)
        symbols = ", ".join(map(_sql_string, named))
        currencies = ", ".join(map(_sql_string, named.values()))
        return f"transform(symbol, [{symbols}], [{currencies}], {_sql_string(default)})"

    async def _rebuild_rollup(self, create: str) -> None:
        """Recompute the whole rollup from the fills table into the current layout and
        swap it in (a crash before the swap leaves the old one, rebuilt at the next start)."""
        ch, target = self.clickhouse, self.table(MINUTES_TABLE)
        fresh = f"{MINUTES_TABLE}__rebuilding"
        log.warning("rebuilding %s with ORDER BY (%s) from %s", target, _SORTING_KEYS[MINUTES_TABLE], FILLS_TABLE)
        await ch.command(f"DROP TABLE IF EXISTS {self.table(fresh)}")
        await ch.command(f"DROP TABLE IF EXISTS {target}__old")
        await ch.command(create.replace(f"{target} (", f"{self.table(fresh)} (", 1))
        await self._refresh(None, time.time_ns(), into=fresh)
        await ch.command(f"RENAME TABLE {target} TO {target}__old, {self.table(fresh)} TO {target}")
        await ch.command(f"DROP TABLE {target}__old")

    async def _migrate(self, name: str, create: str) -> None:
        """Copy a table into the current layout, marking settled rows' versions."""
        ch, target, fresh = self.clickhouse, self.table(name), self.table(f"{name}__migrating")
        settled, everything = ("complete", FILL_ALL) if name == FILLS_TABLE else ("is_final", ORDER_ALL)
        columns = [c.name for c in (FILL_COLUMNS if name == FILLS_TABLE else ORDER_COLUMNS)]
        log.warning("migrating %s to ORDER BY (%s)", target, _SORTING_KEYS[name])
        await ch.command(f"DROP TABLE IF EXISTS {fresh}")
        await ch.command(create.replace(f"{target} (", f"{fresh} (", 1))
        # The old layout had no progress column: a settled row has decided everything.
        select = ", ".join(columns[:-2]) + (
            f", if({settled} = 1, {everything}, 0), if({settled} = 1, bitOr(version, {SETTLED}), version)"
        )
        await ch.command(f"INSERT INTO {fresh} ({', '.join(columns)}) SELECT {select} FROM {target}")
        await ch.command(f"RENAME TABLE {target} TO {target}__old, {fresh} TO {target}")
        await ch.command(f"DROP TABLE {target}__old")

    async def insert(self, name: str, data: Any) -> int:
        """One Arrow insert into `name` (FILLS_TABLE, ORDERS_TABLE or FILL_IDS_TABLE)."""
        return await self.clickhouse.insert_arrow(self.table(name), data)

    async def seen_fills(self, fill_ids: Iterable[str]) -> dict[str, SeenFill]:
        """The ledger's entries of these fill_ids (the first arrival of each)."""
        result = await self.clickhouse.query(
            "SELECT fill_id, min(seq), argMin(exec_type, seq), argMin(original_fill_id, seq), argMin(outcome, seq) "
            f"FROM {self.table(FILL_IDS_TABLE)} WHERE fill_id IN {{ids:Array(String)}} GROUP BY fill_id",
            {"ids": list(fill_ids)},
        )
        return {
            fill_id: SeenFill(seq=seq, exec_type=exec_type, original_fill_id=original, outcome=outcome)
            for fill_id, seq, exec_type, original, outcome in result.rows
        }

    async def stored_progress(
        self, fills: dict[str, int], orders: dict[str, int]
    ) -> tuple[dict[str, Progress], dict[str, Progress]]:
        """How far along the stored rows of these fills and orders (id -> time) are."""

        async def read(table: str, id_column: str, time_column: str, ids: dict[str, int], extra: str):
            if not ids:
                return []
            result = await self.clickhouse.query(
                f"SELECT {id_column}, amendments, progress{extra} FROM {self.table(table)} FINAL "
                f"WHERE {time_column} >= fromUnixTimestamp64Nano({{first:Int64}}, 'UTC') "
                f"AND {time_column} <= fromUnixTimestamp64Nano({{last:Int64}}, 'UTC') "
                f"AND {id_column} IN {{ids:Array(String)}}",
                {"first": min(ids.values()), "last": max(ids.values()), "ids": list(ids)},
            )
            return result.rows

        stored_fills = {
            key: (revision, progress, 0, False)
            for key, revision, progress in await read(FILLS_TABLE, "fill_id", "ts", fills, "")
        }
        stored_orders = {
            key: (revision, progress, joined, bool(ended))
            for key, revision, progress, joined, ended in await read(
                ORDERS_TABLE, "order_id", "arrival_ts", orders, ", fills, end_ts IS NOT NULL"
            )
        }
        return stored_fills, stored_orders

    async def refresh_minutes(self, minutes: Iterable[int], version: int) -> None:
        """Recompute the rollup rows of these minutes (epoch-ns starts)."""
        ranges = minute_ranges(minutes)
        if ranges:
            await self._refresh(ranges, version)

    async def _refresh(self, ranges: list[tuple[int, int]] | None, version: int, into: str = MINUTES_TABLE) -> None:
        """Recompute the rollup rows of these minutes (None: all) in the rollup table
        `into`. A group whose fills all left it (busted, or corrected to another side or
        venue) gets a row of zeros: recomputing only the groups that still have fills
        would leave its old row."""

        def within(column: str) -> str:
            if ranges is None:
                return ""
            # Integers computed here, not user input: inlined, and the primary key (time
            # first) narrows the read to these minutes.
            return " AND (" + " OR ".join(
                f"({column} >= fromUnixTimestamp64Nano(toInt64({start}), 'UTC') "
                f"AND {column} < fromUnixTimestamp64Nano(toInt64({end}), 'UTC'))"
                for start, end in ranges
            ) + ")"

        names = ", ".join(name for name, _, _ in MINUTE_AGGREGATES)
        aggregates = ", ".join(expr for _, _, expr in MINUTE_AGGREGATES)
        empty = {"Array": "[]", "Map(": "map()"}
        zeros = ", ".join(
            f"CAST({next((v for k, v in empty.items() if kind.startswith(k)), 0)} AS {kind})"
            for _, kind, _ in MINUTE_AGGREGATES
        )
        keys = ", ".join(MINUTE_KEYS)
        fills = f"{self.table(FILLS_TABLE)} FINAL WHERE busted = 0{within('ts')}"
        await self.clickhouse.command(
            f"INSERT INTO {self.table(into)} (minute, {keys}, {names}, version) "
            f"SELECT toStartOfMinute(ts) AS minute, {keys}, {aggregates}, toUInt64({int(version)}) "
            f"FROM {fills} GROUP BY minute, {keys} "
            f"UNION ALL SELECT minute, {keys}, {zeros}, toUInt64({int(version)}) "
            f"FROM {self.table(into)} FINAL WHERE fills > 0{within('minute')} "
            f"AND (minute, {keys}) NOT IN (SELECT toStartOfMinute(ts), {keys} FROM {fills})"
        )


def arrow_table(columns: tuple[Column, ...], rows: list[tuple]):
    """Rows (tuples in column order) as a pyarrow Table for one batched insert.

    Raises (pyarrow.ArrowInvalid) when a value does not fit its column exactly; see
    `rows_to_arrow` for the forgiving version."""
    import pyarrow as pa

    types = {
        "string": pa.string(),
        "ts": pa.timestamp("ns", tz="UTC"),
        "d18": pa.decimal128(38, STORE_PLACES),
        "d18_map": pa.map_(pa.string(), pa.decimal128(38, STORE_PLACES)),
        "bps": pa.decimal128(38, tca.BPS_PLACES),
        "int64": pa.int64(),
        "uint8": pa.uint8(),
        "uint16": pa.uint16(),
        "uint32": pa.uint32(),
        "uint64": pa.uint64(),
    }
    values = list(zip(*rows)) if rows else [()] * len(columns)
    return pa.table({c.name: pa.array(values[i], type=types[c.arrow]) for i, c in enumerate(columns)})


@dataclass
class SinkStats:
    fill_rows: int = 0
    order_rows: int = 0
    writes: int = 0  # inserts and rollup refreshes that succeeded
    write_errors: int = 0
    consecutive_failures: int = 0  # failed attempts since the last successful one
    last_error: str | None = None
    last_write_seconds: float = 0.0  # the last whole write (inserts and refresh)
    write_seconds_total: float = 0.0
    rows_held: int = 0  # rows not written: ClickHouse has them further along (after a restart)


class ExecutionSink:
    """Writes changed fills and orders to ClickHouse, then persists them.

    One writer task does every write, so writes never overlap and each one takes
    everything changed so far (`ExecutionTracker.take_changes`): rows built from those
    states, one Arrow insert per table, then the states persisted to the tables
    (`ExecutionTracker.persist`). A write runs when an agent asks for one
    (`write_through`), when `batch_rows` changes wait, or every `interval_s`. A failing
    step is retried with back-off, never dropped; the steps already done are not
    repeated.

    The per-minute rollup follows the fills table at most `interval_s` behind: the
    minutes a write touched become stale, and the writer refreshes all stale minutes in
    one statement once per `interval_s` (not once per write: a busy minute is
    recomputed once a second, not once per batch). Should the process die first, the
    restart refreshes the minutes of every fill it holds, and retention keeps the fills
    of stale minutes.

    `write_through` is how the orders and fills agents acknowledge only what is in
    ClickHouse: it returns once a write that started after the call has finished (it
    covers every change made before the call), telling the server the agent's batch
    is in progress while it waits. `after_market_batch` is the quote and trade agents'
    end of batch: persist the book and tape, wake the writer when enough rows wait,
    and hold the agent while more than `max_unwritten` do (ClickHouse down).
    """

    BACKOFF_S = (0.2, 0.5, 1, 2, 5, 10)
    KEEP_ALIVE_S = 5.0  # how often a waiting agent tells the server its batch is in progress

    def __init__(
        self,
        tracker: ExecutionTracker,
        *,
        interval_s: float = 1.0,
        batch_rows: int = 1000,
        max_unwritten: int = 100_000,
    ):
        self.tracker = tracker
        self.interval_s = interval_s
        self.batch_rows = batch_rows
        self.max_unwritten = max_unwritten
        self.store: ExecutionStore | None = None
        self.stats = SinkStats()
        self.stale_minutes: set[int] = set()  # rollup minutes to refresh (epoch-ns starts)
        self._last_refresh = 0.0
        self._last_clock = 0
        self._attached = asyncio.Event()
        self._wake = asyncio.Event()
        self._written = asyncio.Event()
        self._lock = asyncio.Lock()
        # Resolved by the next write to take its changes: what `write_through` waits for.
        self._next_write: asyncio.Future | None = None
        self._task: asyncio.Task | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def attach(self, store: ExecutionStore) -> None:
        self.store = store
        self._attached.set()
        self._wake.set()

    def detach(self) -> None:
        self.store = None
        self._attached.clear()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="execution:writer")

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop the writer, then try once more to write what is left (what does not
        make it is not persisted either: a restart re-derives it)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self.store is not None:
            try:
                await asyncio.wait_for(self.flush(), timeout)
                await asyncio.wait_for(self.refresh_rollup(), timeout)
            except (asyncio.TimeoutError, Exception):
                log.warning("the last ClickHouse write did not finish; a restart re-derives it")
        if self._next_write is not None and not self._next_write.done():
            self._next_write.cancel()

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.interval_s)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            try:
                await self.flush()
                if self.stale_minutes and time.monotonic() - self._last_refresh >= self.interval_s:
                    await self.refresh_rollup()
            except asyncio.CancelledError:
                raise
            except Exception:  # flush retries ClickHouse itself: this is a bug, keep writing
                log.exception("execution writer failed")
                await asyncio.sleep(self.BACKOFF_S[-1])

    def unwritten(self) -> int:
        return self.tracker.unwritten()

    # -- what the agents call ------------------------------------------------------------------

    async def write_through(self, stream: Stream | None = None) -> None:
        """Return once every change made before this call is written and persisted."""
        if self._next_write is None:
            self._next_write = asyncio.get_running_loop().create_future()
        done = self._next_write
        self._wake.set()
        while not done.done():
            finished, _ = await asyncio.wait({done}, timeout=self.KEEP_ALIVE_S)
            if not finished and stream is not None:
                await stream.keep_alive()
        done.result()

    async def look_up(self, fill_ids: set[str], stream: Stream | None = None) -> dict[str, SeenFill]:
        """The ledger's entries of these fill_ids, telling the server the agent's batch
        is in progress while ClickHouse is slow or not connected yet."""
        lookup = asyncio.ensure_future(self._retrying("fill_id lookup", lambda store: store.seen_fills(fill_ids)))
        try:
            while True:
                finished, _ = await asyncio.wait({lookup}, timeout=self.KEEP_ALIVE_S)
                if finished:
                    return lookup.result()
                if stream is not None:
                    await stream.keep_alive()
        finally:
            lookup.cancel()

    async def after_market_batch(self, stream: Stream) -> None:
        self.tracker.persist_market()
        if self.unwritten() >= self.batch_rows:
            self._wake.set()
        while self.unwritten() > self.max_unwritten:
            self._wake.set()
            await stream.keep_alive()
            self._written.clear()
            try:
                await asyncio.wait_for(self._written.wait(), timeout=self.KEEP_ALIVE_S)
            except asyncio.TimeoutError:
                pass

    # -- writing ---------------------------------------------------------------------------

    def _clock(self) -> int:
        """A nanosecond clock, strictly increasing in the process (below bit 62), by at
        least a microsecond per write: amended rows carry it in microseconds."""
        self._last_clock = max(self._last_clock + 1000, time.time_ns())
        return self._last_clock

    async def flush(self) -> None:
        """Write everything changed now; returns once it is written and persisted."""
        async with self._lock:
            waiting, self._next_write = self._next_write, None
            taken = self.tracker.take_changes()
            try:
                if taken:
                    await self._write(taken)
            except BaseException:
                self.tracker.restore_changes(taken)
                if waiting is not None:  # the next write covers them
                    self._hand_over(waiting)
                raise
            self.tracker.persist(taken)
            if waiting is not None and not waiting.done():
                waiting.set_result(None)
            self._written.set()

    async def refresh_rollup(self) -> None:
        """Recompute the stale rollup minutes from the fills table (one statement)."""
        async with self._lock:
            minutes = set(self.stale_minutes)
            if minutes:
                clock = self._clock()
                await self._retrying("rollup refresh", lambda store: store.refresh_minutes(minutes, clock))
                self.stale_minutes -= minutes
            self._last_refresh = time.monotonic()

    def _hand_over(self, waiting: asyncio.Future) -> None:
        if self._next_write is None:
            self._next_write = waiting
        else:
            self._next_write.add_done_callback(lambda f: waiting.done() or waiting.set_result(None))

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

    async def _write(self, taken: PendingWrite) -> None:
        tracker = self.tracker
        started = time.perf_counter()
        unverified = tracker.unverified(taken)
        if unverified[0] or unverified[1]:
            # After a restart: never write over a row ClickHouse has further along.
            stored = await self._retrying("read", lambda store: store.stored_progress(*unverified))
            tracker.hold(unverified, *stored)
        clock = self._clock()
        written = [st for key, st in taken.fills.items() if tracker.writable_fill(key, st)]
        order_states = [st for key, st in taken.orders.items() if tracker.writable_order(key, st)]
        self.stats.rows_held += len(taken.fills) - len(written) + len(taken.orders) - len(order_states)
        fills = [tracker.fill_row(st, clock) for st in written]
        orders = [row for row in (tracker.order_row(st, clock) for st in order_states) if row is not None]
        steps: list[tuple[str, Callable[[ExecutionStore], Any]]] = []
        if fills:
            data = self.rows_to_arrow(FILL_COLUMNS, fills)
            steps.append((FILLS_TABLE, lambda store: store.insert(FILLS_TABLE, data)))
        if orders:
            order_data = self.rows_to_arrow(ORDER_COLUMNS, orders)
            steps.append((ORDERS_TABLE, lambda store: store.insert(ORDERS_TABLE, order_data)))
        if taken.seen:
            seen_data = arrow_table(FILL_ID_COLUMNS, [
                (fill_id, seen.seq, seen.exec_type, seen.original_fill_id, seen.outcome, clock)
                for fill_id, seen in taken.seen.items()
            ])
            steps.append((FILL_IDS_TABLE, lambda store: store.insert(FILL_IDS_TABLE, seen_data)))
        for table, step in steps:
            await self._retrying(f"write to {table}", step)
        self.stale_minutes.update(minute_of(st.fill.ts) for st in written)
        elapsed = time.perf_counter() - started
        self.stats.fill_rows += len(fills)
        self.stats.order_rows += len(orders)
        self.stats.last_write_seconds = elapsed
        self.stats.write_seconds_total += elapsed

    async def _retrying(self, what: str, step: Callable[[ExecutionStore], Any]) -> Any:
        """Run one ClickHouse step until it succeeds, backing off between attempts."""
        attempt = 0
        while True:
            store = await self._wait_for_store()
            try:
                result = await step(store)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.stats.write_errors += 1
                self.stats.consecutive_failures += 1
                self.stats.last_error = f"{type(exc).__name__}: {exc}"
                delay = self.BACKOFF_S[min(attempt, len(self.BACKOFF_S) - 1)]
                attempt += 1
                log.warning("ClickHouse %s failed (attempt %d), retrying in %ss: %s", what, attempt, delay, exc)
                await asyncio.sleep(delay)
                continue
            self.stats.writes += 1
            self.stats.consecutive_failures = 0
            return result

    async def _wait_for_store(self) -> ExecutionStore:
        """Until ClickHouse is connected (start-up): not an error, just a wait."""
        while self.store is None:
            await self._attached.wait()
        return self.store


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
    market_within_s: float | None = None,
) -> None:
    """One agent per input stream; each folds a batch into the tracker and wakes the
    waiters, and asking for the next batch commits the tables and acknowledges.

    Orders and fills: the batch's rows are written to ClickHouse and persisted before
    the commit (`write_through`): one insert per table per batch, or fewer when
    concurrent batches share a write. `within_s` is how long they gather a batch.
    Quotes and trades: their book and tape entries are persisted at the end of the
    batch; the rows they change follow with the writer (see the module docstring).
    `market_within_s` (default `within_s`) keeps the join current on quiet streams.
    """
    market_within_s = within_s if market_within_s is None else market_within_s

    async def storable(stream: Stream, records) -> list:
        kept = []
        for record in records:
            reason = unstorable_reason(record.value)
            if reason is not None:
                await stream.dead_letter(record.delivery, reason)
            else:
                kept.append(record)
        return kept

    @app.agent(channels.orders, name="orders")
    async def consume_orders(stream: Stream) -> None:
        async for records in stream.take_events(batch_size, within_s):
            replayed_up_to = tracker.replayed_up_to.get("orders", 0)
            for record in await storable(stream, records):
                tracker.on_order(record.value, record.seq <= replayed_up_to)
            tracker.resolve_due()
            await sink.write_through(stream)

    @app.agent(channels.fills, name="fills")
    async def consume_fills(stream: Stream) -> None:
        async for records in stream.take_events(batch_size, within_s):
            replayed_up_to = tracker.replayed_up_to.get("fills", 0)
            records = await storable(stream, records)
            # Whether the fill_ids memory cannot place came before: one ledger read per batch.
            unknown = tracker.unknown_ids(record.value for record in records)
            if unknown:
                tracker.recorded.update(await sink.look_up(unknown, stream))
            for record in records:
                tracker.on_fill(record.value, record.seq, record.seq <= replayed_up_to)
            tracker.resolve_due()
            await sink.write_through(stream)
            tracker.end_fills_batch()

    @app.agent(channels.quotes, name="quotes")
    async def consume_quotes(stream: Stream) -> None:
        async for records in stream.take_events(batch_size, market_within_s):
            for record in records:
                tracker.on_quote(record.value, record.seq)
            tracker.resolve_due()
            await sink.after_market_batch(stream)

    @app.agent(channels.market_trades, name="market_trades")
    async def consume_market_trades(stream: Stream) -> None:
        async for records in stream.take_events(batch_size, market_within_s):
            for record in records:
                tracker.on_trade(record.value, record.seq)
            tracker.resolve_due()
            await sink.after_market_batch(stream)


async def start_tracker(app: App, tracker: ExecutionTracker, channels: ExecutionChannels) -> None:
    """What a (re)start does before the agents run: load the state the tables kept,
    note where the trading streams end (events up to there may be redeliveries whose
    rows a previous process wrote: compared before they are written), rebuild the
    market-data history, then the waiting heaps. Nothing is rewritten as it was."""
    tracker.load()
    for kind, channel in (("orders", channels.orders), ("fills", channels.fills)):
        tracker.replayed_up_to[kind] = (await app.transport.stream_state(channel.stream.name)).last_seq
    await tracker.rebuild_history(app, channels.quotes, channels.market_trades)
    tracker.reevaluate_all()


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
