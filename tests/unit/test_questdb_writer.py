"""questdb_writer without servers: layouts, back-off, statistics, and the sink's agent on
the in-memory transport writing into `TableDouble`, a stand-in that behaves like QuestDB
where the sink depends on it: one request is all-or-nothing, DEDUP UPSERT KEYS, refusal
of bad values, being away, and a WAL that shows a commit to SQL only once applied. The
same behaviours are checked against the real QuestDB in
tests/integration/test_questdb_writer.py."""

from __future__ import annotations

import asyncio
import math
import re
from decimal import Decimal
from pathlib import Path
from urllib.parse import quote_plus

import httpx
import msgspec
import numpy as np
import pandas as pd
import pytest

from posttrade.sinks import RateWindow, RetryPolicy, percentile
from posttrade.stores.questdb import first_arrivals
from posttrade.stores.questdb.first_arrivals import in_lists
from posttrade.stores.questdb.layouts import DECIMAL_SQL, LAYOUTS, BadRows
from posttrade.stores.questdb.sink import TableStats
from posttrade.app import App
from posttrade.config import ConfigError, load_config
from posttrade.services import questdb_writer as service
from posttrade.stores.questdb import QuestDBUnavailableError, QuestDBWriteError, SqlResult
from posttrade.streams.events import (
    Bar, Fill, MarketTrade, Order, PnlAccountRow, PnlPositionRow, PnlSnapshot, Quote, encode,
)  # fmt: skip
from posttrade.streams.memory import MemoryConsumer, MemoryTransport
from posttrade.streams.stream import EventRecord
from posttrade.web.server import build_web_app

T0 = 1_700_000_000_000_000_000
CONFIG_FILE = Path(__file__).parents[2] / "config" / "backend" / "questdb_writer" / "config.yaml"


def record(value, seq: int) -> EventRecord:
    return EventRecord(value, "S", seq, "subject", T0, 1, None)


def quote(i: int, bid: str = "100.25") -> Quote:
    venue = None if i % 2 else "XNAS"
    price = Decimal(bid)
    return Quote(ts=T0 + i, symbol=f"S{i % 3}", bid=price, ask=price + 1, bid_size=Decimal(i), venue=venue)


def column_values(values) -> list:
    """A built column as plain Python values, None for NULL."""
    out = []
    for v in list(values):
        if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
            out.append(None)
        elif isinstance(v, np.integer):
            out.append(int(v))
        else:
            out.append(v)
    return out


# -- layouts ---------------------------------------------------------------------------


SAMPLES = {
    "market_trades": MarketTrade(
        ts=T0, symbol="BRK.B", price=Decimal("412.5"), size=Decimal("10"), trade_id=None, venue="XNYS", aggressor="BUY"
    ),
    "quotes": Quote(ts=T0, symbol="AAPL", bid=Decimal("189.99"), ask=Decimal("190.01"), bid_size=Decimal(300)),
    "bars": Bar(
        ts=T0, symbol="AAPL", interval="1m", open=Decimal(1), high=Decimal(3), low=Decimal("0.5"), close=Decimal(2),
        volume=Decimal(7), vwap=Decimal(2) / Decimal(3), count=4,
    ),  # fmt: skip
    "fills": Fill(
        ts=T0, fill_id="F-1", account="ACC1", symbol="ESZ5", side="BUY", qty=Decimal(2), price=Decimal("4512.25"),
        fee=Decimal("-0.35"), order_id="O-7",
    ),  # fmt: skip
    "orders": Order(
        ts=T0, order_id="O-7", account="ACC1", symbol="ESZ5", side="SELL", qty=Decimal(2), order_type="LIMIT",
        limit_price=Decimal("4500"),
    ),  # fmt: skip
}


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_layout_columns_match_the_event_and_the_table(name):
    layout = LAYOUTS[name]
    event = SAMPLES[name]
    assert isinstance(event, layout.event_type)
    table = layout.table_columns
    assert table["ts"] == "TIMESTAMP_NS" and table["stream_seq"] == "LONG"
    # Every field of the event is stored, nothing is invented but stream_seq.
    assert set(table) == set(msgspec.structs.asdict(event)) | {"stream_seq"}
    assert all(not key == "ts" for key in layout.dedup_keys)
    built = layout.build_columns([record(event, 41), record(event, 42)])
    assert list(built) == list(table)
    assert column_values(built["ts"]) == [T0, T0]
    assert column_values(built["stream_seq"]) == [41, 42]
    for column in layout.columns:
        if column.name in ("ts", "stream_seq"):
            continue
        expected = getattr(event, column.field or column.name)
        got = column_values(built[column.name])[0]
        if column.kind == "rounded_decimal":
            assert got == expected.quantize(Decimal("1e-12"))
        else:
            assert got == expected, column.name
        if column.kind in ("decimal", "rounded_decimal"):
            assert table[column.name] == DECIMAL_SQL


def test_the_bus_channels_and_the_services_outputs_have_a_layout_each():
    assert set(LAYOUTS) == set(SAMPLES) | {"ptrc_trades", "position_snapshots", "pnl_snapshots", "pnl_account_snapshots"}


