"""Report tables: what each report holds, computed from positions or stored rows. Pure.

Four reports per trading day, each written as CSV and Parquet
(`posttrade.agents.reports` does the reading and writing):

* `daily_pnl` — per (account, symbol) and per account (`level`): realized P&L gross,
  fees, net, unrealized, total (= realized net + unrealized) and day P&L.
* `positions` — the open positions (net_qty != 0) with their valuation.
* `trade_blotter` — the day's fills as ptrc stored them (`ptrc_trades`): each execution
  in its final state (`state` active, corrected or busted) and the corrections and busts
  themselves (`state` amendment).
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

Every figure follows `posttrade.core.valuation`: a live position is valued there
(`value_position`), a snapshot's stored figures are completed by its rules (total,
day P&L, market value), and a sum that would need an unknown value (no mark for an
open position) is null, never a partial number.

Currencies
----------
A position's money is in its instrument's `currency` (the local columns) and, beside
it, in its account's `base_currency` (the `*_base` columns): the local figure times
`fx_rate`, rounded half-even at 12 places (`posttrade.core.fx`, and
`posttrade.core.valuation`, "Base currency", for fees charged in a third currency). A
base figure whose rate is unknown is null, and the currency is listed in
`missing_rates`. The rates are the ones of the moment the row is valued at:

* the current day: the current FX marks (ptrc's `FxRates`);
* a past day: the rates of the roll into the next day, which ptrc stored with the
  roll's snapshot (`fx_rate`, `foreign_fee_rates`, and the base figures computed at the
  roll); never today's. The day's P&L in base is the local day P&L times the roll's
  rate (less the day's foreign fees, each at its own). A snapshot stored before the
  base columns existed is converted at the rates that hold at any time (the same
  currency, a fixed rate of the reference data); any other rate of it is unknown.

Nothing adds two currencies. An account row (`daily_pnl`, `level = account`) sums its
positions' base figures: all its money columns, the local ones included, are in the
account's base currency, which its `currency` names (and `fx_rate` is 1). Should one
account's positions carry two base currencies (snapshots stored under different
reference data), it gets one total row per base currency.

Files
-----
Names are `<prefix>/<YYYY-MM-DD>/<kind>.<csv|parquet>`. CSV: a header row, decimals in
canonical form (`format_decimal`: `225`, `0.1`), timestamps ISO-8601 UTC with
nanoseconds, empty cells for null. The trade blotter CSV is QuestDB's own export,
passed through unchanged: every field quoted, decimals with their 12 stored decimal
places, `null` for null. Parquet: decimals as `decimal128(38, 12)` (a wider scale, or
`decimal256`, only when a value needs it — trailing fractional zeros are not needed —
never rounded), timestamps as `timestamp[ns, UTC]`, text as UTF-8 strings. The trade
blotter's Parquet file has a row group per chunk it was assembled from (see "the trade
blotter kept during the day" below).
"""

from __future__ import annotations

import csv
import io
import json
import re
from functools import lru_cache
from dataclasses import dataclass, field as dataclass_field
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence
from zoneinfo import ZoneInfo

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from posttrade.core.exact import EXACT, ONE, ZERO, format_decimal
from posttrade.core.fx import FxRates, Rate, RateLeg, convert, round_base
from posttrade.core.reference import Reference
from posttrade.core.valuation import (
    PositionLike,
    PositionValue,
    day_pnl_of,
    market_value_of,
    sum_known,
    total_pnl_of,
    value_position,
)

if TYPE_CHECKING:  # a chunk's Parquet layout is the Parquet store's, carried here untouched
    from posttrade.stores.parquet import ParquetLayout

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
    # The money columns above are in `currency`: the instrument's on a position row, the
    # account's base currency on an account row (module doc, "Currencies").
    ("currency", "string"),
    ("base_currency", "string"),
    ("fx_rate", "decimal"),  # currency -> base_currency; exact (a cross rate may need > 12 places)
    ("realized_pnl_gross_base", "decimal"),
    ("fees_base", "decimal"),
    ("realized_pnl_net_base", "decimal"),
    ("unrealized_pnl_base", "decimal"),
    ("total_pnl_base", "decimal"),
    ("day_pnl_base", "decimal"),
    ("missing_rates", "string"),  # currencies without a rate to the base, comma-separated
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
    ("currency", "string"),  # of the money columns above: the instrument's
    ("base_currency", "string"),
    ("fx_rate", "decimal"),
    ("market_value_base", "decimal"),
    ("unrealized_pnl_base", "decimal"),
    ("realized_pnl_net_base", "decimal"),
    ("missing_rates", "string"),
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
    ("exec_type", "string"),  # NEW, OPENING, CORRECT, BUST
    ("ref_fill_id", "string"),  # a CORRECT's or BUST's execution
    ("state", "string"),  # active, corrected, busted; amendment for a CORRECT or BUST row
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


