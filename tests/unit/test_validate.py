"""`posttrade validate` without servers: the expected values, the comparisons, the
table and JSON, the log scan and the measuring helpers."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path

import pytest

from posttrade.cli import build_parser, main
from posttrade.config import SERVICES
from posttrade.stack import endpoints as stack_endpoints
import yaml

from posttrade.core.exact import EXACT
from posttrade.core.fx import invert
from posttrade.core.reference import Reference
from posttrade.validate.context import GateError, parse_url_overrides, service_urls
from posttrade.validate.dataflow import MD_TRADES, expected_bars
from posttrade.validate.expected import (
    WORKED_EXAMPLE_PINNED,
    Expected,
    accuracy_fills,
    canonical,
    compare,
    currency_plan,
    multiplier_instrument,
    pinned_differences,
    rate_legs,
    scenarios,
    validation_reference,
    with_validation,
)
from posttrade.validate.integration import (
    Health,
    LogWatch,
    error_lines,
    health_checks,
    is_error_line,
    lagging,
    log_check,
)
from posttrade.validate.performance import percentile, process_cpu_s, read_pattern, writer_load
from posttrade.validate.report import FAIL, PASS, Check, GateReport
from posttrade.validate.runner import REFERENCE_ENV, GateOptions, _fleet_ports, log_files, ptrc_settings, write_reference
from posttrade.streams.events import Bar, MarketTrade, decode

T0 = 1_800_000_000_000_000_000
RUN = "ABCD1234"
ACCOUNT = f"VALIDATE-{RUN}"


def book(multiplier: bool = True) -> tuple[Expected, list]:
    chosen = scenarios(RUN, "validate_mult", Decimal(50)) if multiplier else scenarios(RUN)
    fills = accuracy_fills(ACCOUNT, RUN, chosen, T0)
    return Expected.of(ACCOUNT, fills, chosen), chosen


def text(values: dict) -> dict:
    return {k: canonical(v) if not isinstance(v, int) else v for k, v in values.items()}


# -- the expected values ------------------------------------------------------------------


def test_the_core_gives_the_worked_example_literally():
    expected, chosen = book()
    assert pinned_differences(expected, chosen[0].symbol) == []
    values = text(expected.position_values(f"VAL{RUN}-WX"))
    assert {k: values[k] for k in WORKED_EXAMPLE_PINNED} == WORKED_EXAMPLE_PINNED
    assert values["day_pnl"] == "121" and values["gross_notional"] == "475" and values["market_value"] == "-475"
    assert values["fill_count"] == 4


def test_pinned_check_catches_a_wrong_core_answer():
    expected, chosen = book()
    position = expected.position(chosen[0].symbol)
    position.fees = Decimal(5)  # as if the core counted a fee twice
    differences = pinned_differences(expected, chosen[0].symbol)
    assert [(d.field, d.expected, d.actual) for d in differences] == [
        ("fees", "4", "5"), ("realized_pnl_net", "146", "145"), ("total_pnl", "121", "120"),
    ]  # fmt: skip


def test_the_other_scenarios_by_hand():
    expected, _ = book()
    # BUY 7 @ 50.25 (rebate .07), SELL 12 @ 51.5 (fee .12): closes 7 for 8.75, short 5 @ 51.5;
    # BUY 8 @ 49.8 (rebate .08): closes 5 for 8.5, long 3 @ 49.8; mark 50.2.
    fr = text(expected.position_values(f"VAL{RUN}-FR"))
    assert fr["net_qty"] == "3" and fr["avg_open_price"] == "49.8" and fr["realized_pnl_gross"] == "17.25"
    assert fr["fees"] == "-0.03" and fr["realized_pnl_net"] == "17.28" and fr["unrealized_pnl"] == "1.2"
    # The core's docstring example: average 100.666... shown rounded (and unchanged by the
    # reduce), realized + unrealized exact.
    rd = text(expected.position_values(f"VAL{RUN}-RD"))
    assert rd["avg_open_price"] == "100.666666666667" and rd["realized_pnl_gross"] == "0.333333333333"
    assert rd["unrealized_pnl"] == "0.666666666667" and rd["total_pnl"] == "1"
    assert rd["fifo_realized_pnl_gross"] == "1" and rd["fifo_unrealized_pnl"] == "0"
    fl = text(expected.position_values(f"VAL{RUN}-FL"))
    assert fl["net_qty"] == "0" and fl["avg_open_price"] is None and fl["unrealized_pnl"] == "0"
    assert fl["realized_pnl_net"] == "2.5" and fl["gross_notional"] == "0"
    # Multiplier 50: BUY 3 @ 4500.25, BUY 1 @ 4502 (avg 4500.6875), SELL 6 @ 4510.5 flips
    # to short 2 @ 4510.5: realized 4 x 9.8125 x 50 = 1962.5; at 4505.5: 2 x 5 x 50 = 500.
    mult = text(expected.position_values("validate_mult"))
    assert mult["multiplier"] == "50" and mult["realized_pnl_gross"] == "1962.5" and mult["fees"] == "7.5"
    assert mult["unrealized_pnl"] == "500" and mult["gross_notional"] == "450550"


def test_account_totals_are_the_sums():
    expected, _ = book()
    totals = expected.account_values()
    positions = [expected.position_values(s) for s in expected.symbols()]
    assert totals["positions"] == 5 and totals["open_positions"] == 4
    for name in ("realized_pnl_gross", "fees", "unrealized_pnl", "total_pnl", "fifo_unrealized_pnl"):
        assert totals[name] == sum(p[name] for p in positions), name
    assert canonical(totals["total_pnl"]) == "2597.98"


def test_fills_are_unique_ordered_and_in_the_run_account():
    expected, chosen = book(multiplier=False)
    fills = accuracy_fills(ACCOUNT, RUN, chosen, T0)
    assert len(fills) == sum(len(s.trades) for s in chosen) == 12
    assert len({f.fill_id for f in fills}) == len(fills)
    assert [f.ts for f in fills] == sorted(f.ts for f in fills) and len({f.ts for f in fills}) == len(fills)
    assert {f.account for f in fills} == {ACCOUNT}
    assert all(f.symbol.startswith(f"VAL{RUN}-") for f in fills)
    assert "validate_mult" not in expected.symbols()


@pytest.mark.parametrize(
    "instruments, chosen",
    [
        ({}, None),
        ({"ESZ5": {"multiplier": 50}}, None),  # a real instrument is never traded
        ({"validate_one": {"multiplier": 1}}, None),
        ({"ESZ5": {"multiplier": 50}, "validate_mult": {"multiplier": "50"}}, ("validate_mult", Decimal(50))),
        ({"VALIDATE-X": {"multiplier": "0.1"}}, ("VALIDATE-X", Decimal("0.1"))),
        ({"VALIDATE_EUR": {"multiplier": 10, "currency": "EUR"}}, None),  # its totals would need a rate
    ],
)
def test_multiplier_instrument(instruments, chosen):
    assert multiplier_instrument(Reference.from_data({"instruments": instruments})) == chosen


def test_compare_is_exact_on_values_not_spelling():
    want = {"a": Decimal("121"), "b": None, "c": Decimal("0.1"), "d": 4}
    assert compare("x", want, {"a": "121.000", "b": None, "c": "1E-1", "d": 4}, "abcd") == []
    assert compare("x", want, {"a": "121", "b": "", "c": "0.1", "d": "4"}, "abcd") == []
    differences = compare("x", want, {"a": "121.0000000000001", "c": 0.1, "d": 4}, "abcd")
    assert [(d.field, d.actual) for d in differences] == [("a", "121.0000000000001"), ("b", "(missing)"), ("c", "float 0.1")]
    assert str(differences[0]) == "x a: expected 121, got 121.0000000000001"


def test_compare_spells_out_lists_fees_by_currency_and_rate_legs():
    expected, _ = book(multiplier=False)
    values = Expected.of(ACCOUNT, [], [], None).account_values() | {"foreign_fees": {"USD": Decimal("1.25")}}
    assert values["missing_rates"] == [] and values["base_currency"] == "USD"
    json_like = {"missing_rates": [], "base_currency": "USD", "foreign_fees": {"USD": "1.250"}}
    assert compare("x", values, json_like, ("missing_rates", "base_currency", "foreign_fees")) == []
    [difference] = compare("x", {"missing_rates": ("XVN",)}, {"missing_rates": []}, ("missing_rates",))
    assert (difference.expected, difference.actual) == ("['XVN']", "[]")
    # A leg's mark source is the surface's own word, its time is not compared; the rest is.
    legs = expected.position_values(f"VAL{RUN}-WX")["fx_legs"]
    assert canonical(rate_legs(legs)) == "[{from: 'USD', instrument: None, inverse: False, rate: 1, source: 'identity', to: 'USD'}]"
    ours = {"fx_legs": [{"from": "XVJ", "to": "USD", "rate": "0.0066666666666666666667", "source": "mark",
                         "instrument": "VALIDATE_USDXVJ", "inverse": True, "ts": None}]}  # fmt: skip
    theirs = {"fx_legs": [dict(ours["fx_legs"][0], source="quote_mid", ts=1_800_000_000_000_000_000)]}
    assert compare("x", ours, theirs, ("fx_legs",)) == []
    theirs["fx_legs"][0]["inverse"] = False
    assert [d.field for d in compare("x", ours, theirs, ("fx_legs",))] == ["fx_legs"]


# -- money in several currencies ---------------------------------------------------------------

REFERENCE_FILE = Path(__file__).resolve().parents[2] / "config" / "backend" / "reference.yaml"


def validation(account: str | None = ACCOUNT) -> Reference:
    shipped = yaml.safe_load(REFERENCE_FILE.read_text())
    return Reference.from_data(with_validation(shipped, validation_reference("USD", account)))


def test_the_validation_instruments_fit_beside_the_shipped_reference_data_which_wins():
    reference = validation()
    assert reference.multiplier("ESU4") == 50 and reference.fx_instrument("USD", "JPY") == ("USDJPY", False)
    assert reference.fx_instrument("USD", "XVJ") == ("VALIDATE_USDXVJ", False)
    assert reference.fx_instrument("XVE", "USD") == ("VALIDATE_XVEUSD", False)
    assert reference.fixed[("XVT", "USD")] == Decimal("0.9985") and reference.fixed[("USDT", "USD")] == 1
    assert reference.base_currency(f"{ACCOUNT}-XVE") == "XVE" and reference.base_currency(ACCOUNT) == "USD"
    assert multiplier_instrument(reference) == ("VALIDATE_MULT", Decimal(50))
    # The deployment's own entries win over the gate's.
    theirs = {"instruments": {"VALIDATE_XVJ": {"currency": "XVQ"}}, "fx": {"fixed": {"USD": {"XVT": "1"}}, "pivot": "USD"}}
    merged = with_validation(theirs, validation_reference("USD"))
    assert merged["instruments"]["VALIDATE_XVJ"] == {"currency": "XVQ"} and "VALIDATE_XVN" in merged["instruments"]
    assert merged["fx"] == {"fixed": {"USD": {"XVT": "1"}}, "pivot": "USD"}  # the pair is fixed already
    assert theirs["instruments"] == {"VALIDATE_XVJ": {"currency": "XVQ"}}  # not changed in place


def test_the_currency_plan_trades_what_the_gate_controls_in_three_accounts():
    plan = currency_plan(validation(), ACCOUNT)
    assert plan.notes == []
    held = {(p.account.removeprefix(ACCOUNT), p.symbol) for p in plan.positions}
    assert held == {
        ("-CCY", "VALIDATE_USDXVJ"), ("-CCY", "VALIDATE_XVE"), ("-CCY", "VALIDATE_XVJ"), ("-CCY", "VALIDATE_XVT"),
        ("-NORATE", "VALIDATE_XVN"), ("-NORATE", "VALIDATE_USDXVJ"),
        ("-XVE", "VALIDATE_MULT"), ("-XVE", "VALIDATE_USDXVJ"), ("-XVE", "VALIDATE_XVEUSD"), ("-XVE", "VALIDATE_XVJ"),
        ("-XVE", "VALIDATE_XVT"),
    }  # fmt: skip
    assert plan.fx == {"VALIDATE_USDXVJ": (Decimal(150), Decimal("152.5")),
                       "VALIDATE_XVEUSD": (Decimal("1.085"), Decimal("1.0935"))}  # fmt: skip
    first = {q.symbol: q for q in plan.quotes(T0)}
    assert set(first) == {"VALIDATE_MULT", "VALIDATE_XVE", "VALIDATE_XVJ", "VALIDATE_XVN", "VALIDATE_XVT",
                          "VALIDATE_USDXVJ", "VALIDATE_XVEUSD"}  # fmt: skip
    # The multiplier scenario's instrument is its own: neither traded nor quoted here.
    mine = currency_plan(validation(), ACCOUNT, taken=["VALIDATE_MULT"])
    assert {p.symbol for p in mine.positions} == {p.symbol for p in plan.positions} - {"VALIDATE_MULT"}
    assert "VALIDATE_MULT" not in {q.symbol for q in mine.quotes(T0)}
    assert first["VALIDATE_USDXVJ"].mid == 150 and first["VALIDATE_XVJ"].mid == Decimal("100.7475")
    assert {q.symbol: q.mid for q in plan.quotes(T0, moved=True)} == {"VALIDATE_USDXVJ": Decimal("152.5"),
                                                                       "VALIDATE_XVEUSD": Decimal("1.0935")}  # fmt: skip
    fills = plan.fills(RUN, T0)
    assert len(fills) == 3 * len(plan.positions) and len({f.fill_id for f in fills}) == len(fills)
    assert {f.fee_currency for f in fills} == {None, "USD"}


def test_the_currency_plan_needs_validation_instruments_and_never_quotes_a_real_one():
    shipped = Reference.load(REFERENCE_FILE)
    plan = currency_plan(shipped, ACCOUNT)
    assert plan.positions == [] and "no multi-currency scenario" in plan.notes[0]
    # Its rate would read the real EURUSD: left out, and said so.
    reference = Reference.from_data({"instruments": {"EURUSD": {"fx": {"base": "EUR", "quote": "USD"}},
                                                     "VALIDATE_EUR": {"currency": "EUR"},
                                                     "VALIDATE_XVT": {"currency": "XVT"}},
                                     "fx": {"fixed": {"XVT": {"USD": "2"}}}})  # fmt: skip
    plan = currency_plan(reference, ACCOUNT)
    assert [p.symbol for p in plan.positions] == ["VALIDATE_XVT"] and plan.fx == {}
    assert any("EURUSD" in note for note in plan.notes)
    assert any("no missing-rate case" in note for note in plan.notes)
    assert any("only with --start" in note for note in plan.notes)


def test_currency_expected_values_by_hand():
    """VALIDATE_XVJ (level 99.75): BUY 300 @ 99.75 (fee 2.5), SELL 100 @ 101.745 (fee 1.25
    USD), BUY 50 @ 98.7525 (rebate 0.5); marked at 100.7475. In XVJ: realized 199.5,
    fees 2, long 250 at a cost of 24887.625, unrealized 299.25, total 496.75. In USD at
    1/150 (the inverse of VALIDATE_USDXVJ's mid), less the USD fee: 496.75 / 150 - 1.25."""
    plan = currency_plan(validation(), ACCOUNT)
    fills = plan.fills(RUN, T0)
    ccy = plan.expected(fills)[f"{ACCOUNT}-CCY"]
    xvj = text(ccy.position_values("VALIDATE_XVJ"))
    assert (xvj["currency"], xvj["base_currency"], xvj["fx_rate"]) == ("'XVJ'", "'USD'", "0.0066666666666666666667")
    assert (xvj["realized_pnl_gross"], xvj["fees"], xvj["unrealized_pnl"], xvj["total_pnl"]) == ("199.5", "2", "299.25", "496.75")
    assert xvj["foreign_fees"] == "{USD: 1.25}" and xvj["missing_rates"] == "[]"
    assert (xvj["realized_pnl_gross_base"], xvj["unrealized_pnl_base"], xvj["fees_base"]) == ("1.33", "1.995", "1.263333333333")
    assert xvj["total_pnl_base"] == "2.061666666667" and xvj["realized_pnl_net_base"] == "0.066666666667"
    xvt = text(ccy.position_values("VALIDATE_XVT"))  # the fixed rate
    assert (xvt["fx_rate"], xvt["total_pnl"], xvt["total_pnl_base"]) == ("0.9985", "210.5", "208.93425")
    totals = ccy.account_values()
    assert totals["base_currency"] == "USD" and totals["missing_rates"] == [] and canonical(totals["total_pnl"]) == "1188.025083333334"
    # The FX quote moves to 152.5: the local figures stay, the base ones follow.
    moved = text(plan.expected(fills, moved=True)[f"{ACCOUNT}-CCY"].position_values("VALIDATE_XVJ"))
    assert moved["total_pnl"] == "496.75" and moved["fx_rate"] == "0.0065573770491803278689"
    assert moved["total_pnl_base"] == "2.00737704918"  # 496.75 / 152.5 - 1.25
    # No rate for XVN: its base figures and the account's totals are unknown, and say why.
    norate = plan.expected(fills)[f"{ACCOUNT}-NORATE"]
    xvn = norate.position_values("VALIDATE_XVN")
    assert xvn["fx_rate"] is None and xvn["total_pnl_base"] is None and xvn["missing_rates"] == ("XVN",)
    assert norate.position_values("VALIDATE_USDXVJ")["total_pnl_base"] is not None
    assert norate.account_values()["total_pnl"] is None and norate.account_values()["missing_rates"] == ["XVN"]
    # Based in XVE, XVJ crosses the pivot: XVJ -> USD -> XVE, both legs inverted marks.
    cross = plan.expected(fills)[f"{ACCOUNT}-XVE"].position_values("VALIDATE_XVJ")
    assert [(leg.from_, leg.to, leg.instrument) for leg in cross["fx_legs"]] == [
        ("XVJ", "USD", "VALIDATE_USDXVJ"), ("USD", "XVE", "VALIDATE_XVEUSD")]
    assert cross["fx_rate"] == EXACT.multiply(invert(Decimal(150)), invert(Decimal("1.085")))  # exact product


def test_start_writes_the_deployments_reference_data_plus_the_validation_instruments(tmp_path: Path):
    environ = {"POSTTRADE_HOME": str(tmp_path)}
    path = write_reference(tmp_path / "home", "R1", environ)
    assert path == (tmp_path / "home" / "validate" / "reference.yaml").absolute()
    written = Reference.load(path)
    assert written.multiplier("ESU4") == 50 and written.currency("VALIDATE_XVJ") == "XVJ"
    assert written.base_currency("VALIDATE-R1-XVE") == "XVE"
    reference, trades_table, problem = ptrc_settings({**environ, REFERENCE_ENV: str(path)})
    assert problem is None and trades_table == "ptrc_trades" and multiplier_instrument(reference) == ("VALIDATE_MULT", 50)
    # A deployment's own file (the services' reference_file) is the one extended.
    own = tmp_path / "own.yaml"
    own.write_text("accounts: {default_base_currency: EUR}\n")
    extended = Reference.load(write_reference(tmp_path / "h2", "R2", {REFERENCE_ENV: str(own)}))
    assert extended.default_base_currency == "EUR" and extended.fx_instrument("EUR", "XVJ") == ("VALIDATE_EURXVJ", False)
    assert "ESU4" not in extended.instruments
    own.write_text("instruments: {VALIDATE_PAIR: {fx: {base: XVE, quote: USD}}}\n")  # takes the gate's pair
    with pytest.raises(GateError, match="do not fit"):
        write_reference(tmp_path / "h3", "R3", {REFERENCE_ENV: str(own)})


# -- data flow and performance helpers ---------------------------------------------------------


def test_expected_bars_fold_the_trades_by_window():
    trades = [MarketTrade(ts=T0 + i * 1_000_000, symbol="S", price=Decimal(p), size=Decimal(s))
              for i, (p, s) in enumerate(MD_TRADES)]  # fmt: skip
    bars = expected_bars(trades, "1m")
    assert len(bars) == 1  # T0 is 20 s into its minute: the 8 ms of trades stay in it
    bar = next(iter(bars.values()))
    assert (bar.open, bar.high, bar.low, bar.close) == (Decimal("100.5"), Decimal("101"), Decimal("100.25"), Decimal("100.8"))
    assert bar.volume == Decimal(69) and bar.count == 8
    assert bar.vwap == Decimal("100.536956521739")  # 6937.05 / 69, rounded at 12 places
    split = expected_bars(trades[:2] + [MarketTrade(ts=T0 + 60 * 10**9, symbol="S", price=Decimal(1), size=Decimal(1))], "1m")
    assert len(split) == 2


def test_writer_load_is_valid_distinct_bars():
    payloads = writer_load("VALX-W", 1_000, T0)
    bars = [decode(Bar, p) for p in payloads]
    assert len({b.ts for b in bars}) == 1_000 and {b.symbol for b in bars} == {"VALX-W"}
    assert {b.interval for b in bars} == {"1s"}


def test_process_cpu_seconds():
    import os

    assert process_cpu_s(os.getpid()) > 0
    assert process_cpu_s(None) is None and process_cpu_s(2**22 + 7) is None


def test_percentile_is_nearest_rank():
    values = [float(v) for v in range(1, 201)]
    assert percentile(values, 0.99) == 198.0 and percentile(values, 0.5) == 100.0
    assert percentile([5.0], 0.99) == 5.0


def test_read_pattern_cycles_over_the_run_keys():
    class Ctx:
        account = ACCOUNT
        state = {"md_symbol": "VALX-MD", "accuracy_scenarios": scenarios(RUN)}

    pattern = read_pattern(Ctx(), 30)
    paths = {path for path, _ in pattern}
    assert len(pattern) == 30 and "/bars/VALX-MD" in paths and f"/positions/{ACCOUNT}" in paths
    assert f"/quotes/VAL{RUN}-WX" in paths


# -- integration helpers ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "line, error",
    [
        ("2026-11-24 02:10:11,021 ERROR posttrade.app: agent crashed", True),
        ("2026-11-24 02:10:11,021 CRITICAL posttrade.app: gone", True),
        ("ERROR:    Exception in ASGI application", True),
        ("2026-11-24 02:10:11,021 WARNING posttrade.app: ERROR in the message", False),
        ("2026-11-24 02:10:11,021 INFO posttrade.app: no ERROR here", False),
        ("Traceback (most recent call last):", False),
    ],
)
def test_error_lines(line, error):
    assert is_error_line(line) is error


