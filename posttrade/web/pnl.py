"""pnl's pages: `/pnl/realtime` (from memory), `/pnl/history` (from QuestDB) and what
the live page follows (docs/pnl.md).

What the page needs beyond /pnl/realtime and /pnl/history, kept off the agents' path:
* `/live/accounts`: every account's totals, then each account revalued since (a
  LiveTopic: the book's `on_row_change` marks the row's account, a set insert while a
  page is open and nothing otherwise; a page gets at most two lines a second);
* `/dashboard/history`: the desk's totals per base currency every 2 s for the last
  hour (a History ring: 1,800 samples of a few figures);
* `/dashboard/movers`: the symbols with the largest day (or total) P&L, summed over
  the positions in each, re-summed only for the symbols that moved (the same hook adds
  the row's symbol to a set); /pnl/realtime is unpaged: a whole book per poll.
All three are undocumented (for the page, not API clients) and need the token.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from ..agents.pnl import SLICE, Key, PnlBook, PositionPnl, refresh_in_slices
from ..app import App
from ..core.bars import NS_PER_S, interval_seconds
from ..core.exact import EXACT, format_decimal
from ..stores.questdb import QuestDBClient, QuestDBUnavailableError
from ..stores.questdb.pnl_history import HistoryQuery, HistoryTables, iso, read_history
from . import params as web_params
from .live import History, LiveTopic
from .params import BadRequest
from .server import JSON

if TYPE_CHECKING:
    from ..services.pnl import HistorySection

ACCOUNTS_LIVE_INTERVAL_S = 0.5  # the account table moves at most twice a second per page
MOVERS_MAX_AGE_S = 2.0  # the desk-wide sums are recomputed at most this often
MOVERS_SLICE = 128  # rows summed between two yields to the agents (well under a millisecond)
MOVER_FIGURES = ("day_pnl", "total_pnl")

_raw_json = msgspec.json.Encoder()


@dataclass
class PnlPage:
    """What the live page follows (tests read them)."""

    accounts: LiveTopic
    desk_history: History
    movers: SymbolMovers


def install_pages(
    app: App,
    book: PnlBook,
    *,
    questdb: QuestDBClient | None,
    tables: HistoryTables,
    history: HistorySection,
) -> PnlPage:
    """pnl's pages on `app`. Without `questdb`, /pnl/history answers 503."""
    page = add_page_data(app, book)

    @app.page("/pnl/realtime")
    async def realtime(request: Request) -> JSON:
        """Real-time P&L per position and per account, from memory (current to the last message).

        ---
        query:
          account: {$ref: Name, description: only this account}
          symbol: {$ref: Name, description: only this symbol}
        responses:
          200: {description: "`as_of`, `count`, `positions` (sorted by account, symbol) and `accounts` (totals)", schema: {type: object}}
        """
        account = name_parameter(request, "account")
        symbol = name_parameter(request, "symbol")
        if symbol is not None:
            book.refresh((symbol,))
        elif account is not None:
            book.refresh(book.symbols(account))
        else:
            book.refresh()
        keys = book.keys(account, symbol)
        rows = [msgspec.Raw(book.row_json(k)) for k in keys]
        accounts = sorted({k[0] for k in keys})
        as_of = max((book.row(k).as_of for k in keys), default=None)
        # Rows and totals are JSON already (encoded once per change, shared with the
        # Valkey writer): splice them in rather than decode and re-encode.
        body = _raw_json.encode(
            {
                "as_of": as_of,
                "count": len(rows),
                "positions": rows,
                "accounts": [msgspec.Raw(book.totals_json(a)) for a in accounts],
            }
        )
        return Response(body, media_type="application/json")

    @app.page("/pnl/history")
    async def pnl_history(request: Request) -> JSON:
        """P&L history from QuestDB snapshots, one point per interval bucket per key.

        With `symbol`: one series per position; without: one series per account (totals).
        `from` must be before `to`, and the range at most `history.max_points` intervals
        long: otherwise a 400 says which.

        ---
        query:
          account: {$ref: Name, description: only this account}
          symbol: {$ref: Name, description: only this symbol (position series instead of account totals)}
          from: {$ref: Time, description: "start, inclusive; default `to` minus `history.default_range_s`"}
          to: {$ref: Time, description: "end, exclusive; default now"}
          interval: {$ref: Interval, description: "bucket size (default `history.default_interval`)"}
        responses:
          200: {description: "`level`, `from`, `to`, `interval`, `series` (points per key), `truncated`", schema: {type: object}}
          503: QuestDB is not configured or unreachable
        """
        query = history_query(request, history)
        if questdb is None:
            raise BadRequest({"error": "no QuestDB configured (databases.questdb)"}, status_code=503)
        try:
            return JSON(await read_history(questdb, query, tables, history.max_rows))
        except QuestDBUnavailableError as exc:
            raise BadRequest({"error": "QuestDB unavailable", "questdb": exc.message}, status_code=503) from None

    return page


