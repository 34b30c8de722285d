"""pnl's history in QuestDB: how its money fits the tables, and what `/pnl/history` reads.

questdb_writer stores pnl's snapshots (`PnlSnapshot` on the PNL stream) in two tables:
`pnl_snapshots`, one row per (snapshot, account, symbol), and `pnl_account_snapshots`,
one per (snapshot, account) (`layouts.py` has their columns; docs/pnl.md too). pnl
rounds its money for them before it publishes (`snapshot_decimal`) and reads them back
here, bucketed by `SAMPLE BY`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from typing import Any

from ...core.bars import NS_PER_S
from ...core.bounds import QUESTDB_DECIMAL, QUESTDB_PRECISION, QUESTDB_SCALE
from ...core.exact import EXACT, format_decimal
from . import QuestDBClient, QuestDBError, sql_literal

DECIMAL_SQL = QUESTDB_DECIMAL  # core.bounds: every figure ptrc keeps fits it
_QUANTUM = Decimal(1).scaleb(-QUESTDB_SCALE)
_MAX_ADJUSTED = QUESTDB_PRECISION - QUESTDB_SCALE - 1  # 26 integer digits: adjusted exponent <= 25
_ZERO, _ONE = Decimal(0), Decimal(1)


class Unfit(ValueError):
    """A value DECIMAL(38, 12) cannot hold (26 integer digits or more)."""


def snapshot_decimal(value: Decimal | None) -> Decimal | None:
    """A value as DECIMAL(38, 12) stores it: rounded half to even at 12 places when it
    has more (history only; /pnl/realtime and Valkey keep every digit), without trailing
    zeros (a snapshot message spells it as short as it can). Raises Unfit for a value of
    26 integer digits or more."""
    if value is None:
        return None
    value = value.quantize(_QUANTUM, ROUND_HALF_EVEN, EXACT)
    if not value:
        return _ZERO  # and never a negative zero
    if value.adjusted() > _MAX_ADJUSTED:
        raise Unfit(f"{value} does not fit {DECIMAL_SQL}")
    short = value.normalize(EXACT)
    return short if short.as_tuple().exponent <= 0 else short.quantize(_ONE, context=EXACT)


# -- /pnl/history ------------------------------------------------------------------------


def iso(ns: int) -> str:
    """Epoch ns as QuestDB's timestamp literal (microseconds, UTC)."""
    seconds, rest = divmod(ns, NS_PER_S)
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.") + f"{rest // 1000:06d}Z"


@dataclass(frozen=True)
class HistoryQuery:
    account: str | None
    symbol: str | None
    start: int  # epoch ns, inclusive
    end: int  # epoch ns, exclusive
    interval: str

    @property
    def account_level(self) -> bool:
        """Without a symbol the series are account totals; with one, positions."""
        return self.symbol is None


@dataclass(frozen=True)
class HistoryTables:
    positions: str = "pnl_snapshots"
    accounts: str = "pnl_account_snapshots"


#: The figures a history point has. A position's are in its currency, with the two
#: headline figures also in the base; an account's are all in its base currency.
POSITION_HISTORY = (
    "net_qty", "mark", "realized_pnl_net", "unrealized_pnl", "fifo_unrealized_pnl", "total_pnl", "day_pnl",
    "currency", "base_currency", "total_pnl_base", "day_pnl_base",
)
ACCOUNT_HISTORY = (
    "base_currency", "realized_pnl_net", "unrealized_pnl", "fifo_unrealized_pnl", "total_pnl", "day_pnl",
    "gross_notional",
)


def history_sql(query: HistoryQuery, tables: HistoryTables, limit: int) -> str:
    """SAMPLE BY the interval: per bucket and key, each value's last one (P&L is a
    level: the bucket's closing value), the total's low and high, the newest as_of."""
    fields = ACCOUNT_HISTORY if query.account_level else POSITION_HISTORY
    table = tables.accounts if query.account_level else tables.positions
    keys = "account" if query.account_level else "account, symbol"
    select = ", ".join(
        [f"ts, {keys}"]
        + [f"last({name}) {name}" for name in fields]
        + ["min(total_pnl) total_pnl_low", "max(total_pnl) total_pnl_high", "last(as_of) as_of", "count() snapshots"]
    )
    where = [f"ts >= {sql_literal(iso(query.start))}", f"ts < {sql_literal(iso(query.end))}"]
    if query.account is not None:
        where.append(f"account = {sql_literal(query.account)}")
    if query.symbol is not None:
        where.append(f"symbol = {sql_literal(query.symbol)}")
    return (
        f"SELECT {select} FROM {table} WHERE {' AND '.join(where)} "
        f"SAMPLE BY {query.interval} ALIGN TO CALENDAR LIMIT {int(limit)}"
    )


def _history_value(value: Any) -> Any:
    if isinstance(value, str) and value and (value[0].isdigit() or value[0] == "-"):
        try:
            return format_decimal(Decimal(value))
        except InvalidOperation:
            return value
    return value


async def read_history(client: QuestDBClient, query: HistoryQuery, tables: HistoryTables, max_rows: int) -> dict[str, Any]:
    """The series of `query`, at most `max_rows` rows (`truncated` says when there were
    more). Raises `QuestDBUnavailableError` when QuestDB does not answer."""
    sql = history_sql(query, tables, max_rows + 1)
    try:
        result = await client.query(sql)
    except QuestDBError as exc:
        if "does not exist" not in exc.message:
            raise
        result = None  # nothing stored yet
    rows = result.dicts() if result is not None else []
    truncated = len(rows) > max_rows
    del rows[max_rows:]
    numbers = ACCOUNT_HISTORY if query.account_level else POSITION_HISTORY
    series: dict[tuple, dict[str, Any]] = {}
    for row in rows:
        key = (row["account"],) if query.account_level else (row["account"], row["symbol"])
        entry = series.get(key)
        if entry is None:
            entry = series[key] = {"account": row["account"], "points": []}
            if not query.account_level:
                entry["symbol"] = row["symbol"]
        point = {"ts": row["ts"], "as_of": row["as_of"], "snapshots": row["snapshots"]}
        for name in (*numbers, "total_pnl_low", "total_pnl_high"):
            point[name] = _history_value(row[name])
        entry["points"].append(point)
    for entry in series.values():
        entry["points"].sort(key=lambda p: p["ts"])
    return {
        "level": "account" if query.account_level else "position",
        "account": query.account,
        "symbol": query.symbol,
        "from": iso(query.start),
        "to": iso(query.end),
        "interval": query.interval,
        "series": [series[k] for k in sorted(series)],
        "truncated": truncated,
    }
