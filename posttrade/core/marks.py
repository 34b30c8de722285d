"""Marks: the price a position is valued at, chosen from market data by priority.

Each symbol keeps the latest value of every source it has seen; the mark is the first
available source in the configured priority (default: quote mid, else last trade, else
bar close). A source only moves forward in event time: an older quote arriving late
never replaces a newer one.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Literal

import msgspec

MarkSource = Literal["quote_mid", "last_trade", "bar_close"]
DEFAULT_PRIORITY: tuple[MarkSource, ...] = ("quote_mid", "last_trade", "bar_close")


class MarkState(msgspec.Struct, kw_only=True):
    """The latest price per source for one symbol (a table value)."""

    quote_mid: Decimal | None = None
    quote_ts: int = 0
    last_trade: Decimal | None = None
    trade_ts: int = 0
    bar_close: Decimal | None = None
    bar_ts: int = 0

    def with_quote(self, mid: Decimal, ts: int) -> MarkState:
        if ts < self.quote_ts:
            return self
        return msgspec.structs.replace(self, quote_mid=mid, quote_ts=ts)

    def with_trade(self, price: Decimal, ts: int) -> MarkState:
        if ts < self.trade_ts:
            return self
        return msgspec.structs.replace(self, last_trade=price, trade_ts=ts)

    def with_bar_close(self, close: Decimal, ts: int) -> MarkState:
        if ts < self.bar_ts:
            return self
        return msgspec.structs.replace(self, bar_close=close, bar_ts=ts)

    def mark(self, priority: tuple[MarkSource, ...] = DEFAULT_PRIORITY) -> tuple[Decimal, MarkSource, int] | None:
        """(price, source, event time) of the first available source, or None."""
        for source in priority:
            if source == "quote_mid" and self.quote_mid is not None:
                return self.quote_mid, source, self.quote_ts
            if source == "last_trade" and self.last_trade is not None:
                return self.last_trade, source, self.trade_ts
            if source == "bar_close" and self.bar_close is not None:
                return self.bar_close, source, self.bar_ts
        return None
