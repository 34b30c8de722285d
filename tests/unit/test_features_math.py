"""Feature arithmetic pinned to hand-computed examples (docs/feast_pipeline.md)."""

from __future__ import annotations

import math
from decimal import Decimal
from decimal import Decimal as D

import pytest
from hypothesis import given
from hypothesis import strategies as st

from posttrade.agents.positions import position_update
from posttrade.core.fx import FxRates
from posttrade.core.history import ExecutionBook
from posttrade.core.reference import FxPair, Instrument, Reference
from posttrade.features.math import (
    DAY_NS,
    MINUTE_NS,
    CountedFill,
    FillsDay,
    OrdersDay,
    QuoteMinute,
    QuoteTop,
    TradeHistory,
    TradeMinute,
    TradeTick,
    account_features,
    add_order_to_day,
    add_quote,
    add_trade,
    counted_fill,
    execution_change,
    fill_rate_features,
    fills_day,
    fold_fill,
    next_tick,
    order_flow_term,
    position_exposure,
    quote_features,
    realized_today,
    realized_today_base,
    recount,
    spread_bps,
    take_update,
    trade_features,
    trade_sign,
    utc_day,
)
from posttrade.features.views import VIEWS, resolve_features
from posttrade.streams.events import Fill, PositionUpdate

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


# -- accounts: ptrc's positions ---------------------------------------------------------

T0 = 20_000 * DAY_NS + 36_000 * S  # 10:00 UTC on day 20,000


def ptrc_position(symbol, net_qty, open_cost, *, realized="0", fees="0", sod_realized="0", multiplier="1",
                  mark=None, revision=1, ts=T0, account="ACC1", currency=None, foreign_fees=None,
                  sod_foreign_fees=None) -> PositionUpdate:
    """A position as ptrc publishes it, from hand-computed figures. Every example here
    holds one lot, so its FIFO figures equal the average-cost ones."""
    net_qty, open_cost, realized, fees = D(net_qty), D(open_cost), D(realized), D(fees)
    return PositionUpdate(
        ts=ts, account=account, symbol=symbol, reason="fill", multiplier=D(multiplier), net_qty=net_qty,
        avg_open_price=open_cost / net_qty if net_qty else None, open_cost=open_cost,
        realized_pnl_gross=realized, fees=fees, realized_pnl_net=realized - fees,
        fifo_open_cost=open_cost, fifo_realized_pnl_gross=realized,
        sod_realized_pnl_net=D(sod_realized), sod_unrealized_pnl=D(0),
        mark=None if mark is None else D(mark), revision=revision, currency=currency,
        foreign_fees={c: D(v) for c, v in (foreign_fees or {}).items()},
        sod_foreign_fees={c: D(v) for c, v in (sod_foreign_fees or {}).items()},
    )


def test_account_features_worked_example():
    """ACC1 of docs/feast_pipeline.md, from ptrc's positions: buy 60 ACME @ 100 (fee 1),
    sell 20 @ 103 (fee 0.5), buy 10 XYZ @ 50; ACME printed last at 99, XYZ not at all."""
    acme = ptrc_position("ACME", "40", "4000", realized="60", fees="1.5", revision=2)
    xyz = ptrc_position("XYZ", "10", "500")
    assert account_features([acme, xyz], {"ACME": D("99")}, 3) == {
        "gross_exposure": 4460.0,  # 40 x 99 + 10 x 50 (no mark: at cost)
        "net_exposure": 4460.0,
        "realized_pnl_today": 58.5,  # 20 x (103 - 100) - 1.5 fees
        "fills_today": 3,
    }


