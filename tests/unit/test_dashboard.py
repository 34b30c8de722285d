"""The dashboards' server side: the page shell and its files (web/dashboard), the live
streams and history rings the pages read (web/live.py)."""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import pytest

from posttrade.app import App
from posttrade.config import SERVICES, load_config
from posttrade.services import service_module
from posttrade.streams.memory import MemoryTransport
from posttrade.web.dashboard import STATIC, install_dashboard, navigation_links, service_kind
from posttrade.web.live import History, LiveLog, LiveTopic
from posttrade.web.server import JSON, build_web_app

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

TOKEN = "dashboard-token"


def config_of(service: str, env: dict[str, str] | None = None):
    return load_config(service, service_module(service).CONFIG, env=env or {})


def dashboard_app(service: str = "questdb_writer", env: dict[str, str] | None = None) -> tuple[App, object]:
    config = config_of(service, env)
    app = App(config.service.name, MemoryTransport())
    install_dashboard(app, config)

    @app.page("/accounts")
    async def accounts(request):
        return JSON({"accounts": ["A1"]})

    return app, config


def client(web, token: str | None = None) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=web), base_url="http://test", headers=headers)


def page_config(html: str) -> dict:
    found = re.search(r'<script type="application/json" id="pt-config">(.*?)</script>', html, re.S)
    assert found, html
    return json.loads(found.group(1))


# -- the page and its files ----------------------------------------------------------------


@pytest.mark.parametrize("service", SERVICES)
async def test_every_service_has_its_page_script_and_a_shell_naming_it(service):
    app, _ = dashboard_app(service)
    async with client(build_web_app(app)) as http:
        page = await http.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        config = page_config(page.text)
        assert config["service"] == service
        scripts = re.findall(r'<script src="(/static/[^"]+)"></script>', page.text)
        assert scripts[-1] == f"/static/pages/{service}.js"
        for src in scripts + re.findall(r'<link rel="stylesheet" href="(/static/[^"]+)">', page.text):
            answer = await http.get(src)
            assert answer.status_code == 200, src
            assert answer.content, src


async def test_the_page_is_named_for_its_kind_whatever_the_instance_is_called():
    app, config = dashboard_app("pnl", {"POSTTRADE_PNL__SERVICE__NAME": "pnl_desk_2"})
    assert service_kind(config) == "pnl"
    async with client(build_web_app(app)) as http:
        config_json = page_config((await http.get("/")).text)
    assert (config_json["service"], config_json["instance"]) == ("pnl", "pnl_desk_2")


def test_the_navigation_links_every_service_at_its_configured_port_unless_told_where():
    config = config_of("ptrc", {"POSTTRADE__DASHBOARD__LINKS__PNL": "http://desk:18100"})
    links = navigation_links(config)
    assert set(links) == set(SERVICES)
    assert links["ptrc"] == "/"
    assert links["pnl"] == "http://desk:18100"
    assert links["hot_cache"] == f":{config_of('hot_cache').service.port}"


async def test_static_files_stay_inside_the_folder_and_vendored_ones_are_cached_for_good():
    app, _ = dashboard_app()
    async with client(build_web_app(app)) as http:
        for path in ("/static/../__init__.py", "/static/%2e%2e/__init__.py", "/static/page.html", "/static/nope.js"):
            answer = await http.get(path)
            assert answer.status_code == 404, path
            assert answer.json()["error"] == "not found"
        vendored = await http.get("/static/vendor/uplot-1.6.32/uPlot.iife.min.js")
        assert "immutable" in vendored.headers["cache-control"]
        assert (await http.get("/static/posttrade.js")).headers["cache-control"] == "no-cache"


def test_every_vendored_library_ships_its_licence():
    for folder in (STATIC / "vendor").iterdir():
        assert (folder / "LICENSE").is_file(), folder


