"""How events become rows of QuestDB tables: columns, types and deduplication keys.

* A `TableLayout` per table: its columns (built column-wise from the events, without a
  dict per row), which are SYMBOLs, and the DEDUP UPSERT KEYS that make a redelivered
  or replayed message land on the row it already made instead of adding one. Every bus
  table also stores `stream_seq`, the JetStream sequence of the message the row came from.
* First arrival (fills): a layout may name a column whose first arrival is the one kept
  (`fill_id`, see `first_arrivals.py`).

Money and quantities go in as `DECIMAL(38, 12)`: exact. Every value an event can carry
fits (`posttrade.core.bounds`: at most 12 decimal places, below 1E+20; the decoder
refuses the rest, as every service does). A value that does not fit all the same is a row
that can never be written (`BadRows`) and is dead-lettered, never rounded, except the
`rounded_decimal` columns: derived figures (a bar's `vwap`, P&L) rounded half-even to 12
places.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal
from operator import attrgetter
from typing import TYPE_CHECKING, Any, Literal

import msgspec
import numpy as np
import pandas as pd

from ...core.bounds import QUESTDB_DECIMAL, QUESTDB_PRECISION, QUESTDB_SCALE
from ...core.exact import EXACT
from ...streams.events import Bar, Fill, MarketTrade, Order, PnlAccountRow, PnlPositionRow, PnlSnapshot, PositionUpdate, Quote
from . import decimal_column, rows

if TYPE_CHECKING:
    from ...core.reference import Reference
    from ...streams.stream import EventRecord

# The project's one exact column type (core.bounds): every value an event can carry fits
# it as it is, every figure ptrc keeps fits it rounded at 12 places.
DECIMAL_PRECISION = QUESTDB_PRECISION
DECIMAL_SCALE = QUESTDB_SCALE
DECIMAL_SQL = QUESTDB_DECIMAL
_DECIMAL_QUANTUM = Decimal(1).scaleb(-DECIMAL_SCALE)

ColumnKind = Literal["timestamp", "symbol", "varchar", "decimal", "rounded_decimal", "long", "stream_seq"]

_SQL_TYPES: dict[str, str] = {
    "timestamp": "TIMESTAMP_NS",  # QuestDB's TIMESTAMP keeps microseconds; events carry ns
    "symbol": "SYMBOL CAPACITY 4096",
    "varchar": "VARCHAR",
    "decimal": DECIMAL_SQL,
    "rounded_decimal": DECIMAL_SQL,
    "long": "LONG",
    "stream_seq": "LONG",
}


class BadRows(Exception):
    """Part of a batch can never be written; `reason` says why (split to find which)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Column:
    name: str
    kind: ColumnKind
    field: str | None = None  # attribute of the event; defaults to `name`

    @property
    def sql_type(self) -> str:
        return _SQL_TYPES[self.kind]


@dataclass(frozen=True)
class TableLayout:
    """How one event type becomes rows of a QuestDB table."""

    event_type: type
    columns: tuple[Column, ...]
    dedup_keys: tuple[str, ...]  # besides `ts`, which QuestDB requires and is always first
    why: str  # why these dedup keys (docs/questdb_writer.md explains the same)
    # A VARCHAR or SYMBOL column whose first arrival is kept: a later message with a value
    # the table already has is not written (see FirstArrivals). None: every message is a row.
    first_arrival: str | None = None
    # When the channel's events are not the rows themselves (a position update makes a
    # blotter row per execution it changed; a pnl snapshot holds hundreds of rows): turns
    # a batch of the channel's records into records of rows, each row keeping the message
    # it came from (to dead-letter it), given the service's reference data. None: an
    # event is a row.
    rows: Callable[[Sequence[EventRecord], Reference], list[EventRecord]] | None = None

    def __post_init__(self) -> None:
        names = [c.name for c in self.columns]
        if names[0] != "ts" or self.columns[0].kind != "timestamp":
            raise ValueError("the first column of a layout is the designated timestamp `ts`")
        missing = set(self.dedup_keys) - set(names)
        if missing:
            raise ValueError(f"dedup keys {sorted(missing)} are not columns")
        if self.first_arrival is not None and self.column(self.first_arrival).kind not in ("varchar", "symbol"):
            raise ValueError(f"first-arrival column {self.first_arrival} must be a VARCHAR or SYMBOL column")

    def column(self, name: str) -> Column:
        for column in self.columns:
            if column.name == name:
                return column
        raise ValueError(f"{name} is not a column")

    @property
    def table_columns(self) -> dict[str, str]:
        """name → QuestDB type, for `QuestDBClient.create_table`."""
        return {c.name: c.sql_type for c in self.columns}

    @property
    def timestamp_columns(self) -> tuple[str, ...]:
        """Timestamp columns besides the designated one (ILP sends them as timestamps)."""
        return tuple(c.name for c in self.columns[1:] if c.kind == "timestamp")

    @property
    def symbols(self) -> list[str]:
        return [c.name for c in self.columns if c.kind == "symbol"]

    def build_columns(self, records: Sequence[EventRecord]) -> dict[str, Any]:
        """The batch column-wise, ready for `QuestDBWriter.write_batch`.

        One pass per column over the events with C-level getters (no per-row dicts):
        this is what keeps the sink's own cost per row small. Raises BadRows when a
        value cannot be represented in its column.
        """
        n = len(records)
        values = [r.value for r in records]
        out: dict[str, Any] = {}
        for column in self.columns:
            kind = column.kind
            if kind == "stream_seq":
                out[column.name] = np.fromiter(map(_SEQ, records), dtype=np.int64, count=n)
                continue
            get = attrgetter(column.field or column.name)
            if kind in ("timestamp", "long"):
                try:
                    out[column.name] = np.fromiter(map(get, values), dtype=np.int64, count=n)
                except (OverflowError, TypeError, ValueError) as exc:
                    raise BadRows(f"column {column.name}: {exc}") from None
            elif kind in ("symbol", "varchar"):
                out[column.name] = pd.array(list(map(get, values)), dtype="string")  # NA for None on pandas 2 and 3
            else:  # decimal, rounded_decimal
                items = list(map(get, values))
                if kind == "rounded_decimal":
                    out[column.name] = _rounded_decimal_column(column.name, items)
                else:
                    out[column.name] = _decimal_column(column.name, items)
        return out


