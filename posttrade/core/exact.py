"""Exact decimal arithmetic for money and quantities: the rules every number obeys.

Why a module of its own: Python's default decimal context rounds every result to 28
significant digits *silently*. A quantity of 1,234,567.12345678 times a price of
98,765.4321 already needs 22 digits, and sums of such products more, so the core never
does arithmetic in the caller's context. It uses `EXACT`, a context with unbounded
precision in which addition, subtraction and multiplication can never round.

Division is the one operation that can have no finite decimal answer (an average cost
of 302 / 3). Two rules, both rounding half to even at `10**-DIVISION_SCALE` (12
decimal places) and both correctly rounded:

- `divide`: the exact quotient whenever it terminates within 64 significant digits,
  else rounded at 12 places. For one-off values (a VWAP, a ratio).
- `divide_rounded`: at most 12 decimal places, always (exact when it has no more).
  For values that feed state which accumulates: the position core uses it for the cost
  a partial close takes out, because "exact while it terminates" would grow a few
  digits with every partial close (dividing by a quantity like 400 adds decimals), and
  for the average price it shows. The core is arranged so that this rounding never
  loses money: see `posttrade.core.positions`.

How large or fine a number may be is not this module's rule: values on the bus and
the figures derived from them are bounded by `posttrade.core.bounds` (12 decimal
places, below 1E+20 on the bus, below 1E+26 derived), which is what keeps the exact,
unbounded arithmetic here from producing what no store or message can hold.

`format_decimal` is the one way numbers leave the core as text: plain notation (never
`1E+2`), trailing fractional zeros stripped (`225.00` -> `225`, `0.10` -> `0.1`), no
negative zero. Stripping zeros cannot mislead: the value is unchanged, and one value has
one spelling, so two programs' outputs compare as strings.
"""

from __future__ import annotations

from decimal import (
    MAX_EMAX,
    MAX_PREC,
    MIN_EMIN,
    ROUND_05UP,
    ROUND_HALF_EVEN,
    Context,
    Decimal,
    DivisionByZero,
    InvalidOperation,
    Overflow,
)

ZERO = Decimal(0)
ONE = Decimal(1)

#: Unbounded precision: +, -, * are exact. Never use `/` under it (an infinite quotient
#: would try to fill all of memory); use `divide`.
EXACT = Context(
    prec=MAX_PREC,
    Emax=MAX_EMAX,
    Emin=MIN_EMIN,
    rounding=ROUND_HALF_EVEN,
    traps=[InvalidOperation, DivisionByZero, Overflow],
)

#: Decimal places a quotient is rounded to (half to even) when it is not kept exact.
DIVISION_SCALE = 12
#: Significant digits within which `divide` keeps a terminating quotient exact.
DIVISION_DIGITS = 64

# Both divisions first divide to 64 significant digits rounding ROUND_05UP (decimal's
# "round to odd"), then, if needed, round that half to even at 12 places. Rounding to
# odd with at least two spare digits makes the second rounding give exactly what
# rounding the true quotient would (no double-rounding error); with 64 digits that
# holds for quotients below 10**50, and beyond that they use integer arithmetic
# (`round_quotient`).
_DIVIDE = Context(
    prec=DIVISION_DIGITS,
    Emax=MAX_EMAX,
    Emin=MIN_EMIN,
    rounding=ROUND_05UP,
    traps=[InvalidOperation, DivisionByZero, Overflow],
)
_divide_05up = _DIVIDE.divide
_multiply = EXACT.multiply
_QUANTUM = Decimal(1).scaleb(-DIVISION_SCALE)
_MAX_ADJUSTED = DIVISION_DIGITS - DIVISION_SCALE - 3


def divide(numerator: Decimal, denominator: Decimal) -> Decimal:
    """`numerator / denominator`: exact if it terminates, else rounded at 10**-12.

    Exact means: the true quotient is a terminating decimal with at most 64 significant
    digits. Otherwise the result is the true quotient rounded half to even to 12 decimal
    places (correctly rounded: no double rounding).
    """
    quotient = _divide_05up(numerator, denominator)
    if _multiply(quotient, denominator) == numerator:
        return quotient
    if quotient.adjusted() > _MAX_ADJUSTED:
        return round_quotient(numerator, denominator, DIVISION_SCALE)
    return quotient.quantize(_QUANTUM, ROUND_HALF_EVEN, EXACT)


