"""One definition of a valid value (`posttrade.core.bounds`), used by every service.

- The decoder refuses, with a reason naming the field, a decimal that is not finite,
  not below 1E+20 or has more than 12 places, in every event type; values at the bound
  decode, and the stores' encoders (QuestDB columns, ClickHouse rows, pnl's snapshots)
  take them exactly, without a rescaling error.
- The core (`ExecutionBook`) refuses, before it changes the book, a message whose effects
  would not fit (notional, realized P&L, the position's figures, its lots), including a
  late fill, a correction or a bust that would push a *later* execution over.
- One key's state never outgrows the bus: a table value over the bound derived from the
  server's `max_payload` is refused by the flush with a clear error, writing nothing.
"""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal as D

import msgspec
import pytest

from posttrade.agents.positions import position_update
from posttrade.stores.questdb.layouts import LAYOUTS
from posttrade.core import bounds
from posttrade.core.bounds import EVENT_BYTES, FIGURE_LIMIT, NAME_CHARS, VALUE_LIMIT
from posttrade.core.exact import EXACT
from posttrade.core.history import ExecutionBook
from posttrade.core.positions import Position
from posttrade.stores.questdb import decimal_column
from posttrade.streams.events import (
    Bar,
    Fill,
    InvalidEvent,
    MarketTrade,
    Order,
    PositionUpdate,
    Quote,
    decode,
    encode,
)
from posttrade.streams.memory import MemoryTransport
from posttrade.streams.stream import EventRecord
from posttrade.tables.table import Table, ValueTooLarge

TS = 1_700_000_000_000_000_000
#: The largest and the smallest positive value the bound allows: 20 digits before the
#: point, 12 after.
TOP = D("99999999999999999999.999999999999")
MINUS_TOP = D("-99999999999999999999.999999999999")  # not -TOP: that rounds to 28 digits
TINY = D("0.000000000001")

GOOD = {
    Fill: {"ts": TS, "fill_id": "F1", "account": "A1", "symbol": "XYZ", "side": "BUY", "qty": "10", "price": "100.5",
           "fee": "1.25"},
    Order: {"ts": TS, "order_id": "O1", "account": "A1", "symbol": "XYZ", "side": "SELL", "qty": "10",
            "order_type": "LIMIT", "limit_price": "99.5"},
    Quote: {"ts": TS, "symbol": "XYZ", "bid": "100.25", "ask": "100.27", "bid_size": "5", "ask_size": "0"},
    MarketTrade: {"ts": TS, "symbol": "XYZ", "price": "100.26", "size": "3"},
    Bar: {"ts": TS, "symbol": "XYZ", "interval": "1m", "open": "100", "high": "101", "low": "99", "close": "100.5",
          "volume": "1000", "vwap": "100.2"},
    PositionUpdate: {"ts": TS, "account": "A1", "symbol": "XYZ", "reason": "fill", "multiplier": "1", "net_qty": "10",
                     "avg_open_price": "100", "open_cost": "1000", "realized_pnl_gross": "0", "fees": "1",
                     "realized_pnl_net": "-1", "fifo_open_cost": "1000", "fifo_realized_pnl_gross": "0",
                     "sod_realized_pnl_net": "0", "sod_unrealized_pnl": "0", "mark": "101", "unrealized_pnl": "10",
                     "qty": "10", "price": "100", "fee": "1", "realized_pnl_fill": "0"},
}

#: Every Decimal field of every event type.
DECIMAL_FIELDS = {
    Fill: ("qty", "price", "fee"),
    Order: ("qty", "limit_price"),
    Quote: ("bid", "ask", "bid_size", "ask_size"),
    MarketTrade: ("price", "size"),
    Bar: ("open", "high", "low", "close", "volume", "vwap"),
    PositionUpdate: (
        "multiplier", "net_qty", "avg_open_price", "open_cost", "realized_pnl_gross", "fees", "realized_pnl_net",
        "fifo_open_cost", "fifo_realized_pnl_gross", "sod_realized_pnl_net", "sod_unrealized_pnl", "mark",
        "unrealized_pnl", "fifo_unrealized_pnl", "day_pnl", "qty", "price", "fee", "realized_pnl_fill",
    ),
}

