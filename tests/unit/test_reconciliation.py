"""The reconciliation core: comparing position sets, tolerances, reading statements."""

from __future__ import annotations

from decimal import Decimal as D

import pytest

from posttrade.core.positions import PositionBook
from posttrade.core.reconciliation import (
    MAX_STATEMENT_ERRORS,
    Break,
    PositionFigures,
    StatementError,
    Tolerance,
    compare_positions,
    figures_of,
    parse_statement,
    value_breaks,
)
from posttrade.streams.events import Fill

T0 = 1_795_000_000_000_000_000


def fig(account, symbol, net, avg, realized) -> PositionFigures:
    return PositionFigures(
        account=account, symbol=symbol, net_qty=D(net), avg_open_price=None if avg is None else D(avg),
        realized_pnl=D(realized),
    )


def keyed(*figures: PositionFigures) -> dict:
    return {f.key: f for f in figures}


def worked_example_book() -> PositionBook:
    """Issue 3's worked example: fee 1 per fill; ends short 5 @ 90, realized net 146."""
    book = PositionBook()
    for i, (side, qty, price) in enumerate([("BUY", 10, 100), ("BUY", 10, 110), ("SELL", 15, 120), ("SELL", 10, 90)]):
        book.apply(Fill(ts=T0 + i, fill_id=f"f{i}", account="ACC1", symbol="XYZ", side=side,
                        qty=D(qty), price=D(price), fee=D(1)))
    return book


# -- figures ------------------------------------------------------------------------------


def test_figures_of_a_position_take_realized_pnl_net_of_fees():
    position = worked_example_book().get("ACC1", "XYZ")
    assert figures_of(position) == fig("ACC1", "XYZ", "-5", "90", "146")


def test_flat_position_has_no_average():
    book = PositionBook()
    book.apply(Fill(ts=T0, fill_id="a", account="A", symbol="S", side="BUY", qty=D(2), price=D(10)))
    book.apply(Fill(ts=T0 + 1, fill_id="b", account="A", symbol="S", side="SELL", qty=D(2), price=D(11)))
    assert figures_of(book.get("A", "S")) == fig("A", "S", "0", None, "2")


# -- compare ------------------------------------------------------------------------------


def test_identical_sets_have_no_breaks():
    replay = keyed(fig("A", "X", "10", "100.5", "3"), fig("A", "Y", "0", None, "-7"), fig("B", "X", "-1", "99", "0"))
    assert compare_positions(replay, dict(replay), against="live") == []


def test_each_figure_beyond_tolerance_is_one_break():
    replay = keyed(fig("A", "X", "10", "100", "5"))
    other = keyed(fig("A", "X", "9", "100.01", "4.5"))
    breaks = compare_positions(replay, other, against="statement")
    assert [(b.field, b.replay, b.other, b.difference) for b in breaks] == [
        ("net_qty", D(10), D(9), D(-1)),
        ("avg_open_price", D(100), D("100.01"), D("0.01")),
        ("realized_pnl", D(5), D("4.5"), D("-0.5")),
    ]
    assert all(b.against == "statement" and (b.account, b.symbol) == ("A", "X") for b in breaks)
    assert [b.tolerance for b in breaks] == [D(0), D(0), D(0)]


def test_differences_within_tolerance_are_not_breaks_and_the_boundary_is_inclusive():
    replay = keyed(fig("A", "X", "10", "100", "5"))
    other = keyed(fig("A", "X", "10.5", "100.0001", "5.01"))
    tolerance = Tolerance(qty=D("0.5"), avg_price=D("0.0001"), realized_pnl=D("0.01"))
    assert compare_positions(replay, other, against="statement", tolerance=tolerance) == []
    tighter = Tolerance(qty=D("0.5"), avg_price=D("0.00009"), realized_pnl=D("0.01"))
    (only,) = compare_positions(replay, other, against="statement", tolerance=tighter)
    assert only.field == "avg_open_price" and only.tolerance == D("0.00009")


