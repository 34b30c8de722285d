"""OHLCV + VWAP bars from trades: pure, synchronous, exact.

`BarState` is the accumulator one time window holds: fold trades into it with `add`
and turn it into a `Bar` event with `to_bar`. Windowing (which window a trade belongs
to, when a window closes, late trades) is the job of the runtime's windowed tables;
this module only knows what a bar of some trades is.

Definitions (every one is independent of the order trades arrive in, except for ties):

- `open` is the price of the trade with the smallest event time, `close` the price of
  the trade with the largest. A late trade (arriving after newer ones, inside the grace
  period) can therefore still become the open. Trades with equal times: the first to
  arrive stays the open, the last to arrive becomes the close.
- `high` / `low`: the largest / smallest price.
- `volume`: the sum of sizes; `count`: the number of trades.
- `vwap = sum(price x size) / volume`. The sum (`notional`) is kept exactly (unbounded
  precision, `posttrade.core.exact.EXACT`); the quotient is exact when it terminates,
  else rounded half to even at 12 decimal places (`posttrade.core.exact.divide`), the
  one rounding in this module.

Intervals are written `<n><unit>` with unit `s`, `m`, `h` or `d` (`1s`, `1m`, `5m`,
`1h`, `1d`), the spelling bar events and QuestDB's `SAMPLE BY` share.
"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import TypeVar

import msgspec

from ..streams.events import Bar
from .exact import EXACT, ZERO, divide, format_decimal

NS_PER_S = 1_000_000_000
SECONDS_PER_DAY = 86_400

_INTERVAL = re.compile(r"^([1-9][0-9]{0,5})([smhd])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": SECONDS_PER_DAY}

S = TypeVar("S", bound=msgspec.Struct)

_add = EXACT.add
_mul = EXACT.multiply


def interval_seconds(interval: str) -> int:
    """Length of an interval like `5m` in seconds; ValueError when it is not one."""
    match = _INTERVAL.match(interval) if isinstance(interval, str) else None
    if match is None:
        raise ValueError(f"interval must look like 1s, 1m, 5m, 1h or 1d, got {interval!r}")
    return int(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def window_start(ts: int, interval: str) -> int:
    """Start (epoch ns) of the tumbling window of `interval` that contains `ts`."""
    size = interval_seconds(interval) * NS_PER_S
    return ts - ts % size


# Prices repeat a lot: remembering their spelling saves most of the formatting work
# (equal Decimals hash alike and have the same plain spelling, so any of them may hit).
_plain_spellings: dict[Decimal, Decimal] = {}
_PLAIN_SPELLINGS_MAX = 50_000


def plain(value: Decimal) -> Decimal:
    """The same number with one spelling: no exponent, no trailing fractional zeros
    (QuestDB answers `10.500000` for a DECIMAL(18,6) holding 10.5)."""
    spelled = _plain_spellings.get(value)
    if spelled is None:
        if len(_plain_spellings) >= _PLAIN_SPELLINGS_MAX:
            _plain_spellings.clear()
        spelled = _plain_spellings[value] = Decimal(format_decimal(value))
    return spelled


def plain_decimals(event: S) -> S:
    """`event` with every Decimal field spelled plainly (a copy; the same if none changes)."""
    changes = {}
    for name in event.__struct_fields__:
        value = getattr(event, name)
        if isinstance(value, Decimal):
            spelled = plain(value)
            if str(spelled) != str(value):
                changes[name] = spelled
    return msgspec.structs.replace(event, **changes) if changes else event


class BarState(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """The trades of one window so far. Immutable: `add` returns a new state."""

    open: Decimal | None = None
    open_ts: int = 0
    high: Decimal | None = None
    low: Decimal | None = None
    close: Decimal | None = None
    close_ts: int = 0
    volume: Decimal = ZERO
    notional: Decimal = ZERO  # sum of price x size, exact
    count: int = 0

    def add(self, ts: int, price: Decimal, size: Decimal) -> BarState:
        """This state with one more trade of `size` at `price` at event time `ts`."""
        if not (price > ZERO and size > ZERO):
            raise ValueError(f"a trade needs price > 0 and size > 0, got price {price}, size {size}")
        if self.count == 0:
            return BarState(price, ts, price, price, price, ts, size, _mul(price, size), 1)
        earlier = ts < self.open_ts
        later = ts >= self.close_ts
        return BarState(
            price if earlier else self.open,
            ts if earlier else self.open_ts,
            price if price > self.high else self.high,
            price if price < self.low else self.low,
            price if later else self.close,
            ts if later else self.close_ts,
            _add(self.volume, size),
            _add(self.notional, _mul(price, size)),
            self.count + 1,
        )

    @property
    def vwap(self) -> Decimal | None:
        if not self.volume:
            return None
        return plain(divide(self.notional, self.volume))

    def to_bar(self, symbol: str, interval: str, start_ns: int) -> Bar:
        """The bar event for the window of `interval` starting at `start_ns`."""
        if self.count == 0:
            raise ValueError("an empty window has no bar")
        return Bar(
            ts=start_ns,
            symbol=symbol,
            interval=interval,
            open=plain(self.open),
            high=plain(self.high),
            low=plain(self.low),
            close=plain(self.close),
            volume=plain(self.volume),
            vwap=self.vwap,
            count=self.count,
        )


def empty_bar_state() -> BarState:
    return BarState()


def bar_from_totals(
    *,
    ts: int,
    symbol: str,
    interval: str,
    open: Decimal,
    high: Decimal,
    low: Decimal,
    close: Decimal,
    volume: Decimal,
    notional: Decimal | None,
    count: int,
) -> Bar:
    """A bar from aggregates computed elsewhere (QuestDB's SAMPLE BY), with the same
    VWAP rule and number spelling as bars built here."""
    vwap = plain(divide(notional, volume)) if notional is not None and volume else None
    return Bar(
        ts=ts,
        symbol=symbol,
        interval=interval,
        open=plain(open),
        high=plain(high),
        low=plain(low),
        close=plain(close),
        volume=plain(volume),
        vwap=vwap,
        count=count,
    )
