"""Positions and P&L per (account, symbol): pure, synchronous, exact.

This module is the one place where position and P&L arithmetic lives. The live service
(ptrc, pnl) and the reconciliation command (`posttrade positions compute`) both call it,
so they agree to the last decimal.

Units
-----
Quantities and prices are `Decimal`. A fill's `qty` is always positive; `side` says the
direction. `net_qty` is signed: > 0 long, < 0 short. Every money amount is in the
instrument's currency and already includes the contract `multiplier` (1 unless the
instrument reference data says otherwise, e.g. 50 for an index future). Fees are money,
charged per fill as given (the multiplier is never applied to a fee); a rebate is a
negative fee.

Average cost (the default method)
---------------------------------
- A fill that opens or adds to the position moves the average open price to the
  quantity-weighted average of the old position and the fill.
- A fill that reduces the position realizes
  `closed_qty x (price - avg_open_price) x multiplier` for a long and
  `closed_qty x (avg_open_price - price) x multiplier` for a short, and leaves the average
  unchanged.
- A fill larger than the position flips it: the whole position is closed at the fill
  price (realizing P&L as above), and the remainder opens a new position whose average
  is the fill price. Its fee is charged once, in full, to `fees` (never split, never
  counted twice).
- Going flat and reopening starts a new average (the flat position has no average:
  `avg_open_price` is None).
- `unrealized_pnl = net_qty x (mark - avg_open_price) x multiplier`.

FIFO lots (computed beside it, on every fill)
---------------------------------------------
Each opening fill adds a lot (qty, price, ts). A reducing fill consumes the oldest lots
first, realizing `consumed_qty x (price - lot_price) x multiplier` per lot for a long (the
opposite sign for a short). A flip consumes every lot and opens one new lot with the
remainder at the fill price. FIFO unrealized P&L is measured against the remaining lots'
own prices. `fees` are the same under both methods.

Exactness, and the one rounding
-------------------------------
All arithmetic is exact (see `posttrade.core.exact`). The state keeps the open *cost*
(`open_cost`, signed sum of qty x price of what is open), not the average, so no money
is ever lost to rounding: `realized_pnl_gross + unrealized_pnl` always equals the
cash-flow P&L `-sum(signed_qty x price) x multiplier + net_qty x mark x multiplier`
exactly, under both methods.

The average itself is `open_cost / net_qty`, and a quotient need not terminate (buy 1 at
100 and 2 at 101: the average is 100.666...). So:

- `avg_open_price` is shown rounded half to even to 12 decimal places (so it is exact
  whenever it has at most 12). It is for display: unrealized P&L is computed from the
  cost, `(net_qty x mark - open_cost) x multiplier`, which is exactly
  `net_qty x (mark - open_cost / net_qty) x multiplier`.
- A *partial* close of `closed_qty` takes `open_cost x closed_qty / abs(net_qty)`
  (closed_qty x average) out of the cost and realizes the difference to what the fill
  paid or received. That closed cost is rounded half to even to 12 decimal places when
  it has more (before the multiplier), so each partial close realizes at most
  0.5e-12 x multiplier away from the rational value; the rounding difference stays in
  `open_cost` and is realized when the rest is closed. Full closes and flips never
  round. FIFO never divides and never rounds.
- A reduce leaves the average unchanged. When a partial close rounded, `cost left /
  qty left` could differ from the average in the 12th place (by up to 0.5e-12 /
  remaining_qty), so the average as it stood is held (`avg_open_price_held`) until the
  next open, add, or full close; an add takes the weighted average of the cost again.

  Example: buy 1 @ 100, buy 2 @ 101 (cost 302, average 100.666666666667 shown), sell
  1 @ 101: the closed cost 100.666... is taken as 100.666666666667, realized
  0.333333333333, cost left 201.333333333333, average still 100.666666666667; at a
  mark of 101 unrealized is 0.666666666667, and realized + unrealized is exactly 1.

Day P&L
-------
`roll_day(mark)` stores a start-of-day snapshot: realized gross, fees, and the unrealized
P&L at that moment's mark. Then

    day_pnl(mark) = (realized_pnl_net + unrealized_pnl(mark))
                  - (sod_realized_pnl_net + sod_unrealized_pnl)

i.e. today's realized P&L net of today's fees plus the change in unrealized P&L. Because
realized gross + unrealized is the same under both methods, so is day P&L. A position
first traded today has an all-zero snapshot. If the position was open at the roll and
had no mark then, its start-of-day value is unknown and `day_pnl` is None until the
next roll.

Ordering and idempotency
------------------------
Average cost depends on the order of fills; this module applies them in the order given
and neither deduplicates nor reorders. `posttrade.core.history.ExecutionBook` sits in
front of it everywhere a feed is applied (ptrc, the reconciliation replay, the CLI): it
drops resends, applies corrections and busts, places late fills in time and replays
this fold from the point that changed.

Using it
--------
    book = PositionBook(multipliers={"ES": 50})   # instrument reference data
    position = book.apply(fill)                   # a validated events.Fill; in place
    book.apply_many(fills)                        # a batch: faster, returns the
                                                  # positions changed, each once
    book.set_mark("ES", price)
    position.unrealized_pnl(book.mark("ES")); position.day_pnl(book.mark("ES"))
    position_row(position, book.mark("ES"))       # the CLI / API row, as text
    book.roll_day()                               # at the start of each trading day
    book.account_totals("ACC")                    # sums per account
    raw = encode_position(position)               # changelog; then, on recovery:
    book.restore(decode_position(raw))

Serialization
-------------
`encode_position` / `decode_position` (JSON bytes), `Position.to_state` / `from_state`
(a `PositionState` msgspec Struct, for any msgspec codec) and `Position.to_dict` /
`from_dict` (plain data) all round-trip exactly: every Decimal travels as its exact
string, and the decoded position compares equal to the original.
"""

