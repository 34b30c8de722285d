"""The QuestDB sink: bus events → column-wise batches → one ILP/HTTP request per batch.

Used by the questdb_writer service (`posttrade/services/questdb_writer.py`), one sink per
route (a channel written to a table). The service's agent hands each batch that
`stream.take_events(size, within, auto_commit=False)` produced to `QuestDBSink.write`,
which returns only when every row of the batch is either in QuestDB or on the
dead-letter subject; only then does the agent acknowledge the batch (`commit_to`), so
the acknowledgement never comes before QuestDB has the rows.

* Layouts (`LAYOUTS`): per event type, the table's columns, which are SYMBOLs, and the
  DEDUP UPSERT KEYS that make a redelivered or replayed message land on the row it
  already made instead of adding one. Every table also stores `stream_seq`, the
  JetStream sequence of the message the row came from.
* First arrival (fills): a layout may name a column whose first arrival is the one kept
  (`fill_id`). Before a batch is written, messages whose value is already in the table,
  or came earlier in the batch, are taken out (`FirstArrivals`): a resend, whatever its
  `ts`, however late, is acknowledged without changing or adding a row.
* QuestDB unreachable (or failing on its side): the same batch is retried with
  exponential back-off, `max_retry` attempts per cycle, then a longer pause and the
  next cycle, forever. The batch stays unacknowledged (`stream.keep_alive()` tells
  JetStream it is still being worked on); nothing is dead-lettered for it.
* QuestDB (or the column building) rejects the data itself: the batch is split in
  halves until the rows that can never be written are alone; those are dead-lettered
  with QuestDB's reason, the rest is written.

Money and quantities go in as `DECIMAL(38, 12)`: exact. Every value an event can carry
fits (`posttrade.core.bounds`: at most 12 decimal places, below 1E+20; the decoder
refuses the rest, as every service does). A value that does not fit all the same (more
than 12 decimal places, more than 26 integer digits) is a row that can never be written
and is dead-lettered, never rounded, except a bar's `vwap`, a derived average whose long
tail of digits is rounded half-even to 12 places.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from decimal import ROUND_HALF_EVEN, Decimal
from operator import attrgetter
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import quote_plus

import numpy as np
import pandas as pd
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ...core.bounds import QUESTDB_DECIMAL, QUESTDB_PRECISION, QUESTDB_SCALE
from ...core.exact import EXACT
from ...streams.events import Bar, Fill, MarketTrade, Order, Quote
from . import QuestDBError, QuestDBWriteError, decimal_column, sql_literal

if TYPE_CHECKING:
    from . import QuestDBClient, QuestDBWriter
    from ...streams.stream import EventRecord, Stream

log = logging.getLogger(__name__)

# The project's one exact column type (core.bounds): every value an event can carry fits
# it as it is, every figure ptrc keeps fits it rounded at 12 places.
DECIMAL_PRECISION = QUESTDB_PRECISION
DECIMAL_SCALE = QUESTDB_SCALE
DECIMAL_SQL = QUESTDB_DECIMAL
_DECIMAL_QUANTUM = Decimal(1).scaleb(-DECIMAL_SCALE)

ColumnKind = Literal["timestamp", "symbol", "varchar", "decimal", "rounded_decimal", "long", "stream_seq"]

_SQL_TYPES: dict[str, str] = {
    "timestamp": "TIMESTAMP_NS",  # QuestDB's TIMESTAMP keeps microseconds; events carry ns
    "symbol": "SYMBOL CAPACITY 4096",
    "varchar": "VARCHAR",
    "decimal": DECIMAL_SQL,
    "rounded_decimal": DECIMAL_SQL,
    "long": "LONG",
    "stream_seq": "LONG",
}


class BadRows(Exception):
    """Part of a batch can never be written; `reason` says why (split to find which)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class WriterStopping(Exception):
    """The service is stopping while a batch is still unwritten.

    Raised out of the agent's loop body so the batch is *not* acknowledged (returning
    would acknowledge it); JetStream redelivers it to the next run.
    """


