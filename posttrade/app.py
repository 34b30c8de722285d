"""App: the registry of one service's channels, agents, tables, timers and pages.

Faust's programming model on NATS JetStream:

    app = App("ptrc", transport=NatsTransport(url))
    fills = app.channel("fills", stream="FILLS", subjects=["trading.fills.>"], value_type=Fill)
    positions = app.table("positions", value_type=Position, key_type=tuple[str, str])

    @app.agent(fills)
    async def track(stream):
        async for fill in stream:
            positions.apply((fill.account, fill.symbol), lambda p: p.apply(fill))

    @app.timer(5.0)
    async def snapshot(): ...

    @app.page("/positions")
    async def list_positions(request): ...

    await app.run()            # or: async with app: ...  (start/stop without the web server)

Each agent owns a durable consumer named `<app>-<agent>`. If an agent's body raises,
its uncommitted table changes are rolled back, it is restarted after a back-off and
resumes at its ack floor; an event that crashed it `poison_attempts` times is sent to
the dead-letter subject instead of being retried forever (every crash is charged to a
message: see `AgentRunner.crashed`). A dead-letter record always fits the server's
`max_payload` (`dead_letter_record`); a message that cannot even be dead-lettered is
terminated, logged and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import json
import logging
import signal
import time
from collections import deque
import re
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .sinks import Sink, SinkMetrics, SinkStopping
from .streams.channel import Channel
from .streams.events import InvalidEvent, decode, encode
from .streams.stream import EventRecord, MessageFailed, Stream, current_agent, current_event
from .streams.transport import (
    ConsumerSpec,
    PayloadTooLarge,
    StartPosition,
    StreamSpec,
    Transport,
    header_block_size,
)
from .tables.table import Table
from .tables.windowed import WindowedTable

if TYPE_CHECKING:
    from .config import ServiceConfig

log = logging.getLogger(__name__)

NAMESPACE = re.compile(r"[A-Za-z0-9_-]{1,32}")
DLQ_STREAM_NAME = "DLQ"
DLQ_SUBJECTS = ("posttrade.dlq.>",)
# The reason header carries at most this many bytes (an exception's text can be long).
REASON_MAX_BYTES = 4000
# When the headers alone would not fit a (very small) max_payload, the reason is cut,
# but never below this: without it the record says nothing.
REASON_MIN_BYTES = 200

AgentFn = Callable[[Stream], Awaitable[None]]
#: How long a start waits for the bus to answer stream and bucket requests.
START_RETRY_S = 60.0
#: `async fn() -> (ok, detail)`: ok is True, False (unhealthy: /health 503) or "degraded"
#: (the check and /health say so, with 200).
HealthCheck = Callable[[], Awaitable[tuple[bool | str, Any]]]
DEGRADED = "degraded"


def _header_value(text: str) -> str:
    """`text` as one header value: control characters (a newline would end the header
    block) become spaces, and the ends are trimmed (some clients trim them, which would
    change the size the record was fitted to)."""
    return "".join(" " if ch < " " or ch == "\x7f" else ch for ch in text).strip()


def _cut_utf8(text: str, max_bytes: int) -> str:
    """The longest prefix of `text` of at most `max_bytes` bytes of UTF-8."""
    raw = text.encode()
    return text if len(raw) <= max_bytes else raw[:max_bytes].decode(errors="ignore")


def dead_letter_record(
    data: bytes, headers: dict[str, str], *, msg_id: str | None, max_payload: int
) -> tuple[bytes, dict[str, str]]:
    """The dead-letter message for `data`: `headers` (reason and origin) always, and as
    much of `data` as fits with them under `max_payload`, the size the server refuses a
    message over (headers, the `Nats-Msg-Id` that `msg_id` becomes, and payload count).

    When `data` is cut, `Posttrade-Truncated` gives its original length in bytes; what
    is kept is its first bytes. A reason too long for even the headers to fit is cut
    (down to `REASON_MIN_BYTES`); raises PayloadTooLarge if that is still too much.
    """
    headers = {k: _header_value(v) for k, v in headers.items()}
    if "Posttrade-Reason" in headers:
        headers["Posttrade-Reason"] = _cut_utf8(headers["Posttrade-Reason"], REASON_MAX_BYTES)
    sent = {"Nats-Msg-Id": msg_id} if msg_id is not None else {}

    def room(h: dict[str, str]) -> int:
        return max_payload - header_block_size({**h, **sent})

    if len(data) <= room(headers):
        return data, headers
    headers["Posttrade-Truncated"] = str(len(data))
    left = room(headers)
    if left < 0 and "Posttrade-Reason" in headers:
        reason = headers["Posttrade-Reason"]
        keep = max(REASON_MIN_BYTES, len(reason.encode()) + left)
        headers["Posttrade-Reason"] = _cut_utf8(reason, keep)
        left = room(headers)
    if left < 0:
        raise PayloadTooLarge(
            f"the dead-letter headers alone take {max_payload - left} bytes: over the server's max_payload "
            f"of {max_payload}"
        )
    return data[:left], headers


class RecentCount:
    """How many times something happened in the last seconds: counts per whole second,
    only as far back as `keep_s` (a burst of a million costs one entry per second)."""

    def __init__(self, keep_s: float):
        self.keep_s = keep_s
        self._seconds: deque[list[int]] = deque()  # [second, count], oldest first
        self.total = 0

    def add(self, n: int = 1, now: float | None = None) -> None:
        second = int(time.monotonic() if now is None else now)
        if self._seconds and self._seconds[-1][0] == second:
            self._seconds[-1][1] += n
        else:
            self._seconds.append([second, n])
        self.total += n
        horizon = second - self.keep_s
        while self._seconds and self._seconds[0][0] < horizon:
            self._seconds.popleft()

    def within(self, window_s: float, now: float | None = None) -> int:
        """Events in the whole seconds that overlap the last `window_s` seconds."""
        since = (time.monotonic() if now is None else now) - window_s
        return sum(count for second, count in self._seconds if second + 1 > since)


def _json_text(value: Any, limit: int = 500) -> str:
    """A check's non-text detail as one line for `reasons`."""
    try:
        text = json.dumps(value, default=str)
    except (TypeError, ValueError):
        text = repr(value)
    return text[:limit]


