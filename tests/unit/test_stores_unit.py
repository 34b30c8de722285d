"""posttrade.stores without servers: the local object store, the S3 store's client
settings and name checks (its requests are tested against the stack's real SeaweedFS in
tests/integration/test_objects.py), the QuestDB SQL helpers and batch preparation, and
the chdb dsn rules."""

from __future__ import annotations

import datetime as dt
import os
import threading
from decimal import Decimal

import numpy as np
import pandas as pd
import pytest
from botocore.stub import Stubber

from posttrade.stores import objects
from posttrade.stores.clickhouse import _chdb_location, open_clickhouse
from posttrade.stores.objects import (
    LocalObjectStore,
    ObjectNotFoundError,
    S3ObjectStore,
    check_object_name,
    open_object_store,
)
from posttrade.stores.questdb import (
    QuestDBClient,
    QuestDBWriteError,
    QuestDBWriter,
    QuestDBUnavailableError,
    _prepare_frame,
    check_identifier,
    create_table_sql,
    sql_literal,
)

# --- LocalObjectStore ----------------------------------------------------------------


@pytest.fixture
def store(tmp_path):
    return LocalObjectStore(tmp_path / "objects")


def test_local_put_get_roundtrip_and_overwrite(store):
    store.put_sync("reports/2024-05-01/pnl.csv", b"a,b\n1,2\n", "text/csv")
    assert store.get_sync("reports/2024-05-01/pnl.csv") == b"a,b\n1,2\n"
    store.put_sync("reports/2024-05-01/pnl.csv", b"new")
    assert store.get_sync("reports/2024-05-01/pnl.csv") == b"new"
    store.put_sync("empty", b"")
    assert store.get_sync("empty") == b""


def test_local_accepts_bytes_like(store):
    store.put_sync("x.bin", bytearray(b"\x00\x01"))
    store.put_sync("y.bin", memoryview(b"\x02"))
    assert store.get_sync("x.bin") == b"\x00\x01"
    assert store.get_sync("y.bin") == b"\x02"


def test_local_get_missing_raises_not_found(store):
    with pytest.raises(ObjectNotFoundError):
        store.get_sync("nope.csv")
    store.put_sync("dir/file", b"1")
    with pytest.raises(ObjectNotFoundError):
        store.get_sync("dir")  # a "directory" is not an object
    with pytest.raises(ObjectNotFoundError):
        store.get_sync("dir/file/deeper")


def test_local_exists_and_delete(store):
    assert not store.exists_sync("a/b")
    store.put_sync("a/b", b"1")
    assert store.exists_sync("a/b")
    assert not store.exists_sync("a")
    store.delete_sync("a/b")
    assert not store.exists_sync("a/b")
    store.delete_sync("a/b")  # deleting a missing object is fine
    store.delete_sync("a")  # and so is a "directory"


def test_local_list_is_a_string_prefix_sorted_with_sizes(store):
    for name, data in [
        ("reports/2024-05-02/pnl.csv", b"22"),
        ("reports/2024-05-01/pnl.csv", b"1"),
        ("reports/2024-05-01/blotter.parquet", b"333"),
        ("reportsX/other", b"4444"),
        ("top", b"55555"),
    ]:
        store.put_sync(name, data)
    names = [info.name for info in store.list_sync()]
    assert names == sorted(names)
    assert set(names) == {
        "reports/2024-05-01/blotter.parquet",
        "reports/2024-05-01/pnl.csv",
        "reports/2024-05-02/pnl.csv",
        "reportsX/other",
        "top",
    }
    assert [i.name for i in store.list_sync("reports/")] == [
        "reports/2024-05-01/blotter.parquet",
        "reports/2024-05-01/pnl.csv",
        "reports/2024-05-02/pnl.csv",
    ]
    # A prefix that is not a directory boundary, like S3.
    assert [i.name for i in store.list_sync("reports")] == names[:4]
    assert [i.name for i in store.list_sync("reports/2024-05-0")] == names[:3]
    assert [i.name for i in store.list_sync("reports/2024-05-01/p")] == ["reports/2024-05-01/pnl.csv"]
    assert store.list_sync("nothing/here/") == []
    assert store.list_sync("../") == []
    info = {i.name: i for i in store.list_sync()}
    assert info["top"].size == 5
    assert info["reports/2024-05-01/blotter.parquet"].size == 3
    modified = info["top"].last_modified
    assert modified.tzinfo is not None
    assert abs((dt.datetime.now(dt.timezone.utc) - modified).total_seconds()) < 60


