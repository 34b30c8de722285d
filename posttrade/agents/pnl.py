"""Real-time P&L: ptrc's positions valued at market, per (account, symbol) and per account.

pnl never re-derives a position from fills: ptrc owns positions and publishes a
`PositionUpdate` after every change (`posttrade.streams.events.PositionUpdate`). That
event carries the cost basis under both methods and the start-of-day values, so pnl
values it at any mark with the core's one valuation,
`posttrade.core.valuation.value_position` (the formulas, and which values are unknown
without a mark, are documented there), and sums accounts with the core's
`AccountSums`. What pnl adds is where the mark came from and when (`PositionPnl`,
`AccountPnl`).

State, and what makes it exact once
-----------------------------------
Two changelog tables hold everything pnl knows; the rest is derived from them:

* `positions`: (account, symbol) -> the `PositionUpdate` with the highest `revision`.
  ptrc counts a key's revision up with every update. Not the newest `ts`: a late
  fill, a correction or a bust changes the position *now*, but its update carries
  the (older) time of the execution it concerns;
* `marks`: symbol -> `MarkState`, the latest quote mid, market trade and bar close.

Both are written with the tables' per-key input sequences (`Table.apply`), so a
redelivered or replayed message changes nothing. `PnlBook` keeps the derived values
(`PositionPnl` rows, account totals) in memory and can rebuild them from the
tables at any time (`resync`: at start and after an agent crash rolled tables back).

Revaluation is lazy, which is what coalesces price ticks: a mark change only marks its
symbol stale (the price is compared first: a tick that leaves the mark unchanged costs
nothing more). Stale symbols are revalued, each once, by `refresh()`, which every
reader calls first: the web page (for the symbols it answers), the Valkey writer, the
snapshots. A position update is valued at once (one row). Readers learn what
changed from `Changes` sets (one per consumer; the Valkey writer has one for position
updates and one for price moves, written on different cadences), so each writes every
changed row once however many ticks moved it.

`as_of` on a row is the event time (epoch ns) of the newest input that changed its
values: the position update's `ts` or the `ts` of the market data that set the current
mark price (for a bar, its end: open time + interval). The update of a late fill has
the late fill's time, so a row's `as_of` can move back. An account's `as_of` is the
newest of its rows' (so it is what the tables give again after a restart).

pnl's history leaves the process on the bus: `PnlSnapshots` publishes the changed rows
(and now and then every row) on the PNL stream, from which questdb_writer stores them
in QuestDB; `/pnl/history` reads them back (`stores/questdb/pnl_history.py`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

import msgspec
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ..app import App
from ..core.bars import NS_PER_S, interval_seconds
from ..core.exact import EXACT, format_decimal
from ..core.fx import FxRates
from ..core.marks import DEFAULT_PRIORITY, MarkSource, MarkState
from ..core.reference import Reference
from ..core.valuation import AccountSums, AccountValue, PositionValue, value_position
from ..sinks import RetryPolicy, Sink, SinkStopping
from ..stores.questdb.pnl_history import Unfit, snapshot_decimal
from ..streams.channel import Channel
from ..streams.events import (
    Bar,
    MarketTrade,
    PnlAccountRow,
    PnlPositionRow,
    PnlSnapshot,
    PositionUpdate,
    Quote,
    encode,
)
from ..streams.stream import Stream
from ..streams.subjects import PNL_SNAPSHOT_SUBJECT
from ..streams.transport import PublishFailed, StartPosition, message_size
from ..tables.table import Table

log = logging.getLogger(__name__)

Key = tuple[str, str]  # (account, symbol)
#: (price, source, event time ns). Source "position" is ptrc's own mark, used only
#: while no market data mark is known for the symbol.
Mark = tuple[Decimal, str, int]

_TWO = Decimal(2)


# -- the values --------------------------------------------------------------------------


class PositionPnl(msgspec.Struct, frozen=True, kw_only=True):
    """One (account, symbol) as pnl serves it: the core's valuation of the update held
    for it (the highest revision) at pnl's mark, and where that mark and that update
    came from."""

    value: PositionValue
    mark_source: str | None  # quote_mid | last_trade | bar_close | position; None: no mark
    mark_ts: int | None
    position_ts: int  # ts of the PositionUpdate
    as_of: int  # the newer of position_ts and mark_ts


class AccountPnl(msgspec.Struct, frozen=True, kw_only=True):
    """One account's totals (the core's `AccountValue`) and the newest `as_of` of its
    rows."""

    value: AccountValue
    as_of: int


def value_update(update: PositionUpdate, mark: Mark | None, fx: FxRates | None = None) -> PositionPnl:
    """`update`'s position valued at `mark` (price, source, event time), or unmarked, and
    in its account's base currency at `fx`'s rates."""
    if mark is None:
        return PositionPnl(
            value=value_position(update, None, fx), mark_source=None, mark_ts=None, position_ts=update.ts,
            as_of=update.ts,
        )
    price, source, mark_ts = mark
    return PositionPnl(
        value=value_position(update, price, fx),
        mark_source=source,
        mark_ts=mark_ts,
        position_ts=update.ts,
        as_of=update.ts if mark_ts < update.ts else mark_ts,
    )


def canonical(value: Decimal) -> str:
    """`format_decimal(value)` (plain notation, no trailing fractional zeros, no
    negative zero), about three times faster for the usual case: str() of a Decimal is
    already plain unless it uses an exponent, and then only zeros need stripping."""
    text = str(value)
    if "E" in text:
        return format_decimal(value)
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


def plain_data(row: PositionPnl | AccountPnl) -> dict[str, Any]:
    """JSON-ready fields, flat: the value's figures, then the row's own fields. Every
    number a canonical decimal string (as `format_decimal` spells it), timestamps
    integer epoch ns, unknown values None."""
    value = row.value
    out: dict[str, Any] = {}
    for name in value.__struct_fields__:
        field = getattr(value, name)
        if type(field) is Decimal:
            out[name] = canonical(field)
        elif name in _NESTED:
            out[name] = _canonical_nested(field)
        else:
            out[name] = field
    for name in row.__struct_fields__:
        if name != "value":
            out[name] = getattr(row, name)
    return out


#: Fields holding decimals inside containers (the rate's legs, fees by currency).
_NESTED = frozenset({"fx_legs", "foreign_fees"})


def _canonical_nested(value: Any) -> Any:
    data = msgspec.to_builtins(value, builtin_types=(Decimal,))
    if isinstance(data, dict):
        return {k: canonical(v) if type(v) is Decimal else _canonical_nested(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_canonical_nested(v) for v in data]
    return canonical(data) if type(data) is Decimal else data


_json = msgspec.json.Encoder()


def to_json(row: PositionPnl | AccountPnl) -> bytes:
    return _json.encode(plain_data(row))


# -- change tracking ---------------------------------------------------------------------


class Changes:
    """Keys and accounts changed since a consumer last took them."""

    __slots__ = ("keys", "accounts")

    def __init__(self) -> None:
        self.keys: set[Key] = set()
        self.accounts: set[str] = set()

    def __bool__(self) -> bool:
        return bool(self.keys or self.accounts)

    def take(self) -> tuple[set[Key], set[str]]:
        keys, accounts = self.keys, self.accounts
        self.keys, self.accounts = set(), set()
        return keys, accounts

    def give_back(self, keys: Iterable[Key], accounts: Iterable[str]) -> None:
        """Return what a failed write took, to be written with the next changes."""
        self.keys.update(keys)
        self.accounts.update(accounts)


# -- the book ----------------------------------------------------------------------------


class PnlBook:
    """The P&L of every position pnl has heard of, kept current from two tables.

    `positions`: Table[(account, symbol) -> PositionUpdate]; `marks`: Table[symbol ->
    MarkState] (default `MarkState()`). Call the `on_*` methods from agents (they write
    the tables, so they must run inside an agent for exactly-once effects).
    """

    def __init__(
        self,
        positions: Table,
        marks: Table,
        *,
        priority: tuple[MarkSource, ...] = DEFAULT_PRIORITY,
        use_position_mark: bool = True,
        reference: Reference | None = None,
    ):
        self.positions = positions
        self.marks = marks
        self.reference = reference or Reference()
        self.fx = FxRates(self.reference, self._marks_get)
        self._fx_symbols = self.reference.fx_symbols()
        self.priority = tuple(priority)
        self.use_position_mark = use_position_mark
        # What readers have not written yet. The Valkey writer keeps two: changes
        # a position update made (written promptly) and revaluations a price move
        # made (written on a slower cadence: prices move all the time, and every
        # move rewrites every position in the symbol).
        self.cache_changes = Changes()
        self.cache_price_changes = Changes()
        self.snapshot_changes = Changes()  # for the snapshots (`PnlSnapshots`)
        self.on_change: Callable[[], None] | None = None  # wakes the Valkey writer
        # Told the key of every revalued row (the page's live account figures and top
        # movers, web/pnl.py: a set insert or two, nothing more).
        self.on_row_change: Callable[[Key], None] | None = None
        self.revaluations = 0  # rows valued (after position updates and mark changes)
        self._rows: dict[Key, PositionPnl] = {}
        self._json: dict[Key, bytes] = {}
        self._by_account: dict[str, dict[str, Key]] = {}
        self._holders: dict[str, set[Key]] = {}  # symbol -> keys holding it
        self._marks: dict[str, Mark] = {}  # the market data mark in use per symbol
        self._stale: set[str] = set()  # symbols whose mark moved since their rows were valued
        # (currency, base) -> the symbols held whose rows convert through it (their own
        # currency, or a fee currency): what an FX instrument's move makes stale.
        self._conversions: dict[tuple[str, str], set[str]] = {}
        self._sums: dict[str, AccountSums] = {}
        self._as_of: dict[str, int] = {}  # per account: the newest as_of of its rows
        self._totals: dict[str, AccountPnl] = {}  # built from _sums on demand
        self._totals_json: dict[str, bytes] = {}

    # -- input ---------------------------------------------------------------------

    def on_position(self, update: PositionUpdate) -> bool:
        """Take ptrc's state of one position unless a later revision of it is held;
        False if nothing changed (that, or this event already did)."""
        key = (update.account, update.symbol)
        positions = self.positions
        if positions.already_applied(key):
            return False
        held = positions.get(key)
        if held is not None and update.revision < held.revision:
            # An older state published after a newer one (a republish, a replay of
            # ptrc's output): the revision orders a key's updates, arrival does not,
            # and neither does `ts` (a late fill's update is stamped with its time).
            # A tie is the same update again, or updates from before revisions
            # were counted: the later in stream order wins.
            return False
        positions[key] = update
        self._index(key)
        self._value(key, update)
        return True

    def on_quote(self, quote: Quote) -> None:
        mid = EXACT.divide(EXACT.add(quote.bid, quote.ask), _TWO)  # exact: halving terminates
        self._mark_input(quote.symbol, lambda state: state.with_quote(mid, quote.ts))

    def on_trade(self, trade: MarketTrade) -> None:
        self._mark_input(trade.symbol, lambda state: state.with_trade(trade.price, trade.ts))

    def on_bar(self, bar: Bar) -> None:
        self._mark_input(bar.symbol, lambda state: state.with_bar_close(bar.close, bar_end(bar)))

    def _mark_input(self, symbol: str, change: Callable[[MarkState], MarkState]) -> None:
        state = self.marks.apply(symbol, change)
        selected = state.mark(self.priority)
        if selected is None:
            return
        held = self._marks.get(symbol)
        if held is not None and held[0] == selected[0]:
            return  # same price: the P&L does not move (and as_of stays when it last did)
        self._marks[symbol] = selected
        if symbol in self._holders:
            self._stale.add(symbol)
        if symbol in self._fx_symbols:
            rate_symbols = self.reference.rate_symbols
            for (currency, base), symbols in self._conversions.items():
                if symbol in rate_symbols(currency, base):
                    self._stale.update(symbols)

    # -- derived state ---------------------------------------------------------------

    def _index(self, key: Key) -> None:
        account, symbol = key
        symbols = self._by_account.get(account)
        if symbols is None:
            symbols = self._by_account[account] = {}
        if symbol not in symbols:
            symbols[symbol] = key
            self._holders.setdefault(symbol, set()).add(key)

    def _marks_get(self, symbol: str) -> Mark | None:
        return self._marks.get(symbol)

    def _note_conversions(self, value: PositionValue) -> None:
        base, symbol = value.base_currency, value.symbol
        for currency in (value.currency, *value.foreign_fees):
            if currency != base:
                self._conversions.setdefault((currency, base), set()).add(symbol)

    def _mark_of(self, update: PositionUpdate) -> Mark | None:
        mark = self._marks.get(update.symbol)
        if mark is None and self.use_position_mark and update.mark is not None:
            return (update.mark, "position", update.ts)
        return mark

    def _value(self, key: Key, update: PositionUpdate, cache: Changes | None = None) -> None:
        row = value_update(update, self._mark_of(update), self.fx)
        self._note_conversions(row.value)
        account = key[0]
        sums = self._sums.get(account)
        if sums is None:
            sums = self._sums[account] = AccountSums()
        old = self._rows.get(key)
        if old is not None:
            sums.remove(old.value)
        sums.add(row.value)
        self._rows[key] = row
        newest = self._as_of.get(account)
        if newest is None or row.as_of >= newest:
            self._as_of[account] = row.as_of
        elif old is not None and old.as_of == newest:
            # The account's newest row moved back in time (a late fill's update):
            # the newest is now among all of them. Rare, so a scan is fine.
            rows = self._rows
            self._as_of[account] = max(rows[k].as_of for k in self._by_account[account].values())
        self._json.pop(key, None)
        self._totals.pop(account, None)
        self._totals_json.pop(account, None)
        self.revaluations += 1
        cache = self.cache_changes if cache is None else cache
        cache.keys.add(key)
        cache.accounts.add(account)
        self.snapshot_changes.keys.add(key)
        self.snapshot_changes.accounts.add(account)
        if cache is self.cache_changes and self.on_change is not None:
            self.on_change()
        if self.on_row_change is not None:
            self.on_row_change(key)

    def refresh(self, symbols: Iterable[str] | None = None, *, limit: int | None = None) -> bool:
        """Revalue the positions in every symbol whose mark moved (each once), or
        only in `symbols` (a reader that needs no more). With `limit`, stop once about
        that many rows are done (whole symbols at a time) and return True if stale
        symbols remain: a background writer refreshes in slices between which the
        agents get to run."""
        if not self._stale:
            return False
        if symbols is None:
            stale = self._stale
        else:
            stale = self._stale.intersection(symbols)
        positions = self.positions
        done = 0
        for symbol in list(stale):
            if limit is not None and done >= limit:
                return True
            self._stale.discard(symbol)
            for key in self._holders.get(symbol, ()):
                update = positions.get(key)
                if update is not None:
                    self._value(key, update, self.cache_price_changes)
                    done += 1
        return False

    def resync(self) -> None:
        """Rebuild every derived value from the tables (at start; after a rollback)."""
        self._rows.clear()
        self._json.clear()
        self._by_account.clear()
        self._holders.clear()
        self._marks.clear()
        self._stale.clear()
        self._conversions.clear()
        self._sums.clear()
        self._as_of.clear()
        self._totals.clear()
        self._totals_json.clear()
        for symbol, state in self.marks.items():
            selected = state.mark(self.priority)
            if selected is not None:
                self._marks[symbol] = selected
        for key, update in self.positions.items():
            self._index(key)
            self._value(key, update)

    def mark_all_changed(self, changes: Changes) -> None:
        changes.keys.update(self._rows)
        changes.accounts.update(self._by_account)

    # -- reads (call refresh() first for current values) --------------------------------

    def __len__(self) -> int:
        return len(self._rows)

    def row(self, key: Key) -> PositionPnl | None:
        return self._rows.get(key)

    def row_json(self, key: Key) -> bytes | None:
        cached = self._json.get(key)
        if cached is None:
            row = self._rows.get(key)
            if row is None:
                return None
            cached = self._json[key] = to_json(row)
        return cached

    def keys(self, account: str | None = None, symbol: str | None = None) -> list[Key]:
        """Keys sorted by (account, symbol), optionally filtered."""
        if account is not None and symbol is not None:
            return [(account, symbol)] if (account, symbol) in self._rows else []
        if symbol is not None:
            return sorted(self._holders.get(symbol, ()))
        if account is not None:
            symbols = self._by_account.get(account, {})
            return [symbols[s] for s in sorted(symbols)]
        return sorted(self._rows)

    def symbols(self, account: str) -> list[str]:
        return list(self._by_account.get(account, ()))

    def accounts(self) -> list[str]:
        return sorted(self._by_account)

    def totals(self, account: str) -> AccountPnl | None:
        cached = self._totals.get(account)
        if cached is None:
            sums = self._sums.get(account)
            if sums is None:
                return None
            cached = self._totals[account] = AccountPnl(value=sums.value(account), as_of=self._as_of[account])
        return cached

    def totals_json(self, account: str) -> bytes | None:
        cached = self._totals_json.get(account)
        if cached is None:
            totals = self.totals(account)
            if totals is None:
                return None
            cached = self._totals_json[account] = to_json(totals)
        return cached


def bar_end(bar: Bar) -> int:
    """When a bar's close was the price: the end of its interval (its open time if
    the interval is not one we can read)."""
    try:
        return bar.ts + interval_seconds(bar.interval) * NS_PER_S
    except ValueError:
        return bar.ts


# -- agents ------------------------------------------------------------------------------


@dataclass(frozen=True)
class PnlChannels:
    positions: Channel
    quotes: Channel
    trades: Channel
    bars: Channel


class PnlAgentMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.visible_seconds = Histogram(
            "pnl_position_visible_seconds",
            "From a PositionUpdate stored in JetStream to its P&L being served from memory",
            registry=registry,
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5),
        )
        self.mark_inputs = Counter("pnl_mark_inputs_total", "Market data events taken into marks", ["kind"], registry=registry)


#: Where a new durable consumer starts: the newest message of every subject, i.e. the
#: latest update of each position (`posttrade.positions.<account>.<symbol>`) and the
#: latest quote / trade / bar of each symbol, then everything new. Later starts resume
#: at the consumer's ack floor.
START = StartPosition(last_per_subject=True)


def add_pnl_agents(app: App, channels: PnlChannels, book: PnlBook) -> PnlAgentMetrics:
    """The four agents that keep `book` current: positions and three market data feeds."""
    metrics = PnlAgentMetrics(app.metrics.registry)
    visible = metrics.visible_seconds

    def follow_the_tables_back() -> None:
        # A crash rolled the tables back: values derived from them may be ahead.
        book.resync()
        book.mark_all_changed(book.cache_changes)
        book.mark_all_changed(book.snapshot_changes)

    @app.agent(channels.positions, name="value_positions", start=START, on_rollback=follow_the_tables_back)
    async def value_positions(stream: Stream) -> None:
        on_position = book.on_position
        async for record in stream.events():
            if on_position(record.value):
                visible.observe(max(0, time.time_ns() - record.ts) / 1e9)

    def market_agent(channel: Channel, name: str, take: Callable[[Any], None]) -> None:
        counter = metrics.mark_inputs.labels(name)

        @app.agent(channel, name=f"mark_{name}", start=START, on_rollback=follow_the_tables_back)
        async def take_marks(stream: Stream) -> None:
            async for event in stream:
                take(event)
                counter.inc()

    market_agent(channels.quotes, "quotes", book.on_quote)
    market_agent(channels.trades, "trades", book.on_trade)
    market_agent(channels.bars, "bars", book.on_bar)
    return metrics


# -- background readers ------------------------------------------------------------------

#: Rows a background reader (the Valkey writer, the snapshots, the page) handles before
#: it yields to the event loop: a position update waiting behind it waits at most about
#: this much work (~64 rows x 30-50 us), not a whole flush or snapshot.
SLICE = 64


async def refresh_in_slices(book: PnlBook) -> None:
    """`book.refresh()`, a slice at a time, yielding to the agents in between."""
    while book.refresh(limit=SLICE):
        await asyncio.sleep(0)


# -- snapshots: pnl's history, on its way to QuestDB -------------------------------------

#: Rows per PnlSnapshot message. A position row is a few hundred bytes of JSON (2 KB at
#: the very most), so a message stays well under NATS's 1 MB max_payload; one that
#: would not (a server with a smaller one) is split.
ROWS_PER_MESSAGE = 200
#: Messages published in one go (pipelined, every PubAck awaited): what one failed
#: attempt publishes again.
PUBLISH_WINDOW = 64
_MSG_ID_HEADER = "Nats-Msg-Id"

# The money of a snapshot row: its Decimal fields (the row types list them once).
POSITION_MONEY, ACCOUNT_MONEY = (
    tuple(f.name for f in msgspec.structs.fields(row) if f.type in (Decimal, Decimal | None))
    for row in (PnlPositionRow, PnlAccountRow)
)


def position_row(row: PositionPnl) -> PnlPositionRow:
    """A position as its snapshot row: money as QuestDB stores it (`snapshot_decimal`).
    Raises Unfit (or InvalidOperation) for a figure the table cannot hold."""
    value = row.value
    return PnlPositionRow(
        account=value.account, symbol=value.symbol, as_of=row.as_of, currency=value.currency,
        base_currency=value.base_currency, mark_source=row.mark_source, fill_count=value.fill_count,
        fx_rate=None if value.fx_rate is None else format_decimal(value.fx_rate),
        **{name: snapshot_decimal(getattr(value, name)) for name in POSITION_MONEY},
    )  # fmt: skip


def account_row(totals: AccountPnl) -> PnlAccountRow:
    """An account's totals as their snapshot row (see `position_row`)."""
    value = totals.value
    return PnlAccountRow(
        account=value.account, as_of=totals.as_of, base_currency=value.base_currency, positions=value.positions,
        open_positions=value.open_positions, missing_rates=",".join(value.missing_rates) or None,
        **{name: snapshot_decimal(getattr(value, name)) for name in ACCOUNT_MONEY},
    )  # fmt: skip


