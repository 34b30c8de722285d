"""execution_quality (port 8096): slippage and execution analytics stored in ClickHouse.

Wiring: four agents (orders, fills, quotes, market trades) feed one `ExecutionTracker`
(posttrade/agents/execution/) whose state is persisted in changelog tables once its rows
are in ClickHouse; one `ExecutionSink` (posttrade/stores/clickhouse/execution_sink.py)
does every write (one insert per table for everything changed, the rollup minutes
refreshed), under the service's one retry policy (`batch`): the orders and fills agents
wait for it before acknowledging a batch, the market-data agents do not. Two timers
re-mark open orders to the latest mid and prune state nothing can change any more. The
pages (posttrade/web/execution_quality.py) read ClickHouse through `ExecutionQueries`.
Every summary group is in one currency (the reference data's, `config.reference()`,
stored on each row). docs/execution_quality.md documents formulas, currencies, joins,
corrections and busts, and endpoints.

ClickHouse is the embedded chdb engine when `databases.clickhouse.dsn` is a `chdb://`
dsn, else the server at `host:port` (or a `clickhouse://` / `http(s)://` dsn). A chdb
data path is exclusive to one process, and the local stack's env points every service
at one shared root (`chdb://$POSTTRADE_HOME/chdb`): a chdb path whose last component
is `chdb` is taken as that root and this service uses `<root>/<service name>`. Any
other chdb path is used as given. The service starts without ClickHouse: the sink opens
it (retrying) and /health says degraded until it answers.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import partial
from typing import Any
from urllib.parse import urlparse

import msgspec

from ..agents.execution.agents import ExecutionChannels, MarkTracker, register_agents, start_tracker
from ..agents.execution.metrics import ExecutionCollector
from ..agents.execution.state import NS
from ..agents.execution.tracker import ExecutionTracker, TrackerSettings, declare_tables
from ..config import ClickHouseSection, ConfigError, ServiceConfig, _Section
from ..core.reference import Reference
from ..sinks import RetryPolicy
from ..stores.clickhouse import ClickHouseStore
from ..stores.clickhouse.execution import open_execution_store
from ..stores.clickhouse.execution_queries import ExecutionQueries
from ..stores.clickhouse.execution_sink import ExecutionSink
from ..streams.transport import Transport
from ..web.execution_quality import install_pages
from .base import Service
from .wiring import new_app

# A partly filled market-data batch is handled after this long: the join stays current
# on a quiet stream. Orders and fills gather a batch for up to `batch.interval_sec`
# (each of their batches waits for a ClickHouse write).
AGENT_BATCH_WAIT_S = 0.2
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class ExecutionSection(_Section):
    """How the join waits, remembers and forgets (all times are event time)."""

    history_s: float = 600.0  # quote/trade history kept in memory behind each symbol's newest event
    quiet_symbol_grace_s: float = 5.0  # a quiet symbol's pending values are decided this long after every symbol's time passed
    retention_s: float = 3600.0  # how long a finished fill/order stays in state (late fills still join it)
    open_order_ttl_s: float = 86_400.0  # an order with no terminal event is forgotten after this long
    # At most this many fills / orders stay in state: beyond, the oldest finished ones are
    # forgotten before retention_s is up (0: no bound). What retention_s keeps grows with
    # the rate (at 300 events/s, about 50 fills and 22 orders a second); these bound it.
    max_fills: int = 50_000
    max_orders: int = 25_000
    open_order_mark_interval_s: float = 5.0  # how often open orders are re-marked to the latest mid
    prune_interval_s: float = 30.0
    # Rows changed but not yet in ClickHouse beyond which the agents wait (ClickHouse down).
    max_unwritten_rows: int = 100_000

    def __post_init__(self) -> None:
        if self.max_fills < 0 or self.max_orders < 0:
            raise ValueError("max_fills and max_orders must be >= 0 (0: no bound)")

    def tracker_settings(self) -> TrackerSettings:
        return TrackerSettings(
            history_ns=int(self.history_s * NS),
            quiet_grace_ns=int(self.quiet_symbol_grace_s * NS),
            retention_ns=int(self.retention_s * NS),
            open_order_ttl_ns=int(self.open_order_ttl_s * NS),
            max_fills=self.max_fills,
            max_orders=self.max_orders,
        )


class ExecutionQualityConfig(ServiceConfig):
    execution: ExecutionSection = msgspec.field(default_factory=ExecutionSection)


CONFIG = ExecutionQualityConfig


def service_chdb_dsn(dsn: str, service: str) -> str:
    """The chdb dsn this service opens: `<root>/<service>` when `dsn` names the shared
    chdb root (a path ending in `/chdb`), else `dsn` unchanged."""
    parsed = urlparse(dsn)
    if parsed.netloc or not parsed.path:
        return dsn  # chdb://memory, or a malformed dsn open_clickhouse will reject
    path = parsed.path.rstrip("/") or "/"
    if os.path.basename(path) == "chdb":
        path = f"{path}/{service}"
    return f"chdb://{path}" + (f"?{parsed.query}" if parsed.query else "")


def clickhouse_options(config: ServiceConfig) -> dict[str, Any]:
    """Keyword arguments of `open_clickhouse` for this service's config."""
    ch = config.databases.clickhouse or ClickHouseSection()
    if ch.dsn and ch.dsn.startswith("chdb:"):
        return {"dsn": service_chdb_dsn(ch.dsn, config.service.name)}
    options: dict[str, Any] = {"user": ch.user, "password": ch.password, "secure": ch.secure}
    if ch.dsn:
        options["dsn"] = ch.dsn
    else:
        options.update(host=ch.host, port=ch.port)
    return options


