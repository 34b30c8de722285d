"""The execution-quality join (posttrade.agents.execution) without servers.

The worked example of docs/execution_quality.md is fed through the tracker in many
orders (fills before orders, quotes after fills, ...): the rows must always be the
numbers the document prints. Then: late and duplicate events, quiet symbols, retention,
and the agents on the in-memory transport across a restart and a redelivery, including
a crash that lost changelog entries whose rows ClickHouse already has (no row may
become less settled).
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field
from decimal import Decimal as D
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from posttrade.agents.execution.agents import ExecutionChannels, register_agents, start_tracker
from posttrade.agents.execution.state import (
    FILL_ALL,
    MINUTE_NS,
    BookEntry,
    FillState,
    OrderState,
    SeenFill,
    TapeEntry,
    WaitingAmendment,
    covers,
)
from posttrade.agents.execution.tracker import ExecutionTables, ExecutionTracker, TrackerSettings, declare_tables
from posttrade.app import App
from posttrade.sinks import RetryPolicy
from posttrade.stores.clickhouse import ClickHouseError
from posttrade.stores.clickhouse.execution import (
    AMENDED,
    FILL_COLUMNS,
    FILL_IDS_TABLE,
    FILLS_TABLE,
    ORDER_COLUMNS,
    ORDERS_TABLE,
    SETTLED,
    arrow_table,
    fill_row,
    order_row,
    row_version,
    unstorable_reason,
)
from posttrade.stores.clickhouse.execution_sink import ExecutionSink
from posttrade.streams.events import Fill, MarketTrade, Order, Quote, encode
from posttrade.streams.memory import MemoryTransport
from posttrade.tables.table import Table

NS = 1_000_000_000
MS = 1_000_000
T0 = 1_704_205_800_000_000_000  # 2024-01-02 14:30:00 UTC


# -- the worked example (docs/execution_quality.md) ----------------------------------------


def example_events(symbol: str = "XYZ", account: str = "ACC1", prefix: str = "") -> dict[str, list]:
    """The document's worked example, per stream, in stream order."""
    quotes = [
        Quote(ts=T0 + ms * MS, symbol=symbol, bid=D(bid), ask=D(ask))
        for ms, bid, ask in [
            (-1000, "99.98", "100.02"),
            (400, "100.00", "100.04"),
            (1200, "100.02", "100.06"),
            (2000, "100.04", "100.08"),
            (5000, "100.06", "100.10"),
            (10000, "100.10", "100.14"),
            (61000, "100.00", "100.04"),
            (70000, "99.96", "100.00"),
        ]
    ]
    trades = [
        MarketTrade(ts=T0 + ms * MS, symbol=symbol, price=D(price), size=D(size))
        for ms, price, size in [
            (-500, "99.99", "500"),
            (500, "100.05", "600"),
            (1500, "100.02", "400"),
            (2500, "100.10", "200"),
            (20000, "100.12", "800"),
            (40000, "100.00", "100"),
        ]
    ]
    order = dict(order_id=f"{prefix}O1", account=account, symbol=symbol, side="BUY", qty=D("1000"),
                 order_type="LIMIT", limit_price=D("100.10"), venue="XNAS")
    orders = [Order(ts=T0, status="NEW", **order), Order(ts=T0 + 30 * NS, status="CANCELED", **order)]
    fills = [
        Fill(ts=T0 + 500 * MS, fill_id=f"{prefix}F1", order_id=f"{prefix}O1", account=account, symbol=symbol,
             side="BUY", qty=D("600"), price=D("100.05"), fee=D("3.00"), venue="XNAS", liquidity="TAKER"),
        Fill(ts=T0 + 2500 * MS, fill_id=f"{prefix}F2", order_id=f"{prefix}O1", account=account, symbol=symbol,
             side="BUY", qty=D("200"), price=D("100.10"), fee=D("1.00"), venue="XNAS", liquidity="TAKER"),
    ]
    return {"quotes": quotes, "trades": trades, "orders": orders, "fills": fills}


EXPECTED_FILLS = {
    "F1": dict(ts=T0 + 500 * MS, arrival_ts=T0, arrival_mid=D("100.00"), arrival_notional=D("60000"),
               slippage_bps=D("5"), slippage_cost=D("30"), mid_at_fill=D("100.02"),
               effective_spread_bps=D("5.99880024"), mid_1s=D("100.04"), mid_5s=D("100.08"), mid_60s=D("100.12"),
               markout_1s_bps=D("-0.99950025"), markout_5s_bps=D("2.99850075"), markout_60s_bps=D("6.99650175"),
               notional=D("60030"), complete=1),
    "F2": dict(ts=T0 + 2500 * MS, arrival_ts=T0, arrival_mid=D("100.00"), arrival_notional=D("20000"),
               slippage_bps=D("10"), slippage_cost=D("20"), mid_at_fill=D("100.06"),
               effective_spread_bps=D("7.99520288"), mid_1s=D("100.06"), mid_5s=D("100.08"), mid_60s=D("100.02"),
               markout_1s_bps=D("-3.99600400"), markout_5s_bps=D("-1.99800200"), markout_60s_bps=D("-7.99200799"),
               notional=D("20020"), complete=1),
}
EXPECTED_ORDER = dict(
    status="CANCELED", qty=D("1000"), arrival_ts=T0, end_ts=T0 + 30 * NS, arrival_mid=D("100"), fills=2,
    filled_qty=D("800"), unfilled_qty=D("200"), fill_ratio=D("0.8"), filled_notional=D("80050"), fees=D("4"),
    avg_fill_price=D("100.0625"), first_fill_ts=T0 + 500 * MS, last_fill_ts=T0 + 2500 * MS,
    time_to_first_fill_ns=500 * MS, time_to_last_fill_ns=2500 * MS, market_vwap=D("100.077"),
    market_volume=D("2000"), vwap_slippage_bps=D("-1.44888436"), unfilled_price=D("100.12"),
    unfilled_price_ts=T0 + 30 * NS, benchmark_notional=D("100000"), execution_cost=D("50"),
    opportunity_cost=D("24"), implementation_shortfall=D("78"), implementation_shortfall_bps=D("7.8"), is_final=1,
)


# -- the worked example, amended (docs/execution_quality.md, "Corrections and busts, worked") ---


def amended_events(symbol: str = "XYZ", account: str = "ACC1", prefix: str = "") -> dict[str, list]:
    """The worked example with, on the fills stream: a bust before the execution it
    removes, a resend of F1 with another price, a correction of F2 and a correction of
    that correction, and an opening. The rows must come out as EXPECTED_AMENDED_*."""
    events = example_events(symbol, account, prefix)
    f1, f2 = events["fills"]
    common = dict(account=account, symbol=symbol)
    f3 = Fill(ts=T0 + 3000 * MS, fill_id=f"{prefix}F3", order_id=f"{prefix}O1", side="BUY", qty=D("100"),
              price=D("100.12"), fee=D("0.50"), venue="XNAS", liquidity="TAKER", **common)
    bust = Fill(ts=T0 + 35 * NS, fill_id=f"{prefix}B3", exec_type="BUST", ref_fill_id=f"{prefix}F3", **common)
    resend = msgspec_replace(f1, price=D("99.00"))
    correction = Fill(ts=T0 + 45 * NS, fill_id=f"{prefix}C2", exec_type="CORRECT", ref_fill_id=f"{prefix}F2",
                      side="BUY", qty=D("150"), price=D("100.09"), fee=D("0.75"), **common)
    again = Fill(ts=T0 + 50 * NS, fill_id=f"{prefix}C2b", exec_type="CORRECT", ref_fill_id=f"{prefix}C2",
                 side="BUY", qty=D("150"), price=D("100.08"), fee=D("0.75"), **common)
    opening = Fill(ts=T0 - 60 * NS, fill_id=f"{prefix}OP1", exec_type="OPENING", side="BUY", qty=D("500"),
                   price=D("95"), **common)
    events["fills"] = [f1, bust, f2, resend, correction, f3, again, opening]
    return events


