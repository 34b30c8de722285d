"""The test trades of the P&L accuracy test and the values every surface must show.

Pure (no I/O), so the unit tests pin it. The expected values come from the same core
as `posttrade positions compute` (`posttrade.commands.positions.compute`, which feeds
`posttrade.core.positions`), and the worked example of issue 3 is also pinned to its
literal numbers, so a change in the core cannot silently move both sides of the check.

Each scenario trades its own symbol, all in one account (`VALIDATE-<run id>`), so
neither a running demo feed nor an earlier run can touch the positions; the run
publishes a quote for each symbol first, which makes its mark known (the quote mid).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from ..commands.positions import compute
from ..core.exact import format_decimal
from ..core.history import ExecutionBook
from ..core.positions import Position, PositionBook
from ..streams.events import Fill, Quote

# Issue 3's worked example: fee 1 per fill, marked at 95.
WORKED_EXAMPLE_TRADES = (("BUY", "10", "100"), ("BUY", "10", "110"), ("SELL", "15", "120"), ("SELL", "10", "90"))
WORKED_EXAMPLE_FEE = "1"
WORKED_EXAMPLE_MARK = "95"
#: What the worked example must come to, written out (average cost and FIFO).
WORKED_EXAMPLE_PINNED = {
    "net_qty": "-5",
    "avg_open_price": "90",
    "realized_pnl_gross": "150",
    "fees": "4",
    "realized_pnl_net": "146",
    "mark": "95",
    "unrealized_pnl": "-25",
    "fifo_realized_pnl_gross": "150",
    "fifo_unrealized_pnl": "-25",
    "total_pnl": "121",
}

# Fields each surface shows for one position / one account, compared exactly.
PTRC_POSITION_FIELDS = (
    "net_qty", "avg_open_price", "realized_pnl_gross", "fees", "realized_pnl_net", "mark", "unrealized_pnl",
    "fifo_realized_pnl_gross", "fifo_unrealized_pnl", "multiplier", "day_pnl", "fill_count",
)  # fmt: skip
PTRC_SUMMARY_ACCOUNT_FIELDS = (
    "positions", "open_positions", "realized_pnl_gross", "fees", "realized_pnl_net", "unrealized_pnl",
    "total_pnl", "day_pnl", "fifo_realized_pnl_gross", "fifo_unrealized_pnl", "gross_notional",
)  # fmt: skip
PTRC_SUMMARY_SYMBOL_FIELDS = (
    "net_qty", "realized_pnl_gross", "fees", "realized_pnl_net", "unrealized_pnl", "total_pnl", "day_pnl", "mark",
)  # fmt: skip
PNL_POSITION_FIELDS = (
    "net_qty", "avg_open_price", "multiplier", "mark", "realized_pnl_gross", "fees", "realized_pnl_net",
    "unrealized_pnl", "fifo_realized_pnl_gross", "fifo_realized_pnl_net", "fifo_unrealized_pnl", "total_pnl",
    "day_pnl", "sod_realized_pnl_net", "sod_unrealized_pnl", "gross_notional", "fill_count",
)  # fmt: skip
PNL_ACCOUNT_FIELDS = (
    "positions", "open_positions", "realized_pnl_gross", "fees", "realized_pnl_net", "unrealized_pnl",
    "fifo_realized_pnl_gross", "fifo_unrealized_pnl", "total_pnl", "day_pnl", "gross_notional",
)  # fmt: skip
REPORT_DAILY_POSITION_FIELDS = (
    "net_qty", "mark", "realized_pnl_gross", "fees", "realized_pnl_net", "unrealized_pnl", "total_pnl", "day_pnl",
)  # fmt: skip
REPORT_DAILY_ACCOUNT_FIELDS = (
    "realized_pnl_gross", "fees", "realized_pnl_net", "unrealized_pnl", "total_pnl", "day_pnl",
)  # fmt: skip
REPORT_POSITIONS_FIELDS = (
    "net_qty", "avg_open_price", "multiplier", "mark", "market_value", "unrealized_pnl", "realized_pnl_net",
)  # fmt: skip


@dataclass(frozen=True)
class Scenario:
    """One symbol's test trades and the quote that sets its mark."""

    name: str  # what it exercises, for the report
    symbol: str
    trades: tuple[tuple[str, str, str, str], ...]  # (side, qty, price, fee)
    bid: Decimal
    ask: Decimal
    multiplier: Decimal = Decimal(1)

    @property
    def mark(self) -> Decimal:
        return (self.bid + self.ask) / 2


