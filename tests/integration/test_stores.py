"""posttrade.stores against real servers: QuestDB, Valkey, and the embedded chdb engine.

Addresses come from the environment the local stack sets (defaults: its ports):
POSTTRADE__DATABASES__QUESTDB__HOST/PORT and POSTTRADE__CACHE__REDIS__HOST/PORT.
Every test uses its own uniquely named tables and keys, so reruns never collide.

chdb hosts one data path per process, so the whole session shares one chdb store
(`chdb_store`, session-scoped).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from posttrade.stores.clickhouse import ChdbPathError, ClickHouseError, ClickHouseStore, open_clickhouse
from posttrade.stores.questdb import QuestDBClient, QuestDBError, QuestDBWriteError, QuestDBWriter, columns_from_rows
from posttrade.stores.valkey import ValkeyUnavailableError, open_valkey

QUESTDB_HOST = os.environ.get("POSTTRADE__DATABASES__QUESTDB__HOST", "127.0.0.1")
QUESTDB_PORT = int(os.environ.get("POSTTRADE__DATABASES__QUESTDB__PORT", "9000"))
VALKEY_HOST = os.environ.get("POSTTRADE__CACHE__REDIS__HOST", "127.0.0.1")
VALKEY_PORT = int(os.environ.get("POSTTRADE__CACHE__REDIS__PORT", "6379"))

TRADE_COLUMNS = {"symbol": "SYMBOL", "side": "SYMBOL", "price": "DOUBLE", "qty": "LONG", "trade_id": "LONG"}
T0 = 1_700_000_000_000_000_000  # 2023-11-14T22:13:20Z in epoch ns


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


def trades(n: int, *, start_id: int = 0) -> dict[str, np.ndarray]:
    """A column-wise batch of `n` market trades with distinct (ts, symbol, trade_id)."""
    rng = np.random.default_rng(start_id + 1)
    ids = np.arange(start_id, start_id + n, dtype=np.int64)
    return {
        "ts": T0 + ids * 1_000,
        "symbol": np.array([f"SYM{i}" for i in range(50)])[ids % 50],
        "side": np.array(["BUY", "SELL"])[rng.integers(0, 2, n)],
        "price": np.round(rng.random(n) * 100 + 50, 4),
        "qty": rng.integers(1, 1000, n).astype(np.int64),
        "trade_id": ids,
    }


# --- QuestDB ------------------------------------------------------------------------


@pytest.fixture
async def qdb() -> AsyncIterator[QuestDBClient]:
    client = QuestDBClient(host=QUESTDB_HOST, port=QUESTDB_PORT)
    try:
        await client.ping()
    except QuestDBError as exc:
        pytest.fail(f"QuestDB not reachable at {QUESTDB_HOST}:{QUESTDB_PORT} (is the stack up?): {exc}")
    created: list[str] = []
    client.created = created  # type: ignore[attr-defined]
    yield client
    for table in created:
        await client.drop_table(table)
    await client.close()


@pytest.fixture
async def writer() -> AsyncIterator[QuestDBWriter]:
    w = QuestDBWriter(host=QUESTDB_HOST, port=QUESTDB_PORT)
    yield w
    await w.close()


async def new_trades_table(qdb: QuestDBClient) -> str:
    table = unique("t_trades")
    await qdb.create_table(table, TRADE_COLUMNS, dedup_keys=["symbol", "trade_id"])
    qdb.created.append(table)  # type: ignore[attr-defined]
    return table


async def test_questdb_query_and_errors(qdb):
    result = await qdb.query("SELECT x, x * 2 AS y, 'a''b' AS s FROM long_sequence(3)")
    assert result.columns == ["x", "y", "s"]
    assert result.types[0] == "LONG"
    assert result.rows == [[1, 2, "a'b"], [2, 4, "a'b"], [3, 6, "a'b"]]
    assert result.dicts()[1] == {"x": 2, "y": 4, "s": "a'b"}
    assert len(await qdb.query("SELECT x FROM long_sequence(10)", limit=4)) == 4
    assert await qdb.ping() is True
    with pytest.raises(QuestDBError) as info:
        await qdb.query("SELECT * FROM table_that_does_not_exist_x")
    assert "does not exist" in info.value.message
    assert info.value.position is not None and info.value.status == 400
    with pytest.raises(QuestDBError):
        await qdb.execute("CREATE TABLE (oops")


async def test_questdb_create_table_is_idempotent_and_dedups(qdb):
    table = await new_trades_table(qdb)
    await qdb.create_table(table, TRADE_COLUMNS, dedup_keys=["symbol", "trade_id"])  # again: no error
    assert await qdb.table_exists(table)
    cols = await qdb.query(f"SELECT \"column\", type, designated, upsertKey FROM table_columns('{table}')")
    info = {row[0]: row[1:] for row in cols.rows}
    assert info["ts"] == ["TIMESTAMP", True, True]
    assert info["symbol"] == ["SYMBOL", False, True]
    assert info["trade_id"] == ["LONG", False, True]
    assert info["price"] == ["DOUBLE", False, False]


async def test_questdb_create_table_enables_dedup_on_an_existing_table(qdb):
    table = unique("t_nodedup")
    qdb.created.append(table)
    await qdb.execute(f"CREATE TABLE {table} (ts TIMESTAMP, k SYMBOL, v DOUBLE) TIMESTAMP(ts) PARTITION BY DAY WAL")
    await qdb.create_table(table, {"k": "SYMBOL", "v": "DOUBLE"}, dedup_keys=["k"])
    keys = await qdb.query(f"SELECT \"column\" FROM table_columns('{table}') WHERE upsertKey")
    assert sorted(keys.column("column")) == ["k", "ts"]
    with pytest.raises(QuestDBError):
        await qdb.create_table(table, {"k": "SYMBOL"}, timestamp="other_ts", dedup_keys=["k"])


@pytest.mark.parametrize("shape", ["dataframe", "columns", "rows"])
async def test_questdb_write_batch_retry_is_idempotent(qdb, writer, shape):
    table = await new_trades_table(qdb)
    cols = trades(5_000)
    if shape == "dataframe":
        data = pd.DataFrame(cols)
    elif shape == "columns":
        data = cols
    else:
        data = pd.DataFrame(cols).to_dict("records")
    assert await writer.write_batch(table, data, symbols=["symbol", "side"]) == 5_000
    assert await qdb.wait_visible(table, 5_000) == 5_000
    # The caller retries the same batch (e.g. it never saw the reply): no duplicates.
    assert await writer.write_batch(table, data, symbols=["symbol", "side"]) == 5_000
    assert await qdb.wait_visible(table, 5_000) == 5_000
    # The values and types made it through intact.
    head = await qdb.query(f"SELECT cast(ts AS LONG) AS us, symbol, side, price, qty, trade_id FROM {table} LIMIT 2")
    assert head.rows[0] == [
        int(cols["ts"][0]) // 1000,
        str(cols["symbol"][0]),
        str(cols["side"][0]),
        float(cols["price"][0]),
        int(cols["qty"][0]),
        0,
    ]
    total = await qdb.query(f"SELECT sum(qty), count_distinct(trade_id) FROM {table}")
    assert total.rows[0] == [int(cols["qty"].sum()), 5_000]


async def test_questdb_write_batch_with_a_bad_row_writes_nothing(qdb, writer):
    table = await new_trades_table(qdb)
    rows = pd.DataFrame(trades(3)).to_dict("records")
    rows[2]["price"] = "not a number"  # a STRING for a DOUBLE column
    with pytest.raises(QuestDBWriteError) as info:
        await writer.write_batch(table, rows, symbols=["symbol", "side"])
    assert info.value.bad_data is True
    assert "price" in info.value.message
    # The good rows of the rejected request were not applied either.
    good = rows[:2]
    assert await writer.write_batch(table, good, symbols=["symbol", "side"]) == 2
    assert await qdb.wait_visible(table, 2) == 2
    # The writer keeps working after a rejected batch, and an empty batch is a no-op.
    assert await writer.write_batch(table, trades(0)) == 0


async def test_questdb_write_batch_rejects_unserialisable_data_as_bad(qdb, writer):
    table = await new_trades_table(qdb)
    with pytest.raises(QuestDBWriteError) as info:
        await writer.write_batch(table, [{"ts": T0, "qty": 2**70}])
    assert info.value.bad_data is True
    with pytest.raises(QuestDBWriteError) as info:
        await writer.write_batch(table, [{"qty": 1}])  # no designated timestamp
    assert info.value.bad_data is True


async def test_questdb_write_batch_types(qdb, writer):
    table = unique("t_types")
    qdb.created.append(table)
    await qdb.create_table(
        table,
        {"k": "SYMBOL", "recv": "TIMESTAMP", "note": "VARCHAR", "flag": "BOOLEAN", "amount": "DECIMAL(18, 4)"},
        dedup_keys=["k"],
    )
    when = dt.datetime(2024, 5, 1, 12, 30, tzinfo=dt.timezone.utc)
    rows = [
        {"ts": T0, "k": "a", "recv": T0 + 1_000, "note": "x'y", "flag": True, "amount": Decimal("12.3456")},
        {"ts": when, "k": "b", "recv": None, "note": None, "flag": False, "amount": Decimal("-1.5")},
    ]
    assert await writer.write_batch(table, rows, symbols=["k"], timestamp_columns=["recv"]) == 2
    await qdb.wait_visible(table, 2)
    result = await qdb.query(f"SELECT ts, k, recv, note, flag, amount FROM {table} ORDER BY ts")
    assert result.rows[0] == ["2023-11-14T22:13:20.000000Z", "a", "2023-11-14T22:13:20.000001Z", "x'y", True, "12.3456"]
    assert result.rows[1] == ["2024-05-01T12:30:00.000000Z", "b", None, None, False, "-1.5000"]


async def test_questdb_timestamp_ns_keeps_nanoseconds_in_both_paths(qdb, writer):
    table = unique("t_ns")
    qdb.created.append(table)
    await qdb.create_table(table, {"ts": "TIMESTAMP_NS", "k": "SYMBOL", "recv": "TIMESTAMP_NS"}, dedup_keys=["k"])
    await writer.write_batch(
        table, {"ts": [T0 + 1], "k": ["columns"], "recv": [T0 + 11]}, symbols=["k"], timestamp_columns=["recv"]
    )
    await writer.write_batch(
        table, [{"ts": T0 + 2, "k": "rows", "recv": T0 + 12}], symbols=["k"], timestamp_columns=["recv"]
    )
    await qdb.wait_visible(table, 2)
    result = await qdb.query(f"SELECT k, cast(ts AS LONG), cast(recv AS LONG) FROM {table} ORDER BY ts")
    assert result.rows == [["columns", T0 + 1, T0 + 11], ["rows", T0 + 2, T0 + 12]]


async def test_questdb_parallel_batches_for_several_tables(qdb):
    tables = [await new_trades_table(qdb) for _ in range(3)]
    async with QuestDBWriter(host=QUESTDB_HOST, port=QUESTDB_PORT, connections=2) as w:
        written = await asyncio.gather(
            *(w.write_batch(t, trades(2_000, start_id=i * 10_000), symbols=["symbol", "side"]) for i, t in enumerate(tables))
        )
    assert written == [2_000] * 3
    for t in tables:
        assert await qdb.wait_visible(t, 2_000) == 2_000


async def test_questdb_wait_visible_times_out_with_count(qdb):
    table = await new_trades_table(qdb)
    with pytest.raises(TimeoutError, match="0 rows"):
        await qdb.wait_visible(table, 1, timeout=0.2)


async def test_questdb_writer_ping(writer):
    assert await writer.ping() is True


# --- Valkey ---------------------------------------------------------------------------


async def test_valkey_ping_commands_and_pipeline():
    store = open_valkey(host=VALKEY_HOST, port=VALKEY_PORT, db=0)
    try:
        assert await store.ping() is True
    except ValkeyUnavailableError as exc:
        pytest.fail(f"Valkey not reachable at {VALKEY_HOST}:{VALKEY_PORT} (is the stack up?): {exc}")
    prefix = unique("test:stores")
    try:
        async with store.redis.pipeline(transaction=False) as pipe:
            for i in range(100):
                pipe.set(f"{prefix}:{i}", i, ex=60)
            await pipe.execute()
        assert await store.redis.get(f"{prefix}:42") == b"42"
        assert 0 < await store.redis.ttl(f"{prefix}:42") <= 60
    finally:
        keys = [k async for k in store.redis.scan_iter(match=f"{prefix}:*")]
        if keys:
            await store.redis.delete(*keys)
        await store.close()


async def test_valkey_decode_responses():
    store = open_valkey(host=VALKEY_HOST, port=VALKEY_PORT, decode_responses=True)
    key = unique("test:stores:s")
    try:
        await store.redis.set(key, "ü", ex=60)
        assert await store.redis.get(key) == "ü"
    finally:
        await store.redis.delete(key)
        await store.close()


async def test_valkey_unreachable_raises():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = open_valkey(host="127.0.0.1", port=port, socket_connect_timeout=1)
    with pytest.raises(ValkeyUnavailableError):
        await store.ping()
    await store.close()


# --- ClickHouse, embedded (chdb) -----------------------------------------------------


@pytest.fixture(scope="session")
def chdb_store(tmp_path_factory) -> Iterator[ClickHouseStore]:
    path = tmp_path_factory.mktemp("chdb") / "data"
    store = open_clickhouse(f"chdb://{path}", database="posttrade_test", create_database=True)
    yield store
    store.close_sync()


def test_chdb_one_path_per_process(chdb_store, tmp_path):
    again = open_clickhouse(f"chdb://{chdb_store.location}/")
    assert again is chdb_store  # the same path is the shared store
    again.close_sync()  # releases one reference only
    assert chdb_store.ping_sync()
    with pytest.raises(ChdbPathError, match="one data path per process"):
        open_clickhouse(f"chdb://{tmp_path}/other")
    with pytest.raises(ChdbPathError):
        open_clickhouse("chdb://memory")
    with pytest.raises(ChdbPathError, match="qualified table names"):
        open_clickhouse(f"chdb://{chdb_store.location}", database="another_db")


async def test_chdb_command_insert_query(chdb_store):
    table = unique("fills")
    await chdb_store.command(
        f"CREATE TABLE {table} (ts DateTime64(9, 'UTC'), account LowCardinality(String), "
        "symbol LowCardinality(String), bps Float64, qty Decimal(18, 4)) ENGINE = MergeTree ORDER BY (symbol, ts)"
    )
    rows = [
        [T0 + 1, "A1", "AAPL", 1.5, Decimal("10")],
        [T0 + 2, "A1", "MSFT", -0.5, Decimal("2.5")],
    ]
    assert await chdb_store.insert(table, rows, ["ts", "account", "symbol", "bps", "qty"]) == 2
    columns = [[T0 + 3, T0 + 4], ["A2", "A2"], ["AAPL", "AAPL"], [3.0, 4.0], [Decimal("1"), Decimal("1")]]
    assert await chdb_store.insert(table, columns, ["ts", "account", "symbol", "bps", "qty"], column_oriented=True) == 2
    assert await chdb_store.insert(table, [], ["ts"]) == 0

    result = await chdb_store.query(
        f"SELECT symbol, count() AS n, sum(qty) AS q, toUnixTimestamp64Nano(max(ts)) AS last "
        f"FROM {table} WHERE bps > {{min_bps:Float64}} GROUP BY symbol ORDER BY symbol",
        {"min_bps": 0.0},
    )
    assert result.column_names == ("symbol", "n", "q", "last")
    assert [tuple(r) for r in result.rows] == [("AAPL", 3, Decimal("12"), T0 + 4)]
    assert (await chdb_store.query("SELECT currentDatabase()")).scalar() == "posttrade_test"

    df = await chdb_store.query_df(f"SELECT * FROM {table} ORDER BY ts")
    assert list(df["symbol"]) == ["AAPL", "MSFT", "AAPL", "AAPL"]
    arrow = await chdb_store.query_arrow(f"SELECT ts FROM {table} ORDER BY ts")
    assert arrow.column("ts").cast(pa.int64()).to_pylist() == [T0 + 1, T0 + 2, T0 + 3, T0 + 4]

    with pytest.raises(ClickHouseError, match="UNKNOWN_TABLE|Unknown table"):
        await chdb_store.query("SELECT * FROM no_such_table_here")
    assert await chdb_store.ping() is True


async def test_chdb_arrow_and_dataframe_inserts(chdb_store):
    table = unique("slippage")
    await chdb_store.command(
        f"CREATE TABLE {table} (ts DateTime64(9, 'UTC'), symbol LowCardinality(String), bps Float64) "
        "ENGINE = MergeTree ORDER BY (symbol, ts)"
    )
    n = 50_000
    batch = pa.table(
        {
            "ts": pa.array(T0 + np.arange(n, dtype=np.int64), type=pa.timestamp("ns", tz="UTC")),
            "symbol": pa.array(np.array(["AAPL", "MSFT", "IBM"])[np.arange(n) % 3]),
            "bps": pa.array(np.linspace(-5, 5, n)),
        }
    )
    assert await chdb_store.insert_arrow(table, batch) == n
    assert await chdb_store.insert_df(table, batch.to_pandas()) == n
    stats = await chdb_store.query(f"SELECT count(), uniqExact(symbol), round(avg(bps), 6) FROM {table}")
    assert tuple(stats.rows[0]) == (2 * n, 3, 0.0)


async def test_chdb_concurrent_calls_are_serialised_safely(chdb_store):
    table = unique("conc")
    await chdb_store.command(f"CREATE TABLE {table} (k UInt32, v UInt32) ENGINE = MergeTree ORDER BY k")

    async def work(i: int) -> int:
        await chdb_store.insert(table, [[i, j] for j in range(10)], ["k", "v"])
        return (await chdb_store.query(f"SELECT count() FROM {table} WHERE k = {{k:UInt32}}", {"k": i})).scalar()

    counts = await asyncio.gather(*(work(i) for i in range(40)))
    assert counts == [10] * 40
    # The sync twins from plain threads, at the same time as the loop's calls.
    thread_counts = await asyncio.gather(
        *(asyncio.to_thread(chdb_store.query_sync, f"SELECT count() FROM {table}") for _ in range(8))
    )
    assert {r.scalar() for r in thread_counts} == {400}


async def test_questdb_columns_from_rows_writes_what_the_row_path_writes(qdb, writer):
    table = unique("t_colrows")
    qdb.created.append(table)
    types = {
        "ts": "TIMESTAMP_NS", "k": "SYMBOL", "recv": "TIMESTAMP", "note": "VARCHAR", "n": "LONG",
        "flag": "BOOLEAN", "amount": "DECIMAL(38, 12)",
    }  # fmt: skip
    await qdb.create_table(table, types, dedup_keys=["k"])
    rows = [
        {"ts": T0 + 1, "k": "a", "recv": T0 + 1_000, "note": "x'y", "n": 7, "flag": True, "amount": Decimal("12.345678901234")},
        {"ts": T0 + 2, "k": "b", "recv": None, "note": None, "n": None, "flag": None, "amount": None},
        {"ts": T0 + 3, "k": "c", "amount": Decimal("-99999999999999999999999999.5")},  # absent keys: NULL
    ]
    columns = columns_from_rows(rows, types)
    assert await writer.write_batch(table, columns, symbols=["k"], timestamp_columns=["recv"]) == 3
    await qdb.wait_visible(table, 3)
    result = await qdb.query(f"SELECT cast(ts AS LONG), k, recv, note, n, flag, amount FROM {table} ORDER BY ts")
    assert result.rows == [
        [T0 + 1, "a", "2023-11-14T22:13:20.000001Z", "x'y", 7, True, "12.345678901234"],
        [T0 + 2, "b", None, None, None, False, None],
        [T0 + 3, "c", None, None, None, False, "-99999999999999999999999999.500000000000"],
    ]
    with pytest.raises(ValueError, match="amount"):
        columns_from_rows([{"ts": T0, "amount": Decimal("0.0000000000001")}], types)  # 13 places
