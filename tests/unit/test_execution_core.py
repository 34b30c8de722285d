"""posttrade.core.execution: the TCA formulas, pinned to docs/execution_quality.md.

Every number asserted in `test_worked_example_*` is printed in the document's worked
example; change one and the other must change with it.
"""

from __future__ import annotations

from decimal import Decimal as D

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from posttrade.core import execution as tca

# -- the worked example of docs/execution_quality.md --------------------------------------


def test_worked_example_fill_1():
    # BUY, arrival mid 100.00, fill 600 @ 100.05 at T0+0.5 s, mid at fill 100.02,
    # mids 100.04 / 100.08 / 100.12 at +1 s / +5 s / +60 s.
    assert tca.mid_price(D("99.98"), D("100.02")) == D("100.00")
    assert tca.slippage_bps("BUY", D("100.05"), D("100.00")) == D("5.00000000")
    assert tca.slippage_cost("BUY", D("600"), D("100.05"), D("100.00")) == D("30.00")
    assert tca.effective_spread_bps(D("100.05"), D("100.02")) == D("5.99880024")
    assert tca.markout_bps("BUY", D("100.05"), D("100.04")) == D("-0.99950025")
    assert tca.markout_bps("BUY", D("100.05"), D("100.08")) == D("2.99850075")
    assert tca.markout_bps("BUY", D("100.05"), D("100.12")) == D("6.99650175")


def test_worked_example_fill_2():
    # BUY, fill 200 @ 100.10 at T0+2.5 s, mid at fill 100.06, then 100.06 / 100.08 / 100.02.
    assert tca.slippage_bps("BUY", D("100.10"), D("100.00")) == D("10.00000000")
    assert tca.slippage_cost("BUY", D("200"), D("100.10"), D("100.00")) == D("20.00")
    assert tca.effective_spread_bps(D("100.10"), D("100.06")) == D("7.99520288")
    assert tca.markout_bps("BUY", D("100.10"), D("100.06")) == D("-3.99600400")
    assert tca.markout_bps("BUY", D("100.10"), D("100.08")) == D("-1.99800200")
    assert tca.markout_bps("BUY", D("100.10"), D("100.02")) == D("-7.99200799")


def test_worked_example_order():
    # The tape before arrival holds one print (500 @ 99.99); by the cancel, four more.
    vwap, volume = tca.market_vwap((D("49995.00"), D("500")), (D("250149.00"), D("2500")))
    assert (vwap, volume) == (D("100.077"), D("2000"))
    m = tca.order_metrics(
        tca.OrderInputs(
            side="BUY",
            order_qty=D("1000"),
            filled_qty=D("800"),
            filled_notional=D("80050.00"),
            fees=D("4.00"),
            arrival_ts=0,
            arrival_mid=D("100.00"),
            first_fill_ts=500_000_000,
            last_fill_ts=2_500_000_000,
            unfilled_price=D("100.12"),
            market_vwap=vwap,
        )
    )
    assert m.fill_ratio == D("0.8")
    assert m.unfilled_qty == D("200")
    assert m.avg_fill_price == D("100.0625")
    assert (m.time_to_first_fill_ns, m.time_to_last_fill_ns) == (500_000_000, 2_500_000_000)
    assert m.vwap_slippage_bps == D("-1.44888436")
    assert m.benchmark_notional == D("100000.00")
    assert m.execution_cost == D("50.00")
    assert m.opportunity_cost == D("24.00")
    assert m.implementation_shortfall == D("78.00")
    assert m.implementation_shortfall_bps == D("7.80000000")


def test_worked_example_summary_weighting():
    # Notional-weighted slippage: sum of costs / sum of arrival notionals.
    cost = D("30.00") + D("20.00")
    weight = D("600") * D("100.00") + D("200") * D("100.00")
    assert tca.to_bps(cost, weight) == D("6.25000000")


