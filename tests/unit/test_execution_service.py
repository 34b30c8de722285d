"""The execution_quality service without servers: config, wiring, request validation."""

from __future__ import annotations

import httpx
import pytest

from posttrade.config import ConfigError, load_config
from posttrade.services import execution_quality as eq
from posttrade.services import service_module
from posttrade.web.server import build_web_app


def config(**env: str) -> eq.ExecutionQualityConfig:
    return load_config("execution_quality", eq.CONFIG, env=env)


def test_config_file_loads_with_its_own_section():
    c = config()
    assert c.service.port == 8096 and c.service.name == "execution_quality"
    assert c.execution.history_s == 600 and c.execution.quiet_symbol_grace_s == 5
    assert c.execution.namespace is None
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


def test_namespace_isolates_streams_and_subjects():
    app = eq.build(config(POSTTRADE_EXECUTION_QUALITY__EXECUTION__NAMESPACE="t-1a"))
    specs = {c.name: (c.stream.name, c.stream.subjects) for c in app.channels.values()}
    assert specs["fills"] == ("T_1A_FILLS", ("t-1a.trading.fills.>",))
    assert specs["quotes"] == ("T_1A_QUOTES", ("t-1a.md.quotes.>",))
    default = eq.build(config())
    assert {c.stream.name for c in default.channels.values()} == {"ORDERS", "FILLS", "QUOTES", "TRADES"}
    with pytest.raises(ConfigError, match="namespace"):
        eq.build(config(POSTTRADE_EXECUTION_QUALITY__EXECUTION__NAMESPACE="a.b"))


def test_database_name_must_be_an_identifier():
    with pytest.raises(ConfigError, match="identifier"):
        eq.build(config(POSTTRADE__DATABASES__CLICKHOUSE__DATABASE="x; DROP TABLE y"))


@pytest.fixture
async def client():
    # Not started: no ClickHouse. Validation answers 400 before any query; a valid
    # request then answers 503 (store not connected).
    app = eq.build(config())
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
    assert eq._parse_time("from", "2024-01-02T14:30:00Z") == 1_704_205_800_000_000_000
    assert eq._parse_time("from", "2024-01-02T14:30:00.000001") == 1_704_205_800_000_001_000
    assert eq._parse_time("from", "2024-01-02T15:30:00+01:00") == 1_704_205_800_000_000_000
    assert eq._parse_time("from", "1704205800000000123") == 1_704_205_800_000_000_123
    assert eq._parse_bucket("90s") == 90_000_000_000 and eq._parse_bucket("1d") == 86_400_000_000_000
    assert eq._parse_group_by("") == () and eq._parse_group_by(None) == ("account", "symbol", "venue", "side")


def test_filters_become_bound_parameters():
    f = eq.Filters(account="A'; --", side="BUY", from_ns=5, to_ns=9)
    where, params = f.where("ts")
    assert "A'" not in where and params["account"] == "A'; --"
    assert where == (
        " WHERE account = {account:String} AND side = {side:String} AND "
        "ts >= fromUnixTimestamp64Nano({from_ns:Int64}, 'UTC') AND ts < fromUnixTimestamp64Nano({to_ns:Int64}, 'UTC')"
    )
    assert eq.Filters().where("ts") == ("", {})
    # The fills table's readers add their own condition: busted fills are left out.
    assert eq.Filters(side="SELL").where("ts", "busted = 0") == (
        " WHERE busted = 0 AND side = {side:String}", {"side": "SELL"})
    assert eq.Filters().where("ts", "busted = 0") == (" WHERE busted = 0", {})


def test_corrections_busts_resends_and_openings_are_counted_in_prometheus():
    from prometheus_client import generate_latest

    from posttrade.agents.execution import WaitingAmendment
    from posttrade.streams.events import Fill

    service = eq.build_service(config())
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


async def test_clickhouse_health_check():
    service = eq.build_service(config())
    ok, detail = await service._clickhouse_health()
    assert not ok and detail == "connecting"

    class Answering:
        location = "chdb:///somewhere"

        async def ping(self):
            return True

    service.store = Answering()
    ok, detail = await service._clickhouse_health()
    assert ok and detail["unwritten_rows"] == 0
    service.sink.stats.consecutive_failures = 3  # batch.max_retry failed inserts in a row
    ok, detail = await service._clickhouse_health()
    assert not ok and detail["failing_writes_in_a_row"] == 3
