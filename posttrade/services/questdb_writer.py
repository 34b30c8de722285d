"""questdb_writer (port 8090): the NATS flow into QuestDB, batched, retried, exactly once.

The only writer of QuestDB. One agent per route (a channel's events written to one table,
see `writer.routes` in config/backend/questdb_writer/config.yaml): the bus's market data,
fills and orders, and the services' own outputs (ptrc's position updates → its blotter and
snapshots, pnl's snapshots → its history). Each agent takes batches of up to
`batch.size` events or whatever arrived within `batch.interval_sec`, and hands them to
its `QuestDBSink` (posttrade/stores/questdb/sink.py), which writes the batch in one
ILP/HTTP request and returns only when QuestDB has every row (or a row QuestDB can
never take is dead-lettered). The agent acknowledges a batch only once its write
returned, in order, while the next batch is already being pulled and decoded; the
tables' DEDUP UPSERT KEYS make the redelivery after a crash land on the rows already
written. The fills table keeps the first arrival of each fill_id: a resend is looked up
and left out before the write (`FirstArrivals` in the sink).

Pages (posttrade/web/questdb_writer.py): `/stats` (rows, batches, batch sizes, flush latency, errors, retries, dead
letters, resends, lag, rows/s per table) and the runtime's `/health` (503 when NATS or
QuestDB is unreachable, a table is not ready, or an agent's lag passes
`runtime.max_lag`) and `/metrics`. See docs/questdb_writer.md.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Literal

import msgspec

from ..app import App
from ..config import ConfigError, QuestDBSection, ServiceConfig, _Section
from ..sinks import RetryPolicy
from ..stores.questdb import QuestDBClient, QuestDBWriter, check_identifier
from ..stores.questdb.layouts import LAYOUTS
from ..stores.questdb.sink import QuestDBSink, WriterMetrics
from ..streams import subjects as bus
from ..streams.channel import Channel
from ..streams.stream import Stream
from ..streams.transport import Transport
from ..web.questdb_writer import install_pages
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
    install_pages(app, config, sinks, agent_names, client, writer)
    return QuestDBWriterService(app, config, sinks, writer, client)


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
