"""execution_quality with money in more than one currency (docs/execution_quality.md,
"Currencies"): rows carry their instrument's currency and their fees' currency, every
summary group is in one currency, fees charged in another currency are kept apart, and
tables of the layout before currencies are upgraded (the rollup rebuilt with the new key).

One venue, XNAS, trades the worked example twice: in USDJPY (an FX pair: its money is in
JPY; F1's fee is charged in USD) and in AAPL (USD). Nothing may add their money.
The ClickHouse tests run on the embedded engine (chdb), each in a database of its own.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from decimal import Decimal as D

import msgspec
import pytest

from posttrade.agents.execution.state import BookEntry, FillState, OrderState, TapeEntry, WaitingAmendment, minute_of
from posttrade.agents.execution.tracker import ExecutionTables, ExecutionTracker
from posttrade.config import load_config
from posttrade.core.reference import FxPair, Instrument, Reference
from posttrade.services import execution_quality as eq
from posttrade.stores import clickhouse as clickhouse_store
from posttrade.stores.clickhouse import ClickHouseStore, open_clickhouse
from posttrade.stores.clickhouse.execution import (
    FILL_COLUMNS,
    FILLS_TABLE,
    MINUTES_TABLE,
    ORDER_COLUMNS,
    ORDERS_TABLE,
    ExecutionStore,
    arrow_table,
    fill_row,
    order_row,
)
from posttrade.stores.clickhouse.execution_queries import ExecutionQueries, Filters
from posttrade.streams.events import Fill
from posttrade.tables.table import Table
from tests.unit.test_execution_tracker import MS, NS, T0, Feeder, by_time, example_events, fill_dict, order_dict

REFERENCE = Reference({"USDJPY": Instrument(fx=FxPair(base="USD", quote="JPY"))})


def make_tracker() -> ExecutionTracker:
    tables = ExecutionTables(
        fills=Table("fills", bucket="t-fills", value_type=FillState),
        orders=Table("orders", bucket="t-orders", value_type=OrderState),
        quote_book=Table("quote_book", bucket="t-book", value_type=BookEntry),
        tape=Table("tape", bucket="t-tape", value_type=TapeEntry),
        amendments=Table("amendments", bucket="t-amendments", value_type=WaitingAmendment),
    )
    return ExecutionTracker(tables, reference=REFERENCE)


def two_currencies() -> ExecutionTracker:
    """The worked example in USDJPY (fills JF1, JF2 of order JO1; JF1's fee of 3 in USD)
    and in AAPL (AF1, AF2 of AO1), both at XNAS, fed in event-time order."""
    tracker = make_tracker()
    feeder = Feeder(tracker)
    jpy = example_events("USDJPY", prefix="J")
    jpy["fills"][0] = msgspec.structs.replace(jpy["fills"][0], fee_currency="USD")
    usd = example_events("AAPL", prefix="A")
    for stream, event in by_time({name: jpy[name] + usd[name] for name in jpy}):
        feeder.feed(stream, event)
        tracker.resolve_due()
    return tracker


# -- rows -------------------------------------------------------------------------------------


def test_rows_carry_the_instruments_currency_and_the_fees_currency():
    tracker = two_currencies()
    jf1, jf2, af1 = (fill_dict(tracker, f) for f in ("JF1", "JF2", "AF1"))
    assert (jf1["currency"], jf1["fee"], jf1["fee_currency"]) == ("JPY", D("3.00"), "USD")
    assert (jf2["currency"], jf2["fee"], jf2["fee_currency"]) == ("JPY", D("1.00"), "JPY")  # none given: the instrument's
    assert (af1["currency"], af1["fee_currency"]) == ("USD", "USD")
    assert jf1["slippage_cost"] == af1["slippage_cost"] == D("30")  # 30 yen, 30 dollars

    usd_order, jpy_order = order_dict(tracker, "AO1"), order_dict(tracker, "JO1")
    assert (usd_order["currency"], usd_order["fees"], usd_order["fees_other"]) == ("USD", D("4"), ())
    assert usd_order["implementation_shortfall"] == D("78")
    # The USD fee is neither in the JPY fees nor in the JPY shortfall: 50 + 24 + 1 yen.
    assert (jpy_order["currency"], jpy_order["fees"], jpy_order["fees_other"]) == ("JPY", D("1"), (("USD", D("3")),))
    assert (jpy_order["implementation_shortfall"], jpy_order["implementation_shortfall_bps"]) == (D("75"), D("7.5"))


def test_a_correction_recomputes_the_fees_by_currency():
    tracker = two_currencies()
    feeder = Feeder(tracker)
    feeder.seqs["fills"] = 100
    # JF1's fee corrected to 2.50 in JPY, JF2's to 0.25 in EUR.
    for fill_id, ref, fee, currency in (("JC1", "JF1", "2.50", None), ("JC2", "JF2", "0.25", "EUR")):
        original = tracker.fills[ref].fill
        feeder.feed("fills", Fill(ts=T0 + 40 * NS, fill_id=fill_id, exec_type="CORRECT", ref_fill_id=ref,
                                  account=original.account, symbol=original.symbol, side=original.side,
                                  qty=original.qty, price=original.price, fee=D(fee), fee_currency=currency))
    tracker.resolve_due()
    assert fill_dict(tracker, "JF1")["fee_currency"] == "JPY" and fill_dict(tracker, "JF2")["fee_currency"] == "EUR"
    order = order_dict(tracker, "JO1")
    assert (order["fees"], order["fees_other"]) == (D("2.50"), (("EUR", D("0.25")),))
    assert order["implementation_shortfall"] == D("76.50")  # 50 + 24 + 2.50


def test_the_service_gives_its_reference_data_to_the_tracker():
    service = eq.build(load_config("execution_quality", eq.CONFIG, env={}))
    assert service.tracker.reference is service.reference
    assert service.reference.currency("USDJPY") == "JPY"  # config/backend/reference.yaml


# -- ClickHouse -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def store() -> Iterator[ClickHouseStore]:
    """chdb allows one engine per process: share the one already open, if any."""
    opened = next(iter(clickhouse_store._EMBEDDED), None)
    store = open_clickhouse(f"chdb://{opened}" if opened not in (None, ":memory:") else "chdb://memory")
    yield store
    store.close_sync()


@pytest.fixture
async def database(store) -> Iterator[str]:
    name = f"eqc_{uuid.uuid4().hex[:8]}"
    yield name
    await store.command(f"DROP DATABASE IF EXISTS {name}")


async def write(tables: ExecutionStore, tracker: ExecutionTracker) -> None:
    """The tracker's rows, written as the sink writes them, and their rollup minutes."""
    fills = [fill_row(tracker, state, 7) for state in tracker.fills.values()]
    orders = [row for row in (order_row(tracker, state, 7) for state in tracker.orders.values()) if row]
    await tables.insert(FILLS_TABLE, arrow_table(FILL_COLUMNS, fills))
    await tables.insert(ORDERS_TABLE, arrow_table(ORDER_COLUMNS, orders))
    await tables.refresh_minutes({minute_of(state.fill.ts) for state in tracker.fills.values()}, time.time_ns())


EXPECTED_USD_FILLS = {
    "count": 2, "qty": "800", "notional": "80050", "fees": "4", "fees_other": {},
    "slippage_bps": {"count": 2, "mean": "7.5", "median": "10", "p95": "10", "notional_weighted": "6.25", "cost": "50"},
    "effective_spread_bps": {"count": 2, "mean": "6.99700156"},
    "markout_bps": {"1s": {"count": 2, "mean": "-2.49775212"}, "5s": {"count": 2, "mean": "0.50024938"},
                    "60s": {"count": 2, "mean": "-0.49775312"}},
}
EXPECTED_JPY_FILLS = {**EXPECTED_USD_FILLS, "fees": "1", "fees_other": {"USD": "3"}}
EXPECTED_USD_ORDERS = {
    "count": 1, "ended": 1, "qty": "1000", "filled_qty": "800", "fill_ratio": "0.8", "mean_fill_ratio": "0.8",
    "implementation_shortfall": {"count": 1, "total": "78", "bps": "7.8"},
    "vwap_slippage_bps": {"count": 1, "mean": "-1.44888436"},
    "time_to_first_fill_ns": {"count": 1, "mean": 500 * MS}, "time_to_last_fill_ns": {"count": 1, "mean": 2500 * MS},
}
EXPECTED_JPY_ORDERS = {**EXPECTED_USD_ORDERS, "implementation_shortfall": {"count": 1, "total": "75", "bps": "7.5"}}


async def test_a_venue_trading_a_jpy_and_a_usd_symbol_gives_two_groups(store, database):
    tables = ExecutionStore(store, database, REFERENCE)
    await tables.create_schema()
    await write(tables, two_currencies())
    queries = ExecutionQueries(database, lambda: store)

    by_venue = await queries.summary(Filters(), ("venue",), None)
    assert by_venue == [
        {"venue": "XNAS", "currency": "JPY", "fills": EXPECTED_JPY_FILLS, "orders": EXPECTED_JPY_ORDERS},
        {"venue": "XNAS", "currency": "USD", "fills": EXPECTED_USD_FILLS, "orders": EXPECTED_USD_ORDERS},
    ]
    # The same from the fills table (the rollup answers whole minutes), and with no key at
    # all: one overall group per currency, never one total.
    assert await queries.summary(Filters(), ("venue",), None, use_rollup=False) == by_venue
    overall = await queries.summary(Filters(), (), 60 * NS)
    assert [(g["currency"], g["bucket_start"], g["fills"]["notional"]) for g in overall] == [
        ("JPY", minute_of(T0), "80050"), ("USD", minute_of(T0), "80050")]
    assert await queries.summary(Filters(), (), 20 * NS, use_rollup=False) == await queries.summary(
        Filters(), (), 20 * NS)
    only_usd = await queries.summary(Filters(symbol="AAPL"), ("account", "symbol", "venue", "side"), None)
    assert [(g["symbol"], g["currency"]) for g in only_usd] == [("AAPL", "USD")]

    total, fills = await queries.rows("fill", Filters(symbol="USDJPY"), 10, 0)
    assert total == 2 and [(r["fill_id"], r["currency"], r["fee"], r["fee_currency"]) for r in fills] == [
        ("JF2", "JPY", "1", "JPY"), ("JF1", "JPY", "3", "USD")]
    _, orders = await queries.rows("order", Filters(), 10, 0)
    assert sorted((r["order_id"], r["currency"], r["fees"], r["fees_other"]) for r in orders) == [
        ("AO1", "USD", "4", {}), ("JO1", "JPY", "1", {"USD": "3"})]


async def test_tables_before_currencies_are_upgraded_and_the_rollup_rebuilt(store, database):
    """The layout before currencies: no `currency` / `fee_currency` on fills, no
    `currency` / `fees_other` on orders, a rollup keyed without currency. The start adds
    the columns (the rows there read the reference data's currency of their symbol, their
    fees as in it), rebuilds the rollup from the fills table with the new key, and the
    next start changes nothing."""
    added = {"currency", "fee_currency", "fees_other"}
    old = lambda columns: ", ".join(f"{c.name} {c.clickhouse}" for c in columns if c.name not in added)  # noqa: E731
    await store.command(f"CREATE DATABASE {database}")
    await store.command(
        f"CREATE TABLE {database}.{FILLS_TABLE} ({old(FILL_COLUMNS)}) ENGINE = ReplacingMergeTree(version) "
        "PARTITION BY toYYYYMM(ts) ORDER BY (ts, fill_id)")
    await store.command(
        f"CREATE TABLE {database}.{ORDERS_TABLE} ({old(ORDER_COLUMNS)}) ENGINE = ReplacingMergeTree(version) "
        "PARTITION BY toYYYYMM(arrival_ts) ORDER BY (arrival_ts, order_id)")
    await store.command(
        f"CREATE TABLE {database}.{MINUTES_TABLE} (minute DateTime('UTC'), account LowCardinality(String), "
        "symbol LowCardinality(String), venue LowCardinality(String), side LowCardinality(String), "
        "fills UInt64, notional Decimal(38, 18), version UInt64) ENGINE = ReplacingMergeTree(version) "
        "PARTITION BY toYYYYMM(minute) ORDER BY (minute, account, symbol, venue, side)")
    # What the older version wrote: the example's rows without the new columns, and a
    # rollup row that mixes yen and dollars (the new one must not keep it).
    tracker = two_currencies()
    for table, columns, rows in (
        (FILLS_TABLE, FILL_COLUMNS, [fill_row(tracker, s, 7) for s in tracker.fills.values()]),
        (ORDERS_TABLE, ORDER_COLUMNS, [order_row(tracker, s, 7) for s in tracker.orders.values()]),
    ):
        kept = [i for i, c in enumerate(columns) if c.name not in added]
        await store.insert_arrow(f"{database}.{table}", arrow_table(
            tuple(columns[i] for i in kept), [tuple(row[i] for i in kept) for row in rows]))
    await store.command(
        f"INSERT INTO {database}.{MINUTES_TABLE} VALUES (toDateTime({minute_of(T0) // NS}, 'UTC'), '', '', 'XNAS', "
        "'BUY', 4, 160100, 1)")

    tables = ExecutionStore(store, database, REFERENCE)
    await tables.create_schema()
    keys = dict((await store.query(
        "SELECT name, sorting_key FROM system.tables WHERE database = {d:String}", {"d": database})).rows)
    assert keys == {FILLS_TABLE: "ts, fill_id", ORDERS_TABLE: "arrival_ts, order_id",
                    MINUTES_TABLE: "minute, account, symbol, venue, side, currency",
                    "execution_fill_ids": "fill_id"}
    for table, columns in ((FILLS_TABLE, FILL_COLUMNS), (ORDERS_TABLE, ORDER_COLUMNS)):
        names = [name for (name,) in (await store.query(
            "SELECT name FROM system.columns WHERE database = {d:String} AND table = {t:String} ORDER BY position",
            {"d": database, "t": table})).rows]
        assert names == [c.name for c in columns], table
    fills = (await store.query(
        f"SELECT fill_id, currency, fee_currency FROM {database}.{FILLS_TABLE} FINAL ORDER BY fill_id")).rows
    # The older version did not record a fee's currency: JF1's USD fee reads as JPY.
    assert fills == [("AF1", "USD", "USD"), ("AF2", "USD", "USD"), ("JF1", "JPY", "JPY"), ("JF2", "JPY", "JPY")]
    orders = (await store.query(
        f"SELECT order_id, currency, fees, fees_other FROM {database}.{ORDERS_TABLE} FINAL ORDER BY order_id")).rows
    assert orders == [("AO1", "USD", D(4), {}), ("JO1", "JPY", D(1), {})]

    queries = ExecutionQueries(database, lambda: store)
    by_venue = await queries.summary(Filters(), ("venue",), None)
    assert [(g["currency"], g["fills"]["count"], g["fills"]["notional"], g["fills"]["fees"]) for g in by_venue] == [
        ("JPY", 2, "80050", "4"), ("USD", 2, "80050", "4")]
    assert await queries.summary(Filters(), ("venue",), None, use_rollup=False) == by_venue

    rollup = (await store.query(f"SELECT count() FROM {database}.{MINUTES_TABLE} FINAL")).scalar()
    await ExecutionStore(store, database, REFERENCE).create_schema()  # the next start changes nothing
    assert (await store.query(f"SELECT count() FROM {database}.{MINUTES_TABLE} FINAL")).scalar() == rollup == 2
    assert (await store.query(f"SELECT count() FROM {database}.{MINUTES_TABLE}")).scalar() == rollup
    assert await queries.summary(Filters(), ("venue",), None) == by_venue


async def test_currency_of_rows_before_currencies_is_the_reference_datas_at_the_upgrade(store, database):
    """Symbols are free text: the DEFAULT expression quotes them."""
    reference = Reference({"O'B\\X": Instrument(currency="EUR"), "SAP": Instrument(currency="EUR")},
                          default_base_currency="CHF")
    await store.command(f"CREATE DATABASE {database}")
    await store.command(f"CREATE TABLE {database}.t (symbol String) ENGINE = MergeTree ORDER BY symbol")
    await store.command(f"INSERT INTO {database}.t VALUES ('O\\'B\\\\X'), ('SAP'), ('ABC')")
    expression = ExecutionStore(store, database, reference)._currency_of_symbol()
    rows = (await store.query(f"SELECT symbol, {expression} FROM {database}.t ORDER BY symbol")).rows
    assert rows == [("ABC", "CHF"), ("O'B\\X", "EUR"), ("SAP", "EUR")]
    assert ExecutionStore(store, database)._currency_of_symbol() == "'USD'"  # no reference data: all USD