def divide_rounded(numerator: Decimal, denominator: Decimal) -> Decimal:
    """`numerator / denominator` rounded half to even to at most 12 decimal places.

    For quotients that feed state which accumulates (the cost a partial close takes
    out of a position) or are shown to people (an average price): exact whenever the
    quotient has at most 12 decimal places (and then in its natural form: 2100 x 15 / 20
    is `1575`, not `1575.000000000000`), otherwise correctly rounded at the 12th place,
    whether or not it terminates. Unlike `divide`, repeated use cannot grow the digits.
    """
    return divide_rounded_noting(numerator, denominator)[0]


def divide_rounded_noting(numerator: Decimal, denominator: Decimal) -> tuple[Decimal, bool]:
    """`divide_rounded`, and whether it may have rounded: False means the value is the
    exact quotient (True can also mean exact, for quotients of 48 digits or more)."""
    quotient = _divide_05up(numerator, denominator)
    if quotient.adjusted() > _MAX_ADJUSTED:
        return round_quotient(numerator, denominator, DIVISION_SCALE), True
    rounded = quotient.quantize(_QUANTUM, ROUND_HALF_EVEN, EXACT)
    if rounded != quotient:
        return rounded, True
    return (quotient if quotient else ZERO), False  # not 0E-13


_QUANTA = {scale: Decimal(1).scaleb(-scale) for scale in range(DIVISION_SCALE + 1)}


def divide_at(numerator: Decimal, denominator: Decimal, scale: int) -> Decimal:
    """`numerator / denominator` rounded half to even at 10**-scale (0 <= scale <= 12),
    always written with `scale` places: the value of `round_quotient`, by the fast route
    `divide` takes (round to odd at 64 digits, then once more; integers beyond that)."""
    quotient = _divide_05up(numerator, denominator)
    if quotient.adjusted() > DIVISION_DIGITS - scale - 3:
        return round_quotient(numerator, denominator, scale)
    return quotient.quantize(_QUANTA[scale], ROUND_HALF_EVEN, EXACT)


def round_quotient(numerator: Decimal, denominator: Decimal, scale: int) -> Decimal:
    """The true value of numerator / denominator rounded half to even at 10**-scale."""
    if not denominator:
        raise ZeroDivisionError("division by zero")
    scaled = numerator.scaleb(scale, EXACT)
    quotient, remainder = EXACT.divmod(scaled, denominator)  # quotient truncated toward 0
    twice = EXACT.multiply(EXACT.abs(remainder), 2)
    half = EXACT.abs(denominator)
    if twice > half or (twice == half and EXACT.remainder(quotient, 2)):
        negative = (numerator < 0) != (denominator < 0)
        quotient = EXACT.add(quotient, -1 if negative else 1)
    return quotient.scaleb(-scale, EXACT)


def add_known(total: Decimal | None, value: Decimal | None) -> Decimal | None:
    """`total + value`, exact, or None when either is unknown: a sum that includes an
    unknown value (an open position without a mark) is unknown, never a partial number."""
    return None if total is None or value is None else EXACT.add(total, value)


def format_decimal(value: Decimal | None) -> str | None:
    """The canonical text of a number (None stays None): plain, no trailing zeros."""
    if value is None:
        return None
    if not value:
        return "0"
    return format(value.normalize(EXACT), "f")


def parse_decimal(name: str, raw: object, *, positive: bool = False) -> Decimal:
    """A finite Decimal from a JSON string or number (not a float: those are inexact)."""
    if isinstance(raw, bool) or not isinstance(raw, (str, int, Decimal)):
        raise ValueError(f"{name} must be a decimal string, got {raw!r}")
    try:
        value = Decimal(raw.strip() if isinstance(raw, str) else raw)
    except (ArithmeticError, ValueError):
        raise ValueError(f"{name} must be a decimal string, got {raw!r}") from None
    if not value.is_finite():
        raise ValueError(f"{name} must be a finite number, got {raw!r}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {raw!r}")
    return value
