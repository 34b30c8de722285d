"""`FeatureRepository`: the Feast feature store of feast_pipeline, synchronous.

Feast's API blocks (file registry, DuckDB, redis-py), so the service calls these
methods from worker threads (`asyncio.to_thread`). One instance per process.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Iterable, Sequence

import pandas as pd
from feast import FeatureStore

from ...features.views import TIMESTAMP_FIELD, VIEWS, ViewSpec
from .client import FeastSettings
from .offline import OfflineParts
from .repo import feast_objects, repo_config, write_cli_config

log = logging.getLogger(__name__)

# ibis (under Feast's DuckDB offline store) warns about its own deprecated calls on every query.
warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"ibis\..*")
# Feast logs every registry reload at INFO (several per materialization).
logging.getLogger("feast.infra.registry").setLevel(logging.WARNING)


@dataclass(frozen=True)
class Materialization:
    view: str
    start: datetime | None  # None: Feast chose it (end - ttl on a first run)
    end: datetime
    duration_s: float


def utc(ts_ns: int) -> datetime:
    return datetime.fromtimestamp(ts_ns / 1e9, tz=timezone.utc)


IBIS_READ_VIEW_PREFIX = "ibis_read_parquet_"


def drop_read_views() -> int:
    """Drop the temporary views Feast's DuckDB offline store left; returns how many.

    It reads a source with `ibis.read_parquet`, which creates a view in ibis's default
    DuckDB connection every time and never drops it: about 5 KB per read, 1.6 MB a day
    at one materialization every 5 minutes, for as long as the process runs. Called
    after each read, under the offline lock (no read of ours is running then).
    """
    try:
        import ibis

        connection = ibis.get_backend().con
        names = [
            row[0]
            for row in connection.execute(
                "SELECT view_name FROM duckdb_views() WHERE temporary AND starts_with(view_name, ?)",
                [IBIS_READ_VIEW_PREFIX],
            ).fetchall()
        ]
        for name in names:
            connection.execute(f'DROP VIEW IF EXISTS "{name}"')
        return len(names)
    except Exception:  # housekeeping only: never fail a materialization for it
        log.debug("dropping ibis's read views failed", exc_info=True)
        return 0


class FeatureRepository:
    def __init__(self, settings: FeastSettings, views: Iterable[ViewSpec] | None = None):
        self.settings = settings
        self.views = {v.name: v for v in (views if views is not None else VIEWS.values())}
        self.offline = OfflineParts(settings.offline_dir)
        self._store: FeatureStore | None = None

    @property
    def store(self) -> FeatureStore:
        if self._store is None:
            raise RuntimeError("the feature repository is not applied yet")
        return self._store

    def apply(self) -> None:
        """Create the directories and apply every entity, source and view (idempotent)."""
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        for view in self.views.values():
            self.offline.ensure(view)
        store = FeatureStore(config=repo_config(self.settings))
        store.apply(feast_objects(self.views.values(), self.offline))
        write_cli_config(self.settings)
        self._store = store
        log.info("feature repository %s applied in %s", self.settings.project, self.settings.data_dir)

    # -- writes --------------------------------------------------------------------------

    def frame(self, view: ViewSpec, rows: Sequence[Sequence]) -> pd.DataFrame:
        df = pd.DataFrame.from_records(list(rows), columns=list(view.columns))
        df[TIMESTAMP_FIELD] = pd.to_datetime(df[TIMESTAMP_FIELD], unit="ns", utc=True)
        return df

    def write_online_through_feast(self, view: ViewSpec, rows: Sequence[Sequence]) -> None:
        """Feast's own online write (`push` to the online store): SQLite, or the baseline."""
        self.store.write_to_online_store(view.name, self.frame(view, rows))

    def write_offline(self, view: ViewSpec, rows: Sequence[Sequence]) -> None:
        self.offline.write(view, rows)

    # -- materialization ---------------------------------------------------------------------

    def last_materialized(self, view: str) -> tuple[datetime, datetime] | None:
        intervals = self.store.get_feature_view(view).materialization_intervals
        return intervals[-1] if intervals else None

    def materialize_incremental(self, view: str, end: datetime) -> Materialization:
        """Offline → online for rows since the last materialization, up to `end`."""
        previous = self.last_materialized(view)
        started = time.perf_counter()
        with self.offline.lock, contextlib.redirect_stdout(io.StringIO()):  # Feast prints progress bars
            try:
                self.store.materialize_incremental(end_date=end, feature_views=[view])
            finally:
                drop_read_views()
        return Materialization(view, previous[1] if previous else None, end, time.perf_counter() - started)

    def materialize(self, view: str, start: datetime, end: datetime) -> Materialization:
        """What `feast materialize START END` does, for one view."""
        started = time.perf_counter()
        with self.offline.lock, contextlib.redirect_stdout(io.StringIO()):
            try:
                self.store.materialize(start_date=start, end_date=end, feature_views=[view])
            finally:
                drop_read_views()
        return Materialization(view, start, end, time.perf_counter() - started)

    # -- reads -----------------------------------------------------------------------------

    def online_features(self, entity: str, values: list[str], refs: list[str]) -> list[dict[str, Any]]:
        """Feature values per entity value, read through Feast; keys are `view:feature`."""
        response = self.store.get_online_features(
            features=refs, entity_rows=[{entity: v} for v in values], full_feature_names=True
        ).to_dict()
        out = []
        for i, value in enumerate(values):
            row: dict[str, Any] = {entity: value}
            for ref in refs:
                row[ref] = response[ref.replace(":", "__", 1)][i]
            out.append(row)
        return out

    def training_set(self, entity_df: pd.DataFrame, refs: list[str]) -> pd.DataFrame:
        """Point-in-time correct features for each (entity, event_timestamp) row of `entity_df`.

        `get_historical_features` on the offline store: each row gets, per view, the
        newest row with event time <= its own and within the view's TTL (else null).
        """
        with self.offline.lock:
            try:
                job = self.store.get_historical_features(entity_df=entity_df, features=refs, full_feature_names=True)
                return job.to_df()
            finally:
                drop_read_views()

    def teardown(self) -> None:
        """Delete the online store's data of this project (tests and benchmarks)."""
        self.store.teardown()
