"""Money in several currencies: reference data, conversion rates, base-currency figures.

Worked examples are pinned to the digit; the property tests say that account totals are
the sums of the converted position figures and that no figure ever adds two currencies.
"""

from __future__ import annotations

from decimal import Decimal as D

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from posttrade.core.compliance import ComplianceEvaluator, ComplianceRules
from posttrade.core.exact import EXACT
from posttrade.core.fx import FxRates, convert, invert
from posttrade.core.history import ExecutionBook
from posttrade.core.positions import PositionBook
from posttrade.core.reference import FxPair, Instrument, Reference, ReferenceError
from posttrade.core.valuation import value_position
from posttrade.streams.events import Fill, InvalidEvent, decode

T0 = 1_700_000_000_000_000_000


def fill(n: int, account: str, symbol: str, side: str, qty: str, price: str, fee: str = "0",
         fee_currency: str | None = None) -> Fill:  # fmt: skip
    return Fill(
        ts=T0 + n, fill_id=f"f{n}", account=account, symbol=symbol, side=side, qty=D(qty), price=D(price),
        fee=D(fee), fee_currency=fee_currency,
    )


DESK = Reference(
    {
        "TOYOTA": Instrument(currency="JPY"),
        "USDJPY": Instrument(fx=FxPair("USD", "JPY")),
        "EURUSD": Instrument(fx=FxPair("EUR", "USD")),
        "BTCUSDT": Instrument(currency="USDT"),
        "NESN": Instrument(currency="CHF"),
        "ESU4": Instrument(multiplier=D(50)),
    },
    base_currencies={"EU": "EUR"},
    fixed={"USDT": {"USD": D("0.9998")}},
)


def book(*fills: Fill, marks: dict[str, str] | None = None) -> PositionBook:
    executions = ExecutionBook(reference=DESK)
    for seq, f in enumerate(fills, 1):
        assert executions.receive(f, seq).status == "applied"
    positions = executions.positions
    for symbol, price in (marks or {}).items():
        positions.set_mark(symbol, price)
    return positions


# -- rates ---------------------------------------------------------------------------------


def rates(marks: dict[str, str], reference: Reference = DESK) -> FxRates:
    return FxRates(reference, lambda s: (D(marks[s]), "quote_mid", 7) if s in marks else None)


def test_rate_rules_in_order():
    fx = rates({"USDJPY": "150", "EURUSD": "1.08"})
    assert fx.rate("JPY", "JPY").rate == 1 and fx.rate("JPY", "JPY").legs[0].source == "identity"
    fixed = fx.rate("USDT", "USD")
    assert fixed.rate == D("0.9998") and fixed.legs[0].source == "fixed" and not fixed.legs[0].inverse
    inverse_fixed = fx.rate("USD", "USDT")
    assert inverse_fixed.rate == D("1.0002000400080016003") and inverse_fixed.legs[0].inverse  # 20 digits
    direct = fx.rate("USD", "JPY")
    assert direct.rate == 150 and direct.legs[0].instrument == "USDJPY" and direct.legs[0].ts == 7
    inverse = fx.rate("JPY", "USD")
    assert inverse.rate == D("0.0066666666666666666667") and inverse.legs[0].inverse
    # JPY -> EUR: JPY -> USD (1/150), USD -> EUR (1/1.08), the exact product.
    cross = fx.rate("JPY", "EUR")
    assert [(leg.from_, leg.to) for leg in cross.legs] == [("JPY", "USD"), ("USD", "EUR")]
    assert cross.rate == EXACT.multiply(D("0.0066666666666666666667"), D("0.92592592592592592593"))
    assert cross.rate == D("0.006172839506172839506230864197530864197531")
    # USDT -> JPY: a fixed leg then a mark.
    assert rates({"USDJPY": "150"}).rate("USDT", "JPY").rate == D("149.970")
    assert fx.rate("CHF", "USD") is None  # nothing quotes CHF
    assert rates({}).rate("JPY", "USD") is None  # the pair's instrument has no mark yet


def test_fixed_rate_wins_over_a_mark():
    reference = Reference({"USDJPY": Instrument(fx=FxPair("USD", "JPY"))}, fixed={"JPY": {"USD": D("0.007")}})
    rate = rates({"USDJPY": "150"}, reference).rate("JPY", "USD")
    assert rate.rate == D("0.007") and rate.legs[0].source == "fixed"


