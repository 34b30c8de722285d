"""questdb_writer (port 8090): the NATS flow into QuestDB, batched, retried, exactly once.

One agent per route (a bus channel written to one table, see `writer.routes` in
config/backend/questdb_writer/config.yaml). Each agent takes batches of up to
`batch.size` events or whatever arrived within `batch.interval_sec`, and hands them to
its `QuestDBSink` (posttrade/stores/questdb/sink.py), which writes the batch in one
ILP/HTTP request and returns only when QuestDB has every row (or a row QuestDB can
never take is dead-lettered). The agent acknowledges a batch only once its write
returned, in order, while the next batch is already being pulled and decoded; the
tables' DEDUP UPSERT KEYS make the redelivery after a crash land on the rows already
written. The fills table keeps the first arrival of each fill_id: a resend is looked up
and left out before the write (`FirstArrivals` in the sink).

Pages: `/stats` (rows, batches, batch sizes, flush latency, errors, retries, dead
letters, resends, lag, rows/s per table) and the runtime's `/health` (503 when NATS or
QuestDB is unreachable, a table is not ready, or an agent's lag passes
`runtime.max_lag`) and `/metrics`. See docs/questdb_writer.md.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Literal

import msgspec

from ..app import App
from ..config import ConfigError, QuestDBSection, ServiceConfig, _Section
from ..sinks import RetryPolicy
from ..stores.questdb import QuestDBClient, QuestDBUnavailableError, QuestDBWriter, check_identifier
from ..stores.questdb.layouts import LAYOUTS
from ..stores.questdb.sink import QuestDBSink, WriterMetrics
from ..streams import subjects as bus
from ..streams.channel import Channel
from ..streams.stream import Stream
from ..streams.transport import Transport
from ..web.live import History
from ..web.server import JSON
from .base import Service
from .wiring import new_app

log = logging.getLogger(__name__)

ChannelName = Literal[
    "market_trades", "quotes", "bars", "fills", "orders",
    "ptrc_trades", "position_snapshots", "pnl_snapshots", "pnl_account_snapshots",
]

# Where each layout's events come from: the bus layout's declaration of the channel (the
# same stream config as every service). ptrc's position updates make two tables, pnl's
# snapshots two more: QuestDB is written by this service alone.
BUS_CHANNELS = {
    "market_trades": bus.market_trades,
    "quotes": bus.quotes,
    "bars": bus.bars,
    "fills": bus.fills,
    "orders": bus.orders,
    "ptrc_trades": bus.positions,
    "position_snapshots": bus.positions,
    "pnl_snapshots": bus.pnl_snapshots,
    "pnl_account_snapshots": bus.pnl_snapshots,
}


class RouteSection(_Section):
    """One channel written to one table."""

    channel: ChannelName  # which layout: which events, and so which columns and dedup keys
    table: str
    enabled: bool = True
    # Both unset: the bus layout's stream (posttrade/streams/subjects.py). Set both to read
    # another stream (tests, benchmarks, a second feed).
    stream: str | None = None
    subjects: list[str] | str | None = None

    def stream_subjects(self) -> list[str]:
        if self.subjects is None:
            return []
        if isinstance(self.subjects, str):  # one subject, or a comma-separated list (env)
            return [s.strip() for s in self.subjects.split(",") if s.strip()]
        return list(self.subjects)


def _default_routes() -> dict[str, RouteSection]:
    return {name: RouteSection(channel=name, table=name) for name in BUS_CHANNELS}


class WriterSection(_Section):
    routes: dict[str, RouteSection] = msgspec.field(default_factory=_default_routes)
    request_timeout_s: float = 30.0  # one ILP/HTTP request, QuestDB's answer included


class QuestDBWriterConfig(ServiceConfig):
    writer: WriterSection = msgspec.field(default_factory=WriterSection)


CONFIG = QuestDBWriterConfig


def enabled_routes(config: QuestDBWriterConfig) -> dict[str, RouteSection]:
    """The routes to run, validated: names, tables, stream overrides."""
    routes = {name: route for name, route in config.writer.routes.items() if route.enabled}
    if not routes:
        raise ConfigError("questdb_writer config, key `writer.routes`: no route is enabled")
    tables: dict[str, str] = {}
    for name, route in routes.items():
        where = f"questdb_writer config, key `writer.routes.{name}`"
        try:
            check_identifier(name)
            check_identifier(route.table)
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        if route.table in tables:
            raise ConfigError(f"{where}: table {route.table} is already written by route {tables[route.table]}")
        tables[route.table] = name
        overridden = route.stream is not None, route.subjects is not None
        if overridden[0] != overridden[1] or (overridden[1] and not route.stream_subjects()):
            raise ConfigError(f"{where}: set both `stream` and `subjects`, or neither (the bus layout)")
    return routes


def route_channel(app: App, name: str, route: RouteSection) -> Channel:
    if route.stream is None:
        return BUS_CHANNELS[route.channel](app)
    return app.channel(
        name, stream=route.stream, subjects=route.stream_subjects(), value_type=LAYOUTS[route.channel].event_type
    )


@dataclass
class QuestDBWriterService(Service):
    sinks: dict[str, QuestDBSink]  # by route
    writer: QuestDBWriter
    client: QuestDBClient


def build(
    config: QuestDBWriterConfig,
    *,
    transport: Transport | None = None,
    writer: QuestDBWriter | None = None,
    client: QuestDBClient | None = None,
) -> QuestDBWriterService:
    """The service on NATS (or `transport`) and QuestDB as configured (or `writer` for
    the rows and `client` for SQL)."""
    routes = enabled_routes(config)
    qdb = config.databases.questdb or QuestDBSection()
    auth = dict(username=qdb.user, password=qdb.password, tls=qdb.tls)
    client = client or QuestDBClient(host=qdb.host, port=qdb.port, timeout=10.0, **auth)
    writer = writer or QuestDBWriter(
        host=qdb.host,
        port=qdb.port,
        # The sink does the retrying (with keep-alives and /stats); the client must not
        # sit on a failed request for seconds on its own.
        retry_timeout_ms=0,
        request_timeout_ms=int(config.writer.request_timeout_s * 1000),
        connections=len(routes),  # the routes' agents flush concurrently
        **auth,
    )
    app = new_app(config, transport)
    retry = RetryPolicy.from_config(config.batch)
    retry = RetryPolicy(
        attempts=retry.attempts, initial_s=retry.initial_s, max_s=retry.max_s,
        keep_alive_s=max(1.0, min(5.0, config.runtime.ack_wait_s / 4)),
    )  # fmt: skip
    metrics = WriterMetrics(app.metrics.registry)
    reference = config.reference()
    sinks: dict[str, QuestDBSink] = {}
    agent_names: dict[str, str] = {}
    for name, route in routes.items():
        sink = app.sink(QuestDBSink(
            table=route.table, layout=LAYOUTS[route.channel], writer=writer, client=client, retry=retry,
            metrics=metrics, reference=reference,
        ))  # fmt: skip
        sinks[name] = sink
        agent_names[name] = f"write_{name}"
        channel = route_channel(app, name, route)
        app.agent(channel, name=agent_names[name], batch_size=config.batch.size)(
            _sink_agent(sink, config.batch.size, config.batch.interval_sec)
        )
    _serve(app, config, sinks, agent_names, client, writer)
    return QuestDBWriterService(app, config, sinks, writer, client)


def _serve(
    app: App,
    config: QuestDBWriterConfig,
    sinks: dict[str, QuestDBSink],
    agent_names: dict[str, str],
    client: QuestDBClient,
    writer: QuestDBWriter,
) -> None:
    """Table creation, /health's QuestDB check, /stats and the page's history."""

    async def create_tables() -> None:
        # Up front, so the tables (with their dedup keys) exist before any row; if QuestDB
        # is not there yet the agents create them before their first write.
        for sink in sinks.values():
            try:
                await sink.ensure_table()
            except QuestDBUnavailableError as exc:
                log.warning("QuestDB unreachable at start (%s); tables are created on first write", exc.message)
                return

    async def close_clients() -> None:
        await writer.close()
        await client.close()

    app.on_startup.append(create_tables)
    app.on_shutdown.append(close_clients)

    @app.health_check("questdb")
    async def questdb_writable():
        await client.ping()
        detail: dict = {"url": client.base_url}
        for sink in sinks.values():
            if not sink.stats.table_ready:
                # Reachable, but the table could not be made ready yet: try now, say why not.
                try:
                    await sink.ensure_table()
                except Exception as exc:  # noqa: BLE001 - the detail is the point
                    return False, {**detail, "table": sink.table, "error": str(exc)}
            if sink.stats.failing_since is not None:
                # QuestDB answers SQL but the writes of this table keep failing.
                failing = sink.stats.snapshot()
                return False, {
                    **detail,
                    "table": sink.table,
                    "writes_failing_since": failing["writes_failing_since"],
                    "error": failing["last_error"],
                }
        return True, detail

    async def current_stats() -> tuple[dict, dict]:
        tables = {}
        totals = {"rows": 0, "batches": 0, "errors": 0, "retries": 0, "dead_lettered": 0, "resends": 0, "lag": 0}
        rate10 = rate60 = 0.0
        for name, sink in sinks.items():
            agent = agent_names[name]
            snapshot = sink.stats.snapshot()
            runner = app.agents[agent]
            snapshot["route"] = name
            snapshot["stream"] = runner.channel.stream.name
            snapshot["subjects"] = list(runner.channel.filter_subjects or runner.channel.stream.subjects)
            snapshot["dedup_keys"] = ["ts", *sink.layout.dedup_keys]
            snapshot["first_arrival_key"] = sink.layout.first_arrival
            # Dead letters of the route: rows QuestDB refused plus messages that did not
            # even decode (the runtime counts both per agent).
            all_dead = int(_sample(app, "posttrade_dead_letters_total", agent))
            snapshot["dead_lettered_undecodable"] = max(0, all_dead - sink.stats.dead_lettered)
            snapshot["lag"] = await _lag(app, agent)
            tables[sink.table] = snapshot
            totals["rows"] += snapshot["rows"]
            totals["batches"] += snapshot["batches"]
            totals["errors"] += snapshot["errors"]
            totals["retries"] += snapshot["retries"]
            totals["resends"] += snapshot["resends"]
            totals["dead_lettered"] += snapshot["dead_lettered"] + snapshot["dead_lettered_undecodable"]
            totals["lag"] += snapshot["lag"] or 0
            rate10 += snapshot["rows_per_s"]["10s"]
            rate60 += snapshot["rows_per_s"]["60s"]
        totals["rows_per_s"] = {"10s": round(rate10, 1), "60s": round(rate60, 1)}
        return totals, tables

    @app.page("/stats", public=True)  # counters, no account data
    async def stats(request):
        """Rows, batches, errors, retries, dead letters, resends, lag, throughput and flush latency per table.

        ---
        responses:
          200: {description: "`totals` and `tables` (one entry per route)", schema: {type: object}}
        """
        totals, tables = await current_stats()
        return JSON(
            {
                "service": app.name,
                "uptime_s": round(time.time() - app.started_at, 1) if app.started_at else 0.0,
                "batch": msgspec.to_builtins(config.batch),
                "totals": totals,
                "tables": tables,
            }
        )

    async def sample() -> dict[str, float | None]:
        _, tables = await current_stats()
        figures: dict[str, float | None] = {}
        for table, snapshot in tables.items():
            figures[f"{table}.rows_per_s"] = snapshot["rows_per_s"]["10s"]
            figures[f"{table}.flush_p99_ms"] = snapshot["flush_latency_ms"]["p99"]
            figures[f"{table}.lag"] = snapshot["lag"]
            figures[f"{table}.retries"] = snapshot["retries"]
            figures[f"{table}.dead_lettered"] = snapshot["dead_lettered"] + snapshot["dead_lettered_undecodable"]
        return figures

    # The page's charts over time (the last hour).
    History(sample).serve(app, "/dashboard/history", public=True)


def _sample(app: App, metric: str, agent: str) -> float:
    return app.metrics.registry.get_sample_value(metric, {"agent": agent}) or 0.0


async def _lag(app: App, agent: str) -> int | None:
    runner = app.agents[agent]
    if runner.consumer is None or not app.transport.connected:
        return None
    try:
        return await runner.consumer.pending()
    except Exception:  # noqa: BLE001 - lag unknown while NATS is away; /health says so
        return None


def _sink_agent(sink: QuestDBSink, size: int, interval_s: float):
    async def write(stream: Stream) -> None:
        # take_events returns a batch at `size` events or when `interval_s` has passed,
        # whichever comes first, even with a single event: the time bound is real.
        #
        # Pipelined: while batch N is being written (its ILP request runs in a thread),
        # batch N+1 is pulled and decoded. Each batch is acknowledged (`commit_to` its
        # mark) only after QuestDB took it, in order, and never before the batches ahead
        # of it: an acknowledgement covers everything up to its message (AckPolicy.ALL).
        writing: asyncio.Task | None = None  # the write of the batch before this one
        written_mark = None  # that batch's last delivery
        try:
            async for records in stream.take_events(size, within=interval_s, auto_commit=False):
                mark = stream.mark()
                if writing is not None:
                    await writing  # raises (e.g. SinkStopping): nothing after it is acknowledged
                    writing = None
                    await stream.commit_to(written_mark)
                if records:
                    writing = asyncio.ensure_future(sink.write_records(records, stream))
                    written_mark = mark
                elif mark is not None:  # only dead letters came: acknowledge them
                    await stream.commit_to(mark)
            if writing is not None:
                await writing
                writing = None
                await stream.commit_to(written_mark)
        finally:
            if writing is not None:  # the agent is failing: let the write end before the restart
                writing.cancel()
                await asyncio.gather(writing, return_exceptions=True)

    return write