def test_an_error_line_carries_the_exception_that_followed():
    lines = [
        "2026-11-24 02:18:29,924 ERROR posttrade.app: timer mark_open_orders failed",
        "Traceback (most recent call last):",
        '  File "x.py", line 1, in f',
        "AttributeError: 'Field' object has no attribute 'get'",
        "2026-11-24 02:18:30,000 ERROR posttrade.app: plain",
        "2026-11-24 02:18:31,000 INFO posttrade.app: next",
    ]
    assert error_lines(lines) == [
        "2026-11-24 02:18:29,924 ERROR posttrade.app: timer mark_open_orders failed"
        "  [AttributeError: 'Field' object has no attribute 'get']",
        "2026-11-24 02:18:30,000 ERROR posttrade.app: plain",
    ]


def test_log_watch_reads_only_what_the_run_appended(tmp_path: Path):
    old = tmp_path / "ptrc.log"
    old.write_text("2026-11-24 01:00:00,000 ERROR x: before the run\n")
    truncated = tmp_path / "pnl.log"
    truncated.write_text("a long line from an earlier life of the file\n" * 10)
    watch = LogWatch({"ptrc": old, "pnl": truncated, "hot_cache": tmp_path / "hot_cache.log", "gone": tmp_path / "x.log"})
    with old.open("a") as f:
        f.write("2026-11-24 02:00:00,000 INFO x: fine\n2026-11-24 02:00:01,000 ERROR x: during the run\n")
    truncated.write_text("2026-11-24 02:00:02,000 ERROR y: after a rotation\n")
    (tmp_path / "hot_cache.log").write_text("2026-11-24 02:00:03,000 INFO z: created during the run\n")
    errors, missing = watch.errors()
    assert errors == {
        "ptrc": ["2026-11-24 02:00:01,000 ERROR x: during the run"],
        "pnl": ["2026-11-24 02:00:02,000 ERROR y: after a rotation"],
        "hot_cache": [],
    }
    assert missing == ["gone"]
    check = log_check(watch, tmp_path)
    assert not check.passed and check.value == 2 and "missing: gone" in check.measured


