"""The runtime's guarantees, written once and run on every transport.

`RuntimeGuarantees` holds the tests; each takes a `bus` (a `Bus`), and a module per
transport subclasses it with its own `bus` fixture: tests/unit/test_runtime_guarantees.py
on the in-memory transport (no servers), tests/integration/test_runtime_guarantees.py
on the stack's NATS JetStream server. This module is not collected itself (its name
does not start with `test_`, nor does the class's).

A `Bus` gives each test a namespace of its own (`App(namespace=...)`: every stream,
subject, consumer and bucket carries it, so tests on a shared server never meet),
transports to build apps on (on NATS a new connection each time: a second app is a new
process), and what a test reads back from the bus: a consumer's ack floor and the
messages a stream holds on a subject.

What the tests hold a transport to:
- exactly-once effect: tables record each key's input sequence, so a redelivered or
  replayed event changes nothing, also after a crash between the changelog write and
  the acknowledgement;
- a crash mid-batch rolls back and redelivers the batch: nothing lost, nothing twice;
- dead letters: a malformed message goes to the app's `posttrade.dlq.<app>` with its
  reason and origin, is counted, and the stream goes on; a message that crashes its agent
  `poison_attempts` times is dead-lettered; every crash is charged to a message; one that
  cannot even be dead-lettered is terminated;
- replay from a sequence and from a time, and agents that start at a sequence;
- windowed tables over event time (tumbling, hopping, grace, late events, restarts);
- timers;
- publish before acknowledgement: what an agent sends is confirmed by the server before
  its input is acknowledged, and a redelivered input's re-publish is dropped;
- sinks: an agent's sink is flushed before its batch is acknowledged, and one whose
  store is away holds the batch, unacknowledged, until the store takes it;
- namespaces: apps in different namespaces on one bus never see each other's events;
- atomic tables read back as after a whole flush, wherever a crash cuts it.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import inspect
import logging
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any, AsyncIterator, Callable

import msgspec

from posttrade.app import App
from posttrade.sinks import RetryPolicy, Sink, SinkUnavailable
from posttrade.streams.channel import Channel
from posttrade.streams.events import Fill, encode
from posttrade.streams.memory import MemoryTransport, subject_matches
from posttrade.streams.stream import current_agent
from posttrade.streams.transport import ConsumerSpec, PublishFailed, StartPosition, Transport
from posttrade.tables.table import Table, outside_batch
from posttrade.tables.windowed import WindowedTable

T0 = 1_700_000_000_000_000_000
S = 1_000_000_000  # one second in ns


def fill(i: int, account: str = "A", qty: str = "1", ts: int | None = None) -> bytes:
    return encode(
        Fill(ts=ts or T0 + i, fill_id=f"f{i}", account=account, symbol="XYZ", side="BUY", qty=Decimal(qty),
             price=Decimal("10"))
    )


class Totals(msgspec.Struct):
    """Count and sum of quantities: an event lost or applied twice shows in both."""

    count: int = 0
    qty: Decimal = Decimal(0)


@dataclass(frozen=True)
class Message:
    subject: str
    data: bytes
    headers: dict[str, str] | None


async def eventually(check: Callable[[], Any], timeout: float = 20.0, what: str = "the condition") -> None:
    """Wait until `check()` (sync or async) is true."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} was not reached within {timeout} s")
        await asyncio.sleep(0.02)


def fast_restarts(app: App) -> None:
    for runner in app.agents.values():
        runner.RESTART_BACKOFF_S = (0.01,)


class Bus(abc.ABC):
    """One test's view of a transport (see the module)."""

    kind: str
    feed: Transport  # connected for the whole test: publishes the test's input

    def __init__(self) -> None:
        self.namespace = f"t{uuid.uuid4().hex[:8]}"
        self.apps: list[App] = []
        self.buckets: set[str] = set()  # of tables used without an app

    # -- building ------------------------------------------------------------------------------

    @abc.abstractmethod
    def transport(self) -> Transport:
        """A transport for one app (or one reader): a new process's connection."""

    def app(self, name: str = "svc", *, batch_size: int = 10, namespace: str | None = None) -> App:
        """An app in the test's namespace (or in `namespace`, which it then owns)."""
        app = App(name, self.transport(), namespace=namespace or self.namespace)
        app.runtime.batch_size = batch_size
        app.runtime.poll_timeout_s = 0.05
        self.apps.append(app)
        return app

    @staticmethod
    def fills(app: App) -> Channel:
        return app.channel("fills", stream="FILLS", subjects=["trading.fills.>"], value_type=Fill)

    @staticmethod
    def outputs(app: App) -> Channel:
        return app.channel("out", stream="OUT", subjects=["out.>"], value_type=Fill)

    def bucket(self, name: str) -> str:
        """A bucket name in the test's namespace, for a table used without an app."""
        bucket = f"{self.namespace}-{name}"
        self.buckets.add(bucket)
        return bucket

    @contextlib.asynccontextmanager
    async def connected(self) -> AsyncIterator[Transport]:
        """A transport of its own, connected: tables and consumers used without an app."""
        transport = self.transport()
        await transport.connect()
        try:
            yield transport
        finally:
            await transport.close()

    # -- input -------------------------------------------------------------------------------

    def subject(self, subject: str, namespace: str | None = None) -> str:
        """`subject` in the test's namespace: where the test publishes what apps consume."""
        return f"{namespace or self.namespace}.{subject}"

    async def publish_fills(self, numbers, account: str = "A", **kwargs) -> None:
        subject = self.subject(f"trading.fills.{account}")
        await self.feed.publish_many([(subject, fill(i, account, **kwargs), None, None) for i in numbers])

    async def publish(self, subject: str, data: bytes) -> None:
        await self.feed.publish(self.subject(subject), data)

    # -- reading back ---------------------------------------------------------------------------

    @abc.abstractmethod
    async def ack_floor(self, stream: str, durable: str) -> int:
        """The stream sequence up to which `durable` has acknowledged everything."""

    @abc.abstractmethod
    async def messages(self, stream: str, subject: str) -> list[Message]:
        """What `stream` holds on `subject`, oldest first."""

    async def floor(self, app: App, agent: str) -> int:
        runner = app.agents[agent]
        return await self.ack_floor(runner.channel.stream.name, runner.durable)

    async def wait_floor(self, app: App, agent: str, seq: int, timeout: float = 30.0) -> None:
        async def reached() -> bool:
            return await self.floor(app, agent) >= seq

        await eventually(reached, timeout, f"{agent}'s ack floor at {seq}")

    async def sent(self, app: App, subject: str) -> list[Message]:
        """What `app` published on `subject` (of its "out" channel)."""
        return await self.messages(app.channels["out"].stream.name, app.subject(subject))

    async def dead_letters(self, app: App) -> list[Message]:
        return await self.messages(app.stream_name("DLQ"), app.subject(f"posttrade.dlq.{app.name}"))

    async def read_back(self, bucket: str, value_type: Any, key_type: Any = str) -> dict:
        """What a table's changelog holds, as a new process would load it."""
        async with self.connected() as transport:
            table = Table("read_back", bucket=bucket, value_type=value_type, key_type=key_type)
            await table.open(transport)
            return dict(table.items())

    def declared(self) -> tuple[set[str], set[str]]:
        """The streams and buckets the test's apps and tables declared."""
        streams: set[str] = set()
        buckets = set(self.buckets)
        for app in self.apps:
            streams.add(app.stream_name("DLQ"))
            streams.update(channel.stream.name for channel in app.channels.values())
            for table in app.tables.values():
                plain = (table.table, table.meta) if isinstance(table, WindowedTable) else (table,)
                buckets.update(t.bucket for t in plain)
        return streams, buckets

    @abc.abstractmethod
    async def close(self) -> None:
        """Remove what the test left on the bus."""


