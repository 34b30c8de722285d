"""Report tables: what each report holds, computed from positions or stored rows. Pure.

Four reports per trading day, each written as CSV and Parquet
(`posttrade.agents.reports` does the reading and writing):

* `daily_pnl` — per (account, symbol) and per account (`level`): realized P&L gross,
  fees, net, unrealized, total (= realized net + unrealized) and day P&L.
* `positions` — the open positions (net_qty != 0) with their valuation.
* `trade_blotter` — the day's fills as ptrc stored them (`ptrc_trades`).
* `compliance` — the day's compliance alerts (`compliance_alerts`).

Where the positions come from
-----------------------------
* The current trading day: the live positions, valued at the current marks
  (`valuations_from_live`).
* A past day D: ptrc's position snapshots (`valuations_from_snapshots`). When ptrc
  rolls into day D+1 it stores a `roll` snapshot of every position — its state after
  D's fills, valued at the mark of that moment — and D+1's day P&L is measured from it.
  So the close of D is that roll snapshot, and D's day P&L is
  `total(roll into D+1) - total(roll into D)`, the latter 0 for a position first
  traded on D. A roll covers every position ptrc knows, so when ptrc did not roll
  into D+1 at all (it was not running), each position is shown as its last snapshot
  before D ended, with the day P&L ptrc recorded in it; `valued_at` says when every
  row was valued.

Totals follow `posttrade.core.positions.account_totals`: a sum that would need an
unknown value (no mark for an open position) is null, never a partial number.

Files
-----
Names are `<prefix>/<YYYY-MM-DD>/<kind>.<csv|parquet>`. CSV: a header row, decimals in
canonical form (`format_decimal`: `225`, `0.1`), timestamps ISO-8601 UTC with
nanoseconds, empty cells for null. The trade blotter CSV is QuestDB's own export,
passed through unchanged: every field quoted, decimals with their 12 stored decimal
places, `null` for null. Parquet: decimals as `decimal128(38, 12)` (a wider scale, or
`decimal256`, only when a value needs it: never rounded), timestamps as
`timestamp[ns, UTC]`, text as UTF-8 strings.
"""

from __future__ import annotations

import csv
import io
import re
from functools import lru_cache
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal
from typing import Any, Callable, Iterable, Mapping, Sequence
from zoneinfo import ZoneInfo

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from posttrade.core.exact import EXACT, ONE, ZERO, format_decimal
from posttrade.core.positions import Position

REPORT_KINDS = ("daily_pnl", "positions", "trade_blotter", "compliance")
FORMATS = ("csv", "parquet")
CONTENT_TYPES = {"csv": "text/csv; charset=utf-8", "parquet": "application/vnd.apache.parquet"}

NS = 1_000_000_000
_NAME = re.compile(r"^(?P<day>\d{4}-\d{2}-\d{2})/(?P<kind>[a-z_]+)\.(?P<format>csv|parquet)$")

# Column kinds: "string", "decimal", "timestamp" (epoch ns), "int".
Columns = Sequence[tuple[str, str]]

