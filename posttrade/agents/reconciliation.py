"""Reconciliation for ptrc: replay the fill stream into a fresh book, compare, keep the result.

`install_reconciliation(app, ...)` registers on a service's App:

* `POST /reconciliation` — start a run (202 with its id); one run at a time (409 while
  one is running). JSON body, every field optional:
  `{"from_seq": 1 | "from_time": "2026-11-23T00:00:00Z", "statement": "<CSV text>" |
  "statement_path": "name.csv", "tolerance": {"qty": "0", "avg_price": "0.0001",
  "realized_pnl": "0.01"}}`; or the statement itself as a `text/csv` body with the
  other fields as query parameters (`from_seq`, `from_time`, `tolerance_qty`,
  `tolerance_avg_price`, `tolerance_realized_pnl`). Invalid input → 400 JSON (a bad
  statement lists its bad lines).
* `GET /reconciliation/{id}` — the run: status, the cut, counts, breaks (404 if unknown).
* `GET /reconciliation` — recent runs, newest first, without their breaks (`limit`).

A run
-----
1. **Snapshot the live table** (one synchronous pass, so one instant): every key's
   figures, and the FILLS sequence it last applied (`positions.last_applied(key)`).
2. **The cut**: `cut = max(last applied sequence over the live keys)`. The live agent
   applies fills in stream order, so at that instant every key reflects exactly the
   fills at or below `cut` that belong to it (a fill after the last one that changed
   some key has not been applied anywhere yet). Replaying the stream up to `cut`, and no
   further, gives the book the live table should equal, however many fills arrive
   while the replay runs.
3. **Replay** `app.replay(fills, StartPosition(seq=from_seq | time=from_time))`
   (default: the stream's start) through `cut` into a fresh `ExecutionBook` built as the
   live one is (multipliers, horizon): the same messages in the same order, so the same
   resends dropped, amendments applied and refusals made. The run lists the amendments
   the replay left pending or refused. The replay book starts flat at the start position, so a start
   later than the live history's start makes every earlier position a break: use it
   when the live book itself began there (e.g. the stream was truncated or reset).
4. **Compare** (`posttrade.core.reconciliation.compare_positions`): the replay against
   the live snapshot, and the replay against the statement when one was given.
5. **Keep** the run in the changelog table `reconciliations` (key: the run id) — the
   last `keep_runs` runs survive restarts; a run interrupted by a stop is marked failed.
   At most `max_breaks` breaks are stored per run (`break_count` has the total,
   `breaks_truncated` says so), quantity breaks first: a changelog entry must stay
   small.

Statement paths are read only inside the configured `statement_dir` (none: uploads only),
so a request can never read an arbitrary file of the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Callable, Literal, Mapping

import msgspec
from prometheus_client import Counter, Gauge
from starlette.requests import Request

from ..app import App
from ..config import _Section
from ..core.history import Amendment, ExecutionBook
from ..core.positions import Position
from ..core.reconciliation import (
    Break,
    PositionFigures,
    StatementError,
    Tolerance,
    compare_positions,
    figures_of,
    parse_statement,
    value_breaks,
)
from ..streams.channel import Channel
from ..streams.transport import StartPosition
from ..tables.table import Table
from ..web import params
from ..web.params import BadRequest, query_int
from ..web.server import JSON

log = logging.getLogger(__name__)

MarkOf = Callable[[str], Decimal | None]

# A break on a figure that moves money first; then averages; missing keys are money too.
_FIELD_ORDER = {"position": 0, "net_qty": 1, "realized_pnl": 2, "avg_open_price": 3}


class ReconciliationSection(_Section):
    """ptrc config `reconciliation:`."""

    tolerance: Tolerance = Tolerance()  # defaults for runs that do not give their own
    statement_dir: str | None = None  # where `statement_path` may point; None: uploads only
    keep_runs: int = 100
    max_breaks: int = 500  # stored per run
    max_statement_bytes: int = 50_000_000
    replay_batch_size: int = 2000


class StatementSource(msgspec.Struct, kw_only=True):
    source: Literal["upload", "path"]
    path: str | None = None
    positions: int = 0


class ReconciliationRun(msgspec.Struct, kw_only=True):
    """One run as stored and served (times are ISO-8601 UTC)."""

    id: str
    status: Literal["running", "done", "failed"]
    requested_at: str
    stream: str
    tolerance: Tolerance
    from_seq: int | None = None
    from_time: str | None = None
    statement: StatementSource | None = None
    finished_at: str | None = None
    seconds: float | None = None
    cut_seq: int | None = None  # replayed through this FILLS sequence (see the module doc)
    stream_last_seq: int | None = None  # the stream's end when the run started
    fills_replayed: int = 0
    fills_rejected: int = 0  # messages the rule refused (the live agent dead-letters those)
    # Corrections and busts the replay left waiting for their original, or refused.
    pending_amendments: list[dict] = []
    refused_amendments: list[dict] = []
    live_positions: int = 0
    replay_positions: int = 0
    break_count: int = 0
    breaks_by_field: dict[str, int] = {}
    breaks: list[Break] = []
    breaks_truncated: bool = False
    error: str | None = None

    def summary(self) -> dict:
        data = msgspec.to_builtins(self)
        data.pop("breaks")
        data["url"] = f"/reconciliation/{self.id}"
        return data


class _ToleranceRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    # Decimal strings in plain notation (web/params.py `Amount`), checked by `plan`.
    qty: str | None = None
    avg_price: str | None = None
    realized_pnl: str | None = None


class RunRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The JSON body of `POST /reconciliation`."""

    from_seq: int | None = None
    from_time: str | None = None
    statement: str | None = None
    statement_path: str | None = None
    tolerance: _ToleranceRequest | None = None


