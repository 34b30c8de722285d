"""QuestDB: SQL over HTTP `/exec`, and batched ILP/HTTP writes through the official client.

Two clients, one per wire:

* `QuestDBClient` — SQL over `GET /exec` with `httpx.AsyncClient` (natively async):
  `query`, `execute`, `create_table` (idempotent, verifies dedup keys), `wait_visible`,
  `ping`, `close`.
* `QuestDBWriter` — InfluxDB line protocol over HTTP with `questdb.Sender`
  (`Protocol.Http`, `auto_flush=False`). `write_batch(table, data, symbols=, at=)` sends
  one table's batch as ONE HTTP request; QuestDB applies an ILP/HTTP request for one
  table atomically, so the call either fully succeeds or raises `QuestDBWriteError`
  having written nothing, and the caller can retry the same batch. With
  `DEDUP UPSERT KEYS` on the table a retried batch that did land (e.g. the reply was
  lost) still yields each row once.

Threading scheme (the same in every module of `posttrade.stores`): public I/O methods
are `async`; where the underlying library blocks (here the `questdb.Sender`) the work
is done by a `<name>_sync` twin, safe to call from any thread, and the async method is
`await asyncio.to_thread(self.<name>_sync, ...)`. A `Sender` is not thread-safe: the
writer lends each of its `connections` Senders to one flush at a time; building the ILP
buffer happens outside that, so several threads can serialise batches while one flushes.

Credentials are never defaulted: no username/password/token unless passed.

Speed (100,000 six-column trades, QuestDB 9.3.1 on the same 2-core machine): a DataFrame
serialises at ~1.4 M rows/s and the whole `write_batch` runs at ~0.35 M rows/s (the
server's ILP parsing is the bound); a list of row dicts at ~0.15 M rows/s; one request
per row at ~500 rows/s. Batch, and build batches column-wise.

QuestDB rules this module encodes:
* the designated timestamp must be part of the DEDUP UPSERT KEYS (added if missing);
* a `TIMESTAMP` column keeps microseconds: epoch-ns values are truncated, so two events
  in the same microsecond with equal other keys would dedup into one row. Put an event
  id in the dedup keys, or declare the column `TIMESTAMP_NS` (QuestDB 9), which keeps
  the nanoseconds through both write paths;
* DEDUP needs a WAL table, and WAL tables apply commits asynchronously: a row written
  is durable when `write_batch` returns but visible to SQL a few ms later
  (`wait_visible` for tests). A WAL table's ALTER is applied asynchronously as well
  (`create_table` waits for the dedup change it makes);
* `/exec` answers TIMESTAMP values as ISO-8601 strings (`2024-01-01T00:00:00.000000Z`);
  cast in SQL (`cast(ts AS LONG)`, microseconds) when numbers are wanted;
* `/exec` has no bind parameters: build SQL with `sql_literal` for values and only
  validated identifiers (`check_identifier`) for names.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as _dt
import json
import logging
import math
import queue
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pyarrow as pa
import questdb as _qdb

from ...core.bounds import QUESTDB_PRECISION, QUESTDB_SCALE

log = logging.getLogger(__name__)

__all__ = [
    "QuestDBError",
    "QuestDBUnavailableError",
    "QuestDBWriteError",
    "SqlResult",
    "QuestDBClient",
    "QuestDBWriter",
    "check_identifier",
    "sql_literal",
    "create_table_sql",
]

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_PARTITIONS = frozenset({"NONE", "HOUR", "DAY", "WEEK", "MONTH", "YEAR"})


class QuestDBError(Exception):
    """QuestDB refused or failed a request; `message` is QuestDB's own text."""

    def __init__(
        self,
        message: str,
        *,
        query: str | None = None,
        position: int | None = None,
        status: int | None = None,
    ):
        super().__init__(message if position is None else f"{message} (at position {position})")
        self.message = message
        self.query = query
        self.position = position
        self.status = status


class QuestDBUnavailableError(QuestDBError):
    """QuestDB could not be reached (connection refused, timeout, TLS failure...)."""


