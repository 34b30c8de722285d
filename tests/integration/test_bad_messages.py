"""One bad message never stops the desk: garbage as large as NATS takes, on a private bus.

The NATS server is this module's own (posttrade.stack on free ports under a temporary
home): the services here read FILLS and QUOTES from their start, and the shared dev
stack's streams hold other tests' history. QuestDB and Valkey are the suite's.

Before, a 1,048,376-byte non-JSON fill was dead-lettered with its `Posttrade-*` headers
added: 1,048,673 bytes, over the server's max_payload of 1,048,576. The server closed the
connection, the agents crash-looped ("crashed on seq None", so the poison limit never
fired) and none of the fills published after it reached any service; on a quotes
subject it froze the marks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal

import nats
import nats.errors
import nats.js.errors
import pytest

from posttrade import stack as local_stack
from posttrade.streams.events import Bar, Fill, MarketTrade, Order, Quote, encode, subject_token
from posttrade.streams.subjects import bar_subject, fill_subject, order_subject, quote_subject, trade_subject
from posttrade.streams.transport import message_size

from .service_process import ServiceProcess, free_port

MAX_PAYLOAD = 1024 * 1024  # the private server's: nats-server's default
GARBAGE_SIZE = MAX_PAYLOAD - 200  # 1,048,376 bytes: what the issue sent
DAY_S = 24 * 3600


@pytest.fixture(scope="module")
def private(stack, tmp_path_factory) -> Iterator[local_stack.Endpoints]:
    """Endpoints whose NATS is this module's own server; the other servers are the suite's."""
    ep = dataclasses.replace(
        stack,
        home=tmp_path_factory.mktemp("bad-messages"),
        nats_cluster=1,
        nats_port=free_port(),
        nats_monitor_port=free_port(),
    )
    local_stack.up(ep, names=["nats"])
    try:
        yield ep
    finally:
        local_stack.down(ep, names=["nats"])


def garbage(n: int, size: int = GARBAGE_SIZE) -> bytes:
    """Not JSON, `size` bytes, different each time."""
    head = b"\x00\xffgarbage %d " % n
    return head + bytes(range(256)) * ((size - len(head)) // 256) + b"#" * ((size - len(head)) % 256)


def good_fills(account: str, symbol: str, n: int) -> list[Fill]:
    t0 = time.time_ns()
    return [
        Fill(ts=t0 + i, fill_id=f"{account}-{i}", account=account, symbol=symbol, side="BUY",
             qty=Decimal(i), price=Decimal("100.25"))
        for i in range(1, n + 1)
    ]


def good_quotes(symbol: str, n: int) -> list[Quote]:
    t0 = time.time_ns()
    return [
        Quote(ts=t0 + i, symbol=symbol, bid=Decimal(100 + i), ask=Decimal(100 + i) + Decimal("0.5"))
        for i in range(1, n + 1)
    ]


def writer_env(suffix: str) -> dict[str, str]:
    """questdb_writer with only the fill and quote routes, into tables of this test's own."""
    env = {}
    for route in ("market_trades", "bars", "orders"):
        env[f"POSTTRADE_QUESTDB_WRITER__WRITER__ROUTES__{route.upper()}__ENABLED"] = "false"
    for route in ("fills", "quotes"):
        env[f"POSTTRADE_QUESTDB_WRITER__WRITER__ROUTES__{route.upper()}__TABLE"] = f"bm_{route}_{suffix}"
    return env


async def publish_core(url: str, messages: list[tuple[str, bytes]]) -> None:
    """Plain NATS publishes (what an upstream system sends), confirmed stored."""
    nc = await nats.connect(url, pending_size=256 * 1024 * 1024)
    try:
        js = nc.jetstream()
        before = {s: (await js.stream_info(s)).state.messages for s in ("FILLS", "QUOTES")}
        fills = sum(1 for subject, _ in messages if subject.startswith("trading.fills."))
        for i, (subject, data) in enumerate(messages):
            await nc.publish(subject, data)
            if i % 2000 == 1999:
                await nc.flush()
        await nc.flush()
        want = {"FILLS": before["FILLS"] + fills, "QUOTES": before["QUOTES"] + len(messages) - fills}
        deadline = time.monotonic() + 60
        for stream, count in want.items():
            while (await js.stream_info(stream)).state.messages < count:
                assert time.monotonic() < deadline, f"{stream} did not store what was published"
                await asyncio.sleep(0.05)
    finally:
        await nc.close()


