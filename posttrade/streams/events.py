"""The event contract: typed models for everything that flows on the bus.

Decoding *is* validation: `decode(Fill, raw)` either returns a Fill whose every field
has the right type and a sane value, or raises `InvalidEvent` with a reason that names
the field. Money and quantities are `Decimal` (sent as JSON strings, numbers accepted),
timestamps are integer nanoseconds since the epoch (UTC). `docs/events.md` documents
the subjects and fields; keep the two in step.

Every service decodes with these models, so a value one service accepts, every service
accepts: decimals are finite, have at most 12 decimal places and are below 1E+20 in
magnitude, names are at most 128 characters and an input message at most 64 KiB
(`posttrade.core.bounds`, which also holds what the stores' columns are built from).
"""

from __future__ import annotations

from decimal import Decimal
from operator import attrgetter
from typing import Literal

import msgspec

from posttrade.core.bounds import (
    EVENT_BYTES,
    NAME_CHARS,
    QUANTUM as _QUANTUM,
    VALUE_DIGITS,
    all_fit,
    bounded_quantize as _bounded,
    check_figures,
    check_names,
    check_values,
    figure_fits,
    notional_problem,
    show,
)
from posttrade.core.compliance import Alert
from posttrade.core.reference import check_currency

Side = Literal["BUY", "SELL"]


