"""The one valuation (`posttrade.core.valuation`): worked examples, and the property
that valuing a `Position` gives exactly what the position's own methods say."""

from __future__ import annotations

from decimal import Decimal, localcontext

from hypothesis import given, settings
from hypothesis import strategies as st

from posttrade.core.exact import format_decimal
from posttrade.core.positions import Position, PositionBook
from posttrade.core.valuation import (
    AccountSums,
    account_value,
    day_pnl_of,
    market_value_of,
    sum_known,
    total_pnl_of,
    value_position,
)
from posttrade.streams.events import Fill, PositionUpdate

D = Decimal
T0 = 1_700_000_000_000_000_000


def book_of(fills: list[tuple[str, str, str, str, str]], multipliers: dict[str, int] | None = None) -> PositionBook:
    """A book after `fills`: (symbol, side, qty, price, fee), all of account A."""
    book = PositionBook(multipliers)
    for i, (symbol, side, qty, price, fee) in enumerate(fills):
        book.apply(Fill(ts=T0 + i, fill_id=f"f{i}", account="A", symbol=symbol, side=side, qty=D(qty),
                        price=D(price), fee=D(fee)))
    return book


def published(position: Position) -> PositionUpdate:
    """ptrc's copy of `position` as the PositionUpdate contract carries it."""
    return PositionUpdate(
        ts=T0, account=position.account, symbol=position.symbol, reason="fill", multiplier=position.multiplier,
        net_qty=position.net_qty, avg_open_price=position.avg_open_price, open_cost=position.open_cost,
        realized_pnl_gross=position.realized_pnl_gross, fees=position.fees, realized_pnl_net=position.realized_pnl_net,
        fifo_open_cost=position.fifo_open_cost, fifo_realized_pnl_gross=position.fifo_realized_pnl_gross,
        sod_realized_pnl_net=position.sod_realized_pnl_net, sod_unrealized_pnl=position.sod_unrealized_pnl,
        fill_count=position.fill_count,
    )


# -- worked examples ------------------------------------------------------------------------


def test_a_long_future_with_multiplier_50():
    book = book_of([("ES", "BUY", "2", "5000.25", "2.5")], {"ES": 50})
    value = value_position(book.get("A", "ES"), D("5010.25"))
    assert (value.net_qty, value.avg_open_price, value.multiplier) == (D(2), D("5000.25"), D(50))
    assert value.mark == D("5010.25")
    assert value.unrealized_pnl == value.fifo_unrealized_pnl == D(1000)  # 2 x (5010.25 - 5000.25) x 50
    assert (value.realized_pnl_gross, value.fees, value.realized_pnl_net) == (D(0), D("2.5"), D("-2.5"))
    assert (value.total_pnl, value.day_pnl) == (D("997.5"), D("997.5"))  # first traded today
    assert value.market_value == value.gross_notional == D(501025)  # the fee is never multiplied
    assert value.fill_count == 1


def test_a_short_future_gains_as_the_price_falls():
    book = book_of([("ES", "SELL", "2", "5000.25", "2.5")], {"ES": 50})
    value = value_position(book.get("A", "ES"), D("4990.5"))
    assert value.unrealized_pnl == D(975)  # -2 x (4990.5 - 5000.25) x 50
    assert value.total_pnl == D("972.5")
    assert (value.market_value, value.gross_notional) == (D(-499050), D(499050))


def test_the_worked_example_short_after_a_flip():
    # fee 1 per fill: BUY 10@100, BUY 10@110, SELL 15@120, SELL 10@90 -> short 5 @ 90
    book = book_of([("XYZ", "BUY", "10", "100", "1"), ("XYZ", "BUY", "10", "110", "1"),
                    ("XYZ", "SELL", "15", "120", "1"), ("XYZ", "SELL", "10", "90", "1")])
    value = value_position(book.get("A", "XYZ"), D(95))
    assert (value.net_qty, value.avg_open_price) == (D(-5), D(90))
    assert (value.realized_pnl_gross, value.fees, value.realized_pnl_net) == (D(150), D(4), D(146))
    assert (value.fifo_realized_pnl_gross, value.fifo_realized_pnl_net) == (D(150), D(146))
    assert (value.unrealized_pnl, value.fifo_unrealized_pnl) == (D(-25), D(-25))
    assert (value.total_pnl, value.day_pnl) == (D(121), D(121))
    assert (value.market_value, value.gross_notional) == (D(-475), D(475))


def test_fifo_and_average_cost_split_the_same_total_differently():
    book = book_of([("XYZ", "BUY", "10", "100", "0"), ("XYZ", "BUY", "10", "110", "0"),
                    ("XYZ", "SELL", "5", "120", "0")])
    value = value_position(book.get("A", "XYZ"), D(115))
    assert (value.realized_pnl_gross, value.unrealized_pnl) == (D(75), D(150))  # average 105
    assert (value.fifo_realized_pnl_gross, value.fifo_unrealized_pnl) == (D(100), D(125))  # lots 5@100, 10@110
    assert value.total_pnl == D(225)


