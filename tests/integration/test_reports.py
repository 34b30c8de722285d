"""Reports on the real QuestDB of the local stack and embedded ClickHouse.

A past trading day's fills, position snapshots (with ptrc's day rolls) and compliance
alerts are stored the way ptrc stores them — in tables of this test's own (unique
names: the QuestDB server is shared) — then `POST /reports` generates the day, `GET
/reports` lists it and every file is downloaded and checked: the blotter's CSV and
Parquet carry exactly the stored fills of that day, the P&L report the close from the
roll snapshots, the compliance report the day's alerts.

The snapshots of the first tests are in a table of the layout from before the
base-currency columns (what an upgraded ptrc finds); a multi-currency day is stored
through questdb_writer's own layout and read back at the rates of its rolls.
"""

from __future__ import annotations

import csv
import io
import random
import shutil
import time
import uuid
from collections.abc import Iterator
from datetime import date, datetime, timezone
from decimal import Decimal as D

import httpx
import msgspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from posttrade.agents.reports import ReportsSection, install_reports
from posttrade.app import App
from posttrade.stores.questdb import rows as ptrc_rows
from posttrade.stores.questdb.layouts import LAYOUTS
from posttrade.agents.positions import position_update
from posttrade.core.fx import FxRates
from posttrade.core.positions import Position, PositionState
from posttrade.core.reference import FxPair, Instrument, Reference
from posttrade.streams.events import Fill
from posttrade.streams.stream import EventRecord
from posttrade.core.reports import NS, TradingDay, iso_ns
from posttrade.stores import clickhouse as clickhouse_store
from posttrade.stores.clickhouse import open_clickhouse
from posttrade.stores.objects import LocalObjectStore
from posttrade.stores.questdb import QuestDBClient, QuestDBWriter
from posttrade.streams.memory import MemoryTransport
from posttrade.web.server import build_web_app

DEC = "DECIMAL(38, 12)"
TRADES_COLUMNS = LAYOUTS["ptrc_trades"].table_columns  # ptrc's ptrc_trades (the contract)
SNAPSHOT_COLUMNS = {  # ptrc's position_snapshots, as stored before the base-currency columns
    "ts": "TIMESTAMP_NS", "account": "SYMBOL", "symbol": "SYMBOL", "reason": "SYMBOL", "net_qty": DEC,
    "avg_open_price": DEC, "realized_pnl_gross": DEC, "fees": DEC, "realized_pnl_net": DEC, "mark": DEC,
    "unrealized_pnl": DEC, "day_pnl": DEC,
}
ALERTS_DDL = """
CREATE TABLE IF NOT EXISTS {table} (
    alert_id String, ts DateTime64(9, 'UTC'), rule String, severity String, account String, symbol String,
    message String, observed String, `limit` String
) ENGINE = ReplacingMergeTree ORDER BY alert_id
"""

DAY = date(2026, 11, 20)
START, END = TradingDay().window_ns(DAY)
HOUR = 3_600_000_000_000


def trade(ts, fill_id, side, qty, price, fee, realized, net_after, symbol="XYZ", venue="XNAS"):
    return {"ts": ts, "fill_id": fill_id, "account": "ACC1", "symbol": symbol, "side": side, "qty": D(qty),
            "price": D(price), "fee": D(fee), "realized_pnl_fill": D(realized), "order_id": f"o-{fill_id}",
            "venue": venue, "net_qty_after": D(net_after), "exec_type": "NEW", "ref_fill_id": None, "state": "active"}


# The worked example on DAY (fee 1 per fill), one fill the day before and one the day after.
TRADES = [
    trade(START - HOUR, "before", "BUY", "1", "50", "0", "0", "1", symbol="ABC"),
    trade(START + 9 * HOUR, "x1", "BUY", "10", "100", "1", "0", "10"),
    trade(START + 9 * HOUR + 1, "x2", "BUY", "10", "110", "1", "0", "20"),
    trade(START + 10 * HOUR, "x3", "SELL", "15", "120", "1", "225", "5"),
    trade(START + 11 * HOUR + 123_456_789, "x4", "SELL", "10", "90", "1", "-75", "-5", venue="XNYS"),
    trade(END + HOUR, "after", "SELL", "1", "51", "0", "1", "0", symbol="ABC"),
]