from __future__ import annotations

from decimal import Decimal, getcontext, setcontext
from operator import attrgetter
from typing import Any, Collection, Iterable, Iterator, Literal, Mapping, Protocol

import msgspec

from posttrade.core.exact import (
    EXACT,
    ONE,
    ZERO,
    divide_rounded,
    divide_rounded_noting,
    format_decimal,
    parse_decimal,
)
from posttrade.core.fx import FxRates
from posttrade.core.reference import Reference
from posttrade.core.valuation import (
    BASE_FIELDS,
    AccountValue,
    PositionValue,
    account_value,
    day_pnl_of,
    notional_of,
    total_pnl_of,
    unrealized_of,
    value_position,
)

Method = Literal["avg", "fifo", "both"]

#: The reconciliation row, in output order (`position_row`).
ROW_FIELDS = (
    "account",
    "symbol",
    "net_qty",
    "avg_open_price",
    "realized_pnl_gross",
    "fees",
    "realized_pnl_net",
    "mark",
    "unrealized_pnl",
    "fifo_realized_pnl_gross",
    "fifo_unrealized_pnl",
    *BASE_FIELDS,
)


class FillLike(Protocol):
    """What the core reads from a fill (`posttrade.streams.events.Fill` has it all)."""

    ts: int
    fill_id: str | None
    account: str
    symbol: str
    side: str  # "BUY" | "SELL"
    qty: Decimal  # > 0
    price: Decimal  # > 0
    fee: Decimal  # negative for a rebate
    fee_currency: str | None  # None: the instrument's currency


#: An open FIFO lot: (qty > 0 left open, price, ts of the fill that opened it). The lot's
#: side is the position's. A plain tuple because the hot path creates one per opening fill.
Lot = tuple[Decimal, Decimal, int]

_add = EXACT.add
_sub = EXACT.subtract
_mul = EXACT.multiply