def test_a_leg_never_pivots_again():
    # CHF -> USD has no direct rate, and the pivot is USD: nothing else is tried.
    reference = Reference({"EURCHF": Instrument(fx=FxPair("EUR", "CHF")), "EURUSD": Instrument(fx=FxPair("EUR", "USD"))})
    assert rates({"EURCHF": "0.95", "EURUSD": "1.08"}, reference).rate("CHF", "USD") is None
    pivot_eur = Reference(
        {"EURCHF": Instrument(fx=FxPair("EUR", "CHF")), "EURUSD": Instrument(fx=FxPair("EUR", "USD"))}, pivot="EUR"
    )
    assert rates({"EURCHF": "0.95", "EURUSD": "1.08"}, pivot_eur).rate("CHF", "USD").rate == EXACT.multiply(invert(D("0.95")), D("1.08"))


def test_convert_rounds_half_even_at_12_places():
    assert convert(D("0.0000000000005"), D(1)) == D("0E-12")
    assert convert(D("0.0000000000015"), D(1)) == D("0.000000000002")
    assert convert(None, D(1)) is None and convert(D(1), None) is None


# -- reference data --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data, message",
    [
        ({"instruments": {"USDJPY": {"fx": {"base": "USD", "quote": "JPY"}}, "JPYUSD": {"fx": {"base": "JPY", "quote": "USD"}}}},
         "at most one instrument per pair"),
        ({"instruments": {"USDJPY": {"currency": "USD", "fx": {"base": "USD", "quote": "JPY"}}}}, "quote currency JPY"),
        ({"instruments": {"X": {"currency": "usd"}}}, "currency code"),
        ({"instruments": {"X": {"multiplier": 0}}}, "multiplier must be > 0"),
        ({"instruments": {"X": {"size": 1}}}, "instruments.X"),
        ({"accounts": {"ACC": "EUR"}}, "accounts.ACC"),
        ({"fx": {"fixed": {"USDT": {"USD": "-1"}}}}, "must be > 0"),
        ({"fx": {"fixed": {"USDT": {"USD": "x"}}}}, "not a number"),
        ({"fx": {"pivot": "usd"}}, "currency code"),
        ({"books": {}}, "unknown section"),
    ],
)
def test_reference_data_is_checked(data, message):
    with pytest.raises(ReferenceError, match=message):
        Reference.from_data(data)


def test_reference_defaults_and_lookups():
    reference = Reference.from_data({
        "instruments": {"ESU4": {"multiplier": 50}, "USDJPY": {"fx": {"base": "USD", "quote": "JPY"}}},
        "accounts": {"default_base_currency": "EUR", "ACC-US": {"base_currency": "USD"}},
        "fx": {"fixed": {"USDT": {"USD": 1}}},
    })
    assert reference.currency("ESU4") == "EUR" and reference.currency("UNKNOWN") == "EUR"
    assert reference.currency("USDJPY") == "JPY"
    assert reference.base_currency("ACC-US") == "USD" and reference.base_currency("other") == "EUR"
    assert reference.multiplier("ESU4") == 50 and reference.multipliers == {"ESU4": 50}
    assert reference.rate_symbols("JPY", "EUR") == {"USDJPY"}  # JPY -> USD is the first pivot leg
    assert Reference().currency("X") == "USD" and Reference().base_currency("A") == "USD"


def test_fee_currency_is_a_currency_code():
    raw = b'{"ts": 1700000000000000000, "fill_id": "f", "account": "A", "symbol": "S", "side": "BUY", "qty": "1", "price": "1", "fee_currency": "usdt"}'
    with pytest.raises(InvalidEvent, match="currency code"):
        decode(Fill, raw)


# -- worked examples -------------------------------------------------------------------------


def test_jpy_pnl_through_an_inverse_rate():
    b = book(
        fill(1, "A", "TOYOTA", "BUY", "100", "2500"),
        fill(2, "A", "TOYOTA", "SELL", "40", "2600"),
        marks={"TOYOTA": "2550", "USDJPY": "150"},
    )
    v = value_position(b.get("A", "TOYOTA"), b.mark("TOYOTA"), b.fx)
    assert (v.currency, v.base_currency, v.fx_rate) == ("JPY", "USD", D("0.0066666666666666666667"))
    assert (v.realized_pnl_gross, v.unrealized_pnl, v.total_pnl) == (4000, 3000, 7000)
    assert str(v.realized_pnl_gross_base) == "26.666666666667"  # 4000 / 150, rounded at 12 places
    assert str(v.unrealized_pnl_base) == "20.000000000000"
    assert str(v.total_pnl_base) == "46.666666666667"
    assert str(v.gross_notional_base) == "1020.000000000000"  # 60 x 2550 / 150
    assert v.missing_rates == ()
    totals = b.account_totals("A")
    assert totals.base_currency == "USD" and totals.total_pnl == v.total_pnl_base