@pytest.mark.parametrize(
    "name",
    [
        "",
        "/etc/passwd",
        "../outside",
        "a/../../outside",
        "a/../b",
        "./a",
        "a/./b",
        "a//b",
        "a/",
        ".hidden",
        "a/.tmp",
        "a\\b",
        "a\x00b",
        "x" * 1025,
    ],
)
def test_local_rejects_names_that_could_escape_or_collide(store, name):
    with pytest.raises(ValueError):
        store.put_sync(name, b"1")
    with pytest.raises(ValueError):
        store.get_sync(name)
    with pytest.raises(ValueError):
        store.exists_sync(name)
    with pytest.raises(ValueError):
        store.delete_sync(name)


def test_check_object_name_accepts_ordinary_names():
    for name in ["a", "a/b/c.csv", "reports/2024-05-01/pnl_ACC-1.parquet", "with space", "ünïcode/ok..csv"]:
        assert check_object_name(name) == name


def test_local_rejects_symlink_escaping_root(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"s")
    store = LocalObjectStore(tmp_path / "root")
    os.symlink(outside, tmp_path / "root" / "link")
    with pytest.raises(ValueError):
        store.get_sync("link/secret")
    with pytest.raises(ValueError):
        store.put_sync("link/new", b"x")
    assert not (outside / "new").exists()


def test_local_file_and_directory_cannot_share_a_name(store):
    store.put_sync("a", b"1")
    with pytest.raises(ValueError):
        store.put_sync("a/b", b"2")
    store.put_sync("d/e", b"3")
    with pytest.raises(ValueError):
        store.put_sync("d", b"4")
    assert store.get_sync("a") == b"1"
    assert store.get_sync("d/e") == b"3"


def test_local_put_is_atomic_under_concurrent_reads(store):
    versions = [bytes([i]) * 2_000_000 for i in range(1, 6)]
    store.put_sync("big", versions[0])
    stop = threading.Event()
    torn: list[int] = []

    def reader() -> None:
        while not stop.is_set():
            data = store.get_sync("big")
            if data not in versions:
                torn.append(len(data))

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for _ in range(4):
        for v in versions:
            store.put_sync("big", v)
    stop.set()
    for t in threads:
        t.join()
    assert torn == []
    assert store.get_sync("big") == versions[-1]


def test_local_put_failure_leaves_no_temp_file_and_old_object(store, monkeypatch):
    store.put_sync("r/x", b"old")

    def broken_replace(src, dst):
        raise OSError("disk on fire")

    monkeypatch.setattr(objects.os, "replace", broken_replace)
    with pytest.raises(OSError):
        store.put_sync("r/x", b"new")
    monkeypatch.undo()
    assert store.get_sync("r/x") == b"old"
    assert sorted(os.listdir(store.root / "r")) == ["x"]


def test_local_temp_files_are_not_listed(store):
    store.put_sync("r/x", b"1")
    (store.root / "r" / ".x.abc.tmp").write_bytes(b"partial")
    assert [i.name for i in store.list_sync()] == ["r/x"]


def test_local_ping(store, tmp_path):
    assert store.ping_sync() is True


async def test_local_async_wrappers(store):
    await store.put("a/b.csv", b"1,2", "text/csv")
    assert await store.exists("a/b.csv")
    assert await store.get("a/b.csv") == b"1,2"
    assert [i.name for i in await store.list("a/")] == ["a/b.csv"]
    await store.delete("a/b.csv")
    assert not await store.exists("a/b.csv")
    assert await store.ping()
    await store.close()


def test_open_object_store_chooses_by_endpoint(tmp_path):
    local = open_object_store(endpoint=None, bucket="ignored", local_dir=tmp_path / "o")
    assert isinstance(local, LocalObjectStore)
    assert local.root == (tmp_path / "o").resolve()
    s3 = open_object_store(endpoint="http://127.0.0.1:1", bucket="b", local_dir=tmp_path / "o")
    assert isinstance(s3, S3ObjectStore)
    with pytest.raises(ValueError):
        open_object_store(endpoint="http://127.0.0.1:1")  # no bucket
    with pytest.raises(ValueError):
        open_object_store()