# -- /pnl/history's parameters ---------------------------------------------------------------


def parse_time(parameter: str, raw: str) -> int:
    """ISO-8601 (a zone or Z; none means UTC) or integer epoch ns → epoch ns, 1990..2200
    as for events (web/params.py `Time`)."""
    return web_params.parse_time(parameter, raw)


def name_parameter(request: Request, parameter: str) -> str | None:
    """An account or symbol filter (web/params.py `Name`); None when absent."""
    return web_params.query_name(request, parameter)


def history_query(request: Request, section: HistorySection, now_ns: int | None = None) -> HistoryQuery:
    params = request.query_params
    interval = web_params.check_interval("interval", params.get("interval", section.default_interval))
    try:
        step = interval_seconds(interval) * NS_PER_S
    except ValueError as exc:
        raise BadRequest({"parameter": "interval", "error": str(exc)}) from None
    now = time.time_ns() if now_ns is None else now_ns
    raw_from, raw_to = params.get("from"), params.get("to")
    end = parse_time("to", raw_to) if raw_to is not None else now
    start = parse_time("from", raw_from) if raw_from is not None else end - section.default_range_s * NS_PER_S
    if start >= end:
        raise BadRequest({"parameter": "from", "error": f"must be before to ({iso(start)} >= {iso(end)})"})
    points = math.ceil((end - start) / step)
    if points > section.max_points:
        raise BadRequest(
            {"parameter": "interval", "error": f"{interval} makes {points} points over the range; at most {section.max_points}"}
        )
    return HistoryQuery(name_parameter(request, "account"), name_parameter(request, "symbol"), start, end, interval)


# -- top movers ------------------------------------------------------------------------------


class SymbolSums:
    """One symbol's positions summed: all in the symbol's currency, so the sums are
    sums of one currency (exact; None while any term is unknown)."""

    __slots__ = ("symbol", "currency", "positions", "open_positions", "net_qty", "mark", "mark_ts",
                 "day_pnl", "total_pnl", "unknown_day", "unknown_total", "as_of")

    def __init__(self, symbol: str, currency: str):
        self.symbol = symbol
        self.currency = currency
        self.positions = self.open_positions = 0
        self.net_qty = Decimal(0)
        self.mark: Decimal | None = None
        self.mark_ts = -1
        self.day_pnl = self.total_pnl = Decimal(0)
        self.unknown_day = self.unknown_total = 0
        self.as_of = 0

    def add(self, row: PositionPnl) -> None:
        value = row.value
        self.positions += 1
        if value.net_qty:
            self.open_positions += 1
            self.net_qty = EXACT.add(self.net_qty, value.net_qty)
        if value.day_pnl is None:
            self.unknown_day += 1
        else:
            self.day_pnl = EXACT.add(self.day_pnl, value.day_pnl)
        if value.total_pnl is None:
            self.unknown_total += 1
        else:
            self.total_pnl = EXACT.add(self.total_pnl, value.total_pnl)
        if value.mark is not None and (row.mark_ts or 0) >= self.mark_ts:
            self.mark, self.mark_ts = value.mark, row.mark_ts or 0
        if row.as_of > self.as_of:
            self.as_of = row.as_of

    def figure(self, name: str) -> Decimal | None:
        if name == "day_pnl":
            return None if self.unknown_day else self.day_pnl
        return None if self.unknown_total else self.total_pnl

    def data(self) -> dict[str, Any]:
        return {
            "symbol": self.symbol,
            "currency": self.currency,
            "positions": self.positions,
            "open_positions": self.open_positions,
            "net_qty": format_decimal(self.net_qty),
            "mark": None if self.mark is None else format_decimal(self.mark),
            "day_pnl": _maybe_decimal(self.figure("day_pnl")),
            "total_pnl": _maybe_decimal(self.figure("total_pnl")),
            "as_of": self.as_of,
        }


