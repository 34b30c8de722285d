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

What each report holds and where its rows come from: `posttrade.core.reports`. Money
is in each instrument's currency and in the account's base currency: the current day
at ptrc's current FX rates (`fx`), a past day at the rates ptrc stored with the roll
into the next day (`position_snapshots`; `posttrade.core.reports`, "Currencies").

The trade blotter is the big one (a day can hold millions of fills), and exporting it
from QuestDB is most of the work (QuestDB formats every DECIMAL as text). So it is kept
during the day, in a *spool* on local disk (`BlotterSpool`): a timer
(`spool_interval_s`) exports each cell of the day (`spool_cell_s`) once it has ended,
through QuestDB's `/exp` CSV endpoint, parses it into Arrow, encodes it as Parquet, and
stores CSV rows + Parquet as one chunk file. A generation then asks QuestDB for a
fingerprint of every cell (row count and exact sums of the decimal columns — one
aggregate query), uses every chunk whose cells still match, exports the rest (the
unfinished cell, cells whose rows changed: a late fill, a rewrite, a restart's
catch-up), and assembles: the CSV is QuestDB's bytes, concatenated; the Parquet file is
the chunks' row groups joined without re-encoding (`posttrade.stores.parquet.stitch_parquet`).
Without the spool (`spool: false`, a fresh disk) the same code exports the whole day.

QuestDB's own Parquet export is not used: QuestDB 9.3.1 aborts (the whole server) on
DECIMAL columns.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from datetime import date, datetime, time as dtime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Callable, Mapping
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

import msgspec
from prometheus_client import Counter, Histogram
from starlette.requests import Request
from starlette.responses import Response

from ..app import App
from ..config import _Section
from ..core.fx import FxRates
from ..core.positions import Position
from ..core.reference import Reference
from ..core.reports import (
    BLOTTER_CSV_HEADER,
    BLOTTER_DECIMALS,
    COLUMNS,
    CONTENT_TYPES,
    FORMATS,
    NS,
    REPORT_KINDS,
    SNAPSHOT_FIELDS,
    SNAPSHOT_LOCAL_FIELDS,
    BlotterPiece,
    ChunkHead,
    Fingerprint,
    SnapshotRow,
    TradingDay,
    Valuation,
    blotter_from_questdb_csv,
    blotter_parquet,
    cell_bounds,
    daily_pnl_rows,
    empty_blotter,
    encode_report,
    fingerprint_of,
    parse_iso_ns,
    parse_report_name,
    plan_blotter,
    positions_rows,
    report_name,
    snapshot_rows,
    to_ns,
    valuations_from_live,
    valuations_from_snapshots,
)
from ..stores.clickhouse import ClickHouseStore, ClickHouseUnavailableError
from ..stores.objects import ObjectNotFoundError, ObjectStore, check_object_name
from ..stores.parquet import ParquetLayout, parquet_layout, stitch_parquet
from ..stores.questdb import QuestDBClient, QuestDBError, QuestDBUnavailableError, check_identifier, sql_literal
from ..stores.questdb.export import QuestDBExporter
from ..tables.table import Table
from ..web import params
from ..web.params import BadRequest
from ..web.server import JSON

log = logging.getLogger(__name__)

MarkOf = Callable[[str], Decimal | None]

BLOTTER_FIELDS = ", ".join(name for name, _ in COLUMNS["trade_blotter"])
SPOOL_STEP_NS = 3600 * NS  # the spool is brought up to date an hour of cells at a time