async def dead_letters(url: str, service: str) -> list:
    """Every message on `posttrade.dlq.<service>` (an ephemeral consumer)."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        info = await js.stream_info("DLQ", subjects_filter=f"posttrade.dlq.{service}")
        expected = sum((info.state.subjects or {}).values())
        sub = await js.pull_subscribe(f"posttrade.dlq.{service}", stream="DLQ")
        found: list = []
        while len(found) < expected:
            try:
                batch = await sub.fetch(min(500, expected - len(found)), timeout=5)
            except nats.errors.TimeoutError:
                break
            for msg in batch:
                await msg.ack()  # the consumer's max_ack_pending would stop it at 1,000
            found += batch
        await sub.unsubscribe()
        return found
    finally:
        await nc.close()


async def eventually(check, timeout: float, what: str):
    """Poll `check()` (sync, in a thread) until it returns something true."""
    deadline = time.monotonic() + timeout
    while True:
        value = await asyncio.to_thread(check)
        if value:
            return value
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        await asyncio.sleep(0.25)


def rss_bytes(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def table_rows(writer: ServiceProcess, table: str) -> int:
    return writer.get("/stats").json()["tables"][table]["rows"]


async def test_garbage_at_max_payload_is_dead_lettered_and_every_good_fill_and_quote_flows(private, tmp_path):
    suffix = uuid.uuid4().hex[:8]
    account, symbol = f"BM{suffix}", f"S{suffix}".upper()

    # An existing deployment's dead-letter stream, made before it had limits.
    nc = await nats.connect(private.nats_url)
    await nc.jetstream().add_stream(name="DLQ", subjects=["posttrade.dlq.>"])
    await nc.close()

    ptrc = ServiceProcess("ptrc", private, tmp_path)
    writer = ServiceProcess("questdb_writer", private, tmp_path, env=writer_env(suffix))
    try:
        await asyncio.to_thread(ptrc.start)
        await asyncio.to_thread(writer.start)

        nc = await nats.connect(private.nats_url)
        dlq = (await nc.jetstream().stream_info("DLQ")).config
        await nc.close()
        assert dlq.max_age == 7 * DAY_S and dlq.max_bytes == 1024**3
        assert dlq.discard == "old"

        fills, quotes = good_fills(account, symbol, 10), good_quotes(symbol, 10)
        await publish_core(private.nats_url, [
            (fill_subject(account, symbol), garbage(1)),
            (quote_subject(symbol), garbage(2)),
            *((fill_subject(account, symbol), encode(f)) for f in fills),
            *((quote_subject(symbol), encode(q)) for q in quotes),
        ])

        # Every good message is processed: the position holds all 10 fills, the mark is
        # the last quote's, and the writer stored every row.
        def position():
            rows = ptrc.get("/positions", account=account).json()["positions"]
            return rows if rows and rows[0]["fill_count"] == 10 else None

        [row] = await eventually(position, 60, "ptrc's position from the 10 fills")
        assert Decimal(row["net_qty"]) == sum(f.qty for f in fills)

        def mark():
            detail = ptrc.get("/marks", symbol=symbol).json()["marks"].get(symbol)
            return detail if detail and Decimal(detail["price"]) == (quotes[-1].bid + quotes[-1].ask) / 2 else None

        await eventually(mark, 60, "ptrc's mark from the last quote")
        await eventually(lambda: table_rows(writer, f"bm_fills_{suffix}") == 10, 60, "the writer's fill rows")
        await eventually(lambda: table_rows(writer, f"bm_quotes_{suffix}") == 10, 60, "the writer's quote rows")

        # The garbage is in the dead-letter stream, cut to fit, with the reason and origin.
        for service in (ptrc, writer):
            records = await dead_letters(private.nats_url, service.name)
            assert {r.headers["Posttrade-Stream"] for r in records} == {"FILLS", "QUOTES"}, service.name
            for record in records:
                headers = {k: v for k, v in record.headers.items()}
                assert headers["Posttrade-Truncated"] == str(GARBAGE_SIZE)
                assert headers["Posttrade-Reason"] and headers["Posttrade-Service"] == service.name
                assert headers["Posttrade-Subject"] in (fill_subject(account, symbol), quote_subject(symbol))
                assert garbage(1 if headers["Posttrade-Stream"] == "FILLS" else 2).startswith(record.data)
                assert message_size(record.data, headers) <= MAX_PAYLOAD

            # /health says so: no crash, a dead-letter rate, and still a 200.
            health = service.get("/health")
            assert health.status_code == 200, health.text
            agents = {k: v for k, v in health.json()["checks"].items() if k.startswith("agent:")}
            assert all(check["crashes"] == 0 for check in agents.values()), agents
            dead = [name for name, check in agents.items() if check["dead_letters_per_min"] > 0]
            assert len(dead) == len({(r.headers["Posttrade-Agent"]) for r in records}), (dead, agents)
            assert "maximum payload" not in service.tail(200_000).lower()
            assert "crashed" not in service.tail(200_000)
    finally:
        await asyncio.to_thread(ptrc.stop)
        await asyncio.to_thread(writer.stop)


async def test_ten_thousand_bad_messages_leave_memory_flat_and_health_degraded(private, tmp_path):
    """RSS before and after 10,000 bad messages (9,995 small, 5 at the size limit).

    Bounds: the first 10,000 add less than 64 MiB, 10,000 more less than 32 MiB. A pull
    brings at most 8 MiB (`NatsPullConsumer.PULL_MAX_BYTES`) and a dead letter is at most
    max_payload: nothing is kept per message. Measured here: +14 MiB for the first wave
    (buffers the large messages passed through, kept by the allocator), +0.3 MiB for the
    second; 10,000 dead letters and the good messages after them in 3 to 6 s.
    """
    suffix = uuid.uuid4().hex[:8]
    account, symbol = f"BR{suffix}", f"R{suffix}".upper()
    writer = ServiceProcess("questdb_writer", private, tmp_path, env=writer_env(suffix))
    try:
        await asyncio.to_thread(writer.start)
        fills_table, quotes_table = f"bm_fills_{suffix}", f"bm_quotes_{suffix}"
        warm = good_fills(account, symbol, 200)
        await publish_core(private.nats_url, [(fill_subject(account, symbol), encode(f)) for f in warm])
        await eventually(lambda: table_rows(writer, fills_table) == 200, 60, "the warm-up rows")
        before = rss_bytes(writer.proc.pid)

        bad: list[tuple[str, bytes]] = []
        for i in range(10_000):
            subject = fill_subject(account, symbol) if i % 2 else quote_subject(symbol)
            bad.append((subject, garbage(i) if i % 2000 == 999 else b'{"ts": "not a time", "n": %d}' % i))
        fills, quotes = good_fills(account + "x", symbol, 10), good_quotes(symbol, 10)
        await publish_core(private.nats_url, [
            *bad,
            *((fill_subject(account + "x", symbol), encode(f)) for f in fills),
            *((quote_subject(symbol), encode(q)) for q in quotes),
        ])
        started = time.monotonic()
        await eventually(lambda: table_rows(writer, fills_table) == 210, 120, "the good fills after the bad ones")
        await eventually(lambda: table_rows(writer, quotes_table) == 10, 120, "the good quotes after the bad ones")
        took = time.monotonic() - started
        after = rss_bytes(writer.proc.pid)

        records = await dead_letters(private.nats_url, writer.name)
        assert len(records) == 10_000
        assert sum(1 for r in records if "Posttrade-Truncated" in r.headers) == 5

        health = writer.get("/health")
        body = health.json()
        assert health.status_code == 200 and body["status"] == "degraded", body
        for agent in ("agent:write_fills", "agent:write_quotes"):
            assert body["checks"][agent]["degraded"] is True
            assert body["checks"][agent]["dead_letters_per_min"] >= 5000 * 60 / 300
            assert "dead-lettered" in body["reasons"][agent]
        # A second wave: what the first left behind is not per message if this adds little.
        await publish_core(private.nats_url, [(s, d + b" again") for s, d in bad] + [
            (fill_subject(account + "y", symbol), encode(f)) for f in good_fills(account + "y", symbol, 10)
        ])
        await eventually(lambda: table_rows(writer, fills_table) == 220, 120, "the good fills after the 2nd wave")
        again = rss_bytes(writer.proc.pid)
        print(f"\nRSS before {before / 2**20:.1f} MiB, after 10,000 bad messages {after / 2**20:.1f} MiB "
              f"(+{(after - before) / 2**20:.1f} MiB), after 10,000 more {again / 2**20:.1f} MiB; "
              f"dead-lettered and caught up in {took:.1f} s")
        assert after - before < 64 * 2**20
        assert again - after < 32 * 2**20
    finally:
        await asyncio.to_thread(writer.stop)


#: Each input stream: its subjects' prefix, and the decimal field its bad values go in.
STREAMS = {"FILLS": ("trading.fills.", "qty"), "ORDERS": ("trading.orders.", "qty"), "QUOTES": ("md.quotes.", "bid"),
           "TRADES": ("md.trades.", "price"), "BARS": ("md.bars.", "close")}  # fmt: skip
#: What each bad value must be refused for (a word of the reason).
BAD_VALUES = {"1E+400000": "below", "1E+30": "below", "NaN": "finite"}


def bad_versions(subject: str, event) -> list[tuple[str, bytes]]:
    """`event` with its decimal field out of bounds, or not a number, and as broken JSON."""
    field = next(f for prefix, f in STREAMS.values() if subject.startswith(prefix))
    data = json.loads(encode(event))
    out = [(subject, json.dumps({**data, field: value}).encode()) for value in BAD_VALUES]
    return out + [(subject, encode(event)[:-7])]  # cut short: not JSON


async def publish_everywhere(url: str, messages: list[tuple[str, bytes]]) -> None:
    """Plain NATS publishes on every input stream, confirmed stored."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        streams = {name: prefix for name, (prefix, _) in STREAMS.items()}
        before = {name: (await js.stream_info(name)).state.messages for name in streams}
        for subject, data in messages:
            await nc.publish(subject, data)
        await nc.flush()
        deadline = time.monotonic() + 60
        for name, prefix in streams.items():
            want = before[name] + sum(1 for subject, _ in messages if subject.startswith(prefix))
            while (await js.stream_info(name)).state.messages < want:
                assert time.monotonic() < deadline, f"{name} did not store what was published"
                await asyncio.sleep(0.05)
    finally:
        await nc.close()


