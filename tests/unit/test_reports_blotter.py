"""The trade blotter kept during the day: fingerprints, cells, plans (`posttrade.core.reports`),
chunk files (`posttrade.agents.reports`), and Parquet files joined by their row groups
(`posttrade.stores.parquet`). No servers."""

from __future__ import annotations

import io
from datetime import date, time
from decimal import Decimal as D
from zoneinfo import ZoneInfo

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from posttrade.agents.reports import chunk_head_size, decode_chunk_head, encode_chunk
from posttrade.core.exact import EXACT, format_decimal
from posttrade.core.reports import (
    BLOTTER_CSV_HEADER,
    NO_ROWS,
    ChunkHead,
    Fingerprint,
    TradingDay,
    arrow_table,
    blotter_from_questdb_csv,
    blotter_parquet,
    canonical_decimal,
    cell_bounds,
    csv_bytes,
    empty_blotter,
    encode_report,
    fingerprint_of,
    iso_ns,
    plan_blotter,
)
from posttrade.stores.parquet import parquet_layout, stitch_parquet

T0 = 1_795_132_800_000_000_000  # 2026-11-20T00:00:00Z
MINUTE = 60_000_000_000
CELL = 5 * MINUTE


def blotter_rows(n: int, first: int = 0, step: int = 7 * MINUTE // 10) -> pa.Table:
    """n fills, one every `step` ns, with decimals of a few shapes and some nulls."""
    index = range(first, first + n)
    return pa.table({
        "ts": pa.array([T0 + i * step for i in index], pa.int64()).cast(pa.timestamp("ns", tz="UTC")),
        "fill_id": [f"f{i}" for i in index],
        "account": [f"ACC{i % 3}" for i in index],
        "symbol": [f"S{i % 5}" for i in index],
        "side": ["BUY" if i % 2 else "SELL" for i in index],
        "qty": pa.array([D(i % 17 + 1) for i in index], pa.decimal128(38, 12)),
        "price": pa.array([D(10_000 + i).scaleb(-4) for i in index], pa.decimal128(38, 12)),
        "fee": pa.array([None if i % 11 == 0 else D(i % 7 - 2).scaleb(-2) for i in index], pa.decimal128(38, 12)),
        "realized_pnl_fill": pa.array([D(i * 37 % 1000 - 500).scaleb(-12) for i in index], pa.decimal128(38, 12)),
        "order_id": [None if i % 13 == 0 else f"o{i // 2}" for i in index],
        "venue": ["XNAS" if i % 3 else "XNYS" for i in index],
        "net_qty_after": pa.array([D(i % 40 - 20) for i in index], pa.decimal128(38, 12)),
        "exec_type": ["CORRECT" if i % 19 == 0 else "NEW" for i in index],
        "ref_fill_id": [f"f{i - 1}" if i % 19 == 0 else None for i in index],
        "state": ["amendment" if i % 19 == 0 else "active" for i in index],
    }, schema=empty_blotter().schema)


# -- fingerprints and cells -----------------------------------------------------------------


def test_a_fingerprint_is_the_row_count_and_exact_sums_and_adds_up():
    table = blotter_rows(30)
    whole = fingerprint_of(table)
    assert whole.rows == 30
    assert whole.sums[0] == sum(table.column("qty").to_pylist())
    assert whole.sums[2] == sum(v for v in table.column("fee").to_pylist() if v is not None)  # nulls ignored
    parts = fingerprint_of(table.slice(0, 11)) + fingerprint_of(table.slice(11))
    assert parts == whole
    assert fingerprint_of(empty_blotter()) == NO_ROWS and NO_ROWS + whole == whole
    assert Fingerprint.from_json(whole.to_json()) == whole
    # one cent more anywhere, or one row more, is another fingerprint
    assert Fingerprint(whole.rows, (whole.sums[0] + D("0.01"), *whole.sums[1:])) != whole


def test_cells_count_from_the_day_start_and_the_last_one_may_be_short():
    assert cell_bounds(0, 12, 5) == [(0, 5), (5, 10), (10, 12)]
    assert cell_bounds(3, 3, 5) == []
    start, end = TradingDay(ZoneInfo("America/New_York"), time(17, 0)).window_ns(date(2026, 10, 31))  # 25 hours
    cells = cell_bounds(start, end, 3600 * 10**9)
    assert len(cells) == 25 and cells[0][0] == start and cells[-1][1] == end


# -- plans ------------------------------------------------------------------------------------

CELLS = cell_bounds(T0, T0 + 12 * CELL, CELL)


def fp(rows: int, qty: str = "0") -> Fingerprint:
    return Fingerprint(rows, (D(qty),) + (None,) * 4) if rows else NO_ROWS


def head(lo_cell: int, hi_cell: int, fingerprint: Fingerprint, exported_at: int = 1) -> ChunkHead:
    return ChunkHead(lo=CELLS[lo_cell][0], hi=CELLS[hi_cell - 1][1], fingerprint=fingerprint, csv_size=0,
                     parquet_size=0, layout=None, exported_at=exported_at)


def shape(pieces):
    """(first cell, cell after the last, from a chunk?, rows) per piece."""
    first = {lo: i for i, (lo, _) in enumerate(CELLS)}
    after = {hi: i + 1 for i, (_, hi) in enumerate(CELLS)}
    return [(first[p.lo], after[p.hi], p.chunk is not None, p.rows) for p in pieces]


def test_without_chunks_the_cells_with_rows_are_exported_together_up_to_the_row_limit():
    stored = {CELLS[i][0]: fp(rows) for i, rows in {1: 10, 2: 10, 4: 5, 5: 30, 9: 1}.items()}
    # Empty cells inside a run do not end it (one query instead of two); cell 5 would
    # take the first run over 40 rows, so it starts the next; trailing empty cells and
    # empty cells before any run are left out.
    assert shape(plan_blotter(CELLS, stored, [], max_export_rows=40)) == [(1, 5, False, 25), (5, 10, False, 31)]
    assert shape(plan_blotter(CELLS, {}, [], max_export_rows=40)) == []


def test_a_chunk_is_used_while_questdb_still_has_exactly_its_rows():
    stored = {CELLS[i][0]: fp(10, "5") for i in range(4)}
    chunks = [head(0, 2, fp(20, "10")), head(2, 4, fp(20, "10"))]
    assert shape(plan_blotter(CELLS, stored, chunks, 100)) == [(0, 2, True, 20), (2, 4, True, 20)]
    # a late fill in cell 3: its chunk no longer matches and cells 2-3 are exported again
    late = {**stored, CELLS[3][0]: fp(11, "6")}
    assert shape(plan_blotter(CELLS, late, chunks, 100)) == [(0, 2, True, 20), (2, 4, False, 21)]
    # a number rewritten, same count: still another fingerprint
    rewritten = {**stored, CELLS[0][0]: fp(10, "5.000000000001")}
    assert shape(plan_blotter(CELLS, rewritten, chunks, 100)) == [(0, 2, False, 20), (2, 4, True, 20)]


def test_chunks_off_the_cell_grid_or_over_emptied_cells_are_not_used():
    stored = {CELLS[0][0]: fp(3)}
    off_grid = ChunkHead(lo=CELLS[0][0], hi=CELLS[0][0] + 1, fingerprint=fp(3), csv_size=0, parquet_size=0,
                         layout=None, exported_at=1)
    assert shape(plan_blotter(CELLS, stored, [off_grid], 100)) == [(0, 1, False, 3)]
    gone = head(5, 6, fp(4))  # QuestDB has nothing there any more (a dropped partition)
    assert shape(plan_blotter(CELLS, stored, [gone], 100)) == [(0, 1, False, 3)]


def test_of_overlapping_chunks_the_first_then_the_newest_is_used():
    stored = {CELLS[i][0]: fp(1) for i in range(4)}
    old, new = head(0, 2, fp(2), exported_at=1), head(0, 2, fp(2), exported_at=2)
    overlapping = head(1, 4, fp(3), exported_at=3)
    pieces = plan_blotter(CELLS, stored, [old, overlapping, new], 100)
    assert shape(pieces) == [(0, 2, True, 2), (2, 4, False, 2)]
    assert pieces[0].chunk is new


# -- chunk files ------------------------------------------------------------------------------


def test_a_chunk_file_round_trips_and_a_cut_one_is_refused():
    table = blotter_rows(20)
    parquet = blotter_parquet(table)
    chunk = ChunkHead(lo=T0, hi=T0 + CELL, fingerprint=fingerprint_of(table), csv_size=7, parquet_size=len(parquet),
                      layout=parquet_layout(parquet), exported_at=99)
    data = b"".join(encode_chunk(chunk, b"a,b\r\n1\r", parquet))
    size = chunk_head_size(data[:12])
    assert decode_chunk_head(data[:size], len(data)) == chunk
    assert data[size:size + 7] == b"a,b\r\n1\r" and data[size + 7:] == parquet
    with pytest.raises(ValueError):
        decode_chunk_head(data[:size], len(data) - 1)
    with pytest.raises(ValueError):
        chunk_head_size(b"PAR1" + data[4:12])


# -- Parquet files joined by row groups ----------------------------------------------------------


def test_joined_parquet_files_read_back_as_the_concatenated_rows(tmp_path):
    pieces = [blotter_rows(n, first) for n, first in ((5, 0), (40, 5), (1, 45), (300, 46))]
    files = [blotter_parquet(t) for t in pieces]
    joined = b"".join(stitch_parquet([(f, parquet_layout(f)) for f in files]))
    expected = pa.concat_tables(pieces)
    back = pq.read_table(io.BytesIO(joined))
    assert back.equals(expected) and back.schema.equals(empty_blotter().schema)
    meta = pq.ParquetFile(io.BytesIO(joined)).metadata
    assert (meta.num_rows, meta.num_row_groups) == (346, 4)
    # each row group keeps its own statistics of ts
    stats = meta.row_group(3).column(0).statistics
    assert (stats.min, stats.max) == (pieces[3].column("ts")[0].as_py(), pieces[3].column("ts")[-1].as_py())
    # another reader (DuckDB's own Parquet code) agrees
    path = tmp_path / "joined.parquet"
    path.write_bytes(joined)
    assert duckdb.sql(f"SELECT count(*), sum(qty), max(fill_id) FROM read_parquet('{path}')").fetchall() == [
        (346, sum(expected.column("qty").to_pylist()), "f99")]


def test_more_than_fifteen_row_groups_and_one_file_alone():
    files = [blotter_parquet(blotter_rows(3, 3 * i)) for i in range(40)]
    joined = b"".join(stitch_parquet([(f, parquet_layout(f)) for f in files]))
    meta = pq.ParquetFile(io.BytesIO(joined)).metadata
    assert (meta.num_rows, meta.num_row_groups) == (120, 40)
    assert pq.read_table(io.BytesIO(joined)).column("fill_id").to_pylist() == [f"f{i}" for i in range(120)]
    assert b"".join(stitch_parquet([(files[0], parquet_layout(files[0]))])) == files[0]  # nothing to move


def test_a_layout_refuses_what_cannot_be_joined():
    sink = pa.BufferOutputStream()
    pq.write_table(blotter_rows(5), sink, write_page_index=True)
    with pytest.raises(ValueError, match="page indexes"):
        parquet_layout(sink.getvalue().to_pybytes())
    with pytest.raises(ValueError):
        parquet_layout(b"not parquet at all")


def test_blotter_csv_header_is_questdbs():
    assert BLOTTER_CSV_HEADER.startswith(b'"ts","fill_id","account"') and BLOTTER_CSV_HEADER.endswith(b'"net_qty_after","exec_type","ref_fill_id","state"\r\n')
    assert blotter_from_questdb_csv(BLOTTER_CSV_HEADER).num_rows == 0


# -- report encodings ------------------------------------------------------------------------------

decimals = st.decimals(allow_nan=False, allow_infinity=False, places=None, min_value=D("-1e30"), max_value=D("1e30"))


@given(st.one_of(decimals, st.builds(lambda d, e: d.scaleb(e), decimals, st.integers(-40, 40))))
@settings(max_examples=400, deadline=None)
def test_canonical_decimal_is_format_decimal(value):
    assert canonical_decimal(value) == format_decimal(value)


@given(st.lists(st.integers(0, 4_102_444_800 * 10**9), max_size=20))
@settings(deadline=None)
def test_report_times_are_iso_ns(values):
    rows = [{"ts": v, "alert_id": "a"} for v in values]
    lines = csv_bytes((("ts", "timestamp"),), rows).decode().splitlines()[1:]
    assert lines == [iso_ns(v) for v in values]


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([D("225.00"), D("0.1"), None], pa.decimal128(38, 12)),
        ([D("0.0000000000001")], pa.decimal128(38, 13)),  # needs a 13th place
        ([D("0.6250000000000000")], pa.decimal128(38, 12)),  # trailing zeros are not needed
        ([D("1" * 26 + ".5")], pa.decimal128(38, 12)),
        ([D("1" * 27)], pa.decimal256(76, 12)),  # 27 + 12 digits do not fit 38
        ([D("-1" + "0" * 30), D("0.00000000000000001")], pa.decimal256(76, 17)),
        ([None, None], pa.decimal128(38, 12)),
    ],
)
def test_report_decimals_get_the_type_they_need_and_keep_their_value(values, expected):
    rows = [{"date": "d", "account": "A", "symbol": "S", "net_qty": v, "valued_at": T0} for v in values]
    table = arrow_table((("net_qty", "decimal"),), rows)
    assert table.schema.field("net_qty").type == expected
    assert table.column("net_qty").to_pylist() == values
    csv_text, parquet = encode_report((("account", "string"), ("net_qty", "decimal")), rows)
    assert csv_text.decode().splitlines()[1:] == ["A," + ("" if v is None else format_decimal(v)) for v in values]
    assert pq.read_table(io.BytesIO(parquet)).column("net_qty").to_pylist() == values