async def snapshot_rows(rows: list, convert: Callable[[Any], Any]) -> tuple[list, list[tuple[Any, str]]]:
    """`rows` converted (`position_row` or `account_row`), and the rows left out as
    unwritable (with why). A slice at a time, yielding to the agents."""
    out: list = []
    dropped: list[tuple[Any, str]] = []
    for done, row in enumerate(rows, 1):
        try:
            out.append(convert(row))
        except (Unfit, InvalidOperation) as exc:
            dropped.append((row, str(exc)))
        if not done % SLICE:
            await asyncio.sleep(0)
    return out, dropped


@dataclass(frozen=True)
class SnapshotMessage:
    """One PnlSnapshot as published: its bytes, and the id JetStream drops a second
    publish of it by."""

    event: PnlSnapshot
    data: bytes
    msg_id: str

    @property
    def rows(self) -> int:
        return len(self.event.positions) + len(self.event.accounts)


class PnlSnapshotMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.rows = Counter(
            "pnl_snapshot_rows_total", "Snapshot rows published on the PNL stream, by the table they are for",
            ["table"], registry=registry,
        )  # fmt: skip
        self.errors = Counter("pnl_snapshot_errors_total", "Snapshot publishes that failed", ["kind"], registry=registry)
        self.dropped = Counter(
            "pnl_snapshot_rows_dropped_total", "Snapshot rows given up (over max_pending_rows, or unwritable)",
            ["reason"], registry=registry,
        )  # fmt: skip
        self.pending = Gauge("pnl_snapshot_pending_rows", "Snapshot rows waiting to be published", registry=registry)


