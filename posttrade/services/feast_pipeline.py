"""feast_pipeline (port 8104): ML features computed from the NATS flow, served by Feast.

Stream agents (`posttrade.agents.features`) compute per-symbol features in event-time
windows from the market data, and per-account features from ptrc's position updates
(stream POSITIONS) and the orders, and push them to Feast's online store (Valkey by
default, SQLite as the local option) and offline store (Parquet). A timer computes the
hourly batch view from the offline store and materializes it online with
`materialize_incremental`.
The Feast feature repository (`posttrade.features.repo`) is applied at start.

Feast is imported only when the service starts, so the rest of posttrade works without
it installed (`pip install -e '.[features]'` brings it).

Endpoints (docs/feast_pipeline.md): `/health`, `/metrics`, `/features/status`,
`/features/online?symbol=…|account=…&features=…`, `POST /features/materialize`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import msgspec

from ..agents.features import MAX_FILLS_PER_ACCOUNT, FeatureAgents, FeatureChannels
from ..app import App
from ..config import ConfigError, ServiceConfig, _Section
from ..features.views import VIEWS, resolve_features
from ..web.live import History
from ..web.params import BadRequest, check_name
from ..web.server import JSON
from .wiring import new_app

# `features` of /features/online: comma-separated names out of every view's features,
# bare or `view:feature` (the entity's own are checked once the entity is known).
_FEATURE = "(?:" + "|".join(
    sorted({f for v in VIEWS.values() for f in v.feature_names} | {f"{v.name}:{f}" for v in VIEWS.values() for f in v.feature_names})
) + ")"
FEATURES_PATTERN = f"^(?:{_FEATURE}(?:,{_FEATURE})*)?$"
FEATURES = re.compile(FEATURES_PATTERN)

log = logging.getLogger(__name__)

DASHBOARD_ENTITIES = 2000  # symbols and accounts the page's pickers list at most (each)


class FeastSection(_Section):
    """Where the feature repository lives and which stores it uses."""

    project: str = "posttrade"
    # Registry, CLI config, SQLite file and Parquet parts. Default: $POSTTRADE_HOME/feast
    # (./.posttrade/feast without POSTTRADE_HOME).
    data_dir: str | None = None
    online_store: Literal["valkey", "sqlite"] = "valkey"  # valkey: the `cache.redis` server
    # direct: rows written in Feast's Redis layout, one pipelined write per batch;
    # feast: Feast's own write_to_online_store (always used for SQLite).
    online_writer: Literal["direct", "feast"] = "direct"
    key_ttl_s: int | None = None  # expire online rows (Feast's key_ttl_seconds)
    startup_timeout_s: float = 120.0  # keep retrying `feast apply` this long at start


class FeaturesSection(_Section):
    """How the features are computed and kept."""

    window_grace_s: float = 5.0  # a minute closes this long (event time) after its end
    batch_interval_s: float = 300.0  # hourly batch view + materialize_incremental
    max_hours_per_run: int = 48  # hours the batch job computes per run at most
    materialize_views: list[str] = msgspec.field(default_factory=lambda: ["symbol_hourly_features"])
    compact_interval_s: float = 600.0
    compact_after_parts: int = 200  # merge a view's Parquet parts when it has more
    # ...but only those smaller than this on disk: larger ones are left alone, so a
    # compaction reads about this much plus the newer parts, however long the history.
    compact_part_bytes: int = 16 * 2**20
    # Executions of the day the fill counts hold one by one per account (amendable);
    # older ones are folded into one record per account (docs/feast_pipeline.md, "Accounts").
    max_fills_per_account: int = MAX_FILLS_PER_ACCOUNT

    def __post_init__(self) -> None:
        unknown = [v for v in self.materialize_views if v not in VIEWS]
        if unknown:
            raise ValueError(f"unknown feature views {unknown}; the views are {sorted(VIEWS)}")
        if self.max_fills_per_account < 1:
            raise ValueError("max_fills_per_account must be >= 1")
        if self.window_grace_s < 0 or self.batch_interval_s <= 0 or self.compact_interval_s <= 0:
            raise ValueError("window_grace_s must be >= 0 and the intervals > 0")
        if self.compact_part_bytes < 1:
            raise ValueError("compact_part_bytes must be >= 1")


class FeastPipelineConfig(ServiceConfig):
    feast: FeastSection = msgspec.field(default_factory=FeastSection)
    features: FeaturesSection = msgspec.field(default_factory=FeaturesSection)


CONFIG = FeastPipelineConfig


def data_dir(config: FeastPipelineConfig) -> Path:
    if config.feast.data_dir:
        return Path(config.feast.data_dir).expanduser().absolute()
    home = os.environ.get("POSTTRADE_HOME") or ".posttrade"
    return (Path(home).expanduser() / "feast").absolute()


def feast_settings(config: FeastPipelineConfig):
    from ..features.repo import FeastSettings

    redis = config.cache.redis
    if config.feast.online_store == "valkey" and redis is None:
        raise ConfigError("feast_pipeline: feast.online_store is valkey but cache.redis is not configured")
    kwargs = {}
    if redis is not None:
        kwargs = dict(
            redis_host=redis.host,
            redis_port=redis.port,
            redis_db=redis.db,
            redis_username=redis.username,
            redis_password=redis.password,
            redis_ssl=redis.ssl,
        )
    return FeastSettings(
        project=config.feast.project,
        data_dir=data_dir(config),
        online_store=config.feast.online_store,
        key_ttl_s=config.feast.key_ttl_s,
        **kwargs,
    )


class FeastRuntime:
    """What exists once Feast is up: repository, publisher, batch job (set at start)."""

    def __init__(self, config: FeastPipelineConfig, agents: FeatureAgents):
        self.config = config
        self.agents = agents
        self.settings = None
        self.repository = None
        self.publisher = None
        self.batch_job = None
        self.valkey = None  # a RespConnection for /health
        self.writer = None  # the direct FeastRedisWriter, when used
        self.last_batch: dict | None = None
        self.batch_runs = 0
        self.batch_errors = 0
        self.last_batch_error: str | None = None
        self._batch_lock = asyncio.Lock()

    async def start(self, app: App) -> None:
        try:
            from ..features.batch import HourlyBatchJob
            from ..features.online import FeastRedisWriter, RespConnection
            from ..features.publisher import FeaturePublisher
            from ..features.store import FeatureRepository
        except ModuleNotFoundError as exc:
            raise RuntimeError(
                f"feast_pipeline needs Feast ({exc.name} is missing): pip install -e '.[features]'"
            ) from exc

        self.settings = feast_settings(self.config)
        repository = FeatureRepository(self.settings)
        deadline = time.monotonic() + self.config.feast.startup_timeout_s
        delay = 0.5
        while True:
            try:
                await asyncio.to_thread(repository.apply)
                break
            except Exception as exc:  # a store not up yet: Feast raises many kinds
                if time.monotonic() > deadline:
                    raise
                log.warning("applying the feature repository failed (%s); retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
        direct = None
        if self.settings.online_store == "valkey":

            def connection() -> RespConnection:
                return RespConnection(
                    self.settings.redis_host,
                    self.settings.redis_port,
                    db=self.settings.redis_db,
                    username=self.settings.redis_username,
                    password=self.settings.redis_password,
                    ssl=self.settings.redis_ssl,
                )

            # Its own connection: a health check must not queue behind a large write.
            self.valkey = connection()
            if self.config.feast.online_writer == "direct":
                self.writer = FeastRedisWriter(
                    connection(), self.settings.project, repository.views.values(), key_ttl_s=self.settings.key_ttl_s
                )
                direct = self.writer
        self.repository = repository
        self.publisher = FeaturePublisher(repository, direct_writer=direct, registry=app.metrics.registry)
        await self.publisher.recover()
        self.batch_job = HourlyBatchJob(repository, max_hours_per_run=self.config.features.max_hours_per_run)
        self.agents.publisher = self.publisher

    async def stop(self) -> None:
        for connection in (self.valkey, self.writer):
            if connection is not None:
                await connection.close()

    async def run_batch(self) -> dict:
        """Compute closed hours offline, then materialize the configured views online."""
        async with self._batch_lock:
            publisher = self.publisher
            try:
                run = await asyncio.to_thread(self.batch_job.run)
            except Exception as exc:
                self.batch_errors += 1
                self.last_batch_error = f"{type(exc).__name__}: {exc}"
                publisher.status[self.batch_job.target.name].error(f"batch: {self.last_batch_error}")
                raise
            target = publisher.status[self.batch_job.target.name]
            if run.rows:
                target.rows_pushed += run.rows
                target.pushes += 1
                target.last_push_at = time.time()
                publisher.rows_pushed.labels(target.name).inc(run.rows)
            if run.newest_ts is not None and (target.newest_event_ts or 0) < run.newest_ts:
                target.newest_event_ts = run.newest_ts
            materialized = {}
            for view in self.config.features.materialize_views:
                status = publisher.status[view]
                if status.newest_event_ts is None:
                    continue  # nothing offline yet
                # Up to the newest offline row (not the wall clock): rows computed later
                # for earlier event times would otherwise fall behind the materialized end.
                end = datetime.fromtimestamp(status.newest_event_ts / 1e9 + 1, tz=timezone.utc)
                result = await publisher.materialize(view, end)
                materialized[view] = None if result is None else round(result.duration_s, 4)
            self.batch_runs += 1
            self.last_batch = {
                "hours_computed": run.hours,
                "rows": run.rows,
                "duration_s": round(run.duration_s, 4),
                "materialized_s": materialized,
                "finished_at": datetime.now(timezone.utc).isoformat().replace("+00:00", "Z"),
            }
            return self.last_batch

    async def compact(self) -> dict[str, int]:
        limit = self.config.features.compact_after_parts
        part_bytes = self.config.features.compact_part_bytes
        merged = {}
        for view in self.repository.views.values():
            count = await asyncio.to_thread(self.repository.offline.compact, view, limit, part_bytes)
            if count:
                merged[view.name] = count
                log.info("compacted %d parts of %s", count, view.name)
        return merged


class FreshnessSampler:
    """One sample of what the page draws over time (a `History` ring, `/dashboard/history`):
    each view's freshness (`freshness.<view>`, s, as /features/status) and rows pushed per
    second since the last sample (`rows_per_s.<view>`). Counters already in memory: costs
    nothing on the agents' path. Before Feast is up: an empty sample (a gap)."""

    def __init__(self, runtime: FeastRuntime, *, clock: Callable[[], float] = time.monotonic):
        self.runtime = runtime
        self.clock = clock
        self._last: tuple[float, dict[str, int]] | None = None  # (clock time, rows pushed per view)

    def __call__(self) -> dict[str, float | None]:
        publisher = self.runtime.publisher
        if publisher is None:
            return {}
        now = self.clock()
        views = publisher.snapshot()["views"]
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