class InvalidEvent(ValueError):
    """A message that cannot become an event; `reason` says why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# Validation runs for every message on the hot path: one call checks several fields.


def _positive(**values: Decimal) -> None:
    for name, value in values.items():
        if not value.is_finite() or value <= 0:
            raise ValueError(f"{name} must be a finite number > 0, got {value}")


def _non_negative(**values: Decimal) -> None:
    for name, value in values.items():
        if not value.is_finite() or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value}")


def _finite(name: str, value: Decimal) -> None:
    if not value.is_finite():
        raise ValueError(f"{name} must be a finite number, got {value}")


def _names(**values: str) -> None:
    for name, value in values.items():
        if not value or value[0].isspace() or value[-1].isspace():
            raise ValueError(f"{name} must be a non-empty string without surrounding spaces")
    check_names(**values)


def _well_named(value: str) -> bool:
    return bool(value) and not value[0].isspace() and not value[-1].isspace() and len(value) <= NAME_CHARS


def _short(*values: str | None) -> bool:
    """True when every optional name (None skipped) is within the bound."""
    return all(value is None or len(value) <= NAME_CHARS for value in values)


def _notional(qty: Decimal, price: Decimal, what: str = "qty x price") -> None:
    if qty.adjusted() + price.adjusted() >= _NOTIONAL_FAST:
        problem = notional_problem(qty, price, what)
        if problem is not None:
            raise ValueError(problem)


# Below this sum of the two values' adjusted exponents their product is surely < 1E+20.
_NOTIONAL_FAST = VALUE_DIGITS - 1


def _is_positive(value: Decimal) -> bool:
    return value.is_finite() and value > _ZERO


_ZERO = Decimal(0)

# 1990-01-01 .. 2200-01-01 in ns: catches seconds or milliseconds sent by mistake.
_TS_MIN, _TS_MAX = 631_152_000_000_000_000, 7_258_118_400_000_000_000


class Event(msgspec.Struct, kw_only=True, frozen=True):
    """Base of every event: `ts` is the event time in epoch nanoseconds."""

    ts: int

    def __post_init__(self) -> None:
        if not _TS_MIN <= self.ts <= _TS_MAX:
            raise ValueError(f"ts must be epoch nanoseconds, got {self.ts}")


ExecType = Literal["NEW", "CORRECT", "BUST", "OPENING"]


class Fill(Event, frozen=True):
    """An execution of (part of) an order: what positions and P&L are built from.

    `exec_type` says what the message does to the execution history of its
    (account, symbol) (docs/events.md, "Corrections, busts and openings"):

    - `NEW` (default): an execution. Needs side, qty > 0 and price > 0.
    - `OPENING`: a position held before the feed starts (cost per unit as `price`,
      fee 0); openings come before every execution of their key.
    - `CORRECT`: replaces the economics (side, qty, price, fee, all required) of the
      execution `ref_fill_id` names; the execution keeps its place in time.
    - `BUST`: removes the execution `ref_fill_id` names; side, qty and price may be
      absent.

    After decoding, `fee` is never None (0 when absent); `side`, `qty` and `price`
    are None only on a BUST that did not give them.
    """

    fill_id: str
    account: str
    symbol: str
    side: Side | None = None
    qty: Decimal | None = None
    price: Decimal | None = None
    fee: Decimal | None = None  # negative for a rebate; 0 when absent (except CORRECT)
    order_id: str | None = None
    venue: str | None = None
    liquidity: Literal["MAKER", "TAKER"] | None = None
    exec_type: ExecType = "NEW"
    ref_fill_id: str | None = None  # CORRECT / BUST: the execution amended
    # The currency `fee` is charged in; None: the instrument's (docs/events.md).
    fee_currency: str | None = None

    def __post_init__(self) -> None:
        # Inlined: this runs for every fill on the hot path (see benchmarks/runtime.py).
        if not _TS_MIN <= self.ts <= _TS_MAX:
            raise ValueError(f"ts must be epoch nanoseconds, got {self.ts}")
        qty, price, fee, exec_type = self.qty, self.price, self.fee, self.exec_type
        if exec_type == "BUST":
            if qty is not None or price is not None:
                _positive(**{n: v for n, v in (("qty", qty), ("price", price)) if v is not None})
        elif qty is None or price is None or self.side is None:
            missing = [n for n, v in (("side", self.side), ("qty", qty), ("price", price)) if v is None]
            raise ValueError(f"a {exec_type} fill needs {', '.join(missing)}")
        elif not (qty.is_finite() and qty > 0 and price.is_finite() and price > 0):
            _positive(qty=qty, price=price)
        if fee is None:
            if exec_type == "CORRECT":
                raise ValueError("a CORRECT fill needs fee (the full corrected economics)")
            msgspec.structs.force_setattr(self, "fee", _ZERO)
        elif not fee.is_finite():
            _finite("fee", fee)
        elif exec_type == "OPENING" and fee:
            raise ValueError(f"an OPENING fill carries no fee, got {fee}")
        # The bound every service shares (core.bounds), and the fill's own notional. qty
        # and price are finite and > 0 here; a zero fee needs its exponent checked.
        try:
            if qty is not None:
                _bounded(qty, _QUANTUM)
            if price is not None:
                _bounded(price, _QUANTUM)
            if fee is not None:
                _bounded(fee, _QUANTUM)
                if fee.adjusted() >= VALUE_DIGITS:
                    raise ArithmeticError
        except ArithmeticError:
            check_values(qty=qty, price=price, fee=fee)
        if qty is not None and price is not None and qty.adjusted() + price.adjusted() >= _NOTIONAL_FAST:
            _notional(qty, price)
        fill_id, account, symbol = self.fill_id, self.account, self.symbol
        if not (
            fill_id and account and symbol
            and not fill_id[0].isspace() and not fill_id[-1].isspace()
            and not account[0].isspace() and not account[-1].isspace()
            and not symbol[0].isspace() and not symbol[-1].isspace()
            and len(fill_id) <= NAME_CHARS and len(account) <= NAME_CHARS and len(symbol) <= NAME_CHARS
        ):
            _names(fill_id=fill_id, account=account, symbol=symbol)
        order_id, venue = self.order_id, self.venue
        if (order_id is not None and len(order_id) > NAME_CHARS) or (venue is not None and len(venue) > NAME_CHARS):
            check_names(order_id=order_id, venue=venue)
        ref = self.ref_fill_id
        if exec_type == "CORRECT" or exec_type == "BUST":
            if ref is None:
                raise ValueError(f"a {exec_type} fill needs ref_fill_id (the execution it amends)")
            _names(ref_fill_id=ref)
            if ref == fill_id:
                raise ValueError("ref_fill_id must name another execution than the message's own fill_id")
        elif ref is not None:
            raise ValueError(f"ref_fill_id is only for CORRECT and BUST, not {exec_type}")
        if self.fee_currency is not None:
            check_currency(self.fee_currency, "fee_currency")

    def corrected_by(self, correction: Fill) -> Fill:
        """This execution as a CORRECT leaves it: the correction's side, qty, price,
        fee and fee currency; its order, venue and liquidity where it gives them; id, time and type kept."""
        return msgspec.structs.replace(
            self,
            side=correction.side,
            qty=correction.qty,
            price=correction.price,
            fee=correction.fee,
            fee_currency=correction.fee_currency,
            order_id=correction.order_id if correction.order_id is not None else self.order_id,
            venue=correction.venue if correction.venue is not None else self.venue,
            liquidity=correction.liquidity if correction.liquidity is not None else self.liquidity,
        )


class Order(Event, frozen=True):
    """An order as the OMS saw it; `ts` is the arrival time for a NEW order."""

    order_id: str
    account: str
    symbol: str
    side: Side
    qty: Decimal
    order_type: Literal["MARKET", "LIMIT"] = "MARKET"
    limit_price: Decimal | None = None
    venue: str | None = None
    status: Literal["NEW", "CANCELED", "FILLED", "REJECTED", "EXPIRED"] = "NEW"

    def __post_init__(self) -> None:
        # Each check is one fast test; the helpers only run to name what is wrong.
        super().__post_init__()
        if not (_well_named(self.order_id) and _well_named(self.account) and _well_named(self.symbol)):
            _names(order_id=self.order_id, account=self.account, symbol=self.symbol)
        if not _short(self.venue):
            check_names(venue=self.venue)
        if not _is_positive(self.qty):
            _positive(qty=self.qty)
        if self.order_type == "LIMIT" and self.limit_price is None:
            raise ValueError("a LIMIT order needs limit_price")
        if self.limit_price is not None and not _is_positive(self.limit_price):
            _positive(limit_price=self.limit_price)
        if not all_fit(self.qty, self.limit_price):
            check_values(qty=self.qty, limit_price=self.limit_price)
        if self.limit_price is not None:
            _notional(self.qty, self.limit_price, "qty x limit_price")


class Quote(Event, frozen=True):
    """Top of book for a symbol."""

    symbol: str
    bid: Decimal
    ask: Decimal
    bid_size: Decimal = Decimal(0)
    ask_size: Decimal = Decimal(0)
    venue: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not _well_named(self.symbol):
            _names(symbol=self.symbol)
        bid, ask, bid_size, ask_size = self.bid, self.ask, self.bid_size, self.ask_size
        if not (_is_positive(bid) and _is_positive(ask)):
            _positive(bid=bid, ask=ask)
        if not (bid_size.is_finite() and bid_size >= _ZERO and ask_size.is_finite() and ask_size >= _ZERO):
            _non_negative(bid_size=bid_size, ask_size=ask_size)
        if not all_fit(bid, ask, bid_size, ask_size):
            check_values(bid=bid, ask=ask, bid_size=bid_size, ask_size=ask_size)
        if not _short(self.venue):
            check_names(venue=self.venue)
        if ask < bid:
            raise ValueError(f"crossed quote: ask {self.ask} < bid {self.bid}")

    @property
    def mid(self) -> Decimal:
        return (self.bid + self.ask) / 2


class MarketTrade(Event, frozen=True):
    """A print on the tape (anyone's trade, not necessarily ours)."""

    symbol: str
    price: Decimal
    size: Decimal
    trade_id: str | None = None
    venue: str | None = None
    aggressor: Side | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not _well_named(self.symbol):
            _names(symbol=self.symbol)
        if not (_is_positive(self.price) and _is_positive(self.size)):
            _positive(price=self.price, size=self.size)
        if not all_fit(self.price, self.size):
            check_values(price=self.price, size=self.size)
        if not _short(self.trade_id, self.venue):
            check_names(trade_id=self.trade_id, venue=self.venue)


class Bar(Event, frozen=True):
    """OHLCV over [ts, ts + interval); `ts` is the bar's open time."""

    symbol: str
    interval: str  # "1s", "1m", "5m", ...
    open: Decimal
    high: Decimal
    low: Decimal
    close: Decimal
    volume: Decimal
    vwap: Decimal | None = None
    count: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (_well_named(self.symbol) and _well_named(self.interval)):
            _names(symbol=self.symbol, interval=self.interval)
        open_, high, low, close = self.open, self.high, self.low, self.close
        if not (_is_positive(open_) and _is_positive(high) and _is_positive(low) and _is_positive(close)):
            _positive(open=open_, high=high, low=low, close=close)
        if not (self.volume.is_finite() and self.volume >= _ZERO):
            _non_negative(volume=self.volume)
        if not all_fit(open_, high, low, close, self.volume):
            check_values(open=open_, high=high, low=low, close=close, volume=self.volume)
        vwap = self.vwap
        if vwap is not None and not (vwap.is_finite() and vwap.adjusted() < VALUE_DIGITS):
            # A derived average: its places are not bounded (the stores round it at 12),
            # its size is (an average of prices).
            raise ValueError(f"vwap must be a finite number below 1E+{VALUE_DIGITS}, got {show(vwap)}")
        if not (low <= open_ <= high and low <= close <= high):
            raise ValueError("bar must satisfy low <= open, close <= high")
        if self.count < 0:
            raise ValueError("count must be >= 0")


_decoders: dict[type, msgspec.json.Decoder] = {}
_INPUT_EVENTS = frozenset((Fill, Order, Quote, MarketTrade, Bar))
_encoder = msgspec.json.Encoder(decimal_format="string")


def event_size_limit(event_type: type) -> int | None:
    """The most bytes a message of `event_type` may have: `EVENT_BYTES` for the input
    events (fills, orders, quotes, market trades, bars); None for the services' own
    outputs, which the server's `max_payload` bounds."""
    return EVENT_BYTES if event_type in _INPUT_EVENTS else None


def decode(event_type: type[msgspec.Struct], raw: bytes):
    """Decode and validate one JSON message, raising InvalidEvent with the reason."""
    if event_type in _INPUT_EVENTS and len(raw) > EVENT_BYTES:
        raise InvalidEvent(
            f"invalid {event_type.__name__}: a message of {len(raw)} bytes is over the {EVENT_BYTES}-byte bound of an event"
        )
    decoder = _decoders.get(event_type)
    if decoder is None:
        decoder = _decoders[event_type] = msgspec.json.Decoder(event_type)
    try:
        return decoder.decode(raw)
    except msgspec.ValidationError as exc:
        raise InvalidEvent(f"invalid {event_type.__name__}: {exc}") from None
    except msgspec.DecodeError as exc:
        raise InvalidEvent(f"malformed JSON: {exc}") from None


def encode(event: msgspec.Struct | dict | list) -> bytes:
    """Encode any event (or plain JSON data) with decimals as exact strings."""
    return _encoder.encode(event)


def subject_token(value: str) -> str:
    """Make a value safe as one NATS subject token (symbols like `BRK.B` contain dots).

    Only routing uses the token; the payload always carries the exact value.
    """
    out = []
    for ch in value:
        if ch.isalnum() or ch in "-_":
            out.append(ch)
        else:
            out.append(f"%{ord(ch):02X}")
    return "".join(out) or "%00"


class PositionUpdate(Event, frozen=True):
    """ptrc's output on `posttrade.positions.<account>.<symbol>` after every change.

    The full state a consumer needs to value the position itself at any mark:
    `unrealized = (net_qty × mark − open_cost) × multiplier` (average cost) and the same
    with `fifo_open_cost` (FIFO); `day_pnl = realized_pnl_net + unrealized −
    (sod_realized_pnl_net + sod_unrealized_pnl)`. `mark`/`unrealized_pnl` are ptrc's
    valuation at publish time (None without a mark). `reason` says what changed it;
    for a fill, the fill's fields and the P&L it realized are included.
    """

    account: str
    symbol: str
    reason: Literal["fill", "late", "correction", "bust", "opening", "roll"]
    multiplier: Decimal
    net_qty: Decimal
    avg_open_price: Decimal | None
    open_cost: Decimal
    realized_pnl_gross: Decimal
    fees: Decimal
    realized_pnl_net: Decimal
    fifo_open_cost: Decimal
    fifo_realized_pnl_gross: Decimal
    sod_realized_pnl_net: Decimal
    sod_unrealized_pnl: Decimal | None
    mark: Decimal | None = None
    unrealized_pnl: Decimal | None = None
    fifo_unrealized_pnl: Decimal | None = None
    day_pnl: Decimal | None = None
    fill_count: int = 0
    # The instrument's currency, which every figure above is in, and the fees charged in
    # other currencies (`core.valuation`, "Base currency"), now and at the roll.
    currency: str | None = None
    foreign_fees: dict[str, Decimal] = {}
    sod_foreign_fees: dict[str, Decimal] = {}
    # On a roll: the account's base currency and the rate to it of each currency of the
    # position (its own, its foreign fees') at the roll, where known. The roll's snapshot,
    # and so the past day's reports, are valued at them (stores/questdb/rows.py).
    base_currency: str | None = None
    fx_rates: dict[str, Decimal] = {}
    # Counts up by one with every update of the key: a reader keeps the highest
    # revision (a late fill's update has an older `ts` than the update it replaces).
    revision: int = 0
    corrections: int = 0  # executions of the key's history a CORRECT changed
    busts: int = 0  # executions a BUST removed
    # The message that caused it (every reason but "roll"): for a correction or a bust
    # the amending message (its fill_id, and the corrected economics).
    fill_id: str | None = None
    side: Side | None = None
    qty: Decimal | None = None
    price: Decimal | None = None
    fee: Decimal | None = None
    realized_pnl_fill: Decimal | None = None  # average-cost gross P&L this fill realized
    order_id: str | None = None
    venue: str | None = None
    exec_type: ExecType | None = None
    ref_fill_id: str | None = None
    # When amendments changed the execution concerned (a CORRECT or BUST of it, or ones
    # that were waiting for it): the execution as now in force (a busted one as it was).
    execution: Fill | None = None
    execution_state: Literal["corrected", "busted"] | None = None
    released: list[Fill] = []  # amendments that were waiting for this message, applied now

    def __post_init__(self) -> None:
        # Every number is a figure ptrc keeps within the bound (core.bounds: finite,
        # below 1E+26); a valuation that would not be is published as null.
        super().__post_init__()
        values = _update_figures(self)
        if not all(map(figure_fits, values)):
            check_figures(**dict(zip(_UPDATE_FIGURES, values)))
        for name in ("foreign_fees", "sod_foreign_fees"):
            fees = getattr(self, name)
            if fees and not all(map(figure_fits, fees.values())):
                check_figures(**{f"{name}[{currency}]": fee for currency, fee in fees.items()})


_UPDATE_FIGURES = tuple(
    name for name, kind in zip(PositionUpdate.__struct_fields__, msgspec.structs.fields(PositionUpdate))
    if kind.type in (Decimal, Decimal | None)
)
_update_figures = attrgetter(*_UPDATE_FIGURES)


class ComplianceAlert(Alert, frozen=True):
    """A compliance `Alert` as ptrc publishes it on `posttrade.alerts.<rule>`; the
    feed's own alerts (`conflicting_duplicate`, `pending_amendment`,
    `refused_execution`) carry the messages concerned in `versions` (for a conflict:
    the version that won, then the resend)."""

    versions: list[Fill] = []


# -- pnl's history --------------------------------------------------------------------


class PnlPositionRow(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One position in a pnl snapshot, as `pnl_snapshots` stores it: money rounded half
    to even at 12 places (`core.bounds`), in the instrument's `currency`, the `_base`
    figures in the account's `base_currency` at `fx_rate`. `as_of`: the event time of
    the values (epoch ns)."""

    account: str
    symbol: str
    as_of: int
    currency: str | None = None
    base_currency: str | None = None
    mark_source: str | None = None
    fill_count: int = 0
    fx_rate: str | None = None  # exact text: a cross rate has more places than a column keeps
    net_qty: Decimal | None = None
    avg_open_price: Decimal | None = None
    multiplier: Decimal | None = None
    mark: Decimal | None = None
    realized_pnl_gross: Decimal | None = None
    fees: Decimal | None = None
    realized_pnl_net: Decimal | None = None
    unrealized_pnl: Decimal | None = None
    fifo_realized_pnl_gross: Decimal | None = None
    fifo_unrealized_pnl: Decimal | None = None
    total_pnl: Decimal | None = None
    day_pnl: Decimal | None = None
    sod_realized_pnl_net: Decimal | None = None
    sod_unrealized_pnl: Decimal | None = None
    gross_notional: Decimal | None = None
    realized_pnl_gross_base: Decimal | None = None
    fees_base: Decimal | None = None
    realized_pnl_net_base: Decimal | None = None
    unrealized_pnl_base: Decimal | None = None
    total_pnl_base: Decimal | None = None
    day_pnl_base: Decimal | None = None
    gross_notional_base: Decimal | None = None


class PnlAccountRow(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One account's totals in a pnl snapshot (`pnl_account_snapshots`), every money
    figure in `base_currency`; `missing_rates`: currencies left out for want of a rate."""

    account: str
    as_of: int
    base_currency: str | None = None
    positions: int = 0
    open_positions: int = 0
    missing_rates: str | None = None  # comma-separated; None when none
    realized_pnl_gross: Decimal | None = None
    fees: Decimal | None = None
    realized_pnl_net: Decimal | None = None
    unrealized_pnl: Decimal | None = None
    fifo_realized_pnl_gross: Decimal | None = None
    fifo_unrealized_pnl: Decimal | None = None
    total_pnl: Decimal | None = None
    day_pnl: Decimal | None = None
    gross_notional: Decimal | None = None


class PnlSnapshot(Event, frozen=True):
    """pnl's output on `posttrade.pnl.snapshots`: part `part` of the snapshot taken at
    `ts` (whole microseconds, strictly increasing per pnl), a few hundred rows a message.
    questdb_writer stores the rows (`pnl_snapshots`, `pnl_account_snapshots`), deduplicated
    on (ts, account[, symbol]), so a message published or written twice is one row each."""

    part: int = 0
    positions: list[PnlPositionRow] = []
    accounts: list[PnlAccountRow] = []