def test_worked_example_after_its_correction_and_bust():
    # docs/execution_quality.md, "Corrections and busts, worked": F2 corrected to 150 @
    # 100.08 (fee 0.75); F3 (100 @ 100.12 at T0+3 s) busted. The fill's own numbers are
    # the formulas over the corrected economics; the order's, over F1 and corrected F2.
    assert tca.slippage_bps("BUY", D("100.08"), D("100.00")) == D("8.00000000")
    assert tca.slippage_cost("BUY", D("150"), D("100.08"), D("100.00")) == D("12.00")
    assert tca.effective_spread_bps(D("100.08"), D("100.06")) == D("3.99760144")
    assert tca.markout_bps("BUY", D("100.08"), D("100.06")) == D("-1.99840128")
    assert tca.markout_bps("BUY", D("100.08"), D("100.08")) == D("0")
    assert tca.markout_bps("BUY", D("100.08"), D("100.02")) == D("-5.99520384")
    m = tca.order_metrics(
        tca.OrderInputs(
            side="BUY", order_qty=D("1000"), filled_qty=D("750"), filled_notional=D("60030.00") + D("15012.00"),
            fees=D("3.75"), arrival_ts=0, arrival_mid=D("100.00"), first_fill_ts=500_000_000,
            last_fill_ts=2_500_000_000, unfilled_price=D("100.12"), market_vwap=D("100.077"),
        )
    )
    assert (m.fill_ratio, m.avg_fill_price, m.vwap_slippage_bps) == (D("0.75"), D("100.056"), D("-2.09838424"))
    assert (m.execution_cost, m.opportunity_cost) == (D("42.00"), D("30.00"))
    assert (m.implementation_shortfall, m.implementation_shortfall_bps) == (D("75.75"), D("7.575"))
    # The group's notional-weighted slippage: (30 + 12) / (60 000 + 15 000).
    assert tca.to_bps(D("30.00") + D("12.00"), D("60000") + D("15000")) == D("5.6")


# -- signs and edge cases ------------------------------------------------------------------


def test_sell_side_signs():
    # Selling below the arrival mid is a cost; the mid falling afterwards is favourable.
    assert tca.slippage_bps("SELL", D("99.95"), D("100")) == D("5.00000000")
    assert tca.slippage_cost("SELL", D("10"), D("99.95"), D("100")) == D("0.50")
    assert tca.markout_bps("SELL", D("99.95"), D("99.90")) == D("5.00250125")
    assert tca.effective_spread_bps(D("99.95"), D("100")) == D("10.00000000")


def test_sell_order_shortfall_values_unfilled_part_at_the_later_mid():
    m = tca.order_metrics(
        tca.OrderInputs(
            side="SELL", order_qty=D("100"), filled_qty=D("40"), filled_notional=D("3996"), fees=D("-0.4"),
            arrival_ts=10, arrival_mid=D("100"), first_fill_ts=20, last_fill_ts=30,
            unfilled_price=D("99.5"), market_vwap=D("99.8"),
        )
    )
    # execution: -(3996 - 4000) = 4; opportunity: -(60 x (99.5 - 100)) = 30; rebate -0.4.
    assert (m.execution_cost, m.opportunity_cost, m.implementation_shortfall) == (D("4"), D("30.0"), D("33.6"))
    assert m.implementation_shortfall_bps == D("33.60000000")
    assert m.vwap_slippage_bps == D("-10.02004008")  # sold at 99.9 against a market 99.8: better
    assert (m.time_to_first_fill_ns, m.time_to_last_fill_ns) == (10, 20)


def test_unknown_inputs_give_none_not_guesses():
    base = dict(
        side="BUY", order_qty=D("10"), filled_qty=D("4"), filled_notional=D("400"), fees=D("0"),
        arrival_ts=1, arrival_mid=None, first_fill_ts=2, last_fill_ts=3, unfilled_price=D("101"), market_vwap=None,
    )
    m = tca.order_metrics(tca.OrderInputs(**base))
    assert m.implementation_shortfall is None and m.benchmark_notional is None and m.vwap_slippage_bps is None
    m = tca.order_metrics(tca.OrderInputs(**{**base, "arrival_mid": D("100"), "unfilled_price": None}))
    assert m.execution_cost == D("0") and m.opportunity_cost is None and m.implementation_shortfall is None
    # Fully filled: no unfilled part, so no price is needed for it.
    full = {**base, "arrival_mid": D("100"), "unfilled_price": None, "filled_qty": D("10"), "filled_notional": D("1001")}
    m = tca.order_metrics(tca.OrderInputs(**full))
    assert m.opportunity_cost == 0 and m.implementation_shortfall == D("1") and m.fill_ratio == 1
    # Nothing filled: no average price, no times to fill.
    none = {**base, "filled_qty": D("0"), "filled_notional": D("0"), "first_fill_ts": None, "last_fill_ts": None}
    m = tca.order_metrics(tca.OrderInputs(**none))
    assert m.avg_fill_price is None and m.time_to_first_fill_ns is None and m.fill_ratio == 0


def test_overfill_has_no_negative_unfilled_part():
    m = tca.order_metrics(
        tca.OrderInputs(
            side="BUY", order_qty=D("10"), filled_qty=D("12"), filled_notional=D("1200"), fees=D("0"),
            arrival_ts=0, arrival_mid=D("100"), first_fill_ts=1, last_fill_ts=2, unfilled_price=None, market_vwap=None,
        )
    )
    assert m.unfilled_qty == 0 and m.fill_ratio == D("1.2") and m.opportunity_cost == 0