# --- S3ObjectStore without a server ------------------------------------------------


def _s3(**kwargs) -> tuple[S3ObjectStore, Stubber]:
    store = S3ObjectStore(endpoint="http://s3.invalid:8333", bucket="trader2025", **kwargs)
    stub = Stubber(store._s3)
    stub.activate()
    return store, stub


def test_s3_requires_both_keys_or_none():
    with pytest.raises(ValueError):
        S3ObjectStore(endpoint="http://x", bucket="b", access_key="k")
    with pytest.raises(ValueError):
        S3ObjectStore(endpoint="http://x", bucket="")


def test_s3_uses_path_style_and_unsigned_without_keys():
    store = S3ObjectStore(endpoint="http://s3.invalid:8333", bucket="b")
    config = store._s3.meta.config
    assert config.s3["addressing_style"] == "path"
    from botocore import UNSIGNED

    assert config.signature_version is UNSIGNED
    signed = S3ObjectStore(endpoint="http://s3.invalid:8333", bucket="b", access_key="k", secret_key="s")
    assert signed._s3.meta.config.signature_version == "s3v4"


def test_s3_rejects_bad_names_before_any_request():
    store, stub = _s3()
    with pytest.raises(ValueError):
        store.put_sync("../x", b"1")
    stub.assert_no_pending_responses()


# --- QuestDB helpers ------------------------------------------------------------------


def test_create_table_sql_adds_designated_timestamp_to_dedup_keys():
    sql = create_table_sql(
        "fills", {"account": "SYMBOL", "fill_id": "VARCHAR", "price": "DOUBLE"}, dedup_keys=["account", "fill_id"]
    )
    assert sql == (
        "CREATE TABLE IF NOT EXISTS fills (ts TIMESTAMP, account SYMBOL, fill_id VARCHAR, price DOUBLE) "
        "TIMESTAMP(ts) PARTITION BY DAY WAL DEDUP UPSERT KEYS(ts, account, fill_id)"
    )


def test_create_table_sql_keeps_given_timestamp_column_and_order():
    sql = create_table_sql(
        "bars",
        {"symbol": "SYMBOL CAPACITY 4096", "t": "TIMESTAMP", "close": "DOUBLE"},
        timestamp="t",
        partition_by="hour",
        dedup_keys=["symbol", "t"],
    )
    assert sql == (
        "CREATE TABLE IF NOT EXISTS bars (symbol SYMBOL CAPACITY 4096, t TIMESTAMP, close DOUBLE) "
        "TIMESTAMP(t) PARTITION BY HOUR WAL DEDUP UPSERT KEYS(symbol, t)"
    )
    assert create_table_sql("plain", {"v": "LONG"}).endswith("PARTITION BY DAY WAL")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"table": "bad name"},
        {"table": "t; DROP TABLE x"},
        {"columns": {"v": "DOUBLE); DROP TABLE x; --"}},
        {"columns": {"bad-col": "DOUBLE"}},
        {"dedup_keys": ["missing"]},
        {"dedup_keys": "ts"},
        {"dedup_keys": ["v"], "wal": False},
        {"partition_by": "FORTNIGHT"},
        {"partition_by": "NONE"},
    ],
)
def test_create_table_sql_rejects(kwargs):
    args = {"table": "t", "columns": {"v": "DOUBLE"}}
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError)):
        create_table_sql(args.pop("table"), args.pop("columns"), **args)


def test_sql_literal():
    assert sql_literal("O'Brien") == "'O''Brien'"
    assert sql_literal(None) == "NULL"
    assert sql_literal(True) == "true"
    assert sql_literal(12) == "12"
    assert sql_literal(np.int64(-3)) == "-3"
    assert sql_literal(1.5) == "1.5"
    assert sql_literal(float("nan")) == "NULL"
    assert sql_literal(Decimal("101.2500")) == "101.2500"
    assert sql_literal(dt.datetime(2024, 5, 1, 12, 0, 0, 5)) == "'2024-05-01T12:00:00.000005Z'"
    tz = dt.timezone(dt.timedelta(hours=2))
    assert sql_literal(dt.datetime(2024, 5, 1, 14, 0, tzinfo=tz)) == "'2024-05-01T12:00:00.000000Z'"
    with pytest.raises(ValueError):
        sql_literal("a\x00b")
    with pytest.raises(ValueError):
        sql_literal(Decimal("NaN"))


