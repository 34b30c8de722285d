"""The demo feed: deterministic, valid events on each instrument's grid; orders and fills
consistent with each other and with the quotes they executed against; instruments in
several currencies that the shipped reference data values; the publisher's retries
never duplicate."""

from __future__ import annotations

import asyncio
import random
from collections import Counter, defaultdict
from decimal import Decimal
from pathlib import Path

import pytest
import yaml

from posttrade.demo.execution import ExecutionSimulator
from posttrade.demo.feed import (
    ACCOUNTS,
    DemoFeed,
    FeedGenerator,
    FeedSettings,
    message_id,
    subject_of,
)
from posttrade.core.positions import PositionBook
from posttrade.core.reference import Reference
from posttrade.demo.market import (
    INSTRUMENTS,
    OTHER_CURRENCIES,
    TICK,
    US_EQUITIES,
    Fees,
    Instrument,
    SymbolBook,
    tagged_reference,
)
from posttrade.streams.events import Fill, MarketTrade, Order, Quote, decode, encode
from posttrade.streams.memory import MemoryTransport

START_NS = 1_750_000_000_000_000_000
BY_SYMBOL = {i.symbol: i for i in INSTRUMENTS}
REFERENCE_FILE = Path(__file__).resolve().parents[2] / "config" / "backend" / "reference.yaml"
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


def test_twenty_five_symbols_five_accounts_and_a_tag_that_keeps_them_apart():
    tagged = generate(FeedSettings(seed=2, tag="X1"), 200)
    symbols = {e.symbol for e in tagged}
    assert symbols == {f"{i.symbol}-X1" for i in INSTRUMENTS} and len(symbols) == 25
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
            instrument = BY_SYMBOL[event.symbol]
            assert event.bid < event.ask
            assert event.bid % instrument.tick == 0 and event.ask % instrument.tick == 0
            assert event.bid_size % instrument.lot == 0 and event.ask_size % instrument.lot == 0
            assert event.ts > last_ts.get(event.symbol, 0) or event.ts == START_NS
            last_ts[event.symbol] = event.ts
            current[event.symbol] = event
            mids[event.symbol].add(event.mid)
        elif isinstance(event, MarketTrade):
            quote = current[event.symbol]
            assert quote.bid <= event.price <= quote.ask
            assert event.aggressor in ("BUY", "SELL")
            assert event.size % BY_SYMBOL[event.symbol].qty_step == 0
            assert event.venue in BY_SYMBOL[event.symbol].trade_venues
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
            instrument = BY_SYMBOL[event.symbol]
            buy = event.side == "BUY"
            liquidity[event.liquidity] += 1
            assert event.price % instrument.tick == 0 and event.qty % instrument.qty_step == 0
            if order.limit_price is not None:
                assert event.price <= order.limit_price if buy else event.price >= order.limit_price
            if event.liquidity == "TAKER":
                # Takes at or beyond the touch of the quote it arrived on, within the book's depth.
                touch = arrival_quote[event.order_id].ask if buy else arrival_quote[event.order_id].bid
                beyond = (event.price - touch) if buy else (touch - event.price)
                assert 0 <= beyond <= depth_ticks * instrument.tick, (event, touch)
                slipped += beyond > 0
            else:
                assert event.price == order.limit_price  # a maker fill is at its resting price
            assert event.fee == instrument.fees.fee(event.liquidity, event.qty, event.price)
            assert event.fee_currency == instrument.fees.currency
            if instrument in US_EQUITIES:
                per_share = Decimal("0.0030") if event.liquidity == "TAKER" else Decimal("-0.0020")
                assert event.fee == per_share * event.qty
    assert slipped > 0  # some takers paid more than the touch
    assert liquidity["TAKER"] > 0 and liquidity["MAKER"] > 0


def test_message_ids_are_unique_and_stable(events):
    ids = [message_id(e) for e in events]
    assert len(ids) == len(set(ids))
    fill = next(e for e in events if isinstance(e, Fill))
    assert message_id(fill) == fill.fill_id
    order = next(e for e in events if isinstance(e, Order))
    assert message_id(order) == f"{order.order_id}:{order.status}"


# -- instruments in other currencies -------------------------------------------------------


def test_the_future_the_fx_pairs_the_crypto_pair_and_the_eur_stock_are_quoted_and_traded(events):
    seen: dict[str, Counter] = defaultdict(Counter)
    for event in events:
        kind = type(event).__name__ if not isinstance(event, Order) or event.status == "NEW" else "end"
        seen[event.symbol][kind] += 1
    for instrument in OTHER_CURRENCIES:
        counts = seen[instrument.symbol]
        assert counts["Quote"] > 50 and counts["MarketTrade"] > 0 and counts["Order"] > 0 and counts["Fill"] > 0, (
            instrument.symbol, counts)  # fmt: skip
    fills = defaultdict(list)
    for event in events:
        if isinstance(event, Fill):
            fills[event.symbol].append(event)
    # Quantities as each market trades them: whole contracts, fractions of a bitcoin,
    # thousands of dollars; the FX commission charged in USD, not in JPY.
    assert all(f.qty == f.qty.to_integral_value() for f in fills["ESU4"])
    assert any(f.qty != f.qty.to_integral_value() for f in fills["BTCUSDT"])
    assert all(f.qty % 1000 == 0 for f in fills["USDJPY"] + fills["EURUSD"])
    assert {f.fee_currency for f in fills["USDJPY"]} == {"USD"}
    assert {f.fee_currency for f in fills["SAP"] + fills["BTCUSDT"] + fills["AAPL"]} == {None}
    # The FX quotes that give the rates: JPY per USD about 155, USD per EUR about 1.085.
    last = {e.symbol: e for e in events if isinstance(e, Quote)}
    assert Decimal(150) < last["USDJPY"].mid < Decimal(160) and last["USDJPY"].bid % Decimal("0.001") == 0
    assert Decimal("1.05") < last["EURUSD"].mid < Decimal("1.12") and last["EURUSD"].bid % Decimal("0.00001") == 0


