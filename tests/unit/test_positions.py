"""The position and P&L core: worked examples pinned exactly, then properties."""

from __future__ import annotations

from collections import deque
from decimal import Decimal as D
from decimal import getcontext
from fractions import Fraction
from types import SimpleNamespace
from fractions import Fraction as F

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from posttrade.core.exact import (
    divide,
    divide_at,
    divide_rounded,
    divide_rounded_noting,
    format_decimal,
    parse_decimal,
    round_quotient,
)
from posttrade.core.positions import (
    ROW_FIELDS,
    Position,
    PositionBook,
    PositionState,
    decode_position,
    encode_position,
    position_row,
)
from posttrade.streams.events import Fill

T0 = 1_700_000_000_000_000_000
_seq = 0


def fill(side, qty, price, fee="0", account="ACC", symbol="XYZ", ts=None, fill_id=None):
    global _seq
    _seq += 1
    return Fill(
        ts=T0 + _seq if ts is None else ts,
        fill_id=fill_id or f"f{_seq}",
        account=account,
        symbol=symbol,
        side=side,
        qty=D(str(qty)),
        price=D(str(price)),
        fee=D(str(fee)),
    )


def run(*fills, multipliers=None, marks=None):
    book = PositionBook(multipliers=multipliers, marks=marks)
    for f in fills:
        book.apply(f)
    return book


def same(value, expected):
    """Equal in value *and* in canonical text (guards against 0.30000000001 style drift)."""
    assert value == D(expected), (value, expected)


# -- the worked example from the issue ------------------------------------------------