#: value -> what the reason says. 19 decimal places: only where places are bounded.
BAD_VALUES = {
    "1E+400000": "below 1E+",
    "1E+30": "below 1E+",
    "NaN": "finite",
    "Infinity": "finite",
}
PLACES_BOUNDED = {t: f for t, f in DECIMAL_FIELDS.items() if t is not PositionUpdate}
PLACES_BOUNDED[Bar] = ("open", "high", "low", "close", "volume")  # a vwap is a derived average


def raw(event_type, **changes) -> bytes:
    return json.dumps({**GOOD[event_type], **changes}).encode()


def test_every_decimal_field_of_every_event_type_is_listed():
    for event_type, fields in DECIMAL_FIELDS.items():
        declared = {
            f.name for f in msgspec.structs.fields(event_type) if f.type in (D, D | None)
        }
        assert declared == set(fields), event_type


@pytest.mark.parametrize("event_type", list(GOOD))
def test_the_good_messages_decode(event_type):
    event = decode(event_type, raw(event_type))
    assert decode(event_type, encode(event)) == event


@pytest.mark.parametrize(
    ("event_type", "field", "value"),
    [(t, f, v) for t, fields in DECIMAL_FIELDS.items() for f in fields for v in BAD_VALUES],
)
def test_an_unbounded_or_non_finite_value_is_refused_with_a_reason_naming_its_field(event_type, field, value):
    with pytest.raises(InvalidEvent) as refused:
        decode(event_type, raw(event_type, **{field: value}))
    reason = refused.value.reason
    assert reason.startswith(f"invalid {event_type.__name__}: {field}"), reason
    assert BAD_VALUES[value] in reason, reason
    assert len(reason) < 300  # a reason, never the value written out in full


@pytest.mark.parametrize(
    ("event_type", "field"), [(t, f) for t, fields in PLACES_BOUNDED.items() for f in fields]
)
def test_nineteen_decimal_places_are_refused(event_type, field):
    with pytest.raises(InvalidEvent, match=rf"invalid {event_type.__name__}: {field} must have at most 12 decimal places"):
        decode(event_type, raw(event_type, **{field: "1.0000000000000000001"}))


def test_the_reason_for_a_huge_quantity_is_short_and_says_the_bound():
    with pytest.raises(InvalidEvent) as refused:
        decode(Fill, raw(Fill, qty="1E+400000"))
    assert refused.value.reason == (
        "invalid Fill: qty must be below 1E+20 in magnitude (at most 20 digits before the point), got 1E+400000"
    )
    # Also as a JSON number, and written out in 25 digits.
    with pytest.raises(InvalidEvent, match="qty must be below 1E"):
        decode(Fill, raw(Fill).replace(b'"qty": "10"', b'"qty": 1E+30'))
    with pytest.raises(InvalidEvent, match="qty must be below 1E"):
        decode(Fill, raw(Fill, qty="1" + "0" * 24))


def test_a_zero_written_with_a_huge_exponent_is_refused_too():
    # QuestDB's column cannot take 0E+30 either (Arrow infers its precision from the exponent).
    with pytest.raises(InvalidEvent, match="fee must be below 1E"):
        decode(Fill, raw(Fill, fee="0E+30"))
    assert decode(Fill, raw(Fill, fee="0E-30")).fee == 0


@pytest.mark.parametrize("event_type", [Fill, Order])
def test_a_notional_beyond_the_bound_is_refused(event_type):
    price = "price" if event_type is Fill else "limit_price"
    with pytest.raises(InvalidEvent, match=rf"qty x {price} = 1E\+20 must be below 1E\+20"):
        decode(event_type, raw(event_type, qty="1E+10", **{price: "1E+10"}))
    event = decode(event_type, raw(event_type, qty="9999999999", **{price: "9999999999.99"}))
    assert event.qty * getattr(event, price) < VALUE_LIMIT