def _maybe_decimal(value: Decimal | None) -> str | None:
    return None if value is None else format_decimal(value)


async def sum_by_symbol(book: PnlBook, accounts: Iterable[str]) -> dict[str, SymbolSums]:
    """The positions of `accounts` summed per symbol, `MOVERS_SLICE` rows at a time with
    the event loop free in between (the book may move meanwhile: the sums are of rows
    a few milliseconds apart, as any reader of a moving book sees them)."""
    sums: dict[str, SymbolSums] = {}
    done = 0
    for account in accounts:
        for key in book.keys(account):
            row = book.row(key)
            if row is None:
                continue
            entry = sums.get(key[1])
            if entry is None:
                entry = sums[key[1]] = SymbolSums(key[1], row.value.currency)
            entry.add(row)
            done += 1
            if done % MOVERS_SLICE == 0:
                await asyncio.sleep(0)
    return sums


def rank_movers(sums: Iterable[SymbolSums], by: str, limit: int) -> list[SymbolSums]:
    """The `limit` symbols with the largest |figure| (each in its own currency), unknown
    figures last, ties by symbol."""

    def order(entry: SymbolSums) -> tuple:
        value = entry.figure(by)
        return (value is None, -abs(value) if value is not None else 0, entry.symbol)

    return sorted(sums, key=order)[:limit]


class SymbolMovers:
    """The desk's P&L per symbol for the page's top movers, summed when a page asks (at
    most every `max_age_s`, one pass shared by every page asking meanwhile). The first
    pass sums the whole book; later ones only the symbols with a row revalued since
    (`dirty`, filled by the book's `on_row_change`): on a desk where a few symbols
    move, a pass costs those symbols' positions, not the book. Holds one `SymbolSums`
    per symbol held, and `dirty` at most every symbol."""

    def __init__(self, book: PnlBook, *, max_age_s: float = MOVERS_MAX_AGE_S):
        self.book = book
        self.max_age_s = max_age_s
        self.dirty: set[str] = set()  # symbols with a row revalued since the last pass
        self.summed_rows = 0  # rows summed by all passes (tests, and what a pass costs)
        self._sums: dict[str, SymbolSums] | None = None  # None until the first pass
        self._at = -math.inf  # monotonic time of the last pass
        self._taken = 0.0  # its epoch time
        self._pass: asyncio.Task | None = None

    async def desk(self) -> tuple[dict[str, SymbolSums], float]:
        """Every symbol's sums and when (epoch s) they were taken."""
        if time.monotonic() - self._at > self.max_age_s:
            if self._pass is None:
                self._pass = asyncio.create_task(self._sum_desk(), name="pnl:movers")
            task = self._pass
            try:
                await asyncio.shield(task)
            finally:
                if task.done() and self._pass is task:
                    self._pass = None
        assert self._sums is not None
        return self._sums, self._taken

    async def _sum_desk(self) -> None:
        book = self.book
        await refresh_in_slices(book)
        taken = time.time()
        if self._sums is None:
            self.dirty.clear()
            sums = await sum_by_symbol(book, book.accounts())
            self.summed_rows += sum(entry.positions for entry in sums.values())
        else:
            sums = self._sums
            symbols = list(self.dirty)  # the book's hook holds this very set: empty it, keep it
            self.dirty.clear()
            done = 0
            for symbol in symbols:
                entry = None
                for key in book.keys(symbol=symbol):
                    row = book.row(key)
                    if row is None:
                        continue
                    if entry is None:
                        entry = SymbolSums(symbol, row.value.currency)
                    entry.add(row)
                    done += 1
                    if done % MOVERS_SLICE == 0:
                        await asyncio.sleep(0)
                if entry is None:
                    sums.pop(symbol, None)
                else:
                    sums[symbol] = entry
            self.summed_rows += done
        self._sums = sums
        self._at = time.monotonic()
        self._taken = taken

    async def account(self, account: str) -> dict[str, SymbolSums]:
        # Not `book.refresh(symbols)`: a stale symbol revalues every holder of it, in
        # every account, and in one go; in slices it stays off the agents' path.
        await refresh_in_slices(self.book)
        return await sum_by_symbol(self.book, (account,))


