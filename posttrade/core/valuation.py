"""The valuation of a position at a mark: every P&L figure any reader shows, defined once.

A position's state says what its fills did: the signed quantity, the cost of what is
open under average cost (`open_cost`) and FIFO (`fifo_open_cost`), realized P&L under
both methods, fees, and the start-of-day values. What the position is worth also
needs a mark, and `value_position` is the one function that turns state and mark into
figures. It reads the state through `PositionLike`, which both
`posttrade.core.positions.Position` (ptrc's book; the reports value it) and
`posttrade.streams.events.PositionUpdate` (ptrc's published copy of it, which pnl
values) satisfy, so every reader gets the same numbers to the last digit
(tests/unit/test_valuation.py also pins them to `Position`'s own methods). Accounts are
summed with `account_value` (or, kept up to date as positions change, `AccountSums`).

Formulas (money includes the contract multiplier; a fee never does):

    realized_pnl_net      = realized_pnl_gross - fees           (the state's own)
    fifo_realized_pnl_net = fifo_realized_pnl_gross - fees
    unrealized_pnl        = (net_qty x mark - open_cost) x multiplier
    fifo_unrealized_pnl   = (net_qty x mark - fifo_open_cost) x multiplier
    total_pnl             = realized_pnl_net + unrealized_pnl    (same under both methods)
    day_pnl               = total_pnl - (sod_realized_pnl_net + sod_unrealized_pnl)
    market_value          = net_qty x mark x multiplier
    gross_notional        = |market_value|

Unrealized P&L is computed from the cost, not from the rounded average price, so
`realized_pnl_gross + unrealized_pnl` is exactly the cash-flow P&L (see
`posttrade.core.positions`, "Exactness").

Unknown values are None, never a guess that would look like a number:

* a flat position has unrealized P&L (both methods), market value and gross notional
  0 whatever the mark, so it needs no mark;
* an open position without a mark has `unrealized_pnl`, `fifo_unrealized_pnl`,
  `total_pnl`, `day_pnl` and `market_value` None; its `gross_notional` is taken at
  cost, `|open_cost x multiplier|`, so exposure limits still see it;
* `day_pnl` is also None when the start-of-day unrealized P&L is unknown (the day was
  rolled while the position was open and had no mark).

An account's sum that includes an unknown value is None (`AccountValue`).

All arithmetic runs in `posttrade.core.exact.EXACT` whatever the caller's context, so
+, - and x never round; nothing here divides.

Base currency
-------------
Every figure above is in the instrument's currency (`currency`). `value_position` also
gives each money figure in the account's base currency (`*_base`), by the rates of
`posttrade.core.fx`: the local figure times the current rate from the position's
currency to the base, rounded half-even at 12 decimal places (translation at the
current rate; there is no separate FX P&L). Fees charged in a third currency (a fill's
`fee_currency`) are kept apart in the position (`foreign_fees`, by currency; `fees` and
the local net figures hold only the fees in the instrument's currency) and enter the
base figures each at its own rate:

    fees_base              = fees x rate + sum(foreign fee x its rate)
    realized_pnl_net_base  = realized_pnl_net x rate - sum(foreign fee x its rate)
    total_pnl_base         = total_pnl x rate - sum(foreign fee x its rate)
    day_pnl_base           = day_pnl x rate - sum((foreign fee - at the roll) x its rate)

each computed exactly and rounded once. A base figure that needs an unknown rate is
None, and the currency is in `missing_rates`. Account sums (`AccountValue`) are in the
account's base currency only: nothing ever adds two currencies.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from decimal import Decimal
from typing import Protocol

import msgspec

from posttrade.core.exact import EXACT, ZERO
from posttrade.core.fx import FxRates, RateLeg, convert, round_base
from posttrade.core.reference import Reference

_add = EXACT.add
_sub = EXACT.subtract
_mul = EXACT.multiply
_abs = EXACT.abs


class PositionLike(Protocol):
    """What `value_position` reads: fields of `PositionUpdate`, attributes and
    properties of `Position`."""

    @property
    def account(self) -> str: ...
    @property
    def symbol(self) -> str: ...
    @property
    def multiplier(self) -> Decimal: ...
    @property
    def net_qty(self) -> Decimal: ...
    @property
    def avg_open_price(self) -> Decimal | None: ...
    @property
    def open_cost(self) -> Decimal: ...
    @property
    def fifo_open_cost(self) -> Decimal: ...
    @property
    def realized_pnl_gross(self) -> Decimal: ...
    @property
    def fees(self) -> Decimal: ...
    @property
    def realized_pnl_net(self) -> Decimal: ...
    @property
    def fifo_realized_pnl_gross(self) -> Decimal: ...
    @property
    def sod_realized_pnl_net(self) -> Decimal: ...
    @property
    def sod_unrealized_pnl(self) -> Decimal | None: ...
    @property
    def fill_count(self) -> int: ...
    @property
    def currency(self) -> str | None: ...
    @property
    def foreign_fees(self) -> dict[str, Decimal]: ...
    @property
    def sod_foreign_fees(self) -> dict[str, Decimal]: ...


#: Rates when the caller gives none: the default reference data (everything in USD, every
#: account based in USD), so every figure converts at exactly 1.
_DEFAULT_FX = FxRates(Reference(), lambda symbol: None)


class PositionValue(msgspec.Struct, frozen=True, kw_only=True):
    """One (account, symbol) valued at `mark` (None: no mark). Money includes the
    multiplier; None is an unknown value (module doc)."""

    account: str
    symbol: str
    net_qty: Decimal
    avg_open_price: Decimal | None  # None when flat
    multiplier: Decimal
    mark: Decimal | None
    realized_pnl_gross: Decimal
    fees: Decimal
    realized_pnl_net: Decimal
    unrealized_pnl: Decimal | None
    fifo_realized_pnl_gross: Decimal
    fifo_realized_pnl_net: Decimal
    fifo_unrealized_pnl: Decimal | None
    total_pnl: Decimal | None
    day_pnl: Decimal | None
    sod_realized_pnl_net: Decimal
    sod_unrealized_pnl: Decimal | None
    market_value: Decimal | None  # signed: net_qty x mark x multiplier
    gross_notional: Decimal  # |market_value|; open without a mark: at cost
    fill_count: int
    # In the account's base currency (module doc, "Base currency"); None: a rate is unknown.
    currency: str
    base_currency: str
    fx_rate: Decimal | None
    fx_legs: tuple[RateLeg, ...] | None
    foreign_fees: dict[str, Decimal]
    realized_pnl_gross_base: Decimal | None
    fees_base: Decimal | None
    realized_pnl_net_base: Decimal | None
    unrealized_pnl_base: Decimal | None
    total_pnl_base: Decimal | None
    day_pnl_base: Decimal | None
    gross_notional_base: Decimal | None
    fifo_realized_pnl_gross_base: Decimal | None
    fifo_unrealized_pnl_base: Decimal | None
    missing_rates: tuple[str, ...]  # currencies with no rate to the base


def value_position(position: PositionLike, mark: Decimal | None, fx: FxRates | None = None) -> PositionValue:
    """`position` valued at `mark` (None when there is no mark), in its own currency and
    in its account's base currency at `fx`'s rates (default: everything in USD): the
    module doc's formulas."""
    fx = fx or _DEFAULT_FX
    reference = fx.reference
    currency = position.currency or reference.currency(position.symbol)
    base = reference.base_currency(position.account)
    rate = fx.rate(currency, base)
    missing = [] if rate is not None else [currency]
    foreign_fees = position.foreign_fees
    foreign = foreign_day = ZERO
    fees_known = True  # every foreign fee has a rate
    for fee_currency, fee in foreign_fees.items():
        fee_rate = fx.rate(fee_currency, base)
        if fee_rate is None:
            missing.append(fee_currency)
            fees_known = False
            continue
        foreign = _add(foreign, _mul(fee, fee_rate.rate))
        today = _sub(fee, position.sod_foreign_fees.get(fee_currency, ZERO))
        foreign_day = _add(foreign_day, _mul(today, fee_rate.rate))
    net = position.net_qty
    multiplier = position.multiplier
    market_value = market_value_of(net, mark, multiplier)
    unrealized = unrealized_of(net, position.open_cost, mark, multiplier)
    fifo_unrealized = unrealized_of(net, position.fifo_open_cost, mark, multiplier)
    gross_notional = notional_of(net, position.open_cost, mark, multiplier)
    fees = position.fees
    realized_net = position.realized_pnl_net
    fifo_gross = position.fifo_realized_pnl_gross
    total = total_pnl_of(realized_net, unrealized)
    sod_realized_net = position.sod_realized_pnl_net
    sod_unrealized = position.sod_unrealized_pnl
    day = day_pnl_of(total, total_pnl_of(sod_realized_net, sod_unrealized))
    r = None if rate is None else rate.rate
    return PositionValue(
        account=position.account,
        symbol=position.symbol,
        net_qty=net,
        avg_open_price=position.avg_open_price,
        multiplier=multiplier,
        mark=mark,
        realized_pnl_gross=position.realized_pnl_gross,
        fees=fees,
        realized_pnl_net=realized_net,
        unrealized_pnl=unrealized,
        fifo_realized_pnl_gross=fifo_gross,
        fifo_realized_pnl_net=_sub(fifo_gross, fees),
        fifo_unrealized_pnl=fifo_unrealized,
        total_pnl=total,
        day_pnl=day,
        sod_realized_pnl_net=sod_realized_net,
        sod_unrealized_pnl=sod_unrealized,
        market_value=market_value,
        gross_notional=gross_notional,
        fill_count=position.fill_count,
        currency=currency,
        base_currency=base,
        fx_rate=r,
        fx_legs=None if rate is None else rate.legs,
        foreign_fees=foreign_fees,
        realized_pnl_gross_base=convert(position.realized_pnl_gross, r),
        fees_base=_less_foreign(fees, r, foreign, fees_known, sign=1),
        realized_pnl_net_base=_less_foreign(realized_net, r, foreign, fees_known),
        unrealized_pnl_base=convert(unrealized, r),
        total_pnl_base=_less_foreign(total, r, foreign, fees_known),
        day_pnl_base=_less_foreign(day, r, foreign_day, fees_known),
        gross_notional_base=convert(gross_notional, r),
        fifo_realized_pnl_gross_base=convert(fifo_gross, r),
        fifo_unrealized_pnl_base=convert(fifo_unrealized, r),
        missing_rates=tuple(missing),
    )


