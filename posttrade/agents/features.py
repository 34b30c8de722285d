"""The feature agents of feast_pipeline: NATS flow → windowed tables → Feast.

| agent            | consumes                    | state (tables)                              | pushes to                     |
|------------------|-----------------------------|---------------------------------------------|-------------------------------|
| trade_features   | TRADES (`md.trades.>`)      | trade_minutes (1 m windows), trade_ticks,   | symbol_trade_features         |
|                  |                             | trade_history (recent closed minutes)       |                               |
| quote_features   | QUOTES (`md.quotes.>`)      | quote_minutes (1 m windows), quote_tops     | symbol_quote_features         |
| account_features | FILLS (`trading.fills.>`)   | positions (core.positions, average cost),   | account_features,             |
|                  |                             | account_days                                | account_order_features        |
| order_features   | ORDERS (`trading.orders.>`) | order_days                                  | account_order_features        |

Account features are computed here from the fills with `posttrade.core.positions` (the
same arithmetic as ptrc), not from ptrc's position events: they then depend on nothing
but the trading flow, and the marks are the last market prints this service sees.

Each agent takes events in batches (`batch.size` events or `batch.interval_sec`
seconds), folds every event into its tables with `apply` (a redelivered event changes
nothing), turns the windows that closed into feature rows, and pushes the batch's rows
before asking for the next batch — so a batch is acknowledged only once Feast's online
and offline stores have its rows. Windows are event time: a minute closes once an event
more than `grace` past its end has been seen on that stream (any symbol); later events
for it are counted as late and dropped.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from ..app import App
from ..core.positions import Position
from ..features.math import (
    MINUTE_NS,
    AccountDay,
    OrdersDay,
    QuoteMinute,
    QuoteTop,
    TradeHistory,
    TradeMinute,
    TradeTick,
    account_features,
    add_fill_to_day,
    add_order_to_day,
    add_quote,
    add_trade,
    fill_rate_features,
    next_tick,
    next_top,
    order_flow_term,
    quote_features,
    row,
    trade_features,
    trade_sign,
    utc_day,
)
from ..features.views import ACCOUNT_FEATURES, ACCOUNT_ORDER_FEATURES, SYMBOL_QUOTE_FEATURES, SYMBOL_TRADE_FEATURES
from ..streams import subjects
from ..streams.channel import Channel


def _none() -> None:
    """Default of tables whose update functions start from "nothing yet"."""
    return None


@dataclass(frozen=True)
class FeatureChannels:
    trades: Channel
    quotes: Channel
    fills: Channel
    orders: Channel

    @classmethod
    def standard(cls, app: App) -> FeatureChannels:
        """The bus layout of `posttrade.streams.subjects` (tests pass their own streams)."""
        return cls(
            trades=subjects.market_trades(app),
            quotes=subjects.quotes(app),
            fills=subjects.fills(app),
            orders=subjects.orders(app),
        )


class FeatureAgents:
    """Declares the channels, tables and agents on `app`; `publisher` is set at start."""

    def __init__(
        self,
        app: App,
        *,
        batch_size: int,
        batch_interval_s: float,
        window_grace_s: float,
        channels: FeatureChannels | None = None,
    ):
        self.app = app
        self.batch_size = batch_size
        self.batch_interval_s = batch_interval_s
        self.publisher = None  # a features.publisher.FeaturePublisher, created when Feast is up

        channels = channels or FeatureChannels.standard(app)
        self.trades = channels.trades
        self.quotes = channels.quotes
        self.fills = channels.fills
        self.orders = channels.orders

        self.trade_minutes = app.windowed_table(
            "trade_minutes", size_s=60, grace_s=window_grace_s, value_type=TradeMinute, key_type=str, default=TradeMinute
        )
        self.trade_ticks = app.table("trade_ticks", value_type=TradeTick, key_type=str, default=_none)
        self.trade_history = app.table("trade_history", value_type=TradeHistory, key_type=str, default=TradeHistory)
        self.quote_minutes = app.windowed_table(
            "quote_minutes", size_s=60, grace_s=window_grace_s, value_type=QuoteMinute, key_type=str, default=QuoteMinute
        )
        self.quote_tops = app.table("quote_tops", value_type=QuoteTop, key_type=str, default=_none)
        self.positions = app.table("positions", value_type=dict[str, Any], key_type=tuple[str, str])
        self.account_days = app.table("account_days", value_type=AccountDay, key_type=str, default=_none)
        self.order_days = app.table("order_days", value_type=OrdersDay, key_type=str, default=_none)

        # Decoded positions by account, rebuilt from the table whenever the fills agent
        # (re)starts: a crash rolls the table back, and this cache with it.
        self._positions_by_account: dict[str, dict[str, Position]] = {}

        app.agent(self.trades, name="trade_features")(self.trade_agent)
        app.agent(self.quotes, name="quote_features")(self.quote_agent)
        app.agent(self.fills, name="account_features")(self.fill_agent)
        app.agent(self.orders, name="order_features")(self.order_agent)

    async def _push(self, stream, view, rows: list[tuple]) -> None:
        if rows:
            await self.publisher.push(view.name, rows, stream.keep_alive)

    def batches(self, stream):
        return stream.take_events(self.batch_size, self.batch_interval_s)

    # -- market trades -------------------------------------------------------------------

    async def trade_agent(self, stream) -> None:
        names = SYMBOL_TRADE_FEATURES.feature_names
        async for records in self.batches(stream):
            for record in records:
                with stream.processing(record):
                    self.fold_trade(record.value)
            rows = []
            for symbol, start, minute in self.trade_minutes.pop_closed():
                values, history = trade_features(start, minute, self.trade_history[symbol])
                self.trade_history[symbol] = history
                rows.append(row(symbol, start + MINUTE_NS, values, names))
            await self._push(stream, SYMBOL_TRADE_FEATURES, rows)

    def fold_trade(self, trade) -> None:
        previous = self.trade_ticks.get(trade.symbol)
        sign = trade_sign(trade.aggressor, trade.price, previous)
        self.trade_ticks.apply(trade.symbol, lambda tick: next_tick(tick, trade.ts, trade.price, sign))
        self.trade_minutes.apply(trade.symbol, trade.ts, lambda m: add_trade(m, trade.ts, trade.price, trade.size, sign))

    # -- quotes ----------------------------------------------------------------------------

    async def quote_agent(self, stream) -> None:
        names = SYMBOL_QUOTE_FEATURES.feature_names
        async for records in self.batches(stream):
            for record in records:
                with stream.processing(record):
                    self.fold_quote(record.value)
            rows = [
                row(symbol, start + MINUTE_NS, quote_features(minute), names)
                for symbol, start, minute in self.quote_minutes.pop_closed()
            ]
            await self._push(stream, SYMBOL_QUOTE_FEATURES, rows)

    def fold_quote(self, quote) -> None:
        top = QuoteTop(ts=quote.ts, bid=quote.bid, ask=quote.ask, bid_size=quote.bid_size, ask_size=quote.ask_size)
        previous = self.quote_tops.get(quote.symbol)
        # A late quote (older than the top we hold) has no place in the sequence of changes.
        term = order_flow_term(previous, top) if previous is None or top.ts >= previous.ts else Decimal(0)
        self.quote_tops.apply(quote.symbol, lambda held: next_top(held, top))
        self.quote_minutes.apply(quote.symbol, quote.ts, lambda m: add_quote(m, top, term))

    # -- fills: positions, exposure, realized P&L today --------------------------------------

    def mark(self, symbol: str) -> Decimal | None:
        tick = self.trade_ticks.get(symbol)
        return tick.price if tick is not None else None

    def _load_positions(self) -> None:
        self._positions_by_account = defaultdict(dict)
        for (account, symbol), state in self.positions.items():
            self._positions_by_account[account][symbol] = Position.from_dict(state)

    async def fill_agent(self, stream) -> None:
        self._load_positions()
        account_names = ACCOUNT_FEATURES.feature_names
        rate_names = ACCOUNT_ORDER_FEATURES.feature_names
        async for records in self.batches(stream):
            account_rows, rate_rows = [], []
            for record in records:
                fill = record.value
                with stream.processing(record):
                    self.fold_fill(fill)
                day = utc_day(fill.ts)
                held = self._positions_by_account[fill.account]
                marks = {s: m for s in held if (m := self.mark(s)) is not None}
                days = self.account_days.get(fill.account)
                fills_today = days.fills if days is not None and days.day == day else 0
                account_rows.append(
                    row(fill.account, fill.ts, account_features(day, held.values(), marks, fills_today), account_names)
                )
                rates = fill_rate_features(day, days, self.order_days.get(fill.account))
                rate_rows.append(row(fill.account, fill.ts, rates, rate_names))
            await self._push(stream, ACCOUNT_FEATURES, account_rows)
            await self._push(stream, ACCOUNT_ORDER_FEATURES, rate_rows)

    def fold_fill(self, fill) -> None:
        key = (fill.account, fill.symbol)
        day = utc_day(fill.ts)
        mark = self.mark(fill.symbol)

        def update(state: dict | None) -> dict:
            position = Position.from_dict(state) if state else Position(account=fill.account, symbol=fill.symbol)
            if position.last_ts is not None and utc_day(position.last_ts) < day:
                position.roll_day(mark)  # first fill of a new day: snapshot the start of day
            position.apply(fill)
            return position.to_dict()

        if not self.positions.already_applied(key):
            state = update(self.positions.get(key))
            self.positions[key] = state
            self._positions_by_account.setdefault(fill.account, {})[fill.symbol] = Position.from_dict(state)
        self.account_days.apply(fill.account, lambda d: add_fill_to_day(d, fill.ts, fill.qty))

    # -- orders: fill rate ---------------------------------------------------------------------

    async def order_agent(self, stream) -> None:
        names = ACCOUNT_ORDER_FEATURES.feature_names
        async for records in self.batches(stream):
            rows = []
            for record in records:
                order = record.value
                if order.status != "NEW":
                    continue  # updates of an order already counted
                with stream.processing(record):
                    self.order_days.apply(order.account, lambda d: add_order_to_day(d, order.ts, order.qty))
                rates = fill_rate_features(
                    utc_day(order.ts), self.account_days.get(order.account), self.order_days.get(order.account)
                )
                rows.append(row(order.account, order.ts, rates, names))
            await self._push(stream, ACCOUNT_ORDER_FEATURES, rows)
