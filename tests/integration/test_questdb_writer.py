"""questdb_writer against real servers: exact values, exactly-once, dead letters, faults.

Every test reads its own uniquely named streams and writes its own tables (see
`writer_env`). The QuestDB outage test runs its own QuestDB (and NATS) through
posttrade.stack on free ports with a temporary home, so the shared dev stack is never
stopped; the other tests use the stack of the `stack` fixture.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import httpx
import nats
import nats.js.errors
import pytest

from posttrade import stack as local_stack
from posttrade.stores.questdb.layouts import LAYOUTS
from posttrade.app import App
from posttrade.config import load_config
from posttrade.services import questdb_writer as service
from posttrade.stores.questdb import QuestDBClient
from posttrade.streams.events import Bar, Fill, MarketTrade, Order, Quote, encode
from posttrade.web.server import build_web_app

ROOT = Path(__file__).parents[2]
CONFIG_FILE = ROOT / "config" / "backend" / "questdb_writer" / "config.yaml"
T0 = 1_700_000_000_000_000_000
ROUTES = ("market_trades", "quotes", "bars", "fills", "orders")


# -- helpers -----------------------------------------------------------------------------


class Names:
    """The unique stream, subject prefix, table and service names of one test."""

    def __init__(self) -> None:
        self.suffix = uuid.uuid4().hex[:8]
        self.service = f"qw_it_{self.suffix}"

    def stream(self, route: str) -> str:
        return f"QW_{route.upper()}_{self.suffix}"

    def subject(self, route: str, token: str = "x") -> str:
        return f"qw{self.suffix}.{route}.{token}"

    def table(self, route: str) -> str:
        return f"qw_{route}_{self.suffix}"

    def durable(self, route: str) -> str:
        return f"{self.service}-write_{route}"


def writer_env(ep: local_stack.Endpoints, names: Names, routes=ROUTES, **settings: object) -> dict[str, str]:
    """Config overrides: the servers of `ep`, this test's names, only `routes` enabled."""
    env = {**ep.service_env(), "POSTTRADE_QUESTDB_WRITER__SERVICE__NAME": names.service}
    for route in LAYOUTS:  # the routes of the services' outputs too: off unless asked
        env[f"POSTTRADE_QUESTDB_WRITER__WRITER__ROUTES__{route.upper()}__ENABLED"] = str(route in routes).lower()
    for route in ROUTES:
        prefix = f"POSTTRADE_QUESTDB_WRITER__WRITER__ROUTES__{route.upper()}__"
        env[prefix + "STREAM"] = names.stream(route)
        env[prefix + "SUBJECTS"] = f"qw{names.suffix}.{route}.>"
        env[prefix + "TABLE"] = names.table(route)
    for key, value in settings.items():
        env[f"POSTTRADE_QUESTDB_WRITER__{key.upper()}"] = str(value)
    return env


def writer_app(ep, names, routes=ROUTES, **settings) -> App:
    config = load_config("questdb_writer", service.CONFIG, path=CONFIG_FILE, env=writer_env(ep, names, routes, **settings))
    return service.build(config).app


async def get_json(app: App, path: str) -> tuple[int, dict]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=build_web_app(app)), base_url="http://w") as http:
        response = await http.get(path)
    return response.status_code, response.json()


async def publish(url: str, messages: list[tuple[str, bytes]], stream_counts: dict[str, int] | None = None) -> None:
    """Core-NATS publishes (fast); then wait until the streams hold `stream_counts`."""
    nc = await nats.connect(url, pending_size=64 * 1024 * 1024)
    try:
        for i, (subject, data) in enumerate(messages):
            await nc.publish(subject, data)
            if i % 5000 == 4999:
                await nc.flush()
        await nc.flush()
        js = nc.jetstream()
        for stream, count in (stream_counts or {}).items():
            deadline = time.monotonic() + 30
            while (await js.stream_info(stream)).state.messages < count:
                if time.monotonic() > deadline:
                    raise AssertionError(f"stream {stream} did not get {count} messages")
                await asyncio.sleep(0.05)
    finally:
        await nc.close()


