"""hot_cache's read side: what its pages answer from Valkey, reading through to QuestDB
and ptrc's POSITIONS stream on a miss, and the counters `/cache/stats` gives."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
from prometheus_client import Counter, Histogram
from starlette.exceptions import HTTPException
from starlette.responses import Response

from ..agents.bars import BarMessageCounters, TradeBarBuilder
from ..agents.hot_cache import CacheWarmer, PositionsUnavailable, PositionsUnusable, PublishedPositions
from ..app import App
from ..core.bars import NS_PER_S
from ..sinks import SinkUnavailable
from ..stores.questdb import QuestDBError, QuestDBUnavailableError
from ..stores.questdb.read_through import QuestDBReadThrough, ReadThroughError, TableMissing
from ..stores.valkey.hot_cache import FAMILIES, ValkeyCache
from ..streams.events import Bar, PositionUpdate, Quote

log = logging.getLogger(__name__)


@dataclass
class ReadCounters:
    hits: dict[str, int] = field(default_factory=lambda: {f: 0 for f in FAMILIES})
    misses: dict[str, int] = field(default_factory=lambda: {f: 0 for f in FAMILIES})
    read_through_queries: int = 0
    read_through_not_found: int = 0
    read_through_errors: int = 0
    cache_errors: int = 0


def _rate(hits: int, misses: int) -> float | None:
    total = hits + misses
    return round(hits / total, 6) if total else None


class CachedJSON(Response):
    """A JSON answer that embeds values stored in Valkey as they are (`msgspec.Raw`):
    they were stored canonically, so decoding and re-encoding them would only cost time
    on the hot path. Everything else is encoded like `web.server.JSON`."""

    media_type = "application/json"
    _encoder = msgspec.json.Encoder(decimal_format="string")

    def render(self, content: Any) -> bytes:
        return self._encoder.encode(content)


def _raw(members: Sequence[bytes]) -> list[msgspec.Raw]:
    return [msgspec.Raw(m) for m in members]


class HotCacheReads:
    """The pages' logic: cache first, the source on a miss (QuestDB for bars and quotes,
    ptrc's POSITIONS stream for positions), fill, answer; and /cache/stats. A miss loads
    `bars_kept` bars, not just the `limit` asked for, so the next larger read is a hit.
    Raises HTTPException (404, 502, 503) for what the source cannot give."""

    def __init__(
        self,
        app: App,
        cache: ValkeyCache,
        questdb: QuestDBReadThrough,
        published: PublishedPositions,
        *,
        bars_kept: int,
    ):
        self.cache = cache
        self.questdb = questdb
        self.published = published
        self.bars_kept = bars_kept
        # The feed's figures for /cache/stats, set where this process consumes the feed
        # (None on a read replica).
        self.builder: TradeBarBuilder | None = None
        self.bar_messages: BarMessageCounters | None = None
        self.counters = ReadCounters()
        self.warmer: CacheWarmer | None = None
        self._in_flight: dict[tuple, asyncio.Future] = {}
        registry = app.metrics.registry
        self._reads = Counter(
            "hot_cache_reads_total", "Reads by key family and result", ["family", "result"], registry=registry
        )
        self._read_through_seconds = Histogram(
            "hot_cache_read_through_seconds",
            "Time to answer a miss from its source, QuestDB or the POSITIONS stream (read and cache fill)",
            ["family"],
            registry=registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )

    # -- accounting -----------------------------------------------------------------------

    def _hit(self, family: str) -> None:
        self.counters.hits[family] += 1
        self._reads.labels(family, "hit").inc()

    def _miss(self, family: str) -> None:
        self.counters.misses[family] += 1
        self._reads.labels(family, "miss").inc()

    async def _read_through(self, family: str, key: tuple, load: Callable[[], Awaitable[Any]]) -> Any:
        """Run `load` (source read + cache fill) once for concurrent misses of one key,
        mapping the source's failures to HTTP errors."""
        future = self._in_flight.get(key)
        if future is None:
            future = asyncio.ensure_future(self._load(family, load))
            self._in_flight[key] = future
            future.add_done_callback(lambda _: self._in_flight.pop(key, None))
        return await asyncio.shield(future)

    async def _load(self, family: str, load: Callable[[], Awaitable[Any]]) -> Any:
        self.counters.read_through_queries += 1
        started = time.perf_counter()
        try:
            return await load()
        except TableMissing as exc:
            self.counters.read_through_not_found += 1
            raise HTTPException(404, detail={"error": "not in QuestDB yet", "questdb": str(exc)}) from None
        except QuestDBUnavailableError as exc:
            self.counters.read_through_errors += 1
            raise HTTPException(503, detail={"error": "QuestDB unavailable", "questdb": str(exc)}) from None
        except (QuestDBError, ReadThroughError) as exc:
            self.counters.read_through_errors += 1
            raise HTTPException(502, detail={"error": "QuestDB answer unusable", "questdb": str(exc)}) from None
        except PositionsUnavailable as exc:
            self.counters.read_through_errors += 1
            raise HTTPException(503, detail={"error": "POSITIONS stream unavailable", "stream": str(exc)}) from None
        except PositionsUnusable as exc:
            self.counters.read_through_errors += 1
            raise HTTPException(502, detail={"error": "POSITIONS stream answer unusable", "stream": str(exc)}) from None
        finally:
            self._read_through_seconds.labels(family).observe(time.perf_counter() - started)

    # -- bars -----------------------------------------------------------------------------------

    async def bars(self, symbol: str, interval: str, limit: int, *, counted: bool = True) -> dict[str, Any]:
        """The answer of /bars. `counted=False` only for the dashboard's own reads
        (`/dashboard/bars`): the hit rate is the desk's, a page looking must not move it."""
        answer = {"symbol": symbol, "interval": interval}
        try:
            members, answered = await self.cache.read_bars(symbol, interval, limit)
        except SinkUnavailable:
            self.counters.cache_errors += 1
            members, answered = None, False
        if answered:
            if counted:
                self._hit("bars")
            return {**answer, "hit": True, "source": "cache", "bars": _raw(members[::-1])}
        if counted:
            self._miss("bars")
        cache_up = members is not None
        try:
            bars = await self.fill_bars(symbol, interval, cache_up=cache_up)
        except HTTPException as exc:
            if not members:
                raise
            # QuestDB cannot add to what the cache holds: serve that, and say so.
            return {**answer, "hit": False, "source": "cache", "complete": False, "read_through_error": exc.detail,
                    "bars": _raw(members[::-1])}
        if cache_up and bars:
            try:
                members, _ = await self.cache.read_bars(symbol, interval, limit)
                return {**answer, "hit": False, "source": "questdb", "bars": _raw(members[::-1])}
            except SinkUnavailable:
                self.counters.cache_errors += 1
        if not bars:
            if members:
                return {**answer, "hit": False, "source": "cache", "complete": False, "bars": _raw(members[::-1])}
            self.counters.read_through_not_found += 1
            raise HTTPException(404, detail={"error": "no bars", "symbol": symbol, "interval": interval})
        return {**answer, "hit": False, "source": "questdb", "bars": bars[-limit:]}

    async def fill_bars(self, symbol: str, interval: str, *, cache_up: bool = True) -> list[Bar]:
        """Read the newest `bars_kept` bars from QuestDB and add them to the key (once for
        concurrent callers); returns them, oldest first. Raises HTTPException."""

        async def load() -> list[Bar]:
            bars = await self.questdb.bars(symbol, interval, self.bars_kept)
            if bars and cache_up:
                try:
                    await self.cache.fill_bars(symbol, interval, bars)
                except SinkUnavailable:
                    self.counters.cache_errors += 1
            return bars

        return await self._read_through("bars", ("bars", symbol, interval), load)

    # -- quotes ---------------------------------------------------------------------------------

    async def quote(self, symbol: str) -> dict[str, Any]:
        try:
            raw = await self.cache.read_quote(symbol)
            cache_up = True
        except SinkUnavailable:
            self.counters.cache_errors += 1
            raw, cache_up = None, False
        if raw is not None:
            self._hit("quotes")
            return {"symbol": symbol, "hit": True, "source": "cache", "quote": msgspec.Raw(raw)}
        self._miss("quotes")

        async def load() -> Quote | None:
            quote = await self.questdb.quote(symbol)
            if quote is not None and cache_up:
                try:
                    await self.cache.fill_quote(quote)
                except SinkUnavailable:
                    self.counters.cache_errors += 1
            return quote

        quote = await self._read_through("quotes", ("quotes", symbol), load)
        if quote is None:
            self.counters.read_through_not_found += 1
            raise HTTPException(404, detail={"error": "no quote", "symbol": symbol})
        return {"symbol": symbol, "hit": False, "source": "questdb", "quote": quote}

    # -- positions --------------------------------------------------------------------------------

    async def positions(self, account: str) -> dict[str, Any]:
        try:
            fields, complete = await self.cache.read_positions(account)
        except SinkUnavailable:
            self.counters.cache_errors += 1
            fields, complete = None, False
        if complete:
            self._hit("positions")
            return {"account": account, "hit": True, "source": "cache", "positions": self._sorted(fields)}
        self._miss("positions")
        cache_up = fields is not None

        async def load() -> list[PositionUpdate]:
            updates = await self.published.positions(account)
            if cache_up and (updates or fields):
                try:
                    await self.cache.fill_positions(account, updates)
                except SinkUnavailable:
                    self.counters.cache_errors += 1
            return updates

        try:
            updates = await self._read_through("positions", ("positions", account), load)
        except HTTPException as exc:
            if not fields:
                raise
            return {"account": account, "hit": False, "source": "cache", "complete": False,
                    "read_through_error": exc.detail, "positions": self._sorted(fields)}
        if cache_up and (updates or fields):
            # Read back: where the live feed wrote a higher revision meanwhile, that one
            # is the position, not the stream's older message.
            try:
                fields, _ = await self.cache.read_positions(account)
                return {"account": account, "hit": False, "source": "stream", "positions": self._sorted(fields)}
            except SinkUnavailable:
                self.counters.cache_errors += 1
        if not updates:
            self.counters.read_through_not_found += 1
            raise HTTPException(404, detail={"error": "no positions", "account": account})
        return {"account": account, "hit": False, "source": "stream",
                "positions": sorted(updates, key=lambda u: u.symbol)}

    @staticmethod
    def _sorted(fields: dict[bytes, bytes]) -> list[msgspec.Raw]:
        return [msgspec.Raw(fields[symbol]) for symbol in sorted(fields)]

    # -- stats -----------------------------------------------------------------------------------

    async def stats(self) -> dict[str, Any]:
        """What /cache/stats answers. Reads are this process's; keys, memory, evictions
        and freshness are Valkey's, so they cover every hot_cache process sharing it."""
        c = self.counters
        hits, misses = sum(c.hits.values()), sum(c.misses.values())
        families: dict[str, dict[str, Any]] = {
            family: {
                "hits": c.hits[family],
                "misses": c.misses[family],
                "hit_rate": _rate(c.hits[family], c.misses[family]),
                "writes": self.cache.writes[family],
            }
            for family in FAMILIES
        }
        body: dict[str, Any] = {
            "hits": hits,
            "misses": misses,
            "hit_rate": _rate(hits, misses),
            "freshness_lag_s": None,
            "families": families,
            "read_through": {
                "queries": c.read_through_queries,
                "not_found": c.read_through_not_found,
                "errors": c.read_through_errors,
                "skipped_rows": self.questdb.skipped_rows,
            },
            "cache_errors": c.cache_errors,
            "write_pipelines": self.cache.pipelines,
            "ttl_s": self.cache.ttl_s,
            "bars_kept": self.cache.bars_kept,
        }
        if self.warmer is not None:
            body["warmer"] = {
                "queued": self.warmer.queue.qsize(),
                "warmed": self.warmer.warmed,
                "already_complete": self.warmer.already_complete,
                "errors": self.warmer.errors,
            }
        if self.builder is not None:
            body["bars"] = {
                "built_intervals": list(self.builder.intervals),
                "trades_folded": self.builder.trades_folded,
                "late_trades": self.builder.late_trades(),
                "windows_open": sum(len(t) for t in self.builder.windows.values()),
                "windows_closed": self.builder.windows_closed,
                "bar_messages_written": self.bar_messages.written,
                "bar_messages_skipped_built_interval": self.bar_messages.skipped_built_interval,
                "bar_messages_dead_lettered": self.bar_messages.dead_lettered,
            }
        try:
            server = await self.cache.server_stats()
            keys = await self.cache.count_keys()
        except SinkUnavailable as exc:
            body["valkey"] = {"ok": False, "error": str(exc)}
            return body
        now = time.time_ns()
        newest = server.pop("newest_event_ts")
        for family in FAMILIES:
            ts = newest.get(family)
            families[family]["keys"] = keys[family]
            families[family]["newest_event_ts"] = ts
            families[family]["freshness_lag_s"] = round((now - ts) / NS_PER_S, 3) if ts else None
        if newest:
            body["freshness_lag_s"] = round((now - max(newest.values())) / NS_PER_S, 3)
        body["keys"] = sum(keys.values())
        body.update(server)
        body["valkey"] = {"ok": True, "location": self.cache.store.location}
        return body

