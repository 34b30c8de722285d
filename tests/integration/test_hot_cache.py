"""hot_cache on the real servers: NATS JetStream, Valkey and QuestDB of the local stack.

Every test gets its own streams, QuestDB tables, Valkey key prefix and app name (uuid
suffixes), and removes them afterwards: the stack is shared.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from decimal import Decimal

import httpx
import msgspec
import nats
import pytest

from posttrade.config import load_config
from posttrade.services import hot_cache
from posttrade.services.hot_cache import HotCacheChannels, CachedPosition
from posttrade.stores.questdb import QuestDBClient
from posttrade.stores.valkey import open_valkey
from posttrade.streams.events import Bar, MarketTrade, Quote, encode
from posttrade.web.server import build_web_app
from tests.unit.test_bars import BASE, FIRST_MINUTE, FIVE_MINUTES, S, SECOND_MINUTE, TAPE, trade

D = Decimal


def as_json(event) -> dict:
    return json.loads(encode(event))


@dataclass
class Names:
    suffix: str

    @property
    def app(self) -> str:
        return f"hc_{self.suffix}"

    @property
    def prefix(self) -> str:
        return f"pt{self.suffix}"

    def stream(self, kind: str) -> str:
        return f"HCT_{kind}_{self.suffix.upper()}"

    def subject(self, kind: str, *tokens: str) -> str:
        return ".".join([f"hct{self.suffix}", kind, *tokens])

    def table(self, kind: str) -> str:
        return f"hct_{kind}_{self.suffix}"

    def channels(self, app) -> HotCacheChannels:
        def channel(name, kind, value_type):
            subjects = [self.subject(kind, ">")]
            return app.channel(name, stream=self.stream(kind), subjects=subjects, value_type=value_type)

        return HotCacheChannels(
            trades=channel("market_trades", "TRADES", MarketTrade),
            bars=channel("bars", "BARS", Bar),
            quotes=channel("quotes", "QUOTES", Quote),
            positions=channel("positions", "POSITIONS", CachedPosition),
        )


@dataclass
class Service:
    names: Names
    app: object
    http: httpx.AsyncClient
    js: object
    valkey: object
    qdb: QuestDBClient

    async def publish(self, kind: str, key: str, event) -> None:
        await self.js.publish(self.names.subject(kind, key), encode(event))

    async def wait_processed(self, agent: str, kind: str, count: int, timeout: float = 20.0) -> None:
        durable = f"{self.names.app}-{agent}"
        deadline = time.monotonic() + timeout
        while True:
            try:
                info = await self.js.consumer_info(self.names.stream(kind), durable)
                if info.ack_floor.stream_seq >= count:
                    return
            except nats.js.errors.NotFoundError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"{durable} did not process {count} messages in {timeout}s")
            await asyncio.sleep(0.05)

    async def get(self, path: str) -> tuple[int, dict]:
        response = await self.http.get(path)
        return response.status_code, response.json()


@pytest.fixture
async def service_factory(stack) -> AsyncIterator:
    """Start hot_cache with its own names; `overrides` are config env overrides."""
    started: list[tuple] = []
    nc = await nats.connect(stack.nats_url)
    js = nc.jetstream()
    valkey = open_valkey(host=stack.valkey_host, port=stack.valkey_port, db=4)
    qdb = QuestDBClient(host=stack.questdb_host, port=stack.questdb_http_port)

    async def start(**overrides: str) -> Service:
        names = Names(uuid.uuid4().hex[:10])
        env = {
            **stack.service_env(),
            "POSTTRADE_HOT_CACHE__SERVICE__NAME": names.app,
            "POSTTRADE_HOT_CACHE__HOT_CACHE__KEY_PREFIX": names.prefix,
            "POSTTRADE_HOT_CACHE__HOT_CACHE__WRITE_WITHIN_S": "0.02",
            "POSTTRADE_HOT_CACHE__RUNTIME__BATCH_SIZE": "3",
            # Off unless a test turns it on: its background fills would race the misses tested.
            "POSTTRADE_HOT_CACHE__HOT_CACHE__WARM_CONCURRENCY": "0",
        }
        for kind in ("market_trades", "quotes", "bars", "fills"):
            env[f"POSTTRADE_HOT_CACHE__HOT_CACHE__READ_THROUGH__TABLES__{kind.upper()}"] = names.table(kind)
        env.update({f"POSTTRADE_HOT_CACHE__{k.upper()}": v for k, v in overrides.items()})
        config = load_config("hot_cache", hot_cache.CONFIG, env=env)
        app = hot_cache.build(config, channels=names.channels)
        app.runtime.poll_timeout_s = 0.05
        await app.start()
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app=build_web_app(app)), base_url="http://test")
        started.append((names, app, http))
        return Service(names, app, http, js, valkey, qdb)

    yield start

    for names, app, http in started:
        await http.aclose()
        await app.stop()
        for kind in ("TRADES", "BARS", "QUOTES", "POSITIONS"):
            try:
                await js.delete_stream(names.stream(kind))
            except nats.js.errors.NotFoundError:
                pass
        for windowed in app.tables.values():
            for table in (windowed.table, windowed.meta):
                try:
                    await js.delete_key_value(table.bucket)
                except nats.js.errors.NotFoundError:
                    pass
        keys = [k async for k in valkey.redis.scan_iter(match=f"{names.prefix}:*")]
        if keys:
            await valkey.redis.delete(*keys)
        for kind in ("market_trades", "quotes", "bars", "fills"):
            await qdb.drop_table(names.table(kind))
    await valkey.close()
    await qdb.close()
    await nc.close()


async def test_bars_built_from_trades_are_served_from_valkey(service_factory):
    svc = await service_factory()
    for t in TAPE:
        await svc.publish("TRADES", t.symbol, t)
    await svc.wait_processed("build_bars", "TRADES", len(TAPE))

    status, body = await svc.get("/bars/XYZ?interval=1m&limit=2")
    assert status == 200, body
    assert (body["hit"], body["source"]) == (True, "cache")
    assert body["bars"] == [as_json(FIRST_MINUTE), as_json(SECOND_MINUTE)]  # oldest first

    status, body = await svc.get("/bars/XYZ?interval=5m&limit=1")
    assert body["hit"] and body["bars"] == [as_json(FIVE_MINUTES)]
    status, body = await svc.get("/bars/XYZ?interval=1s&limit=1")
    assert body["hit"] and body["bars"][0]["ts"] == BASE + 70 * S

    # The key scheme: one sorted set per (symbol, interval), scored by open time in ms, with the TTL.
    key = f"{svc.names.prefix}:bars:XYZ:1m"
    members = await svc.valkey.redis.zrange(key, 0, -1, withscores=True)
    assert [score for _, score in members] == [BASE // 1_000_000, (BASE + 60 * S) // 1_000_000]
    assert 290 <= await svc.valkey.redis.ttl(key) <= 300

    # More bars than the cache holds, and nothing in QuestDB (its table does not exist):
    # the cache's bars are served, marked incomplete, instead of an error.
    status, body = await svc.get("/bars/XYZ?interval=1m&limit=5")
    assert status == 200
    assert (body["hit"], body["complete"], len(body["bars"])) == (False, False, 2)
    assert "does not exist" in body["read_through_error"]["questdb"]

    status, stats = await svc.get("/cache/stats")
    assert stats["bars"]["late_trades"] == {"1s": 2, "1m": 1, "5m": 0}
    assert stats["families"]["bars"]["keys"] == 3
    assert stats["families"]["bars"]["newest_event_ts"] == BASE + 70 * S


async def create_market_data_tables(svc: Service) -> None:
    qdb, names = svc.qdb, svc.names
    await qdb.create_table(
        names.table("market_trades"),
        # The layout questdb_writer uses: TIMESTAMP_NS, money and sizes DECIMAL(38, 12).
        {"ts": "TIMESTAMP_NS", "symbol": "SYMBOL", "price": "DECIMAL(38,12)", "size": "DECIMAL(38,12)",
         "trade_id": "VARCHAR"},
    )
    rows = [t for t in TAPE if t.ts not in (BASE + S // 2, BASE + 30 * S)]  # the two late ones
    values = ", ".join(
        f"({t.ts}::timestamp_ns, 'RT', '{t.price}'::decimal(38,12), '{t.size}'::decimal(38,12), 't{i}')"
        for i, t in enumerate(rows)
    )
    await qdb.execute(f"INSERT INTO {names.table('market_trades')} VALUES {values}")
    await qdb.wait_visible(names.table("market_trades"), len(rows))

    # DOUBLE columns (another writer's choice) are read through their shortest repr.
    await qdb.create_table(
        names.table("quotes"),
        {"symbol": "SYMBOL", "bid": "DOUBLE", "ask": "DOUBLE", "bid_size": "DOUBLE", "ask_size": "DOUBLE",
         "venue": "SYMBOL"},
    )
    await qdb.execute(
        f"INSERT INTO {names.table('quotes')} VALUES "
        f"('2023-11-14T22:15:00.000000Z', 'XYZ', 117.5, 118.5, 300, 200, 'X'),"
        f"('2023-11-14T22:14:00.000000Z', 'XYZ', 100, 101, 1, 1, 'X')"
    )
    await qdb.wait_visible(names.table("quotes"), 2)

    await qdb.create_table(
        names.table("bars"),
        {"ts": "TIMESTAMP_NS", "symbol": "SYMBOL", "interval": "SYMBOL", **{c: "DECIMAL(38,12)" for c in (
            "open", "high", "low", "close", "volume", "vwap")}, "count": "LONG"},
    )
    hour = "'2023-11-14T22:00:00.000000Z'"
    await qdb.execute(
        f"INSERT INTO {names.table('bars')} VALUES "
        f"({hour}, 'RT', '1h', '10'::decimal(38,12), '12'::decimal(38,12), '9.5'::decimal(38,12),"
        f" '11'::decimal(38,12), '1000'::decimal(38,12), '10.8'::decimal(38,12), 42)"
    )
    await qdb.wait_visible(names.table("bars"), 1)


async def test_a_miss_is_read_through_from_questdb_then_served_from_valkey(service_factory):
    svc = await service_factory()
    await create_market_data_tables(svc)

    # Bars of a built interval are aggregated from market_trades (the late trades are not in it):
    # first minute 100x10 + 101.5x5 + 99.75x20 + 100.25x15: volume 50, notional 5006.25, vwap 100.125.
    status, body = await svc.get("/bars/RT?interval=1m&limit=2")
    assert status == 200, body
    assert (body["hit"], body["source"]) == (False, "questdb")
    first = Bar(ts=BASE, symbol="RT", interval="1m", open=D("100"), high=D("101.5"), low=D("99.75"),
                close=D("100.25"), volume=D("50"), vwap=D("100.125"), count=4)
    second = msgspec.structs.replace(SECOND_MINUTE, symbol="RT")
    assert body["bars"] == [as_json(first), as_json(second)]
    # The fill marked the key complete: a larger limit is still a hit (everything there is).
    status, body = await svc.get("/bars/RT?interval=1m&limit=50")
    assert (body["hit"], body["source"], len(body["bars"])) == (True, "cache", 2)

    # Other intervals come from the bars table (bar messages that questdb_writer stored).
    status, body = await svc.get("/bars/RT?interval=1h&limit=1")
    assert (status, body["hit"], body["source"]) == (200, False, "questdb")
    assert body["bars"][0] == {"ts": 1699999200000000000, "symbol": "RT", "interval": "1h", "open": "10",
                               "high": "12", "low": "9.5", "close": "11", "volume": "1000", "vwap": "10.8",
                               "count": 42}

    # Quotes: the newest row (DOUBLE columns read through their shortest repr).
    status, body = await svc.get("/quotes/XYZ")
    assert (status, body["hit"], body["quote"]["bid"], body["quote"]["ask"]) == (200, False, "117.5", "118.5")
    status, body = await svc.get("/quotes/XYZ")
    assert (body["hit"], body["source"], body["quote"]["bid_size"]) == (True, "cache", "300")

    # Nothing anywhere: 404 JSON, never 500.
    status, body = await svc.get("/bars/NOPE?interval=1m")
    assert (status, body["error"]) == (404, "not found")
    status, body = await svc.get("/quotes/NOPE")
    assert status == 404
    status, body = await svc.get("/positions/A1")  # the fills table does not exist yet
    assert (status, body["error"]) == (404, "not found") and "does not exist" in body["detail"]["questdb"]

    status, stats = await svc.get("/cache/stats")
    assert stats["families"]["bars"]["hits"] == 1 and stats["families"]["bars"]["misses"] == 3
    assert stats["families"]["quotes"]["hit_rate"] == 0.333333
    assert stats["read_through"]["queries"] >= 5


async def test_a_read_through_never_overwrites_a_bar_the_feed_wrote(service_factory):
    svc = await service_factory()
    for t in TAPE:
        await svc.publish("TRADES", t.symbol, t)
    await svc.wait_processed("build_bars", "TRADES", len(TAPE))
    # QuestDB lags the feed: it has an earlier minute, and only the first trade of BASE's.
    table = svc.names.table("market_trades")
    await svc.qdb.create_table(table, {"ts": "TIMESTAMP_NS", "symbol": "SYMBOL", "price": "DECIMAL(38,12)",
                                       "size": "DECIMAL(38,12)"})
    await svc.qdb.execute(
        f"INSERT INTO {table} VALUES ({BASE - 30 * S}::timestamp_ns, 'XYZ', '97'::decimal(38,12), '1'::decimal(38,12)),"
        f" ({BASE + S}::timestamp_ns, 'XYZ', '100'::decimal(38,12), '10'::decimal(38,12))"
    )
    await svc.qdb.wait_visible(table, 2)

    status, body = await svc.get("/bars/XYZ?interval=1m&limit=3")
    assert (status, body["hit"], body["source"]) == (200, False, "questdb")
    earlier = Bar(ts=BASE - 60 * S, symbol="XYZ", interval="1m", open=D("97"), high=D("97"), low=D("97"),
                  close=D("97"), volume=D("1"), vwap=D("97"), count=1)
    assert body["bars"] == [as_json(earlier), as_json(FIRST_MINUTE), as_json(SECOND_MINUTE)]
    status, body = await svc.get("/bars/XYZ?interval=1m&limit=3")
    assert body["hit"] and len(body["bars"]) == 3


async def test_the_warmer_fills_new_keys_from_questdb_before_they_are_read(service_factory):
    svc = await service_factory(hot_cache__warm_concurrency="2")
    await create_market_data_tables(svc)  # RT: two minutes of trades in QuestDB
    live = trade("125", "103", "1", symbol="RT")  # the feed then builds the third minute
    await svc.publish("TRADES", "RT", live)
    await svc.wait_processed("build_bars", "TRADES", 1)
    deadline = time.monotonic() + 20
    while True:
        status, stats = await svc.get("/cache/stats")
        if stats["warmer"]["warmed"] >= 3:  # 1s, 1m and 5m
            break
        assert time.monotonic() < deadline, stats["warmer"]
        await asyncio.sleep(0.1)

    status, body = await svc.get("/bars/RT?interval=1m&limit=50")
    assert (status, body["hit"], body["source"]) == (200, True, "cache")
    assert [b["ts"] for b in body["bars"]] == [BASE, BASE + 60 * S, BASE + 120 * S]
    assert body["bars"][2]["close"] == "103"
    assert (stats["hits"], stats["misses"]) == (0, 0)  # warming is not reading


async def test_positions_are_rebuilt_from_fills_on_a_miss(service_factory):
    svc = await service_factory()
    await create_market_data_tables(svc)
    fills = svc.names.table("fills")
    await svc.qdb.create_table(
        fills,
        {"ts": "TIMESTAMP_NS", "fill_id": "VARCHAR", "account": "SYMBOL", "symbol": "SYMBOL", "side": "SYMBOL",
         "qty": "DECIMAL(38,12)", "price": "DECIMAL(38,12)", "fee": "DECIMAL(38,12)"},
        dedup_keys=["fill_id"],
    )
    rows = [("f1", "XYZ", "BUY", "10", "100", "1"), ("f2", "XYZ", "BUY", "10", "110", "1"),
            ("f3", "XYZ", "SELL", "5", "120", "0.5"), ("f4", "ABC", "SELL", "3", "50", "0")]
    values = ", ".join(
        f"({BASE + i * S}::timestamp_ns, '{fid}', 'A1', '{sym}', '{side}', '{qty}'::decimal(38,12),"
        f" '{px}'::decimal(38,12), '{fee}'::decimal(38,12))"
        for i, (fid, sym, side, qty, px, fee) in enumerate(rows)
    )
    await svc.qdb.execute(f"INSERT INTO {fills} (ts, fill_id, account, symbol, side, qty, price, fee) VALUES {values}")
    await svc.qdb.wait_visible(fills, 4)

    await svc.get("/quotes/XYZ")  # caches the quote whose mid (118) marks XYZ
    # ABC has no quote: its mark is the last trade (the close of its newest 1 s bar).
    await svc.publish("TRADES", "ABC", trade("10", "48", "5", symbol="ABC"))
    await svc.wait_processed("build_bars", "TRADES", 1)
    status, body = await svc.get("/positions/A1")
    assert (status, body["hit"], body["source"]) == (200, False, "questdb")
    abc, xyz = body["positions"]
    assert xyz == {"account": "A1", "symbol": "XYZ", "net_qty": "15", "avg_open_price": "105",
                   "realized_pnl_gross": "75", "fees": "2.5", "realized_pnl_net": "72.5", "mark": "118",
                   "unrealized_pnl": "195", "ts": BASE + 2 * S}
    assert (abc["net_qty"], abc["mark"], abc["unrealized_pnl"]) == ("-3", "48", "6")  # -3 x (48 - 50)
    status, body = await svc.get("/positions/A1")
    assert (body["hit"], body["source"], len(body["positions"])) == (True, "cache", 2)

    # ptrc's newer event replaces the rebuilt position; an older one that arrives later does not.
    newer = CachedPosition(ts=BASE + 10 * S, account="A1", symbol="XYZ", net_qty=D("20"), avg_open_price=D("106"))
    older = CachedPosition(ts=BASE + 5 * S, account="A1", symbol="XYZ", net_qty=D("999"))
    await svc.publish("POSITIONS", "A1.XYZ", newer)
    await svc.publish("POSITIONS", "A1.XYZ", older)
    await svc.wait_processed("take_positions", "POSITIONS", 2)
    status, body = await svc.get("/positions/A1")
    assert body["hit"] and body["positions"][1]["net_qty"] == "20"

    status, body = await svc.get("/positions/NOBODY")
    assert (status, body["detail"]["error"]) == (404, "no positions")


async def test_quotes_and_positions_from_the_bus_and_ttl_expiry(service_factory):
    svc = await service_factory(cache__redis__ttl="2")
    quote = Quote(ts=BASE, symbol="Q1", bid=D("10.10"), ask=D("10.12"), bid_size=D("5"))
    stale = Quote(ts=BASE - S, symbol="Q1", bid=D("9"), ask=D("9.5"))
    await svc.publish("QUOTES", "Q1", quote)
    await svc.wait_processed("take_quotes", "QUOTES", 1)
    await svc.publish("QUOTES", "Q1", stale)  # older event time: must not replace the newer quote
    await svc.publish("POSITIONS", "A2.Q1", CachedPosition(ts=BASE, account="A2", symbol="Q1", net_qty=D("7")))
    await svc.wait_processed("take_quotes", "QUOTES", 2)
    await svc.wait_processed("take_positions", "POSITIONS", 1)

    status, body = await svc.get("/quotes/Q1")
    assert (status, body["hit"]) == (200, True)
    # Stored and served with canonical numbers (10.10 -> "10.1").
    assert body["quote"] == {**as_json(quote), "bid": "10.1", "ask_size": "0"}
    # A hash written only by ptrc's events may not list every symbol of the account: a
    # miss, and without a fills table the cached part is served, marked incomplete.
    status, body = await svc.get("/positions/A2")
    assert (status, body["hit"], body["complete"]) == (200, False, False)
    assert body["positions"][0]["net_qty"] == "7"

    keys = [f"{svc.names.prefix}:quote:Q1", f"{svc.names.prefix}:pos:A2"]
    for key in keys:
        assert 0 < await svc.valkey.redis.pttl(key) <= 2000
    deadline = time.monotonic() + 6
    while await svc.valkey.redis.exists(*keys):
        assert time.monotonic() < deadline, "the keys did not expire"
        await asyncio.sleep(0.1)

    status, body = await svc.get("/quotes/Q1")  # expired, and no quotes table: a miss, then 404
    assert status == 404
    status, stats = await svc.get("/cache/stats")
    assert (stats["families"]["quotes"]["hits"], stats["families"]["quotes"]["misses"]) == (1, 1)
    assert stats["families"]["quotes"]["newest_event_ts"] == BASE
    assert stats["families"]["quotes"]["freshness_lag_s"] > 0
    assert stats["ttl_s"] == 2


async def test_stats_and_health_report_valkey_and_questdb(service_factory):
    svc = await service_factory()
    await svc.publish("TRADES", "S1", trade("1", "10", "1", symbol="S1"))
    await svc.publish("BARS", "1h.S1", Bar(ts=BASE, symbol="S1", interval="1h", open=D("1"), high=D("2"),
                                           low=D("1"), close=D("2"), volume=D("3")))
    await svc.wait_processed("build_bars", "TRADES", 1)
    await svc.wait_processed("take_bars", "BARS", 1)
    await svc.get("/bars/S1?interval=1s&limit=1")
    await svc.get("/bars/S1?interval=1h&limit=1")
    status, stats = await svc.get("/cache/stats")
    assert status == 200
    assert (stats["hits"], stats["misses"], stats["hit_rate"]) == (2, 0, 1.0)
    assert stats["keys"] == 4 and stats["families"]["bars"]["keys"] == 4  # 1s, 1m, 5m and 1h
    assert stats["memory"]["used_bytes"] > 0 and stats["evictions"] >= 0
    assert stats["keys_in_db"] >= 4 and stats["bars"]["bar_messages_written"] == 1
    assert stats["freshness_lag_s"] > 0 and stats["valkey"]["ok"]

    response = await svc.http.get("/health")
    body = response.json()
    assert response.status_code == 200, body
    assert body["checks"]["valkey"]["ok"] and body["checks"]["questdb"]["ok"]
    assert body["checks"]["agent:build_bars"]["ok"]


async def test_with_valkey_unreachable_reads_are_answered_from_questdb(service_factory):
    with socket.socket() as sock:  # a port nothing listens on: Valkey "down"
        sock.bind(("127.0.0.1", 0))
        dead_port = sock.getsockname()[1]
    svc = await service_factory(cache__redis__port=str(dead_port))
    await create_market_data_tables(svc)

    status, body = await svc.get("/bars/RT?interval=1m&limit=2")
    assert (status, body["hit"], body["source"]) == (200, False, "questdb")
    assert [b["vwap"] for b in body["bars"]] == ["100.125", "102.333333333333"]
    status, body = await svc.get("/quotes/XYZ")
    assert (status, body["source"], body["quote"]["bid"]) == (200, "questdb", "117.5")

    status, stats = await svc.get("/cache/stats")
    assert status == 200 and stats["valkey"]["ok"] is False and stats["cache_errors"] >= 2
    response = await svc.http.get("/health")
    assert response.status_code == 503 and response.json()["checks"]["valkey"]["ok"] is False