class PnlSnapshots(Sink[SnapshotMessage]):
    """Periodic snapshots of the book, published on the PNL stream for questdb_writer,
    which stores them in `tables` (position rows, account rows).

    Every tick (`take`, the service's timer): one row per position whose P&L changed
    since the last snapshot and one per account whose totals did, all stamped with the
    snapshot's time `ts`; every `full_every`-th tick (and the first) every position and
    account, so history has a point at least that often for positions that do not move.
    Rows carry `as_of` (the event time of the values) beside `ts`. A snapshot goes out as
    `ROWS_PER_MESSAGE`-row messages numbered by `part`, each with the id `pnl:{ts}:{part}`.

    Messages queue in memory and a task publishes them in order, `PUBLISH_WINDOW` at a
    time, waiting for the server's acknowledgements; NATS away, the window is published
    again under the retry policy (JetStream drops the messages it already has by their
    id; questdb_writer's dedup keys make a row stored twice one row) and new snapshots
    queue behind it, up to `max_pending_rows` (then the oldest are dropped, counted and
    logged). The agents never wait for any of it.
    """

    def __init__(
        self,
        app: App,
        book: PnlBook,
        *,
        tables: tuple[str, str],
        full_every: int,
        max_pending_rows: int,
        retry: RetryPolicy | None = None,
    ):
        super().__init__("snapshots", retry)
        self.app = app
        self.book = book
        self.tables = tables
        self.full_every = full_every
        self.max_pending_rows = max_pending_rows
        self.snapshot_metrics = PnlSnapshotMetrics(app.metrics.registry)
        self.queue: deque[SnapshotMessage] = deque()  # taken, waiting for their window
        self.queued_rows = 0
        self._window_rows = 0  # in the window being published
        self.ticks = 0
        self.last_ts = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._stopping = False

    @property
    def pending_rows(self) -> int:
        """Rows taken and not yet published: queued, and in the window in hand."""
        return self.queued_rows + self._window_rows

    async def health(self) -> tuple[bool | str, Any]:
        ok, detail = await super().health()
        detail["pending_rows"] = self.pending_rows
        return ok, detail

    # -- taking snapshots --------------------------------------------------------------

    async def take(self, now_ns: int | None = None) -> list[SnapshotMessage]:
        """Snapshot what changed (everything on a full tick) and queue its messages."""
        book = self.book
        await refresh_in_slices(book)
        full = self.ticks % self.full_every == 0
        self.ticks += 1
        changes = book.snapshot_changes
        if full:
            changes.take()
            keys: Iterable[Key] = book.keys()
            accounts: Iterable[str] = book.accounts()
        else:
            keys, accounts = changes.take()
        # Whole microseconds (the column's unit), strictly increasing: one snapshot, one ts.
        now = (time.time_ns() if now_ns is None else now_ns) // 1000 * 1000
        ts = self.last_ts = max(now, self.last_ts + 1000)
        position_rows = [row for row in map(book.row, sorted(keys)) if row is not None]
        account_rows = [t for t in map(book.totals, sorted(accounts)) if t is not None]
        positions, dropped = await snapshot_rows(position_rows, position_row)
        totals, dropped_totals = await snapshot_rows(account_rows, account_row)
        for table, left_out in zip(self.tables, (dropped, dropped_totals)):
            if left_out:
                await self._dead_letter(table, ts, left_out)
        messages = self._messages(ts, "positions", positions)
        messages += self._messages(ts, "accounts", totals, first=len(messages))
        for message in messages:
            self.queue.append(message)
            self.queued_rows += message.rows
        self._trim()
        if messages:
            self._wake.set()
        return messages

    def _messages(self, ts: int, kind: str, rows: list, *, first: int = 0) -> list[SnapshotMessage]:
        """`rows` in messages of `ROWS_PER_MESSAGE` rows (smaller where one would be over
        the server's max_payload), numbered from part `first`."""
        limit = self.app.transport.max_payload
        chunks = deque(rows[start : start + ROWS_PER_MESSAGE] for start in range(0, len(rows), ROWS_PER_MESSAGE))
        out: list[SnapshotMessage] = []
        while chunks:
            chunk = chunks.popleft()
            part = first + len(out)
            event = PnlSnapshot(ts=ts, part=part, **{kind: chunk})
            msg_id = f"pnl:{ts}:{part}"
            data = encode(event)
            if message_size(data, {_MSG_ID_HEADER: msg_id}) > limit:
                if len(chunk) > 1:
                    half = len(chunk) // 2
                    chunks.extendleft((chunk[half:], chunk[:half]))
                else:  # one row over the server's limit: no message can carry it
                    self.snapshot_metrics.dropped.labels("unwritable").inc()
                    log.error("pnl: a snapshot row of %d bytes is over NATS's max_payload of %d: %s",
                              len(data), limit, chunk[0].account)
                continue
            out.append(SnapshotMessage(event, data, msg_id))
        return out

    def _trim(self) -> None:
        # The newest message always stays; the window in hand is not in the queue.
        dropped = 0
        while self.queued_rows > self.max_pending_rows and len(self.queue) > 1:
            oldest = self.queue.popleft()
            self.queued_rows -= oldest.rows
            dropped += oldest.rows
        if dropped:
            self.snapshot_metrics.dropped.labels("backlog").inc(dropped)
            log.error("pnl: snapshot backlog over %d rows: dropped the oldest %d rows", self.max_pending_rows, dropped)
        self.snapshot_metrics.pending.set(self.pending_rows)

    async def _dead_letter(self, table: str, ts: int, left_out: list[tuple[Any, str]]) -> None:
        rows = [plain_data(row) for row, _ in left_out]
        self.snapshot_metrics.dropped.labels("unwritable").inc(len(rows))
        reason = "; ".join(sorted({why for _, why in left_out}))
        log.error("pnl: %d snapshot rows for %s cannot be written: %s", len(rows), table, reason)
        try:
            await self.app.dead_letter(
                encode({"table": table, "ts": ts, "rows": rows}), reason=reason[:4000], agent="snapshots",
                stream=table, subject=table, seq=ts // 1000,
            )  # fmt: skip
        except Exception:  # noqa: BLE001 - the log above keeps the rows' story
            log.exception("pnl: could not dead-letter unwritable snapshot rows")

    # -- publishing them -----------------------------------------------------------------

    def start(self) -> None:
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name="pnl:snapshots")

    async def stop(self) -> None:
        """Take a last snapshot and give the publisher a few seconds to send the queue."""
        await self.take()
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, timeout=5)
            except asyncio.TimeoutError:
                self._task.cancel()
                log.warning("pnl: %d snapshot rows not published at shutdown", self.pending_rows)
            self._task = None

    async def _run(self) -> None:
        while True:
            if not self.queue:
                if self._stopping:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                await self.publish_next()
            except SinkStopping:
                log.warning("pnl: NATS unavailable at shutdown, %d snapshot rows not published", self.pending_rows)
                return

    async def publish_next(self) -> None:
        """Publish the oldest `PUBLISH_WINDOW` queued messages; they leave the queue once
        the server has every one (back at its front if the service stops first)."""
        window = [self.queue.popleft() for _ in range(min(PUBLISH_WINDOW, len(self.queue)))]
        self._window_rows = sum(message.rows for message in window)
        self.queued_rows -= self._window_rows
        self.extend(window)
        try:
            await self.flush()
        finally:
            self._window_rows = 0
            if self._buffer:  # not published: keep it, in order
                self.queue.extendleft(reversed(self._buffer))
                self.queued_rows += sum(message.rows for message in self._buffer)
                self.discard()
            self.snapshot_metrics.pending.set(self.pending_rows)

    def unavailable(self, exc: Exception) -> bool:
        # No stream took it: pnl declares PNL at start, so its leader is away (a cluster
        # electing one) or it is being recreated; the snapshot waits, like for NATS.
        return super().unavailable(exc) or isinstance(exc, PublishFailed)

    async def write(self, batch: list[SnapshotMessage]) -> None:
        subject = self.app.subject(PNL_SNAPSHOT_SUBJECT)
        try:
            await self.app.transport.publish_many([(subject, m.data, None, m.msg_id) for m in batch])
        except Exception:
            self.snapshot_metrics.errors.labels("unavailable").inc()
            raise
        positions, accounts = self.tables
        self.snapshot_metrics.rows.labels(positions).inc(sum(len(m.event.positions) for m in batch))
        self.snapshot_metrics.rows.labels(accounts).inc(sum(len(m.event.accounts) for m in batch))