def test_a_pnl_snapshot_becomes_a_row_per_position_and_per_account_at_the_snapshot_time():
    position = PnlPositionRow(
        account="ACC1", symbol="AAPL", as_of=T0 - 5, currency="USD", base_currency="EUR", mark_source="quote_mid",
        fill_count=3, fx_rate="0.9", net_qty=Decimal(10), total_pnl=Decimal("12.5"), total_pnl_base=Decimal("11.25"),
    )  # fmt: skip
    account = PnlAccountRow(account="ACC1", as_of=T0 - 5, base_currency="EUR", positions=2, open_positions=1,
                            total_pnl=Decimal("11.25"))
    snapshot = PnlSnapshot(ts=T0, part=0, positions=[position, position], accounts=[account])
    for name, expected in (("pnl_snapshots", position), ("pnl_account_snapshots", account)):
        layout = LAYOUTS[name]
        assert layout.timestamp_columns == ("as_of",)
        rows = layout.rows([record(snapshot, 7)], None)
        assert len(rows) == (2 if name == "pnl_snapshots" else 1)
        assert all(r.seq == 7 for r in rows)  # a row keeps its message, to dead-letter it
        built = layout.build_columns(rows)
        assert set(built) == {"ts"} | set(msgspec.structs.asdict(expected)) - {"part"}
        assert column_values(built["ts"])[0] == T0 and column_values(built["as_of"])[0] == T0 - 5
        assert column_values(built["total_pnl"])[0] == expected.total_pnl
        assert column_values(built["account"])[0] == "ACC1"


def test_decimals_are_exact_and_a_value_that_does_not_fit_is_refused_not_rounded():
    layout = LAYOUTS["quotes"]
    built = layout.build_columns([record(quote(1, bid="0.000000000001"), 1)])
    assert column_values(built["bid"]) == [Decimal("0.000000000001")]
    # Values beyond the bound never decode (core.bounds); the sink still refuses, never
    # rounds, one that reaches it.
    with pytest.raises(BadRows, match="bid"):
        layout.build_columns([record(unchecked(quote(1), bid=Decimal("0.0000000000001")), 1)])  # 13 places
    with pytest.raises(BadRows, match="bid"):
        layout.build_columns([record(unchecked(quote(1), bid=Decimal("1" + "0" * 26)), 1)])  # 27 integer digits


def unchecked(event, **changes):
    """A copy of `event` with `changes`, skipping the validation (what decoding refuses)."""
    copy = msgspec.structs.replace(event)
    for name, value in changes.items():
        msgspec.structs.force_setattr(copy, name, value)
    return copy


def test_bar_vwap_is_rounded_half_even_to_the_column_scale():
    bar = msgspec.structs.replace(SAMPLES["bars"], vwap=Decimal("2.0000000000005"))
    built = LAYOUTS["bars"].build_columns([record(bar, 1)])
    assert column_values(built["vwap"]) == [Decimal("2.000000000000")]
    built = LAYOUTS["bars"].build_columns([record(msgspec.structs.replace(bar, vwap=None), 1)])
    assert column_values(built["vwap"]) == [None]


def test_dedup_keys_identify_a_row_per_message():
    # Two quotes of one symbol at the same ns are two rows: the stream sequence tells them apart.
    assert LAYOUTS["quotes"].dedup_keys == ("symbol", "stream_seq")
    assert LAYOUTS["market_trades"].dedup_keys == ("symbol", "stream_seq")
    assert LAYOUTS["fills"].dedup_keys == ("fill_id",)
    assert LAYOUTS["orders"].dedup_keys == ("order_id", "status")
    assert LAYOUTS["bars"].dedup_keys == ("symbol", "interval")
    # Only fills keep the first arrival of a key: a resent fill_id is never written.
    assert {name: layout.first_arrival for name, layout in LAYOUTS.items()} == {
        "market_trades": None, "quotes": None, "bars": None, "fills": "fill_id", "orders": None,
        "ptrc_trades": None, "position_snapshots": None, "pnl_snapshots": None, "pnl_account_snapshots": None,
    }  # fmt: skip


def test_a_bust_without_economics_becomes_a_row_with_null_side_qty_and_price():
    bust = Fill(ts=T0, fill_id="F-9", account="ACC1", symbol="ESZ5", exec_type="BUST", ref_fill_id="F-1")
    built = LAYOUTS["fills"].build_columns([record(bust, 7)])
    row = {name: column_values(values)[0] for name, values in built.items()}
    assert row["side"] is None and row["qty"] is None and row["price"] is None
    assert row["fee"] == Decimal(0) and row["exec_type"] == "BUST" and row["ref_fill_id"] == "F-1"


def test_fill_id_look_ups_are_split_to_fit_questdbs_request_line():
    ids = [f"F-{i:07d}" for i in range(3000)] + ["it's", "naïve id"]
    lists = list(in_lists(ids, budget=4000))
    assert len(lists) > 1
    assert all(len(quote_plus(in_list)) <= 4000 for in_list in lists)
    literals = [literal for in_list in lists for literal in re.findall(r"'(?:[^']|'')*'", in_list)]
    assert literals == [f"'{i}'" for i in ids[:-2]] + ["'it''s'", "'naïve id'"]  # every id once, in order, quoted
    assert list(in_lists([])) == []


# -- back-off and statistics -----------------------------------------------------------


