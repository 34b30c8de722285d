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

Threading: `write` may run in any thread. `lock` is held by `compact` and should be
held by whoever reads the files (materialization, training sets), so a read never
lists a part that compaction is about to delete.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from .views import TIMESTAMP_FIELD, ViewSpec

SCHEMA_PART = "part-00000000000000000000-schema.parquet"
_TYPES = {"float64": pa.float64(), "int64": pa.int64()}
TIMESTAMP_TYPE = pa.timestamp("us", tz="UTC")


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

    def compact(self, view: ViewSpec, max_parts: int) -> int:
        """Merge the parts into one when there are more than `max_parts`; returns how many."""
        with self.lock:
            parts = self.parts(view)
            if len(parts) <= max_parts:
                return 0
            table = pq.ParquetDataset(parts, schema=arrow_schema(view)).read()
            table = table.sort_by([(TIMESTAMP_FIELD, "ascending"), (view.entity, "ascending")])
            digest = hashlib.blake2b(b"".join(p.name.encode() for p in parts), digest_size=12).hexdigest()
            first_ts = pc.min(table[TIMESTAMP_FIELD]).value * 1000 if len(table) else 0
            # Written before the parts go: a crash in between leaves exact duplicates,
            # which point-in-time joins and materialization collapse.
            self._write_atomically(table, self.directory(view) / f"part-{first_ts:020d}-compact-{digest}.parquet")
            for part in parts:
                part.unlink(missing_ok=True)
            return len(parts)

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
        """(oldest, newest) event time in epoch ns of the view's offline rows, or None."""
        with self.lock:
            files = [str(p) for p in self.parts(view)]
            if not files:
                return None
            column = ds.dataset(files, schema=arrow_schema(view), format="parquet").to_table(columns=[TIMESTAMP_FIELD])[0]
            if len(column) == 0:
                return None
            bounds = pc.min_max(column)
            return bounds["min"].value * 1000, bounds["max"].value * 1000
