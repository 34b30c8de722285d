"""`posttrade positions compute` and `posttrade positions load`.

`compute` is the reconciliation tool users run on a broker's file: it feeds the records,
in file order, through the same execution history as the live service
(`posttrade.core.history.ExecutionBook`, on `posttrade.core.positions`), so its numbers
are the ones ptrc shows after the same messages arrive on the bus in the same order.

`load` publishes a broker statement of positions already held as OPENING fills on the
bus, with ids derived from the statement's content so that loading it again adds
nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import hashlib
import io
import json
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal
from typing import Iterable

import msgspec

from posttrade.core.exact import ZERO, format_decimal, parse_decimal
from posttrade.core.history import DEFAULT_HORIZON_NS, ExecutionBook, Status, parse_horizon
from posttrade.core.positions import PositionBook
from posttrade.core.reference import Reference, ReferenceError
from posttrade.streams.events import Fill, InvalidEvent, decode, encode

COMPUTE_HELP = """\
Compute positions and P&L per (account, symbol) from FILLS.jsonl, the messages of the
fills subject in the order they arrived, and print {"positions": [...]} as JSON on
stdout: one row per (account, symbol) with a position (flat ones included), sorted by
account then symbol. The rows are the ones ptrc's GET /positions shows after the same
messages are published in the same order (same --horizon as ptrc's books.horizon, same
marks and multipliers).

Input: one Fill a line, exactly as on the bus (docs/events.md; blank lines are
skipped, unknown fields ignored):
  {"ts": <epoch ns int>, "fill_id": "...", "account": "...", "symbol": "...",
   "side": "BUY"|"SELL", "qty": "<decimal>", "price": "<decimal>",
   "fee": "<decimal>" (optional, default 0, negative for a rebate),
   "exec_type": "NEW" (default) | "CORRECT" | "BUST" | "OPENING",
   "ref_fill_id": "..." (CORRECT and BUST: the execution they amend)}
A line without fill_id (allowed for plain NEW fills, unlike on the bus) gets
"line:<N>", N its line number.

The file's order is the arrival order (the line number is the arrival sequence), and
the positions follow posttrade.core.history: each position equals a fresh book over
its effective history, i.e. the key's OPENINGs in file order, then its executions in
ts order, ties in file order; a repeated fill_id is dropped (a "duplicate" if equal to
its first line, else a "conflict": the first line wins); a CORRECT replaces the
economics of the execution it names, a BUST removes it, whether they come after or
before it in the file (before: "pending" until it comes); an amendment of a busted
execution, or of another account or symbol, is "refused". --horizon bounds how far
back in event time the history may change: a fill, an amendment or an opening that
reaches back further than that behind the newest fill of its key is "refused".

On stderr: one line per bad line ("FILE: line N: reason": not JSON, or not a valid
Fill; it is left out, as ptrc dead-letters it), then a summary with the count of each
outcome, then every conflicting, pending and refused line with its number and why.

MARKS.json (optional): {"SYMBOL": "<decimal>", ...}, FX instruments' marks included
(they give the rates). MULTIPLIERS.json: the same shape, the contract multiplier per
symbol (default 1; over INSTRUMENTS.json's).

Currencies: the reference data's three sections, as JSON (the services read them from
config/backend/reference.yaml; posttrade.core.reference):
  --instruments INSTRUMENTS.json  {"ESU4": {"multiplier": 50, "currency": "USD"},
                                   "USDJPY": {"currency": "JPY", "fx": {"base": "USD", "quote": "JPY"}}}
  --accounts ACCOUNTS.json        {"default_base_currency": "USD", "ACC-EU": {"base_currency": "EUR"}}
  --fx FX.json                    {"fixed": {"USDT": {"USD": "1"}}, "pivot": "USD"}
Without them every instrument and account is in USD.

