"""What `/features/status`, the page and the feature metrics say about each feature view.

Per view: rows pushed (offline rows), entities written online, pushes, the newest event
time and so the freshness, materializations, errors. The push sinks (`sink`) and the
batch job report into it; the counters restart with the process, the newest event
time and the last materialization are read back at start (`recover`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ...features.views import VIEWS, ViewSpec
from ...sinks import SinkStats

if TYPE_CHECKING:
    from .store import FeatureRepository, Materialization


def _iso(epoch_s: float | None) -> str | None:
    if epoch_s is None:
        return None
    return datetime.fromtimestamp(epoch_s, tz=timezone.utc).isoformat().replace("+00:00", "Z")


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


class FeatureStatus:
    """Every view's `ViewStatus` and the `posttrade_feature_*` metrics (registered at build,
    so they exist before Feast is up)."""

    def __init__(self, registry: CollectorRegistry, views: Iterable[ViewSpec] = VIEWS.values()):
        self.views = {view.name: ViewStatus(view.name, view.kind) for view in views}
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

    def __getitem__(self, view: str) -> ViewStatus:
        return self.views[view]

    # -- what the sinks and the batch job report ------------------------------------------------

    def push_failed(self, view: str, error: str) -> None:
        self.views[view].error(error)
        self.push_errors.labels(view).inc()

    def written_online(self, view: str, entities: int) -> None:
        self.views[view].entities_written_online += entities

    def pushed(self, view: str, rows: Sequence[Sequence], seconds: float) -> None:
        """`rows` are in both stores (the offline one only, for a batch view)."""
        status = self.views[view]
        self.push_seconds.labels(view).observe(seconds)
        self.rows_pushed.labels(view).inc(len(rows))
        status.rows_pushed += len(rows)
        status.pushes += 1
        status.last_push_at = time.time()
        newest = max(row[1] for row in rows)
        if status.newest_event_ts is None or newest > status.newest_event_ts:
            status.newest_event_ts = newest

    def materialized(self, view: str, result: Materialization) -> None:
        status = self.views[view]
        status.materializations += 1
        status.last_materialization = {
            "start": result.start.isoformat() if result.start else None,
            "end": result.end.isoformat(),
            "duration_s": round(result.duration_s, 4),
            "finished_at": _iso(time.time()),
        }
        self.materialize_seconds.labels(view).set(result.duration_s)

    def materialize_failed(self, view: str, error: str) -> None:
        status = self.views[view]
        status.materialization_errors += 1
        status.last_error = f"materialize: {error}"
        status.last_error_at = time.time()
        self.materialize_errors.labels(view).inc()

    async def recover(self, repository: FeatureRepository) -> None:
        """What survived a restart: the newest offline event times, the registry's last
        materialization of each view."""
        for name, status in self.views.items():
            bounds = await asyncio.to_thread(repository.offline.event_time_range, repository.views[name])
            if bounds is not None:
                status.newest_event_ts = bounds[1]
            last = await asyncio.to_thread(repository.last_materialized, name)
            if last is not None:
                status.last_materialization = {
                    "start": last[0].isoformat(),
                    "end": last[1].isoformat(),
                    "duration_s": None,  # not kept in Feast's registry
                    "recovered_from_registry": True,
                }

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """view → its `/features/status` entry (and the freshness gauge set)."""
        now = time.time()
        views = {}
        for name, status in self.views.items():
            entry = status.as_dict(now)
            if entry["freshness_s"] is not None:
                self.freshness.labels(name).set(entry["freshness_s"])
            views[name] = entry
        return views


class ViewSinkStats(SinkStats):
    """A push sink's statistics that also count each failed attempt as its view's push error."""

    def __init__(self, status: FeatureStatus, view: str):
        super().__init__()
        self.status = status
        self.view = view

    def failed(self, error: str, *, unavailable: bool = True) -> None:
        super().failed(error, unavailable=unavailable)
        if unavailable:  # retried: a refused write is raised to the agent instead
            self.status.push_failed(self.view, error)


class FreshnessSampler:
    """One sample of what the page draws over time (a `History` ring, `/dashboard/history`):
    each view's freshness (`freshness.<view>`, s, as /features/status) and rows pushed per
    second since the last sample (`rows_per_s.<view>`). Counters already in memory: costs
    nothing on the agents' path. Before Feast is up (`ready()` false): an empty sample (a gap)."""

    def __init__(self, status: FeatureStatus, ready: Callable[[], bool], *, clock: Callable[[], float] = time.monotonic):
        self.status = status
        self.ready = ready
        self.clock = clock
        self._last: tuple[float, dict[str, int]] | None = None  # (clock time, rows pushed per view)

    def __call__(self) -> dict[str, float | None]:
        if not self.ready():
            return {}
        now = self.clock()
        views = self.status.snapshot()
        sample: dict[str, float | None] = {f"freshness.{name}": view["freshness_s"] for name, view in views.items()}
        rows = {name: view["rows_pushed"] for name, view in views.items()}
        if self._last is not None and now > self._last[0]:
            then, before = self._last
            for name, count in rows.items():
                # A view's counter only grows; one missing before (new view) is a gap.
                if name in before:
                    sample[f"rows_per_s.{name}"] = round((count - before[name]) / (now - then), 3)
        self._last = (now, rows)
        return sample
