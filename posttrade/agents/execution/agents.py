"""The execution-quality agents: one per input stream, each folding its batches into the
one `ExecutionTracker`; what a (re)start does before they run; which symbols moved since
open orders were last re-marked."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ...stores.clickhouse.execution import unstorable_reason
from ...streams import subjects
from .tracker import ExecutionTracker

if TYPE_CHECKING:
    from ...app import App
    from ...stores.clickhouse.execution_sink import ExecutionSink
    from ...streams.channel import Channel
    from ...streams.stream import Stream


@dataclass
class ExecutionChannels:
    orders: Channel
    fills: Channel
    quotes: Channel
    market_trades: Channel

    @classmethod
    def of(cls, app: App) -> ExecutionChannels:
        """The four streams of the bus layout (in the app's namespace)."""
        return cls(
            orders=subjects.orders(app),
            fills=subjects.fills(app),
            quotes=subjects.quotes(app),
            market_trades=subjects.market_trades(app),
        )


def register_agents(
    app: App,
    tracker: ExecutionTracker,
    sink: ExecutionSink,
    channels: ExecutionChannels,
    *,
    batch_size: int,
    within_s: float,
    market_within_s: float | None = None,
) -> None:
    """One agent per input stream; each folds a batch into the tracker and wakes the
    waiters, and asking for the next batch commits the tables and acknowledges.

    Orders and fills: the batch's rows are written to ClickHouse and persisted before
    the commit (`sink.flush`): one insert per table per batch, or fewer when a write
    takes the changes of concurrent batches too. `within_s` is how long they gather a
    batch. The sink holds the changes of all four agents (one state), so it is not
    declared with any one of them (the runtime would discard another agent's changes
    with a crashed one's): these two flush it themselves, last thing in the batch.
    Quotes and trades: their book and tape entries are persisted at the end of the
    batch; the rows they change follow with the sink's writer (see the package
    docstring). `market_within_s` (default `within_s`) keeps the join current on quiet
    streams.
    """
    market_within_s = within_s if market_within_s is None else market_within_s

    async def storable(stream: Stream, records) -> list:
        kept = []
        for record in records:
            reason = unstorable_reason(record.value)
            if reason is not None:
                await stream.dead_letter(record.delivery, reason)
            else:
                kept.append(record)
        return kept

    @app.agent(channels.orders, name="orders")
    async def consume_orders(stream: Stream) -> None:
        async for records in stream.take_events(batch_size, within_s):
            replayed_up_to = tracker.replayed_up_to.get("orders", 0)
            for record in await storable(stream, records):
                tracker.on_order(record.value, record.seq <= replayed_up_to)
            tracker.resolve_due()
            await sink.flush(stream)

    @app.agent(channels.fills, name="fills")
    async def consume_fills(stream: Stream) -> None:
        async for records in stream.take_events(batch_size, within_s):
            replayed_up_to = tracker.replayed_up_to.get("fills", 0)
            records = await storable(stream, records)
            # Whether the fill_ids memory cannot place came before: one ledger read per batch.
            unknown = tracker.unknown_ids(record.value for record in records)
            if unknown:
                tracker.recorded.update(await sink.look_up(unknown, stream))
            for record in records:
                tracker.on_fill(record.value, record.seq, record.seq <= replayed_up_to)
            tracker.resolve_due()
            await sink.flush(stream)
            tracker.end_fills_batch()

    @app.agent(channels.quotes, name="quotes")
    async def consume_quotes(stream: Stream) -> None:
        async for records in stream.take_events(batch_size, market_within_s):
            for record in records:
                tracker.on_quote(record.value, record.seq)
            tracker.resolve_due()
            await sink.after_market_batch(stream)

    @app.agent(channels.market_trades, name="market_trades")
    async def consume_market_trades(stream: Stream) -> None:
        async for records in stream.take_events(batch_size, market_within_s):
            for record in records:
                tracker.on_trade(record.value, record.seq)
            tracker.resolve_due()
            await sink.after_market_batch(stream)


async def start_tracker(app: App, tracker: ExecutionTracker, channels: ExecutionChannels) -> None:
    """What a (re)start does before the agents run: load the state the tables kept,
    note where the trading streams end (events up to there may be redeliveries whose
    rows a previous process wrote: compared before they are written), rebuild the
    market-data history, then the waiting heaps. Nothing is rewritten as it was."""
    tracker.load()
    for kind, channel in (("orders", channels.orders), ("fills", channels.fills)):
        tracker.replayed_up_to[kind] = (await app.transport.stream_state(channel.stream.name)).last_seq
    await tracker.rebuild_history(app, channels.quotes, channels.market_trades)
    tracker.reevaluate_all()


@dataclass
class MarkTracker:
    """Which symbols' latest mid or tape moved since open orders were last re-marked."""

    quote_marks: dict[str, int] = field(default_factory=dict)
    trade_marks: dict[str, int] = field(default_factory=dict)

    def moved(self, tracker: ExecutionTracker) -> set[str]:
        moved = set()
        for series, marks in ((tracker.quotes, self.quote_marks), (tracker.trades, self.trade_marks)):
            for symbol in series.symbols():
                watermark = series.watermark_of(symbol)
                if marks.get(symbol) != watermark:
                    marks[symbol] = watermark
                    moved.add(symbol)
        return moved