# -- rates ----------------------------------------------------------------------------------


def _no_mark(symbol: str) -> None:
    return None


class StoredRates(FxRates):
    """Rates as a snapshot stored them: `rates` (currency -> rate to `base`), else the
    rates that hold at any time (the same currency; `fx.fixed` of `reference`). It never
    reads a mark: a valuation of the past must not take today's rates."""

    __slots__ = ("base", "rates")

    def __init__(self, reference: Reference, base: str | None, rates: Mapping[str, Decimal] | None = None):
        super().__init__(reference, _no_mark)
        self.base = base
        self.rates = rates or {}

    def rate(self, currency: str, base: str) -> Rate | None:
        if base == self.base and currency != base:
            stored = self.rates.get(currency)
            if stored is not None:
                leg = RateLeg(from_=currency, to=base, rate=stored, source="stored")
                return Rate(currency=currency, base=base, rate=stored, legs=(leg,))
        return super().rate(currency, base)


def encode_amounts(amounts: Mapping[str, Decimal] | None) -> str | None:
    """Amounts (or rates) by currency as stored in a VARCHAR: a JSON object of exact
    decimal strings, `{"BNB":"0.02"}`; None when there are none."""
    if not amounts:
        return None
    return json.dumps({currency: format_decimal(value) for currency, value in sorted(amounts.items())},
                      separators=(",", ":"))


def decode_amounts(text: str | None) -> dict[str, Decimal]:
    """`encode_amounts`' text back (None or empty: none)."""
    if not text:
        return {}
    return {currency: Decimal(value) for currency, value in json.loads(text).items()}


def encode_currencies(currencies: Iterable[str]) -> str | None:
    """Currencies as a comma-separated text (`missing_rates`); None when there are none."""
    text = ",".join(sorted(set(currencies)))
    return text or None


# -- valuations -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Valuation:
    """One position's line in the `daily_pnl` and `positions` reports, as of
    `valued_at` (epoch ns): the report's columns of a `PositionValue`. Live positions
    have their whole valuation (`of`); a past day has only what ptrc's snapshots
    stored, which is why the reports do not take `PositionValue` itself.

    The local figures are in `currency`; the `*_base` ones in `base_currency` at
    `fx_rate` (None, with the figures that need it, when the rate is unknown; the
    currencies without a rate are in `missing_rates`)."""

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
    total_pnl: Decimal | None
    day_pnl: Decimal | None
    market_value: Decimal | None  # net_qty x mark x multiplier
    valued_at: int
    currency: str
    base_currency: str
    fx_rate: Decimal | None
    realized_pnl_gross_base: Decimal | None
    fees_base: Decimal | None
    realized_pnl_net_base: Decimal | None
    unrealized_pnl_base: Decimal | None
    total_pnl_base: Decimal | None
    day_pnl_base: Decimal | None
    market_value_base: Decimal | None
    missing_rates: tuple[str, ...]

    @classmethod
    def of(cls, value: PositionValue, valued_at: int) -> Valuation:
        return cls(
            account=value.account, symbol=value.symbol, multiplier=value.multiplier, net_qty=value.net_qty,
            avg_open_price=value.avg_open_price, realized_pnl_gross=value.realized_pnl_gross, fees=value.fees,
            realized_pnl_net=value.realized_pnl_net, mark=value.mark, unrealized_pnl=value.unrealized_pnl,
            total_pnl=value.total_pnl, day_pnl=value.day_pnl, market_value=value.market_value, valued_at=valued_at,
            currency=value.currency, base_currency=value.base_currency, fx_rate=value.fx_rate,
            realized_pnl_gross_base=value.realized_pnl_gross_base, fees_base=value.fees_base,
            realized_pnl_net_base=value.realized_pnl_net_base, unrealized_pnl_base=value.unrealized_pnl_base,
            total_pnl_base=value.total_pnl_base, day_pnl_base=value.day_pnl_base,
            market_value_base=convert(value.market_value, value.fx_rate), missing_rates=tuple(value.missing_rates),
        )


