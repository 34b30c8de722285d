"""execution_quality on the real NATS server of the local stack and embedded ClickHouse.

The worked example of docs/execution_quality.md goes through NATS, the four agents and
ClickHouse, and comes back out of `/metrics/execution` and `/analytics/summary` with the
numbers the document prints; so does the example with a resend, corrections, a bust
that comes before its execution and an opening, and, once the example has left the
service's state, a later resend and amendments change nothing. Then: a restart after a
crash that left ClickHouse ahead of the changelog never shows a settled row unsettled
(the rows are polled all through it), a replay through a fresh service leaves one row
per fill and order, the summary's two sources (per-minute rollup, fills table) agree
with a Python reference (busted and corrected fills included), an older table layout is
migrated, and `posttrade worker execution_quality` serves it all as a process.

Every test uses its own `service.namespace` (streams `<NS>_FILLS`, ... on
`<ns>.trading.fills.>`, ..., consumers and changelog buckets `<ns>-<service>-...`),
service name and ClickHouse database, and removes its streams and buckets at the end:
the NATS server is shared.
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
from collections.abc import Iterator
from pathlib import Path

from decimal import Decimal as D

import httpx
import nats
import pytest

from posttrade.config import load_config
from posttrade.services import execution_quality as eq
from posttrade.stores import clickhouse as clickhouse_store
from posttrade.stores.clickhouse import open_clickhouse
from posttrade.stores.clickhouse.execution import SETTLED
from posttrade.stores.clickhouse.execution_queries import ExecutionQueries, Filters, whole_minutes
from posttrade.streams.events import Fill, Quote, encode
from posttrade.web.server import build_web_app
from tests.unit.test_execution_tracker import T0, amended_events, example_events, msgspec_replace

ROOT = Path(__file__).resolve().parents[2]
NS = 1_000_000_000
SUBJECTS = {"quotes": "md.quotes.XYZ", "trades": "md.trades.XYZ", "orders": "trading.orders.ACC1.XYZ",
            "fills": "trading.fills.ACC1.XYZ"}
BUCKETS = ("fills", "orders", "quote_book", "tape", "amendments")  # the service's changelog tables


@pytest.fixture(scope="module")
def chdb_location(tmp_path_factory) -> Iterator[str]:
    """The process's chdb engine path. chdb allows one per process: when another test
    module already holds an engine open (a session fixture), share it — every name here
    is qualified by a database of our own."""
    # posttrade.stores.clickhouse keeps the open path in its registry; nothing public says it.
    opened = next(iter(clickhouse_store._EMBEDDED), None)
    if opened is not None and opened != ":memory:":
        store = open_clickhouse(f"chdb://{opened}")
    else:
        store = open_clickhouse(f"chdb://{tmp_path_factory.mktemp('eq') / 'engine'}")
    yield store.location
    store.close_sync()


class Names:
    def __init__(self) -> None:
        suffix = uuid.uuid4().hex[:8]
        self.namespace = f"eqt{suffix}"
        self.service = f"eqt{suffix}"
        self.database = f"eqt_{suffix}"

    def env(self, nats_url: str, dsn: str, **extra: str) -> dict[str, str]:
        p = "POSTTRADE_EXECUTION_QUALITY__"
        return {
            "POSTTRADE__NATS__URL": nats_url,
            "POSTTRADE__DATABASES__CLICKHOUSE__DSN": dsn,
            f"{p}SERVICE__NAME": self.service,
            f"{p}DATABASES__CLICKHOUSE__DATABASE": self.database,
            f"{p}SERVICE__NAMESPACE": self.namespace,
            f"{p}BATCH__INTERVAL_SEC": "0.1",
            f"{p}EXECUTION__OPEN_ORDER_MARK_INTERVAL_S": "0.5",
            **extra,
        }

    def subject(self, stream: str) -> str:
        return f"{self.namespace}.{SUBJECTS[stream]}"

    def bucket(self, service: str, table: str) -> str:
        """A changelog table's bucket: the App prefixes it with the namespace."""
        return f"{self.namespace}-{service}-{table}"

    def durable(self, service: str, agent: str) -> str:
        return f"{self.namespace}-{service}-{agent}"


async def publish(nats_url: str, names: Names, events: dict[str, list], streams=("fills", "orders", "trades", "quotes")):
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    try:
        for stream in streams:
            for event in events[stream]:
                await js.publish(names.subject(stream), encode(event))
    finally:
        await nc.close()


async def cleanup(nats_url: str, names: Names, services: list[str]) -> None:
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    try:
        for stream in ("ORDERS", "FILLS", "QUOTES", "TRADES", "DLQ"):
            try:
                await js.delete_stream(f"{names.namespace.upper()}_{stream}")
            except nats.js.errors.NotFoundError:
                pass
        for service in services:
            for table in BUCKETS:
                try:
                    await js.delete_key_value(names.bucket(service, table))
                except nats.js.errors.NotFoundError:
                    pass
    finally:
        await nc.close()