Row fields: account, symbol, net_qty, avg_open_price, realized_pnl_gross, fees,
realized_pnl_net, mark, unrealized_pnl, fifo_realized_pnl_gross,
fifo_unrealized_pnl (in the instrument's currency); then currency, base_currency
(the account's), fx_rate (from currency to base; null when unknown), fx_legs (how it
was found: each leg's from, to, rate, source, instrument, inverse), foreign_fees
(fees charged in other currencies, by currency), realized_pnl_gross_base, fees_base,
realized_pnl_net_base, unrealized_pnl_base, total_pnl_base, day_pnl_base,
gross_notional_base, fifo_realized_pnl_gross_base, fifo_unrealized_pnl_base (each the
local figure times the rate, rounded half-even at 12 places; null when a rate is
unknown) and missing_rates (the currencies without a rate). Every number is a decimal string in plain notation with
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

Exit status: 0 on success (duplicates, conflicts, pending and refused records are
decisions of the history, not errors); 3 when bad lines were left out (the
positions of the other lines are printed); 1 if an input file is unreadable, or the
marks or multipliers are invalid (nothing is printed on stdout); 2 for a usage error.
"""

LOAD_HELP = """\
Publish a broker statement of positions held before the feed starts as OPENING fills
on the fills subject (trading.fills.<account>.<symbol>, stream FILLS), one per row
with a non-zero net_qty, in file order. ptrc puts a key's openings before all of its
executions (posttrade.core.history).

STATEMENT: CSV with a header row naming at least the columns account, symbol,
net_qty, avg_open_price (any order, names case-insensitive; the delimiter may be
",", ";", tab or "|"; other columns are ignored and listed), or JSON lines with the
same fields ({"account": "ACC1", "symbol": "ESZ5", "net_qty": "-3",
"avg_open_price": "4501.25"}, numbers as strings or JSON numbers; other fields
ignored and listed). A row with net_qty 0 is skipped (its avg_open_price may be
empty). Several rows of one (account, symbol) are several lots, applied in file
order.

Each row becomes a Fill: exec_type OPENING, side BUY for net_qty > 0 and SELL for
< 0, qty |net_qty|, price avg_open_price (> 0), fee 0, ts --as-of, and fill_id
"open:" + the first 32 hex digits of the SHA-256 of (account, symbol, net_qty,
avg_open_price, as-of, occurrence), where the numbers are in canonical form
("100.50" and "1.005E+2" are the same) and occurrence counts identical rows in the
file (1, 2, ...), so two identical lots get two ids. The same statement and --as-of
always give the same ids, which are also the messages' Nats-Msg-Id: loading it again
within FILLS' duplicate window stores nothing, and after it ptrc drops the repeats as
duplicates, so a reload, even weeks later, adds nothing. Load a statement as one
file, once: another statement (another --as-of) adds its lots on top, and ptrc
refuses an opening once the key's history reaches back past its horizon.

Nothing is published when a row is bad: every bad row is reported with its line
number and the exit status is 1. The FILLS stream is created (with the layout the
services declare) if it does not exist yet; an existing one is left as it is.

Output: the rows read, the openings per account, the skipped zero rows, and one
line per opening with its id and whether the server stored it or already had it.
--dry-run publishes nothing and prints the Fills as JSON lines on stdout (the report
goes to stderr), ready for `posttrade positions compute`.

NATS: --nats-url, else $POSTTRADE__NATS__URL, else the local stack's; credentials
from $POSTTRADE__NATS__USER/__PASSWORD, $POSTTRADE__NATS__TOKEN or
$POSTTRADE__NATS__CREDS_FILE, as the services read them.

Exit status: 0 on success; 1 for a bad row, an unreadable file or a failed publish
(the report says how many were stored: running again is safe); 2 for a usage error.
"""


class InputError(Exception):
    """An input file that cannot be used; the message says where and why."""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "positions",
        help="positions and P&L from a file of fills (reconciliation); load opening positions",
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
    compute.add_argument("--instruments", metavar="INSTRUMENTS.json", help="multiplier, currency and FX pair per symbol")
    compute.add_argument("--accounts", metavar="ACCOUNTS.json", help="the accounts' base currencies")
    compute.add_argument("--fx", metavar="FX.json", help="fixed rates and the pivot currency")
    compute.add_argument(
        "--horizon", type=_horizon_arg, default=DEFAULT_HORIZON_NS, metavar="DURATION",
        help="how far back in event time the history may change: 7d, 36h, 90m, 30s or seconds "
             "(default 7d, as ptrc's books.horizon)",
    )
    compute.set_defaults(handler=run_compute)

    load = commands.add_parser(
        "load",
        help="publish a broker statement of opening positions as OPENING fills",
        description=LOAD_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    load.add_argument("statement", metavar="STATEMENT", help="CSV or JSON lines ('-': stdin)")
    load.add_argument(
        "--as-of", required=True, type=_as_of_arg, metavar="TIME",
        help="the statement's time: ISO-8601 with a timezone (2025-01-31T22:00:00Z) or epoch nanoseconds",
    )
    load.add_argument(
        "--format", choices=("auto", "csv", "jsonl"), default="auto",
        help="the statement's format (default: by extension, .csv or .jsonl/.ndjson/.json, else by content)",
    )
    load.add_argument("--dry-run", action="store_true", help="print the Fills as JSON lines; publish nothing")
    load.add_argument("--nats-url", help="default: $POSTTRADE__NATS__URL, else the local stack's NATS")
    load.set_defaults(handler=run_load)


def _horizon_arg(text: str) -> int:
    try:
        return parse_horizon(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc} (e.g. 7d, 36h, 90m, 30s, or seconds)") from None


def _as_of_arg(text: str) -> int:
    try:
        return parse_as_of(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# -- compute ---------------------------------------------------------------------------


def run_compute(args: argparse.Namespace) -> int:
    try:
        marks = read_prices(args.marks, "mark") if args.marks else {}
        multipliers = read_prices(args.multipliers, "multiplier") if args.multipliers else {}
        reference = read_reference(args.instruments, args.accounts, args.fx)
        records, bad = read_records(args.fills)
    except InputError as exc:
        print(f"posttrade positions compute: {exc}", file=sys.stderr)
        return 1
    for number, reason in bad:
        print(f"posttrade positions compute: {args.fills}: line {number}: {reason}", file=sys.stderr)
    result = replay(records, marks, multipliers, horizon_ns=args.horizon, reference=reference)
    result.bad = bad
    json.dump({"positions": result.book.positions.rows(args.method)}, sys.stdout, indent=2)
    sys.stdout.write("\n")
    print(f"posttrade positions compute: {args.fills}: {result.summary()}", file=sys.stderr)
    for outcome in result.listed():
        print(f"  {outcome.describe()}", file=sys.stderr)
    return 3 if bad else 0


@dataclass(slots=True)
class Outcome:
    """What became of one record (a line of the file)."""

    line: int
    fill: Fill
    status: Status
    reason: str | None = None  # applied: fill, late, correction, bust or opening; otherwise why
    first_line: int | None = None  # conflict: the line of the version that won

    def describe(self) -> str:
        fill = self.fill
        what = f"{fill.exec_type} {fill.fill_id}"
        if fill.ref_fill_id is not None:
            what += f" of {fill.ref_fill_id}"
        what += f" ({fill.account}/{fill.symbol})"
        if self.status == "conflict":
            first = f"line {self.first_line}" if self.first_line is not None else "an earlier line"
            return f"line {self.line}: conflict: {what} differs from its first arrival on {first}; dropped"
        return f"line {self.line}: {self.status}: {what}: {self.reason}"


@dataclass
class Replay:
    """The book after a file, and what became of each of its records."""

    book: ExecutionBook
    outcomes: dict[int, Outcome] = field(default_factory=dict)  # line -> outcome, in file order
    bad: list[tuple[int, str]] = field(default_factory=list)  # (line, reason)

    def counts(self) -> Counter:
        return Counter(outcome.status for outcome in self.outcomes.values())

    def summary(self) -> str:
        counts = self.counts()
        applied = Counter(o.reason for o in self.outcomes.values() if o.status == "applied")
        kinds = ", ".join(
            f"{applied[kind]} {kind}" for kind in ("opening", "late", "correction", "bust") if applied[kind]
        )
        total = len(self.outcomes) + len(self.bad)
        parts = [f"{counts['applied']} applied" + (f" ({kinds})" if kinds else "")]
        parts += [f"{counts[status]} {status}" for status in ("duplicate", "conflict", "pending", "refused")]
        parts.append(f"{len(self.bad)} bad (left out)")
        return f"{total} records: " + ", ".join(parts)

    def listed(self) -> list[Outcome]:
        """The conflicting, pending and refused records, in file order."""
        return [o for o in self.outcomes.values() if o.status in ("conflict", "pending", "refused")]


#: The kind of an applied amendment or opening, by its exec_type.
_KIND = {"OPENING": "opening", "CORRECT": "correction", "BUST": "bust"}


def replay(
    records: Iterable[tuple[int, Fill, bytes | None]],
    marks: dict[str, Decimal],
    multipliers: dict[str, Decimal],
    *,
    horizon_ns: int = DEFAULT_HORIZON_NS,
    reference: Reference | None = None,
) -> Replay:
    """Feed (line, fill, raw) records, in arrival order, to a fresh `ExecutionBook`."""
    book = ExecutionBook(multipliers, reference=reference, horizon_ns=horizon_ns)
    for symbol, price in marks.items():
        book.positions.set_mark(symbol, price)
    result = Replay(book)
    outcomes = result.outcomes
    first_line: dict[str, int] = {}
    for number, fill, raw in records:
        answer = book.receive(fill, number, raw)
        outcome = outcomes[number] = Outcome(number, fill, answer.status, answer.reason)
        if answer.status == "conflict":
            outcome.first_line = first_line.get(fill.fill_id)
        elif answer.status != "duplicate":
            first_line[fill.fill_id] = number
        if answer.status == "applied":
            # The record's own kind: the book names a NEW that released amendments after
            # them, and those are counted as records of their own below.
            outcome.reason = answer.reason if answer.reason in ("fill", "late") else _KIND.get(fill.exec_type, "fill")
        # Pending amendments this record decided, and those it made expire.
        for settled in answer.settled:
            earlier = outcomes[settled.amendment.seq]
            if settled.applied:
                earlier.status, earlier.reason = "applied", _KIND[earlier.fill.exec_type]
            else:
                earlier.status, earlier.reason = "refused", settled.amendment.reason
        for amendment in answer.expired:
            earlier = outcomes[amendment.seq]
            earlier.status, earlier.reason = "refused", amendment.reason
    return result


def compute(
    fills: list[Fill],
    marks: dict[str, Decimal],
    multipliers: dict[str, Decimal],
    *,
    horizon_ns: int = DEFAULT_HORIZON_NS,
    reference: Reference | None = None,
) -> PositionBook:
    """The positions after `fills` arrive in this order (the history orders them)."""
    records = ((number, fill, None) for number, fill in enumerate(fills, start=1))
    return replay(records, marks, multipliers, horizon_ns=horizon_ns, reference=reference).book.positions


_untyped_decoder = msgspec.json.Decoder(float_hook=Decimal)  # numbers keep their exact text
_exact_encoder = msgspec.json.Encoder(decimal_format="number")


def parse_record(line: bytes, number: int) -> Fill:
    """One line as a `Fill`, decoded as the services decode the bus; ValueError says why.

    A line without fill_id (or with null) gets `line:<number>`.
    """
    try:
        return decode(Fill, line)
    except InvalidEvent as exc:
        error = exc.reason
    try:
        data = _untyped_decoder.decode(line)
    except msgspec.DecodeError:
        raise ValueError(error) from None
    if not isinstance(data, dict) or data.get("fill_id") is not None:
        raise ValueError(error)
    data["fill_id"] = f"line:{number}"
    try:
        return decode(Fill, _exact_encoder.encode(data))
    except InvalidEvent as exc:
        raise ValueError(exc.reason) from None


def read_records(path: str) -> tuple[list[tuple[int, Fill, bytes]], list[tuple[int, str]]]:
    """The file's records (line number, Fill, the line) and its bad lines (line, why)."""
    data = _read(path)
    records: list[tuple[int, Fill, bytes]] = []
    bad: list[tuple[int, str]] = []
    for number, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((number, parse_record(line, number), line))
        except ValueError as exc:
            bad.append((number, str(exc)))
    return records, bad


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


def read_reference(instruments: str | None, accounts: str | None, fx: str | None) -> Reference:
    """The reference data from the three JSON files (each optional)."""
    sections: dict[str, object] = {}
    for name, path in (("instruments", instruments), ("accounts", accounts), ("fx", fx)):
        if path is None:
            continue
        try:
            sections[name] = _untyped_decoder.decode(_read(path))
        except msgspec.DecodeError as exc:
            raise InputError(f"{path}: malformed JSON: {exc}") from None
    try:
        return Reference.from_data(sections)
    except ReferenceError as exc:
        raise InputError(f"reference data: {exc}") from None


def _read(path: str) -> bytes:
    try:
        if path == "-":
            return sys.stdin.buffer.read()
        with open(path, "rb") as file:
            return file.read()
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror or exc}") from None


# -- load ------------------------------------------------------------------------------

REQUIRED_COLUMNS = ("account", "symbol", "net_qty", "avg_open_price")
_DELIMITERS = (",", ";", "\t", "|")
_FRACTION = re.compile(r"^(.*?T\d{2}:\d{2}:\d{2})[.,](\d+)(.*)$")
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
# The range a Fill's ts accepts (1990 .. 2200, posttrade.streams.events).
_AS_OF_MIN, _AS_OF_MAX = 631_152_000_000_000_000, 7_258_118_400_000_000_000


def parse_as_of(text: str) -> int:
    """--as-of in epoch ns: ISO-8601 with a timezone (fractions to the ns) or epoch ns."""
    text = text.strip()
    if text.isdigit():
        ns = int(text)
    else:
        nanos = 0
        match = _FRACTION.match(text)
        if match:  # datetime keeps microseconds only: take the fraction ourselves
            digits = match.group(2)
            if len(digits) > 9:
                raise ValueError(f"{text!r}: more than 9 fractional digits")
            nanos = int(digits.ljust(9, "0"))
            text_for_datetime = match.group(1) + match.group(3)
        else:
            text_for_datetime = text
        try:
            moment = datetime.fromisoformat(text_for_datetime)
        except ValueError:
            raise ValueError(
                f"{text!r}: expected ISO-8601 with a timezone (2025-01-31T22:00:00Z) or epoch nanoseconds"
            ) from None
        if moment.utcoffset() is None:
            raise ValueError(
                f"{text!r} has no timezone: add Z or an offset (+01:00), "
                "the statement's time must not depend on where it is loaded"
            )
        delta = moment - _EPOCH
        ns = (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1_000 + nanos
    if not _AS_OF_MIN <= ns <= _AS_OF_MAX:
        raise ValueError(f"{text!r}: must be between 1990 and 2200 (an integer is epoch nanoseconds)")
    return ns


def format_ts(ns: int) -> str:
    """Epoch ns as ISO-8601 UTC with the fraction to the ns (trailing zeros dropped)."""
    seconds, nanos = divmod(ns, 1_000_000_000)
    text = datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    if nanos:
        text += "." + f"{nanos:09d}".rstrip("0")
    return text + "Z"


@dataclass(frozen=True, slots=True)
class StatementRow:
    line: int
    account: str
    symbol: str
    net_qty: Decimal
    avg_open_price: Decimal | None


@dataclass
class Statement:
    """A statement as read: its good rows, and what was wrong or left aside."""

    format: str
    rows: list[StatementRow] = field(default_factory=list)
    errors: list[tuple[int, str]] = field(default_factory=list)  # (line, why)
    ignored: list[str] = field(default_factory=list)  # columns / fields not used


def detect_format(path: str, data: bytes, choice: str = "auto") -> str:
    if choice != "auto":
        return choice
    lower = path.lower()
    if lower.endswith(".csv"):
        return "csv"
    if lower.endswith((".jsonl", ".ndjson", ".json")):
        return "jsonl"
    text = data.lstrip(b"\xef\xbb\xbf \t\r\n")
    return "jsonl" if text.startswith(b"{") else "csv"


def read_statement(path: str, choice: str = "auto") -> Statement:
    data = _read(path)
    fmt = detect_format(path, data, choice)
    return parse_csv(data) if fmt == "csv" else parse_jsonl(data)


def _row(line: int, account: object, symbol: object, net_qty: object, avg: object) -> StatementRow:
    """Check one row's values; ValueError says what is wrong."""
    for name, value in (("account", account), ("symbol", symbol)):
        if not isinstance(value, str) or not value:
            raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    qty = parse_decimal("net_qty", net_qty)
    price = None if avg is None or avg == "" else parse_decimal("avg_open_price", avg)
    if qty and (price is None or price <= 0):
        raise ValueError(f"avg_open_price must be a number > 0 for a non-zero net_qty, got {avg!r}")
    return StatementRow(line, account, symbol, qty, price)  # type: ignore[arg-type]


def parse_csv(data: bytes) -> Statement:
    statement = Statement("csv")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"not UTF-8 text: {exc}") from None
    lines = text.splitlines()
    header_line = next((n for n, line in enumerate(lines, start=1) if line.strip()), None)
    if header_line is None:
        raise InputError("empty: expected a header row naming " + ", ".join(REQUIRED_COLUMNS))
    header = lines[header_line - 1]
    for delimiter in _DELIMITERS:
        given = [name.strip() for name in next(csv.reader([header], delimiter=delimiter))]
        names = [name.lower() for name in given]
        if all(column in names for column in REQUIRED_COLUMNS):
            break
    else:
        raise InputError(
            f"line {header_line}: the header must name the columns {', '.join(REQUIRED_COLUMNS)} "
            f"(found: {header.strip()!r})"
        )
    repeated = sorted({name for name in names if names.count(name) > 1 and name in REQUIRED_COLUMNS})
    if repeated:
        raise InputError(f"line {header_line}: column {', '.join(repeated)} appears more than once")
    where = {column: names.index(column) for column in REQUIRED_COLUMNS}
    statement.ignored = [text for text, name in zip(given, names) if name not in REQUIRED_COLUMNS and text]
    reader = csv.reader(io.StringIO("\n".join(lines[header_line:]), newline=""), delimiter=delimiter)
    end = header_line  # the last line the reader consumed
    for cells in reader:
        line, end = end + 1, header_line + reader.line_num
        if not any(cell.strip() for cell in cells):
            continue
        cells = [cell.strip() for cell in cells]
        if len(cells) < len(names) or any(cells[len(names):]):
            statement.errors.append((line, f"{len(cells)} fields, the header has {len(names)}"))
            continue
        try:
            statement.rows.append(_row(line, *(cells[where[column]] for column in REQUIRED_COLUMNS)))
        except ValueError as exc:
            statement.errors.append((line, str(exc)))
    return statement


def parse_jsonl(data: bytes) -> Statement:
    statement = Statement("jsonl")
    ignored: set[str] = set()
    for number, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        if number == 1 and line.startswith(b"\xef\xbb\xbf"):
            line = line[3:]
        try:
            value = _untyped_decoder.decode(line)
        except msgspec.DecodeError as exc:
            statement.errors.append((number, f"malformed JSON: {exc}"))
            continue
        if not isinstance(value, dict):
            statement.errors.append((number, f"expected a JSON object, got {type(value).__name__}"))
            continue
        missing = [name for name in ("account", "symbol", "net_qty") if name not in value]
        if missing:
            statement.errors.append((number, f"missing field {', '.join(missing)}"))
            continue
        ignored.update(name for name in value if name not in REQUIRED_COLUMNS)
        try:
            statement.rows.append(_row(number, *(value.get(column) for column in REQUIRED_COLUMNS)))
        except ValueError as exc:
            statement.errors.append((number, str(exc)))
    statement.ignored = sorted(ignored)
    return statement


def opening_id(account: str, symbol: str, net_qty: Decimal, avg_open_price: Decimal, as_of: int,
               occurrence: int) -> str:
    """The content-derived fill_id of an opening lot (see LOAD_HELP)."""
    identity = [account, symbol, format_decimal(net_qty), format_decimal(avg_open_price), as_of, occurrence]
    return "open:" + hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:32]


