"""Bar agents: bars built from market trades, and bars taken from bar messages.

Built bars use one tumbling windowed table per interval (`bars_1s`, `bars_1m`, ...),
keyed by symbol, holding a `posttrade.core.bars.BarState` per window. Windows are by
event time with a grace period: a trade up to `grace_s` behind the newest trade seen
still lands in its window (and may become its open); an older one is counted in the
table's `late_events` and dropped. Closed windows are removed from the table (their
final bar was already written when their last trade arrived).

Each batch of trades is folded into the windows first, then every window the batch
changed is added whole to a `BarSink` (the hot cache's Valkey), declared with the agent:
the runtime flushes it, retrying while the store is away, before the tables' changelogs
and the acknowledgement, so nothing is acknowledged before the cache has it. A
redelivered trade is skipped by the window's per-key sequence, and the sink receives
whole bars (never increments), so replays cannot double a bar.

Bar messages are written as they come, except for intervals this service builds from
trades itself: two writers of one window would overwrite each other, so for those
intervals the built bar is the one kept, and the messages are counted and skipped.
A bar message whose interval cannot be read (not `<n>s|m|h|d`) can never be served,
so it is dead-lettered.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

from ..app import App
from ..core.bars import SECONDS_PER_DAY, BarState, empty_bar_state, interval_seconds, plain_decimals
from ..streams.channel import Channel
from ..streams.events import Bar
from ..streams.stream import EventRecord, Stream
from ..tables.windowed import WindowedTable

log = logging.getLogger(__name__)


class BarSink(Protocol):
    """Where the bar agents put bars: a `posttrade.sinks.Sink` (declared with the agent,
    so flushed before the batch is acknowledged) storing whole bars, each replacing any
    bar of the same window (e.g. `posttrade.stores.valkey.hot_cache.ValkeyBarsSink`)."""

    name: str

    def add_bars(self, bars: Sequence[Bar], newest_event_ts: int) -> None:
        """Bars to store at the next flush; `newest_event_ts` is the newest input event
        time they include (freshness)."""


def check_built_interval(interval: str) -> int:
    """Seconds of an interval bars can be built for; ValueError otherwise.

    The interval must divide a day so that windows starting at multiples of it since
    the epoch are the same buckets QuestDB's `SAMPLE BY ... ALIGN TO CALENDAR` makes
    (the read-through path aggregates trades that way).
    """
    seconds = interval_seconds(interval)
    if SECONDS_PER_DAY % seconds:
        raise ValueError(f"interval {interval} does not divide a day")
    return seconds


class TradeBarBuilder:
    """The windowed tables of the built intervals, and the fold of trades into them."""

    def __init__(self, app: App, intervals: Sequence[str], *, grace_s: float):
        if not intervals:
            raise ValueError("no bar intervals to build")
        self.windows: dict[str, WindowedTable] = {}
        for interval in intervals:
            if interval in self.windows:
                raise ValueError(f"interval {interval} listed twice")
            self.windows[interval] = app.windowed_table(
                f"bars_{interval}",
                size_s=check_built_interval(interval),
                grace_s=grace_s,
                value_type=BarState,
                key_type=str,
                default=empty_bar_state,
            )
        self.trades_folded = 0
        self.windows_closed = 0
        self.newest_trade_ts = 0

    @property
    def intervals(self) -> tuple[str, ...]:
        return tuple(self.windows)

    def late_trades(self) -> dict[str, int]:
        """Per interval: trades dropped because their window had already closed."""
        return {interval: table.late_events for interval, table in self.windows.items()}

    def fold(self, stream: Stream, records: Sequence[EventRecord]) -> list[Bar]:
        """Fold a batch of MarketTrade records into the windows; return the bars of every
        window the batch changed (latest state, whole)."""
        changed: dict[tuple[str, str, int], BarState] = {}
        for record in records:
            # Each record is the current event while it is folded, so the windows record
            # its sequence and a replayed trade is a no-op.
            with stream.processing(record):
                trade = record.value
                ts, price, size, symbol = trade.ts, trade.price, trade.size, trade.symbol

                def add(state: BarState) -> BarState:
                    return state.add(ts, price, size)

                for interval, table in self.windows.items():
                    for start, state in table.apply(symbol, ts, add):
                        changed[(symbol, interval, start)] = state
                if ts > self.newest_trade_ts:
                    self.newest_trade_ts = ts
        self.trades_folded += len(records)
        for table in self.windows.values():
            self.windows_closed += len(table.pop_closed())
        return [state.to_bar(symbol, interval, start) for (symbol, interval, start), state in changed.items()]


def add_trade_bar_agent(
    app: App,
    trades: Channel,
    builder: TradeBarBuilder,
    sink: BarSink,
    *,
    max_events: int,
    within_s: float,
    name: str = "build_bars",
) -> None:
    """Register the agent that builds bars from `trades` (MarketTrade events)."""

    @app.agent(trades, name=name, sinks=[sink])
    async def build_bars(stream: Stream) -> None:
        async for records in stream.take_events(max_events, within_s):
            bars = builder.fold(stream, records)
            if bars:
                sink.add_bars(bars, builder.newest_trade_ts)


class BarMessageCounters:
    def __init__(self) -> None:
        self.written = 0
        self.skipped_built_interval = 0
        self.dead_lettered = 0


def add_bar_message_agent(
    app: App,
    bars: Channel,
    sink: BarSink,
    *,
    built_intervals: Sequence[str],
    max_events: int,
    within_s: float,
    name: str = "take_bars",
) -> BarMessageCounters:
    """Register the agent that stores bars from bar messages (Bar events)."""
    counters = BarMessageCounters()
    built = frozenset(built_intervals)

    @app.agent(bars, name=name, sinks=[sink])
    async def take_bars(stream: Stream) -> None:
        async for records in stream.take_events(max_events, within_s):
            newest_per_window: dict[tuple[str, str, int], Bar] = {}
            newest_ts = 0
            for record in records:
                bar: Bar = record.value
                if bar.interval in built:
                    counters.skipped_built_interval += 1
                    continue
                try:
                    interval_seconds(bar.interval)
                except ValueError as exc:
                    counters.dead_lettered += 1
                    await stream.dead_letter(record.delivery, f"bar cannot be cached: {exc}")
                    continue
                # A later message for the same window is a revision of it: it wins.
                newest_per_window[(bar.symbol, bar.interval, bar.ts)] = plain_decimals(bar)
                newest_ts = max(newest_ts, bar.ts)
            if newest_per_window:
                sink.add_bars(list(newest_per_window.values()), newest_ts)
                counters.written += len(newest_per_window)

    return counters
