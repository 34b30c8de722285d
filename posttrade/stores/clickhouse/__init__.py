"""ClickHouse through clickhouse-connect: the embedded chdb engine or a real server, one API.

`open_clickhouse(...)` returns a `ClickHouseStore` whose methods are the same either way:
`command`, `query`, `query_df`, `query_arrow`, `insert` (rows or columns),
`insert_arrow`, `insert_df`, `ping`, `close`.

* Embedded: `open_clickhouse(dsn="chdb:///abs/path/to/data")` (three slashes: the
  absolute path follows `chdb://`), or `dsn="chdb://memory"` for a throwaway in-memory
  engine. clickhouse-connect 1.12 reads the *netloc* of `chdb://x/y` as the location
  and `y` as the database, so `chdb://relative/dir` would silently mean "engine at
  ./relative, database dir" — this module rejects that form. A database can be named
  with `database=` or `?database=` in the dsn.
* Server: `open_clickhouse(host=..., port=8123, user=..., password=..., secure=...)`.

chdb hosts ONE engine, with one data path, per process. This module keeps a registry:
opening the path that is already open returns the same (reference-counted) store;
opening a different path while one is open raises `ChdbPathError` (chdb itself would
fail with a less obvious "EmbeddedServer already initialized"). After the last
`close()` of a path another path may be opened. Under pytest, open the chdb path in a
session-scoped fixture. A data path is also exclusive to one *process* (the engine locks
it): a second process on the same path fails to start its engine (`ChdbPathError`), so
each service gets its own path and tools read through the service, or a real server.

Threading scheme (the same in every module of `posttrade.stores`): public methods are
`async`; each has a `<name>_sync` twin that blocks and is safe to call from any thread.
Here the async methods run their twin on the store's own thread pool rather than the
loop's default one: chdb serialises calls on a connection (clickhouse-connect holds a
per-handle lock — a query on a handle with an open stream would otherwise silently
return nothing), so the embedded store uses one worker and queued chdb calls never tie
up the threads other stores use. A server store uses `max_workers` threads (default 4)
on one HTTP client built without a session id: ClickHouse refuses concurrent queries
in one session (SESSION_IS_LOCKED), and a session buys us nothing.

Query parameters: prefer server-side binding, `{name:Type}` in the SQL and
`parameters={"name": value}` — works with both backends.

Values come back as clickhouse-connect decodes them: `DateTime64(9)` becomes a naive
UTC `datetime` truncated to microseconds (use `query_arrow`/`query_df` or
`toUnixTimestamp64Nano(ts)` in SQL when nanoseconds matter).
"""

from __future__ import annotations

import asyncio
import functools
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlparse

import clickhouse_connect
from clickhouse_connect.driver.binding import quote_identifier
from clickhouse_connect.driver.exceptions import Error as ClickHouseError

__all__ = [
    "ClickHouseError",
    "ClickHouseUnavailableError",
    "ChdbPathError",
    "Rows",
    "ClickHouseStore",
    "open_clickhouse",
]

T = TypeVar("T")


class ClickHouseUnavailableError(ClickHouseError):
    """The ClickHouse server (or the embedded engine) does not answer."""


class ChdbPathError(ValueError):
    """A second, different chdb data path was opened in this process."""


@dataclass(frozen=True)
class Rows:
    """A query's result: column names and rows (tuples), as clickhouse-connect decoded them."""

    column_names: tuple[str, ...]
    rows: list[Sequence[Any]]

    def __len__(self) -> int:
        return len(self.rows)

    def dicts(self) -> list[dict[str, Any]]:
        return [dict(zip(self.column_names, row)) for row in self.rows]

    def column(self, name: str) -> list[Any]:
        i = self.column_names.index(name)
        return [row[i] for row in self.rows]

    def scalar(self) -> Any:
        if len(self.rows) != 1 or len(self.column_names) != 1:
            raise ValueError(f"expected one value, got {len(self.rows)} rows x {len(self.column_names)} columns")
        return self.rows[0][0]


