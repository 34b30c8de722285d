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
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from decimal import Decimal
from typing import Protocol

import msgspec

from posttrade.core.exact import EXACT, ZERO

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


def value_position(position: PositionLike, mark: Decimal | None) -> PositionValue:
    """`position` valued at `mark` (None when there is no mark): the module doc's formulas."""
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
        day_pnl=day_pnl_of(total, total_pnl_of(sod_realized_net, sod_unrealized)),
        sod_realized_pnl_net=sod_realized_net,
        sod_unrealized_pnl=sod_unrealized,
        market_value=market_value,
        gross_notional=gross_notional,
        fill_count=position.fill_count,
    )


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
    """Sums over one account's position values. A sum that includes an unknown value
    (an open position without a mark; for `day_pnl` also an unknown start of day) is
    None. Flat positions count 0 whether marked or not; `gross_notional` counts an
    unmarked open position at cost, as `PositionValue` does."""

    account: str
    positions: int
    open_positions: int
    realized_pnl_gross: Decimal
    fees: Decimal
    realized_pnl_net: Decimal
    unrealized_pnl: Decimal | None
    fifo_realized_pnl_gross: Decimal
    fifo_unrealized_pnl: Decimal | None
    total_pnl: Decimal | None
    day_pnl: Decimal | None
    gross_notional: Decimal


class AccountSums:
    """Running sums of one account's position values, kept as they change: `add` a
    value, `remove` the one it replaces, read `value(account)`. This is the definition
    of `AccountValue` (`account_value` folds values into one), kept incrementally for
    readers that revalue one position at a time and must not go over the whole account
    again. Exact: removing a value and adding its successor never rounds. A sum that
    may be unknown also counts its unknown terms and is None while there are any.

    Written out field by field: it runs for every change of every position.
    """

    __slots__ = (
        "positions", "open_positions", "realized_pnl_gross", "fees", "fifo_realized_pnl_gross",
        "gross_notional", "unrealized_pnl", "fifo_unrealized_pnl", "day_pnl",
        "unknown_unrealized", "unknown_fifo_unrealized", "unknown_day",
    )  # fmt: skip

    def __init__(self) -> None:
        self.positions = self.open_positions = 0
        self.realized_pnl_gross = self.fees = self.fifo_realized_pnl_gross = self.gross_notional = ZERO
        self.unrealized_pnl = self.fifo_unrealized_pnl = self.day_pnl = ZERO
        self.unknown_unrealized = self.unknown_fifo_unrealized = self.unknown_day = 0

    def add(self, value: PositionValue) -> None:
        self._fold(value, _add, 1)

    def remove(self, value: PositionValue) -> None:
        """Take out a value added before (the position was revalued or replaced)."""
        self._fold(value, _sub, -1)

    def _fold(self, value: PositionValue, op: Callable[[Decimal, Decimal], Decimal], sign: int) -> None:
        self.positions += sign
        if value.net_qty:
            self.open_positions += sign
        self.realized_pnl_gross = op(self.realized_pnl_gross, value.realized_pnl_gross)
        self.fees = op(self.fees, value.fees)
        self.fifo_realized_pnl_gross = op(self.fifo_realized_pnl_gross, value.fifo_realized_pnl_gross)
        self.gross_notional = op(self.gross_notional, value.gross_notional)
        term = value.unrealized_pnl
        if term is None:
            self.unknown_unrealized += sign
        else:
            self.unrealized_pnl = op(self.unrealized_pnl, term)
        term = value.fifo_unrealized_pnl
        if term is None:
            self.unknown_fifo_unrealized += sign
        else:
            self.fifo_unrealized_pnl = op(self.fifo_unrealized_pnl, term)
        term = value.day_pnl
        if term is None:
            self.unknown_day += sign
        else:
            self.day_pnl = op(self.day_pnl, term)

    def value(self, account: str) -> AccountValue:
        unrealized = None if self.unknown_unrealized else self.unrealized_pnl
        realized_net = _sub(self.realized_pnl_gross, self.fees)
        return AccountValue(
            account=account,
            positions=self.positions,
            open_positions=self.open_positions,
            realized_pnl_gross=self.realized_pnl_gross,
            fees=self.fees,
            realized_pnl_net=realized_net,
            unrealized_pnl=unrealized,
            fifo_realized_pnl_gross=self.fifo_realized_pnl_gross,
            fifo_unrealized_pnl=None if self.unknown_fifo_unrealized else self.fifo_unrealized_pnl,
            total_pnl=total_pnl_of(realized_net, unrealized),
            day_pnl=None if self.unknown_day else self.day_pnl,
            gross_notional=self.gross_notional,
        )


def account_value(account: str, values: Iterable[PositionValue]) -> AccountValue:
    """The totals of `values`, all of them positions of `account`."""
    sums = AccountSums()
    for value in values:
        sums.add(value)
    return sums.value(account)
