"""Compliance rules: one test group per rule, then determinism and state."""

from __future__ import annotations

from decimal import Decimal as D

import msgspec
import pytest

from posttrade.core.compliance import (
    Alert,
    ComplianceEvaluator,
    ComplianceRules,
    ComplianceState,
    alert_id,
)
from posttrade.core.positions import PositionBook
from posttrade.streams.events import Fill

T0 = 1_700_000_000_000_000_000
SECOND = 1_000_000_000


class Desk:
    """A book and an evaluator fed together, as the live service does."""

    def __init__(self, multipliers=None, marks=None, **rules):
        self.book = PositionBook(multipliers=multipliers, marks=marks)
        self.evaluator = ComplianceEvaluator(ComplianceRules.from_config(rules))
        self.n = 0

    def fill(self, side, qty, price, symbol="S", account="A", fee="0", ts=None, fill_id=None):
        self.n += 1
        f = Fill(
            ts=T0 + self.n * SECOND if ts is None else ts,
            fill_id=fill_id or f"f{self.n}",
            account=account,
            symbol=symbol,
            side=side,
            qty=D(str(qty)),
            price=D(str(price)),
            fee=D(str(fee)),
        )
        self.book.apply(f)
        return self.evaluator.check_fill(f, self.book)

    def mark(self, symbol, price, ts=None):
        self.book.set_mark(symbol, price)
        return self.evaluator.check_marks(self.book, ts or T0, [symbol])


def rules_of(alerts):
    return [a.rule for a in alerts]


# -- restricted symbols -----------------------------------------------------------------


def test_restricted_symbol_alerts_on_every_fill():
    desk = Desk(restricted_symbols=["BAD", "WORSE"])
    assert desk.fill("BUY", 1, 10, symbol="OK") == []
    first = desk.fill("BUY", 1, 10, symbol="BAD")
    second = desk.fill("SELL", 1, 10, symbol="BAD")
    assert rules_of(first) == rules_of(second) == ["restricted_symbol"]
    alert = first[0]
    assert alert.severity == "critical"
    assert (alert.account, alert.symbol, alert.fill_id, alert.ts) == ("A", "BAD", "f2", T0 + 2 * SECOND)
    assert "restricted" in alert.message and "BAD" in alert.message
    assert alert.alert_id != second[0].alert_id


# -- max position -------------------------------------------------------------------------


def test_max_position_alerts_on_crossing_only_and_rearms():
    desk = Desk(max_position="100", max_position_by_symbol={"BIG": "1000"})
    assert desk.fill("BUY", 100, 10) == []  # at the limit is allowed
    crossed = desk.fill("BUY", 1, 10)
    assert rules_of(crossed) == ["max_position"]
    alert = crossed[0]
    assert (alert.observed, alert.limit, alert.symbol) == (D(101), D(100), "S")
    assert desk.fill("BUY", 50, 10) == []  # still in breach, worse: silent
    assert desk.fill("SELL", 60, 10) == []  # back to 91: re-armed, nothing to say
    again = desk.fill("BUY", 20, 10)  # 111: a new crossing
    assert rules_of(again) == ["max_position"] and again[0].observed == 111
    # short side counts too, per symbol override
    assert desk.fill("SELL", 1000, 10, symbol="BIG") == []
    assert rules_of(desk.fill("SELL", 1, 10, symbol="BIG")) == ["max_position"]
    # per account
    assert rules_of(desk.fill("BUY", 101, 10, account="B")) == ["max_position"]


# -- gross notional -----------------------------------------------------------------------


def test_max_gross_notional_from_fills_and_marks():
    desk = Desk(max_gross_notional="10000", multipliers={"ES": 50}, marks={"S": "10"})
    assert desk.fill("BUY", 500, 10) == []  # 5000
    assert desk.fill("SELL", 4, 20, symbol="ES") == []  # unmarked: at cost 4 x 20 x 50 = 4000
    crossed = desk.fill("BUY", 200, 10)  # 7000 + 4000
    assert rules_of(crossed) == ["max_gross_notional"]
    alert = crossed[0]
    assert alert.symbol is None and alert.observed == D(11000) and alert.limit == D(10000)
    assert desk.mark("S", "5") == []  # 3500 + 4000: back within, re-armed
    by_mark = desk.mark("ES", "40", ts=T0 + 99)  # 3500 + 4 x 40 x 50 = 11500
    assert rules_of(by_mark) == ["max_gross_notional"]
    assert by_mark[0].fill_id is None and by_mark[0].ts == T0 + 99
    assert by_mark[0].observed == D(11500)
    assert desk.mark("ES", "41") == []  # worse, still in breach: silent


def test_check_marks_only_looks_at_accounts_holding_the_symbol():
    desk = Desk(max_gross_notional="100", marks={"S": "1"})
    desk.fill("BUY", 50, 1, account="A")
    desk.fill("BUY", 50, 1, account="B", symbol="T")
    desk.book.set_mark("T", "10")
    assert desk.evaluator.check_marks(desk.book, T0, ["S"]) == []  # B not looked at
    alerts = desk.evaluator.check_marks(desk.book, T0, ["T"])
    assert [(a.rule, a.account) for a in alerts] == [("max_gross_notional", "B")]


# -- daily loss -----------------------------------------------------------------------------


def test_daily_loss_limit_on_day_pnl():
    desk = Desk(daily_loss_limit="1000", marks={"S": "100"})
    assert desk.fill("BUY", 100, 100, fee="5") == []  # day P&L -5
    desk.book.roll_day()  # start of day: realized -5, unrealized 0
    assert desk.mark("S", "91") == []  # -900
    crossed = desk.mark("S", "89.9", ts=T0 + 7)  # -1010 < -1000
    assert rules_of(crossed) == ["daily_loss_limit"]
    alert = crossed[0]
    assert alert.observed == D("-1010") and alert.limit == D("-1000")
    assert "-1010" in alert.message
    assert desk.mark("S", "80") == []  # worse: silent
    assert desk.fill("SELL", 100, 95, fee="5") == []  # realized: day P&L -505, re-armed
    assert desk.evaluator.state.breaches == set()


