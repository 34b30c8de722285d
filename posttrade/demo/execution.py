"""A simple execution simulator: orders filled against the current (synthetic) quotes.

* A market order, or the marketable part of a limit order, takes liquidity: it walks a
  book built from the quote (the touch with the quoted size, then deeper levels one tick
  apart with more size each), one fill per level, never beyond its limit price. Now and
  then the touch has moved one tick away by the time the order arrives (latency), so
  takers pay some slippage beyond the spread. What a market order cannot get within
  `depth_levels` levels is cancelled (a price collar), so some orders stay partly filled.
* The rest of a limit order rests at its limit price and is filled as a maker: when the
  quote moves through it, when a print on the tape trades at its price, or now and then
  while it sits at the touch (the queue ahead of it traded). It is cancelled when its
  time to live runs out, partly filled or not at all.

Every order emits NEW at arrival, its fills, and a terminal FILLED or CANCELED event;
fill quantities of an order never add up to more than its quantity, taker fills are at
or beyond the touch of the quote they executed against (and within the limit), maker
fills are at the limit price. Fees are the instrument's (`market.Fees`): for the US
equities a per-share fee for taking and a rebate (negative fee) for making; a fill
charged in another currency than the instrument's says so (`fee_currency`). Prices are
integer ticks and quantities integer units of the instrument's grid (`SymbolBook`), so
every fill is exactly on it. All randomness comes from the generator passed in, so a
seed reproduces it.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec

from ..streams.events import Fill, MarketTrade, Order
from .market import SMART_ROUTER_VENUES, US_EQUITY_FEES, SymbolBook

TAKER_FEE_PER_SHARE = US_EQUITY_FEES.taker
MAKER_FEE_PER_SHARE = US_EQUITY_FEES.maker  # a rebate

_US = 1_000  # ns


@dataclass
class WorkingOrder:
    """An order with quantity left that rests at its limit price."""

    order: Order  # the NEW event
    book: SymbolBook  # its symbol's market (and grids)
    limit_ticks: int
    expires_at: int  # ns: cancelled then
    filled: int = 0  # in units of the instrument's qty_step
    fills: list[Fill] = field(default_factory=list)

    @property
    def qty(self) -> int:
        return self.book.units(self.order.qty)

    @property
    def remaining(self) -> int:
        return self.qty - self.filled

    def is_buy(self) -> bool:
        return self.order.side == "BUY"


class ExecutionSimulator:
    def __init__(
        self,
        rng: random.Random,
        next_fill_id: Callable[[], str],
        *,
        depth_levels: int = 4,
        latency_slip_probability: float = 0.2,
    ):
        self.rng = rng
        self.next_fill_id = next_fill_id
        self.depth_levels = depth_levels
        self.latency_slip_probability = latency_slip_probability
        self.working: dict[str, WorkingOrder] = {}  # order id -> resting order, in arrival order

    # -- new orders --------------------------------------------------------------------

    def submit(self, order: Order, book: SymbolBook, ttl_ns: int) -> list[Order | Fill]:
        """The NEW event, the fills it gets at once, and its end if it does not rest."""
        if book.quote is None:
            raise ValueError(f"no quote for {book.symbol} yet: publish one before orders")
        events: list[Order | Fill] = [order]
        limit_ticks = None if order.limit_price is None else book.ticks(order.limit_price)
        qty = book.units(order.qty)
        fills = self._take(order, book, qty, limit_ticks)
        events.extend(fills)
        filled = sum(book.units(f.qty) for f in fills)
        last_ts = fills[-1].ts if fills else order.ts
        if filled == qty:
            events.append(_with_status(order, "FILLED", last_ts + _US))
        elif order.order_type == "MARKET":
            # Nothing more within the collar: the rest is cancelled (IOC-like market order).
            events.append(_with_status(order, "CANCELED", last_ts + _US))
        else:
            assert limit_ticks is not None
            working = WorkingOrder(order, book, limit_ticks, expires_at=order.ts + ttl_ns, filled=filled, fills=fills)
            self.working[order.order_id] = working
        return events

    def _take(self, order: Order, book: SymbolBook, qty: int, limit_ticks: int | None) -> list[Fill]:
        """Walk the book from the touch: one taker fill per level reached."""
        rng = self.rng
        buy = order.side == "BUY"
        touch = book.ask_ticks if buy else book.bid_ticks
        touch_size = book.ask_size if buy else book.bid_size
        slip = 1 if rng.random() < self.latency_slip_probability else 0  # the touch moved meanwhile
        direction = 1 if buy else -1
        ts = order.ts + rng.randint(150, 3000) * _US  # arrival at the venue
        fills = []
        remaining = qty
        for level in range(self.depth_levels):
            price_ticks = touch + direction * (slip + level)
            if price_ticks < 1:
                break
            if limit_ticks is not None and (price_ticks > limit_ticks if buy else price_ticks < limit_ticks):
                break
            available = touch_size if level == 0 and not slip else book.lot_units * rng.randint(1, 6) * (level + 1)
            take = min(remaining, available)
            fills.append(self._fill(order, book, take, price_ticks, ts, "TAKER"))
            remaining -= take
            if remaining == 0:
                break
            ts += rng.randint(5, 80) * _US
        return fills

    # -- the market moves --------------------------------------------------------------

    def on_quote(self, book: SymbolBook) -> list[Order | Fill]:
        """Resting orders of the symbol the new quote reaches, and those at its touch."""
        quote = book.quote
        assert quote is not None
        events: list[Order | Fill] = []
        for working in self._working_in(book.symbol):
            if working.is_buy():
                crossed = book.ask_ticks <= working.limit_ticks
                at_touch = book.bid_ticks == working.limit_ticks
                liquidity = book.ask_size
            else:
                crossed = book.bid_ticks >= working.limit_ticks
                at_touch = book.ask_ticks == working.limit_ticks
                liquidity = book.bid_size
            if crossed:
                qty = min(working.remaining, liquidity, book.lot_units * self.rng.randint(1, 10))
            elif at_touch and self.rng.random() < 0.1:
                qty = min(working.remaining, book.lot_units * self.rng.randint(1, 5))
            else:
                continue
            events.extend(self._maker_fill(working, qty, quote.ts + _US))
        return events

    def on_trade(self, trade: MarketTrade) -> list[Order | Fill]:
        """A print at a resting order's price on the other side takes part of it."""
        events: list[Order | Fill] = []
        for working in self._working_in(trade.symbol):
            if working.limit_ticks != working.book.ticks(trade.price):
                continue
            if trade.aggressor != ("SELL" if working.is_buy() else "BUY"):
                continue
            # Whether, and how much of, the print is ours depends on where we are in the queue.
            if self.rng.random() < 0.5:
                continue
            share = max(1, int(working.book.units(trade.size) * self.rng.uniform(0.1, 0.6)))
            events.extend(self._maker_fill(working, min(working.remaining, share), trade.ts + _US))
        return events

    def expire(self, now: int) -> list[Order]:
        """CANCELED for every resting order whose time to live ended at or before `now`."""
        ended = [w for w in self.working.values() if w.expires_at <= now]
        for working in ended:
            del self.working[working.order.order_id]
        return [_with_status(w.order, "CANCELED", w.expires_at) for w in ended]

    # -- helpers -----------------------------------------------------------------------

    def _working_in(self, symbol: str) -> list[WorkingOrder]:
        return [w for w in self.working.values() if w.order.symbol == symbol]

    def _maker_fill(self, working: WorkingOrder, qty: int, ts: int) -> list[Order | Fill]:
        fill = self._fill(working.order, working.book, qty, working.limit_ticks, ts, "MAKER")
        working.filled += qty
        working.fills.append(fill)
        events: list[Order | Fill] = [fill]
        if working.remaining == 0:
            del self.working[working.order.order_id]
            events.append(_with_status(working.order, "FILLED", ts + _US))
        return events

    def _fill(self, order: Order, book: SymbolBook, units: int, price_ticks: int, ts: int, liquidity: str) -> Fill:
        qty, price = book.qty(units), book.price(price_ticks)
        fees = book.instrument.fees
        return Fill(
            ts=ts, fill_id=self.next_fill_id(), account=order.account, symbol=order.symbol, side=order.side,
            qty=qty, price=price, fee=fees.fee(liquidity, qty, price), order_id=order.order_id,
            venue=order.venue or self.rng.choice(SMART_ROUTER_VENUES), liquidity=liquidity,
            fee_currency=fees.currency,
        )  # fmt: skip


def _with_status(order: Order, status: str, ts: int) -> Order:
    return msgspec.structs.replace(order, status=status, ts=ts)


__all__ = ["MAKER_FEE_PER_SHARE", "TAKER_FEE_PER_SHARE", "ExecutionSimulator", "WorkingOrder"]