class RunPlan(msgspec.Struct, kw_only=True):
    """A validated request: where to start, what to compare with, how strictly."""

    start: StartPosition
    tolerance: Tolerance
    statement: dict[tuple[str, str], PositionFigures] | None = None
    statement_source: StatementSource | None = None
    from_seq: int | None = None
    from_time: str | None = None


class ReconciliationService:
    """The pages, the runs and their table; `install_reconciliation` builds one."""

    def __init__(
        self,
        app: App,
        *,
        fills: Channel,
        positions: Table,
        multipliers: Mapping[str, Decimal],
        mark_of: MarkOf | None = None,
        settings: ReconciliationSection = ReconciliationSection(),
        table_name: str = "reconciliations",
        new_book: Callable[[], ExecutionBook] | None = None,
    ):
        self.app = app
        self.fills = fills
        self.positions = positions
        self.multipliers = multipliers
        # The replay applies the live rule (horizon included): the keeper's own factory.
        self.new_book = new_book or (lambda: ExecutionBook(multipliers))
        self.mark_of = mark_of
        self.settings = settings
        self.statement_dir = Path(settings.statement_dir).resolve() if settings.statement_dir else None
        self.runs: Table = app.table(table_name, value_type=ReconciliationRun, key_type=str)
        self._task: asyncio.Task | None = None
        self._running_id: str | None = None
        registry = app.metrics.registry
        self.runs_total = Counter(
            "posttrade_reconciliations_total", "Reconciliation runs finished", ["status"], registry=registry
        )
        self.last_breaks = Gauge(
            "posttrade_reconciliation_breaks", "Breaks found by the last finished reconciliation", registry=registry
        )
        app.page("/reconciliation", methods=("POST",))(self.post_run)
        app.page("/reconciliation")(self.list_runs)
        app.page("/reconciliation/{run_id}")(self.get_run)
        app.on_startup.append(self._fail_interrupted_runs)
        app.on_shutdown.append(self._stop_running)

    # -- pages ---------------------------------------------------------------------------

    async def post_run(self, request: Request) -> JSON:
        """Start a reconciliation of the live positions against a replay and a statement.

        JSON body (every field optional): `from_seq` or `from_time`, `statement` (CSV text) or
        `statement_path`, `tolerance` {qty, avg_price, realized_pnl}. Or the statement itself as
        `text/csv`. The options may also be given in the query string (with either body), each
        once: an option in both the query and the body is a 400, as are `from_seq` with
        `from_time`, `statement` with `statement_path`, a statement that does not parse (the
        400 lists its lines) and `statement_path` while `reconciliation.statement_dir` is unset.

        ---
        query:
          from_seq: {type: integer, minimum: 1, maximum: 9223372036854775807, description: "replay from this stream sequence"}
          from_time: {$ref: IsoTime, description: "replay from this time"}
          tolerance_qty: {$ref: Amount, description: quantity tolerance (a decimal >= 0)}
          tolerance_avg_price: {$ref: Amount, description: average price tolerance (a decimal >= 0)}
          tolerance_realized_pnl: {$ref: Amount, description: realized P&L tolerance (a decimal >= 0)}
        body:
          description: the run's options (JSON), or the statement itself (CSV)
          content:
            application/json:
              type: object
              additionalProperties: false
              description: every field optional; null is the same as absent
              properties:
                from_seq: {type: [integer, "null"], minimum: 1, maximum: 9223372036854775807}
                from_time: {anyOf: [{$ref: "#/components/schemas/IsoTime"}, {type: "null"}]}
                statement: {type: [string, "null"], description: the statement as CSV text}
                statement_path: {type: [string, "null"], description: "a file under `reconciliation.statement_dir`"}
                tolerance:
                  type: [object, "null"]
                  additionalProperties: false
                  properties:
                    qty: {anyOf: [{$ref: "#/components/schemas/Amount"}, {type: "null"}]}
                    avg_price: {anyOf: [{$ref: "#/components/schemas/Amount"}, {type: "null"}]}
                    realized_pnl: {anyOf: [{$ref: "#/components/schemas/Amount"}, {type: "null"}]}
            text/csv: {type: string, description: "the statement: a header line, then one position per line"}
        responses:
          202: {description: "`id`, `status` (running), `url`; a `Location` header", schema: {type: object}}
          409: another run is in progress
          413: the body is over `reconciliation.max_statement_bytes`
          415: neither application/json nor text/csv
        """
        self._ensure_idle()  # before reading a large statement for nothing
        plan = await self.plan_from_request(request)
        run = await self.start(plan)
        return JSON(
            {"id": run.id, "status": run.status, "url": f"/reconciliation/{run.id}"},
            status_code=202,
            headers={"Location": f"/reconciliation/{run.id}"},
        )

    async def list_runs(self, request: Request) -> JSON:
        """The newest reconciliation runs first, without their breaks.

        ---
        query:
          limit: {type: integer, minimum: 1, maximum: 10000, default: 20, description: "runs to list (the service keeps the last `reconciliation.keep_runs`)"}
        responses:
          200: {description: "`runs`, `count`", schema: {type: object}}
        """
        limit = query_int(request, "limit", 20, minimum=1, maximum=10_000)
        runs = sorted(self.runs.values(), key=lambda r: r.id, reverse=True)[:limit]
        return JSON({"runs": [run.summary() for run in runs], "count": len(runs)})

    async def get_run(self, request: Request) -> JSON:
        """One reconciliation run with its breaks.

        ---
        path:
          run_id: the id `POST /reconciliation` answered
        responses:
          200: {description: "the run: status, counts, `breaks`", schema: {type: object}}
          404: no reconciliation with this id
        """
        run_id = request.path_params["run_id"]
        run = self.runs.get(run_id)
        if run is None:
            raise BadRequest({"id": run_id, "error": "no reconciliation with this id"}, status_code=404)
        data = msgspec.to_builtins(run)
        data["url"] = f"/reconciliation/{run.id}"
        return JSON(data)

    # -- requests --------------------------------------------------------------------------

    async def plan_from_request(self, request: Request) -> RunPlan:
        """Validate a POST (JSON or text/csv, options in the body or the query string) into
        a plan; BadRequest says what is wrong."""
        given = _query_options(request)
        body = await request.body()
        if len(body) > self.settings.max_statement_bytes:
            raise BadRequest({"error": f"request body over {self.settings.max_statement_bytes} bytes"}, 413)
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type == "text/csv":
            try:
                sent = {"statement": body.decode("utf-8")}
            except UnicodeDecodeError as exc:
                raise BadRequest({"field": "statement", "error": f"the statement is not UTF-8 text: {exc}"}) from None
        elif content_type in ("", "application/json"):
            try:
                decoded = msgspec.json.decode(body or b"{}", type=RunRequest)
            except (msgspec.ValidationError, msgspec.DecodeError) as exc:
                raise BadRequest({"error": f"invalid request body: {exc}"}) from None
            sent = {f: getattr(decoded, f) for f in RunRequest.__struct_fields__ if getattr(decoded, f) is not None}
        else:
            raise BadRequest({"error": f"send application/json or text/csv, not {content_type}"}, 415)
        twice = sorted(set(given) & set(sent))
        if twice:
            raise BadRequest({"field": twice[0], "error": "given in both the query string and the body; give it once"})
        return await self.plan(RunRequest(**given, **sent))

    async def plan(self, req: RunRequest) -> RunPlan:
        if req.from_seq is not None and req.from_time is not None:
            raise BadRequest({"error": "give from_seq or from_time, not both"})
        if req.statement is not None and req.statement_path is not None:
            raise BadRequest({"error": "give statement or statement_path, not both"})
        start = StartPosition()
        from_time = None
        if req.from_seq is not None:
            if not 1 <= req.from_seq <= params.INT64_MAX:
                raise BadRequest({"field": "from_seq", "error": f"must be between 1 and {params.INT64_MAX} (stream sequences start at 1)"})
            start = StartPosition(seq=req.from_seq)
        elif req.from_time is not None:
            when = parse_time(req.from_time)
            from_time = when.isoformat()
            start = StartPosition(time=when)
        defaults = self.settings.tolerance
        given = req.tolerance or _ToleranceRequest()

        def amount(name: str, default: Decimal) -> Decimal:
            raw = getattr(given, name)
            return default if raw is None else params.parse_amount(f"tolerance.{name}", raw, where="field")

        try:
            tolerance = Tolerance(
                qty=amount("qty", defaults.qty),
                avg_price=amount("avg_price", defaults.avg_price),
                realized_pnl=amount("realized_pnl", defaults.realized_pnl),
            )
        except ValueError as exc:
            raise BadRequest({"field": "tolerance", "error": str(exc)}) from None
        statement = source = None
        if req.statement is not None or req.statement_path is not None:
            if req.statement is not None:
                text, source = req.statement, StatementSource(source="upload")
            else:
                text, path = self.read_statement_file(req.statement_path)
                source = StatementSource(source="path", path=str(path))
            try:
                statement = await asyncio.to_thread(parse_statement, text)
            except StatementError as exc:
                raise BadRequest(exc.detail()) from None
            source.positions = len(statement)
        return RunPlan(
            start=start, tolerance=tolerance, statement=statement, statement_source=source,
            from_seq=req.from_seq, from_time=from_time,
        )

    def read_statement_file(self, name: str) -> tuple[str, Path]:
        if self.statement_dir is None:
            raise BadRequest(
                {"field": "statement_path",
                 "error": "statement paths are disabled (set reconciliation.statement_dir); upload the CSV instead"}
            )
        path = (self.statement_dir / name).resolve()
        if path != self.statement_dir and self.statement_dir not in path.parents:
            raise BadRequest({"field": "statement_path", "error": "the path leaves the statement directory"})
        try:
            if path.stat().st_size > self.settings.max_statement_bytes:
                raise BadRequest({"field": "statement_path", "error": "the statement file is too large"})
            return path.read_text(encoding="utf-8"), path
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise BadRequest({"field": "statement_path", "error": f"no statement file {name!r}"}) from None
        except UnicodeDecodeError as exc:
            raise BadRequest({"field": "statement_path", "error": f"not UTF-8 text: {exc}"}) from None

    # -- runs ------------------------------------------------------------------------------

    def _ensure_idle(self) -> None:
        if self._task is not None and not self._task.done():
            raise BadRequest(
                {"error": "a reconciliation is already running", "id": self._running_id,
                 "url": f"/reconciliation/{self._running_id}"},
                status_code=409,
            )

    async def start(self, plan: RunPlan) -> ReconciliationRun:
        """Record a new run and start it in the background; returns the running record.

        Raises BadRequest(409) while another run is in progress.
        """
        self._ensure_idle()
        now = datetime.now(timezone.utc)
        run = ReconciliationRun(
            id=f"{now:%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}",
            status="running",
            requested_at=now.isoformat(),
            stream=self.fills.stream.name,
            tolerance=plan.tolerance,
            from_seq=plan.from_seq,
            from_time=plan.from_time,
            statement=plan.statement_source,
        )
        # From the check above to here nothing awaits: two requests cannot both start.
        self._running_id = run.id
        self._task = asyncio.create_task(self._execute(run, plan), name=f"reconciliation:{run.id}")
        await self._store(run)
        return run

    async def run(self, plan: RunPlan) -> ReconciliationRun:
        """Start a run and wait for it (tests, and callers that want the result inline)."""
        run = await self.start(plan)
        assert self._task is not None
        await asyncio.shield(self._task)
        return self.runs[run.id]

    async def _execute(self, run: ReconciliationRun, plan: RunPlan) -> None:
        started = time.perf_counter()
        cancelled = False
        try:
            await self.reconcile(run, plan)
            run.status = "done"
        except asyncio.CancelledError:
            run.status, run.error = "failed", "interrupted: the service stopped during the run"
            cancelled = True
        except Exception as exc:
            log.exception("reconciliation %s failed", run.id)
            run.status, run.error = "failed", f"{type(exc).__name__}: {exc}"
        run.finished_at = datetime.now(timezone.utc).isoformat()
        run.seconds = round(time.perf_counter() - started, 6)
        self.runs_total.labels(run.status).inc()
        if run.status == "done":
            self.last_breaks.set(run.break_count)
        await self._store(run)
        await self._prune()
        if cancelled:
            raise asyncio.CancelledError

    def live_snapshot(self) -> tuple[dict[tuple[str, str], PositionFigures], int]:
        """The live figures and the cut (max FILLS sequence applied), at one instant.

        Synchronous on purpose: no other task can change the table during it.
        """
        stream = self.fills.stream.name
        figures: dict[tuple[str, str], PositionFigures] = {}
        cut = 0
        for key, state in self.positions.items():
            position = state if isinstance(state, Position) else Position.from_state(state)
            figures[tuple(key)] = figures_of(position)
            cut = max(cut, self.positions.last_applied(key).get(stream, 0))
        return figures, cut

    async def replay(self, start: StartPosition, cut: int) -> tuple[ExecutionBook, int, int]:
        """A fresh book from the fills of `start`..`cut` in stream order, by the live rule
        (`core.history`); returns (book, messages applied, messages refused)."""
        book = self.new_book()
        applied = refused = 0
        if cut == 0 or (start.seq is not None and start.seq > cut):
            return book, 0, 0
        records = self.app.replay(self.fills, start, batch_size=self.settings.replay_batch_size)
        async with contextlib.aclosing(records):
            async for record in records:
                if record.seq > cut:
                    break
                result = book.receive(record.value, record.seq)
                if result.status == "applied":
                    applied += 1
                elif result.status == "refused":
                    refused += 1
                refused += sum(1 for s in result.settled if not s.applied) + len(result.expired)
        return book, applied, refused

    async def reconcile(self, run: ReconciliationRun, plan: RunPlan) -> ReconciliationRun:
        """Snapshot, replay through the cut, compare; returns `run` filled in."""
        live, cut = self.live_snapshot()
        state = await self.app.transport.stream_state(self.fills.stream.name)
        run.cut_seq, run.stream_last_seq = cut, state.last_seq
        book, run.fills_replayed, run.fills_rejected = await self.replay(plan.start, cut)
        replayed = {(p.account, p.symbol): figures_of(p) for p in book.positions}
        run.pending_amendments = [amendment_summary(a) for a in book.pending()]
        run.refused_amendments = [amendment_summary(a) for a in book.refused()]
        run.live_positions, run.replay_positions = len(live), len(replayed)
        breaks = compare_positions(replayed, live, against="live", tolerance=plan.tolerance)
        if plan.statement is not None:
            breaks += compare_positions(replayed, plan.statement, against="statement", tolerance=plan.tolerance)
        if self.mark_of is not None:
            symbols = {b.symbol for b in breaks}
            breaks = value_breaks(breaks, {s: self.mark_of(s) for s in symbols}, self.multipliers)
        run.break_count = len(breaks)
        by_field: dict[str, int] = {}
        for item in breaks:
            by_field[f"{item.against}.{item.field}"] = by_field.get(f"{item.against}.{item.field}", 0) + 1
        run.breaks_by_field = by_field
        ordered = sorted(breaks, key=lambda b: (_FIELD_ORDER[b.field], b.account, b.symbol, b.against))
        run.breaks = ordered[: self.settings.max_breaks]
        run.breaks_truncated = len(ordered) > self.settings.max_breaks
        return run

    # -- storage ------------------------------------------------------------------------

    async def _store(self, run: ReconciliationRun) -> None:
        # The table is shared with the agents' commits: an agent that crashes rolls back
        # every table's unflushed keys, ours included, so write until ours is durable.
        while True:
            self.runs[run.id] = run
            await self.runs.flush()
            if self.runs.get(run.id) is run:
                return

    async def _prune(self) -> None:
        finished = sorted(rid for rid, r in self.runs.items() if r.status != "running")
        excess = len(self.runs) - self.settings.keep_runs
        if excess <= 0:
            return
        for run_id in finished[:excess]:
            del self.runs[run_id]
        await self.runs.flush()

    async def _fail_interrupted_runs(self) -> None:
        for run in list(self.runs.values()):
            if run.status == "running":
                run.status = "failed"
                run.error = "interrupted: the service stopped during the run"
                await self._store(run)

    async def _stop_running(self) -> None:
        task = self._task
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


