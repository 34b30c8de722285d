"""A synthetic market: 20 symbols whose quotes follow a random walk, and the tape.

Prices live in integer ticks (a tick is one cent), so every price the feed publishes is
an exact Decimal on the tick grid. The walk is of a "fair value" per symbol; the quote
is that value rounded to a bid on the grid plus a spread of one or more ticks that
widens and tightens at random. Market trades print at the touch (the aggressor pays the
spread) or, now and then, inside it.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from decimal import Decimal

from ..streams.events import MarketTrade, Quote

TICK = Decimal("0.01")
LOT = 100  # shares in a round lot: quote sizes are whole lots


@dataclass(frozen=True)
class Instrument:
    symbol: str
    price: Decimal  # starting mid
    venue: str  # primary listing (MIC): where its quotes come from
    base_spread_ticks: int  # typical spread: 1 for the most liquid names
    vol_bps: float  # standard deviation of the mid's move over one second, in bps


# Twenty US equities and ETFs with plausible prices, spreads and liveliness. BRK.B is in
# on purpose: a symbol with a dot exercises the subject tokens end to end.
INSTRUMENTS: tuple[Instrument, ...] = (
    Instrument("AAPL", Decimal("189.50"), "XNAS", 1, 2.0),
    Instrument("MSFT", Decimal("415.20"), "XNAS", 1, 1.8),
    Instrument("NVDA", Decimal("875.40"), "XNAS", 2, 4.0),
    Instrument("AMZN", Decimal("178.30"), "XNAS", 1, 2.5),
    Instrument("GOOGL", Decimal("152.10"), "XNAS", 1, 2.2),
    Instrument("META", Decimal("492.60"), "XNAS", 2, 3.0),
    Instrument("TSLA", Decimal("175.80"), "XNAS", 2, 5.0),
    Instrument("JPM", Decimal("198.40"), "XNYS", 1, 1.6),
    Instrument("V", Decimal("279.90"), "XNYS", 2, 1.4),
    Instrument("XOM", Decimal("118.70"), "XNYS", 1, 1.8),
    Instrument("UNH", Decimal("489.10"), "XNYS", 3, 2.0),
    Instrument("JNJ", Decimal("152.30"), "XNYS", 1, 1.2),
    Instrument("PG", Decimal("162.80"), "XNYS", 1, 1.1),
    Instrument("HD", Decimal("361.50"), "XNYS", 3, 1.7),
    Instrument("KO", Decimal("60.15"), "XNYS", 1, 1.0),
    Instrument("COST", Decimal("735.20"), "XNAS", 4, 1.6),
    Instrument("BRK.B", Decimal("408.70"), "XNYS", 3, 1.3),
    Instrument("AMD", Decimal("164.90"), "XNAS", 2, 4.5),
    Instrument("SPY", Decimal("512.30"), "ARCX", 1, 1.0),
    Instrument("QQQ", Decimal("438.60"), "XNAS", 1, 1.3),
)

# Where prints happen: the primary exchanges and the usual others (MIC codes).
TRADE_VENUES = ("XNAS", "XNYS", "ARCX", "BATS", "EDGX", "IEXG", "MEMX")


def tagged(instruments: tuple[Instrument, ...], tag: str | None) -> tuple[Instrument, ...]:
    """The same instruments with `-<tag>` appended to each symbol (keeps feeds apart)."""
    if not tag:
        return instruments
    return tuple(
        Instrument(f"{i.symbol}-{tag}", i.price, i.venue, i.base_spread_ticks, i.vol_bps) for i in instruments
    )


def ticks_to_price(ticks: int) -> Decimal:
    return ticks * TICK


class SymbolBook:
    """One symbol's current market: fair value, top of book and the quote last published."""

    def __init__(self, instrument: Instrument, rng: random.Random):
        self.instrument = instrument
        self.rng = rng
        self.fair_ticks = float(instrument.price / TICK)
        self.spread_ticks = instrument.base_spread_ticks
        self.bid_ticks = 0
        self.ask_ticks = 0
        self.bid_size = 0
        self.ask_size = 0
        self.quote: Quote | None = None  # the last quote published (what executions see)
        self._place()

    @property
    def symbol(self) -> str:
        return self.instrument.symbol

    def _place(self) -> None:
        bid = math.floor(self.fair_ticks - self.spread_ticks / 2 + 0.5)
        self.bid_ticks = max(1, bid)
        self.ask_ticks = self.bid_ticks + self.spread_ticks
        self.bid_size = LOT * self.rng.randint(1, 30)
        self.ask_size = LOT * self.rng.randint(1, 30)

    def move(self, dt_s: float) -> None:
        """Advance the random walk by `dt_s` seconds and re-place the top of book."""
        inst = self.instrument
        sigma_ticks = self.fair_ticks * inst.vol_bps / 10_000 * math.sqrt(max(dt_s, 1e-6))
        self.fair_ticks = max(1.0, self.fair_ticks + self.rng.gauss(0.0, sigma_ticks))
        # Spreads widen now and then and come back to their usual width.
        roll = self.rng.random()
        if roll < 0.15:
            self.spread_ticks = min(inst.base_spread_ticks * 4, self.spread_ticks + 1)
        elif roll < 0.45:
            self.spread_ticks = max(1, self.spread_ticks - 1)
        elif roll < 0.55:
            self.spread_ticks = inst.base_spread_ticks
        self._place()

    def make_quote(self, ts: int) -> Quote:
        self.quote = Quote(
            ts=ts, symbol=self.symbol, bid=ticks_to_price(self.bid_ticks), ask=ticks_to_price(self.ask_ticks),
            bid_size=Decimal(self.bid_size), ask_size=Decimal(self.ask_size), venue=self.instrument.venue,
        )  # fmt: skip
        return self.quote

    def make_trade(self, ts: int, trade_id: str) -> MarketTrade:
        """A print by someone else: at the touch on the aggressor's side, sometimes inside."""
        rng = self.rng
        aggressor = "BUY" if rng.random() < 0.5 else "SELL"
        if self.spread_ticks >= 2 and rng.random() < 0.15:
            price_ticks = rng.randint(self.bid_ticks + 1, self.ask_ticks - 1)  # a midpoint-ish cross
        else:
            price_ticks = self.ask_ticks if aggressor == "BUY" else self.bid_ticks
        # Mostly odd lots and small round lots, now and then a block.
        roll = rng.random()
        size = rng.randint(1, 99) if roll < 0.55 else LOT * rng.randint(1, 10) if roll < 0.97 else LOT * rng.randint(20, 100)
        return MarketTrade(
            ts=ts, symbol=self.symbol, price=ticks_to_price(price_ticks), size=Decimal(size), trade_id=trade_id,
            venue=rng.choice(TRADE_VENUES), aggressor=aggressor,
        )  # fmt: skip


__all__ = ["INSTRUMENTS", "LOT", "TICK", "TRADE_VENUES", "Instrument", "SymbolBook", "tagged", "ticks_to_price"]