@dataclass(frozen=True)
class Column:
    name: str
    kind: ColumnKind
    field: str | None = None  # attribute of the event; defaults to `name`

    @property
    def sql_type(self) -> str:
        return _SQL_TYPES[self.kind]


@dataclass(frozen=True)
class TableLayout:
    """How one event type becomes rows of a QuestDB table."""

    event_type: type
    columns: tuple[Column, ...]
    dedup_keys: tuple[str, ...]  # besides `ts`, which QuestDB requires and is always first
    why: str  # why these dedup keys (docs/questdb_writer.md explains the same)
    # A VARCHAR or SYMBOL column whose first arrival is kept: a later message with a value
    # the table already has is not written (see FirstArrivals). None: every message is a row.
    first_arrival: str | None = None

    def __post_init__(self) -> None:
        names = [c.name for c in self.columns]
        if names[0] != "ts" or self.columns[0].kind != "timestamp":
            raise ValueError("the first column of a layout is the designated timestamp `ts`")
        missing = set(self.dedup_keys) - set(names)
        if missing:
            raise ValueError(f"dedup keys {sorted(missing)} are not columns")
        if self.first_arrival is not None and self.column(self.first_arrival).kind not in ("varchar", "symbol"):
            raise ValueError(f"first-arrival column {self.first_arrival} must be a VARCHAR or SYMBOL column")

    def column(self, name: str) -> Column:
        for column in self.columns:
            if column.name == name:
                return column
        raise ValueError(f"{name} is not a column")

    @property
    def table_columns(self) -> dict[str, str]:
        """name → QuestDB type, for `QuestDBClient.create_table`."""
        return {c.name: c.sql_type for c in self.columns}

    @property
    def symbols(self) -> list[str]:
        return [c.name for c in self.columns if c.kind == "symbol"]

    def build_columns(self, records: Sequence[EventRecord]) -> dict[str, Any]:
        """The batch column-wise, ready for `QuestDBWriter.write_batch`.

        One pass per column over the events with C-level getters (no per-row dicts):
        this is what keeps the sink's own cost per row small. Raises BadRows when a
        value cannot be represented in its column.
        """
        n = len(records)
        values = [r.value for r in records]
        out: dict[str, Any] = {}
        for column in self.columns:
            kind = column.kind
            if kind == "stream_seq":
                out[column.name] = np.fromiter(map(_SEQ, records), dtype=np.int64, count=n)
                continue
            get = attrgetter(column.field or column.name)
            if kind in ("timestamp", "long"):
                try:
                    out[column.name] = np.fromiter(map(get, values), dtype=np.int64, count=n)
                except (OverflowError, TypeError, ValueError) as exc:
                    raise BadRows(f"column {column.name}: {exc}") from None
            elif kind in ("symbol", "varchar"):
                out[column.name] = pd.array(list(map(get, values)), dtype="string")  # NA for None on pandas 2 and 3
            else:  # decimal, rounded_decimal
                items = list(map(get, values))
                if kind == "rounded_decimal":
                    out[column.name] = _rounded_decimal_column(column.name, items)
                else:
                    out[column.name] = _decimal_column(column.name, items)
        return out


def _round_to_scale(value: Decimal) -> Decimal:
    # Under the exact context: the caller's (28 digits by default) cannot hold a value of
    # 20 integer digits at 12 places, and quantize would raise.
    return value.quantize(_DECIMAL_QUANTUM, rounding=ROUND_HALF_EVEN, context=EXACT)


def _decimal_column(name: str, items: list[Decimal | None]) -> Any:
    try:
        return decimal_column(items, DECIMAL_PRECISION, DECIMAL_SCALE)
    except ValueError as exc:
        raise BadRows(f"column {name}: {exc} (the column is {DECIMAL_SQL})") from None


def _rounded_decimal_column(name: str, items: list[Decimal | None]) -> Any:
    # Most values need no rounding (prices and P&L of a few decimals): the strict
    # conversion takes them as they are, and only a batch with a value of more than 12
    # places pays for rounding in Python.
    try:
        return decimal_column(items, DECIMAL_PRECISION, DECIMAL_SCALE)
    except ValueError:
        return _decimal_column(name, [None if v is None else _round_to_scale(v) for v in items])