DAILY_PNL_COLUMNS: Columns = (
    ("date", "string"),
    ("level", "string"),  # "position" | "account"
    ("account", "string"),
    ("symbol", "string"),  # null on account rows
    ("net_qty", "decimal"),  # null on account rows
    ("mark", "decimal"),  # null on account rows
    ("realized_pnl_gross", "decimal"),
    ("fees", "decimal"),
    ("realized_pnl_net", "decimal"),
    ("unrealized_pnl", "decimal"),
    ("total_pnl", "decimal"),
    ("day_pnl", "decimal"),
    ("valued_at", "timestamp"),
)
POSITIONS_COLUMNS: Columns = (
    ("date", "string"),
    ("account", "string"),
    ("symbol", "string"),
    ("net_qty", "decimal"),
    ("avg_open_price", "decimal"),
    ("multiplier", "decimal"),
    ("mark", "decimal"),
    ("market_value", "decimal"),  # net_qty x mark x multiplier
    ("unrealized_pnl", "decimal"),
    ("realized_pnl_net", "decimal"),
    ("valued_at", "timestamp"),
)
TRADE_BLOTTER_COLUMNS: Columns = (
    ("ts", "timestamp"),
    ("fill_id", "string"),
    ("account", "string"),
    ("symbol", "string"),
    ("side", "string"),
    ("qty", "decimal"),
    ("price", "decimal"),
    ("fee", "decimal"),
    ("realized_pnl_fill", "decimal"),
    ("order_id", "string"),
    ("venue", "string"),
    ("net_qty_after", "decimal"),
)
COMPLIANCE_COLUMNS: Columns = (
    ("ts", "timestamp"),
    ("alert_id", "string"),
    ("rule", "string"),
    ("severity", "string"),
    ("account", "string"),
    ("symbol", "string"),
    ("message", "string"),
    ("observed", "string"),  # as the rule stated them (decimal text, or empty)
    ("limit", "string"),
)
COLUMNS = {
    "daily_pnl": DAILY_PNL_COLUMNS,
    "positions": POSITIONS_COLUMNS,
    "trade_blotter": TRADE_BLOTTER_COLUMNS,
    "compliance": COMPLIANCE_COLUMNS,
}

#: Every stored decimal (QuestDB DECIMAL(38, 12)) fits this exactly.
STORED_DECIMAL = pa.decimal128(38, 12)


# -- names and days -----------------------------------------------------------------------


def report_name(prefix: str, day: date, kind: str, fmt: str) -> str:
    return f"{prefix}/{day.isoformat()}/{kind}.{fmt}"


def parse_report_name(relative: str) -> tuple[date, str, str] | None:
    """(day, kind, format) of `YYYY-MM-DD/<kind>.<format>`, or None for another name."""
    match = _NAME.match(relative)
    if match is None or match["kind"] not in REPORT_KINDS:
        return None
    try:
        day = date.fromisoformat(match["day"])
    except ValueError:
        return None
    return day, match["kind"], match["format"]


@dataclass(frozen=True)
class TradingDay:
    """Trading days that start at `starts_at` local time in `zone` (ptrc's calendar)."""

    zone: ZoneInfo = ZoneInfo("UTC")
    starts_at: time = time(0, 0)

    def of(self, instant: datetime) -> date:
        """The trading day `instant` belongs to."""
        local = instant.astimezone(self.zone)
        return local.date() if local.time() >= self.starts_at else local.date() - timedelta(days=1)

    def start(self, day: date) -> datetime:
        return datetime.combine(day, self.starts_at, tzinfo=self.zone).astimezone(timezone.utc)

    def window_ns(self, day: date) -> tuple[int, int]:
        """[start, end) of `day` in epoch nanoseconds (a DST day is 23 or 25 hours)."""
        return to_ns(self.start(day)), to_ns(self.start(day + timedelta(days=1)))


def to_ns(instant: datetime) -> int:
    delta = instant - datetime(1970, 1, 1, tzinfo=timezone.utc)
    return (delta.days * 86_400 + delta.seconds) * NS + delta.microseconds * 1000


def iso_ns(ns: int) -> str:
    """Epoch ns as ISO-8601 UTC with nine fractional digits (`...T10:00:00.000000001Z`)."""
    seconds, fraction = divmod(ns, NS)
    stamp = datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{stamp}.{fraction:09d}Z"


def parse_iso_ns(text: str) -> int:
    """QuestDB's ISO-8601 UTC text (`2026-11-23T10:00:00.000000001Z`) as epoch ns."""
    head, _, fraction = text.rstrip("Z").partition(".")
    seconds = _epoch_seconds(head)
    return seconds * NS + (int((fraction + "000000000")[:9]) if fraction else 0)


@lru_cache(maxsize=4096)
def _epoch_seconds_of_minute(minute: str) -> int:
    return to_ns(datetime.fromisoformat(minute + ":00").replace(tzinfo=timezone.utc)) // NS


def _epoch_seconds(head: str) -> int:
    # Rows of one report share few minutes: the calendar arithmetic is done once per minute.
    return _epoch_seconds_of_minute(head[:16]) + int(head[17:19])