@contextlib.contextmanager
def recovering() -> Iterator[None]:
    """Around rebuilding long-lived state in bulk (tables, a book): the cyclic collector
    is paused, then everything alive is frozen out of its reach. Left on, it ran full
    collections over the growing heap again and again: 1.0 s of a 1.6 s rebuild of
    55,000 positions. Objects freed later are still freed (freezing only hides them
    from the cyclic collector)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


@dataclass
class Page:
    path: str
    handler: Callable
    methods: tuple[str, ...]
    # Public: reads need no token even when the service has one (counters without account
    # data). Everything else is confidential, so a new page is protected by default.
    public: bool = False
    # Undocumented: left out of /openapi.json (a dashboard's HTML, its scripts and live
    # streams are for the browser, not for API clients or fuzzers).
    documented: bool = True


@dataclass
class Timer:
    name: str
    interval: float
    fn: Callable[[], Awaitable[None]]
    runs: int = 0
    errors: int = 0
    last_error: str | None = None


class AppMetrics:
    """Prometheus metrics every service has; services add their own to `registry`."""

    def __init__(self, app_name: str):
        self.registry = CollectorRegistry()
        r = self.registry
        self.events = Counter("posttrade_events_total", "Events handed to agents", ["agent"], registry=r)
        self.batches = Counter("posttrade_batches_total", "Batches fetched", ["agent"], registry=r)
        self.dead_letters = Counter(
            "posttrade_dead_letters_total", "Messages sent to the dead-letter subject", ["agent"], registry=r
        )
        self.dead_letters_truncated = Counter(
            "posttrade_dead_letters_truncated_total",
            "Dead letters whose original bytes were cut to fit the server's max_payload",
            ["agent"],
            registry=r,
        )
        self.terminated = Counter(
            "posttrade_terminated_total",
            "Messages terminated (never delivered again) because not even the dead-letter subject took them",
            ["agent"],
            registry=r,
        )
        self.agent_crashes = Counter("posttrade_agent_crashes_total", "Agent bodies that raised", ["agent"], registry=r)
        self.commit_seconds = Histogram(
            "posttrade_commit_seconds",
            "Time to make a batch durable and acknowledge it",
            ["agent"],
            registry=r,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )
        self.consumer_lag = Gauge("posttrade_consumer_lag", "Messages not yet acknowledged", ["agent"], registry=r)
        self.table_keys = Gauge("posttrade_table_keys", "Keys held by a table", ["table"], registry=r)
        self.timer_errors = Counter("posttrade_timer_errors_total", "Timer runs that raised", ["timer"], registry=r)

    @functools.cached_property
    def sinks(self) -> SinkMetrics:
        """Every sink's series (`posttrade.sinks`), made with the app's first sink."""
        return SinkMetrics(self.registry)


class AgentRunner:
    """Runs one agent: its consumer, its stream, its restarts.

    Every crash is charged to a message, so that `runtime.poison_attempts` always ends a
    loop (`crashed`): to the event being handled, or the one a `MessageFailed` names. A
    crash with messages in hand but none of them to blame (a commit that failed, a sink's
    batch) makes the runner take batches of half as many until it is past those messages;
    one that happens with a single message in hand (or at one-at-a-time) is charged to the
    first message in hand. A crash with nothing in hand (opening the consumer, the bus
    away) is nobody's: the message that comes next is not at fault.
    """

    RESTART_BACKOFF_S = (0.5, 1, 2, 5, 10)

    def __init__(
        self,
        app: App,
        fn: AgentFn,
        channel: Channel,
        name: str,
        batch_size: int,
        start: StartPosition,
        sinks: tuple[Sink, ...] = (),
        on_rollback: Callable[[], None] | None = None,
    ):
        self.app = app
        self.fn = fn
        self.channel = channel
        self.name = name
        self.batch_size = batch_size
        self.start = start
        # Flushed at each commit, before the tables and the acknowledgement (`posttrade.sinks`).
        self.sinks = sinks
        # Called after a crash rolled back the agent's tables and discarded its sinks'
        # batch: state derived from the tables (a book, caches) is brought back to them.
        self.on_rollback = on_rollback
        self.current: EventRecord | None = None
        self.stream: Stream | None = None
        self.consumer = None
        self.running = False
        self.crashes = 0
        self.last_error: str | None = None
        self.failed_seqs: dict[int, int] = {}  # seq -> times it crashed the agent
        # Narrowing down a crash no single message was to blame for: batches of at most
        # `_limit` messages until a commit passes `_limit_until`.
        self._limit: int | None = None
        self._limit_until = 0
        # Monotonic times of the crashes within `runtime.health_window_s`, newest last.
        self.crash_times: deque[float] = deque()
        # Monotonic time of the last sign of progress: a commit that acknowledged
        # something, or a poll that found nothing to do with nothing in hand.
        self.last_progress = 0.0
        self._task: asyncio.Task | None = None

    @property
    def durable(self) -> str:
        return self.app.namespaced(f"{self.app.name}-{self.name}", "-").replace(".", "_")

    def consumer_spec(self) -> ConsumerSpec:
        runtime = self.app.runtime
        return ConsumerSpec(
            stream=self.channel.stream.name,
            durable=self.durable,
            filter_subjects=self.channel.filter_subjects,
            start=self.start,
            max_ack_pending=max(runtime.max_ack_pending, 2 * self.batch_size),
            ack_wait_s=runtime.ack_wait_s,
        )

    def poison_reason(self, seq: int) -> str | None:
        failures = self.failed_seqs.get(seq, 0)
        if failures >= self.app.runtime.poison_attempts:
            return f"agent {self.name} failed on this event {failures} times: {self.last_error}"
        return None

    def batch_limit(self, wanted: int) -> int:
        """How many messages the stream may take now, of the `wanted`."""
        return wanted if self._limit is None else min(wanted, self._limit)

    def committed_through(self, seq: int) -> None:
        """Everything up to `seq` is acknowledged: progress."""
        self.last_progress = time.monotonic()
        if self._limit is not None and seq >= self._limit_until:
            log.info("agent %s is past the messages of its last crash: batches of %d again", self.name, self.batch_size)
            self._limit = None
        if self.failed_seqs:
            for done in [s for s in self.failed_seqs if s <= seq]:
                del self.failed_seqs[done]

    def caught_up(self) -> None:
        """The consumer had nothing more and nothing is in hand: the agent is alive and idle."""
        self.last_progress = time.monotonic()

    def crash_looping(self, now: float | None = None) -> bool:
        """`runtime.crash_loop_crashes` crashes within `runtime.health_window_s`, and no
        progress since the first of them."""
        runtime = self.app.runtime
        count = runtime.crash_loop_crashes
        if count < 1 or len(self.crash_times) < count:
            return False
        now = time.monotonic() if now is None else now
        first = self.crash_times[-count]
        return now - first <= runtime.health_window_s and self.last_progress < first

    async def flush_sinks(self, stream: Stream) -> None:
        for sink in self.sinks:
            await sink.flush(stream)

    def metrics_batch(self, size: int) -> None:
        metrics = self.app.metrics
        metrics.batches.labels(self.name).inc()
        metrics.events.labels(self.name).inc(size)

    def metrics_commit(self, seconds: float) -> None:
        self.app.metrics.commit_seconds.labels(self.name).observe(seconds)

    def start_task(self) -> None:
        self._task = asyncio.create_task(self._supervise(), name=f"agent:{self.name}")

    async def _supervise(self) -> None:
        current_agent.set(self.name)  # this task's context only
        attempt = 0
        while not self.app.stopping:
            self.consumer = None
            self.stream = None  # a crash before the new one exists holds nothing in hand
            started = time.monotonic()
            try:
                self.consumer = await self.app.transport.open_consumer(self.consumer_spec())
                self.stream = Stream(self, self.consumer, self.batch_size, self.app.runtime.poll_timeout_s)
                self.running = True
                await self.fn(self.stream)
                await self.stream.commit()
                if self.app.stopping:
                    return
                raise RuntimeError(f"agent {self.name} returned while the app was running")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if isinstance(exc, SinkStopping) and self.app.stopping:
                    # Stopping while a store is away: not a crash. What the batch changed
                    # is undone all the same, or the stop's flush would record it as done.
                    log.info("agent %s stops with its batch unacknowledged: %s", self.name, exc)
                else:
                    self.crashed(exc)
                self.app.rollback_tables(self.name)
                for sink in self.sinks:
                    sink.discard()
                if self.on_rollback is not None:
                    self.on_rollback()
            finally:
                self.running = False
                self.current = None
                current_event.set(None)
                if self.consumer is not None:
                    try:
                        await self.consumer.close()
                    except Exception:
                        log.warning("closing the consumer of %s failed", self.name, exc_info=True)
            if self.last_progress > started:
                attempt = 0  # it worked for a while: this is not a loop, restart soon
            delay = self.RESTART_BACKOFF_S[min(attempt, len(self.RESTART_BACKOFF_S) - 1)]
            attempt += 1
            await asyncio.sleep(delay)

    def crashed(self, exc: Exception) -> None:
        """Count a crash and charge it (see the class): the runner's own state only, so
        that it holds across the restart."""
        self.crashes += 1
        now = time.monotonic()
        self.crash_times.append(now)
        while now - self.crash_times[0] > self.app.runtime.health_window_s:
            self.crash_times.popleft()
        self.last_error = f"{type(exc).__name__}: {exc}"
        self.app.metrics.agent_crashes.labels(self.name).inc()
        in_hand = list(self.stream.in_hand()) if self.stream is not None else []
        if isinstance(exc, MessageFailed):
            seq = exc.seq
        elif self.current is not None:
            seq = self.current.seq
        elif not in_hand:
            log.error("agent %s crashed with no message in hand (its consumer or the bus)", self.name, exc_info=exc)
            return
        elif not self.app.transport.connected:
            log.error("agent %s crashed while the bus was away; %d messages in hand are not blamed",
                      self.name, len(in_hand), exc_info=exc)
            return
        elif len(in_hand) == 1 or self._limit == 1:
            seq = in_hand[0].seq
            log.error("agent %s crashed outside any one event; charged to seq %d, the first of %d in hand",
                      self.name, seq, len(in_hand), exc_info=exc)
            self._charge(seq)
            return
        else:
            self._limit = max(1, min(len(in_hand), self._limit or len(in_hand)) // 2)
            self._limit_until = max(self._limit_until, in_hand[-1].seq)
            log.error("agent %s crashed outside any one event, with seqs %d..%d in hand: it takes them %d at a "
                      "time until it is past them", self.name, in_hand[0].seq, in_hand[-1].seq, self._limit,
                      exc_info=exc)
            return
        log.error("agent %s crashed on seq %d", self.name, seq, exc_info=exc)
        self._charge(seq)

    def _charge(self, seq: int) -> None:
        self.failed_seqs[seq] = self.failed_seqs.get(seq, 0) + 1

    async def stop(self) -> None:
        if self.stream is not None:
            self.stream.stop()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout=10)
            except asyncio.TimeoutError:
                self._task.cancel()
            except Exception:
                pass


@dataclass
class RuntimeSettings:
    batch_size: int = 1000
    max_ack_pending: int = 20_000
    ack_wait_s: float = 60.0
    max_lag: int = 100_000
    poison_attempts: int = 3
    poll_timeout_s: float = 1.0  # how long an idle agent waits before checking for stop
    start_from: str = "all"  # "all" or "new": where agents without their own start begin
    # /health: over the last `health_window_s`, an agent that crashed `crash_loop_crashes`
    # times without progress is unhealthy; one that dead-lettered (or terminated) more
    # than `dead_letter_rate_limit` messages a minute on average is degraded.
    health_window_s: float = 300.0
    crash_loop_crashes: int = 5
    dead_letter_rate_limit: float = 10.0
    # The DLQ stream's limits: the oldest dead letters go first when one is reached.
    dead_letter_max_age_s: float = 7 * 24 * 3600.0
    dead_letter_max_bytes: int = 1024**3

    @classmethod
    def from_config(cls, config: ServiceConfig) -> RuntimeSettings:
        r, dlq = config.runtime, config.dead_letter
        return cls(
            batch_size=r.batch_size,
            max_ack_pending=r.max_ack_pending,
            ack_wait_s=r.ack_wait_s,
            max_lag=r.max_lag,
            poison_attempts=r.poison_attempts,
            start_from=r.start_from,
            health_window_s=r.health_window_s,
            crash_loop_crashes=r.crash_loop_crashes,
            dead_letter_rate_limit=r.dead_letter_rate_limit,
            dead_letter_max_age_s=dlq.max_age_s,
            dead_letter_max_bytes=dlq.max_bytes,
        )

    def dead_letter_stream(self) -> StreamSpec:
        return StreamSpec(
            name=DLQ_STREAM_NAME,
            subjects=DLQ_SUBJECTS,
            max_age_s=self.dead_letter_max_age_s,
            max_bytes=self.dead_letter_max_bytes,
        )


@dataclass
class App:
    name: str
    transport: Transport
    runtime: RuntimeSettings = field(default_factory=RuntimeSettings)
    # Set: every stream, subject, durable consumer and table bucket the app declares or
    # publishes to carries it, so apps on one bus with different namespaces never meet
    # (tests, a second desk on a shared server). None: the bus layout as it is.
    namespace: str | None = None

    def __post_init__(self) -> None:
        if self.namespace is not None and not NAMESPACE.fullmatch(self.namespace):
            raise ValueError(f"namespace {self.namespace!r}: use letters, digits, '-' and '_' only")
        self.sinks: dict[str, Sink] = {}
        self.channels: dict[str, Channel] = {}
        self.agents: dict[str, AgentRunner] = {}
        self.tables: dict[str, Table | WindowedTable] = {}
        self.timers: dict[str, Timer] = {}
        self.pages: list[Page] = []
        self.health_checks: dict[str, HealthCheck] = {}
        self.on_startup: list[Callable[[], Awaitable[None]]] = []
        self.on_shutdown: list[Callable[[], Awaitable[None]]] = []
        self.metrics = AppMetrics(self.name)
        self.stopping = False
        self.started = False
        self.started_at: float | None = None
        self._timer_tasks: list[asyncio.Task] = []
        # Per agent: the messages it dead-lettered or terminated lately (/health's rate).
        self._bad_input: dict[str, RecentCount] = {}

    # -- declarations ------------------------------------------------------------------

    def channel(
        self,
        name: str,
        *,
        stream: str,
        subjects: list[str] | tuple[str, ...],
        value_type: type,
        consume: list[str] | tuple[str, ...] = (),
        max_age_s: float | None = None,
    ) -> Channel:
        spec = StreamSpec(
            name=self.stream_name(stream), subjects=tuple(map(self.subject, subjects)), max_age_s=max_age_s
        )
        channel = Channel(
            name=name, stream=spec, value_type=value_type, subjects=tuple(map(self.subject, consume))
        )
        self.channels[name] = channel
        return channel

    def agent(
        self,
        channel: Channel,
        *,
        name: str | None = None,
        batch_size: int | None = None,
        start: StartPosition | None = None,
        sinks: list[Sink] | tuple[Sink, ...] = (),
        on_rollback: Callable[[], None] | None = None,
    ) -> Callable[[AgentFn], AgentFn]:
        """Declare an agent over `channel`. `sinks` are flushed whenever its batch is
        committed, before anything is acknowledged (`posttrade.sinks`). `on_rollback` is
        called after a crash rolled back what the agent changed, before it restarts: for
        state kept beside the tables (a book, derived totals) to follow them back."""

        def register(fn: AgentFn) -> AgentFn:
            agent_name = name or fn.__name__
            if agent_name in self.agents:
                raise ValueError(f"agent {agent_name} is declared twice")
            self.channels.setdefault(channel.name, channel)
            default_start = StartPosition(new_only=self.runtime.start_from == "new")
            for sink in sinks:
                # What a crashed batch added is discarded: another agent's would go with it.
                owner = next((r.name for r in self.agents.values() if sink in r.sinks), None)
                if owner is not None:
                    raise ValueError(f"sink {sink.name} already belongs to agent {owner}")
                self.sink(sink)
            self.agents[agent_name] = AgentRunner(
                self, fn, channel, agent_name, batch_size or self.runtime.batch_size, start or default_start,
                tuple(sinks), on_rollback,
            )
            return fn

        return register

    def table(
        self,
        name: str,
        *,
        value_type: Any = Any,
        key_type: Any = str,
        default: Callable[[], Any] | None = None,
        atomic: bool = False,
    ) -> Table:
        """A table (`tables.table`); `atomic`: one whose keys must agree with one another."""
        if name in self.tables:
            raise ValueError(f"table {name} is declared twice")
        table = Table(
            name, bucket=self.bucket(name), value_type=value_type, key_type=key_type, default=default, atomic=atomic
        )
        self.tables[name] = table
        return table

    def windowed_table(
        self,
        name: str,
        *,
        size_s: float,
        step_s: float | None = None,
        grace_s: float = 0.0,
        value_type: Any = Any,
        key_type: Any = str,
        default: Callable[[], Any] | None = None,
    ) -> WindowedTable:
        """A tumbling (no `step_s`) or hopping windowed table keyed by (key, window start)."""
        if name in self.tables:
            raise ValueError(f"table {name} is declared twice")
        inner = Table(
            name,
            bucket=self.bucket(name),
            value_type=value_type,
            key_type=tuple[key_type, int],
            default=default,
        )
        meta = Table(f"{name}.meta", bucket=self.bucket(f"{name}-meta"), value_type=int)
        table = WindowedTable(inner, meta, size_s=size_s, step_s=step_s, grace_s=grace_s)
        self.tables[name] = table
        return table

    def sink(self, sink: Sink) -> Sink:
        """Register a sink: its metrics, its /health check, its `stats()`."""
        known = self.sinks.get(sink.name)
        if known is sink:
            return sink
        if known is not None:
            raise ValueError(f"sink {sink.name} is declared twice")
        self.sinks[sink.name] = sink
        sink.attach(self)
        return sink

    # -- names on the bus -----------------------------------------------------------------

    def namespaced(self, name: str, separator: str) -> str:
        return name if self.namespace is None else f"{self.namespace}{separator}{name}"

    def stream_name(self, stream: str) -> str:
        """A JetStream stream's name in this app's namespace."""
        return stream if self.namespace is None else f"{self.namespace.upper().replace('-', '_')}_{stream}"

    def subject(self, subject: str) -> str:
        """A subject in this app's namespace (what `send` publishes to, what channels hold)."""
        return self.namespaced(subject, ".")

    def bucket(self, table: str) -> str:
        return self.namespaced(f"{self.name}-{table}", "-")

    def timer(self, interval: float, *, name: str | None = None):
        def register(fn):
            timer_name = name or fn.__name__
            self.timers[timer_name] = Timer(timer_name, interval, fn)
            return fn

        return register

    def page(
        self, path: str, *, methods: tuple[str, ...] = ("GET",), public: bool = False, documented: bool = True
    ):
        """Register a web page. With a token configured (web/auth.py), reads of a page need
        one unless it is `public`; a state-changing method always needs the full token.
        `documented=False` leaves it out of /openapi.json."""

        def register(fn):
            self.pages.append(Page(path, fn, tuple(methods), public, documented))
            return fn

        return register

    def health_check(self, name: str):
        """Register `async fn() -> (ok, detail)`. `ok` is True, False (/health answers
        503) or "degraded" (the service works, but not fully: /health answers 200 with
        `"status": "degraded"` unless something is unhealthy). Raising counts as False."""

        def register(fn: HealthCheck) -> HealthCheck:
            self.health_checks[name] = fn
            return fn

        return register

    # -- output ------------------------------------------------------------------------

    async def send(self, subject: str, value, *, msg_id: str | None = None, headers: dict | None = None) -> None:
        """Publish an event. Inside an agent the publish joins the batch's commit: the
        input is not acknowledged before the server has it. `msg_id` makes a
        redelivered input's re-publish a duplicate the server drops."""
        data = value if isinstance(value, bytes) else encode(value)
        event = current_event.get()
        runner_stream = self._stream_of(event)
        subject = self.subject(subject)
        if event is None or runner_stream is None:
            await self.transport.publish(subject, data, headers=headers, msg_id=msg_id)
            return
        runner_stream.add_pending_publish(await self.transport.publish_deferred(subject, data, headers, msg_id), event.seq)

    def _stream_of(self, event: EventRecord | None) -> Stream | None:
        if event is None:
            return None
        for runner in self.agents.values():
            if runner.current is event and runner.stream is not None:
                return runner.stream
        return None

    async def dead_letter(self, data: bytes, *, reason: str, agent: str, stream: str, subject: str, seq: int) -> None:
        """Keep a message the service cannot use, with why, on `posttrade.dlq.<service>`.

        The record always fits the server's `max_payload`: the reason and origin headers
        are kept, and of the original bytes as many as fit (`Posttrade-Truncated` then
        gives their full length). Raises only when the server does not store it."""
        msg_id = f"dlq:{self.name}:{agent}:{stream}:{seq}"
        headers = {
            "Posttrade-Reason": reason,
            "Posttrade-Service": self.name,
            "Posttrade-Agent": agent,
            "Posttrade-Stream": stream,
            "Posttrade-Subject": subject,
            "Posttrade-Seq": str(seq),
        }
        kept, headers = dead_letter_record(data, headers, msg_id=msg_id, max_payload=self.transport.max_payload)
        await self.transport.publish(self.subject(f"posttrade.dlq.{self.name}"), kept, headers=headers, msg_id=msg_id)
        self.metrics.dead_letters.labels(agent).inc()
        self._bad_input_of(agent).add()
        cut = ""
        if len(kept) < len(data):
            self.metrics.dead_letters_truncated.labels(agent).inc()
            cut = f" (first {len(kept)} of its {len(data)} bytes kept)"
        log.warning("dead-lettered %s seq %d from %s%s: %s", stream, seq, subject, cut, headers["Posttrade-Reason"][:500])

    def terminated(self, *, agent: str, stream: str, subject: str, seq: int, reason: str) -> None:
        """Account for a message its agent terminated (`Consumer.term`): it could not
        even be dead-lettered, and the server will not deliver it again."""
        self.metrics.terminated.labels(agent).inc()
        self._bad_input_of(agent).add()
        log.error("terminated %s seq %d from %s, which could not be dead-lettered: %s", stream, seq, subject, reason[:2000])

    def _bad_input_of(self, agent: str) -> RecentCount:
        counts = self._bad_input.get(agent)
        if counts is None:
            counts = self._bad_input[agent] = RecentCount(self.runtime.health_window_s)
        return counts

    # -- tables ------------------------------------------------------------------------

    def _plain_tables(self) -> list[Table]:
        plain: list[Table] = []
        for table in self.tables.values():
            plain.extend((table.table, table.meta) if isinstance(table, WindowedTable) else (table,))
        return plain

    async def flush_tables(self) -> None:
        for table in self._plain_tables():
            if table.dirty:
                await table.flush()

    def rollback_tables(self, agent: str) -> None:
        """Undo what `agent` changed since its last commit (it crashed); others keep theirs."""
        for table in self._plain_tables():
            table.rollback(agent)

    # -- replay ------------------------------------------------------------------------

    async def replay(self, channel: Channel, start: StartPosition, *, batch_size: int = 1000):
        """Yield EventRecords of `channel` from `start` up to the stream's end *now*.

        An ephemeral consumer reads the history; the live agents are not disturbed.
        Invalid messages are skipped (they were dead-lettered when first consumed).
        """
        state = await self.transport.stream_state(channel.stream.name)
        end = state.last_seq
        if end == 0:
            return
        spec = ConsumerSpec(
            stream=channel.stream.name, durable=None, filter_subjects=channel.filter_subjects, start=start
        )
        consumer = await self.transport.open_consumer(spec)
        try:
            done = False
            while not done:
                deliveries = await consumer.next_batch(batch_size, timeout=2.0)
                if not deliveries:
                    if await consumer.pending() == 0:
                        break
                    continue
                for d in deliveries:
                    if d.seq > end:
                        done = True
                        break
                    try:
                        value = decode(channel.value_type, d.data)
                    except InvalidEvent:
                        continue
                    yield EventRecord(value, channel.stream.name, d.seq, d.subject, d.ts, d.delivered, d)
                    if d.seq == end:
                        done = True
                await consumer.ack_through(deliveries[-1])
        finally:
            await consumer.close()

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Connect, declare streams, recover tables, start agents and timers."""
        self.stopping = False
        await self.transport.connect()
        deadline = time.monotonic() + START_RETRY_S
        while True:
            try:
                await self._declare_and_recover()
                break
            except TimeoutError as exc:
                # A clustered bus that just lost a node answers stream and bucket requests
                # again once their groups have elected leaders: wait for it, as for a
                # server that went away, instead of exiting.
                if time.monotonic() >= deadline:
                    raise
                log.warning("%s: the bus did not answer (%r); trying again", self.name, exc)
                await asyncio.sleep(1.0)
        for hook in self.on_startup:
            await hook()
        for runner in self.agents.values():
            runner.start_task()
        for timer in self.timers.values():
            self._timer_tasks.append(asyncio.create_task(self._run_timer(timer), name=f"timer:{timer.name}"))
        self.started = True
        self.started_at = time.time()

    async def _declare_and_recover(self) -> None:
        """The streams declared and the tables read back (both can be done again)."""
        # Updated to the configured limits when it exists (with other ones, or none).
        dlq = self.runtime.dead_letter_stream()
        await self.transport.ensure_stream(
            replace(dlq, name=self.stream_name(dlq.name), subjects=tuple(map(self.subject, dlq.subjects)))
        )
        for channel in self.channels.values():
            await self.transport.ensure_stream(channel.stream)
        with recovering():
            for table in self.tables.values():
                await table.open(self.transport)

    async def _run_timer(self, timer: Timer) -> None:
        next_run = time.monotonic() + timer.interval
        while not self.stopping:
            await asyncio.sleep(max(0.0, next_run - time.monotonic()))
            next_run += timer.interval
            try:
                await timer.fn()
                timer.runs += 1
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                timer.errors += 1
                timer.last_error = f"{type(exc).__name__}: {exc}"
                self.metrics.timer_errors.labels(timer.name).inc()
                log.exception("timer %s failed", timer.name)

    async def stop(self) -> None:
        """Let agents finish and commit their batch, then disconnect."""
        self.stopping = True
        for task in self._timer_tasks:
            task.cancel()
        await asyncio.gather(*self._timer_tasks, return_exceptions=True)
        self._timer_tasks.clear()
        await asyncio.gather(*(runner.stop() for runner in self.agents.values()))
        await self.flush_tables()
        for hook in self.on_shutdown:
            try:
                await hook()
            except Exception:
                log.exception("shutdown hook failed")
        await self.transport.close()
        self.started = False

    async def __aenter__(self) -> App:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    async def health(self) -> tuple[bool, dict]:
        """(not unhealthy, checks): `health_report` for callers that want a yes or no."""
        report = await self.health_report()
        return report["status"] != "unhealthy", report["checks"]

    async def health_report(self) -> dict[str, Any]:
        """What /health serves: `status` ("ok", "degraded" or "unhealthy"), every check
        (NATS, each agent, each registered one) with details, and `reasons`: check name →
        why it is unhealthy or degraded.

        An agent is unhealthy when it is not running, its lag is over `runtime.max_lag`,
        or it is crash-looping (`AgentRunner.crash_looping`); degraded when it
        dead-lettered or terminated more than `runtime.dead_letter_rate_limit` messages a
        minute on average over the last `runtime.health_window_s`.
        """
        runtime = self.runtime
        now = time.monotonic()
        reasons: dict[str, str] = {}
        checks: dict[str, Any] = {"nats": {"ok": self.transport.connected}}
        if not self.transport.connected:
            reasons["nats"] = "not connected"
        for name, runner in self.agents.items():
            check = f"agent:{name}"
            why: list[str] = []
            detail: dict[str, Any] = {"running": runner.running, "crashes": runner.crashes}
            if not runner.running:
                why.append("not running")
            if runner.last_error:
                detail["last_error"] = runner.last_error
            if runner.consumer is not None and self.transport.connected:
                try:
                    lag = await runner.consumer.pending()
                    self.metrics.consumer_lag.labels(name).set(lag)
                    detail["lag"] = lag
                    detail["max_lag"] = runtime.max_lag
                    if lag > runtime.max_lag:
                        why.append(f"lag {lag} over {runtime.max_lag}")
                except Exception as exc:
                    detail["lag_error"] = str(exc)
                    why.append(f"lag unknown: {exc}")
            if runner.crash_looping(now):
                detail["crash_looping"] = True
                why.append(
                    f"crash-looping: {runtime.crash_loop_crashes} crashes within {runtime.health_window_s:g} s "
                    f"without progress (last: {runner.last_error})"
                )
            bad = self._bad_input.get(name)
            recent = bad.within(runtime.health_window_s, now) if bad is not None else 0
            rate = recent * 60.0 / runtime.health_window_s
            detail["dead_letters_per_min"] = round(rate, 3)
            detail["dead_letter_rate_limit"] = runtime.dead_letter_rate_limit
            detail["ok"] = not why
            if why:
                reasons[check] = "; ".join(why)
            elif rate > runtime.dead_letter_rate_limit:
                detail["degraded"] = True
                reasons[check] = (
                    f"{recent} messages dead-lettered or terminated in the last {runtime.health_window_s:g} s: "
                    f"{rate:.3g} a minute, over the limit of {runtime.dead_letter_rate_limit:g}"
                )
            checks[check] = detail
        for name, health_check in self.health_checks.items():
            try:
                ok, said = await asyncio.wait_for(health_check(), timeout=3.0)
            except Exception as exc:
                ok, said = False, f"{type(exc).__name__}: {exc}"
            if ok == DEGRADED:
                checks[name] = {"ok": True, "degraded": True, "detail": said}
            else:
                checks[name] = {"ok": bool(ok), "detail": said}
            if ok == DEGRADED or not ok:
                reasons[name] = said if isinstance(said, str) else _json_text(said)
        for name, table in self.tables.items():
            self.metrics.table_keys.labels(name).set(len(table))
        if not self.started:
            reasons["service"] = "not started"
        if not self.started or not all(c["ok"] for c in checks.values()):
            status = "unhealthy"
        elif any(c.get("degraded") for c in checks.values()):
            status = DEGRADED
        else:
            status = "ok"
        return {"status": status, "checks": checks, "reasons": reasons}

    async def run(
        self,
        *,
        host: str = "127.0.0.1",
        port: int,
        metrics_port: int | None = None,
        auth_token: str | None = None,
        read_token: str | None = None,
        protect_health: bool = False,
    ) -> None:
        """Run until SIGINT/SIGTERM: agents, timers and the web server on `port`."""
        from .web.server import WebServer, build_metrics_app, build_web_app

        await self.start()
        # What is alive once started (modules, config, clients, recovered tables) lives as
        # long as the process. Frozen, the cyclic collector's full collections no longer
        # walk it: one over the imports alone takes ~45 ms here, with every agent stopped.
        gc.freeze()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        tokens = {"auth_token": auth_token, "read_token": read_token, "protect_health": protect_health}
        servers = [WebServer(build_web_app(self, **tokens), host, port)]
        if metrics_port:
            servers.append(WebServer(build_metrics_app(self, **tokens), host, metrics_port))
        tasks = [asyncio.create_task(server.serve()) for server in servers]
        log.info("%s serving on %s:%d", self.name, host, port)
        stopper = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait([stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
        for server in servers:
            server.should_exit = True
        await asyncio.gather(*tasks, return_exceptions=True)
        stopper.cancel()
        await self.stop()
        for task in done:
            if task is not stopper and task.exception():
                raise task.exception()