class QuestDBWriteError(QuestDBError):
    """A batch was not written. Nothing of it is in the table (one request, one table).

    `bad_data` is True when QuestDB (or the client, while serialising) rejected the
    data itself — a type mismatch, an invalid name or value: retrying the same batch
    will fail again, so the caller should split it and dead-letter the bad rows.
    False means the failure was not the data's fault (server down, timeout, auth,
    server error): retry the same batch later.
    """

    def __init__(self, message: str, *, bad_data: bool, code: str | None = None):
        super().__init__(message)
        self.bad_data = bad_data
        self.code = code


def check_identifier(name: str) -> str:
    """Return `name` if it is a plain SQL identifier, else raise ValueError.

    Narrower than what QuestDB accepts on purpose: these names are spliced into SQL.
    """
    if not isinstance(name, str) or not _IDENTIFIER.match(name):
        raise ValueError(f"not a plain identifier (letters, digits, _): {name!r}")
    return name


def sql_literal(value: Any) -> str:
    """Render a Python value as a QuestDB SQL literal (strings single-quoted, '' escaped).

    datetimes become ISO-8601 UTC strings (QuestDB casts them where a TIMESTAMP is
    expected); naive datetimes are taken as UTC.
    """
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        if not math.isfinite(value):
            return "NULL"
        return repr(float(value))
    if isinstance(value, _dt.datetime):
        if value.tzinfo is not None:
            value = value.astimezone(_dt.timezone.utc).replace(tzinfo=None)
        return "'" + value.strftime("%Y-%m-%dT%H:%M:%S.%fZ") + "'"
    if isinstance(value, str):
        if "\x00" in value:
            raise ValueError("NUL character in SQL string literal")
        return "'" + value.replace("'", "''") + "'"
    # Decimal and friends: their str() is a valid numeric literal.
    text = str(value)
    if not re.fullmatch(r"-?[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?", text):
        raise ValueError(f"cannot render {value!r} as a SQL literal")
    return text


def create_table_sql(
    table: str,
    columns: Mapping[str, str],
    *,
    timestamp: str = "ts",
    partition_by: str = "DAY",
    dedup_keys: Sequence[str] = (),
    wal: bool = True,
) -> str:
    """`CREATE TABLE IF NOT EXISTS` text for a time-partitioned (WAL, dedup) table.

    `columns` maps name → QuestDB type (`"SYMBOL"`, `"SYMBOL CAPACITY 4096"`, `"DOUBLE"`,
    `"LONG"`, `"VARCHAR"`, `"TIMESTAMP"`, `"DECIMAL(18, 8)"` ...), in table order. The
    designated `timestamp` column is added as TIMESTAMP if absent, and added to
    `dedup_keys` if they do not name it (QuestDB requires it there).
    """
    check_identifier(table)
    check_identifier(timestamp)
    partition = partition_by.upper()
    if partition not in _PARTITIONS:
        raise ValueError(f"partition_by must be one of {sorted(_PARTITIONS)}, got {partition_by!r}")
    cols = dict(columns)
    if timestamp not in cols:
        cols = {timestamp: "TIMESTAMP", **cols}
    defs = []
    for name, type_ in cols.items():
        check_identifier(name)
        if not isinstance(type_, str) or not type_.strip() or re.search(r"[;'\"]|--", type_):
            raise ValueError(f"bad type for column {name!r}: {type_!r}")
        defs.append(f"{name} {type_.strip()}")
    keys = _dedup_keys(timestamp, dedup_keys)
    for key in keys:
        if key not in cols:
            raise ValueError(f"dedup key {key!r} is not a column of {table}")
    if keys and not wal:
        raise ValueError("DEDUP needs a WAL table")
    if wal and partition == "NONE":
        raise ValueError("WAL tables must be partitioned")
    sql = (
        f"CREATE TABLE IF NOT EXISTS {table} ({', '.join(defs)}) "
        f"TIMESTAMP({timestamp}) PARTITION BY {partition}"
    )
    sql += " WAL" if wal else " BYPASS WAL"
    if keys:
        sql += f" DEDUP UPSERT KEYS({', '.join(keys)})"
    return sql


