"""Feature arithmetic pinned to hand-computed examples (docs/feast_pipeline.md)."""

from __future__ import annotations

import math
from decimal import Decimal as D

import pytest
from hypothesis import given
from hypothesis import strategies as st

from posttrade.core.positions import Position
from posttrade.features.math import (
    DAY_NS,
    MINUTE_NS,
    AccountDay,
    OrdersDay,
    QuoteMinute,
    QuoteTop,
    TradeHistory,
    TradeMinute,
    TradeTick,
    account_features,
    add_fill_to_day,
    add_order_to_day,
    add_quote,
    add_trade,
    fill_rate_features,
    next_tick,
    order_flow_term,
    quote_features,
    spread_bps,
    trade_features,
    trade_sign,
)
from posttrade.features.views import VIEWS, resolve_features
from posttrade.streams.events import Fill

S = 1_000_000_000
M0 = 1_763_800_000 * S - (1_763_800_000 * S) % MINUTE_NS  # a minute boundary


def minute(*trades):
    """Fold (second, price, size, sign) prints into a minute starting at 0."""
    m = TradeMinute()
    for second, price, size, sign in trades:
        m = add_trade(m, second * S, D(price), D(size), sign)
    return m


def test_trade_sign_aggressor_first_then_tick_rule():
    prev = TradeTick(ts=0, price=D("100"), sign=-1)
    assert trade_sign("BUY", D("90"), prev) == 1
    assert trade_sign("SELL", D("110"), prev) == -1
    assert trade_sign(None, D("101"), prev) == 1
    assert trade_sign(None, D("99"), prev) == -1
    assert trade_sign(None, D("100"), prev) == -1  # zero tick keeps the previous sign
    assert trade_sign(None, D("100"), None) == 0


def test_next_tick_ignores_a_late_print():
    held = TradeTick(ts=10, price=D("5"), sign=1)
    assert next_tick(held, 9, D("6"), -1) is held
    assert next_tick(held, 11, D("4"), 0) == TradeTick(ts=11, price=D("4"), sign=1)


def test_trade_minute_folds_out_of_order_prints():
    m = minute((40, "101", "5", 1), (10, "100", "10", 1), (50, "100.5", "1", -1))
    assert (m.count, m.open, m.close) == (3, D("100"), D("100.5"))
    assert m.volume == D("16") and m.notional == D("1605.5")  # 505 + 1000 + 100.5
    assert (m.buy_volume, m.sell_volume) == (D("15"), D("1"))


