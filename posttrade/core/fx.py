"""Conversion rates between currencies, and the one rounding of a converted figure.

The rate from currency C to base currency B is, first found wins:

1. 1 when C is B;
2. a fixed rate (`fx.fixed` of the reference data), C->B as given, else the inverse of B->C;
3. the mark of the FX instrument quoting the pair: its price when it quotes C/B (one C
   costs that many B), its inverse when it quotes B/C;
4. two legs through the pivot, C->pivot then pivot->B, each leg by rules 1-3 only (a
   leg never pivots again);
5. else unknown (None): a figure that needs it is unknown, never a guess.

FX marks are marks like any other (quote mid, last trade, bar close: the service's
priority). An inverse is `1 / x` rounded half-even to 20 significant digits; a pivot
rate is the exact product of its legs. `Rate.legs` says what each leg used, with the
mark's source and event time.

A converted figure is the local figure times the rate, rounded half-even at 12 decimal
places (`convert`). That is translation at the current rate: there is no separate FX
P&L, and nothing about rates enters a position's state.
"""

from __future__ import annotations

from collections.abc import Callable
from decimal import ROUND_HALF_EVEN, Context, Decimal

import msgspec

from posttrade.core.exact import EXACT, ONE
from posttrade.core.reference import Reference

#: Decimal places of every converted figure.
BASE_SCALE = 12
#: Significant digits of an inverted rate.
INVERSE_DIGITS = 20

_INVERSE = Context(prec=INVERSE_DIGITS, rounding=ROUND_HALF_EVEN, Emax=999_999, Emin=-999_999)
_QUANTUM = Decimal(1).scaleb(-BASE_SCALE)

#: What an FX mark reader returns for a symbol: (price, source, event time), or None.
MarkReading = tuple[Decimal, str, "int | None"]
MarkReader = Callable[[str], "MarkReading | None"]


class RateLeg(msgspec.Struct, frozen=True, kw_only=True):
    """One step of a conversion: `rate` units of `to` per unit of `from_`."""

    from_: str = msgspec.field(name="from")
    to: str
    rate: Decimal
    source: str  # identity, fixed, or the mark's source (quote_mid, last_trade, bar_close)
    instrument: str | None = None  # the FX instrument whose mark it is
    inverse: bool = False  # the rate is 1 / the fixed rate or mark
    ts: int | None = None  # the mark's event time


class Rate(msgspec.Struct, frozen=True, kw_only=True):
    """The rate from `currency` to `base` and how it was found."""

    currency: str
    base: str
    rate: Decimal
    legs: tuple[RateLeg, ...]


def invert(value: Decimal) -> Decimal:
    """`1 / value`, rounded half-even to 20 significant digits."""
    return _INVERSE.divide(ONE, value)


def convert(value: Decimal | None, rate: Decimal | None) -> Decimal | None:
    """`value x rate` rounded half-even at 12 decimal places; None when either is unknown."""
    if value is None or rate is None:
        return None
    return EXACT.multiply(value, rate).quantize(_QUANTUM, rounding=ROUND_HALF_EVEN, context=EXACT)


def round_base(value: Decimal) -> Decimal:
    """A sum of exact converted terms, rounded as one converted figure."""
    return value.quantize(_QUANTUM, rounding=ROUND_HALF_EVEN, context=EXACT)


class FxRates:
    """Rates by the module doc's rules, from `reference` and the marks `mark_of` reads."""

    __slots__ = ("reference", "mark_of")

    def __init__(self, reference: Reference, mark_of: MarkReader):
        self.reference = reference
        self.mark_of = mark_of

    def rate(self, currency: str, base: str) -> Rate | None:
        if currency == base:
            return Rate(currency=currency, base=base, rate=ONE, legs=(RateLeg(from_=currency, to=base, rate=ONE, source="identity"),))
        leg = self._leg(currency, base)
        if leg is not None:
            return Rate(currency=currency, base=base, rate=leg.rate, legs=(leg,))
        pivot = self.reference.pivot
        if pivot in (currency, base):
            return None  # the pivot leg would be the direct one, already tried
        first = self._leg(currency, pivot)
        if first is None:
            return None
        second = self._leg(pivot, base)
        if second is None:
            return None
        return Rate(currency=currency, base=base, rate=EXACT.multiply(first.rate, second.rate), legs=(first, second))

    def _leg(self, source: str, target: str) -> RateLeg | None:
        """One leg by rules 1-3 of the module doc."""
        if source == target:
            return RateLeg(from_=source, to=target, rate=ONE, source="identity")
        fixed = self.reference.fixed
        rate = fixed.get((source, target))
        if rate is not None:
            return RateLeg(from_=source, to=target, rate=rate, source="fixed")
        rate = fixed.get((target, source))
        if rate is not None:
            return RateLeg(from_=source, to=target, rate=invert(rate), source="fixed", inverse=True)
        found = self.reference.fx_instrument(source, target)
        if found is None:
            return None
        symbol, inverse = found
        reading = self.mark_of(symbol)
        if reading is None:
            return None
        price, mark_source, ts = reading
        return RateLeg(
            from_=source, to=target, rate=invert(price) if inverse else price, source=mark_source,
            instrument=symbol, inverse=inverse, ts=ts,
        )
