"""The test trades of the P&L accuracy test and the values every surface must show.

Pure (no I/O), so the unit tests pin it. The expected values come from the same core
as `posttrade positions compute` (`posttrade.commands.positions.compute`, which feeds
`posttrade.core.positions`), and the worked example of issue 3 is also pinned to its
literal numbers, so a change in the core cannot silently move both sides of the check.

Each scenario trades its own symbol, all in one account (`VALIDATE-<run id>`), so
neither a running demo feed nor an earlier run can touch the positions; the run
publishes a quote for each symbol first, which makes its mark known (the quote mid).

The multiplier and the multi-currency scenarios trade instruments of the reference data
(`core.reference`) whose names start with `validate` (any case), never a real one: a
real instrument's marks would move and its by-symbol totals would include the test.
`validation_reference` is what `--start` adds to the deployment's reference data: such
instruments in made-up currencies (XVJ, XVE, XVT, XVN), so the gate's FX pairs never
take the place of a deployment's (at most one instrument per pair).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

import msgspec

from ..commands.positions import compute
from ..core.exact import format_decimal
from ..core.fx import FxRates
from ..core.history import ExecutionBook
from ..core.positions import Position, PositionBook
from ..core.reference import Reference
from ..core.valuation import BASE_FIELDS, value_position
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

# Fields each surface shows for one position / one account, compared exactly. Position
# rows carry their figures in the instrument's currency and, beside them, in the
# account's base currency (`core.valuation.BASE_FIELDS`); account totals are in the base.
PTRC_POSITION_FIELDS = (
    "net_qty", "avg_open_price", "realized_pnl_gross", "fees", "realized_pnl_net", "mark", "unrealized_pnl",
    "fifo_realized_pnl_gross", "fifo_unrealized_pnl", "multiplier", "day_pnl", "fill_count", *BASE_FIELDS,
)  # fmt: skip
PTRC_SUMMARY_ACCOUNT_FIELDS = (
    "positions", "open_positions", "realized_pnl_gross", "fees", "realized_pnl_net", "unrealized_pnl",
    "total_pnl", "day_pnl", "fifo_realized_pnl_gross", "fifo_unrealized_pnl", "gross_notional", "base_currency",
    "missing_rates",
)  # fmt: skip
PTRC_SUMMARY_SYMBOL_FIELDS = (
    "net_qty", "realized_pnl_gross", "fees", "realized_pnl_net", "unrealized_pnl", "total_pnl", "day_pnl", "mark",
)  # fmt: skip
PNL_POSITION_FIELDS = (
    "net_qty", "avg_open_price", "multiplier", "mark", "realized_pnl_gross", "fees", "realized_pnl_net",
    "unrealized_pnl", "fifo_realized_pnl_gross", "fifo_realized_pnl_net", "fifo_unrealized_pnl", "total_pnl",
    "day_pnl", "sod_realized_pnl_net", "sod_unrealized_pnl", "gross_notional", "fill_count", *BASE_FIELDS,
)  # fmt: skip
PNL_ACCOUNT_FIELDS = (
    "positions", "open_positions", "realized_pnl_gross", "fees", "realized_pnl_net", "unrealized_pnl",
    "fifo_realized_pnl_gross", "fifo_unrealized_pnl", "total_pnl", "day_pnl", "gross_notional", "base_currency",
    "missing_rates",
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


def is_validation_symbol(symbol: str) -> bool:
    """A symbol the gate may trade and quote: its name starts with `validate` (any case)."""
    return symbol.lower().startswith("validate")


def multiplier_instrument(reference: Reference) -> tuple[str, Decimal] | None:
    """The validation instrument of the multiplier scenario in the reference data: the
    first (by name) whose name starts with `validate`, whose multiplier is not 1, not an
    FX pair, in the default base currency (so the test account's totals need no rate)."""
    for symbol in sorted(reference.instruments):
        instrument = reference.instruments[symbol]
        if (is_validation_symbol(symbol) and instrument.multiplier != 1 and instrument.fx is None
                and reference.currency(symbol) == reference.default_base_currency):  # fmt: skip
            return symbol, instrument.multiplier
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
    def of(cls, account: str, fills: list[Fill], chosen: Iterable[Scenario], reference: Reference | None = None) -> Expected:
        chosen = list(chosen)
        marks = {s.symbol: s.mark for s in chosen}
        multipliers = {s.symbol: s.multiplier for s in chosen if s.multiplier != 1}
        return cls(account, compute(fills, marks, multipliers, reference=reference), marks)

    @classmethod
    def of_feed(cls, account: str, messages: Iterable[Fill], marks: dict[str, Decimal],
                reference: Reference | None = None) -> Expected:  # fmt: skip
        """The book of messages received in this order by the rule ptrc applies."""
        book = ExecutionBook(reference=reference)
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
        value = value_position(p, mark, self.book.fx)  # the base figures, at the book's FX marks
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
            **{name: getattr(value, name) for name in BASE_FIELDS},
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
    compare equal and anything that is not a number stays visibly different. Lists and
    mappings (missing rates, fees by currency) are spelled out with canonical items."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"float {value!r}"  # money must never travel as a float
    if isinstance(value, msgspec.Struct):
        value = msgspec.to_builtins(value, builtin_types=(Decimal,))
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{key}: {canonical(item)}" for key, item in sorted(value.items())) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(str(canonical(item)) for item in value) + "]"
    try:
        return format_decimal(Decimal(str(value).strip()))
    except (InvalidOperation, ValueError):
        return repr(value)


