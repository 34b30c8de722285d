"""The stores' formats: Feast's Redis layout byte for byte, Parquet parts, the hourly batch."""

from __future__ import annotations

import math

import pyarrow as pa
import pytest
from feast.infra.key_encoding_utils import serialize_entity_key
from feast.infra.online_stores.helpers import _mmh3, _redis_key
from feast.protos.feast.types.EntityKey_pb2 import EntityKey
from feast.protos.feast.types.Value_pb2 import Value
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import given
from hypothesis import strategies as st

from posttrade.features.batch import HOUR_NS, first_hour, hour_closed, hourly_rows
from posttrade.features.views import ACCOUNT_FEATURES, SYMBOL_HOURLY_FEATURES, SYMBOL_TRADE_FEATURES, TIMESTAMP_FIELD
from posttrade.stores.feast.offline import SCHEMA_PART, OfflineParts, rows_to_table
from posttrade.stores.feast.online import (
    FeastRedisWriter,
    RedisLayout,
    double_value,
    field_key,
    int64_value,
    newest_per_entity,
    timestamp_bytes,
)

S = 1_000_000_000
T = 1_763_800_020 * S


def parse_resp(payload: bytes) -> list[list[bytes]]:
    """Split pipelined RESP commands back into their arguments."""
    commands = []
    pos = 0
    while pos < len(payload):
        assert payload[pos : pos + 1] == b"*"
        end = payload.index(b"\r\n", pos)
        count = int(payload[pos + 1 : end])
        pos = end + 2
        args = []
        for _ in range(count):
            assert payload[pos : pos + 1] == b"$"
            end = payload.index(b"\r\n", pos)
            length = int(payload[pos + 1 : end])
            args.append(payload[end + 2 : end + 2 + length])
            assert payload[end + 2 + length : end + 4 + length] == b"\r\n"
            pos = end + 4 + length
        commands.append(args)
    return commands


@given(st.one_of(st.none(), st.floats(allow_nan=False)))
def test_double_value_is_feasts_value_proto(value):
    expected = b"" if value is None else Value(double_val=value).SerializeToString()
    assert double_value(value) == expected


def test_nan_is_an_empty_value():
    assert double_value(float("nan")) == b""


@given(st.one_of(st.none(), st.integers(min_value=-(2**63), max_value=2**63 - 1)))
def test_int64_value_is_feasts_value_proto(value):
    expected = b"" if value is None else Value(int64_val=value).SerializeToString()
    assert int64_value(value) == expected


@given(st.integers(min_value=0, max_value=4_102_444_800 * S))
def test_timestamp_is_protobuf_timestamp(ts_ns):
    proto = Timestamp()
    proto.FromNanoseconds(ts_ns)
    assert timestamp_bytes(ts_ns) == proto.SerializeToString()


@given(st.text(min_size=1, max_size=30))
def test_entity_key_is_feasts_redis_key(value):
    layout = RedisLayout("proj_x", SYMBOL_TRADE_FEATURES)
    key = EntityKey(join_keys=["symbol"], entity_values=[Value(string_val=value)])
    assert layout.key(value) == _redis_key("proj_x", key, entity_key_serialization_version=3)
    assert layout.key(value).startswith(serialize_entity_key(key, entity_key_serialization_version=3))


def test_field_keys_are_feasts_murmur3():
    for feature in SYMBOL_TRADE_FEATURES.feature_names:
        assert field_key("symbol_trade_features", feature) == _mmh3(f"symbol_trade_features:{feature}")


def test_hset_command_holds_every_feature_and_the_timestamp():
    layout = RedisLayout("p", ACCOUNT_FEATURES)
    row = ("ACC1", T + 5_000, 4460.0, None, -1.5, 3)
    [command] = parse_resp(layout.hset(row))
    assert command[0] == b"HSET" and command[1] == layout.key("ACC1")
    fields = dict(zip(command[2::2], command[3::2]))
    assert fields[b"_ts:account_features"] == timestamp_bytes(T + 5_000)
    assert fields[_mmh3("account_features:gross_exposure")] == Value(double_val=4460.0).SerializeToString()
    assert fields[_mmh3("account_features:net_exposure")] == b""
    assert fields[_mmh3("account_features:fills_today")] == Value(int64_val=3).SerializeToString()
    assert len(fields) == 1 + len(ACCOUNT_FEATURES.features)


_float = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True))
_account_rows = st.tuples(
    st.text(min_size=1, max_size=8),
    st.integers(min_value=0, max_value=4_102_444_800 * S),
    _float, _float, _float,
    st.one_of(st.none(), st.integers(min_value=-(2**63), max_value=2**63 - 1)),
)


@given(st.lists(_account_rows, max_size=40))
def test_batch_encoding_equals_row_by_row(rows):
    layout = RedisLayout("p", ACCOUNT_FEATURES)
    assert layout.hsets(rows) == b"".join(layout.hset(row) for row in rows)