# -- valuations -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Valuation:
    """One position's figures for the reports, as of `valued_at` (epoch ns)."""

    account: str
    symbol: str
    multiplier: Decimal
    net_qty: Decimal
    avg_open_price: Decimal | None
    realized_pnl_gross: Decimal
    fees: Decimal
    realized_pnl_net: Decimal
    mark: Decimal | None
    unrealized_pnl: Decimal | None
    day_pnl: Decimal | None
    valued_at: int

    @property
    def total_pnl(self) -> Decimal | None:
        return None if self.unrealized_pnl is None else EXACT.add(self.realized_pnl_net, self.unrealized_pnl)

    @property
    def market_value(self) -> Decimal | None:
        if self.mark is None:
            return None
        return EXACT.multiply(EXACT.multiply(self.net_qty, self.mark), self.multiplier)


def valuations_from_live(
    positions: Iterable[Position], mark_of: Callable[[str], Decimal | None], valued_at: int
) -> list[Valuation]:
    """The live positions valued at the current marks, sorted by (account, symbol)."""
    out = []
    for p in sorted(positions, key=lambda p: (p.account, p.symbol)):
        mark = mark_of(p.symbol)
        out.append(
            Valuation(
                account=p.account, symbol=p.symbol, multiplier=p.multiplier, net_qty=p.net_qty,
                avg_open_price=p.avg_open_price, realized_pnl_gross=p.realized_pnl_gross, fees=p.fees,
                realized_pnl_net=p.realized_pnl_net, mark=mark, unrealized_pnl=p.unrealized_pnl(mark),
                day_pnl=p.day_pnl(mark), valued_at=valued_at,
            )
        )
    return out


@dataclass(frozen=True)
class SnapshotRow:
    """One row of ptrc's `position_snapshots` table."""

    ts: int
    account: str
    symbol: str
    reason: str
    net_qty: Decimal
    avg_open_price: Decimal | None
    realized_pnl_gross: Decimal
    fees: Decimal
    realized_pnl_net: Decimal
    mark: Decimal | None
    unrealized_pnl: Decimal | None
    day_pnl: Decimal | None

    @property
    def key(self) -> tuple[str, str]:
        return (self.account, self.symbol)

    @property
    def total_pnl(self) -> Decimal | None:
        if self.unrealized_pnl is None:
            return None if self.net_qty else self.realized_pnl_net
        return EXACT.add(self.realized_pnl_net, self.unrealized_pnl)


def valuations_from_snapshots(
    rolls: Iterable[SnapshotRow],
    latest_before_end: Iterable[SnapshotRow],
    window: tuple[int, int],
    next_window_end: int,
    multipliers: Mapping[str, Decimal],
) -> list[Valuation]:
    """The close of the day `window` = [start, end) from ptrc's snapshots (module doc).

    `rolls`: the `roll` snapshots in [start, next_window_end); `latest_before_end`: each
    key's last snapshot before `end` (any reason).
    """
    start, end = window
    opening: dict[tuple[str, str], SnapshotRow] = {}  # roll into the day
    closing: dict[tuple[str, str], SnapshotRow] = {}  # roll into the next day
    for row in sorted(rolls, key=lambda r: r.ts):
        if start <= row.ts < end:
            opening.setdefault(row.key, row)
        elif end <= row.ts < next_window_end:
            closing.setdefault(row.key, row)
    rolled_in = bool(opening)  # ptrc ran at the day's start: a key without a roll is new that day
    fallback = {row.key: row for row in latest_before_end}
    out = []
    for key in sorted(set(closing) | set(fallback)):
        row = closing.get(key)
        if row is not None:
            total = row.total_pnl
            sod = opening.get(key)
            sod_total = sod.total_pnl if sod is not None else (ZERO if rolled_in else None)
            day_pnl = None if total is None or sod_total is None else EXACT.subtract(total, sod_total)
        else:
            row = fallback[key]
            day_pnl = row.day_pnl
        out.append(
            Valuation(
                account=row.account, symbol=row.symbol, multiplier=multipliers.get(row.symbol, ONE),
                net_qty=row.net_qty, avg_open_price=row.avg_open_price if row.net_qty else None,
                realized_pnl_gross=row.realized_pnl_gross, fees=row.fees, realized_pnl_net=row.realized_pnl_net,
                mark=row.mark, unrealized_pnl=row.unrealized_pnl if row.net_qty else ZERO,
                day_pnl=day_pnl, valued_at=row.ts,
            )
        )
    return out