#: Where a rate leg's mark came from is the surface's own word (quote_mid, last_trade,
#: bar_close; `positions compute` says mark): compared as "mark", without its time.
_LEG_SOURCES = ("identity", "fixed")


def rate_legs(legs: Any) -> Any:
    """The legs of a rate (`core.fx.RateLeg`s or their JSON) as compared: from, to,
    rate, instrument, inverse, and the source (identity, fixed or mark)."""
    if not isinstance(legs, (list, tuple)):
        return legs
    out = []
    for leg in legs:
        data = msgspec.to_builtins(leg, builtin_types=(Decimal,)) if isinstance(leg, msgspec.Struct) else leg
        if not isinstance(data, Mapping):
            return legs  # not legs at all: shown as they came
        source = data.get("source")
        out.append({
            "from": data.get("from"), "to": data.get("to"), "rate": data.get("rate"),
            "instrument": data.get("instrument"), "inverse": data.get("inverse"),
            "source": source if source in _LEG_SOURCES else "mark",
        })  # fmt: skip
    return out


#: Fields compared in a form of their own.
_NORMALIZED = {"fx_legs": rate_legs}


def compare(where: str, expected: Mapping[str, Any], actual: Mapping[str, Any], fields: Iterable[str]) -> list[Difference]:
    """Exact equality, field by field; a field missing from `actual` is a difference."""
    out = []
    for name in fields:
        normalize = _NORMALIZED.get(name, lambda value: value)
        want = canonical(normalize(expected.get(name)))
        got = canonical(normalize(actual.get(name))) if name in actual else "(missing)"
        if want != got:
            out.append(Difference(where, name, want, got))
    return out


def pinned_differences(expected: Expected, symbol: str) -> list[Difference]:
    """The worked example computed by the core against its literal numbers."""
    return compare("core (positions compute) worked example", WORKED_EXAMPLE_PINNED,
                   expected.position_values(symbol), WORKED_EXAMPLE_PINNED)  # fmt: skip


# -- money in several currencies ---------------------------------------------------------------

#: Made-up currency codes of the gate's own instruments (`validation_reference`).
XVJ, XVE, XVT, XVN = "XVJ", "XVE", "XVT", "XVN"
#: The fixed rate `validation_reference` gives XVT (like USDT's peg, but not 1, so that
#: a conversion that forgets it shows).
XVT_RATE = "0.9985"
#: The sub-account `validation_reference` bases in XVE (`<account>-XVE`).
CROSS_SUFFIX = XVE


def validation_reference(base: str, account: str | None = None) -> dict[str, Any]:
    """The reference data sections `--start` adds to the deployment's, for accounts based
    in `base` by default (docs/validate.md):

    - VALIDATE_MULT, multiplier 50 (the multiplier scenario);
    - VALIDATE_XVJ in XVJ, whose rate is the inverse of VALIDATE_<base>XVJ's mark (a JPY
      stock and USDJPY); VALIDATE_<base>XVJ is traded too (its P&L is in XVJ);
    - VALIDATE_XVE in XVE, whose rate is VALIDATE_XVE<base>'s mark (SAP and EURUSD);
    - VALIDATE_XVT in XVT, at the fixed rate XVT_RATE (BTCUSDT and USDT);
    - VALIDATE_XVN in XVN, which has no rate at all;
    - with `account` (the run's, known before the services start): `<account>-XVE`
      based in XVE, whose conversions cross through the pivot.
    """
    data: dict[str, Any] = {
        "instruments": {
            "VALIDATE_MULT": {"multiplier": 50},
            "VALIDATE_XVJ": {"currency": XVJ},
            f"VALIDATE_{base}{XVJ}": {"fx": {"base": base, "quote": XVJ}},
            "VALIDATE_XVE": {"currency": XVE},
            f"VALIDATE_{XVE}{base}": {"fx": {"base": XVE, "quote": base}},
            "VALIDATE_XVT": {"currency": XVT},
            "VALIDATE_XVN": {"currency": XVN},
        },
        "fx": {"fixed": {XVT: {base: XVT_RATE}}},
    }
    if account is not None:
        data["accounts"] = {f"{account}-{CROSS_SUFFIX}": {"base_currency": XVE}}
    return data


