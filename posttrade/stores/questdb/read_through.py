"""hot_cache's read-through to QuestDB: the queries a miss of bars or quotes runs.

The tables are questdb_writer's (`ReadThroughTables`, configurable names). Bars of the
intervals hot_cache builds from trades are aggregated from `market_trades` with
`SAMPLE BY ... ALIGN TO CALENDAR` (the same buckets the windows make); bars of other
intervals come from `bars`; a quote is the newest row of `quotes` (`LATEST ON`). Values
are read exactly from DECIMAL columns, DOUBLE columns through their shortest repr.
docs/hot_cache.md lists the queries.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from datetime import date, datetime, timezone
from decimal import Decimal
from functools import lru_cache
from typing import Any

from ...config import _Section
from ...core.bars import NS_PER_S, bar_from_totals, interval_seconds, plain
from ...streams.events import Bar, Quote
from . import QuestDBClient, QuestDBError, QuestDBUnavailableError, check_identifier, sql_literal

log = logging.getLogger(__name__)


class ReadThroughTables(_Section):
    """QuestDB tables a miss of bars or quotes reads (written by questdb_writer)."""

    market_trades: str = "market_trades"
    quotes: str = "quotes"
    bars: str = "bars"

    def __post_init__(self) -> None:
        for name in (self.market_trades, self.quotes, self.bars):
            check_identifier(name)


class TableMissing(LookupError):
    """A table the read needs does not exist yet (questdb_writer has not created it)."""


class ReadThroughError(RuntimeError):
    """QuestDB answered, but with something that cannot be used."""


_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()


@lru_cache(maxsize=4096)
def _day_start_s(day: str) -> int:
    return (date.fromisoformat(day).toordinal() - _EPOCH_ORDINAL) * 86_400


def iso_to_ns(text: str) -> int:
    """QuestDB's `2024-01-02T03:04:05.123456Z` (TIMESTAMP) or nine-digit TIMESTAMP_NS
    text → epoch ns, exactly (no float on the way). Hand-parsed: `time.strptime` costs
    more than the rest of a read-through together."""
    if not (isinstance(text, str) and len(text) >= 20 and text[-1] == "Z" and text[10] == "T"
            and text[13] == ":" and text[16] == ":"):
        raise ReadThroughError(f"not a QuestDB timestamp: {text!r}")
    fraction = text[20:-1] if text[19] == "." else ""
    try:
        hour, minute, second = int(text[11:13]), int(text[14:16]), int(text[17:19])
        if hour > 23 or minute > 59 or second > 60 or (fraction and not fraction.isdigit()) or len(fraction) > 9:
            raise ValueError
        seconds = _day_start_s(text[:10]) + hour * 3600 + minute * 60 + second
    except ValueError:
        raise ReadThroughError(f"not a QuestDB timestamp: {text!r}") from None
    return seconds * NS_PER_S + int((fraction + "000000000")[:9])


def _ns_literal(ts: int) -> str:
    return sql_literal(datetime.fromtimestamp(ts // NS_PER_S, tz=timezone.utc))


def to_decimal(value: Any) -> Decimal | None:
    """A QuestDB JSON value as a Decimal: DECIMAL columns come as strings (exact),
    DOUBLE as JSON numbers (read through their shortest repr)."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ReadThroughError(f"not a number: {value!r}")
    if isinstance(value, float):
        value = repr(value)
    try:
        return plain(Decimal(value))
    except ArithmeticError:
        raise ReadThroughError(f"not a number: {value!r}") from None


