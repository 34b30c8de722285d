"""ptrc's storage agents: position updates → QuestDB, compliance alerts → ClickHouse.

They consume ptrc's own output streams (POSITIONS, ALERTS) with their own durable
consumers, so a database that is down delays storage but never the positions: the
position agent keeps going, JetStream holds the updates, and these agents catch up
when the database is back. Writes are idempotent: QuestDB tables deduplicate on
(ts, fill_id) / (ts, account, symbol, reason), the ClickHouse table replaces by alert_id.

A position snapshot carries its money in the instrument's currency and in the account's
base currency (`SnapshotRecord`). The rates are the ones the update itself carries —
a roll's are the rates of the roll's moment, which ptrc put in it — else the rates
that hold at any time (the same currency, a fixed rate): never the rates of the moment
the row happens to be written, so a snapshot stored late, or again, is the same row.
The past day's reports read the roll's rows (`posttrade.core.reports`, "Currencies").
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from decimal import Decimal

import msgspec

from ..app import App
from ..core.bounds import figure_fits
from ..core.exact import format_decimal
from ..core.reference import Reference
from ..core.reports import StoredRates, encode_amounts, encode_currencies
from ..core.valuation import value_position
from ..streams.stream import EventRecord, Stream
from ..stores.clickhouse import ClickHouseStore
from ..stores.questdb import QuestDBClient, QuestDBWriteError, QuestDBWriter
from ..streams.events import Fill, PositionUpdate
from .positions import PositionKeeper
from ..stores.questdb.sink import TS, BadRows, Column, TableLayout
from .retry import until_done

log = logging.getLogger(__name__)

TRADES_TABLE = "ptrc_trades"
SNAPSHOTS_TABLE = "position_snapshots"

# Column-wise, as questdb_writer builds its batches (row by row, the client serialises
# every value in Python, ~50 µs a row, in a thread sharing the GIL with the agents).
# The fill's own inputs are stored as they came (a value DECIMAL(38, 12) cannot hold is
# refused, not rounded); values ptrc derived (P&L, marks) are rounded half to even at 12
# places, like pnl's history.
class TradeRow(msgspec.Struct, frozen=True):
    """One row of the trade blotter (`ptrc_trades`): an execution in its final state, or
    an amendment message itself. `state`: `active` (in force as it arrived), `corrected`,
    `busted`, or `amendment` (a CORRECT or BUST row)."""

    ts: int
    fill_id: str
    account: str
    symbol: str
    side: str | None
    qty: Decimal | None
    price: Decimal | None
    fee: Decimal
    realized_pnl_fill: Decimal | None
    order_id: str | None
    venue: str | None
    net_qty_after: Decimal | None
    exec_type: str
    ref_fill_id: str | None
    state: str


def _row(
    source: Fill | PositionUpdate, state: str, realized: Decimal | None = None, net_qty_after: Decimal | None = None
) -> TradeRow:
    """A row of `source`: an execution or amendment (a Fill), or the message an update
    carries (the same field names)."""
    return TradeRow(
        source.ts, source.fill_id, source.account, source.symbol, source.side, source.qty, source.price,
        source.fee, realized, source.order_id, source.venue, net_qty_after, source.exec_type or "NEW",
        source.ref_fill_id, state,
    )  # type: ignore[arg-type]


def trade_rows(update: PositionUpdate) -> list[TradeRow]:
    """The blotter rows an update writes. A new execution is one row. A CORRECT or BUST
    is a row of its own, plus its execution's row in the final state, which lands on the
    execution's first row (same `ts` and `fill_id`: the table's dedup keys). Amendments
    that were waiting for the execution get rows of their own too."""
    if update.fill_id is None:
        return []  # a roll
    execution, state = update.execution, update.execution_state
    if update.exec_type in ("CORRECT", "BUST"):
        rows = [_row(update, "amendment", update.realized_pnl_fill, update.net_qty)]
        if execution is not None and state is not None:
            rows.append(_row(execution, state))
        return rows
    if execution is None or state is None:
        return [_row(update, "active", update.realized_pnl_fill, update.net_qty)]
    return [_row(execution, state, update.realized_pnl_fill, update.net_qty)] + [
        _row(amendment, "amendment") for amendment in update.released
    ]


TRADES = TableLayout(
    TradeRow,
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
)


class SnapshotRecord(msgspec.Struct, frozen=True):
    """One row of `position_snapshots`: the update's figures in the instrument's
    `currency`, and in the account's `base_currency` at `fx_rate` (the module doc says
    which rates). A base figure whose rate is unknown is NULL, and the currency is in
    `missing_rates`; a base figure DECIMAL(38, 12) cannot hold (26 integer digits or
    more) is NULL too, rather than the snapshot being refused."""

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
    currency: str
    base_currency: str
    fx_rate: str | None  # exact text: a cross rate has more places than DECIMAL(38, 12) keeps
    foreign_fees: str | None  # fees in other currencies, {"BNB":"0.02"}
    foreign_fee_rates: str | None  # their rates to the base, when known
    realized_pnl_gross_base: Decimal | None
    fees_base: Decimal | None
    realized_pnl_net_base: Decimal | None
    unrealized_pnl_base: Decimal | None
    total_pnl_base: Decimal | None
    day_pnl_base: Decimal | None
    missing_rates: str | None  # comma-separated currencies; NULL when none


def _fitting(value: Decimal | None) -> Decimal | None:
    return value if figure_fits(value) else None


def snapshot_record(update: PositionUpdate, reference: Reference | None = None) -> SnapshotRecord:
    """The snapshot row of `update`, valued at its own mark and at the rates it carries
    (`fx_rates` to `base_currency`, which ptrc sets on a roll), else at the rates that
    hold at any time under `reference` (default: everything in USD)."""
    reference = reference or Reference()
    rates = StoredRates(reference, update.base_currency, update.fx_rates)
    value = value_position(update, update.mark, rates)
    fee_rates = {}
    for currency in value.foreign_fees:
        rate = rates.rate(currency, value.base_currency)
        if rate is not None:
            fee_rates[currency] = rate.rate
    return SnapshotRecord(
        update.ts, update.account, update.symbol, update.reason, update.net_qty, update.avg_open_price,
        update.realized_pnl_gross, update.fees, update.realized_pnl_net, update.mark, update.unrealized_pnl,
        update.day_pnl, value.currency, value.base_currency,
        None if value.fx_rate is None else format_decimal(value.fx_rate),
        encode_amounts(value.foreign_fees), encode_amounts(fee_rates),
        _fitting(value.realized_pnl_gross_base), _fitting(value.fees_base), _fitting(value.realized_pnl_net_base),
        _fitting(value.unrealized_pnl_base), _fitting(value.total_pnl_base), _fitting(value.day_pnl_base),
        encode_currencies(value.missing_rates),
    )


@dataclass(frozen=True)
class SnapshotLayout(TableLayout):
    """`position_snapshots`: rows of `SnapshotRecord`s; a record holding a
    `PositionUpdate` is turned into one with the default reference data (the agent
    turns them with the service's)."""

    def build_columns(self, records):
        return super().build_columns(
            [r if isinstance(r.value, SnapshotRecord) else replace(r, value=snapshot_record(r.value)) for r in records]
        )


SNAPSHOTS = SnapshotLayout(
    SnapshotRecord,
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
    why="one snapshot per position per update time and cause",
)
LAYOUTS = {TRADES_TABLE: TRADES, SNAPSHOTS_TABLE: SNAPSHOTS}
ALERTS_TABLE = "compliance_alerts"
ALERTS_DDL = f"""
CREATE TABLE IF NOT EXISTS {ALERTS_TABLE} (
    alert_id String,
    ts DateTime64(9, 'UTC'),
    rule LowCardinality(String),
    severity LowCardinality(String),
    account String,
    symbol String,
    message String,
    observed String,
    `limit` String,
    fill_id String
) ENGINE = ReplacingMergeTree ORDER BY alert_id
"""
ALERT_COLUMNS = ["alert_id", "ts", "rule", "severity", "account", "symbol", "message", "observed", "limit", "fill_id"]


def _text(value: Decimal | None) -> str:
    return "" if value is None else format(value, "f")


class PtrcStorage:
    def __init__(
        self,
        app: App,
        keeper: PositionKeeper,
        *,
        questdb: QuestDBClient,
        writer: QuestDBWriter,
        clickhouse: ClickHouseStore,
        batch_size: int,
        interval_s: float,
        reference: Reference | None = None,
    ):
        self.app = app
        # The currencies of the snapshots (default: the keeper's reference data).
        self.reference = reference or keeper.reference
        self.questdb = questdb
        self.writer = writer
        self.clickhouse = clickhouse
        self.batch_size = batch_size
        self.interval_s = interval_s
        self.rows_written = {TRADES_TABLE: 0, SNAPSHOTS_TABLE: 0, ALERTS_TABLE: 0}
        self.retries = 0
        app.agent(keeper.position_updates, name="store_positions")(self._store_positions)
        app.agent(keeper.alerts, name="store_alerts")(self._store_alerts)
        app.on_startup.append(self._create_tables)

    async def _create_tables(self) -> None:
        async def create() -> None:
            for table, layout in LAYOUTS.items():
                await self.questdb.create_table(table, layout.table_columns, dedup_keys=("ts", *layout.dedup_keys))
            await self.clickhouse.command(ALERTS_DDL)

        await until_done(None, create, what="creating ptrc's tables")

    def _count_retry(self, exc: Exception) -> None:
        self.retries += 1

    async def _write(self, stream: Stream, table: str, records: list[EventRecord]) -> None:
        """Write the records' rows as one request; rows that can never be written are
        dead-lettered and the others still written."""
        if not records:
            return
        try:
            await self._send(stream, table, records)
        except (BadRows, QuestDBWriteError) as exc:
            # One bad row must not hold the others: write them one by one.
            log.warning("%s: a batch holds rows that cannot be written (%s); writing row by row", table, exc)
            for record in records:
                try:
                    await self._send(stream, table, [record])
                except BadRows as row_error:
                    await stream.dead_letter(record.delivery, f"{table} cannot hold the row: {row_error.reason}")
                except QuestDBWriteError as row_error:
                    await stream.dead_letter(record.delivery, f"{table} refused the row: {row_error}")

    async def _send(self, stream: Stream, table: str, records: list[EventRecord]) -> None:
        """One request, retried until QuestDB takes it; raises BadRows or a bad-data
        QuestDBWriteError when it never can."""
        layout = LAYOUTS[table]
        columns = layout.build_columns(records)
        await until_done(
            stream,
            lambda: self.writer.write_batch(table, columns, symbols=layout.symbols, at="ts"),
            what=f"writing {len(records)} rows to {table}",
            permanent=lambda exc: isinstance(exc, QuestDBWriteError) and exc.bad_data,
            on_retry=self._count_retry,
        )
        self.rows_written[table] += len(records)

    async def _store_positions(self, stream: Stream) -> None:
        async for records in stream.take_events(self.batch_size, within=self.interval_s):
            # A row keeps its update's record: a row that can never be written
            # dead-letters the update it came from.
            trades = [replace(r, value=row) for r in records for row in trade_rows(r.value)]
            await self._write(stream, TRADES_TABLE, trades)
            reference = self.reference
            snapshots = [replace(r, value=snapshot_record(r.value, reference)) for r in latest_per_position(records)]
            await self._write(stream, SNAPSHOTS_TABLE, snapshots)


    async def _store_alerts(self, stream: Stream) -> None:
        async for alerts in stream.take(self.batch_size, within=self.interval_s):
            rows = [
                [
                    a.alert_id,
                    a.ts,
                    a.rule,
                    a.severity,
                    a.account,
                    a.symbol or "",
                    a.message,
                    _text(a.observed),
                    _text(a.limit),
                    a.fill_id or "",
                ]
                for a in alerts
            ]
            await until_done(
                stream,
                lambda: self.clickhouse.insert(ALERTS_TABLE, rows, column_names=ALERT_COLUMNS),
                what=f"storing {len(rows)} alerts in ClickHouse",
                on_retry=self._count_retry,
            )
            self.rows_written[ALERTS_TABLE] += len(rows)


def latest_per_position(records: list[EventRecord]) -> list[EventRecord]:
    """A batch's snapshots: each position as the batch's last fill left it, and every
    roll (the start-of-day snapshot reports value the day from).

    Every fill's own result is in `ptrc_trades` (`net_qty_after`, `realized_pnl_fill`);
    a snapshot per fill would repeat it at a QuestDB row (and commit work) per fill. So
    the table holds each position at least every `batch.interval_sec` it changed.
    """
    last: dict[tuple[str, str], EventRecord] = {}
    rolls: list[EventRecord] = []
    for record in records:
        update = record.value
        if update.reason == "fill":
            last[(update.account, update.symbol)] = record
        else:
            rolls.append(record)
    return [*rolls, *last.values()] if rolls else list(last.values())