#: `PositionValue`'s fields about the base currency, in the order rows show them.
BASE_FIELDS = (
    "currency", "base_currency", "fx_rate", "fx_legs", "foreign_fees", "realized_pnl_gross_base", "fees_base",
    "realized_pnl_net_base", "unrealized_pnl_base", "total_pnl_base", "day_pnl_base", "gross_notional_base",
    "fifo_realized_pnl_gross_base", "fifo_unrealized_pnl_base", "missing_rates",
)


def _less_foreign(local: Decimal | None, rate: Decimal | None, foreign: Decimal, known: bool, sign: int = -1) -> Decimal | None:
    """`local x rate` minus (or, for fees, plus) the foreign fees already converted,
    rounded once; None when a term is unknown."""
    if local is None or rate is None or not known:
        return None
    if not foreign:
        return convert(local, rate)
    converted = _mul(local, rate)
    return round_base(_add(converted, foreign) if sign > 0 else _sub(converted, foreign))


# The rules below are `value_position`'s parts. They are public for figures that were
# stored rather than valued from a state (ptrc's position snapshots, which past days'
# reports read): those must follow the same rules.


def market_value_of(net_qty: Decimal, mark: Decimal | None, multiplier: Decimal) -> Decimal | None:
    """`net_qty x mark x multiplier`: 0 when flat (whatever the mark), None for an open
    position without a mark."""
    if not net_qty:
        return ZERO
    if mark is None:
        return None
    return _mul(_mul(net_qty, mark), multiplier)