class ClickHouseStore:
    """One clickhouse-connect client (chdb or HTTP) with sync and async methods."""

    def __init__(self, client: Any, *, embedded: bool, location: str, max_workers: int):
        self.client = client  # the clickhouse-connect client, for anything not wrapped here
        self.embedded = embedded
        self.location = location  # chdb data path (or ":memory:") or the server URL
        self._executor = ThreadPoolExecutor(
            max_workers=max_workers, thread_name_prefix="chdb" if embedded else "clickhouse"
        )
        self._refs = 1
        self._closed = False

    @property
    def database(self) -> str | None:
        return self.client.database

    # -- sync, thread-safe ---------------------------------------------------------

    def command_sync(
        self, sql: str, parameters: Mapping[str, Any] | None = None, *, settings: Mapping[str, Any] | None = None
    ) -> Any:
        """DDL or a statement with a single value; returns what clickhouse-connect returns."""
        return self.client.command(sql, parameters=parameters, settings=settings)

    def query_sync(
        self, sql: str, parameters: Mapping[str, Any] | None = None, *, settings: Mapping[str, Any] | None = None
    ) -> Rows:
        result = self.client.query(sql, parameters=parameters, settings=settings)
        return Rows(column_names=tuple(result.column_names), rows=result.result_rows)

    def query_df_sync(
        self, sql: str, parameters: Mapping[str, Any] | None = None, *, settings: Mapping[str, Any] | None = None
    ) -> Any:
        """Result as a pandas DataFrame."""
        return self.client.query_df(sql, parameters=parameters, settings=settings)

    def query_arrow_sync(
        self, sql: str, parameters: Mapping[str, Any] | None = None, *, settings: Mapping[str, Any] | None = None
    ) -> Any:
        """Result as a pyarrow Table (the fastest way out for large results)."""
        return self.client.query_arrow(sql, parameters=parameters, settings=settings)

    def insert_sync(
        self,
        table: str,
        data: Sequence[Sequence[Any]],
        column_names: Sequence[str],
        *,
        column_oriented: bool = False,
    ) -> int:
        """Insert rows (or, with `column_oriented=True`, one sequence per column);
        return the number of rows written."""
        if not data or (column_oriented and not len(data[0])):
            return 0
        summary = self.client.insert(
            table, data, column_names=list(column_names), column_oriented=column_oriented
        )
        return summary.written_rows

    def insert_arrow_sync(self, table: str, arrow_table: Any) -> int:
        """Insert a pyarrow Table (columns by name). The fastest way in."""
        if arrow_table.num_rows == 0:
            return 0
        self.client.insert_arrow(table, arrow_table)
        return arrow_table.num_rows

    def insert_df_sync(self, table: str, df: Any) -> int:
        """Insert a pandas DataFrame (columns by name)."""
        if len(df) == 0:
            return 0
        return self.client.insert_df(table, df).written_rows

    def ping_sync(self) -> bool:
        if self._closed:
            raise ClickHouseUnavailableError("store is closed")
        if not self.client.ping():
            raise ClickHouseUnavailableError(f"ClickHouse at {self.location} does not answer")
        return True

    def close_sync(self) -> None:
        """Release this reference; the last one closes the client (and, for chdb,
        frees the process's engine path)."""
        with _REGISTRY_LOCK:
            if self._closed:
                return
            self._refs -= 1
            if self._refs > 0:
                return
            self._closed = True
            if self.embedded and _EMBEDDED.get(self.location) is self:
                del _EMBEDDED[self.location]
            # Inside the lock: a new engine path may only open once this one is closed.
            self._executor.shutdown(wait=True)
            self.client.close()

    # -- async ---------------------------------------------------------------------

    async def _run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        if self._closed:
            raise ClickHouseUnavailableError(f"ClickHouse store {self.location} is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    async def command(
        self, sql: str, parameters: Mapping[str, Any] | None = None, *, settings: Mapping[str, Any] | None = None
    ) -> Any:
        return await self._run(self.command_sync, sql, parameters, settings=settings)

    async def query(
        self, sql: str, parameters: Mapping[str, Any] | None = None, *, settings: Mapping[str, Any] | None = None
    ) -> Rows:
        return await self._run(self.query_sync, sql, parameters, settings=settings)

    async def query_df(
        self, sql: str, parameters: Mapping[str, Any] | None = None, *, settings: Mapping[str, Any] | None = None
    ) -> Any:
        return await self._run(self.query_df_sync, sql, parameters, settings=settings)

    async def query_arrow(
        self, sql: str, parameters: Mapping[str, Any] | None = None, *, settings: Mapping[str, Any] | None = None
    ) -> Any:
        return await self._run(self.query_arrow_sync, sql, parameters, settings=settings)

    async def insert(
        self,
        table: str,
        data: Sequence[Sequence[Any]],
        column_names: Sequence[str],
        *,
        column_oriented: bool = False,
    ) -> int:
        return await self._run(self.insert_sync, table, data, column_names, column_oriented=column_oriented)

    async def insert_arrow(self, table: str, arrow_table: Any) -> int:
        return await self._run(self.insert_arrow_sync, table, arrow_table)

    async def insert_df(self, table: str, df: Any) -> int:
        return await self._run(self.insert_df_sync, table, df)

    async def ping(self) -> bool:
        """True, or raises ClickHouseUnavailableError (for /health)."""
        return await self._run(self.ping_sync)

    async def close(self) -> None:
        # Not on our own executor: closing shuts it down.
        await asyncio.to_thread(self.close_sync)

    async def __aenter__(self) -> ClickHouseStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


# The embedded engine path open in this process -> its shared store.
_EMBEDDED: dict[str, ClickHouseStore] = {}
_REGISTRY_LOCK = threading.Lock()