async def test_out_of_bound_numbers_and_broken_json_on_every_input_subject(private, tmp_path):
    """qty 1E+400000 (ptrc once crash-looped on its 1.2 MB table write), 1E+30 (once in
    ptrc's positions but refused by the stores), NaN and broken JSON, on fills, orders,
    quotes, trades and bars, then good messages: every service refuses every bad one
    with its reason, and every good one reaches every service and store."""
    suffix = uuid.uuid4().hex[:8]
    account, symbol = f"BV{suffix}", f"V{suffix}".upper()
    t0 = time.time_ns()
    good = [
        *((order_subject(account, symbol), Order(ts=t0 + i, order_id=f"o{suffix}{i}", account=account, symbol=symbol,
                                                side="BUY", qty=Decimal(10))) for i in range(5)),
        *((quote_subject(symbol), Quote(ts=t0 + 10 + i, symbol=symbol, bid=Decimal(100 + i), ask=Decimal(101 + i)))
          for i in range(5)),
        *((trade_subject(symbol), MarketTrade(ts=t0 + 20 + i, symbol=symbol, price=Decimal(100 + i), size=Decimal(3),
                                              trade_id=f"t{suffix}{i}")) for i in range(5)),
        *((bar_subject("1m", symbol), Bar(ts=t0 - (60 - i) * 60_000_000_000, symbol=symbol, interval="1m",
                                          open=Decimal(100), high=Decimal(102), low=Decimal(99), close=Decimal(101),
                                          volume=Decimal(7))) for i in range(2)),
        *((fill_subject(account, symbol), Fill(ts=t0 + 30 + i, fill_id=f"f{suffix}{i}", account=account, symbol=symbol,
                                               side="BUY", qty=Decimal(10), price=Decimal("100.5"), order_id=f"o{suffix}{i}"))
          for i in range(5)),
    ]  # fmt: skip
    bad = [message for subject, event in good[::5] for message in bad_versions(subject, event)]
    assert len(bad) == 4 * len(STREAMS)

    writer_routes = {
        f"POSTTRADE_QUESTDB_WRITER__WRITER__ROUTES__{route.upper()}__TABLE": f"bv_{route}_{suffix}"
        for route in ("fills", "orders", "quotes", "market_trades", "bars")
    }
    ptrc = ServiceProcess("ptrc", private, tmp_path)
    writer = ServiceProcess("questdb_writer", private, tmp_path, env=writer_routes)
    quality = ServiceProcess("execution_quality", private, tmp_path)
    services = (ptrc, writer, quality)
    try:
        for service in services:
            await asyncio.to_thread(service.start)
        await publish_everywhere(private.nats_url, [*bad, *((subject, encode(event)) for subject, event in good)])

        def position():
            rows = ptrc.get("/positions", account=account).json()["positions"]
            return rows if rows and rows[0]["fill_count"] == 5 else None

        await eventually(position, 60, "ptrc's position from the 5 good fills")
        tables = {"fills": 5, "orders": 5, "quotes": 5, "market_trades": 5, "bars": 2}
        for route, rows in tables.items():
            await eventually(lambda: table_rows(writer, f"bv_{route}_{suffix}") == rows, 60, f"the writer's {route}")

        def joined():
            body = quality.get("/metrics/execution", account=account, level="order").json()
            return body if body["total"] == 5 and all(r["fills"] == 1 for r in body["rows"]) else None

        await eventually(joined, 90, "execution_quality's 5 orders, each joined to its fill")

        # Every bad message is in each consumer's dead letters, with why.
        consumed = {ptrc: {"FILLS", "QUOTES", "TRADES", "BARS"}, writer: set(STREAMS),
                    quality: {"FILLS", "ORDERS", "QUOTES", "TRADES"}}  # fmt: skip
        for service, streams in consumed.items():
            records = [r for r in await dead_letters(private.nats_url, service.name)
                       if r.headers["Posttrade-Subject"].endswith(subject_token(symbol))]  # fmt: skip
            by_stream: dict[str, list[str]] = {}
            for record in records:
                by_stream.setdefault(record.headers["Posttrade-Stream"], []).append(record.headers["Posttrade-Reason"])
            assert set(by_stream) == streams, (service.name, sorted(by_stream))
            for stream, reasons in by_stream.items():
                assert len(reasons) == 4, (service.name, stream, reasons)
                for value, word in BAD_VALUES.items():
                    assert any(word in r and (value in r or value == "NaN") for r in reasons), (service.name, value, reasons)
            health = service.get("/health")
            assert health.status_code == 200, health.text
            agents = [v for k, v in health.json()["checks"].items() if k.startswith("agent:")]
            assert all(check["crashes"] == 0 for check in agents), (service.name, agents)
    finally:
        for service in services:
            await asyncio.to_thread(service.stop)
