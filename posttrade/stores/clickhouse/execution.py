"""execution_quality's ClickHouse: the tables (DDL, migrations of older layouts), the rows
built from the tracker's states, the per-minute rollup, the ledger of fill_ids, and
`ExecutionStore`, through which everything is written and looked up. The writes go
through `ExecutionSink` (`execution_sink.py`), the pages' reads through
`ExecutionQueries` (`execution_queries.py`).

Each write carries a `version`: a nanosecond clock, strictly increasing in the process,
with bit 62 (`SETTLED`) set when the row is settled (a complete fill, a final order). A
settled row therefore always outranks an unsettled one: whatever path tried to write a
less settled row later (a replay, an operator's reset), readers keep seeing the settled
one. Rows of amended fills and orders rank by their amendment count first
(`row_version`). Every row carries its instrument's `currency`: all its money is in it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from ...agents.execution.state import (
    FILL_ALL,
    MINUTE_NS,
    ORDER_ALL,
    ORDER_ARRIVAL_TAPE,
    ORDER_END_TAPE,
    FillState,
    OrderState,
    Progress,
    SeenFill,
)
from ...core import execution as tca
from ...core.bounds import CLICKHOUSE_DECIMAL, CLICKHOUSE_PRECISION, CLICKHOUSE_SCALE
from ...core.exact import EXACT
from ...core.reference import Reference
from ...streams.events import Fill, Order
from . import ClickHouseError, ClickHouseStore, open_clickhouse

if TYPE_CHECKING:
    from ...agents.execution.tracker import ExecutionTracker

log = logging.getLogger(__name__)

# Bit 62 of a row's `version`: the row is settled (a complete fill, a final order).
# Below it a nanosecond clock (< 2**62 until the year 2116). ReplacingMergeTree keeps
# the highest version, so no unsettled row can ever replace a settled one.
SETTLED = 1 << 62

# The row of an amended fill or order (a CORRECT or BUST applied) must outrank every row
# written before that amendment, settled or not, and rank by amendment count first:
# bit 63 set, the count in bits 53-62, the settled bit at 52, and a microsecond clock
# (< 2**52 until the year 2112) below. Rows without amendments keep the layout above, so
# rows written before amendments existed still compare as they did.
AMENDED = 1 << 63
_REVISION_SHIFT = 53
REVISION_MAX = (1 << 10) - 1  # amendments beyond this many rank by clock alone
_AMENDED_SETTLED = 1 << 52
_MICROS_MASK = (1 << 52) - 1


def row_version(clock: int, revision: int, settled: bool) -> int:
    """A row's `version` from the write's nanosecond clock, how many amendments its fill
    or order has had (`revision`) and whether it is settled (see SETTLED, AMENDED)."""
    if not revision:
        return clock | SETTLED if settled else clock
    version = AMENDED | min(revision, REVISION_MAX) << _REVISION_SHIFT | (clock // 1000 & _MICROS_MASK)
    return version | _AMENDED_SETTLED if settled else version


# ClickHouse columns hold Decimal(38, 18) (money, prices, quantities) and Decimal(38, 8)
# (bps): 20 integer digits either way (core.bounds: every value an event carries fits).
STORE_PLACES = CLICKHOUSE_SCALE
_STORE_QUANTUM = Decimal(1).scaleb(-STORE_PLACES)
_STORE_LIMIT = Decimal(10) ** (CLICKHOUSE_PRECISION - CLICKHOUSE_SCALE)


FILLS_TABLE = "execution_fills"
ORDERS_TABLE = "execution_orders"
MINUTES_TABLE = "execution_fill_minutes"  # the per-minute rollup of the fills
FILL_IDS_TABLE = "execution_fill_ids"  # the ledger: every fill_id of the FILLS stream, once


@dataclass(frozen=True)
class Column:
    name: str
    clickhouse: str
    arrow: str  # "string", "ts", "d18", "d18_map" (currency -> d18), "bps", "int64", "uint8", ..., "uint64"


_D18 = CLICKHOUSE_DECIMAL
_BPS = "Decimal(38, 8)"
_TS = "DateTime64(9, 'UTC')"

FILL_COLUMNS: tuple[Column, ...] = (
    Column("fill_id", "String", "string"),
    Column("order_id", "Nullable(String)", "string"),
    Column("account", "LowCardinality(String)", "string"),
    Column("symbol", "LowCardinality(String)", "string"),
    Column("currency", "LowCardinality(String)", "string"),  # the instrument's (reference data)
    Column("venue", "LowCardinality(String)", "string"),
    Column("side", "LowCardinality(String)", "string"),
    Column("liquidity", "LowCardinality(String)", "string"),
    Column("ts", _TS, "ts"),
    Column("qty", _D18, "d18"),
    Column("price", _D18, "d18"),
    Column("fee", _D18, "d18"),
    Column("fee_currency", "LowCardinality(String)", "string"),  # the fill's, else the instrument's
    Column("notional", _D18, "d18"),
    Column("arrival_ts", f"Nullable({_TS})", "ts"),
    Column("arrival_mid", f"Nullable({_D18})", "d18"),
    Column("arrival_notional", f"Nullable({_D18})", "d18"),
    Column("slippage_bps", f"Nullable({_BPS})", "bps"),
    Column("slippage_cost", f"Nullable({_D18})", "d18"),
    Column("mid_at_fill", f"Nullable({_D18})", "d18"),
    Column("effective_spread_bps", f"Nullable({_BPS})", "bps"),
    Column("mid_1s", f"Nullable({_D18})", "d18"),
    Column("mid_5s", f"Nullable({_D18})", "d18"),
    Column("mid_60s", f"Nullable({_D18})", "d18"),
    Column("markout_1s_bps", f"Nullable({_BPS})", "bps"),
    Column("markout_5s_bps", f"Nullable({_BPS})", "bps"),
    Column("markout_60s_bps", f"Nullable({_BPS})", "bps"),
    Column("complete", "UInt8", "uint8"),
    Column("amendments", "UInt16", "uint16"),  # CORRECTs and BUSTs applied
    Column("busted", "UInt8", "uint8"),  # 1: removed by a BUST (readers leave it out)
    Column("progress", "UInt8", "uint8"),  # FillState.resolved: which values are decided
    Column("version", "UInt64", "uint64"),
)

ORDER_COLUMNS: tuple[Column, ...] = (
    Column("order_id", "String", "string"),
    Column("account", "LowCardinality(String)", "string"),
    Column("symbol", "LowCardinality(String)", "string"),
    Column("currency", "LowCardinality(String)", "string"),  # the instrument's: every money column's
    Column("venue", "LowCardinality(String)", "string"),
    Column("side", "LowCardinality(String)", "string"),
    Column("order_type", "LowCardinality(String)", "string"),
    Column("limit_price", f"Nullable({_D18})", "d18"),
    Column("status", "LowCardinality(String)", "string"),
    Column("qty", _D18, "d18"),
    Column("arrival_ts", _TS, "ts"),
    Column("end_ts", f"Nullable({_TS})", "ts"),
    Column("arrival_mid", f"Nullable({_D18})", "d18"),
    Column("fills", "UInt32", "uint32"),
    Column("filled_qty", _D18, "d18"),
    Column("unfilled_qty", _D18, "d18"),
    Column("fill_ratio", _D18, "d18"),
    Column("filled_notional", _D18, "d18"),
    Column("fees", _D18, "d18"),  # in `currency`
    Column("fees_other", f"Map(String, {_D18})", "d18_map"),  # fees charged in other currencies
    Column("avg_fill_price", f"Nullable({_D18})", "d18"),
    Column("first_fill_ts", f"Nullable({_TS})", "ts"),
    Column("last_fill_ts", f"Nullable({_TS})", "ts"),
    Column("time_to_first_fill_ns", "Nullable(Int64)", "int64"),
    Column("time_to_last_fill_ns", "Nullable(Int64)", "int64"),
    Column("market_vwap", f"Nullable({_D18})", "d18"),
    Column("market_volume", f"Nullable({_D18})", "d18"),
    Column("vwap_slippage_bps", f"Nullable({_BPS})", "bps"),
    Column("unfilled_price", f"Nullable({_D18})", "d18"),
    Column("unfilled_price_ts", f"Nullable({_TS})", "ts"),
    Column("benchmark_notional", f"Nullable({_D18})", "d18"),
    Column("execution_cost", f"Nullable({_D18})", "d18"),
    Column("opportunity_cost", f"Nullable({_D18})", "d18"),
    Column("implementation_shortfall", f"Nullable({_D18})", "d18"),
    Column("implementation_shortfall_bps", f"Nullable({_BPS})", "bps"),
    Column("is_final", "UInt8", "uint8"),
    Column("amendments", "UInt16", "uint16"),  # CORRECTs and BUSTs that changed its fills
    Column("progress", "UInt8", "uint8"),  # OrderState.resolved: which values are decided
    Column("version", "UInt64", "uint64"),
)

# The ledger of fill_ids (first arrival wins, however late a resend comes): one row per
# message of the FILLS stream the first time it came, written with the rows it caused.
FILL_ID_COLUMNS: tuple[Column, ...] = (
    Column("fill_id", "String", "string"),
    Column("seq", "UInt64", "uint64"),  # FILLS stream sequence of its first arrival
    Column("exec_type", "LowCardinality(String)", "string"),
    Column("original_fill_id", "String", "string"),  # the execution it is, or amends
    Column("outcome", "LowCardinality(String)", "string"),  # APPLIED, OPENING, AMENDS_*, MISMATCH
    Column("version", "UInt64", "uint64"),
)


# The per-minute rollup of the fills the summary reads: (column, type, aggregate over
# the fills of one minute and one account / symbol / venue / side / currency). Sums and
# counts add up exactly across minutes; `slippage_values` keeps every slippage of the
# minute, so quantiles over any set of minutes are exact (`quantilesExactArray`). Money
# is in the row's `currency`, except `fees_other`: the fees charged in other currencies,
# by currency (never added to `fee`).
MINUTE_AGGREGATES: tuple[tuple[str, str, str], ...] = (
    ("fills", "UInt64", "count()"),
    ("qty", _D18, "sum(qty)"),
    ("notional", _D18, "sum(notional)"),
    ("fee", _D18, "sumIf(fee, fee_currency = currency)"),
    ("fees_other", f"Map(String, {_D18})", "sumMapIf(map(fee_currency, fee), fee_currency != currency)"),
    ("slippage_count", "UInt64", "count(slippage_bps)"),
    ("slippage_sum", _BPS, "ifNull(sum(slippage_bps), 0)"),
    ("slippage_values", f"Array({_BPS})", "groupArray(slippage_bps)"),  # NULLs are left out
    ("slippage_cost", _D18, "ifNull(sum(slippage_cost), 0)"),
    ("arrival_notional", _D18, "ifNull(sum(arrival_notional), 0)"),
    ("effective_spread_count", "UInt64", "count(effective_spread_bps)"),
    ("effective_spread_sum", _BPS, "ifNull(sum(effective_spread_bps), 0)"),
    ("markout_1s_count", "UInt64", "count(markout_1s_bps)"),
    ("markout_1s_sum", _BPS, "ifNull(sum(markout_1s_bps), 0)"),
    ("markout_5s_count", "UInt64", "count(markout_5s_bps)"),
    ("markout_5s_sum", _BPS, "ifNull(sum(markout_5s_bps), 0)"),
    ("markout_60s_count", "UInt64", "count(markout_60s_bps)"),
    ("markout_60s_sum", _BPS, "ifNull(sum(markout_60s_bps), 0)"),
)
# `currency` is a key: money of two currencies never shares a row (nothing adds them).
MINUTE_KEYS = ("account", "symbol", "venue", "side", "currency")

# The sorting key of each table (ClickHouse's spelling in system.tables): a table
# created by an older version with another key is migrated at start.
_SORTING_KEYS = {FILLS_TABLE: "ts, fill_id", ORDERS_TABLE: "arrival_ts, order_id",
                 MINUTES_TABLE: "minute, account, symbol, venue, side, currency", FILL_IDS_TABLE: "fill_id"}


def schema_sql(database: str) -> dict[str, str]:
    """CREATE TABLE statements of the four tables, by table name.

    Upserts keyed by id, the highest `version` wins (readers use FINAL). Fills and
    orders are sorted by their time (immutable per row) then id: inserts arrive in time
    order, so parts overlap only where rows were rewritten, and FINAL merges just those
    ranges instead of the whole table. Partitions are months of that time, so a row's
    versions always meet in one partition. The ledger is looked up by fill_id alone
    (a resend need not carry the original's time), so it is sorted by it."""

    def columns(cols: Iterable[tuple[str, str]]) -> str:
        return ",\n  ".join(f"{name} {kind}" for name, kind in cols)

    fills = ((c.name, c.clickhouse) for c in FILL_COLUMNS)
    orders = ((c.name, c.clickhouse) for c in ORDER_COLUMNS)
    minutes = (
        ("minute", "DateTime('UTC')"),
        *((key, "LowCardinality(String)") for key in MINUTE_KEYS),
        *((name, kind) for name, kind, _ in MINUTE_AGGREGATES),
        ("version", "UInt64"),
    )
    return {
        FILLS_TABLE: f"CREATE TABLE IF NOT EXISTS {database}.{FILLS_TABLE} (\n  {columns(fills)}\n) "
        f"ENGINE = ReplacingMergeTree(version) PARTITION BY toYYYYMM(ts) ORDER BY ({_SORTING_KEYS[FILLS_TABLE]})",
        ORDERS_TABLE: f"CREATE TABLE IF NOT EXISTS {database}.{ORDERS_TABLE} (\n  {columns(orders)}\n) "
        "ENGINE = ReplacingMergeTree(version) PARTITION BY toYYYYMM(arrival_ts) "
        f"ORDER BY ({_SORTING_KEYS[ORDERS_TABLE]})",
        MINUTES_TABLE: f"CREATE TABLE IF NOT EXISTS {database}.{MINUTES_TABLE} (\n  {columns(minutes)}\n) "
        "ENGINE = ReplacingMergeTree(version) PARTITION BY toYYYYMM(minute) "
        f"ORDER BY ({_SORTING_KEYS[MINUTES_TABLE]})",
        FILL_IDS_TABLE: f"CREATE TABLE IF NOT EXISTS {database}.{FILL_IDS_TABLE} (\n  "
        f"{columns((c.name, c.clickhouse) for c in FILL_ID_COLUMNS)}\n) "
        f"ENGINE = ReplacingMergeTree(version) ORDER BY {_SORTING_KEYS[FILL_IDS_TABLE]}",
    }


def _sql_string(value: str) -> str:
    """A ClickHouse string literal of `value` (symbols are free text)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def minute_ranges(minutes: Iterable[int]) -> list[tuple[int, int]]:
    """Minute starts (epoch ns) as sorted, merged `[start, end)` ranges."""
    ranges: list[tuple[int, int]] = []
    for start in sorted(set(minutes)):
        if ranges and ranges[-1][1] == start:
            ranges[-1] = (ranges[-1][0], start + MINUTE_NS)
        else:
            ranges.append((start, start + MINUTE_NS))
    return ranges


class ExecutionStore:
    """The service's ClickHouse tables: fills, orders, the per-minute rollup and the
    ledger of fill_ids.

    `refresh_minutes` recomputes the rollup rows of some minutes from the fills table
    (FINAL, so each fill counts once at its newest version; busted fills not at all)
    and writes them with a newer version: the rollup is always a function of the fills
    table, never a running total that a rewrite or a replay could double. The sink
    calls it for the minutes its fills inserts touched (at most once per interval).

    `reference` gives the currency of the rows an older version wrote without one (see
    `_add_missing_columns`)."""

    def __init__(self, clickhouse: ClickHouseStore, database: str, reference: Reference | None = None):
        self.clickhouse = clickhouse
        self.database = database
        self.reference = reference or Reference()

    @property
    def location(self) -> str:
        return self.clickhouse.location

    async def ping(self) -> bool:
        return await self.clickhouse.ping()

    async def close(self) -> None:
        await self.clickhouse.close()

    def table(self, name: str) -> str:
        return f"{self.database}.{name}"

    async def create_schema(self) -> None:
        """Create the database and tables if missing; migrate a table an older version
        created with another sorting key; fill a new rollup from the fills held."""
        ch = self.clickhouse
        try:
            await ch.command(f"CREATE DATABASE IF NOT EXISTS {self.database}")
        except ClickHouseError:
            # A server account without the right to create databases: fine if it exists.
            if not await ch.command(f"EXISTS DATABASE {self.database}"):
                raise
        existing = {
            name: key
            for name, key in (
                await ch.query(
                    "SELECT name, sorting_key FROM system.tables WHERE database = {db:String}", {"db": self.database}
                )
            ).rows
        }
        statements = schema_sql(self.database)
        for name, columns in ((FILLS_TABLE, FILL_COLUMNS), (ORDERS_TABLE, ORDER_COLUMNS)):
            if name in existing:
                await self._add_missing_columns(name, columns)
                if existing[name] != _SORTING_KEYS[name]:
                    await self._migrate(name, statements[name])
        for statement in statements.values():
            await ch.command(statement)
        if existing.get(MINUTES_TABLE, _SORTING_KEYS[MINUTES_TABLE]) != _SORTING_KEYS[MINUTES_TABLE]:
            # Other keys (before `currency`, say): the rollup is a function of the fills table.
            await self._rebuild_rollup(statements[MINUTES_TABLE])
        elif MINUTES_TABLE not in existing or existing.get(FILLS_TABLE) != _SORTING_KEYS[FILLS_TABLE]:
            await self._refresh(None, time.time_ns())  # the rollup of what the fills table already holds

    async def _add_missing_columns(self, name: str, columns: tuple[Column, ...]) -> None:
        """Add the columns a table created by an older version lacks (amendments, busted:
        0 for every row it has), each at its place in `columns`. The rows it has read
        `currency` as the reference data gives their symbol now, at the upgrade (the
        expression is the column's DEFAULT, fixed then), `fee_currency` as that currency
        (the older version did not record a fill's), `fees_other` empty."""
        defaults = {"currency": self._currency_of_symbol(), "fee_currency": "currency"}
        present = {
            column
            for (column,) in (
                await self.clickhouse.query(
                    "SELECT name FROM system.columns WHERE database = {db:String} AND table = {table:String}",
                    {"db": self.database, "table": name},
                )
            ).rows
        }
        for previous, column in zip(columns, columns[1:]):
            if column.name not in present:
                default = f" DEFAULT {defaults[column.name]}" if column.name in defaults else ""
                await self.clickhouse.command(
                    f"ALTER TABLE {self.table(name)} ADD COLUMN IF NOT EXISTS {column.name} {column.clickhouse}"
                    f"{default} AFTER {previous.name}"
                )

    def _currency_of_symbol(self) -> str:
        """SQL: the reference data's currency of the row's `symbol`."""
        reference = self.reference
        default = reference.default_base_currency
        named = {s: c for s in reference.instruments if (c := reference.currency(s)) != default}
        if not named:
            return _sql_string(default)
        symbols = ", ".join(map(_sql_string, named))
        currencies = ", ".join(map(_sql_string, named.values()))
        return f"transform(symbol, [{symbols}], [{currencies}], {_sql_string(default)})"

    async def _rebuild_rollup(self, create: str) -> None:
        """Recompute the whole rollup from the fills table into the current layout and
        swap it in (a crash before the swap leaves the old one, rebuilt at the next start)."""
        ch, target = self.clickhouse, self.table(MINUTES_TABLE)
        fresh = f"{MINUTES_TABLE}__rebuilding"
        log.warning("rebuilding %s with ORDER BY (%s) from %s", target, _SORTING_KEYS[MINUTES_TABLE], FILLS_TABLE)
        await ch.command(f"DROP TABLE IF EXISTS {self.table(fresh)}")
        await ch.command(f"DROP TABLE IF EXISTS {target}__old")
        await ch.command(create.replace(f"{target} (", f"{self.table(fresh)} (", 1))
        await self._refresh(None, time.time_ns(), into=fresh)
        await ch.command(f"RENAME TABLE {target} TO {target}__old, {self.table(fresh)} TO {target}")
        await ch.command(f"DROP TABLE {target}__old")

    async def _migrate(self, name: str, create: str) -> None:
        """Copy a table into the current layout, marking settled rows' versions."""
        ch, target, fresh = self.clickhouse, self.table(name), self.table(f"{name}__migrating")
        settled, everything = ("complete", FILL_ALL) if name == FILLS_TABLE else ("is_final", ORDER_ALL)
        columns = [c.name for c in (FILL_COLUMNS if name == FILLS_TABLE else ORDER_COLUMNS)]
        log.warning("migrating %s to ORDER BY (%s)", target, _SORTING_KEYS[name])
        await ch.command(f"DROP TABLE IF EXISTS {fresh}")
        await ch.command(create.replace(f"{target} (", f"{fresh} (", 1))
        # The old layout had no progress column: a settled row has decided everything.
        select = ", ".join(columns[:-2]) + (
            f", if({settled} = 1, {everything}, 0), if({settled} = 1, bitOr(version, {SETTLED}), version)"
        )
        await ch.command(f"INSERT INTO {fresh} ({', '.join(columns)}) SELECT {select} FROM {target}")
        await ch.command(f"RENAME TABLE {target} TO {target}__old, {fresh} TO {target}")
        await ch.command(f"DROP TABLE {target}__old")

    async def insert(self, name: str, data: Any) -> int:
        """One Arrow insert into `name` (FILLS_TABLE, ORDERS_TABLE or FILL_IDS_TABLE)."""
        return await self.clickhouse.insert_arrow(self.table(name), data)

    async def seen_fills(self, fill_ids: Iterable[str]) -> dict[str, SeenFill]:
        """The ledger's entries of these fill_ids (the first arrival of each)."""
        result = await self.clickhouse.query(
            "SELECT fill_id, min(seq), argMin(exec_type, seq), argMin(original_fill_id, seq), argMin(outcome, seq) "
            f"FROM {self.table(FILL_IDS_TABLE)} WHERE fill_id IN {{ids:Array(String)}} GROUP BY fill_id",
            {"ids": list(fill_ids)},
        )
        return {
            fill_id: SeenFill(seq=seq, exec_type=exec_type, original_fill_id=original, outcome=outcome)
            for fill_id, seq, exec_type, original, outcome in result.rows
        }

    async def stored_progress(
        self, fills: dict[str, int], orders: dict[str, int]
    ) -> tuple[dict[str, Progress], dict[str, Progress]]:
        """How far along the stored rows of these fills and orders (id -> time) are."""

        async def read(table: str, id_column: str, time_column: str, ids: dict[str, int], extra: str):
            if not ids:
                return []
            result = await self.clickhouse.query(
                f"SELECT {id_column}, amendments, progress{extra} FROM {self.table(table)} FINAL "
                f"WHERE {time_column} >= fromUnixTimestamp64Nano({{first:Int64}}, 'UTC') "
                f"AND {time_column} <= fromUnixTimestamp64Nano({{last:Int64}}, 'UTC') "
                f"AND {id_column} IN {{ids:Array(String)}}",
                {"first": min(ids.values()), "last": max(ids.values()), "ids": list(ids)},
            )
            return result.rows

        stored_fills = {
            key: (revision, progress, 0, False)
            for key, revision, progress in await read(FILLS_TABLE, "fill_id", "ts", fills, "")
        }
        stored_orders = {
            key: (revision, progress, joined, bool(ended))
            for key, revision, progress, joined, ended in await read(
                ORDERS_TABLE, "order_id", "arrival_ts", orders, ", fills, end_ts IS NOT NULL"
            )
        }
        return stored_fills, stored_orders

    async def refresh_minutes(self, minutes: Iterable[int], version: int) -> None:
        """Recompute the rollup rows of these minutes (epoch-ns starts)."""
        ranges = minute_ranges(minutes)
        if ranges:
            await self._refresh(ranges, version)

    async def _refresh(self, ranges: list[tuple[int, int]] | None, version: int, into: str = MINUTES_TABLE) -> None:
        """Recompute the rollup rows of these minutes (None: all) in the rollup table
        `into`. A group whose fills all left it (busted, or corrected to another side or
        venue) gets a row of zeros: recomputing only the groups that still have fills
        would leave its old row."""

        def within(column: str) -> str:
            if ranges is None:
                return ""
            # Integers computed here, not user input: inlined, and the primary key (time
            # first) narrows the read to these minutes.
            return " AND (" + " OR ".join(
                f"({column} >= fromUnixTimestamp64Nano(toInt64({start}), 'UTC') "
                f"AND {column} < fromUnixTimestamp64Nano(toInt64({end}), 'UTC'))"
                for start, end in ranges
            ) + ")"

        names = ", ".join(name for name, _, _ in MINUTE_AGGREGATES)
        aggregates = ", ".join(expr for _, _, expr in MINUTE_AGGREGATES)
        empty = {"Array": "[]", "Map(": "map()"}
        zeros = ", ".join(
            f"CAST({next((v for k, v in empty.items() if kind.startswith(k)), 0)} AS {kind})"
            for _, kind, _ in MINUTE_AGGREGATES
        )
        keys = ", ".join(MINUTE_KEYS)
        fills = f"{self.table(FILLS_TABLE)} FINAL WHERE busted = 0{within('ts')}"
        await self.clickhouse.command(
            f"INSERT INTO {self.table(into)} (minute, {keys}, {names}, version) "
            f"SELECT toStartOfMinute(ts) AS minute, {keys}, {aggregates}, toUInt64({int(version)}) "
            f"FROM {fills} GROUP BY minute, {keys} "
            f"UNION ALL SELECT minute, {keys}, {zeros}, toUInt64({int(version)}) "
            f"FROM {self.table(into)} FINAL WHERE fills > 0{within('minute')} "
            f"AND (minute, {keys}) NOT IN (SELECT toStartOfMinute(ts), {keys} FROM {fills})"
        )


async def open_execution_store(database: str, reference: Reference | None = None, **options: Any) -> ExecutionStore:
    """Open ClickHouse (`open_clickhouse(**options)`, off the event loop: chdb starts its
    engine) and create or migrate the tables; the connection is closed again when that
    fails."""
    clickhouse = await asyncio.to_thread(open_clickhouse, **options)
    try:
        store = ExecutionStore(clickhouse, database, reference)
        await store.create_schema()
    except BaseException:
        await clickhouse.close()
        raise
    return store


# -- rows ------------------------------------------------------------------------------


def fill_row(tracker: ExecutionTracker, state: FillState, clock: int) -> tuple:
    """The ClickHouse row of a fill (FILL_COLUMNS order), its currency the tracker's
    reference data's; `clock` is the write's version clock (see `row_version`: a busted fill's row is settled, nothing more
    can change it)."""
    f = state.fill
    qty, price, side = f.qty, f.price, f.side
    arrival_mid = state.arrival_mid
    slippage = cost = arrival_notional = None
    if arrival_mid is not None:
        slippage = tca.slippage_bps(side, price, arrival_mid)
        cost = tca.slippage_cost(side, qty, price, arrival_mid)
        arrival_notional = EXACT.multiply(qty, arrival_mid)
    mid = state.mid_at_fill
    spread = tca.effective_spread_bps(price, mid) if mid is not None else None
    m1, m5, m60 = state.markout_mids
    complete = state.complete
    currency = tracker.reference.currency(f.symbol)
    return (
        f.fill_id,
        f.order_id,
        f.account,
        f.symbol,
        currency,
        f.venue or "",
        side,
        f.liquidity or "",
        f.ts,
        qty,
        price,
        f.fee,
        f.fee_currency or currency,
        EXACT.multiply(qty, price),
        state.arrival_ts,
        arrival_mid,
        arrival_notional,
        slippage,
        cost,
        mid,
        spread,
        m1,
        m5,
        m60,
        tca.markout_bps(side, price, m1) if m1 is not None else None,
        tca.markout_bps(side, price, m5) if m5 is not None else None,
        tca.markout_bps(side, price, m60) if m60 is not None else None,
        1 if complete else 0,
        state.revision,
        1 if state.busted else 0,
        state.resolved,
        row_version(clock, state.revision, complete or state.busted),
    )


def order_row(tracker: ExecutionTracker, state: OrderState, clock: int) -> tuple | None:
    """The ClickHouse row of an order (ORDER_COLUMNS order), None before its NEW
    event is known; an open order's unfilled part is valued at the tracker's latest mid; settled (`is_final`) rows carry the SETTLED bit in `version`."""
    if not state.known:
        return None  # orders are reported from their NEW event on
    symbol = state.symbol
    if state.end_ts is not None:
        unfilled_price = state.end_mid
        unfilled_price_ts = state.end_ts if unfilled_price is not None else None
        window_end = state.end_tape if state.resolved & ORDER_END_TAPE else None
    else:
        # An open order's unfilled part is valued at the latest mid (evaluation time).
        latest = tracker.quotes.latest(symbol)
        unfilled_price, unfilled_price_ts = (latest[1], latest[0]) if latest else (None, None)
        window_end = tracker.trades.current(symbol)
    window_start = state.arrival_tape if state.resolved & ORDER_ARRIVAL_TAPE else None
    market_vwap, market_volume = tca.market_vwap(window_start, window_end)
    metrics = tca.order_metrics(
        tca.OrderInputs(
            side=state.side,
            order_qty=state.qty,
            filled_qty=state.filled_qty,
            filled_notional=state.filled_notional,
            fees=state.fees,
            arrival_ts=state.arrival_ts,
            arrival_mid=state.arrival_mid,
            first_fill_ts=state.first_fill_ts,
            last_fill_ts=state.last_fill_ts,
            unfilled_price=unfilled_price,
            market_vwap=market_vwap,
        )
    )
    final = state.final
    return (
        state.order_id,
        state.account,
        symbol,
        tracker.reference.currency(symbol),
        state.venue or "",
        state.side,
        state.order_type or "",
        state.limit_price,
        state.status or "",
        state.qty,
        state.arrival_ts,
        state.end_ts,
        state.arrival_mid,
        len(state.fill_ids),
        state.filled_qty,
        metrics.unfilled_qty,
        metrics.fill_ratio,
        state.filled_notional,
        state.fees,
        state.fees_other,
        metrics.avg_fill_price,
        state.first_fill_ts,
        state.last_fill_ts,
        metrics.time_to_first_fill_ns,
        metrics.time_to_last_fill_ns,
        market_vwap,
        market_volume,
        metrics.vwap_slippage_bps,
        unfilled_price,
        unfilled_price_ts,
        metrics.benchmark_notional,
        metrics.execution_cost,
        metrics.opportunity_cost,
        metrics.implementation_shortfall,
        metrics.implementation_shortfall_bps,
        1 if final else 0,
        state.revision,
        state.resolved,
        row_version(clock, state.revision, final),
    )


def arrow_table(columns: tuple[Column, ...], rows: list[tuple]):
    """Rows (tuples in column order) as a pyarrow Table for one batched insert.

    Raises (pyarrow.ArrowInvalid) when a value does not fit its column exactly; see
    `ExecutionSink.rows_to_arrow` for the forgiving version."""
    import pyarrow as pa

    types = {
        "string": pa.string(),
        "ts": pa.timestamp("ns", tz="UTC"),
        "d18": pa.decimal128(38, STORE_PLACES),
        "d18_map": pa.map_(pa.string(), pa.decimal128(38, STORE_PLACES)),
        "bps": pa.decimal128(38, tca.BPS_PLACES),
        "int64": pa.int64(),
        "uint8": pa.uint8(),
        "uint16": pa.uint16(),
        "uint32": pa.uint32(),
        "uint64": pa.uint64(),
    }
    values = list(zip(*rows)) if rows else [()] * len(columns)
    return pa.table({c.name: pa.array(values[i], type=types[c.arrow]) for i, c in enumerate(columns)})


# -- values that fit the Decimal(38, 18) columns -------------------------------------------


def unstorable_reason(event: Fill | Order) -> str | None:
    """Why a fill or order can never be written to the Decimal(38, 18) columns, if so."""
    if isinstance(event, Fill):
        if event.exec_type in ("OPENING", "BUST"):
            return None  # their numbers are never stored: an opening is not measured, a bust removes
        numbers = {"qty": event.qty, "price": event.price, "fee": event.fee}
    else:
        numbers = {"qty": event.qty, "limit_price": event.limit_price}
    for name, value in numbers.items():
        if value is None:
            continue
        if value.as_tuple().exponent < -STORE_PLACES:
            return f"{name} {value} has more than {STORE_PLACES} decimal places"
        if EXACT.abs(value) >= _STORE_LIMIT:
            return f"{name} {value} is too large to store (limit 1e20)"
    return None


def _stored(value: Decimal | None) -> Decimal | None:
    """A value as the Decimal(38, 18) columns hold it: rounded half to even at 18 places
    only if it has more (products of two finely quoted numbers), never silently clipped."""
    if value is None:
        return None
    if value.as_tuple().exponent < -STORE_PLACES:
        value = value.quantize(_STORE_QUANTUM, context=EXACT)
    if EXACT.abs(value) >= _STORE_LIMIT:
        raise ValueError(f"{value} does not fit Decimal(38, 18)")
    return value


def storable_row(columns: tuple[Column, ...], row: tuple) -> tuple:
    """`row` with every Decimal(38, 18) value made to fit (see `_stored`); raises
    ValueError for a value that cannot."""
    return tuple(
        _stored(v) if c.arrow == "d18" else tuple((k, _stored(x)) for k, x in v) if c.arrow == "d18_map" else v
        for c, v in zip(columns, row)
    )