async def eventually(fetch, predicate, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = await fetch()
        if predicate(last):
            return last
        await asyncio.sleep(0.1)
    raise AssertionError(f"condition not reached; last: {last}")


async def connected(service: eq.ExecutionQualityService) -> None:
    """ClickHouse opens in the background at start; queries answer 503 until then."""
    await eventually(lambda: asyncio.sleep(0, service.store), lambda store: store is not None)


def web_client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=build_web_app(app)), base_url="http://eq")


async def get_json(client: httpx.AsyncClient, url: str, status: int = 200) -> dict:
    response = await client.get(url)
    assert response.status_code == status, response.text
    return response.json()


def order_final(body: dict) -> bool:
    # Orders and fills are consumed by separate agents: the cancel can be applied
    # before the order's fills are, so "final" alone is not yet the settled row.
    return body["total"] == 1 and body["rows"][0]["is_final"] and body["rows"][0]["fills"] == 2


def fills_complete(body: dict) -> bool:
    return body["total"] == 2 and all(r["complete"] for r in body["rows"])


EXPECTED_FILL_ROWS = {
    "F1": {"ts": T0 + 500_000_000, "qty": "600", "price": "100.05", "fee": "3", "notional": "60030", "venue": "XNAS",
           "currency": "USD", "fee_currency": "USD",
           "liquidity": "TAKER", "arrival_ts": T0, "arrival_mid": "100", "slippage_bps": "5", "slippage_cost": "30",
           "mid_at_fill": "100.02", "effective_spread_bps": "5.99880024", "mid_1s": "100.04", "mid_5s": "100.08",
           "mid_60s": "100.12", "markout_1s_bps": "-0.99950025", "markout_5s_bps": "2.99850075",
           "markout_60s_bps": "6.99650175", "complete": True, "amendments": 0},
    "F2": {"ts": T0 + 2_500_000_000, "slippage_bps": "10", "slippage_cost": "20", "mid_at_fill": "100.06",
           "effective_spread_bps": "7.99520288", "markout_1s_bps": "-3.996004", "markout_5s_bps": "-1.998002",
           "markout_60s_bps": "-7.99200799", "complete": True, "amendments": 0},
}
EXPECTED_ORDER_ROW = {
    "order_id": "O1", "account": "ACC1", "symbol": "XYZ", "currency": "USD", "venue": "XNAS", "side": "BUY",
    "order_type": "LIMIT", "limit_price": "100.1", "status": "CANCELED", "qty": "1000", "arrival_ts": T0,
    "end_ts": T0 + 30_000_000_000, "arrival_mid": "100", "fills": 2, "filled_qty": "800", "unfilled_qty": "200",
    "fill_ratio": "0.8", "filled_notional": "80050", "fees": "4", "fees_other": {}, "avg_fill_price": "100.0625",
    "first_fill_ts": T0 + 500_000_000,
    "last_fill_ts": T0 + 2_500_000_000, "time_to_first_fill_ns": 500_000_000, "time_to_last_fill_ns": 2_500_000_000,
    "market_vwap": "100.077", "market_volume": "2000", "vwap_slippage_bps": "-1.44888436",
    "unfilled_price": "100.12", "unfilled_price_ts": T0 + 30_000_000_000, "benchmark_notional": "100000",
    "execution_cost": "50", "opportunity_cost": "24", "implementation_shortfall": "78",
    "implementation_shortfall_bps": "7.8", "is_final": True, "amendments": 0,
}


def assert_example_rows(fills: dict, orders: dict) -> None:
    by_id = {r["fill_id"]: r for r in fills["rows"]}
    for fill_id, expected in EXPECTED_FILL_ROWS.items():
        assert {k: by_id[fill_id][k] for k in expected} == expected, fill_id
    assert orders["rows"][0] == EXPECTED_ORDER_ROW