class TestWorkedExample:
    """Fee 1 per fill, mark 95: BUY 10@100, BUY 10@110, SELL 15@120, SELL 10@90."""

    def steps(self):
        book = PositionBook(marks={"XYZ": "95"})
        fills = [
            fill("BUY", 10, 100, 1),
            fill("BUY", 10, 110, 1),
            fill("SELL", 15, 120, 1),
            fill("SELL", 10, 90, 1),
        ]
        return book, [book.apply(f).copy() for f in fills]

    def test_average_cost_step_by_step(self):
        _, (p1, p2, p3, p4) = self.steps()
        same(p1.net_qty, "10")
        same(p1.avg_open_price, "100")
        same(p2.net_qty, "20")
        same(p2.avg_open_price, "105")  # long 20 @ 105
        same(p2.realized_pnl_gross, "0")
        same(p3.net_qty, "5")
        same(p3.realized_pnl_gross, "225")  # 15 x (120 - 105)
        same(p3.avg_open_price, "105")  # 5 @ 105 left, average unchanged
        # The last fill closes 5 (-75) and opens a short of 5 @ 90.
        same(p4.realized_pnl_gross - p3.realized_pnl_gross, "-75")
        same(p4.net_qty, "-5")
        same(p4.avg_open_price, "90")

    def test_average_cost_final(self):
        book, _ = self.steps()
        p = book.get("ACC", "XYZ")
        same(p.realized_pnl_gross, "150")
        same(p.fees, "4")  # every fill's fee, opening fills and the flip included, once
        same(p.realized_pnl_net, "146")
        same(p.unrealized_pnl(D(95)), "-25")  # -5 x (95 - 90)

    def test_fifo(self):
        book, (p1, p2, p3, p4) = self.steps()
        same(p3.fifo_realized_pnl_gross, "250")  # 10 x (120-100) + 5 x (120-110)
        assert p3.fifo_lots == [(D(5), D(110), p2.last_ts)]
        same(p4.fifo_realized_pnl_gross - p3.fifo_realized_pnl_gross, "-100")  # 5 x (90-110)
        same(p4.fifo_realized_pnl_gross, "150")
        assert p4.fifo_lots == [(D(5), D(90), p4.last_ts)]
        same(p4.fifo_unrealized_pnl(D(95)), "-25")
        same(p4.fifo_realized_pnl_net, "146")

    def test_row(self):
        book, _ = self.steps()
        assert book.rows() == [
            {
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
                # A book without reference data: USD, converted at 1 into the USD base.
                "currency": "USD",
                "base_currency": "USD",
                "fx_rate": "1",
                "fx_legs": [{"from": "USD", "to": "USD", "rate": "1", "source": "identity", "instrument": None,
                             "inverse": False, "ts": None}],
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
        ]
        assert tuple(book.rows()[0]) == ROW_FIELDS

    def test_bookkeeping(self):
        book, _ = self.steps()
        p = book.get("ACC", "XYZ")
        assert p.fill_count == 4
        assert p.last_ts == T0 + _seq
        assert p.last_fill_id == f"f{_seq}"


# -- average cost and FIFO, case by case ------------------------------------------------


def test_flip_short_to_long():
    b = run(fill("SELL", 10, 50, "0.5"), fill("BUY", 4, 45), fill("BUY", 16, 40, "0.5"))
    p = b.get("ACC", "XYZ")
    # cover 4: 4 x (50 - 45) = 20; flip: cover 6 at 40 = 60, then long 10 @ 40
    same(p.realized_pnl_gross, "80")
    same(p.net_qty, "10")
    same(p.avg_open_price, "40")
    same(p.fees, "1")
    same(p.realized_pnl_net, "79")
    same(p.fifo_realized_pnl_gross, "80")
    assert [(q, px) for q, px, _ in p.fifo_lots] == [(D(10), D(40))]
    same(p.unrealized_pnl(D(41)), "10")


def test_flip_long_to_short_exactly_at_size_goes_flat_first():
    b = run(fill("BUY", 3, 10), fill("SELL", 3, 12))
    p = b.get("ACC", "XYZ")
    same(p.net_qty, "0")
    assert p.avg_open_price is None and p.is_flat
    assert p.fifo_lots == []
    same(p.realized_pnl_gross, "6")
    same(p.open_cost, "0")


def test_partial_close_keeps_average():
    b = run(fill("BUY", 100, "20.50"), fill("BUY", 100, "21.50"), fill("SELL", 50, 22))
    p = b.get("ACC", "XYZ")
    same(p.avg_open_price, "21")
    same(p.net_qty, "150")
    same(p.realized_pnl_gross, "50")  # 50 x (22 - 21)
    same(p.fifo_realized_pnl_gross, "75")  # 50 x (22 - 20.50)
    same(p.unrealized_pnl(D(22)), "150")  # 150 x (22 - 21)
    same(p.fifo_unrealized_pnl(D(22)), "125")  # 50 x 1.5 + 100 x 0.5
    # lots 50 @ 20.50 + 100 @ 21.50: 3175 / 150 does not terminate
    assert format_decimal(p.fifo_avg_open_price) == "21.166666666667"


def test_short_cover_partial_and_full():
    b = run(fill("SELL", 10, 100), fill("SELL", 10, 90), fill("BUY", 5, 80))
    p = b.get("ACC", "XYZ")
    same(p.avg_open_price, "95")
    same(p.realized_pnl_gross, "75")  # 5 x (95 - 80)
    same(p.fifo_realized_pnl_gross, "100")  # 5 x (100 - 80)
    same(p.unrealized_pnl(D(85)), "150")  # -15 x (85 - 95)
    b.apply(fill("BUY", 15, 100))
    same(p.net_qty, "0")
    same(p.realized_pnl_gross, "0")  # 75 + 15 x (95 - 100)
    same(p.fifo_realized_pnl_gross, "0")  # 100 + 5 x 0 + 10 x (90 - 100)


def test_fifo_consumes_oldest_lots_across_several():
    b = run(fill("BUY", 1, 10), fill("BUY", 2, 11), fill("BUY", 3, 12), fill("SELL", 4, 15))
    p = b.get("ACC", "XYZ")
    # 1 x 5 + 2 x 4 + 1 x 3 = 16
    same(p.fifo_realized_pnl_gross, "16")
    assert [(q, px) for q, px, _ in p.fifo_lots] == [(D(2), D(12))]
    same(p.fifo_open_cost, "24")


def test_rebates_are_negative_fees():
    b = run(fill("BUY", 10, 100, "-0.25"), fill("SELL", 10, 101, "1.10"))
    p = b.get("ACC", "XYZ")
    same(p.fees, "0.85")
    same(p.realized_pnl_gross, "10")
    same(p.realized_pnl_net, "9.15")


def test_multiplier_applies_to_pnl_not_fees():
    b = run(
        fill("BUY", 2, "4500.25", "2.5", symbol="ES"),
        fill("SELL", 1, "4510.5", "2.5", symbol="ES"),
        multipliers={"ES": "50"},
    )
    p = b.get("ACC", "ES")
    same(p.multiplier, "50")
    same(p.realized_pnl_gross, "512.5")  # 1 x 10.25 x 50
    same(p.fifo_realized_pnl_gross, "512.5")
    same(p.fees, "5")
    same(p.realized_pnl_net, "507.5")
    same(p.unrealized_pnl(D("4490")), "-512.5")  # 1 x (4490 - 4500.25) x 50
    same(p.notional(D("4490")), "224500")
    row = position_row(p, D("4490"))
    assert row["realized_pnl_gross"] == "512.5" and row["unrealized_pnl"] == "-512.5"


def test_flat_and_reopen_starts_a_new_average():
    b = run(fill("BUY", 5, 100), fill("SELL", 5, 110), fill("BUY", 5, 50))
    p = b.get("ACC", "XYZ")
    same(p.avg_open_price, "50")
    same(p.realized_pnl_gross, "50")
    assert [(q, px) for q, px, _ in p.fifo_lots] == [(D(5), D(50))]


def test_exact_decimals_no_binary_drift():
    b = run(fill("BUY", "0.1", "0.1"), fill("BUY", "0.2", "0.2"), fill("SELL", "0.3", "0.3"))
    p = b.get("ACC", "XYZ")
    same(p.net_qty, "0")
    same(p.realized_pnl_gross, "0.04")  # 0.09 - 0.01 - 0.04
    assert format_decimal(p.realized_pnl_gross) == "0.04"
    b2 = run(fill("BUY", 3, "0.1"), fill("BUY", 3, "0.2"))
    p2 = b2.get("ACC", "XYZ")
    assert format_decimal(p2.avg_open_price) == "0.15"


def test_big_numbers_do_not_round_at_28_digits():
    # Python's default context would round these products to 28 significant digits.
    qty = D("123456789.12345678")
    price = D("98765.43210987")
    b = run(fill("BUY", qty, price), fill("SELL", qty, price + D("0.00000001")))
    p = b.get("ACC", "XYZ")
    same(p.realized_pnl_gross, "1.2345678912345678")
    assert getcontext().prec == 28  # the caller's context is left as it was


def test_average_that_does_not_terminate():
    b = run(fill("BUY", 1, 100), fill("BUY", 2, 101), marks={"XYZ": "101"})
    p = b.get("ACC", "XYZ")
    assert format_decimal(p.avg_open_price) == "100.666666666667"
    same(p.unrealized_pnl(D(101)), "1")  # exact: computed from cost, not the shown average
    b.apply(fill("SELL", 1, 101))
    # 1 x (101 - 100.666...) = 0.333... -> the closed cost 100.666... is rounded at 1e-12
    same(p.realized_pnl_gross, "0.333333333333")
    same(p.unrealized_pnl(D(101)), "0.666666666667")
    same(p.realized_pnl_gross + p.unrealized_pnl(D(101)), "1")  # nothing lost
    same(p.open_cost, "201.333333333333")  # the rounding difference stays in the cost
    same(p.open_cost / p.net_qty, "100.6666666666665")  # which alone would show ...666
    same(p.avg_open_price, "100.666666666667")  # but a reduce leaves the average unchanged
    assert decode_position(encode_position(p)) == p and decode_position(encode_position(p)).avg_open_price == p.avg_open_price
    b.apply(fill("BUY", 1, 101))  # an add: the weighted average of the cost again
    same(p.open_cost, "302.333333333333")
    same(p.avg_open_price, "100.777777777778")
    assert p.avg_open_price_held is None
    b.apply(fill("SELL", 3, 101))  # full close: exact, takes the rest of the cost
    same(p.realized_pnl_gross, "1")
    same(p.fifo_realized_pnl_gross, "1")
    assert p.avg_open_price is None


def test_a_reduce_leaves_the_average_unchanged_even_when_little_is_left():
    # Found by hypothesis: the cost left after a rounded partial close, divided by a
    # small remaining quantity, moved the average in the 11th place.
    b = run(fill("BUY", "0.01", 1, fee=0), fill("SELL", "0.02", 1, fee=0), fill("SELL", "2.790", "0.1", fee=0))
    p = b.get("ACC", "XYZ")
    same(p.avg_open_price, "0.103214285714")  # 0.289 / 2.8
    b.apply(fill("BUY", "2.75", 1, fee=0))
    assert p.net_qty == D("-0.05")
    same(p.avg_open_price, "0.103214285714")  # cost / qty left would be 0.10321428572


def test_unrealized_and_marks():
    p = Position("A", "S")
    assert p.unrealized_pnl(None) == 0  # flat: zero whatever the mark
    p.apply(fill("BUY", 1, 10))
    assert p.unrealized_pnl(None) is None
    assert p.total_pnl(None) is None
    assert position_row(p, None)["unrealized_pnl"] is None
    flat = Position("A", "T")
    row = position_row(flat, None)
    assert row["mark"] is None and row["unrealized_pnl"] is None  # the CLI rule
    assert row["avg_open_price"] is None


def test_row_methods():
    b = run(fill("BUY", 1, 10), fill("BUY", 1, 20), fill("SELL", 1, 30), marks={"XYZ": "25"})
    p = b.get("ACC", "XYZ")
    both, avg, fifo = (position_row(p, D(25), m) for m in ("both", "avg", "fifo"))
    assert both["realized_pnl_gross"] == "15" and both["avg_open_price"] == "15"
    assert both["fifo_realized_pnl_gross"] == "20" and both["fifo_unrealized_pnl"] == "5"
    assert avg == {**both, "fifo_realized_pnl_gross": None, "fifo_unrealized_pnl": None}
    assert fifo["avg_open_price"] == "20" and fifo["realized_pnl_gross"] == "20"
    assert fifo["realized_pnl_net"] == "20" and fifo["unrealized_pnl"] == "5"
    assert fifo["fifo_realized_pnl_gross"] == "20" and fifo["fifo_unrealized_pnl"] == "5"


def test_invalid_fill_changes_nothing():
    p = Position("A", "S")
    p.apply(fill("BUY", 1, 10))
    before = p.copy()

    class Bad:
        ts, fill_id, account, symbol, fee = T0, "x", "A", "S", D(0)

    for side, qty, price, fee in [
        ("BUY", D(0), D(1), D(0)),
        ("BUY", D(-1), D(1), D(0)),
        ("SELL", D(1), D(0), D(0)),
        ("SELL", D(1), D(1), D("NaN")),
        ("HOLD", D(1), D(1), D(0)),
    ]:
        bad = Bad()
        bad.side, bad.qty, bad.price, bad.fee = side, qty, price, fee
        with pytest.raises((ValueError, ArithmeticError)):
            p.apply(bad)
    assert p == before


def test_invalid_fill_leaves_no_empty_position_in_the_book():
    b = PositionBook()
    # not a validated Fill: what a buggy caller might pass
    bad = SimpleNamespace(ts=T0, fill_id="x", account="A", symbol="S", side="BUY", qty=D(0), price=D(1), fee=D(0))
    with pytest.raises(ValueError):
        b.apply(bad)
    with pytest.raises(ValueError):
        b.apply_many([fill("BUY", 1, 1, account="B"), bad])
    assert [(p.account, p.symbol) for p in b.positions()] == [("B", "XYZ")]


# -- day P&L and totals ------------------------------------------------------------------------


def test_day_pnl_against_start_of_day():
    b = run(fill("BUY", 10, 100, 1), fill("SELL", 5, 104, 1), marks={"XYZ": "102"})
    p = b.get("ACC", "XYZ")
    same(p.day_pnl(D(102)), "28")  # nothing rolled yet: all of it is today's (20 - 2 + 10)
    b.roll_day()  # start of day at mark 102: realized net 18, unrealized 5 x 2 = 10
    same(p.sod_unrealized_pnl, "10")
    same(p.sod_mark, "102")
    same(p.day_pnl(D(102)), "0")
    b.set_mark("XYZ", "101")
    same(p.day_pnl(D(101)), "-5")  # 5 x (101 - 102)
    b.apply(fill("SELL", 5, 103, "0.5"))  # realizes 5 x 3 = 15, pays 0.5
    # now: realized net 18 + 15 - 0.5 = 32.5, flat; start: 28 -> day 4.5
    same(p.day_pnl(D(101)), "4.5")
    same(p.day_realized_pnl_net, "14.5")
    same(b.account_totals("ACC").day_pnl, "4.5")


def test_day_pnl_unknown_without_a_start_of_day_mark():
    b = run(fill("BUY", 1, 10))
    b.roll_day()  # open position and no mark: start-of-day value unknown
    p = b.get("ACC", "XYZ")
    assert p.sod_unrealized_pnl is None
    assert p.day_pnl(D(11)) is None
    b.set_mark("XYZ", 11)
    b.roll_day()
    same(p.day_pnl(D(12)), "1")


def test_account_totals():
    b = run(
        fill("BUY", 10, 100, 1, symbol="A"),
        fill("SELL", 4, 110, 1, symbol="A"),
        fill("SELL", 2, 50, "0.5", symbol="ES"),
        fill("BUY", 1, 10, symbol="Z", account="OTHER"),
        multipliers={"ES": 50},
        marks={"A": "105", "ES": "49"},
    )
    t = b.account_totals("ACC")
    assert t.positions == 2 and t.open_positions == 2
    same(t.realized_pnl_gross, "40")
    same(t.fees, "2.5")
    same(t.realized_pnl_net, "37.5")
    same(t.unrealized_pnl, "130")  # 6 x 5 + (-2) x (49 - 50) x 50
    same(t.fifo_unrealized_pnl, "130")
    same(t.total_pnl, "167.5")
    same(t.day_pnl, "167.5")
    same(t.gross_notional, "5530")  # 6 x 105 + 2 x 49 x 50
    same(b.account_totals("ACC").gross_notional, "5530")
    other = b.account_totals("OTHER")
    assert other.unrealized_pnl is None and other.total_pnl is None  # Z has no mark
    same(other.gross_notional, "10")  # valued at cost without a mark
    assert [t.account for t in b.totals()] == ["ACC", "OTHER"]


# -- the book ---------------------------------------------------------------------------------


def test_book_routing_sorting_and_filters():
    b = run(
        fill("BUY", 1, 1, account="B", symbol="Y"),
        fill("BUY", 1, 1, account="A", symbol="Z"),
        fill("BUY", 1, 1, account="A", symbol="Y"),
    )
    assert [(p.account, p.symbol) for p in b.positions()] == [("A", "Y"), ("A", "Z"), ("B", "Y")]
    assert [p.account for p in b.positions(symbol="Y")] == ["A", "B"]
    assert [p.symbol for p in b.positions(account="A")] == ["Y", "Z"]
    assert b.positions(account="nobody") == []
    assert len(b) == 3 and b.accounts() == ["A", "B"]
    assert b.get("A", "nothing") is None
    f = fill("SELL", 1, 2, account="B", symbol="Y")
    assert b.apply(f) is b.get("B", "Y")


def test_book_apply_many_equals_apply():
    fills = [fill("BUY", 3, 10), fill("SELL", 1, 12), fill("SELL", 5, 9, 1), fill("BUY", 2, 8)]
    one = run(*fills)
    fills.append(fill("BUY", 1, 1, symbol="OTHER"))
    one.apply(fills[-1])
    many = PositionBook()
    touched = many.apply_many(fills)
    assert one.positions() == many.positions()
    assert [p.symbol for p in touched] == ["XYZ", "OTHER"]  # each once, first-touch order
    assert touched[0] is many.get("ACC", "XYZ")


def test_book_multipliers_and_marks_validation():
    b = PositionBook(multipliers={"ES": "50"})
    b.apply(fill("BUY", 1, 10, symbol="ES"))
    with pytest.raises(ValueError):
        b.set_multiplier("ES", "20")  # open position
    b.apply(fill("SELL", 1, 10, symbol="ES"))
    b.set_multiplier("ES", "20")
    assert b.get("ACC", "ES").multiplier == 20
    for bad in ("0", "-1", "abc", "NaN", 1.5, None):
        with pytest.raises(ValueError):
            b.set_mark("ES", bad)
        with pytest.raises(ValueError):
            PositionBook(multipliers={"X": bad})
    b.set_mark("ES", "4500.25")
    assert b.mark("ES") == D("4500.25")


# -- serialization ---------------------------------------------------------------------------


def test_serialization_round_trip_is_exact():
    b = run(
        fill("BUY", 1, 100),
        fill("BUY", 2, "101.000"),
        fill("SELL", 1, 101, "-0.001"),
        multipliers={"XYZ": "0.5"},
        marks={"XYZ": "1E+2"},
    )
    b.roll_day()
    p = b.get("ACC", "XYZ")
    raw = encode_position(p)
    assert b'"open_cost":"' in raw  # decimals travel as strings
    back = decode_position(raw)
    assert back == p
    assert repr(back.open_cost) == repr(p.open_cost)  # same digits, same exponent
    assert back.fifo_lots == p.fifo_lots
    assert Position.from_dict(p.to_dict()) == p
    assert Position.from_state(msgspec.msgpack.decode(msgspec.msgpack.encode(p.to_state()), type=PositionState)) == p
    # snapshots and copies are independent of the live position
    snapshot = p.to_state()
    copy = p.copy()
    p.apply(fill("SELL", 1, 1))
    assert copy != p and Position.from_state(snapshot) == copy
    assert snapshot.fifo_lots is not p.fifo_lots
    restored = PositionBook().restore(snapshot)
    assert restored == copy


def test_from_dict_rejects_bad_data():
    with pytest.raises(msgspec.ValidationError):
        Position.from_dict({"account": "A", "symbol": "S", "net_qty": "x"})


# -- exact arithmetic helpers -----------------------------------------------------------------


@pytest.mark.parametrize(
    "value, text",
    [
        (D("225.00"), "225"),
        (D("0.10"), "0.1"),
        (D("1E+2"), "100"),
        (D("-0"), "0"),
        (D("0E-12"), "0"),
        (D("-1.500"), "-1.5"),
        (D("1.23E-15"), "0.00000000000000123"),
        (D("12345678901234567890123456789012.5"), "12345678901234567890123456789012.5"),
        (None, None),
    ],
)
def test_format_decimal(value, text):
    assert format_decimal(value) == text


def test_divide_rounded_keeps_at_most_12_places_in_natural_form():
    assert repr(divide_rounded(D(2100) * 15, D(20))) == "Decimal('1575')"
    assert divide_rounded(D(1), D(8)) == D("0.125")
    assert divide_rounded(D(1), D(2**40)) == D("0.000000000001")  # 9.09e-13 rounds up
    assert divide_rounded(D(1), D(3)) == D("0.333333333333")
    assert divide_rounded(D("0.0000000000005"), D(1)) == 0  # a tie: to even (0)
    assert divide_rounded(D("0.0000000000015"), D(1)) == D("0.000000000002")
    big = D(2) * D(10) ** 60
    assert divide_rounded(big, D(3)) == round_quotient(big, D(3), 12)
    # ... and says whether it rounded (what a partial close needs to know).
    assert divide_rounded_noting(D(1), D(8)) == (D("0.125"), False)
    assert divide_rounded_noting(D(1), D(3)) == (D("0.333333333333"), True)
    assert divide_rounded_noting(D(0), D(3)) == (D(0), False)


def test_divide_exact_when_terminating_else_rounded_half_even():
    assert divide(D(2100) * 15, D(20)) == D(1575)
    assert divide(D(1), D(8)) == D("0.125")
    assert divide(D(1), D(2**40)) == D(1) / D(2**40)  # 40 digits, exact
    assert divide(D(1), D(3)) == D("0.333333333333")
    assert divide(D(-2), D(3)) == D("-0.666666666667")
    assert divide(D(2), D(-3)) == D("-0.666666666667")
    big = D(2) * D(10) ** 60
    assert divide(big, D(3)) == round_quotient(big, D(3), 12)


@settings(max_examples=300, deadline=None)
@given(
    st.integers(-(10**30), 10**30),
    st.integers(0, 20),
    st.integers(1, 10**12).filter(bool),
    st.integers(0, 12),
    st.booleans(),
)
def test_divide_is_correctly_rounded(n, n_scale, d, d_scale, negative):
    num = D(n).scaleb(-n_scale)
    den = D(-d if negative else d).scaleb(-d_scale)
    exact = Fraction(num) / Fraction(den)
    nearest = Fraction(round(exact * 10**12), 10**12)  # round() on a Fraction: half-even
    # divide_rounded: at most 12 places, the correctly rounded value
    got = divide_rounded(num, den)
    assert Fraction(got) == nearest  # so its value has at most 12 decimal places
    # divide: exact when it terminates (within 64 digits), else the same rounding
    got = divide(num, den)
    assert Fraction(got) in (exact, nearest)
    if Fraction(got) != exact:
        assert nearest != exact
    assert Fraction(round_quotient(num, den, 12)) == nearest


def test_parse_decimal():
    assert parse_decimal("x", "1.50") == D("1.50")
    assert parse_decimal("x", 7) == 7
    for bad in (1.5, True, None, "1e", "Infinity"):
        with pytest.raises(ValueError):
            parse_decimal("x", bad)


# -- properties ---------------------------------------------------------------------------------

quantities = st.builds(lambda n, s: D(n).scaleb(-s), st.integers(1, 5000), st.integers(0, 3))
prices = st.builds(lambda n, s: D(n).scaleb(-s), st.integers(1, 10**6), st.integers(0, 4))
fees = st.builds(lambda n: D(n).scaleb(-2), st.integers(-100, 500))
fill_specs = st.lists(
    st.tuples(st.sampled_from(["BUY", "SELL"]), quantities, prices, fees), min_size=1, max_size=40
)
multipliers = st.sampled_from([D(1), D(50), D("0.1"), D("1000")])


def apply_specs(specs, multiplier):
    book = PositionBook(multipliers={"S": multiplier})
    for i, (side, qty, price, fee) in enumerate(specs):
        book.apply(
            Fill(ts=T0 + i, fill_id=f"p{i}", account="A", symbol="S", side=side, qty=qty, price=price, fee=fee)
        )
    return book.get("A", "S")


def reference(specs, multiplier):
    """An independent, literal model of the issue's rules, in exact rationals."""
    m = Fraction(multiplier)
    net = Fraction(0)
    avg = None
    realized = Fraction(0)
    lots: deque = deque()  # [qty, price], side of the position
    fifo_realized = Fraction(0)
    for side, qty, price, _ in specs:
        q, p = Fraction(qty), Fraction(price)
        sign = 1 if side == "BUY" else -1
        if net == 0 or (net > 0) == (sign > 0):
            avg = p if net == 0 else (abs(net) * avg + q * p) / (abs(net) + q)
            net += sign * q
            lots.append([q, p])
            continue
        closed = min(q, abs(net))
        direction = 1 if net > 0 else -1
        realized += closed * (p - avg) * m * direction
        left = closed
        while left:
            lot = lots[0]
            take = min(left, lot[0])
            fifo_realized += take * (p - lot[1]) * m * direction
            lot[0] -= take
            left -= take
            if not lot[0]:
                lots.popleft()
        rest = q - closed
        net += sign * closed
        if rest:
            net = sign * rest
            avg = p
            lots.append([rest, p])
        elif net == 0:
            avg = None
    return net, avg, realized, fifo_realized, lots


def cash_flow_pnl(specs, multiplier, mark):
    """-sum(signed qty x price x mult) + net_qty x mark x mult, in exact rationals."""
    flow = -sum((F(q) if s == "BUY" else -F(q)) * F(p) for s, q, p, _ in specs)
    net = sum(F(q) if s == "BUY" else -F(q) for s, q, _, _ in specs)
    return (flow + net * F(mark)) * F(multiplier)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fill_specs, multipliers, prices)