EXPECTED_AMENDED_FILLS = {
    "F1": {**EXPECTED_FILLS["F1"], "amendments": 0, "busted": 0},
    "F2": dict(ts=T0 + 2500 * MS, qty=D("150"), price=D("100.08"), fee=D("0.75"), notional=D("15012"),
               arrival_ts=T0, arrival_mid=D("100.00"), arrival_notional=D("15000"), slippage_bps=D("8"),
               slippage_cost=D("12"), mid_at_fill=D("100.06"), effective_spread_bps=D("3.99760144"),
               mid_1s=D("100.06"), mid_5s=D("100.08"), mid_60s=D("100.02"), markout_1s_bps=D("-1.99840128"),
               markout_5s_bps=D("0"), markout_60s_bps=D("-5.99520384"), complete=1, amendments=2, busted=0),
    "F3": dict(ts=T0 + 3000 * MS, qty=D("100"), price=D("100.12"), amendments=1, busted=1),
}
EXPECTED_AMENDED_ORDER = dict(
    EXPECTED_ORDER, fills=2, filled_qty=D("750"), unfilled_qty=D("250"), fill_ratio=D("0.75"),
    filled_notional=D("75042"), fees=D("3.75"), avg_fill_price=D("100.056"), last_fill_ts=T0 + 2500 * MS,
    time_to_last_fill_ns=2500 * MS, vwap_slippage_bps=D("-2.09838424"), execution_cost=D("42"),
    opportunity_cost=D("30"), implementation_shortfall=D("75.75"), implementation_shortfall_bps=D("7.575"),
    amendments=3,
)


# -- helpers ---------------------------------------------------------------------------------


def make_tracker(**settings: Any) -> ExecutionTracker:
    tables = ExecutionTables(
        fills=Table("fills", bucket="t-fills", value_type=FillState),
        orders=Table("orders", bucket="t-orders", value_type=OrderState),
        quote_book=Table("quote_book", bucket="t-book", value_type=BookEntry),
        tape=Table("tape", bucket="t-tape", value_type=TapeEntry),
        amendments=Table("amendments", bucket="t-amendments", value_type=WaitingAmendment),
    )
    return ExecutionTracker(tables, TrackerSettings(**settings))


class Feeder:
    """Feeds events to a tracker as the agents would, numbering each stream's sequence."""

    def __init__(self, tracker: ExecutionTracker):
        self.tracker = tracker
        self.seqs = {"quotes": 0, "trades": 0, "fills": 0}

    def feed(self, stream: str, event) -> int:
        """Hands the event over; returns its stream sequence."""
        t = self.tracker
        if stream == "orders":
            t.on_order(event)
            return 0
        self.seqs[stream] += 1
        seq = self.seqs[stream]
        if stream == "quotes":
            t.on_quote(event, seq)
        elif stream == "trades":
            t.on_trade(event, seq)
        else:
            t.on_fill(event, seq)
        return seq


def written(tracker: ExecutionTracker) -> None:
    """As if the writer had written every changed row."""
    tracker.persist(tracker.take_changes())


def fill_dict(tracker: ExecutionTracker, fill_id: str) -> dict:
    row = fill_row(tracker, tracker.fills[fill_id], 1)
    return dict(zip((c.name for c in FILL_COLUMNS), row))


def order_dict(tracker: ExecutionTracker, order_id: str) -> dict | None:
    row = order_row(tracker, tracker.orders[order_id], 1)
    return None if row is None else dict(zip((c.name for c in ORDER_COLUMNS), row))


def assert_example_rows(tracker: ExecutionTracker, prefix: str = "") -> None:
    for fill_id, expected in EXPECTED_FILLS.items():
        row = fill_dict(tracker, prefix + fill_id)
        assert {k: row[k] for k in expected} == expected, fill_id
    row = order_dict(tracker, prefix + "O1")
    assert row is not None
    assert {k: row[k] for k in EXPECTED_ORDER} == EXPECTED_ORDER


def assert_amended_rows(tracker: ExecutionTracker, prefix: str = "") -> None:
    for fill_id, expected in EXPECTED_AMENDED_FILLS.items():
        row = fill_dict(tracker, prefix + fill_id)
        assert {k: row[k] for k in expected} == expected, fill_id
    row = order_dict(tracker, prefix + "O1")
    assert {k: row[k] for k in EXPECTED_AMENDED_ORDER} == EXPECTED_AMENDED_ORDER
    assert tracker.orders[prefix + "O1"].fill_ids == (prefix + "F1", prefix + "F2")
    assert (tracker.stats.fills, tracker.stats.corrections, tracker.stats.busts) == (3, 2, 1)
    assert tracker.stats.skipped_fills == {("fill", "duplicate"): 1, ("opening", "opening"): 1}
    assert not tracker.waiting


def by_time(events: dict[str, list]) -> list[tuple[str, Any]]:
    merged = [(e.ts, name, e) for name, stream in events.items() for e in stream]
    merged.sort(key=lambda x: x[0])
    return [(name, e) for _, name, e in merged]


# -- the worked example in many orders ---------------------------------------------------------


def test_worked_example_in_event_time_order():
    tracker = make_tracker()
    feeder = Feeder(tracker)
    for stream, event in by_time(example_events()):
        feeder.feed(stream, event)
        tracker.resolve_due()
    assert_example_rows(tracker)
    assert tracker.stats.unavailable_mids == 0
    assert len(tracker.quote_waits.by_symbol) == 0 and len(tracker.trade_waits.by_symbol) == 0


@pytest.mark.parametrize(
    "stream_order",
    [
        ("fills", "orders", "trades", "quotes"),  # fills before their order, market data last
        ("quotes", "trades", "orders", "fills"),  # market data far ahead
        ("orders", "quotes", "fills", "trades"),
        ("trades", "fills", "quotes", "orders"),
    ],
)
def test_worked_example_whole_streams_one_after_another(stream_order):
    tracker = make_tracker()
    feeder = Feeder(tracker)
    events = example_events()
    for stream in stream_order:
        for event in events[stream]:
            feeder.feed(stream, event)
        tracker.resolve_due()
    assert_example_rows(tracker)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.randoms(use_true_random=False))
def test_worked_example_any_interleaving(rng: random.Random):
    """Any interleaving that keeps each stream's own order, with batch ends anywhere."""
    events = example_events()
    queues = {name: list(stream) for name, stream in events.items()}
    tracker = make_tracker()
    feeder = Feeder(tracker)
    while any(queues.values()):
        name = rng.choice([n for n, q in queues.items() if q])
        feeder.feed(name, queues[name].pop(0))
        if rng.random() < 0.3:
            tracker.resolve_due()
    tracker.resolve_due()
    assert_example_rows(tracker)


# -- corrections, busts, resends and openings ----------------------------------------------------