def test_names_and_messages_are_bounded():
    long = "X" * (NAME_CHARS + 1)
    for event_type, field in [(Fill, "fill_id"), (Fill, "account"), (Fill, "venue"), (Fill, "order_id"),
                              (Order, "symbol"), (Quote, "venue"), (MarketTrade, "trade_id"), (Bar, "interval")]:
        with pytest.raises(InvalidEvent, match=rf"{field} must be at most {NAME_CHARS} characters"):
            decode(event_type, raw(event_type, **{field: long}))
    assert decode(Fill, raw(Fill, account="X" * NAME_CHARS)).account == "X" * NAME_CHARS
    padded = raw(Fill, note="x" * EVENT_BYTES)  # an unknown field: ignored, but it weighs
    with pytest.raises(InvalidEvent, match=rf"over the {EVENT_BYTES}-byte bound of an event"):
        decode(Fill, padded)


# -- at the bound: accepted, and written exactly --------------------------------------------


def at_the_bound() -> dict[type, list]:
    """Events of every input type whose values sit at the bound (largest and smallest)."""
    fill = dict(ts=TS, account="A1", symbol="XYZ", side="BUY")
    return {
        Fill: [
            Fill(fill_id="F1", qty=TOP, price=TINY, fee=TOP, **fill),
            Fill(fill_id="F2", qty=TINY, price=TOP, fee=MINUS_TOP, **fill),
        ],
        Order: [
            Order(ts=TS, order_id="O1", account="A1", symbol="XYZ", side="BUY", qty=TOP, order_type="LIMIT",
                  limit_price=TINY),
        ],
        Quote: [Quote(ts=TS, symbol="XYZ", bid=TINY, ask=TOP, bid_size=TOP, ask_size=TINY)],
        MarketTrade: [MarketTrade(ts=TS, symbol="XYZ", price=TOP, size=TOP)],
        Bar: [Bar(ts=TS, symbol="XYZ", interval="1m", open=TINY, high=TOP, low=TINY, close=TOP, volume=TOP,
                  vwap=D("12345678901234567890.123456789012345678"))],
    }


def test_values_at_the_bound_decode_unchanged():
    for events in at_the_bound().values():
        for event in events:
            assert decode(type(event), encode(event)) == event


@pytest.mark.parametrize("table", sorted(name for name, layout in LAYOUTS.items() if layout.rows is None))
def test_values_at_the_bound_are_written_exactly_by_the_questdb_encoder(table):
    """The bus tables; the services' own outputs (rows built from their events) below."""
    layout = LAYOUTS[table]
    events = at_the_bound()[layout.event_type]
    records = [EventRecord(e, "S", i, "subject", TS, 1, None) for i, e in enumerate(events, 1)]
    built = layout.build_columns(records)  # no "Rescaling Decimal value would cause data loss"
    for column in layout.columns:
        if column.kind in ("decimal", "rounded_decimal"):
            got = [None if v is None else D(str(v)) for v in built[column.name].tolist()]
            expected = [getattr(e, column.field or column.name) for e in events]
            if column.kind == "rounded_decimal":  # a bar's vwap: rounded half to even at 12 places
                expected = [None if v is None else v.quantize(TINY, context=EXACT) for v in expected]
            assert got == expected, column.name


