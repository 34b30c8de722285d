"""The report tables: days, valuations (live and from snapshots), rows, CSV and Parquet."""

from __future__ import annotations

import io
from dataclasses import fields
from datetime import date, datetime, time, timezone
from decimal import Decimal as D
from zoneinfo import ZoneInfo

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from posttrade.core.positions import PositionBook
from posttrade.core.reports import (
    COLUMNS,
    STORED_DECIMAL,
    SnapshotRow,
    TradingDay,
    Valuation,
    arrow_table,
    blotter_from_questdb_csv,
    csv_bytes,
    daily_pnl_rows,
    decimal_type,
    iso_ns,
    parquet_bytes,
    parse_iso_ns,
    parse_report_name,
    positions_rows,
    report_name,
    snapshot_row,
    valuations_from_live,
    valuations_from_snapshots,
)
from posttrade.core.valuation import value_position
from posttrade.streams.events import Fill

T0 = 1_795_000_000_000_000_000
HOUR = 3_600_000_000_000


def worked_example_book() -> PositionBook:
    book = PositionBook({"ES": D(50)})
    for i, (side, qty, price) in enumerate([("BUY", 10, 100), ("BUY", 10, 110), ("SELL", 15, 120), ("SELL", 10, 90)]):
        book.apply(Fill(ts=T0 + i, fill_id=f"f{i}", account="ACC1", symbol="XYZ", side=side, qty=D(qty),
                        price=D(price), fee=D(1)))
    book.apply(Fill(ts=T0 + 9, fill_id="es", account="ACC1", symbol="ES", side="BUY", qty=D(2), price=D("5000.25")))
    book.apply(Fill(ts=T0 + 9, fill_id="z", account="ACC2", symbol="ZZZ", side="SELL", qty=D(1), price=D(7)))
    return book


# -- names and days -------------------------------------------------------------------------


def test_report_names_round_trip():
    name = report_name("reports", date(2026, 11, 23), "trade_blotter", "csv")
    assert name == "reports/2026-11-23/trade_blotter.csv"
    assert parse_report_name("2026-11-23/trade_blotter.csv") == (date(2026, 11, 23), "trade_blotter", "csv")
    assert parse_report_name("2026-11-23/other.csv") is None
    assert parse_report_name("2026-13-23/positions.csv") is None
    assert parse_report_name("2026-11-23/positions.xlsx") is None


def test_trading_day_and_its_window_in_utc():
    calendar = TradingDay()
    assert calendar.of(datetime(2026, 11, 23, 0, 0, tzinfo=timezone.utc)) == date(2026, 11, 23)
    assert calendar.of(datetime(2026, 11, 22, 23, 59, tzinfo=timezone.utc)) == date(2026, 11, 22)
    start, end = calendar.window_ns(date(2026, 11, 23))
    assert iso_ns(start) == "2026-11-23T00:00:00.000000000Z" and end - start == 24 * HOUR


def test_trading_day_starting_at_17_new_york_spans_a_dst_change():
    calendar = TradingDay(ZoneInfo("America/New_York"), time(17, 0))
    # A day is named by the date it starts on (as ptrc's calendar does): 17:30 on the
    # 30th is in the day of the 30th, 16:59 still in the 29th's.
    assert calendar.of(datetime(2026, 10, 30, 21, 30, tzinfo=timezone.utc)) == date(2026, 10, 30)
    assert calendar.of(datetime(2026, 10, 30, 20, 59, tzinfo=timezone.utc)) == date(2026, 10, 29)
    start, end = calendar.window_ns(date(2026, 10, 31))  # DST ends on 2026-11-01 at 02:00
    assert iso_ns(start) == "2026-10-31T21:00:00.000000000Z"
    assert iso_ns(end) == "2026-11-01T22:00:00.000000000Z" and end - start == 25 * HOUR