@pytest.mark.parametrize(
    "stream_order",
    [
        ("fills", "orders", "trades", "quotes"),
        ("quotes", "trades", "orders", "fills"),
        ("orders", "quotes", "fills", "trades"),
    ],
)
def test_amended_example_whole_streams_one_after_another(stream_order):
    tracker = make_tracker()
    feeder = Feeder(tracker)
    events = amended_events()
    for stream in stream_order:
        for event in events[stream]:
            feeder.feed(stream, event)
        tracker.resolve_due()
    assert_amended_rows(tracker)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.randoms(use_true_random=False))
def test_amended_example_any_interleaving(rng: random.Random):
    """The fills stream keeps its own order (amendments apply in it); the other streams
    interleave with it anyhow, with batch ends anywhere."""
    queues = {name: list(stream) for name, stream in amended_events().items()}
    tracker = make_tracker()
    feeder = Feeder(tracker)
    while any(queues.values()):
        name = rng.choice([n for n, q in queues.items() if q])
        feeder.feed(name, queues[name].pop(0))
        if rng.random() < 0.3:
            tracker.resolve_due()
    tracker.resolve_due()
    assert_amended_rows(tracker)


def test_a_bust_before_its_execution_waits_in_the_table_and_survives_a_restart():
    tracker = make_tracker()
    events = amended_events()
    bust, f3 = events["fills"][1], events["fills"][5]
    tracker.on_fill(bust, 2)
    assert set(tracker.waiting) == {"B3"} and not tracker.fills
    written(tracker)
    assert tracker.tables.amendments["B3"] == WaitingAmendment(fill=bust, seq=2)
    assert not tracker.changed_seen and "B3" not in tracker.tables.fills  # decided only once applied

    restarted = ExecutionTracker(tracker.tables)
    restarted.load()
    assert set(restarted.waiting) == {"B3"}
    restarted.on_fill(bust, 2)  # redelivered: still the one waiting
    assert restarted.stats.skipped_fills == {("bust", "redelivered"): 1}
    restarted.on_fill(f3, 6)
    state = restarted.fills["F3"]
    assert state.busted and [a.fill_id for a in state.amendments] == ["B3"] and not restarted.waiting
    assert restarted.orders["O1"].fill_ids == () and restarted.orders["O1"].filled_qty == 0
    written(restarted)
    assert "B3" not in restarted.tables.amendments and restarted.tables.fills["F3"].busted
    assert {k: (v.seq, v.outcome) for k, v in restarted.recent.items()} == {"F3": (6, "applied"), "B3": (2, "applied")}


def test_a_waiting_amendment_already_applied_when_the_changelog_was_cut_is_dropped_at_load():
    """A crash between the flushes of the fills and the amendments table: the execution
    has the bust, and the bust is still waiting. Loading applies nothing twice."""
    tracker = make_tracker()
    events = amended_events()
    tracker.on_fill(events["fills"][1], 2)
    written(tracker)
    tracker.on_fill(events["fills"][5], 6)
    taken = tracker.take_changes()
    tracker.tables.fills["F3"] = taken.fills["F3"]  # the fills flush made it, the amendments one did not
    restarted = ExecutionTracker(tracker.tables)
    restarted.load()
    assert not restarted.waiting and restarted.fills["F3"].busted
    written(restarted)
    assert "B3" not in restarted.tables.amendments


def test_a_waiting_amendment_whose_execution_is_held_is_applied_at_load():
    tracker = make_tracker()
    events = amended_events()
    f2, correction = events["fills"][2], events["fills"][4]
    tracker.on_fill(f2, 3)
    written(tracker)
    tracker.tables.amendments["C2"] = WaitingAmendment(fill=correction, seq=5)  # its release was lost
    restarted = ExecutionTracker(tracker.tables)
    restarted.load()
    assert restarted.fills["F2"].fill.price == D("100.09") and not restarted.waiting
    assert restarted.orders["O1"].filled_qty == D("150") and restarted.orders["O1"].revision == 1


def test_a_correction_can_move_the_execution_to_another_order():
    tracker = make_tracker()
    feeder = Feeder(tracker)
    events = example_events()
    for stream, event in by_time(events):
        feeder.feed(stream, event)
    tracker.resolve_due()
    f2 = events["fills"][1]
    moved = Fill(ts=T0 + 50 * NS, fill_id="C2", exec_type="CORRECT", ref_fill_id="F2", account="ACC1",
                 symbol="XYZ", side="BUY", qty=f2.qty, price=f2.price, fee=f2.fee, order_id="O2")
    feeder.feed("fills", moved)
    o1 = order_dict(tracker, "O1")
    assert (o1["fills"], o1["filled_qty"], o1["last_fill_ts"], o1["amendments"]) == (1, D("600"), T0 + 500 * MS, 1)
    row = fill_dict(tracker, "F2")
    assert row["order_id"] == "O2" and row["arrival_mid"] is None and row["slippage_bps"] is None
    assert row["complete"] == 0 and row["venue"] == "XNAS"  # the venue stays the original's: not given
    assert order_dict(tracker, "O2") is None  # a placeholder until its NEW
    tracker.on_order(Order(ts=T0 + NS, order_id="O2", account="ACC1", symbol="XYZ", side="BUY", qty=D("200")))
    tracker.resolve_due()
    row = fill_dict(tracker, "F2")
    # The arrival is now O2's: the mid at T0+1 s is 100.02 (the quote of +0.4 s).
    assert (row["arrival_ts"], row["arrival_mid"], row["slippage_bps"], row["complete"]) == (
        T0 + NS, D("100.02"), D("7.99840032"), 1)
    o2 = order_dict(tracker, "O2")
    assert (o2["fills"], o2["fill_ratio"], o2["amendments"]) == (1, D("1"), 1)


def test_amendments_that_change_nothing_are_counted():
    tracker = make_tracker()
    feeder = Feeder(tracker)
    events = amended_events()
    for event in events["fills"]:
        feeder.feed("fills", event)
    common = dict(account="ACC1", symbol="XYZ", side="BUY", qty=D("1"), price=D("100"), fee=D("0"))
    feeder.feed("fills", Fill(ts=T0, fill_id="X1", exec_type="CORRECT", ref_fill_id="B3", **common))  # F3 busted
    feeder.feed("fills", Fill(ts=T0, fill_id="X2", exec_type="BUST", ref_fill_id="OP1", account="ACC1",
                              symbol="XYZ"))
    feeder.feed("fills", Fill(ts=T0, fill_id="X3", exec_type="CORRECT", ref_fill_id="F1",
                              **{**common, "account": "ACC2"}))
    feeder.feed("fills", Fill(ts=T0, fill_id="X4", exec_type="BUST", ref_fill_id="X3", account="ACC1",
                              symbol="XYZ"))  # through an ignored amendment to F1 itself
    feeder.feed("fills", events["fills"][4])  # C2 resent
    assert tracker.stats.skipped_fills == {
        ("fill", "duplicate"): 1, ("opening", "opening"): 1, ("correction", "amends_busted"): 1,
        ("bust", "amends_opening"): 1, ("correction", "mismatch"): 1, ("correction", "duplicate"): 1,
    }
    assert tracker.fills["F1"].busted and tracker.stats.busts == 2
    assert tracker.fills["F2"].fill.price == D("100.08")  # the resent C2 did not undo C2b
    assert {k: (v.original_fill_id, v.outcome) for k, v in tracker.changed_seen.items() if k.startswith("X")} == {
        "X1": ("F3", "amends_busted"), "X2": ("OP1", "amends_opening"), "X3": ("F1", "mismatch"),
        "X4": ("F1", "applied"),
    }