def test_a_flat_position_is_worth_its_realized_pnl_with_or_without_a_mark():
    book = book_of([("XYZ", "BUY", "3", "10", "1"), ("XYZ", "SELL", "3", "12", "1")])
    for mark in (None, D(50)):
        value = value_position(book.get("A", "XYZ"), mark)
        assert value.avg_open_price is None and value.mark == mark
        assert (value.unrealized_pnl, value.fifo_unrealized_pnl) == (0, 0)
        assert (value.market_value, value.gross_notional) == (0, 0)
        assert (value.realized_pnl_net, value.total_pnl, value.day_pnl) == (D(4), D(4), D(4))


def test_an_open_position_without_a_mark_has_unknown_pnl_and_notional_at_cost():
    book = book_of([("ES", "SELL", "3", "4000.5", "1")], {"ES": 50})
    value = value_position(book.get("A", "ES"), None)
    assert (value.unrealized_pnl, value.fifo_unrealized_pnl, value.total_pnl, value.day_pnl) == (None,) * 4
    assert value.market_value is None and value.mark is None
    assert value.gross_notional == D("600075")  # |-3 x 4000.5| x 50
    assert (value.realized_pnl_net, value.fifo_realized_pnl_net) == (D(-1), D(-1))


def test_day_pnl_after_a_roll_and_unknown_when_the_roll_had_no_mark():
    book = book_of([("XYZ", "BUY", "10", "100", "1"), ("ABC", "BUY", "1", "10", "0")])
    book.roll_day({"XYZ": D(104)})  # XYZ: start of day -1 + 40 = 39; ABC open and unmarked: unknown
    book.apply(Fill(ts=T0 + 9, fill_id="g", account="A", symbol="XYZ", side="SELL", qty=D(4), price=D(106), fee=D(1)))
    xyz = value_position(book.get("A", "XYZ"), D(103))
    assert (xyz.sod_realized_pnl_net, xyz.sod_unrealized_pnl) == (D(-1), D(40))
    assert (xyz.realized_pnl_net, xyz.unrealized_pnl, xyz.total_pnl) == (D(22), D(18), D(40))  # 24 - 2; 6 x 3
    assert xyz.day_pnl == D(1)  # 40 - 39
    abc = value_position(book.get("A", "ABC"), D(11))
    assert abc.sod_unrealized_pnl is None
    assert (abc.total_pnl, abc.day_pnl) == (D(1), None)  # the total is known, the change since the roll is not
    assert value_position(book.get("A", "ABC"), None).day_pnl is None


def test_a_flat_position_rolled_without_a_mark_has_a_known_day():
    book = book_of([("XYZ", "BUY", "1", "10", "0"), ("XYZ", "SELL", "1", "12", "0")])
    book.roll_day({})  # flat: its unrealized P&L is 0, no mark needed
    book.apply(Fill(ts=T0 + 9, fill_id="g", account="A", symbol="XYZ", side="BUY", qty=D(1), price=D(20), fee=D(0)))
    assert value_position(book.get("A", "XYZ"), D(21)).day_pnl == D(1)


def test_ptrc_s_published_update_values_exactly_like_the_position():
    book = book_of([("ES", "BUY", "3", "4000.25", "1.5"), ("ES", "SELL", "1", "4010", "1.5")], {"ES": 50})
    book.roll_day({"ES": D("4005.125")})
    position = book.get("A", "ES")
    for mark in (None, D("3999.75")):
        assert value_position(published(position), mark) == value_position(position, mark)


def test_exact_whatever_the_caller_s_decimal_context():
    book = book_of([("XYZ", "BUY", "1234567.12345678", "98765.4321", "0")])
    with localcontext() as context:
        context.prec = 5
        value = value_position(book.get("A", "XYZ"), D("98765.43210001"))
    assert str(value.unrealized_pnl) == "0.0123456712345678"  # 1234567.12345678 x 0.00000001
    assert value.market_value == D("1234567.12345678") * D("98765.43210001")


def test_the_parts_for_stored_figures():
    assert market_value_of(D(0), None, D(50)) == 0 and market_value_of(D(-2), None, D(50)) is None
    assert market_value_of(D(-2), D("10.5"), D(50)) == D(-1050)
    assert total_pnl_of(D(3), None) is None and total_pnl_of(D(3), D(-1)) == D(2)
    assert day_pnl_of(D(5), None) is None and day_pnl_of(None, D(1)) is None and day_pnl_of(D(5), D(2)) == D(3)
    assert sum_known([D(1), D("0.5")]) == D("1.5") and sum_known([D(1), None]) is None and sum_known([]) == 0


# -- accounts ---------------------------------------------------------------------------------


