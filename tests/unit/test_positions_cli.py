"""`posttrade positions compute` on good and bad files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from posttrade.cli import build_parser, main

T0 = 1_700_000_000_000_000_000
ROOT = Path(__file__).resolve().parents[2]

WORKED = [
    {"ts": T0 + 1, "account": "ACC", "symbol": "XYZ", "side": "BUY", "qty": "10", "price": "100", "fee": "1", "fill_id": "f1"},
    {"ts": T0 + 2, "account": "ACC", "symbol": "XYZ", "side": "BUY", "qty": "10", "price": "110", "fee": "1", "fill_id": "f2"},
    {"ts": T0 + 3, "account": "ACC", "symbol": "XYZ", "side": "SELL", "qty": "15", "price": "120", "fee": "1", "fill_id": "f3"},
    {"ts": T0 + 4, "account": "ACC", "symbol": "XYZ", "side": "SELL", "qty": "10", "price": "90", "fee": "1", "fill_id": "f4"},
]
WORKED_ROW = {
    "account": "ACC",
    "symbol": "XYZ",
    "net_qty": "-5",
    "avg_open_price": "90",
    "realized_pnl_gross": "150",
    "fees": "4",
    "realized_pnl_net": "146",
    "mark": "95",
    "unrealized_pnl": "-25",
    "fifo_realized_pnl_gross": "150",
    "fifo_unrealized_pnl": "-25",
}
# Without reference data everything is in USD: the base figures are the local ones.
WORKED_BASE = {
    "currency": "USD",
    "base_currency": "USD",
    "fx_rate": "1",
    "fx_legs": [{"from": "USD", "to": "USD", "rate": "1", "source": "identity", "instrument": None, "inverse": False, "ts": None}],
    "foreign_fees": {},
    "realized_pnl_gross_base": "150",
    "fees_base": "4",
    "realized_pnl_net_base": "146",
    "unrealized_pnl_base": "-25",
    "total_pnl_base": "121",
    "day_pnl_base": "121",
    "gross_notional_base": "475",
    "fifo_realized_pnl_gross_base": "150",
    "fifo_unrealized_pnl_base": "-25",
    "missing_rates": [],
}


def local(rows: list[dict]) -> list[dict]:
    """The rows' local figures (the base ones are checked where the test is about them)."""
    return [{k: v for k, v in row.items() if k not in WORKED_BASE} for row in rows]


def write_lines(path: Path, lines) -> Path:
    path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))
    return path