def test_the_ledger_answers_for_fill_ids_memory_no_longer_has():
    events = amended_events()
    f1, f2 = events["fills"][0], events["fills"][2]
    ledger = {"F1": SeenFill(seq=1, exec_type="NEW", original_fill_id="F1", outcome="applied"),
              "C2": SeenFill(seq=5, exec_type="CORRECT", original_fill_id="F2", outcome="applied"),
              "OP1": SeenFill(seq=8, exec_type="OPENING", original_fill_id="OP1", outcome="opening")}
    tracker = make_tracker()
    assert tracker.unknown_ids([f1, events["fills"][6]]) == {"F1", "C2b", "C2"}
    tracker.recorded.update(ledger)
    tracker.on_fill(msgspec_replace(f1, price=D("1")), 40)  # a resend of a forgotten execution
    tracker.on_fill(Fill(ts=T0, fill_id="L1", exec_type="BUST", ref_fill_id="C2", account="ACC1", symbol="XYZ"), 41)
    tracker.on_fill(Fill(ts=T0, fill_id="L2", exec_type="BUST", ref_fill_id="OP1", account="ACC1", symbol="XYZ"), 42)
    assert not tracker.fills and not tracker.orders
    assert tracker.stats.skipped_fills == {("fill", "duplicate"): 1, ("bust", "amends_forgotten"): 1,
                                           ("bust", "amends_opening"): 1}
    # The ledger having this very message: its state was lost in a crash, it is handled again.
    tracker.on_fill(f1, 1)
    assert "F1" in tracker.fills and tracker.stats.fills == 1
    # An amendment naming an execution the ledger places further on in the stream: a
    # redelivery after a crash, the execution comes again next.
    tracker.recorded["F2"] = SeenFill(seq=3, exec_type="NEW", original_fill_id="F2", outcome="applied")
    tracker.on_fill(Fill(ts=T0, fill_id="E1", exec_type="BUST", ref_fill_id="F2", account="ACC1", symbol="XYZ"), 2)
    assert set(tracker.waiting) == {"E1"}
    tracker.on_fill(f2, 3)
    assert tracker.fills["F2"].busted and not tracker.waiting
    tracker.end_fills_batch()
    assert not tracker.recorded and not tracker.recent


def test_a_redelivered_amendment_repairs_an_order_the_changelog_cut_off():
    tracker = make_tracker()
    events = amended_events()
    for seq, fill in enumerate(events["fills"][:3], start=1):  # F1, B3 (waits), F2
        tracker.on_fill(fill, seq)
    before = tracker.orders["O1"]
    tracker.on_fill(events["fills"][4], 5)  # C2
    assert tracker.orders["O1"].filled_qty == D("750")
    tracker.orders["O1"] = before  # the orders table lost the recomputation
    tracker.on_fill(events["fills"][4], 5)  # redelivered
    assert tracker.orders["O1"].filled_qty == D("750") and tracker.orders["O1"].amendment_ids == ("C2",)
    assert tracker.stats.skipped_fills == {("correction", "redelivered"): 1}


def test_amended_rows_outrank_every_row_before_the_amendment():
    later = 2_000_000_000_000_000_000
    ranks = [
        row_version(later, 0, False), row_version(later, 0, True),  # as first reported
        row_version(later - 10**9, 1, False), row_version(later - 10**9, 1, True),  # once amended
        row_version(later - 2 * 10**9, 2, False),  # twice, even if written with an older clock
    ]
    assert ranks == sorted(ranks) and len(set(ranks)) == len(ranks)
    assert ranks[2] & AMENDED and not ranks[1] & AMENDED
    assert row_version(later, 1, True) < row_version(later + 1000, 1, True)  # within a revision, the clock
    # A state a restart starts with can be behind a stored row of a later revision, and
    # one revision on covers every earlier row even when a bust took a fill away.
    assert not covers((1, FILL_ALL, 0, False), (2, 0, 0, False))
    assert covers((2, 0, 1, False), (1, 15, 2, True))
    assert not covers((1, 0, 1, False), (1, 0, 2, False))


def test_rows_before_everything_is_known():
    tracker = make_tracker()
    feeder = Feeder(tracker)
    events = example_events()
    feeder.feed("fills", events["fills"][0])
    row = fill_dict(tracker, "F1")
    assert row["slippage_bps"] is None and row["mid_at_fill"] is None and row["complete"] == 0
    assert order_dict(tracker, "O1") is None  # a placeholder until the NEW is seen
    assert "F1" in tracker.changed_fills and "O1" in tracker.changed_orders
    feeder.feed("orders", events["orders"][0])
    for quote in events["quotes"][:3]:  # up to T0+1.2 s
        feeder.feed("quotes", quote)
    tracker.resolve_due()
    row = fill_dict(tracker, "F1")
    assert (row["arrival_mid"], row["slippage_bps"], row["mid_at_fill"]) == (D("100.00"), D("5"), D("100.02"))
    assert row["markout_1s_bps"] is None and row["complete"] == 0  # +1 s = 1.5 s not passed yet
    order = order_dict(tracker, "O1")
    # Open: the unfilled 400 is marked to the latest mid (100.04, the quote at +1.2 s).
    assert order["status"] == "NEW" and order["end_ts"] is None and order["is_final"] == 0
    assert (order["unfilled_price"], order["unfilled_price_ts"]) == (D("100.04"), T0 + 1200 * MS)
    assert order["opportunity_cost"] == D("16.00") and order["execution_cost"] == D("30.00")
    assert order["implementation_shortfall"] == D("49.00")  # 30 + 16 + fee 3


def test_fill_without_order_has_no_slippage_but_the_rest():
    tracker = make_tracker()
    feeder = Feeder(tracker)
    events = example_events()
    for quote in events["quotes"]:
        feeder.feed("quotes", quote)
    feeder.feed("fills", Fill(ts=T0 + 500 * MS, fill_id="X", account="A", symbol="XYZ", side="SELL",
                              qty=D("1"), price=D("100.00")))
    row = fill_dict(tracker, "X")
    assert row["order_id"] is None and row["arrival_mid"] is None and row["slippage_bps"] is None
    assert row["effective_spread_bps"] == D("3.99920016")  # 2 x 0.02 / 100.02
    assert row["markout_1s_bps"] == D("-4.00000000")  # sold at 100.00, mid then 100.04
    assert row["complete"] == 1


def test_no_quote_before_the_time_is_unavailable_not_zero():
    tracker = make_tracker()
    feeder = Feeder(tracker)
    feeder.feed("quotes", Quote(ts=T0 + 100 * NS, symbol="XYZ", bid=D("1"), ask=D("3")))
    feeder.feed("fills", Fill(ts=T0, fill_id="F", account="A", symbol="XYZ", side="BUY", qty=D("1"), price=D("2")))
    row = fill_dict(tracker, "F")
    assert row["mid_at_fill"] is None and row["effective_spread_bps"] is None
    assert row["mid_60s"] is None and row["complete"] == 1
    assert tracker.stats.unavailable_mids == 4