def test_bps_rounds_once_half_even_at_8_places():
    assert tca.to_bps(D("1"), D("3")) == D("3333.33333333")
    assert tca.to_bps(D("-1"), D("3")) == D("-3333.33333333")
    # 0.000000005 bps exactly: a tie, rounded to the even neighbour 0.
    assert tca.to_bps(D("5E-13"), D("1")) == D("0E-8")
    assert tca.to_bps(D("15E-13"), D("1")) == D("2E-8")
    with pytest.raises(ZeroDivisionError):
        tca.to_bps(D("1"), D("0"))


@settings(deadline=None, max_examples=500)
@given(
    numerator=st.decimals(allow_nan=False, allow_infinity=False, min_value=D("-1E+60"), max_value=D("1E+60")),
    denominator=st.decimals(allow_nan=False, allow_infinity=False, min_value=D("1E-30"), max_value=D("1E+40")),
    negative=st.booleans(),
)
def test_bps_is_the_true_quotient_rounded_once(numerator, denominator, negative):
    """The fast division (to 64 digits rounding to odd, then half to even) gives exactly
    the integer-arithmetic rounding of the true quotient, huge quotients included."""
    from posttrade.core.exact import EXACT, round_quotient

    denominator = -denominator if negative else denominator
    expected = round_quotient(EXACT.multiply(numerator, D(10_000)), denominator, 8)
    got = tca.to_bps(numerator, denominator)
    assert got == expected and str(got) == str(expected)


def test_side_must_be_buy_or_sell():
    with pytest.raises(ValueError):
        tca.side_sign("buy")


def test_vwap_without_volume_is_none():
    assert tca.vwap(D("0"), D("0")) is None
    assert tca.market_vwap((D("5"), D("1")), (D("5"), D("1"))) == (None, D("0"))
    assert tca.market_vwap(None, (D("5"), D("1"))) == (None, None)


def test_exact_with_many_digits():
    # Beyond the default 28-digit context: nothing rounds before the final bps rounding.
    price = D("123456789012.123456789012")
    mid = D("123456789012.123456789011")
    assert tca.slippage_cost("BUY", D("1000000000.000000001"), price, mid) == D("0.001000000000000000001")
    assert tca.effective_spread_bps(price, mid) == D("0E-8")


# -- properties -----------------------------------------------------------------------------

prices = st.decimals(min_value=D("0.0001"), max_value=D("100000"), places=4)
quantities = st.decimals(min_value=D("0.001"), max_value=D("1000000"), places=3)


@settings(deadline=None)  # a shared, loaded machine: no per-example time limit
@given(price=prices, mid=prices)
def test_buy_and_sell_slippage_are_opposite(price, mid):
    assert tca.slippage_bps("BUY", price, mid) == -tca.slippage_bps("SELL", price, mid)
    assert tca.markout_bps("BUY", price, mid) == -tca.markout_bps("SELL", price, mid)


@settings(deadline=None)  # a shared, loaded machine: no per-example time limit
@given(price=prices, mid=prices)
def test_effective_spread_is_non_negative_and_side_free(price, mid):
    spread = tca.effective_spread_bps(price, mid)
    assert spread >= 0
    assert (spread == 0) == (price == mid)


@settings(deadline=None)  # a shared, loaded machine: no per-example time limit
@given(qty=quantities, price=prices, mid=prices, side=st.sampled_from(["BUY", "SELL"]))
def test_cost_over_arrival_notional_is_the_slippage(qty, price, mid, side):
    cost = tca.slippage_cost(side, qty, price, mid)
    assert tca.to_bps(cost, qty * mid) == tca.slippage_bps(side, price, mid)


@settings(deadline=None)  # a shared, loaded machine: no per-example time limit
@given(
    side=st.sampled_from(["BUY", "SELL"]),
    order_qty=quantities,
    fills=st.lists(st.tuples(quantities, prices), min_size=0, max_size=5),
    p0=prices,
    pu=prices,
    fee=st.decimals(min_value=D("-10"), max_value=D("10"), places=2),
)
def test_shortfall_is_the_paper_loss(side, order_qty, fills, p0, pu, fee):
    """IS equals the paper portfolio's value minus the real one's, by construction:
    what was bought at the fill prices plus what is still to buy at Pu, against all at P0."""
    filled = sum((q for q, _ in fills), D(0))
    notional = sum((q * p for q, p in fills), D(0))
    m = tca.order_metrics(
        tca.OrderInputs(
            side=side, order_qty=order_qty, filled_qty=filled, filled_notional=notional, fees=fee,
            arrival_ts=0, arrival_mid=p0, first_fill_ts=None, last_fill_ts=None, unfilled_price=pu, market_vwap=None,
        )
    )
    s = tca.side_sign(side)
    unfilled = max(order_qty - filled, D(0))
    expected = s * (notional + unfilled * pu - (filled + unfilled) * p0) + fee
    assert m.implementation_shortfall == expected
