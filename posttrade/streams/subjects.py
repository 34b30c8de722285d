"""The bus layout: which subjects carry what, and the JetStream streams behind them.

Every service declares its channels through these helpers so that the stream
definitions (names, subjects, retention) are the same everywhere. Subject tokens for
accounts and symbols go through `subject_token` (a symbol like `BRK.B` has a dot);
the payload always carries the exact value.

| stream     | subjects                                        | payload       |
|------------|-------------------------------------------------|---------------|
| FILLS      | trading.fills.<account>.<symbol>                | Fill          |
| ORDERS     | trading.orders.<account>.<symbol>               | Order         |
| QUOTES     | md.quotes.<symbol>                              | Quote         |
| TRADES     | md.trades.<symbol>                              | MarketTrade   |
| BARS       | md.bars.<interval>.<symbol>                     | Bar           |
| POSITIONS  | posttrade.positions.<account>.<symbol>          | (ptrc output) |
| PNL        | posttrade.pnl.snapshots                         | PnlSnapshot   |
| ALERTS     | posttrade.alerts.<rule>                         | (ptrc output) |
| DLQ        | posttrade.dlq.<service>                         | original bytes|
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .channel import Channel
from .events import Bar, ComplianceAlert, Fill, MarketTrade, Order, PnlSnapshot, PositionUpdate, Quote, subject_token

if TYPE_CHECKING:
    from ..app import App

# Market data is high volume and only needed for a while; trading records are kept.
MARKET_DATA_MAX_AGE_S = 7 * 24 * 3600.0


def fill_subject(account: str, symbol: str) -> str:
    return f"trading.fills.{subject_token(account)}.{subject_token(symbol)}"


def order_subject(account: str, symbol: str) -> str:
    return f"trading.orders.{subject_token(account)}.{subject_token(symbol)}"


def quote_subject(symbol: str) -> str:
    return f"md.quotes.{subject_token(symbol)}"


def trade_subject(symbol: str) -> str:
    return f"md.trades.{subject_token(symbol)}"


def bar_subject(interval: str, symbol: str) -> str:
    return f"md.bars.{subject_token(interval)}.{subject_token(symbol)}"


def position_subject(account: str, symbol: str) -> str:
    return f"posttrade.positions.{subject_token(account)}.{subject_token(symbol)}"


PNL_SNAPSHOT_SUBJECT = "posttrade.pnl.snapshots"
# pnl's history lives in QuestDB (questdb_writer writes it); the stream only has to hold
# it until then, and long enough for the writer to be down for a weekend.
PNL_MAX_AGE_S = 3 * 24 * 3600.0


def alert_subject(rule: str) -> str:
    return f"posttrade.alerts.{subject_token(rule)}"


def fills(app: App, consume: tuple[str, ...] = ()) -> Channel:
    return app.channel("fills", stream="FILLS", subjects=["trading.fills.>"], value_type=Fill, consume=consume)


def orders(app: App, consume: tuple[str, ...] = ()) -> Channel:
    return app.channel("orders", stream="ORDERS", subjects=["trading.orders.>"], value_type=Order, consume=consume)


def quotes(app: App, consume: tuple[str, ...] = ()) -> Channel:
    return app.channel(
        "quotes", stream="QUOTES", subjects=["md.quotes.>"], value_type=Quote, consume=consume,
        max_age_s=MARKET_DATA_MAX_AGE_S,
    )


def market_trades(app: App, consume: tuple[str, ...] = ()) -> Channel:
    return app.channel(
        "market_trades", stream="TRADES", subjects=["md.trades.>"], value_type=MarketTrade, consume=consume,
        max_age_s=MARKET_DATA_MAX_AGE_S,
    )


def bars(app: App, consume: tuple[str, ...] = ()) -> Channel:
    return app.channel(
        "bars", stream="BARS", subjects=["md.bars.>"], value_type=Bar, consume=consume,
        max_age_s=MARKET_DATA_MAX_AGE_S,
    )


# The services' own outputs.


def positions(app: App, consume: tuple[str, ...] = ()) -> Channel:
    """ptrc's position updates (pnl, hot_cache, feast_pipeline and questdb_writer read them)."""
    return app.channel(
        "positions", stream="POSITIONS", subjects=["posttrade.positions.>"], value_type=PositionUpdate,
        consume=consume,
    )


def alerts(app: App) -> Channel:
    return app.channel("alerts", stream="ALERTS", subjects=["posttrade.alerts.>"], value_type=ComplianceAlert)


def pnl_snapshots(app: App) -> Channel:
    """pnl's history, on its way to QuestDB through questdb_writer."""
    return app.channel(
        "pnl_snapshots", stream="PNL", subjects=["posttrade.pnl.>"], value_type=PnlSnapshot, max_age_s=PNL_MAX_AGE_S
    )