def test_retry_policy_backs_off_within_and_between_cycles():
    policy = RetryPolicy(attempts=3, initial_s=0.25, max_s=5.0)
    assert [policy.delay(0, a) for a in range(3)] == [0.25, 0.5, 2.0]
    assert [policy.delay(1, a) for a in range(3)] == [0.25, 0.5, 4.0]
    assert policy.delay(5, 2) == 5.0  # capped
    with pytest.raises(ValueError):
        RetryPolicy(attempts=0)


def test_rate_window_counts_the_last_seconds():
    now = [1000.0]
    window = RateWindow(60, clock=lambda: now[0])
    window.add(100)
    now[0] = 1005.5
    window.add(50)
    assert window.rate(10) == 15.0
    assert window.rate(60) == 2.5
    now[0] = 1012.0  # the first bucket (second 1000) is now older than 10 s
    assert window.rate(10) == 5.0
    now[0] = 1070.0
    assert window.rate(60) == 0.0
    with pytest.raises(ValueError):
        window.rate(61)


def test_percentile_and_table_stats_snapshot():
    assert percentile([], 50) is None
    assert percentile([1, 2, 3, 4], 50) == 2
    assert percentile(list(range(1, 101)), 99) == 99
    stats = TableStats("t")
    stats.batch_taken(10)
    stats.batch_taken(30)
    stats.written(40, 0.010)
    snap = stats.snapshot()
    assert snap["batch_size"] == {"mean": 20.0, "max": 30}
    assert snap["rows"] == 40 and snap["flush_latency_ms"]["p50"] == 10.0
    assert snap["rows_per_s"]["10s"] == 4.0


# -- the sink on the in-memory transport -----------------------------------------------


class TableDouble:
    """Stands in for QuestDBWriter and QuestDBClient together (see the module docstring)."""

    base_url = "http://questdb-double"

    def __init__(self) -> None:
        self.tables: dict[str, dict[tuple, dict]] = {}
        self.keys: dict[str, list[str]] = {}
        self.columns: dict[str, list[str]] = {}
        self.down = False
        self.refuse = lambda row: False  # rows QuestDB would reject as bad data
        self.requests = 0
        self.lookups: list[str] = []  # the SELECT ... WHERE key IN (...) queries asked
        self.reads: list[str] = []  # the SELECT key FROM t LIMIT lo, hi queries asked
        # WAL: each accepted write is a transaction; SQL sees a row once its transaction
        # is applied, at once unless `hold_wal` (then at `apply()`).
        self.hold_wal = False
        self.sequencer_txn: dict[str, int] = {}
        self.writer_txn: dict[str, int] = {}
        self.row_txn: dict[str, dict[tuple, int]] = {}

    def apply(self) -> None:
        self.writer_txn.update(self.sequencer_txn)

    def visible(self, table: str) -> list[dict]:
        applied = self.writer_txn.get(table, 0)
        return [row for key, row in self.tables[table].items() if self.row_txn[table][key] <= applied]

    async def create_table(self, table, columns, *, timestamp, partition_by, dedup_keys, wal):
        if self.down:
            raise QuestDBUnavailableError("connection refused")
        assert wal and partition_by == "DAY" and timestamp == "ts"
        self.tables.setdefault(table, {})
        self.keys[table] = ["ts", *dedup_keys]
        existing = self.columns.setdefault(table, [])
        existing += [name for name in columns if name not in existing]  # as the client adds them

    async def query(self, sql):
        if self.down:
            raise QuestDBUnavailableError("connection refused")
        if (columns_of := re.fullmatch(r".* FROM table_columns\('(\w+)'\)", sql)) is not None:
            return SqlResult(["column"], ["STRING"], [[c] for c in self.columns[columns_of[1]]])
        if (wal := re.fullmatch(r"SELECT writerTxn, sequencerTxn, suspended, errorMessage FROM wal_tables\(\) WHERE name = '(\w+)'", sql)) is not None:  # fmt: skip
            table = wal[1]
            state = [self.writer_txn.get(table, 0), self.sequencer_txn.get(table, 0), False, None]
            return SqlResult(["writerTxn", "sequencerTxn", "suspended", "errorMessage"], [], [state])
        if (page := re.fullmatch(r"SELECT (\w+) FROM (\w+) LIMIT (\d+), (\d+)", sql)) is not None:
            self.reads.append(sql)
            column, table, start, end = page.groups()
            rows = self.visible(table)[int(start) : int(end)]
            return SqlResult([column], ["VARCHAR"], [[row[column]] for row in rows])
        column, table, column_again, in_list = re.fullmatch(r"SELECT (\w+) FROM (\w+) WHERE (\w+) IN \((.*)\)", sql).groups()
        assert column == column_again
        self.lookups.append(sql)
        wanted = {literal.replace("''", "'") for literal in re.findall(r"'((?:[^']|'')*)'", in_list)}
        return SqlResult([column], ["VARCHAR"], [[row[column]] for row in self.visible(table) if row[column] in wanted])

    async def execute(self, sql):
        table, added = re.fullmatch(r"ALTER TABLE (\w+) ADD COLUMN (.*)", sql).groups()
        definitions = re.split(r",\s*(?![^()]*\))", added)  # commas outside DECIMAL(p, s)
        self.columns[table] += [definition.split()[0] for definition in definitions]

    async def write_batch(self, table, columns, *, symbols, at, timestamp_columns=()):
        self.requests += 1
        if self.down:
            raise QuestDBWriteError("cannot connect", bad_data=False)
        names = list(columns)
        rows = [dict(zip(names, values)) for values in zip(*(column_values(c) for c in columns.values()))]
        for i, row in enumerate(rows):
            if self.refuse(row):
                raise QuestDBWriteError(f"error in line {i + 1}: bad value", bad_data=True)
        stored = self.tables[table]  # KeyError: written before create_table
        assert set(names) <= set(self.columns[table]), "a column the table does not have"
        txn = self.sequencer_txn[table] = self.sequencer_txn.get(table, 0) + 1
        for row in rows:
            key = tuple(row[k] for k in self.keys[table])
            stored[key] = row
            self.row_txn.setdefault(table, {})[key] = txn
        if not self.hold_wal:
            self.writer_txn[table] = txn
        return len(rows)

    async def close(self):
        pass

    async def ping(self):
        if self.down:
            raise QuestDBUnavailableError("connection refused")
        return True


