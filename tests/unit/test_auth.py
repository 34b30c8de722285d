"""Bearer tokens per route (web/auth.py), parameter parsers against their published
schemas (web/params.py), and the JSON answers of the web layer (405 with Allow, a
store's failure as 503/502, never a 500)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from datetime import date, timedelta
from pathlib import Path

import httpx
import pytest
import yaml
from starlette.routing import Route

from posttrade.app import App
from posttrade.config import SERVICES, ConfigError, load_config
from posttrade.services import service_module
from posttrade.streams.memory import MemoryTransport
from posttrade.web import params
from posttrade.web.auth import PUBLIC, READ, WRITE, AccessPolicy, Tokens, bearer_token
from posttrade.web.server import JSON, build_metrics_app, build_web_app

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

FULL, READER = "full-token", "read-token"


def make_app() -> App:
    app = App("svc", MemoryTransport())

    @app.page("/accounts")
    async def accounts(request):
        return JSON({"accounts": ["A1"]})

    @app.page("/accounts", methods=("POST",))
    async def create(request):
        return JSON({"created": True}, 201)

    @app.page("/counters", public=True)
    async def counters(request):
        return JSON({"n": 1})

    @app.page("/counters/reset", methods=("POST",), public=True)
    async def reset(request):
        return JSON({"reset": True})

    return app


def client(web, token: str | None = None) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=web), base_url="http://test", headers=headers)


# -- the policy --------------------------------------------------------------------------


def test_the_policy_decides_per_route_and_method():
    confidential, public = Route("/a", lambda r: None), Route("/b", lambda r: None)
    policy = AccessPolicy(Tokens(FULL, READER), [public])
    assert policy.required(confidential, "GET") == READ
    assert policy.required(confidential, "HEAD") == READ
    assert policy.required(confidential, "POST") == WRITE
    assert policy.required(public, "GET") == PUBLIC
    assert policy.required(public, "DELETE") == WRITE  # public never means "anyone may change it"
    guarded = AccessPolicy(Tokens(FULL, protect_health=True), [public])
    assert guarded.required(public, "GET") == READ
    assert AccessPolicy(Tokens(), [public]).required(confidential, "POST") == PUBLIC  # no token: open
    assert policy.check(f"Bearer {FULL}", WRITE) is None
    assert policy.check(f"bearer {READER}", READ) is None
    assert policy.check(f"Bearer {READER}", WRITE)[0] == 403
    assert policy.check("Bearer nope", READ)[0] == 401
    assert policy.check(None, READ)[0] == 401
    assert policy.check(f"Basic {FULL}", READ)[0] == 401
    assert bearer_token("Bearer   x  ") == "x" and bearer_token("Bearer") is None


# -- the middleware ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method, path, token, status",
    [
        ("GET", "/accounts", None, 401),
        ("GET", "/accounts", "wrong", 401),
        ("GET", "/accounts", READER, 200),
        ("GET", "/accounts", FULL, 200),
        ("HEAD", "/accounts", None, 401),
        ("POST", "/accounts", None, 401),
        ("POST", "/accounts", READER, 403),
        ("POST", "/accounts", FULL, 201),
        ("GET", "/counters", None, 200),
        ("POST", "/counters/reset", None, 401),
        ("POST", "/counters/reset", READER, 403),
        ("POST", "/counters/reset", FULL, 200),
        ("GET", "/health", None, 503),  # open (not started: unhealthy, but answered)
        ("GET", "/metrics", None, 200),
        ("GET", "/openapi.json", None, 200),
        ("GET", "/nowhere", None, 404),  # reaches no route: nothing to protect
        ("DELETE", "/accounts", None, 405),
    ],
)
async def test_tokens_guard_confidential_reads_and_every_change(method, path, token, status):
    web = build_web_app(make_app(), auth_token=FULL, read_token=READER)
    async with client(web, token) as http:
        response = await http.request(method, path)
    assert response.status_code == status, response.text
    if status in (401, 403) and method != "HEAD":
        body = response.json()
        assert body["error"] == ("unauthorized" if status == 401 else "forbidden")
        assert body["detail"]
    if status == 401:
        assert response.headers["www-authenticate"].startswith("Bearer")


async def test_without_a_token_everything_is_open():
    async with client(build_web_app(make_app())) as http:
        assert (await http.get("/accounts")).status_code == 200
        assert (await http.post("/accounts")).status_code == 201


async def test_protect_health_closes_the_open_routes_too():
    app = make_app()
    web = build_web_app(app, auth_token=FULL, read_token=READER, protect_health=True)
    async with client(web) as anonymous, client(web, READER) as reader:
        for path in ("/health", "/metrics", "/openapi.json", "/counters"):
            assert (await anonymous.get(path)).status_code == 401, path
        assert (await reader.get("/metrics")).status_code == 200
        assert (await reader.get("/counters")).status_code == 200
    metrics = build_metrics_app(app, auth_token=FULL, protect_health=True)
    async with client(metrics) as anonymous, client(metrics, FULL) as full:
        assert (await anonymous.get("/metrics")).status_code == 401
        assert (await full.get("/metrics")).status_code == 200
    async with client(build_metrics_app(app, auth_token=FULL)) as anonymous:
        assert (await anonymous.get("/metrics")).status_code == 200  # open unless protect_health


async def test_405_names_every_method_of_the_path():
    async with client(build_web_app(make_app())) as http:
        response = await http.put("/accounts")
    assert response.status_code == 405
    assert response.headers["allow"] == "GET, HEAD, POST"
    assert response.json() == {"error": "method not allowed", "detail": "Method Not Allowed"}


# -- every service, every operation --------------------------------------------------------


@pytest.fixture(scope="module")
def services(tmp_path_factory) -> Iterator[dict[str, App]]:
    env = {
        "POSTTRADE__DATABASES__CLICKHOUSE__DSN": "chdb://memory",
        "POSTTRADE__STORAGE__LOCAL_DIR": str(tmp_path_factory.mktemp("objects")),
        "POSTTRADE_FEAST_PIPELINE__FEAST__DATA_DIR": str(tmp_path_factory.mktemp("feast")),
    }
    apps = {}
    for name in SERVICES:
        module = service_module(name)
        apps[name] = module.build(load_config(name, module.CONFIG, env=env)).app
    yield apps
    for app in apps.values():
        for hook in app.on_shutdown:
            try:
                asyncio.run(hook())
            except Exception:  # noqa: BLE001 - a hook written for a started app may not apply
                pass


# What may stay open on each service: the runtime's own routes and counters without account data.
OPEN = {("GET", "/health"), ("GET", "/metrics"), ("GET", "/openapi.json")}
OPEN_PAGES = {
    "ptrc": {("GET", "/stats")},
    "pnl": set(),
    "hot_cache": {("GET", "/cache/stats")},
    "questdb_writer": {("GET", "/stats")},
    "feast_pipeline": {("GET", "/features/status")},
    "execution_quality": set(),
}


@pytest.mark.parametrize("name", SERVICES)
async def test_every_account_data_and_changing_endpoint_of_every_service_needs_the_token(services, name):
    """The token is checked before a handler runs, so the services need not be started:
    every protected operation the document lists is called without a token (401) and,
    for changes, with the read-only token (403). What the tokens are let through to is
    tests/integration/test_auth.py's, against running services."""
    web = build_web_app(services[name], auth_token=FULL, read_token=READER)
    async with client(web, FULL) as full, client(web) as anonymous, client(web, READER) as reader:
        document = (await full.get("/openapi.json")).json()
        for path, item in document["paths"].items():
            url = re.sub(r"{[^}]+}", "X1", path)
            for method, operation in item.items():
                key = (method.upper(), path)
                protected = "security" in operation
                assert protected == (key not in OPEN | OPEN_PAGES[name]), key
                if not protected:
                    continue
                assert "401" in operation["responses"], key
                assert (await anonymous.request(method, url)).status_code == 401, key
                if method != "get":
                    assert "403" in operation["responses"], key
                    refused = await reader.request(method, url, json={})
                    assert refused.status_code == 403 and refused.json()["error"] == "forbidden", key