async def test_worked_example_end_to_end(stack, chdb_location):
    names = Names()
    config = load_config("execution_quality", eq.CONFIG, env=names.env(stack.nats_url, f"chdb://{chdb_location}"))
    service = eq.build(config)
    try:
        async with service.app, web_client(service.app) as client:
            await connected(service)
            # Trading events first, market data last: every value waits for event time.
            await publish(stack.nats_url, names, example_events())
            orders = await eventually(lambda: get_json(client, "/metrics/execution?level=order"), order_final)
            fills = await eventually(lambda: get_json(client, "/metrics/execution"), fills_complete)
            assert_example_rows(fills, orders)
            assert fills["rows"][0]["fill_id"] == "F2"  # newest first

            # Filters and pagination.
            page = await get_json(client, "/metrics/execution?limit=1&offset=1")
            assert [r["fill_id"] for r in page["rows"]] == ["F1"] and page["total"] == 2 and page["next_offset"] is None
            page = await get_json(client, "/metrics/execution?limit=1")
            assert page["next_offset"] == 1
            assert (await get_json(client, "/metrics/execution?side=SELL"))["total"] == 0
            assert (await get_json(client, "/metrics/execution?account=ACC1&symbol=XYZ&venue=XNAS"))["total"] == 2
            window = f"from={T0 + 1_000_000_000}&to=2024-01-02T14:30:03Z"
            assert [r["fill_id"] for r in (await get_json(client, f"/metrics/execution?{window}"))["rows"]] == ["F2"]
            assert (await get_json(client, "/metrics/execution?level=order&order_id=O1"))["total"] == 1
            await get_json(client, "/metrics/execution?limit=0", status=400)

            # The summary, computed in ClickHouse: the document's numbers.
            summary = await get_json(client, "/analytics/summary")
            assert summary["total"] == 1
            group = summary["groups"][0]
            assert (group["account"], group["symbol"], group["venue"], group["side"], group["currency"]) == (
                "ACC1", "XYZ", "XNAS", "BUY", "USD")
            f, o = group["fills"], group["orders"]
            assert f["count"] == 2 and f["notional"] == "80050" and f["fees"] == "4" and f["fees_other"] == {}
            assert f["slippage_bps"] == {"count": 2, "mean": "7.5", "median": "10", "p95": "10",
                                         "notional_weighted": "6.25", "cost": "50"}
            assert f["effective_spread_bps"] == {"count": 2, "mean": "6.99700156"}
            assert f["markout_bps"] == {"1s": {"count": 2, "mean": "-2.49775212"},
                                        "5s": {"count": 2, "mean": "0.50024938"},
                                        "60s": {"count": 2, "mean": "-0.49775312"}}
            assert o["count"] == 1 and o["ended"] == 1 and o["fill_ratio"] == "0.8" and o["mean_fill_ratio"] == "0.8"
            assert o["implementation_shortfall"] == {"count": 1, "total": "78", "bps": "7.8"}
            assert o["vwap_slippage_bps"] == {"count": 1, "mean": "-1.44888436"}
            assert o["time_to_first_fill_ns"] == {"count": 1, "mean": 500_000_000}

            bucketed = await get_json(client, "/analytics/summary?group_by=symbol&bucket=1m")
            assert [(g["symbol"], g["bucket_start"]) for g in bucketed["groups"]] == [("XYZ", T0 - T0 % 60_000_000_000)]
            overall = await get_json(client, "/analytics/summary?group_by=&side=BUY")
            assert overall["groups"][0]["fills"]["count"] == 2 and "account" not in overall["groups"][0]
            assert (await get_json(client, "/analytics/summary?side=SELL"))["total"] == 0

            health = await get_json(client, "/health")
            clickhouse = health["checks"]["sink:clickhouse"]
            assert health["status"] == "ok" and clickhouse["ok"] and not clickhouse.get("degraded")
            assert clickhouse["detail"]["connected"] and clickhouse["detail"]["rows_written"]["fills"] >= 2
            metrics = (await client.get("/metrics")).text
            assert 'posttrade_execution_events_total{kind="fill"} 2.0' in metrics
            assert 'posttrade_execution_rows_written_total{table="execution_fills"}' in metrics
    finally:
        await cleanup(stack.nats_url, names, [names.service])




EXPECTED_AMENDED_F2 = {
    "ts": T0 + 2_500_000_000, "qty": "150", "price": "100.08", "fee": "0.75", "notional": "15012",
    "arrival_mid": "100", "slippage_bps": "8", "slippage_cost": "12", "mid_at_fill": "100.06",
    "effective_spread_bps": "3.99760144", "markout_1s_bps": "-1.99840128", "markout_5s_bps": "0",
    "markout_60s_bps": "-5.99520384", "complete": True, "amendments": 2,
}
EXPECTED_AMENDED_ORDER_ROW = {
    **EXPECTED_ORDER_ROW, "fills": 2, "filled_qty": "750", "unfilled_qty": "250", "fill_ratio": "0.75",
    "filled_notional": "75042", "fees": "3.75", "avg_fill_price": "100.056", "last_fill_ts": T0 + 2_500_000_000,
    "time_to_last_fill_ns": 2_500_000_000, "vwap_slippage_bps": "-2.09838424", "execution_cost": "42",
    "opportunity_cost": "30", "implementation_shortfall": "75.75", "implementation_shortfall_bps": "7.575",
    "amendments": 3,
}
EXPECTED_AMENDED_SUMMARY = {
    "fills": {"count": 2, "qty": "750", "notional": "75042", "fees": "3.75", "fees_other": {},
              "slippage_bps": {"count": 2, "mean": "6.5", "median": "8", "p95": "8", "notional_weighted": "5.6",
                               "cost": "42"},
              "effective_spread_bps": {"count": 2, "mean": "4.99820084"},
              "markout_bps": {"1s": {"count": 2, "mean": "-1.49895076"}, "5s": {"count": 2, "mean": "1.49925038"},
                              "60s": {"count": 2, "mean": "0.50064896"}}},
    "orders": {"count": 1, "ended": 1, "qty": "1000", "filled_qty": "750", "fill_ratio": "0.75",
               "mean_fill_ratio": "0.75", "implementation_shortfall": {"count": 1, "total": "75.75", "bps": "7.575"},
               "vwap_slippage_bps": {"count": 1, "mean": "-2.09838424"},
               "time_to_first_fill_ns": {"count": 1, "mean": 500_000_000},
               "time_to_last_fill_ns": {"count": 1, "mean": 2_500_000_000}},
}