def test_a_decimal_beyond_parquets_76_digits_is_refused():
    with pytest.raises(ValueError, match="76"):
        arrow_table((("x", "decimal"),), [{"x": D("1" * 70 + ".5")}])


def test_fingerprint_sums_do_not_wrap_around_past_38_digits():
    table = blotter_rows(20)
    big = D("9" * 26 + "." + "9" * 12)
    table = table.set_column(5, "qty", pa.array([big] * 20, pa.decimal128(38, 12)))
    assert fingerprint_of(table).sums[0] == EXACT.multiply(big, 20)  # decimal128 arithmetic would have wrapped
    assert fingerprint_of(table).sums[3] == pc.sum(table.column("realized_pnl_fill")).as_py()


# The report encoders before the one-pass rewrite (csv per cell, Arrow per value): the
# new ones must write the same CSV bytes and the same values.


def _former_csv_bytes(columns, rows) -> bytes:
    import csv as csv_module

    def cell(value, kind):
        if value is None:
            return ""
        if kind == "decimal":
            return format_decimal(value)
        if kind == "timestamp":
            return iso_ns(value)
        return str(value)

    out = io.StringIO()
    writer = csv_module.writer(out)
    writer.writerow([name for name, _ in columns])
    for row in rows:
        writer.writerow([cell(row.get(name), kind) for name, kind in columns])
    return out.getvalue().encode("utf-8")