class PositionState(msgspec.Struct):
    """The serialized form of a `Position`: a snapshot for a changelog or the wire.

    Encode with msgspec (every Decimal becomes an exact string, lots become
    `[qty, price, ts]` arrays); `Position.from_state` gives back an equal position.
    A snapshot shares nothing mutable with the live position, so it can be stored in
    a table (whose undo keeps old values) while the position moves on.
    """

    account: str
    symbol: str
    multiplier: Decimal = ONE
    net_qty: Decimal = ZERO
    open_cost: Decimal = ZERO
    realized_pnl_gross: Decimal = ZERO
    fees: Decimal = ZERO
    fifo_lots: list[tuple[Decimal, Decimal, int]] = []
    fifo_open_cost: Decimal = ZERO
    fifo_realized_pnl_gross: Decimal = ZERO
    fill_count: int = 0
    last_ts: int | None = None
    last_fill_id: str | None = None
    sod_realized_pnl_gross: Decimal = ZERO
    sod_fees: Decimal = ZERO
    sod_unrealized_pnl: Decimal | None = ZERO
    sod_mark: Decimal | None = None
    avg_open_price_held: Decimal | None = None
    # Kept by the execution history (`core.history`), not by the fold: how many times
    # the key's figures were published, and how many amendments touched its history.
    revision: int = 0
    corrections: int = 0
    busts: int = 0
    # The instrument's currency (reference data; None: not given, as in a bare book), and
    # fees charged in other currencies, by currency (`fees` holds the instrument's own).
    currency: str | None = None
    foreign_fees: dict[str, Decimal] = {}
    sod_foreign_fees: dict[str, Decimal] = {}


_STATE_FIELDS: tuple[str, ...] = PositionState.__struct_fields__
_state_values = attrgetter(*_STATE_FIELDS)


