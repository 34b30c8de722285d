"""The execution_quality service without servers: config, wiring, request validation."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import httpx
import pytest

from posttrade.config import ConfigError, load_config
from posttrade.services import execution_quality as eq
from posttrade.services import service_module
from posttrade.sinks import RetryPolicy
from posttrade.stores.clickhouse.execution_queries import Filters
from posttrade.stores.clickhouse.execution_sink import ExecutionSink
from posttrade.web.execution_quality import parse_bucket, parse_group_by
from posttrade.web.params import parse_time
from posttrade.web.server import build_web_app


def config(**env: str) -> eq.ExecutionQualityConfig:
    return load_config("execution_quality", eq.CONFIG, env=env)


def test_config_file_loads_with_its_own_section():
    c = config()
    assert c.service.port == 8096 and c.service.name == "execution_quality"
    assert c.execution.history_s == 600 and c.execution.quiet_symbol_grace_s == 5
    assert c.service.namespace is None
    c = config(POSTTRADE_EXECUTION_QUALITY__EXECUTION__RETENTION_S="120")
    assert c.execution.retention_s == 120
    with pytest.raises(ConfigError, match="execution"):
        config(POSTTRADE_EXECUTION_QUALITY__EXECUTION__NO_SUCH_KEY="1")


def test_worker_finds_the_service():
    module = service_module("execution_quality")
    assert module.CONFIG is eq.ExecutionQualityConfig and callable(module.build)


def test_chdb_dsn_of_the_shared_root_gets_the_service_directory():
    assert eq.service_chdb_dsn("chdb:///home/p/chdb", "execution_quality") == "chdb:///home/p/chdb/execution_quality"
    assert eq.service_chdb_dsn("chdb:///home/p/chdb/", "execution_quality") == "chdb:///home/p/chdb/execution_quality"
    assert eq.service_chdb_dsn("chdb:///data/eq?database=x", "execution_quality") == "chdb:///data/eq?database=x"
    assert eq.service_chdb_dsn("chdb://memory", "execution_quality") == "chdb://memory"


def test_clickhouse_options_choose_embedded_or_server():
    c = config(POSTTRADE__DATABASES__CLICKHOUSE__DSN="chdb:///tmp/stack/chdb")
    assert eq.clickhouse_options(c) == {"dsn": "chdb:///tmp/stack/chdb/execution_quality"}
    c = config(POSTTRADE__DATABASES__CLICKHOUSE__HOST="10.0.0.5", POSTTRADE__DATABASES__CLICKHOUSE__PORT="18123")
    assert eq.clickhouse_options(c) == {"host": "10.0.0.5", "port": 18123, "user": None, "password": None, "secure": False}


def test_the_service_namespace_isolates_streams_subjects_consumers_and_tables():
    app = eq.build(config(POSTTRADE_EXECUTION_QUALITY__SERVICE__NAMESPACE="t-1a")).app
    specs = {c.name: (c.stream.name, c.stream.subjects) for c in app.channels.values()}
    assert specs["fills"] == ("T_1A_FILLS", ("t-1a.trading.fills.>",))
    assert specs["quotes"] == ("T_1A_QUOTES", ("t-1a.md.quotes.>",))
    assert app.agents["fills"].durable == "t-1a-execution_quality-fills"
    assert app.tables["fills"].bucket == "t-1a-execution_quality-fills"
    default = eq.build(config()).app
    assert {c.stream.name for c in default.channels.values()} == {"ORDERS", "FILLS", "QUOTES", "TRADES"}
    with pytest.raises(ValueError, match="namespace"):
        eq.build(config(POSTTRADE_EXECUTION_QUALITY__SERVICE__NAMESPACE="a.b"))


def test_database_name_must_be_an_identifier():
    with pytest.raises(ConfigError, match="identifier"):
        eq.build(config(POSTTRADE__DATABASES__CLICKHOUSE__DATABASE="x; DROP TABLE y"))


@pytest.fixture
async def client():
    # Not started: no ClickHouse. Validation answers 400 before any query; a valid
    # request then answers 503 (store not connected).
    app = eq.build(config()).app
    transport = httpx.ASGITransport(app=build_web_app(app))
    async with httpx.AsyncClient(transport=transport, base_url="http://eq") as c:
        yield c


@pytest.mark.parametrize(
    "url, parameter",
    [
        ("/metrics/execution?level=trade", "level"),
        ("/metrics/execution?limit=0", "limit"),
        ("/metrics/execution?limit=1001", "limit"),
        ("/metrics/execution?limit=ten", "limit"),
        ("/metrics/execution?offset=-1", "offset"),
        ("/metrics/execution?side=HOLD", "side"),
        ("/metrics/execution?from=yesterday", "from"),
        ("/metrics/execution?from=1700000000", "from"),  # seconds, not nanoseconds
        ("/metrics/execution?from=2024-01-02&to=2024-01-01", "to"),
        ("/metrics/execution?account=", "account"),
        ("/metrics/execution?acount=A", "acount"),
        ("/analytics/summary?group_by=account,desk", "group_by"),
        ("/analytics/summary?group_by=side,side", "group_by"),
        ("/analytics/summary?bucket=90", "bucket"),
        ("/analytics/summary?bucket=0m", "bucket"),
        ("/analytics/summary?bucket=400d", "bucket"),
        ("/analytics/summary?order_id=O1", "order_id"),
        ("/analytics/summary?limit=10001", "limit"),
    ],
)
async def test_bad_requests_answer_400_naming_the_parameter(client, url, parameter):
    response = await client.get(url)
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["error"] == "bad request" and body["detail"]["parameter"] == parameter


async def test_valid_request_without_clickhouse_is_503(client):
    response = await client.get("/metrics/execution?level=order&side=buy&from=2024-01-02T00:00:00Z&limit=5")
    assert response.status_code == 503
    assert response.json()["detail"]["error"] == "ClickHouse is not connected"
    response = await client.get("/analytics/summary?group_by=&bucket=1h")
    assert response.status_code == 503


def test_time_parameters():
    assert parse_time("from", "2024-01-02T14:30:00Z") == 1_704_205_800_000_000_000
    assert parse_time("from", "2024-01-02T14:30:00.000001") == 1_704_205_800_000_001_000
    assert parse_time("from", "2024-01-02T15:30:00+01:00") == 1_704_205_800_000_000_000
    assert parse_time("from", "1704205800000000123") == 1_704_205_800_000_000_123
    assert parse_bucket("90s") == 90_000_000_000 and parse_bucket("1d") == 86_400_000_000_000
    assert parse_group_by("") == () and parse_group_by(None) == ("account", "symbol", "venue", "side")


def test_filters_become_bound_parameters():
    f = Filters(account="A'; --", side="BUY", from_ns=5, to_ns=9)
    where, params = f.where("ts")
    assert "A'" not in where and params["account"] == "A'; --"
    assert where == (
        " WHERE account = {account:String} AND side = {side:String} AND "
        "ts >= fromUnixTimestamp64Nano({from_ns:Int64}, 'UTC') AND ts < fromUnixTimestamp64Nano({to_ns:Int64}, 'UTC')"
    )
    assert Filters().where("ts") == ("", {})
    # The fills table's readers add their own condition: busted fills are left out.
    assert Filters(side="SELL").where("ts", "busted = 0") == (
        " WHERE busted = 0 AND side = {side:String}", {"side": "SELL"})
    assert Filters().where("ts", "busted = 0") == (" WHERE busted = 0", {})


def test_corrections_busts_resends_and_openings_are_counted_in_prometheus():
    from prometheus_client import generate_latest

    from posttrade.agents.execution.state import WaitingAmendment
    from posttrade.streams.events import Fill

    service = eq.build(config())
    stats = service.tracker.stats
    stats.fills, stats.corrections, stats.busts = 3, 2, 1
    stats.skipped_fills.update({("fill", "duplicate"): 4, ("opening", "opening"): 1, ("bust", "amends_forgotten"): 1})
    bust = Fill(ts=1_704_205_800_000_000_000, fill_id="B", exec_type="BUST", ref_fill_id="F", account="A", symbol="S")
    service.tracker.waiting["B"] = WaitingAmendment(fill=bust, seq=7)
    text = generate_latest(service.app.metrics.registry).decode()
    for line in (
        'posttrade_execution_events_total{kind="fill"} 3.0',
        'posttrade_execution_events_total{kind="correction"} 2.0',
        'posttrade_execution_events_total{kind="bust"} 1.0',
        'posttrade_execution_skipped_events_total{kind="fill",reason="duplicate"} 4.0',
        'posttrade_execution_skipped_events_total{kind="opening",reason="opening"} 1.0',
        'posttrade_execution_skipped_events_total{kind="bust",reason="amends_forgotten"} 1.0',
        "posttrade_execution_amendments_waiting 1.0",
    ):
        assert line in text, line


class Answering:
    """Stands in for an open ExecutionStore."""

    location = "chdb:///somewhere"
    database = "posttrade"

    async def ping(self):
        return True


async def test_clickhouse_health_is_degraded_until_connected_and_while_away():
    service = eq.build(config())
    check = service.app.health_checks["sink:clickhouse"]  # the sink's, registered by app.sink
    ok, detail = await check()
    assert ok == "degraded" and not detail["connected"] and detail["error"] == "connecting"

    service.sink.use(Answering())
    ok, detail = await check()
    assert ok is True and detail["connected"] and detail["location"] == "chdb:///somewhere"
    assert detail["pending"] == 0 and detail["rollup_minutes_stale"] == 0

    # Writes failing for longer than DEGRADED_AFTER_S: degraded (the writes are retried).
    service.sink.stats.failed("ConnectionError: ClickHouse went away")
    service.sink.stats.failing_since -= ExecutionSink.DEGRADED_AFTER_S
    ok, detail = await check()
    assert ok == "degraded" and "went away" in detail["last_error"]

    class Away(Answering):
        async def ping(self):
            raise ConnectionError("refused")

    service.sink.use(Away())
    service.sink.stats.failing_since = None  # the writes go through again
    ok, detail = await check()
    assert ok == "degraded" and detail["error"] == "ConnectionError: refused"


async def test_the_sink_opens_clickhouse_under_the_retry_policy():
    tracker = eq.build(config()).tracker
    attempts = []

    async def connect():
        attempts.append(1)
        if len(attempts) < 3:
            raise ConnectionError(f"refused {len(attempts)}")
        return Answering()

    sink = ExecutionSink(tracker, RetryPolicy(initial_s=0.01, max_s=0.01), connect=connect)
    await sink.connect()
    assert len(attempts) == 3 and sink.stats.errors == 2 and sink.store_error is None
    assert (await sink.health())[0] is True
    await sink.connect()  # connected: nothing more to open
    assert len(attempts) == 3


async def test_without_clickhouse_the_service_is_degraded_and_acknowledges_nothing():
    """ClickHouse refuses connections: the sink keeps trying under the batch retry policy,
    /health says degraded (with why), the pages answer 503 with the same reason, and the
    order stays unacknowledged (its row is not in ClickHouse)."""
    import socket
    import time

    from posttrade.streams.events import Order, encode
    from posttrade.streams.memory import MemoryTransport

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    transport = MemoryTransport()
    service = eq.build(config(
        POSTTRADE__DATABASES__CLICKHOUSE__HOST="127.0.0.1", POSTTRADE__DATABASES__CLICKHOUSE__PORT=str(port),
        POSTTRADE_EXECUTION_QUALITY__BATCH__RETRY_INITIAL_S="0.01",
        POSTTRADE_EXECUTION_QUALITY__BATCH__RETRY_MAX_S="0.05",
    ), transport=transport)
    order = Order(ts=1_704_205_800_000_000_000, order_id="O1", account="A", symbol="S", side="BUY", qty=Decimal(1),
                  status="NEW")
    async with service.app:
        await transport.publish("trading.orders.A.S", encode(order))
        deadline = time.monotonic() + 10
        while service.sink.stats.errors < 3 or service.sink.unwritten() < 1:
            assert time.monotonic() < deadline, "the sink did not try ClickHouse for the order"
            await asyncio.sleep(0.02)
        report = await service.app.health_report()
        check = report["checks"]["sink:clickhouse"]
        assert report["status"] == "degraded" and check["ok"] and check["degraded"]
        assert check["detail"]["error"] == service.sink.store_error and "Connection refused" in service.sink.store_error
        assert check["detail"]["pending"] == 1 and not check["detail"]["connected"]
        assert report["reasons"]["sink:clickhouse"].startswith('{"error": ')  # why, first
        web = httpx.ASGITransport(app=build_web_app(service.app))
        async with httpx.AsyncClient(transport=web, base_url="http://eq") as client:
            response = await client.get("/metrics/execution")
        assert response.status_code == 503
        assert response.json()["detail"] == {"error": "ClickHouse is not connected", "reason": service.sink.store_error}
        assert transport.ack_floors.get(("ORDERS", "execution_quality-orders"), 0) == 0
        assert "O1" in service.tracker.orders and "O1" not in service.tracker.tables.orders  # not persisted