def writer_config(route: str = "quotes", **batch) -> service.QuestDBWriterConfig:
    routes = {name: {"channel": name, "table": f"t_{name}", "enabled": name == route} for name in LAYOUTS}
    return msgspec.convert(
        {
            "service": {"name": "qw", "port": 0},
            "batch": {"size": 100, "interval_sec": 0.05, "max_retry": 2, "retry_initial_s": 0.01, "retry_max_s": 0.05,
                      **batch},
            "writer": {"routes": routes},
        },
        service.QuestDBWriterConfig,
    )


def make_writer(config=None):
    transport = MemoryTransport()
    config = config or writer_config()
    db = TableDouble()
    app = service.build(config, transport=transport, writer=db, client=db).app
    app.runtime.poll_timeout_s = 0.05
    return app, transport, db


async def publish_quotes(transport, items):
    for i in items:
        data = i if isinstance(i, bytes) else encode(quote(i))
        await transport.publish("md.quotes.X", data)


def ack_floor(transport) -> int:
    return transport.ack_floors.get(("QUOTES", "qw-write_quotes"), 0)


async def wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


async def get_json(app, path):
    web = build_web_app(app)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=web), base_url="http://writer") as http:
        response = await http.get(path)
    return response.status_code, response.json()


async def test_rows_written_once_in_batches_and_acknowledged_after_the_write():
    app, transport, db = make_writer()
    async with app:
        await publish_quotes(transport, range(1, 251))
        await wait_for(lambda: ack_floor(transport) == 250)
        assert len(db.tables["t_quotes"]) == 250
        status, stats = await get_json(app, "/stats")
    assert status == 200
    table = stats["tables"]["t_quotes"]
    assert table["rows"] == 250 and stats["totals"]["rows"] == 250
    assert table["batch_size"]["max"] <= 100 and table["batches"] >= 3
    assert table["errors"] == table["retries"] == table["dead_lettered"] == 0
    assert table["dedup_keys"] == ["ts", "symbol", "stream_seq"]
    assert table["stream"] == "QUOTES" and table["subjects"] == ["md.quotes.>"]


async def test_a_small_batch_is_written_when_the_interval_passes():
    app, transport, db = make_writer(writer_config(size=10_000, interval_sec=0.1))
    async with app:
        await publish_quotes(transport, [1, 2, 3])
        await wait_for(lambda: ack_floor(transport) == 3, timeout=2.0)
        assert len(db.tables["t_quotes"]) == 3


async def test_questdb_away_holds_the_batch_unacknowledged_and_retries(monkeypatch):
    keep_alives = []

    async def in_progress(self, delivery):
        keep_alives.append(delivery.seq)

    monkeypatch.setattr(MemoryConsumer, "in_progress", in_progress)
    app, transport, db = make_writer()
    async with app:
        await wait_for(lambda: db.keys.get("t_quotes") is not None)
        db.down = True
        await publish_quotes(transport, range(1, 51))
        await wait_for(lambda: db.requests >= 6)  # three cycles of two attempts
        assert ack_floor(transport) == 0  # nothing acknowledged while QuestDB is away
        assert keep_alives and max(keep_alives) <= 50  # the batch in hand is kept alive
        status, health = await get_json(app, "/health")
        assert status == 503 and health["checks"]["questdb"]["ok"] is False
        _, stats = await get_json(app, "/stats")
        assert stats["tables"]["t_quotes"]["writes_failing_since"] is not None
        db.down = False
        await wait_for(lambda: ack_floor(transport) == 50)
        assert len(db.tables["t_quotes"]) == 50
        status, health = await get_json(app, "/health")
        assert status == 200
        _, stats = await get_json(app, "/stats")
    table = stats["tables"]["t_quotes"]
    assert table["retries"] >= 5 and table["errors"] == table["retries"]
    assert table["dead_lettered"] == 0 and "DLQ" not in [n for n, s in transport.streams.items() if s.messages]
    assert table["writes_failing_since"] is None