def _round_to_scale(value: Decimal) -> Decimal:
    # Under the exact context: the caller's (28 digits by default) cannot hold a value of
    # 20 integer digits at 12 places, and quantize would raise.
    return value.quantize(_DECIMAL_QUANTUM, rounding=ROUND_HALF_EVEN, context=EXACT)


def _decimal_column(name: str, items: list[Decimal | None]) -> Any:
    try:
        return decimal_column(items, DECIMAL_PRECISION, DECIMAL_SCALE)
    except ValueError as exc:
        raise BadRows(f"column {name}: {exc} (the column is {DECIMAL_SQL})") from None


def _rounded_decimal_column(name: str, items: list[Decimal | None]) -> Any:
    # Most values need no rounding (prices and P&L of a few decimals): the strict
    # conversion takes them as they are, and only a batch with a value of more than 12
    # places pays for rounding in Python.
    try:
        return decimal_column(items, DECIMAL_PRECISION, DECIMAL_SCALE)
    except ValueError:
        return _decimal_column(name, [None if v is None else _round_to_scale(v) for v in items])


def row_columns(row_type: type, **kinds: ColumnKind) -> tuple[Column, ...]:
    """`ts`, then a column per field of a row struct, under its name: `kinds` says what
    its type alone does not (a timestamp, a VARCHAR rather than a SYMBOL); other text is
    a SYMBOL, an int a LONG, a Decimal a derived figure rounded at 12 places."""
    columns = [TS]
    for field in msgspec.structs.fields(row_type):
        kind = kinds.get(field.name)
        if kind is None:
            kind = (
                "rounded_decimal" if field.type in (Decimal, Decimal | None)
                else "symbol" if field.type in (str, str | None)
                else "long"
            )  # fmt: skip
        columns.append(Column(field.name, kind))
    return tuple(columns)


_SEQ = attrgetter("seq")
TS = Column("ts", "timestamp")
SEQ = Column("stream_seq", "stream_seq")

