"""Sinks: every write to a store outside the bus (QuestDB, ClickHouse, Valkey, Feast,
object storage) goes through one.

A sink is told what to write (`add`) and writes it when told (`flush`): one attempt is
the subclass's `write(batch)`, and everything around it is here, once:

* **Retry.** `write` raises `SinkUnavailable` when the store is away or pushes back (an
  `OSError`, a connection refused or a timeout, counts the same; a subclass says which of
  its client's errors do in `unavailable`); the batch is tried again under the service's one
  `RetryPolicy` (`batch.max_retry` attempts a cycle, then a longer pause, for as long as
  it takes), honouring a `retry_after` the store asked for. While it waits, JetStream is
  told the batch in hand is still being worked on, so nothing is redelivered meanwhile.
* **Refusal.** `SinkRefused` means the data itself can never be written: it is raised to
  the caller at once (which dead-letters the input it came from); never retried. Any other
  error is a bug: it is raised too, and the runtime's crash handling takes over (the
  batch is redelivered, a message that keeps failing is dead-lettered).
* **Order.** A sink declared with an agent (`@app.agent(channel, sinks=[sink])`) is
  flushed when the agent's batch is committed, before the tables' changelogs and before
  the acknowledgement: the checkpoint order of Quix Streams (sinks, then state, then
  offsets). A crash before that discards what the batch had added; the redelivered batch
  adds it again, and the stores' keys make a second write of the same rows land on the
  first.
* **For free**, once registered with `app.sink(sink)`: Prometheus metrics
  (`posttrade_sink_*{sink=...}`), `/health` (degraded while the store is failing, with
  the last error), and `stats()` for a service's own pages.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

if TYPE_CHECKING:
    from .app import App
    from .config import BatchSection
    from .streams.stream import Stream

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class SinkUnavailable(Exception):
    """The store is away, failing on its side, or asks us to slow down: try again later
    (after `retry_after` seconds when the store said so)."""

    def __init__(self, reason: str, retry_after: float | None = None):
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class SinkRefused(Exception):
    """The store can never take this data (not the store's fault): do not retry."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class SinkStopping(Exception):
    """The service is stopping with a batch not yet written; it stays unacknowledged."""


@dataclass(frozen=True)
class RetryPolicy:
    """Back-off while a store is away: `attempts` tries a cycle, spaced `initial_s`,
    doubling; between cycles a pause that doubles from `initial_s * 2**attempts` up to
    `max_s`. Cycles go on until the store answers: a fill is never dropped because a
    database was down."""

    attempts: int = 3
    initial_s: float = 0.25
    max_s: float = 5.0
    keep_alive_s: float = 5.0  # how often a long pause tells JetStream we still hold the batch

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.initial_s <= 0 or self.max_s < self.initial_s or self.keep_alive_s <= 0:
            raise ValueError(f"bad retry policy: {self}")

    @classmethod
    def from_config(cls, batch: BatchSection) -> RetryPolicy:
        return cls(attempts=batch.max_retry, initial_s=batch.retry_initial_s, max_s=batch.retry_max_s)

    def delay(self, cycle: int, attempt: int) -> float:
        """Pause after failed attempt `attempt` (0-based) of cycle `cycle` (0-based)."""
        if attempt < self.attempts - 1:
            step = attempt
        else:  # the cycle is exhausted: the longer pause before the next one
            step = self.attempts - 1 + cycle + 1
        return min(self.initial_s * (2**step), self.max_s)


async def wait_set(event: asyncio.Event, seconds: float) -> bool:
    """Whether `event` was set within `seconds`. For the loops sinks run in tasks that are
    stopped by cancelling them: on Python 3.11, `asyncio.wait_for(event.wait(), t)` can
    swallow a cancellation that arrives as its timeout fires, and the stop then waits
    for ever; `asyncio.timeout` cannot."""
    try:
        async with asyncio.timeout(seconds):
            await event.wait()
    except TimeoutError:
        return False
    return True


# -- statistics ----------------------------------------------------------------------


class RateWindow:
    """Items per second over the last N seconds, from one-second buckets."""

    def __init__(self, horizon_s: int = 60, clock: Callable[[], float] = time.monotonic):
        self.horizon_s = horizon_s
        self.clock = clock
        self._buckets: deque[list[int]] = deque()  # [second, items], oldest first

    def add(self, items: int) -> None:
        second = int(self.clock())
        if self._buckets and self._buckets[-1][0] == second:
            self._buckets[-1][1] += items
        else:
            self._buckets.append([second, items])
        self._trim(second)

    def _trim(self, second: int) -> None:
        while self._buckets and self._buckets[0][0] <= second - self.horizon_s:
            self._buckets.popleft()

    def rate(self, window_s: int) -> float:
        """Items added in the last `window_s` whole seconds (this one included) / window_s."""
        if window_s > self.horizon_s:
            raise ValueError(f"window {window_s}s is beyond the {self.horizon_s}s kept")
        now = int(self.clock())
        self._trim(now)
        items = sum(count for second, count in self._buckets if second > now - window_s)
        return items / window_s


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile `q` (0-100) of already sorted values (None when empty)."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def iso(epoch_s: float | None) -> str | None:
    if epoch_s is None:
        return None
    return _dt.datetime.fromtimestamp(epoch_s, _dt.timezone.utc).isoformat(timespec="milliseconds")


class SinkStats:
    """What a sink did, for the service's pages and `/health`. Engines with more to say
    (questdb_writer's per-table `/stats`) subclass it."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, latency_window: int = 2048):
        self.clock = clock
        self.rows = 0  # rows (items) the store accepted
        self.flushes = 0  # accepted write requests
        self.retries = 0  # attempts repeated because the store was away or failing
        self.errors = 0  # failed attempts, any cause
        self.refused = 0  # requests the store refused for their data
        self.last_error: str | None = None
        self.last_error_at: float | None = None  # epoch s
        self.last_flush_at: float | None = None  # epoch s
        self.failing_since: float | None = None  # epoch s of the first failure in a row; None while it answers
        self.latencies: deque[float] = deque(maxlen=latency_window)
        self.rate = RateWindow(60, clock)

    def written(self, rows: int, seconds: float) -> None:
        self.rows += rows
        self.flushes += 1
        self.latencies.append(seconds)
        self.rate.add(rows)
        self.last_flush_at = time.time()
        self.failing_since = None

    def reached(self) -> None:
        """The store did what was asked (a write or a look-up): it is not failing."""
        self.failing_since = None

    def failed(self, error: str, *, unavailable: bool = True) -> None:
        """A failed attempt; `unavailable`: the store's fault (retried), not the data's."""
        self.errors += 1
        self.last_error = error
        self.last_error_at = time.time()
        if unavailable and self.failing_since is None:
            self.failing_since = self.last_error_at

    def failing_for(self) -> float | None:
        return None if self.failing_since is None else max(0.0, time.time() - self.failing_since)

    def latency_ms(self) -> dict[str, Any]:
        ordered = sorted(self.latencies)
        p50, p99 = percentile(ordered, 50), percentile(ordered, 99)
        return {
            "p50": None if p50 is None else round(p50 * 1000, 3),
            "p99": None if p99 is None else round(p99 * 1000, 3),
            "max": round(ordered[-1] * 1000, 3) if ordered else None,
            "over_last_flushes": len(ordered),
        }

    def snapshot(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "flushes": self.flushes,
            "flush_latency_ms": self.latency_ms(),
            "rows_per_s": {"10s": round(self.rate.rate(10), 1), "60s": round(self.rate.rate(60), 1)},
            "errors": self.errors,
            "retries": self.retries,
            "refused": self.refused,
            "last_flush_at": iso(self.last_flush_at),
            "last_error": self.last_error,
            "last_error_at": iso(self.last_error_at),
            "writes_failing_since": iso(self.failing_since),
        }


class SinkMetrics:
    """Every sink's Prometheus series in one app registry, labelled by sink."""

    def __init__(self, registry: CollectorRegistry):
        r = registry
        self.rows = Counter("posttrade_sink_rows_total", "Rows (items) a sink wrote", ["sink"], registry=r)
        self.batches = Counter("posttrade_sink_batches_total", "Batches a sink wrote", ["sink"], registry=r)
        self.errors = Counter(
            "posttrade_sink_errors_total", "Failed writes: unavailable (retried) or refused (data)",
            ["sink", "kind"], registry=r,
        )  # fmt: skip
        self.retries = Counter("posttrade_sink_retries_total", "Writes tried again", ["sink"], registry=r)
        self.flush_seconds = Histogram(
            "posttrade_sink_flush_seconds", "One successful write", ["sink"], registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )  # fmt: skip
        self.up = Gauge("posttrade_sink_up", "1 while the sink's store takes writes", ["sink"], registry=r)
        self.pending = Gauge("posttrade_sink_pending", "Items added and not yet written", ["sink"], registry=r)


# -- the sink ------------------------------------------------------------------------


class Sink(Generic[T]):
    """Buffered writes to one store with the one retry loop (see the module doc).

    Subclasses implement `write(batch)`: one attempt, raising `SinkUnavailable` (or an
    error `unavailable` accepts) to be retried, `SinkRefused` when the data can never be
    written. Those
    with more than one kind of request (a look-up before a write, a split batch) call
    `retrying(...)` themselves around each.
    """

    # How long a store may fail before /health calls the service degraded (not unhealthy:
    # the service keeps serving what it has, and nothing is lost while it waits).
    DEGRADED_AFTER_S = 5.0

    def __init__(self, name: str, retry: RetryPolicy | None = None, *, stats: SinkStats | None = None):
        self.name = name
        self.retry = retry or RetryPolicy()
        self.stats = stats or SinkStats()
        self.metrics: SinkMetrics | None = None
        self.stopping: Callable[[], bool] = lambda: False
        self._buffer: list[T] = []

    # -- registration (App.sink) ------------------------------------------------------

    def attach(self, app: App) -> None:
        self.metrics = app.metrics.sinks
        self.metrics.up.labels(self.name).set(1)
        self.stopping = lambda: app.stopping
        app.health_check(f"sink:{self.name}")(self.health)

    async def health(self) -> tuple[bool | str, Any]:
        detail = {"pending": len(self._buffer), **self.stats.snapshot()}
        failing = self.stats.failing_for()
        if failing is not None and failing >= self.DEGRADED_AFTER_S:
            return "degraded", detail
        return True, detail

    # -- buffering ----------------------------------------------------------------------

    def add(self, item: T) -> None:
        self._buffer.append(item)

    def extend(self, items: list[T]) -> None:
        self._buffer.extend(items)

    @property
    def pending(self) -> int:
        return len(self._buffer)

    def discard(self) -> None:
        """Forget what was added since the last flush (its batch crashed and comes again)."""
        self._buffer.clear()

    async def flush(self, stream: Stream | None = None) -> None:
        """Write everything added, retrying until the store has it; what was added stays
        in the buffer if this raises."""
        if not self._buffer:
            return
        batch, self._buffer = self._buffer, []
        if self.metrics is not None:
            self.metrics.pending.labels(self.name).set(len(batch))
        try:
            await self.retrying(lambda: self.write(batch), what="write", rows=len(batch), stream=stream)
        except BaseException:
            self._buffer[:0] = batch
            raise
        finally:
            if self.metrics is not None:
                self.metrics.pending.labels(self.name).set(len(self._buffer))

    async def write(self, batch: list[T]) -> None:
        """One attempt at writing `batch`."""
        raise NotImplementedError

    def unavailable(self, exc: Exception) -> bool:
        """Whether `exc` means the store is away (retry) rather than a bug (raise).
        Subclasses add their client's connection errors."""
        return isinstance(exc, (SinkUnavailable, OSError, asyncio.TimeoutError))

    # -- the one retry loop ------------------------------------------------------------------

    async def retrying(
        self,
        attempt: Callable[[], Awaitable[R]],
        *,
        what: str,
        rows: int,
        stream: Stream | None = None,
        counts: bool = True,
    ) -> R:
        """Run `attempt` until it returns, backing off under the policy; returns its result.

        `counts`: a successful attempt is a written batch of `rows` (False for look-ups).
        Raises `SinkRefused` (counted) at once, `SinkStopping` when the service stops
        while waiting.
        """
        cycle = tries = 0
        while True:
            started = time.perf_counter()
            try:
                result = await attempt()
            except asyncio.CancelledError:
                raise
            except SinkRefused as exc:
                self.stats.refused += 1
                self.stats.failed(exc.reason, unavailable=False)
                self._count_error("refused")
                log.warning("%s: %s refused: %s", self.name, what, exc.reason)
                raise
            except Exception as exc:
                if not self.unavailable(exc):
                    raise
                error = exc.reason if isinstance(exc, SinkUnavailable) else f"{type(exc).__name__}: {exc}"
                asked = exc.retry_after if isinstance(exc, SinkUnavailable) else None
            else:
                self._reached(rows if counts else 0, time.perf_counter() - started)
                if cycle or tries:
                    log.info("%s: %s done after %d failed attempts", self.name, what, cycle * self.retry.attempts + tries)
                return result
            self.stats.failed(error)
            self._count_error("unavailable")
            pause = self.retry.delay(cycle, tries)
            if asked is not None:
                pause = max(asked, 0.0)
            if tries == self.retry.attempts - 1:
                log.error(
                    "%s: %s failed %d times in a row (%s); holding %d rows, next try in %.1fs",
                    self.name, what, self.retry.attempts, error, rows, pause,
                )  # fmt: skip
                cycle, tries = cycle + 1, 0
            else:
                log.warning("%s: %s failed (%s); retrying in %.2fs", self.name, what, error, pause)
                tries += 1
            await self._pause(pause, stream)
            self.stats.retries += 1
            if self.metrics is not None:
                self.metrics.retries.labels(self.name).inc()

    def _reached(self, rows: int, seconds: float) -> None:
        self.stats.reached()
        if rows:
            self.stats.written(rows, seconds)
        if self.metrics is not None:
            self.metrics.up.labels(self.name).set(1)
            if rows:
                self.metrics.rows.labels(self.name).inc(rows)
                self.metrics.batches.labels(self.name).inc()
                self.metrics.flush_seconds.labels(self.name).observe(seconds)

    def _count_error(self, kind: str) -> None:
        if self.metrics is not None:
            self.metrics.errors.labels(self.name, kind).inc()
            if kind == "unavailable":
                self.metrics.up.labels(self.name).set(0)

    async def _pause(self, seconds: float, stream: Stream | None) -> None:
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
            raise SinkStopping(f"{self.name}: stopping with an unwritten batch; it will be redelivered")

    async def _keep_alive(self, stream: Stream | None) -> None:
        if stream is None:
            return
        try:
            await stream.keep_alive()
        except Exception as exc:  # NATS away too: a redelivery later is harmless (idempotent writes)
            log.warning("%s: keep-alive for the batch in hand failed: %s", self.name, exc)