def _chdb_location(dsn: str) -> tuple[str, str | None]:
    """`chdb:///abs/path[?database=db]` or `chdb://memory` → (location, database)."""
    parsed = urlparse(dsn)
    if parsed.scheme != "chdb":
        raise ValueError(f"not a chdb dsn: {dsn!r}")
    query = parse_qs(parsed.query)
    unknown = set(query) - {"database"}
    if unknown:
        raise ValueError(f"unsupported chdb dsn options {sorted(unknown)} in {dsn!r}")
    database = query.get("database", [None])[0]
    if parsed.netloc:
        if parsed.netloc not in ("memory", ":memory:") or parsed.path not in ("", "/"):
            raise ValueError(
                f"chdb dsn {dsn!r}: give an absolute path after chdb:// (chdb:///abs/path, three "
                "slashes) or chdb://memory; clickhouse-connect would read 'chdb://x/y' as engine 'x', database 'y'"
            )
        return ":memory:", database
    if not parsed.path.startswith("/"):
        raise ValueError(f"chdb dsn {dsn!r}: the data path must be absolute (chdb:///abs/path)")
    # clickhouse-connect realpath()s too; the registry must compare the same spelling.
    return os.path.realpath(parsed.path), database


def _ensure_database(client: Any, database: str | None, create: bool) -> None:
    if not database:
        return
    if create:
        client.command(f"CREATE DATABASE IF NOT EXISTS {quote_identifier(database)}")
    client.database = database


def open_clickhouse(
    dsn: str | None = None,
    *,
    host: str | None = None,
    port: int = 8123,
    user: str | None = None,
    password: str | None = None,
    database: str | None = None,
    secure: bool = False,
    verify: bool = True,
    ca_cert: str | None = None,
    create_database: bool = False,
    connect_timeout: float = 10,
    send_receive_timeout: float = 300,
    max_workers: int = 4,
    settings: Mapping[str, Any] | None = None,
) -> ClickHouseStore:
    """Open the embedded engine (`dsn="chdb:///abs/path"` or `"chdb://memory"`) or a server
    (`host=`, or a `clickhouse://`/`http(s)://` dsn). Blocking (connects / starts the
    engine): from async code, `await asyncio.to_thread(open_clickhouse, ...)`.

    `database`: the default database of the store; with `create_database=True` it is
    created if missing (off by default: on a server that needs rights, and a typo
    should fail). Credentials are used only if given.
    """
    if dsn and dsn.startswith("chdb:"):
        if host is not None or user is not None or password is not None:
            raise ValueError("host/user/password make no sense for the embedded chdb engine")
        location, dsn_database = _chdb_location(dsn)
        database = database or dsn_database
        with _REGISTRY_LOCK:
            if _EMBEDDED:
                (open_location, store), = _EMBEDDED.items()
                if open_location != location:
                    raise ChdbPathError(
                        f"chdb engine already open at {open_location!r} in this process; chdb allows one "
                        f"data path per process, so {location!r} cannot be opened until it is closed"
                    )
                if database and database != store.database:
                    raise ChdbPathError(
                        f"the shared chdb store at {location!r} uses database {store.database!r}, not "
                        f"{database!r}; use qualified table names (db.table) instead"
                    )
                store._refs += 1
                return store
            if location != ":memory:":
                os.makedirs(location, exist_ok=True)
            try:
                client = clickhouse_connect.get_client(
                    dsn="chdb://" + ("memory" if location == ":memory:" else location), settings=dict(settings or {})
                )
            except ClickHouseError as exc:
                if "EmbeddedServer" not in str(exc):
                    raise
                raise ChdbPathError(
                    f"cannot start the chdb engine at {location!r}: {exc}. Another process using the same "
                    "data path is the usual cause (a path is exclusive to one process), or chdb was opened "
                    "elsewhere in this process without open_clickhouse"
                ) from exc
            try:
                _ensure_database(client, database, create_database)
            except Exception:
                client.close()
                raise
            store = ClickHouseStore(client, embedded=True, location=location, max_workers=1)
            _EMBEDDED[location] = store
            return store

    if dsn is None and host is None:
        raise ValueError("give a chdb dsn or a server host")
    kwargs: dict[str, Any] = {
        "port": port,
        "secure": secure,
        "verify": verify,
        "connect_timeout": connect_timeout,
        "send_receive_timeout": send_receive_timeout,
        # Concurrent queries from our worker threads must not share a session.
        "autogenerate_session_id": False,
        "settings": dict(settings or {}),
    }
    if dsn is not None:
        kwargs["dsn"] = dsn
    if host is not None:
        kwargs["host"] = host
    if user is not None:
        kwargs["username"] = user
    if password is not None:
        kwargs["password"] = password
    if ca_cert is not None:
        kwargs["ca_cert"] = ca_cert
    if database and not create_database:
        kwargs["database"] = database
    client = clickhouse_connect.get_client(**kwargs)
    try:
        if create_database:
            _ensure_database(client, database, True)
    except Exception:
        client.close()
        raise
    location = f"{'https' if secure else 'http'}://{host or urlparse(dsn or '').hostname}:{port}"
    return ClickHouseStore(client, embedded=False, location=location, max_workers=max_workers)
