"""`ExecutionSink`: execution_quality's writes to ClickHouse, through the one retry loop of
`posttrade.sinks`.

What it writes is not a buffer of added items but the tracker's changes: every fill and
order changed since the last write (`ExecutionTracker.take_changes`), as rows, one Arrow
insert per table (fills, orders, the ledger of fill_ids); once ClickHouse has them, those
states are persisted to the changelog tables (`ExecutionTracker.persist`). Writes never
overlap (one lock), and each takes everything changed so far.

A write happens when the orders or fills agent ends a batch (`flush(stream)`: it
returns once every change made before it is written and persisted, and the agent's
batch is committed after), when `batch_rows` changes wait, or every `interval_s` (the
sink's writer task). Each step (the read of stored progress after a restart, each
insert, the rollup refresh, a ledger look-up, opening ClickHouse) is one attempt under
`Sink.retrying`: a failing step is tried again under the service's `RetryPolicy`, never
dropped, and the steps already done are not repeated. While ClickHouse is away the
sink's /health check says degraded; the orders and fills agents hold their batches
(told in progress to the server), the market-data agents go on until `max_unwritten`
rows wait.

The per-minute rollup follows the fills table at most `interval_s` behind: the minutes
a write touched become stale, and the writer refreshes all stale minutes in one
statement once per `interval_s`. Should the process die first, the restart refreshes the
minutes of every fill it holds, and retention keeps the fills of stale minutes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from ...agents.execution.state import SeenFill, minute_of
from ...sinks import RetryPolicy, Sink, SinkStopping, SinkUnavailable, wait_set
from . import ClickHouseError
from .execution import (
    FILL_COLUMNS,
    FILL_ID_COLUMNS,
    FILLS_TABLE,
    FILL_IDS_TABLE,
    ORDER_COLUMNS,
    ORDERS_TABLE,
    Column,
    ExecutionStore,
    arrow_table,
    fill_row,
    order_row,
    storable_row,
)

if TYPE_CHECKING:
    from ...agents.execution.tracker import ExecutionTracker, PendingWrite
    from ...streams.stream import Stream

log = logging.getLogger(__name__)

R = TypeVar("R")


@dataclass
class ExecutionWrites:
    """What the writes did, beyond the sink's own statistics (Prometheus, /health)."""

    fill_rows: int = 0
    order_rows: int = 0
    inserts: int = 0  # Arrow inserts done (fills, orders, ledger)
    refreshes: int = 0  # rollup refreshes done
    rows_held: int = 0  # rows not written: ClickHouse has them further along (after a restart)
    write_seconds_total: float = 0.0  # in whole writes (every insert of one)