def test_a_futures_exposure_carries_ptrcs_multiplier():
    """2 ESZ5 bought @ 4500, multiplier 50: at the print 4510 the position is worth
    2 x 4510 x 50; without a print at ptrc's published mark; without either at cost."""
    future = ptrc_position("ESZ5", "2", "9000", multiplier="50", mark="4512.25")
    assert position_exposure(future, D("4510")) == (D("451000"), D("451000"))
    assert account_features([future], {"ESZ5": D("4510")}, 1)["gross_exposure"] == 451_000.0
    assert account_features([future], {}, 1)["net_exposure"] == 451_225.0  # 2 x 4512.25 x 50
    unmarked = ptrc_position("ESZ5", "2", "9000", multiplier="50")
    assert account_features([unmarked], {}, 1)["gross_exposure"] == 450_000.0  # 9000 x 50
    short = ptrc_position("ESZ5", "-3", "-13560", multiplier="50")
    assert position_exposure(short, D("4510")) == (D("676500"), D("-676500"))
    assert position_exposure(short, None) == (D("678000"), D("-678000"))  # at cost, signed


def test_short_positions_count_in_gross_but_offset_in_net():
    long_ = ptrc_position("L", "2", "20")
    short = ptrc_position("S", "-3", "-15")
    values = account_features([long_, short], {"L": D(11), "S": D(4)}, 0)
    assert values["gross_exposure"] == 34.0 and values["net_exposure"] == 10.0  # 22 + 12, 22 - 12


def test_realized_today_is_ptrcs_since_its_start_of_day():
    """ptrc rolled the day with 100 realized net: of 158.5 realized since, 58.5 is today's;
    a flat position closed yesterday and untouched since realized nothing today."""
    traded = ptrc_position("ACME", "40", "4000", realized="160", fees="1.5", sod_realized="100")
    closed_yesterday = ptrc_position("XYZ", "0", "0", realized="70", sod_realized="70")
    assert realized_today(traded) == D("58.5")
    values = account_features([traded, closed_yesterday], {"ACME": D("99")}, 0)
    assert values["realized_pnl_today"] == 58.5
    assert values["gross_exposure"] == 3960.0  # the flat one is worth 0 at any mark


# -- accounts: money in the account's base currency -------------------------------------------

DESK = Reference(
    {"TOYOTA": Instrument(currency="JPY"), "USDJPY": Instrument(fx=FxPair("USD", "JPY")),
     "EURUSD": Instrument(fx=FxPair("EUR", "USD")), "NESN": Instrument(currency="CHF")},
    base_currencies={"EU": "EUR"},
)


def desk_rates(**marks: str) -> FxRates:
    return FxRates(DESK, lambda s: (D(marks[s]), "quote_mid", T0) if s in marks else None)


def test_account_features_are_in_the_base_currency_at_the_current_rate():
    """ACC1 (based in USD): 100 TOYOTA bought @ 2000 JPY, 40 sold @ 2100 today (fee 60 JPY),
    printed last at 2050; 10 ACME long at 99 USD. USDJPY at 150: TOYOTA's exposure is
    60 x 2050 = 123,000 JPY = 820 USD, its realized today 3940 JPY = 26.266666666667 USD."""
    toyota = ptrc_position("TOYOTA", "60", "120000", realized="4000", fees="60", currency="JPY")
    acme = ptrc_position("ACME", "10", "1000")
    values = account_features([toyota, acme], {"TOYOTA": D(2050), "ACME": D(99)}, 2, desk_rates(USDJPY="150"))
    assert values == {
        "gross_exposure": 1810.0,  # 820 + 990: never 123,000 JPY + 990 USD
        "net_exposure": 1810.0,
        "realized_pnl_today": 26.266666666667,  # 3940 / 150, rounded half-even at 12 places
        "fills_today": 2,
    }
    short = ptrc_position("TOYOTA", "-60", "-120000", currency="JPY")
    assert account_features([short, acme], {"TOYOTA": D(2050)}, 0, desk_rates(USDJPY="150"))["net_exposure"] == -820.0 + 1000.0