class MemoryBus(Bus):
    """One `MemoryTransport` holds the bus: a "new process" is a new app on it."""

    kind = "memory"

    def __init__(self) -> None:
        super().__init__()
        self.memory = MemoryTransport()
        self.feed = self.memory

    def transport(self) -> Transport:
        return self.memory

    @contextlib.asynccontextmanager
    async def connected(self) -> AsyncIterator[Transport]:
        # The one transport stays connected: apps may be running on it.
        await self.memory.connect()
        yield self.memory

    async def ack_floor(self, stream: str, durable: str) -> int:
        return self.memory.ack_floors.get((stream, durable), 0)

    async def messages(self, stream: str, subject: str) -> list[Message]:
        held = self.memory.streams[stream].messages if stream in self.memory.streams else []
        return [Message(s, d, h) for s, d, h, _ in held if subject_matches(subject, s)]

    async def close(self) -> None:
        pass


class NatsBus(Bus):
    """A real JetStream server; each test's streams (with their consumers) and buckets
    are deleted after it."""

    kind = "nats"

    def __init__(self, url: str) -> None:
        super().__init__()
        self.url = url
        self._transports: list[Transport] = []

    def transport(self) -> Transport:
        from posttrade.streams.nats import NatsTransport

        transport = NatsTransport(self.url, name=f"guarantees-{self.namespace}")
        self._transports.append(transport)
        return transport

    async def open(self) -> None:
        self.feed = self.transport()
        await self.feed.connect()

    async def ack_floor(self, stream: str, durable: str) -> int:
        import nats.js.errors

        try:
            info = await self.feed.js.consumer_info(stream, durable)
        except nats.js.errors.NotFoundError:
            return 0
        return info.ack_floor.stream_seq

    async def messages(self, stream: str, subject: str) -> list[Message]:
        import nats.js.errors

        found: list[Message] = []
        seq = 1
        while True:
            try:
                msg = await self.feed.js.get_msg(stream, seq, subject=subject, next=True)
            except nats.js.errors.NotFoundError:
                return found
            found.append(Message(msg.subject, msg.data or b"", msg.headers))
            seq = msg.seq + 1

    async def close(self) -> None:
        import nats.js.errors

        for transport in self._transports:
            if transport is not self.feed and transport.connected:
                await transport.close()
        streams, buckets = self.declared()
        js = self.feed.js
        try:
            for delete, names in ((js.delete_stream, streams), (js.delete_key_value, buckets)):
                for name in sorted(names):
                    try:
                        await delete(name)
                    except nats.js.errors.NotFoundError:
                        pass
        finally:
            await self.feed.close()


@contextlib.asynccontextmanager
async def open_bus(kind: str, *, nats_url: str | None = None) -> AsyncIterator[Bus]:
    """The bus of one test: "memory" or "nats" (the server at `nats_url`)."""
    if kind == "memory":
        bus: Bus = MemoryBus()
    elif kind == "nats":
        assert nats_url is not None
        bus = NatsBus(nats_url)
        await bus.open()
    else:
        raise ValueError(f"no bus {kind!r}")
    try:
        yield bus
    finally:
        await bus.close()


# -- crashes, as a test makes them --------------------------------------------------------------


class LostAcks:
    """While `on`, the acknowledgements of consumers opened on `transport` never reach the
    bus: a process killed after making a batch durable, before acknowledging it."""

    def __init__(self, transport: Transport):
        self.on = False
        self.seqs: list[int] = []  # the sequences whose acknowledgement was lost
        open_consumer = transport.open_consumer

        async def opening(spec: ConsumerSpec):
            consumer = await open_consumer(spec)
            ack_through = consumer.ack_through

            async def ack(delivery) -> None:
                if self.on:
                    self.seqs.append(delivery.seq)
                else:
                    await ack_through(delivery)

            consumer.ack_through = ack
            return consumer

        transport.open_consumer = opening  # type: ignore[method-assign]


class KilledWrites:
    """Changelog writes on `transport` that stop for good after `allowed` more keys (a
    killed process); `allowed = None`: no limit. Each key is written on its own, so a
    cut can fall between any two."""

    def __init__(self, transport: Transport):
        self.allowed: int | None = None
        key_value = transport.key_value

        async def opening(bucket: str):
            store = await key_value(bucket)
            put_many = store.put_many

            async def cut(items):
                for key, value in items.items():
                    if self.allowed is not None:
                        if self.allowed == 0:
                            raise ConnectionError("killed")
                        self.allowed -= 1
                    await put_many({key: value})

            store.put_many = cut
            return store

        transport.key_value = opening  # type: ignore[method-assign]