@dataclass
class ExecutionQualityService(Service):
    channels: ExecutionChannels
    tracker: ExecutionTracker
    sink: ExecutionSink  # ClickHouse: every write, and the connection the pages read through
    queries: ExecutionQueries
    reference: Reference  # each symbol's currency: rows carry it

    @property
    def store(self) -> ClickHouseStore | None:
        """ClickHouse, once the sink has opened it."""
        return None if self.sink.store is None else self.sink.store.clickhouse


def build(config: ExecutionQualityConfig, *, transport: Transport | None = None) -> ExecutionQualityService:
    """The service on NATS (or `transport`) and ClickHouse as configured."""
    ex = config.execution
    database = (config.databases.clickhouse or ClickHouseSection()).database
    if not _IDENTIFIER.match(database):
        raise ConfigError(f"databases.clickhouse.database {database!r} is not a plain identifier")
    app = new_app(config, transport)
    channels = ExecutionChannels.of(app)
    reference = config.reference()
    tracker = ExecutionTracker(declare_tables(app), ex.tracker_settings(), reference)
    sink = app.sink(ExecutionSink(
        tracker,
        RetryPolicy.from_config(config.batch),
        connect=partial(open_execution_store, database, reference, **clickhouse_options(config)),
        interval_s=config.batch.interval_sec,
        batch_rows=config.batch.size,
        max_unwritten=ex.max_unwritten_rows,
    ))  # fmt: skip
    queries = ExecutionQueries(database, lambda: None if sink.store is None else sink.store.clickhouse)
    service = ExecutionQualityService(app, config, channels, tracker, sink, queries, reference)
    register_agents(
        app, tracker, sink, channels,
        batch_size=config.runtime.batch_size, within_s=config.batch.interval_sec,
        market_within_s=min(AGENT_BATCH_WAIT_S, config.batch.interval_sec),
    )  # fmt: skip

    async def start() -> None:
        # No row is rewritten as it was: the tables only hold states whose rows are in
        # ClickHouse. What the rebuilt history now decides is written as it progresses.
        await start_tracker(app, tracker, channels)
        # The rollup may have missed the last writes before a crash: redo the minutes
        # of every fill held (retention keeps the fills of minutes not yet refreshed).
        sink.stale_minutes |= tracker.fill_minutes()
        sink.start()

    app.on_startup.append(start)
    app.on_shutdown.append(sink.stop)
    marks = MarkTracker()

    @app.timer(ex.open_order_mark_interval_s, name="mark_open_orders")
    async def mark_open_orders() -> None:
        """Re-mark open orders whose symbol moved (the sink's writer writes them)."""
        moved = marks.moved(tracker)
        if moved:
            tracker.mark_open_orders(moved)

    @app.timer(ex.prune_interval_s, name="prune")
    async def prune() -> None:
        # While rows cannot be written, keep the market-data history whole: what is
        # decided but unwritten must stay re-derivable after a restart.
        writing = sink.store is not None and sink.stats.failing_since is None
        tracker.prune(history=writing, stale_minutes=sink.stale_minutes)

    install_pages(app, queries, lambda: sink.store_error)
    app.metrics.registry.register(ExecutionCollector(tracker, sink))
    return service