def test_a_feature_that_needs_an_unknown_rate_is_null():
    toyota = ptrc_position("TOYOTA", "60", "120000", realized="4000", currency="JPY")
    acme = ptrc_position("ACME", "10", "1000", realized="5")
    values = account_features([toyota, acme], {"TOYOTA": D(2050)}, 1, desk_rates())  # no USDJPY yet
    assert values == {"gross_exposure": None, "net_exposure": None, "realized_pnl_today": None, "fills_today": 1}
    # A figure of 0 needs no rate: a JPY position closed before today realized 0 today and is worth 0.
    closed = ptrc_position("TOYOTA", "0", "0", realized="4000", sod_realized="4000", currency="JPY")
    values = account_features([closed, acme], {"ACME": D(99)}, 1, desk_rates())
    assert (values["gross_exposure"], values["realized_pnl_today"]) == (990.0, 5.0)
    nesn = ptrc_position("NESN", "1", "100", currency="CHF")  # nothing quotes CHF
    values = account_features([nesn, acme], {"ACME": D(99)}, 1, desk_rates(USDJPY="150"))
    assert values["gross_exposure"] is None and values["realized_pnl_today"] == 5.0


def test_an_account_based_in_eur_and_fees_charged_in_another_currency():
    """EU is based in EUR; EURUSD at 1.08. ACME (USD) realized 108 USD today, less a fee
    of 2.16 EUR charged today in EUR (1 EUR of it before today): 100 - 1.16 EUR."""
    acme = ptrc_position("ACME", "10", "1000", realized="108", account="EU", currency="USD",
                         foreign_fees={"EUR": "3.16"}, sod_foreign_fees={"EUR": "1"})
    values = account_features([acme], {"ACME": D("108")}, 1, desk_rates(EURUSD="1.08"))
    assert values["gross_exposure"] == 1000.0  # 1080 USD / 1.08
    assert values["realized_pnl_today"] == pytest.approx(97.84)  # 108 / 1.08 - 2.16
    assert realized_today_base(acme, D(1) / D("1.08"), "EUR", desk_rates(EURUSD="1.08")) == D("97.840000000000")


def test_the_highest_revision_wins_not_the_newest_time():
    held = ptrc_position("ACME", "40", "4000", revision=5, ts=T0 + 10 * S)
    late = ptrc_position("ACME", "41", "4090", revision=6, ts=T0)  # a late fill: older ts
    assert take_update(held, late)
    assert not take_update(late, held)  # revision 5 arriving after 6: stale
    assert take_update(held, held)  # the same state published again
    assert take_update(None, held)


# -- accounts: fill counts ---------------------------------------------------------------


def execution(fill_id, ts=T0, qty="1", symbol="ES", side="BUY", account="ACC1") -> Fill:
    return Fill(ts=ts, fill_id=fill_id, account=account, symbol=symbol, side=side, qty=D(qty), price=D("100"))


def opening(fill_id, qty="1", symbol="ES") -> Fill:
    return Fill(ts=T0 - DAY_NS, fill_id=fill_id, account="ACC1", symbol=symbol, side="BUY", qty=D(qty),
                price=D("90"), exec_type="OPENING")


def bust(fill_id, ref, ts=T0 + S, symbol="ES") -> Fill:
    return Fill(ts=ts, fill_id=fill_id, account="ACC1", symbol=symbol, exec_type="BUST", ref_fill_id=ref)


def correct(fill_id, ref, qty, ts=T0 + S, symbol="ES") -> Fill:
    return Fill(ts=ts, fill_id=fill_id, account="ACC1", symbol=symbol, side="BUY", qty=D(qty), price=D("100"),
                fee=D(0), exec_type="CORRECT", ref_fill_id=ref)


class PtrcPositions:
    """ptrc's side, played by what ptrc is built on: each fill message through the
    execution book (`core.history`), and for each one that changes a position the
    update ptrc publishes (its `position_update`) with the key's next revision. ptrc's
    mark is left out: feast values positions at its own prints."""

    def __init__(self, multipliers: dict[str, Decimal] | None = None):
        self.book = ExecutionBook(multipliers)
        self.seq = 0

    def receive(self, message: Fill) -> PositionUpdate | None:
        self.seq += 1
        result = self.book.receive(message, self.seq)
        if result.status != "applied":
            return None
        position = result.position
        position.revision += 1
        return position_update(position, None, result.reason, message.ts, message, result)


