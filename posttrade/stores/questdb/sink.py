"""The QuestDB sink: bus events → column-wise batches → one ILP/HTTP request per batch.

Used by the questdb_writer service (`posttrade/services/questdb_writer.py`), one sink per
route (a channel written to a table, its columns and keys in `layouts.py`). The service's
agent hands each batch that `stream.take_events(size, within, auto_commit=False)`
produced to `QuestDBSink.write_records`, which returns only when every row of the batch
is either in QuestDB or on the dead-letter subject; only then does the agent acknowledge
the batch (`commit_to`), so the acknowledgement never comes before QuestDB has the rows.

* First arrival (fills): before a batch is written, messages whose `fill_id` is already
  in the table, or came earlier in the batch, are taken out (`FirstArrivals`): a resend,
  whatever its `ts`, however late, is acknowledged without changing or adding a row.
* QuestDB unreachable (or failing on its side): the runtime's one retry loop
  (`posttrade.sinks`) tries the same batch again under the service's `RetryPolicy`, for
  as long as it takes. The batch stays unacknowledged (JetStream is told it is still
  being worked on); nothing is dead-lettered for it.
* QuestDB (or the column building) rejects the data itself: the batch is split in
  halves until the rows that can never be written are alone; those are dead-lettered
  with QuestDB's reason, the rest is written.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram

from ...sinks import RetryPolicy, Sink, SinkRefused, SinkStats, SinkUnavailable
from . import QuestDBError, QuestDBWriteError
from .first_arrivals import FirstArrivals
from .layouts import BadRows, TableLayout

if TYPE_CHECKING:
    from ...core.reference import Reference
    from ...streams.stream import EventRecord, Stream
    from . import QuestDBClient, QuestDBWriter

log = logging.getLogger(__name__)


class TableStats(SinkStats):
    """What /stats shows for one table; updated by its sink."""

    def __init__(self, table: str, clock=time.monotonic, latency_window: int = 2048):
        super().__init__(clock, latency_window)
        self.table = table
        self.batches = 0  # batches taken from the stream
        self.batch_rows_total = 0
        self.max_batch = 0
        self.dead_lettered = 0  # rows the sink dead-lettered (QuestDB can never take them)
        self.resends = 0  # messages not written: their first-arrival value was already stored
        self.table_ready = False

    def batch_taken(self, size: int) -> None:
        self.batches += 1
        self.batch_rows_total += size
        self.max_batch = max(self.max_batch, size)

    def snapshot(self) -> dict[str, Any]:
        generic = super().snapshot()
        generic.pop("refused")
        return {
            "table": self.table,
            "table_ready": self.table_ready,
            "rows": self.rows,
            "batches": self.batches,
            "batch_size": {
                "mean": round(self.batch_rows_total / self.batches, 1) if self.batches else None,
                "max": self.max_batch,
            },
            **generic,
            "rejected_batches": self.refused,
            "dead_lettered": self.dead_lettered,
            "resends": self.resends,
        }


class WriterMetrics:
    """What the writer counts beyond every sink's `posttrade_sink_*` series (served on
    /metrics): batch sizes, dead letters and resends per table."""

    def __init__(self, registry: CollectorRegistry):
        r = registry
        self.batch_rows = Histogram(
            "posttrade_writer_batch_rows",
            "Events per batch",
            ["table"],
            registry=r,
            buckets=(1, 10, 100, 500, 1000, 2500, 5000, 10_000, 25_000, 50_000),
        )
        self.dead_letters = Counter(
            "posttrade_writer_dead_letters_total", "Rows QuestDB can never take, dead-lettered", ["table"], registry=r
        )
        self.resends = Counter(
            "posttrade_writer_resends_total",
            "Messages not written because the table already had their first arrival (fill_id)",
            ["table"],
            registry=r,
        )


class QuestDBSink(Sink["EventRecord"]):
    """Writes batches of one channel's events into one QuestDB table (see module doc).

    Its sink name is the table's: `posttrade_sink_*{sink="<table>"}` and `/health`'s
    `sink:<table>`."""

    def __init__(
        self,
        *,
        table: str,
        layout: TableLayout,
        writer: QuestDBWriter,
        client: QuestDBClient,
        retry: RetryPolicy,
        metrics: WriterMetrics,
        reference: Reference | None = None,
        clock=time.monotonic,
    ):
        super().__init__(table, retry, stats=TableStats(table, clock=clock))
        self.stats: TableStats
        self.table = table
        self.layout = layout
        self.writer = writer
        self.client = client
        self.writer_metrics = metrics
        self.reference = reference
        self._table_lock = asyncio.Lock()
        self.first_arrivals = (
            FirstArrivals(table, layout.column(layout.first_arrival), client) if layout.first_arrival else None
        )

    # -- table ---------------------------------------------------------------------

    async def ensure_table(self) -> None:
        """Create the table (dedup keys verified) once; raises QuestDBError on failure."""
        if self.stats.table_ready:
            return
        async with self._table_lock:
            if self.stats.table_ready:
                return
            await self.client.create_table(
                self.table,
                self.layout.table_columns,
                timestamp="ts",
                partition_by="DAY",
                dedup_keys=self.layout.dedup_keys,
                wal=True,
            )
            self.stats.table_ready = True
            log.info("table %s ready (dedup keys ts, %s)", self.table, ", ".join(self.layout.dedup_keys))

    async def _table(self) -> None:
        try:
            await self.ensure_table()
        except QuestDBError as exc:
            # QuestDB unreachable, or refusing the DDL (e.g. a table of that name with
            # another designated timestamp): never the rows' fault. Retry; /health says why.
            raise SinkUnavailable(f"cannot create table {self.table}: {exc.message}") from None

    # -- writing -------------------------------------------------------------------

    async def write_records(self, records: Sequence[EventRecord], stream: Stream) -> None:
        """Write one batch of the channel's records: returns when every row is in QuestDB
        or dead-lettered. Raises `SinkStopping` if the service stops before that (the
        batch then stays unacknowledged)."""
        if not records:
            return
        self.stats.batch_taken(len(records))
        self.writer_metrics.batch_rows.labels(self.table).observe(len(records))
        if self.layout.rows is not None:
            records = self.layout.rows(records, self.reference)
        if self.first_arrivals is not None and records:
            records = await self._first_arrivals_only(self.first_arrivals, records, stream)
        if records:
            await self._write_part(records, stream)

    async def _first_arrivals_only(
        self, first_arrivals: FirstArrivals, records: Sequence[EventRecord], stream: Stream
    ) -> list[EventRecord]:
        """The records that are the first arrival of their key, asking QuestDB until it
        answers; the others are resends, counted and never written."""

        async def look_up() -> list[EventRecord]:
            await self._table()
            try:
                return await first_arrivals.select(records)
            except QuestDBError as exc:
                raise SinkUnavailable(
                    f"cannot look up which {first_arrivals.column}s {self.table} has: {exc.message}"
                ) from None

        kept = await self.retrying(look_up, what="look-up", rows=len(records), stream=stream, counts=False)
        resends = len(records) - len(kept)
        if resends:
            self.stats.resends += resends
            self.writer_metrics.resends.labels(self.table).inc(resends)
        return kept

    async def _write_part(self, records: Sequence[EventRecord], stream: Stream) -> None:
        try:
            columns = self.layout.build_columns(records)
            await self.retrying(lambda: self._request(columns), what="write", rows=len(records), stream=stream)
        except BadRows as exc:
            reason = exc.reason
        except SinkRefused as exc:  # bad data: the halves below are retried on their own
            reason = exc.reason
        else:
            if self.first_arrivals is not None:
                self.first_arrivals.accepted(records)
            return
        if len(records) == 1:
            record = records[0]
            await stream.dead_letter(record.delivery, f"QuestDB table {self.table} cannot take the row: {reason}")
            self.stats.dead_lettered += 1
            self.writer_metrics.dead_letters.labels(self.table).inc()
            return
        # Halve until the bad rows are alone: good halves are written on the way down.
        middle = len(records) // 2
        await self._write_part(records[:middle], stream)
        await self._write_part(records[middle:], stream)

    async def flush(self, stream: Stream | None = None) -> None:
        """Write what was `add`ed, as `write_records` does."""
        if stream is None:
            raise ValueError("a QuestDB sink writes for an agent's stream (to dead-letter a row it cannot write)")
        batch, self._buffer = self._buffer, []
        try:
            await self.write_records(batch, stream)
        except BaseException:
            self._buffer[:0] = batch
            raise

    async def _request(self, columns: dict[str, Any]) -> None:
        """One request: returns once QuestDB accepted the rows."""
        await self._table()
        try:
            await self.writer.write_batch(
                self.table, columns, symbols=self.layout.symbols, at="ts",
                timestamp_columns=self.layout.timestamp_columns,
            )  # fmt: skip
        except QuestDBWriteError as exc:
            if exc.bad_data:
                raise SinkRefused(exc.message) from None
            raise SinkUnavailable(exc.message) from None
