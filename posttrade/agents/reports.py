"""Reports for ptrc: generate the day's report files into object storage, list, serve.

`install_reports(app, ...)` registers on a service's App:

* `POST /reports` — generate. JSON body, both optional: `{"date": "2026-11-23",
  "kinds": ["daily_pnl", "positions", "trade_blotter", "compliance"]}` (default: the
  current trading day, every kind). 201 with what was written (name, size, rows) and
  the measured `generation_seconds` with a breakdown per step (`steps`).
* `GET /reports` — the stored reports (`name`, `size`, `last_modified`, ...), newest
  day first; `?date=YYYY-MM-DD` for one day.
* `GET /reports/{name}` — download (`2026-11-23/trade_blotter.csv`; a leading
  `reports/` is accepted too) with the file's content type; 404 JSON when missing,
  400 for a name that tries to leave the reports folder.
* a timer that generates the previous trading day's reports `daily_delay_s` after the
  trading day starts (after ptrc's roll has stored the closing snapshots), unless they
  are all there already — so a restart does not redo them, and a service that was down
  at that moment catches up.

What each report holds and where its rows come from: `posttrade.core.reports`.

The trade blotter is the big one (a day can hold millions of fills), so it is exported
the fast way: QuestDB's `/exp` CSV endpoint, the day cut into `export_slices` time
slices of which `export_parallelism` download at once (QuestDB serves at most two
exports at once by default), each slice parsed into Arrow by pyarrow's multi-threaded
CSV reader while the next ones download and appended to the Parquet file in order. The
CSV file is QuestDB's bytes, concatenated. QuestDB's own Parquet export is not used:
QuestDB 9.3.1 aborts (the whole server) on DECIMAL columns.
"""

from __future__ import annotations

import asyncio
import http.client
import logging
import ssl
import time
from dataclasses import dataclass, field
from datetime import date, datetime, time as dtime, timedelta, timezone
from decimal import Decimal
from typing import Callable, Mapping
from urllib.parse import urlencode, urlsplit
from zoneinfo import ZoneInfo

import httpx
import msgspec
import pyarrow as pa
import pyarrow.parquet as pq
from prometheus_client import Counter, Histogram
from starlette.requests import Request
from starlette.responses import Response

from ..app import App
from ..config import _Section
from ..core.positions import Position
from ..core.reports import (
    COLUMNS,
    CONTENT_TYPES,
    FORMATS,
    REPORT_KINDS,
    SNAPSHOT_FIELDS,
    SnapshotRow,
    TradingDay,
    Valuation,
    arrow_table,
    blotter_from_questdb_csv,
    csv_bytes,
    daily_pnl_rows,
    empty_blotter,
    join_csv_exports,
    parquet_bytes,
    parse_report_name,
    positions_rows,
    report_name,
    snapshot_rows,
    valuations_from_live,
    valuations_from_snapshots,
)
from ..stores.clickhouse import ClickHouseStore, ClickHouseUnavailableError
from ..stores.objects import ObjectNotFoundError, ObjectStore, check_object_name
from ..stores.questdb import QuestDBClient, QuestDBError, QuestDBUnavailableError, check_identifier, sql_literal
from ..tables.table import Table
from ..web.server import JSON, BadRequest

log = logging.getLogger(__name__)

MarkOf = Callable[[str], Decimal | None]

SNAPSHOT_SELECT = ", ".join(SNAPSHOT_FIELDS)
BLOTTER_FIELDS = ", ".join(name for name, _ in COLUMNS["trade_blotter"])


class ReportsSection(_Section):
    """ptrc config `reports:`."""

    prefix: str = "reports"  # object names: <prefix>/<YYYY-MM-DD>/<kind>.<csv|parquet>
    # Generate the previous trading day's reports this long after a trading day starts;
    # null turns the daily run off.
    daily_delay_s: float | None = 900.0
    check_interval_s: float = 60.0
    export_parallelism: int = 2  # concurrent QuestDB exports of the trade blotter
    export_slices: int = 8  # time slices the blotter's day is exported in (a pipeline)
    export_retry_s: float = 60.0  # how long to retry an export QuestDB turns away (busy)
    parquet_compression: str = "snappy"
    trades_table: str = "ptrc_trades"
    snapshots_table: str = "position_snapshots"
    alerts_table: str = "compliance_alerts"  # ClickHouse; may be qualified (db.table)


class GenerateRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    date: str | None = None
    kinds: list[str] | None = None


@dataclass
class ReportFile:
    name: str  # relative to the prefix: 2026-11-23/trade_blotter.csv
    kind: str
    format: str
    size: int
    rows: int


@dataclass
class Generation:
    """What one generation wrote, and where its time went (seconds)."""

    day: date
    files: list[ReportFile] = field(default_factory=list)
    seconds: float = 0.0
    steps: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "date": self.day.isoformat(),
            "reports": [
                {"name": f.name, "kind": f.kind, "format": f.format, "size": f.size, "rows": f.rows,
                 "url": f"/reports/{f.name}"}
                for f in self.files
            ],
            "generation_seconds": round(self.seconds, 6),
            "steps": {k: round(v, 6) for k, v in self.steps.items()},
        }


class ReportService:
    """Generation, listing, download and the daily timer; `install_reports` builds one."""

    def __init__(
        self,
        app: App,
        *,
        positions: Table,
        mark_of: MarkOf,
        multipliers: Mapping[str, Decimal],
        object_store: ObjectStore,
        questdb: QuestDBClient,
        clickhouse: ClickHouseStore | None,
        settings: ReportsSection = ReportsSection(),
        trading_day: TradingDay = TradingDay(),
    ):
        for table in (settings.trades_table, settings.snapshots_table):
            check_identifier(table)
        for part in settings.alerts_table.split("."):
            check_identifier(part)
        check_object_name(settings.prefix)
        if settings.export_parallelism < 1 or settings.export_slices < 1:
            raise ValueError("reports.export_parallelism and reports.export_slices must be >= 1")
        self.app = app
        self.positions = positions
        self.mark_of = mark_of
        self.multipliers = multipliers
        self.store = object_store
        self.questdb = questdb
        self._exporter = QuestDBExporter(questdb, retry_s=settings.export_retry_s)
        self.clickhouse = clickhouse
        self.settings = settings
        self.calendar = trading_day
        self.prefix = settings.prefix
        self.last_daily: date | None = None  # the last day the timer saw complete
        self._lock = asyncio.Lock()  # one generation at a time: they share the exports and the disk
        registry = app.metrics.registry
        self.generation_seconds = Histogram(
            "posttrade_report_generation_seconds", "Time to generate one day's reports", registry=registry,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120),
        )
        self.files_written = Counter(
            "posttrade_report_files_total", "Report files written", ["kind", "format"], registry=registry
        )
        app.page("/reports")(self.list_reports)
        app.page("/reports", methods=("POST",))(self.post_generate)
        app.page("/reports/{name:path}")(self.download)
        if settings.daily_delay_s is not None:
            app.timer(settings.check_interval_s, name="daily_reports")(self.daily)

        @app.health_check("object_store")
        async def object_store_health():
            return await self.store.ping(), self.store.location

    # -- pages ------------------------------------------------------------------------------

    async def post_generate(self, request: Request) -> JSON:
        body = await request.body()
        try:
            req = msgspec.json.decode(body or b"{}", type=GenerateRequest)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise BadRequest({"error": f"invalid request body: {exc}"}) from None
        today = self.calendar.of(datetime.now(timezone.utc))
        day = parse_day(req.date) if req.date is not None else today
        if day > today:
            raise BadRequest({"field": "date", "error": f"{day} has not started yet (the trading day is {today})"})
        kinds = req.kinds if req.kinds is not None else list(REPORT_KINDS)
        unknown = [k for k in kinds if k not in REPORT_KINDS]
        if unknown or not kinds:
            raise BadRequest({"field": "kinds", "error": f"choose from {', '.join(REPORT_KINDS)}; got {kinds}"})
        try:
            generation = await self.generate(day, kinds)
        except (QuestDBUnavailableError, ClickHouseUnavailableError, OSError) as exc:
            # Files already written stay; a new request writes every file again, and the
            # daily run retries a day until all its files are there.
            raise BadRequest({"error": "a store is unavailable", "reason": f"{type(exc).__name__}: {exc}"}, 503) from None
        return JSON(generation.to_json(), status_code=201)

    async def list_reports(self, request: Request) -> JSON:
        raw = request.query_params.get("date")
        prefix = f"{self.prefix}/" if not raw else f"{self.prefix}/{parse_day(raw).isoformat()}/"
        listed = await self.store.list(prefix)
        reports = []
        for info in listed:
            relative = info.name[len(self.prefix) + 1:]
            parsed = parse_report_name(relative)
            reports.append(
                {
                    "name": relative,
                    "date": parsed[0].isoformat() if parsed else None,
                    "kind": parsed[1] if parsed else None,
                    "format": parsed[2] if parsed else None,
                    "size": info.size,
                    "last_modified": info.last_modified.isoformat(),
                    "url": f"/reports/{relative}",
                }
            )
        reports.sort(key=lambda r: (r["date"] or "", r["name"]), reverse=True)
        return JSON({"reports": reports, "count": len(reports)})

    async def download(self, request: Request) -> Response:
        relative = request.path_params["name"]
        if relative.startswith(f"{self.prefix}/"):
            relative = relative[len(self.prefix) + 1:]
        name = f"{self.prefix}/{relative}"
        try:
            check_object_name(name)
        except ValueError as exc:
            raise BadRequest({"name": relative, "error": str(exc)}) from None
        try:
            data = await self.store.get(name)
        except ObjectNotFoundError:
            raise BadRequest({"name": relative, "error": "no such report"}, status_code=404) from None
        except ValueError as exc:  # e.g. the local store refusing a name through a file
            raise BadRequest({"name": relative, "error": str(exc)}) from None
        extension = relative.rsplit(".", 1)[-1]
        filename = relative.replace("/", "_")
        return Response(
            data,
            media_type=CONTENT_TYPES.get(extension, "application/octet-stream"),
            headers={"Content-Disposition": f'attachment; filename="{filename}"'},
        )

    # -- the daily run --------------------------------------------------------------------------

    async def daily(self, now: datetime | None = None) -> Generation | None:
        """Generate the previous trading day's reports if it is time and they are missing."""
        now = now or datetime.now(timezone.utc)
        today = self.calendar.of(now)
        due = self.calendar.start(today) + timedelta(seconds=self.settings.daily_delay_s or 0)
        previous = today - timedelta(days=1)
        if now < due or self.last_daily == previous:
            return None
        expected = {report_name(self.prefix, previous, k, f) for k in REPORT_KINDS for f in FORMATS}
        present = {info.name for info in await self.store.list(f"{self.prefix}/{previous.isoformat()}/")}
        generation = None
        if not expected <= present:
            log.info("generating the reports of %s", previous)
            generation = await self.generate(previous, list(REPORT_KINDS))
        self.last_daily = previous
        return generation

    # -- generation -------------------------------------------------------------------------------

    async def generate(self, day: date, kinds: list[str] | tuple[str, ...] = REPORT_KINDS) -> Generation:
        """Build the reports of `day` and write them (CSV and Parquet each); measured."""
        async with self._lock:
            started = time.perf_counter()
            generation = Generation(day)
            jobs = []
            if "daily_pnl" in kinds or "positions" in kinds:
                jobs.append(self._position_reports(day, [k for k in ("daily_pnl", "positions") if k in kinds], generation))
            if "trade_blotter" in kinds:
                jobs.append(self._trade_blotter(day, generation))
            if "compliance" in kinds:
                jobs.append(self._compliance(day, generation))
            await asyncio.gather(*jobs)
            generation.seconds = time.perf_counter() - started
            generation.files.sort(key=lambda f: f.name)
            self.generation_seconds.observe(generation.seconds)
            return generation

    def _is_today(self, day: date) -> bool:
        return day == self.calendar.of(datetime.now(timezone.utc))

    async def valuations(self, day: date) -> list[Valuation]:
        """The positions the day's P&L and positions reports show (see core.reports)."""
        if self._is_today(day):
            positions = [Position.from_state(state) for state in self.positions.values()]
            return valuations_from_live(positions, self.mark_of, time.time_ns())
        start, end = self.calendar.window_ns(day)
        _, next_end = self.calendar.window_ns(day + timedelta(days=1))
        table = self.settings.snapshots_table
        rolls = await self._snapshots(
            f"SELECT {SNAPSHOT_SELECT} FROM {table} WHERE reason = 'roll' "
            f"AND ts >= {_ts(start)} AND ts < {_ts(next_end)} ORDER BY ts"
        )
        latest = []
        if not any(row.ts >= end for row in rolls):
            # ptrc did not roll into the next day (it was down): fall back to each
            # position's last snapshot of the day. A roll covers every position ptrc
            # knows, so with one this query would add nothing.
            latest = await self._snapshots(
                f"SELECT {SNAPSHOT_SELECT} FROM {table} WHERE ts < {_ts(end)} LATEST ON ts PARTITION BY account, symbol"
            )
        return valuations_from_snapshots(rolls, latest, (start, end), next_end, self.multipliers)

    async def _snapshots(self, sql: str) -> list[SnapshotRow]:
        try:
            result = await self.questdb.query(sql)
        except QuestDBError as exc:
            if "does not exist" in exc.message:
                return []  # ptrc has stored no snapshot yet
            raise
        return snapshot_rows(result.columns, result.rows)

    async def _position_reports(self, day: date, kinds: list[str], generation: Generation) -> None:
        started = time.perf_counter()
        valuations = await self.valuations(day)
        generation.steps["positions.read"] = time.perf_counter() - started
        for kind in kinds:
            rows = daily_pnl_rows(day, valuations) if kind == "daily_pnl" else positions_rows(day, valuations)
            await self._write_rows(day, kind, rows, generation)

    async def _compliance(self, day: date, generation: Generation) -> None:
        started = time.perf_counter()
        rows: list[dict] = []
        if self.clickhouse is not None:
            start, end = self.calendar.window_ns(day)
            result = await self.clickhouse.query(
                # `ts_ns`, not `ts`: ClickHouse would let an alias named ts shadow the
                # column in the WHERE clause.
                "SELECT alert_id, toUnixTimestamp64Nano(ts) AS ts_ns, rule, severity, account, symbol, message, "
                f"observed, `limit` FROM {self.settings.alerts_table} FINAL "
                "WHERE ts >= fromUnixTimestamp64Nano({start:Int64}) AND ts < fromUnixTimestamp64Nano({end:Int64}) "
                "ORDER BY ts, alert_id",
                parameters={"start": start, "end": end},
            )
            rows = result.dicts()
            for row in rows:
                row["ts"] = row.pop("ts_ns")
        generation.steps["compliance.read"] = time.perf_counter() - started
        await self._write_rows(day, "compliance", rows, generation)

    async def _write_rows(self, day: date, kind: str, rows: list[dict], generation: Generation) -> None:
        started = time.perf_counter()
        columns = COLUMNS[kind]
        csv_data, parquet_data = await asyncio.to_thread(
            lambda: (csv_bytes(columns, rows), parquet_bytes(arrow_table(columns, rows), self.settings.parquet_compression))
        )
        generation.steps[f"{kind}.encode"] = time.perf_counter() - started
        await self._put(day, kind, {"csv": csv_data, "parquet": parquet_data}, len(rows), generation)

    async def _put(self, day: date, kind: str, data: dict[str, bytes], rows: int, generation: Generation) -> None:
        started = time.perf_counter()
        await asyncio.gather(
            *(self.store.put(report_name(self.prefix, day, kind, fmt), blob, CONTENT_TYPES[fmt])
              for fmt, blob in data.items())
        )
        generation.steps[f"{kind}.store"] = time.perf_counter() - started
        for fmt, blob in data.items():
            generation.files.append(
                ReportFile(name=f"{day.isoformat()}/{kind}.{fmt}", kind=kind, format=fmt, size=len(blob), rows=rows)
            )
            self.files_written.labels(kind, fmt).inc()

    # -- the trade blotter -------------------------------------------------------------------------

    async def _trade_blotter(self, day: date, generation: Generation) -> None:
        """Export, parse and encode the day's fills as a pipeline over time slices.

        Up to `export_parallelism` slices download at once; each downloaded slice is
        parsed into Arrow in a worker thread while later ones download, and the parsed
        slices are appended, in order, to one Parquet file as row groups. The CSV file
        is stored as soon as every slice is in, while the last slices are still being
        encoded. Everything runs at once on purpose: QuestDB formats text on its
        threads, pyarrow parses and encodes on ours, the disk writes in the kernel.
        """
        start, end = self.calendar.window_ns(day)
        end = min(end, _next_micro(time.time_ns()))  # nothing is stored in the future
        slices = _slices(start, end, self.settings.export_slices)
        steps = generation.steps
        gate = asyncio.Semaphore(self.settings.export_parallelism)
        began = time.perf_counter()
        parse_seconds: list[float] = []

        async def export(lo: int, hi: int) -> bytes:
            async with gate:
                return await self._export_csv(
                    f"SELECT {BLOTTER_FIELDS} FROM {self.settings.trades_table} "
                    f"WHERE ts >= {_ts(lo)} AND ts < {_ts(hi)}"
                )

        async def parse(download: asyncio.Task) -> pa.Table:
            data = await download
            if not data:
                return empty_blotter()
            parse_started = time.perf_counter()
            table = await asyncio.to_thread(blotter_from_questdb_csv, data)
            parse_seconds.append(time.perf_counter() - parse_started)
            return table

        downloads = [asyncio.create_task(export(lo, hi)) for lo, hi in slices]
        parses = [asyncio.create_task(parse(download)) for download in downloads]

        async def store_csv() -> bytes:
            parts = await asyncio.gather(*downloads)
            steps["trade_blotter.export"] = time.perf_counter() - began
            exported = [part for part in parts if part]
            data = join_csv_exports(exported) if exported else csv_bytes(COLUMNS["trade_blotter"], [])
            stored = time.perf_counter()
            await self.store.put(report_name(self.prefix, day, "trade_blotter", "csv"), data, CONTENT_TYPES["csv"])
            steps["trade_blotter.store_csv"] = time.perf_counter() - stored
            return data

        async def encode_parquet() -> tuple[bytes, int]:
            sink = pa.BufferOutputStream()
            writer = pq.ParquetWriter(
                sink, empty_blotter().schema, compression=self.settings.parquet_compression,
                # Only the few-valued columns gain from dictionaries; fill and order ids
                # are unique, and trying costs more than the rest of the encoding.
                use_dictionary=["account", "symbol", "side", "venue"],
                write_statistics=["ts"],
            )
            encode_seconds = 0.0
            rows = 0
            try:
                for task in parses:
                    table = await task
                    encode_started = time.perf_counter()
                    await asyncio.to_thread(writer.write_table, table)
                    encode_seconds += time.perf_counter() - encode_started
                    rows += table.num_rows
            finally:
                writer.close()
            steps["trade_blotter.parse_total"] = sum(parse_seconds)  # summed over slices parsed at once
            steps["trade_blotter.parquet_encode"] = encode_seconds
            blob = sink.getvalue().to_pybytes()
            stored = time.perf_counter()
            await self.store.put(report_name(self.prefix, day, "trade_blotter", "parquet"), blob, CONTENT_TYPES["parquet"])
            steps["trade_blotter.store_parquet"] = time.perf_counter() - stored
            return blob, rows

        try:
            csv_data, (parquet_data, rows) = await asyncio.gather(store_csv(), encode_parquet())
        finally:
            for task in (*downloads, *parses):
                task.cancel()
        for fmt, blob in (("csv", csv_data), ("parquet", parquet_data)):
            generation.files.append(
                ReportFile(name=f"{day.isoformat()}/trade_blotter.{fmt}", kind="trade_blotter", format=fmt,
                           size=len(blob), rows=rows)
            )
            self.files_written.labels("trade_blotter", fmt).inc()

    async def _export_csv(self, sql: str) -> bytes:
        """The CSV QuestDB's `/exp` gives for `sql` (b"" when the table does not exist)."""
        return await asyncio.to_thread(self._exporter.export_csv, sql)