def scenarios(run_id: str, multiplier_symbol: str | None = None, multiplier: Decimal | None = None) -> list[Scenario]:
    """The accuracy test's scenarios for a run; the multiplier one only when ptrc has a
    validation instrument with a contract multiplier (see `multiplier_instrument`)."""
    fee = WORKED_EXAMPLE_FEE
    out = [
        Scenario(
            name="worked example (issue 3): avg cost and FIFO, fees, long to short",
            symbol=f"VAL{run_id}-WX",
            trades=tuple((side, qty, price, fee) for side, qty, price in WORKED_EXAMPLE_TRADES),
            bid=Decimal("94.5"),
            ask=Decimal("95.5"),
        ),
        Scenario(
            # Rebates are negative fees; two flips (long -> short -> long); fractional prices.
            name="rebates and flips both ways",
            symbol=f"VAL{run_id}-FR",
            trades=(
                ("BUY", "7", "50.25", "-0.07"),
                ("SELL", "12", "51.5", "0.12"),
                ("BUY", "8", "49.8", "-0.08"),
            ),
            bid=Decimal("50.1"),
            ask=Decimal("50.3"),
        ),
        Scenario(
            # An average that does not terminate (100.666...): the core's one rounding.
            name="non-terminating average (rounded at 12 places)",
            symbol=f"VAL{run_id}-RD",
            trades=(("BUY", "1", "100", "0"), ("BUY", "2", "101", "0"), ("SELL", "1", "101", "0")),
            bid=Decimal("100.99"),
            ask=Decimal("101.01"),
        ),
        Scenario(
            # Opened then closed flat: realized only, unrealized 0 whatever the mark.
            name="round trip to flat",
            symbol=f"VAL{run_id}-FL",
            trades=(("SELL", "4", "20.5", "0.25"), ("BUY", "4", "19.75", "0.25")),
            bid=Decimal("19.9"),
            ask=Decimal("20.1"),
        ),
    ]
    if multiplier_symbol is not None and multiplier is not None:
        out.append(
            Scenario(
                name=f"contract multiplier {format_decimal(multiplier)}, flip long to short",
                symbol=multiplier_symbol,
                trades=(("BUY", "3", "4500.25", "2.5"), ("BUY", "1", "4502", "2.5"), ("SELL", "6", "4510.5", "2.5")),
                bid=Decimal("4505.25"),
                ask=Decimal("4505.75"),
                multiplier=multiplier,
            )
        )
    return out


def multiplier_instrument(instruments: Mapping[str, Any]) -> tuple[str, Decimal] | None:
    """The validation instrument in ptrc's `instruments` config: a symbol whose name
    starts with `validate` (any case) and has a multiplier other than 1.

    Only such a dedicated symbol is traded: a real instrument would put the test
    position into the by-symbol totals of real trading, and its marks would move.
    """
    for symbol, section in sorted(instruments.items()):
        value = section.get("multiplier", 1) if isinstance(section, Mapping) else getattr(section, "multiplier", 1)
        multiplier = Decimal(str(value))
        if symbol.lower().startswith("validate") and multiplier != 1:
            return symbol, multiplier
    return None


