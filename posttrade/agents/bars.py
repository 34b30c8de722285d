"""Bar agents: bars built from market trades, and bars taken from bar messages.

Built bars use one tumbling windowed table per interval (`bars_1s`, `bars_1m`, ...),
keyed by symbol, holding a `posttrade.core.bars.BarState` per window. Windows are by
event time with a grace period: a trade up to `grace_s` behind the newest trade seen
still lands in its window (and may become its open); an older one is counted in the
table's `late_events` and dropped. Closed windows are removed from the table (their
final bar was already written when their last trade arrived).

Each batch of trades is folded into the windows first, then every window the batch
changed is written whole, in one call, to a `BarSink` (the hot cache's Valkey). The
write happens before the runtime commits the batch, so nothing is acknowledged before
the cache has it. A redelivered trade is skipped by the window's per-key sequence, and
the sink receives whole bars (never increments), so replays cannot double a bar.

Bar messages are written as they come, except for intervals this service builds from
trades itself: two writers of one window would overwrite each other, so for those
intervals the built bar is the one kept, and the messages are counted and skipped.
A bar message whose interval cannot be read (not `<n>s|m|h|d`) can never be served,
so it is dead-lettered.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol, TypeVar

from ..app import App
from ..core.bars import SECONDS_PER_DAY, BarState, empty_bar_state, interval_seconds, plain_decimals
from ..streams.channel import Channel
from ..streams.events import Bar
from ..streams.stream import EventRecord, Stream
from .retry import until_done
from ..tables.windowed import WindowedTable

log = logging.getLogger(__name__)

T = TypeVar("T")



class SinkUnavailable(ConnectionError):
    """The store behind a sink is away for now; the same write can be retried."""


class BarSink(Protocol):
    async def write_bars(self, bars: Sequence[Bar], newest_event_ts: int) -> None:
        """Store whole bars (replacing any bar of the same window); raise
        SinkUnavailable when the store is unreachable. `newest_event_ts` is the newest
        input event time the bars include (for freshness)."""


RETRY_FIRST_DELAY_S = 0.1  # doubling up to 10 s while Valkey is away


async def write_until_done(stream: Stream, write: Callable[[], Awaitable[T]], *, what: str) -> T:
    """Run `write` until it succeeds, backing off while Valkey is unavailable (the batch
    stays unacknowledged). Other errors propagate: the runtime restarts the agent and
    eventually dead-letters an event that keeps failing."""
    return await until_done(
        stream,
        write,
        what=what,
        permanent=lambda exc: not isinstance(exc, SinkUnavailable),
        first_delay=RETRY_FIRST_DELAY_S,
    )


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

    @app.agent(trades, name=name)
    async def build_bars(stream: Stream) -> None:
        async for records in stream.take_events(max_events, within_s):
            bars = builder.fold(stream, records)
            if bars:
                newest = builder.newest_trade_ts
                await write_until_done(stream, lambda: sink.write_bars(bars, newest), what="built bars")


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

    @app.agent(bars, name=name)
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
                batch = list(newest_per_window.values())
                await write_until_done(stream, lambda: sink.write_bars(batch, newest_ts), what="bar messages")
                counters.written += len(batch)

    return counters
