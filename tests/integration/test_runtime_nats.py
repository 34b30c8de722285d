"""The runtime on the real NATS JetStream server of the local stack: what only a real
server and real processes show (a worker killed with SIGKILL, `forget`, the last message
per subject). The guarantees shared with the in-memory transport are
tests/integration/test_runtime_guarantees.py."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import msgspec
import nats
import pytest

from posttrade.streams.nats import NatsTransport
from posttrade.streams.transport import ConsumerSpec, StartPosition, StreamSpec

from .counter_worker import Tick, Totals, build

WORKER = Path(__file__).with_name("counter_worker.py")
KEYS = [f"k{i}" for i in range(7)]


def tick_bytes(i: int) -> bytes:
    return msgspec.json.encode(Tick(KEYS[i % len(KEYS)], i))


def expected_totals(n: int) -> dict[str, Totals]:
    out: dict[str, Totals] = {}
    for i in range(1, n + 1):
        t = out.setdefault(KEYS[i % len(KEYS)], Totals())
        t.count += 1
        t.total += i
    return out


async def publish_ticks(url: str, stream: str, numbers, extra: dict[int, bytes] | None = None) -> None:
    """Publish ticks with core NATS (fast) and confirm they are all in the stream."""
    nc = await nats.connect(url)
    js = nc.jetstream()
    count = 0
    for i in numbers:
        data = (extra or {}).get(i, tick_bytes(i))
        await nc.publish(f"{stream.lower()}.{KEYS[i % len(KEYS)]}", data)
        count += 1
    await nc.flush()
    deadline = time.monotonic() + 20
    while (await js.stream_info(stream)).state.messages < count and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    await nc.close()


async def read_totals(url: str, stream: str, name: str) -> dict[str, Totals]:
    app, totals = build(url, stream, name)
    await app.transport.connect()
    await totals.open(app.transport)
    await app.transport.close()
    return dict(totals.items())


async def consumer_floor(url: str, stream: str, durable: str) -> int:
    nc = await nats.connect(url)
    try:
        info = await nc.jetstream().consumer_info(stream, durable)
        return info.ack_floor.stream_seq
    except nats.js.errors.NotFoundError:
        return 0
    finally:
        await nc.close()


async def wait_floor(url, stream, durable, target, timeout=60.0, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while True:
        floor = await consumer_floor(url, stream, durable)
        if floor >= target:
            return floor
        if time.monotonic() > deadline:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            raise AssertionError(f"consumer {durable} stuck at {floor} < {target}\n{tail}")
        await asyncio.sleep(0.1)


def start_worker(url: str, stream: str, name: str, log: Path, batch: int = 100) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(WORKER.parents[2])}
    # The log goes to a file: a pipe nobody reads would block the worker once full.
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, str(WORKER), url, stream, name, str(batch)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=out,
        )


def stop_worker(proc: subprocess.Popen, log: Path) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("worker did not stop on SIGTERM")
    assert proc.returncode == 0, log.read_text()[-3000:]


@pytest.fixture
def names():
    suffix = uuid.uuid4().hex[:8].upper()
    return f"ITEST_{suffix}", f"itest{suffix.lower()}"


async def test_sigkill_mid_stream_loses_nothing_and_applies_nothing_twice(stack, names, tmp_path):
    stream, app_name = names
    n = 30_000
    durable = f"{app_name}-count"
    # Declare the stream first so publishing can start before the worker is up.
    app, _ = build(stack.nats_url, stream, app_name)
    await app.transport.connect()
    await app.transport.ensure_stream(app.channels["ticks"].stream)
    await app.transport.close()

    log = tmp_path / "worker.log"
    worker = start_worker(stack.nats_url, stream, app_name, log, batch=100)
    try:
        await publish_ticks(stack.nats_url, stream, range(1, n + 1))
        kills = 0
        for fraction in (0.2, 0.5):  # kill it twice, at different points
            await wait_floor(stack.nats_url, stream, durable, int(n * fraction), log=log)
            worker.send_signal(signal.SIGKILL)
            worker.wait(timeout=10)
            kills += 1
            worker = start_worker(stack.nats_url, stream, app_name, log, batch=100)
        await wait_floor(stack.nats_url, stream, durable, n, log=log)
        stop_worker(worker, log)
    finally:
        if worker.poll() is None:
            worker.kill()
    assert kills == 2
    assert await read_totals(stack.nats_url, stream, app_name) == expected_totals(n)


async def test_forget_deletes_an_apps_consumers_and_tables_and_nothing_of_another(stack, names):
    stream, app_name = names
    neighbour_name = f"{app_name}_2"  # its names start with app_name too, but not with "<app_name>-"
    app, _ = build(stack.nats_url, stream, app_name)
    neighbour, _ = build(stack.nats_url, stream, neighbour_name)
    async with app, neighbour:
        await publish_ticks(stack.nats_url, stream, range(1, 11))
        await wait_floor(stack.nats_url, stream, f"{app_name}-count", 10)
    transport = NatsTransport(stack.nats_url)
    await transport.connect()
    try:
        mine = [("consumer", f"{stream}/{app_name}-count"), ("bucket", f"{app_name}-totals")]
        assert sorted(await transport.app_state(app_name)) == sorted(mine)
        assert sorted(await transport.forget_app(app_name)) == sorted(mine)
        assert await transport.app_state(app_name) == []
        assert len(await transport.app_state(neighbour_name)) == 2
        js = transport.js
        with pytest.raises(nats.js.errors.NotFoundError):
            await js.consumer_info(stream, f"{app_name}-count")
        assert (await js.consumer_info(stream, f"{neighbour_name}-count")).name == f"{neighbour_name}-count"
        await transport.forget_app(neighbour_name)
    finally:
        await transport.close()


def test_forget_command_lists_then_deletes_with_yes(stack, names, capsys):
    from posttrade.cli import main

    stream, app_name = names

    async def run_app_once() -> None:
        app, _ = build(stack.nats_url, stream, app_name)
        async with app:
            await publish_ticks(stack.nats_url, stream, range(1, 4))
            await wait_floor(stack.nats_url, stream, f"{app_name}-count", 3)

    asyncio.run(run_app_once())
    assert main(["forget", app_name, "--nats", stack.nats_url]) == 0
    listed = capsys.readouterr().out
    assert f"would delete consumer {stream}/{app_name}-count" in listed
    assert f"would delete bucket {app_name}-totals" in listed
    assert main(["forget", app_name, "--nats", stack.nats_url, "--yes"]) == 0
    assert f"deleted consumer {stream}/{app_name}-count" in capsys.readouterr().out
    assert main(["forget", app_name, "--nats", stack.nats_url]) == 0
    assert "nothing on NATS belongs to" in capsys.readouterr().out


async def test_a_consumer_starting_at_the_last_message_per_subject_gets_every_subject(stack, names):
    # More than one pull's worth of bytes: the server must not drop any subject's last
    # message on the way (a byte-bounded pull ending early once did, in this mode).
    stream, _ = names
    subjects = 2_000
    transport = NatsTransport(stack.nats_url)
    await transport.connect()
    try:
        await transport.ensure_stream(StreamSpec(stream, (f"{stream.lower()}.>",)))
        nc = await nats.connect(stack.nats_url)
        js = nc.jetstream()
        payload = b"x" * 12_000  # 1,000 of them are more than a pull's 8 MiB bound
        acks = [await js.publish_async(f"{stream.lower()}.k{i}", payload) for i in range(subjects)]
        await asyncio.gather(*acks)
        await nc.close()
        consumer = await transport.open_consumer(
            ConsumerSpec(stream, None, start=StartPosition(last_per_subject=True))
        )
        seen: set[str] = set()
        deadline = time.monotonic() + 30
        while len(seen) < subjects and time.monotonic() < deadline:
            batch = await consumer.next_batch(1_000, timeout=1.0)
            seen.update(d.subject for d in batch)
            if batch:
                await consumer.ack_through(batch[-1])
        await consumer.close()
        assert len(seen) == subjects
    finally:
        nc = await nats.connect(stack.nats_url)
        await nc.jetstream().delete_stream(stream)
        await nc.close()
        await transport.close()