async def test_tables_are_created_before_the_first_row_even_when_questdb_starts_late():
    app, transport, db = make_writer()
    db.down = True
    async with app:  # the start-up creation fails: the service starts anyway
        await publish_quotes(transport, range(1, 11))
        await asyncio.sleep(0.1)
        assert "t_quotes" not in db.tables
        db.down = False
        await wait_for(lambda: ack_floor(transport) == 10)
    assert len(db.tables["t_quotes"]) == 10


async def test_columns_missing_from_an_existing_table_are_added_before_writing():
    app, transport, db = make_writer()
    db.tables["t_quotes"] = {}
    db.columns["t_quotes"] = ["ts", "symbol", "bid", "stream_seq"]  # made by an older layout
    async with app:
        await publish_quotes(transport, [1])
        await wait_for(lambda: ack_floor(transport) == 1)
    assert db.columns["t_quotes"] == ["ts", "symbol", "bid", "stream_seq", "venue", "ask", "bid_size", "ask_size"]
    assert len(db.tables["t_quotes"]) == 1


async def test_rows_questdb_refuses_are_dead_lettered_and_the_rest_written():
    app, transport, db = make_writer()
    bad_seqs = {7, 8, 40}
    db.refuse = lambda row: row["stream_seq"] in bad_seqs
    async with app:
        await publish_quotes(transport, range(1, 61))
        await publish_quotes(transport, [b'{"symbol": "X"}'])  # never decodes: the runtime's dead letter
        await wait_for(lambda: ack_floor(transport) == 61)
        _, stats = await get_json(app, "/stats")
    written = sorted(row["stream_seq"] for row in db.tables["t_quotes"].values())
    assert written == [s for s in range(1, 61) if s not in bad_seqs]
    dlq = transport.streams["DLQ"].messages
    refused = [m for m in dlq if "QuestDB table t_quotes cannot take the row" in m[2]["Posttrade-Reason"]]
    assert sorted(int(m[2]["Posttrade-Seq"]) for m in refused) == sorted(bad_seqs)
    assert all("bad value" in m[2]["Posttrade-Reason"] for m in refused)
    assert refused[0][1] == encode(quote(7))  # the original bytes
    table = stats["tables"]["t_quotes"]
    assert table["dead_lettered"] == 3 and table["dead_lettered_undecodable"] == 1
    assert table["rows"] == 57 and table["rejected_batches"] >= 3
    assert stats["totals"]["dead_lettered"] == 4


async def test_a_value_that_cannot_be_built_is_dead_lettered_without_asking_questdb():
    app, transport, db = make_writer()
    async with app:
        await publish_quotes(transport, [1, 2])
        await transport.publish("md.quotes.X", encode(unchecked(quote(3), bid=Decimal("1.0000000000001"))))
        await publish_quotes(transport, [4])
        await wait_for(lambda: ack_floor(transport) == 4)
    assert sorted(row["stream_seq"] for row in db.tables["t_quotes"].values()) == [1, 2, 4]
    (dead,) = transport.streams["DLQ"].messages
    # Refused when decoded (core.bounds), before the sink sees it.
    assert dead[2]["Posttrade-Seq"] == "3" and "bid must have at most 12 decimal places" in dead[2]["Posttrade-Reason"]


async def test_stopping_while_questdb_is_away_leaves_the_batch_for_the_next_run():
    app, transport, db = make_writer()
    async with app:
        await wait_for(lambda: db.keys.get("t_quotes") is not None)
        db.down = True
        await publish_quotes(transport, range(1, 21))
        await wait_for(lambda: db.requests >= 2)
    assert ack_floor(transport) == 0
    assert "DLQ" not in transport.streams or not transport.streams["DLQ"].messages
    db.down = False
    # The next run (same durable consumer) gets the batch again and writes it.
    app2 = service.build(writer_config(), transport=transport, writer=db, client=db).app
    app2.runtime.poll_timeout_s = 0.05
    async with app2:
        await wait_for(lambda: ack_floor(transport) == 20)
    assert len(db.tables["t_quotes"]) == 20


async def test_the_next_batch_is_taken_while_one_is_written_but_acknowledged_only_after_it():
    app, transport, db = make_writer()
    release = asyncio.Event()
    taken_while_writing = []
    write_batch = db.write_batch

    async def slow_write(table, columns, *, symbols, at, timestamp_columns=()):
        if db.requests == 0:  # the first batch: QuestDB takes its time
            await wait_for(lambda: app.agents["write_quotes"].stream.mark().seq > 100)
            taken_while_writing.append(app.agents["write_quotes"].stream.mark().seq)
            await release.wait()
        return await write_batch(table, columns, symbols=symbols, at=at)

    db.write_batch = slow_write
    async with app:
        await publish_quotes(transport, range(1, 151))
        await wait_for(lambda: bool(taken_while_writing))
        assert ack_floor(transport) == 0  # neither batch is acknowledged before the first is written
        release.set()
        await wait_for(lambda: ack_floor(transport) == 150)
    assert taken_while_writing == [150]
    assert sorted(row["stream_seq"] for row in db.tables["t_quotes"].values()) == list(range(1, 151))