# -- the desk's history ring -------------------------------------------------------------------


async def desk_sample(book: PnlBook, state: dict[str, Any]) -> dict[str, float | None]:
    """The desk's figures now, for the page's chart: per base currency the sum of the
    total and of the day P&L of its accounts **whose figure is known**
    (`total_pnl.<base>`, `day_pnl.<base>`) and how many accounts have none
    (`unknown_total.<base>`: an account with one unmarked position has no total, and a
    desk of hundreds of accounts nearly always has one, so the strict sum would be
    unknown for good; the page says what the line sums); positions, accounts, and
    revaluations per second since the previous sample (`state` keeps the count)."""
    await refresh_in_slices(book)
    sums: dict[str, list] = {}  # base -> [total, unknown totals, day, unknown days]
    accounts = book.accounts()
    for i, account in enumerate(accounts):
        if i and i % SLICE == 0:
            await asyncio.sleep(0)
        totals = book.totals(account)
        if totals is None:
            continue
        value = totals.value
        entry = sums.get(value.base_currency)
        if entry is None:
            entry = sums[value.base_currency] = [Decimal(0), 0, Decimal(0), 0]
        if value.total_pnl is None:
            entry[1] += 1
        else:
            entry[0] = EXACT.add(entry[0], value.total_pnl)
        if value.day_pnl is None:
            entry[3] += 1
        else:
            entry[2] = EXACT.add(entry[2], value.day_pnl)
    figures: dict[str, float | None] = {}
    for base, (total, unknown_total, day, _) in sorted(sums.items()):
        figures[f"total_pnl.{base}"] = float(total)
        figures[f"day_pnl.{base}"] = float(day)
        figures[f"unknown_total.{base}"] = float(unknown_total)
    now, count = time.monotonic(), book.revaluations
    last = state.get("last")
    figures["revaluations_per_s"] = round((count - last[1]) / (now - last[0]), 1) if last and now > last[0] else None
    state["last"] = (now, count)
    figures["positions"] = float(len(book))
    figures["accounts"] = float(len(accounts))
    return figures


def add_page_data(app: App, book: PnlBook) -> PnlPage:
    """The page's live account figures, desk history and top movers (module doc)."""

    def lookup(account: str) -> Any:
        data = book.totals_json(account)
        return None if data is None else msgspec.json.decode(data)

    def snapshot() -> list[Any]:
        return [msgspec.json.decode(data) for data in map(book.totals_json, book.accounts()) if data is not None]

    accounts = LiveTopic("accounts", lookup=lookup, snapshot=snapshot, interval_s=ACCOUNTS_LIVE_INTERVAL_S)
    accounts.serve(app, "/live/accounts")
    movers = SymbolMovers(book)
    mark_account, dirty = accounts.mark, movers.dirty

    def row_changed(key: Key) -> None:
        # On the agents' path (every revalued row): two set inserts at most.
        mark_account(key[0])
        dirty.add(key[1])

    book.on_row_change = row_changed

    state: dict[str, Any] = {}

    async def sample() -> dict[str, float | None]:
        return await desk_sample(book, state)

    history = History(sample, every_s=2.0, keep=1800)
    history.serve(app, "/dashboard/history")

    @app.page("/dashboard/movers", documented=False)
    async def top_movers(request: Request) -> JSON:
        account = name_parameter(request, "account")
        by = web_params.query_choice(request, "by", MOVER_FIGURES, "day_pnl")
        limit = web_params.query_int(request, "limit", 10, minimum=1, maximum=100)
        if account is None:
            sums, taken = await movers.desk()
        else:
            sums, taken = await movers.account(account), time.time()
        return JSON(
            {
                "account": account,
                "by": by,
                "symbols": len(sums),
                "taken_at": taken,
                "movers": [entry.data() for entry in rank_movers(sums.values(), by, limit)],
            }
        )

    return PnlPage(accounts, history, movers)
