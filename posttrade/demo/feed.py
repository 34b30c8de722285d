"""The demo feed: synthetic quotes, market trades, orders and fills for every service.

`FeedGenerator` is pure and deterministic: the same settings, seed and start time give
the same events. Time advances in steps of `step_s`; each step holds a number of
*actions* at random instants (sized so the feed emits about `rate` events a second):

* a quote update: one symbol's random walk advances and its new quote is published;
  resting orders it reaches are filled;
* a market trade: someone else's print at the touch; a resting order at that price may
  take part of it;
* a new order: an account sends a market or limit order (sized, priced and routed by
  the account's style, leaning against the position it holds so positions come and go),
  executed by `ExecutionSimulator` against the symbol's current quote.

The instruments (`market.INSTRUMENTS`) are twenty US equities and five in other
currencies and shapes (a future, two FX pairs, a crypto pair, a EUR stock), each with
its own tick, lot and fees; every account trades all of them, so the services' base
currency totals add up JPY, EUR and USDT P&L converted at the FX pairs' quotes.
Resting orders are cancelled when their time to live runs out. `DemoFeed` publishes the
steps on NATS in real time, one step per `step_s`, each message with `Nats-Msg-Id` set
to the event's id, so a step republished after a connection error is deduplicated.

Subjects (posttrade/streams/subjects.py) and who consumes them:
quotes `md.quotes.<symbol>` (pnl, hot_cache, questdb_writer, feast_pipeline,
execution_quality), trades `md.trades.<symbol>` (the same), orders
`trading.orders.<account>.<symbol>` (questdb_writer, feast_pipeline,
execution_quality), fills `trading.fills.<account>.<symbol>` (ptrc, questdb_writer,
feast_pipeline, execution_quality); ptrc's positions then feed pnl and hot_cache.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter, deque
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field, replace

from ..app import App
from ..streams import subjects
from ..streams.events import Fill, MarketTrade, Order, Quote, encode
from ..streams.transport import Transport
from .execution import ExecutionSimulator
from .market import INSTRUMENTS, Instrument, SymbolBook, tagged

log = logging.getLogger(__name__)

Event = Quote | MarketTrade | Order | Fill

_NS = 1_000_000_000


@dataclass(frozen=True)
class Account:
    """A trading account and its style."""

    name: str
    market_share: float  # fraction of its orders sent as MARKET orders
    aggressive_share: float  # fraction of its LIMIT orders priced through the spread
    # Order size in round lots of the instrument (100 shares, a contract, a million of
    # an FX pair's base currency, 0.1 BTC); below one lot, odd sizes on the qty grid.
    qty_range: tuple[float, float]
    venues: tuple[str | None, ...]  # where it routes US equities (None: the broker's smart router)
    ttl_s: tuple[float, float]  # how long its resting orders live


ACCOUNTS: tuple[Account, ...] = (
    Account("ALPHA-MOMENTUM", 0.6, 0.7, (1, 20), ("XNAS", "XNYS", "ARCX"), (1.0, 8.0)),
    Account("BRAVO-PASSIVE", 0.05, 0.1, (1, 30), ("XNAS", "XNYS", "BATS", "EDGX"), (5.0, 45.0)),
    Account("CHARLIE-MM", 0.0, 0.05, (1, 5), ("XNAS", "XNYS", "ARCX", "IEXG"), (2.0, 20.0)),
    Account("DELTA-BLOCK", 0.3, 0.5, (10, 60), (None, "XNAS", "XNYS"), (3.0, 30.0)),
    Account("ECHO-RETAIL", 0.7, 0.5, (0.01, 1.5), ("IEXG", "MEMX", None), (2.0, 15.0)),
)


def tagged_accounts(accounts: tuple[Account, ...], tag: str | None) -> tuple[Account, ...]:
    if not tag:
        return accounts
    return tuple(replace(a, name=f"{a.name}-{tag}") for a in accounts)


@dataclass(frozen=True)
class FeedSettings:
    rate: float = 300.0  # events per second, every kind together
    seed: int = 1
    step_s: float = 0.1
    tag: str | None = None  # appended to every symbol and account ("AAPL-<tag>")
    instruments: tuple[Instrument, ...] = INSTRUMENTS
    accounts: tuple[Account, ...] = ACCOUNTS
    # How actions split between quote updates, market trades and new orders.
    quote_weight: float = 0.6
    trade_weight: float = 0.3
    order_weight: float = 0.1

    def __post_init__(self) -> None:
        if not self.rate > 0:
            raise ValueError(f"rate must be > 0 events/s, got {self.rate}")
        if not self.step_s > 0:
            raise ValueError(f"step_s must be > 0, got {self.step_s}")
        if not self.instruments or not self.accounts:
            raise ValueError("the feed needs at least one instrument and one account")


def run_id_for(start_ns: int) -> str:
    """A short id for one run of the feed, part of every order, fill and trade id: two
    runs (even with the same seed) never produce the same ids."""
    ms = start_ns // 1_000_000
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while ms:
        ms, r = divmod(ms, 36)
        out = digits[r] + out
    return out or "0"


def message_id(event: Event) -> str:
    """The event's id for JetStream's duplicate detection (Nats-Msg-Id)."""
    if isinstance(event, Fill):
        return event.fill_id
    if isinstance(event, Order):
        return f"{event.order_id}:{event.status}"
    if isinstance(event, MarketTrade):
        return event.trade_id or f"T:{event.symbol}:{event.ts}"
    return f"Q:{event.symbol}:{event.ts}"  # a symbol's quotes have distinct times


def subject_of(event: Event) -> str:
    if isinstance(event, Fill):
        return subjects.fill_subject(event.account, event.symbol)
    if isinstance(event, Order):
        return subjects.order_subject(event.account, event.symbol)
    if isinstance(event, MarketTrade):
        return subjects.trade_subject(event.symbol)
    return subjects.quote_subject(event.symbol)


def kind_of(event: Event) -> str:
    return {Quote: "quotes", MarketTrade: "trades", Order: "orders", Fill: "fills"}[type(event)]


class FeedGenerator:
    """Deterministic synthetic market and trading activity, one step at a time."""

    def __init__(self, settings: FeedSettings, start_ns: int, run_id: str | None = None):
        self.settings = settings
        self.rng = random.Random(settings.seed)
        self.run_id = run_id or run_id_for(start_ns)
        self.now = start_ns  # the start of the next step
        self.step_ns = int(settings.step_s * _NS)
        self.books = {i.symbol: SymbolBook(i, self.rng) for i in tagged(settings.instruments, settings.tag)}
        self.accounts = tagged_accounts(settings.accounts, settings.tag)
        self._last_move = {symbol: start_ns for symbol in self.books}
        self._counters: Counter[str] = Counter()
        self.executions = ExecutionSimulator(self.rng, lambda: self._next_id("F"))
        self.positions: Counter[tuple[str, str]] = Counter()  # (account, symbol) -> net qty units
        self.steps = 0
        self.actions = 0
        self.emitted: Counter[str] = Counter()  # kind -> events

    def _next_id(self, kind: str) -> str:
        self._counters[kind] += 1
        return f"{kind}-{self.run_id}-{self._counters[kind]}"

    @property
    def total_emitted(self) -> int:
        return sum(self.emitted.values())

    def step(self) -> list[Event]:
        """The events of the next `step_s` of market time, in time order."""
        settings, rng = self.settings, self.rng
        start = self.now
        events: list[Event] = []
        if self.steps == 0:
            # Every symbol gets a quote first: orders need one to execute against.
            for book in self.books.values():
                events.append(book.make_quote(start))
        target = (self.steps + 1) * settings.rate * settings.step_s
        per_action = (self.total_emitted / self.actions) if self.actions else 1.25
        count = max(1, round((target - self.total_emitted - len(events)) / per_action))
        count = min(count, self.step_ns - 1)
        weights = (settings.quote_weight, settings.trade_weight, settings.order_weight)
        for offset in sorted(rng.sample(range(1, self.step_ns), count)):
            at = start + offset
            events.extend(self.executions.expire(at))
            kind = rng.choices(("quote", "trade", "order"), weights)[0]
            book = self.books[rng.choice(tuple(self.books))]
            if kind == "quote":
                book.move((at - self._last_move[book.symbol]) / _NS)
                self._last_move[book.symbol] = at
                events.append(book.make_quote(at))
                events.extend(self.executions.on_quote(book))
            elif kind == "trade":
                trade = book.make_trade(at, self._next_id("T"))
                events.append(trade)
                events.extend(self.executions.on_trade(trade))
            else:
                account = rng.choice(self.accounts)
                order, ttl_ns = self._new_order(account, book, at)
                events.extend(self.executions.submit(order, book, ttl_ns))
        self.actions += count
        events.sort(key=lambda e: e.ts)  # stable: an order's NEW stays before its fills
        for event in events:
            self.emitted[kind_of(event)] += 1
            if isinstance(event, Fill):
                units = self.books[event.symbol].units(event.qty)
                self.positions[(event.account, event.symbol)] += units if event.side == "BUY" else -units
        self.steps += 1
        self.now = start + self.step_ns
        return events

    def _new_order(self, account: Account, book: SymbolBook, at: int) -> tuple[Order, int]:
        rng = self.rng
        lot = book.lot_units
        low, high = (max(1, round(lots * lot)) for lots in account.qty_range)  # in units
        qty = rng.randint(low, high)
        if qty >= lot:
            qty = qty // lot * lot  # institutional sizes in round lots
        # Lean against the position held, so positions get closed (and P&L realized).
        held = self.positions[(account.name, book.symbol)]
        lean = max(-0.35, min(0.35, held / (5 * high)))
        side = "BUY" if rng.random() < 0.5 - lean else "SELL"
        buy = side == "BUY"
        venue = rng.choice(book.instrument.routes or account.venues)
        ttl_ns = int(rng.uniform(*account.ttl_s) * _NS)
        order_id = self._next_id("O")
        if rng.random() < account.market_share:
            return Order(
                ts=at, order_id=order_id, account=account.name, symbol=book.symbol, side=side,
                qty=book.qty(qty), order_type="MARKET", venue=venue,
            ), ttl_ns  # fmt: skip
        if rng.random() < account.aggressive_share:
            # Through the spread, a few ticks deep: takes at once, the rest may rest.
            limit = (book.ask_ticks + rng.randint(0, 3)) if buy else (book.bid_ticks - rng.randint(0, 3))
        else:
            # At or behind the touch: waits to be hit.
            limit = (book.bid_ticks - rng.randint(0, 4)) if buy else (book.ask_ticks + rng.randint(0, 4))
        limit = max(1, limit)
        return Order(
            ts=at, order_id=order_id, account=account.name, symbol=book.symbol, side=side,
            qty=book.qty(qty), order_type="LIMIT", limit_price=book.price(limit), venue=venue,
        ), ttl_ns  # fmt: skip


def declare_streams(transport: Transport) -> App:
    """An App with the bus channels the feed publishes to (for their stream specs)."""
    app = App("demo_feed", transport)
    for declare in (subjects.quotes, subjects.market_trades, subjects.orders, subjects.fills):
        declare(app)
    return app


@dataclass
class FeedProgress:
    started_at: float = field(default_factory=time.monotonic)
    published: Counter = field(default_factory=Counter)  # kind -> events the server has
    retries: int = 0
    behind_s: float = 0.0  # how far publishing is behind the feed's clock

    @property
    def total(self) -> int:
        return sum(self.published.values())

    def rate(self) -> float:
        elapsed = time.monotonic() - self.started_at
        return self.total / elapsed if elapsed > 0 else 0.0

    def summary(self) -> str:
        kinds = ", ".join(f"{kind} {self.published[kind]:,}" for kind in ("quotes", "trades", "orders", "fills"))
        return f"{self.total:,} events ({kinds}), {self.rate():.0f}/s"


@dataclass
class _Step:
    """One step's events on their way to the server."""

    events: list[Event]
    messages: list[tuple[str, bytes, str]]  # (subject, payload, Nats-Msg-Id)
    acks: list[asyncio.Future] | None  # None: publishing them failed