class RecordingSink(Sink[int]):
    """A store that records each write with the agent's ack floor at that moment, and
    answers `SinkUnavailable` while `away`."""

    def __init__(self, bus: Bus, app: App, agent: str, retry: RetryPolicy | None = None):
        super().__init__(f"recording_{agent}", retry)
        self.bus, self.app, self.agent = bus, app, agent
        self.away = False
        self.refusals = 0
        self.writes: list[tuple[list[int], int]] = []

    async def write(self, batch: list[int]) -> None:
        if self.away:
            self.refusals += 1
            raise SinkUnavailable("the store is away", retry_after=0.02)
        self.writes.append((list(batch), await self.bus.floor(self.app, self.agent)))


def counting_app(bus: Bus, *, batch_size: int = 10, start: StartPosition | None = None):
    """An app whose agent adds each fill's quantity to its account's total; returns the
    app, the table and the sequences the agent was handed."""
    app = bus.app(batch_size=batch_size)
    fills = bus.fills(app)
    totals = app.table("totals", value_type=Decimal, default=lambda: Decimal(0))
    seen: list[int] = []

    async def add(stream):
        async for event in stream.events():
            seen.append(event.seq)
            totals.apply(event.value.account, lambda t: t + event.value.qty)

    app.agent(fills, start=start)(add)
    return app, totals, seen