def test_a_cross_through_the_pivot():
    b = book(fill(1, "EU", "TOYOTA", "BUY", "10", "2500"), marks={"TOYOTA": "2600", "USDJPY": "150", "EURUSD": "1.08"})
    v = value_position(b.get("EU", "TOYOTA"), b.mark("TOYOTA"), b.fx)
    assert v.base_currency == "EUR" and [leg.instrument for leg in v.fx_legs] == ["USDJPY", "EURUSD"]
    assert v.fx_rate == D("0.006172839506172839506230864197530864197531")
    # 1000 JPY x the cross rate = 6.172839506172839506230864197530864197531 EUR
    assert str(v.unrealized_pnl_base) == "6.172839506173"


def test_a_missing_rate_makes_base_figures_and_totals_unknown():
    b = book(
        fill(1, "A", "NESN", "BUY", "10", "100"),
        fill(2, "A", "ESU4", "BUY", "1", "5000", "2"),
        marks={"NESN": "101", "ESU4": "5010"},
    )
    chf = value_position(b.get("A", "NESN"), b.mark("NESN"), b.fx)
    assert chf.fx_rate is None and chf.missing_rates == ("CHF",)
    assert chf.unrealized_pnl == 10 and chf.unrealized_pnl_base is None and chf.total_pnl_base is None
    usd = value_position(b.get("A", "ESU4"), b.mark("ESU4"), b.fx)
    assert usd.total_pnl_base == D("498")  # 10 x 50 - 2
    totals = b.account_totals("A")
    assert totals.missing_rates == ["CHF"]
    assert totals.total_pnl is None and totals.gross_notional is None and totals.fees is None


def test_a_fee_in_another_currency():
    b = book(
        fill(1, "A", "BTCUSDT", "BUY", "1", "60000", "6"),
        fill(2, "A", "BTCUSDT", "SELL", "1", "61000", "5", fee_currency="USD"),
    )
    p = b.get("A", "BTCUSDT")
    assert p.fees == 6 and p.foreign_fees == {"USD": 5}  # never added together
    assert p.realized_pnl_net == 994  # in USDT: only the USDT fee
    v = value_position(p, None, b.fx)
    assert v.fx_rate == D("0.9998")
    assert v.realized_pnl_gross_base == D("999.8")
    assert v.fees_base == D("10.9988")  # 6 x 0.9998 + 5
    assert v.realized_pnl_net_base == D("988.8012")  # 994 x 0.9998 - 5
    assert v.total_pnl_base == D("988.8012")  # flat: nothing unrealized
    p.roll_day(None)
    assert value_position(p, None, b.fx).day_pnl_base == 0  # the roll keeps the foreign fees too


def test_a_fee_in_a_currency_without_a_rate():
    b = book(fill(1, "A", "ESU4", "BUY", "1", "5000", "3", fee_currency="CHF"), marks={"ESU4": "5000"})
    v = value_position(b.get("A", "ESU4"), b.mark("ESU4"), b.fx)
    assert v.fx_rate == 1 and v.unrealized_pnl_base == 0 and v.missing_rates == ("CHF",)
    assert v.fees_base is None and v.realized_pnl_net_base is None and v.total_pnl_base is None


def test_a_correction_can_change_the_fee_currency():
    executions = ExecutionBook(reference=DESK)
    executions.receive(fill(1, "A", "ESU4", "BUY", "1", "5000", "3", fee_currency="CHF"), 1)
    correct = Fill(ts=T0 + 9, fill_id="c1", account="A", symbol="ESU4", side="BUY", qty=D(1), price=D(5000),
                   fee=D(3), exec_type="CORRECT", ref_fill_id="f1")  # fmt: skip
    assert executions.receive(correct, 2).status == "applied"
    position = executions.positions.get("A", "ESU4")
    assert position.fees == 3 and position.foreign_fees == {}


# -- compliance ------------------------------------------------------------------------------


