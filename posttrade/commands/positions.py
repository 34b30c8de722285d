"""`posttrade positions compute`: positions and P&L from a file of fills.

The reconciliation tool users run on a broker's file. It feeds the fills through the
same core as the live service (`posttrade.core.positions`), so its numbers are the ones
the service shows for the same fills.
"""

from __future__ import annotations

import argparse
import json
import sys
from decimal import Decimal
from operator import attrgetter
from typing import Literal

import msgspec

from posttrade.core.positions import PositionBook
from posttrade.streams.events import Fill

COMPUTE_HELP = """\
Compute positions and P&L per (account, symbol) from FILLS.jsonl and print
{"positions": [...]} as JSON on stdout, one row per (account, symbol) that had
fills (flat ones included), sorted by account then symbol.

Input, one fill per line (blank lines are skipped; other fields are ignored):
  {"ts": <epoch ns int>, "account": "...", "symbol": "...", "side": "BUY"|"SELL",
   "qty": "<decimal>", "price": "<decimal>", "fee": "<decimal>" (optional, default 0,
   negative for a rebate), "fill_id": "..." (optional, unique in the file)}
qty and price must be > 0. Fills are applied in ts order, ties in file order.
MARKS.json (optional): {"SYMBOL": "<decimal>", ...}. MULTIPLIERS.json: the same
shape, the contract multiplier per symbol (default 1).

Row fields: account, symbol, net_qty, avg_open_price, realized_pnl_gross, fees,
realized_pnl_net, mark, unrealized_pnl, fifo_realized_pnl_gross,
fifo_unrealized_pnl. Every number is a decimal string in plain notation with
trailing fractional zeros removed ("225", "0.1", never "2.25E+2"). avg_open_price
is null when the position is flat. A symbol without a mark gets mark,
unrealized_pnl and fifo_unrealized_pnl null.

--method chooses what the row carries (every row always has all the fields):
  both (default)  headline fields (avg_open_price, realized_pnl_gross,
                  realized_pnl_net, unrealized_pnl) by average cost, and the fifo_*
                  fields by FIFO lots.
  avg             headline fields by average cost; fifo_* fields are null.
  fifo            headline fields by FIFO: avg_open_price is the weighted average
                  price of the remaining lots, realized is FIFO realized; the fifo_*
                  fields repeat the FIFO numbers.

Arithmetic is exact, with one rounding: an average with more than 12 decimal
places is shown rounded half to even to 12, and the cost a partial close takes out
(closed qty x average) is rounded the same way; the difference stays in the open
cost, so realized + unrealized is always exact (see posttrade.core.positions).
Money includes the multiplier; fees are taken as given.

Exit status: 0 on success; 1 if an input is unreadable or invalid (the first bad line
is reported on stderr as "FILE: line N: reason" and nothing is printed on stdout);
2 for a usage error.
"""


class FillLine(msgspec.Struct, kw_only=True, frozen=True):
    """One line of the input file: the types; the values are checked by `Fill`."""

    ts: int
    account: str
    symbol: str
    side: Literal["BUY", "SELL"]
    qty: Decimal
    price: Decimal
    fee: Decimal = Decimal(0)
    fill_id: str | None = None


class InputError(Exception):
    """An input file that cannot be used; the message says where and why."""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "positions",
        help="positions and P&L from a file of fills (reconciliation)",
        description="Positions and P&L tools.",
    )
    commands = parser.add_subparsers(dest="positions_command", required=True, metavar="SUBCOMMAND")
    compute = commands.add_parser(
        "compute",
        help="compute positions and P&L from FILLS.jsonl",
        description=COMPUTE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    compute.add_argument("fills", metavar="FILLS.jsonl", help="fills, one JSON object a line ('-': stdin)")
    compute.add_argument("--marks", metavar="MARKS.json", help="mark price per symbol")
    compute.add_argument(
        "--method", choices=("avg", "fifo", "both"), default="both",
        help="which P&L method fills the row (default: both)",
    )
    compute.add_argument(
        "--multipliers", metavar="MULTIPLIERS.json", help="contract multiplier per symbol (default 1)"
    )
    compute.set_defaults(handler=run_compute)


def run_compute(args: argparse.Namespace) -> int:
    try:
        marks = read_prices(args.marks, "mark") if args.marks else {}
        multipliers = read_prices(args.multipliers, "multiplier") if args.multipliers else {}
        fills = read_fills(args.fills)
    except InputError as exc:
        print(f"posttrade positions compute: {exc}", file=sys.stderr)
        return 1
    book = compute(fills, marks, multipliers)
    json.dump({"positions": book.rows(args.method)}, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


def compute(
    fills: list[Fill], marks: dict[str, Decimal], multipliers: dict[str, Decimal]
) -> PositionBook:
    """The book after applying `fills` in ts order (ties keep their order)."""
    book = PositionBook(multipliers=multipliers, marks=marks)
    book.apply_many(sorted(fills, key=attrgetter("ts")))  # sorted() is stable
    return book


_line_decoder = msgspec.json.Decoder(FillLine)


def read_fills(path: str) -> list[Fill]:
    """Every fill of a JSON-lines file, validated; InputError at the first bad line."""
    data = _read(path)
    fills: list[Fill] = []
    first_line_of: dict[str, int] = {}
    for number, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            fill, given_id = parse_fill(line, number)
        except ValueError as exc:
            raise InputError(f"{path}: line {number}: {exc}") from None
        if given_id is not None:
            if given_id in first_line_of:
                raise InputError(
                    f"{path}: line {number}: duplicate fill_id {given_id!r} "
                    f"(first on line {first_line_of[given_id]})"
                )
            first_line_of[given_id] = number
        fills.append(fill)
    return fills


def parse_fill(line: bytes, number: int) -> tuple[Fill, str | None]:
    """One line as a validated `Fill`, and the fill_id the line gave (None if none).

    A fill without an id gets `line:<number>` in the Fill (only to satisfy the event
    type; duplicates are checked on the ids the file gave).
    """
    try:
        raw = _line_decoder.decode(line)
    except msgspec.ValidationError as exc:
        raise ValueError(f"invalid fill: {exc}") from None
    except msgspec.DecodeError as exc:
        raise ValueError(f"malformed JSON: {exc}") from None
    try:
        # Constructing the event runs the same value checks as the live decoder.
        fill = Fill(
            ts=raw.ts,
            fill_id=f"line:{number}" if raw.fill_id is None else raw.fill_id,
            account=raw.account,
            symbol=raw.symbol,
            side=raw.side,
            qty=raw.qty,
            price=raw.price,
            fee=raw.fee,
        )
    except (ValueError, TypeError) as exc:
        raise ValueError(f"invalid fill: {exc}") from None
    return fill, raw.fill_id


_prices_decoder = msgspec.json.Decoder(dict[str, Decimal])


def read_prices(path: str, what: str) -> dict[str, Decimal]:
    """A JSON object symbol -> positive decimal (marks, multipliers)."""
    data = _read(path)
    try:
        values = _prices_decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise InputError(f"{path}: expected {{\"SYMBOL\": \"<decimal>\"}}: {exc}") from None
    except msgspec.DecodeError as exc:
        raise InputError(f"{path}: malformed JSON: {exc}") from None
    for symbol, value in values.items():
        if not value.is_finite() or value <= 0:
            raise InputError(f"{path}: {what} of {symbol!r} must be a number > 0, got {value}")
    return values


def _read(path: str) -> bytes:
    try:
        if path == "-":
            return sys.stdin.buffer.read()
        with open(path, "rb") as file:
            return file.read()
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror or exc}") from None
