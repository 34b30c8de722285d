"""The Feast sinks: feature rows into Feast's stores, the repository into its registry.

* `FeastPushSink` — one view's rows from one writer (an agent, or the hourly batch job):
  online first (the newest row per entity: `FeastClient.write_online`), then offline
  (every row, one Parquet part: `write_offline`), the way Feast's push to
  `ONLINE_AND_OFFLINE` goes; a batch view's rows go offline only (materialization brings
  them online). Declared with its agent, it is flushed before the batch is acknowledged,
  so the input is acknowledged only once both stores have its rows. A store that fails
  (Valkey away, a disk error, SQLite locked) is retried under the service's policy for
  as long as it takes, and each failed attempt is counted as the view's push error
  (`/features/status`); an attempt after the online write succeeded writes offline only.
  Any other error means the rows can never be written (`SinkRefused`).
* `Turns` — the writes of one view from more than one agent that must reach the online
  store in the order their rows were computed (`account_order_features`, from the
  positions and the orders agents): a turn is taken when rows are added (no await in
  between: in the order they were computed) and the online write waits for the turns
  before it.
* `FeastRegistrySink` — applying the repository at start (Feast's registry and the online
  store's tables), retried until the stores are up, within the start-up timeout.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from redis.exceptions import RedisError

from ...features.views import ViewSpec
from ...sinks import RetryPolicy, Sink, SinkRefused, SinkStopping, SinkUnavailable, wait_set
from .client import FeastClient
from .status import FeatureStatus, ViewSinkStats

if TYPE_CHECKING:
    from .store import FeatureRepository

# What a store that is away or busy raises: Valkey (redis-py, or the direct writer's
# RedisWriteError, a ConnectionError), the disk and sockets (OSError, TimeoutError),
# SQLite ("database is locked").
STORE_AWAY = (RedisError, OSError, sqlite3.OperationalError)


class Turns:
    def __init__(self) -> None:
        self._taken = 0
        self._open: dict[int, asyncio.Event] = {}  # turns taken and not over, oldest first

    def take(self) -> int:
        self._taken += 1
        self._open[self._taken] = asyncio.Event()
        return self._taken

    def end(self, turn: int) -> None:
        over = self._open.pop(turn, None)
        if over is not None:
            over.set()

    async def wait(self, turn: int, stopping: Callable[[], bool]) -> None:
        """Return once every turn taken before `turn` is over."""
        while (first := next(iter(self._open), turn)) < turn:
            if stopping():
                raise SinkStopping(f"stopping while waiting for the write of turn {first}")
            await wait_set(self._open[first], 0.25)


class FeastPushSink(Sink[tuple]):
    def __init__(
        self,
        view: ViewSpec,
        feast: FeastClient,
        status: FeatureStatus,
        retry: RetryPolicy,
        *,
        writer: str,
        online: bool = True,
        turns: Turns | None = None,
    ):
        super().__init__(f"feast.{view.name}.{writer}", retry, stats=ViewSinkStats(status, view.name))
        self.view = view
        self.feast = feast
        self.status = status
        self.online = online
        self.turns = turns
        self._turn: int | None = None  # the turn of the rows added and not yet written online
        # The batch being written (the same list on every attempt), when it started, and
        # whether its online write is done.
        self._batch: list | None = None
        self._started = 0.0
        self._online_done = False

    def add(self, item: tuple) -> None:
        self._take_turn()
        super().add(item)

    def extend(self, items: list[tuple]) -> None:
        if items:
            self._take_turn()
            super().extend(items)

    def discard(self) -> None:
        self._end_turn()
        self._batch = None
        super().discard()

    def _take_turn(self) -> None:
        if self.turns is not None and self._turn is None:
            self._turn = self.turns.take()

    def _end_turn(self) -> None:
        if self.turns is not None and self._turn is not None:
            self.turns.end(self._turn)
            self._turn = None

    async def write(self, batch: list[tuple]) -> None:
        if batch is not self._batch:
            self._batch, self._started, self._online_done = batch, time.perf_counter(), not self.online
        try:
            if not self._online_done:
                if self._turn is not None:
                    await self.turns.wait(self._turn, self.stopping)
                entities = await self.feast.write_online(self.view, batch)
                self._online_done = True
                self._end_turn()
                self.status.written_online(self.view.name, entities)
            await asyncio.to_thread(self.feast.write_offline, self.view, batch)
        except SinkStopping:
            raise
        except STORE_AWAY as exc:
            raise SinkUnavailable(f"{type(exc).__name__}: {exc}") from exc
        except Exception as exc:
            raise SinkRefused(f"{self.view.name}: {type(exc).__name__}: {exc}") from exc
        self._batch = None
        self.status.pushed(self.view.name, batch, time.perf_counter() - self._started)


class FeastRegistrySink(Sink["FeatureRepository"]):
    def __init__(self, retry: RetryPolicy):
        super().__init__("feast.registry", retry)

    async def write(self, batch: Sequence[FeatureRepository]) -> None:
        # Every kind of error is retried: Feast raises many while a store is not up yet.
        await asyncio.to_thread(batch[-1].apply)

    async def apply(self, repository: FeatureRepository, timeout_s: float) -> None:
        """Apply `repository`, retrying until it is done; RuntimeError after `timeout_s`."""
        self.add(repository)
        try:
            await asyncio.wait_for(self.flush(), timeout_s)
        except TimeoutError:
            self.discard()
            raise RuntimeError(
                f"the feature repository could not be applied in {timeout_s} s: {self.stats.last_error}"
            ) from None
