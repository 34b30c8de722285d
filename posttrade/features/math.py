"""Feature arithmetic: pure, synchronous, no I/O.

The agents fold events into window values with the `add_*` functions and turn closed
windows into feature rows with the `*_features` functions. Window values are immutable
in spirit: every fold returns a new struct (a table's undo log keeps the old object, so
mutating it in place would corrupt a rollback).

Money and quantities stay exact (`Decimal`, via `posttrade.core.exact`) through every
sum and quotient; a feature leaves as a float only at the end (`to_float`), because a
feature store column for ML is a float. Returns and volatilities are floats from the
start (a logarithm has no exact decimal).

Time is event time in epoch nanoseconds. A minute window is `[start, start + 60 s)`;
its features carry the event time `start + 60 s` (the first instant they are known), so
a point-in-time join never sees a minute before it has ended.
"""

from __future__ import annotations

import math
from decimal import Decimal
from typing import Iterable, Mapping

import msgspec

from ..core.exact import EXACT, ZERO, divide
from ..core.fx import FxRates, round_base
from ..core.reference import Reference
from ..core.valuation import PositionLike, value_position
from ..streams.events import PositionUpdate

NS_PER_S = 1_000_000_000
MINUTE_NS = 60 * NS_PER_S
DAY_NS = 24 * 3600 * NS_PER_S
#: Lookback of the 5-minute features.
FIVE_MINUTES_NS = 5 * MINUTE_NS
TEN_THOUSAND = Decimal(10_000)

_add = EXACT.add
_sub = EXACT.subtract
_mul = EXACT.multiply


def to_float(value: Decimal | None) -> float | None:
    return None if value is None else float(value)


def utc_day(ts: int) -> int:
    """Days since the epoch of an event time (UTC): the key of every `*_today` feature."""
    return ts // DAY_NS


# -- trades ------------------------------------------------------------------------------


class TradeTick(msgspec.Struct, kw_only=True, frozen=True):
    """The newest print of a symbol: its price and the side the tick rule gave it."""

    ts: int
    price: Decimal
    sign: int  # +1 buy, -1 sell, 0 not known yet


def trade_sign(aggressor: str | None, price: Decimal, previous: TradeTick | None) -> int:
    """+1 for a buyer-initiated print, -1 for seller-initiated, 0 when unknown.

    The aggressor side when the venue reports it; otherwise the tick rule: above the
    previous print is a buy, below a sell, the same price keeps the previous sign.
    """
    if aggressor == "BUY":
        return 1
    if aggressor == "SELL":
        return -1
    if previous is None:
        return 0
    if price > previous.price:
        return 1
    if price < previous.price:
        return -1
    return previous.sign


def next_tick(previous: TradeTick | None, ts: int, price: Decimal, sign: int) -> TradeTick:
    """The symbol's newest print after this one (an older, late print changes nothing)."""
    if previous is not None and ts < previous.ts:
        return previous
    return TradeTick(ts=ts, price=price, sign=sign if sign else (previous.sign if previous else 0))


class TradeMinute(msgspec.Struct, kw_only=True, frozen=True):
    """One symbol's prints in one minute."""

    count: int = 0
    open_ts: int = 0
    open: Decimal = ZERO
    close_ts: int = 0
    close: Decimal = ZERO
    volume: Decimal = ZERO
    notional: Decimal = ZERO
    buy_volume: Decimal = ZERO
    sell_volume: Decimal = ZERO


def add_trade(minute: TradeMinute, ts: int, price: Decimal, size: Decimal, sign: int) -> TradeMinute:
    """Fold one print into its minute (prints may arrive out of order within it)."""
    first = minute.count == 0
    opens = first or ts < minute.open_ts
    closes = first or ts >= minute.close_ts
    return TradeMinute(
        count=minute.count + 1,
        open_ts=ts if opens else minute.open_ts,
        open=price if opens else minute.open,
        close_ts=ts if closes else minute.close_ts,
        close=price if closes else minute.close,
        volume=_add(minute.volume, size),
        notional=_add(minute.notional, _mul(price, size)),
        buy_volume=_add(minute.buy_volume, size) if sign > 0 else minute.buy_volume,
        sell_volume=_add(minute.sell_volume, size) if sign < 0 else minute.sell_volume,
    )


class ClosedMinute(msgspec.Struct, array_like=True, frozen=True):
    """What the 5-minute features need to remember of a closed minute."""

    start: int
    close: Decimal
    volume: Decimal
    notional: Decimal