def _canonical(value: Decimal) -> Decimal:
    """The value with its canonical digits (plain, no trailing zeros): what is published."""
    return Decimal(format_decimal(value) or "0")


@dataclass(frozen=True, slots=True)
class Opening:
    line: int
    fill: Fill


def opening_fills(
    rows: Iterable[StatementRow], as_of: int
) -> tuple[list[Opening], list[StatementRow], list[tuple[int, str]]]:
    """The OPENING fill of every non-zero row, the zero rows, and rows no Fill accepts."""
    openings: list[Opening] = []
    zero: list[StatementRow] = []
    errors: list[tuple[int, str]] = []
    seen: Counter = Counter()
    for row in rows:
        if not row.net_qty:
            zero.append(row)
            continue
        assert row.avg_open_price is not None  # _row checked it
        qty = _canonical(abs(row.net_qty))
        price = _canonical(row.avg_open_price)
        identity = (row.account, row.symbol, row.net_qty, price)
        seen[identity] += 1
        fill_id = opening_id(row.account, row.symbol, row.net_qty, price, as_of, seen[identity])
        try:
            fill = Fill(
                ts=as_of, fill_id=fill_id, account=row.account, symbol=row.symbol,
                side="BUY" if row.net_qty > 0 else "SELL", qty=qty, price=price, fee=ZERO,
                exec_type="OPENING",
            )
        except (ValueError, TypeError) as exc:
            errors.append((row.line, f"not a valid Fill: {exc}"))
            continue
        openings.append(Opening(row.line, fill))
    return openings, zero, errors