def test_open_on_one_side_and_flat_on_the_other_breaks_quantity_and_average():
    replay = keyed(fig("A", "X", "0", None, "5"))
    other = keyed(fig("A", "X", "3", "10", "5"))
    breaks = compare_positions(replay, other, against="live")
    assert [(b.field, b.replay, b.other, b.difference) for b in breaks] == [
        ("net_qty", D(0), D(3), D(3)),
        ("avg_open_price", None, D(10), None),
    ]


def test_a_position_on_one_side_only_is_one_position_break():
    replay = keyed(fig("A", "X", "10", "100", "0"), fig("A", "Y", "0", None, "0"))
    other = keyed(fig("B", "Z", "-2", "50", "1"))
    breaks = compare_positions(replay, other, against="statement")
    assert [(b.account, b.symbol, b.field, b.missing_from, b.replay, b.other, b.difference) for b in breaks] == [
        ("A", "X", "position", "statement", D(10), None, D(-10)),
        ("B", "Z", "position", "replay", None, D(-2), D(-2)),
    ]  # A/Y is flat with nothing realized: nothing to reconcile


def test_flat_position_with_realized_pnl_missing_from_the_other_side_is_a_break():
    breaks = compare_positions(keyed(fig("A", "X", "0", None, "12.5")), {}, against="live")
    assert [(b.field, b.missing_from) for b in breaks] == [("position", "live")]


def test_breaks_are_sorted_by_account_and_symbol():
    replay = keyed(fig("B", "A", "1", "1", "0"), fig("A", "B", "1", "1", "0"), fig("A", "A", "1", "1", "0"))
    other = keyed(fig("B", "A", "2", "1", "0"), fig("A", "B", "2", "1", "0"), fig("A", "A", "2", "1", "0"))
    keys = [(b.account, b.symbol) for b in compare_positions(replay, other, against="live")]
    assert keys == [("A", "A"), ("A", "B"), ("B", "A")]


def test_tolerance_must_be_finite_and_not_negative():
    with pytest.raises(ValueError, match="qty"):
        Tolerance(qty=D(-1))
    with pytest.raises(ValueError, match="avg_price"):
        Tolerance(avg_price=D("NaN"))


def test_value_breaks_values_quantity_breaks_at_mark_and_multiplier():
    breaks = [
        Break(against="live", account="A", symbol="ES", field="net_qty", replay=D(2), other=D(3), difference=D(1)),
        Break(against="live", account="A", symbol="ES", field="realized_pnl", replay=D(2), other=D(3), difference=D(1)),
        Break(against="live", account="A", symbol="NOMARK", field="net_qty", replay=D(2), other=D(1), difference=D(-1)),
    ]
    valued = value_breaks(breaks, {"ES": D("5000.25"), "NOMARK": None}, {"ES": D(50)})
    assert [b.value_at_mark for b in valued] == [D("250012.50"), None, None]


# -- statements -----------------------------------------------------------------------------


def test_statement_is_read_with_columns_in_any_order_and_extra_columns_ignored():
    text = (
        "Symbol,Account,Realized_PnL,Net_Qty,Avg_Open_Price,currency\n"
        "XYZ,ACC1,146,-5,90,USD\n"
        "\n"
        "ABC,ACC1,0,100,12.345,USD\n"
        "FLAT,ACC2,-3.5,0,,USD\n"
    )
    assert parse_statement(text) == keyed(
        fig("ACC1", "XYZ", "-5", "90", "146"), fig("ACC1", "ABC", "100", "12.345", "0"),
        fig("ACC2", "FLAT", "0", None, "-3.5"),
    )


def test_statement_with_a_byte_order_mark_and_quoted_fields():
    text = '\ufeffaccount,symbol,net_qty,avg_open_price,realized_pnl\r\n"ACC 1","BRK.B","1","2","3"\r\n'
    assert parse_statement(text) == keyed(fig("ACC 1", "BRK.B", "1", "2", "3"))