class Position:
    """The position and P&L of one account in one symbol, under both methods.

    Mutable: `apply` updates it in place. State (the fields of `PositionState`):

    - `net_qty`: signed quantity.
    - `open_cost`: signed sum of qty x price of the open position by average cost
      (`avg_open_price = open_cost / net_qty`); 0 when flat.
    - `realized_pnl_gross`, `fees`: money; `realized_pnl_net` = gross - fees. A fee
      whose `fee_currency` is not the position's `currency` goes to `foreign_fees`
      instead (by currency): only a base currency adds them (`core.valuation`).
    - `fifo_lots` (oldest first), `fifo_open_cost` (signed sum over the lots of
      qty x price), `fifo_realized_pnl_gross`.
    - `fill_count`, `last_ts`, `last_fill_id`: the fills applied so far.
    - `sod_*`: the start-of-day snapshot (see the module doc, "Day P&L").

    A plain class with `__slots__` rather than a msgspec Struct because attribute
    writes on it are about three times cheaper, and the hot path makes about ten per
    fill; `to_state` / `from_state` / `to_dict` / `from_dict` serialize it.
    """

    __slots__ = _STATE_FIELDS

    account: str
    symbol: str
    multiplier: Decimal
    net_qty: Decimal
    open_cost: Decimal
    realized_pnl_gross: Decimal
    fees: Decimal
    fifo_lots: list[Lot]
    fifo_open_cost: Decimal
    fifo_realized_pnl_gross: Decimal
    fill_count: int
    last_ts: int | None
    last_fill_id: str | None
    sod_realized_pnl_gross: Decimal
    sod_fees: Decimal
    sod_unrealized_pnl: Decimal | None
    sod_mark: Decimal | None
    avg_open_price_held: Decimal | None
    revision: int
    corrections: int
    busts: int
    currency: str | None
    foreign_fees: dict[str, Decimal]
    sod_foreign_fees: dict[str, Decimal]

    def __init__(self, account: str, symbol: str, multiplier: Decimal = ONE, currency: str | None = None):
        """A flat position with no history."""
        self.account = account
        self.symbol = symbol
        self.multiplier = multiplier
        self.currency = currency
        self.foreign_fees = {}
        self.sod_foreign_fees = {}
        self.net_qty = ZERO
        self.open_cost = ZERO
        self.realized_pnl_gross = ZERO
        self.fees = ZERO
        self.fifo_lots = []
        self.fifo_open_cost = ZERO
        self.fifo_realized_pnl_gross = ZERO
        self.fill_count = 0
        self.last_ts = None
        self.last_fill_id = None
        self.sod_realized_pnl_gross = ZERO
        self.sod_fees = ZERO
        self.sod_unrealized_pnl = ZERO
        self.sod_mark = None
        self.avg_open_price_held = None
        self.revision = 0
        self.corrections = 0
        self.busts = 0

    # -- updates -------------------------------------------------------------------

    def apply(self, fill: FillLike) -> None:
        """Apply one fill (its account and symbol are not checked: the book routes)."""
        saved = getcontext()
        setcontext(EXACT)
        try:
            self._apply(fill)
        finally:
            setcontext(saved)

    def _apply(self, fill: FillLike) -> None:
        # The hot path: runs under EXACT (the caller sets it). Everything that can raise
        # is checked or computed before the first mutation.
        qty = fill.qty
        price = fill.price
        fee = fill.fee
        side = fill.side
        if side == "BUY":
            buy = True
        elif side == "SELL":
            buy = False
        else:
            raise ValueError(f"side must be BUY or SELL, got {side!r}")
        if not (qty > ZERO and price > ZERO and fee.is_finite()):
            raise ValueError(f"fill needs qty > 0, price > 0 and a finite fee: {fill!r}")
        net = self.net_qty
        long = net > ZERO
        # Signs are handled by branching rather than by negating Decimals: every
        # arithmetic operation allocates, and this path runs for every fill.

        if not net or long is buy:
            # Opens or adds: both methods just accumulate cost.
            cost = qty * price
            if buy:
                self.net_qty = net + qty
                self.open_cost += cost
                self.fifo_open_cost += cost
            else:
                self.net_qty = net - qty
                self.open_cost -= cost
                self.fifo_open_cost -= cost
            self.fifo_lots.append((qty, price, fill.ts))
            self.avg_open_price_held = None  # the new weighted average: from the cost
            if fee:
                currency = fill.fee_currency
                if currency is None or currency == self.currency:
                    self.fees += fee
                else:
                    self._charge_foreign(currency, fee)
            self.fill_count += 1
            self.last_ts = fill.ts
            self.last_fill_id = fill.fill_id
            return

        size = net if long else -net
        if qty < size:
            # Partial close of `qty`. Average cost takes the closed share of the cost,
            # qty x avg = open_cost x qty / size (signed like the position), out of the
            # cost: the one division. FIFO takes the oldest lots.
            cost = self.open_cost
            closed_cost, rounded = divide_rounded_noting(cost * qty, size)
            if rounded and self.avg_open_price_held is None:
                # Rounded: the cost left is off the average's share by up to 0.5e-12,
                # which `cost / net_qty` would show in the average. A reduce leaves the
                # average unchanged, so hold it as it stands.
                self.avg_open_price_held = divide_rounded(cost, net)
            lots = self.fifo_lots
            left = qty
            consumed = ZERO  # unsigned
            done = 0
            for lot_qty, lot_price, lot_ts in lots:
                if lot_qty <= left:
                    consumed += lot_qty * lot_price
                    left -= lot_qty
                    done += 1
                    if not left:
                        break
                else:
                    consumed += left * lot_price
                    lots[done] = (lot_qty - left, lot_price, lot_ts)
                    break
            if done:
                del lots[:done]
            value = qty * price
            self.open_cost = cost - closed_cost
            mult = self.multiplier
            if long:
                # realized = qty x price - closed cost
                self.net_qty = net - qty
                realized = value - closed_cost
                fifo_realized = value - consumed
                self.fifo_open_cost -= consumed
            else:
                # realized = -qty x price - closed cost (which is negative for a short)
                self.net_qty = net + qty
                realized = -(value + closed_cost)
                fifo_realized = consumed - value
                self.fifo_open_cost += consumed
            if mult != ONE:
                realized *= mult
                fifo_realized *= mult
            self.realized_pnl_gross += realized
            self.fifo_realized_pnl_gross += fifo_realized
        else:
            # Closes everything (no rounding: the whole cost goes), then maybe flips.
            proceeds = net * price
            realized = proceeds - self.open_cost
            fifo_realized = proceeds - self.fifo_open_cost
            mult = self.multiplier
            if mult != ONE:
                realized *= mult
                fifo_realized *= mult
            self.realized_pnl_gross += realized
            self.fifo_realized_pnl_gross += fifo_realized
            rest = qty - size
            if rest:
                cost = rest * price
                if buy:
                    self.net_qty = rest
                    self.open_cost = self.fifo_open_cost = cost
                else:
                    self.net_qty = -rest
                    self.open_cost = self.fifo_open_cost = -cost
                self.fifo_lots = [(rest, price, fill.ts)]
            else:
                self.net_qty = self.open_cost = self.fifo_open_cost = ZERO
                self.fifo_lots = []
            self.avg_open_price_held = None

        if fee:
            currency = fill.fee_currency
            if currency is None or currency == self.currency:
                self.fees += fee
            else:
                self._charge_foreign(currency, fee)
        self.fill_count += 1
        self.last_ts = fill.ts
        self.last_fill_id = fill.fill_id

    def _charge_foreign(self, currency: str, fee: Decimal) -> None:
        # A new dict, not an update in place: snapshots (`to_state`) share it.
        fees = dict(self.foreign_fees)
        fees[currency] = fees.get(currency, ZERO) + fee
        self.foreign_fees = fees

    def roll_day(self, mark: Decimal | None) -> None:
        """Start a new day: snapshot realized gross, fees, and unrealized P&L at `mark`."""
        self.sod_realized_pnl_gross = self.realized_pnl_gross
        self.sod_fees = self.fees
        self.sod_foreign_fees = self.foreign_fees
        self.sod_unrealized_pnl = self.unrealized_pnl(mark)
        self.sod_mark = mark

    # -- reads -----------------------------------------------------------------------

    @property
    def is_flat(self) -> bool:
        return not self.net_qty

    @property
    def avg_open_price(self) -> Decimal | None:
        """`open_cost / net_qty` to at most 12 decimal places, as it stood before any
        reduces since the last open or add (None when flat)."""
        if self.avg_open_price_held is not None:
            return self.avg_open_price_held
        return divide_rounded(self.open_cost, self.net_qty) if self.net_qty else None

    @property
    def fifo_avg_open_price(self) -> Decimal | None:
        """Weighted average price of the remaining FIFO lots, like `avg_open_price`."""
        return divide_rounded(self.fifo_open_cost, self.net_qty) if self.net_qty else None

    @property
    def realized_pnl_net(self) -> Decimal:
        return _sub(self.realized_pnl_gross, self.fees)

    @property
    def fifo_realized_pnl_net(self) -> Decimal:
        return _sub(self.fifo_realized_pnl_gross, self.fees)

    # The valuation at a mark: the rules of `core.valuation`, which every reader uses.

    def unrealized_pnl(self, mark: Decimal | None) -> Decimal | None:
        """`net_qty x (mark - avg_open_price) x multiplier`, computed exactly from cost.

        0 when flat (whatever the mark); None when open and `mark` is None.
        """
        return unrealized_of(self.net_qty, self.open_cost, mark, self.multiplier)

    def fifo_unrealized_pnl(self, mark: Decimal | None) -> Decimal | None:
        """Sum over the remaining lots of `qty x (mark - lot price) x multiplier`."""
        return unrealized_of(self.net_qty, self.fifo_open_cost, mark, self.multiplier)

    def total_pnl(self, mark: Decimal | None) -> Decimal | None:
        """Realized net + unrealized (the same under both methods); None if unknown."""
        return total_pnl_of(self.realized_pnl_net, self.unrealized_pnl(mark))

    @property
    def sod_realized_pnl_net(self) -> Decimal:
        return _sub(self.sod_realized_pnl_gross, self.sod_fees)

    @property
    def day_realized_pnl_net(self) -> Decimal:
        """Realized P&L since the roll, net of the fees since the roll."""
        return _sub(self.realized_pnl_net, self.sod_realized_pnl_net)

    def day_pnl(self, mark: Decimal | None) -> Decimal | None:
        """Total P&L now minus total P&L at the start of day (see the module doc)."""
        return day_pnl_of(self.total_pnl(mark), total_pnl_of(self.sod_realized_pnl_net, self.sod_unrealized_pnl))

    def notional(self, mark: Decimal | None) -> Decimal:
        """`|net_qty x mark x multiplier|`; without a mark, valued at its average cost."""
        return notional_of(self.net_qty, self.open_cost, mark, self.multiplier)

    # -- copies and serialization ----------------------------------------------------------

    def copy(self) -> Position:
        """An independent copy: a snapshot that later fills won't touch."""
        return Position.from_state(self.to_state())

    def to_state(self) -> PositionState:
        """A snapshot of the state (independent of later fills)."""
        state = PositionState(*_state_values(self))
        state.fifo_lots = state.fifo_lots.copy()  # lots are tuples: a shallow copy will do
        return state

    @classmethod
    def from_state(cls, state: PositionState) -> Position:
        position = cls.__new__(cls)
        for name in _STATE_FIELDS:
            setattr(position, name, getattr(state, name))
        position.fifo_lots = [tuple(lot) for lot in state.fifo_lots]
        return position

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data (Decimals as strings, lots as [qty, price, ts])."""
        return msgspec.to_builtins(self.to_state())

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Position:
        return cls.from_state(msgspec.convert(data, PositionState))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Position):
            return NotImplemented
        return all(getattr(self, name) == getattr(other, name) for name in _STATE_FIELDS)

    __hash__ = None  # mutable

    def __repr__(self) -> str:
        avg = self.avg_open_price
        return (
            f"Position({self.account!r}, {self.symbol!r}, net_qty={self.net_qty}, "
            f"avg_open_price={avg}, realized_pnl_gross={self.realized_pnl_gross}, "
            f"fees={self.fees}, fifo_realized_pnl_gross={self.fifo_realized_pnl_gross}, "
            f"lots={len(self.fifo_lots)}, fills={self.fill_count})"
        )


def encode_position(position: Position) -> bytes:
    """JSON bytes of the position's state (what a changelog stores)."""
    return _encoder.encode(position.to_state())