class Counts:
    """One account's fill counts on a dict, kept the way the positions agent keeps its
    table: hold what each update did to an execution, `recount`, and forget earlier
    days when the counts begin a later one."""

    def __init__(self):
        self.executions: dict[str, CountedFill] = {}
        self.counts: FillsDay | None = None
        self.ptrc = PtrcPositions()

    def take(self, update: PositionUpdate) -> bool:
        """True when the counts moved."""
        change = execution_change(update)
        if change is None:
            return False
        held = self.executions.get(change.fill_id)
        execution = counted_fill(change, held, self.counts.day if self.counts is not None else None)
        if execution is None:
            return False
        self.executions[change.fill_id] = execution
        counts = recount(self.counts, held, execution)
        if counts.day > (self.counts.day if self.counts is not None else counts.day):
            self.executions = {i: e for i, e in self.executions.items() if e.day >= counts.day}
        moved, self.counts = counts != self.counts, counts
        return moved

    def receive(self, message: Fill) -> bool:
        """The message through ptrc, then its update (if ptrc publishes one) here."""
        update = self.ptrc.receive(message)
        return update is not None and self.take(update)

    def totals(self) -> tuple[int, Decimal]:
        return self.counts.fills, self.counts.filled_qty


def test_fill_counts_worked_example():
    """ACC2 of docs/feast_pipeline.md: an opening, a resend, a bust, a correction and a
    late fill. The counts count what ptrc's positions hold as executions."""
    counts = Counts()
    assert not counts.receive(opening("open1"))  # held before the feed: not a fill
    assert counts.counts is None
    assert counts.receive(execution("f4", T0, "3"))
    assert not counts.receive(execution("f4", T0, "3"))  # resent: ptrc drops it
    assert counts.receive(execution("f5", T0 + 40 * S, "2"))
    assert counts.receive(execution("f6", T0 + 110 * S, "1", side="SELL"))
    assert counts.totals() == (3, D("6"))
    assert counts.receive(bust("f5-x", "f5", T0 + 190 * S))  # f5 removed
    assert counts.totals() == (2, D("4"))
    assert counts.receive(correct("f6-c", "f6", "2", T0 + 200 * S))  # f6's quantity is now 2
    assert counts.totals() == (2, D("5"))
    assert counts.receive(execution("f7", T0 + 70 * S, "1"))  # late: in time before f6
    assert counts.totals() == (3, D("6"))
    assert counts.counts == fills_day(counts.executions.values())


def test_an_update_published_again_counts_once():
    counts = Counts()
    arrival = counts.ptrc.receive(execution("a", qty="5"))
    correction = counts.ptrc.receive(correct("a-c", "a", "4"))
    assert counts.take(arrival) and counts.take(correction)
    assert not counts.take(arrival) and not counts.take(correction)
    assert counts.totals() == (1, D("4"))


def test_counts_follow_what_ptrc_did_to_each_execution():
    counts = Counts()
    counts.receive(execution("a", qty="5"))
    assert counts.receive(correct("a-c1", "a", "4"))
    assert counts.receive(correct("a-c2", "a-c1", "3"))  # names the correction: amends "a"
    assert counts.totals() == (1, D("3"))
    assert counts.receive(bust("a-x", "a-c2"))
    assert counts.totals() == (0, D("0"))
    assert not counts.receive(correct("a-c3", "a", "9"))  # refused by ptrc: "a" is busted
    # An opening, and an amendment of it, change a position but no count.
    counts.receive(opening("open1"))
    assert counts.ptrc.receive(correct("open1-c", "open1", "7")) is not None
    assert counts.totals() == (0, D("0"))


def test_amendments_that_arrived_before_their_execution_count_when_it_comes():
    counts = Counts()
    assert not counts.receive(bust("x-b", "x"))  # pending at ptrc: nothing published
    assert counts.receive(execution("x", qty="4"))  # arrives busted: its day begins, 0 fills
    assert counts.totals() == (0, D("0"))
    assert not counts.receive(correct("y-c1", "y", "6"))
    assert counts.receive(execution("y", qty="5"))  # released with the correction in force
    assert counts.totals() == (1, D("6"))