def test_lagging_names_the_agents_still_reading_their_streams_history():
    healths = [
        Health("pnl", 200, {"nats": {"ok": True}, "agent:value_positions": {"ok": True, "lag": 52_000},
                            "agent:mark_quotes": {"ok": True, "lag": 3}}),
        Health("ptrc", 200, {"agent:fills": {"ok": True, "lag_error": "timeout"}}),
        Health("hot_cache", None, {}, "ConnectError"),
    ]  # fmt: skip
    assert lagging(healths, 1000) == {"pnl value_positions": 52_000}
    assert lagging(healths, 100_000) == {}


def test_health_checks_name_what_is_not_ok():
    ok = {"nats": {"ok": True}, "questdb": {"ok": True, "detail": "x"}, "agent:a": {"ok": True}}
    start = [Health("ptrc", 200, ok), Health("pnl", 200, ok)]
    end = [Health("ptrc", 503, {**ok, "questdb": {"ok": False, "detail": "refused"}}), Health("pnl", None, {}, "ConnectError")]
    status, dependencies = health_checks(start, end)
    assert not status.passed and status.measured == "2/4 answered 200"
    assert status.details["not_200"] == ["end: ptrc HTTP 503", "end: pnl no answer (ConnectError)"]
    assert not dependencies.passed
    assert dependencies.details["not_ok"] == ["end: ptrc questdb: {'ok': False, 'detail': 'refused'}"]
    assert dependencies.details["no_checks_reported"] == ["end: pnl"]
    assert all(c.passed for c in health_checks(start, start))


