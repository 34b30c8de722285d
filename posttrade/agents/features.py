"""The feature agents of feast_pipeline: NATS flow → windowed tables → Feast.

| agent            | consumes                              | state (tables)                              | pushes to                     |
|------------------|---------------------------------------|---------------------------------------------|-------------------------------|
| trade_features   | TRADES (`md.trades.>`)                | trade_minutes (1 m windows), trade_ticks,   | symbol_trade_features         |
|                  |                                       | trade_history (recent closed minutes)       |                               |
| quote_features   | QUOTES (`md.quotes.>`)                | quote_minutes (1 m windows), quote_tops     | symbol_quote_features         |
| account_features | POSITIONS (`posttrade.positions.>`)   | ptrc_positions (ptrc's newest update per    | account_features,             |
|                  |                                       | (account, symbol)), counted_fills (the      | account_order_features        |
|                  |                                       | newest executions of each account's latest  |                               |
|                  |                                       | day, at most `max_fills_per_account`)       |                               |
| order_features   | ORDERS (`trading.orders.>`)           | order_days                                  | account_order_features        |

Everything per account that comes from executions is ptrc's: the project has one
position computation, so this service keeps no position and does not decide what an
execution feed's resends, corrections, busts and openings mean. It takes ptrc's
`PositionUpdate`s (the highest revision per key), values them with
`posttrade.core.valuation` at the last market prints it sees, and counts the executions
they report (`features.math.execution_change`).

Account money is in the account's base currency (reference data: `config.reference()`),
converted with `core.fx.FxRates` over the marks this service sees (`fx_mark`): an FX
instrument's last quote mid, else its last print, else the mark ptrc published with an
update of a position in it. A feature that needs a rate nobody has given yet is null.

Each agent takes events in batches (`batch.size` events or `batch.interval_sec`
seconds), folds every event into its tables with `apply` (a redelivered event changes
nothing), turns the windows that closed into feature rows and adds them to its sinks
(`posttrade.stores.feast.sink`), which are flushed before the batch is acknowledged —
so a batch is acknowledged only once Feast's online and offline stores have its rows.
Windows are event time: a minute closes once an event more than `grace` past its end
has been seen on that stream (any symbol); later events for it are counted as late and
dropped.

An account's `account_order_features` rows come from two agents (positions, orders),
each computed from everything the service knows of the account at that moment. Their
online writes take turns in the order the rows were computed (`FeatureSinks`, `Turns`),
so the online store ends with the newest state. Every account row is stamped by one
clock per account (`stamp`): an account's rows never go back in event time (ptrc's
update of a late fill is older than the state it carries) and never share a stored
time, so a point-in-time join never sees a state computed from later events nor has
to pick between two rows.

`HourlyBatch` is the batch view's job (a timer of the service): the closed hours from
the offline minute rows, then Feast's materialization.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal

from ..app import App
from ..core.exact import EXACT, divide
from ..core.fx import FxRates
from ..core.reference import Reference
from ..features.batch import HOUR_NS, first_hour, hour_closed, hourly_rows
from ..features.math import (
    MINUTE_NS,
    CountedFill,
    FillsDay,
    OrdersDay,
    QuoteMinute,
    QuoteTop,
    TradeHistory,
    TradeMinute,
    TradeTick,
    account_features,
    add_order_to_day,
    add_quote,
    add_trade,
    counted_fill,
    execution_change,
    fill_rate_features,
    fills_day,
    fold_fill,
    next_tick,
    next_top,
    order_flow_term,
    quote_features,
    recount,
    row,
    take_update,
    trade_features,
    trade_sign,
    utc_day,
)
from ..features.views import (
    ACCOUNT_FEATURES,
    ACCOUNT_ORDER_FEATURES,
    EVENT_TIME_RESOLUTION_NS,
    SYMBOL_HOURLY_FEATURES,
    SYMBOL_QUOTE_FEATURES,
    SYMBOL_TRADE_FEATURES,
)
from ..sinks import RetryPolicy, Sink
from ..stores.feast.client import FeastClient
from ..stores.feast.sink import FeastPushSink, Turns
from ..stores.feast.status import FeatureStatus
from ..streams import subjects
from ..streams.events import PositionUpdate

log = logging.getLogger(__name__)

TWO = Decimal(2)
#: The fill_id under which `counted_fills` keeps an account's folded record (a fill's
#: id is never empty: `streams.events.Fill`).
FOLDED = ""
#: Executions `counted_fills` holds one by one per account, by default.
MAX_FILLS_PER_ACCOUNT = 10_000


def _none() -> None:
    """Default of tables whose update functions start from "nothing yet"."""
    return None


@dataclass(frozen=True)
class FeatureSinks:
    """Where each agent's rows go: a sink per agent and view, since a crashed batch
    discards what its own agent added and nothing else."""

    trades: Sink  # symbol_trade_features, from trade_features
    quotes: Sink  # symbol_quote_features, from quote_features
    accounts: Sink  # account_features, from account_features
    account_rates: Sink  # account_order_features, from account_features
    order_rates: Sink  # account_order_features, from order_features

    @classmethod
    def to_feast(cls, feast: FeastClient, status: FeatureStatus, retry: RetryPolicy) -> FeatureSinks:
        # The two writers of account_order_features reach the online store in the order
        # their rows were computed.
        turns = Turns()

        def push(view, writer: str, turns: Turns | None = None) -> FeastPushSink:
            return FeastPushSink(view, feast, status, retry, writer=writer, turns=turns)

        return cls(
            trades=push(SYMBOL_TRADE_FEATURES, "trade_features"),
            quotes=push(SYMBOL_QUOTE_FEATURES, "quote_features"),
            accounts=push(ACCOUNT_FEATURES, "account_features"),
            account_rates=push(ACCOUNT_ORDER_FEATURES, "account_features", turns),
            order_rates=push(ACCOUNT_ORDER_FEATURES, "order_features", turns),
        )


class FeatureAgents:
    """Declares the channels, tables and agents on `app`, each agent with its sinks."""

    def __init__(
        self,
        app: App,
        sinks: FeatureSinks,
        *,
        batch_size: int,
        batch_interval_s: float,
        window_grace_s: float,
        reference: Reference | None = None,
        max_fills_per_account: int = MAX_FILLS_PER_ACCOUNT,
    ):
        if max_fills_per_account < 1:
            raise ValueError("max_fills_per_account must be >= 1")
        self.app = app
        self.max_fills_per_account = max_fills_per_account
        # Account money in each account's base currency, at the rates of the marks seen here.
        self.reference = reference or Reference()
        self.fx = FxRates(self.reference, self.fx_mark)
        self.batch_size = batch_size
        self.batch_interval_s = batch_interval_s
        self.sinks = sinks

        self.trades = subjects.market_trades(app)
        self.quotes = subjects.quotes(app)
        self.positions = subjects.positions(app)
        self.orders = subjects.orders(app)

        self.trade_minutes = app.windowed_table(
            "trade_minutes", size_s=60, grace_s=window_grace_s, value_type=TradeMinute, key_type=str, default=TradeMinute
        )
        self.trade_ticks = app.table("trade_ticks", value_type=TradeTick, key_type=str, default=_none)
        self.trade_history = app.table("trade_history", value_type=TradeHistory, key_type=str, default=TradeHistory)
        self.quote_minutes = app.windowed_table(
            "quote_minutes", size_s=60, grace_s=window_grace_s, value_type=QuoteMinute, key_type=str, default=QuoteMinute
        )
        self.quote_tops = app.table("quote_tops", value_type=QuoteTop, key_type=str, default=_none)
        # (account, symbol) -> ptrc's update with the highest revision: one value per key.
        self.ptrc_positions = app.table("ptrc_positions", value_type=PositionUpdate, key_type=tuple[str, str])
        # (account, fill_id) -> CountedFill. Bounded: when an account's first execution
        # of a later UTC day arrives, its executions of earlier days are deleted, so it
        # holds the executions of each account's latest day; and past
        # `max_fills_per_account` of them the oldest are folded into the account's
        # record (account, FOLDED) (`_fold_oldest`). Atomic: a fold deletes executions
        # and rewrites the record, which a crash must not tear apart (the counts are
        # rebuilt from this table).
        self.counted_fills = app.table("counted_fills", value_type=CountedFill, key_type=tuple[str, str], atomic=True)
        self.order_days = app.table("order_days", value_type=OrdersDay, key_type=str, default=_none)

        # Derived from the two tables and rebuilt from them (`recover_accounts`) at start
        # and whenever the positions agent restarts, since a crash rolls the tables back:
        # the positions and the fill counts by account, and the executions held one by
        # one by account, a heap of (ts, fill_id) (what a fold or an eviction deletes).
        self._positions_by_account: dict[str, dict[str, PositionUpdate]] = {}
        # symbol -> (mark, event time) ptrc published last with an update held here (`fx_mark`).
        self._ptrc_marks: dict[str, tuple[Decimal, int]] = {}
        self._fills_days: dict[str, FillsDay] = {}
        self._counted_ids: dict[str, list[tuple[int, str]]] = {}
        # The event time of each account's newest row (see `stamp`). It only moves on: a
        # crash that rolls a table back leaves it ahead, which costs nothing.
        self._account_clock: dict[str, int] = {}

        app.on_startup.append(self._recover_accounts)
        app.agent(self.trades, name="trade_features", sinks=[sinks.trades])(self.trade_agent)
        app.agent(self.quotes, name="quote_features", sinks=[sinks.quotes])(self.quote_agent)
        app.agent(self.positions, name="account_features", sinks=[sinks.accounts, sinks.account_rates])(
            self.position_agent
        )
        app.agent(self.orders, name="order_features", sinks=[sinks.order_rates])(self.order_agent)

    def batches(self, stream):
        return stream.take_events(self.batch_size, self.batch_interval_s)

    # -- market trades -------------------------------------------------------------------

    async def trade_agent(self, stream) -> None:
        names = SYMBOL_TRADE_FEATURES.feature_names
        async for records in self.batches(stream):
            for record in records:
                with stream.processing(record):
                    self.fold_trade(record.value)
            rows = []
            for symbol, start, minute in self.trade_minutes.pop_closed():
                values, history = trade_features(start, minute, self.trade_history[symbol])
                self.trade_history[symbol] = history
                rows.append(row(symbol, start + MINUTE_NS, values, names))
            self.sinks.trades.extend(rows)

    def fold_trade(self, trade) -> None:
        previous = self.trade_ticks.get(trade.symbol)
        sign = trade_sign(trade.aggressor, trade.price, previous)
        self.trade_ticks.apply(trade.symbol, lambda tick: next_tick(tick, trade.ts, trade.price, sign))
        self.trade_minutes.apply(trade.symbol, trade.ts, lambda m: add_trade(m, trade.ts, trade.price, trade.size, sign))

    # -- quotes ----------------------------------------------------------------------------

    async def quote_agent(self, stream) -> None:
        names = SYMBOL_QUOTE_FEATURES.feature_names
        async for records in self.batches(stream):
            for record in records:
                with stream.processing(record):
                    self.fold_quote(record.value)
            rows = [
                row(symbol, start + MINUTE_NS, quote_features(minute), names)
                for symbol, start, minute in self.quote_minutes.pop_closed()
            ]
            self.sinks.quotes.extend(rows)

    def fold_quote(self, quote) -> None:
        top = QuoteTop(ts=quote.ts, bid=quote.bid, ask=quote.ask, bid_size=quote.bid_size, ask_size=quote.ask_size)
        previous = self.quote_tops.get(quote.symbol)
        # A late quote (older than the top we hold) has no place in the sequence of changes.
        term = order_flow_term(previous, top) if previous is None or top.ts >= previous.ts else Decimal(0)
        self.quote_tops.apply(quote.symbol, lambda held: next_top(held, top))
        self.quote_minutes.apply(quote.symbol, quote.ts, lambda m: add_quote(m, top, term))

    # -- accounts: the shared state ------------------------------------------------------------

    async def _recover_accounts(self) -> None:
        # Before any agent runs: the order agent reads the fill counts from its first order.
        self.recover_accounts()

    def recover_accounts(self) -> None:
        """Rebuild the positions and fill counts by account from the two tables."""
        self._positions_by_account = {}
        self._ptrc_marks = {}
        for (account, symbol), update in self.ptrc_positions.items():
            self._positions_by_account.setdefault(account, {})[symbol] = update
            self._raise_clock(account, update.ts)
            self._note_ptrc_mark(update, recovering=True)
        executions: dict[str, list[CountedFill]] = {}
        self._counted_ids = {}
        for (account, fill_id), execution in self.counted_fills.items():
            executions.setdefault(account, []).append(execution)
            ids = self._counted_ids.setdefault(account, [])
            if fill_id != FOLDED:
                ids.append((execution.ts, fill_id))
        for ids in self._counted_ids.values():
            heapq.heapify(ids)
        self._fills_days = {account: fills_day(held) for account, held in executions.items()}

    def _raise_clock(self, account: str, ts: int) -> None:
        if ts > self._account_clock.get(account, 0):
            self._account_clock[account] = ts

    def stamp(self, account: str, ts: int) -> int:
        """The event time of the account's next row: the event's own, but at least one
        stored time step (a microsecond) after the account's newest row, whose state
        this one includes."""
        newest = self._account_clock.get(account)
        stamped = ts if newest is None else max(ts, newest + EVENT_TIME_RESOLUTION_NS)
        self._account_clock[account] = stamped
        return stamped

    def mark(self, symbol: str) -> Decimal | None:
        """The symbol's last market print seen by this service."""
        tick = self.trade_ticks.get(symbol)
        return tick.price if tick is not None else None

    def fx_mark(self, symbol: str) -> tuple[Decimal, str, int] | None:
        """(price, source, event time) an FX rate is read from (`core.fx`): the
        instrument's last quote mid, else its last print, else ptrc's mark of it."""
        top = self.quote_tops.get(symbol)
        if top is not None:
            return divide(EXACT.add(top.bid, top.ask), TWO), "quote_mid", top.ts
        tick = self.trade_ticks.get(symbol)
        if tick is not None:
            return tick.price, "last_trade", tick.ts
        held = self._ptrc_marks.get(symbol)
        if held is not None:
            return held[0], "ptrc_mark", held[1]
        return None

    def _note_ptrc_mark(self, update: PositionUpdate, recovering: bool = False) -> None:
        """Keep ptrc's mark of `update`'s symbol. ptrc marks an update when it publishes
        it, so the update taken last carries its newest mark (a late fill's update has
        an old `ts` but a current mark); rebuilt from the table, the newest `ts` wins."""
        if update.mark is None:
            return
        held = self._ptrc_marks.get(update.symbol)
        if not recovering or held is None or update.ts >= held[1]:
            self._ptrc_marks[update.symbol] = (update.mark, update.ts)

    def account_values(self, account: str, day: int) -> dict:
        """The `account_features` of `account` now, for UTC day `day` (money in the
        account's base currency at the current rates)."""
        held = self._positions_by_account.get(account, {})
        prints = {symbol: mark for symbol in held if (mark := self.mark(symbol)) is not None}
        counts = self._fills_days.get(account)
        fills_today = counts.fills if counts is not None and counts.day == day else 0
        return account_features(held.values(), prints, fills_today, self.fx)

    def rate_values(self, account: str, day: int) -> dict:
        """The `account_order_features` of `account` now, for UTC day `day`."""
        return fill_rate_features(day, self._fills_days.get(account), self.order_days.get(account))

    # -- positions: ptrc's updates ----------------------------------------------------------

    async def position_agent(self, stream) -> None:
        self.recover_accounts()
        account_names = ACCOUNT_FEATURES.feature_names
        rate_names = ACCOUNT_ORDER_FEATURES.feature_names
        async for records in self.batches(stream):
            account_rows, rate_rows = [], []
            for record in records:
                update = record.value
                with stream.processing(record):
                    taken, counted = self.hold_update(update)
                if taken or counted:
                    account = update.account
                    ts = self.stamp(account, update.ts)
                    day = utc_day(ts)
                    account_rows.append(row(account, ts, self.account_values(account, day), account_names))
                    if counted:
                        rate_rows.append(row(account, ts, self.rate_values(account, day), rate_names))
            # In the same step that computed them: their turn among the account rows.
            self.sinks.accounts.extend(account_rows)
            self.sinks.account_rates.extend(rate_rows)

    def hold_update(self, update: PositionUpdate) -> tuple[bool, bool]:
        """Take one of ptrc's updates: (whether it is now its key's position, whether it
        moved the account's fill counts). Neither for a lower revision than the one held,
        nor for an event taken before (its row went out with the batch that took it);
        after a crash that made part of its changes durable, the rest is made."""
        key = (update.account, update.symbol)
        positions = self.ptrc_positions
        taken = False
        if not positions.already_applied(key):
            held = positions.get(key)
            if not take_update(held, update):
                return False, False
            positions[key] = update
            self._positions_by_account.setdefault(update.account, {})[update.symbol] = update
            self._note_ptrc_mark(update)
            taken = True
            if held is not None and update.revision and held.revision == update.revision:
                return taken, False  # the same state published again: its execution counted once
        return taken, self.count_execution(update)

    def count_execution(self, update: PositionUpdate) -> bool:
        """Hold what `update` did to an execution; True when the account's counts moved."""
        change = execution_change(update)
        if change is None:
            return False
        account = update.account
        key = (account, change.fill_id)
        executions = self.counted_fills
        if executions.already_applied(key):
            return False
        counts = self._fills_days.get(account)
        held = executions.get(key)
        execution = counted_fill(change, held, counts.day if counts is not None else None)
        if execution is None:
            return False
        executions[key] = execution
        ids = self._counted_ids.setdefault(account, [])
        if held is None:
            heapq.heappush(ids, (execution.ts, change.fill_id))
        recounted = recount(counts, held, execution)
        if counts is not None and recounted.day > counts.day:
            self._evict_before(account, recounted.day)
        if len(ids) > self.max_fills_per_account:
            self._fold_oldest(account)
        self._fills_days[account] = recounted
        return recounted != counts

    def _evict_before(self, account: str, day: int) -> None:
        """Delete the account's executions (and folded record) of days before `day`: its
        counts are of `day` now, and an amendment of an earlier day's execution no
        longer changes them."""
        executions = self.counted_fills
        folded = executions.get((account, FOLDED))
        if folded is not None and folded.day < day:
            del executions[(account, FOLDED)]
        ids = self._counted_ids[account]
        kept = []
        for ts, fill_id in ids:
            if executions[(account, fill_id)].day < day:
                del executions[(account, fill_id)]
            else:
                kept.append((ts, fill_id))
        ids[:] = kept
        heapq.heapify(ids)

    def _fold_oldest(self, account: str) -> None:
        """Fold the account's oldest executions into its record until it holds
        `max_fills_per_account` one by one. The counts do not move; what is lost is an
        amendment of a folded execution (it changes nothing)."""
        executions = self.counted_fills
        ids = self._counted_ids[account]
        folded = executions.get((account, FOLDED))
        while len(ids) > self.max_fills_per_account:
            _, fill_id = heapq.heappop(ids)
            folded = fold_fill(folded, executions.pop((account, fill_id)))
        executions[(account, FOLDED)] = folded

    # -- orders: fill rate ---------------------------------------------------------------------

    async def order_agent(self, stream) -> None:
        names = ACCOUNT_ORDER_FEATURES.feature_names
        async for records in self.batches(stream):
            rows = []
            for record in records:
                order = record.value
                if order.status != "NEW":
                    continue  # updates of an order already counted
                with stream.processing(record):
                    self.order_days.apply(order.account, lambda d: add_order_to_day(d, order.ts, order.qty))
                ts = self.stamp(order.account, order.ts)
                rows.append(row(order.account, ts, self.rate_values(order.account, utc_day(ts)), names))
            self.sinks.order_rates.extend(rows)


