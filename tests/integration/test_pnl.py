"""pnl on the real servers: NATS JetStream, Valkey and QuestDB of the local stack.

Every test gets its own namespace (streams `<NS>_POSITIONS`, ..., `<NS>_PNL` on
`<ns>.posttrade.positions.>`, ...), app name (durable consumers and changelog buckets),
Valkey key prefix and QuestDB tables (uuid suffixes), and removes them afterwards: the
stack is shared. pnl publishes its snapshots on PNL; the tests that read them back from
QuestDB run questdb_writer in-process (its two pnl routes only, on the same namespace).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from decimal import Decimal

import httpx
import msgspec
import nats
import pytest

from posttrade.config import load_config
from posttrade.core.positions import Position
from posttrade.services import pnl, questdb_writer
from posttrade.stores.questdb import QuestDBClient
from posttrade.stores.valkey import open_valkey
from posttrade.streams.events import Fill, PnlSnapshot, PositionUpdate, Quote, decode, encode, subject_token
from posttrade.streams.nats import forget_apps
from posttrade.web.server import build_web_app

D = Decimal
S = 1_000_000_000
WORKED_EXAMPLE = [("BUY", "10", "100"), ("BUY", "10", "110"), ("SELL", "15", "120"), ("SELL", "10", "90")]
# The platform's subjects (posttrade.streams.subjects) per stream, before the namespace.
SUBJECTS = {"POSITIONS": "posttrade.positions", "QUOTES": "md.quotes", "TRADES": "md.trades", "BARS": "md.bars",
            "PNL": "posttrade.pnl"}
PNL_ROUTES = ("pnl_snapshots", "pnl_account_snapshots")


def update_of(position: Position, ts: int, reason: str = "fill") -> PositionUpdate:
    """What ptrc publishes for `position` (the PositionUpdate contract)."""
    return PositionUpdate(
        ts=ts, account=position.account, symbol=position.symbol, reason=reason,
        multiplier=position.multiplier, net_qty=position.net_qty, avg_open_price=position.avg_open_price,
        open_cost=position.open_cost, realized_pnl_gross=position.realized_pnl_gross, fees=position.fees,
        realized_pnl_net=position.realized_pnl_net, fifo_open_cost=position.fifo_open_cost,
        fifo_realized_pnl_gross=position.fifo_realized_pnl_gross,
        sod_realized_pnl_net=position.sod_realized_pnl_net, sod_unrealized_pnl=position.sod_unrealized_pnl,
        fill_count=position.fill_count,
    )


def worked_example(account: str, symbol: str, t0: int) -> list[PositionUpdate]:
    position = Position(account, symbol)
    updates = []
    for i, (side, qty, price) in enumerate(WORKED_EXAMPLE, 1):
        position.apply(Fill(ts=t0 + i, fill_id=f"f{i}", account=account, symbol=symbol, side=side,
                            qty=D(qty), price=D(price), fee=D(1)))
        updates.append(update_of(position, t0 + i))
    return updates


@dataclass
class Names:
    suffix: str

    @property
    def app(self) -> str:
        return f"pnl_{self.suffix}"

    @property
    def namespace(self) -> str:
        return f"pnlt{self.suffix}"

    @property
    def prefix(self) -> str:
        return f"pt{self.suffix}"

    @property
    def table(self) -> str:
        return f"pnl_snap_{self.suffix}"

    @property
    def account_table(self) -> str:
        return f"pnl_acct_{self.suffix}"

    def stream(self, kind: str) -> str:
        return f"{self.namespace.upper()}_{kind}"

    def subject(self, kind: str, *tokens: str) -> str:
        return ".".join([self.namespace, SUBJECTS[kind], *(subject_token(t) for t in tokens)])

    def durable(self, agent: str) -> str:
        return f"{self.namespace}-{self.app}-{agent}"


@dataclass
class Service:
    names: Names
    service: pnl.PnlService
    http: httpx.AsyncClient
    js: object
    valkey: object
    qdb: QuestDBClient

    @property
    def app(self):
        return self.service.app

    async def publish_position(self, update: PositionUpdate) -> None:
        await self.js.publish(self.names.subject("POSITIONS", update.account, update.symbol), encode(update))

    async def publish_quote(self, q: Quote) -> None:
        await self.js.publish(self.names.subject("QUOTES", q.symbol), encode(q))

    async def get(self, path: str) -> tuple[int, dict]:
        response = await self.http.get(path)
        return response.status_code, response.json()

    async def snapshots_published(self) -> list[tuple[str, PnlSnapshot]]:
        """The PNL stream: each message's id and snapshot, in order."""
        stream = self.names.stream("PNL")
        last = (await self.js.stream_info(stream)).state.last_seq
        out = []
        for seq in range(1, last + 1):
            message = await self.js.get_msg(stream, seq)
            out.append((message.headers["Nats-Msg-Id"], decode(PnlSnapshot, message.data)))
        return out

    async def history_until(self, query: str, done: Callable[[dict], bool], timeout: float = 20.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            status, body = await self.get(f"/pnl/history{query}")
            assert status == 200, body
            if done(body):
                return body
            if time.monotonic() > deadline:
                raise AssertionError(f"/pnl/history{query} never got there: {body}")
            await asyncio.sleep(0.1)

    async def realtime_until(self, query: str, done: Callable[[dict], bool], timeout: float = 15.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            status, body = await self.get(f"/pnl/realtime{query}")
            assert status == 200, body
            if done(body):
                return body
            if time.monotonic() > deadline:
                raise AssertionError(f"/pnl/realtime{query} never got there: {body}")
            await asyncio.sleep(0.02)


@pytest.fixture
async def service_factory(stack) -> AsyncIterator:
    """Start pnl with its own names; the same `names` again is a restart. With
    `writer=True`, questdb_writer's pnl routes run beside it (once per names)."""
    started: list[tuple] = []
    all_names: list[Names] = []
    writers: dict[str, object] = {}
    nc = await nats.connect(stack.nats_url)
    js = nc.jetstream()
    valkey = open_valkey(host=stack.valkey_host, port=stack.valkey_port, db=4)
    qdb = QuestDBClient(host=stack.questdb_host, port=stack.questdb_http_port)

    async def start(names: Names | None = None, *, writer: bool = False, **overrides: str) -> Service:
        if names is None:
            names = Names(uuid.uuid4().hex[:10])
        if names not in all_names:
            all_names.append(names)
        env = {
            **stack.service_env(),
            "POSTTRADE_PNL__SERVICE__NAME": names.app,
            "POSTTRADE_PNL__SERVICE__NAMESPACE": names.namespace,
            "POSTTRADE_PNL__CACHE__REDIS__DB": "4",
            "POSTTRADE_PNL__PNL__KEY_PREFIX": names.prefix,
            "POSTTRADE_PNL__PNL__SNAPSHOTS__TABLE": names.table,
            "POSTTRADE_PNL__PNL__SNAPSHOTS__ACCOUNT_TABLE": names.account_table,
            "POSTTRADE_PNL__PNL__SNAPSHOTS__INTERVAL_S": "0.2",
            "POSTTRADE_PNL__PNL__SNAPSHOTS__FULL_EVERY": "5",
            "POSTTRADE_PNL__BATCH__RETRY_INITIAL_S": "0.05",
            "POSTTRADE_PNL__BATCH__RETRY_MAX_S": "0.2",
        }
        env.update({f"POSTTRADE_PNL__{k.upper()}": v for k, v in overrides.items()})
        service = pnl.build(load_config("pnl", pnl.CONFIG, env=env))
        service.app.runtime.poll_timeout_s = 0.05
        await service.app.start()
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app=build_web_app(service.app)), base_url="http://test")
        started.append((service.app, http))
        if writer and names.suffix not in writers:
            writers[names.suffix] = await start_writer(stack, names)
        return Service(names, service, http, js, valkey, qdb)

    yield start

    for app, http in started:
        await http.aclose()
        if app.started:
            await app.stop()
    for app in writers.values():
        await app.stop()
    for names in all_names:
        await forget_apps(stack.nats_url, [f"{names.namespace}-{names.app}", f"{names.namespace}-qw_{names.suffix}"])
        for kind in (*SUBJECTS, "DLQ"):
            try:
                await js.delete_stream(names.stream(kind))
            except nats.js.errors.NotFoundError:
                pass
        keys = [k async for k in valkey.redis.scan_iter(match=f"{names.prefix}:*")]
        if keys:
            await valkey.redis.delete(*keys)
        await qdb.drop_table(names.table)
        await qdb.drop_table(names.account_table)
    await valkey.close()
    await qdb.close()
    await nc.close()


