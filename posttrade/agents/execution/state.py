"""The execution-quality join's values: what the tracker holds for each fill, order and
symbol (the changelog tables' values), the decided-value bits, and the rules on them that
need nothing else (an order event folded in, fees by currency, how far along a state is).
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import msgspec

from ...core.exact import EXACT, ZERO
from ...streams.events import Fill, Order

NS = 1_000_000_000
MARKOUT_HORIZONS: tuple[tuple[str, int], ...] = (("1s", 1 * NS), ("5s", 5 * NS), ("60s", 60 * NS))
MINUTE_NS = 60 * NS


def minute_of(ts: int) -> int:
    """Start (epoch ns) of the minute `ts` falls in: the rollup row a fill counts in."""
    return ts - ts % MINUTE_NS


# FillState.resolved bits: which inputs are decided (a decided value may be None).
FILL_MID = 1
FILL_MARKOUTS = (2, 4, 8)
FILL_ARRIVAL = 16
MARKOUT_BITS = FILL_MARKOUTS[0] | FILL_MARKOUTS[1] | FILL_MARKOUTS[2]
FILL_ALL = FILL_MID | MARKOUT_BITS | FILL_ARRIVAL

# OrderState.resolved bits.
ORDER_ARRIVAL_MID = 1
ORDER_ARRIVAL_TAPE = 2
ORDER_END_MID = 4
ORDER_END_TAPE = 8
ORDER_ALL = ORDER_ARRIVAL_MID | ORDER_ARRIVAL_TAPE | ORDER_END_MID | ORDER_END_TAPE

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


def charge(
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


def merge_order(state: OrderState | None, order: Order) -> OrderState:
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


# How far along a row is: (amendments applied, decided values as a bit mask, fills
# joined, ended). States only move forward in a process; after a restart one can start
# behind ClickHouse. An amendment can take fills away, so fills joined only count up
# within one revision.
Progress = tuple[int, int, int, bool]


def fill_progress(state: FillState) -> Progress:
    return state.revision, state.resolved, 0, False


def order_progress(state: OrderState) -> Progress:
    return state.revision, state.resolved, len(state.fill_ids), state.end_ts is not None


def covers(progress: Progress, stored: Progress) -> bool:
    """Whether a row at `progress` has everything a row at `stored` has."""
    revision, mask, fills, ended = progress
    stored_revision, stored_mask, stored_fills, stored_ended = stored
    if revision != stored_revision:
        return revision > stored_revision
    return mask & stored_mask == stored_mask and fills >= stored_fills and (ended or not stored_ended)