def valuations_from_live(
    positions: Iterable[PositionLike], mark_of: Callable[[str], Decimal | None], valued_at: int,
    fx: FxRates | None = None,
) -> list[Valuation]:
    """The live positions valued at the current marks and `fx`'s current rates (default:
    everything in USD), sorted by (account, symbol)."""
    return [
        Valuation.of(value_position(p, mark_of(p.symbol), fx), valued_at)
        for p in sorted(positions, key=lambda p: (p.account, p.symbol))
    ]


@dataclass(frozen=True)
class SnapshotRow:
    """One row of ptrc's `position_snapshots` table.

    The base-currency part (`currency` ... `missing_rates`) is what ptrc stored with the
    snapshot (`posttrade.stores.questdb.rows`): the rates of its moment and the figures
    at them. `base_currency` None: the row was stored before those columns existed."""

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
    currency: str | None = None
    base_currency: str | None = None
    fx_rate: Decimal | None = None  # None with a base_currency: unknown at the snapshot
    foreign_fees: Mapping[str, Decimal] = dataclass_field(default_factory=dict)  # fees in other currencies, by currency
    foreign_fee_rates: Mapping[str, Decimal] = dataclass_field(default_factory=dict)  # their rates to the base, when known
    realized_pnl_gross_base: Decimal | None = None
    fees_base: Decimal | None = None
    realized_pnl_net_base: Decimal | None = None
    unrealized_pnl_base: Decimal | None = None
    total_pnl_base: Decimal | None = None
    day_pnl_base: Decimal | None = None
    missing_rates: tuple[str, ...] = ()

    @property
    def key(self) -> tuple[str, str]:
        return (self.account, self.symbol)

    @property
    def unrealized(self) -> Decimal | None:
        """The stored unrealized P&L, 0 when flat (a flat position needs no mark)."""
        return self.unrealized_pnl if self.net_qty else ZERO

    @property
    def total_pnl(self) -> Decimal | None:
        return total_pnl_of(self.realized_pnl_net, self.unrealized)

    def rates(self, reference: Reference) -> tuple[str, str, StoredRates]:
        """(currency, base currency, the rates this row is valued at): as stored with it;
        for a row stored before the base columns, the reference data's currencies and
        the rates that hold at any time."""
        currency = self.currency or reference.currency(self.symbol)
        base = self.base_currency or reference.base_currency(self.account)
        stored = dict(self.foreign_fee_rates)
        if self.fx_rate is not None:
            stored[currency] = self.fx_rate
        return currency, base, StoredRates(reference, base, stored)


def _day_pnl_base(
    close: SnapshotRow, sod_foreign_fees: Mapping[str, Decimal], day_pnl: Decimal | None, rates: StoredRates,
    currency: str, base: str,
) -> Decimal | None:
    """The day P&L in base at `close`'s rates: `day_pnl x rate - sum((foreign fee -
    at the day's start) x its rate)`, rounded once (`core.valuation`'s rule)."""
    if day_pnl is None:
        return None
    rate = rates.rate(currency, base)
    if rate is None:
        return None
    if not close.foreign_fees:
        return convert(day_pnl, rate.rate)
    total = EXACT.multiply(day_pnl, rate.rate)
    for fee_currency, fee in close.foreign_fees.items():
        fee_rate = rates.rate(fee_currency, base)
        if fee_rate is None:
            return None
        today = EXACT.subtract(fee, sod_foreign_fees.get(fee_currency, ZERO))
        total = EXACT.subtract(total, EXACT.multiply(today, fee_rate.rate))
    return round_base(total)


