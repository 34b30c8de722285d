"""How ptrc's position updates become QuestDB columns (the writes themselves:
tests/integration/test_ptrc.py)."""

from __future__ import annotations

from decimal import Decimal

import pandas as pd
import pyarrow as pa
import pytest

from posttrade.agents.positions import position_update
from posttrade.core.history import ExecutionBook
from posttrade.core.positions import Position
from posttrade.stores.questdb.layouts import LAYOUTS
from posttrade.stores.questdb.rows import trade_rows
from posttrade.streams.events import Fill
from posttrade.streams.stream import EventRecord

TRADES, SNAPSHOTS = LAYOUTS["ptrc_trades"], LAYOUTS["position_snapshots"]

D = Decimal
T0 = 1_700_000_000_000_000_000


def record(update) -> EventRecord:
    return EventRecord(update, "POSITIONS", 1, "posttrade.positions.A.X", T0, 1, None)


def updates_after(*fills: tuple[str, str, str]) -> list:
    book = ExecutionBook()
    out = []
    for i, (side, qty, price) in enumerate(fills, 1):
        fill = Fill(ts=T0 + i, fill_id=f"f{i}", account="A1", symbol="XYZ", side=side, qty=D(qty), price=D(price), fee=D("0.5"))
        result = book.receive(fill, i)
        out.append(position_update(result.position, D(price), result.reason, fill.ts, fill, result))
    return out


def trades_of(updates) -> list:
    return [record(row) for u in updates for row in trade_rows(u)]


def column(columns: dict, name: str) -> list:
    return [None if value is pd.NA else value for value in columns[name]]


def test_a_fill_becomes_one_trade_row_and_one_snapshot_row_with_its_exact_values():
    updates = updates_after(("BUY", "10", "100"), ("BUY", "10", "110"), ("SELL", "15", "120"))
    trades = TRADES.build_columns(trades_of(updates))
    assert column(trades, "fill_id") == ["f1", "f2", "f3"]
    assert column(trades, "realized_pnl_fill") == [D(0), D(0), D(225)]
    assert column(trades, "net_qty_after") == [D("10.000000000000"), D("20.000000000000"), D("5.000000000000")]
    assert column(trades, "order_id") == [None, None, None]  # not given: NULL, not ""
    snapshots = SNAPSHOTS.build_columns(SNAPSHOTS.rows([record(updates[-1])], None))
    assert column(snapshots, "avg_open_price") == [D("105.000000000000")]
    assert column(snapshots, "realized_pnl_net") == [D("223.500000000000")]
    assert all(pa.types.is_decimal(trades[name].dtype.pyarrow_dtype) for name in ("qty", "price", "fee"))


def test_derived_values_round_at_12_places_but_inputs_that_do_not_fit_are_refused():
    # 1 @ 1/3-ish prices: the average of 3 fills has more than 12 places.
    updates = updates_after(("BUY", "1", "1"), ("BUY", "1", "1"), ("BUY", "1", "2"))
    snapshots = SNAPSHOTS.build_columns(SNAPSHOTS.rows([record(updates[-1])], None))
    assert column(snapshots, "avg_open_price") == [D("1.333333333333")]
    # A quantity of 13 places never becomes a Fill (core.bounds): every service refuses it.
    with pytest.raises(ValueError, match="qty must have at most 12 decimal places"):
        updates_after(("BUY", "0.0000000000001", "100"))


def test_a_batch_snapshots_each_position_once_as_its_last_fill_left_it_and_every_roll():
    from posttrade.stores.questdb.rows import latest_per_position

    a = updates_after(("BUY", "10", "100"), ("BUY", "10", "110"))
    position = Position("A2", "XYZ")
    position.apply(Fill(ts=T0, fill_id="g1", account="A2", symbol="XYZ", side="SELL", qty=D(1), price=D(5), fee=D(0)))
    roll = position_update(position, D(5), "roll", T0 + 50)
    b = position_update(position, D(5), "fill", T0 + 60)
    batch = [record(a[0]), record(roll), record(b), record(a[1])]
    kept = [r.value for r in latest_per_position(batch)]
    assert kept == [roll, a[1], b]  # the roll; A1 after its second fill; A2 after its fill
    assert latest_per_position([]) == []


def test_the_blotter_shows_each_execution_final_and_the_amendments_themselves():
    book = ExecutionBook()
    feed = [
        Fill(ts=T0 + 1, fill_id="f1", account="A1", symbol="XYZ", side="BUY", qty=D(10), price=D(100), order_id="o1"),
        Fill(ts=T0 + 9, fill_id="b2", account="A1", symbol="XYZ", exec_type="BUST", ref_fill_id="f2"),  # waits
        Fill(ts=T0 + 2, fill_id="f2", account="A1", symbol="XYZ", side="BUY", qty=D(5), price=D(101)),
        Fill(ts=T0 + 8, fill_id="c1", account="A1", symbol="XYZ", exec_type="CORRECT", ref_fill_id="f1",
             side="BUY", qty=D(10), price=D("99.5"), fee=D(1)),
    ]
    rows = []
    for seq, fill in enumerate(feed, 1):
        result = book.receive(fill, seq)
        if result.status == "applied":
            rows += trade_rows(position_update(result.position, None, result.reason, fill.ts, fill, result))
    seen = [(r.fill_id, r.ts - T0, r.exec_type, r.state, r.price) for r in rows]
    assert seen == [
        ("f1", 1, "NEW", "active", D(100)),
        ("f2", 2, "NEW", "busted", D(101)),  # arrived after its BUST: final state at once
        ("b2", 9, "BUST", "amendment", None),
        ("c1", 8, "CORRECT", "amendment", D("99.5")),
        ("f1", 1, "NEW", "corrected", D("99.5")),  # same (ts, fill_id): rewrites f1's row
    ]
    assert rows[-1].order_id == "o1" and rows[-1].fee == D(1)