# -- the report ---------------------------------------------------------------------------------


def sample_report() -> GateReport:
    report = GateReport("ABCD1234", datetime(2026, 11, 24, 2, 0, tzinfo=timezone.utc), {"ptrc": "http://x:8109"})
    report.add(
        Check(1, "accuracy.ptrc_positions", "ptrc /positions equals the expected values", True, "60 values compared, all equal"),
        Check(3, "performance.writer_rows_per_s", "questdb_writer > 10,000 rows/s", False, "8,003 rows/s",
              value=8003, limit=10_000, unit="rows/s", details={"differences": [f"d{i}" for i in range(20)], "table": "bars"}),
    )  # fmt: skip
    report.notes.append("no multiplier scenario")
    report.finish()
    return report


def test_table_has_a_row_per_check_and_the_failures_evidence():
    table = sample_report().table(width=120)
    lines = table.splitlines()
    assert lines[0].startswith("posttrade validate: run ABCD1234, started 2026-11-24 02:00:00 UTC")
    assert lines[1].split() == ["#", "TEST", "CRITERION", "MEASURED", "RESULT"]
    assert any(l.startswith("1  P&L accuracy") and l.endswith(PASS) for l in lines)
    assert any(l.startswith("3  Performance") and l.endswith(FAIL) and "8,003 rows/s" in l for l in lines)
    assert "FAIL performance.writer_rows_per_s: questdb_writer > 10,000 rows/s" in table
    assert "  differences: 20" in table and "    d11" in table and "d12" not in table
    assert "... 8 more (see the JSON)" in table and "table: bars" in table
    assert "note: no multiplier scenario" in table
    assert lines[-1] == "FAIL: 1/2 checks passed"
    assert all(len(l) <= 120 for l in lines[:6])