SNAPSHOT_FIELDS = (
    "ts", "account", "symbol", "reason", "net_qty", "avg_open_price", "realized_pnl_gross", "fees",
    "realized_pnl_net", "mark", "unrealized_pnl", "day_pnl",
)


def snapshot_rows(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[SnapshotRow]:
    """`position_snapshots` rows from QuestDB's JSON (decimals as text, ts as ISO text).

    Positional and without per-row dicts: a past day's report reads one or two rows
    per position, tens of thousands of them.
    """
    at = [columns.index(name) for name in SNAPSHOT_FIELDS]
    i_ts, i_account, i_symbol, i_reason, *i_decimals = at
    out = []
    for row in rows:
        net, avg, gross, fees, net_pnl, mark, unrealized, day = (
            None if row[i] is None or row[i] == "" else Decimal(row[i]) for i in i_decimals
        )
        out.append(
            SnapshotRow(
                ts=parse_iso_ns(row[i_ts]), account=row[i_account], symbol=row[i_symbol], reason=row[i_reason],
                net_qty=net or ZERO, avg_open_price=avg, realized_pnl_gross=gross or ZERO, fees=fees or ZERO,
                realized_pnl_net=net_pnl or ZERO, mark=mark, unrealized_pnl=unrealized, day_pnl=day,
            )
        )
    return out


def snapshot_row(record: Mapping[str, Any]) -> SnapshotRow:
    """One `position_snapshots` row from a mapping of QuestDB's JSON values."""
    return snapshot_rows(SNAPSHOT_FIELDS, [[record.get(name) for name in SNAPSHOT_FIELDS]])[0]


# -- report rows --------------------------------------------------------------------------------


def _sum_known(values: Iterable[Decimal | None]) -> Decimal | None:
    total = ZERO
    for value in values:
        if value is None:
            return None
        total = EXACT.add(total, value)
    return total


def daily_pnl_rows(day: date, valuations: Sequence[Valuation]) -> list[dict]:
    """Position rows, each account's rows followed by its total row."""
    rows: list[dict] = []
    by_account: dict[str, list[Valuation]] = {}
    for v in sorted(valuations, key=lambda v: (v.account, v.symbol)):
        by_account.setdefault(v.account, []).append(v)
    for account, items in by_account.items():
        for v in items:
            rows.append(
                {
                    "date": day.isoformat(), "level": "position", "account": account, "symbol": v.symbol,
                    "net_qty": v.net_qty, "mark": v.mark, "realized_pnl_gross": v.realized_pnl_gross,
                    "fees": v.fees, "realized_pnl_net": v.realized_pnl_net, "unrealized_pnl": v.unrealized_pnl,
                    "total_pnl": v.total_pnl, "day_pnl": v.day_pnl, "valued_at": v.valued_at,
                }
            )
        rows.append(
            {
                "date": day.isoformat(), "level": "account", "account": account, "symbol": None,
                "net_qty": None, "mark": None,
                "realized_pnl_gross": _sum_known(v.realized_pnl_gross for v in items),
                "fees": _sum_known(v.fees for v in items),
                "realized_pnl_net": _sum_known(v.realized_pnl_net for v in items),
                "unrealized_pnl": _sum_known(v.unrealized_pnl for v in items),
                "total_pnl": _sum_known(v.total_pnl for v in items),
                "day_pnl": _sum_known(v.day_pnl for v in items),
                "valued_at": max(v.valued_at for v in items),
            }
        )
    return rows


def positions_rows(day: date, valuations: Sequence[Valuation]) -> list[dict]:
    """The open positions (net_qty != 0), sorted by (account, symbol)."""
    return [
        {
            "date": day.isoformat(), "account": v.account, "symbol": v.symbol, "net_qty": v.net_qty,
            "avg_open_price": v.avg_open_price, "multiplier": v.multiplier, "mark": v.mark,
            "market_value": v.market_value, "unrealized_pnl": v.unrealized_pnl,
            "realized_pnl_net": v.realized_pnl_net, "valued_at": v.valued_at,
        }
        for v in sorted(valuations, key=lambda v: (v.account, v.symbol))
        if v.net_qty
    ]


# -- encodings ----------------------------------------------------------------------------------


def _csv_cell(value: Any, kind: str) -> str:
    if value is None:
        return ""
    if kind == "decimal":
        return format_decimal(value)
    if kind == "timestamp":
        return iso_ns(value)
    return str(value)


def csv_bytes(columns: Columns, rows: Iterable[Mapping[str, Any]]) -> bytes:
    """RFC 4180 CSV (CRLF line ends, quotes only where needed) with a header row."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow([name for name, _ in columns])
    for row in rows:
        writer.writerow([_csv_cell(row.get(name), kind) for name, kind in columns])
    return out.getvalue().encode("utf-8")


def decimal_type(values: Iterable[Decimal | None]) -> pa.DataType:
    """`decimal128(38, 12)`, or the exact type the values need when that cannot hold them."""
    scale, integer_digits = 12, 1
    for value in values:
        if value is None:
            continue
        sign, digits, exponent = value.as_tuple()
        scale = max(scale, -exponent)
        integer_digits = max(integer_digits, len(digits) + exponent)
    if integer_digits + scale <= 38:
        return pa.decimal128(38, scale)
    if integer_digits + scale <= 76:
        return pa.decimal256(76, scale)
    raise ValueError(f"a decimal needs {integer_digits + scale} digits: more than Parquet's 76")


def arrow_table(columns: Columns, rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    """The rows as an Arrow table typed by `columns` (decimals exact, never rounded)."""
    arrays = {}
    for name, kind in columns:
        values = [row.get(name) for row in rows]
        if kind == "decimal":
            arrays[name] = pa.array(values, type=decimal_type(values))
        elif kind == "timestamp":
            arrays[name] = pa.array(values, type=pa.int64()).cast(pa.timestamp("ns", tz="UTC"))
        elif kind == "int":
            arrays[name] = pa.array(values, type=pa.int64())
        else:
            arrays[name] = pa.array(values, type=pa.string())
    return pa.table(arrays)


def parquet_bytes(table: pa.Table, compression: str = "snappy") -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression=compression)
    return sink.getvalue().to_pybytes()


# -- the trade blotter from QuestDB's CSV export ----------------------------------------------------

_BLOTTER_TYPES = {
    name: (STORED_DECIMAL if kind == "decimal" else pa.timestamp("ns", tz="UTC") if kind == "timestamp" else pa.string())
    for name, kind in TRADE_BLOTTER_COLUMNS
}


def blotter_from_questdb_csv(data: bytes) -> pa.Table:
    """QuestDB's `/exp` CSV of the blotter columns as a typed Arrow table.

    QuestDB quotes every value and writes null as a bare `null`, so only an unquoted
    `null` is null: a fill id or venue spelled "null" stays text.
    """
    return pa_csv.read_csv(
        pa.BufferReader(data),
        convert_options=pa_csv.ConvertOptions(
            column_types=_BLOTTER_TYPES,
            include_columns=[name for name, _ in TRADE_BLOTTER_COLUMNS],
            null_values=["null"],
            strings_can_be_null=True,
            quoted_strings_can_be_null=False,
        ),
        read_options=pa_csv.ReadOptions(block_size=8 << 20),
    )


def join_csv_exports(parts: Sequence[bytes]) -> bytes:
    """One CSV from consecutive exports of the same query shape: the first header only."""
    if not parts:
        return b""
    pieces = [parts[0]]
    for part in parts[1:]:
        newline = part.find(b"\n")
        if newline >= 0:
            pieces.append(memoryview(part)[newline + 1:])
    return b"".join(pieces)


def empty_blotter() -> pa.Table:
    return pa.table({name: pa.array([], type=t) for name, t in _BLOTTER_TYPES.items()})