async def start_writer(stack, names: Names):
    """questdb_writer in this process: only its pnl routes, into this test's tables."""
    prefix = "POSTTRADE_QUESTDB_WRITER__"
    env = {**stack.service_env(), f"{prefix}SERVICE__NAME": f"qw_{names.suffix}",
           f"{prefix}SERVICE__NAMESPACE": names.namespace}
    for route in load_config("questdb_writer", questdb_writer.CONFIG, env=env).writer.routes:
        env[f"{prefix}WRITER__ROUTES__{route.upper()}__ENABLED"] = "true" if route in PNL_ROUTES else "false"
    env[f"{prefix}WRITER__ROUTES__PNL_SNAPSHOTS__TABLE"] = names.table
    env[f"{prefix}WRITER__ROUTES__PNL_ACCOUNT_SNAPSHOTS__TABLE"] = names.account_table
    env[f"{prefix}BATCH__INTERVAL_SEC"] = "0.1"
    app = questdb_writer.build(load_config("questdb_writer", questdb_writer.CONFIG, env=env)).app
    app.runtime.poll_timeout_s = 0.05
    await app.start()
    return app


def has_total(expected: str) -> Callable[[dict], bool]:
    return lambda body: bool(body["positions"]) and body["positions"][0]["total_pnl"] == expected