def test_json_has_every_check_with_its_status(tmp_path: Path):
    report = sample_report()
    path = tmp_path / "out" / "v.json"
    report.write_json(path)
    data = json.loads(path.read_text())
    assert data["status"] == FAIL and data["passed"] == 1 and data["failed"] == 1 and data["run_id"] == "ABCD1234"
    assert [(c["name"], c["status"], c["test"]) for c in data["checks"]] == [
        ("accuracy.ptrc_positions", PASS, "P&L accuracy"),
        ("performance.writer_rows_per_s", FAIL, "Performance"),
    ]
    assert data["checks"][1]["value"] == 8003 and data["checks"][1]["limit"] == 10_000
    assert data["notes"] == ["no multiplier scenario"] and data["seconds"] >= 0
    assert not list(path.parent.glob("*.tmp"))


def test_a_report_without_checks_does_not_pass():
    assert not GateReport("X", datetime.now(timezone.utc), {}).passed


# -- the command ---------------------------------------------------------------------------------


def test_url_overrides():
    assert parse_url_overrides(["ptrc=http://h:1/", "nats=nats://h:2"]) == {"ptrc": "http://h:1", "nats": "nats://h:2"}
    for bad in (["ptrc"], ["nope=http://h:1"], ["ptrc="]):
        with pytest.raises(GateError):
            parse_url_overrides(bad)
    urls = service_urls({"pnl": "http://a:1"}, {"POSTTRADE_HOT_CACHE_URL": "http://b:2/"})
    assert urls["pnl"] == "http://a:1" and urls["hot_cache"] == "http://b:2"
    assert urls["ptrc"] == "http://127.0.0.1:8109" and urls["execution_quality"] == "http://127.0.0.1:8096"


