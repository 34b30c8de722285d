"""/openapi.json: every service describes every route it serves, as valid OpenAPI 3.1.

The six services are built from the registry (`posttrade.services`) with their real
config files; nothing is started, so no server is needed: building declares the pages.
ptrc opens its ClickHouse store while it is built, so it gets the in-memory chdb engine.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest
from openapi_spec_validator import validate

from posttrade.app import App
from posttrade.config import SERVICES, load_config
from posttrade.services import service_module
from posttrade.web.openapi import OPENAPI_PATH, RouteDocError, openapi_document, openapi_path
from posttrade.web.server import JSON, build_web_app
from starlette.routing import Route

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


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
    asyncio.run(close_clients(apps.values()))


async def close_clients(apps) -> None:
    """What building opened (ptrc's chdb engine above all) is closed by the shutdown hooks."""
    for app in apps:
        for hook in app.on_shutdown:
            try:
                await hook()
            except Exception:  # noqa: BLE001 - a hook written for a started app may not apply
                pass


async def fetch_document(app: App, auth_token: str | None = None, **tokens) -> dict:
    web = build_web_app(app, auth_token=auth_token, **tokens)
    headers = {"Authorization": f"Bearer {auth_token}"} if auth_token else {}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=web), base_url="http://svc", headers=headers) as http:
        response = await http.get(OPENAPI_PATH)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    return response.json()


def operations(document: dict) -> set[tuple[str, str]]:
    return {(path, method.upper()) for path, item in document["paths"].items() for method in item}


def registered_routes(app: App) -> set[tuple[str, str]]:
    routes = {("/health", "GET"), ("/metrics", "GET"), (OPENAPI_PATH, "GET")}
    # Every page but the dashboard's own (its HTML, scripts, live streams), which are for the browser.
    routes |= {(openapi_path(page.path), method) for page in app.pages if page.documented for method in page.methods}
    return routes


@pytest.mark.parametrize("name", SERVICES)
async def test_each_service_documents_every_route_it_serves(services, name):
    app = services[name]
    document = await fetch_document(app)
    validate(document)  # raises on anything that is not OpenAPI 3.1
    assert document["openapi"] == "3.1.0"
    assert document["info"]["title"] == f"posttrade {name}"
    assert operations(document) == registered_routes(app)
    for path, item in document["paths"].items():
        for method, operation in item.items():
            assert operation["summary"], (path, method)
            assert "500" in operation["responses"]


@pytest.mark.parametrize("name", SERVICES)
async def test_each_service_documents_the_error_shape(services, name):
    document = await fetch_document(services[name])
    error = document["components"]["schemas"]["Error"]
    assert error["required"] == ["error"] and set(error["properties"]) == {"error", "detail"}
    for item in document["paths"].values():
        for operation in item.values():
            if operation.get("parameters") or operation.get("requestBody"):
                assert operation["responses"]["400"]["content"]["application/json"]["schema"] == {
                    "$ref": "#/components/schemas/Error"
                }


async def test_query_parameters_come_from_the_route_docstring(services):
    document = await fetch_document(services["ptrc"])
    positions = document["paths"]["/positions"]["get"]
    by_name = {p["name"]: p for p in positions["parameters"]}
    assert set(by_name) == {"account", "symbol", "method"}
    assert by_name["method"]["schema"] == {"enum": ["avg", "fifo", "both"], "default": "both"}
    assert all(p["in"] == "query" for p in by_name.values())
    alerts = {p["name"]: p for p in document["paths"]["/compliance/alerts"]["get"]["parameters"]}
    assert alerts["limit"]["schema"] == {"type": "integer", "minimum": 1, "maximum": 10000, "default": 100}


