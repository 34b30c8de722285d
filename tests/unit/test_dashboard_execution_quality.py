"""What execution_quality's page reads beyond the documented summary: the slippage
histogram (/dashboard/slippage_histogram: round bins over p1..p99, exact integer binning
in ClickHouse, the same from the rollup and from the fills table) and the worst-first
order of /metrics/execution (`sort=worst`). The ClickHouse tests run on chdb, each in a
database of its own, over the worked example traded in two currencies (slippage 5 and
10 bps, twice)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from decimal import Decimal as D

import httpx
import pytest

from posttrade.config import load_config
from posttrade.core.exact import format_decimal
from posttrade.services import execution_quality as eq
from posttrade.stores import clickhouse as clickhouse_store
from posttrade.stores.clickhouse import ClickHouseStore, open_clickhouse
from posttrade.stores.clickhouse.execution import ExecutionStore
from posttrade.stores.clickhouse.execution_queries import ExecutionQueries, Filters, bin_sql, histogram_bins
from posttrade.web.execution_quality import parse_by
from posttrade.web.params import BadRequest
from posttrade.web.server import build_web_app
from tests.unit.test_execution_currency import REFERENCE, two_currencies, write
from tests.unit.test_execution_tracker import NS, T0


@pytest.mark.parametrize(
    "low, high, bins, expected",
    [
        ("5", "10", 30, ("0.2", 25, 50)),  # span 5 / 30 = 0.1667 -> 0.2
        ("5", "10", 5, ("1", 5, 10)),
        ("-4.15800416", "3.3228111", 30, ("0.5", -9, 6)),  # a value on no edge: the bin below it
        ("-0.00000001", "-0.00000001", 30, ("1", -1, -1)),  # one value: a bin of 1 bps
        ("0", "0", 30, ("1", 0, 0)),
        ("-120", "880", 10, ("100", -2, 8)),  # an edge is its own bin's start
        ("0.00000001", "0.00000004", 200, ("0.00000001", 1, 4)),  # never finer than the stored scale
    ],
)
def test_bins_are_round_and_cover_the_range(low, high, bins, expected):
    width, first, last = histogram_bins(D(low), D(high), bins)
    assert (format_decimal(width), first, last) == expected
    assert first * width <= D(low) < (first + 1) * width and first <= last
    assert last * width <= D(high) < (last + 1) * width
    assert last - first + 1 <= bins + 2


def test_by_takes_breakdowns_each_once():
    assert parse_by(None) == ("venue",)
    assert parse_by("venue,side,account") == ("venue", "side", "account")
    for bad in ("", "desk", "venue,venue", "venue, side"):
        with pytest.raises(BadRequest):
            parse_by(bad)


@pytest.fixture
async def client():
    app = eq.build(load_config("execution_quality", eq.CONFIG, env={})).app
    transport = httpx.ASGITransport(app=build_web_app(app))
    async with httpx.AsyncClient(transport=transport, base_url="http://eq") as c:
        yield c


@pytest.mark.parametrize(
    "url, parameter",
    [
        ("/dashboard/slippage_histogram?by=desk", "by"),
        ("/dashboard/slippage_histogram?bins=4", "bins"),
        ("/dashboard/slippage_histogram?bins=201", "bins"),
        ("/dashboard/slippage_histogram?venue=%20XNAS", "venue"),
        ("/dashboard/slippage_histogram?side=HOLD", "side"),
        ("/dashboard/slippage_histogram?order_id=O1", "order_id"),
        ("/metrics/execution?sort=best", "sort"),
    ],
)
async def test_bad_requests_answer_400_naming_the_parameter(client, url, parameter):
    response = await client.get(url)
    assert response.status_code == 400, response.text
    assert response.json()["detail"]["parameter"] == parameter


async def test_the_histogram_is_for_the_page_only(client):
    paths = (await client.get("/openapi.json")).json()["paths"]
    assert "/dashboard/slippage_histogram" not in paths
    sort = next(p for p in paths["/metrics/execution"]["get"]["parameters"] if p["name"] == "sort")
    assert sort["schema"]["enum"] == ["newest", "worst"]
    assert (await client.get("/dashboard/slippage_histogram?by=venue,side")).status_code == 503  # no ClickHouse


# -- ClickHouse -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def store() -> Iterator[ClickHouseStore]:
    """chdb allows one engine per process: share the one already open, if any."""
    opened = next(iter(clickhouse_store._EMBEDDED), None)
    store = open_clickhouse(f"chdb://{opened}" if opened not in (None, ":memory:") else "chdb://memory")
    yield store
    store.close_sync()


@pytest.fixture
async def queries(store) -> Iterator[ExecutionQueries]:
    database = f"eqd_{uuid.uuid4().hex[:8]}"
    tables = ExecutionStore(store, database, REFERENCE)
    await tables.create_schema()
    await write(tables, two_currencies())
    yield ExecutionQueries(database, lambda: store)
    await store.command(f"DROP DATABASE IF EXISTS {database}")


async def test_bins_in_clickhouse_floor_exactly(store):
    # Values on an edge start their bin; a value a hair below zero is in the bin below.
    values = ["-0.00000001", "0", "0.49999999", "0.5", "-0.5", "-0.50000001", "-1", "12.34567891"]
    width = 50_000_000  # 0.5 bps in 10^-8 bps
    sql = (f"SELECT {bin_sql('v', width)} FROM (SELECT arrayJoin([{', '.join(f'toDecimal128({v!r}, 8)' for v in values)}]) AS v)")
    result = await store.query(sql, {})
    assert [row[0] for row in result.rows] == [-1, 0, 0, 1, -1, -2, -2, 24]


async def test_histogram_of_the_worked_example(queries):
    answer = await queries.slippage_histogram(Filters(), ("venue", "symbol", "side"), 5, 50)
    assert answer["count"] == 4
    assert answer["quantiles"] == {"p1": "5", "median": "10", "p99": "10"}  # exact: index floor(q * n)
    assert answer["bin_bps"] == "1" and answer["edges"] == ["5", "6", "7", "8", "9", "10", "11"]
    assert answer["by"]["venue"] == [{"key": "XNAS", "count": 4, "counts": [2, 0, 0, 0, 0, 2], "below": 0, "above": 0}]
    assert [(g["key"], g["count"], g["counts"]) for g in answer["by"]["symbol"]] == [
        ("AAPL", 2, [1, 0, 0, 0, 0, 1]), ("USDJPY", 2, [1, 0, 0, 0, 0, 1])]
    assert [g["key"] for g in answer["by"]["side"]] == ["BUY"]

    # From the fills table (a bound inside a minute) the same; a filter that matches
    # nothing has no bins; `limit` keeps the largest groups.
    inside = Filters(from_ns=T0 - 30 * NS + 1)
    assert await queries.slippage_histogram(inside, ("venue", "symbol", "side"), 5, 50) == answer
    none = await queries.slippage_histogram(Filters(account="nobody"), ("venue",), 30, 50)
    assert none == {"count": 0, "bin_bps": None, "edges": [], "quantiles": None, "by": {"venue": []}}
    assert len((await queries.slippage_histogram(Filters(), ("symbol",), 30, 1))["by"]["symbol"]) == 1

    # Finer bins: 0.2 bps over 5..10, the 10s in the last bin.
    fine = await queries.slippage_histogram(Filters(), ("venue",), 30, 50)
    counts = fine["by"]["venue"][0]["counts"]
    assert fine["bin_bps"] == "0.2" and len(counts) == 26 and (counts[0], counts[-1], sum(counts)) == (2, 2, 4)


async def test_worst_orders_and_fills_come_first(queries):
    _, orders = await queries.rows("order", Filters(), 10, 0, worst=True)
    assert [(r["order_id"], r["implementation_shortfall_bps"]) for r in orders] == [("AO1", "7.8"), ("JO1", "7.5")]
    _, fills = await queries.rows("fill", Filters(), 10, 0, worst=True)
    assert [r["slippage_bps"] for r in fills] == ["10", "10", "5", "5"]
    _, newest = await queries.rows("fill", Filters(), 10, 0)
    assert [r["slippage_bps"] for r in newest] == ["10", "10", "5", "5"]  # F2s are the later fills too
