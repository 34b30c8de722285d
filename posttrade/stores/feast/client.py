"""`FeastClient`: Feast as feast_pipeline uses it, once started; `FeastSettings`: where
its repository lives and which stores it uses.

The feature repository (registry, offline parts, Feast's own online path), the direct
online writer when the online store is Valkey (`feast.online_writer: direct`), and a
Valkey connection of its own for `/health`. Made empty at build; `open` (at start, after
the repository is applied) imports Feast, so the rest of posttrade works without it.

Writes go through the sinks (`sink`), which call `write_online` / `write_offline` here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ...features.views import ViewSpec

if TYPE_CHECKING:
    from .online import FeastRedisWriter, RespConnection
    from .store import FeatureRepository, Materialization

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FeastSettings:
    """The repository's project, data directory (registry, CLI config, SQLite file,
    Parquet parts) and online store (Valkey: its server)."""

    project: str
    data_dir: Path
    online_store: Literal["valkey", "sqlite"] = "valkey"
    redis_host: str = "127.0.0.1"
    redis_port: int = 6379
    redis_db: int = 0
    redis_username: str | None = None
    redis_password: str | None = None
    redis_ssl: bool = False
    key_ttl_s: int | None = None

    @property
    def registry_path(self) -> Path:
        return self.data_dir / "registry.db"

    @property
    def sqlite_path(self) -> Path:
        return self.data_dir / "online.db"

    @property
    def offline_dir(self) -> Path:
        return self.data_dir / "offline"

    def redis_connection_string(self, *, with_secrets: bool = True) -> str:
        parts = [f"{self.redis_host}:{self.redis_port}", f"db={self.redis_db}"]
        if self.redis_ssl:
            parts.append("ssl=true")
        if with_secrets and self.redis_username:
            parts.append(f"username={self.redis_username}")
        if with_secrets and self.redis_password:
            parts.append(f"password={self.redis_password}")
        return ",".join(parts)


def repository_for(settings: FeastSettings) -> FeatureRepository:
    """The feature repository of `settings`, not applied yet (imports Feast)."""
    try:
        from .store import FeatureRepository
    except ModuleNotFoundError as exc:
        raise RuntimeError(f"feast_pipeline needs Feast ({exc.name} is missing): pip install -e '.[features]'") from exc
    return FeatureRepository(settings)


class FeastClient:
    def __init__(self, online_writer: Literal["direct", "feast"] = "direct"):
        self.online_writer = online_writer
        self.repository: FeatureRepository | None = None  # set by `open`
        self.writer: FeastRedisWriter | None = None  # the direct writer, when used
        self.valkey: RespConnection | None = None  # /health's: never queued behind a large write
        # Feast's own online write path (SQLite: one shared connection) is not safe from
        # several threads at once; the agents' pushes and materialization take turns.
        self._feast_online = asyncio.Lock()

    @property
    def ready(self) -> bool:
        return self.repository is not None

    @property
    def settings(self) -> FeastSettings:
        return self.repository_or_fail().settings

    def repository_or_fail(self) -> FeatureRepository:
        if self.repository is None:
            raise RuntimeError("the feature repository is not applied yet")
        return self.repository

    async def open(self, repository: FeatureRepository) -> None:
        """Start using `repository` (applied): connect the online writer."""
        from .online import FeastRedisWriter, RespConnection

        settings = repository.settings
        if settings.online_store == "valkey":

            def connection() -> RespConnection:
                return RespConnection(
                    settings.redis_host,
                    settings.redis_port,
                    db=settings.redis_db,
                    username=settings.redis_username,
                    password=settings.redis_password,
                    ssl=settings.redis_ssl,
                )

            self.valkey = connection()
            if self.online_writer == "direct":
                self.writer = FeastRedisWriter(
                    connection(), settings.project, repository.views.values(), key_ttl_s=settings.key_ttl_s
                )
        self.repository = repository

    async def close(self) -> None:
        for connection in (self.valkey, self.writer):
            if connection is not None:
                await connection.close()

    @property
    def online_path(self) -> str:
        if self.writer is not None:
            return "direct (Feast Redis layout, one pipelined write per batch)"
        return f"feast write_to_online_store ({self.settings.online_store})"

    # -- writes (from the sinks) ------------------------------------------------------------

    async def write_online(self, view: ViewSpec, rows: Sequence[Sequence]) -> int:
        """The newest row of each entity online; returns how many entities were written."""
        if self.writer is not None:
            return await self.writer.write(view.name, rows)
        from .online import newest_per_entity

        newest = newest_per_entity(rows)  # Feast's SQLite store keeps the last row it is given
        repository = self.repository_or_fail()
        async with self._feast_online:
            await asyncio.to_thread(repository.write_online_through_feast, view, newest)
        return len(newest)

    def write_offline(self, view: ViewSpec, rows: Sequence[Sequence]) -> None:
        """Every row offline, as one Parquet part (blocking: call it from a thread)."""
        self.repository_or_fail().write_offline(view, rows)

    # -- Feast's own jobs ---------------------------------------------------------------------

    async def materialize(self, view: str, end: datetime) -> Materialization:
        """`materialize_incremental` of one view up to `end` (offline → online)."""
        repository = self.repository_or_fail()
        async with self._feast_online:  # materialization writes online too
            return await asyncio.to_thread(repository.materialize_incremental, view, end)

    async def compact(self, max_parts: int, part_bytes: int) -> dict[str, int]:
        """Merge each view's small offline parts once it has more than `max_parts`;
        returns how many parts were merged per view (views with none left out)."""
        repository = self.repository_or_fail()
        merged = {}
        for view in repository.views.values():
            count = await asyncio.to_thread(repository.offline.compact, view, max_parts, part_bytes)
            if count:
                merged[view.name] = count
                log.info("compacted %d parts of %s", count, view.name)
        return merged

    # -- reads ----------------------------------------------------------------------------------

    async def online_features(self, entity: str, values: list[str], refs: list[str]) -> list[dict[str, Any]]:
        return await asyncio.to_thread(self.repository_or_fail().online_features, entity, values, refs)

    async def health(self) -> dict[str, Any]:
        """What `/health` shows of Feast (the Valkey online store answering PING)."""
        settings = self.settings
        detail: dict[str, Any] = {"project": settings.project, "online_store": settings.online_store}
        if self.valkey is not None:
            await self.valkey.ping()
            detail["valkey"] = self.valkey.location
        return detail
