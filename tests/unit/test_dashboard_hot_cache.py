"""hot_cache's page, server side, without servers: the page's bars read answers and fails
as /bars does but is never counted as a hit or a miss; the history samples (hit rate
since the start and over the last interval, lag, memory); the key counts and the symbol
picker from one SCAN."""

from __future__ import annotations

import httpx
import msgspec
import pytest

from posttrade.web.hot_cache import ReadCounters, StatsSampler
from posttrade.config import load_config
from posttrade.services import hot_cache
from posttrade.sinks import SinkUnavailable
from posttrade.stores.valkey.hot_cache import CacheKeys, ValkeyCache
from posttrade.web.server import build_web_app

T0 = 1_700_000_000_000_000_000


def _bar(ts: int) -> bytes:
    return msgspec.json.encode(
        {"symbol": "XYZ", "interval": "1m", "open": "1", "high": "2", "low": "0.5", "close": "1.5", "volume": "10",
         "vwap": "1.25", "count": 3, "ts": ts}
    )


class FakeCache:
    """What HotCacheReads.bars reads: `held` bars (newest first) and whether they answer."""

    def __init__(self, held: list[bytes], answers: bool):
        self.held, self.answers = held, answers

    async def read_bars(self, symbol, interval, limit):
        return self.held[:limit], self.answers


class EmptyQuestDB:
    async def bars(self, symbol, interval, count):
        return []


@pytest.fixture
def service():
    config = load_config("hot_cache", hot_cache.CONFIG, env={})
    built = hot_cache.build(config)  # not started: the cache and QuestDB are replaced below
    reads = built.reads
    reads.questdb = EmptyQuestDB()
    reads.web = httpx.AsyncClient(transport=httpx.ASGITransport(app=build_web_app(built.app)), base_url="http://t")
    return reads


def _counted(service) -> tuple[int, int]:
    return sum(service.counters.hits.values()), sum(service.counters.misses.values())


async def test_the_pages_bars_read_is_the_same_answer_but_never_counted(service):
    service.cache = FakeCache([_bar(T0 + 60 * 10**9), _bar(T0)], answers=True)
    async with service.web as web:
        page = await web.get("/dashboard/bars/XYZ?interval=1m&limit=2")
        assert page.status_code == 200
        assert _counted(service) == (0, 0)
        api = await web.get("/bars/XYZ?interval=1m&limit=2")
        assert _counted(service) == (1, 0)
    assert page.json() == api.json()
    assert [bar["ts"] for bar in page.json()["bars"]] == [T0, T0 + 60 * 10**9]  # oldest first
    assert page.json()["bars"][0]["close"] == "1.5"  # decimals as strings, as stored


async def test_a_miss_of_the_page_is_not_counted_either_and_fails_as_the_api_does(service):
    service.cache = FakeCache([], answers=False)
    async with service.web as web:
        page = await web.get("/dashboard/bars/XYZ?interval=1m")
        assert _counted(service) == (0, 0)
        api = await web.get("/bars/XYZ?interval=1m")
        assert _counted(service) == (0, 1)
    assert page.status_code == api.status_code == 404
    assert page.json() == api.json()


@pytest.mark.parametrize(
    "query, parameter",
    [("XYZ?interval=7x", "interval"), ("XYZ?limit=201", "limit"), ("XYZ?limit=abc", "limit"), ("%20XY", "symbol")],
)
async def test_bad_input_to_the_page_is_the_apis_400(service, query, parameter):
    async with service.web as web:
        page = await web.get(f"/dashboard/bars/{query}")
        api = await web.get(f"/bars/{query}")
    assert page.status_code == api.status_code == 400
    assert page.json() == api.json()
    assert page.json()["detail"]["parameter"] == parameter


async def test_the_pages_routes_are_not_in_the_api_document(service):
    async with service.web as web:
        paths = (await web.get("/openapi.json")).json()["paths"]
    assert "/bars/{symbol}" in paths
    assert not [path for path in paths if path.startswith("/dashboard") or path == "/"]