def compute(capsys, *argv):
    code = main(["positions", "compute", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def marks(tmp_path):
    path = tmp_path / "marks.json"
    path.write_text(json.dumps({"XYZ": "95", "UNUSED": "1"}))
    return path


def test_registered_in_the_posttrade_command():
    args = build_parser().parse_args(["positions", "compute", "f.jsonl"])
    assert args.method == "both" and args.marks is None and callable(args.handler)


def test_worked_example(tmp_path, marks, capsys):
    fills = write_lines(tmp_path / "fills.jsonl", WORKED)
    code, out, err = compute(capsys, fills, "--marks", marks)
    assert code == 0, err
    assert json.loads(out) == {"positions": [{**WORKED_ROW, **WORKED_BASE}]}
    assert list(json.loads(out)["positions"][0]) == [*WORKED_ROW, *WORKED_BASE]  # field order


def test_methods(tmp_path, marks, capsys):
    fills = write_lines(tmp_path / "fills.jsonl", WORKED[:3])
    rows = {}
    for method in ("avg", "fifo", "both"):
        code, out, _ = compute(capsys, fills, "--marks", marks, "--method", method)
        assert code == 0
        rows[method] = local(json.loads(out)["positions"])[0]
    assert rows["both"] == {
        **WORKED_ROW,
        "net_qty": "5",
        "avg_open_price": "105",
        "realized_pnl_gross": "225",
        "fees": "3",
        "realized_pnl_net": "222",
        "unrealized_pnl": "-50",
        "fifo_realized_pnl_gross": "250",
        "fifo_unrealized_pnl": "-75",
    }
    assert rows["avg"] == {**rows["both"], "fifo_realized_pnl_gross": None, "fifo_unrealized_pnl": None}
    assert rows["fifo"] == {
        **rows["both"],
        "avg_open_price": "110",  # the remaining lot
        "realized_pnl_gross": "250",
        "realized_pnl_net": "247",
        "unrealized_pnl": "-75",
    }


def test_fills_applied_in_ts_order_ties_in_file_order(tmp_path, capsys):
    # Order matters under average cost: buy 10@100; sell 5@110; buy 5@120 -> avg 110,
    # realized 50; with the last two swapped -> avg 106.67, realized 16.67. (Cost 1600
    # for 15: closing 5 takes 533.333333333333 of it, rounded at 12 places; the 10 left
    # cost 1066.666666666667, i.e. 106.6666666666667 each, shown to 12 places.)
    lines = [
        {"ts": T0 + 5, "account": "A", "symbol": "S", "side": "BUY", "qty": "5", "price": "120"},
        {"ts": T0, "account": "A", "symbol": "S", "side": "BUY", "qty": "10", "price": "100"},
        {"ts": T0 + 5, "account": "A", "symbol": "S", "side": "SELL", "qty": "5", "price": "110"},
    ]
    code, out, _ = compute(capsys, write_lines(tmp_path / "a.jsonl", lines))
    row = json.loads(out)["positions"][0]
    assert code == 0
    assert (row["avg_open_price"], row["realized_pnl_gross"]) == ("106.666666666667", "16.666666666667")
    lines[0], lines[2] = lines[2], lines[0]
    code, out, _ = compute(capsys, write_lines(tmp_path / "b.jsonl", lines))
    row = json.loads(out)["positions"][0]
    assert (row["avg_open_price"], row["realized_pnl_gross"]) == ("110", "50")


def test_rows_sorted_missing_marks_null_and_blank_lines(tmp_path, marks, capsys):
    lines = [
        {"ts": T0, "account": "B", "symbol": "XYZ", "side": "BUY", "qty": "1", "price": "90"},
        "",
        "   ",
        {"ts": T0, "account": "A", "symbol": "NOMARK", "side": "SELL", "qty": "2", "price": "3"},
        {"ts": T0, "account": "A", "symbol": "XYZ", "side": "BUY", "qty": "1", "price": "100", "venue": "X"},
        {"ts": T0 + 1, "account": "A", "symbol": "GONE", "side": "BUY", "qty": "1", "price": "3"},
        {"ts": T0 + 2, "account": "A", "symbol": "GONE", "side": "SELL", "qty": "1", "price": "4"},
    ]
    code, out, _ = compute(capsys, write_lines(tmp_path / "f.jsonl", lines), "--marks", marks)
    rows = json.loads(out)["positions"]
    assert code == 0
    assert [(r["account"], r["symbol"]) for r in rows] == [("A", "GONE"), ("A", "NOMARK"), ("A", "XYZ"), ("B", "XYZ")]
    gone, nomark, a_xyz, b_xyz = rows
    assert nomark["mark"] is None and nomark["unrealized_pnl"] is None and nomark["fifo_unrealized_pnl"] is None
    assert nomark["net_qty"] == "-2" and nomark["avg_open_price"] == "3"
    assert gone["net_qty"] == "0" and gone["avg_open_price"] is None and gone["realized_pnl_gross"] == "1"
    assert gone["unrealized_pnl"] is None  # no mark: null, even when flat
    assert a_xyz["unrealized_pnl"] == "-5" and b_xyz["unrealized_pnl"] == "5"


def test_without_marks_every_mark_is_null(tmp_path, capsys):
    code, out, _ = compute(capsys, write_lines(tmp_path / "f.jsonl", WORKED))
    row = json.loads(out)["positions"][0]
    assert code == 0 and row["mark"] is None and row["unrealized_pnl"] is None
    assert row["realized_pnl_gross"] == "150"


def test_multipliers_file(tmp_path, capsys):
    lines = [
        {"ts": T0, "account": "A", "symbol": "ES", "side": "BUY", "qty": "2", "price": "4500.25", "fee": "2.5"},
        {"ts": T0 + 1, "account": "A", "symbol": "ES", "side": "SELL", "qty": "1", "price": "4510.5", "fee": "2.5"},
    ]
    (tmp_path / "mult.json").write_text('{"ES": 50}')
    (tmp_path / "marks.json").write_text('{"ES": 4490}')
    code, out, err = compute(
        capsys, write_lines(tmp_path / "f.jsonl", lines),
        "--marks", tmp_path / "marks.json", "--multipliers", tmp_path / "mult.json",
    )
    assert code == 0, err
    row = json.loads(out)["positions"][0]
    assert row["realized_pnl_gross"] == "512.5" and row["realized_pnl_net"] == "507.5"
    assert row["unrealized_pnl"] == "-512.5" and row["mark"] == "4490"


def test_decimal_strings_are_plain_and_exact(tmp_path, capsys):
    lines = [
        {"ts": T0, "account": "A", "symbol": "S", "side": "BUY", "qty": "0.1", "price": "0.1"},
        {"ts": T0 + 1, "account": "A", "symbol": "S", "side": "BUY", "qty": "0.2", "price": "0.20"},
        {"ts": T0 + 2, "account": "A", "symbol": "S", "side": "SELL", "qty": "0.3", "price": 0.3, "fee": "0.000"},
        {"ts": T0 + 3, "account": "A", "symbol": "T", "side": "BUY", "qty": "1E+3", "price": "1E+2", "fee": "1E-8"},
    ]
    (tmp_path / "marks.json").write_text('{"T": "1.000E+2"}')
    code, out, _ = compute(capsys, write_lines(tmp_path / "f.jsonl", lines), "--marks", tmp_path / "marks.json")
    s, t = json.loads(out)["positions"]
    assert code == 0
    assert s["net_qty"] == "0" and s["realized_pnl_gross"] == "0.04" and s["fees"] == "0"
    assert t["net_qty"] == "1000" and t["avg_open_price"] == "100" and t["mark"] == "100"
    assert t["fees"] == "0.00000001" and t["realized_pnl_net"] == "-0.00000001"
    assert "E" not in out and "e-" not in out


BAD_LINES = [
    ("{not json", "malformed JSON"),
    ('{"ts": %d, "account": "A", "symbol": "S", "side": "BUY", "qty": "1"}' % T0, "price"),
    ('{"ts": %d, "account": "A", "symbol": "S", "side": "HOLD", "qty": "1", "price": "1"}' % T0, "side"),
    ('{"ts": %d, "account": "A", "symbol": "S", "side": "BUY", "qty": "-1", "price": "1"}' % T0, "qty must be"),
    ('{"ts": %d, "account": "A", "symbol": "S", "side": "BUY", "qty": "0", "price": "1"}' % T0, "qty must be"),
    ('{"ts": %d, "account": "A", "symbol": "S", "side": "BUY", "qty": "abc", "price": "1"}' % T0, "qty"),
    ('{"ts": %d, "account": "A", "symbol": "S", "side": "BUY", "qty": "1", "price": "NaN"}' % T0, "price must be"),
    ('{"ts": %d, "account": "A", "symbol": "S", "side": "BUY", "qty": "1", "price": "1", "fee": "Infinity"}' % T0, "fee"),
    ('{"ts": 1700000000, "account": "A", "symbol": "S", "side": "BUY", "qty": "1", "price": "1"}', "epoch nanoseconds"),
    ('{"ts": "%d", "account": "A", "symbol": "S", "side": "BUY", "qty": "1", "price": "1"}' % T0, "ts"),
    ('{"ts": %d, "account": "", "symbol": "S", "side": "BUY", "qty": "1", "price": "1"}' % T0, "account"),
    ('["a list"]', "Expected `object`"),
]


@pytest.mark.parametrize("bad, reason", BAD_LINES)
def test_bad_line_is_reported_with_its_number_and_left_out(tmp_path, capsys, bad, reason):
    # As ptrc dead-letters a message it cannot decode and goes on: the other lines give
    # the positions, the bad one is named on stderr, and the exit status says so.
    path = write_lines(tmp_path / "f.jsonl", [WORKED[0], "", bad, WORKED[1]])
    code, out, err = compute(capsys, path)
    assert code == 3
    row = json.loads(out)["positions"][0]
    assert (row["net_qty"], row["avg_open_price"], row["fees"]) == ("20", "105", "2")
    assert f"{path}: line 3:" in err
    assert reason in err
    assert "3 records: 2 applied, 0 duplicate, 0 conflict, 0 pending, 0 refused, 1 bad (left out)" in err


@pytest.mark.parametrize(
    "content, reason",
    [("[1, 2]", "expected"), ('{"X": "-1"}', "must be a number > 0"), ('{"X": "x"}', "expected"), ("{", "malformed")],
)
def test_bad_marks_file(tmp_path, capsys, content, reason):
    fills = write_lines(tmp_path / "f.jsonl", WORKED)
    (tmp_path / "m.json").write_text(content)
    code, out, err = compute(capsys, fills, "--marks", tmp_path / "m.json")
    assert code == 1 and out == "" and reason in err


def test_missing_file(tmp_path, capsys):
    code, out, err = compute(capsys, tmp_path / "nope.jsonl")
    assert code == 1 and out == "" and "cannot read" in err


def test_help_documents_the_methods(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["positions", "compute", "--help"])
    assert exit.value.code == 0
    out = capsys.readouterr().out
    for text in ("both (default)", "fifo_* fields are null", "remaining lots", "rounded half to even to 12"):
        assert text in out


def test_subprocess_good_and_bad(tmp_path, marks):
    fills = write_lines(tmp_path / "fills.jsonl", WORKED)
    cmd = [sys.executable, "-m", "posttrade.cli", "positions", "compute"]
    good = subprocess.run([*cmd, str(fills), "--marks", str(marks)], capture_output=True, text=True, cwd=ROOT)
    assert good.returncode == 0, good.stderr
    assert local(json.loads(good.stdout)["positions"]) == [WORKED_ROW]
    bad = write_lines(tmp_path / "bad.jsonl", [WORKED[0], '{"ts": 1}'])
    failed = subprocess.run([*cmd, str(bad)], capture_output=True, text=True, cwd=ROOT)
    assert failed.returncode == 3
    assert json.loads(failed.stdout)["positions"][0]["net_qty"] == "10"
    assert "line 2:" in failed.stderr and "missing required field" in failed.stderr


def test_empty_file_gives_no_positions(tmp_path, capsys):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n  \n")
    code, out, _ = compute(capsys, path)
    assert code == 0 and json.loads(out) == {"positions": []}


# -- the execution history: resends, late fills, corrections, busts, openings ----------


def fill(fill_id, ts, side, qty, price, fee="1", **extra):
    return {"ts": ts, "fill_id": fill_id, "account": "ACC", "symbol": "XYZ", "side": side, "qty": qty,
            "price": price, "fee": fee, **extra}


def amend(fill_id, ref, ts, exec_type, **economics):
    return {"ts": ts, "fill_id": fill_id, "account": "ACC", "symbol": "XYZ", "exec_type": exec_type,
            "ref_fill_id": ref, **economics}


def rows_of(capsys, tmp_path, lines, *options, name="f.jsonl"):
    (tmp_path / "marks.json").write_text(json.dumps({"XYZ": "95"}))
    code, out, err = compute(capsys, write_lines(tmp_path / name, lines), "--marks", tmp_path / "marks.json", *options)
    return code, (local(json.loads(out)["positions"]) if out else None), err


def test_a_resend_is_dropped_as_a_duplicate(tmp_path, capsys):
    code, rows, err = rows_of(capsys, tmp_path, [WORKED[0], WORKED[1], WORKED[1], WORKED[2], WORKED[0], WORKED[3]])
    assert code == 0
    assert rows == [WORKED_ROW]
    assert "6 records: 4 applied, 2 duplicate, 0 conflict, 0 pending, 0 refused, 0 bad" in err


def test_a_conflicting_resend_loses_to_the_first_arrival_and_is_listed(tmp_path, capsys):
    changed = {**WORKED[1], "price": "111"}
    code, rows, err = rows_of(capsys, tmp_path, [*WORKED[:2], *WORKED[2:], changed])
    assert code == 0 and rows == [WORKED_ROW]
    assert "1 conflict" in err
    assert "line 5: conflict: NEW f2 (ACC/XYZ) differs from its first arrival on line 2; dropped" in err


def test_a_late_fill_takes_its_place_in_time(tmp_path, capsys):
    # f3 (ts T0+3) arrives after f4 (ts T0+4): the position is the ts-ordered one.
    code, rows, err = rows_of(capsys, tmp_path, [WORKED[0], WORKED[1], WORKED[3], WORKED[2]])
    assert code == 0 and rows == [WORKED_ROW]
    assert "4 records: 4 applied (1 late)" in err


def test_a_correction_before_its_original_waits_then_applies(tmp_path, capsys):
    # f3 corrected to SELL 15 @ 130: 20 @ 105, selling 15 @ 130 realizes 375; the SELL 10
    # @ 90 closes the 5 left (-75) and opens 5 short @ 90. FIFO: 10x30 + 5x20 = 400, then
    # 5 x (90 - 110) = -100. Fees 4 (the correction's fee replaces f3's).
    correction = amend("c3", "f3", T0 + 10, "CORRECT", side="SELL", qty="15", price="130", fee="1")
    code, rows, err = rows_of(capsys, tmp_path, [correction])
    assert code == 0 and rows == []  # only a pending amendment: no position yet
    assert "line 1: pending: CORRECT c3 of f3 (ACC/XYZ): its original f3 is not known yet" in err

    code, rows, err = rows_of(capsys, tmp_path, [correction, *WORKED])
    assert code == 0
    assert rows == [{
        **WORKED_ROW, "net_qty": "-5", "avg_open_price": "90", "realized_pnl_gross": "300", "fees": "4",
        "realized_pnl_net": "296", "unrealized_pnl": "-25", "fifo_realized_pnl_gross": "300",
        "fifo_unrealized_pnl": "-25",
    }]
    assert "5 records: 5 applied (1 correction), 0 duplicate, 0 conflict, 0 pending, 0 refused" in err


def test_a_bust_removes_the_execution_and_a_second_bust_is_refused(tmp_path, capsys):
    # Without f2: BUY 10 @ 100; SELL 15 @ 120 closes 10 (+200) and opens 5 short @ 120;
    # SELL 10 @ 90 adds to it: 15 short @ 100. Unrealized at 95: 75 (FIFO 5x25 - 10x5 = 75).
    bust = amend("b2", "f2", T0 + 10, "BUST")
    again = amend("b2-again", "f2", T0 + 11, "BUST")
    code, rows, err = rows_of(capsys, tmp_path, [*WORKED, bust, again])
    assert code == 0
    assert rows == [{
        **WORKED_ROW, "net_qty": "-15", "avg_open_price": "100", "realized_pnl_gross": "200", "fees": "3",
        "realized_pnl_net": "197", "unrealized_pnl": "75", "fifo_realized_pnl_gross": "200",
        "fifo_unrealized_pnl": "75",
    }]
    assert "5 applied (1 bust)" in err and "1 refused" in err
    assert "line 6: refused: BUST b2-again of f2 (ACC/XYZ): f2 was busted" in err


def test_an_opening_comes_before_every_execution_even_when_it_arrives_last(tmp_path, capsys):
    # Opening BUY 10 @ 90, then the worked fills: 30 @ 100; SELL 15 @ 120 realizes 300,
    # SELL 10 @ 90 realizes -100; 5 left @ 100. FIFO: lots 10@90, 10@100, 10@110 ->
    # 10x30 + 5x20 = 400, then 5x(-10) + 5x(-20) = -150; 5 @ 110 left, -75 at 95.
    opening = {"ts": T0 - 1000, "fill_id": "o1", "account": "ACC", "symbol": "XYZ", "side": "BUY",
               "qty": "10", "price": "90", "exec_type": "OPENING"}
    expected = [{
        **WORKED_ROW, "net_qty": "5", "avg_open_price": "100", "realized_pnl_gross": "200", "fees": "4",
        "realized_pnl_net": "196", "unrealized_pnl": "-25", "fifo_realized_pnl_gross": "250",
        "fifo_unrealized_pnl": "-75",
    }]
    code, first, err = rows_of(capsys, tmp_path, [opening, *WORKED])
    assert code == 0 and first == expected and "1 opening" in err
    code, last, _ = rows_of(capsys, tmp_path, [*WORKED, opening])
    assert code == 0 and last == expected
    # Once the key's history reaches back past the horizon, an opening is refused.
    code, rows, err = rows_of(capsys, tmp_path, [*WORKED, opening], "--horizon", "0")
    assert code == 0 and rows == [WORKED_ROW]
    assert "line 5: refused: OPENING o1 (ACC/XYZ): an opening after the key's history reaches past" in err


def test_the_horizon_refuses_a_fill_older_than_it(tmp_path, capsys):
    hour = 3600 * 10**9
    lines = [fill("a", T0, "BUY", "10", "100"), fill("b", T0 + 2 * hour, "BUY", "10", "110"),
             fill("late", T0 + hour // 2, "SELL", "10", "120")]
    code, rows, err = rows_of(capsys, tmp_path, lines, "--horizon", "1h")
    assert code == 0 and rows[0]["net_qty"] == "20"
    assert "line 3: refused: NEW late (ACC/XYZ): an execution older than the horizon" in err
    code, rows, err = rows_of(capsys, tmp_path, lines)  # default 7 days: it lands
    assert rows[0]["net_qty"] == "10" and "1 late" in err
    code, rows, err = rows_of(capsys, tmp_path, lines, "--horizon", str(3 * 3600))  # seconds
    assert rows[0]["net_qty"] == "10"


def test_bad_horizon_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["positions", "compute", "f.jsonl", "--horizon", "soon"])
    assert exit.value.code == 2 and "--horizon" in capsys.readouterr().err


# Every kind of record in one file, in the order a feed could deliver them.
MIXED = [
    {"ts": T0, "fill_id": "o1", "account": "ACC", "symbol": "XYZ", "side": "BUY", "qty": "10", "price": "100",
     "exec_type": "OPENING"},
    fill("f1", T0 + 10, "BUY", "10", "110"),
    fill("f1", T0 + 10, "BUY", "10", "110"),  # resend
    amend("c3", "f3", T0 + 31, "CORRECT", side="SELL", qty="5", price="130", fee="1"),  # before f3
    fill("f2", T0 + 20, "SELL", "5", "120"),
    fill("f3", T0 + 30, "SELL", "15", "125"),
    fill("f4", T0 + 15, "BUY", "10", "90"),  # late
    amend("b1", "f1", T0 + 40, "BUST"),
    fill("f2", T0 + 20, "SELL", "5", "121"),  # conflicting resend
    amend("c9", "nope", T0 + 50, "CORRECT", side="SELL", qty="5", price="130", fee="1"),  # stays pending
    amend("b2", "f1", T0 + 50, "BUST"),  # f1 is already busted
    "{oops",
]


def test_a_whole_feed_worked_through(tmp_path, capsys):
    # Effective history: opening BUY 10 @ 100, then by ts f4 BUY 10 @ 90 (20 @ 95),
    # f2 SELL 5 @ 120 (+125), f3 as corrected SELL 5 @ 130 (+175): 10 @ 95, realized 300,
    # fees 3 (f1's went with its bust). FIFO sells from the opening lot: 5x20 + 5x30 = 250,
    # leaving 10 @ 90. Marked at 100.
    (tmp_path / "m.json").write_text('{"XYZ": "100"}')
    path = write_lines(tmp_path / "mixed.jsonl", MIXED)
    code, out, err = compute(capsys, path, "--marks", tmp_path / "m.json")
    assert code == 3
    assert local(json.loads(out)["positions"]) == [{
        "account": "ACC", "symbol": "XYZ", "net_qty": "10", "avg_open_price": "95", "realized_pnl_gross": "300",
        "fees": "3", "realized_pnl_net": "297", "mark": "100", "unrealized_pnl": "50",
        "fifo_realized_pnl_gross": "250", "fifo_unrealized_pnl": "100",
    }]
    assert err.splitlines() == [
        f"posttrade positions compute: {path}: line 12: malformed JSON: JSON is malformed: object keys must be "
        "strings (byte 1)",
        f"posttrade positions compute: {path}: 12 records: 7 applied (1 opening, 1 late, 1 correction, 1 bust), "
        "1 duplicate, 1 conflict, 1 pending, 1 refused, 1 bad (left out)",
        "  line 9: conflict: NEW f2 (ACC/XYZ) differs from its first arrival on line 5; dropped",
        "  line 10: pending: CORRECT c9 of nope (ACC/XYZ): its original nope is not known yet",
        "  line 11: refused: BUST b2 of f1 (ACC/XYZ): f1 was busted: it cannot be amended",
    ]
    # The same as a fresh book over the effective history, written out in order.
    effective = [
        {**MIXED[0], "exec_type": "NEW"}, MIXED[6], MIXED[4], fill("f3", T0 + 30, "SELL", "5", "130"),
    ]
    code, plain, _ = compute(capsys, write_lines(tmp_path / "effective.jsonl", effective), "--marks", tmp_path / "m.json")
    assert code == 0 and json.loads(plain) == json.loads(out)
    # Everything again after it (a replay of the whole feed) changes nothing.
    code, again, err = compute(capsys, write_lines(tmp_path / "twice.jsonl", MIXED[:-1] * 2), "--marks", tmp_path / "m.json")
    assert json.loads(again) == json.loads(out)
    assert "11 duplicate" in err


def test_compute_function_keeps_its_signature_for_the_validate_gate():
    from decimal import Decimal

    from posttrade.commands.positions import compute as compute_book
    from posttrade.streams.events import Fill

    fills = [Fill(**{**f, "qty": Decimal(f["qty"]), "price": Decimal(f["price"]), "fee": Decimal(f["fee"])})
             for f in WORKED]
    book = compute_book(list(reversed(fills)), {"XYZ": Decimal(95)}, {})
    assert local(book.rows()) == [WORKED_ROW]


# -- positions load --------------------------------------------------------------------

AS_OF = "2025-01-31T22:00:00Z"
AS_OF_NS = 1_738_360_800_000_000_000


def load(capsys, *argv):
    code = main(["positions", "load", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def dry_run(capsys, path, *argv):
    code, out, err = load(capsys, path, "--as-of", AS_OF, "--dry-run", *argv)
    assert code == 0, err
    return [json.loads(line) for line in out.splitlines()], err


STATEMENT_CSV = (
    "\ufeffAccount;Symbol;Currency;Net_Qty;Avg_Open_Price;Note\n"
    "ACC1;ESZ5;USD;10;4500.25;\"two\nlines\"\n"
    "\n"
    "ACC1; BRK.B ;USD;-3;410.50;\n"
    "ACC2;XYZ;USD;0;;flat\n"
    "ACC2;XYZ;USD;1E+3;12;\n"
)


def test_load_csv_dry_run(tmp_path, capsys):
    path = tmp_path / "statement.csv"
    path.write_text(STATEMENT_CSV, encoding="utf-8")
    records, err = dry_run(capsys, path)
    assert [(r["account"], r["symbol"], r["side"], r["qty"], r["price"]) for r in records] == [
        ("ACC1", "ESZ5", "BUY", "10", "4500.25"),
        ("ACC1", "BRK.B", "SELL", "3", "410.5"),
        ("ACC2", "XYZ", "BUY", "1000", "12"),
    ]
    for record in records:
        assert record["exec_type"] == "OPENING" and record["fee"] == "0" and record["ts"] == AS_OF_NS
        assert record["fill_id"].startswith("open:") and len(record["fill_id"]) == 5 + 32
        assert record["ref_fill_id"] is None
    assert "4 row(s), 3 opening(s), 1 zero row(s) skipped (line 6)" in err
    assert "ignored columns: Currency, Note" in err
    assert "ACC1: 2 position(s)" in err and "ACC2: 1 position(s)" in err
    assert f"line 2: ACC1 ESZ5 BUY 10 @ 4500.25 -> {records[0]['fill_id']}" in err
    assert f"line 5: ACC1 BRK.B SELL 3 @ 410.5 -> {records[1]['fill_id']}" in err  # after the 2-line cell
    assert "nothing published" in err


def test_load_jsonl_dry_run_gives_the_same_records(tmp_path, capsys):
    csv_path = tmp_path / "statement.csv"
    csv_path.write_text(STATEMENT_CSV, encoding="utf-8")
    from_csv, _ = dry_run(capsys, csv_path)
    path = write_lines(tmp_path / "statement.jsonl", [
        {"account": "ACC1", "symbol": "ESZ5", "net_qty": 10, "avg_open_price": "4500.250", "desk": "x"},
        '{"account": "ACC1", "symbol": "BRK.B", "net_qty": "-3", "avg_open_price": 410.5}',
        {"account": "ACC2", "symbol": "XYZ", "net_qty": "0", "avg_open_price": None},
        "",
        {"account": "ACC2", "symbol": "XYZ", "net_qty": "1000", "avg_open_price": "12.0", "currency": "USD"},
    ])
    records, err = dry_run(capsys, path)
    assert records == from_csv  # same content, same ids, whatever the format
    assert "ignored fields: currency, desk" in err and "zero row(s) skipped (line 3)" in err


def test_load_ids_are_stable_and_distinct_for_identical_lots(tmp_path, capsys):
    path = tmp_path / "s.csv"
    path.write_text("account,symbol,net_qty,avg_open_price\nA,S,5,10\nA,S,5,10.00\nA,S,5,11\n")
    first, err = dry_run(capsys, path)
    second, _ = dry_run(capsys, path)
    assert first == second  # another run, the same ids
    ids = [r["fill_id"] for r in first]
    assert len(set(ids)) == 3  # two identical lots, two ids
    assert "note: lines 2, 3 are identical lots of A S: loaded as 2 lots" in err
    # The id is the content's: reformatting the numbers changes nothing; another as-of does.
    path.write_text("account,symbol,net_qty,avg_open_price,extra\nA,S,5.0,1E+1,x\nA,S,5,10,y\nA,S,5,11.000,z\n")
    reformatted, _ = dry_run(capsys, path)
    assert [r["fill_id"] for r in reformatted] == ids
    code, out, _ = load(capsys, path, "--as-of", "2025-01-31T23:00:00+01:00", "--dry-run")  # the same instant
    assert [json.loads(line)["fill_id"] for line in out.splitlines()] == ids
    code, out, _ = load(capsys, path, "--as-of", str(AS_OF_NS + 1), "--dry-run")
    assert not set(json.loads(line)["fill_id"] for line in out.splitlines()) & set(ids)
    from posttrade.commands.positions import opening_id
    from decimal import Decimal

    assert ids[0] == opening_id("A", "S", Decimal(5), Decimal(10), AS_OF_NS, 1)
    assert ids[1] == opening_id("A", "S", Decimal(5), Decimal(10), AS_OF_NS, 2)


def test_load_dry_run_feeds_compute(tmp_path, capsys):
    # Long 10 @ 100 and short 4 @ 50 held, then one fill each: SELL 5 @ 110 realizes 50,
    # BUY 4 @ 45 closes the short (+20). The statement loaded twice (a reload) adds nothing.
    statement = tmp_path / "s.csv"
    statement.write_text("account,symbol,net_qty,avg_open_price\nACC,XYZ,10,100\nACC,ABC,-4,50\nACC,OLD,0,7\n")
    code, openings, _ = load(capsys, statement, "--as-of", AS_OF, "--dry-run")
    assert code == 0
    fills = [
        {"ts": AS_OF_NS + 1, "fill_id": "x1", "account": "ACC", "symbol": "XYZ", "side": "SELL", "qty": "5",
         "price": "110"},
        {"ts": AS_OF_NS + 2, "fill_id": "x2", "account": "ACC", "symbol": "ABC", "side": "BUY", "qty": "4",
         "price": "45"},
    ]
    feed = tmp_path / "feed.jsonl"
    feed.write_text(openings + "".join(json.dumps(f) + "\n" for f in fills) + openings)
    (tmp_path / "m.json").write_text('{"XYZ": "104", "ABC": "44"}')
    code, out, err = compute(capsys, feed, "--marks", tmp_path / "m.json", "--method", "avg")
    assert code == 0, err
    rows = {row["symbol"]: row for row in json.loads(out)["positions"]}
    assert sorted(rows) == ["ABC", "XYZ"]  # the zero row was not loaded
    assert (rows["XYZ"]["net_qty"], rows["XYZ"]["avg_open_price"], rows["XYZ"]["realized_pnl_gross"]) == ("5", "100", "50")
    assert rows["XYZ"]["unrealized_pnl"] == "20"
    assert (rows["ABC"]["net_qty"], rows["ABC"]["avg_open_price"], rows["ABC"]["realized_pnl_gross"]) == ("0", None, "20")
    assert "6 records: 4 applied (2 opening), 2 duplicate" in err


BAD_STATEMENT = (
    "account,symbol,net_qty,avg_open_price\n"
    "A,S,10,100\n"
    "A,S,ten,100\n"  # 3
    "A,,1,1\n"  # 4
    "A,S,1\n"  # 5
    "A,S,1,0\n"  # 6
    "A,S,-1,\n"  # 7
    "A,S,0,\n"  # fine: a zero row
    "A,S,1,1,extra\n"  # 9
)


def test_load_bad_rows_are_all_reported_and_nothing_is_published(tmp_path, capsys, monkeypatch):
    import posttrade.commands.positions as positions

    async def no_publish(*args):
        raise AssertionError("nothing may be published")

    monkeypatch.setattr(positions, "publish_openings", no_publish)
    path = tmp_path / "bad.csv"
    path.write_text(BAD_STATEMENT)
    for extra in ((), ("--dry-run",)):
        code, out, err = load(capsys, path, "--as-of", AS_OF, *extra)
        assert code == 1 and out == ""
        lines = [line for line in err.splitlines() if ": line " in line]
        assert [line.split(": line ")[1].split(":")[0] for line in lines] == ["3", "4", "5", "6", "7", "9"]
        assert "net_qty must be a decimal string, got 'ten'" in err
        assert "symbol must be a non-empty string" in err
        assert "avg_open_price must be a number > 0 for a non-zero net_qty" in err
        assert "6 bad row(s): nothing published" in err


@pytest.mark.parametrize(
    "content, reason",
    [
        ("account,symbol,qty,price\nA,S,1,1\n", "the header must name the columns account, symbol, net_qty"),
        ("", "empty"),
        ('{"account": "A", "symbol": "S"}\n', "line 1: missing field net_qty"),
        ('{"account": "A", "symbol": "S", "net_qty": "1", "avg_open_price": "1"}\n[1]\n', "line 2: expected a JSON object"),
        ('{"account": 1, "symbol": "S", "net_qty": "1", "avg_open_price": "1"}\n', "account must be a non-empty string"),
        ('{"account": "A ", "symbol": "S", "net_qty": "1", "avg_open_price": "1"}\n', "line 1: not a valid Fill"),
    ],
)
def test_load_bad_statements(tmp_path, capsys, content, reason):
    path = tmp_path / ("s.jsonl" if content.startswith("{") else "s.csv")
    path.write_text(content)
    code, out, err = load(capsys, path, "--as-of", AS_OF, "--dry-run")
    assert code == 1 and out == "" and reason in err


@pytest.mark.parametrize(
    "text, ns",
    [
        ("2025-01-31T22:00:00Z", AS_OF_NS),
        ("2025-01-31T17:00:00-05:00", AS_OF_NS),
        ("2025-01-31T22:00:00.000000123+00:00", AS_OF_NS + 123),
        ("2025-01-31T22:00:00.5Z", AS_OF_NS + 500_000_000),
        (str(AS_OF_NS), AS_OF_NS),
    ],
)
def test_as_of_accepts_iso_with_a_timezone_or_epoch_ns(text, ns):
    from posttrade.commands.positions import format_ts, parse_as_of

    assert parse_as_of(text) == ns
    assert parse_as_of(format_ts(ns)) == ns


@pytest.mark.parametrize(
    "text, reason",
    [("2025-01-31T22:00:00", "no timezone"), ("1738360800", "between 1990 and 2200"), ("yesterday", "ISO-8601"),
     ("2025-01-31T22:00:00.1234567891Z", "more than 9")],
)
def test_as_of_refuses_what_is_ambiguous(capsys, text, reason):
    with pytest.raises(SystemExit) as exit:
        main(["positions", "load", "s.csv", "--as-of", text])
    assert exit.value.code == 2 and reason in capsys.readouterr().err


def test_load_publishes_in_file_order_and_reports_what_was_stored(tmp_path, capsys, monkeypatch):
    import posttrade.commands.positions as positions

    class Ack:
        def __init__(self, seq, duplicate):
            self.stream, self.seq, self.duplicate = "FILLS", seq, duplicate

    published = []

    async def fake_publish(url, fills, acks):
        published.extend(fills)
        acks.extend(Ack(i + 1, i == 0) for i in range(len(fills)))
        return None

    monkeypatch.setattr(positions, "publish_openings", fake_publish)
    path = tmp_path / "s.csv"
    path.write_text("account,symbol,net_qty,avg_open_price\nB,S,1,2\nA,S,-1,2\n")
    code, out, err = load(capsys, path, "--as-of", AS_OF, "--nats-url", "nats://u:secret@host:4222")
    assert code == 0, err
    assert [(f.account, f.side, f.exec_type) for f in published] == [("B", "BUY", "OPENING"), ("A", "SELL", "OPENING")]
    assert f"line 2: B S BUY 1 @ 2 -> {published[0].fill_id}: already on the bus (seq 1)" in out
    assert f"line 3: A S SELL 1 @ 2 -> {published[1].fill_id}: stored (stream FILLS, seq 2)" in out
    assert "published 1 opening(s) to nats://***@host:4222; 1 already on the bus" in out
    assert "secret" not in out + err


def test_load_a_failed_publish_says_how_far_it_got(tmp_path, capsys, monkeypatch):
    import posttrade.commands.positions as positions

    class Ack:
        stream, seq, duplicate = "FILLS", 7, False

    async def failing_publish(url, fills, acks):
        acks.append(Ack())
        raise TimeoutError("no answer")

    monkeypatch.setattr(positions, "publish_openings", failing_publish)
    path = tmp_path / "s.csv"
    path.write_text("account,symbol,net_qty,avg_open_price\nB,S,1,2\nA,S,-1,2\n")
    code, out, err = load(capsys, path, "--as-of", AS_OF, "--nats-url", "nats://127.0.0.1:4222")
    assert code == 1
    assert "B S BUY 1 @ 2 -> open:" in out and ": stored (stream FILLS, seq 7)" in out
    assert "A S SELL 1 @ 2 -> open:" in out and ": not published" in out
    assert "failed after 1 of 2 opening(s)" in err and "running the same load again is safe" in err


# -- currencies ------------------------------------------------------------------------


def test_currencies_from_the_reference_files(tmp_path, capsys):
    lines = [
        {"ts": T0, "fill_id": "j1", "account": "A", "symbol": "TOYOTA", "side": "BUY", "qty": "100", "price": "2500"},
        {"ts": T0 + 1, "fill_id": "j2", "account": "A", "symbol": "TOYOTA", "side": "SELL", "qty": "40", "price": "2600",
         "fee": "2", "fee_currency": "USD"},
        {"ts": T0 + 2, "fill_id": "e1", "account": "EU", "symbol": "ES", "side": "BUY", "qty": "1", "price": "5000"},
    ]
    (tmp_path / "i.json").write_text(json.dumps({
        "TOYOTA": {"currency": "JPY"}, "ES": {"multiplier": 50, "currency": "USD"},
        "USDJPY": {"currency": "JPY", "fx": {"base": "USD", "quote": "JPY"}},
    }))
    (tmp_path / "a.json").write_text(json.dumps({"default_base_currency": "USD", "EU": {"base_currency": "EUR"}}))
    (tmp_path / "fx.json").write_text(json.dumps({"fixed": {"EUR": {"USD": "1.25"}}, "pivot": "USD"}))
    (tmp_path / "m.json").write_text(json.dumps({"TOYOTA": "2550", "USDJPY": "150", "ES": "5010"}))
    code, out, err = compute(
        capsys, write_lines(tmp_path / "f.jsonl", lines), "--marks", tmp_path / "m.json",
        "--instruments", tmp_path / "i.json", "--accounts", tmp_path / "a.json", "--fx", tmp_path / "fx.json",
    )
    assert code == 0, err
    jpy, es = json.loads(out)["positions"]
    assert (jpy["currency"], jpy["base_currency"], jpy["fx_rate"]) == ("JPY", "USD", "0.0066666666666666666667")
    assert jpy["fx_legs"] == [{"from": "JPY", "to": "USD", "rate": "0.0066666666666666666667", "source": "mark",
                               "instrument": "USDJPY", "inverse": True, "ts": None}]  # fmt: skip
    assert jpy["fees"] == "0" and jpy["foreign_fees"] == {"USD": "2"}
    assert jpy["realized_pnl_gross_base"] == "26.666666666667" and jpy["fees_base"] == "2"
    assert jpy["total_pnl_base"] == "44.666666666667"  # 7000 JPY / 150 - 2 USD
    # EU's base is EUR: USD -> EUR is the inverse of the fixed EUR -> USD rate.
    assert (es["base_currency"], es["fx_rate"], es["unrealized_pnl"]) == ("EUR", "0.8", "500")
    assert es["unrealized_pnl_base"] == "400" and es["fx_legs"][0]["source"] == "fixed"


def test_bad_reference_files(tmp_path, capsys):
    fills = write_lines(tmp_path / "f.jsonl", WORKED)
    (tmp_path / "i.json").write_text('{"X": {"currency": "usd"}}')
    code, out, err = compute(capsys, fills, "--instruments", tmp_path / "i.json")
    assert code == 1 and out == "" and "currency code" in err
    (tmp_path / "i.json").write_text("{")
    code, out, err = compute(capsys, fills, "--instruments", tmp_path / "i.json")
    assert code == 1 and "malformed JSON" in err
