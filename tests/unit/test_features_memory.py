"""The offline store's periodic work is bounded, not proportional to the history.

`compact` reads only the parts below the size target and writes row groups of
`ROW_GROUP_ROWS`; `event_time_range` reads footers, not the timestamp column; the rows
and the range come out as the whole-history versions gave them (docs/feast_pipeline.md,
"Memory").
"""

from __future__ import annotations

import asyncio
from collections import Counter
from types import SimpleNamespace

import msgspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from posttrade.features.views import ACCOUNT_FEATURES, SYMBOL_TRADE_FEATURES, TIMESTAMP_FIELD
from posttrade.services.feast_pipeline import FeastPipelineConfig, FeaturesSection, build
from posttrade.stores.feast import offline as offline_module
from posttrade.stores.feast.offline import COMPACT_PART_BYTES, OfflineParts, arrow_schema, rows_to_table
from posttrade.streams.memory import MemoryTransport

S = 1_000_000_000
T = 1_763_800_020 * S


def account_rows(start: int, count: int, step_ns: int = S, account: str | None = None) -> list[tuple]:
    return [
        (account or f"ACC{i % 3}", start + i * step_ns + 1_500, float(i), -float(i), None if i % 4 else 0.25, i)
        for i in range(count)
    ]


def all_rows(parts: OfflineParts, view) -> Counter:
    """The view's rows as a multiset (NaN-free: None stays None)."""
    table = parts.read(view)
    return Counter(zip(*(table[name].to_pylist() for name in table.column_names)))


def old_event_time_range(parts: OfflineParts, view) -> tuple[int, int] | None:
    """What event_time_range computed before: min/max over the whole timestamp column."""
    files = [str(p) for p in parts.parts(view)]
    if not files:
        return None
    column = ds.dataset(files, schema=arrow_schema(view), format="parquet").to_table(columns=[TIMESTAMP_FIELD])[0]
    if len(column) == 0 or column.null_count == len(column):
        return None
    bounds = pc.min_max(column)
    return bounds["min"].value * 1000, bounds["max"].value * 1000


def write_large(parts: OfflineParts, view, rows: list[tuple], name: str) -> object:
    path = parts.directory(view) / name
    pq.write_table(rows_to_table(view, rows), path)
    return path