class TradeHistory(msgspec.Struct, kw_only=True, frozen=True):
    """A symbol's recent closed minutes, oldest first (see `trade_features`)."""

    minutes: tuple[ClosedMinute, ...] = ()


def _simple_return(price: Decimal, reference: Decimal) -> float:
    return float(_sub(divide(price, reference), 1))


def trade_features(start: int, minute: TradeMinute, history: TradeHistory) -> tuple[dict, TradeHistory]:
    """The `symbol_trade_features` of the minute starting at `start`, and the new history.

    Minutes without prints are not in the history; the price carries forward over them:

    - `return_1m` = close / close of the previous traded minute - 1 (None if none);
    - `return_5m` = close / the last price at `end - 5 min` - 1, that price being the
      close of the newest minute that ended by then (None if the history has none);
    - `realized_vol_5m` = sqrt(sum of ln(close_i / close_i-1)^2) over the traded
      minutes ending in (end - 5 min, end], each against the traded minute before it
      (a quiet minute has a zero return); None when there is no such pair;
    - `vwap_5m` = sum(notional) / sum(volume) over the minutes starting in
      [end - 5 min, end).

    Minutes must be given oldest first (windows close in that order).
    """
    end = start + MINUTE_NS
    horizon = end - FIVE_MINUTES_NS
    past = [m for m in history.minutes if m.start < start]
    this = ClosedMinute(start, minute.close, minute.volume, minute.notional)
    window = [m for m in past if m.start >= horizon] + [this]
    before = [m for m in past if m.start < horizon]  # ended at or before the horizon
    reference_5m = before[-1] if before else None

    return_1m = _simple_return(minute.close, past[-1].close) if past else None
    return_5m = _simple_return(minute.close, reference_5m.close) if reference_5m else None

    chain = ([reference_5m] if reference_5m else []) + window
    squares = [math.log(float(divide(b.close, a.close))) ** 2 for a, b in zip(chain, chain[1:])]
    realized_vol = math.sqrt(math.fsum(squares)) if squares else None

    volume = notional = ZERO
    for m in window:
        volume = _add(volume, m.volume)
        notional = _add(notional, m.notional)
    vwap = divide(notional, volume) if volume else None

    signed = _add(minute.buy_volume, minute.sell_volume)
    imbalance = float(divide(_sub(minute.buy_volume, minute.sell_volume), signed)) if signed else None

    values = {
        "return_1m": return_1m,
        "return_5m": return_5m,
        "realized_vol_5m": realized_vol,
        "vwap_5m": to_float(vwap),
        "trade_count_1m": minute.count,
        "volume_1m": to_float(minute.volume),
        "trade_imbalance_1m": imbalance,
    }
    # Keep what any later minute can still need: the minutes of the last five, and the
    # newest one before them (the 5-minute reference price of a later minute).
    keep_from = end - FIVE_MINUTES_NS
    recent = [m for m in past if m.start >= keep_from] + [this]
    older = [m for m in past if m.start < keep_from]
    return values, TradeHistory(minutes=tuple(older[-1:] + recent))


# -- quotes ------------------------------------------------------------------------------


class QuoteTop(msgspec.Struct, kw_only=True, frozen=True):
    """A symbol's newest top of book: what the next quote's order-flow term compares to."""

    ts: int
    bid: Decimal
    ask: Decimal
    bid_size: Decimal
    ask_size: Decimal


def spread_bps(bid: Decimal, ask: Decimal) -> Decimal:
    """(ask - bid) / mid x 10,000."""
    return divide(_mul(_mul(_sub(ask, bid), 2), TEN_THOUSAND), _add(ask, bid))


def order_flow_term(previous: QuoteTop | None, quote: QuoteTop) -> Decimal:
    """One quote's order-flow imbalance e_n (Cont, Kukanov and Stoikov, 2014):

        e_n = 1{Pb_n >= Pb_n-1} qb_n - 1{Pb_n <= Pb_n-1} qb_n-1
            - 1{Pa_n <= Pa_n-1} qa_n + 1{Pa_n >= Pa_n-1} qa_n-1

    Positive when bids grow or asks shrink (buying pressure). 0 for a first quote.
    """
    if previous is None:
        return ZERO
    e = ZERO
    if quote.bid >= previous.bid:
        e = _add(e, quote.bid_size)
    if quote.bid <= previous.bid:
        e = _sub(e, previous.bid_size)
    if quote.ask <= previous.ask:
        e = _sub(e, quote.ask_size)
    if quote.ask >= previous.ask:
        e = _add(e, previous.ask_size)
    return e


