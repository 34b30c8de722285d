"""The batch-computed view: `symbol_hourly_features` from the offline 1-minute rows.

Every run (`posttrade.agents.features.HourlyBatch`, a timer of the service) computes
each closed UTC hour not computed yet from the `symbol_trade_features` rows in the
offline store, appends the hourly rows to the hourly view's offline store, and then
materializes that view online with Feast's `materialize_incremental`. So the online
hourly values come from the offline store, the way Feast's batch features do.

An hour [H, H + 1 h) holds the minute rows whose event time (the minute's end) is in
(H, H + 1 h]. It is closed once a minute row newer than H + 1 h exists: windows close
in event-time order, so every minute of the hour has been pushed by then. Its row has
event time H + 1 h.
"""

from __future__ import annotations

import math

import pyarrow as pa

from .math import NS_PER_S
from .views import SYMBOL_HOURLY_FEATURES, SYMBOL_TRADE_FEATURES, TIMESTAMP_FIELD, ViewSpec

HOUR_NS = 3600 * NS_PER_S


def hourly_features(minutes: list[dict]) -> dict:
    """One symbol's hour from its minute rows (dicts of `symbol_trade_features` values)."""
    returns = [m["return_1m"] for m in minutes if m["return_1m"] is not None and not math.isnan(m["return_1m"])]
    growth = 1.0
    for r in returns:
        growth *= 1.0 + r
    logs = [math.log1p(r) ** 2 for r in returns]
    return {
        "return_1h": growth - 1.0 if returns else None,
        "realized_vol_1h": math.sqrt(math.fsum(logs)) if returns else None,
        "trade_count_1h": sum(int(m["trade_count_1m"] or 0) for m in minutes),
        "volume_1h": math.fsum(float(m["volume_1m"] or 0.0) for m in minutes),
    }


def hourly_rows(table: pa.Table, hour_start_ns: int, source: ViewSpec = SYMBOL_TRADE_FEATURES) -> list[tuple]:
    """Rows of `symbol_hourly_features` for the hour starting at `hour_start_ns`.

    `table` holds the source rows of that hour (exact duplicates, from a redelivered
    push, count once).
    """
    by_symbol: dict[str, dict[int, dict]] = {}
    timestamps = table[TIMESTAMP_FIELD].cast(pa.int64()).to_pylist()  # microseconds
    entities = table[source.entity].to_pylist()
    columns = {name: table[name].to_pylist() for name in source.feature_names}
    for i, (entity, ts_us) in enumerate(zip(entities, timestamps)):
        by_symbol.setdefault(entity, {})[ts_us] = {name: values[i] for name, values in columns.items()}
    end = hour_start_ns + HOUR_NS
    out = []
    for symbol in sorted(by_symbol):
        minutes = [by_symbol[symbol][ts] for ts in sorted(by_symbol[symbol])]
        values = hourly_features(minutes)
        out.append((symbol, end, *(values[name] for name in SYMBOL_HOURLY_FEATURES.feature_names)))
    return out


def first_hour(oldest_minute_ns: int, newest_computed_ns: int | None) -> int:
    """The start of the first hour to compute: the one after the newest computed hour
    (whose rows' event time is its end), else the hour of the oldest minute row."""
    if newest_computed_ns is not None:
        return newest_computed_ns
    return ((oldest_minute_ns - 1) // HOUR_NS) * HOUR_NS


def hour_closed(hour_start_ns: int, newest_minute_ns: int) -> bool:
    """Whether every minute row of the hour is in: a newer minute row exists."""
    return hour_start_ns + HOUR_NS < newest_minute_ns
