"""The bounds every number, name and message obeys: one definition for every service.

Why bounds at all: Python's decimals have none. A fill of qty `1E+400000` is a valid
Decimal; the position it makes is 400,000 digits long in plain notation, and a store's
DECIMAL column cannot hold a quantity of `1E+30` or one of 19 decimal places. A value
that one service took and another refused split the services' views of the same feed.
So every service decodes with the same rule (`posttrade.streams.events` calls this
module), the core refuses what the rule cannot keep (`posttrade.core.history`), and the
stores declare their columns from these constants.

Where the numbers come from: the exact columns the project writes.

- QuestDB: `DECIMAL(38, 12)` (questdb_writer's tables, ptrc's blotter and snapshots,
  pnl's history): 26 digits before the point, 12 after.
- ClickHouse: `Decimal(38, 18)` (execution_quality): 20 digits before the point, 18
  after.

**A value on the bus** (a price, a quantity, a fee, a size, a volume) fits *both* as it
is: finite, at most `VALUE_SCALE` = 12 decimal places, and below `VALUE_LIMIT` = 10**20
in magnitude: at most 32 significant digits. The 6 digits QuestDB has beyond that are
the room for what the services derive by adding values up.

**A figure the core derives** (a position's net quantity and open cost, realized P&L,
fees, a fill's notional `qty x price x multiplier` and the P&L it realizes) must stay
below `FIGURE_LIMIT` = 10**26: what DECIMAL(38, 12) holds. Its places are not bounded
(P&L is a product of two 12-place numbers); the stores round those at 12.

A fill's own notional `qty x price` is also below 10**20 (`notional_problem`): it is
what execution_quality stores per fill, in Decimal(38, 18).

Names (ids, accounts, symbols, venues, intervals) are at most `NAME_CHARS` characters:
they become NATS subject tokens and changelog keys, both bounded by the server's
4 KiB control line. An input message (fill, order, quote, trade, bar) is at most
`EVENT_BYTES` bytes. Everything one key of state holds, and every message a service
publishes, fits `payload_bound(max_payload)`: the server's `max_payload` (1 MiB by
default) less room for headers.
"""

from __future__ import annotations

from decimal import Context, Decimal, Inexact, InvalidOperation

from posttrade.core.exact import EXACT

# -- the store columns ------------------------------------------------------------------

#: QuestDB `DECIMAL(QUESTDB_PRECISION, QUESTDB_SCALE)`: every exact column the project writes.
QUESTDB_PRECISION = 38
QUESTDB_SCALE = 12
QUESTDB_DECIMAL = f"DECIMAL({QUESTDB_PRECISION}, {QUESTDB_SCALE})"
#: ClickHouse `Decimal(CLICKHOUSE_PRECISION, CLICKHOUSE_SCALE)` (execution_quality's money).
CLICKHOUSE_PRECISION = 38
CLICKHOUSE_SCALE = 18
CLICKHOUSE_DECIMAL = f"Decimal({CLICKHOUSE_PRECISION}, {CLICKHOUSE_SCALE})"

# -- values on the bus --------------------------------------------------------------------

#: Decimal places a value on the bus may have: the scale of the QuestDB columns.
VALUE_SCALE = min(QUESTDB_SCALE, CLICKHOUSE_SCALE)
#: Digits before the point a value on the bus may have: what both stores hold.
VALUE_DIGITS = min(QUESTDB_PRECISION - QUESTDB_SCALE, CLICKHOUSE_PRECISION - CLICKHOUSE_SCALE)
VALUE_LIMIT = Decimal(10) ** VALUE_DIGITS
#: A fill's or an order's own `qty x price` stays below this (execution_quality stores it).
NOTIONAL_LIMIT = VALUE_LIMIT

# -- figures the core derives -------------------------------------------------------------

#: Digits before the point of a derived figure: what DECIMAL(38, 12) holds.
FIGURE_DIGITS = QUESTDB_PRECISION - QUESTDB_SCALE
FIGURE_LIMIT = Decimal(10) ** FIGURE_DIGITS

# -- names and messages -------------------------------------------------------------------