def test_property_realized_plus_unrealized_is_the_same_under_both_methods(specs, mult, mark):
    p = apply_specs(specs, mult)
    avg_total = F(p.realized_pnl_gross) + F(p.unrealized_pnl(mark))
    fifo_total = F(p.fifo_realized_pnl_gross) + F(p.fifo_unrealized_pnl(mark))
    assert avg_total == fifo_total  # exactly, not approximately
    assert avg_total == cash_flow_pnl(specs, mult, mark)  # = the cash-flow P&L, exactly
    assert F(p.total_pnl(mark)) == avg_total - F(p.fees)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fill_specs, multipliers)
def test_property_state_invariants(specs, mult):
    p = apply_specs(specs, mult)
    assert F(p.net_qty) == sum(F(q) if s == "BUY" else -F(q) for s, q, _, _ in specs)
    assert F(p.fees) == sum(F(f) for *_, f in specs)
    assert F(p.realized_pnl_net) == F(p.realized_pnl_gross) - F(p.fees)
    assert p.fill_count == len(specs)
    lots_qty = sum(q for q, _, _ in p.fifo_lots)
    assert lots_qty == abs(p.net_qty)
    assert all(q > 0 for q, _, _ in p.fifo_lots)
    sign = 1 if p.net_qty > 0 else -1
    assert F(p.fifo_open_cost) == sign * sum(F(q) * F(px) for q, px, _ in p.fifo_lots)
    if p.is_flat:
        assert p.open_cost == 0 and p.avg_open_price is None and p.fifo_lots == []


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fill_specs, multipliers)
def test_property_matches_a_literal_rational_model(specs, mult):
    p = apply_specs(specs, mult)
    net, avg, realized, fifo_realized, lots = reference(specs, mult)
    assert Fraction(p.net_qty) == net
    # FIFO never divides: exact.
    assert Fraction(p.fifo_realized_pnl_gross) == fifo_realized
    assert [(Fraction(q), Fraction(px)) for q, px, _ in p.fifo_lots] == [tuple(l) for l in lots]
    # Average cost: exact unless a partial close met an average that does not
    # terminate; then off by at most half of 1e-12 (x multiplier) per partial close.
    partials = len(specs)
    tolerance = Fraction(partials, 2 * 10**12) * Fraction(mult)
    assert abs(Fraction(p.realized_pnl_gross) - realized) <= tolerance
    if avg is None:
        assert p.avg_open_price is None
    else:
        # Shown rounded (0.5e-12), from a cost that earlier partial closes may have left
        # off by 0.5e-12 each, over the size when the average was last set (an open or
        # add; a reduce leaves it unchanged), which is at least the size now.
        left_in_cost = Fraction(partials, 2 * 10**12)
        assert abs(Fraction(p.avg_open_price) - avg) <= Fraction(1, 2 * 10**12) + left_in_cost / abs(net)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fill_specs, st.integers(0, 40), multipliers, prices, prices)