class ReportsSection(_Section):
    """ptrc config `reports:`."""

    prefix: str = "reports"  # object names: <prefix>/<YYYY-MM-DD>/<kind>.<csv|parquet>
    # Generate the previous trading day's reports this long after a trading day starts;
    # null turns the daily run off.
    daily_delay_s: float | None = 900.0
    check_interval_s: float = 60.0
    export_parallelism: int = 2  # concurrent QuestDB exports of the trade blotter
    export_chunk_rows: int = 50_000  # at most this many rows per export (and per spool chunk), as QuestDB counts them
    export_retry_s: float = 60.0  # how long to retry an export QuestDB turns away (busy)
    parquet_compression: str = "snappy"
    trades_table: str = "ptrc_trades"
    snapshots_table: str = "position_snapshots"
    alerts_table: str = "compliance_alerts"  # ClickHouse; may be qualified (db.table)
    # The blotter spool: the day's fills exported as the day goes (see the module doc).
    spool: bool = True
    spool_dir: str | None = None  # null: <system temp dir>/posttrade-reports-spool
    spool_cell_s: int = 300  # the day is checked and exported in cells this long
    spool_interval_s: float = 60.0  # how often the spool is brought up to date
    spool_settle_s: float = 10.0  # a cell is exported once it ended this long ago
    spool_recheck_s: float = 900.0  # each run checks this much of the recent day again (late fills)
    spool_keep_days: int = 3  # spooled days older than this are removed


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
    blotter: dict[str, int] = field(default_factory=dict)  # where the blotter's rows came from

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
            **({"trade_blotter": self.blotter} if self.blotter else {}),
        }