def unrealized_of(net_qty: Decimal, open_cost: Decimal, mark: Decimal | None, multiplier: Decimal) -> Decimal | None:
    """`(net_qty x mark - open_cost) x multiplier`, which is exactly `net_qty x (mark -
    open_cost / net_qty) x multiplier` without the division: 0 when flat (whatever the
    mark), None for an open position without a mark. `open_cost` by average cost or
    the FIFO lots' gives the method's unrealized P&L."""
    if not net_qty:
        return ZERO
    if mark is None:
        return None
    return _mul(_sub(_mul(net_qty, mark), open_cost), multiplier)


def notional_of(net_qty: Decimal, open_cost: Decimal, mark: Decimal | None, multiplier: Decimal) -> Decimal:
    """`|net_qty x mark x multiplier|`; an open position without a mark at its cost."""
    value = _mul(net_qty, mark) if mark is not None else open_cost
    return _abs(_mul(value, multiplier))


def total_pnl_of(realized_pnl_net: Decimal, unrealized_pnl: Decimal | None) -> Decimal | None:
    """Realized net + unrealized; None when the unrealized P&L is unknown."""
    return None if unrealized_pnl is None else _add(realized_pnl_net, unrealized_pnl)


def day_pnl_of(total_pnl: Decimal | None, start_of_day_total: Decimal | None) -> Decimal | None:
    """Total P&L now minus total P&L at the start of the day; None if either is unknown."""
    if total_pnl is None or start_of_day_total is None:
        return None
    return _sub(total_pnl, start_of_day_total)