def _dedup_keys(timestamp: str, dedup_keys: Sequence[str]) -> list[str]:
    if isinstance(dedup_keys, str):
        raise TypeError("dedup_keys must be a sequence of column names, not a string")
    keys = [check_identifier(k) for k in dedup_keys]
    if keys and timestamp not in keys:
        keys.insert(0, timestamp)
    return list(dict.fromkeys(keys))


@dataclass(frozen=True)
class SqlResult:
    """Rows of a query as QuestDB's JSON gave them (TIMESTAMP as ISO strings)."""

    columns: list[str]
    types: list[str]
    rows: list[list[Any]]

    def __len__(self) -> int:
        return len(self.rows)

    def dicts(self) -> list[dict[str, Any]]:
        return [dict(zip(self.columns, row)) for row in self.rows]

    def column(self, name: str) -> list[Any]:
        i = self.columns.index(name)
        return [row[i] for row in self.rows]

    def scalar(self) -> Any:
        """The single value of a one-row, one-column result."""
        if len(self.rows) != 1 or len(self.columns) != 1:
            raise ValueError(f"expected one value, got {len(self.rows)} rows x {len(self.columns)} columns")
        return self.rows[0][0]


def _base_url(host: str, port: int, tls: bool) -> str:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{'https' if tls else 'http'}://{host}:{int(port)}"


def _auth_kwargs(username: str | None, password: str | None, token: str | None) -> dict[str, Any]:
    if token is not None and (username is not None or password is not None):
        raise ValueError("give either a token or username/password, not both")
    if (username is None) != (password is None):
        raise ValueError("username and password go together")
    if token is not None:
        return {"headers": {"Authorization": f"Bearer {token}"}}
    if username is not None:
        return {"auth": httpx.BasicAuth(username, password)}
    return {}


def _auth_headers(username: str | None, password: str | None, token: str | None) -> dict[str, str]:
    """The Authorization header `_auth_kwargs` makes httpx send."""
    if token is not None:
        return {"Authorization": f"Bearer {token}"}
    if username is not None:
        credentials = base64.b64encode(f"{username}:{password}".encode()).decode()
        return {"Authorization": f"Basic {credentials}"}
    return {}