def test_compaction_leaves_large_parts_alone_and_keeps_every_row(tmp_path, monkeypatch):
    parts = OfflineParts(tmp_path)
    view = ACCOUNT_FEATURES
    parts.ensure(view)
    large = write_large(parts, view, account_rows(T, 3000), f"part-{T:020d}-compact-old.parquet")
    large_bytes = large.stat().st_size
    for k in range(6):
        parts.write(view, account_rows(T + (3000 + 10 * k) * S, 10))
    before = all_rows(parts, view)
    large_stat = large.stat()

    opened = []
    real = pq.ParquetFile

    def recording(path, *args, **kwargs):
        opened.append(str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(offline_module.pq, "ParquetFile", recording)
    assert parts.compact(view, max_parts=3, part_bytes=large_bytes) == 6
    assert str(large) not in opened and len(opened) == 6  # only the small parts were read

    remaining = parts.parts(view)
    assert len(remaining) == 2 and large in remaining
    assert large.stat().st_mtime_ns == large_stat.st_mtime_ns and large.stat().st_ino == large_stat.st_ino
    [merged] = [p for p in remaining if p != large]
    assert "compact" in merged.name and merged.name.startswith(f"part-{T + 3000 * S + 1_000:020d}-")  # stored to the µs
    assert all_rows(parts, view) == before
    assert not [p for p in parts.directory(view).iterdir() if p.name.startswith(".")]
    # Below the part count, or with fewer than two small parts: nothing to do.
    assert parts.compact(view, max_parts=2, part_bytes=large_bytes) == 0
    assert parts.compact(view, max_parts=1, part_bytes=large_bytes) == 0
    # With a target above every part, everything is merged (the old behaviour).
    assert parts.compact(view, max_parts=1, part_bytes=COMPACT_PART_BYTES) == 2
    assert len(parts.parts(view)) == 1 and all_rows(parts, view) == before


def test_a_merged_part_below_the_target_is_merged_again_until_it_reaches_it(tmp_path):
    parts = OfflineParts(tmp_path)
    view = ACCOUNT_FEATURES
    parts.ensure(view)
    target = 40_000
    runs = []
    for run in range(12):
        for k in range(4):
            parts.write(view, account_rows(T + (run * 4 + k) * 1000 * S, 400))
        runs.append(parts.compact(view, max_parts=3, part_bytes=target))
        sizes = [p.stat().st_size for p in parts.parts(view)]
        # At most one part below the target survives a compaction: the newest merge.
        assert sum(size < target for size in sizes) <= 1
    assert max(runs) <= 5  # 4 new parts (+ the one merged part below the target)
    assert len(parts.parts(view)) >= 3  # parts that reached the target stayed
    assert sum(all_rows(parts, view).values()) == 12 * 4 * 400


def test_merged_parts_have_sorted_row_groups_of_bounded_size(tmp_path, monkeypatch):
    monkeypatch.setattr(offline_module, "ROW_GROUP_ROWS", 100)
    parts = OfflineParts(tmp_path)
    view = ACCOUNT_FEATURES
    parts.ensure(view)
    # Parts out of order in time, so a row group must be sorted on its own.
    for k in (3, 1, 2, 0):
        parts.write(view, account_rows(T + k * 10 * S, 70, step_ns=S // 7))
    before = all_rows(parts, view)
    assert parts.compact(view, max_parts=1) == 4
    [merged] = parts.parts(view)
    metadata = pq.read_metadata(merged)
    assert metadata.num_rows == 280
    assert all(metadata.row_group(i).num_rows <= 2 * 100 for i in range(metadata.num_row_groups))
    assert metadata.num_row_groups >= 2
    reader = pq.ParquetFile(merged)
    for i in range(reader.num_row_groups):
        times = reader.read_row_group(i)[TIMESTAMP_FIELD].cast(pa.int64()).to_pylist()
        assert times == sorted(times)
    assert merged.name.startswith(f"part-{T + 1_000:020d}-compact-")
    assert all_rows(parts, view) == before


def test_a_failed_merge_leaves_the_parts_and_no_temp_file(tmp_path, monkeypatch):
    parts = OfflineParts(tmp_path)
    view = ACCOUNT_FEATURES
    parts.ensure(view)
    for k in range(3):
        parts.write(view, account_rows(T + k * 100 * S, 5))
    before = sorted(parts.parts(view))

    def broken(self, table, row_group_size=None):
        raise OSError("disk full")

    monkeypatch.setattr(offline_module.pq.ParquetWriter, "write_table", broken)
    with pytest.raises(OSError):
        parts.compact(view, max_parts=1)
    assert sorted(parts.parts(view)) == before
    assert not [p for p in parts.directory(view).iterdir() if p.name.startswith(".")]


def test_compaction_conforms_an_older_schema(tmp_path):
    parts = OfflineParts(tmp_path)
    view = ACCOUNT_FEATURES
    parts.ensure(view)
    parts.write(view, account_rows(T, 2))
    old = rows_to_table(view, account_rows(T + 100 * S, 2)).drop_columns(["fills_today"])
    pq.write_table(old, parts.directory(view) / f"part-{T + 100 * S:020d}-older.parquet")
    assert parts.compact(view, max_parts=1) == 2
    table = parts.read(view)
    assert table.schema.equals(arrow_schema(view))
    assert sorted(table["fills_today"].to_pylist(), key=lambda v: (v is None, v)) == [0, 1, None, None]


def test_event_time_range_reads_footers_not_the_column(tmp_path, monkeypatch):
    parts = OfflineParts(tmp_path)
    view = SYMBOL_TRADE_FEATURES
    parts.ensure(view)
    parts.write(view, [("ACME", T + 5 * S, 0.1, None, None, 1.0, 1, 1.0, None)])
    parts.write(view, [("ACME", T + 1_001, 0.1, None, None, 1.0, 1, 1.0, None), ("ZZZ", T + 9 * S, None, None, None, 2.0, 1, 1.0, None)])
    expected = old_event_time_range(parts, view)

    def no_scan(*args, **kwargs):
        raise AssertionError("event_time_range scanned the rows")

    monkeypatch.setattr(offline_module.ds, "dataset", no_scan)
    # Stored to the microsecond (rounded down): T + 1_001 ns is T + 1 µs.
    assert parts.event_time_range(view) == expected == (T + 1_000, T + 9 * S)


def test_event_time_range_without_statistics_or_in_other_units(tmp_path):
    parts = OfflineParts(tmp_path)
    view = ACCOUNT_FEATURES
    parts.ensure(view)
    directory = parts.directory(view)
    table = rows_to_table(view, account_rows(T, 5))
    pq.write_table(table, directory / f"part-{T:020d}-nostats.parquet", write_statistics=False)
    nanos = table.set_column(1, TIMESTAMP_FIELD, table[TIMESTAMP_FIELD].cast(pa.timestamp("ns", tz="UTC")))
    nanos = nanos.set_column(1, TIMESTAMP_FIELD, pc.add(nanos[TIMESTAMP_FIELD], pa.scalar(60 * S, pa.duration("ns"))))
    pq.write_table(nanos, directory / f"part-{T + 60 * S:020d}-nanos.parquet", version="2.6")
    millis = table.set_column(1, TIMESTAMP_FIELD, pc.subtract(table[TIMESTAMP_FIELD], pa.scalar(3600 * 10**6, pa.duration("us"))))
    millis = millis.set_column(1, TIMESTAMP_FIELD, millis[TIMESTAMP_FIELD].cast(pa.timestamp("ms", tz="UTC"), safe=False))
    pq.write_table(millis, directory / f"part-{T - 3600 * S:020d}-millis.parquet")
    empty_times = table.set_column(1, TIMESTAMP_FIELD, pa.nulls(len(table), pa.timestamp("us", tz="UTC")))
    pq.write_table(empty_times, directory / f"part-{T + 1:020d}-nulls.parquet")
    assert parts.event_time_range(view) == old_event_time_range(parts, view)
    low, high = parts.event_time_range(view)
    assert low == T - 3600 * S and high == T + 60 * S + 4 * S + 1_000  # the ns part's last row, µs-stored


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(
        st.lists(st.integers(min_value=-10**12, max_value=10**15), min_size=0, max_size=20),
        min_size=1,
        max_size=6,
    ),
    st.integers(min_value=1, max_value=4),
)
def test_event_time_range_equals_the_whole_column_range(tmp_path_factory, batches, compact_after):
    parts = OfflineParts(tmp_path_factory.mktemp("parts"))
    view = ACCOUNT_FEATURES
    parts.ensure(view)
    for batch in batches:
        parts.write(view, [("A", T + offset, 1.0, 1.0, 1.0, 1) for offset in batch])
    assert parts.event_time_range(view) == old_event_time_range(parts, view)
    parts.compact(view, max_parts=compact_after, part_bytes=2_500)
    assert parts.event_time_range(view) == old_event_time_range(parts, view)


def test_compact_part_bytes_is_configured_and_passed_on():
    assert FeaturesSection().compact_part_bytes == COMPACT_PART_BYTES == 16 * 2**20
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"compact_part_bytes": 0}, FeaturesSection)
    config = msgspec.convert(
        {"service": {"name": "feast_pipeline", "port": 8104}, "features": {"compact_after_parts": 7, "compact_part_bytes": 1234}},
        FeastPipelineConfig,
    )
    calls = []
    offline = SimpleNamespace(compact=lambda view, limit, part_bytes: calls.append((view.name, limit, part_bytes)) or 0)
    service = build(config, transport=MemoryTransport())
    service.feast.repository = SimpleNamespace(views={ACCOUNT_FEATURES.name: ACCOUNT_FEATURES}, offline=offline)
    asyncio.run(service.app.timers["compact_offline"].fn())
    assert calls == [(ACCOUNT_FEATURES.name, 7, 1234)]
    assert asyncio.run(service.feast.compact(7, 1234)) == {}  # nothing merged: no view listed


def test_feasts_duckdb_read_views_are_dropped(tmp_path):
    import ibis

    from posttrade.stores.feast.store import drop_read_views

    pq.write_table(rows_to_table(ACCOUNT_FEATURES, account_rows(T, 3)), tmp_path / "x.parquet")
    connection = ibis.get_backend().con
    connection.execute("CREATE OR REPLACE TEMPORARY VIEW posttrade_test_keep AS SELECT 1 AS one")
    try:
        for _ in range(3):
            ibis.read_parquet(str(tmp_path / "*.parquet"))  # what Feast's DuckDB offline store does per read

        def views() -> set[str]:
            return {row[0] for row in connection.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()}

        assert len([v for v in views() if v.startswith("ibis_read_parquet_")]) >= 3
        assert drop_read_views() >= 3
        assert not [v for v in views() if v.startswith("ibis_read_parquet_")]
        assert "posttrade_test_keep" in views()  # only ibis's read views go
    finally:
        connection.execute("DROP VIEW IF EXISTS posttrade_test_keep")