def snapshot(ts, symbol, reason, net, avg, gross, fees, mark, unrealized, day_pnl):
    d = lambda v: None if v is None else D(v)  # noqa: E731
    return {"ts": ts, "account": "ACC1", "symbol": symbol, "reason": reason, "net_qty": D(net), "avg_open_price": d(avg),
            "realized_pnl_gross": D(gross), "fees": D(fees), "realized_pnl_net": D(gross) - D(fees), "mark": d(mark),
            "unrealized_pnl": d(unrealized), "day_pnl": d(day_pnl)}


SNAPSHOTS = [
    snapshot(START + 5, "ABC", "roll", "1", "50", "0", "0", "52", "2", "0"),  # ABC opened the day worth 2
    snapshot(START + 9 * HOUR, "XYZ", "fill", "10", "100", "0", "1", "100", "0", "-1"),
    snapshot(START + 11 * HOUR, "XYZ", "fill", "-5", "90", "150", "4", "90", "0", "146"),
    snapshot(END + 5, "ABC", "roll", "1", "50", "0", "0", "55", "5", "0"),  # ... and closed it worth 5
    snapshot(END + 6, "XYZ", "roll", "-5", "90", "150", "4", "95", "-25", "0"),  # closed at 95
]

ALERTS = [
    ("a1", START + 10 * HOUR, "max_position", "warning", "ACC1", "XYZ", "position 20 over 15", "20", "15"),
    ("a0", START + 10 * HOUR, "wash_trade", "critical", "ACC1", "XYZ", "opposite fills", "", ""),
    ("a2", END + 1, "daily_loss", "critical", "ACC1", "", "next day", "-1000", "-500"),
]


@pytest.fixture(scope="module")
def clickhouse(tmp_path_factory) -> Iterator:
    """chdb allows one engine path per process: share one already open (every name
    here is qualified by a database of our own)."""
    opened = next(iter(clickhouse_store._EMBEDDED), None)
    if opened is not None and opened != ":memory:":
        store = open_clickhouse(f"chdb://{opened}")
    else:
        store = open_clickhouse(f"chdb://{tmp_path_factory.mktemp('reports') / 'engine'}")
    yield store
    store.close_sync()


@pytest.fixture
async def stored_day(stack, clickhouse):
    suffix = uuid.uuid4().hex[:8]
    trades, snapshots, database = f"rept_{suffix}_trades", f"rept_{suffix}_snapshots", f"rept_{suffix}"
    questdb = QuestDBClient(host=stack.questdb_host, port=stack.questdb_http_port)
    writer = QuestDBWriter(host=stack.questdb_host, port=stack.questdb_http_port)
    try:
        await questdb.create_table(trades, TRADES_COLUMNS, dedup_keys=("ts", "fill_id"))
        await questdb.create_table(snapshots, SNAPSHOT_COLUMNS, dedup_keys=("ts", "account", "symbol", "reason"))
        await writer.write_batch(trades, TRADES, symbols=LAYOUTS["ptrc_trades"].symbols)
        await writer.write_batch(snapshots, SNAPSHOTS, symbols=("account", "symbol", "reason"))
        await questdb.wait_visible(trades, len(TRADES))
        await questdb.wait_visible(snapshots, len(SNAPSHOTS))
        await clickhouse.command(f"CREATE DATABASE IF NOT EXISTS {database}")
        await clickhouse.command(ALERTS_DDL.format(table=f"{database}.compliance_alerts"))
        # As ptrc stores them: DateTime64(9) from epoch-ns integers.
        await clickhouse.insert(
            f"{database}.compliance_alerts", [list(a) for a in ALERTS],
            column_names=["alert_id", "ts", "rule", "severity", "account", "symbol", "message", "observed", "limit"],
        )
        yield {"questdb": questdb, "trades": trades, "snapshots": snapshots, "alerts": f"{database}.compliance_alerts"}
    finally:
        for table in (trades, snapshots):
            await questdb.execute(f"DROP TABLE IF EXISTS {table}")
        await clickhouse.command(f"DROP DATABASE IF EXISTS {database}")
        await writer.close()
        await questdb.close()