def test_property_day_pnl_is_the_change_in_total_pnl(specs, cut, mult, sod_mark, mark):
    cut = min(cut, len(specs))
    p = apply_specs(specs[:cut], mult) if cut else Position("A", "S", mult)
    p.roll_day(sod_mark)
    start = p.total_pnl(sod_mark)
    for i, (side, qty, price, fee) in enumerate(specs[cut:]):
        p.apply(Fill(ts=T0 + 1000 + i, fill_id=f"d{i}", account="A", symbol="S", side=side, qty=qty, price=price, fee=fee))
    assert F(p.day_pnl(mark)) == F(p.total_pnl(mark)) - F(start)
    today = specs[cut:]
    # = today's trading at today's prices, less today's fees, plus the value change of
    # the position held at the start of day
    held = sum(F(q) if s == "BUY" else -F(q) for s, q, _, _ in specs[:cut])
    expected = (
        cash_flow_pnl(today, mult, mark)
        - sum(F(f) for *_, f in today)
        + held * (F(mark) - F(sod_mark)) * F(mult)
    )
    assert F(p.day_pnl(mark)) == expected


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fill_specs, multipliers)
def test_property_serialization_round_trip(specs, mult):
    p = apply_specs(specs, mult)
    p.roll_day(D("12.5"))
    back = decode_position(encode_position(p))
    assert back == p
    assert [tuple(map(repr, lot)) for lot in back.fifo_lots] == [tuple(map(repr, lot)) for lot in p.fifo_lots]


@settings(deadline=None, max_examples=300)
@given(
    numerator=st.decimals(allow_nan=False, allow_infinity=False, min_value=D("-1E+60"), max_value=D("1E+60")),
    denominator=st.decimals(allow_nan=False, allow_infinity=False, min_value=D("1E-30"), max_value=D("1E+40")),
    scale=st.integers(min_value=0, max_value=12),
)
def test_divide_at_is_the_true_quotient_rounded_once_at_its_scale(numerator, denominator, scale):
    expected = round_quotient(numerator, denominator, scale)
    got = divide_at(numerator, denominator, scale)
    assert got == expected and str(got) == str(expected)