def test_registered_in_the_posttrade_command():
    args = build_parser().parse_args(["validate", "--url", "ptrc=http://h:1", "--start", "--writer-rows", "10"])
    assert args.start and args.writer_rows == 10 and args.url == ["ptrc=http://h:1"] and callable(args.handler)


def test_nothing_to_talk_to_is_exit_2(tmp_path: Path, capsys, monkeypatch):
    monkeypatch.setenv("POSTTRADE_HOME", str(tmp_path))
    code = main(["validate", "--url", "nats=nats://127.0.0.1:1", "--url", "questdb=http://127.0.0.1:1"])
    assert code == 2
    assert "cannot connect to NATS at nats://127.0.0.1:1" in capsys.readouterr().err
    assert main(["validate", "--writer-rows", "0"]) == 2
    assert main(["validate", "--url", "bogus"]) == 2


def test_where_the_logs_and_the_started_services_are(tmp_path: Path):
    ep = stack_endpoints({"POSTTRADE_HOME": str(tmp_path)})
    fleet_logs = {s: tmp_path / "fleet" / f"{s}.log" for s in SERVICES}
    assert log_files(GateOptions(), ep) == {s: tmp_path / "logs" / "services" / f"{s}.log" for s in SERVICES}
    assert log_files(GateOptions(), ep, fleet_logs) == fleet_logs
    assert log_files(GateOptions(log_dir=tmp_path / "x"), ep, fleet_logs)["pnl"] == tmp_path / "x" / "pnl.log"
    assert log_files(GateOptions(home=tmp_path / "h"), ep)["ptrc"] == tmp_path / "h" / "logs" / "services" / "ptrc.log"
    assert _fleet_ports(GateOptions(url_overrides={"pnl": "http://127.0.0.1:18100", "nats": "nats://x:1"}))["pnl"] == 18100
    assert _fleet_ports(GateOptions()) == {}  # the fleet takes the others from their configs
    with pytest.raises(GateError):
        _fleet_ports(GateOptions(url_overrides={"pnl": "http://10.0.0.5:8100"}))


