"""hot_cache on the real servers: NATS JetStream, Valkey and QuestDB of the local stack.

Every test gets its own namespace (streams `<NS>_TRADES`, ... on `<ns>.md.trades.>`, ...),
QuestDB tables, Valkey key prefix and app name (uuid suffixes), and removes them
afterwards: the stack is shared.
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
from posttrade.services.hot_cache import HotCacheService
from posttrade.stores.questdb import QuestDBClient
from posttrade.stores.valkey import open_valkey
from posttrade.streams.events import Bar, PositionUpdate, Quote, decode, encode, subject_token
from posttrade.web.server import build_web_app
from tests.unit.test_bars import BASE, FIRST_MINUTE, FIVE_MINUTES, S, SECOND_MINUTE, TAPE, trade

D = Decimal


def as_json(event) -> dict:
    return json.loads(encode(event))


# The platform's subjects (posttrade.streams.subjects) per stream, before the namespace.
SUBJECTS = {"TRADES": "md.trades", "BARS": "md.bars", "QUOTES": "md.quotes", "POSITIONS": "posttrade.positions"}
STREAMS = (*SUBJECTS, "DLQ")


@dataclass
class Names:
    suffix: str

    @property
    def app(self) -> str:
        return f"hc_{self.suffix}"

    @property
    def namespace(self) -> str:
        return f"hct{self.suffix}"

    @property
    def prefix(self) -> str:
        return f"pt{self.suffix}"

    def table(self, kind: str) -> str:
        return f"hct_{kind}_{self.suffix}"


@dataclass
class Running:
    names: Names
    service: HotCacheService
    http: httpx.AsyncClient
    js: object
    valkey: object
    qdb: QuestDBClient

    @property
    def app(self):
        return self.service.app

    async def publish(self, kind: str, key: str, event) -> None:
        """On the namespaced subject of stream `kind` (TRADES, BARS, QUOTES, POSITIONS)."""
        await self.js.publish(self.app.subject(f"{SUBJECTS[kind]}.{key}"), encode(event))

    async def publish_position(self, update: PositionUpdate) -> None:
        """On `<ns>.posttrade.positions.<account>.<symbol>`, tokens as ptrc makes them."""
        await self.publish("POSITIONS", f"{subject_token(update.account)}.{subject_token(update.symbol)}", update)

    async def wait_processed(self, agent: str, kind: str, count: int, timeout: float = 20.0) -> None:
        durable = self.app.agents[agent].durable
        deadline = time.monotonic() + timeout
        while True:
            try:
                info = await self.js.consumer_info(self.app.stream_name(kind), durable)
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

    async def start(**overrides: str) -> Running:
        names = Names(uuid.uuid4().hex[:10])
        env = {
            **stack.service_env(),
            "POSTTRADE_HOT_CACHE__SERVICE__NAME": names.app,
            "POSTTRADE_HOT_CACHE__SERVICE__NAMESPACE": names.namespace,
            "POSTTRADE_HOT_CACHE__HOT_CACHE__KEY_PREFIX": names.prefix,
            "POSTTRADE_HOT_CACHE__HOT_CACHE__WRITE_WITHIN_S": "0.02",
            "POSTTRADE_HOT_CACHE__RUNTIME__BATCH_SIZE": "3",
            # Off unless a test turns it on: its background fills would race the misses tested.
            "POSTTRADE_HOT_CACHE__HOT_CACHE__WARM_CONCURRENCY": "0",
        }
        for kind in ("market_trades", "quotes", "bars"):
            env[f"POSTTRADE_HOT_CACHE__HOT_CACHE__READ_THROUGH__TABLES__{kind.upper()}"] = names.table(kind)
        env.update({f"POSTTRADE_HOT_CACHE__{k.upper()}": v for k, v in overrides.items()})
        config = load_config("hot_cache", hot_cache.CONFIG, env=env)
        service = hot_cache.build(config)
        app = service.app
        app.runtime.poll_timeout_s = 0.05
        await app.start()
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app=build_web_app(app)), base_url="http://test")
        started.append((names, app, http))
        return Running(names, service, http, js, valkey, qdb)

    yield start

    for names, app, http in started:
        await http.aclose()
        await app.stop()
        for kind in STREAMS:
            try:
                await js.delete_stream(app.stream_name(kind))
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
        for kind in ("market_trades", "quotes", "bars"):
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


async def create_market_data_tables(svc: Running) -> None:
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
    status, body = await svc.get("/positions/A1")  # ptrc has published nothing for A1
    assert (status, body["error"], body["detail"]["error"]) == (404, "not found", "no positions")

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


def position(revision: int, ts: int, *, account: str, symbol: str, reason: str, multiplier: str, net_qty: str,
             avg: str, fees: str, mark: str, **more) -> PositionUpdate:
    """A PositionUpdate with figures worked by hand: open cost = net_qty x avg,
    unrealized = (net_qty x mark - open cost) x multiplier, nothing realized yet."""
    qty, avg_price, mark_price, m = D(net_qty), D(avg), D(mark), D(multiplier)
    open_cost = qty * avg_price
    unrealized = (qty * mark_price - open_cost) * m
    return PositionUpdate(
        ts=ts, account=account, symbol=symbol, reason=reason, multiplier=m, net_qty=qty, avg_open_price=avg_price,
        open_cost=open_cost, realized_pnl_gross=D("0"), fees=D(fees), realized_pnl_net=-D(fees),
        fifo_open_cost=open_cost, fifo_realized_pnl_gross=D("0"), sod_realized_pnl_net=D("0"),
        sod_unrealized_pnl=D("0"), mark=mark_price, unrealized_pnl=unrealized, fifo_unrealized_pnl=unrealized,
        day_pnl=unrealized - D(fees), revision=revision, **more,
    )


ACCOUNT = "ACC.1"  # a dot: its subject token is ACC%2E1
# ESZ5, multiplier 50: BUY 2 @ 4500 at +10 s (revision 1), then a fill executed at +5 s
# arrives late, BUY 1 @ 4503: revision 2 has the OLDER ts. 3 x 4501 = 13503;
# unrealized (3 x 4510 - 13503) x 50 = 1350 (multiplier 1 would say 27).
ES_ON_TIME = position(1, BASE + 10 * S, account=ACCOUNT, symbol="ESZ5", reason="fill", multiplier="50",
                      net_qty="2", avg="4500", fees="4.2", mark="4510", fill_id="F1", side="BUY", qty=D("2"),
                      price=D("4500"), fee=D("4.2"), exec_type="NEW", fill_count=1)
ES_LATE = position(2, BASE + 5 * S, account=ACCOUNT, symbol="ESZ5", reason="late", multiplier="50",
                   net_qty="3", avg="4501", fees="6.3", mark="4510", fill_id="F0", side="BUY", qty=D("1"),
                   price=D("4503"), fee=D("2.1"), exec_type="NEW", fill_count=2)
# A stock whose only fill was corrected (100 @ 20.50 -> 80 @ 20.25), then opened again.
XYZ_FILL = position(1, BASE + 2 * S, account=ACCOUNT, symbol="XYZ", reason="fill", multiplier="1",
                    net_qty="100", avg="20.50", fees="1", mark="21", fill_id="X1", side="BUY", qty=D("100"),
                    price=D("20.50"), fee=D("1"), exec_type="NEW", fill_count=1)
XYZ_CORRECTED = position(2, BASE + 3 * S, account=ACCOUNT, symbol="XYZ", reason="correction", multiplier="1",
                         net_qty="80", avg="20.25", fees="0.8", mark="21", corrections=1, fill_id="X1C",
                         ref_fill_id="X1", side="BUY", qty=D("80"), price=D("20.25"), fee=D("0.8"),
                         exec_type="CORRECT", fill_count=1)


async def positions_of(svc: Running, account: str) -> tuple[int, dict, list[PositionUpdate]]:
    status, body = await svc.get(f"/positions/{account}")
    served = [decode(PositionUpdate, json.dumps(p).encode()) for p in body.get("positions", [])]
    return status, body, served


async def test_positions_are_ptrcs_updates_kept_by_revision_on_a_hit_and_a_miss(service_factory):
    svc = await service_factory()
    other = position(7, BASE, account="ACC", symbol="ESZ5", reason="fill", multiplier="50", net_qty="-1",
                     avg="4400", fees="2.1", mark="4510")
    for update in (ES_ON_TIME, XYZ_FILL, other, ES_LATE, XYZ_CORRECTED):
        await svc.publish_position(update)
    await svc.wait_processed("take_positions", "POSITIONS", 5)
    latest = [ES_LATE, XYZ_CORRECTED]  # by symbol: the highest revision of each

    # The live feed wrote the hash, but only a read of the stream knows it lists every
    # symbol: a miss, answered from the POSITIONS stream's last message per subject.
    status, body, served = await positions_of(svc, ACCOUNT)
    assert (status, body["hit"], body["source"]) == (200, False, "stream"), body
    assert served == latest
    assert body["positions"][0]["unrealized_pnl"] == "1350" and body["positions"][0]["multiplier"] == "50"
    status, body, served = await positions_of(svc, ACCOUNT)
    assert (body["hit"], body["source"], served) == (True, "cache", latest)

    # Valkey loses the keys: the miss serves ptrc's figures again, not a recomputation.
    keys = [k async for k in svc.valkey.redis.scan_iter(match=f"{svc.names.prefix}:pos:*")]
    assert sorted(keys) == sorted([f"{svc.names.prefix}:pos:ACC".encode(), f"{svc.names.prefix}:pos:{ACCOUNT}".encode()])
    await svc.valkey.redis.delete(*keys)
    status, body, served = await positions_of(svc, ACCOUNT)
    assert (status, body["hit"], body["source"], served) == (200, False, "stream", latest)
    status, body, served = await positions_of(svc, ACCOUNT)
    assert (body["hit"], served) == (True, latest)
    status, body, served = await positions_of(svc, "ACC")
    assert (body["hit"], served) == (False, [other])

    status, body = await svc.get("/positions/NOBODY")
    assert (status, body["detail"]["error"]) == (404, "no positions")


async def test_the_valkey_write_is_compare_and_set_on_revision(service_factory):
    svc = await service_factory()
    cache = svc.service.cache
    hash_key = f"{svc.names.prefix}:pos:{ACCOUNT}"

    async def stored() -> PositionUpdate:
        return decode(PositionUpdate, await svc.valkey.redis.hget(hash_key, "ESZ5"))

    # Separate writes (separate batches): an older ts with a higher revision replaces...
    await cache.write_positions([ES_ON_TIME])
    await cache.write_positions([ES_LATE])
    assert await stored() == ES_LATE
    # ...and a lower revision never does, however new its ts.
    stale = msgspec.structs.replace(ES_ON_TIME, ts=BASE + 60 * S, net_qty=D("99"))
    await cache.write_positions([stale])
    assert await stored() == ES_LATE
    # A read-through never moves a position back either: the stream's last ESZ5 message
    # is revision 2, the hash holds revision 3 (the feed got there first).
    newer = msgspec.structs.replace(ES_LATE, revision=3, reason="bust", busts=1, net_qty=D("1"),
                                    open_cost=D("4501"), unrealized_pnl=D("450"))
    await svc.publish_position(ES_ON_TIME)
    await svc.publish_position(ES_LATE)
    await svc.wait_processed("take_positions", "POSITIONS", 2)
    await cache.write_positions([newer])
    status, body, served = await positions_of(svc, ACCOUNT)
    assert (status, body["hit"], body["source"], served) == (200, False, "stream", [newer])
    assert await svc.valkey.redis.hexists(hash_key, "#complete")


async def test_quotes_and_positions_from_the_bus_and_ttl_expiry(service_factory):
    svc = await service_factory(cache__redis__ttl="2")
    quote = Quote(ts=BASE, symbol="Q1", bid=D("10.10"), ask=D("10.12"), bid_size=D("5"))
    stale = Quote(ts=BASE - S, symbol="Q1", bid=D("9"), ask=D("9.5"))
    await svc.publish("QUOTES", "Q1", quote)
    await svc.wait_processed("take_quotes", "QUOTES", 1)
    await svc.publish("QUOTES", "Q1", stale)  # older event time: must not replace the newer quote
    held = position(1, BASE, account="A2", symbol="Q1", reason="opening", multiplier="1", net_qty="7", avg="10",
                    fees="0", mark="10.11")
    await svc.publish_position(held)
    await svc.wait_processed("take_quotes", "QUOTES", 2)
    await svc.wait_processed("take_positions", "POSITIONS", 1)

    status, body = await svc.get("/quotes/Q1")
    assert (status, body["hit"]) == (200, True)
    # Stored and served with canonical numbers (10.10 -> "10.1").
    assert body["quote"] == {**as_json(quote), "bid": "10.1", "ask_size": "0"}
    # A hash written only by the live feed may not list every symbol of the account: a
    # miss, completed from the POSITIONS stream; then a hit.
    status, body, served = await positions_of(svc, "A2")
    assert (status, body["hit"], body["source"], served) == (200, False, "stream", [held])
    status, body, served = await positions_of(svc, "A2")
    assert (body["hit"], served) == (True, [held])

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


async def test_with_valkey_unreachable_reads_are_answered_from_their_sources(service_factory):
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
    for update in (ES_ON_TIME, ES_LATE):
        await svc.publish_position(update)
    status, body, served = await positions_of(svc, ACCOUNT)
    assert (status, body["hit"], body["source"], served) == (200, False, "stream", [ES_LATE])

    status, stats = await svc.get("/cache/stats")
    assert status == 200 and stats["valkey"]["ok"] is False and stats["cache_errors"] >= 3
    response = await svc.http.get("/health")
    assert response.status_code == 503 and response.json()["checks"]["valkey"]["ok"] is False
