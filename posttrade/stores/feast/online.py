"""Feature rows into Valkey/Redis in Feast's own layout, one round trip per batch.

Why not `FeatureStore.push`: Feast turns every value of every row into a protobuf object
in Python, reads each entity's stored timestamp (one pipelined HMGET per row) and then
writes (one HSET per row) — about 7,000 rows/s here, and `feast materialize` about the
same. This writer produces the same bytes directly and sends the whole batch as one
pipelined write, so Feast reads them back with `get_online_features` unchanged.

Feast's Redis layout (feast/infra/online_stores/redis.py, entity key serialization v3):

* key: the serialized entity key followed by the project name. For one string join key:
  `u32 1 | u32 STRING(2) | u32 len(join key) | join key | u32 STRING(2) | u32 len(v) | v`
  (little endian), then `project`.
* hash field per feature: the 4-byte murmur3 (x86, 32-bit, unsigned, little endian) of
  `"<view>:<feature>"`; value: a serialized `feast.types.Value` (`double_val` is field
  5, `int64_val` field 4; a missing value is the empty message).
* hash field `_ts:<view>`: a serialized `google.protobuf.Timestamp` of the event time
  (to the microsecond, as Feast's own write keeps it).

What differs from Feast's write, on purpose: Feast first reads the stored timestamp of
every entity and skips rows older than it, to survive concurrent writers. Here each
(view, entity) has one writer — the agent that owns its partition of the stream — and
rows are produced in event-time order, so the batch is collapsed to the newest row per
entity instead (what the online store would end up holding anyway) and written without
the read. A replay from an earlier position rewrites older values until it catches up.

The unit tests pin every byte against Feast's own serializers, and the integration
tests read the rows back through `get_online_features`.
"""

from __future__ import annotations

import asyncio
import math
import ssl as ssl_module
import struct
from operator import itemgetter
from typing import Iterable, Sequence

import mmh3
import numpy as np

from ...features.views import ViewSpec

_STRING = 2  # feast.types.ValueType.STRING
_U32 = struct.Struct("<I")
_DOUBLE = struct.Struct("<d")
_MASK64 = (1 << 64) - 1


def varint(value: int) -> bytes:
    """Protobuf base-128 varint (negative int64 as its 64-bit two's complement)."""
    value &= _MASK64
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def double_value(value: float | None) -> bytes:
    """A serialized feast.types.Value with double_val (empty for None or NaN)."""
    if value is None or math.isnan(value):
        return b""
    return b"\x29" + _DOUBLE.pack(value)  # field 5, wire type 1 (64-bit)


def int64_value(value: int | None) -> bytes:
    """A serialized feast.types.Value with int64_val (empty for None)."""
    if value is None:
        return b""
    return b"\x20" + varint(int(value))  # field 4, wire type 0 (varint)


def timestamp_bytes(ts_ns: int) -> bytes:
    """A serialized google.protobuf.Timestamp (zero fields omitted, as protobuf does)."""
    seconds, nanos = divmod(ts_ns, 1_000_000_000)
    out = b""
    if seconds:
        out += b"\x08" + varint(seconds)
    if nanos:
        out += b"\x10" + varint(nanos)
    return out