def run_load(args: argparse.Namespace) -> int:
    name = "posttrade positions load"
    try:
        statement = read_statement(args.statement, args.format)
    except InputError as exc:
        print(f"{name}: {args.statement}: {exc}", file=sys.stderr)
        return 1
    openings, zero, invalid = opening_fills(statement.rows, args.as_of)
    errors = sorted(statement.errors + invalid)
    if errors:
        for number, reason in errors:
            print(f"{name}: {args.statement}: line {number}: {reason}", file=sys.stderr)
        print(f"{name}: {args.statement}: {len(errors)} bad row(s): nothing published", file=sys.stderr)
        return 1
    report = sys.stderr if args.dry_run else sys.stdout
    for text in load_summary(args.statement, statement, openings, zero, args.as_of):
        print(text, file=report)
    if args.dry_run:
        for text in opening_lines(openings):
            print(text, file=report)
        for opening in openings:
            sys.stdout.write(encode(opening.fill).decode() + "\n")
        print(f"dry run: {len(openings)} opening(s) printed, nothing published", file=report)
        return 0
    if not openings:
        print("nothing to publish", file=report)
        return 0
    from posttrade.streams.nats import without_passwords  # imports nats-py: only to publish

    url = args.nats_url or _default_nats_url()
    acks: list = []
    try:
        created = asyncio.run(publish_openings(url, [o.fill for o in openings], acks))
    except Exception as exc:  # noqa: BLE001 - any failure: say how far it got
        for text in opening_lines(openings, acks):
            print(text, file=report)
        print(
            f"{name}: publishing to {without_passwords(url)} failed after {len(acks)} of {len(openings)} "
            f"opening(s): {_describe(exc)}; running the same load again is safe (same ids)",
            file=sys.stderr,
        )
        return 1
    if created:
        print(f"created the stream {created} (it did not exist)", file=report)
    for text in opening_lines(openings, acks):
        print(text, file=report)
    duplicates = sum(1 for ack in acks if ack.duplicate)
    print(
        f"published {len(acks) - duplicates} opening(s) to {without_passwords(url)}"
        + (f"; {duplicates} already on the bus (same Nats-Msg-Id)" if duplicates else ""),
        file=report,
    )
    return 0