# By layout name: what a questdb_writer route's `channel` names.
LAYOUTS: dict[str, TableLayout] = {
    "market_trades": TableLayout(
        MarketTrade,
        (
            TS,
            Column("symbol", "symbol"),
            Column("venue", "symbol"),
            Column("price", "decimal"),
            Column("size", "decimal"),
            Column("aggressor", "symbol"),
            Column("trade_id", "varchar"),
            SEQ,
        ),
        dedup_keys=("symbol", "stream_seq"),
        why="trade_id is optional and a sweep prints several trades at one timestamp, so the "
        "message's stream sequence identifies the row",
    ),
    "quotes": TableLayout(
        Quote,
        (
            TS,
            Column("symbol", "symbol"),
            Column("venue", "symbol"),
            Column("bid", "decimal"),
            Column("ask", "decimal"),
            Column("bid_size", "decimal"),
            Column("ask_size", "decimal"),
            SEQ,
        ),
        dedup_keys=("symbol", "stream_seq"),
        why="two quote updates can share a timestamp and quotes have no id, so the message's "
        "stream sequence identifies the row (every update is kept)",
    ),
    "bars": TableLayout(
        Bar,
        (
            TS,
            Column("symbol", "symbol"),
            Column("interval", "symbol"),
            Column("open", "decimal"),
            Column("high", "decimal"),
            Column("low", "decimal"),
            Column("close", "decimal"),
            Column("volume", "decimal"),
            Column("vwap", "rounded_decimal"),
            Column("count", "long"),
            SEQ,
        ),
        dedup_keys=("symbol", "interval"),
        why="a bar is identified by its open time, symbol and interval; a re-sent or corrected "
        "bar replaces the row",
    ),
    "fills": TableLayout(
        Fill,
        (
            TS,
            Column("fill_id", "varchar"),
            Column("account", "symbol"),
            Column("symbol", "symbol"),
            Column("side", "symbol"),
            Column("qty", "decimal"),
            Column("price", "decimal"),
            Column("fee", "decimal"),
            Column("order_id", "varchar"),
            Column("venue", "symbol"),
            Column("liquidity", "symbol"),
            Column("exec_type", "symbol"),
            Column("ref_fill_id", "varchar"),
            Column("fee_currency", "symbol"),
            SEQ,
        ),
        dedup_keys=("fill_id",),
        why="fill_id is unique across the feed and its first arrival is the row kept (a resend "
        "is never written, see first_arrival); the key makes a write repeated after a lost "
        "reply land on the rows it made",
        first_arrival="fill_id",
    ),
    "orders": TableLayout(
        Order,
        (
            TS,
            Column("order_id", "varchar"),
            Column("account", "symbol"),
            Column("symbol", "symbol"),
            Column("side", "symbol"),
            Column("qty", "decimal"),
            Column("order_type", "symbol"),
            Column("limit_price", "decimal"),
            Column("venue", "symbol"),
            Column("status", "symbol"),
            SEQ,
        ),
        dedup_keys=("order_id", "status"),
        why="an order's lifecycle event is identified by the order, its status and when it "
        "happened",
    ),
    # -- the services' own outputs (rows.py builds them from the events) --
    "ptrc_trades": TableLayout(
        PositionUpdate,
        (
            TS,
            Column("fill_id", "varchar"),
            Column("account", "symbol"),
            Column("symbol", "symbol"),
            Column("side", "symbol"),
            Column("qty", "decimal"),
            Column("price", "decimal"),
            Column("fee", "decimal"),
            Column("realized_pnl_fill", "rounded_decimal"),
            Column("order_id", "varchar"),
            Column("venue", "symbol"),
            Column("net_qty_after", "decimal"),
            Column("exec_type", "symbol"),
            Column("ref_fill_id", "varchar"),
            Column("state", "symbol"),
        ),
        dedup_keys=("fill_id",),
        why="an execution is one row however often its update is redelivered; an amendment rewrites it in place",
        rows=rows.blotter_rows,
    ),
    "position_snapshots": TableLayout(
        PositionUpdate,
        (
            TS,
            Column("account", "symbol"),
            Column("symbol", "symbol"),
            Column("reason", "symbol"),
            Column("net_qty", "decimal"),
            Column("avg_open_price", "rounded_decimal"),
            Column("realized_pnl_gross", "rounded_decimal"),
            Column("fees", "decimal"),
            Column("realized_pnl_net", "rounded_decimal"),
            Column("mark", "rounded_decimal"),
            Column("unrealized_pnl", "rounded_decimal"),
            Column("day_pnl", "rounded_decimal"),
            Column("currency", "symbol"),
            Column("base_currency", "symbol"),
            Column("fx_rate", "varchar"),
            Column("foreign_fees", "varchar"),
            Column("foreign_fee_rates", "varchar"),
            Column("realized_pnl_gross_base", "rounded_decimal"),
            Column("fees_base", "rounded_decimal"),
            Column("realized_pnl_net_base", "rounded_decimal"),
            Column("unrealized_pnl_base", "rounded_decimal"),
            Column("total_pnl_base", "rounded_decimal"),
            Column("day_pnl_base", "rounded_decimal"),
            Column("missing_rates", "varchar"),
        ),
        dedup_keys=("account", "symbol", "reason"),
        why="one snapshot per position per update time and cause: each position as a batch left it, and every roll",
        rows=rows.position_snapshot_rows,
    ),
    "pnl_snapshots": TableLayout(
        PnlSnapshot,
        row_columns(PnlPositionRow, as_of="timestamp", fx_rate="varchar"),
        dedup_keys=("account", "symbol"),
        why="one row per position per snapshot (ts is the snapshot's time); a snapshot published or "
        "written again lands on its rows",
        rows=rows.pnl_position_rows,
    ),
    "pnl_account_snapshots": TableLayout(
        PnlSnapshot,
        row_columns(PnlAccountRow, as_of="timestamp", missing_rates="varchar"),
        dedup_keys=("account",),
        why="one row per account per snapshot",
        rows=rows.pnl_account_rows,
    ),
}