async def test_with_a_token_the_shell_is_open_and_says_so_but_the_data_is_not():
    env = {"POSTTRADE_QUESTDB_WRITER__SERVICE__AUTH_TOKEN": TOKEN}
    app, config = dashboard_app(env=env)
    web = build_web_app(app, auth_token=config.service.auth_token)
    async with client(web) as http:
        page = await http.get("/")
        assert page.status_code == 200 and page_config(page.text)["auth"] is True
        assert (await http.get("/static/posttrade.js")).status_code == 200
        assert (await http.get("/accounts")).status_code == 401


async def test_pages_and_live_routes_stay_out_of_the_openapi_document():
    app, _ = dashboard_app()
    LiveTopic("rows", lookup=lambda key: None, snapshot=list).serve(app, "/live/rows")
    History(dict).serve(app, "/dashboard/history", public=True)
    async with client(build_web_app(app)) as http:
        paths = (await http.get("/openapi.json")).json()["paths"]
        assert "/accounts" in paths
        assert not [p for p in paths if p == "/" or p.startswith(("/static", "/live", "/dashboard"))]


# -- live streams ---------------------------------------------------------------------------


class _Request:
    """What a stream asks of its request: whether the page went away."""

    def __init__(self) -> None:
        self.gone = False

    async def is_disconnected(self) -> bool:
        return self.gone


async def _next_line(lines) -> dict:
    return json.loads(await asyncio.wait_for(anext(lines), 5))


async def test_a_topic_costs_nothing_while_no_page_follows_it():
    topic = LiveTopic("positions", lookup=lambda key: {"key": key}, snapshot=list)
    for n in range(1000):
        topic.mark(("A", f"S{n}"))
    assert not topic.followed


async def test_a_page_gets_the_state_then_one_current_value_per_changed_key_per_interval():
    state = {("A", "X"): 1, ("A", "Y"): 2}
    topic = LiveTopic(
        "positions",
        lookup=lambda key: None if key not in state else {"account": key[0], "symbol": key[1], "qty": state[key]},
        snapshot=lambda: [{"account": a, "symbol": s, "qty": q} for (a, s), q in state.items()],
        interval_s=0.05,
    )
    lines = topic._lines(_Request())
    first = await _next_line(lines)
    assert first["topic"] == "positions" and len(first["items"]) == 2
    for qty in range(10, 20):  # ten fills on one key within the interval: one row, the last value
        state[("A", "X")] = qty
        topic.mark(("A", "X"))
    del state[("A", "Y")]
    topic.mark(("A", "Y"))
    batch = await _next_line(lines)
    assert batch["items"] == [{"account": "A", "symbol": "X", "qty": 19}]
    assert batch["gone"] == [["A", "Y"]]
    await lines.aclose()
    assert not topic.followed


async def test_a_log_replays_the_recent_events_and_says_how_many_a_slow_page_missed():
    log = LiveLog("alerts", keep=3, interval_s=0.05)
    for n in range(5):
        log.append({"n": n})
    lines = log._lines(_Request())
    assert [e["n"] for e in (await _next_line(lines))["items"]] == [2, 3, 4]
    for n in range(5, 10):
        log.append({"n": n})
    batch = await _next_line(lines)
    assert [e["n"] for e in batch["items"]] == [7, 8, 9] and batch["missed"] == 2
    await lines.aclose()


async def test_a_page_that_went_away_ends_its_stream():
    topic = LiveTopic("positions", lookup=lambda key: {"k": key}, snapshot=list, interval_s=0.01)
    request = _Request()
    lines = topic._lines(request)
    await _next_line(lines)
    request.gone = True
    topic.mark("k")
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(anext(lines), 5)
    assert not topic.followed


# -- history rings --------------------------------------------------------------------------


async def test_a_history_keeps_its_last_samples_as_columns_with_gaps():
    values = iter([{"a": 1.0}, {"a": 2.0, "b": 5.0}, {"b": 6.0}, {"a": 4.0}])

    async def sample():
        return next(values)

    history = History(sample, every_s=1.0, keep=3)
    for _ in range(4):
        await history.take()
    columns = history.columns()
    assert len(columns["t"]) == 3 and columns["every_s"] == 1.0
    assert columns["series"] == {"a": [2.0, None, 4.0], "b": [5.0, 6.0, None]}