class QuestDBClient:
    """SQL over QuestDB's HTTP `/exec` endpoint (async; one pooled httpx client)."""

    def __init__(
        self,
        *,
        host: str,
        port: int = 9000,
        username: str | None = None,
        password: str | None = None,
        token: str | None = None,
        tls: bool = False,
        tls_verify: bool = True,
        tls_ca_file: str | None = None,
        timeout: float = 30.0,
        max_connections: int = 16,
    ):
        verify: Any = tls_ca_file if (tls and tls_ca_file) else tls_verify
        self.base_url = _base_url(host, port, tls)
        # What a request needs to be let in: for clients of other endpoints of the same
        # server (the CSV export streams `/exp` outside this pool).
        self.auth_headers = _auth_headers(username, password, token)
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            timeout=timeout,
            verify=verify,
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            **_auth_kwargs(username, password, token),
        )

    async def _exec(self, sql: str, params: dict[str, str] | None = None) -> dict[str, Any]:
        query = {"query": sql, **(params or {})}
        try:
            resp = await self._http.get("/exec", params=query)
        except httpx.TransportError as exc:
            raise QuestDBUnavailableError(
                f"QuestDB at {self.base_url} unreachable: {exc!r}", query=sql
            ) from exc
        try:
            body = resp.json()
        except ValueError:
            body = None
        if resp.status_code != 200 or not isinstance(body, dict) or "error" in body:
            if isinstance(body, dict) and "error" in body:
                message = str(body["error"])
                position = body.get("position")
            else:
                message = f"HTTP {resp.status_code}: {resp.text[:500]}"
                position = None
            cls = QuestDBUnavailableError if resp.status_code >= 500 else QuestDBError
            raise cls(message, query=sql, position=position, status=resp.status_code)
        return body

    async def query(self, sql: str, *, limit: int | tuple[int, int] | None = None) -> SqlResult:
        """Run a SELECT; `limit` is /exec's paging (`n` or `(lo, hi)` row range)."""
        params: dict[str, str] = {}
        if limit is not None:
            params["limit"] = f"{limit[0]},{limit[1]}" if isinstance(limit, tuple) else str(int(limit))
        body = await self._exec(sql, params)
        columns = body.get("columns")
        if columns is None:
            raise QuestDBError(f"statement returned no result set: {body}", query=sql)
        return SqlResult(
            columns=[c["name"] for c in columns],
            types=[c["type"] for c in columns],
            rows=body.get("dataset", []),
        )

    async def execute(self, sql: str) -> dict[str, Any]:
        """Run DDL or DML (`CREATE`, `ALTER`, `INSERT`, `DROP`...); returns QuestDB's
        reply, e.g. `{"ddl": "OK"}` or `{"dml": "OK", "updated": 3}`."""
        return await self._exec(sql)

    async def ping(self) -> bool:
        """True when QuestDB answers SQL; raises QuestDBError otherwise (for /health)."""
        await self._exec("SELECT 1")
        return True

    async def table_exists(self, table: str) -> bool:
        check_identifier(table)
        result = await self.query(f"SELECT count() FROM tables() WHERE table_name = {sql_literal(table)}")
        return bool(result.scalar())

    async def create_table(
        self,
        table: str,
        columns: Mapping[str, str],
        *,
        timestamp: str = "ts",
        partition_by: str = "DAY",
        dedup_keys: Sequence[str] = (),
        wal: bool = True,
    ) -> None:
        """Create the table if missing, then make sure it deduplicates as asked.

        Idempotent. A table that already existed with other (or no) dedup keys gets
        `ALTER TABLE ... DEDUP ENABLE UPSERT KEYS(...)`, because a writer relying on
        dedup for exactly-once must not run against a table that silently duplicates.
        A different designated timestamp, or a non-WAL table where dedup is asked,
        cannot be fixed in place and raises QuestDBError. Columns the table lacks are
        added; existing ones are not altered.
        """
        sql = create_table_sql(
            table, columns, timestamp=timestamp, partition_by=partition_by, dedup_keys=dedup_keys, wal=wal
        )
        await self.execute(sql)
        keys = _dedup_keys(timestamp, dedup_keys)
        info = await self.query(
            f"SELECT designatedTimestamp, walEnabled FROM tables() WHERE table_name = {sql_literal(table)}"
        )
        if not info.rows:
            raise QuestDBError(f"table {table} missing right after CREATE TABLE", query=sql)
        designated, wal_enabled = info.rows[0]
        if designated != timestamp:
            raise QuestDBError(
                f"table {table} exists with designated timestamp {designated!r}, not {timestamp!r}"
            )
        await self._add_missing_columns(table, columns)
        if not keys:
            return
        if not wal_enabled:
            raise QuestDBError(f"table {table} exists without WAL; DEDUP needs WAL")
        if await self._upsert_keys(table) == set(keys):
            return
        await self.execute(f"ALTER TABLE {table} DEDUP ENABLE UPSERT KEYS({', '.join(keys)})")
        # On a WAL table the ALTER is applied asynchronously, like the rows are.
        deadline = time.monotonic() + 10.0
        while (current := await self._upsert_keys(table)) != set(keys):
            if time.monotonic() >= deadline:
                raise QuestDBError(f"table {table}: dedup keys still {sorted(current)} after ALTER, wanted {keys}")
            await asyncio.sleep(0.02)

    async def _add_missing_columns(self, table: str, columns: Mapping[str, str]) -> None:
        # A table made by an older layout (or by hand) may lack columns. ILP adds missing
        # columns on a write, but not DECIMAL ones, and a reader's SELECT of a column no
        # row has written yet would fail: add them here.
        listed = await self.query(f"SELECT \"column\" FROM table_columns({sql_literal(table)})")
        existing = set(listed.column("column"))
        for name, sql_type in columns.items():
            if name not in existing:  # one per statement: a WAL table takes no more
                await self.execute(f"ALTER TABLE {table} ADD COLUMN {check_identifier(name)} {sql_type}")
                log.info("table %s: added column %s %s", table, name, sql_type)

    async def _upsert_keys(self, table: str) -> set[str]:
        cols = await self.query(f"SELECT \"column\", upsertKey FROM table_columns({sql_literal(table)})")
        return {name for name, is_key in cols.rows if is_key}

    async def drop_table(self, table: str) -> None:
        await self.execute(f"DROP TABLE IF EXISTS {check_identifier(table)}")

    async def wait_visible(
        self, table: str, expected_count: int, timeout: float = 10.0, *, poll_interval: float = 0.05
    ) -> int:
        """Wait until `table` holds at least `expected_count` rows and every committed
        WAL transaction is applied; return the row count then.

        WAL tables apply commits asynchronously, so a written row shows up in SQL a few
        milliseconds later (longer under load). Waiting for the WAL to drain too means
        a test asserting `== expected` also sees duplicates that would arrive late.
        Raises TimeoutError (with the last count) or QuestDBError if the table is
        suspended (QuestDB stopped applying its WAL).
        """
        check_identifier(table)
        deadline = time.monotonic() + timeout
        count = 0
        while True:
            applied = True
            try:
                count = int((await self.query(f"SELECT count() FROM {table}")).scalar())
                wal = await self.query(
                    "SELECT writerTxn, sequencerTxn, suspended, errorMessage FROM wal_tables() "
                    f"WHERE name = {sql_literal(table)}"
                )
                if wal.rows:
                    writer_txn, sequencer_txn, suspended, error = wal.rows[0]
                    if suspended:
                        raise QuestDBError(f"table {table} is suspended: {error}")
                    applied = writer_txn >= sequencer_txn
            except QuestDBError as exc:
                if "does not exist" not in exc.message:
                    raise
                count, applied = 0, False
            if count >= expected_count and applied:
                return count
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"{table}: {count} rows visible after {timeout}s, expected {expected_count}"
                    + ("" if applied else " (WAL not fully applied)")
                )
            await asyncio.sleep(poll_interval)

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> QuestDBClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