def test_quiet_symbol_is_decided_by_the_other_symbols_time():
    tracker = make_tracker(quiet_grace_ns=5 * NS)
    feeder = Feeder(tracker)
    feeder.feed("quotes", Quote(ts=T0 - NS, symbol="QUIET", bid=D("10"), ask=D("10.02")))
    feeder.feed("fills", Fill(ts=T0, fill_id="F", account="A", symbol="QUIET", side="BUY", qty=D("1"), price=D("10.02")))
    tracker.resolve_due()
    assert fill_dict(tracker, "F")["mid_at_fill"] is None  # QUIET's time has not reached T0
    feeder.feed("quotes", Quote(ts=T0 + 4 * NS, symbol="BUSY", bid=D("1"), ask=D("2")))
    tracker.resolve_due()
    assert fill_dict(tracker, "F")["mid_at_fill"] is None  # every symbol at T0+4 s: not past T0 + 5 s grace
    feeder.feed("quotes", Quote(ts=T0 + 7 * NS, symbol="BUSY", bid=D("1"), ask=D("2")))
    tracker.resolve_due()
    row = fill_dict(tracker, "F")
    assert row["mid_at_fill"] == D("10.01") and row["mid_1s"] == D("10.01")
    assert row["mid_5s"] is None and row["complete"] == 0  # T0+5 s + 5 s grace not yet passed
    feeder.feed("quotes", Quote(ts=T0 + 66 * NS, symbol="BUSY", bid=D("1"), ask=D("2")))
    tracker.resolve_due()
    assert fill_dict(tracker, "F")["mid_60s"] == D("10.01")
    assert fill_dict(tracker, "F")["complete"] == 1


def test_late_and_duplicate_market_data_change_nothing():
    tracker = make_tracker()
    tracker.on_quote(Quote(ts=T0, symbol="S", bid=D("10"), ask=D("12")), 1)
    tracker.on_quote(Quote(ts=T0 + NS, symbol="S", bid=D("11"), ask=D("13")), 2)
    tracker.on_quote(Quote(ts=T0 + NS, symbol="S", bid=D("50"), ask=D("60")), 2)  # redelivered seq
    tracker.on_quote(Quote(ts=T0 - NS, symbol="S", bid=D("1"), ask=D("2")), 3)  # older than the book: late
    assert tracker.quotes.value_at("S", T0) == D("11") and tracker.quotes.value_at("S", T0 + NS) == D("12")
    assert tracker.book["S"].seq == 2
    assert (tracker.stats.duplicate_quotes, tracker.stats.late_quotes) == (1, 1)
    tracker.on_trade(MarketTrade(ts=T0, symbol="S", price=D("10"), size=D("2")), 1)
    tracker.on_trade(MarketTrade(ts=T0, symbol="S", price=D("10"), size=D("2")), 1)
    tracker.on_trade(MarketTrade(ts=T0 - 1, symbol="S", price=D("99"), size=D("1")), 2)
    tracker.on_trade(MarketTrade(ts=T0 + 1, symbol="S", price=D("13"), size=D("1")), 3)
    entry = tracker.tape["S"]
    assert (entry.notional, entry.volume, entry.seq) == (D("33"), D("3"), 3)
    assert (tracker.stats.duplicate_trades, tracker.stats.late_trades) == (1, 1)


def test_redelivered_fills_and_orders_do_not_double_count():
    tracker = make_tracker()
    feeder = Feeder(tracker)
    events = example_events()
    for stream, event in by_time(events):
        seq = feeder.feed(stream, event)
        if stream == "orders":
            feeder.feed(stream, event)
        elif stream == "fills":
            tracker.on_fill(event, seq)  # every trading event delivered twice
    tracker.resolve_due()
    assert_example_rows(tracker)
    assert tracker.stats.skipped_fills == {("fill", "redelivered"): 2}
    assert tracker.stats.fills == 2


def test_a_crash_between_changelogs_is_repaired_by_the_redelivery():
    """The fills changelog got the fill but the orders one did not (cut mid-commit)."""
    tracker = make_tracker()
    events = example_events()
    tracker.on_order(events["orders"][0])
    tracker.on_fill(events["fills"][0], 1)
    order = tracker.orders["O1"]
    tracker.orders["O1"] = msgspec_replace(order, fill_ids=(), filled_qty=D(0), filled_notional=D(0), fees=D(0))
    tracker.on_fill(events["fills"][0], 1)  # redelivered: changes nothing, but it rejoins its order
    assert tracker.orders["O1"].filled_qty == D("600")
    tracker.on_fill(events["fills"][0], 1)
    assert tracker.orders["O1"].filled_qty == D("600")


def msgspec_replace(struct, **changes):
    import msgspec

    return msgspec.structs.replace(struct, **changes)


def test_orders_seen_only_through_their_terminal_event():
    tracker = make_tracker()
    tracker.on_order(Order(ts=T0, order_id="R", account="A", symbol="S", side="SELL", qty=D("5"), status="REJECTED"))
    state = tracker.orders["R"]
    assert state.end_ts == T0 and state.side == "SELL" and state.arrival_ts is None
    assert order_row(tracker, state, 1) is None  # never written: its arrival is unknown


def unchecked(event, **changes):
    """A copy of `event` with `changes`, skipping the validation: what no service decodes
    (core.bounds), to test the columns' own defence."""
    copy = msgspec.structs.replace(event)
    for name, value in changes.items():
        msgspec.structs.force_setattr(copy, name, value)
    return copy


def test_unstorable_numbers_are_named():
    ok = Fill(ts=T0, fill_id="F", account="A", symbol="S", side="BUY", qty=D("1"), price=D("1.5"))
    assert unstorable_reason(ok) is None
    fine = unchecked(ok, price=D("0.0000000000000000001"))
    assert "decimal places" in unstorable_reason(fine)
    huge = unchecked(Order(ts=T0, order_id="O", account="A", symbol="S", side="BUY", qty=D(1)), qty=D("1E+21"))
    assert "too large" in unstorable_reason(huge)


def test_retention_forgets_finished_state_and_old_history():
    tracker = make_tracker(retention_ns=100 * NS, history_ns=30 * NS, open_order_ttl_ns=1000 * NS)
    feeder = Feeder(tracker)
    for stream, event in by_time(example_events()):
        feeder.feed(stream, event)
    tracker.resolve_due()
    tracker.on_order(Order(ts=T0 + 60 * NS, order_id="OPEN", account="A", symbol="XYZ", side="BUY", qty=D("1")))
    written(tracker)
    tracker.prune()  # event time T0+70 s: nothing is 100 s old yet; history is cut at 40 s
    assert set(tracker.fills) == {"F1", "F2"} and set(tracker.tables.fills.keys()) == {"F1", "F2"}
    assert tracker.quotes.points("XYZ") == 3  # the quote at +10 s still holds at +40 s, then 61 s, 70 s
    assert tracker.tables.quote_book["XYZ"].history_from_seq == 6  # persisted by the prune
    assert tracker.trades.points("XYZ") == 3  # the trades' own time is +40 s: cut at +10 s
    tape = tracker.tables.tape["XYZ"]
    assert (tape.history_from_seq, tape.history_base_notional, tape.history_base_volume) == (4, D("150033.00"), D("1500"))
    assert tracker.trades.value_at("XYZ", T0 + 30 * NS) == (D("250149.00"), D("2500"))
    assert tracker.trades.value_at("XYZ", T0) is None  # pruned: unknown, not zero
    tracker.on_quote(Quote(ts=T0 + 200 * NS, symbol="XYZ", bid=D("1"), ask=D("2")), 9)
    written(tracker)
    tracker.prune()
    assert len(tracker.fills) == 0 and len(tracker.tables.fills) == 0
    assert set(tracker.orders) == {"OPEN"} == set(tracker.tables.orders.keys())  # open orders live for open_order_ttl
    assert tracker.stats.pruned_fills == 2 and tracker.stats.pruned_orders == 1