def decode_position(raw: bytes) -> Position:
    return Position.from_state(_state_decoder.decode(raw))


_encoder = msgspec.json.Encoder(decimal_format="string")
_state_decoder = msgspec.json.Decoder(PositionState)


def position_row(position: Position, mark: Decimal | None, method: Method = "both", fx: FxRates | None = None) -> dict:
    """The reconciliation row (`ROW_FIELDS`), every number a canonical decimal string.

    The local figures (in the instrument's currency) are followed by the base-currency
    ones at `fx`'s rates (`core.valuation`'s `BASE_FIELDS`, by average cost with the
    FIFO ones beside them, whatever the method).

    - `both`: the headline fields (`avg_open_price`, `realized_pnl_gross`,
      `realized_pnl_net`, `unrealized_pnl`) by average cost, plus the `fifo_*` fields.
    - `avg`: the same headline fields; `fifo_*` are null.
    - `fifo`: the headline fields by FIFO (`avg_open_price` is then the weighted average
      price of the remaining lots, realized is FIFO realized), and the `fifo_*` fields
      repeat the FIFO numbers.

    `avg_open_price` is null when flat. With no mark, `mark` and both unrealized fields
    are null, even for a flat position.
    """
    fifo = method == "fifo"
    marked = mark is not None
    if fifo:
        avg = position.fifo_avg_open_price
        gross = position.fifo_realized_pnl_gross
        unrealized = position.fifo_unrealized_pnl(mark) if marked else None
    else:
        avg = position.avg_open_price
        gross = position.realized_pnl_gross
        unrealized = position.unrealized_pnl(mark) if marked else None
    with_fifo = method != "avg"
    return {
        "account": position.account,
        "symbol": position.symbol,
        "net_qty": format_decimal(position.net_qty),
        "avg_open_price": format_decimal(avg),
        "realized_pnl_gross": format_decimal(gross),
        "fees": format_decimal(position.fees),
        "realized_pnl_net": format_decimal(_sub(gross, position.fees)),
        "mark": format_decimal(mark),
        "unrealized_pnl": format_decimal(unrealized),
        "fifo_realized_pnl_gross": (
            format_decimal(position.fifo_realized_pnl_gross) if with_fifo else None
        ),
        "fifo_unrealized_pnl": (
            format_decimal(position.fifo_unrealized_pnl(mark)) if with_fifo and marked else None
        ),
        **base_row(value_position(position, mark, fx)),
    }