class QuestDBReadThrough:
    """The queries a miss of bars or quotes runs. Bars of the intervals built from
    trades are aggregated from `market_trades` (the same buckets the windows make);
    other intervals come from `bars`. (Positions come from ptrc's POSITIONS stream:
    `posttrade.agents.hot_cache.PublishedPositions`.)"""

    def __init__(self, client: QuestDBClient, tables: ReadThroughTables, *, built_intervals: Sequence[str]):
        self.client = client
        self.tables = tables
        self.built_intervals = frozenset(built_intervals)
        self.skipped_rows = 0

    async def _query(self, sql: str) -> list[dict[str, Any]]:
        try:
            return (await self.client.query(sql)).dicts()
        except QuestDBUnavailableError:
            raise
        except QuestDBError as exc:
            if "does not exist" in exc.message:
                raise TableMissing(exc.message) from None
            raise

    # Turning rows into events is the CPU-heavy part of a miss (hundreds of Decimals and
    # validations): it runs in a thread so that the event loop keeps answering hits.

    async def bars(self, symbol: str, interval: str, count: int) -> list[Bar]:
        """Up to `count` newest bars, oldest first."""
        if interval in self.built_intervals:
            return await self._bars_from_trades(symbol, interval, count)
        table = self.tables.bars
        rows = await self._query(
            f'SELECT * FROM {table} WHERE "symbol" = {sql_literal(symbol)} AND "interval" = {sql_literal(interval)} '
            f"ORDER BY ts DESC LIMIT {int(count)}"
        )
        bars, skipped = await asyncio.to_thread(self._stored_bars, table, symbol, interval, rows[::-1])
        self.skipped_rows += skipped
        return bars

    @staticmethod
    def _stored_bars(table: str, symbol: str, interval: str, rows: list[dict]) -> tuple[list[Bar], int]:
        bars, skipped = [], 0
        for row in rows:
            try:
                bars.append(
                    Bar(
                        ts=iso_to_ns(row["ts"]),
                        symbol=symbol,
                        interval=interval,
                        open=to_decimal(row["open"]),
                        high=to_decimal(row["high"]),
                        low=to_decimal(row["low"]),
                        close=to_decimal(row["close"]),
                        volume=to_decimal(row["volume"]),
                        vwap=to_decimal(row.get("vwap")),
                        count=int(row.get("count") or 0),
                    )
                )
            except (KeyError, TypeError, ValueError, ArithmeticError, ReadThroughError) as exc:
                skipped += 1
                log.warning("skipping a row of %s that is not a bar: %s (%s)", table, row, exc)
        return bars, skipped

    async def _bars_from_trades(self, symbol: str, interval: str, count: int) -> list[Bar]:
        table = self.tables.market_trades
        where = f'"symbol" = {sql_literal(symbol)}'
        # LATEST ON reads backwards from the newest partition: no scan of the whole table.
        latest = await self._query(f'SELECT ts latest FROM {table} WHERE {where} LATEST ON ts PARTITION BY "symbol"')
        if not latest or latest[0]["latest"] is None:
            return []
        size_ns = interval_seconds(interval) * NS_PER_S
        latest_ns = iso_to_ns(latest[0]["latest"])
        first_start = latest_ns - latest_ns % size_ns - (count - 1) * size_ns
        rows = await self._query(
            'SELECT ts, first("price") open, max("price") high, min("price") low, last("price") close, '
            'sum("size") volume, sum("price" * "size") notional, count() n '
            f"FROM {table} WHERE {where} AND ts >= {_ns_literal(first_start)} "
            f"SAMPLE BY {interval} ALIGN TO CALENDAR"
        )
        bars, skipped = await asyncio.to_thread(self._aggregated_bars, table, symbol, interval, rows[-count:])
        self.skipped_rows += skipped
        return bars

    @staticmethod
    def _aggregated_bars(table: str, symbol: str, interval: str, rows: list[dict]) -> tuple[list[Bar], int]:
        bars, skipped = [], 0
        for row in rows:
            try:
                bars.append(
                    bar_from_totals(
                        ts=iso_to_ns(row["ts"]),
                        symbol=symbol,
                        interval=interval,
                        open=to_decimal(row["open"]),
                        high=to_decimal(row["high"]),
                        low=to_decimal(row["low"]),
                        close=to_decimal(row["close"]),
                        volume=to_decimal(row["volume"]),
                        notional=to_decimal(row["notional"]),
                        count=int(row["n"]),
                    )
                )
            except (KeyError, TypeError, ValueError, ArithmeticError, ReadThroughError) as exc:
                # e.g. a trade with a zero or negative price in the table
                skipped += 1
                log.warning("skipping a %s bucket of %s that is not a bar: %s (%s)", interval, table, row, exc)
        return bars, skipped

    async def quote(self, symbol: str) -> Quote | None:
        rows = await self._query(
            f'SELECT * FROM {self.tables.quotes} WHERE "symbol" = {sql_literal(symbol)} '
            'LATEST ON ts PARTITION BY "symbol"'
        )
        if not rows:
            return None
        row = rows[0]
        try:
            return Quote(
                ts=iso_to_ns(row["ts"]),
                symbol=symbol,
                bid=to_decimal(row["bid"]),
                ask=to_decimal(row["ask"]),
                bid_size=to_decimal(row.get("bid_size")) or Decimal(0),
                ask_size=to_decimal(row.get("ask_size")) or Decimal(0),
                venue=row.get("venue"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ReadThroughError(
                f"the newest row of {self.tables.quotes} for {symbol} is not a quote: {exc}"
            ) from None