def _describe(exc: BaseException) -> str:
    text = str(exc)
    if isinstance(exc, OSError) and text:
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def load_summary(path: str, statement: Statement, openings: list[Opening], zero: list[StatementRow],
                 as_of: int) -> list[str]:
    """What the statement holds: rows, openings per account, skipped rows, ignored columns."""
    lines = [
        f"{path} ({statement.format}) as of {format_ts(as_of)} (ts {as_of}): {len(statement.rows)} row(s), "
        f"{len(openings)} opening(s), {len(zero)} zero row(s) skipped"
        + (f" (line {', '.join(str(row.line) for row in zero)})" if zero else "")
    ]
    if statement.ignored:
        lines.append(f"ignored {'columns' if statement.format == 'csv' else 'fields'}: {', '.join(statement.ignored)}")
    per_account: dict[str, Counter] = {}
    for opening in openings:
        per_account.setdefault(opening.fill.account, Counter())[opening.fill.symbol] += 1
    for account in sorted(per_account):
        symbols = per_account[account]
        lots = sum(symbols.values())
        lines.append(
            f"  {account}: {len(symbols)} position(s)" + (f" in {lots} lots" if lots != len(symbols) else "")
        )
    identical: dict[tuple, list[int]] = {}
    for opening in openings:
        fill = opening.fill
        identical.setdefault((fill.account, fill.symbol, fill.side, fill.qty, fill.price), []).append(opening.line)
    for (account, symbol, *_), numbers in identical.items():
        if len(numbers) > 1:
            lines.append(
                f"note: lines {', '.join(map(str, numbers))} are identical lots of {account} {symbol}: "
                f"loaded as {len(numbers)} lots (with distinct ids)"
            )
    return lines


