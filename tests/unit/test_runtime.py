"""The runtime on the in-memory transport: agents, commits, tables, dead letters, replay."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import msgspec

from posttrade.app import App
from posttrade.streams.events import Fill, encode
from posttrade.streams.memory import MemoryTransport, subject_matches
from posttrade.streams.transport import StartPosition
from posttrade.tables.table import Table

T0 = 1_700_000_000_000_000_000


def fill(i: int, account: str = "A", qty: str = "1", ts: int | None = None) -> bytes:
    return encode(
        Fill(
            ts=ts or T0 + i,
            fill_id=f"f{i}",
            account=account,
            symbol="XYZ",
            side="BUY",
            qty=Decimal(qty),
            price=Decimal("10"),
        )
    )


def make_app(transport: MemoryTransport, name: str = "svc", batch_size: int = 10):
    app = App(name, transport)
    app.runtime.batch_size = batch_size
    app.runtime.poll_timeout_s = 0.05
    fills = app.channel("fills", stream="FILLS", subjects=["trading.fills.>"], value_type=Fill)
    totals = app.table("totals", value_type=Decimal, default=lambda: Decimal(0))
    return app, fills, totals


async def wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


def floor(transport: MemoryTransport, durable: str) -> int:
    return transport.ack_floors.get(("FILLS", durable), 0)


async def publish_fills(transport, items):
    for i, account, qty in items:
        await transport.publish(f"trading.fills.{account}", fill(i, account, qty))


def test_subject_matching():
    assert subject_matches("a.*.c", "a.b.c")
    assert not subject_matches("a.*.c", "a.b.d")
    assert subject_matches("a.>", "a.b.c")
    assert not subject_matches("a.>", "a")
    assert not subject_matches("a.b", "a.b.c")


async def test_each_event_applied_once_and_acknowledged_after_commit():
    transport = MemoryTransport()
    app, fills, totals = make_app(transport)

    @app.agent(fills)
    async def add(stream):
        async for f in stream:
            totals.apply(f.account, lambda t: t + f.qty)

    async with app:
        await publish_fills(transport, [(i, "A" if i % 2 else "B", "1") for i in range(1, 101)])
        await wait_for(lambda: floor(transport, "svc-add") == 100)
    assert totals["A"] == 50 and totals["B"] == 50
    kv = transport.buckets["svc-totals"]
    assert len(kv) == 2  # the changelog holds both keys


class _CrashingTransport(MemoryTransport):
    """Key-value writes that stop for good after `allowed` messages (a killed process)."""

    def __init__(self, allowed: int | None = None):
        super().__init__()
        self.allowed = allowed

    async def key_value(self, bucket):
        store = await super().key_value(bucket)
        original = store.put_many
        transport = self

        async def put_many(items):
            for key, value in items.items():
                if transport.allowed is not None:
                    if transport.allowed == 0:
                        raise ConnectionError("killed")
                    transport.allowed -= 1
                await original({key: value})

        store.put_many = put_many
        return store


async def _atomic_table(transport) -> Table:
    table = Table("t", bucket="t", value_type=str, atomic=True)
    await table.open(transport)
    table.max_payload = 64 * 1024  # a small bound (56 KiB a message): the second batch needs parts
    return table


async def test_an_atomic_table_reads_back_as_after_a_whole_flush_wherever_a_crash_cuts_it():
    """Every cut of two flushes' writes (the second one big enough to need parts)
    reads back as after the first or after the second, and the flush after that
    leaves the keys themselves right."""
    first = {f"k{i}": str(i) for i in range(5)}
    second = {**{f"k{i}": str(100 + i) for i in range(3, 8)}, **{f"big{i}": str(i) * 4000 for i in range(40)}}
    deleted = {"k0"}
    total = None
    cut = 0
    while total is None or cut <= total:
        transport = _CrashingTransport()
        table = await _atomic_table(transport)
        for key, value in first.items():
            table[key] = value
        await table.flush()
        transport.allowed = cut
        for key, value in second.items():
            table[key] = value
        for key in deleted:
            del table[key]
        try:
            await table.flush()
            total = total if total is not None else cut
        except ConnectionError:
            pass
        transport.allowed = None
        again = await _atomic_table(transport)
        after_first, after_second = dict(first), {k: v for k, v in {**first, **second}.items() if k not in deleted}
        assert dict(again.items()) in (after_first, after_second), cut
        again["late"] = "1"
        await again.flush()
        settled = await _atomic_table(transport)
        assert dict(settled.items()) == {**dict(again.items())}, cut
        cut += 1


async def test_restart_recovers_table_and_redelivery_is_a_no_op():
    transport = MemoryTransport()
    app, fills, totals = make_app(transport)

    @app.agent(fills)
    async def add(stream):
        async for f in stream:
            totals.apply(f.account, lambda t: t + f.qty)

    async with app:
        await publish_fills(transport, [(i, "A", "1") for i in range(1, 21)])
        await wait_for(lambda: floor(transport, "svc-add") == 20)

    # Simulate a crash after the changelog was written but before the ack: rewind the floor.
    transport.ack_floors[("FILLS", "svc-add")] = 5
    app2, fills2, totals2 = make_app(transport)

    @app2.agent(fills2)
    async def add(stream):  # noqa: F811 - the same agent in a "new process"
        async for f in stream:
            totals2.apply(f.account, lambda t: t + f.qty)

    async with app2:
        assert totals2["A"] == 20  # recovered from the changelog
        await wait_for(lambda: floor(transport, "svc-add") == 20)
        assert totals2["A"] == 20  # seqs 6..20 redelivered, none applied twice
        assert totals2.last_applied("A") == {"FILLS": 20}


async def test_malformed_message_is_dead_lettered_and_stream_goes_on():
    transport = MemoryTransport()
    app, fills, totals = make_app(transport)

    @app.agent(fills)
    async def add(stream):
        async for f in stream:
            totals.apply(f.account, lambda t: t + f.qty)

    async with app:
        await transport.publish("trading.fills.A", fill(1))
        await transport.publish("trading.fills.A", b'{"not": "a fill"}')
        await transport.publish("trading.fills.A", b"\xff garbage")
        await transport.publish("trading.fills.A", fill(4))
        await wait_for(lambda: floor(transport, "svc-add") == 4)
    dlq = transport.streams["DLQ"].messages
    assert [m[0] for m in dlq] == ["posttrade.dlq.svc", "posttrade.dlq.svc"]
    assert dlq[0][1] == b'{"not": "a fill"}'  # the original bytes
    assert "invalid Fill" in dlq[0][2]["Posttrade-Reason"]
    assert dlq[1][2]["Posttrade-Seq"] == "3"
    assert totals["A"] == 2
    assert app.metrics.dead_letters.labels("add")._value.get() == 2


async def test_crashing_agent_rolls_back_restarts_and_dead_letters_poison():
    transport = MemoryTransport()
    app, fills, totals = make_app(transport, batch_size=5)
    app.runtime.poison_attempts = 2

    @app.agent(fills)
    async def add(stream):
        async for f in stream:
            totals.apply(f.account, lambda t: t + f.qty)
            if f.fill_id == "f3":
                raise RuntimeError("boom")

    app.agents["add"].RESTART_BACKOFF_S = (0.01,)
    async with app:
        await publish_fills(transport, [(i, "A", "1") for i in range(1, 8)])
        await wait_for(lambda: floor(transport, "svc-add") == 7)
    # f3 crashed the agent twice and was dead-lettered; every other fill counted once.
    assert totals["A"] == 6
    dlq = transport.streams["DLQ"].messages
    assert len(dlq) == 1 and "boom" in dlq[0][2]["Posttrade-Reason"]
    assert app.agents["add"].crashes == 2


async def test_take_batches_commit_when_the_next_batch_is_requested():
    transport = MemoryTransport()
    app, fills, _ = make_app(transport)
    seen: list[int] = []

    @app.agent(fills)
    async def sink(stream):
        async for batch in stream.take(25, within=0.05):
            # Nothing of this batch is acknowledged while we hold it.
            assert floor(transport, "svc-sink") <= len(seen)
            seen.extend(int(f.fill_id[1:]) for f in batch)

    async with app:
        await publish_fills(transport, [(i, "A", "1") for i in range(1, 61)])
        await wait_for(lambda: floor(transport, "svc-sink") == 60)
    assert seen == list(range(1, 61))


async def test_published_outputs_are_part_of_the_commit():
    transport = MemoryTransport()
    app, fills, _ = make_app(transport)
    await transport.ensure_stream(app.channel("out", stream="OUT", subjects=["out.>"], value_type=Fill).stream)

    @app.agent(fills)
    async def forward(stream):
        async for event in stream.events():
            await app.send("out.x", event.value, msg_id=f"fwd:{event.seq}")

    async with app:
        await publish_fills(transport, [(i, "A", "1") for i in range(1, 4)])
        await wait_for(lambda: floor(transport, "svc-forward") == 3)
    transport.ack_floors[("FILLS", "svc-forward")] = 0  # force a full redelivery
    async with app:
        await wait_for(lambda: floor(transport, "svc-forward") == 3)
    assert len(transport.streams["OUT"].messages) == 3  # msg ids made the re-publishes no-ops


async def test_replay_from_sequence_and_time():
    transport = MemoryTransport()
    app, fills, _ = make_app(transport)
    async with app:
        await publish_fills(transport, [(i, "A", "1") for i in range(1, 11)])
        from_seq = [r.seq async for r in app.replay(fills, StartPosition(seq=4))]
        assert from_seq == list(range(4, 11))
        cutoff_ts = transport.streams["FILLS"].messages[6][3]
        start = datetime(1970, 1, 1, tzinfo=timezone.utc) + timedelta(microseconds=cutoff_ts // 1000)
        from_time = [r.seq async for r in app.replay(fills, StartPosition(time=start))]
        assert from_time[0] <= 7 and from_time[-1] == 10


async def test_agent_with_start_position_consumes_from_there():
    transport = MemoryTransport()
    app, fills, totals = make_app(transport)
    await transport.ensure_stream(fills.stream)
    await publish_fills(transport, [(i, "A", "1") for i in range(1, 11)])

    @app.agent(fills, start=StartPosition(seq=8))
    async def add(stream):
        async for f in stream:
            totals.apply(f.account, lambda t: t + f.qty)

    async with app:
        await wait_for(lambda: floor(transport, "svc-add") == 10)
    assert totals["A"] == 3


class Ohlc(msgspec.Struct):
    open: Decimal
    high: Decimal
    low: Decimal
    close: Decimal
    count: int = 0


async def test_tumbling_and_hopping_windows_with_grace():
    transport = MemoryTransport()
    app = App("w", transport)
    tumbling = app.windowed_table("t", size_s=60, grace_s=5, value_type=int, default=lambda: 0)
    hopping = app.windowed_table("h", size_s=60, step_s=30, value_type=int, default=lambda: 0)
    await tumbling.open(transport)
    await hopping.open(transport)
    s = 1_000_000_000
    base = 1_700_000_040 * s  # a multiple of 60 s

    tumbling.apply("X", base + 1 * s, lambda c: c + 1)
    tumbling.apply("X", base + 59 * s, lambda c: c + 1)
    tumbling.apply("X", base + 61 * s, lambda c: c + 1)  # next window; the first is still in grace
    tumbling.apply("X", base + 30 * s, lambda c: c + 1)  # late but within grace: counted
    assert tumbling.get("X", base) == 3
    assert tumbling.pop_closed() == []  # watermark 61 s < 60 + 5
    tumbling.apply("X", base + 70 * s, lambda c: c + 1)
    assert tumbling.pop_closed() == [("X", base, 3)]
    assert tumbling.apply("X", base + 10 * s, lambda c: c + 1) == []  # too late: dropped
    assert tumbling.late_events == 1
    assert tumbling.latest("X") == (base + 60 * s, 2)

    assert hopping.windows_for(base + 45 * s) == [base, base + 30 * s]
    hopping.apply("X", base + 45 * s, lambda c: c + 1)
    assert hopping.get("X", base) == 1 and hopping.get("X", base + 30 * s) == 1


async def test_windowed_table_survives_restart():
    transport = MemoryTransport()
    app = App("w", transport)
    table = app.windowed_table("t", size_s=1, value_type=Ohlc, key_type=str)
    await table.open(transport)
    s = 1_000_000_000
    bar = Ohlc(Decimal(1), Decimal(2), Decimal("0.5"), Decimal("1.5"), 3)
    table.apply("X", 5 * s, lambda _: bar)
    table.apply("X", 9 * s, lambda _: bar)  # moves the watermark: window 5 s is closed
    assert [start for _, start, _ in table.pop_closed()] == [5 * s]
    await app.flush_tables()

    app2 = App("w", transport)
    again = app2.windowed_table("t", size_s=1, value_type=Ohlc, key_type=str)
    await again.open(transport)
    assert again.get("X", 9 * s) == bar
    assert again.watermark == 9 * s
    assert again.apply("X", 5 * s, lambda _: bar) == []  # still closed after the restart


async def test_processing_makes_batch_records_exactly_once_and_charges_crashes_to_them():
    transport = MemoryTransport()
    app, fills, totals = make_app(transport, batch_size=5)
    app.runtime.poison_attempts = 2
    attempts: list[str] = []

    @app.agent(fills)
    async def sink(stream):
        async for batch in stream.take_events(10, within=0.05):
            for record in batch:
                with stream.processing(record):
                    totals.apply(record.value.account, lambda t: t + record.value.qty)
                    attempts.append(record.value.fill_id)
                    if record.value.fill_id == "f4":
                        raise RuntimeError("bad row")

    app.agents["sink"].RESTART_BACKOFF_S = (0.01,)
    async with app:
        await publish_fills(transport, [(i, "A", "1") for i in range(1, 8)])
        await wait_for(lambda: floor(transport, "svc-sink") == 7)
    assert totals["A"] == 6  # f4 dead-lettered after 2 crashes; the others once each
    dlq = transport.streams["DLQ"].messages
    assert len(dlq) == 1 and dlq[0][2]["Posttrade-Seq"] == "4"
    assert totals.last_applied("A") == {"FILLS": 7}


async def test_a_crash_rolls_back_only_the_crashing_agents_changes():
    transport = MemoryTransport()
    app, fills, totals = make_app(transport)
    other = app.table("other", value_type=int, default=lambda: 0)
    await transport.ensure_stream(fills.stream)
    await totals.open(transport)
    await other.open(transport)
    from posttrade.streams.stream import current_agent

    token = current_agent.set("steady")
    other["k"] = 1  # uncommitted work of another agent
    current_agent.reset(token)
    token = current_agent.set("crasher")
    totals["A"] = Decimal(5)
    current_agent.reset(token)

    app.rollback_tables("crasher")
    assert "A" not in totals
    assert other["k"] == 1 and other.dirty == 1


async def test_a_start_waits_for_a_bus_that_does_not_answer_yet(monkeypatch):
    """Stream requests that time out (a cluster electing leaders) are tried again; the
    app starts once they answer, with its tables read back."""
    monkeypatch.setattr("posttrade.app.asyncio.sleep", _no_wait)
    transport = MemoryTransport()
    answers = iter([TimeoutError("nats: timeout"), TimeoutError("nats: timeout")])
    ensure_stream = transport.ensure_stream

    async def electing(spec):
        failure = next(answers, None)
        if failure is not None:
            raise failure
        return await ensure_stream(spec)

    monkeypatch.setattr(transport, "ensure_stream", electing)
    app = App("svc", transport)
    table = app.table("totals", value_type=int)
    async with app:
        assert app.started and next(answers, None) is None and len(table) == 0


_real_sleep = asyncio.sleep


async def _no_wait(seconds: float) -> None:
    await _real_sleep(0)
