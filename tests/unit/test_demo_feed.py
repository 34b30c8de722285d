"""The demo feed: deterministic, valid events; orders and fills consistent with each other
and with the quotes they executed against; the publisher's retries never duplicate."""

from __future__ import annotations

import asyncio
import random
from collections import Counter, defaultdict
from decimal import Decimal

import pytest

from posttrade.demo.execution import ExecutionSimulator
from posttrade.demo.feed import (
    ACCOUNTS,
    DemoFeed,
    FeedGenerator,
    FeedSettings,
    message_id,
    subject_of,
)
from posttrade.demo.market import INSTRUMENTS, LOT, TICK, Instrument, SymbolBook
from posttrade.streams.events import Fill, MarketTrade, Order, Quote, decode, encode
from posttrade.streams.memory import MemoryTransport

START_NS = 1_750_000_000_000_000_000
STEPS = 600  # one minute of market time at the default 0.1 s steps


def generate(settings: FeedSettings = FeedSettings(seed=11), steps: int = STEPS) -> list:
    generator = FeedGenerator(settings, START_NS, run_id="t")
    events = []
    for _ in range(steps):
        events.extend(generator.step())
    return events


@pytest.fixture(scope="module")
def events() -> list:
    return generate()


def test_the_same_seed_gives_the_same_events_and_another_seed_others():
    first = [encode(e) for e in generate(FeedSettings(seed=5), 100)]
    assert first == [encode(e) for e in generate(FeedSettings(seed=5), 100)]
    assert first != [encode(e) for e in generate(FeedSettings(seed=6), 100)]


def test_every_event_satisfies_the_event_contract(events):
    kinds = Counter(type(e) for e in events)
    assert set(kinds) == {Quote, MarketTrade, Order, Fill}
    for event in events:
        assert decode(type(event), encode(event)) == event
        assert START_NS <= event.ts < START_NS + 62 * 10**9


def test_the_rate_is_about_what_was_asked():
    for rate in (100.0, 300.0, 1000.0):
        events = generate(FeedSettings(rate=rate, seed=1), steps=300)  # 30 s
        assert abs(len(events) / 30 - rate) / rate < 0.1, (rate, len(events) / 30)


def test_twenty_symbols_five_accounts_and_a_tag_that_keeps_them_apart():
    tagged = generate(FeedSettings(seed=2, tag="X1"), 200)
    symbols = {e.symbol for e in tagged}
    assert symbols == {f"{i.symbol}-X1" for i in INSTRUMENTS} and len(symbols) == 20
    assert {e.account for e in tagged if isinstance(e, Order | Fill)} == {f"{a.name}-X1" for a in ACCOUNTS}
    # A symbol with a dot is routed through its subject token, the payload keeps the name.
    brk = next(e for e in tagged if isinstance(e, Quote) and e.symbol == "BRK.B-X1")
    assert subject_of(brk) == "md.quotes.BRK%2EB-X1"


def test_quotes_walk_on_the_tick_grid_and_trades_print_inside_them(events):
    last_ts: dict[str, int] = {}
    current: dict[str, Quote] = {}
    mids: dict[str, set] = defaultdict(set)
    for event in events:
        if isinstance(event, Quote):
            assert event.bid < event.ask
            assert event.bid % TICK == 0 and event.ask % TICK == 0
            assert event.bid_size % LOT == 0 and event.ask_size % LOT == 0
            assert event.ts > last_ts.get(event.symbol, 0) or event.ts == START_NS
            last_ts[event.symbol] = event.ts
            current[event.symbol] = event
            mids[event.symbol].add(event.mid)
        elif isinstance(event, MarketTrade):
            quote = current[event.symbol]
            assert quote.bid <= event.price <= quote.ask
            assert event.aggressor in ("BUY", "SELL")
    assert all(len(m) > 5 for m in mids.values())  # every price moved during the minute


