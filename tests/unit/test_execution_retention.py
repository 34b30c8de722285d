"""execution_quality's state stays bounded on good input (issue 13, part B).

What the tracker holds after `retention_s` grows with the rate (about 50 fills and 22
orders a second at the demo's 300 events/s: 180,000 fills and 80,000 orders, ~300 MB,
after the default hour). `execution.max_fills` / `max_orders` bound it whatever the
rate: beyond them the oldest *finished* state goes first (an order with its
executions), and nothing unfinished is ever cut short.
"""

from __future__ import annotations

from decimal import Decimal as D

import pytest
from msgspec.structs import replace

from posttrade.agents.execution.tracker import ExecutionTracker
from posttrade.demo.feed import FeedGenerator, FeedSettings
from posttrade.services.execution_quality import ExecutionSection
from posttrade.streams.events import Fill, MarketTrade, Order, Quote

from .test_execution_tracker import NS, T0, Feeder, by_time, example_events, make_tracker, written


def unfinished(tracker: ExecutionTracker) -> tuple[set[str], set[str]]:
    """(fills, orders) a bound may not cut short: an order that has not ended or whose
    values or fills' values are not all decided; a fill not decided, or of such an order."""
    done = {f for f, state in tracker.fills.items() if state.complete or state.busted}
    pending_in = {state.fill.order_id for f, state in tracker.fills.items() if f not in done}
    orders = {o for o, state in tracker.orders.items() if not state.final or o in pending_in}
    fills = {f for f, state in tracker.fills.items() if f not in done or state.fill.order_id in orders}
    return fills, orders


def test_the_demo_feed_holds_at_most_the_bounds_and_stops_growing():
    """Ten times the caps go through; after every prune what is held is within the caps
    (plus what is not finished yet), and the amount held stops growing."""
    max_fills, max_orders = 400, 200
    tracker = make_tracker(retention_ns=3600 * NS, history_ns=30 * NS, max_fills=max_fills, max_orders=max_orders)
    feeder = Feeder(tracker)
    generator = FeedGenerator(FeedSettings(rate=100, seed=13), start_ns=T0)
    held: list[tuple[int, int, int]] = []  # after each prune: fills, orders, history points
    for step in range(8 * 60 * 10):  # 8 minutes of 0.1 s steps
        for event in generator.step():
            kind = {Quote: "quotes", MarketTrade: "trades", Order: "orders", Fill: "fills"}[type(event)]
            feeder.feed(kind, event)
        tracker.resolve_due()
        written(tracker)
        tracker.end_fills_batch()
        if step % 300 == 299:  # every 30 s of event time, as the prune timer
            tracker.prune()
            live_fills, live_orders = unfinished(tracker)
            assert len(tracker.fills) <= max_fills + len(live_fills)
            assert len(tracker.orders) <= max_orders + len(live_orders)
            # The changelog tables forget the same keys (a restart loads no more).
            assert set(tracker.tables.fills.keys()) <= set(tracker.fills)
            assert set(tracker.tables.orders.keys()) <= set(tracker.orders)
            held.append((len(tracker.fills), len(tracker.orders), tracker.quotes.total_points()))
    assert tracker.stats.fills > 10 * max_fills  # far more went through than is ever held
    assert max(h[0] for h in held) < tracker.stats.fills / 4
    assert tracker.stats.pruned_fills_capacity > 0 and tracker.stats.pruned_orders_capacity > 0
    assert len(tracker.aliases) <= len(tracker.fills) and len(tracker.held_fills) <= len(tracker.fills)
    # Not growing: the second half holds no more than the first half's highest.
    half = len(held) // 2
    for i in range(3):
        assert max(h[i] for h in held[half:]) <= 1.1 * max(h[i] for h in held[:half]), (i, held)


def example_order(prefix: str, shift_s: int) -> dict[str, list]:
    """The worked example of docs/execution_quality.md, `shift_s` later, ids prefixed."""
    shift = shift_s * NS
    return {name: [replace(e, ts=e.ts + shift) for e in stream] for name, stream in example_events(prefix=prefix).items()}


def test_the_oldest_finished_order_goes_first_with_its_fills_and_nothing_unfinished_does():
    tracker = make_tracker(retention_ns=3600 * NS, max_fills=3, max_orders=2)
    feeder = Feeder(tracker)
    for stream, event in by_time(example_order("A", 0)) + by_time(example_order("B", 100)):
        feeder.feed(stream, event)
    # An open order (no terminal event) and its fill, older than both.
    tracker.on_order(Order(ts=T0 - 50 * NS, order_id="OPEN", account="ACC1", symbol="XYZ", side="BUY", qty=D("5")))
    tracker.on_fill(Fill(ts=T0 - 49 * NS, fill_id="OPENF", order_id="OPEN", account="ACC1", symbol="XYZ", side="BUY",
                         qty=D("1"), price=D("100")), 99)
    tracker.on_quote(Quote(ts=T0 + 300 * NS, symbol="XYZ", bid=D("1"), ask=D("2")), 98)  # every value decided
    tracker.resolve_due()
    written(tracker)
    assert set(tracker.orders) == {"AO1", "BO1", "OPEN"} and tracker.orders["AO1"].final

    tracker.prune()  # 3 orders held, 2 allowed; 5 fills, 3 allowed: the oldest finished order goes
    assert set(tracker.orders) == {"BO1", "OPEN"}  # the open order is older, but not finished
    assert set(tracker.fills) == {"BF1", "BF2", "OPENF"}
    assert set(tracker.tables.orders.keys()) == {"BO1", "OPEN"}
    assert (tracker.stats.pruned_orders_capacity, tracker.stats.pruned_fills_capacity) == (1, 2)
    tracker.prune()  # within the bounds: nothing more
    assert set(tracker.orders) == {"BO1", "OPEN"}

    tracker.settings.max_orders = 1
    tracker.prune()  # the finished order goes; the open one stays over the bound (it is live)
    assert set(tracker.orders) == {"OPEN"} and set(tracker.fills) == {"OPENF"}


def test_nothing_goes_before_it_is_written_and_0_means_no_bound():
    tracker = make_tracker(retention_ns=3600 * NS, max_fills=2, max_orders=1)
    feeder = Feeder(tracker)
    for stream, event in by_time(example_order("A", 0)) + by_time(example_order("B", 100)):
        feeder.feed(stream, event)
    tracker.on_quote(Quote(ts=T0 + 300 * NS, symbol="XYZ", bid=D("1"), ask=D("2")), 98)
    tracker.resolve_due()
    tracker.prune()  # nothing written yet: nothing may go
    assert set(tracker.orders) == {"AO1", "BO1"}
    written(tracker)
    tracker.prune()
    assert set(tracker.orders) == {"BO1"}

    unbounded = make_tracker(retention_ns=3600 * NS, max_fills=0, max_orders=0)
    feeder = Feeder(unbounded)
    for stream, event in by_time(example_order("A", 0)) + by_time(example_order("B", 100)):
        feeder.feed(stream, event)
    unbounded.resolve_due()
    written(unbounded)
    unbounded.prune()
    assert set(unbounded.orders) == {"AO1", "BO1"}


def test_the_bounds_are_configured_and_checked():
    section = ExecutionSection()
    assert (section.max_fills, section.max_orders) == (50_000, 25_000)
    with pytest.raises(ValueError):
        ExecutionSection(max_fills=-1)
