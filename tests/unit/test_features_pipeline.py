"""feast_pipeline end to end on the in-memory transport and Feast's SQLite online store.

A known sequence of trades, quotes, orders and ptrc's position updates for a known
sequence of fills (the worked example of docs/feast_pipeline.md) must give the
hand-computed features online (read through Feast) and offline (a point-in-time training
set from `get_historical_features`), and the hourly batch view must be computed from the
offline store and materialized online. The integration test runs the same scenario on
NATS and Valkey.

ptrc is not running here: its part, the POSITIONS stream, is played by what it is built
on (`PtrcPositions`). The expected features are computed by hand.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import uuid
from decimal import Decimal as D

import httpx
import msgspec
import pandas as pd
import pytest

from posttrade.agents.features import FeatureAgents, FeatureSinks
from posttrade.app import App
from posttrade.features.math import DAY_NS, MINUTE_NS, NS_PER_S, FillsDay, utc_day
from posttrade.services.feast_pipeline import FeastPipelineConfig, FeastPipelineService, build
from posttrade.sinks import RetryPolicy
from posttrade.stores.feast.client import FeastClient
from posttrade.stores.feast.status import FeatureStatus
from posttrade.streams import subjects
from posttrade.streams.events import Fill, MarketTrade, Order, PositionUpdate, Quote, encode
from posttrade.streams.memory import MemoryTransport
from posttrade.streams.stream import EventRecord, current_event
from posttrade.web.server import build_web_app

from .test_features_math import PtrcPositions

S = NS_PER_S
# Third-party noise: DuckDB deprecations seen through ibis, and Feast's own online write
# truncating event times to the microsecond (as intended).
pytestmark = [
    pytest.mark.filterwarnings("ignore:fetch_arrow_table:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:Discarding nonzero nanoseconds:UserWarning"),
]
# Yesterday 10:00 UTC: every event of the scenario falls on one UTC day.
HOUR0 = (time.time_ns() // DAY_NS - 1) * DAY_NS + 10 * 3600 * S


def at(minute: int, second: int = 0) -> int:
    return HOUR0 + minute * MINUTE_NS + second * S


# (ts, symbol, price, size, aggressor). ZZZ's prints move event time on: the one at
# minute 8 closes ACME's minutes, the one at 61:10 closes minute 60 and so hour 0.
TRADES = [
    (at(0, 10), "ACME", "100", "10", "BUY"),
    (at(0, 40), "ACME", "101", "5", None),
    (at(1, 5), "ACME", "100.5", "20", None),
    (at(1, 30), "ACME", "102", "10", "SELL"),
    (at(2, 30), "ESZ5", "4510", "1", None),
    (at(3, 15), "ACME", "103", "10", None),
    (at(6, 0), "ACME", "99", "4", None),
    (at(8, 10), "ZZZ", "10", "1", None),
    (at(60, 30), "ZZZ", "10.5", "2", None),
    (at(61, 10), "ZZZ", "11", "3", None),
]
TRADE_ROWS = 7  # ACME minutes 0, 1, 3, 6; ESZ5 minute 2; ZZZ minutes 8, 60
HOURLY_ROWS = 3  # hour 0 of ACME, ESZ5 and ZZZ
# (ts, symbol, bid, ask, bid_size, ask_size); ZZZ's quote closes ACME's minutes 0 and 1.
QUOTES = [
    (at(0, 1), "ACME", "99.9", "100.1", "100", "200"),
    (at(0, 20), "ACME", "100.0", "100.1", "150", "100"),
    (at(1, 5), "ACME", "99.8", "100.0", "50", "60"),
    (at(3, 10), "ZZZ", "9.9", "10.1", "1", "1"),
]
QUOTE_ROWS = 2
ACCOUNT = "ACC1"
FUTURES = "ACC2"
ORDERS = [
    (at(2, 0), "o1", ACCOUNT, "ACME", "BUY", "100"),
    (at(2, 1), "o2", ACCOUNT, "XYZ", "BUY", "10"),
    (at(2, 2), "o3", FUTURES, "ESZ5", "BUY", "5"),
    (at(2, 3), "o4", FUTURES, "ESZ5", "SELL", "2"),
]
MULTIPLIERS = {"ESZ5": D(50)}  # ptrc's instruments


def fill(ts, fill_id, account, symbol, side=None, qty=None, price=None, fee=None, order_id=None, *,
         exec_type="NEW", ref=None) -> Fill:
    return Fill(
        ts=ts, fill_id=fill_id, account=account, symbol=symbol, side=side,
        qty=None if qty is None else D(qty), price=None if price is None else D(price),
        fee=None if fee is None else D(fee), order_id=order_id, exec_type=exec_type, ref_fill_id=ref,
    )


# The fills as ptrc receives them, and whether ptrc's update for each moves feast's fill
# counts. ACC1 trades shares; ACC2 trades a future (multiplier 50) on a feed with an
# opening, a resend, a bust, a correction and a late fill.
FILLS = [
    (fill(at(2, 10), "f1", ACCOUNT, "ACME", "BUY", "60", "100", "1", "o1"), True),
    (fill(at(4, 0), "f2", ACCOUNT, "ACME", "SELL", "20", "103", "0.5", "o1"), True),
    (fill(at(5, 0), "f3", ACCOUNT, "XYZ", "BUY", "10", "50", "0", "o2"), True),
    (fill(at(-1440), "open1", FUTURES, "ESZ5", "BUY", "1", "4400", exec_type="OPENING"), False),
    (fill(at(2, 20), "f4", FUTURES, "ESZ5", "BUY", "3", "4500", "2.10", "o3"), True),
    (fill(at(2, 20), "f4", FUTURES, "ESZ5", "BUY", "3", "4500", "2.10", "o3"), False),  # resent
    (fill(at(3, 0), "f5", FUTURES, "ESZ5", "BUY", "2", "4505", "1.40", "o3"), True),
    (fill(at(4, 10), "f6", FUTURES, "ESZ5", "SELL", "1", "4520", "0.70", "o4"), True),
    (fill(at(5, 30), "f5-x", FUTURES, "ESZ5", exec_type="BUST", ref="f5"), True),
    (fill(at(5, 40), "f6-c", FUTURES, "ESZ5", "SELL", "2", "4520", "1.40", exec_type="CORRECT", ref="f6"), True),
    (fill(at(3, 30), "f7", FUTURES, "ESZ5", "BUY", "1", "4490", "0.70", "o3"), True),  # late
]
COUNTING_FILLS = sum(counts for _, counts in FILLS)
PTRC_UPDATES = 10  # one per fill message that changed a position: all but the resend
ACCOUNT_ROWS = PTRC_UPDATES  # a row per update taken (not the earlier revision published again)
RATE_ROWS = len(ORDERS) + COUNTING_FILLS  # a row per new order and per update that moved the counts


# Hand-computed (docs/feast_pipeline.md, "worked example").
ONLINE_SYMBOL = {
    "symbol_trade_features:return_1m": -0.038834951456,  # 99 / 103 - 1
    "symbol_trade_features:return_5m": -0.029411764706,  # 99 / 102 - 1
    "symbol_trade_features:realized_vol_5m": math.hypot(math.log(103 / 102), math.log(99 / 103)),
    "symbol_trade_features:vwap_5m": 101.857142857143,  # (1030 + 396) / 14
    "symbol_trade_features:trade_count_1m": 1,
    "symbol_trade_features:volume_1m": 4.0,
    "symbol_trade_features:trade_imbalance_1m": -1.0,
    "symbol_quote_features:spread_bps": 20.02002002002,  # 0.2 / 99.9 x 10,000
    "symbol_quote_features:spread_bps_avg_1m": 20.02002002002,
    "symbol_quote_features:mid": 99.9,
    "symbol_quote_features:order_flow_imbalance_1m": -210.0,
    "symbol_quote_features:quote_count_1m": 1,
}
ONLINE_ACCOUNT = {
    "account_features:gross_exposure": 4460.0,  # 40 x 99 (mark) + 10 x 50 (XYZ: no print, open cost)
    "account_features:net_exposure": 4460.0,
    "account_features:realized_pnl_today": 58.5,  # 20 x (103 - 100) - 1 - 0.5
    "account_features:fills_today": 3,
    "account_order_features:fill_rate_today": 0.818181818182,  # 90 / 110
    "account_order_features:orders_today": 2,
    "account_order_features:ordered_qty_today": 110.0,
    "account_order_features:filled_qty_today": 90.0,
}
# ACC2's effective history: the opening (1 @ 4400), f4 (3 @ 4500), f7 (1 @ 4490, placed
# before f6 by its time), f6 as corrected (sell 2 @ 4520); f5 busted, f4's resend dropped.
# Open 5 at a cost of 22390; selling 2 takes 22390 x 2 / 5 = 8956 of it and realizes
# (2 x 4520 - 8956) x 50 = 4200, less fees 2.10 + 0.70 + 1.40; 3 left at a cost of 13434.
ONLINE_FUTURES = {
    "account_features:gross_exposure": 676_500.0,  # 3 x 4510 (ESZ5's print) x 50
    "account_features:net_exposure": 676_500.0,
    "account_features:realized_pnl_today": 4195.8,  # 4200 - 4.20
    "account_features:fills_today": 3,  # f4, f6, f7: the opening is no fill, f5 busted
    "account_order_features:fill_rate_today": 0.857142857143,  # (3 + 2 + 1) / (5 + 2)
    "account_order_features:orders_today": 2,
    "account_order_features:ordered_qty_today": 7.0,
    "account_order_features:filled_qty_today": 6.0,
}
HOURLY_ACME = {
    "symbol_hourly_features:return_1h": 99 / 101 - 1,
    "symbol_hourly_features:realized_vol_1h": math.sqrt(
        math.log(102 / 101) ** 2 + math.log(103 / 102) ** 2 + math.log(99 / 103) ** 2
    ),
    "symbol_hourly_features:trade_count_1h": 6,
    "symbol_hourly_features:volume_1h": 59.0,
}


def assert_features(actual: dict, expected: dict) -> None:
    for name, value in expected.items():
        if isinstance(value, float):
            assert actual[name] == pytest.approx(value, rel=1e-9, abs=1e-12), name
        else:
            assert actual[name] == value, name


def scenario_config(
    data_dir, *, online_store: str, redis: dict | None = None, project: str | None = None, namespace: str | None = None
) -> FeastPipelineConfig:
    raw = {
        "service": {"name": "feast_pipeline", "port": 8104, "namespace": namespace},
        "feast": {
            "project": project or f"t{uuid.uuid4().hex[:10]}",
            "data_dir": str(data_dir),
            "online_store": online_store,
            "startup_timeout_s": 10,
        },
        "batch": {"size": 50, "interval_sec": 0.05},
        "runtime": {"batch_size": 50},
        "features": {"window_grace_s": 5, "batch_interval_s": 3600, "compact_interval_s": 3600},
    }
    if redis is not None:
        raw["cache"] = {"redis": redis}
    return msgspec.convert(raw, FeastPipelineConfig)


async def wait_for(predicate, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached in {timeout} s")
        await asyncio.sleep(0.02)


def agents_on(app: App, **kwargs) -> FeatureAgents:
    """The agents alone, their sinks to a Feast never opened (these tests never flush)."""
    sinks = FeatureSinks.to_feast(FeastClient(), FeatureStatus(app.metrics.registry), RetryPolicy())
    return FeatureAgents(app, sinks, batch_size=10, batch_interval_s=0.05, window_grace_s=5, **kwargs)


def pushed(service: FeastPipelineService, view: str) -> int:
    return service.status[view].rows_pushed


async def publish_scenario(service: FeastPipelineService, publish) -> None:
    """Publish the scenario in the order that makes its marks and fill rates deterministic:
    the market data, the orders, then ptrc's update for each fill. Before the last one,
    an earlier update of the same position arrives again: a lower revision than the one
    held, it changes nothing."""
    for ts, symbol, price, size, aggressor in TRADES:
        event = MarketTrade(ts=ts, symbol=symbol, price=D(price), size=D(size), aggressor=aggressor)
        await publish(subjects.trade_subject(symbol), encode(event))
    await wait_for(lambda: pushed(service, "symbol_trade_features") >= TRADE_ROWS, what="trade features")
    for ts, symbol, bid, ask, bid_size, ask_size in QUOTES:
        event = Quote(ts=ts, symbol=symbol, bid=D(bid), ask=D(ask), bid_size=D(bid_size), ask_size=D(ask_size))
        await publish(subjects.quote_subject(symbol), encode(event))
    for ts, order_id, account, symbol, side, qty in ORDERS:
        event = Order(ts=ts, order_id=order_id, account=account, symbol=symbol, side=side, qty=D(qty))
        await publish(subjects.order_subject(account, symbol), encode(event))
    await wait_for(lambda: pushed(service, "account_order_features") >= len(ORDERS), what="order features")

    ptrc = PtrcPositions(MULTIPLIERS)
    published: dict[str, PositionUpdate] = {}  # ptrc's updates by the fill that caused them
    account_rows, rate_rows = 0, len(ORDERS)
    for message, counts in FILLS:
        update = ptrc.receive(message)
        if update is None:
            assert not counts  # the resend: ptrc drops it
            continue
        subject = subjects.position_subject(update.account, update.symbol)
        if message.fill_id == "f7":
            await publish(subject, encode(published["f6"]))
        await publish(subject, encode(update))
        published[message.fill_id] = update
        account_rows, rate_rows = account_rows + 1, rate_rows + counts

        def reached(account_rows=account_rows, rate_rows=rate_rows) -> bool:
            return pushed(service, "account_features") >= account_rows and pushed(service, "account_order_features") >= rate_rows

        await wait_for(reached, what=f"the rows of ptrc's update for {message.fill_id}")
    assert len(published) == PTRC_UPDATES and published["f7"].reason == "late"
    await wait_for(lambda: pushed(service, "symbol_quote_features") >= QUOTE_ROWS, what="quote features")


def training_entities() -> tuple[pd.DataFrame, pd.DataFrame]:
    def ts(ns):
        return pd.Timestamp(ns, unit="ns", tz="UTC")

    symbols = pd.DataFrame(
        {
            "symbol": ["ACME", "ACME", "ACME", "ACME", "ZZZ"],
            "event_timestamp": [
                ts(at(1) - 1000),  # before ACME's first minute is known: nothing
                ts(at(1)),  # minute 0, known at its end
                ts(at(4, 30)),  # minute 3
                ts(at(27)),  # 20 minutes after minute 6: past the 15-minute TTL
                ts(at(61)),  # ZZZ minute 60
            ],
        }
    )
    accounts = pd.DataFrame(
        {"account": [ACCOUNT, ACCOUNT, ACCOUNT], "event_timestamp": [ts(at(2, 9)), ts(at(2, 10)), ts(at(4, 30))]}
    )
    return symbols, accounts


def check_training_set(repository) -> None:
    """Point-in-time values offline: each row gets the features as of its own time."""
    symbols, accounts = training_entities()
    refs = [
        "symbol_trade_features:vwap_5m",
        "symbol_trade_features:trade_count_1m",
        "symbol_trade_features:return_1m",
    ]
    df = repository.training_set(symbols, refs)
    df = df.sort_values(["symbol", "event_timestamp"]).reset_index(drop=True)
    vwap = df["symbol_trade_features__vwap_5m"].tolist()
    count = df["symbol_trade_features__trade_count_1m"].tolist()
    assert math.isnan(vwap[0]) and math.isnan(count[0])
    assert vwap[1] == pytest.approx(100.333333333333) and count[1] == 2  # minute 0: 1505 / 15
    assert vwap[2] == pytest.approx(101.181818181818) and count[2] == 1  # minute 3: 5565 / 55
    assert math.isnan(vwap[3])  # older than the TTL
    assert vwap[4] == pytest.approx(10.5) and count[4] == 1
    refs = ["account_features:gross_exposure", "account_features:realized_pnl_today", "account_features:fills_today"]
    df = repository.training_set(accounts, refs)
    df = df.sort_values("event_timestamp").reset_index(drop=True)
    gross, realized = df["account_features__gross_exposure"], df["account_features__realized_pnl_today"]
    assert math.isnan(gross[0])  # before the first fill
    assert gross[1] == pytest.approx(5940.0)  # 60 x 99
    assert realized[1] == pytest.approx(-1.0)  # the fee
    assert df["account_features__fills_today"][1] == 1
    assert gross[2] == pytest.approx(3960.0)  # 40 x 99
    assert realized[2] == pytest.approx(58.5)


async def check_web(service: FeastPipelineService) -> None:
    web = build_web_app(service.app)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=web), base_url="http://test") as http:
        body = (await http.get("/features/online", params={"symbol": "ACME"})).json()
        assert_features(body["features"], ONLINE_SYMBOL | HOURLY_ACME)
        body = (await http.get("/features/online", params={"account": ACCOUNT})).json()
        assert_features(body["features"], ONLINE_ACCOUNT)
        body = (await http.get("/features/online", params={"account": FUTURES})).json()
        assert_features(body["features"], ONLINE_FUTURES)
        body = (await http.get("/features/online", params={"symbol": "ACME", "features": "vwap_5m,mid"})).json()
        assert body["features"] == {
            "symbol_trade_features:vwap_5m": pytest.approx(101.857142857143),
            "symbol_quote_features:mid": pytest.approx(99.9),
        }
        missing = (await http.get("/features/online", params={"symbol": "NOPE"})).json()
        assert all(v is None for v in missing["features"].values())
        for params in ({}, {"symbol": "A", "account": "B"}, {"symbol": ""}, {"symbol": "ACME", "features": "nope"},
                       {"symbol": "ACME", "features": "gross_exposure"}):
            response = await http.get("/features/online", params=params)
            assert response.status_code == 400, params
            assert response.json()["error"] == "bad request"
        status = (await http.get("/features/status")).json()
        views = {v["view"]: v for v in status["views"]}
        assert views["symbol_trade_features"]["rows_pushed"] == TRADE_ROWS
        assert views["account_features"]["rows_pushed"] == ACCOUNT_ROWS
        assert views["account_order_features"]["rows_pushed"] == RATE_ROWS
        assert views["symbol_trade_features"]["newest_event_time"] is not None
        assert views["symbol_trade_features"]["freshness_s"] > 0
        assert views["symbol_hourly_features"]["rows_pushed"] == HOURLY_ROWS
        assert views["symbol_hourly_features"]["last_materialization"]["duration_s"] >= 0
        assert all(v["errors"] == 0 for v in views.values())
        health = await http.get("/health")
        assert health.status_code == 200, health.json()


async def run_scenario(service: FeastPipelineService, publish) -> None:
    await publish_scenario(service, publish)
    run = await service.batch.run()
    assert run["hours_computed"] == 1 and run["rows"] == HOURLY_ROWS
    assert run["materialized_s"]["symbol_hourly_features"] is not None
    repository = service.feast.repository
    online = await asyncio.to_thread(repository.online_features, "symbol", ["ACME"], list(ONLINE_SYMBOL) + list(HOURLY_ACME))
    assert_features(online[0], ONLINE_SYMBOL | HOURLY_ACME)
    online = await asyncio.to_thread(repository.online_features, "account", [ACCOUNT, FUTURES], list(ONLINE_ACCOUNT))
    assert_features(online[0], ONLINE_ACCOUNT)
    assert_features(online[1], ONLINE_FUTURES)
    await asyncio.to_thread(check_training_set, repository)
    await check_web(service)


async def test_known_sequence_gives_hand_computed_features_sqlite(tmp_path):
    transport = MemoryTransport()
    config = scenario_config(tmp_path / "feast", online_store="sqlite")
    service = build(config, transport=transport)
    service.app.runtime.poll_timeout_s = 0.05
    async with service.app:
        await run_scenario(service, transport.publish)
        # A second run finds no new closed hour and materializes nothing new.
        again = await service.batch.run()
        assert again["hours_computed"] == 0 and again["rows"] == 0
    # Restart: the status recovers the newest event time and the last materialization.
    restarted = build(config, transport=transport)
    async with restarted.app:
        status = restarted.status
        assert status["symbol_trade_features"].newest_event_ts == at(61)
        assert status["symbol_hourly_features"].last_materialization["recovered_from_registry"] is True


async def test_feature_repository_cli_config_has_no_secret(tmp_path):
    config = scenario_config(
        tmp_path / "feast", online_store="valkey", redis={"host": "127.0.0.1", "port": 1, "db": 3, "password": "s3cret"}
    )
    from posttrade.stores.feast.repo import write_cli_config
    from posttrade.services.feast_pipeline import feast_settings

    settings = feast_settings(config)
    settings.data_dir.mkdir(parents=True)
    text = write_cli_config(settings).read_text()
    assert "s3cret" not in text and "127.0.0.1:1,db=3" in text and "duckdb" in text
    assert "password=s3cret" in settings.redis_connection_string()


def test_a_redelivered_update_makes_only_the_changes_that_did_not_become_durable():
    """A crash while a batch's table changes were being written leaves some keys with
    the event and some without; its redelivery must make exactly the missing ones."""
    agents = agents_on(App("feast_pipeline", MemoryTransport()))
    ptrc = PtrcPositions()
    arrival = ptrc.receive(fill(at(1), "a", "A", "ES", "BUY", "5", "100"))

    def event(seq: int, update: PositionUpdate) -> EventRecord:
        return EventRecord(value=update, stream="POSITIONS", seq=seq, subject="posttrade.positions.A.ES", ts=0,
                           delivered=1, delivery=None)

    @contextlib.contextmanager
    def handling(record: EventRecord):
        token = current_event.set(record)
        try:
            yield
        finally:
            current_event.reset(token)

    def receive(record: EventRecord) -> tuple[bool, bool]:
        with handling(record):
            return agents.hold_update(record.value)

    first = event(1, arrival)
    assert receive(first) == (True, True)
    # Only the position became durable: the counted execution did not.
    with handling(first):
        del agents.counted_fills[("A", "a")]
    agents.recover_accounts()  # the agent restarts from the tables
    assert "A" not in agents._fills_days
    assert receive(first) == (False, True)  # redelivered: the missing change is made
    assert agents._fills_days["A"] == FillsDay(day=utc_day(at(1)), fills=1, filled_qty=D(5))
    assert receive(first) == (False, False)  # and once only
    assert receive(event(2, arrival)) == (True, False)  # published again: held, not recounted
    correction = ptrc.receive(fill(at(2), "a-c", "A", "ES", "BUY", "4", "100", "0", exec_type="CORRECT", ref="a"))
    assert receive(event(3, correction)) == (True, True)
    assert receive(event(4, arrival)) == (False, False)  # a lower revision than the one held
    assert agents._fills_days["A"] == FillsDay(day=utc_day(at(1)), fills=1, filled_qty=D(4))


def test_account_rows_are_in_the_base_currency_at_the_rates_of_the_fx_marks_seen():
    """The agents read an FX rate from the FX instrument's last quote mid, else its last
    print, else ptrc's mark of it; until one is seen, money in another currency is null."""
    from posttrade.core.reference import FxPair, Instrument, Reference

    reference = Reference({"TOYOTA": Instrument(currency="JPY"), "USDJPY": Instrument(fx=FxPair("USD", "JPY"))})
    agents = agents_on(App("feast_pipeline", MemoryTransport()), reference=reference)
    seq = iter(range(1, 100))

    def handle(stream: str, subject: str, event, fold) -> None:
        record = EventRecord(value=event, stream=stream, seq=next(seq), subject=subject, ts=0, delivered=1,
                             delivery=None)
        token = current_event.set(record)
        try:
            fold(event)
        finally:
            current_event.reset(token)

    ptrc = PtrcPositions()
    toyota = ptrc.receive(fill(at(1), "t1", "A", "TOYOTA", "BUY", "100", "2000"))
    toyota = msgspec.structs.replace(toyota, currency="JPY")  # ptrc's reference data says so
    handle("POSITIONS", "posttrade.positions.A.TOYOTA", toyota, agents.hold_update)
    handle("TRADES", "md.trades.TOYOTA", MarketTrade(ts=at(2), symbol="TOYOTA", price=D(2050), size=D(1)),
           agents.fold_trade)
    day = utc_day(at(2))
    assert agents.fx_mark("USDJPY") is None
    assert agents.account_values("A", day)["gross_exposure"] is None  # no rate yet: null, not 205,000
    handle("TRADES", "md.trades.USDJPY", MarketTrade(ts=at(3), symbol="USDJPY", price=D(160), size=D(1)),
           agents.fold_trade)
    assert agents.fx_mark("USDJPY") == (D(160), "last_trade", at(3))
    assert agents.account_values("A", day)["gross_exposure"] == 1281.25  # 100 x 2050 / 160
    handle("QUOTES", "md.quotes.USDJPY", Quote(ts=at(4), symbol="USDJPY", bid=D("149.9"), ask=D("150.1")),
           agents.fold_quote)
    assert agents.fx_mark("USDJPY") == (D(150), "quote_mid", at(4))  # a quote mid comes first
    assert agents.account_values("A", day)["gross_exposure"] == pytest.approx(1366.666666666667)
    # Without market data of its own, ptrc's mark of a USDJPY position gives the rate.
    fresh = agents_on(App("feast_pipeline", MemoryTransport()), reference=reference)
    fx_position = ptrc.receive(fill(at(5), "u1", "B", "USDJPY", "BUY", "1000", "155"))
    fx_position = msgspec.structs.replace(fx_position, mark=D(155), currency="JPY")
    for update in (toyota, fx_position):
        handle("POSITIONS", f"posttrade.positions.{update.account}.{update.symbol}", update, fresh.hold_update)
    assert fresh.fx_mark("USDJPY") == (D(155), "ptrc_mark", at(5))
    fresh.recover_accounts()  # rebuilt from its table
    assert fresh.fx_mark("USDJPY") == (D(155), "ptrc_mark", at(5))
    # A (USD) holds 100 TOYOTA at ptrc's published mark or cost: 200,000 JPY / 155.
    assert fresh.account_values("A", day)["gross_exposure"] == pytest.approx(1290.322580645161)