def test_check_identifier():
    assert check_identifier("market_trades_1") == "market_trades_1"
    for bad in ["", "1abc", "a-b", "a b", "a;b", "tab\x00le", None]:
        with pytest.raises(ValueError):
            check_identifier(bad)


def test_prepare_frame_converts_epoch_ns_columns_without_touching_input():
    ns = np.array([1_700_000_000_123_456_789, 1_700_000_001_000_000_000], dtype=np.int64)
    data = {"ts": ns, "recv": ns + 5, "qty": np.array([1, 2])}
    frame = _prepare_frame(data, "ts", ["recv"])
    assert frame["ts"].dtype == np.dtype("datetime64[ns]")
    assert frame["ts"].iloc[0].value == 1_700_000_000_123_456_789
    assert frame["recv"].iloc[1].value == 1_700_000_001_000_000_005
    assert frame["qty"].dtype == np.int64
    assert data["ts"].dtype == np.int64  # the caller's columns are not mutated

    df = pd.DataFrame({"ts": ns, "v": [1.0, 2.0]})
    out = _prepare_frame(df, "ts", ())
    assert out["ts"].dtype == np.dtype("datetime64[ns]")
    assert df["ts"].dtype == np.int64

    ms = pd.DataFrame({"ts": np.array([1, 2], dtype="datetime64[ms]"), "v": [1, 2]})
    assert _prepare_frame(ms, "ts", ())["ts"].dtype == np.dtype("datetime64[ns]")
    with pytest.raises(ValueError):
        _prepare_frame({"v": [1]}, "ts", ())


def test_auth_arguments_are_validated():
    with pytest.raises(ValueError):
        QuestDBWriter(host="127.0.0.1", port=1, username="admin")
    with pytest.raises(ValueError):
        QuestDBClient(host="127.0.0.1", port=1, username="u", password="p", token="t")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_writer_on_unreachable_server_raises_retryable_error():
    writer = QuestDBWriter(host="127.0.0.1", port=_free_port(), retry_timeout_ms=0)
    batch = {"ts": np.array([1_700_000_000_000_000_000]), "v": np.array([1.0])}
    with pytest.raises(QuestDBWriteError) as info:
        writer.write_batch_sync("t", batch)
    assert info.value.bad_data is False
    writer.close_sync()
    with pytest.raises(QuestDBWriteError):
        writer.write_batch_sync("t", batch)


async def test_clients_on_unreachable_server_raise_unavailable():
    port = _free_port()
    client = QuestDBClient(host="127.0.0.1", port=port, timeout=2)
    with pytest.raises(QuestDBUnavailableError):
        await client.ping()
    await client.close()
    writer = QuestDBWriter(host="127.0.0.1", port=port)
    with pytest.raises(QuestDBUnavailableError):
        await writer.ping()
    await writer.close()


# --- chdb dsn ---------------------------------------------------------------------


def test_chdb_dsn_forms(tmp_path):
    assert _chdb_location("chdb:///data/ch") == (os.path.realpath("/data/ch"), None)
    assert _chdb_location("chdb:///data/ch/?database=eq") == (os.path.realpath("/data/ch"), "eq")
    assert _chdb_location("chdb:///data/x/../ch") == (os.path.realpath("/data/ch"), None)
    assert _chdb_location("chdb://memory") == (":memory:", None)
    assert _chdb_location("chdb://:memory:") == (":memory:", None)
    link = tmp_path / "link"
    os.symlink(tmp_path, link)
    assert _chdb_location(f"chdb://{link}")[0] == os.path.realpath(tmp_path)


@pytest.mark.parametrize("dsn", ["chdb://data/ch", "chdb:relative/path", "chdb://memory/db", "chdb:///x?path=/y"])
def test_chdb_dsn_rejects_ambiguous_forms(dsn):
    with pytest.raises(ValueError):
        _chdb_location(dsn)


def test_open_clickhouse_needs_a_target_and_no_credentials_for_chdb():
    with pytest.raises(ValueError):
        open_clickhouse()
    with pytest.raises(ValueError):
        open_clickhouse("chdb:///tmp/x", password="secret")