def test_counts_are_of_the_newest_day_and_only_that_day_is_held():
    counts = Counts()
    counts.receive(execution("d1", qty="5"))
    counts.receive(execution("old", T0 - DAY_NS, "9"))  # an earlier day's, late: not today's
    assert counts.totals() == (1, D("5")) and set(counts.executions) == {"d1"}
    assert counts.receive(execution("d2", T0 + DAY_NS, "2"))  # the next day begins afresh
    assert counts.counts == FillsDay(day=20_001, fills=1, filled_qty=D("2"))
    assert set(counts.executions) == {"d2"}  # the day before is forgotten
    assert not counts.receive(bust("d1-x", "d1", T0 + DAY_NS + S))  # yesterday's: today's stay
    assert counts.totals() == (1, D("2"))


# One account and symbol's feed, random but like a real one: executions over two days,
# each possibly resent, corrected (a second correction naming the first) and busted
# (naming the last correction) after it happened, an opening, all in any order.
_feed_step = st.tuples(
    st.integers(min_value=0, max_value=2 * 86_400 - 600),  # execution second
    st.integers(min_value=1, max_value=9),  # qty
    st.booleans(),  # resent
    st.integers(min_value=0, max_value=2),  # corrections
    st.booleans(),  # busted
)


@given(st.lists(_feed_step, min_size=1, max_size=12), st.randoms(use_true_random=False))
def test_counts_are_the_executions_of_ptrcs_effective_history(steps, random):
    """Whatever the arrival order, the counts are the executions of their day in ptrc's
    effective history and their quantities in force, and rebuilding them from what is
    held gives the same."""
    day0 = 20_000 * DAY_NS
    messages = [opening("open1")]
    for n, (second, qty, resent, corrections, busted) in enumerate(steps):
        ts = day0 + second * S
        messages.append(execution(f"e{n}", ts, str(qty)))
        if resent:
            messages.append(execution(f"e{n}", ts, str(qty)))
        ref = f"e{n}"
        for c in range(corrections):
            messages.append(correct(f"e{n}-c{c}", ref, str(qty + c + 1), ts + (c + 1) * S))
            ref = f"e{n}-c{c}"
        if busted:
            messages.append(bust(f"e{n}-x", ref, ts + 10 * S))
    random.shuffle(messages)
    counts = Counts()
    for message in messages:
        counts.receive(message)
    effective = counts.ptrc.book.effective_history("ACC1", "ES")
    counted = [f for f in effective if f.exec_type == "NEW" and utc_day(f.ts) == counts.counts.day]
    assert counts.totals() == (len(counted), sum((f.qty for f in counted), D(0)))
    assert counts.counts == fills_day(counts.executions.values())


def test_fill_rate_per_utc_day():
    day = 20_000
    ts = day * DAY_NS + 3600 * S
    orders = add_order_to_day(add_order_to_day(None, ts, D(100)), ts + 1, D(10))
    fills = FillsDay(day=day, fills=2, filled_qty=D(90))
    assert fill_rate_features(day, fills, orders) == {
        "fill_rate_today": 0.818181818182,  # 90 / 110
        "orders_today": 2,
        "ordered_qty_today": 110.0,
        "filled_qty_today": 90.0,
    }
    # The next day starts from zero; a late order of the previous day changes nothing.
    tomorrow = add_order_to_day(orders, ts + DAY_NS, D(5))
    assert tomorrow == OrdersDay(day=day + 1, orders=1, ordered_qty=D(5))
    assert add_order_to_day(tomorrow, ts, D(9)) is tomorrow
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


def test_folded_executions_count_together():
    """`fold_fill`: an account's oldest executions, no longer held one by one, keep their
    count and quantity (a busted one neither)."""
    folded = fold_fill(None, CountedFill(ts=T0, qty=D(5)))
    folded = fold_fill(folded, CountedFill(ts=T0 + S, qty=D(9), busted=True))
    folded = fold_fill(folded, CountedFill(ts=T0 + 2 * S, qty=D(2)))
    assert folded == CountedFill(ts=T0 + 2 * S, qty=D(7), fills=2)
    held = [folded, CountedFill(ts=T0 + 3 * S, qty=D(1))]
    assert fills_day(held) == FillsDay(day=utc_day(T0), fills=3, filled_qty=D(8))