def parse_time(text: str) -> datetime:
    """ISO-8601 with a year from 1990 to 2199 (web/params.py `Time`); no zone is UTC."""
    ns = params.parse_time("from_time", text, epoch_ns=False, where="field")
    return datetime(1970, 1, 1, tzinfo=timezone.utc) + timedelta(microseconds=ns // 1000)


_TOLERANCE_PARAMETERS = {"tolerance_qty": "qty", "tolerance_avg_price": "avg_price", "tolerance_realized_pnl": "realized_pnl"}


def _query_options(request: Request) -> dict:
    """The run's options given in the query string, checked (the same for either body)."""
    query = request.query_params
    params.reject_unknown(request, {"from_seq", "from_time", *_TOLERANCE_PARAMETERS})
    options: dict = {}
    if "from_seq" in query:
        options["from_seq"] = params.parse_int("from_seq", query["from_seq"], minimum=1, maximum=params.INT64_MAX)
    if "from_time" in query:
        parse_time(query["from_time"])  # checked here so that the error names the parameter's place
        options["from_time"] = query["from_time"]
    tolerance = {}
    for parameter, name in _TOLERANCE_PARAMETERS.items():
        if parameter in query:
            params.parse_amount(parameter, query[parameter])  # here, so that the error names the parameter
            tolerance[name] = query[parameter]
    if tolerance:
        options["tolerance"] = _ToleranceRequest(**tolerance)
    return options


def amendment_summary(amendment: Amendment) -> dict:
    fill = amendment.message
    return {
        "fill_id": fill.fill_id, "exec_type": fill.exec_type, "ref_fill_id": fill.ref_fill_id,
        "account": fill.account, "symbol": fill.symbol, "seq": amendment.seq, "reason": amendment.reason,
    }


def install_reconciliation(
    app: App,
    *,
    fills: Channel,
    positions: Table,
    multipliers: Mapping[str, Decimal],
    mark_of: MarkOf | None = None,
    settings: ReconciliationSection = ReconciliationSection(),
    table_name: str = "reconciliations",
    new_book: Callable[[], ExecutionBook] | None = None,
) -> ReconciliationService:
    """Register reconciliation on `app` (pages, the `reconciliations` table, hooks).

    `fills`: the channel the live positions are built from (FILLS); `positions`: the
    live changelog table keyed (account, symbol) with `PositionState` values, written
    by an agent on `fills` (so `last_applied(key)` carries the FILLS sequence);
    `multipliers`: the contract multipliers the live book uses; `mark_of`: optional,
    values quantity breaks at the mark.
    """
    return ReconciliationService(
        app, fills=fills, positions=positions, multipliers=multipliers, mark_of=mark_of,
        settings=settings, table_name=table_name, new_book=new_book,
    )


__all__ = [
    "ReconciliationRun",
    "ReconciliationSection",
    "ReconciliationService",
    "RunPlan",
    "RunRequest",
    "install_reconciliation",
]