def _snapshot_valuation(
    row: SnapshotRow, multiplier: Decimal, day_pnl: Decimal | None, day_pnl_base: Decimal | None,
    currency: str, base: str, rates: StoredRates,
) -> Valuation:
    market_value = market_value_of(row.net_qty, row.mark, multiplier)
    if row.base_currency is not None:  # as stored at the snapshot
        rate, missing = row.fx_rate, row.missing_rates
        gross_base, fees_base, net_base = row.realized_pnl_gross_base, row.fees_base, row.realized_pnl_net_base
        unrealized_base, total_base = row.unrealized_pnl_base, row.total_pnl_base
    else:  # stored before the base columns: at a rate that holds at any time, if any
        found = rates.rate(currency, base)
        rate = None if found is None else found.rate
        missing = () if rate is not None else (currency,)
        gross_base, fees_base = convert(row.realized_pnl_gross, rate), convert(row.fees, rate)
        net_base, unrealized_base = convert(row.realized_pnl_net, rate), convert(row.unrealized, rate)
        total_base = convert(row.total_pnl, rate)
    return Valuation(
        account=row.account, symbol=row.symbol, multiplier=multiplier,
        net_qty=row.net_qty, avg_open_price=row.avg_open_price if row.net_qty else None,
        realized_pnl_gross=row.realized_pnl_gross, fees=row.fees, realized_pnl_net=row.realized_pnl_net,
        mark=row.mark, unrealized_pnl=row.unrealized, total_pnl=row.total_pnl, day_pnl=day_pnl,
        market_value=market_value, valued_at=row.ts,
        currency=currency, base_currency=base, fx_rate=rate, realized_pnl_gross_base=gross_base,
        fees_base=fees_base, realized_pnl_net_base=net_base, unrealized_pnl_base=unrealized_base,
        total_pnl_base=total_base, day_pnl_base=day_pnl_base, market_value_base=convert(market_value, rate),
        missing_rates=tuple(missing),
    )


def valuations_from_snapshots(
    rolls: Iterable[SnapshotRow],
    latest_before_end: Iterable[SnapshotRow],
    window: tuple[int, int],
    next_window_end: int,
    multipliers: Mapping[str, Decimal],
    reference: Reference | None = None,
) -> list[Valuation]:
    """The close of the day `window` = [start, end) from ptrc's snapshots (module doc).

    `rolls`: the `roll` snapshots in [start, next_window_end); `latest_before_end`: each
    key's last snapshot before `end` (any reason). Base figures are at the rates stored
    with the row shown (module doc, "Currencies"); `reference` gives the currencies of
    rows stored without them (default: everything in USD).
    """
    reference = reference or Reference()
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
            currency, base, rates = row.rates(reference)
            sod = opening.get(key)
            sod_total = sod.total_pnl if sod is not None else (ZERO if rolled_in else None)
            day_pnl = day_pnl_of(row.total_pnl, sod_total)
            sod_foreign = sod.foreign_fees if sod is not None else {}
            day_pnl_base = _day_pnl_base(row, sod_foreign, day_pnl, rates, currency, base)
        else:
            row = fallback[key]
            currency, base, rates = row.rates(reference)
            day_pnl = row.day_pnl
            if row.base_currency is not None:
                day_pnl_base = row.day_pnl_base
            else:
                found = rates.rate(currency, base)
                day_pnl_base = convert(day_pnl, None if found is None else found.rate)
        multiplier = multipliers.get(row.symbol, ONE)
        out.append(_snapshot_valuation(row, multiplier, day_pnl, day_pnl_base, currency, base, rates))
    return out


#: The columns of `position_snapshots` a report reads; a table may lack `SNAPSHOT_BASE_FIELDS`
#: (stored before them), not the others.
SNAPSHOT_LOCAL_FIELDS = (
    "ts", "account", "symbol", "reason", "net_qty", "avg_open_price", "realized_pnl_gross", "fees",
    "realized_pnl_net", "mark", "unrealized_pnl", "day_pnl",
)
SNAPSHOT_BASE_FIELDS = (
    "currency", "base_currency", "fx_rate", "foreign_fees", "foreign_fee_rates", "realized_pnl_gross_base",
    "fees_base", "realized_pnl_net_base", "unrealized_pnl_base", "total_pnl_base", "day_pnl_base", "missing_rates",
)
SNAPSHOT_FIELDS = SNAPSHOT_LOCAL_FIELDS + SNAPSHOT_BASE_FIELDS
_BASE_DECIMALS = ("realized_pnl_gross_base", "fees_base", "realized_pnl_net_base", "unrealized_pnl_base",
                  "total_pnl_base", "day_pnl_base")