# Client-side error codes that mean the data (or the call) is wrong, not the server.
_BAD_DATA_CODES = frozenset(
    {
        "InvalidName",
        "InvalidUtf8",
        "InvalidTimestamp",
        "ArrayError",
        "DecimalError",
        "BadDataFrame",
        "ArrowUnsupportedColumnKind",
        "ArrowIngest",
    }
)

Batch = pd.DataFrame | Mapping[str, Any] | Sequence[Mapping[str, Any]]


class _SenderSlot:
    __slots__ = ("sender",)

    def __init__(self) -> None:
        self.sender: Any = None

    def drop(self) -> None:
        sender, self.sender = self.sender, None
        if sender is not None:
            try:
                sender.close(flush=False)
            except Exception:  # noqa: BLE001 - closing a broken sender must not mask the cause
                pass


class QuestDBWriter:
    """Batched ILP/HTTP writes: one `write_batch` = one table = one atomic request.

    The `Sender` is created and connected lazily on the first write (its `establish()`
    probes the server for the protocol version and fails while QuestDB is down), and
    re-established after a connection failure, so a writer can be built before QuestDB
    is up and survives QuestDB restarts. `connections` > 1 keeps that many Senders so
    batches for different tables can be flushed concurrently from several threads
    (QuestDB parses each ILP/HTTP request on one thread).
    """

    def __init__(
        self,
        *,
        host: str,
        port: int = 9000,
        username: str | None = None,
        password: str | None = None,
        token: str | None = None,
        tls: bool = False,
        tls_verify: bool = True,
        tls_ca_file: str | None = None,
        retry_timeout_ms: int = 10_000,
        request_timeout_ms: int | None = None,
        max_buf_size: int = 100 * 1024 * 1024,
        connections: int = 1,
    ):
        _auth_kwargs(username, password, token)  # validates the combination
        if connections < 1:
            raise ValueError("connections must be >= 1")
        self.host = host
        self.port = int(port)
        self.base_url = _base_url(host, port, tls)
        self._sender_kwargs: dict[str, Any] = {
            "auto_flush": False,
            "retry_timeout": retry_timeout_ms,
            "max_buf_size": max_buf_size,
        }
        if request_timeout_ms is not None:
            self._sender_kwargs["request_timeout"] = request_timeout_ms
        if username is not None:
            self._sender_kwargs.update(username=username, password=password)
        if token is not None:
            self._sender_kwargs["token"] = token
        if tls:
            self._sender_kwargs["tls_verify"] = tls_verify
            if tls_ca_file:
                self._sender_kwargs["tls_roots"] = tls_ca_file
        self._protocol = _qdb.Protocol.Https if tls else _qdb.Protocol.Http
        self._http_kwargs: dict[str, Any] = {
            "verify": (tls_ca_file if (tls and tls_ca_file) else tls_verify),
            **_auth_kwargs(username, password, token),
        }
        # One Sender per connection; a flush borrows one, so up to `connections`
        # batches (typically of different tables) are in flight at once.
        self._slots: queue.SimpleQueue[_SenderSlot] = queue.SimpleQueue()
        for _ in range(connections):
            self._slots.put(_SenderSlot())
        self._connections = connections
        self._closed = False

    # -- sync, thread-safe ---------------------------------------------------------

    @contextmanager
    def _sender(self) -> Iterator[Any]:
        """Borrow a connected Sender (connecting it if needed)."""
        slot = self._slots.get()
        try:
            if self._closed:
                raise QuestDBWriteError("writer is closed", bad_data=False)
            if slot.sender is None:
                sender = _qdb.Sender(self._protocol, self.host, self.port, **self._sender_kwargs)
                try:
                    sender.establish()
                except _qdb.QuestDBError as exc:
                    sender.close(flush=False)
                    raise QuestDBWriteError(
                        f"cannot connect to QuestDB at {self.base_url}: {exc}", bad_data=False, code=exc.code.name
                    ) from exc
                slot.sender = sender
            yield slot
        finally:
            self._slots.put(slot)

    def write_batch_sync(
        self,
        table: str,
        data: Batch,
        *,
        symbols: Sequence[str] = (),
        at: str = "ts",
        timestamp_columns: Sequence[str] = (),
    ) -> int:
        """Write `data` to `table` in one request; return the number of rows written.

        `data` is one of (fastest first):
        * a pandas DataFrame;
        * a mapping column name → sequence/array (all the same length);
        * a sequence of row mappings (serialised row by row: slower; a None value
          leaves that column NULL).
        `symbols` names the columns to send as SYMBOL (others: str → VARCHAR/STRING,
        int → LONG, float → DOUBLE, bool, Decimal → DECIMAL, datetime → TIMESTAMP).
        `at` names the designated-timestamp column: integers are epoch nanoseconds,
        datetime64 / datetimes are taken as UTC. `timestamp_columns` lists further
        integer epoch-ns columns to send as TIMESTAMP rather than LONG.

        Raises QuestDBWriteError (see `bad_data`) having written nothing.
        """
        check_identifier(table)
        if isinstance(symbols, str) or isinstance(timestamp_columns, str):
            raise TypeError("symbols and timestamp_columns are sequences of column names")
        with self._sender() as slot:
            buf = slot.sender.new_buffer()
        # Serialise outside the borrowed sender: other threads may flush meanwhile.
        try:
            if isinstance(data, (pd.DataFrame, Mapping)):
                frame = _prepare_frame(data, at, timestamp_columns)
                rows = len(frame)
                if rows:
                    buf.dataframe(frame, table_name=table, symbols=list(symbols), at=at)
            else:
                rows = _add_rows(buf, table, data, symbols, at, timestamp_columns)
        except _qdb.QuestDBError as exc:
            raise QuestDBWriteError(
                f"cannot serialise batch for {table}: {exc}", bad_data=True, code=exc.code.name
            ) from exc
        except (TypeError, ValueError, OverflowError) as exc:
            raise QuestDBWriteError(f"cannot serialise batch for {table}: {exc}", bad_data=True) from exc
        if rows:
            self._flush(table, buf)
        return rows

    def _flush(self, table: str, buf: Any) -> None:
        with self._sender() as slot:
            try:
                slot.sender.flush(buf, transactional=True)
            except _qdb.QuestDBError as exc:
                code = exc.code.name
                bad = code in _BAD_DATA_CODES or (code == "ServerFlushError" and '"code":"invalid"' in str(exc))
                if not bad and code != "ServerFlushError":
                    # Connection-level trouble: start from a fresh Sender next time.
                    slot.drop()
                raise QuestDBWriteError(
                    f"write to {table} failed: {_server_message(str(exc))}", bad_data=bad, code=code
                ) from exc

    def close_sync(self) -> None:
        """Close every connection; waits for in-flight flushes. Idempotent."""
        self._closed = True
        slots = [self._slots.get() for _ in range(self._connections)]
        for slot in slots:
            slot.drop()
            self._slots.put(slot)

    # -- async ---------------------------------------------------------------------

    async def write_batch(
        self,
        table: str,
        data: Batch,
        *,
        symbols: Sequence[str] = (),
        at: str = "ts",
        timestamp_columns: Sequence[str] = (),
    ) -> int:
        """Async `write_batch_sync` (runs in a thread).

        Cancelling the awaiting task does not stop the thread: the batch may still land.
        Treat a cancelled write like a failed one and retry it (dedup makes that safe).
        """
        return await asyncio.to_thread(
            self.write_batch_sync, table, data, symbols=symbols, at=at, timestamp_columns=timestamp_columns
        )

    async def ping(self) -> bool:
        """True when QuestDB's ILP/HTTP endpoint answers `/ping`; raises otherwise."""
        try:
            async with httpx.AsyncClient(timeout=5.0, **self._http_kwargs) as http:
                resp = await http.get(f"{self.base_url}/ping")
        except httpx.TransportError as exc:
            raise QuestDBUnavailableError(f"QuestDB at {self.base_url} unreachable: {exc!r}") from exc
        if resp.status_code != 204:
            raise QuestDBError(f"/ping answered HTTP {resp.status_code}: {resp.text[:200]}", status=resp.status_code)
        return True

    async def close(self) -> None:
        await asyncio.to_thread(self.close_sync)

    async def __aenter__(self) -> QuestDBWriter:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _server_message(text: str) -> str:
    """QuestDB's own message out of the client's 'Could not flush buffer: {json}' text."""
    start = text.find("{")
    if start < 0:
        return text
    try:
        body = json.loads(text[start:])
    except ValueError:
        return text
    message = body.get("message") if isinstance(body, dict) else None
    if not message:
        return text
    return f"{message} (errorId {body['errorId']})" if body.get("errorId") else str(message)