async def test_a_batch_is_decoded_in_one_call_and_each_bad_message_dead_lettered_with_its_reason():
    app, transport, db = make_writer()
    bad = {
        3: b'{"symbol": "X"}',  # a field missing
        5: b"",  # empty
        6: b"  ",  # blank: would hide from a one-per-line decode
        7: encode(quote(7)) + b" " + encode(quote(7)),  # two values in one message
    }
    async with app:
        await wait_for(lambda: db.keys.get("t_quotes") is not None)
        for seq in range(1, 11):
            await transport.publish("md.quotes.X", bad.get(seq, encode(quote(seq))))
        await wait_for(lambda: ack_floor(transport) == 10)
        # A message with a newline (valid JSON over two lines) is decoded on its own.
        await transport.publish("md.quotes.X", encode(quote(11)).replace(b",", b",\n", 1))
        await publish_quotes(transport, [12])
        await wait_for(lambda: ack_floor(transport) == 12)
        _, stats = await get_json(app, "/stats")
    assert sorted(row["stream_seq"] for row in db.tables["t_quotes"].values()) == [1, 2, 4, 8, 9, 10, 11, 12]
    reasons = {int(m[2]["Posttrade-Seq"]): m[2]["Posttrade-Reason"] for m in transport.streams["DLQ"].messages}
    assert sorted(reasons) == [3, 5, 6, 7]
    assert "invalid Quote" in reasons[3] and "bid" in reasons[3]
    assert all("malformed JSON" in reasons[seq] for seq in (5, 6, 7))
    assert stats["tables"]["t_quotes"]["dead_lettered_undecodable"] == 4


async def test_a_redelivered_batch_lands_on_the_rows_it_already_made():
    app, transport, db = make_writer()
    async with app:
        await publish_quotes(transport, range(1, 31))
        await wait_for(lambda: ack_floor(transport) == 30)
    transport.ack_floors[("QUOTES", "qw-write_quotes")] = 0  # as if no ack had reached the server
    app2 = service.build(writer_config(), transport=transport, writer=db, client=db).app
    app2.runtime.poll_timeout_s = 0.05
    async with app2:
        await wait_for(lambda: ack_floor(transport) == 30)
    assert len(db.tables["t_quotes"]) == 30


# -- fills: the first arrival of a fill_id is the row ------------------------------------


def fill(fill_id: str, ts: int = T0, price: str = "100", **fields) -> Fill:
    values = dict(account="ACC1", symbol="ESZ5", side="BUY", qty=Decimal(2), price=Decimal(price))
    return Fill(ts=ts, fill_id=fill_id, **{**values, **fields})


async def publish_fills(transport, fills) -> None:
    for f in fills:
        await transport.publish("trading.fills.ACC1.ESZ5", encode(f))


def fills_floor(transport) -> int:
    return transport.ack_floors.get(("FILLS", "qw-write_fills"), 0)


def fill_rows(db) -> dict[str, tuple]:
    """fill_id -> (ts, price, stream_seq) of every row of the fills table."""
    rows = db.tables["t_fills"].values()
    assert len({row["fill_id"] for row in rows}) == len(rows), "a fill_id with two rows"
    return {row["fill_id"]: (row["ts"], row["price"], row["stream_seq"]) for row in rows}


def restarted(transport, db) -> App:
    """The writer again, on the same durable consumer and QuestDB: a restart."""
    app = service.build(writer_config("fills"), transport=transport, writer=db, client=db).app
    app.runtime.poll_timeout_s = 0.05
    return app


@pytest.mark.parametrize("resent_ts", [T0 + 1, T0 + 3_600_000_000_000], ids=["same ts", "another ts"])
async def test_a_resent_fill_id_never_changes_or_adds_a_row(resent_ts, monkeypatch):
    monkeypatch.setattr(first_arrivals, "ADDED_HASHES_MERGED_AT", 2)  # F-1 is found in the sorted array
    app, transport, db = make_writer(writer_config("fills"))
    async with app:
        await publish_fills(transport, [fill("F-1", T0 + 1, "100"), fill("F-2", T0 + 2)])
        await wait_for(lambda: fills_floor(transport) == 2)
        # Later, the same execution again with other economics (and maybe another ts).
        await publish_fills(transport, [fill("F-1", resent_ts, "101"), fill("F-3", T0 + 3)])
        await wait_for(lambda: fills_floor(transport) == 4)
        _, stats = await get_json(app, "/stats")
    assert fill_rows(db) == {"F-1": (T0 + 1, Decimal(100), 1), "F-2": (T0 + 2, Decimal(100), 2), "F-3": (T0 + 3, Decimal(100), 4)}  # fmt: skip
    table = stats["tables"]["t_fills"]
    assert table["resends"] == 1 and stats["totals"]["resends"] == 1 and table["rows"] == 3
    assert table["first_arrival_key"] == "fill_id" and table["dead_lettered"] == 0


async def test_a_fill_id_twice_in_one_batch_is_written_once_the_first_time():
    app, transport, db = make_writer(writer_config("fills", size=100, interval_sec=0.3))
    async with app:
        await publish_fills(transport, [fill("F-1", T0 + 5, "100"), fill("F-2"), fill("F-1", T0 + 1, "99")])
        await wait_for(lambda: fills_floor(transport) == 3)
    assert fill_rows(db) == {"F-1": (T0 + 5, Decimal(100), 1), "F-2": (T0, Decimal(100), 2)}
    assert db.requests == 1  # one batch, one write