def snapshot_rows(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[SnapshotRow]:
    """`position_snapshots` rows from QuestDB's JSON (decimals as text, ts as ISO text).

    Positional and without per-row dicts: a past day's report reads one or two rows
    per position, tens of thousands of them. `columns` must hold `SNAPSHOT_LOCAL_FIELDS`;
    the base columns are read when there.
    """
    at = [columns.index(name) for name in SNAPSHOT_LOCAL_FIELDS]
    i_ts, i_account, i_symbol, i_reason, *i_decimals = at
    present = {name: columns.index(name) for name in SNAPSHOT_BASE_FIELDS if name in columns}
    i_base = present.get("base_currency")
    out = []
    for row in rows:
        net, avg, gross, fees, net_pnl, mark, unrealized, day = [
            Decimal(text) if text else None for text in map(row.__getitem__, i_decimals)
        ]
        base_part = _stored_base(row, present) if i_base is not None and row[i_base] else {}
        out.append(
            SnapshotRow(
                ts=parse_iso_ns(row[i_ts]), account=row[i_account], symbol=row[i_symbol], reason=row[i_reason],
                net_qty=net or ZERO, avg_open_price=avg, realized_pnl_gross=gross or ZERO, fees=fees or ZERO,
                realized_pnl_net=net_pnl or ZERO, mark=mark, unrealized_pnl=unrealized, day_pnl=day, **base_part,
            )
        )
    return out


def _stored_base(row: Sequence[Any], present: Mapping[str, int]) -> dict[str, Any]:
    def text(name: str) -> Any:
        i = present.get(name)
        return None if i is None else row[i]

    rate = text("fx_rate")
    missing = text("missing_rates")
    out: dict[str, Any] = {
        "currency": text("currency"), "base_currency": text("base_currency"),
        "fx_rate": Decimal(rate) if rate else None,
        "foreign_fees": decode_amounts(text("foreign_fees")),
        "foreign_fee_rates": decode_amounts(text("foreign_fee_rates")),
        "missing_rates": tuple(missing.split(",")) if missing else (),
    }
    for name in _BASE_DECIMALS:
        value = text(name)
        out[name] = Decimal(value) if value else None
    return out


def snapshot_row(record: Mapping[str, Any]) -> SnapshotRow:
    """One `position_snapshots` row from a mapping of QuestDB's JSON values."""
    return snapshot_rows(SNAPSHOT_FIELDS, [[record.get(name) for name in SNAPSHOT_FIELDS]])[0]


# -- report rows --------------------------------------------------------------------------------

#: The money an account row sums: each the sum of its positions' base figures.
_ACCOUNT_SUMS = ("realized_pnl_gross", "fees", "realized_pnl_net", "unrealized_pnl", "total_pnl", "day_pnl")


def daily_pnl_rows(day: date, valuations: Sequence[Valuation]) -> list[dict]:
    """Position rows, each account's rows followed by its total row: in the account's
    base currency (one per base currency, should its rows carry two; module doc)."""
    rows: list[dict] = []
    by_account: dict[str, list[Valuation]] = {}
    for v in sorted(valuations, key=lambda v: (v.account, v.symbol)):
        by_account.setdefault(v.account, []).append(v)
    for account, items in by_account.items():
        by_base: dict[str, list[Valuation]] = {}
        for v in items:
            by_base.setdefault(v.base_currency, []).append(v)
            rows.append(
                {
                    "date": day.isoformat(), "level": "position", "account": account, "symbol": v.symbol,
                    "net_qty": v.net_qty, "mark": v.mark, "realized_pnl_gross": v.realized_pnl_gross,
                    "fees": v.fees, "realized_pnl_net": v.realized_pnl_net, "unrealized_pnl": v.unrealized_pnl,
                    "total_pnl": v.total_pnl, "day_pnl": v.day_pnl, "valued_at": v.valued_at,
                    "currency": v.currency, "base_currency": v.base_currency, "fx_rate": v.fx_rate,
                    "realized_pnl_gross_base": v.realized_pnl_gross_base, "fees_base": v.fees_base,
                    "realized_pnl_net_base": v.realized_pnl_net_base, "unrealized_pnl_base": v.unrealized_pnl_base,
                    "total_pnl_base": v.total_pnl_base, "day_pnl_base": v.day_pnl_base,
                    "missing_rates": encode_currencies(v.missing_rates),
                }
            )
        for base, members in sorted(by_base.items()):
            sums = {name: sum_known(getattr(v, f"{name}_base") for v in members) for name in _ACCOUNT_SUMS}
            rows.append(
                {
                    "date": day.isoformat(), "level": "account", "account": account, "symbol": None,
                    "net_qty": None, "mark": None, **sums, "valued_at": max(v.valued_at for v in members),
                    "currency": base, "base_currency": base, "fx_rate": ONE,
                    **{f"{name}_base": value for name, value in sums.items()},
                    "missing_rates": encode_currencies(c for v in members for c in v.missing_rates),
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
            "currency": v.currency, "base_currency": v.base_currency, "fx_rate": v.fx_rate,
            "market_value_base": v.market_value_base, "unrealized_pnl_base": v.unrealized_pnl_base,
            "realized_pnl_net_base": v.realized_pnl_net_base, "missing_rates": encode_currencies(v.missing_rates),
        }
        for v in sorted(valuations, key=lambda v: (v.account, v.symbol))
        if v.net_qty
    ]


# -- encodings ----------------------------------------------------------------------------------


# Both files of a report are made from one pass over each column: a decimal is turned
# into its canonical text once, and that text is both the CSV cell and what Arrow
# parses (in C++) into the Parquet column.


def canonical_decimal(value: Decimal) -> str:
    """`format_decimal`, faster for the usual case (a plain `str` with a fraction)."""
    text = str(value)
    if "E" in text:
        return format_decimal(value)
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


def _column(values: Sequence[Any], kind: str) -> tuple[Sequence[str | None], pa.Array]:
    """A column's CSV texts (None: an empty cell) and its Arrow array."""
    if kind == "decimal":
        texts = [None if value is None else canonical_decimal(value) for value in values]
        return texts, _decimal_array(texts)
    if kind == "timestamp":
        array = pa.array(values, type=pa.int64()).cast(pa.timestamp("ns", tz="UTC"))
        return _iso_texts(array), array
    if kind == "int":
        return [None if value is None else str(value) for value in values], pa.array(values, type=pa.int64())
    texts = [None if value is None else str(value) for value in values]
    return texts, pa.array(texts, type=pa.string())


def _iso_texts(array: pa.Array) -> list[str | None]:
    """`iso_ns` of each timestamp[ns, UTC] (nine fractional digits, `Z`), in C++."""
    return pc.strftime(array, format="%Y-%m-%dT%H:%M:%SZ").to_pylist()


def _decimal_array(texts: Sequence[str | None]) -> pa.Array:
    """Canonical decimal texts as an exact Arrow decimal column: `decimal128(38, 12)`, or
    the scale and width the values need (`decimal_type`'s rule), never rounded."""
    strings = pa.array(texts, type=pa.string())
    scale, integer_digits = 12, 1
    if strings.null_count < len(strings):
        length = pc.utf8_length(strings)
        dot = pc.find_substring(strings, ".")
        has_dot = pc.greater_equal(dot, 0)
        fraction = pc.if_else(has_dot, pc.subtract(pc.subtract(length, dot), 1), 0)
        integer = pc.subtract(pc.if_else(has_dot, dot, length), pc.cast(pc.starts_with(strings, "-"), pa.int32()))
        scale = max(scale, pc.max(fraction).as_py())
        integer_digits = max(integer_digits, pc.max(integer).as_py())
    # The type is chosen so that every value fits: Arrow's cast would not say if one did not.
    return strings.cast(_decimal_type_for(integer_digits, scale))


def _decimal_type_for(integer_digits: int, scale: int) -> pa.DataType:
    if integer_digits + scale <= 38:
        return pa.decimal128(38, scale)
    if integer_digits + scale <= 76:
        return pa.decimal256(76, scale)
    raise ValueError(f"a decimal needs {integer_digits + scale} digits: more than Parquet's 76")


def decimal_type(values: Iterable[Decimal | None]) -> pa.DataType:
    """`decimal128(38, 12)`, or the exact type the values need when that cannot hold them
    (digits a value needs: trailing fractional zeros are not needed)."""
    scale, integer_digits = 12, 1
    for value in values:
        if value is None or not value:
            continue
        sign, digits, exponent = value.normalize(EXACT).as_tuple()
        scale = max(scale, -exponent)
        integer_digits = max(integer_digits, len(digits) + exponent)
    return _decimal_type_for(integer_digits, scale)


def _write_csv(columns: Columns, texts: Sequence[Sequence[str | None]]) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out)  # RFC 4180: CRLF line ends, quotes only where needed
    writer.writerow([name for name, _ in columns])
    writer.writerows(zip(*texts))  # None is written as an empty cell
    return out.getvalue().encode("utf-8")