def test_orders_and_fills_are_consistent(events):
    orders: dict[str, Order] = {}
    ends: dict[str, Order] = {}
    fills: dict[str, list[Fill]] = defaultdict(list)
    fill_ids = set()
    for event in events:  # in publishing order
        if isinstance(event, Order):
            if event.status == "NEW":
                assert event.order_id not in orders
                orders[event.order_id] = event
            else:
                assert event.order_id in orders and event.order_id not in ends  # one end, after its NEW
                assert event.status in ("FILLED", "CANCELED")
                ends[event.order_id] = event
        elif isinstance(event, Fill):
            assert event.fill_id not in fill_ids
            fill_ids.add(event.fill_id)
            order = orders[event.order_id]  # the NEW came first
            assert event.order_id not in ends  # no fill after the end
            assert (event.account, event.symbol, event.side) == (order.account, order.symbol, order.side)
            assert event.ts >= order.ts
            fills[event.order_id].append(event)
    outcomes = Counter()
    for order_id, order in orders.items():
        filled = sum(f.qty for f in fills[order_id])
        assert filled <= order.qty
        end = ends.get(order_id)
        if end is not None:
            assert end.ts >= max((f.ts for f in fills[order_id]), default=order.ts)
            assert (end.status == "FILLED") == (filled == order.qty)
        state = "open" if end is None else end.status
        partial = "none" if filled == 0 else "all" if filled == order.qty else "part"
        outcomes[(order.order_type, state, partial)] += 1
    # The mix the demo promises: market and limit orders, some partly filled and cancelled,
    # some cancelled unfilled, some still working at the end.
    assert outcomes[("MARKET", "FILLED", "all")] > 0
    assert outcomes[("MARKET", "CANCELED", "part")] > 0
    assert outcomes[("LIMIT", "FILLED", "all")] > 0
    assert outcomes[("LIMIT", "CANCELED", "part")] > 0
    assert outcomes[("LIMIT", "CANCELED", "none")] > 0
    assert sum(n for (_, state, _), n in outcomes.items() if state == "open") > 0


def test_fill_prices_against_the_quotes(events):
    quote: dict[str, Quote] = {}
    arrival_quote: dict[str, Quote] = {}
    orders: dict[str, Order] = {}
    depth_ticks = 4 + 1  # ExecutionSimulator's default levels, plus one tick of latency slippage
    slipped = 0
    liquidity = Counter()
    for event in events:
        if isinstance(event, Quote):
            quote[event.symbol] = event
        elif isinstance(event, Order) and event.status == "NEW":
            orders[event.order_id] = event
            arrival_quote[event.order_id] = quote[event.symbol]
        elif isinstance(event, Fill):
            order = orders[event.order_id]
            buy = event.side == "BUY"
            liquidity[event.liquidity] += 1
            if order.limit_price is not None:
                assert event.price <= order.limit_price if buy else event.price >= order.limit_price
            if event.liquidity == "TAKER":
                # Takes at or beyond the touch of the quote it arrived on, within the book's depth.
                touch = arrival_quote[event.order_id].ask if buy else arrival_quote[event.order_id].bid
                beyond = (event.price - touch) if buy else (touch - event.price)
                assert 0 <= beyond <= depth_ticks * TICK, (event, touch)
                slipped += beyond > 0
                assert event.fee == Decimal("0.0030") * event.qty
            else:
                assert event.price == order.limit_price  # a maker fill is at its resting price
                assert event.fee == Decimal("-0.0020") * event.qty
    assert slipped > 0  # some takers paid more than the touch
    assert liquidity["TAKER"] > 0 and liquidity["MAKER"] > 0


def test_message_ids_are_unique_and_stable(events):
    ids = [message_id(e) for e in events]
    assert len(ids) == len(set(ids))
    fill = next(e for e in events if isinstance(e, Fill))
    assert message_id(fill) == fill.fill_id
    order = next(e for e in events if isinstance(e, Order))
    assert message_id(order) == f"{order.order_id}:{order.status}"


# -- the execution simulator on its own --------------------------------------------------


def one_book(rng: random.Random) -> SymbolBook:
    book = SymbolBook(Instrument("XYZ", Decimal("100.00"), "XNAS", 1, 1.0), rng)
    book.make_quote(START_NS)
    return book


def simulator(rng: random.Random) -> ExecutionSimulator:
    counter = iter(range(1, 10**6))
    return ExecutionSimulator(rng, lambda: f"F{next(counter)}", latency_slip_probability=0.0)


def test_a_market_order_walks_the_book_and_the_rest_beyond_the_collar_is_cancelled():
    rng = random.Random(3)
    book = one_book(rng)
    sim = simulator(rng)
    order = Order(ts=START_NS + 1, order_id="O1", account="A", symbol="XYZ", side="BUY", qty=Decimal(10**6))
    events = sim.submit(order, book, ttl_ns=10**9)
    new, *fills, end = events
    assert new == order and all(isinstance(f, Fill) for f in fills)
    assert [f.price for f in fills] == [book.quote.ask + k * TICK for k in range(4)]  # one fill per level
    assert fills[0].qty == book.quote.ask_size  # the touch has the quoted size
    assert end.status == "CANCELED" and sum(f.qty for f in fills) < order.qty
    assert sim.working == {}