def test_event_times_are_kept_to_the_microsecond():
    layout = RedisLayout("p", ACCOUNT_FEATURES)
    [command] = parse_resp(layout.hset(("A", T + 1_999, 1.0, 1.0, 1.0, 1)))
    assert dict(zip(command[2::2], command[3::2]))[b"_ts:account_features"] == timestamp_bytes(T + 1_000)


def test_writer_keeps_the_newest_row_per_entity_and_adds_expire():
    rows = [("A", T, 1.0, 1), ("B", T, 2.0, 2), ("A", T + 1, 3.0, 3), ("A", T, 4.0, 4)]
    assert newest_per_entity(rows) == [("A", T + 1, 3.0, 3), ("B", T, 2.0, 2)]
    from posttrade.features.views import ViewSpec, FeatureSpec

    view = ViewSpec("v", "symbol", "stream", 60, (FeatureSpec("x", "float64", ""), FeatureSpec("n", "int64", "")), "")
    writer = FeastRedisWriter(connection=None, project="p", views=[view], key_ttl_s=30)
    chunks, replies = writer.encode("v", newest_per_entity(rows))
    commands = parse_resp(b"".join(chunks))
    assert sum(replies) == 4 and [c[0] for c in commands] == [b"HSET", b"HSET", b"EXPIRE", b"EXPIRE"]
    assert commands[2][2] == b"30"


def test_offline_parts_are_atomic_idempotent_and_compactable(tmp_path):
    parts = OfflineParts(tmp_path)
    view = SYMBOL_TRADE_FEATURES
    parts.ensure(view)
    assert (tmp_path / view.name / SCHEMA_PART).exists() and parts.parts(view) == []
    assert parts.event_time_range(view) is None
    row1 = ("ACME", T, 0.1, None, None, 100.5, 2, 15.0, 1.0)
    row2 = ("ACME", T + 60 * S, 0.2, None, 0.3, 101.0, 1, 5.0, None)
    first = parts.write(view, [row1])
    assert parts.write(view, [row1]) == first  # the same batch again: the same part
    parts.write(view, [row2, ("ZZZ", T + 60 * S, None, None, None, 9.0, 1, 1.0, float("nan"))])
    assert len(parts.parts(view)) == 2
    assert not [p for p in (tmp_path / view.name).iterdir() if p.name.startswith(".")]
    assert parts.event_time_range(view) == (T, T + 60 * S)
    table = parts.read(view, T + 1, None)
    assert sorted(table["symbol"].to_pylist()) == ["ACME", "ZZZ"]
    assert table.filter(pa.compute.equal(table["symbol"], "ZZZ"))["trade_imbalance_1m"].to_pylist() == [None]
    assert parts.compact(view, max_parts=2) == 0
    assert parts.compact(view, max_parts=1) == 2
    [merged] = parts.parts(view)
    assert "compact" in merged.name and parts.read(view).num_rows == 3


def test_rows_to_table_has_the_views_schema():
    table = rows_to_table(ACCOUNT_FEATURES, [("A", T + 1_500, 1.0, 2.0, 3.0, 4)])
    assert table.column_names == list(ACCOUNT_FEATURES.columns)
    assert table[TIMESTAMP_FIELD].type == pa.timestamp("us", tz="UTC")
    assert table[TIMESTAMP_FIELD].cast(pa.int64()).to_pylist() == [(T + 1_500) // 1000]


def test_hourly_rows_from_minute_rows_count_duplicates_once():
    hour = (T // HOUR_NS) * HOUR_NS
    minute = 60 * S
    rows = [
        ("ACME", hour + minute, None, None, None, 100.0, 2, 15.0, 1.0),
        ("ACME", hour + 2 * minute, 0.01, None, None, 100.0, 3, 5.0, 1.0),
        ("ACME", hour + 2 * minute, 0.01, None, None, 100.0, 3, 5.0, 1.0),  # pushed twice
        ("ACME", hour + 60 * minute, -0.02, None, None, 100.0, 1, 1.0, 1.0),
    ]
    table = rows_to_table(SYMBOL_TRADE_FEATURES, rows)
    [out] = hourly_rows(table, hour)
    symbol, ts, ret, vol, count, volume = out
    assert (symbol, ts, count, volume) == ("ACME", hour + HOUR_NS, 6, 21.0)
    assert ret == pytest.approx(1.01 * 0.98 - 1)
    assert vol == pytest.approx(math.hypot(math.log(1.01), math.log(0.98)))
    assert len(out) == len(SYMBOL_HOURLY_FEATURES.columns)


def test_the_first_hour_follows_the_newest_computed_one_and_closes_with_a_newer_minute():
    hour = (T // HOUR_NS) * HOUR_NS
    assert first_hour(hour + 60 * S, None) == hour  # the hour of the oldest minute row
    assert first_hour(hour, None) == hour - HOUR_NS  # a minute ending at H is in the hour before H
    assert first_hour(hour + 60 * S, hour + HOUR_NS) == hour + HOUR_NS  # after the newest computed hour
    assert not hour_closed(hour, hour + HOUR_NS)  # its last minute is in, but nothing newer yet
    assert hour_closed(hour, hour + HOUR_NS + 60 * S)