def next_top(previous: QuoteTop | None, quote: QuoteTop) -> QuoteTop:
    """The newest top of book after `quote` (a late, older quote changes nothing)."""
    if previous is not None and quote.ts < previous.ts:
        return previous
    return quote


class QuoteMinute(msgspec.Struct, kw_only=True, frozen=True):
    """One symbol's quotes in one minute."""

    count: int = 0
    last_ts: int = 0
    bid: Decimal = ZERO
    ask: Decimal = ZERO
    spread_bps_sum: Decimal = ZERO
    order_flow: Decimal = ZERO


def add_quote(minute: QuoteMinute, quote: QuoteTop, flow_term: Decimal) -> QuoteMinute:
    last = minute.count == 0 or quote.ts >= minute.last_ts
    return QuoteMinute(
        count=minute.count + 1,
        last_ts=quote.ts if last else minute.last_ts,
        bid=quote.bid if last else minute.bid,
        ask=quote.ask if last else minute.ask,
        spread_bps_sum=_add(minute.spread_bps_sum, spread_bps(quote.bid, quote.ask)),
        order_flow=_add(minute.order_flow, flow_term),
    )


def quote_features(minute: QuoteMinute) -> dict:
    """The `symbol_quote_features` of a closed minute with at least one quote."""
    return {
        "spread_bps": to_float(spread_bps(minute.bid, minute.ask)),
        "spread_bps_avg_1m": to_float(divide(minute.spread_bps_sum, Decimal(minute.count))),
        "mid": to_float(divide(_add(minute.bid, minute.ask), 2)),
        "order_flow_imbalance_1m": to_float(minute.order_flow),
        "quote_count_1m": minute.count,
    }


# -- accounts: ptrc's positions -----------------------------------------------------------
#
# feast_pipeline keeps no position of its own: ptrc's `PositionUpdate`s are the project's
# one position computation, and `posttrade.core.valuation` is the one way to value them.


def take_update(held: PositionUpdate | None, update: PositionUpdate) -> bool:
    """Whether `update` replaces `held` as ptrc's state of its (account, symbol).

    The highest `revision` wins, never the newest `ts` (a late fill's update is older in
    event time than the update it replaces). A tie goes to the later in stream order:
    ptrc numbers each state once, so an equal revision is that state published again,
    and the updates ptrc published before it numbered them all carry 0.
    """
    return held is None or update.revision >= held.revision


def position_exposure(position: PositionLike, mark: Decimal | None) -> tuple[Decimal, Decimal]:
    """(gross, net) exposure of one position at `mark`, in the instrument's currency:
    |market value| and the signed market value, net qty x mark x multiplier
    (`core.valuation.value_position`).

    An open position without a mark counts at its cost, open cost x multiplier (the
    core's gross notional does the same), so an account's exposure never silently
    leaves a position out.
    """
    value = value_position(position, mark)
    if value.market_value is None:
        return value.gross_notional, _mul(position.open_cost, position.multiplier)
    return value.gross_notional, value.market_value


def realized_today(position: PositionLike) -> Decimal:
    """Realized P&L net of fees since ptrc's start of the trading day, in the
    instrument's currency (fees charged in other currencies are not in it: see
    `realized_today_base`): ptrc snapshots `sod_realized_pnl_net` when it rolls the
    day, so a position not changed since then realized 0 today, and an amendment made
    today of an earlier execution counts today."""
    return _sub(position.realized_pnl_net, position.sod_realized_pnl_net)


def _in_base(local: Decimal, rate: Decimal | None) -> Decimal | None:
    """`local` in the base currency, exact (rounded by the caller); 0 needs no rate."""
    if not local:
        return ZERO
    return None if rate is None else _mul(local, rate)


def realized_today_base(position: PositionLike, rate: Decimal | None, base: str, fx: FxRates) -> Decimal | None:
    """`realized_today` in the account's base currency at the current rates, less the
    fees charged today in other currencies (each at its own rate): as
    `core.valuation` converts (local x rate, rounded half-even at 12 places, once).
    None when a rate it needs is unknown; a term of 0 needs none."""
    total = _in_base(realized_today(position), rate)
    if total is None:
        return None
    for currency, fee in position.foreign_fees.items():
        today = _sub(fee, position.sod_foreign_fees.get(currency, ZERO))
        if not today:
            continue
        fee_rate = fx.rate(currency, base)
        if fee_rate is None:
            return None
        total = _sub(total, _mul(today, fee_rate.rate))
    return round_base(total)


#: Rates when the caller gives none: everything in USD, no FX marks (`core.valuation`'s default).
_NO_FX = FxRates(Reference(), lambda symbol: None)


