"""The offline store: Parquet part files, one directory per feature view.

Feast reads a view's offline data through its DuckDB offline store from the glob
`<root>/<view>/*.parquet`. Feast's own offline push (`PushMode.OFFLINE`) rewrites the
view's single file with every batch (read it all, append, write it all), which grows
with the history; here every pushed batch becomes a new part file instead, and
`compact` merges the parts now and then.

* A part is written to a hidden temp file and renamed into place: a reader never sees
  half a file. Its name holds a digest of its rows, so the same batch pushed again (a
  redelivery after a crash) lands on the same name: an idempotent write.
* Every view directory holds an empty "schema" part from the start, so the glob always
  matches and Feast can read a view that has no rows yet.
* Event times are stored as `timestamp[us, UTC]` (DuckDB cannot cast nanosecond
  timestamps with a time zone).

Memory does not grow with the history (docs/feast_pipeline.md, "Memory"):

* `compact` merges only the parts smaller than a size target on disk
  (`features.compact_part_bytes`); a part at or above it is never read again. So a
  compaction reads at most the one merged part still below the target plus the parts
  pushed since the last compaction, however long the history. And it streams: it
  holds one row group (`ROW_GROUP_ROWS` rows, sorted by event time) at a time.
* Merged parts are written in row groups of `ROW_GROUP_ROWS` rows, so a time-filtered
  `read` (the hourly batch job's) skips the row groups outside its range by their
  statistics instead of decoding whole parts.
* `event_time_range` reads each part's footer (its row groups' min/max statistics), not
  the timestamp column.

Threading: `write` may run in any thread. `lock` is held by `compact` and should be
held by whoever reads the files (materialization, training sets), so a read never
lists a part that compaction is about to delete.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from ...features.views import TIMESTAMP_FIELD, ViewSpec

SCHEMA_PART = "part-00000000000000000000-schema.parquet"
_TYPES = {"float64": pa.float64(), "int64": pa.int64()}
TIMESTAMP_TYPE = pa.timestamp("us", tz="UTC")
# Parts at least this large on disk are left alone by `compact` (`features.compact_part_bytes`).
COMPACT_PART_BYTES = 16 * 2**20
# Rows per row group of a merged part: what `compact` holds in memory at a time, and the
# unit a time-filtered read skips by statistics (about 3 MB of Arrow for these views).
ROW_GROUP_ROWS = 65_536
_NS_PER_UNIT = {"milliseconds": 1_000_000, "microseconds": 1_000, "nanoseconds": 1}


def arrow_schema(view: ViewSpec) -> pa.Schema:
    return pa.schema(
        [pa.field(view.entity, pa.string()), pa.field(TIMESTAMP_FIELD, TIMESTAMP_TYPE)]
        + [pa.field(f.name, _TYPES[f.dtype]) for f in view.features]
    )


def rows_to_table(view: ViewSpec, rows: Sequence[Sequence]) -> pa.Table:
    """Row tuples `(entity, ts_ns, values...)` as an Arrow table in the view's schema."""
    schema = arrow_schema(view)
    columns = list(zip(*rows)) if rows else [()] * len(schema)
    arrays = [pa.array(columns[0], pa.string()), pa.array([ts // 1000 for ts in columns[1]], TIMESTAMP_TYPE)]
    for field, values in zip(list(schema)[2:], columns[2:]):
        if field.type == pa.float64():
            values = [None if v is None or v != v else v for v in values]  # NaN is "no value"
        arrays.append(pa.array(values, field.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """`table` in `schema`: its columns in that order and type, a missing one all null."""
    if table.schema.equals(schema):
        return table
    columns = [
        table[field.name].cast(field.type) if field.name in table.column_names else pa.nulls(table.num_rows, field.type)
        for field in schema
    ]
    return pa.Table.from_arrays(columns, schema=schema)


class OfflineParts:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.lock = threading.RLock()

    def directory(self, view: ViewSpec) -> Path:
        return self.root / view.name

    def glob(self, view: ViewSpec) -> str:
        """The path Feast's FileSource reads."""
        return str(self.directory(view) / "*.parquet")

    def ensure(self, view: ViewSpec) -> None:
        directory = self.directory(view)
        directory.mkdir(parents=True, exist_ok=True)
        schema_part = directory / SCHEMA_PART
        if not schema_part.exists():
            self._write_atomically(arrow_schema(view).empty_table(), schema_part)

    def parts(self, view: ViewSpec) -> list[Path]:
        """The data parts (not the schema part), oldest first by name."""
        return sorted(p for p in self.directory(view).glob("part-*.parquet") if p.name != SCHEMA_PART)

    def write(self, view: ViewSpec, rows: Sequence[Sequence]) -> Path | None:
        """Write one batch of rows as a part; returns its path (None for no rows)."""
        if not rows:
            return None
        table = rows_to_table(view, rows)
        digest = hashlib.blake2b(repr(list(rows)).encode(), digest_size=12).hexdigest()
        first_ts = min(row[1] for row in rows)
        path = self.directory(view) / f"part-{first_ts:020d}-{digest}.parquet"
        self._write_atomically(table, path)
        return path

    def _write_atomically(self, table: pa.Table, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.parent / f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp"
        pq.write_table(table, temp)
        os.replace(temp, path)

    def compact(self, view: ViewSpec, max_parts: int, part_bytes: int = COMPACT_PART_BYTES) -> int:
        """When the view has more than `max_parts` parts, merge those smaller than
        `part_bytes` on disk into one; returns how many were merged (0: none).

        Parts at or above `part_bytes` stay as they are, so what is read is bounded by
        the target plus the parts pushed since the last compaction, not by the history;
        the merge streams them in row groups of `ROW_GROUP_ROWS` rows.
        """
        with self.lock:
            parts = self.parts(view)
            if len(parts) <= max_parts:
                return 0
            small = [p for p in parts if p.stat().st_size < part_bytes]
            if len(small) < 2:
                return 0
            digest = hashlib.blake2b(b"".join(p.name.encode() for p in small), digest_size=12).hexdigest()
            directory = self.directory(view)
            temp = directory / f".compact-{digest}.{os.getpid()}.{threading.get_ident()}.tmp"
            try:
                first_ts = self._merge(view, small, temp)
                # Written before the parts go: a crash in between leaves exact duplicates,
                # which point-in-time joins and materialization collapse.
                os.replace(temp, directory / f"part-{first_ts:020d}-compact-{digest}.parquet")
            finally:
                temp.unlink(missing_ok=True)
            for part in small:
                part.unlink(missing_ok=True)
            return len(small)

    def _merge(self, view: ViewSpec, parts: list[Path], path: Path) -> int:
        """Write the rows of `parts` to `path` in sorted row groups of about
        `ROW_GROUP_ROWS` rows; returns the oldest event time (ns; 0: no rows).

        Reads one row group at a time (a record-batch reader over a whole file keeps
        more the larger the file) and writes a dictionary for the entity column only
        (dictionaries of the float columns cost the writer tens of MB and make these
        files larger, not smaller).
        """
        schema = arrow_schema(view)
        order = [(TIMESTAMP_FIELD, "ascending"), (view.entity, "ascending")]
        first_us: int | None = None
        pending: list[pa.Table] = []
        held = 0
        with pq.ParquetWriter(path, schema, use_dictionary=[view.entity]) as writer:

            def flush() -> None:
                nonlocal first_us, held
                table = pa.concat_tables(pending).sort_by(order)
                pending.clear()
                held = 0
                oldest = pc.min(table[TIMESTAMP_FIELD])
                if oldest.is_valid and (first_us is None or oldest.value < first_us):
                    first_us = oldest.value
                writer.write_table(table, row_group_size=ROW_GROUP_ROWS)

            for part in parts:
                with pq.ParquetFile(part) as reader:
                    for index in range(reader.num_row_groups):
                        group = conform(reader.read_row_group(index), schema)
                        if group.num_rows:
                            pending.append(group)
                            held += group.num_rows
                            if held >= ROW_GROUP_ROWS:
                                flush()
            if pending:
                flush()
        return first_us * 1000 if first_us is not None else 0

    def read(self, view: ViewSpec, start_ns: int | None = None, end_ns: int | None = None) -> pa.Table:
        """Rows with start <= event time < end (either bound optional)."""
        with self.lock:
            files = [str(p) for p in self.parts(view)]
            if not files:
                return arrow_schema(view).empty_table()
            dataset = ds.dataset(files, schema=arrow_schema(view), format="parquet")
            condition = None
            ts = ds.field(TIMESTAMP_FIELD)
            # Stored times are whole microseconds: round both bounds up to keep them exact.
            if start_ns is not None:
                condition = ts >= pa.scalar(-(-start_ns // 1000), TIMESTAMP_TYPE)
            if end_ns is not None:
                upper = ts < pa.scalar(-(-end_ns // 1000), TIMESTAMP_TYPE)
                condition = upper if condition is None else condition & upper
            return dataset.to_table(filter=condition)

    def event_time_range(self, view: ViewSpec) -> tuple[int, int] | None:
        """(oldest, newest) event time in epoch ns of the view's offline rows, or None.

        From the parts' footers (row-group min/max statistics): a few KB per part,
        whatever the number of rows.
        """
        with self.lock:
            bounds = [b for b in (self._time_bounds(view, p) for p in self.parts(view)) if b is not None]
            if not bounds:
                return None
            return min(b[0] for b in bounds), max(b[1] for b in bounds)

    def _time_bounds(self, view: ViewSpec, path: Path) -> tuple[int, int] | None:
        """(oldest, newest) event time in ns of one part (None: no rows with a time)."""
        metadata = pq.read_metadata(path)
        column = metadata.schema.names.index(TIMESTAMP_FIELD) if TIMESTAMP_FIELD in metadata.schema.names else None
        unit = None
        if column is not None:
            logical = json.loads(metadata.schema.column(column).logical_type.to_json() or "{}")
            if logical.get("Type") == "Timestamp":
                unit = _NS_PER_UNIT.get(logical.get("timeUnit"))
        lows: list[int] = []
        highs: list[int] = []
        for i in range(metadata.num_row_groups):
            group = metadata.row_group(i)
            if group.num_rows == 0:
                continue
            stats = group.column(column).statistics if unit is not None else None
            if stats is None or not stats.has_min_max:
                if stats is not None and stats.null_count == group.num_rows:
                    continue  # no time in this row group at all
                return self._time_bounds_from_rows(view, path)  # no statistics: read the column
            lows.append(stats.min_raw * unit)
            highs.append(stats.max_raw * unit)
        if not lows:
            return None
        # To the microsecond, as a read in the view's schema gives them.
        low, high = min(lows), max(highs)
        return low - low % 1000, high - high % 1000

    def _time_bounds_from_rows(self, view: ViewSpec, path: Path) -> tuple[int, int] | None:
        column = ds.dataset(str(path), schema=arrow_schema(view), format="parquet").to_table(columns=[TIMESTAMP_FIELD])[0]
        bounds = pc.min_max(column)
        if not bounds["min"].is_valid:
            return None
        return bounds["min"].value * 1000, bounds["max"].value * 1000