async def test_positions_and_quotes_on_nats_become_pnl_in_memory_valkey_and_questdb(service_factory):
    svc = await service_factory(writer=True)
    t0 = time.time_ns() - 60 * S
    for update in worked_example("A1", "XYZ", t0):
        await svc.publish_position(update)
    await svc.publish_quote(Quote(ts=t0 + 10 * S, symbol="XYZ", bid=D("94.5"), ask=D("95.5")))

    body = await svc.realtime_until("?account=A1&symbol=XYZ", has_total("121"))
    (row,) = body["positions"]
    assert {k: row[k] for k in ("net_qty", "avg_open_price", "mark", "realized_pnl_gross", "fees", "realized_pnl_net",
                                "unrealized_pnl", "fifo_unrealized_pnl", "total_pnl", "day_pnl", "fill_count")} == {
        "net_qty": "-5", "avg_open_price": "90", "mark": "95", "realized_pnl_gross": "150", "fees": "4",
        "realized_pnl_net": "146", "unrealized_pnl": "-25", "fifo_unrealized_pnl": "-25", "total_pnl": "121",
        "day_pnl": "121", "fill_count": 4,
    }
    assert body["as_of"] == t0 + 10 * S

    # Valkey: the same values under the documented keys, each with the TTL.
    redis, prefix = svc.valkey.redis, svc.names.prefix
    deadline = time.monotonic() + 10
    while (raw := await redis.get(f"{prefix}:pnl:pos:A1:XYZ")) is None or json.loads(raw)["total_pnl"] != "121":
        assert time.monotonic() < deadline, "the position never reached Valkey"
        await asyncio.sleep(0.02)
    assert json.loads(raw) == row
    totals = json.loads(await redis.get(f"{prefix}:pnl:acct:A1"))
    assert (totals["total_pnl"], totals["day_pnl"], totals["positions"]) == ("121", "121", 1)
    assert await redis.smembers(f"{prefix}:pnl:symbols:A1") == {b"XYZ"}
    assert b"A1" in await redis.smembers(f"{prefix}:pnl:accounts")
    for key in ("pos:A1:XYZ", "acct:A1", "symbols:A1", "accounts"):
        assert 290 <= await redis.ttl(f"{prefix}:pnl:{key}") <= 300, key

    # QuestDB (through questdb_writer): the snapshot lands; /pnl/history samples it by the interval.
    history = await svc.history_until(
        "?account=A1&symbol=XYZ&interval=1s", lambda h: h["series"] and h["series"][0]["points"][-1]["total_pnl"] == "121"
    )
    assert (history["level"], history["interval"], history["series"][0]["symbol"]) == ("position", "1s", "XYZ")

    # A second account in the same symbol: one quote revalues both.
    for update in worked_example("A2", "XYZ", t0)[:2]:  # long 20 @ 105
        await svc.publish_position(update)
    await svc.publish_quote(Quote(ts=t0 + 20 * S, symbol="XYZ", bid=D("100"), ask=D("100")))
    body = await svc.realtime_until("?symbol=XYZ", lambda b: b["count"] == 2 and b["positions"][0]["total_pnl"] == "96")
    assert [(r["account"], r["unrealized_pnl"]) for r in body["positions"]] == [("A1", "-50"), ("A2", "-100")]

    history = await svc.history_until(
        "?account=A1&symbol=XYZ&interval=1h", lambda h: h["series"] and h["series"][0]["points"][-1]["total_pnl"] == "96"
    )
    # Hour buckets: each has its last values, the total's low and high, how many snapshots.
    points = history["series"][0]["points"]
    assert (points[-1]["mark"], points[-1]["unrealized_pnl"], points[-1]["day_pnl"]) == ("100", "-50", "96")
    assert min(D(p["total_pnl_low"]) for p in points) == 96 and max(D(p["total_pnl_high"]) for p in points) == 121
    assert sum(p["snapshots"] for p in points) >= 2

    # Without a symbol: the account's totals (written to the account table just after).
    history = await svc.history_until(
        "?account=A2&interval=1h", lambda h: h["series"] and h["series"][0]["points"][-1]["total_pnl"] == "-102"
    )  # -100 unrealized - 2 fees
    assert history["level"] == "account" and "symbol" not in history["series"][0]

    status, history = await svc.get("/pnl/history?account=A1&symbol=XYZ&from=2020-01-01T00:00:00Z&to=2020-01-01T01:00:00Z")
    assert (status, history["series"]) == (200, [])

    status, health = await svc.get("/health")
    assert status == 200, health
    checks = health["checks"]
    assert checks["valkey"]["ok"] and checks["questdb"]["ok"] and checks["sink:snapshots"]["ok"]
    assert checks["sink:valkey"]["ok"] and checks["sink:snapshots"]["detail"]["pending_rows"] >= 0


