"""The Feast feature repository of posttrade, built from `posttrade.features.views`.

Entities `symbol` and `account` (string join keys of the same names). Every view reads
its offline rows from Parquet parts (`offline.OfflineParts`) through a `FileSource`;
stream views also have a `PushSource` over that file source (what the agents push
to), batch views only the file source (what `materialize_incremental` reads).

The repository lives in a data directory (default `$POSTTRADE_HOME/feast`):

    feature_store.yaml   for the `feast` CLI: `feast -c <dir> feature-views list`,
                         `feast -c <dir> materialize-incremental <end>` (no secrets in it)
    registry.db          Feast's file registry, written by `apply`
    online.db            the SQLite online store, when that is the one configured
    offline/<view>/      Parquet parts

Feast is configured for a machine without internet: local provider, file registry,
local Parquet, Valkey or SQLite; `FEAST_USAGE=False` is set before Feast is imported.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Iterable

os.environ.setdefault("FEAST_USAGE", "False")

import yaml  # noqa: E402
from feast import Entity, FeatureView, Field, FileSource, PushSource, ValueType  # noqa: E402
from feast.infra.offline_stores.duckdb import DuckDBOfflineStoreConfig  # noqa: E402
from feast.infra.online_stores.redis import RedisOnlineStoreConfig  # noqa: E402
from feast.infra.online_stores.sqlite import SqliteOnlineStoreConfig  # noqa: E402
from feast.repo_config import RegistryConfig, RepoConfig  # noqa: E402
from feast.types import Float64, Int64  # noqa: E402

from ...features.views import TIMESTAMP_FIELD, ViewSpec  # noqa: E402
from .client import FeastSettings  # noqa: E402
from .offline import OfflineParts  # noqa: E402

_DTYPES = {"float64": Float64, "int64": Int64}

ENTITY_DESCRIPTIONS = {
    "symbol": "An instrument, as spelled in the market data and fill events.",
    "account": "A trading account, as spelled in the order and fill events.",
}


def entities() -> dict[str, Entity]:
    return {
        name: Entity(name=name, join_keys=[name], value_type=ValueType.STRING, description=description)
        for name, description in ENTITY_DESCRIPTIONS.items()
    }


def feast_objects(views: Iterable[ViewSpec], offline: OfflineParts) -> list:
    """Every Feast object of the repository, ready for `FeatureStore.apply`."""
    by_name = entities()
    objects: list = list(by_name.values())
    for view in views:
        batch_source = FileSource(
            name=view.batch_source,
            path=offline.glob(view),
            timestamp_field=TIMESTAMP_FIELD,
            description=f"Parquet parts of {view.name}",
        )
        source = batch_source
        objects.append(batch_source)
        if view.push_source:
            source = PushSource(name=view.push_source, batch_source=batch_source)
            objects.append(source)
        objects.append(
            FeatureView(
                name=view.name,
                entities=[by_name[view.entity]],
                ttl=timedelta(seconds=view.ttl_s),
                schema=[Field(name=f.name, dtype=_DTYPES[f.dtype], description=f.description) for f in view.features],
                source=source,
                online=True,
                description=view.description,
                tags={"kind": view.kind, "owner": "feast_pipeline"},
            )
        )
    return objects


def repo_config(settings: FeastSettings) -> RepoConfig:
    if settings.online_store == "valkey":
        online = RedisOnlineStoreConfig(
            connection_string=settings.redis_connection_string(), key_ttl_seconds=settings.key_ttl_s
        )
    else:
        online = SqliteOnlineStoreConfig(path=str(settings.sqlite_path))
    return RepoConfig(
        project=settings.project,
        provider="local",
        # Loaded once and never refreshed from the file: this process is the registry's
        # only writer (its own applies and materializations update the cached copy), and
        # a refresh would stall an online read now and then.
        registry=RegistryConfig(path=str(settings.registry_path), cache_ttl_seconds=0),
        online_store=online,
        offline_store=DuckDBOfflineStoreConfig(),
        repo_path=settings.data_dir,
        entity_key_serialization_version=3,
    )


def write_cli_config(settings: FeastSettings) -> Path:
    """`feature_store.yaml` for the `feast` CLI, without credentials."""
    if settings.online_store == "valkey":
        online = {"type": "redis", "connection_string": settings.redis_connection_string(with_secrets=False)}
        if settings.key_ttl_s:
            online["key_ttl_seconds"] = settings.key_ttl_s
    else:
        online = {"type": "sqlite", "path": str(settings.sqlite_path)}
    data = {
        "project": settings.project,
        "provider": "local",
        "registry": {"path": str(settings.registry_path), "cache_ttl_seconds": 60},
        "online_store": online,
        "offline_store": {"type": "duckdb"},
        "entity_key_serialization_version": 3,
    }
    path = settings.data_dir / "feature_store.yaml"
    header = "# Written by feast_pipeline at start; a Valkey password, if any, is not in here.\n"
    path.write_text(header + yaml.safe_dump(data, sort_keys=False))
    return path