class RuntimeGuarantees:
    """The suite; a transport's module subclasses it (as `Test…`) next to its `bus` fixture."""

    # -- exactly-once effect ------------------------------------------------------------------

    async def test_every_event_is_applied_once_and_a_replay_changes_nothing(self, bus: Bus):
        n = 5000
        accounts = [f"k{i}" for i in range(7)]

        def expected(upto: int) -> dict[str, Totals]:
            out: dict[str, Totals] = {}
            for i in range(1, upto + 1):
                t = out.setdefault(accounts[i % 7], Totals())
                t.count += 1
                t.qty += i
            return out

        def build(agent: str, start: StartPosition | None = None):
            app = bus.app(batch_size=250)
            fills = bus.fills(app)
            totals = app.table("totals", value_type=Totals, default=Totals)
            seen: list[int] = []

            async def count(stream):
                async for event in stream.events():
                    seen.append(event.seq)
                    f = event.value
                    totals.apply(f.account, lambda t: Totals(t.count + 1, t.qty + f.qty))

            app.agent(fills, name=agent, start=start)(count)
            return app, totals, seen

        app, totals, _ = build("count")
        async with app:
            await bus.feed.publish_many([
                (bus.subject(f"trading.fills.{accounts[i % 7]}"), fill(i, accounts[i % 7], qty=str(i)), None, None)
                for i in range(1, n + 1)
            ])
            await bus.wait_floor(app, "count", n)
        assert dict(totals.items()) == expected(n)
        assert await bus.read_back(totals.bucket, Totals) == dict(totals.items())

        # A second agent reading the whole stream again into the same table: every key
        # already holds every sequence, so nothing changes.
        again, totals2, seen = build("recount", StartPosition(seq=1))
        async with again:
            assert dict(totals2.items()) == dict(totals.items())
            await bus.wait_floor(again, "recount", n)
        assert len(seen) == n
        assert dict(totals2.items()) == dict(totals.items())

    async def test_a_crash_between_changelog_and_acknowledgement_applies_nothing_twice(self, bus: Bus):
        app, totals, _ = counting_app(bus, batch_size=5)
        lost = LostAcks(app.transport)
        async with app:
            await bus.publish_fills(range(1, 6))
            await bus.wait_floor(app, "add", 5)
            lost.on = True
            await bus.publish_fills(range(6, 21))
            await eventually(lambda: 20 in lost.seqs, what="the batch ending at 20 made durable")
        lost.on = False
        assert await bus.floor(app, "add") == 5
        assert totals["A"] == 20

        again, totals2, seen = counting_app(bus, batch_size=5)
        async with again:
            assert totals2["A"] == 20  # read back from the changelog
            await bus.wait_floor(again, "add", 20)
        assert seen == list(range(6, 21))  # redelivered in order, none applied again
        assert totals2["A"] == 20
        assert totals2.last_applied("A") == {again.channels["fills"].stream.name: 20}

    async def test_a_crash_mid_batch_rolls_back_and_the_redelivery_applies_each_event_once(self, bus: Bus):
        app = bus.app(batch_size=10)
        fills = bus.fills(app)
        totals = app.table("totals", value_type=Decimal, default=lambda: Decimal(0))
        crashed: list[int] = []

        @app.agent(fills)
        async def add(stream):
            async for event in stream.events():
                totals.apply(event.value.account, lambda t: t + event.value.qty)
                if event.seq == 5 and not crashed:
                    crashed.append(event.seq)
                    raise RuntimeError("crash in the middle of a batch")

        fast_restarts(app)
        async with app:
            await bus.publish_fills(range(1, 11))
            await bus.wait_floor(app, "add", 10)
        assert crashed == [5] and app.agents["add"].crashes == 1
        assert totals["A"] == 10
        assert await bus.read_back(totals.bucket, Decimal) == {"A": Decimal(10)}
        assert await bus.dead_letters(app) == []

    async def test_a_crash_calls_the_agents_rollback_hook_and_keeps_what_was_written_outside_its_batch(
        self, bus: Bus
    ):
        """State kept beside a table follows it back (`on_rollback`); a write recording a
        fact already durable elsewhere survives the crash (`outside_batch`)."""
        app = bus.app(batch_size=10)
        fills = bus.fills(app)
        totals = app.table("totals", value_type=Decimal, default=lambda: Decimal(0))
        stored = app.table("stored", value_type=int)
        beside = {"A": Decimal(0)}  # e.g. a book derived from the table
        rolled_back_to: list[Decimal] = []
        kept: list[list[str]] = []  # what `stored` held right after the rollback
        crashed: list[int] = []

        def follow_the_table_back() -> None:
            rolled_back_to.append(totals["A"])
            kept.append(sorted(stored))
            beside["A"] = totals["A"]

        @app.agent(fills, on_rollback=follow_the_table_back)
        async def add(stream):
            async for event in stream.events():
                totals.apply("A", lambda t: t + event.value.qty)
                beside["A"] += event.value.qty
                with outside_batch():
                    stored[event.value.fill_id] = event.seq
                if event.seq == 5 and not crashed:
                    crashed.append(event.seq)
                    raise RuntimeError("crash in the middle of a batch")

        fast_restarts(app)
        async with app:
            await bus.publish_fills(range(1, 11))
            await bus.wait_floor(app, "add", 10)
        assert crashed == [5] and rolled_back_to == [Decimal(0)]
        assert kept == [[f"f{i}" for i in range(1, 6)]]  # written before the crash, not undone by it
        assert beside["A"] == totals["A"] == Decimal(10)
        assert await bus.read_back(stored.bucket, int) == {f"f{i}": i for i in range(1, 11)}

    async def test_take_batches_are_acknowledged_only_when_the_next_is_asked_for(self, bus: Bus):
        app = bus.app()
        fills = bus.fills(app)
        seen: list[int] = []
        floors: list[tuple[int, int]] = []

        @app.agent(fills)
        async def sink(stream):
            async for batch in stream.take(25, within=0.05):
                # Nothing of this batch is acknowledged while it is held.
                floors.append((await bus.floor(app, "sink"), len(seen)))
                seen.extend(int(f.fill_id[1:]) for f in batch)

        async with app:
            await bus.publish_fills(range(1, 61))
            await bus.wait_floor(app, "sink", 60)
        assert seen == list(range(1, 61))
        assert floors and all(floor <= before for floor, before in floors), floors

    async def test_processing_makes_batch_records_exactly_once_and_charges_crashes_to_them(self, bus: Bus):
        app = bus.app(batch_size=5)
        app.runtime.poison_attempts = 2
        fills = bus.fills(app)
        totals = app.table("totals", value_type=Decimal, default=lambda: Decimal(0))

        @app.agent(fills)
        async def sink(stream):
            async for batch in stream.take_events(10, within=0.05):
                for record in batch:
                    with stream.processing(record):
                        totals.apply(record.value.account, lambda t: t + record.value.qty)
                        if record.value.fill_id == "f4":
                            raise RuntimeError("bad row")

        fast_restarts(app)
        async with app:
            await bus.publish_fills(range(1, 8))
            await bus.wait_floor(app, "sink", 7)
        assert totals["A"] == 6  # f4 dead-lettered after 2 crashes; the others once each
        [dead] = await bus.dead_letters(app)
        assert dead.headers["Posttrade-Seq"] == "4"
        assert totals.last_applied("A") == {fills.stream.name: 7}

    async def test_a_crash_rolls_back_only_the_crashing_agents_changes(self, bus: Bus):
        app = bus.app()
        totals = app.table("totals", value_type=Decimal, default=lambda: Decimal(0))
        other = app.table("other", value_type=int, default=lambda: 0)
        async with bus.connected() as transport:
            await totals.open(transport)
            await other.open(transport)
            token = current_agent.set("steady")
            other["k"] = 1  # uncommitted work of another agent
            current_agent.reset(token)
            token = current_agent.set("crasher")
            totals["A"] = Decimal(5)
            current_agent.reset(token)

            app.rollback_tables("crasher")
            assert "A" not in totals
            assert other["k"] == 1 and other.dirty == 1
            await app.flush_tables()
        assert await bus.read_back(other.bucket, int) == {"k": 1}
        assert await bus.read_back(totals.bucket, Decimal) == {}

    # -- dead letters --------------------------------------------------------------------------

    async def test_malformed_messages_are_dead_lettered_with_their_reason_and_the_stream_goes_on(self, bus: Bus):
        app, totals, _ = counting_app(bus)
        fills = app.channels["fills"]
        subject = "trading.fills.A"
        bad = {
            2: b"{this is not json",
            3: b'{"not": "a fill"}',
            4: fill(4).replace(b'"qty":"1"', b'"qty":"one"'),
            5: b"\xff garbage",
        }
        assert bad[4] != fill(4)
        async with app:
            for i in range(1, 7):
                await bus.publish(subject, bad.get(i) or fill(i))
            await bus.wait_floor(app, "add", 6)
        assert totals["A"] == 2
        dead = await bus.dead_letters(app)
        assert [m.data for m in dead] == [bad[2], bad[3], bad[4], bad[5]]  # the original bytes
        reasons = [m.headers["Posttrade-Reason"] for m in dead]
        assert "malformed JSON" in reasons[0] and "malformed JSON" in reasons[3]
        assert "invalid Fill" in reasons[1] and "invalid Fill" in reasons[2] and "$.qty" in reasons[2]
        assert [m.headers["Posttrade-Seq"] for m in dead] == ["2", "3", "4", "5"]
        origin = {k: dead[0].headers[k] for k in ("Posttrade-Service", "Posttrade-Agent", "Posttrade-Stream",
                                                  "Posttrade-Subject")}
        assert origin == {"Posttrade-Service": app.name, "Posttrade-Agent": "add",
                          "Posttrade-Stream": fills.stream.name, "Posttrade-Subject": bus.subject(subject)}
        assert app.metrics.dead_letters.labels("add")._value.get() == 4
        assert app.agents["add"].crashes == 0

    async def test_a_poison_message_rolls_back_restarts_and_is_dead_lettered_after_poison_attempts(self, bus: Bus):
        app = bus.app(batch_size=5)
        app.runtime.poison_attempts = 2
        fills = bus.fills(app)
        totals = app.table("totals", value_type=Decimal, default=lambda: Decimal(0))

        @app.agent(fills)
        async def add(stream):
            async for f in stream:
                totals.apply(f.account, lambda t: t + f.qty)
                if f.fill_id == "f3":
                    raise RuntimeError("boom")

        fast_restarts(app)
        async with app:
            await bus.publish_fills(range(1, 8))
            await bus.wait_floor(app, "add", 7)
        # f3 crashed the agent twice and was dead-lettered; every other fill counted once.
        assert totals["A"] == 6
        [dead] = await bus.dead_letters(app)
        assert "boom" in dead.headers["Posttrade-Reason"] and dead.headers["Posttrade-Seq"] == "3"
        assert dead.data == fill(3)
        assert app.agents["add"].crashes == 2
        assert app.metrics.dead_letters.labels("add")._value.get() == 1

    async def test_a_crash_in_the_commit_is_narrowed_down_to_its_message_and_dead_lettered(self, bus: Bus):
        """A failure outside the handler (here: making the tables durable) is charged to
        the message that caused it once the runner has narrowed its batches down to it."""
        app = bus.app(batch_size=8)
        app.runtime.poison_attempts = 2
        fills = bus.fills(app)
        totals = app.table("totals", value_type=Decimal, default=lambda: Decimal(0))
        flush = app.flush_tables

        async def flush_refusing_poison():
            if "POISON" in dict(totals.items()):
                raise RuntimeError("the changelog refused the POISON key")
            await flush()

        app.flush_tables = flush_refusing_poison  # type: ignore[method-assign]

        @app.agent(fills)
        async def add(stream):
            async for f in stream:
                totals.apply(f.account, lambda t: t + 1)

        fast_restarts(app)
        async with app:
            for i in range(1, 17):
                account = "POISON" if i == 6 else "A"
                await bus.publish(f"trading.fills.{account}", fill(i, account))
            await bus.wait_floor(app, "add", 16)
        runner = app.agents["add"]
        assert totals["A"] == 15 and "POISON" not in dict(totals.items())
        [dead] = await bus.dead_letters(app)
        assert dead.headers["Posttrade-Seq"] == "6" and dead.data == fill(6, "POISON")
        assert "failed on this event 2 times" in dead.headers["Posttrade-Reason"]
        assert "changelog refused" in dead.headers["Posttrade-Reason"]
        # 8 in hand -> 4 -> 2 -> 1, then charged twice: a bounded number of crashes.
        assert runner.crashes <= 3 + 2
        assert runner.batch_limit(1000) == 1000  # back to whole batches once past it

    async def test_a_sink_batch_that_fails_without_saying_which_event_is_bisected(self, bus: Bus):
        app = bus.app(batch_size=20)
        app.runtime.poison_attempts = 2
        fills = bus.fills(app)
        written: list[str] = []

        @app.agent(fills)
        async def add(stream):
            async for records in stream.take_events(20, within=0.05):
                if any(r.value.account == "BAD" for r in records):
                    raise ValueError("the store refused the batch")
                written.extend(r.value.fill_id for r in records)

        fast_restarts(app)
        async with app:
            for i in range(1, 21):
                account = "BAD" if i == 13 else "A"
                await bus.publish(f"trading.fills.{account}", fill(i, account))
            await bus.wait_floor(app, "add", 20)
        assert sorted(written, key=lambda f: int(f[1:])) == [f"f{i}" for i in range(1, 21) if i != 13]
        assert len(written) == len(set(written))  # a failed batch was not written, the others once
        [dead] = await bus.dead_letters(app)
        assert dead.headers["Posttrade-Seq"] == "13" and "refused the batch" in dead.headers["Posttrade-Reason"]

    async def test_an_output_the_server_refuses_is_charged_to_the_event_that_published_it(self, bus: Bus):
        app = bus.app()
        app.runtime.poison_attempts = 2
        fills = bus.fills(app)
        bus.outputs(app)

        @app.agent(fills)
        async def forward(stream):
            async for event in stream.events():
                # seq 3 publishes where no stream listens: the commit fails on its PubAck.
                subject = "nowhere.x" if event.seq == 3 else "out.x"
                await app.send(subject, event.value, msg_id=f"fwd:{event.seq}")

        fast_restarts(app)
        async with app:
            await bus.publish_fills(range(1, 6))
            await bus.wait_floor(app, "forward", 5)
        [dead] = await bus.dead_letters(app)
        assert dead.headers["Posttrade-Seq"] == "3"
        assert [m.data for m in await bus.sent(app, "out.x")] == [fill(i) for i in (1, 2, 4, 5)]
        assert app.agents["forward"].crashes == 2

    async def test_a_message_that_cannot_even_be_dead_lettered_is_terminated_logged_and_counted(self, bus: Bus, caplog):
        app, totals, _ = counting_app(bus)
        app.runtime.poison_attempts = 2
        fills = app.channels["fills"]
        transport = app.transport
        publish = transport.publish

        async def refusing_dead_letters(subject, data, headers=None, msg_id=None):
            if subject.startswith(app.subject("posttrade.dlq.")):
                raise PublishFailed("the DLQ stream refused the message")
            return await publish(subject, data, headers, msg_id)

        transport.publish = refusing_dead_letters  # type: ignore[method-assign]
        terminated: list[tuple[int, str]] = []
        open_consumer = transport.open_consumer

        async def recording_terms(spec):
            consumer = await open_consumer(spec)
            term = consumer.term

            async def recorded(delivery, reason):
                terminated.append((delivery.seq, reason))
                await term(delivery, reason)

            consumer.term = recorded
            return consumer

        transport.open_consumer = recording_terms  # type: ignore[method-assign]
        fast_restarts(app)
        caplog.set_level(logging.ERROR, logger="posttrade.app")
        async with app:
            await bus.publish("trading.fills.A", fill(1))
            await bus.publish("trading.fills.A", b"not json")
            await bus.publish("trading.fills.A", fill(3))
            await bus.wait_floor(app, "add", 3)
        [(seq, reason)] = terminated
        assert seq == 2 and "DLQ stream refused" in reason
        assert totals["A"] == 2
        assert app.metrics.terminated.labels("add")._value.get() == 1
        assert app.agents["add"].crashes == 4  # 2 x poison_attempts, then terminated
        assert any(f"terminated {fills.stream.name} seq 2" in r.getMessage() for r in caplog.records)
        assert await bus.dead_letters(app) == []

    # -- replay and start positions ------------------------------------------------------------------

    async def test_replay_from_a_sequence_and_from_a_time(self, bus: Bus):
        app = bus.app()
        fills = bus.fills(app)
        await app.transport.connect()
        try:
            await app.transport.ensure_stream(fills.stream)
            await bus.publish_fills(range(1, 21))
            await asyncio.sleep(0.05)
            middle = datetime.now(timezone.utc)
            await asyncio.sleep(0.05)
            await bus.publish_fills(range(21, 31))

            from_seq = [(r.seq, r.value.fill_id) async for r in app.replay(fills, StartPosition(seq=25))]
            assert from_seq == [(s, f"f{s}") for s in range(25, 31)]
            from_time = [r.value.fill_id async for r in app.replay(fills, StartPosition(time=middle))]
            assert from_time == [f"f{i}" for i in range(21, 31)]
            everything = [r.seq async for r in app.replay(fills, StartPosition())]
            assert everything == list(range(1, 31))
        finally:
            await app.transport.close()

    async def test_an_agent_with_a_start_position_consumes_from_there(self, bus: Bus):
        app, totals, seen = counting_app(bus, start=StartPosition(seq=8))
        await bus.feed.ensure_stream(app.channels["fills"].stream)
        await bus.publish_fills(range(1, 11))
        async with app:
            await bus.wait_floor(app, "add", 10)
        assert seen == [8, 9, 10] and totals["A"] == 3

    async def test_a_consumer_reopened_with_unacknowledged_deliveries_resumes_in_order(self, bus: Bus):
        """What was in flight comes back first, in order, at once (not after the ack wait
        with later messages first)."""
        app = bus.app()
        fills = bus.fills(app)
        async with bus.connected() as transport:
            await transport.ensure_stream(fills.stream)
            await bus.publish_fills(range(1, 11))
            spec = ConsumerSpec(stream=fills.stream.name, durable=f"{bus.namespace}-orderly")
            first = await transport.open_consumer(spec)
            batch: list = []
            while len(batch) < 4:
                batch += await first.next_batch(4 - len(batch), timeout=5)
            await first.ack_through(batch[1])  # seq 2 done; 3 and 4 in flight when we "crash"
            await first.close()
            second = await transport.open_consumer(spec)
            again: list = []
            while len(again) < 8:  # a pull's messages may arrive over more than one read
                more = await second.next_batch(10 - len(again), timeout=5)
                assert more, [d.seq for d in again]
                again += more
            assert [d.seq for d in again] == list(range(3, 11))
            await second.close()

    # -- publish before acknowledgement -------------------------------------------------------------

    async def test_what_an_agent_sends_is_confirmed_before_its_input_is_acknowledged(self, bus: Bus):
        app = bus.app()
        fills = bus.fills(app)
        bus.outputs(app)
        transport = app.transport
        publish_deferred = transport.publish_deferred
        gate = asyncio.Event()
        sent: list[str] = []

        async def confirmed_at_the_gate(subject, data, headers=None, msg_id=None):
            confirmation = await publish_deferred(subject, data, headers, msg_id)
            sent.append(subject)

            async def after_the_gate():
                await gate.wait()
                return await confirmation

            return asyncio.ensure_future(after_the_gate())

        transport.publish_deferred = confirmed_at_the_gate  # type: ignore[method-assign]

        @app.agent(fills)
        async def forward(stream):
            async for event in stream.events():
                await app.send("out.x", event.value, msg_id=f"fwd:{event.seq}")

        async with app:
            await bus.publish_fills(range(1, 4))
            await eventually(lambda: len(sent) == 3, what="three outputs sent")

            async def all_stored() -> bool:
                return len(await bus.sent(app, "out.x")) == 3

            await eventually(all_stored, what="the outputs stored")
            await asyncio.sleep(0.3)
            assert await bus.floor(app, "forward") == 0  # stored, but not confirmed to the agent yet
            gate.set()
            await bus.wait_floor(app, "forward", 3)

    async def test_a_redelivered_inputs_outputs_are_dropped_as_duplicates(self, bus: Bus):
        def build():
            app = bus.app()
            fills = bus.fills(app)
            bus.outputs(app)
            seen: list[int] = []

            @app.agent(fills)
            async def forward(stream):
                async for event in stream.events():
                    seen.append(event.seq)
                    await app.send("out.x", event.value, msg_id=f"fwd:{event.seq}")

            return app, seen

        app, _ = build()
        lost = LostAcks(app.transport)
        lost.on = True
        async with app:
            await bus.publish_fills(range(1, 4))
            await eventually(lambda: 3 in lost.seqs, what="the batch committed, its acknowledgement lost")
        lost.on = False
        assert len(await bus.sent(app, "out.x")) == 3
        again, seen = build()
        async with again:
            await bus.wait_floor(again, "forward", 3)
        assert seen == [1, 2, 3]  # a full redelivery ...
        assert len(await bus.sent(app, "out.x")) == 3  # ... whose re-publishes were dropped

    # -- windows -----------------------------------------------------------------------------------

    async def test_tumbling_and_hopping_windows_with_grace(self, bus: Bus):
        app = bus.app("w")
        tumbling = app.windowed_table("t", size_s=60, grace_s=5, value_type=int, default=lambda: 0)
        hopping = app.windowed_table("h", size_s=60, step_s=30, value_type=int, default=lambda: 0)
        async with bus.connected() as transport:
            await tumbling.open(transport)
            await hopping.open(transport)
        base = 1_700_000_040 * S  # a multiple of 60 s

        tumbling.apply("X", base + 1 * S, lambda c: c + 1)
        tumbling.apply("X", base + 59 * S, lambda c: c + 1)
        tumbling.apply("X", base + 61 * S, lambda c: c + 1)  # next window; the first is still in grace
        tumbling.apply("X", base + 30 * S, lambda c: c + 1)  # late but within grace: counted
        assert tumbling.get("X", base) == 3
        assert tumbling.pop_closed() == []  # watermark 61 s < 60 + 5
        tumbling.apply("X", base + 70 * S, lambda c: c + 1)
        assert tumbling.pop_closed() == [("X", base, 3)]
        assert tumbling.apply("X", base + 10 * S, lambda c: c + 1) == []  # too late: dropped
        assert tumbling.late_events == 1
        assert tumbling.latest("X") == (base + 60 * S, 2)

        assert hopping.windows_for(base + 45 * S) == [base, base + 30 * S]
        hopping.apply("X", base + 45 * S, lambda c: c + 1)
        assert hopping.get("X", base) == 1 and hopping.get("X", base + 30 * S) == 1

    async def test_a_windowed_table_survives_a_restart(self, bus: Bus):
        class Ohlc(msgspec.Struct):
            open: Decimal
            high: Decimal
            low: Decimal
            close: Decimal
            count: int = 0

        bar = Ohlc(Decimal(1), Decimal(2), Decimal("0.5"), Decimal("1.5"), 3)
        app = bus.app("w")
        table = app.windowed_table("t", size_s=1, value_type=Ohlc, key_type=str)
        async with bus.connected() as transport:
            await table.open(transport)
            table.apply("X", 5 * S, lambda _: bar)
            table.apply("X", 9 * S, lambda _: bar)  # moves the watermark: window 5 s is closed
            assert [start for _, start, _ in table.pop_closed()] == [5 * S]
            await app.flush_tables()

        restarted = bus.app("w")
        again = restarted.windowed_table("t", size_s=1, value_type=Ohlc, key_type=str)
        async with bus.connected() as transport:
            await again.open(transport)
        assert again.get("X", 9 * S) == bar
        assert again.get("X", 5 * S) is None  # popped before the flush
        assert again.watermark == 9 * S
        assert again.apply("X", 5 * S, lambda _: bar) == []  # still closed after the restart

    async def test_an_agent_folds_events_into_windows_by_event_time_and_a_redelivery_changes_none(self, bus: Bus):
        base = 1_700_000_040 * S  # a multiple of 60 s
        # Seconds after `base`, in stream order: 10 is late but within the grace of the
        # first minute; 20 comes once 70 has closed it.
        offsets = [1, 30, 61, 10, 70, 20]

        def build():
            app = bus.app(batch_size=10)
            fills = bus.fills(app)
            tumbling = app.windowed_table("tumbling", size_s=60, grace_s=5, value_type=int, default=lambda: 0)
            hopping = app.windowed_table("hopping", size_s=60, step_s=30, grace_s=5, value_type=int,
                                         default=lambda: 0)

            @app.agent(fills)
            async def count(stream):
                async for f in stream:
                    tumbling.apply(f.account, f.ts, lambda c: c + 1)
                    hopping.apply(f.account, f.ts, lambda c: c + 1)

            return app, tumbling, hopping

        def windows(table) -> dict[int, int]:
            return {(start - base) // S: value for (_, start), value in table.table.items()}

        tumbling_counts = {0: 3, 60: 2}
        hopping_counts = {-30: 1, 0: 3, 30: 3, 60: 2}  # 10 s finds the window at -30 s closed

        app, tumbling, hopping = build()
        lost = LostAcks(app.transport)
        lost.on = True
        async with app:
            for i, offset in enumerate(offsets, 1):
                await bus.publish("trading.fills.A", fill(i, ts=base + offset * S))
            await eventually(lambda: len(offsets) in lost.seqs, what="every event made durable")
        lost.on = False
        assert windows(tumbling) == tumbling_counts and tumbling.late_events == 1
        assert windows(hopping) == hopping_counts and hopping.late_events == 1
        assert tumbling.watermark == base + 70 * S

        again, tumbling2, hopping2 = build()
        async with again:
            assert tumbling2.watermark == base + 70 * S  # read back with the windows
            await bus.wait_floor(again, "count", len(offsets))
        assert windows(tumbling2) == tumbling_counts
        assert windows(hopping2) == hopping_counts

    # -- timers ------------------------------------------------------------------------------------

    async def test_timers_run_on_their_interval_outlive_a_failing_run_and_stop_with_the_app(self, bus: Bus):
        app = bus.app()
        bus.outputs(app)
        beats: list[int] = []

        @app.timer(0.05)
        async def heartbeat():
            beats.append(len(beats) + 1)
            if len(beats) == 2:
                raise RuntimeError("the second beat fails")
            # Outside any agent a send is a plain, confirmed publish.
            await app.send("out.beat", fill(len(beats)), msg_id=f"beat:{len(beats)}")

        async with app:
            await eventually(lambda: len(beats) >= 4, what="four beats")
        timer = app.timers["heartbeat"]
        assert timer.errors == 1 and "second beat fails" in timer.last_error
        assert timer.runs == len(beats) - 1
        assert app.metrics.timer_errors.labels("heartbeat")._value.get() == 1
        stored = await bus.sent(app, "out.beat")
        assert [m.data for m in stored] == [fill(i) for i in beats if i != 2]
        stopped_at = len(beats)
        await asyncio.sleep(0.2)
        assert len(beats) == stopped_at  # no run after the app stopped

    # -- sinks -------------------------------------------------------------------------------------

    async def test_an_agents_sink_is_flushed_before_its_batch_is_acknowledged(self, bus: Bus):
        app = bus.app(batch_size=5)
        fills = bus.fills(app)
        totals = app.table("totals", value_type=Decimal, default=lambda: Decimal(0))
        sink = RecordingSink(bus, app, "add")

        @app.agent(fills, sinks=[sink])
        async def add(stream):
            async for event in stream.events():
                sink.add(event.seq)
                totals.apply(event.value.account, lambda t: t + event.value.qty)

        async with app:
            await bus.publish_fills(range(1, 13))
            await bus.wait_floor(app, "add", 12)
        assert [seq for batch, _ in sink.writes for seq in batch] == list(range(1, 13))  # each once, in order
        # Every write happened while its batch was not acknowledged yet.
        assert all(floor < batch[0] for batch, floor in sink.writes), sink.writes
        assert sink.stats.rows == 12 and totals["A"] == 12

    async def test_a_sink_whose_store_is_away_holds_its_batch_unacknowledged_until_it_takes_it(self, bus: Bus):
        app = bus.app(batch_size=10)
        fills = bus.fills(app)
        totals = app.table("totals", value_type=Decimal, default=lambda: Decimal(0))
        sink = RecordingSink(bus, app, "add", retry=RetryPolicy(attempts=2, initial_s=0.01, max_s=0.05))
        sink.away = True

        @app.agent(fills, sinks=[sink])
        async def add(stream):
            async for event in stream.events():
                sink.add(event.seq)
                totals.apply(event.value.account, lambda t: t + event.value.qty)

        async with app:
            await bus.publish_fills(range(1, 6))
            await eventually(lambda: sink.refusals >= 5, what="five refused writes")
            assert await bus.floor(app, "add") == 0  # nothing acknowledged ...
            assert await bus.read_back(totals.bucket, Decimal) == {}  # ... nor the tables written
            assert sink.writes == [] and app.agents["add"].crashes == 0
            assert sink.stats.retries >= 4 and sink.stats.failing_since is not None
            sink.away = False
            await bus.wait_floor(app, "add", 5)
        assert sink.writes == [([1, 2, 3, 4, 5], 0)]
        assert await bus.read_back(totals.bucket, Decimal) == {"A": Decimal(5)}
        assert app.agents["add"].crashes == 0 and await bus.dead_letters(app) == []

    # -- namespaces --------------------------------------------------------------------------------

    async def test_apps_in_different_namespaces_on_one_bus_never_see_each_others_events(self, bus: Bus):
        """Two deployments of the same app, each in its own namespace: streams, subjects,
        consumers, tables and dead letters apart."""

        def build(namespace: str):
            app = bus.app(namespace=namespace)
            fills = bus.fills(app)
            bus.outputs(app)
            totals = app.table("totals", value_type=Decimal, default=lambda: Decimal(0))

            @app.agent(fills)
            async def add(stream):
                async for event in stream.events():
                    totals.apply(event.value.account, lambda t: t + event.value.qty)
                    await app.send("out.x", event.value, msg_id=f"fwd:{event.seq}")

            return app, totals

        east, west = f"{bus.namespace}e", f"{bus.namespace}w"
        app_east, totals_east = build(east)
        app_west, totals_west = build(west)
        assert app_east.name == app_west.name
        async with app_east, app_west:
            for i in range(1, 4):
                await bus.feed.publish(bus.subject("trading.fills.A", east), fill(i))
            await bus.feed.publish(bus.subject("trading.fills.A", east), b"not json")
            for i in range(1, 3):
                await bus.feed.publish(bus.subject("trading.fills.A", west), fill(100 + i, qty="10"))
            await bus.wait_floor(app_east, "add", 4)
            await bus.wait_floor(app_west, "add", 2)
        assert totals_east["A"] == 3 and totals_west["A"] == 20
        assert [m.data for m in await bus.sent(app_east, "out.x")] == [fill(i) for i in range(1, 4)]
        assert [m.data for m in await bus.sent(app_west, "out.x")] == [fill(101, qty="10"), fill(102, qty="10")]
        assert [m.data for m in await bus.dead_letters(app_east)] == [b"not json"]
        assert await bus.dead_letters(app_west) == []
        assert await bus.read_back(totals_east.bucket, Decimal) == {"A": Decimal(3)}
        assert await bus.read_back(totals_west.bucket, Decimal) == {"A": Decimal(20)}
        assert totals_east.bucket != totals_west.bucket
        assert app_east.agents["add"].durable != app_west.agents["add"].durable

    # -- tables ------------------------------------------------------------------------------------

    async def test_an_atomic_table_reads_back_as_after_a_whole_flush_wherever_a_crash_cuts_it(self, bus: Bus):
        """Every cut of two flushes' writes (the second one big enough to need parts)
        reads back as after the first or after the second, and the flush after that
        leaves the keys themselves right."""
        first = {f"k{i}": str(i) for i in range(5)}
        second = {**{f"k{i}": str(100 + i) for i in range(3, 8)}, **{f"big{i}": str(i) * 4000 for i in range(40)}}
        deleted = {"k0"}
        after_first = dict(first)
        after_second = {k: v for k, v in {**first, **second}.items() if k not in deleted}

        async def atomic(transport, bucket: str) -> Table:
            table = Table("t", bucket=bucket, value_type=str, atomic=True)
            await table.open(transport)
            table.max_payload = 64 * 1024  # a small bound (56 KiB a message): the second batch needs parts
            return table

        async with bus.connected() as transport:
            writes = KilledWrites(transport)
            total = None
            cut = 0
            while total is None or cut <= total:
                bucket = bus.bucket(f"atomic-t{cut}")
                writes.allowed = None
                table = await atomic(transport, bucket)
                for key, value in first.items():
                    table[key] = value
                await table.flush()
                writes.allowed = cut
                for key, value in second.items():
                    table[key] = value
                for key in deleted:
                    del table[key]
                try:
                    await table.flush()
                    total = total if total is not None else cut
                except ConnectionError:
                    pass
                writes.allowed = None
                again = await atomic(transport, bucket)
                assert dict(again.items()) in (after_first, after_second), cut
                again["late"] = "1"
                await again.flush()
                settled = await atomic(transport, bucket)
                assert dict(settled.items()) == dict(again.items()), cut
                await (await transport.key_value(bucket)).destroy()
                cut += 1
        assert total is not None and total > len(second)  # the cuts fell between parts and keys alike

    async def test_an_atomic_table_over_one_message_reads_back_whole(self, bus: Bus):
        """A batch too big for one message goes in parts, and a load applies the last batch
        over the keys (which a crash may have left half-written: here, none of them)."""
        bucket = bus.bucket("atomic-t")
        async with bus.connected() as transport:
            table = Table("t", bucket=bucket, value_type=str, atomic=True)
            await table.open(transport)
            values = {f"key{i}": f"{i}" * 20_000 for i in range(200)}  # ~4 MB: several parts
            for key, value in values.items():
                table[key] = value
            kv = table._kv
            original = kv.put_many
            calls = []

            async def put_many(items):
                calls.append(list(items))
                if len(calls) == 3:  # the keys themselves: lost to a crash
                    raise ConnectionError("killed")
                await original(items)

            kv.put_many = put_many
            try:
                await table.flush()
            except ConnectionError:
                pass
            else:
                raise AssertionError("the flush did not reach the keys")
            assert len(calls[0]) > 1 and all(name.startswith("__batch__.") for name in calls[0])
            again = Table("t", bucket=bucket, value_type=str, atomic=True)
            await again.open(transport)
            assert dict(again.items()) == values
            await again.flush()  # writes the keys the crash lost, then forgets the parts
            raw = await (await transport.key_value(bucket)).load_all()
            assert len([k for k in raw if not k.startswith("__batch__")]) == len(values)
            parts = [k for k in raw if k.startswith("__batch__.")]
            assert parts and all(k.startswith(f"__batch__.{again._batch}.") for k in parts)  # the first batch's are gone
            last = Table("t", bucket=bucket, value_type=str, atomic=True)
            await last.open(transport)
            assert dict(last.items()) == values