async def test_corrections_busts_resends_and_openings_end_to_end(stack, chdb_location):
    """The worked example with, on the fills stream: a bust before the execution it
    removes (F3), a resend of F1 with another price, a correction of F2 and a
    correction of that correction, and an opening. Every metric follows the amended
    executions; then, two hours of event time later (nothing of the example is held
    any more), a resend and two amendments change nothing: the ledger knows them."""
    names = Names()
    env = names.env(stack.nats_url, f"chdb://{chdb_location}",
                    POSTTRADE_EXECUTION_QUALITY__EXECUTION__PRUNE_INTERVAL_S="0.2")
    events = amended_events()
    service = eq.build(load_config("execution_quality", eq.CONFIG, env=env))
    try:
        async with service.app, web_client(service.app) as client:
            await connected(service)
            await publish(stack.nats_url, names, events)
            orders = await eventually(
                lambda: get_json(client, "/metrics/execution?level=order"),
                lambda b: b["total"] == 1 and b["rows"][0]["is_final"] and b["rows"][0]["amendments"] == 3,
            )
            fills = await eventually(
                lambda: get_json(client, "/metrics/execution"),
                lambda b: b["total"] == 2 and all(r["complete"] for r in b["rows"]) and b["rows"][0]["amendments"] == 2,
            )
            assert orders["rows"][0] == EXPECTED_AMENDED_ORDER_ROW
            by_id = {r["fill_id"]: r for r in fills["rows"]}
            assert set(by_id) == {"F1", "F2"}  # F3 busted, the resend and the opening never were fills
            assert {k: by_id["F1"][k] for k in EXPECTED_FILL_ROWS["F1"]} == EXPECTED_FILL_ROWS["F1"]
            assert {k: by_id["F2"][k] for k in EXPECTED_AMENDED_F2} == EXPECTED_AMENDED_F2

            # The summary, from the rollup (whole minutes: it follows the fills table
            # within batch.interval_sec) and from the fills table alike.
            summary = await eventually(
                lambda: get_json(client, "/analytics/summary"),
                lambda b: b["total"] == 1 and {k: b["groups"][0][k] for k in ("fills", "orders")}
                == EXPECTED_AMENDED_SUMMARY,
            )
            off_minute = await get_json(client, f"/analytics/summary?from={T0 - 1}")
            assert {k: off_minute["groups"][0][k] for k in ("fills", "orders")} == EXPECTED_AMENDED_SUMMARY

            # The busted fill's row is still there, flagged at a higher version.
            store = service.store
            busted = (await store.query(
                f"SELECT busted, amendments, bitTest(version, 63) FROM {names.database}.execution_fills FINAL "
                "WHERE fill_id = 'F3'")).rows
            assert busted == [(1, 1, 1)]
            ledger = dict((await store.query(
                f"SELECT fill_id, outcome FROM {names.database}.execution_fill_ids FINAL")).rows)
            assert ledger == {"F1": "applied", "B3": "applied", "F2": "applied", "C2": "applied",
                              "F3": "applied", "C2b": "applied", "OP1": "opening"}
            metrics = (await client.get("/metrics")).text
            for line in ('posttrade_execution_events_total{kind="fill"} 3.0',
                         'posttrade_execution_events_total{kind="correction"} 2.0',
                         'posttrade_execution_events_total{kind="bust"} 1.0',
                         'posttrade_execution_skipped_events_total{kind="fill",reason="duplicate"} 1.0',
                         'posttrade_execution_skipped_events_total{kind="opening",reason="opening"} 1.0',
                         "posttrade_execution_amendments_waiting 0.0"):
                assert line in metrics, line

            # Two hours on: retention forgets the example; the ledger still knows it.
            later = {"quotes": [Quote(ts=T0 + 7200 * NS, symbol="LATER", bid=D("1"), ask=D("2"))]}
            nc = await nats.connect(stack.nats_url)
            try:
                await nc.jetstream().publish(f"{names.namespace}.md.quotes.LATER", encode(later["quotes"][0]))
            finally:
                await nc.close()
            tracker = service.tracker
            await eventually(lambda: asyncio.sleep(0, (len(tracker.fills), len(tracker.orders))),
                             lambda held: held == (0, 0))
            common = dict(account="ACC1", symbol="XYZ")
            late = {"fills": [
                msgspec_replace(events["fills"][2], qty=D("1")),
                Fill(ts=T0 + 7300 * NS, fill_id="B1", exec_type="BUST", ref_fill_id="F1", **common),
                Fill(ts=T0 + 7300 * NS, fill_id="C2c", exec_type="CORRECT", ref_fill_id="C2b", side="BUY",
                     qty=D("1"), price=D("1"), fee=D("0"), **common),
            ]}
            await publish(stack.nats_url, names, late, streams=("fills",))
            await eventually(lambda: asyncio.sleep(0, dict(tracker.stats.skipped_fills)), lambda skipped: skipped == {
                ("fill", "duplicate"): 2, ("opening", "opening"): 1, ("bust", "amends_forgotten"): 1,
                ("correction", "amends_forgotten"): 1})
            await eventually(lambda: asyncio.sleep(0, service.sink.unwritten()), lambda n: n == 0)
            assert (await get_json(client, "/metrics/execution?level=order"))["rows"] == orders["rows"]
            assert (await get_json(client, "/metrics/execution"))["rows"] == fills["rows"]
            assert (await get_json(client, "/analytics/summary"))["groups"] == summary["groups"]
            assert not tracker.fills and not tracker.orders
    finally:
        await cleanup(stack.nats_url, names, [names.service])