def known_entities(agents: FeatureAgents, limit: int) -> dict[str, list[str]]:
    """The symbols and accounts the agents hold state for (the page's pickers), sorted,
    at most `limit` of each: symbols with trades or quotes, accounts with positions or
    orders."""
    symbols = set(agents.trade_history.keys()) | set(agents.quote_tops.keys())
    accounts = {account for account, _ in agents.ptrc_positions.keys()} | set(agents.order_days.keys())
    return {"symbols": sorted(symbols)[:limit], "accounts": sorted(accounts)[:limit]}


# -- the batch view -----------------------------------------------------------------------------


class HourlyBatch:
    """`symbol_hourly_features` (`posttrade.features.batch`) and materialization.

    A run computes the closed hours not computed yet from the offline minute rows (at
    most `max_hours_per_run`), writes each hour's rows offline through `sink` (one part
    per hour: an hour computed again lands on the same part), then materializes the
    `materialize_views` online up to their newest offline row — not the wall clock, so
    rows computed late for earlier hours are never skipped. A failed materialization is
    recorded, not retried: it holds no rows of ours, and the next run continues from the
    last interval Feast materialized. One run at a time.
    """

    def __init__(
        self,
        feast: FeastClient,
        status: FeatureStatus,
        sink: Sink,
        *,
        max_hours_per_run: int,
        materialize_views: list[str],
    ):
        self.feast = feast
        self.status = status
        self.sink = sink
        self.max_hours_per_run = max_hours_per_run
        self.materialize_views = materialize_views
        self.source = SYMBOL_TRADE_FEATURES
        self.target = SYMBOL_HOURLY_FEATURES
        self.next_hour: int | None = None  # kept in memory, so that runs of empty hours move on
        self.runs = 0
        self.errors = 0
        self.last_error: str | None = None
        self.last_run: dict | None = None
        self._lock = asyncio.Lock()

    async def run(self) -> dict:
        """Compute the closed hours offline, then materialize; what `batch.last_run` says."""
        async with self._lock:
            started = time.perf_counter()
            try:
                hours, rows = await self._compute()
            except Exception as exc:
                self.errors += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                self.status[self.target.name].error(f"batch: {self.last_error}")
                raise
            computed_s = time.perf_counter() - started
            materialized = {}
            for view in self.materialize_views:
                newest = self.status[view].newest_event_ts
                if newest is None:
                    continue  # nothing offline yet
                end = datetime.fromtimestamp(newest / 1e9 + 1, tz=timezone.utc)
                materialized[view] = await self._materialize(view, end)
            self.runs += 1
            self.last_run = {
                "hours_computed": hours,
                "rows": rows,
                "duration_s": round(computed_s, 4),
                "materialized_s": materialized,
                "finished_at": datetime.now(timezone.utc).isoformat().replace("+00:00", "Z"),
            }
            return self.last_run

    async def _compute(self) -> tuple[int, int]:
        """(hours computed, rows written)."""
        offline = self.feast.repository_or_fail().offline
        source_range = await asyncio.to_thread(offline.event_time_range, self.source)
        if source_range is None:
            return 0, 0
        oldest, newest = source_range
        hour = self.next_hour
        if hour is None:  # after a start: after the newest computed hour, or at the first one
            done = await asyncio.to_thread(offline.event_time_range, self.target)
            hour = self.next_hour = first_hour(oldest, done[1] if done is not None else None)
        hours = rows = 0
        while hour_closed(hour, newest) and hours < self.max_hours_per_run:
            hour_rows = await asyncio.to_thread(self._hour_rows, offline, hour)
            if hour_rows:
                self.sink.extend(hour_rows)
                try:
                    await self.sink.flush()
                except BaseException:
                    self.sink.discard()  # the next run computes this hour again
                    raise
                rows += len(hour_rows)
            hours += 1
            hour = self.next_hour = hour + HOUR_NS
        return hours, rows

    def _hour_rows(self, offline, hour: int) -> list[tuple]:
        """The rows of the hour starting at `hour`, from its minute rows (blocking)."""
        return hourly_rows(offline.read(self.source, hour + 1_000, hour + HOUR_NS + 1_000), hour, self.source)

    async def _materialize(self, view: str, end: datetime) -> float | None:
        """`materialize_incremental` of `view` up to `end`: its duration, None if it failed."""
        try:
            result = await self.feast.materialize(view, end)
        except Exception as exc:
            self.status.materialize_failed(view, f"{type(exc).__name__}: {exc}")
            log.exception("materializing %s failed", view)
            return None
        self.status.materialized(view, result)
        return round(result.duration_s, 4)