class ReportService:
    """Generation, listing, download and the daily timer; `install_reports` builds one."""

    def __init__(
        self,
        app: App,
        *,
        positions: Table,
        mark_of: MarkOf,
        multipliers: Mapping[str, Decimal] | None = None,
        object_store: ObjectStore,
        questdb: QuestDBClient,
        clickhouse: ClickHouseStore | None,
        settings: ReportsSection = ReportsSection(),
        trading_day: TradingDay = TradingDay(),
        fx: FxRates | None = None,
    ):
        for table in (settings.trades_table, settings.snapshots_table):
            check_identifier(table)
        for part in settings.alerts_table.split("."):
            check_identifier(part)
        check_object_name(settings.prefix)
        if settings.export_parallelism < 1 or settings.export_chunk_rows < 1:
            raise ValueError("reports.export_parallelism and reports.export_chunk_rows must be >= 1")
        if settings.spool_cell_s < 1 or 86_400 % settings.spool_cell_s:
            raise ValueError("reports.spool_cell_s must divide a day (e.g. 60, 300, 900, 3600)")
        self.app = app
        self.positions = positions
        self.mark_of = mark_of
        # Current rates for the current day; the reference data for past days' rows
        # stored without their currencies (default: everything in USD, no FX marks).
        self.fx = fx or FxRates(Reference(), lambda symbol: None)
        self.reference = self.fx.reference
        self.multipliers = self.reference.multipliers if multipliers is None else multipliers
        self.store = object_store
        self.questdb = questdb
        self._exporter = QuestDBExporter(questdb, retry_s=settings.export_retry_s)
        self.clickhouse = clickhouse
        self.settings = settings
        self.calendar = trading_day
        self.prefix = settings.prefix
        self.last_daily: date | None = None  # the last day the timer saw complete
        # One generation at a time, and no spool update during one: they share the
        # exports, the spool and the disk.
        self._lock = asyncio.Lock()
        self.cell_ns = settings.spool_cell_s * NS
        self.spool: BlotterSpool | None = None
        if settings.spool:
            root = Path(settings.spool_dir) if settings.spool_dir else Path(tempfile.gettempdir()) / "posttrade-reports-spool"
            source = urlsplit(questdb.base_url)
            # Chunks are copies of one table of one QuestDB, cut by one calendar and cell
            # size: the path says which, so processes that share a directory share chunks
            # they can all use, and never remove each other's as "off the grid".
            zone = str(trading_day.zone).replace("/", "_")
            grid = f"{zone}-{trading_day.starts_at.strftime('%H%M%S')}-{settings.spool_cell_s}s"
            self.spool = BlotterSpool(root / f"{source.hostname}-{source.port}" / settings.trades_table / grid)
        self._checked_until: dict[date, int] = {}  # per day: the spool's cells checked by this process
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
        if self.spool is not None:
            app.timer(settings.spool_interval_s, name="reports_spool")(self._spool_timer)

        @app.health_check("object_store")
        async def object_store_health():
            return await self.store.ping(), self.store.location

    # -- pages ------------------------------------------------------------------------------

    async def post_generate(self, request: Request) -> JSON:
        """Generate a day's reports (CSV and Parquet) into object storage, and say how long it took.

        A `date` after the current trading day is a 400 (it has not started).

        ---
        body:
          description: "`date` (YYYY-MM-DD, default today) and `kinds` (default all four)"
          required: false
          schema:
            type: object
            additionalProperties: false
            description: null is the same as absent
            properties:
              date: {anyOf: [{$ref: "#/components/schemas/Date"}, {type: "null"}]}
              kinds: {type: [array, "null"], minItems: 1, items: {enum: [daily_pnl, positions, trade_blotter, compliance]}}
        responses:
          201: {description: the files written and the time of each step, schema: {type: object}}
          503: a store (QuestDB, ClickHouse, object storage) is unavailable
        """
        body = await request.body()
        try:
            req = msgspec.json.decode(body or b"{}", type=GenerateRequest)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise BadRequest({"error": f"invalid request body: {exc}"}) from None
        today = self.calendar.of(datetime.now(timezone.utc))
        day = params.parse_date("date", req.date, where="field") if req.date is not None else today
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
        """The reports in object storage, newest day first.

        ---
        query:
          date: {$ref: Date, description: only this trading day}
        responses:
          200: {description: "`reports` (name, date, kind, format, size, last_modified, url) and `count`", schema: {type: object}}
          503: the object storage is unavailable
        """
        day = params.query_date(request, "date")
        prefix = f"{self.prefix}/" if day is None else f"{self.prefix}/{day.isoformat()}/"
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
        """Download one report file.

        ---
        path:
          name: {$ref: ObjectName, description: "the report's name as `GET /reports` lists it, e.g. `2026-11-24/positions.csv`"}
        responses:
          200: {description: the file, content: [text/csv, application/octet-stream]}
          404: no such report
          503: the object storage is unavailable
        """
        relative = params.path_object_name(request, "name")
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
            return valuations_from_live(positions, self.mark_of, time.time_ns(), self.fx)
        start, end = self.calendar.window_ns(day)
        _, next_end = self.calendar.window_ns(day + timedelta(days=1))
        table = self.settings.snapshots_table
        select = await self._snapshot_select(table)
        if select is None:
            return []  # ptrc has stored no snapshot yet
        rolls = await self._snapshots(
            f"SELECT {select} FROM {table} WHERE reason = 'roll' "
            f"AND ts >= {_ts(start)} AND ts < {_ts(next_end)} ORDER BY ts"
        )
        latest = []
        if not any(row.ts >= end for row in rolls):
            # ptrc did not roll into the next day (it was down): fall back to each
            # position's last snapshot of the day. A roll covers every position ptrc
            # knows, so with one this query would add nothing.
            latest = await self._snapshots(
                f"SELECT {select} FROM {table} WHERE ts < {_ts(end)} LATEST ON ts PARTITION BY account, symbol"
            )
        return valuations_from_snapshots(rolls, latest, (start, end), next_end, self.multipliers, self.reference)

    async def _snapshot_select(self, table: str) -> str | None:
        """The snapshot columns the table has (one stored before the base-currency
        columns lacks them: its rows are converted at the rates that hold at any time);
        None when the table does not exist."""
        try:
            result = await self.questdb.query(f"SELECT \"column\" FROM table_columns({sql_literal(table)})")
        except QuestDBError as exc:
            if "does not exist" in exc.message:
                return None
            raise
        existing = set(result.column("column"))
        if not existing:
            return None
        missing = [name for name in SNAPSHOT_LOCAL_FIELDS if name not in existing]
        if missing:
            raise QuestDBError(f"table {table} lacks the snapshot columns {missing}")
        return ", ".join(name for name in SNAPSHOT_FIELDS if name in existing)

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
        csv_data, parquet_data = await asyncio.to_thread(encode_report, columns, rows, self.settings.parquet_compression)
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
        """The day's fills: stored chunks that still match QuestDB, plus fresh exports.

        1. QuestDB's fingerprint of every cell of the day (one aggregate query) and the
           spool's chunks of the day (their heads) → `plan_blotter`;
        2. the pieces no chunk covers are exported now (`export_parallelism` at once),
           each parsed into Arrow and encoded as Parquet in a worker thread;
        3. the CSV file is QuestDB's header plus every piece's CSV rows, copied in time
           order; the Parquet file is every piece's Parquet joined by row groups;
        4. both are stored, and the exported pieces that cover whole cells go into the
           spool for the next generation.
        """
        steps = generation.steps
        started = time.perf_counter()
        start, day_end = self.calendar.window_ns(day)
        end = min(day_end, _next_micro(time.time_ns()))  # nothing is stored in the future
        cells = cell_bounds(start, end, self.cell_ns) if end > start else []
        stored, spooled = await asyncio.gather(
            self._fingerprints(start, start, end), asyncio.to_thread(self._spooled, day)
        )
        steps["trade_blotter.verify"] = time.perf_counter() - started
        try:
            pieces, exported, (csv_data, parquet_data, rows) = await self._build_blotter(cells, stored, spooled, steps)
        except SpoolReadError as exc:
            # A chunk that cannot be read (removed or cut under us: another process
            # sharing the spool, the disk): this generation exports the day in full.
            log.warning("reports spool: %s; exporting %s without it", exc, day)
            spooled = []
            pieces, exported, (csv_data, parquet_data, rows) = await self._build_blotter(cells, stored, spooled, steps)

        async def put(fmt: str, data) -> None:
            stored_at = time.perf_counter()
            await self.store.put(report_name(self.prefix, day, "trade_blotter", fmt), data, CONTENT_TYPES[fmt])
            steps[f"trade_blotter.store_{fmt}"] = time.perf_counter() - stored_at

        # Whole cells only: a piece cut at "now" is not a chunk a later plan could use.
        keep = [c for c in exported.values() if c is not None and c.head.rows and self._on_grid(start, day_end, c.head.hi)]
        used = {id(p.chunk) for p in pieces}
        unused = [s for s in spooled if id(s.head) not in used]
        await asyncio.gather(put("csv", csv_data), put("parquet", parquet_data), self._respool(day, keep, unused))
        for fmt, data in (("csv", csv_data), ("parquet", parquet_data)):
            generation.files.append(
                ReportFile(name=f"{day.isoformat()}/trade_blotter.{fmt}", kind="trade_blotter", format=fmt,
                           size=len(data), rows=rows)
            )
            self.files_written.labels("trade_blotter", fmt).inc()
        generation.blotter = {
            "rows": rows,
            "chunks_from_spool": sum(1 for p in pieces if p.chunk is not None),
            "rows_from_spool": sum(p.chunk.rows for p in pieces if p.chunk is not None),
            "exports": len(exported),
            "rows_exported": sum(c.head.rows for c in exported.values() if c is not None),
        }

    async def _build_blotter(
        self, cells: list[tuple[int, int]], stored: dict[int, Fingerprint], spooled: list[SpooledChunk],
        steps: dict[str, float],
    ) -> tuple[list[BlotterPiece], dict[int, ExportedChunk | None], tuple[bytearray, bytes, int]]:
        """Plan, export what the spool does not cover, assemble both files."""
        pieces = plan_blotter(cells, stored, [s.head for s in spooled], self.settings.export_chunk_rows)
        exported_at = time.perf_counter()
        gate = asyncio.Semaphore(self.settings.export_parallelism)
        exports = {
            piece.lo: asyncio.create_task(self._export_piece(piece.lo, piece.hi, gate))
            for piece in pieces if piece.chunk is None
        }
        try:
            exported = {lo: await task for lo, task in exports.items()}
        finally:
            for task in exports.values():
                task.cancel()
        steps["trade_blotter.export"] = time.perf_counter() - exported_at

        by_head = {id(s.head): s for s in spooled}
        parts: list[SpooledChunk | ExportedChunk] = []
        for piece in pieces:
            part = by_head[id(piece.chunk)] if piece.chunk is not None else exported[piece.lo]
            if part is not None and part.head.rows:
                parts.append(part)
        assembled_at = time.perf_counter()
        assembled = await asyncio.to_thread(self._assemble, parts)
        steps["trade_blotter.assemble"] = time.perf_counter() - assembled_at
        return pieces, exported, assembled

    def _on_grid(self, start: int, day_end: int, bound: int) -> bool:
        return bound == day_end or (bound - start) % self.cell_ns == 0

    async def _fingerprints(self, origin: int, lo: int, hi: int) -> dict[int, Fingerprint]:
        """QuestDB's fingerprint of each cell (cells counted from `origin`) in [lo, hi)."""
        if hi <= lo:
            return {}
        sums = ", ".join(f"sum({name})" for name in BLOTTER_DECIMALS)
        try:
            result = await self.questdb.query(
                f"SELECT timestamp_floor('{self.cell_ns // NS}s', ts, {_ts(origin)}) AS cell, count() AS n, {sums} "
                f"FROM {self.settings.trades_table} WHERE ts >= {_ts(lo)} AND ts < {_ts(hi)}"
            )
        except QuestDBError as exc:
            if "does not exist" in exc.message:
                return {}
            raise
        return {
            parse_iso_ns(row[0]): Fingerprint(int(row[1]), tuple(None if v is None else Decimal(v) for v in row[2:]))
            for row in result.rows
        }

    async def _export_piece(self, lo: int, hi: int, gate: asyncio.Semaphore) -> ExportedChunk | None:
        """[lo, hi) of the trades table as CSV rows + Parquet (None: the table does not exist)."""
        async with gate:
            data = await self._export_csv(
                f"SELECT {BLOTTER_FIELDS} FROM {self.settings.trades_table} WHERE ts >= {_ts(lo)} AND ts < {_ts(hi)}"
            )
        if not data:
            return None
        return await asyncio.to_thread(self._chunk_from_csv, lo, hi, data)

    def _chunk_from_csv(self, lo: int, hi: int, data: bytes) -> ExportedChunk:
        header_end = data.find(b"\n") + 1
        if data[:header_end] != BLOTTER_CSV_HEADER:
            raise QuestDBError(f"unexpected export header {bytes(data[:header_end])[:300]!r}")
        table = blotter_from_questdb_csv(data)
        parquet = blotter_parquet(table, self.settings.parquet_compression)
        head = ChunkHead(lo=lo, hi=hi, fingerprint=fingerprint_of(table), csv_size=len(data) - header_end,
                         parquet_size=len(parquet), layout=parquet_layout(parquet), exported_at=time.time_ns())
        return ExportedChunk(head, memoryview(data)[header_end:], parquet)

    def _assemble(self, parts: list[SpooledChunk | ExportedChunk]) -> tuple[bytearray, bytes, int]:
        """The blotter's CSV (QuestDB's header, then every part's rows) and Parquet file."""
        csv_data = bytearray(len(BLOTTER_CSV_HEADER) + sum(part.head.csv_size for part in parts))
        view = memoryview(csv_data)
        view[:len(BLOTTER_CSV_HEADER)] = BLOTTER_CSV_HEADER
        at = len(BLOTTER_CSV_HEADER)
        parquet_parts = []
        for part in parts:
            size = part.head.csv_size
            if isinstance(part, SpooledChunk):
                try:
                    parquet = part.read(view[at:at + size])
                except OSError as exc:
                    raise SpoolReadError(f"cannot read {part.path}: {exc}") from exc
            else:
                view[at:at + size] = part.csv_rows
                parquet = part.parquet
            parquet_parts.append((parquet, part.head.layout))
            at += size
        if parquet_parts:
            parquet_data = b"".join(stitch_parquet(parquet_parts))
        else:
            parquet_data = blotter_parquet(empty_blotter(), self.settings.parquet_compression)
        return csv_data, parquet_data, sum(part.head.rows for part in parts)

    # -- the spool: the day's blotter exported as the day goes --------------------------------

    def _spooled(self, day: date) -> list[SpooledChunk]:
        if self.spool is None:
            return []
        try:
            return self.spool.chunks(day)
        except OSError as exc:  # the spool is a cache: without it, everything is exported
            log.warning("reports spool: cannot list %s: %s", self.spool.day_dir(day), exc)
            return []

    async def _respool(self, day: date, keep: list[ExportedChunk], unused: list[SpooledChunk]) -> None:
        """Store exported chunks, and remove chunks a plan had no use for (they no longer
        match QuestDB, or newer chunks cover their cells). A failure costs later exports
        only: it is logged, never raised."""
        if self.spool is None or not (keep or unused):
            return
        try:
            await asyncio.to_thread(self.spool.update, day, keep, unused)
        except OSError as exc:
            log.warning("reports spool: cannot update %s: %s", self.spool.day_dir(day), exc)

    async def spool_step(self, now: datetime | None = None) -> dict:
        """Bring the spool of yesterday and today up to date with QuestDB (the timer's work).

        A run does something when a cell has ended (`spool_settle_s` ago) since the last
        one: it checks the cells not checked yet by this process (so a restart checks
        the whole day once) and those of the last `spool_recheck_s` (late fills), and
        exports those QuestDB has rows in that no stored chunk matches. The work is done
        an hour of cells at a time, each under the generation lock: a `POST /reports`
        waits for at most one such hour.
        """
        if self.spool is None:
            return {}
        now = now or datetime.now(timezone.utc)
        settled = to_ns(now) - int(self.settings.spool_settle_s * NS)
        today = self.calendar.of(now)
        done = {"cells_checked": 0, "exports": 0, "rows_exported": 0, "chunks_removed": 0}
        for day in (today - timedelta(days=1), today):
            start, end = self.calendar.window_ns(day)
            until = end if settled >= end else start + max(0, settled - start) // self.cell_ns * self.cell_ns
            since = self._checked_until.get(day, start)
            if since >= until:
                continue  # no cell has ended since the last run
            lo = min(since, max(start, settled - int(self.settings.spool_recheck_s * NS)))
            lo = start + (lo - start) // self.cell_ns * self.cell_ns
            while lo < until:
                hi = min(until, lo + SPOOL_STEP_NS)
                async with self._lock:
                    hi = await self._spool_window(day, start, end, lo, hi, done)
                self._checked_until[day] = max(self._checked_until.get(day, start), hi)
                lo = hi
        for day in [d for d in self._checked_until if d < today - timedelta(days=1)]:
            del self._checked_until[day]
        async with self._lock:
            await asyncio.to_thread(self.spool.drop_days_before, today - timedelta(days=self.settings.spool_keep_days))
        return done

    async def _spool_window(self, day: date, start: int, end: int, lo: int, hi: int, done: dict) -> int:
        """Check and export the cells in [lo, hi) (widened to whole stored chunks); the end."""
        spooled = await asyncio.to_thread(self.spool.chunks, day)
        widened = True
        while widened:  # a chunk across either bound is checked whole
            widened = False
            for s in spooled:
                if s.head.lo < lo < s.head.hi or s.head.lo < hi < s.head.hi:
                    lo, hi, widened = min(lo, s.head.lo), max(hi, s.head.hi), True
        inside = [s for s in spooled if lo <= s.head.lo and s.head.hi <= hi]
        cells = [c for c in cell_bounds(start, end, self.cell_ns) if lo <= c[0] and c[1] <= hi]
        stored = await self._fingerprints(start, lo, hi)
        pieces = plan_blotter(cells, stored, [s.head for s in inside], self.settings.export_chunk_rows)
        gate = asyncio.Semaphore(self.settings.export_parallelism)
        exported = await asyncio.gather(*(self._export_piece(p.lo, p.hi, gate) for p in pieces if p.chunk is None))
        keep = [c for c in exported if c is not None and c.head.rows]
        used = {id(p.chunk) for p in pieces}
        unused = [s for s in inside if id(s.head) not in used]
        await self._respool(day, keep, unused)
        done["cells_checked"] += len(cells)
        done["exports"] += len(exported)
        done["rows_exported"] += sum(c.head.rows for c in keep)
        done["chunks_removed"] += len(unused)
        return hi

    async def _spool_timer(self) -> None:
        try:
            await self.spool_step()
        except (QuestDBUnavailableError, OSError) as exc:
            # Nothing is lost: the next run (or a generation) exports what is missing.
            log.warning("reports spool: %s: %s", type(exc).__name__, exc)

    async def _export_csv(self, sql: str) -> bytes:
        """The CSV QuestDB's `/exp` gives for `sql` (b"" when the table does not exist)."""
        return await self._exporter.export_csv_async(sql)