def test_account_limits_are_in_the_base_currency_and_a_missing_rate_alerts_once():
    evaluator = ComplianceEvaluator(ComplianceRules(max_gross_notional=D("1000")))
    b = book(fill(1, "A", "TOYOTA", "BUY", "100", "2500"), marks={"TOYOTA": "2500"})
    alerts = evaluator.check_marks(b, 1)
    assert [a.rule for a in alerts] == ["missing_fx_rate"] and alerts[0].symbol == "JPY"
    assert evaluator.check_marks(b, 2) == []  # once per (account, currency)
    b.set_mark("USDJPY", "300")  # 250,000 JPY = 833.33 USD: within the limit
    assert evaluator.check_marks(b, 3, ["USDJPY"]) == []
    b.set_mark("USDJPY", "200")  # 1,250 USD: over
    alerts = evaluator.check_marks(b, 4, ["USDJPY"])  # an FX move re-checks the accounts it converts
    assert [(a.rule, a.observed) for a in alerts] == [("max_gross_notional", D("1250.000000000000"))]
    b.marks.pop("USDJPY")
    assert [a.rule for a in evaluator.check_marks(b, 5)] == ["missing_fx_rate"]  # re-armed when known again


# -- properties ------------------------------------------------------------------------------

SYMBOLS = ("TOYOTA", "BTCUSDT", "ESU4", "SAPX", "NESN")
_DESK_EUR = Reference({**DESK.instruments, "SAPX": Instrument(currency="EUR")}, base_currencies={"EU": "EUR"},
                      fixed={"USDT": {"USD": D("0.9998")}})  # fmt: skip

prices = st.decimals(min_value=D("0.01"), max_value=D("10000"), places=2)
quantities = st.integers(min_value=1, max_value=500)
fills_strategy = st.lists(
    st.tuples(st.sampled_from(("A", "EU")), st.sampled_from(SYMBOLS), st.sampled_from(("BUY", "SELL")), quantities, prices,
              st.sampled_from((None, "USD", "EUR", "CHF"))),  # fmt: skip
    min_size=1, max_size=40,
)


@settings(max_examples=60, deadline=None)
@given(fills_strategy, st.dictionaries(st.sampled_from((*SYMBOLS, "USDJPY", "EURUSD")), prices))
def test_account_totals_are_the_sums_of_the_converted_position_figures(rows, marks):
    executions = ExecutionBook(reference=_DESK_EUR)
    for n, (account, symbol, side, qty, price, fee_currency) in enumerate(rows):
        executions.receive(fill(n, account, symbol, side, str(qty), str(price), "1.25", fee_currency), n)
    b = executions.positions
    for symbol, price in marks.items():
        b.set_mark(symbol, price)
    for account in b.accounts():
        values = [value_position(p, b.mark(p.symbol), b.fx) for p in b.positions(account)]
        totals = b.account_totals(account)
        assert {v.base_currency for v in values} == {totals.base_currency}
        for total_field, position_field in (
            ("realized_pnl_gross", "realized_pnl_gross_base"), ("fees", "fees_base"),
            ("realized_pnl_net", "realized_pnl_net_base"), ("unrealized_pnl", "unrealized_pnl_base"),
            ("total_pnl", "total_pnl_base"), ("day_pnl", "day_pnl_base"), ("gross_notional", "gross_notional_base"),
        ):  # fmt: skip
            terms = [getattr(v, position_field) for v in values]
            expected = None if any(t is None for t in terms) else sum(terms, D(0))
            assert getattr(totals, total_field) == expected, total_field
        assert totals.missing_rates == sorted({c for v in values for c in v.missing_rates})
        for v in values:
            if v.fx_rate is not None and not v.foreign_fees:
                # Each base figure is its local figure at the rate: no other currency enters.
                assert v.total_pnl_base == convert(v.total_pnl, v.fx_rate)
                assert v.fees_base == convert(v.fees, v.fx_rate)


def test_a_correction_after_the_roll_keeps_the_start_of_day_foreign_fees():
    executions = ExecutionBook(reference=DESK)
    executions.receive(fill(1, "A", "ESU4", "BUY", "2", "5000", "3", fee_currency="USDT"), 1)
    executions.receive(fill(2, "A", "ESU4", "SELL", "1", "5010", "4", fee_currency="USDT"), 2)
    b = executions.positions
    b.roll_day({"ESU4": D(5000)})
    correct = Fill(ts=T0 + 2, fill_id="c2", account="A", symbol="ESU4", side="SELL", qty=D(1), price=D(5020),
                   fee=D(5), fee_currency="USDT", exec_type="CORRECT", ref_fill_id="f2")  # fmt: skip
    assert executions.receive(correct, 3).status == "applied"
    p = b.get("A", "ESU4")
    assert p.foreign_fees == {"USDT": 8} and p.sod_foreign_fees == {"USDT": 7}
    v = value_position(p, D(5000), b.fx)
    # Today: the correction's 500 more realized, its 1 USDT more fee (at 0.9998).
    assert v.day_pnl == 500 and v.day_pnl_base == D("499.0002")