def known_entities(agents: FeatureAgents, limit: int) -> dict[str, list[str]]:
    """The symbols and accounts the agents hold state for (the page's pickers), sorted,
    at most `limit` of each: symbols with trades or quotes, accounts with positions or
    orders."""
    symbols = set(agents.trade_history.keys()) | set(agents.quote_tops.keys())
    accounts = {account for account, _ in agents.ptrc_positions.keys()} | set(agents.order_days.keys())
    return {"symbols": sorted(symbols)[:limit], "accounts": sorted(accounts)[:limit]}


def build(config: FeastPipelineConfig) -> App:
    return assemble(new_app(config), config)


def assemble(app: App, config: FeastPipelineConfig, channels: FeatureChannels | None = None) -> App:
    """Declare the service on `app` (tests bring their own transport and streams)."""
    agents = FeatureAgents(
        app,
        batch_size=config.batch.size,
        batch_interval_s=config.batch.interval_sec,
        window_grace_s=config.features.window_grace_s,
        channels=channels,
        reference=config.reference(),
        max_fills_per_account=config.features.max_fills_per_account,
    )
    runtime = FeastRuntime(config, agents)
    app.feast = runtime  # type: ignore[attr-defined]  # for tests and operators

    async def start_feast() -> None:
        await runtime.start(app)

    app.on_startup.append(start_feast)
    app.on_shutdown.append(runtime.stop)

    @app.timer(config.features.batch_interval_s, name="hourly_batch")
    async def hourly_batch() -> None:
        await runtime.run_batch()

    @app.timer(config.features.compact_interval_s, name="compact_offline")
    async def compact_offline() -> None:
        await runtime.compact()

    @app.health_check("feast")
    async def feast_health():
        if runtime.repository is None:
            return False, "feature repository not applied yet"
        detail = {"project": runtime.settings.project, "online_store": runtime.settings.online_store}
        if runtime.valkey is not None:
            await runtime.valkey.ping()
            detail["valkey"] = runtime.valkey.location
        return True, detail

    @app.page("/features/status", public=True)  # pipeline health: views, counts, errors
    async def features_status(request):
        """Each feature view's freshness, rows, last push and materialization, errors; the batch job.

        ---
        responses:
          200: {description: "`views`, `late_events`, `batch`", schema: {type: object}}
          503: the feature repository is not applied yet
        """
        if runtime.publisher is None:
            raise BadRequest({"error": "the feature repository is not applied yet"}, status_code=503)
        snapshot = runtime.publisher.snapshot()
        return JSON(
            {
                "service": app.name,
                "project": runtime.settings.project,
                "data_dir": str(runtime.settings.data_dir),
                **snapshot,
                "views": list(snapshot["views"].values()),
                "late_events": {
                    "trade_minutes": agents.trade_minutes.late_events,
                    "quote_minutes": agents.quote_minutes.late_events,
                },
                "batch": {
                    "interval_s": config.features.batch_interval_s,
                    "runs": runtime.batch_runs,
                    "errors": runtime.batch_errors,
                    "last_error": runtime.last_batch_error,
                    "last_run": runtime.last_batch,
                    "materialize_views": config.features.materialize_views,
                },
            }
        )

    @app.page("/features/online")
    async def features_online(request):
        """Online feature values of one symbol or one account, read through Feast.

        Give exactly one of `symbol` or `account`; `features` names features of that
        entity (`feature` or `view:feature`), anything else is a 400.

        ---
        query:
          symbol: {$ref: Name, description: the symbol whose features to read}
          account: {$ref: Name, description: the account whose features to read}
          features: {maxLength: 4000, pattern: 'FEATURES_PATTERN', description: "comma-separated feature names, `feature` or `view:feature` (default: all of the entity's)"}
        responses:
          200: {description: "`entity`, the name, `features` (name → value), `read_ms`", schema: {type: object}}
          503: the feature repository is not applied yet
        """
        params = request.query_params
        given = [name for name in ("symbol", "account") if name in params]
        if len(given) != 1:
            raise BadRequest({"parameter": "symbol|account", "error": "give exactly one of symbol or account"})
        entity = given[0]
        value = check_name(entity, params[entity])
        raw = params.get("features", "")
        if len(raw) > 4000 or not FEATURES.fullmatch(raw):
            raise BadRequest({"parameter": "features", "error": "comma-separated names of features (or view:feature), at most 4000 characters"})
        requested = raw.split(",") if raw else []
        try:
            refs = resolve_features(entity, requested)
        except KeyError as exc:
            raise BadRequest({"parameter": "features", "error": f"unknown {entity} feature {exc.args[0]!r}"}) from None
        except ValueError as exc:
            raise BadRequest({"parameter": "features", "error": str(exc)}) from None
        if runtime.repository is None:
            raise BadRequest({"error": "the feature repository is not applied yet"}, status_code=503)
        started = time.perf_counter()
        rows = await asyncio.to_thread(runtime.repository.online_features, entity, [value], refs)
        values = {ref: rows[0][ref] for ref in refs}
        return JSON(
            {"entity": entity, entity: value, "features": values, "read_ms": round((time.perf_counter() - started) * 1e3, 3)}
        )

    # -- the page's own reads (undocumented; web/dashboard) --------------------------------

    @app.page("/dashboard/entities", documented=False)  # account names: behind the token
    async def dashboard_entities(request):
        # The pickers of the online-values panel; the features of each entity kind.
        entities = known_entities(agents, DASHBOARD_ENTITIES)
        features = {
            kind: sorted(f"{v.name}:{f}" for v in VIEWS.values() if v.entity == kind for f in v.feature_names)
            for kind in ("symbol", "account")
        }
        return JSON({**entities, "limit": DASHBOARD_ENTITIES, "features": features})

    # Freshness and rows/s per view over the last hour at one sample per 2 s (1,800
    # samples of ten figures: a few hundred KB at most).
    History(FreshnessSampler(runtime)).serve(app, "/dashboard/history", public=True)

    # The document names every feature (the views are fixed in code).
    features_online.__doc__ = (features_online.__doc__ or "").replace("FEATURES_PATTERN", FEATURES_PATTERN)

    @app.page("/features/materialize", methods=("POST",))
    async def features_materialize(request):
        """Run the hourly batch and `materialize_incremental` now.

        ---
        responses:
          200: {description: "the run: hours computed, rows, durations", schema: {type: object}}
          503: the feature repository is not applied yet
        """
        if runtime.repository is None:
            raise BadRequest({"error": "the feature repository is not applied yet"}, status_code=503)
        return JSON(await runtime.run_batch())

    return app
