"""A synthetic market: 25 instruments whose quotes follow a random walk, and the tape.

Twenty US equities and ETFs, and five instruments in other currencies and shapes: an
index future (ESU4, USD, multiplier 50), two FX pairs (USDJPY: quantities in USD, prices
and P&L in JPY; EURUSD, whose quotes also give the EUR rate), a crypto pair (BTCUSDT, in
USDT) and a stock quoted in EUR (SAP). Their multipliers and currencies are not the
feed's business: the services read them from the reference data
(config/backend/reference.yaml), which names these symbols; the feed only makes prices,
quantities and fees look like each market's.

Prices live in integer ticks of the instrument's `tick` (a cent for the equities, a
quarter point for the future, 0.001 JPY and 0.00001 USD for the pairs), and quantities
in integer units of its `qty_step` (a share, a contract, 1,000 of the pair's base
currency, 0.001 BTC), so every price and quantity the feed publishes is an exact
Decimal on its instrument's grid. The walk is of a "fair value" per symbol; the quote is
that value rounded to a bid on the grid plus a spread of one or more ticks that widens
and tightens at random, with sizes in whole round lots (`lot`). Market trades print at
the touch (the aggressor pays the spread) or, now and then, inside it.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Literal

from ..streams.events import MarketTrade, Quote

# The US equities' grid: a cent, round lots of 100 shares (each instrument has its own).
TICK = Decimal("0.01")
LOT = 100

# Where prints happen for the US equities: the primary exchanges and the usual others (MIC codes).
TRADE_VENUES = ("XNAS", "XNYS", "ARCX", "BATS", "EDGX", "IEXG", "MEMX")
# Where the broker's smart router executes a US equity order sent without a venue.
SMART_ROUTER_VENUES = ("XNAS", "XNYS", "ARCX", "BATS")


@dataclass(frozen=True)
class Fees:
    """What a fill costs: `taker` or `maker` (negative: a rebate) per unit of quantity
    (`per="qty"`: a share, a contract, a unit of the pair's base currency) or per unit of
    notional (`per="notional"`: qty x price), charged in `currency` (None: the
    instrument's own, as the reference data says; else the fill's `fee_currency`),
    rounded half-even to `places` decimals (None: exact)."""

    taker: Decimal
    maker: Decimal
    per: Literal["qty", "notional"] = "qty"
    currency: str | None = None
    places: int | None = None

    def fee(self, liquidity: str, qty: Decimal, price: Decimal) -> Decimal:
        rate = self.taker if liquidity == "TAKER" else self.maker
        fee = rate * qty if self.per == "qty" else rate * qty * price
        if self.places is None:
            return fee
        return fee.quantize(Decimal(1).scaleb(-self.places), rounding=ROUND_HALF_EVEN)


# US equities: 0.30 cent a share to take, a 0.20 cent rebate to make.
US_EQUITY_FEES = Fees(Decimal("0.0030"), Decimal("-0.0020"))


@dataclass(frozen=True)
class Instrument:
    symbol: str
    price: Decimal  # starting mid, on the tick grid
    venue: str  # primary listing (a MIC where there is one): where its quotes come from
    base_spread_ticks: int  # typical spread: 1 for the most liquid names
    vol_bps: float  # standard deviation of the mid's move over one second, in bps
    tick: Decimal = TICK  # the price grid
    lot: Decimal = Decimal(LOT)  # a round lot: quote sizes are whole lots, large orders too
    qty_step: Decimal = Decimal(1)  # the smallest quantity: every quantity is a multiple
    fees: Fees = US_EQUITY_FEES
    trade_venues: tuple[str, ...] = TRADE_VENUES  # where the tape's prints happen
    # Where orders are sent; None: wherever the account routes (US equities).
    routes: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("tick", "lot", "qty_step"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{self.symbol}: {name} must be > 0")
        if self.price % self.tick:
            raise ValueError(f"{self.symbol}: price {self.price} is not on its {self.tick} grid")
        if self.lot % self.qty_step:
            raise ValueError(f"{self.symbol}: lot {self.lot} is not a multiple of qty_step {self.qty_step}")

    @property
    def lot_units(self) -> int:
        """Quantity units in a round lot."""
        return int(self.lot / self.qty_step)


# Twenty US equities and ETFs with plausible prices, spreads and liveliness. BRK.B is in
# on purpose: a symbol with a dot exercises the subject tokens end to end.
US_EQUITIES: tuple[Instrument, ...] = (
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

# Money in other currencies (config/backend/reference.yaml names each of these symbols).
OTHER_CURRENCIES: tuple[Instrument, ...] = (
    # E-mini S&P 500 future on CME: quarter-point ticks, $50 a point (the reference
    # data's multiplier), whole contracts; exchange and clearing fees per contract.
    Instrument("ESU4", Decimal("5512.25"), "XCME", 1, 1.0, tick=Decimal("0.25"), lot=Decimal(1),
               fees=Fees(Decimal("1.40"), Decimal("1.10")), trade_venues=("XCME",), routes=("XCME",)),
    # JPY per USD: quantities in USD, prices (and so the position's P&L) in JPY, to a
    # tenth of a pip; round lots of a million, in steps of 1,000; the broker charges its
    # commission in USD (a fee in another currency than the instrument's).
    Instrument("USDJPY", Decimal("155.250"), "EBSM", 3, 0.5, tick=Decimal("0.001"), lot=Decimal(1_000_000),
               qty_step=Decimal(1000), fees=Fees(Decimal("0.00001"), Decimal("0.000005"), currency="USD", places=2),
               trade_venues=("EBSM", "LMAX", "XOFF"), routes=("EBSM", "LMAX")),
    # USD per EUR, to a tenth of a pip: in USD, and its quotes give the EUR rate.
    Instrument("EURUSD", Decimal("1.08500"), "EBSM", 2, 0.4, tick=Decimal("0.00001"), lot=Decimal(1_000_000),
               qty_step=Decimal(1000), fees=Fees(Decimal("0.00001"), Decimal("0.000005"), places=2),
               trade_venues=("EBSM", "LMAX", "XOFF"), routes=("EBSM", "LMAX")),
    # Bitcoin against tether, in USDT (worth 1 USD by the reference data's fixed rate):
    # cent ticks, lots of 0.1 BTC in steps of 0.001; fees a fraction of the notional.
    # Crypto venues have no MIC: their names.
    Instrument("BTCUSDT", Decimal("64250.00"), "BINANCE", 1, 3.0, lot=Decimal("0.1"), qty_step=Decimal("0.001"),
               fees=Fees(Decimal("0.0010"), Decimal("0.0002"), per="notional", places=8),
               trade_venues=("BINANCE", "OKX", "BYBIT"), routes=("BINANCE", "OKX")),
    # SAP on Xetra, in EUR: two-cent ticks at this price; a fee per share in EUR.
    Instrument("SAP", Decimal("180.50"), "XETR", 1, 1.5, tick=Decimal("0.02"),
               fees=Fees(Decimal("0.0050"), Decimal("0.0010")), trade_venues=("XETR", "CEUX", "TQEX", "AQEU"),
               routes=("XETR", "CEUX")),
)  # fmt: skip

INSTRUMENTS: tuple[Instrument, ...] = US_EQUITIES + OTHER_CURRENCIES


def tagged(instruments: tuple[Instrument, ...], tag: str | None) -> tuple[Instrument, ...]:
    """The same instruments with `-<tag>` appended to each symbol (keeps feeds apart)."""
    if not tag:
        return instruments
    return tuple(replace(i, symbol=f"{i.symbol}-{tag}") for i in instruments)


class SymbolBook:
    """One symbol's current market: fair value, top of book and the quote last published.

    Prices are integer ticks and quantities integer units of the instrument's grid;
    `price()` and `qty()` turn them into the Decimals events carry, `ticks()` and
    `units()` back."""

    def __init__(self, instrument: Instrument, rng: random.Random):
        self.instrument = instrument
        self.rng = rng
        self.lot_units = instrument.lot_units
        self.fair_ticks = float(instrument.price / instrument.tick)
        self.spread_ticks = instrument.base_spread_ticks
        self.bid_ticks = 0
        self.ask_ticks = 0
        self.bid_size = 0  # in units
        self.ask_size = 0
        self.quote: Quote | None = None  # the last quote published (what executions see)
        self._place()

    @property
    def symbol(self) -> str:
        return self.instrument.symbol

    # -- the grids -----------------------------------------------------------------------

    def price(self, ticks: int) -> Decimal:
        return ticks * self.instrument.tick

    def ticks(self, price: Decimal) -> int:
        ticks = price / self.instrument.tick
        if ticks != ticks.to_integral_value():
            raise ValueError(f"{price} is not on {self.symbol}'s {self.instrument.tick} tick grid")
        return int(ticks)

    def qty(self, units: int) -> Decimal:
        return units * self.instrument.qty_step

    def units(self, qty: Decimal) -> int:
        units = qty / self.instrument.qty_step
        if units != units.to_integral_value():
            raise ValueError(f"{qty} is not a multiple of {self.symbol}'s {self.instrument.qty_step}")
        return int(units)

    # -- the market --------------------------------------------------------------------

    def _place(self) -> None:
        bid = math.floor(self.fair_ticks - self.spread_ticks / 2 + 0.5)
        self.bid_ticks = max(1, bid)
        self.ask_ticks = self.bid_ticks + self.spread_ticks
        self.bid_size = self.lot_units * self.rng.randint(1, 30)
        self.ask_size = self.lot_units * self.rng.randint(1, 30)

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
            ts=ts, symbol=self.symbol, bid=self.price(self.bid_ticks), ask=self.price(self.ask_ticks),
            bid_size=self.qty(self.bid_size), ask_size=self.qty(self.ask_size), venue=self.instrument.venue,
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
        lot = self.lot_units
        roll = rng.random()
        if roll < 0.55 and lot > 1:
            size = rng.randint(1, lot - 1)
        elif roll < 0.97:
            size = lot * rng.randint(1, 10)
        else:
            size = lot * rng.randint(20, 100)
        return MarketTrade(
            ts=ts, symbol=self.symbol, price=self.price(price_ticks), size=self.qty(size), trade_id=trade_id,
            venue=rng.choice(self.instrument.trade_venues), aggressor=aggressor,
        )  # fmt: skip


def tagged_reference(data: dict | None, instruments: tuple[Instrument, ...], tag: str | None) -> dict:
    """Reference data (`core.reference`'s three sections, as read from YAML) in which each
    of `instruments` that `data` names is named with `-<tag>` instead: what services
    valuing a tagged feed's symbols read. The untagged entry goes, so an FX pair stays
    quoted by one instrument."""
    out = {key: value for key, value in (data or {}).items()}
    if not tag:
        return out
    names = {i.symbol for i in instruments}
    out["instruments"] = {
        (f"{symbol}-{tag}" if symbol in names else symbol): section
        for symbol, section in (out.get("instruments") or {}).items()
    }
    return out


__all__ = [
    "INSTRUMENTS",
    "LOT",
    "OTHER_CURRENCIES",
    "TICK",
    "TRADE_VENUES",
    "US_EQUITIES",
    "US_EQUITY_FEES",
    "Fees",
    "Instrument",
    "SymbolBook",
    "tagged",
    "tagged_reference",
]
