"""feast_pipeline (port 8104): ML features computed from the NATS flow, served by Feast.

Stream agents (`posttrade.agents.features`) compute per-symbol features in event-time
windows from the market data, and per-account features from ptrc's position updates
(stream POSITIONS) and the orders; their sinks (`posttrade.stores.feast.sink`) write the
rows to Feast's online store (Valkey by default, SQLite as the local option) and offline
store (Parquet) before each batch is acknowledged. A timer computes the hourly batch
view from the offline store and materializes it online (`HourlyBatch`). The Feast
feature repository (`posttrade.stores.feast.repo`) is applied at start.

Feast is imported only when the service starts, so the rest of posttrade works without
it installed (`pip install -e '.[features]'` brings it).

Endpoints (docs/feast_pipeline.md): `/health`, `/metrics`, `/features/status`,
`/features/online?symbol=…|account=…&features=…`, `POST /features/materialize`.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import msgspec

from ..agents.features import MAX_FILLS_PER_ACCOUNT, FeatureAgents, FeatureSinks, HourlyBatch, known_entities
from ..config import ConfigError, ServiceConfig, _Section
from ..features.views import FEATURES_PATTERN, SYMBOL_HOURLY_FEATURES, VIEWS, resolve_features
from ..sinks import RetryPolicy
from ..stores.feast.client import FeastClient, FeastSettings, repository_for
from ..stores.feast.sink import FeastPushSink, FeastRegistrySink
from ..stores.feast.status import FeatureStatus, FreshnessSampler
from ..streams.transport import Transport
from ..web.live import History
from ..web.params import BadRequest, check_name
from ..web.server import JSON
from .base import Service
from .wiring import new_app

FEATURES = re.compile(FEATURES_PATTERN)
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


def feast_settings(config: FeastPipelineConfig) -> FeastSettings:
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


@dataclass
class FeastPipelineService(Service):
    agents: FeatureAgents  # the stream agents, their tables and sinks
    feast: FeastClient  # the repository and the online writer, once started
    status: FeatureStatus  # per view: rows, freshness, materializations, errors
    batch: HourlyBatch  # the hourly view and materialization


def build(config: FeastPipelineConfig, *, transport: Transport | None = None) -> FeastPipelineService:
    """The service on NATS (or `transport`); Feast is opened when it starts."""
    app = new_app(config, transport)
    retry = RetryPolicy.from_config(config.batch)
    feast = FeastClient(config.feast.online_writer)
    status = FeatureStatus(app.metrics.registry)
    agents = FeatureAgents(
        app,
        FeatureSinks.to_feast(feast, status, retry),
        batch_size=config.batch.size,
        batch_interval_s=config.batch.interval_sec,
        window_grace_s=config.features.window_grace_s,
        reference=config.reference(),
        max_fills_per_account=config.features.max_fills_per_account,
    )
    hourly_rows = FeastPushSink(SYMBOL_HOURLY_FEATURES, feast, status, retry, writer="hourly_batch", online=False)
    batch = HourlyBatch(
        feast,
        status,
        app.sink(hourly_rows),
        max_hours_per_run=config.features.max_hours_per_run,
        materialize_views=config.features.materialize_views,
    )
    registry = app.sink(FeastRegistrySink(retry))  # applies the repository at start
    service = FeastPipelineService(app, config, agents, feast, status, batch)

    async def start_feast() -> None:
        repository = repository_for(feast_settings(config))
        await registry.apply(repository, config.feast.startup_timeout_s)
        await feast.open(repository)
        await status.recover(repository)

    app.on_startup.append(start_feast)
    app.on_shutdown.append(feast.close)

    @app.timer(config.features.batch_interval_s, name="hourly_batch")
    async def hourly_batch() -> None:
        await batch.run()

    @app.timer(config.features.compact_interval_s, name="compact_offline")
    async def compact_offline() -> None:
        await feast.compact(config.features.compact_after_parts, config.features.compact_part_bytes)

    install_pages(service)
    return service


def install_pages(service: FeastPipelineService) -> None:
    app, config, feast, status, agents = service.app, service.config, service.feast, service.status, service.agents

    @app.health_check("feast")
    async def feast_health():
        if not feast.ready:
            return False, "feature repository not applied yet"
        return True, await feast.health()

    @app.page("/features/status", public=True)  # pipeline health: views, counts, errors
    async def features_status(request):
        """Each feature view's freshness, rows, last push and materialization, errors; the batch job.

        ---
        responses:
          200: {description: "`views`, `late_events`, `batch`", schema: {type: object}}
          503: the feature repository is not applied yet
        """
        if not feast.ready:
            raise BadRequest({"error": "the feature repository is not applied yet"}, status_code=503)
        batch = service.batch
        return JSON(
            {
                "service": app.name,
                "project": feast.settings.project,
                "data_dir": str(feast.settings.data_dir),
                "online_store": feast.settings.online_store,
                "online_writer": feast.online_path,
                "views": list(status.snapshot().values()),
                "late_events": {
                    "trade_minutes": agents.trade_minutes.late_events,
                    "quote_minutes": agents.quote_minutes.late_events,
                },
                "batch": {
                    "interval_s": config.features.batch_interval_s,
                    "runs": batch.runs,
                    "errors": batch.errors,
                    "last_error": batch.last_error,
                    "last_run": batch.last_run,
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
        if not feast.ready:
            raise BadRequest({"error": "the feature repository is not applied yet"}, status_code=503)
        started = time.perf_counter()
        rows = await feast.online_features(entity, [value], refs)
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
    History(FreshnessSampler(status, lambda: feast.ready)).serve(app, "/dashboard/history", public=True)

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
        if not feast.ready:
            raise BadRequest({"error": "the feature repository is not applied yet"}, status_code=503)
        return JSON(await service.batch.run())