async def changelog_snapshot(nats_url: str, names: Names) -> dict[str, dict[str, bytes]]:
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    snapshot: dict[str, dict[str, bytes]] = {}
    try:
        for table in BUCKETS:
            kv = await js.key_value(names.bucket(names.service, table))
            try:
                keys = await kv.keys()
            except nats.js.errors.NoKeysError:
                keys = []
            snapshot[table] = {key: (await kv.get(key)).value for key in keys}
    finally:
        await nc.close()
    return snapshot


async def restore_changelog(nats_url: str, names: Names, snapshot: dict[str, dict[str, bytes]]) -> None:
    """Put the changelog back as it was at `snapshot` (what a crash can leave behind)."""
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    try:
        for table, entries in snapshot.items():
            kv = await js.key_value(names.bucket(names.service, table))
            try:
                keys = await kv.keys()
            except nats.js.errors.NoKeysError:
                keys = []
            for key in keys:
                if key not in entries:
                    await kv.delete(key)
            for key, value in entries.items():
                await kv.put(key, value)
    finally:
        await nc.close()


async def redeliver_market_data(nats_url: str, names: Names) -> None:
    """Forget the market-data consumers: the next start reads those streams from the start."""
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    try:
        prefix = names.namespace.upper()
        await js.delete_consumer(f"{prefix}_QUOTES", names.durable(names.service, "quotes"))
        await js.delete_consumer(f"{prefix}_TRADES", names.durable(names.service, "market_trades"))
    finally:
        await nc.close()


class RowWatcher:
    """Polls /metrics/execution (orders and fills) until stopped, keeping every answer."""

    def __init__(self, client: httpx.AsyncClient):
        self.client = client
        self.orders: list[dict] = []
        self.fills: list[dict] = []
        self._task = asyncio.create_task(self._poll())

    async def _poll(self) -> None:
        while True:
            for url, seen in (("/metrics/execution?level=order", self.orders), ("/metrics/execution", self.fills)):
                response = await self.client.get(url)
                if response.status_code == 503:  # ClickHouse not connected yet
                    continue
                assert response.status_code == 200, response.text
                seen += response.json()["rows"]
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        if self._task.done():
            self._task.result()  # a failed poll fails the test
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


def assert_settled_throughout(watcher: RowWatcher) -> None:
    assert watcher.orders and watcher.fills, "the rows were polled"
    assert all(row["is_final"] for row in watcher.orders), [r for r in watcher.orders if not r["is_final"]][:1]
    assert all(row["complete"] for row in watcher.fills), [r for r in watcher.fills if not r["complete"]][:1]


async def rows_written_since(store, database: str, clock_ns: int) -> tuple[list, list]:
    """Every row version written after `clock_ns` (not only the newest: FINAL is not used)."""
    since = {"clock": clock_ns, "mask": SETTLED - 1}
    newer = "WHERE bitAnd(version, {mask:UInt64}) > {clock:UInt64}"
    orders = (await store.query(f"SELECT order_id, is_final FROM {database}.execution_orders {newer}", since)).rows
    fills = (await store.query(f"SELECT fill_id, complete FROM {database}.execution_fills {newer}", since)).rows
    return orders, fills