async def test_a_days_reports_are_generated_listed_and_downloaded(stored_day, clickhouse, tmp_path):
    app = App("ptrc", MemoryTransport())
    positions = app.table("positions", value_type=PositionState, key_type=tuple[str, str])
    install_reports(
        app, positions=positions, mark_of=lambda symbol: None, multipliers={}, object_store=LocalObjectStore(tmp_path),
        questdb=stored_day["questdb"], clickhouse=clickhouse,
        settings=ReportsSection(trades_table=stored_day["trades"], snapshots_table=stored_day["snapshots"],
                                alerts_table=stored_day["alerts"], spool_dir=str(tmp_path / "spool")),
    )
    web = httpx.AsyncClient(transport=httpx.ASGITransport(app=build_web_app(app)), base_url="http://ptrc")
    async with app, web as http:
        generated = await http.post("/reports", json={"date": DAY.isoformat()})
        assert generated.status_code == 201, generated.text
        listed = (await http.get("/reports", params={"date": DAY.isoformat()})).json()
        files = {r["name"]: (await http.get(r["url"])) for r in listed["reports"]}
    body = generated.json()
    rows = {r["name"]: r["rows"] for r in body["reports"]}
    prefix = DAY.isoformat()
    assert rows == {
        f"{prefix}/{kind}.{fmt}": count
        for kind, count in (("compliance", 2), ("daily_pnl", 3), ("positions", 2), ("trade_blotter", 4))
        for fmt in ("csv", "parquet")
    }
    assert body["generation_seconds"] > 0 and body["steps"]["trade_blotter.export"] > 0
    assert sorted(r["name"] for r in listed["reports"]) == sorted(rows)
    assert all(response.status_code == 200 for response in files.values())
    sizes = {r["name"]: r["size"] for r in listed["reports"]}
    assert all(len(files[name].content) == size for name, size in sizes.items())

    # The blotter: exactly the day's four fills, in time order, every digit kept.
    blotter_csv = list(csv.DictReader(io.StringIO(files[f"{prefix}/trade_blotter.csv"].text)))
    assert [r["fill_id"] for r in blotter_csv] == ["x1", "x2", "x3", "x4"]
    x4 = blotter_csv[3]
    assert x4["ts"] == iso_ns(TRADES[4]["ts"])
    assert (D(x4["qty"]), D(x4["price"]), D(x4["realized_pnl_fill"]), D(x4["net_qty_after"]), x4["venue"]) == (
        D(10), D(90), D(-75), D(-5), "XNYS")
    blotter = pq.read_table(io.BytesIO(files[f"{prefix}/trade_blotter.parquet"].content))
    assert blotter.schema.field("price").type == pa.decimal128(38, 12)
    assert blotter.schema.field("ts").type == pa.timestamp("ns", tz="UTC")
    stored = [{k: v for k, v in t.items()} for t in TRADES[1:5]]
    got = blotter.to_pylist()
    assert [r["fill_id"] for r in got] == [t["fill_id"] for t in stored]
    for row, expected in zip(got, stored):
        for name in ("qty", "price", "fee", "realized_pnl_fill", "net_qty_after", "side", "order_id", "venue"):
            assert row[name] == expected[name], name
    assert blotter.column("ts").cast(pa.int64()).to_pylist() == [t["ts"] for t in stored]
    assert files[f"{prefix}/trade_blotter.parquet"].headers["content-type"] == "application/vnd.apache.parquet"

    # Daily P&L: the close is the roll into the next day; day P&L the change between the rolls.
    pnl = {(r["level"], r["symbol"]): r for r in csv.DictReader(io.StringIO(files[f"{prefix}/daily_pnl.csv"].text))}
    xyz, abc, total = pnl[("position", "XYZ")], pnl[("position", "ABC")], pnl[("account", "")]
    assert (xyz["net_qty"], xyz["mark"], xyz["realized_pnl_net"], xyz["unrealized_pnl"], xyz["total_pnl"],
            xyz["day_pnl"]) == ("-5", "95", "146", "-25", "121", "121")  # first traded that day
    assert (abc["total_pnl"], abc["day_pnl"]) == ("5", "3")  # worth 2 at the open, 5 at the close
    assert (total["realized_pnl_net"], total["total_pnl"], total["day_pnl"]) == ("146", "126", "124")
    # Stored before the base columns, in USD like its account: at the rate 1.
    assert (xyz["currency"], xyz["base_currency"], xyz["fx_rate"], xyz["day_pnl_base"]) == ("USD", "USD", "1", "121")
    assert (total["currency"], total["day_pnl_base"], total["missing_rates"]) == ("USD", "124", "")
    assert xyz["valued_at"] == iso_ns(SNAPSHOTS[4]["ts"])
    positions_table = pq.read_table(io.BytesIO(files[f"{prefix}/positions.parquet"].content))
    assert positions_table.column("net_qty").to_pylist() == [D(1), D(-5)]

    # Compliance: the day's alerts only, oldest first.
    alerts = list(csv.DictReader(io.StringIO(files[f"{prefix}/compliance.csv"].text)))
    assert [(a["alert_id"], a["rule"], a["observed"], a["limit"]) for a in alerts] == [
        ("a0", "wash_trade", "", ""), ("a1", "max_position", "20", "15")]
    assert alerts[0]["ts"] == iso_ns(ALERTS[1][1])
    alerts_parquet = pq.read_table(io.BytesIO(files[f"{prefix}/compliance.parquet"].content))
    assert alerts_parquet.column("alert_id").to_pylist() == ["a0", "a1"]