def test_statement_with_only_a_header_has_no_positions():
    assert parse_statement("account,symbol,net_qty,avg_open_price,realized_pnl\n") == {}


def test_empty_statement_is_refused():
    with pytest.raises(StatementError) as info:
        parse_statement("\n\n")
    assert info.value.errors[0][0] == 1 and "header" in info.value.errors[0][1]


def test_missing_header_columns_are_named():
    with pytest.raises(StatementError) as info:
        parse_statement("\naccount,symbol,qty\nA,X,1\n")
    ((line, reason),) = info.value.errors
    assert line == 2
    assert "net_qty" in reason and "avg_open_price" in reason and "realized_pnl" in reason


def test_every_bad_line_is_reported_with_its_number():
    text = (
        "account,symbol,net_qty,avg_open_price,realized_pnl\n"  # 1
        "A,X,10,100,0\n"  # 2
        "A,Y,ten,100,0\n"  # 3
        ",Z,1,1,0\n"  # 4
        "A,W,5,,0\n"  # 5: open without an average
        "A,X,1,1,0\n"  # 6: duplicate of line 2
        "A,V,1,1\n"  # 7: a field short
        "A,U,1,-4,0\n"  # 8: negative average
        "A,T,1,1,inf\n"  # 9
        "A,S,1,1,\n"  # 10: realized_pnl empty
    )
    with pytest.raises(StatementError) as info:
        parse_statement(text)
    errors = info.value.errors
    assert [line for line, _ in errors] == [3, 4, 5, 6, 7, 8, 9, 10]
    reasons = dict(errors)
    assert "net_qty is not a decimal number: 'ten'" in reasons[3]
    assert "account is empty" in reasons[4]
    assert "avg_open_price is empty for an open position" in reasons[5]
    assert "first on line 2" in reasons[6]
    assert "expected 5 fields" in reasons[7]
    assert "avg_open_price must be > 0" in reasons[8]
    assert "finite" in reasons[9]
    assert "realized_pnl is empty" in reasons[10]
    assert "line 3:" in str(info.value)
    assert info.value.detail()["errors"][0] == {"line": 3, "error": reasons[3]}


def test_line_numbers_count_lines_inside_quoted_fields():
    text = 'account,symbol,net_qty,avg_open_price,realized_pnl,note\nA,X,1,1,0,"two\nlines"\nA,Y,x,1,0,ok\n'
    with pytest.raises(StatementError) as info:
        parse_statement(text)
    assert [line for line, _ in info.value.errors] == [4]


def test_errors_stop_after_the_maximum():
    text = "account,symbol,net_qty,avg_open_price,realized_pnl\n" + "A,X,bad,1,0\n" * (MAX_STATEMENT_ERRORS + 20)
    with pytest.raises(StatementError) as info:
        parse_statement(text)
    assert len(info.value.errors) == MAX_STATEMENT_ERRORS
    assert info.value.truncated


def test_duplicate_header_column_is_refused():
    with pytest.raises(StatementError, match="appears twice in the header"):
        parse_statement("account,symbol,net_qty,avg_open_price,realized_pnl,net_qty\n")


def test_a_statement_of_the_worked_example_reconciles_with_its_replay():
    replay = {(p.account, p.symbol): figures_of(p) for p in worked_example_book()}
    statement = parse_statement("account,symbol,net_qty,avg_open_price,realized_pnl\nACC1,XYZ,-5,90.00,146.00\n")
    assert compare_positions(replay, statement, against="statement") == []
    injected = parse_statement("account,symbol,net_qty,avg_open_price,realized_pnl\nACC1,XYZ,-4,90.00,146.00\n")
    (only,) = compare_positions(replay, injected, against="statement")
    assert (only.field, only.replay, only.other) == ("net_qty", D(-5), D(-4))