def test_ptrc_storage_writes_a_position_near_the_bounds_without_rescaling_errors():
    from posttrade.stores.questdb.layouts import LAYOUTS
    from posttrade.stores.questdb.rows import snapshot_record, trade_rows

    TRADES, SNAPSHOTS = LAYOUTS["ptrc_trades"], LAYOUTS["position_snapshots"]

    feed = Feed()
    updates = []
    for fill in (execution("b1", "BUY", "19.123456789012", 1), execution("s1", "SELL", "0.000000000001", 2),
                 execution("b2", "BUY", "9.999999999999", 3)):
        result = feed(fill)
        assert result.status == "applied"
        updates.append(position_update(result.position, D("9.999999999999"), result.reason, fill.ts, fill, result))
    assert abs(updates[1].realized_pnl_gross) > D("9E+25")  # near the bound of a figure
    rows = [EventRecord(row, "POSITIONS", 1, "s", TS, 1, None) for u in updates for row in trade_rows(u)]
    TRADES.build_columns(rows)
    built = SNAPSHOTS.build_columns([EventRecord(snapshot_record(u), "POSITIONS", 1, "s", TS, 1, None) for u in updates])
    assert D(str(built["realized_pnl_gross"].tolist()[1])) == updates[1].realized_pnl_gross.quantize(TINY, context=EXACT)


def test_the_store_columns_are_built_from_the_shared_constants():
    from posttrade.stores.clickhouse.execution import STORE_PLACES, storable_row, unstorable_reason, FILL_COLUMNS
    from posttrade.stores.questdb.layouts import DECIMAL_SQL
    from posttrade.stores.questdb.pnl_history import DECIMAL_SQL as PNL_SQL, snapshot_decimal

    assert DECIMAL_SQL == PNL_SQL == bounds.QUESTDB_DECIMAL == "DECIMAL(38, 12)"
    assert STORE_PLACES == bounds.CLICKHOUSE_SCALE
    assert any(c.clickhouse == bounds.CLICKHOUSE_DECIMAL for c in FILL_COLUMNS)
    # A bounded value fits both stores' columns as it is ...
    assert decimal_column([TOP, MINUS_TOP, TINY]).tolist() == [TOP, MINUS_TOP, TINY]
    for fill in at_the_bound()[Fill]:
        assert unstorable_reason(fill) is None
    assert storable_row(FILL_COLUMNS[:1] + tuple(c for c in FILL_COLUMNS if c.name == "qty"), ("F1", TOP)) == ("F1", TOP)
    # ... and a figure below 1E+26 fits pnl's history (rounded at 12 places).
    largest = D("99999999999999999999999999.999999999999")
    assert largest < FIGURE_LIMIT and snapshot_decimal(largest) == largest


# -- the core: a fill whose effects would not fit is refused, the book unchanged ------------

BIG = "BIG"
Q = D("5E+18")  # x 19 = 9.5E+19: a notional within the bound of a message


def execution(fill_id, side, price, t, **extra):
    return Fill(ts=TS + t, fill_id=fill_id, account="A", symbol=BIG, side=side, qty=Q, price=D(price), **extra)


class Feed:
    def __init__(self, multiplier=10**6, **kwargs):
        self.book = ExecutionBook({BIG: D(multiplier)}, **kwargs)
        self.seq = 0

    def __call__(self, fill):
        self.seq += 1
        return self.book.receive(fill, self.seq)

    def snapshot(self):
        """The key's position, its live executions and every id record."""
        position = self.book.positions.get("A", BIG)
        history = self.book.history("A", BIG)
        entries = [(e.fill_id, e.fill, e.busted, list(e.amendments)) for e in history.entries] if history else []
        ids = {fid: self.book.id_record(fid) for fid in list(self.book._ids)}
        return position.to_state() if position else None, entries, ids