async def test_snapshot_messages_rows_and_dedup_keys(service_factory):
    svc = await service_factory(writer=True, pnl__snapshots__full_every="1000")
    t0 = time.time_ns() - 60 * S
    position = Position("A1", "ES", multiplier=D(50))
    position.apply(Fill(ts=t0, fill_id="f1", account="A1", symbol="ES", side="SELL", qty=D(2), price=D("5000.25"), fee=D("2.5")))
    await svc.publish_position(update_of(position, t0))
    # No mark yet: the first snapshot row has null P&L (and a null mark source).
    await svc.qdb.wait_visible(svc.names.table, 1, timeout=20)
    (first,) = (await svc.qdb.query(f"SELECT * FROM {svc.names.table}")).dicts()
    assert (first["mark"], first["mark_source"], first["unrealized_pnl"], first["total_pnl"]) == (None, None, None, None)
    assert D(first["realized_pnl_net"]) == D("-2.5")
    await svc.publish_quote(Quote(ts=t0 + S, symbol="ES", bid=D("4990.25"), ask=D("4990.75")))
    await svc.realtime_until("?account=A1", has_total("972.5"))
    deadline = time.monotonic() + 20
    while True:
        rows = (await svc.qdb.query(f"SELECT * FROM {svc.names.table} ORDER BY ts")).dicts()
        if rows and rows[-1]["total_pnl"] is not None and D(rows[-1]["total_pnl"]) == D("972.5"):
            break
        assert time.monotonic() < deadline, rows
        await asyncio.sleep(0.1)
    row = rows[-1]
    assert (row["account"], row["symbol"], row["mark_source"], row["fill_count"]) == ("A1", "ES", "quote_mid", 1)
    assert D(row["unrealized_pnl"]) == D(975) and D(row["multiplier"]) == D(50)
    assert row["as_of"].startswith(time.strftime("%Y-%m-%dT", time.gmtime((t0 + S) / S)))
    keys = await svc.qdb.query(f"SELECT \"column\" FROM table_columns('{svc.names.table}') WHERE upsertKey")
    assert set(keys.column("column")) == {"ts", "account", "symbol"}
    keys = await svc.qdb.query(f"SELECT \"column\" FROM table_columns('{svc.names.account_table}') WHERE upsertKey")
    assert set(keys.column("column")) == {"ts", "account"}
    # Nothing changes: no more snapshot rows until the next full one (every 1000 ticks).
    count = len(rows)
    await asyncio.sleep(1.0)
    assert len((await svc.qdb.query(f"SELECT ts FROM {svc.names.table}")).rows) == count
    # On the bus: one message per part of each snapshot, with the id JetStream drops a
    # second publish by; its rows are the table's.
    published = await svc.snapshots_published()
    assert [msg_id for msg_id, _ in published] == [f"pnl:{s.ts}:{s.part}" for _, s in published]
    assert len({msg_id for msg_id, _ in published}) == len(published)
    last = [s for _, s in published if s.positions][-1]
    (es,) = last.positions
    assert (es.account, es.symbol, es.mark_source, es.total_pnl, es.multiplier) == ("A1", "ES", "quote_mid", D("972.5"), D(50))
    assert rows[-1]["ts"].startswith(time.strftime("%Y-%m-%dT%H:%M", time.gmtime(last.ts / S)))


