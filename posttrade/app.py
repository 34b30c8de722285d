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
the dead-letter subject instead of being retried forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .streams.channel import Channel
from .streams.events import InvalidEvent, decode, encode
from .streams.stream import EventRecord, Stream, current_agent, current_event
from .streams.transport import ConsumerSpec, StartPosition, StreamSpec, Transport
from .tables.table import Table
from .tables.windowed import WindowedTable

log = logging.getLogger(__name__)

DLQ_STREAM = StreamSpec(name="DLQ", subjects=("posttrade.dlq.>",))

AgentFn = Callable[[Stream], Awaitable[None]]
#: How long a start waits for the bus to answer stream and bucket requests.
START_RETRY_S = 60.0
HealthCheck = Callable[[], Awaitable[tuple[bool, Any]]]


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


class AgentRunner:
    """Runs one agent: its consumer, its stream, its restarts."""

    RESTART_BACKOFF_S = (0.5, 1, 2, 5, 10)

    def __init__(
        self,
        app: App,
        fn: AgentFn,
        channel: Channel,
        name: str,
        batch_size: int,
        start: StartPosition,
    ):
        self.app = app
        self.fn = fn
        self.channel = channel
        self.name = name
        self.batch_size = batch_size
        self.start = start
        self.current: EventRecord | None = None
        self.stream: Stream | None = None
        self.consumer = None
        self.running = False
        self.crashes = 0
        self.last_error: str | None = None
        self.failed_seqs: dict[int, int] = {}  # seq -> times it crashed the agent
        self._task: asyncio.Task | None = None

    @property
    def durable(self) -> str:
        return f"{self.app.name}-{self.name}".replace(".", "_")

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
                self.crashes += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                self.app.metrics.agent_crashes.labels(self.name).inc()
                if self.current is not None:
                    self.failed_seqs[self.current.seq] = self.failed_seqs.get(self.current.seq, 0) + 1
                log.exception("agent %s crashed on seq %s", self.name, self.current and self.current.seq)
                self.app.rollback_tables(self.name)
            finally:
                self.running = False
                self.current = None
                current_event.set(None)
                if self.consumer is not None:
                    try:
                        await self.consumer.close()
                    except Exception:
                        log.warning("closing the consumer of %s failed", self.name, exc_info=True)
            delay = self.RESTART_BACKOFF_S[min(attempt, len(self.RESTART_BACKOFF_S) - 1)]
            attempt += 1
            await asyncio.sleep(delay)

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


@dataclass
class App:
    name: str
    transport: Transport
    runtime: RuntimeSettings = field(default_factory=RuntimeSettings)

    def __post_init__(self) -> None:
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
        spec = StreamSpec(name=stream, subjects=tuple(subjects), max_age_s=max_age_s)
        channel = Channel(name=name, stream=spec, value_type=value_type, subjects=tuple(consume))
        self.channels[name] = channel
        return channel

    def agent(
        self,
        channel: Channel,
        *,
        name: str | None = None,
        batch_size: int | None = None,
        start: StartPosition | None = None,
    ) -> Callable[[AgentFn], AgentFn]:
        def register(fn: AgentFn) -> AgentFn:
            agent_name = name or fn.__name__
            if agent_name in self.agents:
                raise ValueError(f"agent {agent_name} is declared twice")
            self.channels.setdefault(channel.name, channel)
            default_start = StartPosition(new_only=self.runtime.start_from == "new")
            self.agents[agent_name] = AgentRunner(
                self, fn, channel, agent_name, batch_size or self.runtime.batch_size, start or default_start
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
    ) -> Table:
        if name in self.tables:
            raise ValueError(f"table {name} is declared twice")
        table = Table(name, bucket=f"{self.name}-{name}", value_type=value_type, key_type=key_type, default=default)
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
            bucket=f"{self.name}-{name}",
            value_type=value_type,
            key_type=tuple[key_type, int],
            default=default,
        )
        meta = Table(f"{name}.meta", bucket=f"{self.name}-{name}-meta", value_type=int)
        table = WindowedTable(inner, meta, size_s=size_s, step_s=step_s, grace_s=grace_s)
        self.tables[name] = table
        return table

    def timer(self, interval: float, *, name: str | None = None):
        def register(fn):
            timer_name = name or fn.__name__
            self.timers[timer_name] = Timer(timer_name, interval, fn)
            return fn

        return register

    def page(self, path: str, *, methods: tuple[str, ...] = ("GET",)):
        def register(fn):
            self.pages.append(Page(path, fn, tuple(methods)))
            return fn

        return register

    def health_check(self, name: str):
        """Register `async fn() -> (ok, detail)`; /health answers 503 when one is not ok."""

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
        if runner_stream is None:
            await self.transport.publish(subject, data, headers=headers, msg_id=msg_id)
            return
        runner_stream.add_pending_publish(await self.transport.publish_deferred(subject, data, headers, msg_id))

    def _stream_of(self, event: EventRecord | None) -> Stream | None:
        if event is None:
            return None
        for runner in self.agents.values():
            if runner.current is event and runner.stream is not None:
                return runner.stream
        return None

    async def dead_letter(self, data: bytes, *, reason: str, agent: str, stream: str, subject: str, seq: int) -> None:
        """Keep a message the service cannot use, with why, on `posttrade.dlq.<service>`."""
        headers = {
            "Posttrade-Reason": reason[:4000],
            "Posttrade-Service": self.name,
            "Posttrade-Agent": agent,
            "Posttrade-Stream": stream,
            "Posttrade-Subject": subject,
            "Posttrade-Seq": str(seq),
        }
        await self.transport.publish(
            f"posttrade.dlq.{self.name}", data, headers=headers, msg_id=f"dlq:{self.name}:{agent}:{stream}:{seq}"
        )
        self.metrics.dead_letters.labels(agent).inc()
        log.warning("dead-lettered %s seq %d from %s: %s", stream, seq, subject, reason)

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
        await self.transport.ensure_stream(DLQ_STREAM)
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
        """Every dependency and agent, with details: what /health serves."""
        checks: dict[str, Any] = {"nats": {"ok": self.transport.connected}}
        for name, runner in self.agents.items():
            detail: dict[str, Any] = {"running": runner.running, "crashes": runner.crashes}
            ok = runner.running
            if runner.last_error:
                detail["last_error"] = runner.last_error
            if runner.consumer is not None and self.transport.connected:
                try:
                    lag = await runner.consumer.pending()
                    self.metrics.consumer_lag.labels(name).set(lag)
                    detail["lag"] = lag
                    detail["max_lag"] = self.runtime.max_lag
                    ok = ok and lag <= self.runtime.max_lag
                except Exception as exc:
                    ok = False
                    detail["lag_error"] = str(exc)
            detail["ok"] = ok
            checks[f"agent:{name}"] = detail
        for name, check in self.health_checks.items():
            try:
                ok, detail = await asyncio.wait_for(check(), timeout=3.0)
            except Exception as exc:
                ok, detail = False, f"{type(exc).__name__}: {exc}"
            checks[name] = {"ok": bool(ok), "detail": detail}
        for name, table in self.tables.items():
            self.metrics.table_keys.labels(name).set(len(table))
        healthy = self.started and all(c["ok"] for c in checks.values())
        return healthy, checks

    async def run(self, *, host: str = "0.0.0.0", port: int, metrics_port: int | None = None, auth_token: str | None = None) -> None:
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
        servers = [WebServer(build_web_app(self, auth_token=auth_token), host, port)]
        if metrics_port:
            servers.append(WebServer(build_metrics_app(self), host, metrics_port))
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