def test_a_fill_whose_realized_pnl_would_overflow_is_refused_and_leaves_the_book_unchanged():
    feed = Feed()
    # Each round trip loses 5E+18 x 18 x 1E+6 = 9E+25: the second would make it -1.8E+26.
    for r in (feed(execution("b1", "BUY", "19", 1)), feed(execution("s1", "SELL", "1", 2)),
              feed(execution("b2", "BUY", "19", 3))):
        assert r.status == "applied"
    before = feed.snapshot()
    result = feed(execution("s2", "SELL", "1", 4))
    assert result.status == "refused"
    assert result.reason == (
        "the position would not fit the bounds: A/BIG: realized_pnl_gross -180000000000000000000000000 "
        "must be below 1E+26 in magnitude"
    )
    assert feed.snapshot() == before
    assert feed(execution("s2", "SELL", "1", 4)).status == "refused"  # never known: refused again
    assert feed(execution("s3", "SELL", "18", 5)).status == "applied"  # a loss of 5E+24 still fits


def test_a_fill_whose_notional_times_the_multiplier_would_overflow_is_refused():
    feed = Feed(multiplier=10**7)
    result = feed(execution("b1", "BUY", "19", 1))  # 9.5E+19 x 1E+7
    assert result.status == "refused" and "the fill's notional qty x price x multiplier" in result.reason
    assert feed.book.positions.get("A", BIG) is None
    opening = Fill(ts=TS, fill_id="o1", account="A", symbol=BIG, side="BUY", qty=Q, price=D(19), exec_type="OPENING")
    result = feed(opening)
    assert result.status == "refused" and "notional" in result.reason
    assert feed.book.positions.get("A", BIG) is None and feed.book.effective_history("A", BIG) == []


def test_a_late_fill_that_would_push_a_later_one_over_is_refused():
    feed = Feed()
    assert feed(execution("b1", "BUY", "19", 1)).status == "applied"
    assert feed(execution("s1", "SELL", "1", 10)).status == "applied"  # -9E+25
    assert feed(execution("b2", "BUY", "19", 2)).reason == "late"  # s1 now closes half: still -9E+25
    before = feed.snapshot()
    # Late again: it realizes -9E+25 itself, and then s1, which follows it, another -9E+25.
    result = feed(execution("s0", "SELL", "1", 3))
    assert result.status == "refused"
    assert result.reason.startswith("the position would not fit the bounds (at execution s1, which follows it): ")
    assert feed.snapshot() == before
    assert [e.fill_id for e in feed.book.history("A", BIG).entries] == ["b1", "b2", "s1"]


def test_a_correction_or_a_bust_that_would_push_a_later_fill_over_is_refused():
    feed = Feed()
    for fill in (execution("b1", "BUY", "19", 1), execution("s1", "SELL", "1", 2),  # -9E+25
                 execution("b2", "BUY", "1", 3), execution("s2", "SELL", "1", 4)):  # 0
        assert feed(fill).status == "applied"
    before = feed.snapshot()
    correct = Fill(ts=TS + 20, fill_id="c1", account="A", symbol=BIG, side="BUY", qty=Q, price=D(19), fee=D(0),
                   exec_type="CORRECT", ref_fill_id="b2")  # s2 would lose another 9E+25
    result = feed(correct)
    assert result.status == "refused" and "(at execution s2, which follows it)" in result.reason
    assert feed.snapshot()[:2] == before[:2]
    assert feed.book.id_record("c1").status == "refused"  # kept as refused, like any refused amendment
    assert [a.message.fill_id for a in feed.book.refused()] == ["c1"]

    feed = Feed()
    for fill in (execution("b1", "BUY", "1", 1), execution("s1", "SELL", "19", 2),  # +9E+25
                 execution("b2", "BUY", "19", 3), execution("s2", "SELL", "1", 4),  # 0
                 execution("b3", "BUY", "19", 5), execution("s3", "SELL", "1", 6)):  # -9E+25
        assert feed(fill).status == "applied"
    before = feed.snapshot()
    bust = Fill(ts=TS + 20, fill_id="x1", account="A", symbol=BIG, exec_type="BUST", ref_fill_id="s1")
    result = feed(bust)  # without s1's gain: -4.5E+25, then -6.75E+25 at s3
    assert result.status == "refused" and "(at execution s3, which follows it)" in result.reason
    assert feed.snapshot()[:2] == before[:2]
    assert not feed.book.history("A", BIG).entries[1].busted