@dataclass
class ExportedChunk:
    """A piece of the blotter just exported: its head, CSV rows (no header), Parquet file."""

    head: ChunkHead
    csv_rows: memoryview
    parquet: bytes


@dataclass
class SpooledChunk:
    """A chunk file of the spool (its head read; its data read by `read`)."""

    path: Path
    head: ChunkHead
    data_offset: int  # where the CSV rows start in the file
    identity: tuple[int, int, int]  # inode, size, mtime (ns) of the file the head was read from

    def read(self, csv_into: memoryview) -> bytes:
        """Copy the CSV rows into `csv_into` (exactly their size); return the Parquet file.
        OSError when the file is no longer the one the head was read from (replaced by
        another process sharing the spool)."""
        with open(self.path, "rb") as f:
            st = os.fstat(f.fileno())
            if (st.st_ino, st.st_size, st.st_mtime_ns) != self.identity:
                raise OSError(f"{self.path} was replaced")
            f.seek(self.data_offset)
            if f.readinto(csv_into) != self.head.csv_size:
                raise OSError(f"{self.path} is shorter than its head says")
            parquet = f.read(self.head.parquet_size)
        if len(parquet) != self.head.parquet_size:
            raise OSError(f"{self.path} is shorter than its head says")
        return parquet


class SpoolReadError(Exception):
    """A spooled chunk could not be read while assembling a blotter."""