async def test_path_parameters_come_from_the_route(services):
    document = await fetch_document(services["hot_cache"])
    bars = document["paths"]["/bars/{symbol}"]["get"]
    symbol = next(p for p in bars["parameters"] if p["in"] == "path")
    assert symbol["name"] == "symbol" and symbol["required"] is True
    assert symbol["schema"] == {"$ref": "#/components/schemas/Name"}  # the shared rule of names
    assert document["components"]["schemas"]["Name"]["maxLength"] == 128
    limit = next(p for p in bars["parameters"] if p["name"] == "limit")
    assert limit["schema"]["maximum"] == 200  # hot_cache.bars_kept, as configured
    assert {"404", "502", "503"} <= set(bars["responses"])


async def test_protected_routes_say_they_need_the_token_when_one_is_set(services):
    app = services["ptrc"]
    open_document = await fetch_document(app)
    assert "securitySchemes" not in open_document["components"]
    for item in open_document["paths"].values():
        assert all("security" not in op and "401" not in op["responses"] for op in item.values())
    document = await fetch_document(app, auth_token="secret", read_token="reader")
    validate(document)
    assert document["components"]["securitySchemes"] == {"bearer": {"type": "http", "scheme": "bearer"}}
    # Open: the service's own routes and the pages registered public (counters only).
    public = {("/health", "get"), ("/metrics", "get"), (OPENAPI_PATH, "get"), ("/stats", "get")}
    for path, item in document["paths"].items():
        for method, operation in item.items():
            needs_token = (path, method) not in public
            assert ("security" in operation) == needs_token, (path, method)
            assert ("401" in operation["responses"]) == needs_token, (path, method)
            # The read-only token reads everything and changes nothing.
            assert ("403" in operation["responses"]) == (method != "get"), (path, method)
    assert document["paths"]["/reconciliation"]["post"]["responses"]["202"]["description"]
    assert "409" in document["paths"]["/reconciliation"]["post"]["responses"]
    health_guarded = await fetch_document(app, auth_token="secret", protect_health=True)
    assert all("security" in op for item in health_guarded["paths"].values() for op in item.values())


def route(path: str, handler, methods=("GET",)) -> Route:
    return Route(path, handler, methods=list(methods))


def test_a_route_without_a_docstring_gets_a_summary_from_its_name():
    async def list_open_orders(request):
        return JSON({})

    document = openapi_document("svc", [route("/orders/{order_id:int}", list_open_orders)], version="1")
    validate(document)
    operation = document["paths"]["/orders/{order_id}"]["get"]
    assert operation["summary"] == "List open orders"
    assert operation["operationId"] == "get_orders_order_id"
    assert operation["parameters"] == [{"name": "order_id", "in": "path", "schema": {"type": "integer"}, "required": True}]
    assert set(operation["responses"]) == {"200", "400", "500", "503"}


def test_a_docstring_that_does_not_parse_names_the_route():
    async def broken(request):
        """Broken.

        ---
        query: [account
        """

    with pytest.raises(RouteDocError, match="/broken"):
        openapi_document("svc", [route("/broken", broken)])

    async def unknown_key(request):
        """Unknown.

        ---
        params: {account: x}
        """

    with pytest.raises(RouteDocError, match="unknown docstring keys"):
        openapi_document("svc", [route("/unknown", unknown_key)])

    async def wrong_path_parameter(request):
        """Wrong.

        ---
        path: {name: not in the route}
        """

    with pytest.raises(RouteDocError, match="path parameters the route lacks"):
        openapi_document("svc", [route("/items/{item_id}", wrong_path_parameter)])


def test_a_declared_success_status_replaces_the_default_200():
    async def create(request):
        """Create one.

        ---
        body: {required: true, description: the item}
        responses:
          201: {description: created, schema: {type: object}}
          409: it exists already
        """

    document = openapi_document("svc", [route("/items", create, methods=("POST",))], auth=True)
    validate(document)
    operation = document["paths"]["/items"]["post"]
    assert set(operation["responses"]) == {"201", "400", "401", "409", "500", "503"}
    assert operation["requestBody"]["required"] is True
    assert operation["responses"]["409"]["content"]["application/json"]["schema"]["$ref"].endswith("/Error")