def sum_known(values: Iterable[Decimal | None]) -> Decimal | None:
    """The exact sum, or None when any value is unknown (a partial sum would look real)."""
    total = ZERO
    for value in values:
        if value is None:
            return None
        total = _add(total, value)
    return total


# -- accounts ------------------------------------------------------------------------------


class AccountValue(msgspec.Struct, frozen=True, kw_only=True):
    """Sums over one account's position values, in the account's `base_currency`: each
    the sum of the positions' `*_base` figures. A sum that includes an unknown value (an
    open position without a mark; for `day_pnl` also an unknown start of day; any
    figure whose rate is unknown) is None; `missing_rates` lists the currencies whose
    rate to the base is unknown. Flat positions count 0 whether marked or not;
    `gross_notional` counts an unmarked open position at cost, as `PositionValue` does."""

    account: str
    base_currency: str
    positions: int
    open_positions: int
    realized_pnl_gross: Decimal | None
    fees: Decimal | None
    realized_pnl_net: Decimal | None
    unrealized_pnl: Decimal | None
    fifo_realized_pnl_gross: Decimal | None
    fifo_unrealized_pnl: Decimal | None
    total_pnl: Decimal | None
    day_pnl: Decimal | None
    gross_notional: Decimal | None
    missing_rates: list[str]


#: The base figures an account sums, and the `AccountValue` field each sum goes to.
_SUMMED = (
    ("realized_pnl_gross_base", "realized_pnl_gross"),
    ("fees_base", "fees"),
    ("realized_pnl_net_base", "realized_pnl_net"),
    ("unrealized_pnl_base", "unrealized_pnl"),
    ("fifo_realized_pnl_gross_base", "fifo_realized_pnl_gross"),
    ("fifo_unrealized_pnl_base", "fifo_unrealized_pnl"),
    ("total_pnl_base", "total_pnl"),
    ("day_pnl_base", "day_pnl"),
    ("gross_notional_base", "gross_notional"),
)
_N = len(_SUMMED)


class AccountSums:
    """Running sums of one account's position values, kept as they change: `add` a
    value, `remove` the one it replaces, read `value(account)`. This is the definition
    of `AccountValue` (`account_value` folds values into one), kept incrementally for
    readers that revalue one position at a time and must not go over the whole account
    again. Exact: removing a value and adding its successor never rounds. Each sum also
    counts its unknown terms and is None while there are any.
    """

    __slots__ = ("positions", "open_positions", "sums", "unknown", "missing", "base_currency")

    def __init__(self) -> None:
        self.positions = self.open_positions = 0
        self.sums = [ZERO] * _N
        self.unknown = [0] * _N
        self.missing: dict[str, int] = {}  # currency -> positions missing its rate
        self.base_currency: str | None = None

    def add(self, value: PositionValue) -> None:
        self._fold(value, _add, 1)

    def remove(self, value: PositionValue) -> None:
        """Take out a value added before (the position was revalued or replaced)."""
        self._fold(value, _sub, -1)

    def _fold(self, value: PositionValue, op: Callable[[Decimal, Decimal], Decimal], sign: int) -> None:
        self.positions += sign
        self.base_currency = value.base_currency
        if value.net_qty:
            self.open_positions += sign
        sums, unknown = self.sums, self.unknown
        for i, (field, _) in enumerate(_SUMMED):
            term = getattr(value, field)
            if term is None:
                unknown[i] += sign
            else:
                sums[i] = op(sums[i], term)
        for currency in value.missing_rates:
            count = self.missing.get(currency, 0) + sign
            if count:
                self.missing[currency] = count
            else:
                del self.missing[currency]

    def value(self, account: str, base_currency: str | None = None) -> AccountValue:
        """The sums; `base_currency` names the base of an account with no positions."""
        sums = {
            name: None if self.unknown[i] else self.sums[i] for i, (_, name) in enumerate(_SUMMED)
        }
        return AccountValue(
            account=account,
            base_currency=self.base_currency or base_currency or _DEFAULT_FX.reference.default_base_currency,
            positions=self.positions,
            open_positions=self.open_positions,
            missing_rates=sorted(self.missing),
            **sums,
        )


def account_value(account: str, values: Iterable[PositionValue]) -> AccountValue:
    """The totals of `values`, all of them positions of `account`."""
    sums = AccountSums()
    for value in values:
        sums.add(value)
    return sums.value(account)