def test_account_sums_are_unknown_while_an_open_position_is_unmarked():
    book = book_of([("XYZ", "BUY", "10", "100", "1"), ("ES", "SELL", "1", "4000", "2"),
                    ("FLT", "BUY", "1", "5", "0"), ("FLT", "SELL", "1", "7", "0")], {"ES": 50})
    marks = {"XYZ": D(101)}  # ES open without a mark, FLT flat without one
    totals = account_value("A", [value_position(p, marks.get(p.symbol)) for p in book])
    assert (totals.account, totals.positions, totals.open_positions) == ("A", 3, 2)
    assert (totals.realized_pnl_gross, totals.fees, totals.realized_pnl_net) == (D(2), D(3), D(-1))
    assert (totals.unrealized_pnl, totals.fifo_unrealized_pnl, totals.total_pnl, totals.day_pnl) == (None,) * 4
    assert totals.gross_notional == D(1010) + D(200000)  # XYZ at the mark, ES at cost, FLT 0
    marks["ES"] = D(3990)
    totals = account_value("A", [value_position(p, marks.get(p.symbol)) for p in book])
    assert (totals.unrealized_pnl, totals.total_pnl, totals.day_pnl) == (D(510), D(509), D(509))  # 10 + 500
    assert totals == account_value("A", reversed([value_position(p, marks.get(p.symbol)) for p in book]))


def test_running_sums_follow_replacements_exactly():
    book = book_of([("XYZ", "BUY", "3", "10.1", "0.01"), ("ABC", "SELL", "7", "3.3", "0.02")])
    xyz, abc = book.get("A", "XYZ"), book.get("A", "ABC")
    sums = AccountSums()
    old_xyz, old_abc = value_position(xyz, None), value_position(abc, D("3.1"))
    sums.add(old_xyz)
    sums.add(old_abc)
    assert sums.value("A").unrealized_pnl is None
    new_xyz = value_position(xyz, D("10.7"))
    sums.remove(old_xyz)
    sums.add(new_xyz)
    assert sums.value("A") == account_value("A", [new_xyz, old_abc])
    sums.remove(old_abc)
    assert sums.value("A") == account_value("A", [new_xyz])


# -- the property: one valuation, the same numbers as the position's own methods ---------------

SYMBOLS = ("XYZ", "ES", "ZZZ")
prices = st.integers(min_value=1, max_value=50_000).map(lambda n: D(n) / 100)
quantities = st.integers(min_value=1, max_value=5_000).map(lambda n: D(n) / 10)
fees = st.integers(min_value=-5, max_value=20).map(lambda n: D(n) / 4)
steps = st.lists(
    st.one_of(
        st.tuples(st.just("fill"), st.sampled_from(SYMBOLS), st.sampled_from(["BUY", "SELL"]), quantities, prices, fees),
        st.tuples(st.just("roll"), st.dictionaries(st.sampled_from(SYMBOLS), prices)),
    ),
    min_size=1,
    max_size=40,
)


def same(a: Decimal | None, b: Decimal | None) -> bool:
    """Equal, and spelled the same when they leave the core (to the last digit)."""
    return a == b and format_decimal(a) == format_decimal(b)


@settings(max_examples=200, deadline=None)
@given(steps=steps, marks=st.dictionaries(st.sampled_from(SYMBOLS), prices),
       multiplier=st.sampled_from([D(1), D(50), D("0.1")]))
def test_value_position_is_what_the_position_says(steps, marks, multiplier):
    book = PositionBook({"ES": multiplier})
    for i, step in enumerate(steps):
        if step[0] == "roll":
            book.roll_day(step[1])
        else:
            _, symbol, side, qty, price, fee = step
            book.apply(Fill(ts=T0 + i, fill_id=f"f{i}", account="A", symbol=symbol, side=side, qty=qty, price=price,
                            fee=fee))
    for symbol, price in marks.items():
        book.set_mark(symbol, price)
    values = []
    for position in book:
        mark = marks.get(position.symbol)
        value = value_position(position, mark)
        values.append(value)
        assert (value.account, value.symbol, value.multiplier, value.mark) == (
            position.account, position.symbol, position.multiplier, mark)
        assert same(value.net_qty, position.net_qty) and same(value.avg_open_price, position.avg_open_price)
        assert same(value.realized_pnl_gross, position.realized_pnl_gross) and same(value.fees, position.fees)
        assert same(value.realized_pnl_net, position.realized_pnl_net)
        assert same(value.fifo_realized_pnl_gross, position.fifo_realized_pnl_gross)
        assert same(value.fifo_realized_pnl_net, position.fifo_realized_pnl_net)
        assert same(value.unrealized_pnl, position.unrealized_pnl(mark))
        assert same(value.fifo_unrealized_pnl, position.fifo_unrealized_pnl(mark))
        assert same(value.total_pnl, position.total_pnl(mark))
        assert same(value.day_pnl, position.day_pnl(mark))
        assert same(value.gross_notional, position.notional(mark))
        assert same(value.sod_realized_pnl_net, position.sod_realized_pnl_net)
        assert same(value.sod_unrealized_pnl, position.sod_unrealized_pnl)
        assert value.fill_count == position.fill_count
        if mark is not None:
            assert same(value.market_value, position.net_qty * mark * position.multiplier)
            # Both methods split the same total: realized + unrealized is the cash flow.
            assert value.realized_pnl_gross + value.unrealized_pnl == value.fifo_realized_pnl_gross + value.fifo_unrealized_pnl
        assert value_position(published(position), mark) == value
    if values:
        totals = book.account_totals("A")
        mine = account_value("A", values)
        for name in type(totals).__struct_fields__:
            assert getattr(mine, name) == getattr(totals, name), name
