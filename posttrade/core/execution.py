"""Transaction-cost analysis (TCA): the execution-quality formulas, pure and exact.

This module is the one place where execution-quality arithmetic lives; the
execution_quality service (`posttrade.agents.execution`) only gathers the inputs (which
mid, which fills, which market trades) and calls it. `docs/execution_quality.md` states
every formula with a worked example, and `tests/unit/test_execution_core.py` pins that
example to the exact numbers printed there.

Conventions
-----------
* `s` is the side sign: +1 for BUY, -1 for SELL.
* Basis points (bps) are parts per 10,000. Every bps figure is the *true* quotient
  rounded half to even to 8 decimal places (`BPS_PLACES`): one rounding, never two.
* Slippage, effective spread, VWAP slippage and implementation shortfall are **costs**:
  positive means the trader did worse than the benchmark.
* Markouts are **favourable** when positive: the fill marked to the mid some seconds
  later shows a profit (a buy that the market then moved up from).
* Money (costs, notional, fees) is computed exactly (`posttrade.core.exact.EXACT`: +, -,
  * never round). Prices that come from a division (VWAP) and ratios (fill ratio) are
  exact when the quotient terminates within 64 digits, else rounded half to even at
  12 decimal places (`posttrade.core.exact.divide`).
* Times are integer nanoseconds since the epoch; durations are integer nanoseconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Literal

from .exact import EXACT, ZERO, divide, divide_at

Side = Literal["BUY", "SELL"]

BPS_PLACES = 8
_TEN_THOUSAND = Decimal(10_000)
_TWO = Decimal(2)

_add = EXACT.add
_sub = EXACT.subtract
_mul = EXACT.multiply


def side_sign(side: str) -> int:
    """+1 for a buy, -1 for a sell."""
    if side == "BUY":
        return 1
    if side == "SELL":
        return -1
    raise ValueError(f"side must be BUY or SELL, got {side!r}")


def to_bps(numerator: Decimal, denominator: Decimal) -> Decimal:
    """`numerator / denominator` in basis points, rounded half to even at 8 places
    (the same value as `round_quotient(numerator x 10^4, denominator, 8)`)."""
    if not denominator:
        raise ZeroDivisionError("bps of a zero denominator")
    return divide_at(_mul(numerator, _TEN_THOUSAND), denominator, BPS_PLACES)


def mid_price(bid: Decimal, ask: Decimal) -> Decimal:
    """`(bid + ask) / 2`, exact (halving a decimal always terminates)."""
    return divide(_add(bid, ask), _TWO)


# -- per fill ---------------------------------------------------------------------------


def slippage_bps(side: str, price: Decimal, arrival_mid: Decimal) -> Decimal:
    """Cost of the fill against the order's arrival mid:
    `s x (price - arrival_mid) / arrival_mid x 10^4`. Positive = paid more (buy) or
    received less (sell) than the mid when the order arrived."""
    return to_bps(_mul(side_sign(side), _sub(price, arrival_mid)), arrival_mid)


def slippage_cost(side: str, qty: Decimal, price: Decimal, arrival_mid: Decimal) -> Decimal:
    """The same cost in money: `s x (price - arrival_mid) x qty`, exact.

    Summing it and dividing by the summed arrival notional (`qty x arrival_mid`) gives
    the notional-weighted mean slippage in bps."""
    return _mul(_mul(side_sign(side), _sub(price, arrival_mid)), qty)


def effective_spread_bps(price: Decimal, mid: Decimal) -> Decimal:
    """`2 x |price - mid| / mid x 10^4`, with `mid` the prevailing mid at the fill's time
    (the last quote at or before it): twice the distance paid from the mid."""
    return to_bps(_mul(_TWO, EXACT.abs(_sub(price, mid))), mid)


def markout_bps(side: str, price: Decimal, later_mid: Decimal) -> Decimal:
    """The fill marked to the mid a horizon later, per unit of the fill's price:
    `s x (later_mid - price) / price x 10^4`. Positive = favourable to the trader."""
    return to_bps(_mul(side_sign(side), _sub(later_mid, price)), price)


# -- per order ---------------------------------------------------------------------------


def vwap(notional: Decimal, quantity: Decimal) -> Decimal | None:
    """Volume-weighted average price `sum(price x qty) / sum(qty)`; None without volume."""
    if not quantity:
        return None
    return divide(notional, quantity)


def market_vwap(
    window_start: tuple[Decimal, Decimal] | None, window_end: tuple[Decimal, Decimal] | None
) -> tuple[Decimal | None, Decimal | None]:
    """The market VWAP over `(start, end]` from the tape's cumulative
    `(sum of price x size, sum of size)` at the two ends: `(vwap, volume)`.

    None for either when an end is unknown; the vwap is None when no volume traded."""
    if window_start is None or window_end is None:
        return None, None
    notional = _sub(window_end[0], window_start[0])
    volume = _sub(window_end[1], window_start[1])
    return vwap(notional, volume), volume


@dataclass(frozen=True, slots=True)
class OrderInputs:
    """What the order-level formulas need. Quantities are positive; money exact."""

    side: str
    order_qty: Decimal
    filled_qty: Decimal  # sum of the order's fill quantities
    filled_notional: Decimal  # sum of fill qty x fill price
    fees: Decimal  # sum of fill fees (a rebate is negative)
    arrival_ts: int | None  # the NEW order's event time
    arrival_mid: Decimal | None  # mid at arrival_ts
    first_fill_ts: int | None
    last_fill_ts: int | None
    unfilled_price: Decimal | None  # price the unfilled part is valued at (see docs)
    market_vwap: Decimal | None  # market VWAP over the order's life


@dataclass(frozen=True, slots=True)
class OrderMetrics:
    fill_ratio: Decimal
    unfilled_qty: Decimal
    avg_fill_price: Decimal | None  # the order's own VWAP
    time_to_first_fill_ns: int | None
    time_to_last_fill_ns: int | None
    vwap_slippage_bps: Decimal | None  # order VWAP against the market VWAP (cost)
    benchmark_notional: Decimal | None  # order qty x arrival mid (the "paper" trade)
    execution_cost: Decimal | None
    opportunity_cost: Decimal | None
    implementation_shortfall: Decimal | None
    implementation_shortfall_bps: Decimal | None


def order_metrics(o: OrderInputs) -> OrderMetrics:
    """Fill ratio, times to fill, VWAP against the market, implementation shortfall.

    Implementation shortfall (Perold) against the paper trade of the whole order at the
    arrival mid `P0`, with `F` filled, `U = max(order_qty - F, 0)` unfilled and `Pu`
    the price the unfilled part is valued at:

        execution cost   = s x (filled_notional - F x P0)
        opportunity cost = s x U x (Pu - P0)
        shortfall        = execution cost + opportunity cost + fees
        shortfall bps    = shortfall / (order_qty x P0) x 10^4

    A figure whose inputs are unknown (no arrival mid; an unfilled part and no `Pu`)
    is None rather than a guess.
    """
    sign = side_sign(o.side)
    unfilled = max(_sub(o.order_qty, o.filled_qty), ZERO)
    avg_price = vwap(o.filled_notional, o.filled_qty)
    first = _elapsed(o.arrival_ts, o.first_fill_ts)
    last = _elapsed(o.arrival_ts, o.last_fill_ts)
    vwap_slip = None
    if avg_price is not None and o.market_vwap is not None:
        vwap_slip = to_bps(_mul(sign, _sub(avg_price, o.market_vwap)), o.market_vwap)
    benchmark = execution = opportunity = shortfall = shortfall_bps = None
    if o.arrival_mid is not None:
        p0 = o.arrival_mid
        benchmark = _mul(o.order_qty, p0)
        execution = _mul(sign, _sub(o.filled_notional, _mul(o.filled_qty, p0)))
        if not unfilled:
            opportunity = ZERO
        elif o.unfilled_price is not None:
            opportunity = _mul(_mul(sign, unfilled), _sub(o.unfilled_price, p0))
        if opportunity is not None:
            shortfall = _add(_add(execution, opportunity), o.fees)
            shortfall_bps = to_bps(shortfall, benchmark)
    return OrderMetrics(
        fill_ratio=divide(o.filled_qty, o.order_qty),
        unfilled_qty=unfilled,
        avg_fill_price=avg_price,
        time_to_first_fill_ns=first,
        time_to_last_fill_ns=last,
        vwap_slippage_bps=vwap_slip,
        benchmark_notional=benchmark,
        execution_cost=execution,
        opportunity_cost=opportunity,
        implementation_shortfall=shortfall,
        implementation_shortfall_bps=shortfall_bps,
    )


def _elapsed(start: int | None, end: int | None) -> int | None:
    if start is None or end is None:
        return None
    return end - start