async def test_counted_fills_hold_at_most_max_fills_per_account_and_fold_the_rest():
    """An account's executions of the day are held one by one up to the bound; the
    oldest beyond it are folded into one record: the table stays bounded, the counts
    stay exact (also rebuilt from the table after a restart), a folded execution's
    update published again counts once, and an amendment of it changes nothing."""
    from posttrade.agents.features import FOLDED

    from .test_features_math import T0, correct, execution

    transport = MemoryTransport()
    app = App("feast_pipeline", transport)
    agents = agents_on(app, max_fills_per_account=3)
    for table in (agents.ptrc_positions, agents.counted_fills):
        await table.open(transport)
    ptrc = PtrcPositions()
    seq = iter(range(1, 10_000))

    def receive(update: PositionUpdate) -> tuple[bool, bool]:
        record = EventRecord(value=update, stream="POSITIONS", seq=next(seq),
                             subject=f"posttrade.positions.{update.account}.{update.symbol}", ts=0, delivered=1,
                             delivery=None)
        token = current_event.set(record)
        try:
            return agents.hold_update(record.value)
        finally:
            current_event.reset(token)

    day = utc_day(T0)
    first = ptrc.receive(execution("x0", T0, "7", symbol="XYZ"))  # XYZ's only update
    assert receive(first) == (True, True)
    for n in range(1, 200):
        receive(ptrc.receive(execution(f"e{n}", T0 + n * S, "1")))
    assert len(agents.counted_fills) == 3 + 1  # the 3 newest and the account's folded record
    assert len(agents._counted_ids["ACC1"]) == 3
    assert sorted(fill_id for _, fill_id in agents.counted_fills) == [FOLDED, "e197", "e198", "e199"]
    expected = FillsDay(day=day, fills=200, filled_qty=D(7 + 199))
    assert agents._fills_days["ACC1"] == expected

    # ptrc's state of XYZ published again: its execution x0 is folded, and counts once.
    assert receive(first) == (True, False)
    # An amendment of a folded execution changes nothing; of a held one, its quantity.
    assert receive(ptrc.receive(correct("x0-c", "x0", "1", T0 + 300 * S, symbol="XYZ"))) == (True, False)
    assert receive(ptrc.receive(correct("e199-c", "e199", "3", T0 + 301 * S))) == (True, True)
    expected = FillsDay(day=day, fills=200, filled_qty=D(7 + 199 + 2))
    assert agents._fills_days["ACC1"] == expected
    # A late execution is counted, older than folded ones too; the oldest held is folded.
    assert receive(ptrc.receive(execution("late", T0 + 198 * S + 1, "5"))) == (True, True)
    assert receive(ptrc.receive(execution("later", T0 + 5 * S, "4"))) == (True, True)
    expected = FillsDay(day=day, fills=202, filled_qty=D(7 + 199 + 2 + 5 + 4))
    assert agents._fills_days["ACC1"] == expected
    assert len(agents.counted_fills) == 3 + 1

    # Rebuilt from the durable table after a restart: the same counts.
    await app.flush_tables()
    app2 = App("feast_pipeline", transport)
    agents2 = agents_on(app2, max_fills_per_account=3)
    for table in (agents2.ptrc_positions, agents2.counted_fills):
        await table.open(transport)
    agents2.recover_accounts()
    assert agents2._fills_days["ACC1"] == expected
    assert sorted(agents2._counted_ids["ACC1"]) == sorted(agents._counted_ids["ACC1"])

    # The next day's first execution: the day before, folded record and all, is forgotten.
    assert receive(ptrc.receive(execution("d2", T0 + DAY_NS, "2"))) == (True, True)
    assert dict(agents.counted_fills.items()) == {("ACC1", "d2"): agents.counted_fills[("ACC1", "d2")]}
    assert agents._fills_days["ACC1"] == FillsDay(day=day + 1, fills=1, filled_qty=D(2))
