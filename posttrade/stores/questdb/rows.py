"""The rows of the tables that hold the services' own outputs, built from their events.

* `ptrc_trades` (the trade blotter) and `position_snapshots`, from ptrc's position updates
  on POSITIONS;
* `pnl_snapshots` and `pnl_account_snapshots`, from pnl's snapshots on PNL.

questdb_writer writes them (`layouts.py` has their columns and keys); ptrc's reports,
reconciliation and pnl's `/pnl/history` read them.

A position snapshot carries its money in the instrument's currency and in the account's
base currency (`SnapshotRecord`). The rates are the ones the update itself carries (a
roll's are the rates of the roll's moment, which ptrc put in it), else the rates that
hold at any time (the same currency, a fixed rate): never the rates of the moment the row
happens to be written, so a snapshot stored late, or again, is the same row. The past
day's reports read the roll's rows (`posttrade.core.reports`, "Currencies").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import msgspec

from ...core.bounds import figure_fits
from ...core.exact import format_decimal
from ...core.reference import Reference
from ...core.reports import StoredRates, encode_amounts, encode_currencies
from ...core.valuation import value_position
from ...streams.events import Fill, PnlSnapshot, PositionUpdate

if TYPE_CHECKING:
    from ...streams.stream import EventRecord


# The fill's own inputs are stored as they came (a value DECIMAL(38, 12) cannot hold is
# refused, not rounded); values ptrc derived (P&L, marks) are rounded half to even at 12
# places, like pnl's history.
class TradeRow(msgspec.Struct, frozen=True):
    """One row of the trade blotter (`ptrc_trades`): an execution in its final state, or
    an amendment message itself. `state`: `active` (in force as it arrived), `corrected`,
    `busted`, or `amendment` (a CORRECT or BUST row)."""

    ts: int
    fill_id: str
    account: str
    symbol: str
    side: str | None
    qty: Decimal | None
    price: Decimal | None
    fee: Decimal
    realized_pnl_fill: Decimal | None
    order_id: str | None
    venue: str | None
    net_qty_after: Decimal | None
    exec_type: str
    ref_fill_id: str | None
    state: str


def _row(
    source: Fill | PositionUpdate, state: str, realized: Decimal | None = None, net_qty_after: Decimal | None = None
) -> TradeRow:
    """A row of `source`: an execution or amendment (a Fill), or the message an update
    carries (the same field names)."""
    return TradeRow(
        source.ts, source.fill_id, source.account, source.symbol, source.side, source.qty, source.price,
        source.fee, realized, source.order_id, source.venue, net_qty_after, source.exec_type or "NEW",
        source.ref_fill_id, state,
    )  # type: ignore[arg-type]


def trade_rows(update: PositionUpdate) -> list[TradeRow]:
    """The blotter rows an update writes. A new execution is one row. A CORRECT or BUST
    is a row of its own, plus its execution's row in the final state, which lands on the
    execution's first row (same `ts` and `fill_id`: the table's dedup keys). Amendments
    that were waiting for the execution get rows of their own too."""
    if update.fill_id is None:
        return []  # a roll
    execution, state = update.execution, update.execution_state
    if update.exec_type in ("CORRECT", "BUST"):
        rows = [_row(update, "amendment", update.realized_pnl_fill, update.net_qty)]
        if execution is not None and state is not None:
            rows.append(_row(execution, state))
        return rows
    if execution is None or state is None:
        return [_row(update, "active", update.realized_pnl_fill, update.net_qty)]
    return [_row(execution, state, update.realized_pnl_fill, update.net_qty)] + [
        _row(amendment, "amendment") for amendment in update.released
    ]


class SnapshotRecord(msgspec.Struct, frozen=True):
    """One row of `position_snapshots`: the update's figures in the instrument's
    `currency`, and in the account's `base_currency` at `fx_rate` (the module doc says
    which rates). A base figure whose rate is unknown is NULL, and the currency is in
    `missing_rates`; a base figure DECIMAL(38, 12) cannot hold (26 integer digits or
    more) is NULL too, rather than the snapshot being refused."""

    ts: int
    account: str
    symbol: str
    reason: str
    net_qty: Decimal
    avg_open_price: Decimal | None
    realized_pnl_gross: Decimal
    fees: Decimal
    realized_pnl_net: Decimal
    mark: Decimal | None
    unrealized_pnl: Decimal | None
    day_pnl: Decimal | None
    currency: str
    base_currency: str
    fx_rate: str | None  # exact text: a cross rate has more places than DECIMAL(38, 12) keeps
    foreign_fees: str | None  # fees in other currencies, {"BNB":"0.02"}
    foreign_fee_rates: str | None  # their rates to the base, when known
    realized_pnl_gross_base: Decimal | None
    fees_base: Decimal | None
    realized_pnl_net_base: Decimal | None
    unrealized_pnl_base: Decimal | None
    total_pnl_base: Decimal | None
    day_pnl_base: Decimal | None
    missing_rates: str | None  # comma-separated currencies; NULL when none


def _fitting(value: Decimal | None) -> Decimal | None:
    return value if figure_fits(value) else None


def snapshot_record(update: PositionUpdate, reference: Reference | None = None) -> SnapshotRecord:
    """The snapshot row of `update`, valued at its own mark and at the rates it carries
    (`fx_rates` to `base_currency`, which ptrc sets on a roll), else at the rates that
    hold at any time under `reference` (default: everything in USD)."""
    reference = reference or Reference()
    rates = StoredRates(reference, update.base_currency, update.fx_rates)
    value = value_position(update, update.mark, rates)
    fee_rates = {}
    for currency in value.foreign_fees:
        rate = rates.rate(currency, value.base_currency)
        if rate is not None:
            fee_rates[currency] = rate.rate
    return SnapshotRecord(
        update.ts, update.account, update.symbol, update.reason, update.net_qty, update.avg_open_price,
        update.realized_pnl_gross, update.fees, update.realized_pnl_net, update.mark, update.unrealized_pnl,
        update.day_pnl, value.currency, value.base_currency,
        None if value.fx_rate is None else format_decimal(value.fx_rate),
        encode_amounts(value.foreign_fees), encode_amounts(fee_rates),
        _fitting(value.realized_pnl_gross_base), _fitting(value.fees_base), _fitting(value.realized_pnl_net_base),
        _fitting(value.unrealized_pnl_base), _fitting(value.total_pnl_base), _fitting(value.day_pnl_base),
        encode_currencies(value.missing_rates),
    )


def latest_per_position(records: list[EventRecord]) -> list[EventRecord]:
    """A batch's snapshots: each position as the batch's last fill left it, and every
    roll (the start-of-day snapshot reports value the day from).

    Every fill's own result is in `ptrc_trades` (`net_qty_after`, `realized_pnl_fill`);
    a snapshot per fill would repeat it at a QuestDB row (and commit work) per fill. So
    the table holds each position at least every `batch.interval_sec` it changed.
    """
    last: dict[tuple[str, str], EventRecord] = {}
    rolls: list[EventRecord] = []
    for record in records:
        update = record.value
        if update.reason == "fill":
            last[(update.account, update.symbol)] = record
        else:
            rolls.append(record)
    return [*rolls, *last.values()] if rolls else list(last.values())


# -- a batch of an output channel's records → records of rows ---------------------------


def blotter_rows(records: Sequence[EventRecord], reference: Reference | None) -> list[EventRecord]:
    """`ptrc_trades`: each update's executions and amendments; a row keeps its update's
    record, so a row that can never be written dead-letters the update it came from."""
    return [replace(r, value=row) for r in records for row in trade_rows(r.value)]


def position_snapshot_rows(records: Sequence[EventRecord], reference: Reference | None) -> list[EventRecord]:
    """`position_snapshots`: each position as the batch left it, and every roll."""
    return [replace(r, value=snapshot_record(r.value, reference)) for r in latest_per_position(list(records))]


class Stamped:
    """A row of a pnl snapshot with the snapshot's `ts` (the rows themselves carry `as_of`)."""

    __slots__ = ("ts", "row")

    def __init__(self, ts: int, row: Any):
        self.ts = ts
        self.row = row

    def __getattr__(self, name: str) -> Any:
        return getattr(self.row, name)


def pnl_position_rows(records: Sequence[EventRecord], reference: Reference | None) -> list[EventRecord]:
    return [replace(r, value=Stamped(r.value.ts, row)) for r in records for row in _snapshot(r).positions]


def pnl_account_rows(records: Sequence[EventRecord], reference: Reference | None) -> list[EventRecord]:
    return [replace(r, value=Stamped(r.value.ts, row)) for r in records for row in _snapshot(r).accounts]


def _snapshot(record: EventRecord) -> PnlSnapshot:
    return record.value