# Up to 20 fractional digits and 18 integer ones: wider than the stored 12 places, so
# both the usual decimal128(38, 12) and the wider types are exercised.
money = st.one_of(st.none(), st.builds(
    lambda d, e: d.scaleb(e),
    st.decimals(allow_nan=False, allow_infinity=False, places=6, min_value=D("-1e12"), max_value=D("1e12")),
    st.integers(-14, 6)))
texts = st.one_of(st.none(), st.text(max_size=8))


@given(st.lists(st.fixed_dictionaries({
    "date": st.just("2026-11-20"), "level": st.sampled_from(["position", "account"]), "account": texts,
    "symbol": texts, "net_qty": money, "mark": money, "realized_pnl_gross": money, "fees": money,
    "realized_pnl_net": money, "unrealized_pnl": money, "total_pnl": money, "day_pnl": money,
    "valued_at": st.integers(0, 4_102_444_800 * 10**9), "currency": texts, "base_currency": texts,
    "fx_rate": money, "realized_pnl_gross_base": money, "fees_base": money, "realized_pnl_net_base": money,
    "unrealized_pnl_base": money, "total_pnl_base": money, "day_pnl_base": money, "missing_rates": texts,
}), max_size=12))
@settings(max_examples=150, deadline=None)
def test_report_files_are_what_the_former_encoder_wrote(rows):
    from posttrade.core.reports import COLUMNS

    columns = COLUMNS["daily_pnl"]
    csv_data, parquet = encode_report(columns, rows)
    assert csv_data == _former_csv_bytes(columns, rows)
    back = pq.read_table(io.BytesIO(parquet))
    for name, kind in columns:
        got = back.column(name).to_pylist()
        if kind == "timestamp":
            got = back.column(name).cast(pa.int64()).to_pylist()
        assert got == [row[name] for row in rows], name