def test_an_unfit_original_refuses_the_amendments_waiting_for_it():
    feed = Feed(multiplier=10**7)
    # The correction waiting for b1 makes it 9.5E+19 x 1E+7: b1 cannot be applied with it.
    waiting = Fill(ts=TS + 5, fill_id="c1", account="A", symbol=BIG, side="BUY", qty=Q, price=D(19), fee=D(0),
                   exec_type="CORRECT", ref_fill_id="b1")
    assert feed(waiting).status == "pending"
    result = feed(Fill(ts=TS + 1, fill_id="b1", account="A", symbol=BIG, side="BUY", qty=D(1), price=D(1)))
    assert result.status == "refused" and "notional" in result.reason
    assert [(s.amendment.message.fill_id, s.applied) for s in result.settled] == [("c1", False)]
    assert feed.book.pending() == [] and feed.book.id_record("c1").status == "refused"


def test_a_position_holds_at_most_max_open_lots(monkeypatch):
    monkeypatch.setattr(bounds, "MAX_OPEN_LOTS", 3)
    book = ExecutionBook()
    small = [Fill(ts=TS + i, fill_id=f"f{i}", account="A", symbol="X", side="BUY", qty=D(1), price=D(10 + i))
             for i in range(5)]
    statuses = [book.receive(f, i).status for i, f in enumerate(small, 1)]
    assert statuses == ["applied", "applied", "applied", "refused", "refused"]
    assert len(book.positions.get("A", "X").fifo_lots) == 3
    sell = Fill(ts=TS + 10, fill_id="s1", account="A", symbol="X", side="SELL", qty=D(1), price=D(20))
    assert book.receive(sell, 10).status == "applied"  # closes a lot: there is room again
    later = msgspec.structs.replace(small[3], ts=TS + 11)
    assert book.receive(later, 11).status == "applied"


def test_an_execution_takes_at_most_max_amendments(monkeypatch):
    import posttrade.core.history as history

    monkeypatch.setattr(history, "MAX_AMENDMENTS", 2)
    feed = Feed(multiplier=1)

    def correct(fid, ref, price):
        return Fill(ts=TS + 9, fill_id=fid, account="A", symbol=BIG, side="BUY", qty=D(1), price=D(price), fee=D(0),
                    exec_type="CORRECT", ref_fill_id=ref)

    # Waiting for an unknown execution: two may wait, the third is refused.
    assert [feed(correct(f"p{i}", "u1", 2)).status for i in range(3)] == ["pending", "pending", "refused"]
    # Applied to a known one: two corrections, then it takes no more.
    assert feed(execution("b1", "BUY", "19", 1)).status == "applied"
    assert [feed(correct(f"c{i}", "b1", 3 + i)).status for i in range(3)] == ["applied", "applied", "refused"]
    assert feed.book.id_record("c2").reason == "b1 was amended 2 times: the most one execution may be"


def test_a_valuation_beyond_the_bound_is_published_as_unknown():
    position = Position("A", BIG, D(10**6))
    position.apply(execution("b1", "BUY", "1", 1))  # 5E+18 at 1: open cost 5E+18
    update = position_update(position, D("99999999"), "fill", TS)  # unrealized ~5E+32
    assert update.unrealized_pnl is None and update.day_pnl is None and update.net_qty == Q
    assert decode(PositionUpdate, encode(update)) == update


# -- one key's state never outgrows the bus ---------------------------------------------------