_SEQ = attrgetter("seq")
_VALUE = attrgetter("value")
TS = Column("ts", "timestamp")
SEQ = Column("stream_seq", "stream_seq")

LAYOUTS: dict[str, TableLayout] = {
    "market_trades": TableLayout(
        MarketTrade,
        (
            TS,
            Column("symbol", "symbol"),
            Column("venue", "symbol"),
            Column("price", "decimal"),
            Column("size", "decimal"),
            Column("aggressor", "symbol"),
            Column("trade_id", "varchar"),
            SEQ,
        ),
        dedup_keys=("symbol", "stream_seq"),
        why="trade_id is optional and a sweep prints several trades at one timestamp, so the "
        "message's stream sequence identifies the row",
    ),
    "quotes": TableLayout(
        Quote,
        (
            TS,
            Column("symbol", "symbol"),
            Column("venue", "symbol"),
            Column("bid", "decimal"),
            Column("ask", "decimal"),
            Column("bid_size", "decimal"),
            Column("ask_size", "decimal"),
            SEQ,
        ),
        dedup_keys=("symbol", "stream_seq"),
        why="two quote updates can share a timestamp and quotes have no id, so the message's "
        "stream sequence identifies the row (every update is kept)",
    ),
    "bars": TableLayout(
        Bar,
        (
            TS,
            Column("symbol", "symbol"),
            Column("interval", "symbol"),
            Column("open", "decimal"),
            Column("high", "decimal"),
            Column("low", "decimal"),
            Column("close", "decimal"),
            Column("volume", "decimal"),
            Column("vwap", "rounded_decimal"),
            Column("count", "long"),
            SEQ,
        ),
        dedup_keys=("symbol", "interval"),
        why="a bar is identified by its open time, symbol and interval; a re-sent or corrected "
        "bar replaces the row",
    ),
    "fills": TableLayout(
        Fill,
        (
            TS,
            Column("fill_id", "varchar"),
            Column("account", "symbol"),
            Column("symbol", "symbol"),
            Column("side", "symbol"),
            Column("qty", "decimal"),
            Column("price", "decimal"),
            Column("fee", "decimal"),
            Column("order_id", "varchar"),
            Column("venue", "symbol"),
            Column("liquidity", "symbol"),
            Column("exec_type", "symbol"),
            Column("ref_fill_id", "varchar"),
            Column("fee_currency", "symbol"),
            SEQ,
        ),
        dedup_keys=("fill_id",),
        why="fill_id is unique across the feed and its first arrival is the row kept (a resend "
        "is never written, see first_arrival); the key makes a write repeated after a lost "
        "reply land on the rows it made",
        first_arrival="fill_id",
    ),
    "orders": TableLayout(
        Order,
        (
            TS,
            Column("order_id", "varchar"),
            Column("account", "symbol"),
            Column("symbol", "symbol"),
            Column("side", "symbol"),
            Column("qty", "decimal"),
            Column("order_type", "symbol"),
            Column("limit_price", "decimal"),
            Column("venue", "symbol"),
            Column("status", "symbol"),
            SEQ,
        ),
        dedup_keys=("order_id", "status"),
        why="an order's lifecycle event is identified by the order, its status and when it "
        "happened",
    ),
}


# -- statistics ----------------------------------------------------------------------


class RateWindow:
    """Rows per second over the last N seconds, from one-second buckets."""

    def __init__(self, horizon_s: int = 60, clock: Callable[[], float] = time.monotonic):
        self.horizon_s = horizon_s
        self.clock = clock
        self._buckets: deque[list[int]] = deque()  # [second, rows], oldest first

    def add(self, rows: int) -> None:
        second = int(self.clock())
        if self._buckets and self._buckets[-1][0] == second:
            self._buckets[-1][1] += rows
        else:
            self._buckets.append([second, rows])
        self._trim(second)

    def _trim(self, second: int) -> None:
        while self._buckets and self._buckets[0][0] <= second - self.horizon_s:
            self._buckets.popleft()

    def rate(self, window_s: int) -> float:
        """Rows added in the last `window_s` whole seconds (this one included) / window_s."""
        if window_s > self.horizon_s:
            raise ValueError(f"window {window_s}s is beyond the {self.horizon_s}s kept")
        now = int(self.clock())
        self._trim(now)
        rows = sum(count for second, count in self._buckets if second > now - window_s)
        return rows / window_s