# -- the page's figures over time ------------------------------------------------------------------


class StatsSampler:
    """One sample of what the page draws over time (a `History` ring, `/dashboard/history`):
    the hit rate since the start (as /cache/stats) and over the last interval, reads per
    second, the freshness lag per family and overall, Valkey's memory.

    Cheap, since it runs every few seconds whether a page is open or not: the counters
    are in memory and Valkey is asked once (the pipeline of INFO and the newest-event
    set /cache/stats also reads), never the SCAN of the keys (/cache/stats, polled by an
    open page, gives those). Valkey away: the counters alone (the lag is a gap)."""

    def __init__(self, reads: HotCacheReads, *, clock: Callable[[], float] = time.monotonic,
                 wall_ns: Callable[[], int] = time.time_ns):
        self.reads = reads
        self.clock, self.wall_ns = clock, wall_ns
        self._last: tuple[float, int, int] | None = None  # (clock time, hits, misses)

    async def __call__(self) -> dict[str, float | None]:
        counters = self.reads.counters
        hits, misses = sum(counters.hits.values()), sum(counters.misses.values())
        now = self.clock()
        sample: dict[str, float | None] = {"hit_rate": _rate(hits, misses)}
        if self._last is not None:
            then, hits_then, misses_then = self._last
            recent_hits, recent_misses = hits - hits_then, misses - misses_then
            sample["hit_rate_recent"] = _rate(recent_hits, recent_misses)
            sample["reads_per_s"] = round((recent_hits + recent_misses) / (now - then), 3) if now > then else None
        self._last = (now, hits, misses)
        try:
            server = await self.reads.cache.server_stats()
        except SinkUnavailable:
            return sample
        now_ns = self.wall_ns()
        newest = server["newest_event_ts"]
        for family in FAMILIES:
            ts = newest.get(family)
            sample[f"lag.{family}"] = round((now_ns - ts) / NS_PER_S, 3) if ts else None
        sample["lag"] = round((now_ns - max(newest.values())) / NS_PER_S, 3) if newest else None
        sample["memory_bytes"] = server["memory"]["used_bytes"]
        return sample


# -- Valkey lost the keys: the rebuild -----------------------------------------------------------
