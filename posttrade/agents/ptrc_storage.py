"""ptrc's storage agents: position updates → QuestDB, compliance alerts → ClickHouse.

They consume ptrc's own output streams (POSITIONS, ALERTS) with their own durable
consumers, so a database that is down delays storage but never the positions: the
position agent keeps going, JetStream holds the updates, and these agents catch up
when the database is back. Writes are idempotent: QuestDB tables deduplicate on
(ts, fill_id) / (ts, account, symbol, reason), the ClickHouse table replaces by alert_id.
"""

from __future__ import annotations

import logging
from decimal import Decimal

from ..app import App
from ..streams.stream import EventRecord, Stream
from ..stores.clickhouse import ClickHouseStore
from ..stores.questdb import QuestDBClient, QuestDBWriteError, QuestDBWriter
from .positions import PositionKeeper
from .retry import until_done

log = logging.getLogger(__name__)

D = "DECIMAL(38, 12)"  # exact: quantities, prices and money keep up to 12 decimals

TRADES_TABLE = "ptrc_trades"
TRADES_COLUMNS = {
    "ts": "TIMESTAMP_NS",
    "fill_id": "VARCHAR",
    "account": "SYMBOL",
    "symbol": "SYMBOL",
    "side": "SYMBOL",
    "qty": D,
    "price": D,
    "fee": D,
    "realized_pnl_fill": D,
    "order_id": "VARCHAR",
    "venue": "SYMBOL",
    "net_qty_after": D,
}
SNAPSHOTS_TABLE = "position_snapshots"
SNAPSHOT_COLUMNS = {
    "ts": "TIMESTAMP_NS",
    "account": "SYMBOL",
    "symbol": "SYMBOL",
    "reason": "SYMBOL",
    "net_qty": D,
    "avg_open_price": D,
    "realized_pnl_gross": D,
    "fees": D,
    "realized_pnl_net": D,
    "mark": D,
    "unrealized_pnl": D,
    "day_pnl": D,
}
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
    ):
        self.app = app
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
            await self.questdb.create_table(TRADES_TABLE, TRADES_COLUMNS, dedup_keys=("ts", "fill_id"))
            await self.questdb.create_table(
                SNAPSHOTS_TABLE, SNAPSHOT_COLUMNS, dedup_keys=("ts", "account", "symbol", "reason")
            )
            await self.clickhouse.command(ALERTS_DDL)

        await until_done(None, create, what="creating ptrc's tables")

    def _count_retry(self, exc: Exception) -> None:
        self.retries += 1

    async def _write(self, stream: Stream, table: str, records: list[EventRecord], rows: list[dict]) -> None:
        """Write rows as one request; rows QuestDB refuses as bad data are dead-lettered."""
        if not rows:
            return
        try:
            await until_done(
                stream,
                lambda: self.writer.write_batch(table, rows, symbols=_symbols(table), at="ts"),
                what=f"writing {len(rows)} rows to {table}",
                permanent=lambda exc: isinstance(exc, QuestDBWriteError) and exc.bad_data,
                on_retry=self._count_retry,
            )
            self.rows_written[table] += len(rows)
        except QuestDBWriteError as exc:
            # One bad row must not hold the others: write them one by one.
            log.warning("%s refused a batch as bad data (%s); writing row by row", table, exc)
            for record, row in zip(records, rows):
                try:
                    await until_done(
                        stream,
                        lambda row=row: self.writer.write_batch(table, [row], symbols=_symbols(table), at="ts"),
                        what=f"writing one row to {table}",
                        permanent=lambda e: isinstance(e, QuestDBWriteError) and e.bad_data,
                        on_retry=self._count_retry,
                    )
                    self.rows_written[table] += 1
                except QuestDBWriteError as row_error:
                    await stream.dead_letter(record.delivery, f"{table} refused the row: {row_error}")

    async def _store_positions(self, stream: Stream) -> None:
        async for records in stream.take_events(self.batch_size, within=self.interval_s):
            trades, trade_records, snapshots = [], [], []
            for record in records:
                u = record.value
                if u.reason == "fill" and u.fill_id is not None:
                    trade_records.append(record)
                    trades.append(
                        {
                            "ts": u.ts,
                            "fill_id": u.fill_id,
                            "account": u.account,
                            "symbol": u.symbol,
                            "side": u.side,
                            "qty": u.qty,
                            "price": u.price,
                            "fee": u.fee,
                            "realized_pnl_fill": u.realized_pnl_fill,
                            "order_id": u.order_id or "",
                            "venue": u.venue or "",
                            "net_qty_after": u.net_qty,
                        }
                    )
                snapshots.append(
                    {
                        "ts": u.ts,
                        "account": u.account,
                        "symbol": u.symbol,
                        "reason": u.reason,
                        "net_qty": u.net_qty,
                        "avg_open_price": u.avg_open_price,
                        "realized_pnl_gross": u.realized_pnl_gross,
                        "fees": u.fees,
                        "realized_pnl_net": u.realized_pnl_net,
                        "mark": u.mark,
                        "unrealized_pnl": u.unrealized_pnl,
                        "day_pnl": u.day_pnl,
                    }
                )
            await self._write(stream, TRADES_TABLE, trade_records, trades)
            await self._write(stream, SNAPSHOTS_TABLE, records, snapshots)

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


def _symbols(table: str) -> tuple[str, ...]:
    columns = TRADES_COLUMNS if table == TRADES_TABLE else SNAPSHOT_COLUMNS
    return tuple(name for name, kind in columns.items() if kind == "SYMBOL")
