"""How ptrc's position updates become QuestDB columns (the writes themselves:
tests/integration/test_ptrc.py)."""

from __future__ import annotations

from decimal import Decimal

import pandas as pd
import pyarrow as pa
import pytest

from posttrade.agents.positions import position_update
from posttrade.agents.ptrc_storage import SNAPSHOTS, TRADES
from posttrade.agents.questdb_sink import BadRows
from posttrade.core.positions import Position
from posttrade.streams.events import Fill
from posttrade.streams.stream import EventRecord

D = Decimal
T0 = 1_700_000_000_000_000_000


def record(update) -> EventRecord:
    return EventRecord(update, "POSITIONS", 1, "posttrade.positions.A.X", T0, 1, None)


def updates_after(*fills: tuple[str, str, str]) -> list:
    position = Position("A1", "XYZ")
    out = []
    for i, (side, qty, price) in enumerate(fills, 1):
        fill = Fill(ts=T0 + i, fill_id=f"f{i}", account="A1", symbol="XYZ", side=side, qty=D(qty), price=D(price), fee=D("0.5"))
        realized_before = position.realized_pnl_gross
        position.apply(fill)
        realized = position.realized_pnl_gross - realized_before
        out.append(position_update(position, D(price), "fill", fill.ts, fill, realized))
    return out


def column(columns: dict, name: str) -> list:
    return [None if value is pd.NA else value for value in columns[name]]


def test_a_fill_becomes_one_trade_row_and_one_snapshot_row_with_its_exact_values():
    updates = updates_after(("BUY", "10", "100"), ("BUY", "10", "110"), ("SELL", "15", "120"))
    trades = TRADES.build_columns([record(u) for u in updates])
    assert column(trades, "fill_id") == ["f1", "f2", "f3"]
    assert column(trades, "realized_pnl_fill") == [D(0), D(0), D(225)]
    assert column(trades, "net_qty_after") == [D("10.000000000000"), D("20.000000000000"), D("5.000000000000")]
    assert column(trades, "order_id") == [None, None, None]  # not given: NULL, not ""
    snapshots = SNAPSHOTS.build_columns([record(updates[-1])])
    assert column(snapshots, "avg_open_price") == [D("105.000000000000")]
    assert column(snapshots, "realized_pnl_net") == [D("223.500000000000")]
    assert all(pa.types.is_decimal(trades[name].dtype.pyarrow_dtype) for name in ("qty", "price", "fee"))


def test_derived_values_round_at_12_places_but_inputs_that_do_not_fit_are_refused():
    # 1 @ 1/3-ish prices: the average of 3 fills has more than 12 places.
    updates = updates_after(("BUY", "1", "1"), ("BUY", "1", "1"), ("BUY", "1", "2"))
    snapshots = SNAPSHOTS.build_columns([record(updates[-1])])
    assert column(snapshots, "avg_open_price") == [D("1.333333333333")]
    too_fine = updates_after(("BUY", "0.0000000000001", "100"))  # a quantity of 13 places
    with pytest.raises(BadRows, match="qty"):
        TRADES.build_columns([record(too_fine[0])])


def test_a_batch_snapshots_each_position_once_as_its_last_fill_left_it_and_every_roll():
    from posttrade.agents.ptrc_storage import latest_per_position

    a = updates_after(("BUY", "10", "100"), ("BUY", "10", "110"))
    position = Position("A2", "XYZ")
    position.apply(Fill(ts=T0, fill_id="g1", account="A2", symbol="XYZ", side="SELL", qty=D(1), price=D(5), fee=D(0)))
    roll = position_update(position, D(5), "roll", T0 + 50)
    b = position_update(position, D(5), "fill", T0 + 60)
    batch = [record(a[0]), record(roll), record(b), record(a[1])]
    kept = [r.value for r in latest_per_position(batch)]
    assert kept == [roll, a[1], b]  # the roll; A1 after its second fill; A2 after its fill
    assert latest_per_position([]) == []