def _iso(epoch_s: float | None) -> str | None:
    if epoch_s is None:
        return None
    return _dt.datetime.fromtimestamp(epoch_s, _dt.timezone.utc).isoformat(timespec="milliseconds")


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile of already sorted values (None when empty)."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


@dataclass
class TableStats:
    """What /stats shows for one table; updated by its sink."""

    table: str
    clock: Callable[[], float] = time.monotonic
    latency_window: int = 2048  # flush latencies kept for the percentiles
    rows: int = 0  # rows QuestDB accepted
    batches: int = 0  # batches taken from the stream
    batch_rows_total: int = 0
    max_batch: int = 0
    flushes: int = 0  # accepted write requests (more than batches when a batch was split)
    errors: int = 0  # failed write or table-creation attempts, any cause
    retries: int = 0  # attempts repeated because QuestDB was unreachable or failing
    rejected_batches: int = 0  # write requests QuestDB refused for their data
    dead_lettered: int = 0  # rows the sink dead-lettered (QuestDB can never take them)
    resends: int = 0  # messages not written: their first-arrival value was already stored
    table_ready: bool = False
    last_error: str | None = None
    last_error_at: float | None = None  # epoch seconds
    last_flush_at: float | None = None
    failing_since: float | None = None  # epoch s of the first failed write in a row (not bad data)
    latencies: deque = field(init=False)
    rate: RateWindow = field(init=False)

    def __post_init__(self) -> None:
        self.latencies = deque(maxlen=self.latency_window)
        self.rate = RateWindow(60, self.clock)

    def batch_taken(self, size: int) -> None:
        self.batches += 1
        self.batch_rows_total += size
        self.max_batch = max(self.max_batch, size)

    def flushed(self, rows: int, seconds: float) -> None:
        self.rows += rows
        self.flushes += 1
        self.latencies.append(seconds)
        self.rate.add(rows)
        self.last_flush_at = time.time()
        self.failing_since = None

    def failed(self, error: str, *, unavailable: bool) -> None:
        self.errors += 1
        self.last_error = error
        self.last_error_at = time.time()
        if unavailable and self.failing_since is None:
            self.failing_since = self.last_error_at

    def snapshot(self) -> dict[str, Any]:
        ordered = sorted(self.latencies)
        p50, p99 = percentile(ordered, 50), percentile(ordered, 99)
        return {
            "table": self.table,
            "table_ready": self.table_ready,
            "rows": self.rows,
            "batches": self.batches,
            "batch_size": {
                "mean": round(self.batch_rows_total / self.batches, 1) if self.batches else None,
                "max": self.max_batch,
            },
            "flushes": self.flushes,
            "flush_latency_ms": {
                "p50": None if p50 is None else round(p50 * 1000, 3),
                "p99": None if p99 is None else round(p99 * 1000, 3),
                "max": round(ordered[-1] * 1000, 3) if ordered else None,
                "over_last_flushes": len(ordered),
            },
            "rows_per_s": {"10s": round(self.rate.rate(10), 1), "60s": round(self.rate.rate(60), 1)},
            "errors": self.errors,
            "retries": self.retries,
            "rejected_batches": self.rejected_batches,
            "dead_lettered": self.dead_lettered,
            "resends": self.resends,
            "last_flush_at": _iso(self.last_flush_at),
            "last_error": self.last_error,
            "last_error_at": _iso(self.last_error_at),
            "writes_failing_since": _iso(self.failing_since),
        }