def _as_datetime64(values: Any, name: str) -> Any:
    """int epoch-ns → datetime64[ns]; datetime64 of coarse units → [ns]; else as is."""
    dtype = getattr(values, "dtype", None)
    if dtype is None:
        values = np.asarray(values)
        dtype = values.dtype
        if dtype == object:
            return pd.to_datetime(values, utc=True)
    if pd.api.types.is_integer_dtype(dtype):
        if isinstance(values, pd.Series) and values.hasnans:
            raise ValueError(f"column {name!r} has missing timestamps")
        return np.asarray(values, dtype=np.int64).astype("datetime64[ns]")
    if isinstance(dtype, np.dtype) and dtype.kind == "M" and np.datetime_data(dtype)[0] not in ("ns", "us"):
        return np.asarray(values).astype("datetime64[ns]")
    if isinstance(dtype, pd.DatetimeTZDtype) and dtype.unit not in ("ns", "us"):
        return pd.Series(values).dt.as_unit("ns")
    return values


def _prepare_frame(data: pd.DataFrame | Mapping[str, Any], at: str, timestamp_columns: Sequence[str]) -> pd.DataFrame:
    if isinstance(data, pd.DataFrame):
        frame = data
        converted = {}
    else:
        frame = None
        converted = dict(data)
    names = list(frame.columns) if frame is not None else list(converted)
    if at not in names:
        raise ValueError(f"batch has no designated-timestamp column {at!r}")
    for name in (at, *timestamp_columns):
        if name not in names:
            raise ValueError(f"batch has no timestamp column {name!r}")
        column = frame[name] if frame is not None else converted[name]
        new = _as_datetime64(column, name)
        if new is not column:
            converted[name] = new
    if frame is None:
        return pd.DataFrame(converted, copy=False)
    if converted:
        frame = frame.assign(**converted)
    return frame