def test_a_table_value_over_the_payload_bound_is_refused_before_anything_is_written():
    async def main():
        transport = MemoryTransport(max_payload=32 * 1024)
        await transport.connect()
        table = Table("t", bucket="b", value_type=str)
        await table.open(transport)
        bound = bounds.payload_bound(32 * 1024)
        table["small"] = "x"
        table["big"] = "x" * (bound + 1)
        with pytest.raises(ValueTooLarge, match=rf"table t: the value of key 'big' is \d+ bytes, over the {bound}-byte"):
            await table.flush()
        assert transport.buckets.get("b", {}) == {}  # nothing written, not even the small one
        table.rollback(None)  # what the runtime does after the agent's crash
        assert "big" not in table and table.dirty == 0
        table["big"] = "x" * 100
        await table.flush()
        assert len(transport.buckets["b"]) == 1

    asyncio.run(main())


def test_the_payload_bound_leaves_room_for_headers():
    assert bounds.payload_bound(1024 * 1024) == 1024 * 1024 - bounds.HEADER_ROOM
    assert bounds.payload_bound(1024) == 512


# -- ptrc's agent: the refusal is dead-lettered with its reason ------------------------------


def test_ptrc_dead_letters_what_does_not_fit_and_keeps_going():
    from posttrade.agents.positions import PositionKeeper
    from posttrade.streams.events import ComplianceAlert
    from posttrade.app import App
    from posttrade.core.reference import Reference
    from posttrade.streams import subjects

    async def main():
        transport = MemoryTransport()
        app = App("ptrc_bounds", transport)
        app.runtime.poll_timeout_s = 0.02
        keeper = PositionKeeper(app, reference=Reference.from_data({"instruments": {BIG: {"multiplier": 10**6}}}))
        feed = [execution("b1", "BUY", "19", 1), execution("s1", "SELL", "1", 2), execution("b2", "BUY", "19", 3),
                execution("s2", "SELL", "1", 4),  # -1.8E+26: refused
                execution("s3", "SELL", "18", 5)]
        subject = subjects.fill_subject("A", BIG)
        async with app:
            for f in feed[:4]:
                await transport.publish(subject, encode(f))
            await transport.publish(subject, encode(feed[0]).replace(b'"qty":"5E+18"', b'"qty":"1E+400000"'))
            await transport.publish(subject, encode(feed[4]))
            await wait_until(lambda: sum(keeper.outcomes.values()) == 5)
            assert keeper.outcomes == {"fill": 4, "refused": 1}
            position = keeper.book.get("A", BIG)
            assert position.net_qty == 0 and position.realized_pnl_gross == D("-9.5E+25")
            dead = [(msgspec.json.decode(d), h) for st in transport.streams.values() for s, d, h, _ in st.messages
                    if s.startswith("posttrade.dlq.")]
            dead += [(msgspec.json.decode(d), None) for s, d in transport.published_without_stream
                     if s.startswith("posttrade.dlq.")]
            assert sorted(m["fill_id"] for m, _ in dead) == ["b1", "s2"]
            reasons = {m["fill_id"]: h["Posttrade-Reason"] for m, h in dead}
            assert reasons["b1"].startswith("invalid Fill: qty must be below 1E+20")
            assert "realized_pnl_gross" in reasons["s2"] and "must be below 1E+26" in reasons["s2"]
            alerts = [msgspec.json.decode(d, type=ComplianceAlert) for s, d, _, _ in transport.streams["ALERTS"].messages]
            (refused,) = [a for a in alerts if a.rule == "refused_execution"]
            assert refused.fill_id == "s2" and "would not fit the bounds" in refused.message

    asyncio.run(main())


async def wait_until(predicate, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.02)


# -- property: a refused message leaves everything as it was ---------------------------------