async def test_a_day_without_data_gives_empty_reports_with_their_columns(stored_day, clickhouse, tmp_path):
    app = App("ptrc", MemoryTransport())
    positions = app.table("positions", value_type=PositionState, key_type=tuple[str, str])
    reports = install_reports(
        app, positions=positions, mark_of=lambda symbol: None, multipliers={}, object_store=LocalObjectStore(tmp_path),
        questdb=stored_day["questdb"], clickhouse=clickhouse,
        settings=ReportsSection(trades_table=stored_day["trades"], snapshots_table=f"{stored_day['snapshots']}_none",
                                alerts_table=stored_day["alerts"]),
    )
    async with app:
        generation = await reports.generate(date(2026, 1, 5))
    assert {f.name: f.rows for f in generation.files if f.format == "csv"} == {
        "2026-01-05/compliance.csv": 0, "2026-01-05/daily_pnl.csv": 0, "2026-01-05/positions.csv": 0,
        "2026-01-05/trade_blotter.csv": 0,
    }
    blotter = pq.read_table(tmp_path / "reports" / "2026-01-05" / "trade_blotter.parquet")
    assert blotter.num_rows == 0 and blotter.schema.field("qty").type == pa.decimal128(38, 12)
    header = (tmp_path / "reports" / "2026-01-05" / "trade_blotter.csv").read_text().splitlines()[0]
    assert header.replace('"', "") == ",".join(TRADES_COLUMNS)


async def test_without_a_roll_into_the_next_day_the_days_last_snapshots_are_reported(stored_day, clickhouse, tmp_path):
    app = App("ptrc", MemoryTransport())
    positions = app.table("positions", value_type=PositionState, key_type=tuple[str, str])
    reports = install_reports(
        app, positions=positions, mark_of=lambda symbol: None, multipliers={}, object_store=LocalObjectStore(tmp_path),
        questdb=stored_day["questdb"], clickhouse=clickhouse,
        settings=ReportsSection(trades_table=stored_day["trades"], snapshots_table=stored_day["snapshots"],
                                alerts_table=stored_day["alerts"]),
    )
    next_day = date.fromordinal(DAY.toordinal() + 1)  # its own closing roll is not stored
    async with app:
        await reports.generate(next_day, ["daily_pnl"])
    text = (tmp_path / "reports" / next_day.isoformat() / "daily_pnl.csv").read_text()
    rows = {(r["level"], r["symbol"]): r for r in csv.DictReader(io.StringIO(text))}
    xyz = rows[("position", "XYZ")]
    assert (xyz["net_qty"], xyz["mark"], xyz["day_pnl"], xyz["valued_at"]) == ("-5", "95", "0", iso_ns(SNAPSHOTS[4]["ts"]))


