"""Bars from trades: the pure accumulator, and the windowed agent on the in-memory transport."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from posttrade.agents.bars import TradeBarBuilder, add_bar_message_agent, add_trade_bar_agent
from posttrade.app import App
from posttrade.core.bars import BarState, bar_from_totals, interval_seconds, plain_decimals, window_start
from posttrade.sinks import RetryPolicy, Sink, SinkUnavailable
from posttrade.streams.events import Bar, MarketTrade, encode
from posttrade.streams.memory import MemoryTransport

S = 1_000_000_000
BASE = 1_700_000_100 * S  # a multiple of 300 s: the 1 s, 1 m and 5 m windows all start here
D = Decimal


def trade(offset_s: str, price: str, size: str, symbol: str = "XYZ") -> MarketTrade:
    return MarketTrade(ts=BASE + int(Decimal(offset_s) * S), symbol=symbol, price=D(price), size=D(size))


# The worked example. Offsets in seconds from BASE, in arrival order.
TAPE = [
    trade("1", "100.00", "10"),
    trade("5", "101.50", "5"),
    trade("20", "99.75", "20"),
    trade("59", "100.25", "15"),
    trade("61", "102", "1"),  # opens the second minute; the first is still in its grace (until 65 s)
    trade("0.5", "98", "4"),  # late, inside the 1 m grace: the earliest trade, so the new open
    trade("70", "102.5", "2"),  # the watermark passes 65 s: the first minute closes
    trade("30", "150", "100"),  # too late for the first minute: dropped (the 5 m window takes it)
]


# -- the accumulator -------------------------------------------------------------------------


def test_interval_parsing():
    assert [interval_seconds(i) for i in ("1s", "1m", "5m", "1h", "1d")] == [1, 60, 300, 3600, 86400]
    for bad in ("", "0s", "1", "m", "1w", "1.5m", "01m", " 1m", None):
        with pytest.raises(ValueError):
            interval_seconds(bad)
    assert window_start(BASE + 61 * S, "1m") == BASE + 60 * S


def test_bar_state_of_the_first_minute_by_hand():
    state = BarState()
    for t in TAPE[:4] + [TAPE[5]]:
        state = state.add(t.ts, t.price, t.size)
    bar = state.to_bar("XYZ", "1m", BASE)
    # open: 98 (0.5 s is the earliest time, though it arrived fifth); close: 100.25 (59 s)
    # volume 10 + 5 + 20 + 15 + 4 = 54; notional 1000 + 507.5 + 1995 + 1503.75 + 392 = 5398.25
    # vwap 5398.25 / 54 = 99.96759259259259... -> 12 places, half even
    assert bar == Bar(
        ts=BASE, symbol="XYZ", interval="1m",
        open=D("98"), high=D("101.5"), low=D("98"), close=D("100.25"),
        volume=D("54"), vwap=D("99.967592592593"), count=5,
    )
    assert state.notional == D("5398.25")


def test_ties_keep_the_first_open_and_the_last_close():
    state = BarState().add(BASE, D("10"), D("1")).add(BASE, D("11"), D("1")).add(BASE, D("12"), D("1"))
    assert (state.open, state.close) == (D("10"), D("12"))


def test_terminating_vwap_is_exact_and_spelled_plainly():
    state = BarState().add(BASE, D("10.50"), D("2.0")).add(BASE + 1, D("11.00"), D("2.0"))
    bar = state.to_bar("XYZ", "1s", BASE)
    assert str(bar.vwap) == "10.75" and str(bar.volume) == "4" and str(bar.open) == "10.5"


def test_bad_trades_and_empty_windows_are_refused():
    with pytest.raises(ValueError):
        BarState().add(BASE, D("0"), D("1"))
    with pytest.raises(ValueError):
        BarState().add(BASE, D("1"), D("-1"))
    with pytest.raises(ValueError):
        BarState().to_bar("XYZ", "1m", BASE)


def test_plain_decimals_respells_only_what_needs_it():
    bar = Bar(ts=BASE, symbol="XYZ", interval="1h", open=D("1.50"), high=D("2"), low=D("1.5"), close=D("2.0"),
              volume=D("1E+1"))
    spelled = plain_decimals(bar)
    spellings = [str(getattr(spelled, f)) for f in ("open", "high", "low", "close", "volume")]
    assert spellings == ["1.5", "2", "1.5", "2", "10"]
    assert plain_decimals(spelled) is spelled


def test_bar_from_totals_uses_the_same_vwap_rule():
    bar = bar_from_totals(
        ts=BASE, symbol="XYZ", interval="1m", open=D("102.000000"), high=D("102.5"), low=D("102"),
        close=D("102.5"), volume=D("3.000000"), notional=D("307.000000000000"), count=2,
    )
    assert (str(bar.open), str(bar.volume), bar.vwap) == ("102", "3", D("102.333333333333"))


trades_strategy = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=59_999),  # ms into the minute, distinct below
        st.decimals(min_value=D("0.01"), max_value=D("10000"), places=2),
        st.decimals(min_value=D("0.001"), max_value=D("1000"), places=3),
    ),
    min_size=1,
    max_size=40,
    unique_by=lambda t: t[0],
)


@given(trades_strategy, st.randoms())
def test_a_bar_does_not_depend_on_arrival_order(trades, rnd):
    def fold(items):
        state = BarState()
        for ms, price, size in items:
            state = state.add(BASE + ms * 1_000_000, price, size)
        return state

    shuffled = list(trades)
    rnd.shuffle(shuffled)
    in_order = fold(sorted(trades))
    assert fold(shuffled) == in_order
    assert in_order.open == min(trades)[1] and in_order.close == max(trades)[1]
    assert in_order.high == max(p for _, p, _ in trades) and in_order.low == min(p for _, p, _ in trades)
    assert in_order.volume == sum(s for _, _, s in trades)
    assert in_order.notional == sum(p * s for _, p, s in trades)
    assert in_order.low <= in_order.vwap <= in_order.high


# -- the agent on the in-memory transport -----------------------------------------------------


class MemoryBarSink(Sink[Bar]):
    """Keeps what a Valkey sink would: the last whole bar per window. The first
    `failures` writes find the store away (retried quickly)."""

    def __init__(self, failures: int = 0):
        super().__init__("memory-bars", RetryPolicy(attempts=2, initial_s=0.01, max_s=0.02))
        self.bars: dict[tuple[str, str, int], Bar] = {}
        self.calls = 0
        self.failures = failures
        self.newest_event_ts = 0
        self.before_write = lambda: None

    def add_bars(self, bars, newest_event_ts):
        self.extend(list(bars))
        self.newest_event_ts = max(self.newest_event_ts, newest_event_ts)

    async def write(self, batch):
        self.before_write()
        self.calls += 1
        if self.failures:
            self.failures -= 1
            raise SinkUnavailable("down for the test")
        for bar in batch:
            self.bars[(bar.symbol, bar.interval, bar.ts)] = bar


def bar_app(transport: MemoryTransport, sink: MemoryBarSink, batch_size: int = 3):
    app = App("bars", transport)
    app.runtime.batch_size = batch_size
    app.runtime.poll_timeout_s = 0.02
    trades = app.channel("trades", stream="TRADES", subjects=["md.trades.>"], value_type=MarketTrade)
    builder = TradeBarBuilder(app, ["1s", "1m", "5m"], grace_s=5)
    add_trade_bar_agent(app, trades, builder, sink, max_events=batch_size, within_s=0.02)
    return app, builder


async def wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


def floor(transport: MemoryTransport) -> int:
    return transport.ack_floors.get(("TRADES", "bars-build_bars"), 0)


FIRST_MINUTE = Bar(
    ts=BASE, symbol="XYZ", interval="1m", open=D("98"), high=D("101.5"), low=D("98"), close=D("100.25"),
    volume=D("54"), vwap=D("99.967592592593"), count=5,
)
SECOND_MINUTE = Bar(
    ts=BASE + 60 * S, symbol="XYZ", interval="1m", open=D("102"), high=D("102.5"), low=D("102"),
    close=D("102.5"), volume=D("3"), vwap=D("102.333333333333"), count=2,
)
# All eight trades: volume 54 + 3 + 100 = 157; notional 5398.25 + 307 + 15000 = 20705.25;
# vwap 20705.25 / 157 = 131.8805732484076... -> 131.880573248408
FIVE_MINUTES = Bar(
    ts=BASE, symbol="XYZ", interval="5m", open=D("98"), high=D("150"), low=D("98"), close=D("102.5"),
    volume=D("157"), vwap=D("131.880573248408"), count=8,
)


async def publish_tape(transport: MemoryTransport, tape=TAPE) -> None:
    for t in tape:
        await transport.publish(f"md.trades.{t.symbol}", encode(t))


async def test_bars_from_the_tape_match_the_hand_computed_ones():
    transport = MemoryTransport()
    sink = MemoryBarSink()
    app, builder = bar_app(transport, sink)
    async with app:
        await publish_tape(transport)
        await wait_for(lambda: floor(transport) == len(TAPE))
    assert sink.bars[("XYZ", "1m", BASE)] == FIRST_MINUTE
    assert sink.bars[("XYZ", "1m", BASE + 60 * S)] == SECOND_MINUTE
    assert sink.bars[("XYZ", "5m", BASE)] == FIVE_MINUTES
    # 1 s windows: the 0.5 s trade came when its second had long closed (grace 5 s).
    one_second = {ts: bar for (_, interval, ts), bar in sink.bars.items() if interval == "1s"}
    assert sorted(one_second) == [BASE + k * S for k in (1, 5, 20, 59, 61, 70)]
    assert one_second[BASE + 61 * S].close == D("102") and one_second[BASE + 61 * S].count == 1
    assert builder.late_trades() == {"1s": 2, "1m": 1, "5m": 0}
    assert sink.newest_event_ts == BASE + 70 * S
    # The first minute closed (and left the table); the second and the 5 m window are open.
    assert builder.windows["1m"].get("XYZ", BASE) is None
    assert builder.windows["1m"].get("XYZ", BASE + 60 * S) is not None


async def test_a_replayed_tape_does_not_double_any_bar():
    transport = MemoryTransport()
    sink = MemoryBarSink()
    app, _ = bar_app(transport, sink)
    async with app:
        await publish_tape(transport)
        await wait_for(lambda: floor(transport) == len(TAPE))
    before = dict(sink.bars)

    # A restart that redelivers everything (as after a crash before the acks).
    transport.ack_floors[("TRADES", "bars-build_bars")] = 0
    app2, builder2 = bar_app(transport, sink)
    async with app2:
        await wait_for(lambda: floor(transport) == len(TAPE))
        await asyncio.sleep(0.05)
    assert sink.bars == before
    assert builder2.windows["5m"].get("XYZ", BASE).count == 8  # recovered, not re-added


async def test_the_batch_waits_for_the_sink_and_is_written_once_it_is_back():
    transport = MemoryTransport()
    sink = MemoryBarSink(failures=2)
    app, _ = bar_app(transport, sink, batch_size=10)
    floors_at_writes = []
    sink.before_write = lambda: floors_at_writes.append(floor(transport))
    async with app:
        await publish_tape(transport, TAPE[:2])
        await wait_for(lambda: floor(transport) == 2)
    # The first batch: nothing acknowledged until its third attempt landed.
    assert floors_at_writes[:3] == [0, 0, 0]
    assert sink.failures == 0 and sink.stats.retries == 2
    assert sink.bars[("XYZ", "1m", BASE)].count == 2


async def test_bar_messages_are_stored_except_built_intervals_and_unreadable_ones():
    transport = MemoryTransport()
    sink = MemoryBarSink()
    app = App("bars", transport)
    app.runtime.poll_timeout_s = 0.02
    channel = app.channel("bars", stream="BARS", subjects=["md.bars.>"], value_type=Bar)
    counters = add_bar_message_agent(app, channel, sink, built_intervals=["1m"], max_events=10, within_s=0.02)

    def bar(interval: str, close: str) -> bytes:
        return encode(Bar(ts=BASE, symbol="XYZ", interval=interval, open=D("1"), high=D("3"), low=D("1"),
                          close=D(close), volume=D("10")))

    async with app:
        await transport.publish("md.bars.1h.XYZ", bar("1h", "2"))
        await transport.publish("md.bars.1h.XYZ", bar("1h", "2.5"))  # a revision of the same hour
        await transport.publish("md.bars.1m.XYZ", bar("1m", "2"))
        await transport.publish("md.bars.x.XYZ", bar("hourly", "2"))
        await wait_for(lambda: transport.ack_floors.get(("BARS", "bars-take_bars"), 0) == 4)
    assert list(sink.bars) == [("XYZ", "1h", BASE)]
    assert sink.bars[("XYZ", "1h", BASE)].close == D("2.5")
    assert (counters.written, counters.skipped_built_interval, counters.dead_lettered) == (1, 1, 1)
    dead = transport.streams["DLQ"].messages
    assert len(dead) == 1 and "interval" in dead[0][2]["Posttrade-Reason"]


def test_built_intervals_must_divide_a_day():
    app = App("bars", MemoryTransport())
    with pytest.raises(ValueError):
        TradeBarBuilder(app, ["7m"], grace_s=1)
    with pytest.raises(ValueError):
        TradeBarBuilder(App("b2", MemoryTransport()), ["1m", "1m"], grace_s=1)