def book_state(book: ExecutionBook, *but: str) -> tuple:
    """Everything the book holds, but what concerns the ids `but` (a refused amendment is
    recorded as refused, and so are those that waited for a refused original)."""
    positions = sorted((p.account, p.symbol, msgspec.json.encode(p.to_state())) for p in book.positions)
    histories = []
    for key, history in sorted(book._histories.items()):
        histories.append((
            key, [(e.fill_id, e.fill, e.busted, tuple(e.amendments)) for e in history.openings],
            [(e.fill_id, e.fill, e.busted, tuple(e.amendments)) for e in history.entries],
            [a.message.fill_id for a in history.pending if a.message.fill_id not in but],
            [a.message.fill_id for a in history.refused if a.message.fill_id not in but],
            history.folded, history.newest,
        ))
    ids = {fid: msgspec.json.encode(book.id_record(fid)) for fid in book._ids if fid not in but}
    waiting = {fid: [a.message.fill_id for a in lst] for fid, lst in book._waiting.items() if fid not in but}
    return positions, histories, ids, waiting


def test_a_refused_message_leaves_the_book_as_it_was_and_the_book_a_fresh_fold():
    """Random feeds of big fills (each near the bound of a message) through every path:
    in order, late, corrected, busted, openings, amendments before their original."""
    import random

    from posttrade.core.positions import PositionBook

    seen = {"refused": 0, "late": 0, "amended": 0, "opening": 0}
    for seed in range(250):
        rng = random.Random(seed)
        book = ExecutionBook({BIG: D(10**6)}, checkpoint_every=4)
        messages = []
        for seq in range(1, 26):
            fid = f"m{seq}"
            kind = rng.choice(["NEW", "NEW", "CORRECT", "BUST", "OPENING"])
            side, qty, price = rng.choice(["BUY", "SELL"]), D(rng.choice(["5E+18", "2.5E+18", "1"])), D(rng.choice("1 10 19".split()))
            ref = f"m{rng.randint(0, 14)}"
            ref = "m99" if ref == fid else ref  # never itself (m99 never comes)
            if kind == "NEW":
                fill = Fill(ts=TS + rng.randint(0, 30), fill_id=fid, account="A", symbol=BIG, side=side, qty=qty, price=price)
            elif kind == "OPENING":
                fill = Fill(ts=TS, fill_id=fid, account="A", symbol=BIG, side=side, qty=qty, price=price, exec_type="OPENING")
            elif kind == "CORRECT":
                fill = Fill(ts=TS + 40, fill_id=fid, account="A", symbol=BIG, side=side, qty=qty, price=price, fee=D(0),
                            exec_type="CORRECT", ref_fill_id=ref)
            else:
                fill = Fill(ts=TS + 40, fill_id=fid, account="A", symbol=BIG, exec_type="BUST", ref_fill_id=ref)
            messages.append(fill)
            waiting = [a.message.fill_id for a in book._waiting.get(fid, [])]  # refused with a refused original
            before = book_state(book, fid, *waiting)
            result = book.receive(fill, seq)
            if result.status == "refused" and "bounds" in (result.reason or ""):
                seen["refused"] += 1
                seen["late"] += "follows it" in result.reason
                seen["amended"] += kind in ("CORRECT", "BUST")
                seen["opening"] += kind == "OPENING"
                assert sorted(s.amendment.message.fill_id for s in result.settled) == sorted(waiting)
                assert all(not s.applied and "was refused" in s.amendment.reason for s in result.settled)
                assert book_state(book, fid, *waiting) == before, (seed, messages)
            # The position is a fresh fold over the effective history, and every step fits.
            position = book.positions.get("A", BIG)
            fresh = PositionBook({BIG: D(10**6)})
            for f in book.effective_history("A", BIG):
                gross = fresh.get("A", BIG).realized_pnl_gross if fresh.get("A", BIG) else D(0)
                assert bounds.step_problem(fresh.apply(f), f, gross) is None, (seed, messages)
            got = fresh.get("A", BIG) or Position("A", BIG, D(10**6))
            if position is not None:
                for name in ("net_qty", "open_cost", "realized_pnl_gross", "fifo_lots", "fifo_realized_pnl_gross"):
                    assert getattr(position, name) == getattr(got, name), (seed, name, messages)
    # The feeds did reach the bounds, on every path.
    assert seen["refused"] > 50 and min(seen.values()) > 5, seen