def accuracy_fills(account: str, run_id: str, chosen: Iterable[Scenario], t0_ns: int) -> list[Fill]:
    """The fills of every scenario, in publishing order, 1 µs apart from `t0_ns`."""
    fills = []
    for scenario in chosen:
        for side, qty, price, fee in scenario.trades:
            n = len(fills)
            fills.append(
                Fill(
                    ts=t0_ns + n * 1_000,
                    fill_id=f"VALIDATE-{run_id}-F{n:03d}",
                    account=account,
                    symbol=scenario.symbol,
                    side=side,  # type: ignore[arg-type]
                    qty=Decimal(qty),
                    price=Decimal(price),
                    fee=Decimal(fee),
                    order_id=f"VALIDATE-{run_id}-O{n:03d}",
                    venue="VALIDATE",
                )
            )
    return fills


def mark_quotes(chosen: Iterable[Scenario], ts_ns: int) -> list[Quote]:
    return [Quote(ts=ts_ns, symbol=s.symbol, bid=s.bid, ask=s.ask, bid_size=Decimal(1), ask_size=Decimal(1)) for s in chosen]


@dataclass(frozen=True)
class FeedStep:
    """One message of the real-feed scenario. `at`: its event-time slot (ts = t0 + at µs);
    `ref`: the step it amends (CORRECT, BUST) or repeats unchanged (RESEND)."""

    exec_type: str  # NEW, OPENING, CORRECT, BUST, or RESEND
    at: int = 0
    side: str | None = None
    qty: str | None = None
    price: str | None = None
    fee: str = "0"
    ref: int | None = None


#: What a real execution feed sends, in publishing order: an opening position, a fill,
#: a later fill, a resend of the first, a late fill placed between them, a correction
#: of the later one, and a fill that is busted. Its own account (`<account>-FEED`), so
#: the other checks' totals do not include it.
REAL_FEED = (
    FeedStep("OPENING", 0, "BUY", "5", "48"),
    FeedStep("NEW", 10, "BUY", "5", "50", "0.1"),
    FeedStep("NEW", 30, "SELL", "4", "52", "0.1"),
    FeedStep("RESEND", ref=1),
    FeedStep("NEW", 20, "BUY", "2", "49", "0.1"),  # late: before step 2 in time
    FeedStep("CORRECT", 31, "SELL", "4", "53", "0.1", ref=2),
    FeedStep("NEW", 40, "SELL", "1", "51", "0.1"),
    FeedStep("BUST", 41, ref=6),
)
REAL_FEED_SYMBOL_SUFFIX = "RF"
REAL_FEED_BID, REAL_FEED_ASK = Decimal("50.9"), Decimal("51.1")


def real_feed_messages(account: str, symbol: str, run_id: str, t0_ns: int) -> list[tuple[Fill, str]]:
    """The real-feed scenario's messages in publishing order, each with its Nats-Msg-Id
    (a resend gets its own, so that it reaches the services as a gateway's would)."""
    out: list[tuple[Fill, str]] = []
    for n, step in enumerate(REAL_FEED):
        if step.exec_type == "RESEND":
            original = out[step.ref][0]  # type: ignore[index]
            out.append((original, f"validate:{original.fill_id}:resend{n}"))
            continue
        fill_id = f"VALIDATE-{run_id}-RF{n:02d}"
        fill = Fill(
            ts=t0_ns + step.at * 1_000,
            fill_id=fill_id,
            account=account,
            symbol=symbol,
            side=step.side,  # type: ignore[arg-type]
            qty=None if step.qty is None else Decimal(step.qty),
            price=None if step.price is None else Decimal(step.price),
            fee=Decimal(step.fee),
            exec_type=step.exec_type,  # type: ignore[arg-type]
            ref_fill_id=None if step.ref is None else out[step.ref][0].fill_id,
            venue="VALIDATE",
        )
        out.append((fill, f"validate:{fill_id}"))
    return out