def test_trade_features_worked_example():
    """The ACME sequence of docs/feast_pipeline.md, minute by minute."""
    history = TradeHistory()
    # M0: 100 x 10 (BUY), 101 x 5 (uptick: buy)
    m0 = minute((10, "100", "10", 1), (40, "101", "5", 1))
    values, history = trade_features(M0, m0, history)
    assert values == {
        "return_1m": None,
        "return_5m": None,
        "realized_vol_5m": None,
        "vwap_5m": 100.333333333333,  # 1505 / 15
        "trade_count_1m": 2,
        "volume_1m": 15.0,
        "trade_imbalance_1m": 1.0,
    }
    # M1: 100.5 x 20 (downtick: sell), 102 x 10 (SELL)
    m1 = minute((5, "100.5", "20", -1), (30, "102", "10", -1))
    values, history = trade_features(M0 + MINUTE_NS, m1, history)
    assert values["return_1m"] == pytest.approx(0.009900990099, abs=1e-15)  # 102/101 - 1
    assert values["return_5m"] is None
    assert values["realized_vol_5m"] == pytest.approx(math.log(102 / 101), rel=1e-12)
    assert values["vwap_5m"] == 100.777777777778  # 4535 / 45
    assert (values["trade_count_1m"], values["volume_1m"], values["trade_imbalance_1m"]) == (2, 30.0, -1.0)
    # M2 quiet; M3: 103 x 10 (uptick: buy)
    m3 = minute((15, "103", "10", 1))
    values, history = trade_features(M0 + 3 * MINUTE_NS, m3, history)
    assert values["return_1m"] == pytest.approx(0.009803921569, abs=1e-15)  # 103/102 - 1
    assert values["return_5m"] is None  # no price 5 minutes before M4
    assert values["realized_vol_5m"] == pytest.approx(math.hypot(math.log(102 / 101), math.log(103 / 102)), rel=1e-9)
    assert values["vwap_5m"] == 101.181818181818  # 5565 / 55
    # M4, M5 quiet; M6: 99 x 4 (downtick: sell). Its 5 m lookback starts at M2.
    m6 = minute((0, "99", "4", -1))
    values, history = trade_features(M0 + 6 * MINUTE_NS, m6, history)
    assert values["return_1m"] == pytest.approx(-0.038834951456, abs=1e-15)  # 99/103 - 1
    assert values["return_5m"] == pytest.approx(-0.029411764706, abs=1e-15)  # 99/102 (M1's close) - 1
    assert values["realized_vol_5m"] == pytest.approx(math.hypot(math.log(103 / 102), math.log(99 / 103)), rel=1e-9)
    assert values["vwap_5m"] == 101.857142857143  # (1030 + 396) / 14
    assert values["trade_imbalance_1m"] == -1.0
    # What is kept: M6's lookback minutes and the newest one before it.
    assert [m.start for m in history.minutes] == [M0 + MINUTE_NS, M0 + 3 * MINUTE_NS, M0 + 6 * MINUTE_NS]


def test_trade_features_after_a_long_gap_keep_the_last_price():
    history = TradeHistory()
    _, history = trade_features(M0, minute((1, "50", "1", 0)), history)
    values, history = trade_features(M0 + 60 * MINUTE_NS, minute((1, "55", "1", 0)), history)
    assert values["return_1m"] == pytest.approx(0.1)
    assert values["return_5m"] == pytest.approx(0.1)
    assert values["realized_vol_5m"] == pytest.approx(math.log(1.1))
    assert values["vwap_5m"] == 55.0
    assert values["trade_imbalance_1m"] is None  # no signed volume


@given(st.lists(st.decimals(min_value=1, max_value=1000, places=2), min_size=1, max_size=30))
def test_history_stays_bounded(closes):
    history = TradeHistory()
    for i, close in enumerate(closes):
        _, history = trade_features(M0 + 2 * i * MINUTE_NS, minute((1, close, "1", 0)), history)
        assert len(history.minutes) <= 7


def test_spread_and_order_flow_worked_example():
    assert spread_bps(D("99.9"), D("100.1")) == D("20")
    q1 = QuoteTop(ts=1, bid=D("99.9"), ask=D("100.1"), bid_size=D("100"), ask_size=D("200"))
    q2 = QuoteTop(ts=2, bid=D("100.0"), ask=D("100.1"), bid_size=D("150"), ask_size=D("100"))
    q3 = QuoteTop(ts=3, bid=D("99.8"), ask=D("100.0"), bid_size=D("50"), ask_size=D("60"))
    assert order_flow_term(None, q1) == 0
    assert order_flow_term(q1, q2) == D("250")  # +150 (bid up) -100 (ask same: new size) +200 (ask same: old size)
    assert order_flow_term(q2, q3) == D("-210")  # -150 (bid down) -60 (ask down)
    m = add_quote(add_quote(QuoteMinute(), q1, D(0)), q2, D(250))
    assert quote_features(m) == {
        "spread_bps": 9.995002498751,  # 2000 / 200.1
        "spread_bps_avg_1m": 14.9975012493755,  # (20 + 9.995002498751) / 2, exact
        "mid": 100.05,
        "order_flow_imbalance_1m": 250.0,
        "quote_count_1m": 2,
    }