#: Characters of an id or a name (fill_id, account, symbol, venue, interval, ...).
NAME_CHARS = 128
#: Bytes of one input message (fill, order, quote, market trade, bar).
EVENT_BYTES = 64 * 1024
#: What a publish needs besides its payload: the header block (a dead letter's reason is
#: cut at 4,000 characters, the other `Posttrade-*` headers, `Nats-Msg-Id`).
HEADER_ROOM = 8 * 1024

# -- state per key ------------------------------------------------------------------------

#: Open FIFO lots one position may hold: its state (`PositionState`) is one changelog
#: value, at most ~80 bytes a lot, so 10,000 lots stay within a 1 MiB message.
MAX_OPEN_LOTS = 10_000
#: CORRECTs and BUSTs one execution may have, applied or waiting for it: their ids are
#: kept in the execution's record, and those waiting are released in one update.
MAX_AMENDMENTS = 100


def payload_bound(max_payload: int) -> int:
    """The most bytes one payload (a table value, an output event) may have on a server
    whose `max_payload` is given: the rest is left for headers."""
    return max(max_payload - HEADER_ROOM, max_payload // 2)


# -- checks ---------------------------------------------------------------------------------

_QUANTUM = Decimal(1).scaleb(-VALUE_SCALE)
# Quantizing to 12 places under this context raises Inexact for a value with more places
# and InvalidOperation for one of 20 or more integer digits (its coefficient would need
# more than 32) or an infinity: the whole bound in one C call. (A quiet NaN passes: the
# callers test finiteness, and `value_problem` does.)
_BOUND = Context(prec=VALUE_DIGITS + VALUE_SCALE, traps=[Inexact, InvalidOperation])
_quantize = _BOUND.quantize
#: For hot paths: `bounded_quantize(value, QUANTUM)` raises ArithmeticError for a finite
#: non-zero value out of bounds (a zero needs `adjusted() < VALUE_DIGITS` as well).
QUANTUM = _QUANTUM
bounded_quantize = _quantize
_EXACT_MULTIPLY = EXACT.multiply
_EXACT_SUBTRACT = EXACT.subtract


def show(value: Decimal) -> str:
    """A value for a reason: as it is when short, else in scientific notation."""
    text = str(value)
    return text if len(text) <= 40 else f"{value:.6E}"


def fits(value: Decimal) -> bool:
    """True when `value` is a bounded value for the bus (see the module doc)."""
    if not value.is_finite() or value.adjusted() >= VALUE_DIGITS:  # also 0E+20 and up
        return False
    try:
        _quantize(value, _QUANTUM)
    except ArithmeticError:
        return False
    return True


def all_fit(*values: Decimal | None) -> bool:
    """`fits` for every value that is not None: the fast check of an event."""
    try:
        for value in values:
            if value is not None:
                if value.adjusted() >= VALUE_DIGITS or not value.is_finite():
                    return False
                _quantize(value, _QUANTUM)
    except ArithmeticError:
        return False
    return True


def value_problem(name: str, value: Decimal) -> str | None:
    """Why `value` (the field `name`) is not a bounded value for the bus, or None."""
    if not value.is_finite():
        return f"{name} must be a finite number, got {value}"
    if value.adjusted() >= VALUE_DIGITS:
        return (
            f"{name} must be below 1E+{VALUE_DIGITS} in magnitude (at most {VALUE_DIGITS} digits before the "
            f"point), got {show(value)}"
        )
    try:
        _quantize(value, _QUANTUM)
    except ArithmeticError:
        return f"{name} must have at most {VALUE_SCALE} decimal places, got {show(value)}"
    return None


def check_values(**values: Decimal | None) -> None:
    """Raise ValueError naming the first value (None skipped) that is not bounded."""
    for name, value in values.items():
        if value is not None:
            problem = value_problem(name, value)
            if problem is not None:
                raise ValueError(problem)


def notional_problem(qty: Decimal, price: Decimal, what: str = "qty x price") -> str | None:
    """Why `qty x price` (two bounded values) is beyond `NOTIONAL_LIMIT`, or None."""
    if qty.adjusted() + price.adjusted() < VALUE_DIGITS - 1:  # the product is < 10**20
        return None
    notional = _EXACT_MULTIPLY(qty, price)
    if abs(notional) < NOTIONAL_LIMIT:
        return None
    return f"{what} = {show(notional)} must be below 1E+{VALUE_DIGITS}"


def name_problem(name: str, value: str) -> str | None:
    if len(value) > NAME_CHARS:
        return f"{name} must be at most {NAME_CHARS} characters, got {len(value)}"
    return None


def check_names(**values: str | None) -> None:
    """Raise ValueError naming the first string (None skipped) longer than NAME_CHARS."""
    for name, value in values.items():
        if value is not None and len(value) > NAME_CHARS:
            raise ValueError(name_problem(name, value))


def figure_problem(name: str, value: Decimal) -> str | None:
    """Why a derived figure cannot be kept (not finite, or not below 10**26), or None."""
    if not value.is_finite():
        return f"{name} must be a finite number, got {value}"
    if value and value.adjusted() >= FIGURE_DIGITS:
        return f"{name} {show(value)} must be below 1E+{FIGURE_DIGITS} in magnitude"
    return None


def check_figures(**values: Decimal | None) -> None:
    """Raise ValueError naming the first figure (None skipped) that cannot be kept."""
    for name, value in values.items():
        if value is not None:
            problem = figure_problem(name, value)
            if problem is not None:
                raise ValueError(problem)


def figure_fits(value: Decimal | None) -> bool:
    return value is None or (value.is_finite() and (not value or value.adjusted() < FIGURE_DIGITS))


# A position after one step of its fold (`step_problem`): the fast test passes when every
# figure is below 10**25, so that a difference of two (a net P&L, the P&L one fill
# realized) is below 10**26 too.
_FAST_DIGITS = FIGURE_DIGITS - 1
# qty x price x multiplier < 10**(sum of their adjusted exponents + 3): below this sum it
# is surely below 10**26.
_NOTIONAL_DIGITS = FIGURE_DIGITS - 2


def step_problem(position, fill, realized_before: Decimal) -> str | None:
    """Why `position` (a `core.positions.Position`), just folded over `fill` with its
    average-cost realized gross `realized_before` before it, holds what cannot be kept:
    a figure beyond `FIGURE_LIMIT`, or more than `MAX_OPEN_LOTS` lots. None: it fits.

    The figures: the fill's notional qty x price x multiplier and the P&L it realized;
    the position's net quantity, open cost and realized P&L (gross and net of fees) under
    both methods, and its fees.
    """
    # The hot path of every fill: one comparison per figure, locals only.
    qty, price, multiplier = fill.qty, fill.price, position.multiplier
    gross, fifo_gross, fees = position.realized_pnl_gross, position.fifo_realized_pnl_gross, position.fees
    fast = _FAST_DIGITS
    if (
        qty.adjusted() + price.adjusted() + multiplier.adjusted() < _NOTIONAL_DIGITS
        and gross.adjusted() < fast
        and position.open_cost.adjusted() < fast
        and position.net_qty.adjusted() < fast
        and position.fifo_open_cost.adjusted() < fast
        and fifo_gross.adjusted() < fast
        and fees.adjusted() < fast
        and realized_before.adjusted() < fast
        and len(position.fifo_lots) <= MAX_OPEN_LOTS
    ):
        return None
    where = f"{position.account}/{position.symbol}"
    if len(position.fifo_lots) > MAX_OPEN_LOTS:
        return f"{where} would hold {len(position.fifo_lots)} open FIFO lots, more than the {MAX_OPEN_LOTS} a position may"
    figures = (
        ("the fill's notional qty x price x multiplier", _EXACT_MULTIPLY(_EXACT_MULTIPLY(qty, price), multiplier)),
        ("the P&L the fill realizes", _EXACT_SUBTRACT(gross, realized_before)),
        ("net_qty", position.net_qty),
        ("open_cost", position.open_cost),
        ("fifo_open_cost", position.fifo_open_cost),
        ("realized_pnl_gross", gross),
        ("fifo_realized_pnl_gross", fifo_gross),
        ("fees", fees),
        ("realized_pnl_net", _EXACT_SUBTRACT(gross, fees)),
        ("fifo_realized_pnl_net", _EXACT_SUBTRACT(fifo_gross, fees)),
    )
    for name, value in figures:
        problem = figure_problem(name, value)
        if problem is not None:
            return f"{where}: {problem}"
    return None