async def ack_floor(url: str, stream: str, durable: str) -> int:
    nc = await nats.connect(url)
    try:
        return (await nc.jetstream().consumer_info(stream, durable)).ack_floor.stream_seq
    except nats.js.errors.NotFoundError:
        return 0
    finally:
        await nc.close()


async def wait_acked(url: str, stream: str, durable: str, seq: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while (floor := await ack_floor(url, stream, durable)) < seq:
        if time.monotonic() > deadline:
            raise AssertionError(f"{durable} acknowledged up to {floor}, expected {seq}")
        await asyncio.sleep(0.1)


async def dead_letters(url: str, service_name: str, expected: int, timeout: float = 10) -> list:
    """The messages on `posttrade.dlq.<service>` (an ephemeral consumer of the DLQ stream)."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        sub = await js.pull_subscribe(f"posttrade.dlq.{service_name}", stream="DLQ")
        found = []
        deadline = time.monotonic() + timeout
        while len(found) < expected and time.monotonic() < deadline:
            try:
                found += await sub.fetch(expected - len(found), timeout=1)
            except nats.errors.TimeoutError:
                pass
        for msg in found:
            await msg.ack()
        await sub.unsubscribe()
        return found
    finally:
        await nc.close()


async def delete_streams(url: str, streams: list[str]) -> None:
    nc = await nats.connect(url)
    try:
        for stream in streams:
            try:
                await nc.jetstream().delete_stream(stream)
            except nats.js.errors.NotFoundError:
                pass
    finally:
        await nc.close()


async def count_rows(qdb: QuestDBClient, table: str) -> tuple[int, int]:
    """(rows, distinct stream sequences) of a table."""
    result = await qdb.query(f"SELECT count(), count_distinct(stream_seq) FROM {table}")
    return tuple(result.rows[0])


def quote_bytes(i: int) -> bytes:
    return encode(Quote(ts=T0 + i * 1000, symbol=f"SYM{i % 50}", bid=Decimal("100.25") + i % 7, ask=Decimal("100.50") + i % 7, bid_size=Decimal(i % 900), venue="XNAS"))


@pytest.fixture
def names() -> Names:
    return Names()


@pytest.fixture
async def qdb(stack) -> AsyncIterator[QuestDBClient]:
    client = QuestDBClient(host=stack.questdb_host, port=stack.questdb_http_port)
    client.created = []  # type: ignore[attr-defined]
    yield client
    for table in client.created:  # type: ignore[attr-defined]
        await client.drop_table(table)
    await client.close()


@pytest.fixture
async def cleanup(stack, names, qdb) -> AsyncIterator[None]:
    qdb.created += [names.table(r) for r in ROUTES]
    yield
    await delete_streams(stack.nats_url, [names.stream(r) for r in ROUTES])


def dec(text: str) -> Decimal:
    return Decimal(text)


# -- every channel, exact values, exactly once -------------------------------------------


def sample_fill(ts: int, fill_id: str, **fields) -> Fill:
    values = dict(account="ACC1", symbol="BRK.B", side="BUY", qty=Decimal(2), price=Decimal("412.5"))
    return Fill(ts=ts, fill_id=fill_id, **{**values, **fields})


def sample_order(ts: int, **fields) -> Order:
    return Order(ts=ts, order_id="O-7", account="ACC1", symbol="BRK.B", side="BUY", qty=Decimal(2), **fields)


def sample_quote(ts: int, bid: str, **fields) -> Quote:
    return Quote(ts=ts, symbol="AAPL", bid=Decimal(bid), ask=Decimal("190.01"), **fields)


def sample_trade(ts: int, price: str, size: int, **fields) -> MarketTrade:
    return MarketTrade(ts=ts, symbol="AAPL", price=Decimal(price), size=Decimal(size), **fields)


SAMPLE_BAR = Bar(
    ts=T0, symbol="AAPL", interval="1m", open=Decimal(1), high=Decimal(3), low=Decimal("0.5"), close=Decimal(2),
    volume=Decimal(7), vwap=Decimal(2) / 3, count=4,
)  # fmt: skip


async def test_every_channel_is_written_with_exact_values_and_a_replay_adds_no_row(stack, names, qdb, cleanup):
    fill = sample_fill(T0 + 5, "F-1", price=Decimal("412.123456789012"), fee=Decimal("-0.35"), order_id="O-7", venue="XNYS", liquidity="MAKER")  # fmt: skip
    events = {
        # A fill published twice (two stream sequences) is one row: fill_id is its key.
        "fills": [fill, fill, sample_fill(T0 + 6, "F-2", symbol="ESZ5", qty=Decimal("0.000000000001"))],
        "orders": [sample_order(T0, order_type="LIMIT", limit_price=Decimal("412.5")), sample_order(T0 + 9, status="FILLED")],
        # Two quotes of one symbol at the same nanosecond: two updates, two rows.
        "quotes": [sample_quote(T0 + 1, "189.99"), sample_quote(T0 + 1, "189.98", venue="XNAS")],
        "market_trades": [sample_trade(T0 + 2, "190", 100), sample_trade(T0 + 2, "190.01", 5, trade_id="T9", aggressor="SELL")],
        "bars": [SAMPLE_BAR],
    }
    messages = [(names.subject(route), encode(event)) for route, items in events.items() for event in items]
    messages.append((names.subject("quotes"), b'{"symbol": "AAPL", "bid": "1"}'))  # malformed: dead letter
    in_stream = {route: len(items) + (route == "quotes") for route, items in events.items()}
    expected_rows = {"fills": 2, "orders": 2, "quotes": 2, "market_trades": 2, "bars": 1}

    app = writer_app(stack, names)
    async with app:
        await publish(stack.nats_url, messages, {names.stream(r): n for r, n in in_stream.items()})
        for route in ROUTES:
            await wait_acked(stack.nats_url, names.stream(route), names.durable(route), in_stream[route])
        for route, rows in expected_rows.items():
            assert await qdb.wait_visible(names.table(route), rows) == rows, route
        status, stats = await get_json(app, "/stats")
        assert status == 200
        assert stats["tables"][names.table("quotes")]["dead_lettered_undecodable"] == 1
        status, health = await get_json(app, "/health")
        assert status == 200, health

    columns = "cast(ts AS LONG), fill_id, account, symbol, side, qty, price, fee, order_id, venue, liquidity, stream_seq, exec_type, ref_fill_id"  # fmt: skip
    fills = (await qdb.query(f"SELECT {columns} FROM {names.table('fills')} ORDER BY ts")).rows
    assert fills[0][:5] == [T0 + 5, "F-1", "ACC1", "BRK.B", "BUY"]
    assert [dec(v) for v in fills[0][5:8]] == [Decimal(2), Decimal("412.123456789012"), Decimal("-0.35")]
    assert fills[0][8:] == ["O-7", "XNYS", "MAKER", 1, "NEW", None]  # the first of the two messages
    assert dec(fills[1][5]) == Decimal("0.000000000001") and fills[1][8:11] == [None, None, None]
    orders = (await qdb.query(f"SELECT status, order_type, limit_price FROM {names.table('orders')} ORDER BY ts")).rows
    assert orders[0][:2] == ["NEW", "LIMIT"] and dec(orders[0][2]) == Decimal("412.5")
    assert orders[1] == ["FILLED", "MARKET", None]
    quotes = await qdb.query(f"SELECT cast(ts AS LONG), bid, venue, stream_seq FROM {names.table('quotes')} ORDER BY stream_seq")  # fmt: skip
    assert [(r[0], dec(r[1]), r[2], r[3]) for r in quotes.rows] == [
        (T0 + 1, Decimal("189.99"), None, 1),
        (T0 + 1, Decimal("189.98"), "XNAS", 2),
    ]
    trades = await qdb.query(f"SELECT trade_id, aggressor, size FROM {names.table('market_trades')} ORDER BY stream_seq")
    assert [(r[0], r[1], dec(r[2])) for r in trades.rows] == [(None, None, Decimal(100)), ("T9", "SELL", Decimal(5))]
    bars = await qdb.query(f"SELECT interval, open, vwap, count FROM {names.table('bars')}")
    assert bars.rows[0][0] == "1m" and dec(bars.rows[0][1]) == 1 and bars.rows[0][3] == 4
    assert dec(bars.rows[0][2]) == Decimal("0.666666666667")  # vwap rounded half-even to 12 places

    (dead,) = await dead_letters(stack.nats_url, names.service, 1)
    assert dead.data == b'{"symbol": "AAPL", "bid": "1"}' and "invalid Quote" in dead.headers["Posttrade-Reason"]

    # Replay everything: new consumers from the start of every stream. Not one row more.
    nc = await nats.connect(stack.nats_url)
    for route in ROUTES:
        await nc.jetstream().delete_consumer(names.stream(route), names.durable(route))
    await nc.close()
    app = writer_app(stack, names)
    async with app:
        for route in ROUTES:
            await wait_acked(stack.nats_url, names.stream(route), names.durable(route), in_stream[route])
    for route, rows in expected_rows.items():
        assert await qdb.wait_visible(names.table(route), rows) == rows, route


async def test_rows_questdb_refuses_are_dead_lettered_and_the_rest_written(stack, names, qdb, cleanup):
    # The table exists with a narrower price column than the writer's: QuestDB itself
    # refuses the quotes whose bid has more than two decimals (no client-side check sees it).
    table = names.table("quotes")
    await qdb.create_table(table, {"ts": "TIMESTAMP_NS", "symbol": "SYMBOL", "bid": "DECIMAL(10, 2)", "stream_seq": "LONG"}, dedup_keys=["symbol", "stream_seq"])  # fmt: skip
    n, bad = 300, {17, 150, 151}
    messages = []
    for i in range(1, n + 1):
        bid = Decimal("100.125") if i in bad else Decimal("100.25")
        messages.append((names.subject("quotes"), encode(Quote(ts=T0 + i, symbol="AAPL", bid=bid, ask=Decimal(101)))))
    app = writer_app(stack, names, routes=("quotes",))
    async with app:
        await publish(stack.nats_url, messages, {names.stream("quotes"): n})
        await wait_acked(stack.nats_url, names.stream("quotes"), names.durable("quotes"), n)
        _, stats = await get_json(app, "/stats")
    assert await qdb.wait_visible(table, n - len(bad)) == n - len(bad)
    seqs = (await qdb.query(f"SELECT stream_seq FROM {table} ORDER BY stream_seq")).column("stream_seq")
    assert seqs == [i for i in range(1, n + 1) if i not in bad]
    dead = await dead_letters(stack.nats_url, names.service, len(bad))
    assert sorted(int(m.headers["Posttrade-Seq"]) for m in dead) == sorted(bad)
    assert all("loss of precision" in m.headers["Posttrade-Reason"] for m in dead)
    table_stats = stats["tables"][table]
    assert table_stats["dead_lettered"] == 3 and table_stats["rows"] == n - 3 and table_stats["rejected_batches"] >= 3


# -- fills: the first arrival of a fill_id is the row ------------------------------------------


async def write_fills(stack, names, fills: list[Fill], acked: int) -> None:
    """Publish `fills` and wait until the writer acknowledged the stream up to `acked`."""
    await publish(stack.nats_url, [(names.subject("fills"), encode(f)) for f in fills], {names.stream("fills"): acked})
    await wait_acked(stack.nats_url, names.stream("fills"), names.durable("fills"), acked)


async def fill_rows(qdb: QuestDBClient, table: str) -> list[tuple]:
    """(ts, fill_id, price, stream_seq) of every row, by fill_id (after the WAL is applied)."""
    await qdb.wait_visible(table, 0)
    result = await qdb.query(f"SELECT cast(ts AS LONG), fill_id, price, stream_seq FROM {table} ORDER BY fill_id, ts")
    return [(ts, fill_id, dec(price), seq) for ts, fill_id, price, seq in result.rows]


@pytest.mark.parametrize("resent_ts", [T0 + 1, T0 + 86_400_000_000_000], ids=["same ts", "another ts"])
async def test_a_resent_fill_id_never_changes_or_adds_a_row(stack, names, qdb, cleanup, resent_ts):
    table = names.table("fills")
    app = writer_app(stack, names, routes=("fills",))
    async with app:
        await write_fills(stack, names, [sample_fill(T0 + 1, "F-1", price=Decimal(100)), sample_fill(T0 + 2, "F-2")], 2)  # fmt: skip
        # Right behind (SQL may not show F-1 yet), and again once it does: neither is a row.
        await write_fills(stack, names, [sample_fill(resent_ts, "F-1", price=Decimal(101))], 3)
        await qdb.wait_visible(table, 2)
        await write_fills(stack, names, [sample_fill(resent_ts, "F-1", price=Decimal(102)), sample_fill(T0 + 3, "F-3")], 5)  # fmt: skip
        _, stats = await get_json(app, "/stats")
    assert await fill_rows(qdb, table) == [
        (T0 + 1, "F-1", Decimal(100), 1), (T0 + 2, "F-2", Decimal("412.5"), 2), (T0 + 3, "F-3", Decimal("412.5"), 5),
    ]  # fmt: skip
    table_stats = stats["tables"][table]
    assert table_stats["resends"] == 2 and table_stats["rows"] == 3 and table_stats["first_arrival_key"] == "fill_id"


async def test_a_fill_resent_after_a_restart_of_the_writer_adds_no_row(stack, names, qdb, cleanup, tmp_path):
    table, stream = names.table("fills"), names.stream("fills")
    port = free_port()
    env = writer_env(stack, names, routes=("fills",), service__port=port, service__host="127.0.0.1")
    log = tmp_path / "writer.log"
    first = [sample_fill(T0 + i, f"F-{i}", price=Decimal(100 + i)) for i in range(1, 501)]
    worker = start_worker(env, log)
    try:
        await wait_http(port)
        await publish(stack.nats_url, [(names.subject("fills"), encode(f)) for f in first], {stream: 500})
        await wait_acked(stack.nats_url, stream, names.durable("fills"), 500)
        # SIGKILL right after: the next process starts with whatever QuestDB has not applied yet.
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=10)
        resent = [sample_fill(T0 + 7 * 86_400_000_000_000 + i, f"F-{i}", price=Decimal(1)) for i in range(1, 501, 7)]
        await publish(stack.nats_url, [(names.subject("fills"), encode(f)) for f in [*resent, sample_fill(T0, "F-new")]])
        worker = start_worker(env, log)
        await wait_acked(stack.nats_url, stream, names.durable("fills"), 500 + len(resent) + 1)
        stats = await wait_http(port)
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            assert worker.wait(timeout=30) == 0, log.read_text()[-3000:]
        except subprocess.TimeoutExpired:
            worker.kill()
            raise
    expected = sorted([(f.ts, f.fill_id, f.price, seq) for seq, f in enumerate(first, 1)] + [(T0, "F-new", Decimal("412.5"), 500 + len(resent) + 1)], key=lambda r: (r[1], r[0]))  # fmt: skip
    assert await fill_rows(qdb, table) == expected
    assert stats["tables"][table]["resends"] == len(resent)

    # A replay of the whole stream (a new consumer from the start) is all resends.
    nc = await nats.connect(stack.nats_url)
    await nc.jetstream().delete_consumer(stream, names.durable("fills"))
    await nc.close()
    app = writer_app(stack, names, routes=("fills",))
    async with app:
        await wait_acked(stack.nats_url, stream, names.durable("fills"), 500 + len(resent) + 1)
        _, stats = await get_json(app, "/stats")
    assert await fill_rows(qdb, table) == expected
    assert stats["tables"][table]["resends"] == 500 + len(resent) + 1 and stats["tables"][table]["rows"] == 0


async def test_corrections_busts_and_openings_are_rows_with_their_exec_type(stack, names, qdb, cleanup):
    table = names.table("fills")
    # A table made before amendments existed: the writer adds their columns.
    old_columns = {c.name: c.sql_type for c in LAYOUTS["fills"].columns if c.name not in ("exec_type", "ref_fill_id")}
    await qdb.create_table(table, old_columns, dedup_keys=LAYOUTS["fills"].dedup_keys)
    await qdb.execute(f"INSERT INTO {table} (ts, fill_id, account, symbol, side, qty, price, fee, stream_seq) VALUES (cast({T0} AS TIMESTAMP_NS), 'F-OLD', 'ACC1', 'BRK.B', 'SELL', 1m, 400m, 0m, 0)")  # fmt: skip
    fills = [
        sample_fill(T0 + 1, "F-0", price=Decimal("399.5"), exec_type="OPENING"),
        sample_fill(T0 + 2, "F-1"),
        sample_fill(T0 + 3, "F-2", qty=Decimal(3), price=Decimal("412.75"), fee=Decimal("0.1"), exec_type="CORRECT", ref_fill_id="F-1"),  # fmt: skip
        Fill(ts=T0 + 4, fill_id="F-3", account="ACC1", symbol="BRK.B", exec_type="BUST", ref_fill_id="F-1"),
        sample_fill(T0 + 5, "F-OLD", price=Decimal(1)),  # a resend of the row the table already had
    ]
    app = writer_app(stack, names, routes=("fills",))
    async with app:
        await write_fills(stack, names, fills, len(fills))
    await qdb.wait_visible(table, 5)
    columns = "fill_id, exec_type, ref_fill_id, side, qty, price, fee"
    rows = (await qdb.query(f"SELECT {columns} FROM {table} ORDER BY ts")).rows
    as_decimals = [row[:4] + [None if v is None else dec(v) for v in row[4:]] for row in rows]
    assert as_decimals == [
        ["F-OLD", None, None, "SELL", Decimal(1), Decimal(400), Decimal(0)],  # written before the columns existed
        ["F-0", "OPENING", None, "BUY", Decimal(2), Decimal("399.5"), Decimal(0)],
        ["F-1", "NEW", None, "BUY", Decimal(2), Decimal("412.5"), Decimal(0)],
        ["F-2", "CORRECT", "F-1", "BUY", Decimal(3), Decimal("412.75"), Decimal("0.1")],
        ["F-3", "BUST", "F-1", None, None, None, Decimal(0)],
    ]
    types = dict((await qdb.query(f"SELECT \"column\", type FROM table_columns('{table}')")).rows)
    assert types["exec_type"] == "SYMBOL" and types["ref_fill_id"] == "VARCHAR"


# -- SIGKILL of the writer -------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_worker(env: dict[str, str], log: Path) -> subprocess.Popen:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "posttrade.cli", "worker", "questdb_writer", "--config", str(CONFIG_FILE)],
            env={**os.environ, **env},
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


async def wait_http(port: int, path: str = "/stats", timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient() as http:
        while True:
            try:
                response = await http.get(f"http://127.0.0.1:{port}{path}")
                return response.json()
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)


async def test_sigkill_mid_stream_then_restart_writes_every_row_once(stack, names, qdb, cleanup, tmp_path):
    n = 30_000
    port = free_port()
    env = writer_env(stack, names, routes=("quotes",), service__port=port, service__host="127.0.0.1")
    env["POSTTRADE_QUESTDB_WRITER__BATCH__SIZE"] = "500"  # many batches: the kill lands mid-stream
    log = tmp_path / "writer.log"
    worker = start_worker(env, log)
    try:
        await wait_http(port)
        table, stream = names.table("quotes"), names.stream("quotes")
        publisher = asyncio.create_task(
            publish(stack.nats_url, [(names.subject("quotes"), quote_bytes(i)) for i in range(1, n + 1)], {stream: n})
        )
        deadline = time.monotonic() + 60
        while (await qdb.query(f"SELECT count() FROM {table}")).scalar() < n // 4:
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            await asyncio.sleep(0.05)
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=10)
        await publisher
        rows_at_kill, _ = await count_rows(qdb, table)
        assert rows_at_kill < n, "the kill came after the end: nothing was tested"
        worker = start_worker(env, log)
        await wait_acked(stack.nats_url, stream, names.durable("quotes"), n, timeout=120)
        stats = await wait_http(port)
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            assert worker.wait(timeout=30) == 0, log.read_text()[-3000:]
        except subprocess.TimeoutExpired:
            worker.kill()
            raise
    assert await qdb.wait_visible(table, n, timeout=30) == n
    assert await count_rows(qdb, table) == (n, n)  # every message once: none lost, none twice
    assert stats["tables"][table]["dead_lettered"] == 0


# -- QuestDB away for 20 s -----------------------------------------------------------------


def free_ports(count: int) -> list[int]:
    sockets, ports = [], []
    for _ in range(count):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        sockets.append(s)
        ports.append(s.getsockname()[1])
    for s in sockets:
        s.close()
    return ports


@pytest.fixture
def own_stack(tmp_path_factory) -> local_stack.Endpoints:
    """A private NATS + QuestDB (+ Valkey: `up` starts the whole stack) on free ports."""
    for attempt in range(3):
        # A port found free can be taken by someone else before the server binds it:
        # then start again on other ports.
        ports = dict(zip(local_stack.PORT_ENV, free_ports(len(local_stack.PORT_ENV))))
        ep = local_stack.Endpoints(home=tmp_path_factory.mktemp("qw-own-stack"), **ports)
        try:
            local_stack.up(ep)
            break
        except local_stack.StackError:
            local_stack.down(ep)
            if attempt == 2:
                raise
    yield ep
    local_stack.down(ep)


async def test_questdb_down_for_20s_mid_stream_then_every_row_once(own_stack, names):
    ep = own_stack
    n, rate = 20_000, 500  # messages, per second: the stream runs across the outage
    # An ack wait well inside the outage: the held batch must survive on keep-alives.
    app = writer_app(ep, names, routes=("quotes",), runtime__ack_wait_s=5)
    table, stream = names.table("quotes"), names.stream("quotes")
    qdb = QuestDBClient(host=ep.questdb_host, port=ep.questdb_http_port)

    async def feed() -> None:
        nc = await nats.connect(ep.nats_url)
        started = time.monotonic()
        for i in range(1, n + 1):
            await nc.publish(names.subject("quotes"), quote_bytes(i))
            if i % 100 == 0:
                await nc.flush()
                await asyncio.sleep(max(0.0, started + i / rate - time.monotonic()))
        await nc.flush()
        await nc.close()

    async with app:
        publisher = asyncio.create_task(feed())
        while (await qdb.query(f"SELECT count() FROM {table}")).scalar() < 2_000:
            await asyncio.sleep(0.1)
        await asyncio.to_thread(local_stack.down, ep, names=["questdb"])
        stopped = time.monotonic()
        await asyncio.sleep(3)
        floor_in_outage = await ack_floor(ep.nats_url, stream, names.durable("quotes"))
        status, health = await get_json(app, "/health")
        assert status == 503 and health["checks"]["questdb"]["ok"] is False
        _, stats = await get_json(app, "/stats")
        assert stats["tables"][table]["writes_failing_since"] is not None
        await asyncio.sleep(max(0.0, 20 - (time.monotonic() - stopped)))
        floor_at_restart = await ack_floor(ep.nats_url, stream, names.durable("quotes"))
        await asyncio.to_thread(local_stack.up, ep)
        await publisher
        await wait_acked(ep.nats_url, stream, names.durable("quotes"), n, timeout=180)
        status, health = await get_json(app, "/health")
        assert status == 200, health
        _, stats = await get_json(app, "/stats")
    try:
        assert await qdb.wait_visible(table, n, timeout=60) == n
        assert await count_rows(qdb, table) == (n, n)
    finally:
        await qdb.close()
    table_stats = stats["tables"][table]
    assert table_stats["retries"] > 0 and table_stats["errors"] > 0
    assert table_stats["dead_lettered"] == 0 and stats["totals"]["dead_lettered"] == 0
    # Nothing was acknowledged while QuestDB was away: the messages waited in JetStream.
    assert floor_in_outage == floor_at_restart < n