# -- configuration -----------------------------------------------------------------------------


def test_tokens_and_host_in_the_config():
    config = load_config("questdb_writer", service_module("questdb_writer").CONFIG, env={})
    assert config.service.host == "127.0.0.1"  # the file and the default: loopback
    assert config.service.auth_token is None and config.service.protect_health is False
    env = {"POSTTRADE__SERVICE__AUTH_TOKEN": "all", "POSTTRADE_PNL__SERVICE__READ_TOKEN": "pnl-reader"}
    pnl = load_config("pnl", service_module("pnl").CONFIG, env=env)
    assert (pnl.service.auth_token, pnl.service.read_token) == ("all", "pnl-reader")
    for bad, needle in [
        ({"POSTTRADE__SERVICE__READ_TOKEN": "r"}, "needs service.auth_token"),
        ({"POSTTRADE__SERVICE__AUTH_TOKEN": ""}, "is empty"),
        ({"POSTTRADE__SERVICE__AUTH_TOKEN": "t", "POSTTRADE__SERVICE__READ_TOKEN": "t"}, "must differ"),
    ]:
        with pytest.raises(ConfigError, match=needle):
            load_config("pnl", service_module("pnl").CONFIG, env=bad)


def test_every_config_file_binds_loopback_and_the_compose_file_opens_its_containers():
    for name in SERVICES:
        assert load_config(name, service_module(name).CONFIG, env={}).service.host == "127.0.0.1", name
    # In a container loopback is unreachable: the compose file (which mounts the same
    # files) sets the host through the environment; its ports stay published on 127.0.0.1.
    compose = yaml.safe_load((Path(__file__).parents[2] / "docker/docker-compose.yml").read_text())
    for name in SERVICES:
        assert compose["services"][name]["environment"]["POSTTRADE__SERVICE__HOST"] == "0.0.0.0", name