# -- the spool's chunk file -------------------------------------------------------------------
#
# A chunk file: magic, head length, a small JSON head (`ChunkHead`), QuestDB's CSV rows,
# the Parquet file of the same rows.

CHUNK_MAGIC = b"PTBLOT01"


def encode_chunk(head: ChunkHead, csv_rows: bytes | memoryview, parquet: bytes | memoryview) -> list[bytes | memoryview]:
    """The parts of a chunk file: magic, head length, JSON head, CSV rows, Parquet file."""
    meta = json.dumps(
        {
            "lo": head.lo, "hi": head.hi, "fingerprint": head.fingerprint.to_json(), "csv_size": head.csv_size,
            "parquet_size": head.parquet_size, "layout": head.layout.to_json(), "exported_at": head.exported_at,
        },
        separators=(",", ":"),
    ).encode()
    return [CHUNK_MAGIC, len(meta).to_bytes(4, "little"), meta, csv_rows, parquet]


def chunk_head_size(prefix: bytes) -> int:
    """Bytes of magic + length + JSON head, from a file's first 12 bytes (ValueError if not a chunk)."""
    if len(prefix) < 12 or prefix[:8] != CHUNK_MAGIC:
        raise ValueError("not a blotter chunk file")
    return 12 + int.from_bytes(prefix[8:12], "little")


