"""`FeaturePublisher`: where agents hand their feature rows, and what `/features/status` reads.

A push writes the batch's rows to the online store (newest row per entity) and to the
offline store (every row), in that order, before the agent asks for its next batch —
so the input is acknowledged only after both have them. A store that fails is retried
with back-off for as long as it takes (the agent keeps its batch alive meanwhile); the
failures are counted per view and shown in the status.

Online writes go through the direct Feast-layout writer (`online.FeastRedisWriter`) when
the online store is Valkey and `online_writer` is `direct`, otherwise through Feast's
own `write_to_online_store` (the SQLite store, or Valkey when `online_writer: feast`).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Awaitable, Callable, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .online import FeastRedisWriter, RedisWriteError, newest_per_entity
from .store import FeatureRepository, Materialization

log = logging.getLogger(__name__)

RETRY_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0)


def _retriable() -> tuple[type[BaseException], ...]:
    from redis.exceptions import RedisError

    return (RedisWriteError, RedisError, OSError, ConnectionError, sqlite3.OperationalError, TimeoutError)


@dataclass
class ViewStatus:
    name: str
    kind: str
    rows_pushed: int = 0
    entities_written_online: int = 0
    pushes: int = 0
    last_push_at: float | None = None  # wall clock, epoch s
    newest_event_ts: int | None = None  # epoch ns
    errors: int = 0
    last_error: str | None = None
    last_error_at: float | None = None
    materializations: int = 0
    materialization_errors: int = 0
    last_materialization: dict[str, Any] | None = None

    def error(self, message: str) -> None:
        self.errors += 1
        self.last_error = message
        self.last_error_at = time.time()

    def as_dict(self, now: float) -> dict[str, Any]:
        return {
            "view": self.name,
            "kind": self.kind,
            "rows_pushed": self.rows_pushed,
            "entities_written_online": self.entities_written_online,
            "pushes": self.pushes,
            "last_push": _iso(self.last_push_at),
            "newest_event_time": _iso(self.newest_event_ts / 1e9) if self.newest_event_ts else None,
            "freshness_s": round(now - self.newest_event_ts / 1e9, 3) if self.newest_event_ts else None,
            "last_materialization": self.last_materialization,
            "materializations": self.materializations,
            "errors": self.errors + self.materialization_errors,
            "push_errors": self.errors,
            "materialization_errors": self.materialization_errors,
            "last_error": self.last_error,
            "last_error_at": _iso(self.last_error_at),
        }


def _iso(epoch_s: float | None) -> str | None:
    if epoch_s is None:
        return None
    return datetime.fromtimestamp(epoch_s, tz=timezone.utc).isoformat().replace("+00:00", "Z")


class FeaturePublisher:
    def __init__(
        self,
        repository: FeatureRepository,
        *,
        direct_writer: FeastRedisWriter | None,
        registry: CollectorRegistry | None = None,
    ):
        self.repository = repository
        self.direct_writer = direct_writer
        # Feast's own online write path (SQLite: one shared connection) is not safe from
        # several threads at once; the four agents and materialization take turns.
        self._feast_online = asyncio.Lock()
        self.status = {
            name: ViewStatus(name, view.kind) for name, view in repository.views.items()
        }
        registry = registry or CollectorRegistry()
        self.rows_pushed = Counter(
            "posttrade_feature_rows_pushed_total", "Feature rows pushed (offline rows)", ["view"], registry=registry
        )
        self.push_errors = Counter(
            "posttrade_feature_push_errors_total", "Failed push attempts (retried)", ["view"], registry=registry
        )
        self.push_seconds = Histogram(
            "posttrade_feature_push_seconds",
            "Time to write one batch online and offline",
            ["view"],
            registry=registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.freshness = Gauge(
            "posttrade_feature_freshness_seconds", "Now minus the newest pushed event time", ["view"], registry=registry
        )
        self.materialize_seconds = Gauge(
            "posttrade_feature_materialize_seconds", "Duration of the last materialization", ["view"], registry=registry
        )
        self.materialize_errors = Counter(
            "posttrade_feature_materialize_errors_total", "Failed materializations", ["view"], registry=registry
        )

    @property
    def online_path(self) -> str:
        if self.direct_writer is not None:
            return "direct (Feast Redis layout, one pipelined write per batch)"
        return f"feast write_to_online_store ({self.repository.settings.online_store})"

    async def recover(self) -> None:
        """Fill the status from what survived a restart: offline event times, registry."""
        for name, view in self.repository.views.items():
            status = self.status[name]
            bounds = await asyncio.to_thread(self.repository.offline.event_time_range, view)
            if bounds is not None:
                status.newest_event_ts = bounds[1]
            last = await asyncio.to_thread(self.repository.last_materialized, name)
            if last is not None:
                status.last_materialization = {
                    "start": last[0].isoformat(),
                    "end": last[1].isoformat(),
                    "duration_s": None,  # not kept in Feast's registry
                    "recovered_from_registry": True,
                }

    async def push(
        self,
        view_name: str,
        rows: Sequence[Sequence],
        keep_alive: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Write `rows` online and offline; returns once both stores have them."""
        if not rows:
            return
        view = self.repository.views[view_name]
        status = self.status[view_name]
        started = time.perf_counter()
        written = await self._retry(status, keep_alive, lambda: self._write_online(view, rows))
        await self._retry(status, keep_alive, lambda: asyncio.to_thread(self.repository.write_offline, view, rows))
        self.push_seconds.labels(view_name).observe(time.perf_counter() - started)
        self.rows_pushed.labels(view_name).inc(len(rows))
        status.rows_pushed += len(rows)
        status.entities_written_online += written
        status.pushes += 1
        status.last_push_at = time.time()
        newest = max(row[1] for row in rows)
        if status.newest_event_ts is None or newest > status.newest_event_ts:
            status.newest_event_ts = newest

    async def _write_online(self, view, rows) -> int:
        if self.direct_writer is not None:
            return await self.direct_writer.write(view.name, rows)
        newest = newest_per_entity(rows)  # Feast's SQLite store keeps the last row it is given
        async with self._feast_online:
            await asyncio.to_thread(self.repository.write_online_through_feast, view, newest)
        return len(newest)

    async def _retry(self, status: ViewStatus, keep_alive, attempt: Callable[[], Awaitable[Any]]):
        retriable = _retriable()
        failures = 0
        while True:
            try:
                return await attempt()
            except retriable as exc:
                message = f"{type(exc).__name__}: {exc}"
                status.error(message)
                self.push_errors.labels(status.name).inc()
                delay = RETRY_BACKOFF_S[min(failures, len(RETRY_BACKOFF_S) - 1)]
                failures += 1
                log.warning("pushing %s failed (%s); retrying in %.1f s", status.name, message, delay)
                if keep_alive is not None:
                    await keep_alive()
                await asyncio.sleep(delay)

    async def materialize(self, view_name: str, end: datetime) -> Materialization | None:
        """`materialize_incremental` of one view up to `end`; failures are recorded, not raised."""
        status = self.status[view_name]
        try:
            async with self._feast_online:  # materialization writes online too
                result = await asyncio.to_thread(self.repository.materialize_incremental, view_name, end)
        except Exception as exc:
            status.materialization_errors += 1
            status.last_error = f"materialize: {type(exc).__name__}: {exc}"
            status.last_error_at = time.time()
            self.materialize_errors.labels(view_name).inc()
            log.exception("materializing %s failed", view_name)
            return None
        status.materializations += 1
        status.last_materialization = {
            "start": result.start.isoformat() if result.start else None,
            "end": result.end.isoformat(),
            "duration_s": round(result.duration_s, 4),
            "finished_at": _iso(time.time()),
        }
        self.materialize_seconds.labels(view_name).set(result.duration_s)
        return result

    def snapshot(self) -> dict[str, Any]:
        now = time.time()
        views = {}
        for name, status in self.status.items():
            entry = status.as_dict(now)
            if entry["freshness_s"] is not None:
                self.freshness.labels(name).set(entry["freshness_s"])
            views[name] = entry
        return {"online_store": self.repository.settings.online_store, "online_writer": self.online_path, "views": views}