def test_account_features_worked_example():
    day_start = 20_000 * DAY_NS
    t1, t2, t3 = day_start + 36_000 * S, day_start + 36_060 * S, day_start + 36_120 * S

    def fill(ts, symbol, side, qty, price, fee):
        return Fill(ts=ts, fill_id=f"f{ts}", account="ACC1", symbol=symbol, side=side, qty=D(qty), price=D(price), fee=D(fee))

    acme = Position(account="ACC1", symbol="ACME")
    xyz = Position(account="ACC1", symbol="XYZ")
    acme.apply(fill(t1, "ACME", "BUY", "60", "100", "1"))
    acme.apply(fill(t2, "ACME", "SELL", "20", "103", "0.5"))
    xyz.apply(fill(t3, "XYZ", "BUY", "10", "50", "0"))
    day = 20_000
    assert account_features(day, [acme, xyz], {"ACME": D("99")}, 3) == {
        "gross_exposure": 4460.0,  # 40 x 99 + 10 x 50 (no mark: open cost)
        "net_exposure": 4460.0,
        "realized_pnl_today": 58.5,  # 20 x (103 - 100) - 1.5 fees
        "fills_today": 3,
    }
    # The next day, a position not traded yet realized nothing today.
    acme.roll_day(D("99"))
    acme.apply(fill(t1 + DAY_NS, "ACME", "SELL", "40", "98", "0"))
    values = account_features(day + 1, [acme, xyz], {"ACME": D("98")}, 1)
    assert values["realized_pnl_today"] == -80.0  # 40 x (98 - 100)
    assert values["gross_exposure"] == 500.0 and values["net_exposure"] == 500.0


def test_short_positions_count_in_gross_but_offset_in_net():
    long_ = Position(account="A", symbol="L")
    short = Position(account="A", symbol="S")
    long_.apply(Fill(ts=1_700_000_000 * S, fill_id="1", account="A", symbol="L", side="BUY", qty=D(2), price=D(10)))
    short.apply(Fill(ts=1_700_000_000 * S, fill_id="2", account="A", symbol="S", side="SELL", qty=D(3), price=D(5)))
    values = account_features(0, [long_, short], {"L": D(11), "S": D(4)}, 0)
    assert values["gross_exposure"] == 34.0 and values["net_exposure"] == 10.0  # 22 + 12, 22 - 12


def test_fill_rate_per_utc_day():
    day = 20_000
    ts = day * DAY_NS + 3600 * S
    orders = add_order_to_day(add_order_to_day(None, ts, D(100)), ts + 1, D(10))
    fills = add_fill_to_day(None, ts + 2, D(60))
    fills = add_fill_to_day(fills, ts + 3, D(30))
    assert fill_rate_features(day, fills, orders) == {
        "fill_rate_today": 0.818181818182,  # 90 / 110
        "orders_today": 2,
        "ordered_qty_today": 110.0,
        "filled_qty_today": 90.0,
    }
    # The next day starts from zero; a late event of the previous day changes nothing.
    tomorrow = add_order_to_day(orders, ts + DAY_NS, D(5))
    assert tomorrow == OrdersDay(day=day + 1, orders=1, ordered_qty=D(5))
    assert add_fill_to_day(AccountDay(day=day + 1, fills=1, filled_qty=D(1)), ts, D(9)).filled_qty == D(1)
    assert fill_rate_features(day + 1, fills, tomorrow)["fill_rate_today"] == 0.0
    assert fill_rate_features(day, None, None)["fill_rate_today"] is None


def test_resolve_feature_names():
    assert resolve_features("symbol", ["vwap_5m", "symbol_quote_features:mid"]) == [
        "symbol_trade_features:vwap_5m",
        "symbol_quote_features:mid",
    ]
    everything = resolve_features("account", None)
    assert "account_features:gross_exposure" in everything and "account_order_features:fill_rate_today" in everything
    with pytest.raises(KeyError):
        resolve_features("symbol", ["gross_exposure"])  # an account feature
    with pytest.raises(KeyError):
        resolve_features("symbol", ["account_features:gross_exposure"])
    assert all(v.entity in ("symbol", "account") for v in VIEWS.values())