def test_retention_keeps_the_fills_of_rollup_minutes_not_yet_refreshed():
    tracker = make_tracker(retention_ns=100 * NS)
    feeder = Feeder(tracker)
    for stream, event in by_time(example_events()):
        feeder.feed(stream, event)
    tracker.resolve_due()
    tracker.on_quote(Quote(ts=T0 + 200 * NS, symbol="XYZ", bid=D("1"), ask=D("2")), 9)
    written(tracker)
    assert tracker.fill_minutes() == {T0 - T0 % MINUTE_NS}
    tracker.prune(stale_minutes={T0 - T0 % MINUTE_NS})
    assert set(tracker.fills) == {"F1", "F2"}
    tracker.prune(stale_minutes=set())
    assert not tracker.fills


def test_open_orders_are_re_marked_when_their_symbol_moves():
    tracker = make_tracker()
    feeder = Feeder(tracker)
    tracker.on_order(Order(ts=T0, order_id="O", account="A", symbol="S", side="BUY", qty=D("10")))
    tracker.on_order(Order(ts=T0, order_id="P", account="A", symbol="OTHER", side="BUY", qty=D("10")))
    feeder.feed("quotes", Quote(ts=T0 + NS, symbol="S", bid=D("1"), ask=D("3")))
    written(tracker)
    assert tracker.mark_open_orders({"S"}) == 1
    assert tracker.changed_orders == {"O"}


def test_arrow_rows_match_the_columns():
    tracker = make_tracker()
    feeder = Feeder(tracker)
    for stream, event in by_time(example_events()):
        feeder.feed(stream, event)
    tracker.resolve_due()
    fills = arrow_table(FILL_COLUMNS, [fill_row(tracker, tracker.fills[f], 7) for f in ("F1", "F2")])
    orders = arrow_table(ORDER_COLUMNS, [order_row(tracker, tracker.orders["O1"], 7)])
    assert fills.num_rows == 2 and orders.num_rows == 1
    assert fills.column("markout_60s_bps").to_pylist() == [D("6.99650175"), D("-7.99200799")]
    assert orders.column("implementation_shortfall").to_pylist() == [D("78.00")]
    assert arrow_table(FILL_COLUMNS, []).num_rows == 0


def test_settled_rows_outrank_any_later_unsettled_row():
    """ClickHouse keeps the highest version: a settled row carries the SETTLED bit, so
    no unsettled row written later (by any path) can replace it."""
    tracker = make_tracker()
    feeder = Feeder(tracker)
    for stream, event in by_time(example_events()):
        feeder.feed(stream, event)
    tracker.resolve_due()
    settled = fill_row(tracker, tracker.fills["F1"], 100)
    unsettled = fill_row(tracker, msgspec_replace(tracker.fills["F1"], resolved=0), 200)
    assert settled[-1] == 100 | SETTLED and unsettled[-1] == 200 and settled[-1] > unsettled[-1]
    final = order_row(tracker, tracker.orders["O1"], 100)
    open_again = order_row(tracker, msgspec_replace(tracker.orders["O1"], resolved=0), 200)
    assert final[-4] == 1 and open_again[-4] == 0 and final[-1] > open_again[-1]


def test_persisted_states_survive_an_agents_roll_back():
    """A crashed agent's uncommitted table writes are rolled back by the runtime; the
    states the writer persists (their rows are in ClickHouse) belong to no agent."""
    from posttrade.streams.stream import current_agent

    tracker = make_tracker()
    token = current_agent.set("fills")
    try:
        tracker.on_fill(example_events()["fills"][0], 1)
        written(tracker)
    finally:
        current_agent.reset(token)
    tracker.tables.fills.rollback("fills")
    assert "F1" in tracker.tables.fills


def test_a_write_persists_the_states_it_wrote_not_newer_ones():
    tracker = make_tracker()
    feeder = Feeder(tracker)
    events = example_events()
    feeder.feed("fills", events["fills"][0])
    taken = tracker.take_changes()
    assert set(taken.fills) == {"F1"}
    for quote in events["quotes"][:3]:  # decides F1's mid while the write is in flight
        feeder.feed("quotes", quote)
    tracker.resolve_due()
    tracker.persist(taken)
    assert tracker.tables.fills["F1"].mid_at_fill is None  # the state that was written
    assert tracker.fills["F1"].mid_at_fill == D("100.02") and tracker.changed_fills == {"F1"}
    assert "F1" not in tracker.tables.quote_book  # market entries are persisted by their agents
    tracker.persist_market()
    assert tracker.tables.quote_book["XYZ"].seq == 3


# -- the agents on the in-memory transport --------------------------------------------------------


@dataclass
class RecordingStore:
    """Stands in for ExecutionStore: keeps inserted rows like a ReplacingMergeTree read
    with FINAL (highest version per id), every row ever written (`log`), and the ledger
    of fill_ids (`seen`: the first arrival of each, as the store's query answers)."""

    fills: dict[str, dict]
    orders: dict[str, dict]
    inserts: int = 0
    fail_next: int = 0
    location: str = "memory"
    log: list[tuple[str, dict]] = field(default_factory=list)
    refreshed: set[int] = field(default_factory=set)
    progress_reads: int = 0
    seen: dict[str, SeenFill] = field(default_factory=dict)
    lookups: list[set[str]] = field(default_factory=list)

    async def insert(self, table: str, data) -> int:
        if self.fail_next:
            self.fail_next -= 1
            raise ClickHouseError("ClickHouse went away")  # the client's error, not an OSError
        self.inserts += 1
        if table == FILL_IDS_TABLE:
            for row in data.to_pylist():
                held = self.seen.get(row["fill_id"])
                if held is None or row["seq"] < held.seq:
                    self.seen[row["fill_id"]] = SeenFill(
                        seq=row["seq"], exec_type=row["exec_type"], original_fill_id=row["original_fill_id"],
                        outcome=row["outcome"])
            return data.num_rows
        assert table in (FILLS_TABLE, ORDERS_TABLE)
        target, key = (self.fills, "fill_id") if table == FILLS_TABLE else (self.orders, "order_id")
        for row in data.to_pylist():
            self.log.append((table, row))
            held = target.get(row[key])
            if held is None or row["version"] >= held["version"]:
                target[row[key]] = row
        return data.num_rows

    async def seen_fills(self, fill_ids) -> dict[str, SeenFill]:
        self.lookups.append(set(fill_ids))
        return {k: self.seen[k] for k in fill_ids if k in self.seen}

    async def refresh_minutes(self, minutes, version: int) -> None:
        self.refreshed |= set(minutes)

    async def stored_progress(self, fills: dict[str, int], orders: dict[str, int]):
        self.progress_reads += 1
        return (
            {k: (self.fills[k]["amendments"], self.fills[k]["progress"], 0, False) for k in fills if k in self.fills},
            {k: (self.orders[k]["amendments"], self.orders[k]["progress"], self.orders[k]["fills"],
                 self.orders[k]["end_ts"] is not None)
             for k in orders if k in self.orders},
        )

    def live_fills(self) -> dict[str, dict]:
        """The fill rows a reader sees: busted ones left out."""
        return {k: row for k, row in self.fills.items() if not row["busted"]}

    async def ping(self) -> bool:
        return True


def make_service_app(transport: MemoryTransport, store: RecordingStore, max_unwritten: int = 100_000):
    app = App("eqtest", transport)
    app.runtime.poll_timeout_s = 0.05
    channels = ExecutionChannels.of(app)
    tracker = ExecutionTracker(declare_tables(app))
    sink = app.sink(ExecutionSink(tracker, RetryPolicy(initial_s=0.01, max_s=0.01), interval_s=0.05, batch_rows=4,
                                  max_unwritten=max_unwritten))
    sink.use(store)
    register_agents(app, tracker, sink, channels, batch_size=3, within_s=0.05)

    async def start():
        await start_tracker(app, tracker, channels)
        sink.start()

    app.on_startup.append(start)
    app.on_shutdown.append(sink.stop)
    return app, tracker, sink