def _varints(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Protobuf varints of non-negative uint64 values: (n x 10 byte matrix, lengths)."""
    n = len(values)
    lengths = np.ones(n, dtype=np.int64)
    for k in range(1, 10):
        lengths += (values >> np.uint64(7 * k)) > 0
    matrix = np.zeros((n, 10), dtype=np.uint8)
    for k in range(10):
        digit = ((values >> np.uint64(7 * k)) & np.uint64(0x7F)).astype(np.uint8)
        matrix[:, k] = np.where(k < lengths - 1, digit | 0x80, digit)
    return matrix, lengths


def timestamp_bulks(ts_field: bytes, ts_ns: Sequence[int]) -> list[bytes]:
    """`ts_field` followed by the RESP bulk of each event time's protobuf Timestamp.

    The batch form of `_bulk(timestamp_bytes(ts))` (to the microsecond), with numpy:
    the Python loop only cuts the results apart.
    """
    n = len(ts_ns)
    us = np.fromiter(ts_ns, dtype=np.int64, count=n) // 1000
    if n and us.min() < 0:
        return [ts_field + _bulk(timestamp_bytes(ts - ts % 1000)) for ts in ts_ns]
    seconds = (us // 1_000_000).astype(np.uint64)
    nanos = ((us % 1_000_000) * 1000).astype(np.uint64)
    parts = []
    for tag, values in ((0x08, seconds), (0x10, nanos)):
        digits, lengths = _varints(values)
        present = values > 0  # protobuf leaves out zero fields
        parts.append((tag, digits, np.where(present, lengths, 0), present))
    proto_len = sum(lengths + present for _, _, lengths, present in parts)
    head = np.frombuffer(ts_field, dtype=np.uint8)
    width = len(head) + 5 + 22 + 2
    out = np.zeros((n, width), dtype=np.uint8)
    out[:, : len(head)] = head
    rows = np.arange(n)
    pos = np.full(n, len(head), dtype=np.int64)
    out[:, len(head)] = ord("$")
    pos += 1
    two_digits = proto_len >= 10
    out[rows[two_digits], pos[two_digits]] = (ord("0") + proto_len[two_digits] // 10).astype(np.uint8)
    pos += two_digits
    out[rows, pos] = (ord("0") + proto_len % 10).astype(np.uint8)
    out[rows, pos + 1] = 13
    out[rows, pos + 2] = 10
    pos += 3
    for tag, digits, lengths, present in parts:
        out[rows[present], pos[present]] = tag
        pos += present
        for k in range(10):
            write = lengths > k
            out[rows[write], pos[write] + k] = digits[write, k]
        pos += lengths
    out[rows, pos] = 13
    out[rows, pos + 1] = 10
    ends = (pos + 2).tolist()
    raw = out.tobytes()
    return [raw[i * width : i * width + end] for i, end in enumerate(ends)]


def field_key(view: str, feature: str) -> bytes:
    """Feast's hash field name for a feature: murmur3_32 of `view:feature`, little endian."""
    return _U32.pack(mmh3.hash(f"{view}:{feature}", signed=False))


def _bulk(data: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(data), data)


def command(*args: bytes) -> bytes:
    """One RESP command."""
    return b"*%d\r\n" % len(args) + b"".join(_bulk(a) for a in args)


class RedisLayout:
    """Feast's Redis key and field bytes for one view, computed once."""

    #: Entity keys remembered (symbols and accounts are a bounded set).
    KEY_CACHE = 1_000_000

    def __init__(self, project: str, view: ViewSpec):
        self.project = project
        self.view = view
        join_key = view.entity.encode()
        self._key_prefix = _U32.pack(1) + _U32.pack(_STRING) + _U32.pack(len(join_key)) + join_key + _U32.pack(_STRING)
        self._project = project.encode()
        self._keys: dict[str, bytes] = {}
        self._encoders = [double_value if f.dtype == "float64" else int64_value for f in view.features]
        self._fields = [_bulk(field_key(view.name, f.name)) for f in view.features]
        self._ts_field = _bulk(f"_ts:{view.name}".encode())
        # HSET, key, then (field, value) for the timestamp and for every feature
        self._hset_head = b"*%d\r\n$4\r\nHSET\r\n" % (2 + 2 * (1 + len(self._fields)))
        # The float features of a row with no missing value have a fixed-size encoding:
        # field, "$9\r\n", 0x29, 8 bytes of double, "\r\n". `hsets` fills a template of
        # them for a whole batch at once with numpy.
        self._float_positions = [i for i, f in enumerate(view.features) if f.dtype == "float64"]
        self._other_positions = [i for i, f in enumerate(view.features) if f.dtype != "float64"]
        template = b""
        self._double_offsets = []
        for i in self._float_positions:
            template += self._fields[i] + b"$9\r\n\x29"
            self._double_offsets.append(len(template))
            template += bytes(8) + b"\r\n"
        self._float_template = np.frombuffer(template, dtype=np.uint8)

    def key(self, entity_value: str) -> bytes:
        value = entity_value.encode()
        return self._key_prefix + _U32.pack(len(value)) + value + self._project

    def _head(self, row: Sequence, ts_bulk: bytes) -> bytes:
        key = self._keys.get(row[0])
        if key is None:
            key = _bulk(self.key(row[0]))
            if len(self._keys) < self.KEY_CACHE:
                self._keys[row[0]] = key
        return self._hset_head + key + ts_bulk

    def hset(self, row: Sequence) -> bytes:
        """The HSET command storing one row tuple (entity, ts_ns, values...).

        Event times are kept to the microsecond, like Feast's own writes (Python
        datetimes) and the offline store.
        """
        ts = row[1] - row[1] % 1000
        parts = [self._head(row, self._ts_field + _bulk(timestamp_bytes(ts)))]
        for field, encode, value in zip(self._fields, self._encoders, row[2:]):
            parts.append(field)
            parts.append(_bulk(encode(value)))
        return b"".join(parts)

    def hsets(self, rows: Sequence[Sequence]) -> bytes:
        """The HSET commands of many rows; the same bytes as joining `hset` of each."""
        n = len(rows)
        if n == 0:
            return b""
        floats = self._float_positions
        if not floats:
            return b"".join(self.hset(row) for row in rows)
        ts_bulks = timestamp_bulks(self._ts_field, [row[1] for row in rows])
        # None becomes NaN here; rows with a missing float take the row-by-row path.
        pick = itemgetter(*(2 + i for i in floats)) if len(floats) > 1 else (lambda row: (row[2 + floats[0]],))
        matrix = np.array(list(map(pick, rows)), dtype=np.float64).reshape(n, len(floats))
        incomplete = np.isnan(matrix).any(axis=1)
        width = len(self._float_template)
        blocks = np.tile(self._float_template, (n, 1))
        for column, offset in enumerate(self._double_offsets):
            blocks[:, offset : offset + 8] = matrix[:, column].astype("<f8").view(np.uint8).reshape(n, 8)
        raw = memoryview(blocks.tobytes())
        others = [(self._fields[i], self._encoders[i], 2 + i) for i in self._other_positions]
        parts: list = []
        for index, row in enumerate(rows):
            if incomplete[index]:
                parts.append(self.hset(row))
                continue
            parts.append(self._head(row, ts_bulks[index]))
            parts.append(raw[index * width : (index + 1) * width])
            for field, encode, position in others:
                parts.append(field)
                parts.append(_bulk(encode(row[position])))
        return b"".join(parts)


def newest_per_entity(rows: Iterable[Sequence]) -> list[Sequence]:
    """The newest row (by event time; the later one on a tie) of each entity."""
    newest: dict[str, Sequence] = {}
    for row in rows:
        held = newest.get(row[0])
        if held is None or row[1] >= held[1]:
            newest[row[0]] = row
    return list(newest.values())


class RedisWriteError(ConnectionError):
    pass


class RespConnection:
    """A minimal pipelined Redis connection for writes whose replies are one line each.

    Every command this module sends (HSET, EXPIRE, AUTH, SELECT, PING) answers with a
    single-line reply (`:n`, `+OK`, or `-ERR ...`), so a batch's replies are counted by
    line ends, without parsing each one in Python. Not for reads.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        ssl: bool = False,
        timeout_s: float = 30.0,
    ):
        self.host = host
        self.port = port
        self.db = db
        self.username = username
        self.password = password
        self.ssl = ssl
        self.timeout_s = timeout_s
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._lock = asyncio.Lock()

    @property
    def location(self) -> str:
        return f"{'rediss' if self.ssl else 'redis'}://{self.host}:{self.port}/{self.db}"

    async def _connect(self) -> None:
        context = ssl_module.create_default_context() if self.ssl else None
        self._reader, self._writer = await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port, ssl=context), self.timeout_s
        )
        hello = b""
        count = 0
        if self.password is not None:
            auth = [self.username.encode(), self.password.encode()] if self.username else [self.password.encode()]
            hello += command(b"AUTH", *auth)
            count += 1
        if self.db:
            hello += command(b"SELECT", str(self.db).encode())
            count += 1
        if count:
            await self._exchange(hello, count)

    async def execute(self, payload: bytes, replies: int) -> None:
        """Send pipelined commands; raise RedisWriteError if any answered an error."""
        async with self._lock:
            try:
                if self._writer is None:
                    try:
                        await self._connect()
                    except BaseException:
                        self._drop()
                        raise
                await self._exchange(payload, replies)
            except RedisWriteError:
                raise
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError) as exc:
                self._drop()
                raise RedisWriteError(f"Valkey at {self.location}: {type(exc).__name__}: {exc}") from exc
            except asyncio.CancelledError:
                self._drop()  # replies may still be in flight: never reuse this connection
                raise

    async def _exchange(self, payload: bytes, replies: int) -> None:
        assert self._reader is not None and self._writer is not None
        self._writer.write(payload)
        await asyncio.wait_for(self._writer.drain(), self.timeout_s)
        seen = 0
        first_error: bytes | None = None
        tail = b""  # the previous chunk's last two bytes: a line end or "\r\n-" may straddle chunks
        while seen < replies:
            chunk = await asyncio.wait_for(self._reader.read(1 << 20), self.timeout_s)
            if not chunk:
                raise asyncio.IncompleteReadError(tail, None)
            seen += chunk.count(b"\r\n") + (1 if tail.endswith(b"\r") and chunk.startswith(b"\n") else 0)
            data = tail + chunk
            if first_error is None and (data.startswith(b"-") or b"\r\n-" in data):
                start = 0 if data.startswith(b"-") else data.index(b"\r\n-") + 2
                first_error = data[start : start + 200]
            tail = data[-2:]
        if first_error is not None:
            raise RedisWriteError(f"Valkey at {self.location} refused a command: {first_error!r}")

    async def ping(self) -> bool:
        await self.execute(command(b"PING"), 1)
        return True

    def _drop(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._writer = self._reader = None

    async def close(self) -> None:
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            writer.close()
            try:
                await writer.wait_closed()
            except (OSError, ssl_module.SSLError):
                pass


class FeastRedisWriter:
    """Writes feature rows of any view into Feast's Redis online store layout."""

    #: Commands per pipelined write: bounds the memory of one payload.
    CHUNK = 20_000

    def __init__(self, connection: RespConnection, project: str, views: Iterable[ViewSpec], *, key_ttl_s: int | None = None):
        self.connection = connection
        self.layouts = {v.name: RedisLayout(project, v) for v in views}
        self.key_ttl_s = key_ttl_s

    def encode(self, view: str, rows: Sequence[Sequence]) -> tuple[list[bytes], list[int]]:
        """The payload chunks for `rows` (already one per entity) and their reply counts."""
        layout = self.layouts[view]
        ttl = str(self.key_ttl_s).encode() if self.key_ttl_s else None
        chunks: list[bytes] = []
        counts: list[int] = []
        for begin in range(0, len(rows), self.CHUNK):
            part = rows[begin : begin + self.CHUNK]
            payload = layout.hsets(part)
            replies = len(part)
            if ttl is not None:
                payload += b"".join(command(b"EXPIRE", layout.key(row[0]), ttl) for row in part)
                replies *= 2
            chunks.append(payload)
            counts.append(replies)
        return chunks, counts

    async def write(self, view: str, rows: Sequence[Sequence]) -> int:
        """Store the newest row per entity; returns how many entities were written."""
        newest = newest_per_entity(rows)
        chunks, counts = self.encode(view, newest)
        for payload, replies in zip(chunks, counts):
            await self.connection.execute(payload, replies)
        return len(newest)

    async def close(self) -> None:
        await self.connection.close()