def opening_lines(openings: list[Opening], acks: list | None = None) -> list[str]:
    """One line per opening with its id, and what the server did with it (`acks`: the
    PubAcks received so far; None for a dry run)."""
    lines = []
    for index, opening in enumerate(openings):
        fill = opening.fill
        line = (
            f"  line {opening.line}: {fill.account} {fill.symbol} {fill.side} {fill.qty} @ {fill.price} "
            f"-> {fill.fill_id}"
        )
        if acks is not None:
            if index >= len(acks):
                line += ": not published"
            elif acks[index].duplicate:
                line += f": already on the bus (seq {acks[index].seq})"
            else:
                line += f": stored (stream {acks[index].stream}, seq {acks[index].seq})"
        lines.append(line)
    return lines


def fills_stream_spec():
    """The FILLS stream as the services declare it (`posttrade.streams.subjects.fills`)."""
    from posttrade.app import App
    from posttrade.streams import subjects
    from posttrade.streams.memory import MemoryTransport

    return subjects.fills(App("positions_load", MemoryTransport())).stream


async def publish_openings(url: str, fills: list[Fill], acks: list) -> str | None:
    """Publish `fills` in order with Nats-Msg-Id = fill_id, appending each PubAck to
    `acks` as the server stores it; returns the stream's name if it had to be created."""
    import nats
    import nats.js.errors
    from nats.js import api

    from posttrade.streams.nats import server_urls, without_passwords
    from posttrade.streams.subjects import fill_subject

    environ = os.environ
    options = {
        "user": environ.get("POSTTRADE__NATS__USER"),
        "password": environ.get("POSTTRADE__NATS__PASSWORD"),
        "token": environ.get("POSTTRADE__NATS__TOKEN"),
        "user_credentials": environ.get("POSTTRADE__NATS__CREDS_FILE"),
    }
    errors: list[Exception] = []

    async def on_error(exc: Exception) -> None:
        errors.append(exc)

    try:
        nc = await nats.connect(
            servers=server_urls(url), name="posttrade-positions-load", connect_timeout=5, max_reconnect_attempts=2,
            reconnect_time_wait=0.5, error_cb=on_error, **{k: v for k, v in options.items() if v},
        )
    except Exception as exc:  # noqa: BLE001 - nats-py raises several kinds
        why = _describe(errors[-1] if errors else exc)
        raise OSError(f"cannot connect to NATS at {without_passwords(url)}: {why}") from None
    created = None
    try:
        js = nc.jetstream(timeout=10)
        spec = fills_stream_spec()
        try:
            await js.stream_info(spec.name)
        except nats.js.errors.NotFoundError:
            # Created as the services create it (NatsTransport.ensure_stream); an existing
            # stream is never changed from here.
            await js.add_stream(api.StreamConfig(
                name=spec.name, subjects=list(spec.subjects), retention=api.RetentionPolicy.LIMITS,
                storage=api.StorageType.FILE, max_age=spec.max_age_s, max_bytes=spec.max_bytes,
                duplicate_window=spec.duplicate_window_s,
                num_replicas=int(environ.get("POSTTRADE__NATS__REPLICAS") or 1),
            ))
            created = spec.name
        for fill in fills:
            acks.append(await js.publish(
                fill_subject(fill.account, fill.symbol), encode(fill), headers={"Nats-Msg-Id": fill.fill_id},
            ))
    finally:
        await nc.drain()
    return created


def _default_nats_url() -> str:
    from posttrade.stack import endpoints

    return os.environ.get("POSTTRADE__NATS__URL") or endpoints().nats_url

