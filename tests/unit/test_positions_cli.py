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
    assert json.loads(out) == {"positions": [WORKED_ROW]}
    assert list(json.loads(out)["positions"][0]) == list(WORKED_ROW)  # field order


def test_methods(tmp_path, marks, capsys):
    fills = write_lines(tmp_path / "fills.jsonl", WORKED[:3])
    rows = {}
    for method in ("avg", "fifo", "both"):
        code, out, _ = compute(capsys, fills, "--marks", marks, "--method", method)
        assert code == 0
        rows[method] = json.loads(out)["positions"][0]
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
def test_bad_line_stops_with_line_number_and_reason(tmp_path, capsys, bad, reason):
    path = write_lines(tmp_path / "f.jsonl", [WORKED[0], "", bad, WORKED[1]])
    code, out, err = compute(capsys, path)
    assert code == 1
    assert out == ""
    assert f"{path}: line 3:" in err
    assert reason in err


def test_duplicate_fill_id_is_a_bad_line(tmp_path, capsys):
    path = write_lines(tmp_path / "f.jsonl", [WORKED[0], WORKED[1], {**WORKED[2], "fill_id": "f1"}])
    code, out, err = compute(capsys, path)
    assert code == 1 and out == ""
    assert "line 3: duplicate fill_id 'f1' (first on line 1)" in err


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
    assert json.loads(good.stdout) == {"positions": [WORKED_ROW]}
    bad = write_lines(tmp_path / "bad.jsonl", [WORKED[0], '{"ts": 1}'])
    failed = subprocess.run([*cmd, str(bad)], capture_output=True, text=True, cwd=ROOT)
    assert failed.returncode == 1
    assert failed.stdout == ""
    assert "line 2:" in failed.stderr and "missing required field" in failed.stderr


def test_empty_file_gives_no_positions(tmp_path, capsys):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n  \n")
    code, out, _ = compute(capsys, path)
    assert code == 0 and json.loads(out) == {"positions": []}
