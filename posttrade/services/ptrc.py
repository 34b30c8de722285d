"""ptrc — post-trade, risk and compliance (API 8109, metrics 9109).

Positions and P&L from fills (average cost and FIFO), marks from market data, compliance
alerts (stored in ClickHouse), reconciliation and reports. Position updates and alerts go
out on the bus; questdb_writer stores the trade blotter and the position snapshots the
reports read. See docs/ptrc.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import time as dtime

import msgspec

from ..agents.positions import PositionKeeper
from ..agents.reconciliation import ReconciliationSection, install_reconciliation
from ..agents.reports import ReportsSection, install_reports
from ..config import ServiceConfig, _Section
from ..core.compliance import ComplianceRules
from ..core.history import DEFAULT_CHECKPOINT_EVERY, DEFAULT_MAX_RECORDS, parse_horizon
from ..core.marks import DEFAULT_PRIORITY, MarkSource
from ..sinks import RetryPolicy
from ..stores.clickhouse import ClickHouseStore
from ..stores.clickhouse.alerts import AlertSink
from ..stores.questdb import QuestDBClient
from ..streams.stream import Stream
from ..streams.transport import Transport
from ..web.live import LiveLog
from ..web.ptrc import ALERTS_KEPT, install_pages
from .base import Service
from .wiring import clickhouse_store, new_app, object_store


class MarksSection(_Section):
    priority: tuple[MarkSource, ...] = DEFAULT_PRIORITY


class ComplianceSection(ComplianceRules, frozen=True, kw_only=True, forbid_unknown_fields=True):
    check_interval_s: float = 1.0  # how often price moves are checked against account limits


class BooksSection(_Section):
    """The execution history behind every position (`core.history`)."""

    horizon: str = "7d"  # how far back in event time a fill or amendment may still land
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY  # re-derivation replays at most this many extra
    # Executions and amendments held within the horizon, at most (memory: docs/ptrc.md);
    # past it the oldest are folded early, and nothing older than them can land.
    max_records: int = DEFAULT_MAX_RECORDS

    def horizon_ns(self) -> int:
        return parse_horizon(self.horizon)


class TradingDaySection(_Section):
    timezone: str = "UTC"
    roll_at: str = "00:00"  # local time the trading day starts

    def roll_time(self) -> dtime:
        return dtime.fromisoformat(self.roll_at)


class PtrcConfig(ServiceConfig, kw_only=True):
    marks: MarksSection = msgspec.field(default_factory=MarksSection)
    books: BooksSection = msgspec.field(default_factory=BooksSection)
    compliance: ComplianceSection = msgspec.field(default_factory=ComplianceSection)
    trading_day: TradingDaySection = msgspec.field(default_factory=TradingDaySection)
    reconciliation: ReconciliationSection = msgspec.field(default_factory=ReconciliationSection)
    reports: ReportsSection = msgspec.field(default_factory=ReportsSection)


CONFIG = PtrcConfig


CONFIG = PtrcConfig


@dataclass
class PtrcService(Service):
    keeper: PositionKeeper
    alert_sink: AlertSink
    questdb: QuestDBClient  # read only: reports and reconciliation
    clickhouse: ClickHouseStore


def build(config: PtrcConfig, *, transport: Transport | None = None) -> PtrcService:
    app = new_app(config, transport)
    rules = ComplianceRules(**{f: getattr(config.compliance, f) for f in ComplianceRules.__struct_fields__})
    reference = config.reference()
    live_alerts = LiveLog("alerts", keep=ALERTS_KEPT)
    keeper = PositionKeeper(
        app,
        reference=reference,
        mark_priority=config.marks.priority,
        rules=rules,
        compliance_check_interval_s=config.compliance.check_interval_s,
        day_timezone=config.trading_day.timezone,
        day_roll_at=config.trading_day.roll_time(),
        horizon_ns=config.books.horizon_ns(),
        checkpoint_every=config.books.checkpoint_every,
        max_records=config.books.max_records,
        live_alerts=live_alerts,
    )
    qdb = config.databases.questdb
    questdb = QuestDBClient(host=qdb.host, port=qdb.port, username=qdb.user, password=qdb.password, tls=qdb.tls)
    ch = config.databases.clickhouse
    clickhouse = clickhouse_store(config)
    alert_sink = AlertSink(clickhouse, RetryPolicy.from_config(config.batch))

    @app.agent(keeper.alerts, name="store_alerts", sinks=[alert_sink])
    async def store_alerts(stream: Stream) -> None:
        # Its own consumer of ptrc's ALERTS output: ClickHouse down delays the stored
        # alerts, never the positions.
        async for alert in stream:
            alert_sink.add(alert)

    multipliers = reference.multipliers
    install_reconciliation(
        app,
        fills=keeper.fills,
        positions=keeper.positions,
        multipliers=multipliers,
        mark_of=keeper.mark_of,
        settings=config.reconciliation,
        new_book=keeper.new_book,
    )
    install_reports(
        app,
        positions=keeper.positions,
        mark_of=keeper.mark_of,
        fx=keeper.fx,
        multipliers=multipliers,
        object_store=object_store(config),
        questdb=questdb,
        clickhouse=clickhouse,
        settings=config.reports,
        day_timezone=config.trading_day.timezone,
        day_starts_at=config.trading_day.roll_time(),
    )
    install_pages(app, keeper, clickhouse=clickhouse, alert_sink=alert_sink, live_alerts=live_alerts)

    @app.health_check("questdb")
    async def questdb_health():
        return await questdb.ping(), f"{qdb.host}:{qdb.port}"

    @app.health_check("clickhouse")
    async def clickhouse_health():
        return await clickhouse.ping(), ch.dsn or f"{ch.host}:{ch.port}"

    @app.health_check("books")
    async def books_health():
        # Resends, conflicts and refusals are the feed's doing, not a fault of ptrc: they
        # are reported here and alerted, and never make the service unhealthy.
        return True, {"fills": dict(keeper.outcomes), "pending_amendments": len(keeper.executions.pending())}

    app.on_startup.append(alert_sink.create_table)

    async def close_stores() -> None:
        await questdb.close()
        await clickhouse.close()

    app.on_shutdown.append(close_stores)
    return PtrcService(app, config, keeper, alert_sink, questdb, clickhouse)