# -- the blotter spool: exported during the day, checked against QuestDB at generation ----------

SPOOL_CELL_S = 3600  # 24 cells a day: few files, the same rules as 300


def fills_through_the_day(n: int, seed: int, prefix: str, lo: int = START, hi: int = END) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        ts = rng.randrange(lo, hi)
        out.append(trade(ts, f"{prefix}{i}", rng.choice(["BUY", "SELL"]), str(rng.randint(1, 500)),
                         str(D(rng.randint(10_000, 999_999)).scaleb(-4)), str(D(rng.randint(-20, 300)).scaleb(-2)),
                         str(D(rng.randint(-10**6, 10**6)).scaleb(-3)), str(rng.randint(-900, 900)),
                         symbol=rng.choice(["XYZ", "ABC", "ES"]), venue=rng.choice(["XNAS", "XNYS"])))
    return out


@pytest.fixture
async def trades_table(stack):
    table = f"rept_{uuid.uuid4().hex[:8]}_trades"
    questdb = QuestDBClient(host=stack.questdb_host, port=stack.questdb_http_port)
    writer = QuestDBWriter(host=stack.questdb_host, port=stack.questdb_http_port)
    await questdb.create_table(table, TRADES_COLUMNS, dedup_keys=("ts", "fill_id"))
    stored: list[dict] = []

    async def store(rows: list[dict]) -> None:
        await writer.write_batch(table, rows, symbols=LAYOUTS["ptrc_trades"].symbols)
        stored.extend(r for r in rows if not any(s["ts"] == r["ts"] and s["fill_id"] == r["fill_id"] for s in stored))
        await questdb.wait_visible(table, len(stored))

    try:
        yield {"questdb": questdb, "table": table, "store": store, "stored": stored}
    finally:
        await questdb.execute(f"DROP TABLE IF EXISTS {table}")
        await writer.close()
        await questdb.close()


def blotter_service(questdb, table: str, objects, spool_dir, **settings):
    app = App("ptrc", MemoryTransport())
    positions = app.table("positions", value_type=PositionState, key_type=tuple[str, str])
    reports = install_reports(
        app, positions=positions, mark_of=lambda symbol: None, multipliers={}, object_store=LocalObjectStore(objects),
        questdb=questdb, clickhouse=None,
        settings=ReportsSection(trades_table=table, snapshots_table=f"{table}_none", daily_delay_s=None,
                                spool_dir=str(spool_dir), spool_cell_s=SPOOL_CELL_S, **settings),
    )
    return app, reports


def blotter_files(objects, day: date = DAY) -> tuple[bytes, pa.Table]:
    folder = objects / "reports" / day.isoformat()
    return (folder / "trade_blotter.csv").read_bytes(), pq.read_table(folder / "trade_blotter.parquet")


def at(ns: int) -> datetime:
    return datetime.fromtimestamp(ns / NS, timezone.utc)


async def cold_blotter(t, tmp_path, day: date = DAY) -> tuple[bytes, pa.Table]:
    """The blotter exported in full, with nothing kept (what the spool must reproduce)."""
    objects = tmp_path / f"cold-{uuid.uuid4().hex[:6]}"
    app, reports = blotter_service(t["questdb"], t["table"], objects, objects / "spool", spool=False)
    async with app:
        generation = await reports.generate(day, ["trade_blotter"])
    assert generation.blotter["chunks_from_spool"] == 0
    return blotter_files(objects, day)


def fill_ids(csv_data: bytes) -> list[str]:
    return [row["fill_id"] for row in csv.DictReader(io.StringIO(csv_data.decode()))]