def with_validation(data: Mapping[str, Any] | None, additions: Mapping[str, Any]) -> dict[str, Any]:
    """`data` (reference sections as read from YAML) plus what `additions` has that it
    has not: instruments and accounts by name, fixed rates by pair; the deployment's own
    entries (and its pivot and default base) always win."""
    out: dict[str, Any] = {key: value for key, value in (data or {}).items()}
    for section in ("instruments", "accounts"):
        if section in additions:
            out[section] = {**additions[section], **(out.get(section) or {})}
    fixed = additions.get("fx", {}).get("fixed")
    if fixed:
        fx = dict(out.get("fx") or {})
        merged = {source: dict(targets) for source, targets in (fx.get("fixed") or {}).items()}
        for source, targets in fixed.items():
            for target, rate in targets.items():
                if target not in merged.get(source, {}) and source not in merged.get(target, {}):
                    merged.setdefault(source, {})[target] = rate
        fx["fixed"] = merged
        out["fx"] = fx
    return out


#: FX quotes the scenario publishes, by the FX instrument's place among the validation
#: ones (sorted by name): the first mid, then the mid after the move.
FX_LEVELS = ((Decimal("150"), Decimal("152.5")), (Decimal("1.085"), Decimal("1.0935")),
             (Decimal("0.7"), Decimal("0.69")), (Decimal("3.75"), Decimal("3.8")))  # fmt: skip
#: Price levels of the other instruments, the same way; an FX instrument trades at its first mid.
PRICE_LEVELS = (Decimal("2500"), Decimal("180.5"), Decimal("99.75"), Decimal("4200.25"), Decimal("42.5"))
#: Each position's fills: (side, qty, price as a multiple of the level, fee, fee in the
#: default base currency rather than the instrument's); marked at 1.01 x the level.
CURRENCY_TRADES = (
    ("BUY", "300", Decimal("1"), "2.5", False),
    ("SELL", "100", Decimal("1.02"), "1.25", True),  # a fee charged in another currency
    ("BUY", "50", Decimal("0.99"), "-0.5", False),  # a rebate
)
MARK_FACTOR = Decimal("1.01")
HALF_SPREAD = Decimal("0.0005")  # of the mid, each side


@dataclass(frozen=True)
class CurrencyPosition:
    account: str
    symbol: str
    level: Decimal
    foreign_fee: str | None  # the currency of its second fill's fee; None: the instrument's


@dataclass
class CurrencyPlan:
    """The multi-currency scenario as the reference data allows it (`currency_plan`)."""

    reference: Reference
    fx: dict[str, tuple[Decimal, Decimal]]  # FX symbol -> (first mid, moved mid)
    marks: dict[str, Decimal]  # the other instruments' marks
    positions: list[CurrencyPosition] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def accounts(self) -> list[str]:
        return sorted({p.account for p in self.positions})

    def mids(self, moved: bool = False) -> dict[str, Decimal]:
        """Every mark: the instruments' and the FX quotes' (first or moved)."""
        return {**self.marks, **{symbol: pair[1 if moved else 0] for symbol, pair in self.fx.items()}}

    def quotes(self, ts_ns: int, moved: bool = False) -> list[Quote]:
        """The first quotes (every instrument and FX pair), or the moved FX quotes."""
        mids = {symbol: pair[1] for symbol, pair in self.fx.items()} if moved else self.mids()
        return [
            Quote(ts=ts_ns, symbol=symbol, bid=mid - mid * HALF_SPREAD, ask=mid + mid * HALF_SPREAD,
                  bid_size=Decimal(1), ask_size=Decimal(1))
            for symbol, mid in sorted(mids.items())
        ]  # fmt: skip

    def fills(self, run_id: str, t0_ns: int) -> list[Fill]:
        fills = []
        for position in self.positions:
            for side, qty, factor, fee, foreign in CURRENCY_TRADES:
                n = len(fills)
                fills.append(Fill(
                    ts=t0_ns + n * 1_000, fill_id=f"VALIDATE-{run_id}-C{n:03d}", account=position.account,
                    symbol=position.symbol, side=side, qty=Decimal(qty), price=position.level * factor,  # type: ignore[arg-type]
                    fee=Decimal(fee), fee_currency=position.foreign_fee if foreign else None,
                    order_id=f"VALIDATE-{run_id}-CO{n:03d}", venue="VALIDATE",
                ))  # fmt: skip
        return fills

    def expected(self, fills: list[Fill], moved: bool = False) -> dict[str, Expected]:
        """Per account, what the surfaces must show after `fills`, at the first or the
        moved FX quotes: `positions compute`'s book over the reference data."""
        marks = self.mids(moved)
        book = compute(fills, marks, {}, reference=self.reference)
        return {account: Expected(account, book, marks) for account in self.accounts()}