class WriterMetrics:
    """The writer's Prometheus metrics, in the app's registry (served on /metrics)."""

    def __init__(self, registry: CollectorRegistry):
        r = registry
        self.rows = Counter("posttrade_writer_rows_total", "Rows QuestDB accepted", ["table"], registry=r)
        self.batches = Counter("posttrade_writer_batches_total", "Batches taken from the stream", ["table"], registry=r)
        self.batch_rows = Histogram(
            "posttrade_writer_batch_rows",
            "Events per batch",
            ["table"],
            registry=r,
            buckets=(1, 10, 100, 500, 1000, 2500, 5000, 10_000, 25_000, 50_000),
        )
        self.flush_seconds = Histogram(
            "posttrade_writer_flush_seconds",
            "Time of one accepted ILP/HTTP write request (serialising included)",
            ["table"],
            registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.errors = Counter(
            "posttrade_writer_errors_total", "Failed write attempts", ["table", "cause"], registry=r
        )
        self.retries = Counter("posttrade_writer_retries_total", "Write attempts repeated", ["table"], registry=r)
        self.dead_letters = Counter(
            "posttrade_writer_dead_letters_total", "Rows QuestDB can never take, dead-lettered", ["table"], registry=r
        )
        self.resends = Counter(
            "posttrade_writer_resends_total",
            "Messages not written because the table already had their first arrival (fill_id)",
            ["table"],
            registry=r,
        )
        self.questdb_up = Gauge(
            "posttrade_writer_questdb_up", "1 when the last write or table check reached QuestDB", ["table"], registry=r
        )


# -- first arrivals ------------------------------------------------------------------

# URL-encoded characters of the `IN (...)` list of one look-up query. /exec takes the query
# in the request line, and QuestDB closes the connection when the request's head passes
# its header buffer (`http.request.header.buffer.size`, 32 KiB by default; a 28,600-byte
# URL went through, a 38,000-byte one did not); this leaves room for the rest.
LOOKUP_LIST_BUDGET = 16_000
# Rows per query when the keys of a table are read (~10 MB of JSON for fill ids).
READ_PAGE_ROWS = 500_000
# Hashes of keys written kept in a set (~70 bytes each) before they go into the sorted
# array: merging copies the array, so not after every batch.
ADDED_HASHES_MERGED_AT = 1 << 18
# How long a look-up waits, polling, for QuestDB to apply the commits made before it;
# then it counts as a failed attempt and is retried with back-off.
WAL_WAIT_S = 5.0


def in_lists(values: Sequence[str], budget: int = LOOKUP_LIST_BUDGET) -> Iterator[str]:
    """`values` as the insides of SQL `IN (...)` lists, each within `budget` URL-encoded."""
    literals: list[str] = []
    size = 0
    for value in values:
        literal = sql_literal(value)
        cost = len(quote_plus(literal)) + 4  # with the ", " before the next one (%2C+)
        if literals and size + cost > budget:
            yield ", ".join(literals)
            literals, size = [], 0
        literals.append(literal)
        size += cost
    if literals:
        yield ", ".join(literals)


class FirstArrivals:
    """Which records of a batch are the first arrival of their key (fills: `fill_id`).

    The table is the memory: a key has arrived once a row has it, so a restart forgets
    nothing, however long ago the first arrival was. Asking QuestDB about every new key
    would scan the key column of the whole table once per `IN` list (a few hundred
    keys; 5 million rows take ~0.1 s here), so the keys the table holds are known here
    as 64-bit hashes in a sorted array (8 bytes a row), read from the table before the
    first batch. A key whose hash is not there is new; one whose hash is (a resend, or
    rarely another key with the same hash) is looked up in QuestDB, which has the last
    word. The hashes are Python's `hash()`, salted per process: they are never kept
    beyond it.

    A WAL table shows a commit to SQL a little after accepting it, so the table is read,
    and keys are looked up, only once every commit is applied. One process writes the
    table: another's rows would be missing from the hashes.
    """

    def __init__(self, table: str, column: Column, client: QuestDBClient):
        self.table = table
        self.column = column.name
        self._key = attrgetter(column.field or column.name)
        self.client = client
        self._table_read = False
        self._hashes = np.empty(0, dtype=np.int64)  # sorted hashes of the keys the table has
        self._added: set[int] = set()  # those of keys written since, merged into _hashes in bulk

    async def select(self, records: Sequence[EventRecord]) -> list[EventRecord]:
        """The records to write: the first of their key in the batch, in no row yet.

        Raises QuestDBError when QuestDB cannot tell yet (away, or still applying
        commits): ask again later.
        """
        firsts: dict[str, EventRecord] = {}
        for record in records:
            firsts.setdefault(self._key(record.value), record)
        if not self._table_read:
            await self._wait_applied()
            self._hashes = await self._read_hashes()
            self._table_read = True
        keys = list(firsts)
        maybe = [key for key, known in zip(keys, self._known(keys)) if known]
        if not maybe:
            return list(firsts.values())
        await self._wait_applied()
        stored = await self._stored(maybe)
        return [record for key, record in firsts.items() if key not in stored]

    def accepted(self, records: Sequence[EventRecord]) -> None:
        """QuestDB took the rows of `records`: their keys have arrived."""
        self._added.update(map(hash, map(self._key, map(_VALUE, records))))
        if len(self._added) >= ADDED_HASHES_MERGED_AT:
            added = np.fromiter(self._added, dtype=np.int64, count=len(self._added))
            added.sort()
            self._hashes = np.insert(self._hashes, np.searchsorted(self._hashes, added), added)
            self._added.clear()

    def _known(self, keys: list[str]) -> np.ndarray:
        """Per key: True when a key with its hash has arrived."""
        hash_list = list(map(hash, keys))
        hashes = np.array(hash_list, dtype=np.int64)
        known = np.zeros(len(keys), dtype=bool)
        if len(self._hashes):
            at = np.searchsorted(self._hashes, hashes).clip(max=len(self._hashes) - 1)
            known = self._hashes[at] == hashes
        if not self._added.isdisjoint(hash_list):  # rarely: a resend of a recent write
            known |= np.array([h in self._added for h in hash_list], dtype=bool)
        return known

    async def _read_hashes(self) -> np.ndarray:
        """The hashes of every key in the table, sorted (read in pages of rows)."""
        pages = []
        start = 0
        while True:
            result = await self.client.query(
                f"SELECT {self.column} FROM {self.table} LIMIT {start}, {start + READ_PAGE_ROWS}"
            )
            keys = [row[0] for row in result.rows]
            pages.append(np.fromiter(map(hash, keys), dtype=np.int64, count=len(keys)))
            if len(keys) < READ_PAGE_ROWS:
                break
            start += READ_PAGE_ROWS
        hashes = np.concatenate(pages)
        hashes.sort()
        log.info(
            "table %s: %d %ss read (as hashes: %.1f MB)", self.table, len(hashes), self.column, hashes.nbytes / 1e6
        )
        return hashes

    async def _wait_applied(self) -> None:
        """Return once SQL shows every commit made to the table (polling a while)."""
        deadline = time.monotonic() + WAL_WAIT_S
        while True:
            result = await self.client.query(
                "SELECT writerTxn, sequencerTxn, suspended, errorMessage FROM wal_tables() "
                f"WHERE name = {sql_literal(self.table)}"
            )
            if not result.rows:
                raise QuestDBError(f"table {self.table} is not in wal_tables()")
            writer_txn, sequencer_txn, suspended, error = result.rows[0]
            if writer_txn >= sequencer_txn:
                return
            if suspended or time.monotonic() >= deadline:
                state = f"suspended ({error})" if suspended else f"not applied after {WAL_WAIT_S:g}s"
                raise QuestDBError(
                    f"{sequencer_txn - writer_txn} transactions committed to {self.table} are {state}; "
                    f"{self.column}s are looked up once they are applied"
                )
            await asyncio.sleep(0.02)

    async def _stored(self, keys: list[str]) -> set[str]:
        found: set[str] = set()
        for in_list in in_lists(keys):
            result = await self.client.query(
                f"SELECT {self.column} FROM {self.table} WHERE {self.column} IN ({in_list})"
            )
            found.update(result.column(self.column))
        return found


# -- the sink ------------------------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    """Back-off while QuestDB is away: `attempts` tries per cycle, spaced `initial_s`,
    doubling; between cycles a pause that doubles from `initial_s * 2**attempts` up
    to `max_s`. Cycles go on until QuestDB answers."""

    attempts: int = 3
    initial_s: float = 0.25
    max_s: float = 5.0
    keep_alive_s: float = 5.0  # how often a long pause tells JetStream we still hold the batch

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.initial_s <= 0 or self.max_s < self.initial_s or self.keep_alive_s <= 0:
            raise ValueError(f"bad retry policy: {self}")

    def delay(self, cycle: int, attempt: int) -> float:
        """Pause after failed attempt `attempt` (0-based) of cycle `cycle` (0-based)."""
        if attempt < self.attempts - 1:
            step = attempt
        else:  # the cycle is exhausted: the longer pause before the next one
            step = self.attempts - 1 + cycle + 1
        return min(self.initial_s * (2**step), self.max_s)


class QuestDBSink:
    """Writes batches of one channel's events into one QuestDB table (see module doc)."""

    def __init__(
        self,
        *,
        table: str,
        layout: TableLayout,
        writer: QuestDBWriter,
        client: QuestDBClient,
        retry: RetryPolicy,
        metrics: WriterMetrics,
        stopping: Callable[[], bool] = lambda: False,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.table = table
        self.layout = layout
        self.writer = writer
        self.client = client
        self.retry = retry
        self.metrics = metrics
        self.stopping = stopping
        self.stats = TableStats(table, clock=clock)
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

    # -- writing -------------------------------------------------------------------

    async def write(self, records: Sequence[EventRecord], stream: Stream) -> None:
        """Write one batch: returns when every row is in QuestDB or dead-lettered.

        Raises WriterStopping if the service stops before that (the batch then stays
        unacknowledged).
        """
        if not records:
            return
        self.stats.batch_taken(len(records))
        self.metrics.batches.labels(self.table).inc()
        self.metrics.batch_rows.labels(self.table).observe(len(records))
        if self.first_arrivals is not None:
            records = await self._first_arrivals_only(self.first_arrivals, records, stream)
        if records:
            await self._write_part(records, stream)

    async def _first_arrivals_only(
        self, first_arrivals: FirstArrivals, records: Sequence[EventRecord], stream: Stream
    ) -> list[EventRecord]:
        """The records that are the first arrival of their key, asking QuestDB until it
        answers; the others are resends, counted and never written."""
        kept: list[EventRecord] = []

        async def look_up() -> str | None:
            nonlocal kept
            try:
                await self.ensure_table()
            except QuestDBError as exc:
                return self._unavailable(f"cannot create table {self.table}: {exc.message}")
            try:
                kept = await first_arrivals.select(records)
            except QuestDBError as exc:
                return self._unavailable(
                    f"cannot look up which {first_arrivals.column}s {self.table} has: {exc.message}"
                )
            self._reached()
            return None

        await self._until_done(look_up, "look-up", len(records), stream)
        resends = len(records) - len(kept)
        if resends:
            self.stats.resends += resends
            self.metrics.resends.labels(self.table).inc(resends)
        return kept

    async def _write_part(self, records: Sequence[EventRecord], stream: Stream) -> None:
        try:
            columns = self.layout.build_columns(records)
            await self._until_done(lambda: self._attempt(columns, len(records)), "write", len(records), stream)
        except BadRows as exc:
            reason = exc.reason
        except QuestDBWriteError as exc:  # bad data: the halves below are retried on their own
            reason = exc.message
            self.stats.rejected_batches += 1
        else:
            if self.first_arrivals is not None:
                self.first_arrivals.accepted(records)
            return
        if len(records) == 1:
            record = records[0]
            await stream.dead_letter(record.delivery, f"QuestDB table {self.table} cannot take the row: {reason}")
            self.stats.dead_lettered += 1
            self.metrics.dead_letters.labels(self.table).inc()
            return
        # Halve until the bad rows are alone: good halves are written on the way down.
        middle = len(records) // 2
        await self._write_part(records[:middle], stream)
        await self._write_part(records[middle:], stream)

    async def _until_done(
        self, attempt: Callable[[], Awaitable[str | None]], what: str, rows: int, stream: Stream
    ) -> None:
        """Repeat `attempt` (None when done, else why not) with back-off until it is done.

        A write returns once accepted; it raises QuestDBWriteError only when the data was
        refused.
        """
        cycle = tries = 0
        while True:
            error = await attempt()
            if error is None:
                if cycle or tries:
                    failed = cycle * self.retry.attempts + tries
                    log.info("QuestDB %s for %s done after %d failed attempts", what, self.table, failed)
                return
            pause = self.retry.delay(cycle, tries)
            if tries == self.retry.attempts - 1:
                log.error(
                    "QuestDB %s for %s failed %d times in a row (%s); holding %d rows, next try in %.1fs",
                    what, self.table, self.retry.attempts, error, rows, pause,
                )  # fmt: skip
                cycle, tries = cycle + 1, 0
            else:
                log.warning("QuestDB %s for %s failed (%s); retrying in %.2fs", what, self.table, error, pause)
                tries += 1
            await self._pause(pause, stream)
            self.stats.retries += 1
            self.metrics.retries.labels(self.table).inc()

    async def _attempt(self, columns: dict[str, Any], rows: int) -> str | None:
        """One try: None when QuestDB accepted the rows, else why it could not (retry).

        Raises QuestDBWriteError when QuestDB refused the data itself.
        """
        try:
            await self.ensure_table()
            started = time.perf_counter()
            await self.writer.write_batch(self.table, columns, symbols=self.layout.symbols, at="ts")
            elapsed = time.perf_counter() - started
        except QuestDBWriteError as exc:
            if exc.bad_data:
                self.stats.failed(exc.message, unavailable=False)
                self.metrics.errors.labels(self.table, "rejected").inc()
                raise
            error = exc.message
        except QuestDBError as exc:
            # Table creation: QuestDB unreachable, or refusing the DDL (e.g. a table of that
            # name with another designated timestamp). Never the rows' fault: retry, and
            # /health says what is wrong.
            error = f"cannot create table {self.table}: {exc.message}"
        else:
            self.stats.flushed(rows, elapsed)
            self.metrics.rows.labels(self.table).inc(rows)
            self.metrics.flush_seconds.labels(self.table).observe(elapsed)
            self._reached()
            return None
        return self._unavailable(error)

    def _reached(self) -> None:
        """QuestDB did what was asked: the table's writes are not failing any more."""
        self.stats.failing_since = None
        self.metrics.questdb_up.labels(self.table).set(1)

    def _unavailable(self, error: str) -> str:
        """Count a failure that is not the rows' fault (the batch is retried); returns `error`."""
        self.stats.failed(error, unavailable=True)
        self.metrics.errors.labels(self.table, "unavailable").inc()
        self.metrics.questdb_up.labels(self.table).set(0)
        return error

    async def _pause(self, seconds: float, stream: Stream) -> None:
        """Sleep `seconds`, telling JetStream we still hold the batch and noticing a stop."""
        await self._keep_alive(stream)
        now = time.monotonic()
        deadline, last_keep_alive = now + seconds, now
        while (left := deadline - time.monotonic()) > 0:
            if self.stopping():
                break
            await asyncio.sleep(min(left, 0.25))
            if time.monotonic() - last_keep_alive >= self.retry.keep_alive_s:
                await self._keep_alive(stream)
                last_keep_alive = time.monotonic()
        if self.stopping():
            raise WriterStopping(f"stopping with an unwritten batch for {self.table}; it will be redelivered")

    async def _keep_alive(self, stream: Stream) -> None:
        try:
            await stream.keep_alive()
        except Exception as exc:  # NATS away too: a redelivery later is harmless (dedup)
            log.warning("keep-alive for the batch of %s failed: %s", self.table, exc)