async def test_a_fill_resent_after_a_restart_is_found_in_questdb(monkeypatch):
    monkeypatch.setattr(first_arrivals, "READ_PAGE_ROWS", 2)  # the table is read in pages
    app, transport, db = make_writer(writer_config("fills"))
    async with app:
        await publish_fills(transport, [fill(f"F-{i}", T0 + i, "100") for i in range(1, 6)])
        await wait_for(lambda: fills_floor(transport) == 5)
    assert db.lookups == []  # new fill ids are never looked up
    async with restarted(transport, db):  # remembers nothing of the first run in memory
        await publish_fills(transport, [fill("F-5", T0 + 9, "101"), fill("F-6", T0 + 6, "100")])
        await wait_for(lambda: fills_floor(transport) == 7)
    assert fill_rows(db) == {f"F-{i}": (T0 + i, Decimal(100), i) for i in range(1, 6)} | {"F-6": (T0 + 6, Decimal(100), 7)}  # fmt: skip
    assert len(db.reads) == 1 + 3 and all(page.endswith(f"LIMIT {lo}, {lo + 2}") for lo, page in zip((0, 2, 4), db.reads[1:]))  # fmt: skip
    assert len(db.lookups) == 1 and "'F-5'" in db.lookups[0] and "'F-6'" not in db.lookups[0]


async def test_questdb_decides_when_another_fill_id_has_the_same_hash(monkeypatch):
    monkeypatch.setattr(first_arrivals, "hash", lambda key: 42, raising=False)  # every fill id collides
    monkeypatch.setattr(first_arrivals, "ADDED_HASHES_MERGED_AT", 1)  # the written hashes go into the array at once
    app, transport, db = make_writer(writer_config("fills"))
    async with app:
        await publish_fills(transport, [fill("F-1", T0 + 1, "100")])
        await wait_for(lambda: fills_floor(transport) == 1)
        await publish_fills(transport, [fill("F-2", T0 + 2, "100"), fill("F-1", T0 + 3, "101")])
        await wait_for(lambda: fills_floor(transport) == 3)
    assert fill_rows(db) == {"F-1": (T0 + 1, Decimal(100), 1), "F-2": (T0 + 2, Decimal(100), 2)}
    assert len(db.lookups) == 1 and "'F-1'" in db.lookups[0] and "'F-2'" in db.lookups[0]


async def test_nothing_is_looked_up_before_questdb_shows_every_commit(monkeypatch):
    monkeypatch.setattr(first_arrivals, "WAL_WAIT_S", 0.05)
    app, transport, db = make_writer(writer_config("fills"))
    db.hold_wal = True  # QuestDB accepts writes but SQL does not show them until apply()
    async with app:
        await publish_fills(transport, [fill("F-1", T0 + 1, "100")])
        await wait_for(lambda: fills_floor(transport) == 1)  # a new fill id needs no look-up
        await publish_fills(transport, [fill("F-1", T0 + 2, "101")])
        await asyncio.sleep(0.3)
        assert fills_floor(transport) == 1 and db.lookups == []  # SQL could not see F-1 yet
        status, health = await get_json(app, "/health")
        assert status == 503 and "not applied after" in health["checks"]["questdb"]["detail"]["error"]
        db.apply()
        await wait_for(lambda: fills_floor(transport) == 2)
        await publish_fills(transport, [fill("F-2", T0 + 2, "100")])
        await wait_for(lambda: fills_floor(transport) == 3)
    # Restarted before QuestDB applied F-2: the table is not read until it has.
    reads, requests = len(db.reads), db.requests
    app = restarted(transport, db)
    async with app:
        await publish_fills(transport, [fill("F-2", T0 + 9, "101"), fill("F-3", T0 + 3, "100")])
        await asyncio.sleep(0.3)
        assert fills_floor(transport) == 3 and len(db.reads) == reads and db.requests == requests
        db.apply()
        await wait_for(lambda: fills_floor(transport) == 5)
        _, stats = await get_json(app, "/stats")
    assert fill_rows(db) == {"F-1": (T0 + 1, Decimal(100), 1), "F-2": (T0 + 2, Decimal(100), 3), "F-3": (T0 + 3, Decimal(100), 5)}  # fmt: skip
    table = stats["tables"]["t_fills"]
    assert table["resends"] == 1 and table["retries"] >= 1 and table["writes_failing_since"] is None


async def test_a_correction_and_a_bust_are_rows_with_their_exec_type():
    app, transport, db = make_writer(writer_config("fills"))
    correction = fill("F-2", T0 + 2, "100.5", qty=Decimal(3), fee=Decimal("0.1"), exec_type="CORRECT", ref_fill_id="F-1")  # fmt: skip
    bust = Fill(ts=T0 + 3, fill_id="F-3", account="ACC1", symbol="ESZ5", exec_type="BUST", ref_fill_id="F-1")
    opening = fill("F-0", T0 - 1, "98", exec_type="OPENING")
    async with app:
        await publish_fills(transport, [opening, fill("F-1", T0 + 1), correction, bust, correction])
        await wait_for(lambda: fills_floor(transport) == 5)
    rows = {row["fill_id"]: row for row in db.tables["t_fills"].values()}
    assert {f: (r["exec_type"], r["ref_fill_id"]) for f, r in rows.items()} == {
        "F-0": ("OPENING", None), "F-1": ("NEW", None), "F-2": ("CORRECT", "F-1"), "F-3": ("BUST", "F-1"),
    }  # fmt: skip
    assert (rows["F-2"]["side"], rows["F-2"]["qty"], rows["F-2"]["price"], rows["F-2"]["fee"]) == ("BUY", Decimal(3), Decimal("100.5"), Decimal("0.1"))  # fmt: skip
    assert (rows["F-3"]["side"], rows["F-3"]["qty"], rows["F-3"]["price"], rows["F-3"]["fee"]) == (None, None, None, Decimal(0))  # fmt: skip


