"""Reconciliation: compare two sets of positions and list the breaks. Pure and exact.

ptrc reconciles its live positions against a *replay*: the historical fill stream
applied to a fresh `PositionBook` (the book of record), and optionally an external
statement (a broker's or custodian's CSV) against the same replay. This module holds
what is compared, how, and how a statement is read; `posttrade.agents.reconciliation`
does the replay and the I/O.

What is compared, per (account, symbol)
---------------------------------------
`PositionFigures`: `net_qty`, `avg_open_price` (None when flat) and `realized_pnl`,
which is the realized P&L *net of fees* (`Position.realized_pnl_net`, average cost).
Each field has its own tolerance (`Tolerance`, all 0 by default: the live service and
the replay run the same exact core, so they agree to the last digit). A field breaks
when `|other - replay| > tolerance`; an average price breaks when one side has one and
the other does not (one flat, one open) or beyond the tolerance otherwise.

A key present on only one side is a single break of field `position` (with
`missing_from` naming the side without it), unless the side that has it holds nothing
to reconcile: flat with zero realized P&L (statements usually leave those out).

Statements
----------
CSV with a header row; columns, in any order, names case-insensitive:

    account, symbol, net_qty, avg_open_price, realized_pnl

Other columns are ignored. `net_qty` is signed (negative: short). `avg_open_price` may
be empty only when `net_qty` is 0. `realized_pnl` is realized P&L net of fees. Numbers
are plain decimals (`-12.5`, `1e3`; no thousands separators). Blank lines are skipped.
Every problem is reported with its line number (`StatementError.errors`), up to
`MAX_STATEMENT_ERRORS`.
"""

from __future__ import annotations

import csv
import io
from decimal import Decimal, InvalidOperation
from typing import Iterable, Literal, Mapping

import msgspec

from posttrade.core.exact import EXACT, ZERO
from posttrade.core.positions import Position

Key = tuple[str, str]  # (account, symbol)

Field = Literal["net_qty", "avg_open_price", "realized_pnl", "position"]

STATEMENT_COLUMNS = ("account", "symbol", "net_qty", "avg_open_price", "realized_pnl")
MAX_STATEMENT_ERRORS = 50