def decode_chunk_head(head_bytes: bytes, file_size: int) -> ChunkHead:
    """The head of a chunk file (its first `chunk_head_size` bytes); ValueError when the
    file is not a whole chunk (cut short, or not one at all)."""
    size = chunk_head_size(head_bytes)
    meta = json.loads(head_bytes[12:size])
    head = ChunkHead(
        lo=int(meta["lo"]), hi=int(meta["hi"]), fingerprint=Fingerprint.from_json(meta["fingerprint"]),
        csv_size=int(meta["csv_size"]), parquet_size=int(meta["parquet_size"]),
        layout=ParquetLayout.from_json(meta["layout"]), exported_at=int(meta["exported_at"]),
    )
    if size + head.csv_size + head.parquet_size != file_size:
        raise ValueError(f"chunk file is {file_size} bytes, its head describes {size + head.csv_size + head.parquet_size}")
    return head


class BlotterSpool:
    """Chunk files of the trade blotter, one directory per trading day.

    `<root>/<YYYY-MM-DD>/<lo>-<hi>.chunk` (epoch-ns bounds). A chunk is written to a
    temporary file, fsync'd, and renamed into place, so a reader (or a restart) sees a
    whole chunk or none; a file that does not hold what its head says is ignored. The
    spool is a cache: losing it costs exports, never rows — every chunk is checked
    against QuestDB before it is used. Processes may share a directory (each writes
    whole files; one that finds a chunk gone while reading it exports instead).
    """

    SUFFIX = ".chunk"

    def __init__(self, root: Path):
        self.root = root
        self._heads: dict[Path, tuple[tuple[int, int, int], SpooledChunk | None]] = {}

    def day_dir(self, day: date) -> Path:
        return self.root / day.isoformat()

    def chunks(self, day: date) -> list[SpooledChunk]:
        """The day's whole chunks, by name. Heads are read once per file (a file is
        known by its inode, size and mtime: a replaced chunk is a new file)."""
        found = []
        directory = self.day_dir(day)
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except FileNotFoundError:
            return []
        for entry in entries:
            if not entry.name.endswith(self.SUFFIX) or entry.name.startswith("."):
                continue
            path = directory / entry.name
            try:
                st = entry.stat()
            except FileNotFoundError:
                continue
            identity = (st.st_ino, st.st_size, st.st_mtime_ns)
            known = self._heads.get(path)
            if known is None or known[0] != identity:
                try:
                    known = (identity, self._read_head(path, identity))
                except (OSError, ValueError, KeyError, TypeError) as exc:
                    log.warning("reports spool: ignoring %s (%s)", path, exc)
                    known = (identity, None)
                self._heads[path] = known
            if known[1] is not None:
                found.append(known[1])
        return found

    @staticmethod
    def _read_head(path: Path, identity: tuple[int, int, int]) -> SpooledChunk:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if (st.st_ino, st.st_size, st.st_mtime_ns) != identity:
                raise OSError("replaced while listed")
            first = f.read(16384)
            size = chunk_head_size(first)
            if size > len(first):
                first += f.read(size - len(first))
            head = decode_chunk_head(first[:size], st.st_size)
        return SpooledChunk(path, head, size, identity)

    def update(self, day: date, new: list[ExportedChunk], old: list[SpooledChunk]) -> None:
        """Write `new` chunks, then remove `old` ones (unless a new one took their name)."""
        directory = self.day_dir(day)
        directory.mkdir(parents=True, exist_ok=True)
        written = set()
        for chunk in new:
            path = directory / f"{chunk.head.lo}-{chunk.head.hi}{self.SUFFIX}"
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=directory)
            try:
                with os.fdopen(fd, "wb") as f:
                    for part in encode_chunk(chunk.head, chunk.csv_rows, chunk.parquet):
                        f.write(part)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                raise
            written.add(path)
        for chunk in old:
            if chunk.path not in written:
                self._heads.pop(chunk.path, None)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(chunk.path)

    def _forget(self, directory: Path) -> None:
        for path in [p for p in self._heads if p.parent == directory]:
            del self._heads[path]

    def drop_days_before(self, day: date) -> None:
        try:
            entries = os.listdir(self.root)
        except FileNotFoundError:
            return
        for name in entries:
            try:
                if date.fromisoformat(name) < day:
                    shutil.rmtree(self.root / name, ignore_errors=True)
                    self._forget(self.root / name)
            except ValueError:
                continue