def test_real_feed_scenario_pinned():
    """Opening 5 @ 48, BUY 5 @ 50, late BUY 2 @ 49 (placed before the SELL), the SELL 4
    corrected from 52 to 53, a resend dropped and a SELL 1 busted: long 8 @ 49, realized
    4 x (53 - 49) = 16 by average cost and 4 x (53 - 48) = 20 by FIFO, fees 0.3."""
    from posttrade.validate.expected import Expected, real_feed_messages

    messages = real_feed_messages("ACC-FEED", "VALX-RF", "x", 1_795_000_000_000_000_000)
    assert [m.exec_type for m, _ in messages] == ["OPENING", "NEW", "NEW", "NEW", "NEW", "CORRECT", "NEW", "BUST"]
    assert messages[3][0] == messages[1][0] and messages[3][1] != messages[1][1]  # a resend, its own msg id
    expected = Expected.of_feed("ACC-FEED", [m for m, _ in messages], {"VALX-RF": Decimal(51)})
    values = expected.position_values("VALX-RF")
    assert (values["net_qty"], values["avg_open_price"], values["realized_pnl_gross"], values["fees"]) == (
        Decimal(8), Decimal(49), Decimal(16), Decimal("0.3"))
    assert (values["fifo_realized_pnl_gross"], values["unrealized_pnl"], values["fifo_unrealized_pnl"]) == (
        Decimal(20), Decimal(16), Decimal(12))
