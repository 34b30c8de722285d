"""The feature views feast_pipeline maintains, as plain data.

One list, read by the Feast repository (`repo`), the writers (`online`, `offline`), the
agents (row layout), `/features/status` and `/features/online`. Each view has one
entity (`symbol` or `account`, a string join key of the same name), an event-time
column `event_timestamp` and typed features. A row travels as a tuple
`(entity value, event time in epoch ns, feature values in the view's order...)`; a
value is None when it is not defined (a return with no earlier price, an account's
money whose FX rate is unknown): an empty `Value` online, a null offline.

Currencies: a symbol's prices, VWAP and mid are in the symbol's currency (returns,
volatility, spreads and imbalances have none); an account's money (exposures, realized
P&L) is in the account's base currency; quantities and counts are not money.

Stream views are computed by agents and pushed (online and offline) through a push
source; batch views are computed from the offline store on a schedule and reach the
online store by `materialize_incremental`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Dtype = Literal["float64", "int64"]
EntityName = Literal["symbol", "account"]

#: Event-time column of every view's offline data.
TIMESTAMP_FIELD = "event_timestamp"
#: Feast keeps event times to the microsecond (online and offline): two rows of an
#: entity less than this apart in nanoseconds can land on the same stored time.
EVENT_TIME_RESOLUTION_NS = 1_000


@dataclass(frozen=True)
class FeatureSpec:
    name: str
    dtype: Dtype
    description: str


@dataclass(frozen=True)
class ViewSpec:
    name: str
    entity: EntityName
    kind: Literal["stream", "batch"]
    ttl_s: int  # how far back a value still counts (online reads, point-in-time joins)
    features: tuple[FeatureSpec, ...]
    description: str

    @property
    def push_source(self) -> str | None:
        return f"{self.name}_push" if self.kind == "stream" else None

    @property
    def batch_source(self) -> str:
        return f"{self.name}_offline"

    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.features)

    @property
    def columns(self) -> tuple[str, ...]:
        """Column order of a row tuple and of the offline Parquet files."""
        return (self.entity, TIMESTAMP_FIELD, *self.feature_names)


def _f(name: str, description: str) -> FeatureSpec:
    return FeatureSpec(name, "float64", description)


def _i(name: str, description: str) -> FeatureSpec:
    return FeatureSpec(name, "int64", description)


SYMBOL_TRADE_FEATURES = ViewSpec(
    name="symbol_trade_features",
    entity="symbol",
    kind="stream",
    ttl_s=15 * 60,
    description="Per symbol, at the close of each traded minute (event time = the minute's end).",
    features=(
        _f("return_1m", "last price of the minute / last price before it - 1"),
        _f("return_5m", "last price of the minute / last price 5 minutes earlier - 1"),
        _f("realized_vol_5m", "sqrt(sum of squared 1 m log returns over the last 5 minutes), not annualized"),
        _f("vwap_5m", "sum(price x size) / sum(size) over the last 5 minutes"),
        _i("trade_count_1m", "prints in the minute"),
        _f("volume_1m", "size traded in the minute"),
        _f("trade_imbalance_1m", "(buy - sell) / (buy + sell) signed volume; aggressor side, else tick rule"),
    ),
)

SYMBOL_QUOTE_FEATURES = ViewSpec(
    name="symbol_quote_features",
    entity="symbol",
    kind="stream",
    ttl_s=15 * 60,
    description="Per symbol, at the close of each minute with quotes (event time = the minute's end).",
    features=(
        _f("spread_bps", "(ask - bid) / mid x 10,000 of the minute's last quote"),
        _f("spread_bps_avg_1m", "mean of spread_bps over the minute's quotes"),
        _f("mid", "(bid + ask) / 2 of the minute's last quote"),
        _f("order_flow_imbalance_1m", "order-flow imbalance (Cont, Kukanov, Stoikov) summed over the minute, in shares"),
        _i("quote_count_1m", "quotes in the minute"),
    ),
)

ACCOUNT_FEATURES = ViewSpec(
    name="account_features",
    entity="account",
    kind="stream",
    ttl_s=7 * 24 * 3600,
    description=(
        "Per account, after each of ptrc's position updates "
        "(event time = the update's time, never before the account's previous row). "
        "Money in the account's base currency at the current FX rates; null when a rate it needs is unknown."
    ),
    features=(
        _f("gross_exposure", "sum over symbols of |net qty x mark x multiplier| (ptrc's positions), in base currency"),
        _f("net_exposure", "sum over symbols of net qty x mark x multiplier (ptrc's positions), in base currency"),
        _f("realized_pnl_today", "realized P&L net of fees since ptrc's start of day (00:00 UTC by default), in base currency"),
        _i("fills_today", "executions since 00:00 UTC in ptrc's positions: a resend once, busted ones not, openings not"),
    ),
)

ACCOUNT_ORDER_FEATURES = ViewSpec(
    name="account_order_features",
    entity="account",
    kind="stream",
    ttl_s=7 * 24 * 3600,
    description=(
        "Per account, after each new order and each of ptrc's position updates that changes the fill counts "
        "(event time = that event's time, never before the account's previous row)."
    ),
    features=(
        _f("fill_rate_today", "quantity filled today / quantity ordered today (00:00 UTC)"),
        _i("orders_today", "new orders since 00:00 UTC"),
        _f("ordered_qty_today", "quantity of the new orders since 00:00 UTC"),
        _f("filled_qty_today", "quantity filled since 00:00 UTC, corrected quantities, busted fills left out"),
    ),
)

SYMBOL_HOURLY_FEATURES = ViewSpec(
    name="symbol_hourly_features",
    entity="symbol",
    kind="batch",
    ttl_s=2 * 24 * 3600,
    description="Per symbol and closed UTC hour, computed from the offline 1 m rows (event time = the hour's end).",
    features=(
        _f("return_1h", "product of (1 + return_1m) over the hour - 1"),
        _f("realized_vol_1h", "sqrt(sum of squared 1 m log returns over the hour)"),
        _i("trade_count_1h", "prints in the hour"),
        _f("volume_1h", "size traded in the hour"),
    ),
)

VIEWS: dict[str, ViewSpec] = {
    v.name: v
    for v in (
        SYMBOL_TRADE_FEATURES,
        SYMBOL_QUOTE_FEATURES,
        ACCOUNT_FEATURES,
        ACCOUNT_ORDER_FEATURES,
        SYMBOL_HOURLY_FEATURES,
    )
}


# What `features` of /features/online may be: comma-separated names out of every view's
# features, bare or `view:feature` (the entity's own are checked once it is known).
_FEATURE = "(?:" + "|".join(
    sorted({f for v in VIEWS.values() for f in v.feature_names} | {f"{v.name}:{f}" for v in VIEWS.values() for f in v.feature_names})
) + ")"
FEATURES_PATTERN = f"^(?:{_FEATURE}(?:,{_FEATURE})*)?$"


def views_of(entity: EntityName) -> list[ViewSpec]:
    return [v for v in VIEWS.values() if v.entity == entity]


def resolve_features(entity: EntityName, requested: list[str] | None) -> list[str]:
    """Turn `feature` or `view:feature` names into Feast feature references.

    None or an empty list means every feature of the entity's views. Raises KeyError
    with the offending name when one is unknown or belongs to another entity, and
    ValueError when a bare name is ambiguous.
    """
    views = views_of(entity)
    if not requested:
        return [f"{v.name}:{f}" for v in views for f in v.feature_names]
    refs: list[str] = []
    for name in requested:
        if ":" in name:
            view_name, _, feature = name.partition(":")
            view = VIEWS.get(view_name)
            if view is None or view.entity != entity or feature not in view.feature_names:
                raise KeyError(name)
            refs.append(name)
            continue
        owners = [v for v in views if name in v.feature_names]
        if not owners:
            raise KeyError(name)
        if len(owners) > 1:
            raise ValueError(f"{name} is in several views ({', '.join(v.name for v in owners)}): use view:feature")
        refs.append(f"{owners[0].name}:{name}")
    return refs
