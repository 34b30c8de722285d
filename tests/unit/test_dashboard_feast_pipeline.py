"""feast_pipeline's page, server side, without servers: the history samples (freshness
and rows/s per view), the pickers' symbols and accounts, the page's routes kept out of
the API document."""

from __future__ import annotations

import time
from types import SimpleNamespace

import httpx
from prometheus_client import CollectorRegistry

from posttrade.agents.features import known_entities
from posttrade.features.views import SYMBOL_HOURLY_FEATURES, SYMBOL_TRADE_FEATURES
from posttrade.services.feast_pipeline import build
from posttrade.stores.feast.status import FeatureStatus, FreshnessSampler
from posttrade.streams.memory import MemoryTransport
from posttrade.web.server import build_web_app

from .test_features_pipeline import scenario_config

S = 1_000_000_000


def test_a_sample_has_each_views_freshness_and_rows_per_second():
    status = FeatureStatus(CollectorRegistry(), [SYMBOL_TRADE_FEATURES, SYMBOL_HOURLY_FEATURES])
    up = False
    clock = iter([10.0, 12.0])
    sampler = FreshnessSampler(status, lambda: up, clock=lambda: next(clock))
    assert sampler() == {}  # Feast not up yet: a gap
    up = True
    trades = status["symbol_trade_features"]
    trades.rows_pushed, trades.newest_event_ts = 10, time.time_ns() - 4 * S
    first = sampler()
    assert first.keys() == {"freshness.symbol_trade_features", "freshness.symbol_hourly_features"}
    assert 4.0 <= first["freshness.symbol_trade_features"] < 5 and first["freshness.symbol_hourly_features"] is None
    trades.rows_pushed, trades.newest_event_ts = 30, time.time_ns()
    second = sampler()
    assert 0 <= second["freshness.symbol_trade_features"] < 1
    assert second["rows_per_s.symbol_trade_features"] == 10.0  # 20 rows in 2 s
    assert second["rows_per_s.symbol_hourly_features"] == 0.0


def test_the_pickers_list_the_symbols_and_accounts_the_agents_hold_sorted_and_bounded():
    agents = SimpleNamespace(
        trade_history={"MSFT": 1, "AAPL": 1},
        quote_tops={"AAPL": 1, "EURUSD": 1},
        ptrc_positions={("ACC2", "AAPL"): 1, ("ACC1", "MSFT"): 1, ("ACC1", "AAPL"): 1},
        order_days={"ACC3": 1},
    )
    assert known_entities(agents, 10) == {"symbols": ["AAPL", "EURUSD", "MSFT"], "accounts": ["ACC1", "ACC2", "ACC3"]}
    assert known_entities(agents, 2) == {"symbols": ["AAPL", "EURUSD"], "accounts": ["ACC1", "ACC2"]}


async def test_the_pages_routes_answer_but_are_not_in_the_api_document(tmp_path):
    service = build(scenario_config(tmp_path / "feast", online_store="sqlite"), transport=MemoryTransport())  # not started: no Feast
    web = httpx.AsyncClient(transport=httpx.ASGITransport(app=build_web_app(service.app)), base_url="http://t")
    async with web:
        paths = (await web.get("/openapi.json")).json()["paths"]
        entities = (await web.get("/dashboard/entities")).json()
        history = (await web.get("/dashboard/history")).json()
    assert "/features/status" in paths
    assert not [path for path in paths if path.startswith("/dashboard") or path == "/"]
    assert entities["symbols"] == [] and entities["accounts"] == []
    assert "symbol_trade_features:vwap_5m" in entities["features"]["symbol"]
    assert "symbol_trade_features:vwap_5m" not in entities["features"]["account"]
    assert history == {"every_s": 2.0, "t": [], "series": {}}