@dataclass
class Expected:
    """The book of the test fills, and the values each surface must show."""

    account: str
    book: PositionBook
    marks: dict[str, Decimal] = field(default_factory=dict)

    @classmethod
    def of(cls, account: str, fills: list[Fill], chosen: Iterable[Scenario]) -> Expected:
        chosen = list(chosen)
        marks = {s.symbol: s.mark for s in chosen}
        multipliers = {s.symbol: s.multiplier for s in chosen if s.multiplier != 1}
        return cls(account, compute(fills, marks, multipliers), marks)

    @classmethod
    def of_feed(cls, account: str, messages: Iterable[Fill], marks: dict[str, Decimal]) -> Expected:
        """The book of messages received in this order by the rule ptrc applies."""
        book = ExecutionBook()
        for seq, fill in enumerate(messages, start=1):
            book.receive(fill, seq)
        return cls(account, book.positions, marks)

    def symbols(self) -> list[str]:
        return sorted(p.symbol for p in self.book.positions(self.account))

    def position(self, symbol: str) -> Position:
        position = self.book.get(self.account, symbol)
        if position is None:
            raise KeyError(symbol)
        return position

    def position_values(self, symbol: str, mark: Decimal | None = None) -> dict[str, Any]:
        """Every field any surface shows for the position, valued at `mark` (default:
        the scenario's mark)."""
        p = self.position(symbol)
        mark = self.marks.get(symbol) if mark is None else mark
        unrealized = p.unrealized_pnl(mark)
        fifo_unrealized = p.fifo_unrealized_pnl(mark)
        total = p.total_pnl(mark)
        return {
            "net_qty": p.net_qty,
            "avg_open_price": p.avg_open_price,
            "multiplier": p.multiplier,
            "mark": mark,
            "realized_pnl_gross": p.realized_pnl_gross,
            "fees": p.fees,
            "realized_pnl_net": p.realized_pnl_net,
            "unrealized_pnl": unrealized,
            "fifo_realized_pnl_gross": p.fifo_realized_pnl_gross,
            "fifo_realized_pnl_net": p.fifo_realized_pnl_net,
            "fifo_unrealized_pnl": fifo_unrealized,
            "total_pnl": total,
            "day_pnl": p.day_pnl(mark),
            "sod_realized_pnl_net": p.sod_realized_pnl_net,
            "sod_unrealized_pnl": p.sod_unrealized_pnl,
            "gross_notional": p.notional(mark) if p.net_qty else Decimal(0),
            "market_value": None if mark is None else p.net_qty * mark * p.multiplier,
            "fill_count": p.fill_count,
        }

    def account_values(self) -> dict[str, Any]:
        """The account's totals over every test position, at the scenarios' marks."""
        totals = self.book.account_totals(self.account)
        return {name: getattr(totals, name) for name in type(totals).__struct_fields__ if name != "account"}


@dataclass(frozen=True)
class Difference:
    where: str  # e.g. "ptrc /positions VALABC-WX"
    field: str
    expected: str | None
    actual: str | None

    def __str__(self) -> str:
        return f"{self.where} {self.field}: expected {self.expected}, got {self.actual}"


def canonical(value: Any) -> str | None:
    """A value as the canonical decimal text (`"121"`, `"0.1"`), so "121.000" and "121"
    compare equal and anything that is not a number stays visibly different."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"float {value!r}"  # money must never travel as a float
    try:
        return format_decimal(Decimal(str(value).strip()))
    except (InvalidOperation, ValueError):
        return repr(value)


def compare(where: str, expected: Mapping[str, Any], actual: Mapping[str, Any], fields: Iterable[str]) -> list[Difference]:
    """Exact equality, field by field; a field missing from `actual` is a difference."""
    out = []
    for name in fields:
        want = canonical(expected.get(name))
        got = canonical(actual.get(name)) if name in actual else "(missing)"
        if want != got:
            out.append(Difference(where, name, want, got))
    return out


def pinned_differences(expected: Expected, symbol: str) -> list[Difference]:
    """The worked example computed by the core against its literal numbers."""
    return compare("core (positions compute) worked example", WORKED_EXAMPLE_PINNED,
                   expected.position_values(symbol), WORKED_EXAMPLE_PINNED)  # fmt: skip