def test_the_shipped_reference_data_values_every_demo_position_in_its_base(events):
    """What `make up` shows: every account's totals in its base currency (USD; EUR for
    BRAVO-PASSIVE), none missing a rate, with JPY, EUR and USDT positions converted at
    the feed's own FX quotes (through USD for the euro account)."""
    reference = Reference.load(REFERENCE_FILE)
    assert all(reference.currency(i.symbol) == "USD" and reference.multiplier(i.symbol) == 1 for i in US_EQUITIES)
    assert {i.symbol: (reference.currency(i.symbol), reference.multiplier(i.symbol)) for i in OTHER_CURRENCIES} == {
        "ESU4": ("USD", 50), "USDJPY": ("JPY", 1), "EURUSD": ("USD", 1), "BTCUSDT": ("USDT", 1), "SAP": ("EUR", 1),
    }  # fmt: skip
    assert reference.fx_instrument("USD", "JPY") == ("USDJPY", False)
    assert reference.fx_instrument("EUR", "USD") == ("EURUSD", False)
    book = PositionBook(reference=reference)
    for event in events:
        if isinstance(event, Fill):
            book.apply(event)
        elif isinstance(event, Quote):
            book.set_mark(event.symbol, event.mid)
    rates = {}
    for row in book.rows():
        assert row["missing_rates"] == [] and row["total_pnl_base"] is not None, row
        rates[(row["currency"], row["base_currency"])] = Decimal(row["fx_rate"])
    assert rates[("USD", "USD")] == 1 and rates[("USDT", "USD")] == 1
    assert rates[("JPY", "USD")] * book.marks["USDJPY"] == pytest.approx(1, abs=Decimal("1e-15"))
    assert rates[("EUR", "USD")] == book.marks["EURUSD"] and rates[("EUR", "EUR")] == 1
    assert rates[("USD", "EUR")] * book.marks["EURUSD"] == pytest.approx(1, abs=Decimal("1e-15"))
    for totals in book.totals():
        base = "EUR" if totals.account == "BRAVO-PASSIVE" else "USD"
        assert totals.base_currency == base and totals.missing_rates == [] and totals.total_pnl is not None


def test_a_tagged_feed_gets_reference_data_under_its_own_names():
    data = yaml.safe_load(REFERENCE_FILE.read_text())
    assert tagged_reference(data, INSTRUMENTS, None) == data
    tagged = Reference.from_data(tagged_reference(data, INSTRUMENTS, "T1"))
    assert tagged.multiplier("ESU4-T1") == 50 and tagged.currency("SAP-T1") == "EUR"
    assert tagged.currency("USDJPY-T1") == "JPY" and tagged.fx_instrument("USD", "JPY") == ("USDJPY-T1", False)
    assert "ESU4" not in tagged.instruments and "USDJPY" not in tagged.instruments  # one instrument per pair
    assert tagged.fixed == {("USDT", "USD"): 1}


def test_fees_per_quantity_or_per_notional_rounded_where_the_venue_rounds():
    crypto = Fees(Decimal("0.0010"), Decimal("0.0002"), per="notional", places=8)
    assert crypto.fee("TAKER", Decimal("0.123"), Decimal("64250.01")) == Decimal("7.90275123")
    assert crypto.fee("MAKER", Decimal("0.001"), Decimal("64250.05")) == Decimal("0.01285001")
    fx = Fees(Decimal("0.00001"), Decimal("0.000005"), currency="USD", places=2)
    assert fx.fee("TAKER", Decimal(1_234_000), Decimal("155.25")) == Decimal("12.34")
    assert fx.fee("MAKER", Decimal(1000), Decimal("155.25")) == Decimal("0.00")  # half-even
    assert Fees(Decimal("0.0030"), Decimal("-0.0020")).fee("MAKER", Decimal(32), Decimal("1")) == Decimal("-0.064")


def test_an_instrument_must_start_on_its_grid():
    with pytest.raises(ValueError, match="not on its 0.25 grid"):
        Instrument("ESZ5", Decimal("5512.10"), "XCME", 1, 1.0, tick=Decimal("0.25"))
    with pytest.raises(ValueError, match="lot"):
        Instrument("BTC", Decimal("1"), "X", 1, 1.0, lot=Decimal("0.1"), qty_step=Decimal("0.03"))


def test_a_bitcoin_market_order_walks_the_book_in_fractions_on_the_grids():
    rng = random.Random(7)
    btc = next(i for i in OTHER_CURRENCIES if i.symbol == "BTCUSDT")
    book = SymbolBook(btc, rng)
    book.make_quote(START_NS)
    sim = simulator(rng)
    order = Order(ts=START_NS + 1, order_id="O9", account="A", symbol="BTCUSDT", side="SELL", qty=Decimal("12.345"))
    new, *fills, end = sim.submit(order, book, ttl_ns=10**9)
    assert [f.price for f in fills] == [book.quote.bid - k * btc.tick for k in range(len(fills))]
    assert fills[0].qty == book.quote.bid_size and all(f.qty % btc.qty_step == 0 for f in fills)
    assert sum(f.qty for f in fills) <= order.qty and end.status in ("FILLED", "CANCELED")
    assert all(f.fee == (Decimal("0.0010") * f.qty * f.price).quantize(Decimal("1e-8")) for f in fills)


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