async def test_a_late_fill_in_a_spooled_cell_appears_exactly_once(trades_table, tmp_path):
    t = trades_table
    await t["store"](fills_through_the_day(300, seed=1, prefix="f") + [TRADES[0], TRADES[-1]])  # and one either side
    app, reports = blotter_service(t["questdb"], t["table"], tmp_path / "objects", tmp_path / "spool")
    async with app:
        done = await reports.spool_step(at(END + 60 * NS))  # the day has ended: every cell is exported
        assert done["rows_exported"] == 300 and done["exports"] >= 1
        chunks = reports.spool.chunks(DAY)
        assert sum(c.head.rows for c in chunks) == 300 and all(START <= c.head.lo < c.head.hi <= END for c in chunks)

        first = await reports.generate(DAY, ["trade_blotter"])
        assert first.blotter == {"rows": 300, "chunks_from_spool": len(chunks), "rows_from_spool": 300,
                                 "exports": 0, "rows_exported": 0}
        assert blotter_files(tmp_path / "objects") == await cold_blotter(t, tmp_path)

        # Late fills: inside the day (a spooled cell), on a cell's first nanosecond, and
        # the day's last one; and a rewrite of a stored fill with another fee (the same
        # dedup key: QuestDB keeps the new row).
        late = [trade(START + 13 * HOUR + 17, "late-1", "BUY", "1", "101.5", "0.25", "0", "1"),
                trade(START + 5 * HOUR, "late-2", "SELL", "2", "99", "0", "-3.5", "-1"),
                trade(END - 1, "late-3", "BUY", "3", "100", "0", "0", "2")]
        rewritten = dict(t["stored"][7], fee=t["stored"][7]["fee"] + D("0.01"))
        await t["store"](late + [rewritten])
        t["stored"][7] = rewritten
        second = await reports.generate(DAY, ["trade_blotter"])
        assert second.blotter["rows"] == 303 and second.blotter["chunks_from_spool"] >= 1
        assert second.blotter["exports"] >= 1 and second.blotter["rows_from_spool"] + second.blotter["rows_exported"] == 303
    csv_data, parquet = blotter_files(tmp_path / "objects")
    ids = fill_ids(csv_data)
    assert len(ids) == len(set(ids)) == 303 and {"late-1", "late-2", "late-3"} <= set(ids)
    in_day = sorted((r for r in t["stored"] if START <= r["ts"] < END), key=lambda r: (r["ts"], r["fill_id"]))
    assert [r["ts"] for r in in_day] == parquet.column("ts").cast(pa.int64()).to_pylist()  # time order
    fees = dict(zip(parquet.column("fill_id").to_pylist(), parquet.column("fee").to_pylist()))
    assert fees[rewritten["fill_id"]] == rewritten["fee"]
    assert (csv_data, parquet) == await cold_blotter(t, tmp_path)


async def test_a_restart_mid_day_neither_loses_nor_duplicates_blotter_rows(trades_table, tmp_path):
    t = trades_table
    morning = fills_through_the_day(150, seed=2, prefix="m", hi=START + 12 * HOUR)
    await t["store"](morning)
    spool_dir = tmp_path / "spool"
    app, reports = blotter_service(t["questdb"], t["table"], tmp_path / "objects", spool_dir)
    async with app:
        await reports.spool_step(at(START + 12 * HOUR + 30 * NS))
    assert sum(c.head.rows for c in reports.spool.chunks(DAY)) == 150
    # ptrc dies mid-write: a chunk never renamed into place, and one cut short.
    directory = reports.spool.day_dir(DAY)
    some = reports.spool.chunks(DAY)[0]
    shutil.copy(some.path, directory / f".{some.path.name}.tmp123")
    cut = directory / f"{START + 23 * HOUR}-{END}.chunk"
    cut.write_bytes(some.path.read_bytes()[:-100])

    # Restarted, ptrc stores the afternoon and, redelivered, the morning's last fills again.
    afternoon = fills_through_the_day(120, seed=3, prefix="a", lo=START + 12 * HOUR)
    await t["store"](morning[-40:] + afternoon)
    assert len(t["stored"]) == 270
    app, restarted = blotter_service(t["questdb"], t["table"], tmp_path / "objects", spool_dir)
    async with app:
        done = await restarted.spool_step(at(END + 60 * NS))
        assert done["cells_checked"] >= 24  # a new process checks the whole day once
        generation = await restarted.generate(DAY, ["trade_blotter"])
    assert generation.blotter["rows"] == 270 and generation.blotter["exports"] == 0
    csv_data, parquet = blotter_files(tmp_path / "objects")
    ids = fill_ids(csv_data)
    assert len(ids) == len(set(ids)) == 270
    assert (csv_data, parquet) == await cold_blotter(t, tmp_path)