_DECIMAL_TYPE = re.compile(r"^DECIMAL\(\s*(\d+)\s*,\s*(\d+)\s*\)$")


def decimal_column(values: Sequence[Any], precision: int = QUESTDB_PRECISION, scale: int = QUESTDB_SCALE) -> Any:
    """Decimals (or None) as an exact decimal128 column, which the client sends as a
    binary DECIMAL: exact, and ~3x faster than serialising Decimal objects one by one.
    Raises ValueError for a value with more than `scale` places or `precision` digits
    (Arrow refuses rather than rounds), or one that is not a Decimal. The defaults are
    the project's column (`core.bounds.QUESTDB_DECIMAL`), which every bounded value fits."""
    try:
        return pd.arrays.ArrowExtensionArray(pa.array(values, type=pa.decimal128(precision, scale)))
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError) as exc:
        raise ValueError(str(exc)) from None


def columns_from_rows(rows: Sequence[Mapping[str, Any]], column_types: Mapping[str, str]) -> dict[str, Any]:
    """Row mappings → the column-wise batch `write_batch` sends fastest, typed by the
    table's own column types (as given to `create_table`; a missing value is NULL).

    Row by row, the client serialises every value in Python (~50 µs a row); column-wise
    the work is a few array conversions, so a writer thread holds the GIL for far less
    (it shares it with the agents' event loop). Timestamp columns take epoch-ns ints;
    a DECIMAL(p, s) column refuses (ValueError) a value with more than s places, as
    does any column a value of the wrong type.
    """
    out: dict[str, Any] = {}
    for name, sql_type in column_types.items():
        kind = sql_type.split()[0].upper()
        values = [row.get(name) for row in rows]
        if kind in ("TIMESTAMP", "TIMESTAMP_NS"):
            if any(v is None for v in values):  # NULL: NaT (the designated timestamp refuses it)
                ns = [np.iinfo(np.int64).min if v is None else v for v in values]
                out[name] = np.array(ns, dtype=np.int64).astype("datetime64[ns]")
            else:
                out[name] = np.fromiter(values, dtype=np.int64, count=len(values))
        elif kind in ("SYMBOL", "VARCHAR", "STRING"):
            out[name] = pd.array(values, dtype="string")
        elif kind in ("LONG", "INT", "SHORT", "BYTE"):
            out[name] = pd.array(values, dtype="Int64")
        elif kind == "DOUBLE":
            out[name] = pd.array(values, dtype="Float64")
        elif kind == "BOOLEAN":  # QuestDB has no NULL boolean: a missing one is false
            out[name] = np.array([bool(v) for v in values], dtype=bool)
        elif (decimal := _DECIMAL_TYPE.match(sql_type.strip().upper())) is not None:
            try:
                out[name] = decimal_column(values, int(decimal[1]), int(decimal[2]))
            except ValueError as exc:
                raise ValueError(f"column {name!r} ({sql_type}): {exc}") from None
        else:
            raise ValueError(f"column {name!r}: no column-wise conversion for {sql_type}")
    return out