# -- parameters: parser == published schema ------------------------------------------------------


def test_the_date_pattern_is_the_calendar_from_1990_to_2199():
    pattern = re.compile(params.DATE_PATTERN)
    day = date(1990, 1, 1)
    while day <= date(2199, 12, 31):
        assert pattern.fullmatch(day.isoformat()), day
        day += timedelta(days=1)
    for text in ("1989-12-31", "2200-01-01", "2100-02-29", "2023-02-29", "2024-04-31", "2024-13-01", "2024-00-10",
                 "0347-09-13", "2024-1-01", " 2024-01-01", "2024-01-01\n"):
        assert not pattern.fullmatch(text), text
        with pytest.raises(params.BadRequest):
            params.parse_date("date", text)
    assert params.parse_date("date", "2000-02-29") == date(2000, 2, 29)


def test_the_bucket_pattern_is_at_most_366_days():
    pattern = re.compile(params.BUCKET_PATTERN)
    limits = {"s": 366 * 86_400, "m": 366 * 1440, "h": 366 * 24, "d": 366}
    # Every n up to past each limit (and n has 6 digits at most: the interval's own rule).
    ranges = {"s": [*range(1, 10_000), 999_999, 1_000_000], "m": [*range(1, 20_000), *range(500_000, 1_000_001)],
              "h": range(1, 100_000), "d": range(1, 10_000)}  # fmt: skip
    for unit, limit in limits.items():
        for n in ranges[unit]:
            assert bool(pattern.fullmatch(f"{n}{unit}")) == (n <= min(limit, 999_999)), f"{n}{unit}"
    assert not pattern.fullmatch("0s") and not pattern.fullmatch("01s") and not pattern.fullmatch("1w")


def test_time_parameters():
    parse = params.parse_time
    assert parse("from", "2024-01-02T14:30:00Z") == 1_704_205_800_000_000_000
    assert parse("from", "2024-01-02T15:30:00+01:00") == 1_704_205_800_000_000_000
    assert parse("from", "2024-01-02 14:30") == 1_704_205_800_000_000_000
    assert parse("from", "2024-01-02") == 1_704_153_600_000_000_000
    assert parse("from", "2024-01-02T14:30:00.000000007Z") == 1_704_205_800_000_000_007
    assert parse("from", "1704205800000000123") == 1_704_205_800_000_000_123
    for bad in ("1700000000", "-1", "", "yesterday", "1989-12-31T00:00:00Z", "2024-01-02T24:00:00Z",
                "2024-01-02T14:30:00.0000000001Z", "2024-02-30T00:00:00Z", "2024-01-02T14:30:00+0100"):
        with pytest.raises(params.BadRequest):
            parse("from", bad)
    with pytest.raises(params.BadRequest):
        parse("from_time", "1704205800000000123", epoch_ns=False)


def test_names_integers_and_object_names():
    check = params.check_name
    assert check("account", "ACC 1/é") == "ACC 1/é"
    for bad in ("", " A", "A ", "A\nB", "A\x00", "A" * 129):
        with pytest.raises(params.BadRequest):
            check("account", bad)
    assert check("order_id", "O" * 256, max_length=params.ID_MAX)
    assert params.parse_int("limit", "10", minimum=1, maximum=10) == 10
    for bad in ("", " 1", "1_0", "١", "1.0", "11", "0"):
        with pytest.raises(params.BadRequest):
            params.parse_int("limit", bad, minimum=1, maximum=10)
    name = re.compile(params.OBJECT_NAME_PATTERN)
    assert name.fullmatch("2026-01-02/positions.csv")
    for bad in ("/a", "a//b", ".a", "a/..", "a\\b", "a\tb", "", "a\n"):
        assert not name.fullmatch(bad), bad