class QuestDBExporter:
    """Reads QuestDB's `/exp` CSV export in full, from a worker thread.

    `http.client` rather than the QuestDBClient's httpx client: for a 200 MB export,
    httpx's pure-Python HTTP/1.1 parsing costs about 0.7 CPU-seconds, `http.client`
    0.2, and on a 2-core machine CPU is what report generation waits for. The address
    and credentials are the QuestDBClient's (`base_url`, its headers and auth).
    QuestDB answers 429 while it serves its maximum of concurrent exports (2 by
    default): that is retried for `retry_s`.
    """

    def __init__(self, questdb: QuestDBClient, *, retry_s: float, timeout_s: float = 300.0):
        url = urlsplit(questdb.base_url)
        self.tls = url.scheme == "https"
        self.host = url.hostname or "127.0.0.1"
        self.port = url.port or (443 if self.tls else 80)
        self.retry_s = retry_s
        self.timeout_s = timeout_s
        # QuestDBClient has no public export (see docs/ptrc_reconciliation_and_reports.md):
        # its pooled client carries the credentials.
        self.headers = _auth_headers(questdb._http)

    def export_csv(self, sql: str) -> bytes:
        deadline = time.monotonic() + self.retry_s
        delay = 0.05
        path = "/exp?" + urlencode({"query": sql})
        while True:
            if self.tls:
                conn = http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout_s,
                                                   context=ssl.create_default_context())
            else:
                conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)
            try:
                conn.request("GET", path, headers=self.headers)
                response = conn.getresponse()
                body = response.read()  # raises IncompleteRead if the export is cut short
                status = response.status
            except (OSError, http.client.HTTPException) as exc:
                raise QuestDBUnavailableError(f"QuestDB export from {self.host}:{self.port} failed: {exc!r}",
                                              query=sql) from exc
            finally:
                conn.close()
            if status == 200:
                return body
            text = body.decode("utf-8", "replace")
            if status == 429 and time.monotonic() < deadline:
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            if status == 400 and "does not exist" in text:
                return b""
            error = QuestDBUnavailableError if status >= 429 else QuestDBError
            raise error(f"export failed (HTTP {status}): {text[:500]}", query=sql, status=status)