def _to_at(value: Any) -> Any:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return _qdb.TimestampNanos(int(value))
    if isinstance(value, pd.Timestamp):
        return _qdb.TimestampNanos(value.value if value.tzinfo is None else value.tz_convert("UTC").value)
    if isinstance(value, (_dt.datetime, _qdb.TimestampNanos)):
        return value
    raise ValueError(f"designated timestamp must be epoch ns or a datetime, got {value!r}")


def _add_rows(
    buf: Any,
    table: str,
    rows: Sequence[Mapping[str, Any]],
    symbols: Sequence[str],
    at: str,
    timestamp_columns: Sequence[str],
) -> int:
    symbol_set = set(symbols)
    ts_set = set(timestamp_columns)
    count = 0
    for row in rows:
        if at not in row or row[at] is None:
            raise ValueError(f"row {count} has no designated timestamp {at!r}")
        syms: dict[str, Any] = {}
        cols: dict[str, Any] = {}
        for name, value in row.items():
            if name == at:
                continue
            if name in symbol_set:
                syms[name] = value
            elif name in ts_set and isinstance(value, (int, np.integer)):
                cols[name] = _qdb.TimestampNanos(int(value))
            else:
                cols[name] = value
        buf.row(table, symbols=syms, columns=cols, at=_to_at(row[at]))
        count += 1
    return count