async def test_published_patterns_are_the_parsers(services):
    """Where a page keeps its own rule, the document says exactly it."""
    from posttrade.web import execution_quality as eq

    web = build_web_app(services["execution_quality"])
    async with client(web) as http:
        document = (await http.get("/openapi.json")).json()
    group_by = next(p for p in document["paths"]["/analytics/summary"]["get"]["parameters"] if p["name"] == "group_by")
    assert group_by["schema"]["pattern"] == eq.GROUP_BY_PATTERN
    assert document["components"]["schemas"]["Time"]["anyOf"][1]["pattern"] == params.TIME_PATTERN


# -- store failures are 503/502 JSON, never a 500 ------------------------------------------------


async def test_a_store_failing_a_request_is_a_json_503_or_502():
    import redis.exceptions

    from posttrade.stores.questdb import QuestDBError, QuestDBUnavailableError

    app = App("svc", MemoryTransport())
    failures = {
        "/questdb-down": QuestDBUnavailableError("connection refused"),
        "/questdb-refused": QuestDBError("unexpected token", status=400),
        "/valkey-down": redis.exceptions.ConnectionError("Error 111 connecting"),
        "/timeout": TimeoutError("timed out"),
    }
    for path, exc in failures.items():

        async def fail(request, exc=exc):
            raise exc

        app.page(path)(fail)

    async with client(build_web_app(app)) as http:
        answers = {path: await http.get(path) for path in failures}
    assert {p: a.status_code for p, a in answers.items()} == {
        "/questdb-down": 503, "/questdb-refused": 502, "/valkey-down": 503, "/timeout": 503,
    }
    assert answers["/questdb-down"].json() == {
        "error": "store unavailable", "detail": {"store": "questdb", "reason": "connection refused"},
    }
    assert answers["/valkey-down"].json()["detail"]["store"] == "valkey"


# -- the API edges the fuzzer found, refused before any store sees them -----------------------


@pytest.mark.parametrize(
    "name, method, url, body, parameter",
    [
        ("ptrc", "POST", "/reconciliation?from_seq=-4146", None, "from_seq"),  # was a 202
        ("ptrc", "POST", "/reconciliation?from_seq=7", {"from_seq": 9}, "from_seq"),  # once, not twice
        ("ptrc", "POST", "/reconciliation?tolerance_qty=1e3", None, "tolerance_qty"),
        ("ptrc", "POST", "/reconciliation", {"from_time": "0347-09-13T00:00:00Z"}, "from_time"),
        ("ptrc", "GET", "/compliance/alerts?limit=", None, "limit"),  # was a 200
        ("ptrc", "GET", "/compliance/alerts?offset=99999999999999999999", None, "offset"),  # was ClickHouse's error
        ("ptrc", "GET", "/reports?date=garbage", None, "date"),  # was a 200
        ("ptrc", "GET", "/reports?date=", None, "date"),
        ("ptrc", "POST", "/reports", {"date": "0347-09-13"}, "date"),  # was a 500 with QuestDB's error
        ("ptrc", "GET", "/positions?account=", None, "account"),
        ("ptrc", "GET", "/positions?symbol=A%0A", None, "symbol"),
        ("ptrc", "GET", "/reports/2026-01-01/%01x.csv", None, "name"),
        ("pnl", "GET", "/pnl/history?from=0347-09-13", None, "from"),
        ("pnl", "GET", "/pnl/history?interval=1m%0A", None, "interval"),
        ("pnl", "GET", "/pnl/realtime?account=%20A", None, "account"),
        ("hot_cache", "GET", "/bars/X?limit=", None, "limit"),
        ("execution_quality", "GET", "/analytics/summary?bucket=367d", None, "bucket"),
        ("execution_quality", "GET", "/analytics/summary?group_by=side,%20account", None, "group_by"),
        ("execution_quality", "GET", "/metrics/execution?to=2024-02-30", None, "to"),
        ("feast_pipeline", "GET", "/features/online?symbol=X&features=nope", None, "features"),
    ],
)
async def test_invalid_parameters_are_a_json_400_naming_them(services, name, method, url, body, parameter):
    async with client(build_web_app(services[name])) as http:
        response = await http.request(method, url, json=body)
    assert response.status_code == 400, response.text
    detail = response.json()["detail"]
    assert parameter in (detail.get("parameter"), detail.get("field")), detail