async def test_todays_blotter_takes_the_unfinished_cell_from_questdb(trades_table, tmp_path):
    t = trades_table
    calendar = TradingDay()
    now = time.time_ns()
    today = calendar.of(at(now))
    day_start = calendar.window_ns(today)[0]
    lo, hi = max(day_start, now - 3 * HOUR), now - 60 * NS
    if hi > lo:  # (not in the day's first minute)
        await t["store"](fills_through_the_day(60, seed=4, prefix="e", lo=lo, hi=hi))
    app, reports = blotter_service(t["questdb"], t["table"], tmp_path / "objects", tmp_path / "spool",
                                   spool_settle_s=0)
    async with app:
        await reports.spool_step()
        spooled = reports.spool.chunks(today)
        assert all(c.head.hi <= time.time_ns() for c in spooled)  # only cells that have ended
        just_now = [trade(time.time_ns() - 1000 * i, f"n{i}", "BUY", "1", "100", "0", "0", "1") for i in range(3)]
        await t["store"](just_now)
        generation = await reports.generate(today, ["trade_blotter"])
    expected = sorted((r for r in t["stored"] if r["ts"] >= day_start), key=lambda r: (r["ts"], r["fill_id"]))
    csv_data, parquet = blotter_files(tmp_path / "objects", today)
    assert fill_ids(csv_data) == [r["fill_id"] for r in expected]
    assert generation.blotter["rows"] == len(expected) and generation.blotter["exports"] >= 1
    # the unfinished cell was exported but not kept: a later plan could not use it
    assert all(c.head.hi <= time.time_ns() for c in reports.spool.chunks(today))


async def test_a_spooled_chunk_that_cannot_be_read_costs_an_export_not_the_report(trades_table, tmp_path, monkeypatch):
    t = trades_table
    await t["store"](fills_through_the_day(80, seed=5, prefix="u"))
    app, reports = blotter_service(t["questdb"], t["table"], tmp_path / "objects", tmp_path / "spool")
    from posttrade.agents import reports as agent

    async with app:
        await reports.spool_step(at(END + 60 * NS))
        assert reports.spool.chunks(DAY)

        def vanished(self, csv_into):
            raise FileNotFoundError(self.path)

        monkeypatch.setattr(agent.SpooledChunk, "read", vanished)
        generation = await reports.generate(DAY, ["trade_blotter"])
    assert generation.blotter["rows"] == 80 and generation.blotter["chunks_from_spool"] == 0
    assert blotter_files(tmp_path / "objects") == await cold_blotter(t, tmp_path)


# -- a multi-currency day: the rates of the roll, stored with it ---------------------------------

REFERENCE = Reference(
    {"TOYOTA": Instrument(currency="JPY"), "USDJPY": Instrument(fx=FxPair("USD", "JPY")),
     "NESN": Instrument(currency="CHF")},
)


def fx_at(usdjpy: str | None) -> FxRates:
    return FxRates(REFERENCE, lambda s: (D(usdjpy), "quote_mid", START) if s == "USDJPY" and usdjpy else None)


def rolled(position: Position, mark: str, ts: int, fx: FxRates):
    """ptrc's roll update of `position` with the rates of that moment (as its keeper sends it)."""
    position.roll_day(D(mark))
    update = position_update(position, D(mark), "roll", ts)
    base = REFERENCE.base_currency(position.account)
    rates = {c: r.rate for c in (position.currency, *position.foreign_fees) if (r := fx.rate(c, base)) is not None}
    return msgspec.structs.replace(update, base_currency=base, fx_rates=rates)