class Tolerance(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How far apart two figures may be before they break (absolute, >= 0)."""

    qty: Decimal = ZERO
    avg_price: Decimal = ZERO
    realized_pnl: Decimal = ZERO

    def __post_init__(self) -> None:
        for name in ("qty", "avg_price", "realized_pnl"):
            value = getattr(self, name)
            if not value.is_finite() or value < 0:
                raise ValueError(f"tolerance {name} must be a finite number >= 0, got {value}")


class PositionFigures(msgspec.Struct, frozen=True, kw_only=True):
    """The figures of one position that reconciliation compares."""

    account: str
    symbol: str
    net_qty: Decimal
    avg_open_price: Decimal | None
    realized_pnl: Decimal  # net of fees

    @property
    def key(self) -> Key:
        return (self.account, self.symbol)

    @property
    def holds_nothing(self) -> bool:
        """Flat and nothing realized: a side may leave such a position out."""
        return not self.net_qty and not self.realized_pnl


def figures_of(position: Position) -> PositionFigures:
    return PositionFigures(
        account=position.account,
        symbol=position.symbol,
        net_qty=position.net_qty,
        avg_open_price=position.avg_open_price,
        realized_pnl=position.realized_pnl_net,
    )


class Break(msgspec.Struct, frozen=True, kw_only=True):
    """One disagreement between the replay and another side (`against`).

    For a figure (`net_qty`, `avg_open_price`, `realized_pnl`): both values, the
    difference `other - replay` (None when one value is None) and the tolerance it
    exceeded. For `position`: the key is missing from one side (`missing_from`); `replay`
    and `other` then carry the net quantity of the side that has it (None on the other).
    `value_at_mark` is the net quantity difference valued at the mark
    (`difference x mark x multiplier`) for `net_qty` and `position` breaks when a mark
    is known: how much money the break is worth, to sort by.
    """

    against: str  # "live" | "statement"
    account: str
    symbol: str
    field: Field
    replay: Decimal | None
    other: Decimal | None
    difference: Decimal | None = None
    tolerance: Decimal | None = None
    missing_from: str | None = None  # "replay" | "live" | "statement" (field == "position")
    value_at_mark: Decimal | None = None


def compare_positions(
    replay: Mapping[Key, PositionFigures],
    other: Mapping[Key, PositionFigures],
    *,
    against: str,
    tolerance: Tolerance = Tolerance(),
) -> list[Break]:
    """Every break between the replayed figures and `other`, sorted by (account, symbol, field)."""
    breaks: list[Break] = []
    for key in sorted(set(replay) | set(other)):
        mine = replay.get(key)
        theirs = other.get(key)
        account, symbol = key
        if mine is None or theirs is None:
            present = mine if mine is not None else theirs
            if present.holds_nothing:
                continue
            breaks.append(
                Break(
                    against=against,
                    account=account,
                    symbol=symbol,
                    field="position",
                    replay=mine.net_qty if mine is not None else None,
                    other=theirs.net_qty if theirs is not None else None,
                    difference=EXACT.subtract(
                        theirs.net_qty if theirs is not None else ZERO, mine.net_qty if mine is not None else ZERO
                    ),
                    missing_from="replay" if mine is None else against,
                )
            )
            continue
        for field, mine_value, their_value, allowed in (
            ("net_qty", mine.net_qty, theirs.net_qty, tolerance.qty),
            ("avg_open_price", mine.avg_open_price, theirs.avg_open_price, tolerance.avg_price),
            ("realized_pnl", mine.realized_pnl, theirs.realized_pnl, tolerance.realized_pnl),
        ):
            if mine_value is None and their_value is None:
                continue
            if mine_value is None or their_value is None:
                breaks.append(
                    Break(
                        against=against, account=account, symbol=symbol, field=field,
                        replay=mine_value, other=their_value, tolerance=allowed,
                    )
                )
                continue
            difference = EXACT.subtract(their_value, mine_value)
            if EXACT.abs(difference) > allowed:
                breaks.append(
                    Break(
                        against=against, account=account, symbol=symbol, field=field,
                        replay=mine_value, other=their_value, difference=difference, tolerance=allowed,
                    )
                )
    return breaks


def value_breaks(
    breaks: Iterable[Break], marks: Mapping[str, Decimal | None], multipliers: Mapping[str, Decimal]
) -> list[Break]:
    """`breaks` with `value_at_mark` set for quantity breaks whose symbol has a mark."""
    out = []
    for item in breaks:
        mark = marks.get(item.symbol)
        if item.field in ("net_qty", "position") and item.difference is not None and mark is not None:
            value = EXACT.multiply(EXACT.multiply(item.difference, mark), multipliers.get(item.symbol, Decimal(1)))
            item = msgspec.structs.replace(item, value_at_mark=value)
        out.append(item)
    return out


# -- statements ---------------------------------------------------------------------------


class StatementError(ValueError):
    """A statement that cannot be used; `errors` lists `(line, reason)`, line 1-based."""

    def __init__(self, errors: list[tuple[int, str]], truncated: bool = False):
        self.errors = errors
        self.truncated = truncated
        text = "; ".join(f"line {line}: {reason}" for line, reason in errors)
        super().__init__(text + ("; (more errors not shown)" if truncated else ""))

    def detail(self) -> dict:
        """JSON-ready, for a 400 answer."""
        return {
            "error": "invalid statement",
            "errors": [{"line": line, "error": reason} for line, reason in self.errors],
            "truncated": self.truncated,
        }


def parse_statement(text: str) -> dict[Key, PositionFigures]:
    """The positions of a statement (see the module doc), keyed by (account, symbol).

    Raises StatementError listing every bad line (up to MAX_STATEMENT_ERRORS).
    """
    if text.startswith("\ufeff"):
        text = text[1:]  # a byte-order mark, as spreadsheets write it
    errors: list[tuple[int, str]] = []
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header: list[str] | None = None
    columns: dict[str, int] = {}
    positions: dict[Key, PositionFigures] = {}
    line_of: dict[Key, int] = {}
    previous_end = 0
    truncated = False
    try:
        for row in reader:
            line = previous_end + 1  # where this record starts (a quoted field may span lines)
            previous_end = reader.line_num
            if not row or all(not cell.strip() for cell in row):
                continue
            if header is None:
                header = [cell.strip().lower() for cell in row]
                columns, problem = _header_columns(header)
                if problem:
                    raise StatementError([(line, problem)])
                continue
            if len(row) != len(header):
                errors.append((line, f"expected {len(header)} fields like the header, got {len(row)}"))
            else:
                try:
                    figures = _statement_row(row, columns)
                except ValueError as exc:
                    errors.append((line, str(exc)))
                else:
                    first = line_of.get(figures.key)
                    if first is not None:
                        errors.append((line, f"{figures.account}/{figures.symbol} appears twice (first on line {first})"))
                    else:
                        line_of[figures.key] = line
                        positions[figures.key] = figures
            if len(errors) >= MAX_STATEMENT_ERRORS:
                truncated = True
                break
    except csv.Error as exc:
        errors.append((reader.line_num, f"not valid CSV: {exc}"))
    if header is None and not errors:
        raise StatementError([(1, "the statement is empty: it needs a header row " + ",".join(STATEMENT_COLUMNS))])
    if errors:
        raise StatementError(errors, truncated)
    return positions


def _header_columns(header: list[str]) -> tuple[dict[str, int], str | None]:
    columns: dict[str, int] = {}
    for index, name in enumerate(header):
        if name in STATEMENT_COLUMNS:
            if name in columns:
                return columns, f"column {name!r} appears twice in the header"
            columns[name] = index
    missing = [name for name in STATEMENT_COLUMNS if name not in columns]
    if missing:
        return columns, (
            f"the header lacks {', '.join(missing)} (needs {', '.join(STATEMENT_COLUMNS)}; got {', '.join(header)})"
        )
    return columns, None


def _decimal(name: str, raw: str, *, required: bool) -> Decimal | None:
    text = raw.strip()
    if not text:
        if required:
            raise ValueError(f"{name} is empty")
        return None
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise ValueError(f"{name} is not a decimal number: {text!r}") from None
    if not value.is_finite():
        raise ValueError(f"{name} must be a finite number, got {text!r}")
    return value


def _statement_row(row: list[str], columns: dict[str, int]) -> PositionFigures:
    account = row[columns["account"]].strip()
    symbol = row[columns["symbol"]].strip()
    if not account:
        raise ValueError("account is empty")
    if not symbol:
        raise ValueError("symbol is empty")
    net_qty = _decimal("net_qty", row[columns["net_qty"]], required=True)
    avg = _decimal("avg_open_price", row[columns["avg_open_price"]], required=False)
    realized = _decimal("realized_pnl", row[columns["realized_pnl"]], required=True)
    assert net_qty is not None and realized is not None
    if net_qty and avg is None:
        raise ValueError("avg_open_price is empty for an open position (net_qty != 0)")
    if avg is not None and avg <= 0:
        raise ValueError(f"avg_open_price must be > 0, got {avg}")
    if not net_qty:
        avg = None  # a flat position has no average, whatever the file says
    return PositionFigures(account=account, symbol=symbol, net_qty=net_qty, avg_open_price=avg, realized_pnl=realized)
