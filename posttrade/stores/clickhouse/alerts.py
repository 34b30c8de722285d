"""ptrc's compliance alerts in ClickHouse: the table, the sink that fills it, the query
`/compliance/alerts` and the reports read.

`ReplacingMergeTree ORDER BY alert_id`: an alert stored twice (a redelivered batch) is one
row once merged, and `FINAL` reads it once before that.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from ...sinks import RetryPolicy, Sink
from ...streams.events import ComplianceAlert
from . import ClickHouseError, ClickHouseStore

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
# What `/compliance/alerts` may filter on (each an exact match).
ALERT_FILTERS = ("account", "rule", "severity", "symbol")


def _text(value: Decimal | None) -> str:
    return "" if value is None else format(value, "f")


def alert_row(alert: ComplianceAlert) -> list[Any]:
    return [
        alert.alert_id, alert.ts, alert.rule, alert.severity, alert.account, alert.symbol or "", alert.message,
        _text(alert.observed), _text(alert.limit), alert.fill_id or "",
    ]


class AlertSink(Sink[ComplianceAlert]):
    """Alerts → `compliance_alerts`, one insert a batch."""

    def __init__(self, clickhouse: ClickHouseStore, retry: RetryPolicy):
        super().__init__("clickhouse:compliance_alerts", retry)
        self.clickhouse = clickhouse
        self._table_ready = False

    async def create_table(self) -> None:
        """The table, made at start (retried until ClickHouse answers): the reports and
        `/compliance/alerts` read it before any alert is raised."""
        await self.retrying(self._create, what="creating compliance_alerts", rows=0, counts=False)

    async def _create(self) -> None:
        if not self._table_ready:
            await self.clickhouse.command(ALERTS_DDL)
            self._table_ready = True

    async def write(self, batch: list[ComplianceAlert]) -> None:
        await self._create()
        await self.clickhouse.insert(ALERTS_TABLE, [alert_row(a) for a in batch], column_names=ALERT_COLUMNS)

    def unavailable(self, exc: Exception) -> bool:
        # A server away and a query it refuses are both clickhouse-connect errors; the
        # rows are plain text and a timestamp, so a refusal is the server's state, not theirs.
        return super().unavailable(exc) or isinstance(exc, ClickHouseError)


async def stored_alerts(
    clickhouse: ClickHouseStore, filters: dict[str, str], *, limit: int, offset: int
) -> list[dict[str, Any]]:
    """Stored alerts matching every filter (`ALERT_FILTERS`), newest first."""
    where = [f"{name} = {{{name}:String}}" for name in filters]
    sql = (
        f"SELECT alert_id, toUnixTimestamp64Nano(ts) AS ts, rule, severity, account, symbol, message, "
        f"observed, `limit`, fill_id FROM {ALERTS_TABLE} FINAL"
        + (f" WHERE {' AND '.join(where)}" if where else "")
        + f" ORDER BY ts DESC, alert_id LIMIT {int(limit)} OFFSET {int(offset)}"
    )
    return (await clickhouse.query(sql, parameters=filters)).dicts()