SUBJECTS = {"quotes": "md.quotes.XYZ", "trades": "md.trades.XYZ", "orders": "trading.orders.ACC1.XYZ",
            "fills": "trading.fills.ACC1.XYZ"}
STREAMS = {"quotes": "QUOTES", "trades": "TRADES", "orders": "ORDERS", "fills": "FILLS"}
DURABLES = {"quotes": "eqtest-quotes", "trades": "eqtest-market_trades", "orders": "eqtest-orders",
            "fills": "eqtest-fills"}


async def wait_until(predicate, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


def floors_at_end(transport: MemoryTransport, streams=STREAMS) -> bool:
    return all(
        transport.ack_floors.get((STREAMS[s], DURABLES[s]), 0) == len(transport.streams[STREAMS[s]].messages)
        for s in streams
    )


async def publish(transport: MemoryTransport, events: dict[str, list], streams=("fills", "orders", "trades", "quotes")):
    for stream in streams:
        for event in events[stream]:
            await transport.publish(SUBJECTS[stream], encode(event))


def ns_of(moment) -> int | None:
    """Epoch ns of what pyarrow gives back for a timestamp (pandas or datetime)."""
    if moment is None:
        return None
    if hasattr(moment, "value"):
        return moment.value
    return (moment.timestamp().__int__()) * NS + moment.microsecond * 1000


def assert_store_has_example(store: RecordingStore) -> None:
    for fill_id, expected in EXPECTED_FILLS.items():
        row = store.fills[fill_id]
        got = {k: row[k] for k in expected}
        # Arrow gives datetimes back for timestamps; compare the nanoseconds.
        for k in ("ts", "arrival_ts"):
            got[k] = ns_of(row[k])
        assert got == expected, fill_id
    row = store.orders["O1"]
    for k in ("qty", "implementation_shortfall", "implementation_shortfall_bps", "market_vwap", "fill_ratio"):
        assert row[k] == EXPECTED_ORDER[k], k
    assert row["is_final"] == 1


def settled(store: RecordingStore) -> bool:
    return store.fills.get("F2", {}).get("complete") == 1 and store.orders.get("O1", {}).get("is_final") == 1


def without_version(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "version"}


async def test_agents_write_the_example_and_survive_restart_and_redelivery():
    transport = MemoryTransport()
    store = RecordingStore({}, {})
    app, tracker, sink = make_service_app(transport, store)
    async with app:
        # Fills and orders first, market data later: everything waits, then resolves.
        await publish(transport, example_events())
        await wait_until(lambda: floors_at_end(transport) and settled(store))
    assert_store_has_example(store)
    assert store.refreshed == {T0 - T0 % MINUTE_NS}  # the rollup minute of both fills
    rows_before = (dict(store.fills), dict(store.orders))

    # A crash before the acknowledgements: every stream is redelivered from the start.
    for stream in STREAMS:
        transport.ack_floors[(STREAMS[stream], DURABLES[stream])] = 0
    inserts = store.inserts
    app2, tracker2, _ = make_service_app(transport, store)
    async with app2:
        # The restart rebuilt the quote history from the stream; it rewrites nothing
        # (ClickHouse has every persisted state), and the redelivered events are duplicates.
        assert tracker2.quotes.points("XYZ") == 8 and tracker2.trades.points("XYZ") == 6
        await wait_until(lambda: floors_at_end(transport))
    assert tracker2.stats.skipped_fills == {("fill", "redelivered"): 2} and tracker2.stats.duplicate_quotes == 8
    assert tracker2.orders["O1"].filled_qty == D("800")
    assert store.inserts == inserts and (store.fills, store.orders) == rows_before


async def test_agents_apply_amendments_and_the_ledger_remembers_fill_ids_past_retention():
    transport = MemoryTransport()
    store = RecordingStore({}, {})
    app, tracker, sink = make_service_app(transport, store)
    events = amended_events()
    async with app:
        await publish(transport, events)
        await wait_until(lambda: floors_at_end(transport) and store.fills.get("F2", {}).get("amendments") == 2
                         and settled(store) and store.orders["O1"]["amendments"] == 3)
        for fill_id, expected in EXPECTED_AMENDED_FILLS.items():
            row = store.fills[fill_id]
            got = {k: ns_of(row[k]) if k in ("ts", "arrival_ts") else row[k] for k in expected}
            assert got == expected, fill_id
        assert set(store.live_fills()) == {"F1", "F2"}
        row = store.orders["O1"]
        assert {k: row[k] for k in ("fills", "filled_qty", "implementation_shortfall", "amendments")} == {
            "fills": 2, "filled_qty": D("750"), "implementation_shortfall": D("75.75"), "amendments": 3}
        assert {k: (v.seq, v.original_fill_id, v.outcome) for k, v in store.seen.items()} == {
            "F1": (1, "F1", "applied"), "B3": (2, "F3", "applied"), "F2": (3, "F2", "applied"),
            "C2": (5, "F2", "applied"), "F3": (6, "F3", "applied"), "C2b": (7, "F2", "applied"),
            "OP1": (8, "OP1", "opening"),
        }  # the resend (seq 4) is not a first arrival

        # Two hours later nothing of the example is held any more; the ledger still
        # knows every fill_id: a resend is a duplicate, an amendment changes nothing.
        await transport.publish("md.quotes.LATER", encode(Quote(ts=T0 + 7200 * NS, symbol="LATER", bid=D("1"),
                                                                ask=D("2"))))
        await wait_until(lambda: tracker.event_time == T0 + 7200 * NS and not tracker.unwritten())
        tracker.prune()
        assert not tracker.fills and not tracker.orders and not tracker.aliases
        rows = (dict(store.fills), dict(store.orders))
        common = dict(account="ACC1", symbol="XYZ")
        late = [
            msgspec_replace(events["fills"][2], qty=D("1")),
            Fill(ts=T0 + 7300 * NS, fill_id="B1", exec_type="BUST", ref_fill_id="F1", **common),
            Fill(ts=T0 + 7300 * NS, fill_id="C2c", exec_type="CORRECT", ref_fill_id="C2b", side="BUY",
                 qty=D("1"), price=D("1"), fee=D("0"), **common),
        ]
        for fill in late:
            await transport.publish(SUBJECTS["fills"], encode(fill))
        await wait_until(lambda: floors_at_end(transport, ("fills",)) and not tracker.unwritten())
        assert tracker.stats.skipped_fills == {
            ("fill", "duplicate"): 2, ("opening", "opening"): 1, ("bust", "amends_forgotten"): 1,
            ("correction", "amends_forgotten"): 1,
        }
        assert {"F2", "B1", "F1", "C2c", "C2b"} <= store.lookups[-1]
        assert (store.fills, store.orders) == rows and not tracker.fills
        assert (store.seen["B1"].outcome, store.seen["C2c"].original_fill_id) == ("amends_forgotten", "F2")

    # A crash before the late messages were acknowledged: they come again to a restart
    # that holds none of the example, and the ledger decides as before.
    transport.ack_floors[("FILLS", DURABLES["fills"])] = len(events["fills"])
    seen = dict(store.seen)
    app2, tracker2, _ = make_service_app(transport, store)
    async with app2:
        await wait_until(lambda: floors_at_end(transport) and not tracker2.unwritten())
    assert tracker2.stats.fills == tracker2.stats.corrections == tracker2.stats.busts == 0
    assert tracker2.stats.skipped_fills == {("fill", "duplicate"): 1, ("bust", "amends_forgotten"): 1,
                                            ("correction", "amends_forgotten"): 1}
    assert (store.fills, store.orders, store.seen) == (*rows, seen)


async def test_a_restart_behind_clickhouse_never_writes_a_less_settled_row():
    """The crash the restart must survive: ClickHouse has settled rows whose states
    never reached the changelog, and the market data that settled them is not
    acknowledged. The restart must not write the older states over them."""
    transport = MemoryTransport()
    store = RecordingStore({}, {})
    app, tracker, sink = make_service_app(transport, store)
    events = example_events()
    async with app:
        await publish(transport, events, streams=("orders", "fills"))
        await wait_until(lambda: floors_at_end(transport, ("orders", "fills")) and "O1" in store.orders)
        assert not settled(store)
        changelog_then = {bucket: dict(data) for bucket, data in transport.buckets.items()}
        await publish(transport, events, streams=("trades", "quotes"))
        await wait_until(lambda: floors_at_end(transport) and settled(store))
    assert_store_has_example(store)
    # The crash: the changelog as it was before the market data, which is redelivered.
    for bucket, data in changelog_then.items():
        transport.buckets[bucket].clear()
        transport.buckets[bucket].update(data)
    for stream in ("quotes", "trades"):
        transport.ack_floors[(STREAMS[stream], DURABLES[stream])] = 0
    written_before = len(store.log)
    app2, tracker2, _ = make_service_app(transport, store)
    async with app2:
        assert not tracker2.fills["F2"].complete  # the restart started behind ClickHouse
        await wait_until(lambda: floors_at_end(transport) and tracker2.fills["F2"].complete
                         and tracker2.orders["O1"].final and not tracker2.unwritten())
    after_restart = store.log[written_before:]
    assert after_restart, "the redelivered market data settles the rows again"
    for table, row in after_restart:
        assert row["complete" if table == FILLS_TABLE else "is_final"] == 1, row
    assert_store_has_example(store)


async def test_a_state_that_moves_on_during_the_comparison_is_compared_as_taken():
    """The write compares the states it took with ClickHouse's rows; the live state may
    settle while the read is in flight, but the row to write is the one taken."""
    events = example_events()
    store = RecordingStore({}, {})
    store.fills["F1"] = {"fill_id": "F1", "progress": FILL_ALL, "complete": 1, "amendments": 0, "busted": 0,
                         "version": 5 | SETTLED}
    tracker = make_tracker()
    feeder = Feeder(tracker)
    sink = ExecutionSink(tracker)
    sink.use(store)
    feeder.tracker.on_fill(events["fills"][0], 1, replayed=True)  # a redelivery: compared first
    read = store.stored_progress

    async def read_while_the_market_moves(fills, orders):
        for stream, event in by_time({"quotes": events["quotes"], "orders": events["orders"]}):
            feeder.feed(stream, event)
        tracker.resolve_due()
        return await read(fills, orders)

    store.stored_progress = read_while_the_market_moves
    await sink.flush()
    assert not [row for _, row in store.log if row["fill_id"] == "F1"]  # the taken state was behind
    assert sink.writes.rows_held == 1 and tracker.changed_fills == {"F1"}
    await sink.flush()  # now settled: written
    assert store.fills["F1"]["complete"] == 1 and store.fills["F1"]["version"] > 5 | SETTLED


async def test_a_failing_store_is_retried_until_written():
    transport = MemoryTransport()
    store = RecordingStore({}, {}, fail_next=3)
    app, tracker, sink = make_service_app(transport, store)
    async with app:
        await publish(transport, example_events(), streams=("quotes", "trades", "orders", "fills"))
        await wait_until(lambda: floors_at_end(transport) and store.fills.get("F2", {}).get("complete") == 1)
    assert sink.stats.errors == 3 and "went away" in sink.stats.last_error
    assert_store_has_example(store)


async def test_trading_batches_wait_for_clickhouse_and_market_data_is_held_when_too_much_waits():
    transport = MemoryTransport()
    store = RecordingStore({}, {}, fail_next=10**9)  # ClickHouse down
    app, tracker, sink = make_service_app(transport, store, max_unwritten=2)
    async with app:
        await publish(transport, example_events(), streams=("orders", "fills"))
        await wait_until(lambda: sink.unwritten() > 2)
        await publish(transport, example_events(), streams=("quotes", "trades"))
        await asyncio.sleep(0.5)
        # Orders and fills are never acknowledged before their rows are written; the
        # market data goes on until more than max_unwritten rows wait.
        assert transport.ack_floors.get(("FILLS", DURABLES["fills"]), 0) == 0
        assert transport.ack_floors.get(("ORDERS", DURABLES["orders"]), 0) == 0
        assert not floors_at_end(transport, ("quotes",))
        assert sink.unwritten() > 2 and not store.fills and len(tracker.tables.fills) == 0
        store.fail_next = 0  # ClickHouse is back
        await wait_until(lambda: floors_at_end(transport) and store.fills.get("F2", {}).get("complete") == 1)
    assert_store_has_example(store)
    assert set(tracker.tables.fills.keys()) == {"F1", "F2"}  # persisted once written


async def test_unstorable_fill_is_dead_lettered():
    transport = MemoryTransport()
    store = RecordingStore({}, {})
    app, tracker, sink = make_service_app(transport, store)
    bad = unchecked(Fill(ts=T0, fill_id="BAD", account="A", symbol="XYZ", side="BUY", qty=D("1"), price=D(1)),
                    price=D("1.0000000000000000001"))
    async with app:
        await transport.publish(SUBJECTS["fills"], encode(bad))
        await transport.publish(SUBJECTS["fills"], b'{"not": "a fill"}')
        await wait_until(lambda: len(transport.streams["DLQ"].messages) == 2)
    reasons = {m[2]["Posttrade-Seq"]: m[2]["Posttrade-Reason"] for m in transport.streams["DLQ"].messages}
    # Refused when decoded, as by every service (core.bounds: at most 12 places).
    assert "price must have at most 12 decimal places" in reasons["1"] and "invalid Fill" in reasons["2"]
    assert "BAD" not in tracker.fills


def test_values_finer_than_the_columns_are_rounded_and_overflow_is_rejected():
    tracker = make_tracker()
    sink = ExecutionSink(tracker)
    # 0.123456789 x 1.1234567891 = 0.1386983677625361999 has 19 decimals: the notional
    # column holds 18, so it is rounded half to even there (and nowhere else).
    tracker.on_fill(Fill(ts=T0, fill_id="FINE", account="A", symbol="S", side="BUY",
                         qty=D("0.123456789"), price=D("1.1234567891")), 1)
    # Notional 1e21: too large (no service decodes such a fill: core.bounds; the columns
    # still refuse one that reaches them).
    huge = unchecked(Fill(ts=T0, fill_id="HUGE", account="A", symbol="S", side="BUY", qty=D(1), price=D(1)),
                     qty=D("10000000000"), price=D("100000000000"))
    tracker.on_fill(huge, 2)
    rows = [fill_row(tracker, tracker.fills["FINE"], 1), fill_row(tracker, tracker.fills["HUGE"], 1)]
    table = sink.rows_to_arrow(FILL_COLUMNS, rows)
    assert table.column("fill_id").to_pylist() == ["FINE"]
    assert table.column("notional").to_pylist() == [D("0.138698367762536200")]
    assert tracker.stats.rows_rejected == 1