def _columns(columns: Columns, rows: Sequence[Mapping[str, Any]]) -> list[tuple[Sequence[str | None], pa.Array]]:
    return [_column([row.get(name) for row in rows], kind) for name, kind in columns]


def encode_report(columns: Columns, rows: Sequence[Mapping[str, Any]], compression: str = "snappy") -> tuple[bytes, bytes]:
    """A report's CSV and Parquet files (see the module doc for both formats)."""
    built = _columns(columns, rows)
    table = pa.table({name: array for (name, _), (_, array) in zip(columns, built)})
    return _write_csv(columns, [texts for texts, _ in built]), parquet_bytes(table, compression)


def csv_bytes(columns: Columns, rows: Sequence[Mapping[str, Any]]) -> bytes:
    """A report's CSV file: header row, canonical decimals, ISO-8601 times, empty nulls."""
    return _write_csv(columns, [texts for texts, _ in _columns(columns, rows)])


def arrow_table(columns: Columns, rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    """The rows as an Arrow table typed by `columns` (decimals exact, never rounded)."""
    return pa.table({name: array for (name, _), (_, array) in zip(columns, _columns(columns, rows))})


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


def empty_blotter() -> pa.Table:
    return pa.table({name: pa.array([], type=t) for name, t in _BLOTTER_TYPES.items()})


# -- the trade blotter kept during the day: cells, fingerprints, spool chunks ----------------------
#
# Exporting a day of fills from QuestDB as CSV is most of a generation's work (QuestDB
# formats five DECIMAL columns per row). So ptrc exports the day as it goes, in *chunks*,
# and a generation only re-exports what changed since. The pure pieces are here:
#
# * the day is cut into *cells* of `cell_ns` from the day's start (the last one may be
#   short); a chunk covers one or more whole consecutive cells;
# * a *fingerprint* of a stretch of `ptrc_trades` is its row count and the exact sum of
#   each decimal column. QuestDB computes it per cell in one cheap query; the chunk's
#   own is computed from the rows it holds. A chunk is used only while QuestDB's
#   fingerprint over its cells equals it — a late fill, a rewrite of a number, a dropped
#   partition all change it, and the chunk is exported again;
# * `plan_blotter` chooses, per cell, a stored chunk or a fresh export.
#
# The spool stores a chunk as one file: a small JSON head, QuestDB's CSV rows, and a
# Parquet file of the same rows (`posttrade.agents.reports`, `encode_chunk` /
# `decode_chunk_head`); `posttrade.stores.parquet.stitch_parquet` joins the chunks'
# Parquet files into one file without decoding or re-encoding a value.

BLOTTER_DECIMALS = tuple(name for name, kind in TRADE_BLOTTER_COLUMNS if kind == "decimal")
#: QuestDB's /exp header line for the blotter's columns (every name quoted, CRLF).
BLOTTER_CSV_HEADER = (",".join(f'"{name}"' for name, _ in TRADE_BLOTTER_COLUMNS) + "\r\n").encode()


@dataclass(frozen=True)
class Fingerprint:
    """Rows and the exact sum of each decimal column (None: no non-null value) of a stretch."""

    rows: int
    sums: tuple[Decimal | None, ...]

    def __add__(self, other: Fingerprint) -> Fingerprint:
        return Fingerprint(
            self.rows + other.rows,
            tuple(a if b is None else b if a is None else EXACT.add(a, b) for a, b in zip(self.sums, other.sums)),
        )

    def to_json(self) -> dict:
        return {"rows": self.rows, "sums": [None if s is None else str(s) for s in self.sums]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Fingerprint:
        return cls(int(data["rows"]), tuple(None if s is None else Decimal(s) for s in data["sums"]))


NO_ROWS = Fingerprint(0, (None,) * len(BLOTTER_DECIMALS))


def fingerprint_of(table: pa.Table) -> Fingerprint:
    """The fingerprint of blotter rows in Arrow (the same figures QuestDB's sum() gives).

    Summed as decimal256: Arrow's decimal128 sum would wrap around silently past 38
    digits, where QuestDB's DECIMAL sum (76 digits) does not."""
    wide = pa.decimal256(76, STORED_DECIMAL.scale)
    sums = []
    for name in BLOTTER_DECIMALS:
        total = pc.sum(table.column(name).cast(wide)).as_py() if table.num_rows else None
        sums.append(total)
    return Fingerprint(table.num_rows, tuple(sums))


def cell_bounds(start: int, end: int, cell_ns: int) -> list[tuple[int, int]]:
    """[start, end) cut into cells of `cell_ns` counted from `start` (the last may be short)."""
    return [(lo, min(lo + cell_ns, end)) for lo in range(start, end, cell_ns)]


@dataclass(frozen=True)
class ChunkHead:
    """What a stored chunk holds (the head of its file): enough to plan and stitch."""

    lo: int  # [lo, hi) epoch ns, on cell bounds
    hi: int
    fingerprint: Fingerprint
    csv_size: int  # bytes of CSV rows (no header line)
    parquet_size: int
    layout: ParquetLayout  # where its Parquet file's footer keeps what a join changes
    exported_at: int  # epoch ns

    @property
    def rows(self) -> int:
        return self.fingerprint.rows


@dataclass(frozen=True)
class BlotterPiece:
    """One stretch of the blotter in a generation: from a stored chunk, or exported now."""

    lo: int
    hi: int
    chunk: ChunkHead | None  # None: export [lo, hi) from QuestDB
    rows: int  # what QuestDB's fingerprint counted (an export may find a few more)


def plan_blotter(
    cells: Sequence[tuple[int, int]],
    stored: Mapping[int, Fingerprint],
    chunks: Iterable[ChunkHead],
    max_export_rows: int,
) -> list[BlotterPiece]:
    """The pieces that make the blotter of `cells`, in time order.

    `stored`: QuestDB's fingerprint per cell (keyed by the cell's start; a cell with no
    rows may be missing). A stored chunk is used when it starts and ends on cell bounds
    and QuestDB's fingerprints over its cells add up to its own; of chunks that overlap,
    the one starting first (then the newest) is tried first. Every other cell with rows
    is exported, consecutive ones together while they stay under `max_export_rows`.
    """
    index = {lo: i for i, (lo, _) in enumerate(cells)}
    ends = {hi: i for i, (_, hi) in enumerate(cells)}
    usable: dict[int, ChunkHead] = {}  # first cell index -> chunk
    taken_until = -1
    for chunk in sorted(chunks, key=lambda c: (c.lo, -c.exported_at)):
        first, last = index.get(chunk.lo), ends.get(chunk.hi)
        if first is None or last is None or last < first or first <= taken_until:
            continue
        total = NO_ROWS
        for lo, _ in cells[first:last + 1]:
            total = total + stored.get(lo, NO_ROWS)
        if total == chunk.fingerprint:
            usable[first] = chunk
            taken_until = last
    pieces: list[BlotterPiece] = []
    run: list[int] = []  # cell indexes of the export being gathered
    run_rows = 0

    def close_run() -> None:
        nonlocal run, run_rows
        while run and stored.get(cells[run[-1]][0], NO_ROWS).rows == 0:
            run.pop()  # no empty cells at the end of an export
        if run:
            pieces.append(BlotterPiece(cells[run[0]][0], cells[run[-1]][1], None, run_rows))
        run, run_rows = [], 0

    i = 0
    while i < len(cells):
        chunk = usable.get(i)
        if chunk is not None:
            close_run()
            pieces.append(BlotterPiece(chunk.lo, chunk.hi, chunk, chunk.rows))
            i = ends[chunk.hi] + 1
            continue
        rows = stored.get(cells[i][0], NO_ROWS).rows
        if rows and run and run_rows + rows > max_export_rows:
            close_run()
        if rows or run:
            run.append(i)
            run_rows += rows
        i += 1
    close_run()
    return pieces


def blotter_parquet(table: pa.Table, compression: str = "snappy") -> bytes:
    """The blotter's rows as a Parquet file, written so that such files can be joined
    (`posttrade.stores.parquet.stitch_parquet`: no page index, no bloom filter; one schema)."""
    sink = pa.BufferOutputStream()
    with pq.ParquetWriter(
        sink, empty_blotter().schema, compression=compression,
        # Only the few-valued columns gain from dictionaries; fill and order ids are
        # unique, and trying costs more than the rest of the encoding.
        use_dictionary=["account", "symbol", "side", "venue"],
        write_statistics=["ts"],
        write_page_index=False,
    ) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()