async def test_restart_behind_clickhouse_never_unsettles_a_row_and_a_replay_leaves_one_row_each(stack, chdb_location):
    names = Names()
    env = names.env(stack.nats_url, f"chdb://{chdb_location}")
    replay_name = names.service + "r"
    events = example_events()
    try:
        service = eq.build(load_config("execution_quality", eq.CONFIG, env=env))
        async with service.app, web_client(service.app) as client:
            await connected(service)
            # Orders and fills first: their rows are written, unsettled (no market data yet).
            await publish(stack.nats_url, names, events, streams=("orders", "fills"))
            await eventually(
                lambda: get_json(client, "/metrics/execution?level=order"),
                lambda b: b["total"] == 1 and b["rows"][0]["fills"] == 2 and not b["rows"][0]["is_final"],
            )
            await eventually(lambda: get_json(client, "/metrics/execution"), lambda b: b["total"] == 2)
            await eventually(lambda: asyncio.sleep(0, service.sink.unwritten()), lambda n: n == 0)
            before_market_data = await changelog_snapshot(stack.nats_url, names)
            # The market data settles every row.
            await publish(stack.nats_url, names, events, streams=("trades", "quotes"))
            first_orders = await eventually(lambda: get_json(client, "/metrics/execution?level=order"), order_final)
            first_fills = await eventually(lambda: get_json(client, "/metrics/execution"), fills_complete)

        # A crash lost every changelog entry written since the market data came: the
        # restart starts with unsettled states while ClickHouse has the settled rows
        # (and, here, no market data to settle them again). It must write none of them.
        await restore_changelog(stack.nats_url, names, before_market_data)
        restart_clock = time.time_ns()
        service = eq.build(load_config("execution_quality", eq.CONFIG, env=env))
        async with service.app, web_client(service.app) as client:
            assert not service.tracker.orders["O1"].final and not service.tracker.fills["F2"].complete
            watcher = RowWatcher(client)
            try:
                await connected(service)
                await asyncio.sleep(1.0)  # ten writer intervals
            finally:
                await watcher.stop()
            assert_settled_throughout(watcher)
            assert await rows_written_since(service.store, names.database, restart_clock) == ([], [])
            assert await get_json(client, "/metrics/execution?level=order") == first_orders

        # The same changelog, and now the market data is delivered again too: the state
        # settles batch by batch, and only settled rows reach ClickHouse on the way.
        await redeliver_market_data(stack.nats_url, names)
        restart_clock = time.time_ns()
        service = eq.build(load_config("execution_quality", eq.CONFIG, env=env))
        async with service.app, web_client(service.app) as client:
            watcher = RowWatcher(client)
            try:
                await connected(service)
                tracker = service.tracker
                await eventually(
                    lambda: asyncio.sleep(0, (tracker.stats.quotes, tracker.stats.market_trades,
                                              tracker.orders["O1"].final, service.sink.unwritten())),
                    lambda s: s == (8, 6, True, 0),
                )
                await asyncio.sleep(0.3)  # a few more polls after the state settled again
            finally:
                await watcher.stop()
            assert_settled_throughout(watcher)
            orders_written, fills_written = await rows_written_since(service.store, names.database, restart_clock)
            assert all(final for _, final in orders_written) and all(done for _, done in fills_written)
            assert await get_json(client, "/metrics/execution?level=order") == first_orders
            assert await get_json(client, "/metrics/execution") == first_fills

        # A replay of the whole history through a fresh service (new consumers, empty
        # tables) computes every row again; ClickHouse still has one of each, and no
        # settled row was written over with an unsettled one on the way.
        replay_env = {**env, "POSTTRADE_EXECUTION_QUALITY__SERVICE__NAME": replay_name}
        replay_clock = time.time_ns()
        replay = eq.build(load_config("execution_quality", eq.CONFIG, env=replay_env))
        async with replay.app, web_client(replay.app) as client:
            await connected(replay)
            await eventually(
                lambda: asyncio.sleep(0, (replay.tracker.stats.quotes, replay.tracker.stats.fills,
                                          bool(replay.tracker.orders.get("O1") and replay.tracker.orders["O1"].final),
                                          replay.sink.unwritten())),
                lambda s: s == (8, 2, True, 0),
            )
            assert await get_json(client, "/metrics/execution?level=order") == first_orders
            assert await get_json(client, "/metrics/execution") == first_fills
            store = replay.store
            orders_written, fills_written = await rows_written_since(store, names.database, replay_clock)
            assert all(final for _, final in orders_written) and all(done for _, done in fills_written)
            raw = (await store.query(f"SELECT count() FROM {names.database}.execution_fills")).scalar()
            final = (await store.query(f"SELECT count() FROM {names.database}.execution_fills FINAL")).scalar()
            assert raw > 2 and final == 2
    finally:
        await cleanup(stack.nats_url, names, [names.service, replay_name])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_worker_process_serves_the_service(stack, tmp_path):
    names = Names()
    port = free_port()
    env = {
        **os.environ,
        **names.env(stack.nats_url, f"chdb://{tmp_path}/chdb"),  # the stack's shared-root form
        "POSTTRADE_EXECUTION_QUALITY__SERVICE__PORT": str(port),
        "POSTTRADE_EXECUTION_QUALITY__SERVICE__HOST": "127.0.0.1",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "posttrade.cli", "worker", "execution_quality"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:

            async def health():
                try:
                    response = await client.get("/health")
                except httpx.TransportError:
                    return None
                return response.json()

            await eventually(health, lambda h: h is not None and h["status"] == "ok", timeout=60)
            await publish(stack.nats_url, names, example_events())
            orders = await eventually(lambda: get_json(client, "/metrics/execution?level=order"), order_final)
            fills = await eventually(lambda: get_json(client, "/metrics/execution"), fills_complete)
            assert_example_rows(fills, orders)
        assert (tmp_path / "chdb" / names.service).is_dir()  # <root>/<service name>
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        await cleanup(stack.nats_url, names, [names.service])
    assert proc.returncode == 0, proc.stderr.read().decode()[-3000:]


async def test_summary_sql_matches_a_python_reference(chdb_location):
    """Random fills (some without an arrival mid), each first written with wrong values
    and an older version, through the service's own writes (fills table and rollup):
    the summary must see only the newest rows, group and bucket them as documented, and
    compute mean, exact median/p95 (element ⌊q·n⌋ of the sorted values) and the
    notional-weighted mean exactly, from the per-minute rollup (whole-minute buckets
    and bounds) and from the fills table (anything else) alike. Some fills are busted
    at their newest version (counted nowhere), some were first written on the other
    side (a correction moved them: their old group must not keep them in the rollup).
    Two symbols are in two currencies, and some fees are charged in a third: every
    group is in one currency, its fees in another one summed apart."""
    import random

    from posttrade.stores.clickhouse.execution import FILL_COLUMNS, FILLS_TABLE, ExecutionStore, arrow_table, row_version
    from posttrade.core.exact import format_decimal, round_quotient
    from posttrade.core.execution import slippage_bps, slippage_cost, to_bps

    rng = random.Random(5)
    database = f"eqt_{uuid.uuid4().hex[:8]}"
    store = open_clickhouse(f"chdb://{chdb_location}")
    tables = ExecutionStore(store, database)
    try:
        await tables.create_schema()
        rows, fills = [], []
        for i in range(400):
            account, side = rng.choice(["A", "B", "C"]), rng.choice(["BUY", "SELL"])
            symbol, currency = rng.choice([("S", "USD"), ("J", "JPY")])
            fee = D(rng.randrange(-50, 300)) / 100
            fee_currency = currency if rng.random() < 0.7 else rng.choice(["USD", "EUR"])
            ts = T0 + rng.randrange(0, 180) * 1_000_000_000 + rng.randrange(0, 1000) * 1_000_000
            qty, price = D(rng.randrange(1, 500)), D(rng.randrange(9900, 10100)) / 100
            mid = None if i % 7 == 0 else D(rng.randrange(9900, 10100)) / 100
            bps = slippage_bps(side, price, mid) if mid is not None else None
            cost = slippage_cost(side, qty, price, mid) if mid is not None else None
            row = dict.fromkeys(c.name for c in FILL_COLUMNS)
            busted, moved = i % 11 == 0, i % 13 == 0
            row.update(fill_id=f"f{i}", account=account, symbol=symbol, currency=currency, venue="V", side=side,
                       liquidity="", ts=ts, qty=qty, price=price, fee=fee, fee_currency=fee_currency,
                       notional=qty * price, arrival_mid=mid,
                       arrival_notional=qty * mid if mid is not None else None, slippage_bps=bps,
                       slippage_cost=cost, complete=1, amendments=int(busted or moved), busted=int(busted),
                       progress=31, version=row_version(2, int(busted or moved), True))
            stale = {**row, "slippage_bps": D("999"), "slippage_cost": D("999"), "complete": 0, "progress": 0,
                     "amendments": 0, "busted": 0, "version": 1}
            if moved:
                stale["side"] = "SELL" if side == "BUY" else "BUY"
            rows += [tuple(stale.values()), tuple(row.values())]
            if not busted:
                fills.append(row)
        rng.shuffle(rows)
        # Two fills alone in their groups, the first version in the first insert, the
        # last in the last: Y's is busted, Z's corrected from BUY to SELL. Their old
        # groups end up with no fill at all, and the rollup must say so.
        alone = []
        for account, busted in (("Y", 1), ("Z", 0)):
            row = {**fills[1], "fill_id": f"alone-{account}", "account": account, "side": "SELL",
                   "amendments": 1, "busted": busted, "version": row_version(3, 1, True)}
            alone.append(({**row, "side": "BUY", "amendments": 0, "busted": 0, "version": 2 | SETTLED}, row))
            if not busted:
                fills.append(row)
        rows = [tuple(first.values()) for first, _ in alone] + rows + [tuple(last.values()) for _, last in alone]
        at = [c.name for c in FILL_COLUMNS].index("ts")
        for start in range(0, len(rows), 200):  # several parts, so FINAL has work to do
            chunk = rows[start:start + 200]
            await tables.insert(FILLS_TABLE, arrow_table(FILL_COLUMNS, chunk))
            await tables.refresh_minutes({r[at] - r[at] % 60_000_000_000 for r in chunk}, time.time_ns())

        def reference(bucket_ns, keep=lambda r: True):
            groups = {}
            for r in fills:
                if keep(r):
                    key = (r["account"], r["side"], r["currency"], r["ts"] - r["ts"] % bucket_ns)
                    groups.setdefault(key, []).append(r)
            return groups

        def check(groups, expected_groups):
            assert len(groups) == len(expected_groups)
            for g in groups:
                expected = expected_groups[(g["account"], g["side"], g["currency"], g["bucket_start"])]
                assert g["fills"]["fees"] == format_decimal(
                    sum((r["fee"] for r in expected if r["fee_currency"] == g["currency"]), D(0)))
                other: dict[str, D] = {}
                for r in expected:
                    if r["fee_currency"] != g["currency"]:
                        other[r["fee_currency"]] = other.get(r["fee_currency"], D(0)) + r["fee"]
                assert g["fills"]["fees_other"] == {c: format_decimal(other[c]) for c in sorted(other)}
                values = sorted(r["slippage_bps"] for r in expected if r["slippage_bps"] is not None)
                n = len(values)
                slip = g["fills"]["slippage_bps"]
                assert g["fills"]["count"] == len(expected) and slip["count"] == n
                if not n:
                    assert slip["mean"] is None and slip["median"] is None
                    continue
                assert slip["mean"] == format_decimal(round_quotient(sum(values), D(n), 8))
                assert slip["median"] == format_decimal(values[n // 2])
                assert slip["p95"] == format_decimal(values[int(D("0.95") * n)])
                weighted = to_bps(sum(r["slippage_cost"] for r in expected if r["slippage_cost"] is not None),
                                  sum(r["arrival_notional"] for r in expected if r["arrival_notional"] is not None))
                assert slip["notional_weighted"] == format_decimal(weighted)
                assert g["fills"]["notional"] == format_decimal(sum(r["notional"] for r in expected))
            assert groups == sorted(groups, key=lambda g: (g["account"], g["side"], g["currency"], g["bucket_start"]))

        queries = ExecutionQueries(database, lambda: store)
        minute = 60_000_000_000
        from_rollup = await queries.summary(Filters(), ("account", "side"), minute)
        check(from_rollup, reference(minute))
        assert await queries.summary(Filters(), ("account", "side"), minute, use_rollup=False) == from_rollup
        by_20s = await queries.summary(Filters(), ("account", "side"), 20_000_000_000)  # not whole minutes
        check(by_20s, reference(20_000_000_000))

        # Filters narrow the same query, on both sources.
        window = Filters(account="A", side="SELL", from_ns=T0, to_ns=T0 + minute)
        only = await queries.summary(window, (), None)
        assert only == await queries.summary(window, (), None, use_rollup=False)
        expected = [r for r in fills if r["account"] == "A" and r["side"] == "SELL" and T0 <= r["ts"] < T0 + minute]
        assert [g["currency"] for g in only] == ["JPY", "USD"]  # no key: one group per currency
        assert sum(g["fills"]["count"] for g in only) == len(expected)
        off_minute = Filters(from_ns=T0 + 30_000_000_000)
        assert whole_minutes(window, minute) and not whole_minutes(off_minute, None)
        late = await queries.summary(off_minute, (), None)
        assert sum(g["fills"]["count"] for g in late) == sum(r["ts"] >= T0 + 30_000_000_000 for r in fills)
    finally:
        await store.command(f"DROP DATABASE IF EXISTS {database}")
        await store.close()


async def test_tables_of_the_older_layout_are_migrated(chdb_location):
    """An older version created the tables sorted by (account, symbol, id), without
    the progress, amendments and busted columns or the SETTLED bit, and no rollup: the
    start migrates them (no row amended or busted) and fills the rollup from what they
    hold."""
    from posttrade.agents.execution.state import FILL_ALL
    from posttrade.stores.clickhouse.execution import FILL_COLUMNS, ORDER_COLUMNS, ExecutionStore

    database = f"eqt_{uuid.uuid4().hex[:8]}"
    store = open_clickhouse(f"chdb://{chdb_location}")
    try:
        await store.command(f"CREATE DATABASE {database}")
        added = ("progress", "amendments", "busted", "currency", "fee_currency", "fees_other")
        old = lambda cols: ", ".join(f"{c.name} {c.clickhouse}" for c in cols if c.name not in added)  # noqa: E731
        await store.command(
            f"CREATE TABLE {database}.execution_fills ({old(FILL_COLUMNS)}) ENGINE = ReplacingMergeTree(version) "
            "PARTITION BY toYYYYMM(ts) ORDER BY (account, symbol, fill_id)"
        )
        await store.command(
            f"CREATE TABLE {database}.execution_orders ({old(ORDER_COLUMNS)}) ENGINE = ReplacingMergeTree(version) "
            "ORDER BY (account, symbol, order_id)"
        )
        await store.command(
            f"INSERT INTO {database}.execution_fills (fill_id, account, symbol, venue, side, liquidity, ts, qty, price, fee, "
            "notional, slippage_bps, complete, version) VALUES "
            f"('F1', 'A', 'S', 'V', 'BUY', '', fromUnixTimestamp64Nano(toInt64({T0})), 2, 10, 0, 20, 5, 1, 7), "
            f"('F2', 'A', 'S', 'V', 'BUY', '', fromUnixTimestamp64Nano(toInt64({T0 + 1})), 1, 10, 0, 10, NULL, 0, 7)"
        )
        await ExecutionStore(store, database).create_schema()
        keys = dict((await store.query(
            "SELECT name, sorting_key FROM system.tables WHERE database = {d:String}", {"d": database})).rows)
        assert keys == {"execution_fills": "ts, fill_id", "execution_orders": "arrival_ts, order_id",
                        "execution_fill_minutes": "minute, account, symbol, venue, side, currency",
                        "execution_fill_ids": "fill_id"}
        rows = (await store.query(
            f"SELECT fill_id, progress, amendments, busted, version FROM {database}.execution_fills FINAL "
            "ORDER BY fill_id")).rows
        assert rows == [("F1", FILL_ALL, 0, 0, 7 | SETTLED), ("F2", 0, 0, 0, 7)]
        for table, columns in (("execution_fills", FILL_COLUMNS), ("execution_orders", ORDER_COLUMNS)):
            names = [name for (name,) in (await store.query(
                "SELECT name FROM system.columns WHERE database = {d:String} AND table = {t:String} ORDER BY position",
                {"d": database, "t": table})).rows]
            assert names == [c.name for c in columns], table
        summary = await ExecutionQueries(database, lambda: store).summary(Filters(), (), None)
        assert summary[0]["fills"]["count"] == 2 and summary[0]["fills"]["notional"] == "30"
        assert summary[0]["fills"]["slippage_bps"]["median"] == "5"
        await ExecutionStore(store, database).create_schema()  # the next start changes nothing
        assert (await store.query(f"SELECT count() FROM {database}.execution_fills")).scalar() == 2
    finally:
        await store.command(f"DROP DATABASE IF EXISTS {database}")
        await store.close()
