"""The batch-computed view: `symbol_hourly_features` from the offline 1-minute rows.

Every run (a timer of the service) computes each closed UTC hour not computed yet from
the `symbol_trade_features` rows in the offline store, appends the hourly rows to the
hourly view's offline store, and then materializes that view online with Feast's
`materialize_incremental`. So the online hourly values come from the offline store,
the way Feast's batch features do.

An hour [H, H + 1 h) holds the minute rows whose event time (the minute's end) is in
(H, H + 1 h]. It is closed once a minute row newer than H + 1 h exists: windows close
in event-time order, so every minute of the hour has been pushed by then. Its row has
event time H + 1 h.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

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


@dataclass
class BatchRun:
    hours: int
    rows: int
    newest_ts: int | None
    duration_s: float


class HourlyBatchJob:
    """Computes closed hours from the offline store (synchronous; run it in a thread)."""

    def __init__(self, repository, *, max_hours_per_run: int = 48):
        self.repository = repository
        self.offline = repository.offline
        self.max_hours_per_run = max_hours_per_run
        self.source = SYMBOL_TRADE_FEATURES
        self.target = SYMBOL_HOURLY_FEATURES
        self.next_hour: int | None = None  # start of the next hour to compute

    def run(self) -> BatchRun:
        started = time.perf_counter()
        source_range = self.offline.event_time_range(self.source)
        if source_range is None:
            return BatchRun(0, 0, None, time.perf_counter() - started)
        oldest, newest = source_range
        done = self.offline.event_time_range(self.target)
        newest_written = done[1] if done is not None else None
        next_hour = self.next_hour
        if next_hour is None:
            # After a start: continue after the newest computed hour, or at the first one.
            next_hour = done[1] if done is not None else ((oldest - 1) // HOUR_NS) * HOUR_NS
        hours = rows = 0
        while next_hour + HOUR_NS < newest and hours < self.max_hours_per_run:
            table = self.offline.read(self.source, next_hour + 1_000, next_hour + HOUR_NS + 1_000)
            hour_rows = hourly_rows(table, next_hour, self.source)
            if hour_rows:
                self.offline.write(self.target, hour_rows)
                rows += len(hour_rows)
                newest_written = next_hour + HOUR_NS
            hours += 1
            next_hour += HOUR_NS
        self.next_hour = next_hour  # kept in memory so that runs of empty hours move on
        return BatchRun(hours, rows, newest_written, time.perf_counter() - started)
