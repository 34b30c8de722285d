"""execution_quality's bounds hold when one trading stream runs ahead of the other.

A soak at 3,000 events/s (max_fills 10,000, max_orders 5,000) held 312,000 fills and
116,000 orders after 20 minutes, growing ~25 MB a minute: the fills agent lagged
~5 minutes behind the orders agent, so final orders were forgotten (beyond max_orders)
before their fills came; each late fill then made a placeholder order waiting for a NEW
already gone, and neither it nor its fills (never complete: no arrival) were ever
"finished". The bounds' second tier forgets such unjoined placeholders with their fills,
oldest first, once they have every other value written — and only when the finished
state is not enough.
"""

from __future__ import annotations

from collections import deque
from decimal import Decimal as D

from posttrade.agents.execution.state import FILL_ALL, FILL_ARRIVAL
from posttrade.demo.feed import FeedGenerator, FeedSettings
from posttrade.streams.events import Fill, MarketTrade, Order, Quote

from .test_execution_tracker import NS, T0, Feeder, make_tracker, written

KINDS = {Quote: "quotes", MarketTrade: "trades", Order: "orders", Fill: "fills"}


def run_skewed(max_fills: int, max_orders: int, delay_s: float, minutes: int):
    """The demo feed with the fills stream `delay_s` behind the others; after every
    prune: (fills, orders, placeholders) held."""
    tracker = make_tracker(retention_ns=3600 * NS, history_ns=120 * NS, max_fills=max_fills, max_orders=max_orders)
    feeder = Feeder(tracker)
    generator = FeedGenerator(FeedSettings(rate=200, seed=7), start_ns=T0)
    late: deque[Fill] = deque()
    held = []
    for step in range(minutes * 60 * 10):
        for event in generator.step():
            if isinstance(event, Fill):
                late.append(event)
            else:
                feeder.feed(KINDS[type(event)], event)
        while late and late[0].ts <= generator.now - int(delay_s * NS):
            feeder.feed("fills", late.popleft())
        tracker.resolve_due()
        written(tracker)
        tracker.end_fills_batch()
        if step % 300 == 299:
            tracker.prune()
            placeholders = sum(1 for state in tracker.orders.values() if state.arrival_ts is None)
            held.append((len(tracker.fills), len(tracker.orders), placeholders))
    return tracker, held


def test_fills_far_behind_their_orders_stay_within_the_bounds():
    # ~27 fills and ~12 orders a second; orders are forgotten ~12 s after their end, their
    # fills come 60 s late: nearly every fill finds its order gone.
    minutes = 6
    tracker, held = run_skewed(max_fills=300, max_orders=150, delay_s=60, minutes=minutes)
    assert tracker.stats.fills > 8000  # ~27 a second went through
    assert tracker.stats.pruned_unjoined_orders > 1000 and tracker.stats.pruned_unjoined_fills > 1000
    # Live: fills still waiting for their +60 s markout (rate x ~65 s), and their placeholders.
    live = tracker.stats.fills / (minutes * 60) * 70
    for fills, orders, placeholders in held:
        assert fills <= 300 + live and orders <= 150 + live and placeholders <= live, held
    # Not growing: the last third holds no more than the highest of the middle third
    # (before, the placeholders and their fills grew for retention_s: an hour).
    third = len(held) // 3
    for i in range(3):
        assert max(h[i] for h in held[2 * third :]) <= 1.25 * max(h[i] for h in held[third : 2 * third]) + 10, (i, held)
    # The changelog tables forget the same keys (a restart loads no more).
    assert set(tracker.tables.fills.keys()) <= set(tracker.fills)
    assert set(tracker.tables.orders.keys()) <= set(tracker.orders)


def test_unjoined_placeholders_go_only_after_the_finished_state_and_once_settled():
    tracker = make_tracker(retention_ns=3600 * NS, max_fills=1, max_orders=1)
    feeder = Feeder(tracker)
    feeder.feed("quotes", Quote(ts=T0, symbol="XYZ", bid=D("99"), ask=D("101")))
    # A finished order with one fill, and a fill whose order's NEW never comes.
    feeder.feed("orders", Order(ts=T0 + NS, order_id="DONE", account="A", symbol="XYZ", side="BUY", qty=D("1")))
    feeder.feed("fills", Fill(ts=T0 + 2 * NS, fill_id="F-DONE", order_id="DONE", account="A", symbol="XYZ",
                              side="BUY", qty=D("1"), price=D("100")))
    feeder.feed("orders", Order(ts=T0 + 3 * NS, order_id="DONE", account="A", symbol="XYZ", side="BUY", qty=D("1"),
                                status="FILLED"))
    feeder.feed("fills", Fill(ts=T0 + 10 * NS, fill_id="F-LOST", order_id="LOST", account="A", symbol="XYZ",
                              side="BUY", qty=D("1"), price=D("100")))
    # Market data up to T0+63 s: DONE and F-DONE are decided, F-LOST's +60 s markout is not.
    feeder.feed("trades", MarketTrade(ts=T0 + 63 * NS, symbol="XYZ", price=D("100"), size=D("5")))
    feeder.feed("quotes", Quote(ts=T0 + 63 * NS, symbol="XYZ", bid=D("99"), ask=D("101")))
    tracker.resolve_due()
    written(tracker)
    assert tracker.orders["DONE"].final and not tracker.orders["LOST"].known
    tracker.prune()  # F-LOST still waits for a markout: only the finished order goes
    assert set(tracker.orders) == {"LOST"} and set(tracker.fills) == {"F-LOST"}
    assert tracker.stats.pruned_unjoined_orders == 0

    feeder.feed("quotes", Quote(ts=T0 + 120 * NS, symbol="XYZ", bid=D("99"), ask=D("101")))
    tracker.resolve_due()
    tracker.prune()  # not written yet: it stays
    assert set(tracker.orders) == {"LOST"}
    assert tracker.fills["F-LOST"].resolved == FILL_ALL & ~FILL_ARRIVAL  # all but the arrival
    written(tracker)
    tracker.prune()  # within both bounds (1 fill, 1 order): nothing goes
    assert set(tracker.orders) == {"LOST"}
    tracker.settings.max_fills = tracker.settings.max_orders = 0  # 0: no bound
    tracker.prune()
    assert set(tracker.orders) == {"LOST"}
    tracker.settings.max_fills = tracker.settings.max_orders = 1
    # Another unjoined placeholder, newer: the older one goes (both over the bounds).
    feeder.feed("fills", Fill(ts=T0 + 130 * NS, fill_id="F-LOST2", order_id="LOST2", account="A", symbol="XYZ",
                              side="BUY", qty=D("1"), price=D("100")))
    feeder.feed("quotes", Quote(ts=T0 + 300 * NS, symbol="XYZ", bid=D("99"), ask=D("101")))
    tracker.resolve_due()
    written(tracker)
    tracker.prune()
    assert set(tracker.orders) == {"LOST2"} and set(tracker.fills) == {"F-LOST2"}
    assert (tracker.stats.pruned_unjoined_orders, tracker.stats.pruned_unjoined_fills) == (1, 1)
    assert "LOST" not in tracker.tables.orders and "F-LOST" not in tracker.tables.fills