class DemoFeed:
    """Publishes a FeedGenerator's steps on NATS in real time.

    Up to `MAX_IN_FLIGHT_STEPS` steps wait for the server's acknowledgements while the
    next ones are published, so a slow round trip (a busy machine) does not slow the
    feed. A failed or unanswered publish republishes every step still in flight, in
    order; the message ids make the server drop what it already has.
    """

    MAX_IN_FLIGHT_STEPS = 20
    ACK_TIMEOUT_S = 10.0  # nats-py's acknowledgement futures have no timeout of their own
    RETRY_PAUSE_S = 1.0
    # Further behind than this (a long NATS outage, a starved machine), the feed jumps to
    # the present rather than publishing a burst of old market data.
    MAX_BEHIND_S = 30.0

    def __init__(self, transport: Transport, settings: FeedSettings, start_ns: int | None = None):
        self.transport = transport
        self.settings = settings
        self.generator = FeedGenerator(settings, start_ns or time.time_ns())
        self.progress = FeedProgress()

    async def run(
        self,
        duration_s: float | None = None,
        stop: asyncio.Event | None = None,
        on_step: Callable[[FeedProgress], None] | None = None,
    ) -> FeedProgress:
        """Publish until `duration_s` has passed or `stop` is set; returns what was published
        (every event counted there was acknowledged by the server)."""
        stop = stop or asyncio.Event()
        await self.transport.connect()
        app = declare_streams(self.transport)
        for channel in app.channels.values():
            await self.transport.ensure_stream(channel.stream)
        generator = self.generator
        began_mono, began_ns = time.monotonic(), generator.now
        self.progress = FeedProgress()
        in_flight: deque[_Step] = deque()
        try:
            while not stop.is_set():
                if duration_s is not None and time.monotonic() - began_mono >= duration_s:
                    break
                due = began_mono + (generator.now - began_ns) / _NS  # when this step's time begins
                wait = due + self.settings.step_s - time.monotonic()  # publish once its time has passed
                if wait > 0:
                    try:
                        await asyncio.wait_for(stop.wait(), wait)
                        break
                    except asyncio.TimeoutError:
                        pass
                behind = time.monotonic() - due - self.settings.step_s
                self.progress.behind_s = max(0.0, behind)
                if behind > self.MAX_BEHIND_S:
                    log.warning("demo feed %.0f s behind: skipping ahead to the present", behind)
                    generator.now += int(behind * _NS) // generator.step_ns * generator.step_ns
                    continue
                in_flight.append(await self._send(generator.step()))
                # After a failed publish nothing new goes out until everything before it is
                # confirmed: the stream keeps the steps' order.
                while len(in_flight) > self.MAX_IN_FLIGHT_STEPS or any(step.acks is None for step in in_flight):
                    await self._confirm_oldest(in_flight, stop)
                    if stop.is_set():
                        break
                if on_step is not None:
                    on_step(self.progress)
            while in_flight and not stop.is_set():
                await self._confirm_oldest(in_flight, stop)
            if in_flight:  # stopping: a last chance for what is already on its way
                await self._confirm_oldest(in_flight, stop, retry=False)
        finally:
            for step in in_flight:
                for ack in step.acks or ():
                    ack.cancel()
        return self.progress

    async def _send(self, events: list[Event]) -> _Step:
        step = _Step(events, [(subject_of(e), encode(e), message_id(e)) for e in events], None)
        try:
            step.acks = [
                await self.transport.publish_deferred(subject, data, None, msg_id)
                for subject, data, msg_id in step.messages
            ]
        except Exception as exc:  # noqa: BLE001 - NATS away: _confirm_oldest retries
            log.warning("demo feed: publishing failed (%s: %s)", type(exc).__name__, exc)
        return step

    async def _confirm_oldest(self, in_flight: deque[_Step], stop: asyncio.Event, retry: bool = True) -> None:
        """Wait for the oldest step's acknowledgements; on failure republish all in flight."""
        oldest = in_flight[0]
        if oldest.acks is not None:
            try:
                await asyncio.wait_for(asyncio.gather(*oldest.acks), self.ACK_TIMEOUT_S)
            except Exception as exc:  # noqa: BLE001 - any failure: the same messages again
                log.warning("demo feed: no acknowledgement (%s: %s)", type(exc).__name__, exc)
            else:
                self._count(in_flight.popleft())
                return
        while retry and not stop.is_set():
            self.progress.retries += 1
            with suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), self.RETRY_PAUSE_S)
            if stop.is_set():
                break
            try:
                # One step at a time, each confirmed before the next: every success is
                # progress, and the order on the stream stays the order of the steps.
                while in_flight:
                    step = in_flight[0]
                    step.acks = [
                        await self.transport.publish_deferred(subject, data, None, msg_id)
                        for subject, data, msg_id in step.messages
                    ]
                    await asyncio.wait_for(asyncio.gather(*step.acks), self.ACK_TIMEOUT_S)
                    self._count(in_flight.popleft())
            except Exception as exc:  # noqa: BLE001
                log.warning("demo feed: republishing failed (%s: %s); retrying", type(exc).__name__, exc)
                continue
            return
        in_flight.clear()  # stopping: what was not acknowledged is dropped (and not counted)

    def _count(self, step: _Step) -> None:
        for event in step.events:
            self.progress.published[kind_of(event)] += 1


__all__ = [
    "ACCOUNTS",
    "Account",
    "DemoFeed",
    "FeedGenerator",
    "FeedProgress",
    "FeedSettings",
    "declare_streams",
    "message_id",
    "run_id_for",
    "subject_of",
    "tagged_accounts",
]