def test_daily_loss_not_evaluated_while_unknown():
    desk = Desk(daily_loss_limit="1")
    assert desk.fill("BUY", 10, 100) == []  # open, no mark: day P&L unknown
    assert desk.book.account_totals("A").day_pnl is None
    alerts = desk.mark("S", "50")
    assert rules_of(alerts) == ["daily_loss_limit"]  # -500 once known


# -- wash trades ----------------------------------------------------------------------------


def test_wash_trade_pattern():
    desk = Desk(wash_trade_window_s="5")
    assert desk.fill("BUY", 10, "100.50", ts=T0) == []
    assert desk.fill("BUY", 10, "100.50", ts=T0 + SECOND) == []  # same side
    assert desk.fill("SELL", 10, "100.51", ts=T0 + 2 * SECOND) == []  # other price
    assert desk.fill("SELL", 10, "100.50", ts=T0 + 2 * SECOND, account="B") == []  # other account
    assert desk.fill("SELL", 10, "100.50", ts=T0 + 2 * SECOND, symbol="T") == []  # other symbol
    hit = desk.fill("SELL", 3, "100.5", ts=T0 + 5 * SECOND, fill_id="wash")  # 100.5 == 100.50
    assert rules_of(hit) == ["wash_trade"]
    alert = hit[0]
    assert alert.severity == "warning"
    assert alert.observed == D(4) and alert.limit == D(5)  # nearest match 4 s before
    assert "f1" in alert.message and "f2" in alert.message
    late = desk.fill("SELL", 1, "100.50", ts=T0 + 11 * SECOND)  # 10 s after the last buy
    assert late == []


def test_wash_trade_window_is_inclusive_and_state_is_pruned():
    desk = Desk(wash_trade_window_s="0.5")
    desk.fill("BUY", 1, 10, ts=T0)
    assert rules_of(desk.fill("SELL", 1, 10, ts=T0 + SECOND // 2)) == ["wash_trade"]
    desk.fill("BUY", 1, 11, ts=T0 + 10 * SECOND)
    recent = desk.evaluator.state.recent["A"]["S"]
    assert [r.ts for r in recent] == [T0 + 10 * SECOND]  # older ones dropped


# -- determinism, state, config -------------------------------------------------------------


def scenario(desk):
    out = []
    out += desk.fill("BUY", 150, 10, fill_id="a")
    out += desk.fill("SELL", 1, 10, fill_id="b", symbol="BAD")
    out += desk.fill("BUY", 1, 10, fill_id="c", symbol="BAD")
    return out


def test_replay_gives_the_same_alert_ids():
    rules = dict(max_position="100", restricted_symbols=["BAD"], wash_trade_window_s="60")
    first = scenario(Desk(**rules))
    second = scenario(Desk(**rules))
    assert rules_of(first) == ["max_position", "restricted_symbol", "restricted_symbol", "wash_trade"]
    assert [a.alert_id for a in first] == [a.alert_id for a in second]
    assert len({a.alert_id for a in first}) == 4
    assert first[0].alert_id == alert_id("max_position", "a", "A", "S")


def test_state_and_alerts_serialize():
    desk = Desk(max_position="100", wash_trade_window_s="60")
    alerts = scenario(desk)
    state = desk.evaluator.state
    raw = msgspec.json.encode(state)
    back = msgspec.json.decode(raw, type=ComplianceState)
    assert back == state
    assert ("max_position", "A", "S") in back.breaches
    # a restarted evaluator with the saved state does not re-alert the standing breach
    restarted = ComplianceEvaluator(desk.evaluator.rules, back)
    f = Fill(ts=T0 + 10**12, fill_id="z", account="A", symbol="S", side="BUY", qty=D(1), price=D(10))
    desk.book.apply(f)
    assert restarted.check_fill(f, desk.book) == []
    encoded = msgspec.json.encode(alerts)
    assert msgspec.json.decode(encoded, type=list[Alert]) == alerts
    assert b'"observed":"150"' in encoded  # decimals as strings
    assert b'"observed":"1"' in encoded  # the wash trade gap, 1 s


def test_rules_from_config():
    rules = ComplianceRules.from_config(
        {
            "max_position": 100,
            "max_gross_notional": "1e6",
            "daily_loss_limit": 2500.5,
            "restricted_symbols": ["X"],
            "wash_trade_window_s": 2,
            "severity": {"wash_trade": "critical"},
        }
    )
    assert rules.max_position == D(100) and rules.daily_loss_limit == D("2500.5")
    assert rules.severity_of("wash_trade") == "critical"
    assert rules.severity_of("max_position") == "critical"
    assert ComplianceRules.from_config(None) == ComplianceRules()
    for bad in (
        {"max_position": -1},
        {"daily_loss_limit": 0},
        {"max_position_by_symbol": {"X": "-5"}},
        {"severity": {"nope": "critical"}},
        {"severity": {"wash_trade": "loud"}},
        {"unknown_rule": 1},
        {"max_position": "abc"},
    ):
        with pytest.raises(ValueError):
            ComplianceRules.from_config(bad)


def test_no_rules_no_alerts():
    desk = Desk()
    assert desk.fill("BUY", 10**6, 10**6) == []
    assert desk.fill("SELL", 10**6, 10**6) == []
    assert desk.mark("S", "1") == []