def test_iso_ns_round_trips_nanoseconds():
    for ns in (T0, T0 + 1, T0 + 999_999_999):
        assert parse_iso_ns(iso_ns(ns)) == ns
    assert parse_iso_ns("2026-11-23T10:00:00.5Z") == parse_iso_ns("2026-11-23T10:00:00Z") + 500_000_000
    assert parse_iso_ns("2026-11-23T10:00:00Z") % 1_000_000_000 == 0


# -- valuations and rows ----------------------------------------------------------------------------


def test_live_valuation_of_the_worked_example():
    book = worked_example_book()
    marks = {"XYZ": D(95), "ES": D("5010.25")}
    (es, xyz, zzz) = valuations_from_live(list(book), marks.get, valued_at=T0 + 100)
    assert (xyz.account, xyz.symbol, xyz.net_qty, xyz.avg_open_price) == ("ACC1", "XYZ", D(-5), D(90))
    assert (xyz.realized_pnl_gross, xyz.fees, xyz.realized_pnl_net) == (D(150), D(4), D(146))
    assert (xyz.unrealized_pnl, xyz.total_pnl, xyz.day_pnl) == (D(-25), D(121), D(121))
    assert es.unrealized_pnl == D(1000) and es.market_value == D("501025.00")  # 2 x 5010.25 x 50
    assert zzz.mark is None and zzz.unrealized_pnl is None and zzz.total_pnl is None and zzz.market_value is None


def test_daily_pnl_rows_carry_account_totals_and_an_unknown_value_stays_unknown():
    book = worked_example_book()
    rows = daily_pnl_rows(date(2026, 11, 23), valuations_from_live(list(book), {"XYZ": D(95), "ES": D(5000)}.get, T0))
    assert [(r["level"], r["account"], r["symbol"]) for r in rows] == [
        ("position", "ACC1", "ES"), ("position", "ACC1", "XYZ"), ("account", "ACC1", None),
        ("position", "ACC2", "ZZZ"), ("account", "ACC2", None),
    ]
    acc1 = rows[2]
    assert (acc1["realized_pnl_net"], acc1["unrealized_pnl"], acc1["total_pnl"]) == (D(146), D(-50), D(96))
    acc2 = rows[4]
    assert acc2["realized_pnl_net"] == 0 and acc2["unrealized_pnl"] is None and acc2["total_pnl"] is None


def test_positions_rows_are_the_open_positions():
    book = worked_example_book()
    book.apply(Fill(ts=T0 + 20, fill_id="flat", account="ACC2", symbol="ZZZ", side="BUY", qty=D(1), price=D(6)))
    rows = positions_rows(date(2026, 11, 23), valuations_from_live(list(book), {"ES": D(5000)}.get, T0))
    assert [(r["account"], r["symbol"], r["net_qty"], r["multiplier"], r["market_value"]) for r in rows] == [
        ("ACC1", "ES", D(2), D(50), D(500000)), ("ACC1", "XYZ", D(-5), D(1), None),
    ]


def snap(ts, account, symbol, reason, net, avg, realized_net, mark, unrealized, day_pnl=None) -> SnapshotRow:
    d = lambda v: None if v is None else D(v)  # noqa: E731
    return SnapshotRow(ts=ts, account=account, symbol=symbol, reason=reason, net_qty=D(net), avg_open_price=d(avg),
                       realized_pnl_gross=D(realized_net), fees=D(0), realized_pnl_net=D(realized_net),
                       mark=d(mark), unrealized_pnl=d(unrealized), day_pnl=d(day_pnl))


DAY = 24 * HOUR
START = T0 - T0 % DAY  # a UTC midnight