def account_features(
    positions: Iterable[PositionUpdate], prints: Mapping[str, Decimal], fills_today: int, fx: FxRates | None = None,
) -> dict:
    """`account_features` from ptrc's newest update of each of an account's positions,
    in the account's base currency at `fx`'s current rates (default: everything in USD).

    A position is valued at its symbol's last market print seen by this service
    (`prints`), else at the mark ptrc published with the update, else at its cost
    (`position_exposure`), in its instrument's currency; each position's figure is
    converted (local x rate, rounded half-even at 12 places) and the converted figures
    are summed, so two currencies are never added. A feature that needs a rate that is
    unknown is None (a position's figure of 0 needs no rate).
    """
    fx = fx or _NO_FX
    gross: Decimal | None = ZERO
    net: Decimal | None = ZERO
    realized: Decimal | None = ZERO
    for p in positions:
        value = value_position(p, prints.get(p.symbol, p.mark), fx)
        if value.market_value is None:
            position_gross, position_net = value.gross_notional, _mul(p.open_cost, p.multiplier)
        else:
            position_gross, position_net = value.gross_notional, value.market_value
        rate = value.fx_rate
        gross = _sum_converted(gross, position_gross, rate)
        net = _sum_converted(net, position_net, rate)
        if realized is not None:
            term = realized_today_base(p, rate, value.base_currency, fx)
            realized = None if term is None else _add(realized, term)
    return {
        "gross_exposure": to_float(gross),
        "net_exposure": to_float(net),
        "realized_pnl_today": to_float(realized),
        "fills_today": fills_today,
    }


def _sum_converted(total: Decimal | None, local: Decimal, rate: Decimal | None) -> Decimal | None:
    if total is None:
        return None
    term = _in_base(local, rate)
    return None if term is None else _add(total, round_base(term))


# -- accounts: fill counts ---------------------------------------------------------------
#
# The features that count fills take ptrc's word for what the executions are. ptrc
# publishes an update for each message that changed a position, having dropped resends,
# resolved amendments (also ones that arrived before their execution) and refused what
# its rules refuse (docs/events.md, "Corrections, busts and openings"); the update names
# the execution concerned and its state. So a resend counts once (ptrc publishes nothing
# for it), a BUST removes its execution, a CORRECT replaces its quantity, an OPENING is
# no fill. What the counts need besides: the executions already counted for the
# account's day (a republished update must not count twice; a correction changes a
# quantity counted before).


class ExecutionChange(msgspec.Struct, kw_only=True, frozen=True):
    """What one of ptrc's updates did to one execution: `arrived` (a NEW, counted once)
    or amended (a CORRECT or BUST of it); its state now: the quantity in force and
    whether it is busted. `ts` is the execution's own time (an amendment keeps it)."""

    fill_id: str
    ts: int
    qty: Decimal
    busted: bool
    arrived: bool


def execution_change(update: PositionUpdate) -> ExecutionChange | None:
    """The execution `update` is about, or None for one that changes no fill: a roll, an
    opening (or an amendment of one).

    A NEW's update carries the fill itself, or, when amendments that came before it were
    released, `execution`: the fill in force. An amendment's update carries `execution`:
    the execution in force (a busted one as it was). Updates from before ptrc published
    `exec_type` are NEWs (reason "fill")."""
    exec_type = update.exec_type or ("NEW" if update.reason == "fill" else None)
    execution = update.execution
    if exec_type == "NEW":
        fill = execution if execution is not None else update
        return ExecutionChange(
            fill_id=fill.fill_id, ts=fill.ts, qty=fill.qty, busted=update.execution_state == "busted", arrived=True
        )
    if exec_type not in ("CORRECT", "BUST") or execution is None or execution.exec_type == "OPENING":
        return None
    return ExecutionChange(
        fill_id=execution.fill_id, ts=execution.ts, qty=execution.qty,
        busted=update.execution_state == "busted", arrived=False,
    )


class CountedFill(msgspec.Struct, kw_only=True, frozen=True):
    """An execution of an account as its fill counts hold it: its time (the UTC day it
    counts on), the quantity in force, whether it is busted.

    Also the account's folded record (`fold_fill`): the executions it no longer holds
    one by one, `fills` of them counting with `qty` together, `ts` the newest one's."""

    ts: int
    qty: Decimal
    busted: bool = False
    fills: int = 1  # how many executions it counts for

    @property
    def day(self) -> int:
        return utc_day(self.ts)

    def counts_on(self, day: int) -> bool:
        """True when this execution is one of the fills counted for UTC day `day`."""
        return not self.busted and utc_day(self.ts) == day