async def test_a_past_multi_currency_day_is_reported_at_the_rates_of_its_roll(stack, tmp_path):
    """TOYOTA (JPY) held into DAY at USDJPY 150, 40 of 100 sold on DAY, rolled into the
    next day at USDJPY 160: DAY's P&L of 6940 JPY is 43.375 USD, whatever USDJPY is when
    the report is made (170 here). NESN (CHF) has no rate: its base figures and the
    account's totals are null, with CHF in missing_rates."""
    toyota = Position("ACC1", "TOYOTA", currency="JPY")
    toyota.apply(Fill(ts=START - HOUR, fill_id="t1", account="ACC1", symbol="TOYOTA", side="BUY", qty=D(100),
                      price=D(2000)))
    nesn = Position("ACC1", "NESN", currency="CHF")
    nesn.apply(Fill(ts=START - HOUR, fill_id="n1", account="ACC1", symbol="NESN", side="BUY", qty=D(5), price=D(100)))
    updates = [rolled(toyota, "2000", START + 5, fx_at("150")), rolled(nesn, "100", START + 5, fx_at("150"))]
    toyota.apply(Fill(ts=START + 9 * HOUR, fill_id="t2", account="ACC1", symbol="TOYOTA", side="SELL", qty=D(40),
                      price=D(2100), fee=D(60)))
    updates += [rolled(toyota, "2050", END + 5, fx_at("160")), rolled(nesn, "101", END + 5, fx_at("160"))]

    table = f"rept_{uuid.uuid4().hex[:8]}_snapshots"
    questdb = QuestDBClient(host=stack.questdb_host, port=stack.questdb_http_port)
    writer = QuestDBWriter(host=stack.questdb_host, port=stack.questdb_http_port)
    layout = LAYOUTS["position_snapshots"]
    try:
        await questdb.create_table(table, layout.table_columns, dedup_keys=("ts", "account", "symbol", "reason"))
        records = [EventRecord(ptrc_rows.snapshot_record(u, REFERENCE), "POSITIONS", i, "s", 0, 1, None)
                   for i, u in enumerate(updates)]
        await writer.write_batch(table, layout.build_columns(records), symbols=layout.symbols, at="ts")
        await questdb.wait_visible(table, len(records))
        app = App("ptrc", MemoryTransport())
        positions = app.table("positions", value_type=PositionState, key_type=tuple[str, str])
        reports = install_reports(
            app, positions=positions, mark_of=lambda symbol: None, fx=fx_at("170"),
            object_store=LocalObjectStore(tmp_path), questdb=questdb, clickhouse=None,
            settings=ReportsSection(trades_table=f"{table}_none", snapshots_table=table, spool=False),
        )
        async with app:
            await reports.generate(DAY, ["daily_pnl", "positions"])
    finally:
        await questdb.execute(f"DROP TABLE IF EXISTS {table}")
        await writer.close()
        await questdb.close()
    folder = tmp_path / "reports" / DAY.isoformat()
    pnl = {(r["level"], r["symbol"]): r for r in csv.DictReader(io.StringIO((folder / "daily_pnl.csv").read_text()))}
    t = pnl[("position", "TOYOTA")]
    assert (t["currency"], t["day_pnl"], t["base_currency"], t["fx_rate"]) == ("JPY", "6940", "USD", "0.00625")
    assert (t["day_pnl_base"], t["total_pnl_base"], t["unrealized_pnl_base"], t["fees_base"]) == (
        "43.375", "43.375", "18.75", "0.375")
    n = pnl[("position", "NESN")]
    assert (n["currency"], n["day_pnl"], n["fx_rate"], n["day_pnl_base"], n["missing_rates"]) == ("CHF", "5", "", "", "CHF")
    total = pnl[("account", "")]
    assert (total["currency"], total["day_pnl"], total["day_pnl_base"], total["missing_rates"]) == ("USD", "", "", "CHF")
    held = pq.read_table(folder / "positions.parquet")
    assert held.column("symbol").to_pylist() == ["NESN", "TOYOTA"]
    assert held.column("market_value_base").to_pylist() == [None, D("768.75")]  # 60 x 2050 / 160
    assert held.column("fx_rate").to_pylist() == [None, D("0.00625")]
