"""questdb_writer's pages: `/stats`, the QuestDB check of `/health`, the page's history,
and the tables made at start."""

from __future__ import annotations

import logging
import time

import msgspec

from ..app import App
from ..config import ServiceConfig
from ..stores.questdb import QuestDBClient, QuestDBUnavailableError, QuestDBWriter
from ..stores.questdb.sink import QuestDBSink
from .live import History
from .server import JSON

log = logging.getLogger(__name__)


def install_pages(
    app: App,
    config: ServiceConfig,
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