def _ts(ns: int) -> str:
    """A QuestDB timestamp literal, to the microsecond (slice bounds are whole µs)."""
    return sql_literal(datetime(1970, 1, 1, tzinfo=timezone.utc) + timedelta(microseconds=ns // 1000))


def _next_micro(ns: int) -> int:
    return (ns // 1000 + 1) * 1000


def install_reports(
    app: App,
    *,
    positions: Table,
    mark_of: MarkOf,
    multipliers: Mapping[str, Decimal] | None = None,
    object_store: ObjectStore,
    questdb: QuestDBClient,
    clickhouse: ClickHouseStore | None,
    settings: ReportsSection = ReportsSection(),
    day_timezone: str = "UTC",
    day_starts_at: dtime = dtime(0, 0),
    fx: FxRates | None = None,
) -> ReportService:
    """Register reports on `app`: `/reports` pages, the daily timer, a store health check.

    `positions`: the live table (current day's reports); `mark_of`: current marks;
    `fx`: current FX rates (ptrc's `FxRates` over its marks), whose reference data also
    names the currencies of snapshots stored without them (default: everything in USD);
    `multipliers`: contract multipliers (market value of snapshot-based positions;
    default: the reference data's);
    `object_store`: where files go; `questdb`: SQL and exports of `ptrc_trades` and
    `position_snapshots`; `clickhouse`: `compliance_alerts` (None: no alerts);
    `day_timezone` / `day_starts_at`: ptrc's trading-day calendar.
    """
    return ReportService(
        app, positions=positions, mark_of=mark_of, multipliers=multipliers, object_store=object_store,
        questdb=questdb, clickhouse=clickhouse, settings=settings,
        trading_day=TradingDay(ZoneInfo(day_timezone), day_starts_at), fx=fx,
    )


__all__ = ["Generation", "ReportService", "ReportsSection", "install_reports"]