class ExecutionSink(Sink[None]):
    """Writes the tracker's changed fills and orders to ClickHouse, then persists them
    (see the module docstring).

    `connect` opens ClickHouse and readies its tables; the sink calls it (as a retried
    step) whenever it needs the store and has none. A test hands a store over with
    `use(store)` instead."""

    def __init__(
        self,
        tracker: ExecutionTracker,
        retry: RetryPolicy | None = None,
        *,
        connect: Callable[[], Awaitable[ExecutionStore]] | None = None,
        interval_s: float = 1.0,
        batch_rows: int = 1000,
        max_unwritten: int = 100_000,
    ):
        super().__init__("clickhouse", retry)
        self.tracker = tracker
        self.interval_s = interval_s
        self.batch_rows = batch_rows
        self.max_unwritten = max_unwritten
        self.store: ExecutionStore | None = None
        self.store_error: str | None = None  # why the last attempt to open ClickHouse failed
        self.writes = ExecutionWrites()
        self.stale_minutes: set[int] = set()  # rollup minutes to refresh (epoch-ns starts)
        self._connect = connect
        self._opened = False  # the store is ours to close
        self._connecting = asyncio.Lock()
        self._lock = asyncio.Lock()  # one write at a time
        self._last_refresh = 0.0
        self._last_clock = 0
        self._wake = asyncio.Event()
        self._written = asyncio.Event()
        self._task: asyncio.Task | None = None

    # -- the store ----------------------------------------------------------------------------

    def use(self, store: ExecutionStore) -> None:
        """Write to `store` (already open, its tables ready)."""
        self.store = store
        self.store_error = None

    async def _ready(self) -> ExecutionStore:
        """The store, opened now if it is not yet; `SinkUnavailable` if it cannot be."""
        if self.store is not None:
            return self.store
        if self._connect is None:
            raise SinkUnavailable("ClickHouse is not connected")
        async with self._connecting:
            if self.store is None:
                try:
                    store = await self._connect()
                except Exception as exc:
                    self.store_error = f"{type(exc).__name__}: {exc}"
                    raise SinkUnavailable(f"ClickHouse is not ready: {self.store_error}") from exc
                self.use(store)
                self._opened = True
                log.info("ClickHouse ready at %s (database %s)", store.location, store.database)
        return self.store

    def unavailable(self, exc: Exception) -> bool:
        # Any clickhouse-connect error is the server's state (away, overloaded, a table
        # being migrated), not the rows': those are made to fit their columns before.
        return super().unavailable(exc) or isinstance(exc, ClickHouseError)

    async def connect(self) -> None:
        """Open ClickHouse, trying until it answers (the writer's first step)."""
        await self.retrying(self._ready, what="connect", rows=0, counts=False)

    async def _on_store(self, step: Callable[[ExecutionStore], Awaitable[R]]) -> R:
        return await step(await self._ready())

    async def _step(
        self, what: str, step: Callable[[ExecutionStore], Awaitable[R]], *, rows: int = 0,
        stream: Stream | None = None,
    ) -> R:
        """One ClickHouse request, retried until it succeeds; `rows`: a write of that many."""
        return await self.retrying(
            lambda: self._on_store(step), what=what, rows=rows, stream=stream, counts=rows > 0
        )

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="execution:writer")

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop the writer, try once more to write what is left (what does not make it is
        not persisted either: a restart re-derives it), and close the store."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self.store is not None:
            try:
                await asyncio.wait_for(self.flush(), timeout)
                await asyncio.wait_for(self.refresh_rollup(), timeout)
            except Exception:
                log.warning("the last ClickHouse write did not finish; a restart re-derives it")
            if self._opened:
                store, self.store, self._opened = self.store, None, False
                await store.close()

    async def _run(self) -> None:
        try:
            await self.connect()
        except SinkStopping:
            return
        self._wake.set()  # what changed while ClickHouse was not there yet goes now
        while True:
            await wait_set(self._wake, self.interval_s)
            self._wake.clear()
            try:
                await self.flush()
                if self.stale_minutes and time.monotonic() - self._last_refresh >= self.interval_s:
                    await self.refresh_rollup()
            except SinkStopping:
                return
            except Exception:  # the store's failures are retried inside: this is a bug, keep writing
                log.exception("execution writer failed")
                await asyncio.sleep(self.interval_s)

    # -- what the agents call -------------------------------------------------------------------

    def unwritten(self) -> int:
        return self.tracker.unwritten()

    @property
    def pending(self) -> int:
        return self.unwritten()

    async def flush(self, stream: Stream | None = None) -> None:
        """Write every change made so far and persist it; returns once ClickHouse has it.
        `stream`: the agent's, told its batch is in progress while this waits."""
        await self._acquire(stream)
        try:
            taken = self.tracker.take_changes()
            try:
                if taken:
                    await self._write(taken, stream)
            except BaseException:
                self.tracker.restore_changes(taken)
                raise
            self.tracker.persist(taken)
            self._written.set()
        finally:
            self._lock.release()

    async def look_up(self, fill_ids: set[str], stream: Stream | None = None) -> dict[str, SeenFill]:
        """The ledger's entries of these fill_ids."""
        return await self._step("fill_id lookup", lambda store: store.seen_fills(fill_ids), stream=stream)

    async def after_market_batch(self, stream: Stream) -> None:
        """The quote and trade agents' end of batch: persist the book and tape, wake the
        writer when enough rows wait, and hold the agent while more than `max_unwritten` do."""
        self.tracker.persist_market()
        if self.unwritten() >= self.batch_rows:
            self._wake.set()
        while self.unwritten() > self.max_unwritten:
            self._wake.set()
            await stream.keep_alive()
            self._written.clear()
            if not await wait_set(self._written, self.retry.keep_alive_s):
                if self.stopping():
                    raise SinkStopping(f"{self.name}: stopping with {self.unwritten()} rows unwritten") from None

    async def refresh_rollup(self) -> None:
        """Recompute the stale rollup minutes from the fills table (one statement)."""
        async with self._lock:
            minutes = set(self.stale_minutes)
            if minutes:
                clock = self._clock()
                await self._step("rollup refresh", lambda store: store.refresh_minutes(minutes, clock))
                self.stale_minutes -= minutes
                self.writes.refreshes += 1
            self._last_refresh = time.monotonic()

    # -- writing -------------------------------------------------------------------------------

    async def _acquire(self, stream: Stream | None) -> None:
        """The write lock; while another write holds it (ClickHouse slow or away), the
        agent's batch is told in progress every `keep_alive_s`."""
        while True:
            try:
                async with asyncio.timeout(self.retry.keep_alive_s):  # not wait_for: see sinks.wait_set
                    await self._lock.acquire()
                return
            except TimeoutError:
                if self.stopping():
                    raise SinkStopping(f"{self.name}: stopping while another write holds ClickHouse") from None
                if stream is not None:
                    await stream.keep_alive()

    def _clock(self) -> int:
        """A nanosecond clock, strictly increasing in the process (below bit 62), by at
        least a microsecond per write: amended rows carry it in microseconds."""
        self._last_clock = max(self._last_clock + 1000, time.time_ns())
        return self._last_clock

    def rows_to_arrow(self, columns: tuple[Column, ...], rows: list[tuple]):
        """One Arrow table for the rows. Nearly always every exact value fits its column
        and the fast path holds; otherwise each row is made to fit (`storable_row`) and
        a row that cannot be is left out, counted and logged."""
        try:
            return arrow_table(columns, rows)
        except (ArithmeticError, ValueError, TypeError):  # pyarrow's errors derive from these
            pass
        fitted = []
        for row in rows:
            try:
                fitted.append(storable_row(columns, row))
            except ValueError:
                self.tracker.stats.rows_rejected += 1
                log.error("execution row %s cannot be written: %s", row[0], row)
        return arrow_table(columns, fitted)

    async def _write(self, taken: PendingWrite, stream: Stream | None) -> None:
        tracker = self.tracker
        started = time.perf_counter()
        unverified = tracker.unverified(taken)
        if unverified[0] or unverified[1]:
            # After a restart: never write over a row ClickHouse has further along.
            stored = await self._step("read", lambda store: store.stored_progress(*unverified), stream=stream)
            tracker.hold(unverified, *stored)
        clock = self._clock()
        written = [st for key, st in taken.fills.items() if tracker.writable_fill(key, st)]
        order_states = [st for key, st in taken.orders.items() if tracker.writable_order(key, st)]
        self.writes.rows_held += len(taken.fills) - len(written) + len(taken.orders) - len(order_states)
        fills = [fill_row(tracker, st, clock) for st in written]
        orders = [row for row in (order_row(tracker, st, clock) for st in order_states) if row is not None]
        inserts: list[tuple[str, Any]] = []
        if fills:
            inserts.append((FILLS_TABLE, self.rows_to_arrow(FILL_COLUMNS, fills)))
        if orders:
            inserts.append((ORDERS_TABLE, self.rows_to_arrow(ORDER_COLUMNS, orders)))
        if taken.seen:
            inserts.append((FILL_IDS_TABLE, arrow_table(FILL_ID_COLUMNS, [
                (fill_id, seen.seq, seen.exec_type, seen.original_fill_id, seen.outcome, clock)
                for fill_id, seen in taken.seen.items()
            ])))  # fmt: skip
        for table, data in inserts:
            if data.num_rows:  # none: every row was rejected (`rows_to_arrow`)
                await self._step(
                    f"write to {table}", lambda store, table=table, data=data: store.insert(table, data),
                    rows=data.num_rows, stream=stream,
                )
                self.writes.inserts += 1
        self.stale_minutes.update(minute_of(st.fill.ts) for st in written)
        elapsed = time.perf_counter() - started
        self.writes.fill_rows += len(fills)
        self.writes.order_rows += len(orders)
        self.writes.write_seconds_total += elapsed

    # -- /health ---------------------------------------------------------------------------------

    async def health(self) -> tuple[bool | str, Any]:
        """The sink's check, with where ClickHouse is and what waits for it: degraded
        while it is not connected (yet), does not answer, or writes have been failing
        for `DEGRADED_AFTER_S` (nothing is lost meanwhile: the agents hold their batches)."""
        ok, detail = await super().health()
        detail.update(
            pending=self.unwritten(),  # rows changed and not yet in ClickHouse
            connected=self.store is not None,
            rows_written={"fills": self.writes.fill_rows, "orders": self.writes.order_rows},
            rollup_minutes_stale=len(self.stale_minutes),
        )
        # `error` first: /health's `reasons` shows the start of the detail.
        if self.store is None:
            return "degraded", {"error": self.store_error or "connecting", **detail}
        detail.update(location=self.store.location, database=self.store.database)
        try:
            await self.store.ping()
        except Exception as exc:
            return "degraded", {"error": f"{type(exc).__name__}: {exc}", **detail}
        return ok, detail