def _auth_headers(client: httpx.AsyncClient) -> dict[str, str]:
    """The Authorization header an httpx client would send (its default headers or auth)."""
    headers = {}
    if "authorization" in client.headers:
        headers["Authorization"] = client.headers["authorization"]
    if client.auth is not None:
        request = next(client.auth.sync_auth_flow(httpx.Request("GET", str(client.base_url))))
        if "authorization" in request.headers:
            headers["Authorization"] = request.headers["authorization"]
    return headers


def parse_day(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except (TypeError, ValueError):
        raise BadRequest({"field": "date", "error": f"not a date (YYYY-MM-DD): {text!r}"}) from None


def _ts(ns: int) -> str:
    """A QuestDB timestamp literal, to the microsecond (slice bounds are whole µs)."""
    return sql_literal(datetime(1970, 1, 1, tzinfo=timezone.utc) + timedelta(microseconds=ns // 1000))


def _next_micro(ns: int) -> int:
    return (ns // 1000 + 1) * 1000


def _slices(start: int, end: int, count: int) -> list[tuple[int, int]]:
    """[start, end) cut into `count` slices on whole microseconds (fewer if it is short)."""
    if end <= start:
        return [(start, start)]
    bounds = [start] + [start + (end - start) * i // count // 1000 * 1000 for i in range(1, count)] + [end]
    return [(lo, hi) for lo, hi in zip(bounds, bounds[1:]) if hi > lo] or [(start, end)]


def install_reports(
    app: App,
    *,
    positions: Table,
    mark_of: MarkOf,
    multipliers: Mapping[str, Decimal],
    object_store: ObjectStore,
    questdb: QuestDBClient,
    clickhouse: ClickHouseStore | None,
    settings: ReportsSection = ReportsSection(),
    day_timezone: str = "UTC",
    day_starts_at: dtime = dtime(0, 0),
) -> ReportService:
    """Register reports on `app`: `/reports` pages, the daily timer, a store health check.

    `positions`: the live table (current day's reports); `mark_of`: current marks;
    `multipliers`: contract multipliers (market value of snapshot-based positions);
    `object_store`: where files go; `questdb`: SQL and exports of `ptrc_trades` and
    `position_snapshots`; `clickhouse`: `compliance_alerts` (None: no alerts);
    `day_timezone` / `day_starts_at`: ptrc's trading-day calendar.
    """
    return ReportService(
        app, positions=positions, mark_of=mark_of, multipliers=multipliers, object_store=object_store,
        questdb=questdb, clickhouse=clickhouse, settings=settings,
        trading_day=TradingDay(ZoneInfo(day_timezone), day_starts_at),
    )


__all__ = ["Generation", "ReportService", "ReportsSection", "install_reports"]