def currency_plan(reference: Reference, account: str, taken: Iterable[str] = ()) -> CurrencyPlan:
    """The positions of the multi-currency scenario, from the reference data's validation
    instruments (names starting with `validate`): in `<account>-CCY` every instrument in
    another currency than the default base whose rate the gate's own quotes (or a fixed
    rate) give; in `<account>-NORATE` those with no rate at all, beside one that has one
    (its totals are then unknown, and name the currency); in each account of the
    reference data named `<account>-...` (based in another currency) every instrument
    whose rate to that base the gate controls. An instrument whose rate would read a
    real instrument's mark is left out (with a note): the gate never quotes one; so are
    the `taken` symbols, which another scenario quotes at marks of its own.
    """
    base = reference.default_base_currency
    symbols = sorted(s for s in reference.instruments if is_validation_symbol(s))
    fx_symbols = [s for s in symbols if reference.instruments[s].fx is not None]
    others = [s for s in symbols if reference.instruments[s].fx is None]
    fx = {s: FX_LEVELS[i % len(FX_LEVELS)] for i, s in enumerate(fx_symbols)}
    levels = {s: PRICE_LEVELS[i % len(PRICE_LEVELS)] for i, s in enumerate(others)}
    levels.update({s: pair[0] for s, pair in fx.items()})
    plan = CurrencyPlan(reference, fx, {s: levels[s] * MARK_FACTOR for s in others})
    first = plan.mids()
    rates = FxRates(reference, lambda symbol: (first[symbol], "mark", None) if symbol in first else None)
    real: set[str] = set()
    taken = set(taken)

    def controlled(currency: str, account_base: str) -> bool:
        reads = reference.rate_symbols(currency, account_base)
        outside = {s for s in reads if not is_validation_symbol(s)}
        real.update(outside)
        return not outside

    def rate_known(symbol: str, account_base: str) -> bool | None:
        """Whether `symbol`'s rate to `account_base` is known; None: not for this account."""
        currency = reference.currency(symbol)
        if symbol in taken or currency == account_base or not controlled(currency, account_base):
            return None
        return rates.rate(currency, account_base) is not None

    def fee_currency(account_base: str) -> str | None:
        known = base == account_base or (controlled(base, account_base) and rates.rate(base, account_base) is not None)
        return base if known else None

    known = [s for s in symbols if rate_known(s, base)]
    unknown = [s for s in symbols if rate_known(s, base) is False]
    if not known and not unknown:
        plan.notes.append(
            f"no multi-currency scenario: the reference data has no `validate*` instrument in another currency "
            f"than {base} whose rate the gate controls (--start adds them; docs/validate.md)"
        )
        return plan
    plan.positions += [CurrencyPosition(f"{account}-CCY", s, levels[s], base) for s in known]
    if unknown:
        plan.positions += [CurrencyPosition(f"{account}-NORATE", s, levels[s], base) for s in unknown + known[:1]]
    else:
        plan.notes.append("no missing-rate case: every `validate*` instrument in another currency has a rate")
    crosses = sorted((name, code) for name, code in reference.base_currencies.items() if name.startswith(f"{account}-"))
    for name, code in crosses:
        plan.positions += [
            CurrencyPosition(name, s, levels[s], fee_currency(code)) for s in symbols if rate_known(s, code)
        ]
    if not crosses:
        plan.notes.append(
            f"no account based in another currency than {base}: only with --start, which bases "
            f"{account}-{CROSS_SUFFIX} in {XVE} (the run's name is known only then)"
        )
    traded = {p.symbol for p in plan.positions}
    plan.marks = {symbol: mark for symbol, mark in plan.marks.items() if symbol in traded}  # nothing else is quoted
    if real:
        plan.notes.append(
            f"multi-currency scenario: left out `validate*` instruments whose rate reads {', '.join(sorted(real))} "
            "(the gate quotes its own instruments only)"
        )
    return plan