def test_close_of_a_past_day_is_the_roll_into_the_next_and_day_pnl_the_change_between_rolls():
    rolls = [
        snap(START + 5, "A", "OLD", "roll", "10", "100", "0", "101", "10"),  # opens the day: total 10
        snap(START + DAY + 5, "A", "OLD", "roll", "10", "100", "3", "99", "-10"),  # closes it: total -7
        snap(START + DAY + 6, "A", "NEW", "roll", "-2", "50", "0", "49", "2"),  # first traded that day
        snap(START + 2 * DAY + 5, "A", "OLD", "roll", "0", None, "9", "1", "0"),  # the next day's close: ignored
    ]
    latest = [snap(START + DAY - 7, "A", "OLD", "fill", "10", "100", "3", "98", "-20", "-27")]
    (new, old) = valuations_from_snapshots(rolls, latest, (START, START + DAY), START + 2 * DAY, {"NEW": D(5)})
    assert (old.symbol, old.net_qty, old.mark, old.unrealized_pnl, old.total_pnl, old.day_pnl, old.valued_at) == (
        "OLD", D(10), D(99), D(-10), D(-7), D(-17), START + DAY + 5)
    assert (new.symbol, new.day_pnl, new.multiplier, new.market_value) == ("NEW", D(2), D(5), D(-490))


def test_without_a_roll_into_the_next_day_the_last_snapshot_of_the_day_is_shown_as_recorded():
    latest = [snap(START + 100, "A", "X", "fill", "4", "10", "1", "11", "4", "5")]
    (only,) = valuations_from_snapshots([], latest, (START, START + DAY), START + 2 * DAY, {})
    assert (only.net_qty, only.unrealized_pnl, only.day_pnl, only.valued_at) == (D(4), D(4), D(5), START + 100)


def test_day_pnl_is_unknown_when_ptrc_did_not_roll_into_the_day():
    rolls = [snap(START + DAY + 5, "A", "X", "roll", "1", "10", "0", "12", "2")]
    (only,) = valuations_from_snapshots(rolls, [], (START, START + DAY), START + 2 * DAY, {})
    assert only.total_pnl == D(2) and only.day_pnl is None


def test_snapshot_rows_from_questdb_json():
    row = snapshot_row({
        "ts": "2026-11-23T10:00:00.000000007Z", "account": "A", "symbol": "X", "reason": "fill",
        "net_qty": "-5.000000000000", "avg_open_price": "90.000000000000", "realized_pnl_gross": "150.000000000000",
        "fees": "4.000000000000", "realized_pnl_net": "146.000000000000", "mark": None, "unrealized_pnl": None,
        "day_pnl": None,
    })
    assert row.ts % 1_000_000_000 == 7 and row.net_qty == D(-5) and row.mark is None and row.total_pnl is None


# -- encodings ------------------------------------------------------------------------------------


def test_csv_uses_canonical_decimals_iso_timestamps_and_empty_nulls():
    rows = [{"date": "2026-11-23", "level": "account", "account": "A,B", "symbol": None, "net_qty": None,
             "mark": None, "realized_pnl_gross": D("225.00"), "fees": D("0.10"), "realized_pnl_net": D("224.9"),
             "unrealized_pnl": D("-0E-12"), "total_pnl": None, "day_pnl": D("1E+2"), "valued_at": T0 + 1}]
    text = csv_bytes(COLUMNS["daily_pnl"], rows).decode()
    header, line = text.splitlines()
    assert header == ("date,level,account,symbol,net_qty,mark,realized_pnl_gross,fees,realized_pnl_net,"
                      "unrealized_pnl,total_pnl,day_pnl,valued_at,currency,base_currency,fx_rate,"
                      "realized_pnl_gross_base,fees_base,realized_pnl_net_base,unrealized_pnl_base,total_pnl_base,"
                      "day_pnl_base,missing_rates")
    assert line == f'2026-11-23,account,"A,B",,,,225,0.1,224.9,0,,100,{iso_ns(T0 + 1)},,,,,,,,,,'