# -- the history samples --------------------------------------------------------------------


class SampledCache:
    def __init__(self):
        self.down = False
        self.newest = {}

    async def server_stats(self):
        if self.down:
            raise SinkUnavailable("Valkey at test: refused")
        return {"memory": {"used_bytes": 1_048_576}, "newest_event_ts": self.newest}


class SampledService:
    def __init__(self):
        self.counters = ReadCounters()
        self.cache = SampledCache()


async def test_a_sample_has_the_hit_rate_since_the_start_and_over_the_last_interval():
    service = SampledService()
    clock = iter([100.0, 102.0, 104.0])
    sampler = StatsSampler(service, clock=lambda: next(clock), wall_ns=lambda: T0 + 3 * 10**9)
    service.cache.newest = {"bars": T0 + 2 * 10**9, "quotes": T0}

    service.counters.hits["bars"] = 9
    service.counters.misses["bars"] = 1
    first = await sampler()
    assert first["hit_rate"] == 0.9
    assert "hit_rate_recent" not in first  # nothing to compare with yet: a gap
    assert first["lag.bars"] == 1.0 and first["lag.quotes"] == 3.0 and first["lag.positions"] is None
    assert first["lag"] == 1.0  # the newest family's
    assert first["memory_bytes"] == 1_048_576

    service.counters.hits["quotes"] = 1  # 1 hit, 3 misses in the interval
    service.counters.misses["positions"] = 3
    second = await sampler()
    assert second["hit_rate"] == round(10 / 14, 6)
    assert second["hit_rate_recent"] == 0.25
    assert second["reads_per_s"] == 2.0  # 4 reads in 2 s

    third = await sampler()  # no reads: no rate (not 0 %, not 100 %)
    assert third["hit_rate_recent"] is None and third["reads_per_s"] == 0.0


async def test_with_valkey_away_a_sample_has_the_counters_alone():
    service = SampledService()
    service.cache.down = True
    service.counters.hits["bars"] = 1
    sample = await StatsSampler(service)()
    assert sample == {"hit_rate": 1.0}


# -- keys and symbols from one SCAN ---------------------------------------------------------------


class ScannedRedis:
    def __init__(self, keys: list[bytes]):
        self.keys = keys
        self.scans: list[str] = []

    async def scan_iter(self, match: str, count: int):
        self.scans.append(match)
        prefix = match.rstrip("*").encode()
        for key in self.keys:
            if key.startswith(prefix):
                yield key


class ScannedStore:
    location = "redis://test"

    def __init__(self, keys):
        self.redis = ScannedRedis(keys)


KEYS = [
    b"pt:bars:XYZ:1m", b"pt:bars:XYZ:1s", b"pt:bars:XYZ:5m", b"pt:bars:A:B:1h",  # a symbol may hold ':'
    b"pt:quote:XYZ", b"pt:pos:ACC1", b"pt:pos:ACC2", b"pt:meta:newest", b"pt:meta:sentinel:hot_cache",
    b"ptx:bars:OTHER:1m", b"pnl:whatever",  # other prefixes, other services
]


async def test_the_keys_per_family_are_counted_in_one_pass():
    cache = ValkeyCache(ScannedStore(KEYS), CacheKeys("pt"), ttl_s=300, bars_kept=200)
    assert await cache.count_keys() == {"bars": 4, "quotes": 1, "positions": 2}
    assert cache.redis.scans == ["pt:*"]


async def test_the_symbol_picker_lists_each_symbols_intervals_shortest_first():
    cache = ValkeyCache(ScannedStore(KEYS), CacheKeys("pt"), ttl_s=300, bars_kept=200)
    assert await cache.bar_series(limit=10) == {"A:B": ["1h"], "XYZ": ["1s", "1m", "5m"]}
    assert await cache.bar_series(limit=1) == {"A:B": ["1h"]}
