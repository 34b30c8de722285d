"""Exact decimal arithmetic for money and quantities: the rules every number obeys.

Why a module of its own: Python's default decimal context rounds every result to 28
significant digits *silently*. A quantity of 1,234,567.12345678 times a price of
98,765.4321 already needs 22 digits, and sums of such products more, so the core never
does arithmetic in the caller's context. It uses `EXACT`, a context with unbounded
precision in which addition, subtraction and multiplication can never round.

Division is the one operation that can have no finite decimal answer (an average cost
of 302 / 3). `divide` gives the exact quotient whenever it is a terminating decimal of
at most `DIVISION_DIGITS` significant digits, and otherwise the quotient rounded half to
even at `10**-DIVISION_SCALE` (12 decimal places). That is the only rounding anywhere in
the position core, and the core is arranged so that it never loses money: see
`posttrade.core.positions`.

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
    ROUND_HALF_EVEN,
    Context,
    Decimal,
    DivisionByZero,
    Inexact,
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

#: Significant digits within which a terminating quotient is returned exactly.
DIVISION_DIGITS = 64
#: Decimal places to which a quotient that does not terminate is rounded (half to even).
DIVISION_SCALE = 12

_DIVIDE = Context(
    prec=DIVISION_DIGITS,
    Emax=MAX_EMAX,
    Emin=MIN_EMIN,
    rounding=ROUND_HALF_EVEN,
    traps=[Inexact, InvalidOperation, DivisionByZero, Overflow],
)
#: `numerator / denominator` when it terminates within 64 digits, else raises Inexact.
divide_exact = _DIVIDE.divide


def divide(numerator: Decimal, denominator: Decimal) -> Decimal:
    """`numerator / denominator`: exact if it terminates, else rounded at 10**-12.

    Exact means: the true quotient is a terminating decimal with at most 64 significant
    digits. Otherwise the result is the true quotient rounded half to even to 12 decimal
    places, computed with integer arithmetic (no double rounding).
    """
    try:
        return divide_exact(numerator, denominator)
    except Inexact:
        return round_quotient(numerator, denominator, DIVISION_SCALE)


def round_quotient(numerator: Decimal, denominator: Decimal, scale: int) -> Decimal:
    """The true value of numerator / denominator rounded half to even at 10**-scale."""
    if not denominator:
        raise ZeroDivisionError("division by zero")
    scaled = numerator.scaleb(scale, EXACT)
    quotient, remainder = EXACT.divmod(scaled, denominator)  # quotient truncated toward 0
    twice = EXACT.multiply(EXACT.abs(remainder), 2)
    half = EXACT.abs(denominator)
    if twice > half or (twice == half and quotient % 2 == 1):
        negative = (numerator < 0) != (denominator < 0)
        quotient = EXACT.add(quotient, -1 if negative else 1)
    return quotient.scaleb(-scale, EXACT)


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