async def test_restart_recovers_without_replaying(service_factory):
    svc = await service_factory()
    t0 = time.time_ns() - 60 * S
    for update in worked_example("A1", "XYZ", t0):
        await svc.publish_position(update)
    await svc.publish_quote(Quote(ts=t0 + 10 * S, symbol="XYZ", bid=D("95"), ask=D("95")))
    before = await svc.realtime_until("", has_total("121"))
    await asyncio.sleep(0.3)  # let the last batch commit
    await svc.app.stop()

    again = await service_factory(svc.names)
    _, body = await again.get("/pnl/realtime")
    assert body == before  # recovered from the changelogs, not from a replay
    await again.publish_quote(Quote(ts=t0 + 20 * S, symbol="XYZ", bid=D("100"), ask=D("100")))
    await again.realtime_until("", has_total("96"))
    consumer = await again.js.consumer_info(again.names.stream("POSITIONS"), again.names.durable("value_positions"))
    assert consumer.num_pending == 0 and consumer.num_redelivered == 0


async def test_the_highest_revision_is_kept_across_a_restart(service_factory):
    """A late fill's update (higher revision, older ts) replaces the one before it; a
    republished older revision after it changes nothing, before and after a restart."""
    svc = await service_factory()
    # A new consumer starts at the last message of each subject: let it exist first,
    # so that it sees all three updates in the order they were published.
    deadline = time.monotonic() + 10
    while not all(runner.running for runner in svc.app.agents.values()):
        assert time.monotonic() < deadline, "the agents never started"
        await asyncio.sleep(0.02)
    t0 = time.time_ns() - 60 * S
    u1, u2, u3, u4 = worked_example("A1", "XYZ", t0)
    await svc.publish_position(msgspec.structs.replace(u3, revision=3, ts=t0 + 30 * S))
    await svc.publish_position(msgspec.structs.replace(u4, revision=4, ts=t0 + 20 * S))  # the late fill
    await svc.publish_position(msgspec.structs.replace(u2, revision=2, ts=t0 + 40 * S))  # an old one resent
    await svc.publish_quote(Quote(ts=t0 + 10 * S, symbol="XYZ", bid=D("95"), ask=D("95")))
    await svc.realtime_until("?account=A1", has_total("121"))
    deadline = time.monotonic() + 10
    while True:  # every update taken (and acknowledged), the stale one included
        consumer = await svc.js.consumer_info(svc.names.stream("POSITIONS"), svc.names.durable("value_positions"))
        if consumer.num_pending == 0 and consumer.num_ack_pending == 0:
            break
        assert time.monotonic() < deadline, consumer
        await asyncio.sleep(0.05)
    _, body = await svc.get("/pnl/realtime?account=A1")
    (row,) = body["positions"]
    assert (row["net_qty"], row["fill_count"], row["position_ts"]) == ("-5", 4, t0 + 20 * S)
    await svc.app.stop()

    again = await service_factory(svc.names)
    _, restarted = await again.get("/pnl/realtime?account=A1")
    assert restarted == body
    assert again.app.tables["positions"][("A1", "XYZ")].revision == 4