def base_row(value: PositionValue) -> dict:
    """`value`'s base-currency fields as text: decimals canonical, the rate's legs and
    the foreign fees as plain data."""
    return {name: _text(getattr(value, name)) for name in BASE_FIELDS}


def _text(value: Any) -> Any:
    if isinstance(value, Decimal):
        return format_decimal(value)
    if isinstance(value, (msgspec.Struct, tuple, list, dict)):
        data = msgspec.to_builtins(value, builtin_types=(Decimal,))
        if isinstance(data, dict):
            return {k: _text(v) for k, v in data.items()}
        return [_text(v) for v in data]
    return value


#: Sums over one account's positions (see `core.valuation.AccountValue`).
AccountTotals = AccountValue


def account_totals(
    account: str, positions: Iterable[Position], marks: Mapping[str, Decimal], fx: FxRates | None = None
) -> AccountValue:
    """Totals of `positions` (all of `account`), valued at `marks` (symbol -> price), in
    the account's base currency at `fx`'s rates (default: everything in USD)."""
    return account_value(account, (value_position(p, marks.get(p.symbol), fx) for p in positions))


class PositionBook:
    """All positions, keyed by (account, symbol), with instrument data and marks.

    - `reference`: the reference data (`core.reference`): each symbol's multiplier and
      currency, the accounts' base currencies and fixed FX rates. Default: everything
      in USD, multiplier 1.
    - `multipliers`: symbol -> contract multiplier, over the reference's. A position
      takes its symbol's multiplier and currency when it is created; changing the
      multiplier of a symbol with an open position is refused (that is a corporate
      action, not a data update).
    - `marks`: symbol -> last mark price, set with `set_mark`; FX instruments' marks
      give the rates of the account totals (`fx`).

    `apply(fill)` routes the fill to its position (creating it) and returns the position,
    updated in place. `apply_many` does the same for a batch, a little faster.
    """

    __slots__ = ("_accounts", "multipliers", "marks", "reference", "fx")

    def __init__(
        self,
        multipliers: Mapping[str, Decimal | str | int] | None = None,
        marks: Mapping[str, Decimal | str | int] | None = None,
        positions: Iterable[Position] = (),
        reference: Reference | None = None,
    ):
        self._accounts: dict[str, dict[str, Position]] = {}
        self.reference = reference or Reference()
        self.multipliers: dict[str, Decimal] = dict(self.reference.multipliers)
        self.marks: dict[str, Decimal] = {}
        marks_now = self.marks
        self.fx = FxRates(self.reference, lambda symbol: (marks_now[symbol], "mark", None) if symbol in marks_now else None)
        for symbol, value in (multipliers or {}).items():
            self.multipliers[symbol] = parse_decimal(f"multiplier of {symbol}", value, positive=True)
        for symbol, value in (marks or {}).items():
            self.set_mark(symbol, value)
        for position in positions:
            self.restore(position)

    # -- updates -------------------------------------------------------------------

    def apply(self, fill: FillLike) -> Position:
        """Apply one fill to its position (created on first use) and return it.

        An invalid fill (qty or price not > 0, fee not finite, unknown side) raises
        ValueError and changes nothing.
        """
        symbols = self._accounts.get(fill.account)
        position = None if symbols is None else symbols.get(fill.symbol)
        if position is None:
            position = self._position_for(fill)
        saved = getcontext()
        setcontext(EXACT)
        try:
            position._apply(fill)
        except BaseException:
            self._forget_if_unused(position)
            raise
        finally:
            setcontext(saved)
        return position

    def apply_many(self, fills: Iterable[FillLike]) -> list[Position]:
        """Apply fills in order; return the positions they changed, each once.

        The positions come in the order they were first touched, in their state after
        the last fill. Faster than `apply` in a loop: the exact decimal context is set
        once for the batch instead of once per fill (about a fifth of the cost of a
        fill). At the first invalid fill it raises ValueError; the fills before it stay
        applied.
        """
        touched: dict[int, Position] = {}
        accounts = self._accounts
        saved = getcontext()
        setcontext(EXACT)
        try:
            for fill in fills:
                symbols = accounts.get(fill.account)
                position = None if symbols is None else symbols.get(fill.symbol)
                if position is None:
                    position = self._position_for(fill)
                try:
                    position._apply(fill)
                except BaseException:
                    self._forget_if_unused(position)
                    raise
                touched[id(position)] = position
        finally:
            setcontext(saved)
        return list(touched.values())

    def _position_for(self, fill: FillLike) -> Position:
        symbols = self._accounts.get(fill.account)
        if symbols is None:
            symbols = self._accounts[fill.account] = {}
        position = symbols.get(fill.symbol)
        if position is None:
            position = symbols[fill.symbol] = Position(
                fill.account, fill.symbol, self.multipliers.get(fill.symbol, ONE), self.reference.currency(fill.symbol)
            )
        return position

    def _forget_if_unused(self, position: Position) -> None:
        # A position created for a fill that turned out invalid must not linger.
        if position.fill_count == 0:
            symbols = self._accounts[position.account]
            del symbols[position.symbol]
            if not symbols:
                del self._accounts[position.account]

    def restore(self, position: Position | PositionState) -> Position:
        """Put a position (e.g. from a changelog) into the book, replacing any; return it."""
        if isinstance(position, PositionState):
            position = Position.from_state(position)
        self._accounts.setdefault(position.account, {})[position.symbol] = position
        return position

    def set_mark(self, symbol: str, price: Decimal | str | int) -> None:
        self.marks[symbol] = parse_decimal(f"mark of {symbol}", price, positive=True)

    def set_multiplier(self, symbol: str, multiplier: Decimal | str | int) -> None:
        value = parse_decimal(f"multiplier of {symbol}", multiplier, positive=True)
        for symbols in self._accounts.values():
            position = symbols.get(symbol)
            if position is not None and position.net_qty and position.multiplier != value:
                raise ValueError(f"{symbol} has open positions at multiplier {position.multiplier}")
        self.multipliers[symbol] = value
        for symbols in self._accounts.values():
            position = symbols.get(symbol)
            if position is not None:
                position.multiplier = value

    def roll_day(self, marks: Mapping[str, Decimal] | None = None) -> None:
        """Start a new day for every position, at `marks` (default: the current marks)."""
        marks = self.marks if marks is None else marks
        for position in self:
            position.roll_day(marks.get(position.symbol))

    # -- reads -----------------------------------------------------------------------

    def get(self, account: str, symbol: str) -> Position | None:
        symbols = self._accounts.get(account)
        return None if symbols is None else symbols.get(symbol)

    def mark(self, symbol: str) -> Decimal | None:
        return self.marks.get(symbol)

    def accounts(self) -> list[str]:
        return sorted(self._accounts)

    def positions(self, account: str | None = None, symbol: str | None = None) -> list[Position]:
        """Positions sorted by (account, symbol), optionally filtered."""
        out = []
        for name in sorted(self._accounts) if account is None else [account]:
            symbols = self._accounts.get(name, {})
            if symbol is None:
                out.extend(symbols[s] for s in sorted(symbols))
            elif symbol in symbols:
                out.append(symbols[symbol])
        return out

    def __iter__(self) -> Iterator[Position]:
        for symbols in self._accounts.values():
            yield from symbols.values()

    def __len__(self) -> int:
        return sum(len(symbols) for symbols in self._accounts.values())

    def account_positions(self, account: str) -> Collection[Position]:
        """The account's positions, unsorted (a live view: do not mutate it)."""
        return self._accounts.get(account, {}).values()

    def account_totals(self, account: str) -> AccountTotals:
        """The account's sums in its base currency, at the current marks and rates."""
        return account_totals(account, self._accounts.get(account, {}).values(), self.marks, self.fx)

    def totals(self) -> list[AccountTotals]:
        """One `AccountTotals` per account, sorted by account."""
        return [self.account_totals(account) for account in sorted(self._accounts)]

    def rows(self, method: Method = "both") -> list[dict]:
        """`position_row` for every position, sorted by (account, symbol)."""
        return [position_row(p, self.marks.get(p.symbol), method, self.fx) for p in self.positions()]