def test_arrow_and_parquet_keep_every_decimal_exactly():
    rows = [
        {"ts": T0, "alert_id": "a"},
    ]
    table = arrow_table(COLUMNS["compliance"], rows)
    assert table.schema.field("ts").type == pa.timestamp("ns", tz="UTC")
    values = [D("1.5"), D("-0.000000000000001"), None, D("123456789012345678901.5")]
    assert decimal_type(values) == pa.decimal128(38, 15)
    assert decimal_type([D("1" * 30 + ".5")]) == pa.decimal256(76, 12)
    assert decimal_type([D(1), None]) == STORED_DECIMAL
    rows = [{"date": "d", "account": "A", "symbol": "S", "net_qty": v, "valued_at": T0} for v in values]
    back = pq.read_table(io.BytesIO(parquet_bytes(arrow_table(COLUMNS["positions"], rows))))
    assert back.column("net_qty").to_pylist() == values
    assert back.column("valued_at").cast(pa.int64()).to_pylist() == [T0] * 4


def test_an_empty_table_still_has_its_columns_and_types():
    table = arrow_table(COLUMNS["positions"], [])
    assert table.num_rows == 0 and table.column_names == [name for name, _ in COLUMNS["positions"]]
    assert table.schema.field("net_qty").type == STORED_DECIMAL


QUESTDB_CSV = (
    b'"ts","fill_id","account","symbol","side","qty","price","fee","realized_pnl_fill","order_id","venue","net_qty_after",'
    b'"exec_type","ref_fill_id","state"\r\n'
    b'"2026-11-23T10:00:00.000000001Z","f1","A","X","BUY","10.000000000000","100.123456789012","1.000000000000",'
    b'"0.000000000000","o1","","10.000000000000","NEW",,"corrected"\r\n'
    b'"2026-11-23T10:00:01.000000000Z","null","A","X","SELL","4.000000000000","101.000000000000","-0.010000000000",'
    b'null,"o""2","XNAS","6.000000000000","CORRECT","f1","amendment"\r\n'
)


def test_the_blotter_is_read_from_questdb_csv_exactly():
    table = blotter_from_questdb_csv(QUESTDB_CSV)
    assert table.schema.field("qty").type == STORED_DECIMAL
    assert table.column("ts").cast(pa.int64()).to_pylist() == [
        parse_iso_ns("2026-11-23T10:00:00.000000001Z"), parse_iso_ns("2026-11-23T10:00:01Z")]
    assert table.column("price").to_pylist() == [D("100.123456789012"), D(101)]
    assert table.column("fill_id").to_pylist() == ["f1", "null"]  # quoted: text, not null
    assert table.column("realized_pnl_fill").to_pylist() == [D(0), None]
    assert table.column("order_id").to_pylist() == ["o1", 'o"2']
    assert table.column("venue").to_pylist() == ["", "XNAS"]
    assert table.column("state").to_pylist() == ["corrected", "amendment"]
    assert table.column("ref_fill_id").to_pylist()[1] == "f1"


@pytest.mark.parametrize("kind", ["daily_pnl", "positions", "trade_blotter", "compliance"])
def test_every_report_kind_has_columns(kind):
    assert COLUMNS[kind] and all(k in ("string", "decimal", "timestamp", "int") for _, k in COLUMNS[kind])


def test_a_live_valuation_carries_the_core_valuation_of_the_position():
    book = worked_example_book()
    for position in book:
        for mark in (None, D(95)):
            value = value_position(position, mark)
            line = Valuation.of(value, valued_at=T0)
            assert line.valued_at == T0
            own = {"valued_at", "market_value_base"}  # the report's own: market value in base
            assert all(getattr(line, f.name) == getattr(value, f.name) for f in fields(Valuation) if f.name not in own)
            assert line.market_value_base == (None if value.market_value is None else value.market_value)  # all USD


def test_a_stored_flat_position_needs_no_mark():
    row = snap(START + 5, "A", "X", "fill", "0", None, "9", None, None)
    assert row.total_pnl == D(9)  # unrealized of a flat position is 0, stored or not
    (only,) = valuations_from_snapshots([], [row], (START, START + DAY), START + 2 * DAY, {})
    assert (only.unrealized_pnl, only.total_pnl, only.market_value) == (D(0), D(9), D(0))