async def test_a_fills_table_from_before_amendments_gets_their_columns():
    app, transport, db = make_writer(writer_config("fills"))
    old_layout = [c.name for c in LAYOUTS["fills"].columns if c.name not in ("exec_type", "ref_fill_id")]
    db.tables["t_fills"] = {}
    db.columns["t_fills"] = list(old_layout)
    async with app:
        await publish_fills(transport, [fill("F-1"), fill("F-2", fee=Decimal(0), exec_type="CORRECT", ref_fill_id="F-1")])
        await wait_for(lambda: fills_floor(transport) == 2)
    assert db.columns["t_fills"] == [*old_layout, "exec_type", "ref_fill_id"]
    assert sorted(row["exec_type"] for row in db.tables["t_fills"].values()) == ["CORRECT", "NEW"]


async def test_questdb_away_during_the_look_up_holds_the_batch():
    app, transport, db = make_writer(writer_config("fills"))
    async with app:
        await wait_for(lambda: db.keys.get("t_fills") is not None)
        db.down = True
        await publish_fills(transport, [fill("F-1"), fill("F-1", T0 + 1)])
        await wait_for(lambda: app.agents["write_fills"].stream is not None)
        await asyncio.sleep(0.3)
        assert fills_floor(transport) == 0 and db.requests == 0  # neither written nor acknowledged
        _, stats = await get_json(app, "/stats")
        assert "cannot look up which fill_ids t_fills has" in stats["tables"]["t_fills"]["last_error"]
        db.down = False
        await wait_for(lambda: fills_floor(transport) == 2)
    assert fill_rows(db) == {"F-1": (T0, Decimal(100), 1)}


# -- configuration ---------------------------------------------------------------------


def test_the_shipped_config_routes_every_bus_channel():
    config = load_config("questdb_writer", service.CONFIG, path=CONFIG_FILE, env={})
    routes = service.enabled_routes(config)
    assert {r.channel for r in routes.values()} == set(LAYOUTS)
    assert config.service.port == 8090
    assert config.batch.size == 10_000 and config.batch.interval_sec == 1 and config.batch.max_retry == 3
    app = service.build(config).app
    streams = sorted(runner.channel.stream.name for runner in app.agents.values())
    assert streams == ["BARS", "FILLS", "ORDERS", "PNL", "PNL", "POSITIONS", "POSITIONS", "QUOTES", "TRADES"]


def test_routes_can_be_pointed_elsewhere_from_the_environment():
    prefix = "POSTTRADE_QUESTDB_WRITER__WRITER__ROUTES__"
    env = {
        f"{prefix}QUOTES__STREAM": "TEST_Q",
        f"{prefix}QUOTES__SUBJECTS": "test.q.>, test.q2.>",
        f"{prefix}QUOTES__TABLE": "test_quotes",
        f"{prefix}FILLS__ENABLED": "false",
    }
    config = load_config("questdb_writer", service.CONFIG, path=CONFIG_FILE, env=env)
    routes = service.enabled_routes(config)
    assert "fills" not in routes
    assert routes["quotes"].stream_subjects() == ["test.q.>", "test.q2.>"]
    app = service.build(config).app
    channel = app.agents["write_quotes"].channel
    assert channel.stream.name == "TEST_Q" and channel.stream.subjects == ("test.q.>", "test.q2.>")


@pytest.mark.parametrize(
    "routes, message",
    [
        ({"a": {"channel": "quotes", "table": "t", "enabled": False}}, "no route is enabled"),
        ({"a": {"channel": "quotes", "table": "t"}, "b": {"channel": "bars", "table": "t"}}, "already written"),
        ({"a": {"channel": "quotes", "table": "t", "stream": "S"}}, "both `stream` and `subjects`"),
        ({"a": {"channel": "quotes", "table": "bad-name"}}, "identifier"),
    ],
)
def test_bad_routes_are_refused_at_start(routes, message):
    config = msgspec.convert(
        {"service": {"name": "qw", "port": 0}, "writer": {"routes": routes}}, service.QuestDBWriterConfig
    )
    with pytest.raises(ConfigError, match=message):
        service.enabled_routes(config)


def test_unknown_route_fields_are_refused():
    with pytest.raises(ConfigError, match="unknown field `tabel`"):
        env = {"POSTTRADE_QUESTDB_WRITER__WRITER__ROUTES__QUOTES__TABEL": "x"}
        load_config("questdb_writer", service.CONFIG, path=CONFIG_FILE, env=env)