class FillsDay(msgspec.Struct, kw_only=True, frozen=True):
    """An account's fills of one UTC day."""

    day: int
    fills: int = 0
    filled_qty: Decimal = ZERO


def counted_fill(change: ExecutionChange, held: CountedFill | None, day: int | None) -> CountedFill | None:
    """What the counts hold of `change`'s execution after it (None: nothing changes).

    `held`: the execution as held before (None: not held); `day`: the day the account's
    counts are of (None before its first execution).

    - An arrival is held once: one already held is ptrc's update published again. An
      execution of a day before `day` arriving late is not held: today's counts stay.
      (ptrc's state published again, a folded execution's too, is told by its revision:
      `FeatureAgents.hold_update`.)
    - An amendment changes a held execution's quantity or busts it; one of an execution
      not held (of an earlier day, or folded) changes nothing today.
    """
    if change.arrived:
        if held is not None or (day is not None and utc_day(change.ts) < day):
            return None
        return CountedFill(ts=change.ts, qty=change.qty, busted=change.busted)
    if held is None:
        return None
    return CountedFill(ts=held.ts, qty=change.qty, busted=change.busted)


def recount(counts: FillsDay | None, before: CountedFill | None, after: CountedFill) -> FillsDay:
    """An account's counts after one of its executions changed from `before` (None: not
    held) to `after`. An execution of a later day than the counts begins that day's."""
    if counts is None or after.day > counts.day:
        counts = FillsDay(day=after.day)
    fills, filled = counts.fills, counts.filled_qty
    if before is not None and before.counts_on(counts.day):
        fills -= 1
        filled = _sub(filled, before.qty)
    if after.counts_on(counts.day):
        fills += 1
        filled = _add(filled, after.qty)
    return FillsDay(day=counts.day, fills=fills, filled_qty=filled)


def fold_fill(folded: CountedFill | None, execution: CountedFill) -> CountedFill:
    """An account's folded record after `execution` joins it. Executions are folded
    oldest first and all of the counts' day, so the record keeps that day's count and
    quantity of those in force, and the newest one's time."""
    if folded is None:
        fills, qty, ts = 0, ZERO, execution.ts
    else:
        fills, qty, ts = folded.fills, folded.qty, max(folded.ts, execution.ts)
    if not execution.busted:
        fills += execution.fills
        qty = _add(qty, execution.qty)
    return CountedFill(ts=ts, qty=qty, fills=fills)


def fills_day(executions: Iterable[CountedFill]) -> FillsDay | None:
    """An account's counts from the executions held (and its folded record), the ones
    `recount` keeps up: the day of its newest execution, and that day's executions in
    force."""
    held = list(executions)
    if not held:
        return None
    day = max(e.day for e in held)
    fills, filled = 0, ZERO
    for e in held:
        if e.counts_on(day):
            fills += e.fills
            filled = _add(filled, e.qty)
    return FillsDay(day=day, fills=fills, filled_qty=filled)


# -- accounts: orders and the fill rate ----------------------------------------------------


class OrdersDay(msgspec.Struct, kw_only=True, frozen=True):
    """An account's new orders of one UTC day."""

    day: int
    orders: int = 0
    ordered_qty: Decimal = ZERO


def add_order_to_day(current: OrdersDay | None, ts: int, qty: Decimal) -> OrdersDay:
    day = utc_day(ts)
    if current is None or current.day < day:
        current = OrdersDay(day=day)
    elif current.day > day:
        return current  # an order of an earlier day arriving late: today's counts stay
    return OrdersDay(day=day, orders=current.orders + 1, ordered_qty=_add(current.ordered_qty, qty))


def fill_rate_features(day: int, fills: FillsDay | None, orders: OrdersDay | None) -> dict:
    """`account_order_features` for UTC day `day` (counts of another day count as 0)."""
    filled = fills.filled_qty if fills is not None and fills.day == day else ZERO
    ordered = orders.ordered_qty if orders is not None and orders.day == day else ZERO
    count = orders.orders if orders is not None and orders.day == day else 0
    return {
        "fill_rate_today": to_float(divide(filled, ordered)) if ordered else None,
        "orders_today": count,
        "ordered_qty_today": to_float(ordered),
        "filled_qty_today": to_float(filled),
    }


def row(entity: str, ts: int, values: dict, feature_names: Iterable[str]) -> tuple:
    """A row tuple in a view's column order (see `views`)."""
    return (entity, ts, *(values[name] for name in feature_names))