async def test_a_new_service_starts_from_the_latest_update_of_each_position(service_factory):
    """A fresh pnl takes the last message of each subject: the current state, not history."""
    svc = await service_factory()
    await svc.app.stop()  # the streams exist now; publish while no pnl runs
    t0 = time.time_ns() - 60 * S
    for update in worked_example("A9", "XYZ", t0):
        await svc.publish_position(update)
    for i, mid in enumerate(("90", "91", "95")):
        await svc.publish_quote(Quote(ts=t0 + (10 + i) * S, symbol="XYZ", bid=D(mid), ask=D(mid)))
    # Another app name: new durable consumers and changelogs on the same streams.
    fresh = await service_factory(Renamed(svc.names.suffix, f"{svc.names.app}b"))
    body = await fresh.realtime_until("?account=A9", has_total("121"))
    assert body["positions"][0]["fill_count"] == 4
    positions = await fresh.js.consumer_info(svc.names.stream("POSITIONS"), fresh.names.durable("value_positions"))
    quotes = await fresh.js.consumer_info(svc.names.stream("QUOTES"), fresh.names.durable("mark_quotes"))
    assert positions.delivered.consumer_seq == 1 and quotes.delivered.consumer_seq == 1  # the latest of each


@dataclass
class Renamed(Names):
    """The same namespace (streams), key prefix and tables as `suffix`, under another app name."""

    app_name: str = ""

    @property
    def app(self) -> str:
        return self.app_name


async def test_snapshots_wait_while_nats_refuses_them_and_none_are_lost_or_doubled(service_factory):
    """Publishing fails (the first message of each window gets there, then the
    connection is lost): snapshots queue and are published again; once NATS takes them,
    every queued snapshot is on the stream once, in order."""
    svc = await service_factory(pnl__snapshots__full_every="1")
    snapshots, transport = svc.service.snapshots, svc.app.transport
    real = transport.publish_many
    failing = True

    async def publish_many(messages):
        if failing:
            await real(messages[:1])
            raise ConnectionError("nats: connection closed")
        return await real(messages)

    transport.publish_many = publish_many
    t0 = time.time_ns() - 60 * S
    await svc.publish_position(worked_example("A1", "XYZ", t0)[-1])
    await svc.realtime_until("?account=A1", lambda b: b["count"] == 1)
    deadline = time.monotonic() + 10
    while snapshots.pending_rows < 6:  # three snapshots (a position and an account each) waiting
        assert time.monotonic() < deadline, snapshots.pending_rows
        await asyncio.sleep(0.05)
    status, health = await svc.get("/health")
    detail = health["checks"]["sink:snapshots"]["detail"]
    assert "connection closed" in detail["last_error"] and detail["pending_rows"] >= 6

    failing = False  # NATS takes them again
    deadline = time.monotonic() + 20
    while snapshots.pending_rows:
        assert time.monotonic() < deadline, "the backlog was never published"
        await asyncio.sleep(0.05)
    published = await svc.snapshots_published()
    ids = [msg_id for msg_id, _ in published]
    assert len(set(ids)) == len(ids) >= 6  # the message that got through each time is there once
    assert [(s.ts, s.part) for _, s in published] == sorted((s.ts, s.part) for _, s in published)
    assert all(len(s.positions) + len(s.accounts) == 1 for _, s in published)