def test_a_resting_limit_order_is_filled_as_maker_when_the_market_comes_to_it_or_expires():
    rng = random.Random(4)
    book = one_book(rng)
    sim = simulator(rng)
    limit = book.quote.bid - 2 * TICK  # behind the touch: nothing at once
    order = Order(ts=START_NS + 1, order_id="O2", account="A", symbol="XYZ", side="BUY", qty=Decimal(50_000),
                  order_type="LIMIT", limit_price=limit)  # fmt: skip
    assert sim.submit(order, book, ttl_ns=5 * 10**9) == [order]
    assert "O2" in sim.working
    # The offer comes down through the limit: a maker fill at the limit price.
    book.bid_ticks, book.ask_ticks = int(limit / TICK) - 2, int(limit / TICK) - 1
    book.make_quote(START_NS + 10**9)
    [fill] = sim.on_quote(book)
    assert fill.price == limit and fill.liquidity == "MAKER" and fill.ts > START_NS + 10**9
    assert sim.working["O2"].filled == fill.qty < order.qty
    # Its time runs out: cancelled with what it got.
    assert sim.expire(START_NS + 4 * 10**9) == []
    [cancel] = sim.expire(START_NS + 6 * 10**9)
    assert cancel.status == "CANCELED" and cancel.ts == START_NS + 1 + 5 * 10**9 and sim.working == {}


def test_a_limit_order_never_fills_through_its_limit():
    rng = random.Random(5)
    book = one_book(rng)
    sim = simulator(rng)
    limit = book.quote.ask + TICK
    order = Order(ts=START_NS + 1, order_id="O3", account="A", symbol="XYZ", side="BUY", qty=Decimal(10**6),
                  order_type="LIMIT", limit_price=limit)  # fmt: skip
    events = sim.submit(order, book, ttl_ns=10**9)
    fills = [e for e in events if isinstance(e, Fill)]
    assert [f.price for f in fills] == [book.quote.ask, limit]
    assert sim.working["O3"].filled == sum(f.qty for f in fills)  # the rest rests


# -- the publisher -----------------------------------------------------------------------


class FlakyTransport(MemoryTransport):
    """Fails every `every`-th publish: a connection that drops now and then."""

    def __init__(self, every: int):
        super().__init__()
        self.every = every
        self.calls = 0

    async def publish_deferred(self, subject, data, headers=None, msg_id=None):
        self.calls += 1
        if self.calls % self.every == 0:
            raise ConnectionError("connection lost")
        return await super().publish_deferred(subject, data, headers, msg_id)


@pytest.mark.parametrize("transport", [MemoryTransport(), FlakyTransport(every=97)], ids=["steady", "flaky"])
async def test_the_feed_publishes_every_event_once_in_order_with_its_message_id(transport, monkeypatch):
    monkeypatch.setattr(DemoFeed, "RETRY_PAUSE_S", 0.01)
    settings = FeedSettings(rate=400, seed=9, step_s=0.05)
    feed = DemoFeed(transport, settings, start_ns=START_NS)
    progress = await feed.run(duration_s=1.0)

    expected = FeedGenerator(settings, START_NS, run_id=feed.generator.run_id)
    published = {name: stream.messages for name, stream in transport.streams.items()}
    assert set(published) == {"QUOTES", "TRADES", "ORDERS", "FILLS"}
    wanted = [e for _ in range(feed.generator.steps) for e in expected.step()]
    assert progress.total == len(wanted) > 200
    stream_of = {Quote: "QUOTES", MarketTrade: "TRADES", Order: "ORDERS", Fill: "FILLS"}
    for name, messages in published.items():
        mine = [e for e in wanted if stream_of[type(e)] == name]
        assert [data for _, data, _, _ in messages] == [encode(e) for e in mine]  # once each, in order
        assert list(transport.streams[name].msg_ids) == [message_id(e) for e in mine]
    if isinstance(transport, FlakyTransport):
        assert progress.retries > 0


async def test_the_feed_stops_when_asked():
    transport = MemoryTransport()
    feed = DemoFeed(transport, FeedSettings(rate=200, seed=1), start_ns=START_NS)
    stop = asyncio.Event()
    task = asyncio.create_task(feed.run(stop=stop))
    await asyncio.sleep(0.5)
    stop.set()
    progress = await asyncio.wait_for(task, 5)
    assert progress.total > 0
