"""pnl without servers: valuation of ptrc's PositionUpdates at market, the book, the
service on the in-memory transport, snapshots on the PNL stream, request validation,
config."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import httpx
import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from posttrade.agents import pnl as agents_pnl
from posttrade.agents.pnl import (
    AccountPnl,
    Changes,
    PnlBook,
    account_row,
    bar_end,
    canonical,
    plain_data,
    position_row,
    snapshot_rows,
    value_update,
)
from posttrade.config import ConfigError, load_config
from posttrade.core.exact import format_decimal
from posttrade.core.marks import MarkState
from posttrade.agents.positions import position_update
from posttrade.core.positions import Position
from posttrade.core.valuation import account_value
from posttrade.services import pnl
from posttrade.stores.questdb.pnl_history import HistoryTables, history_sql, snapshot_decimal
from posttrade.stores.valkey.pnl import PnlKeys, key_part
from posttrade.streams import subjects
from posttrade.streams.events import Bar, Fill, MarketTrade, PnlSnapshot, PositionUpdate, Quote, decode, encode
from posttrade.streams.memory import MemoryTransport
from posttrade.streams.transport import PublishFailed
from posttrade.tables.table import Table
from posttrade.web import pnl as pnl_pages
from posttrade.web.server import build_web_app

D = Decimal
T0 = 1_700_000_000_000_000_000
S = 1_000_000_000


# -- helpers: ptrc's side, played by the core --------------------------------------------


def fill(i: int, side: str, qty: str, price: str, fee: str = "1", account: str = "A1", symbol: str = "XYZ") -> Fill:
    return Fill(ts=T0 + i * S, fill_id=f"f{i}", account=account, symbol=symbol, side=side, qty=D(qty), price=D(price), fee=D(fee))


def update_of(position: Position, ts: int, reason: str = "fill") -> PositionUpdate:
    """What ptrc publishes for `position` (ptrc's own mapping; no mark of its own)."""
    return position_update(position, None, reason, ts)


WORKED_EXAMPLE = [("BUY", "10", "100"), ("BUY", "10", "110"), ("SELL", "15", "120"), ("SELL", "10", "90")]


def worked_example_updates(account: str = "A1", symbol: str = "XYZ") -> list[PositionUpdate]:
    position = Position(account, symbol)
    updates = []
    for i, (side, qty, price) in enumerate(WORKED_EXAMPLE, 1):
        position.apply(fill(i, side, qty, price, account=account, symbol=symbol))
        updates.append(update_of(position, T0 + i * S))
    return updates


def quote(symbol: str, bid: str, ask: str, ts: int) -> Quote:
    return Quote(ts=ts, symbol=symbol, bid=D(bid), ask=D(ask))


MARK_95 = (D("95"), "quote_mid", T0 + 10 * S)


# -- valuation -----------------------------------------------------------------------------


def test_worked_example_valued_at_95():
    row = value_update(worked_example_updates()[-1], MARK_95)
    value = row.value
    assert (value.net_qty, value.avg_open_price) == (D(-5), D(90))
    assert (value.realized_pnl_gross, value.fees, value.realized_pnl_net) == (D(150), D(4), D(146))
    assert (value.unrealized_pnl, value.fifo_unrealized_pnl) == (D(-25), D(-25))
    assert value.fifo_realized_pnl_gross == D(150) and value.fifo_realized_pnl_net == D(146)
    assert value.total_pnl == D(121)
    assert value.day_pnl == D(121)  # first traded today: the start of day is all zero
    assert value.gross_notional == D(475) and value.market_value == D(-475)
    assert (value.mark, row.mark_source, row.mark_ts, row.as_of) == (D(95), "quote_mid", T0 + 10 * S, T0 + 10 * S)
    assert row.position_ts == T0 + 4 * S


def test_worked_example_step_by_step():
    u1, u2, u3, u4 = worked_example_updates()
    mark = (D("95"), "quote_mid", T0)
    # long 20 @ 105: unrealized 20 x (95 - 105) = -200, fees 2
    value = value_update(u2, mark).value
    assert (value.unrealized_pnl, value.realized_pnl_net, value.total_pnl) == (D(-200), D(-2), D(-202))
    # SELL 15 @ 120 realizes +225 (FIFO +250); 5 @ 105 left (FIFO: the lot 5 @ 110)
    row = value_update(u3, mark)
    assert (row.value.realized_pnl_gross, row.value.unrealized_pnl) == (D(225), D(-50))
    assert (row.value.fifo_realized_pnl_gross, row.value.fifo_unrealized_pnl) == (D(250), D(-75))
    assert row.value.total_pnl == D(172)  # 225 - 3 - 50
    assert row.as_of == u3.ts  # the position update is newer than the mark


def test_open_position_without_mark_is_null_and_flat_is_zero():
    u1, *_ = worked_example_updates()
    row = value_update(u1, None)
    value = row.value
    assert value.mark is None and row.mark_source is None and row.mark_ts is None and row.as_of == u1.ts
    assert (value.unrealized_pnl, value.fifo_unrealized_pnl, value.total_pnl, value.day_pnl) == (None,) * 4
    assert value.realized_pnl_net == D(-1)
    assert value.gross_notional == D(1000)  # unmarked: at cost
    position = Position("A1", "XYZ")
    position.apply(fill(1, "BUY", "3", "10"))
    position.apply(fill(2, "SELL", "3", "12"))
    value = value_update(update_of(position, T0), None).value
    assert (value.unrealized_pnl, value.total_pnl, value.day_pnl) == (D(0), D(4), D(4))


def test_day_pnl_after_a_roll():
    position = Position("A1", "XYZ")
    for i, (side, qty, price) in enumerate(WORKED_EXAMPLE, 1):
        position.apply(fill(i, side, qty, price))
    position.roll_day(D("95"))  # start of day: realized net 146, unrealized -25
    rolled = update_of(position, T0 + 100 * S, reason="roll")
    assert value_update(rolled, MARK_95).value.day_pnl == D(0)
    value = value_update(rolled, (D("100"), "quote_mid", T0 + 101 * S)).value
    assert (value.total_pnl, value.day_pnl) == (D(96), D(-25))  # -5 x (100 - 90) = -50 unrealized
    position.apply(fill(5, "BUY", "5", "100"))  # covers the short: realizes -50, fee 1
    value = value_update(update_of(position, T0 + 102 * S), (D("100"), "quote_mid", T0 + 101 * S)).value
    assert (value.net_qty, value.realized_pnl_net, value.unrealized_pnl) == (D(0), D(95), D(0))
    assert (value.total_pnl, value.day_pnl) == (D(95), D(-26))


def test_day_pnl_unknown_when_the_start_of_day_had_no_mark():
    position = Position("A1", "XYZ")
    position.apply(fill(1, "BUY", "1", "10"))
    position.roll_day(None)
    value = value_update(update_of(position, T0, "roll"), (D("11"), "last_trade", T0)).value
    assert value.total_pnl == D(0) and value.day_pnl is None


def test_fifo_unrealized_against_the_remaining_lots():
    position = Position("A1", "XYZ")
    for i, (side, qty, price) in enumerate([("BUY", "10", "100"), ("BUY", "10", "110"), ("SELL", "5", "120")], 1):
        position.apply(fill(i, side, qty, price, fee="0"))
    value = value_update(update_of(position, T0), (D("115"), "quote_mid", T0)).value
    assert (value.realized_pnl_gross, value.unrealized_pnl) == (D(75), D(150))  # avg 105
    assert (value.fifo_realized_pnl_gross, value.fifo_unrealized_pnl) == (D(100), D(125))  # lots 5@100, 10@110
    assert value.realized_pnl_gross + value.unrealized_pnl == value.fifo_realized_pnl_gross + value.fifo_unrealized_pnl


def test_multiplier_and_a_short():
    position = Position("A1", "ES", multiplier=D(50))
    position.apply(fill(1, "SELL", "2", "5000.25", fee="2.5", symbol="ES"))
    value = value_update(update_of(position, T0), (D("4990.5"), "quote_mid", T0)).value
    assert value.unrealized_pnl == D("975")  # -2 x (4990.5 - 5000.25) x 50
    assert value.total_pnl == D("972.5")
    assert value.gross_notional == D("499050")


def test_values_stay_exact_beyond_28_digits():
    position = Position("A1", "XYZ")
    position.apply(fill(1, "BUY", "1234567.12345678", "98765.4321", fee="0"))
    mark = D("98765.43210001")
    value = value_update(update_of(position, T0), (mark, "quote_mid", T0)).value
    assert value.unrealized_pnl == D("1234567.12345678") * D("0.00000001")  # exact: 0.0123456712345678
    assert str(value.unrealized_pnl) == "0.0123456712345678"


prices = st.integers(min_value=1, max_value=50_000).map(lambda n: D(n) / 100)
quantities = st.integers(min_value=1, max_value=5_000).map(lambda n: D(n) / 10)
fills = st.lists(
    st.tuples(st.sampled_from(["BUY", "SELL"]), quantities, prices, st.integers(min_value=-5, max_value=20).map(D)),
    min_size=1,
    max_size=30,
)


@settings(max_examples=200, deadline=None)
@given(fills=fills, roll_at=st.integers(min_value=0, max_value=30), sod_mark=st.one_of(st.none(), prices), mark=prices,
       multiplier=st.sampled_from([D(1), D(50), D("0.1")]))
def test_valuation_agrees_with_the_core(fills, roll_at, sod_mark, mark, multiplier):
    """Valuing ptrc's PositionUpdate gives exactly what the core's Position says."""
    position = Position("A1", "XYZ", multiplier=multiplier)
    for i, (side, qty, price, fee) in enumerate(fills):
        if i == roll_at:
            position.roll_day(sod_mark)
        position.apply(Fill(ts=T0 + i, fill_id=f"f{i}", account="A1", symbol="XYZ", side=side, qty=qty, price=price, fee=fee))
    value = value_update(update_of(position, T0 + 999), (mark, "quote_mid", T0)).value
    assert value.unrealized_pnl == position.unrealized_pnl(mark)
    assert value.fifo_unrealized_pnl == position.fifo_unrealized_pnl(mark)
    assert value.total_pnl == position.total_pnl(mark)
    assert value.day_pnl == position.day_pnl(mark)
    assert value.gross_notional == position.notional(mark)
    assert value.realized_pnl_gross + value.unrealized_pnl == value.fifo_realized_pnl_gross + value.fifo_unrealized_pnl


def test_account_totals_are_null_while_an_open_position_is_unmarked():
    a = value_update(worked_example_updates("A1", "XYZ")[-1], MARK_95).value
    position = Position("A1", "ABC")
    position.apply(fill(1, "BUY", "1", "10", symbol="ABC"))
    b = value_update(update_of(position, T0 + 50 * S), None).value
    totals = account_value("A1", [a, b])
    assert (totals.positions, totals.open_positions) == (2, 2)
    assert (totals.realized_pnl_gross, totals.fees, totals.realized_pnl_net) == (D(150), D(5), D(145))
    assert (totals.unrealized_pnl, totals.total_pnl, totals.day_pnl) == (None, None, None)
    b = value_update(update_of(position, T0 + 50 * S), (D("12"), "last_trade", T0)).value
    totals = account_value("A1", [a, b])
    assert (totals.unrealized_pnl, totals.total_pnl, totals.day_pnl) == (D(-23), D(122), D(122))
    assert totals.gross_notional == D(487)


def test_plain_data_spells_numbers_canonically():
    row = value_update(worked_example_updates()[-1], (D("95.00"), "quote_mid", T0))
    data = plain_data(row)
    assert data["mark"] == "95" and data["unrealized_pnl"] == "-25" and data["fees"] == "4"
    assert data["fill_count"] == 4 and data["as_of"] == T0 + 4 * S
    assert "value" not in data and (data["mark_source"], data["position_ts"]) == ("quote_mid", T0 + 4 * S)
    assert msgspec.json.decode(encode(data))["total_pnl"] == "121"


@given(st.decimals(allow_nan=False, allow_infinity=False) | st.sampled_from(
    [D("-0"), D("0E-8"), D("-0.000"), D("1E+2"), D("100"), D("225.00"), D("1.50E-7"), D("-12.3400")]
))
def test_canonical_spells_numbers_as_format_decimal_does(value):
    assert canonical(value) == format_decimal(value)


def test_bar_close_is_the_price_at_the_end_of_the_bar():
    bar = Bar(ts=T0, symbol="XYZ", interval="1m", open=D(1), high=D(2), low=D(1), close=D(2), volume=D(1))
    assert bar_end(bar) == T0 + 60 * S
    odd = msgspec.structs.replace(bar, interval="weird")
    assert bar_end(odd) == T0


# -- the book ------------------------------------------------------------------------------


def make_book(**kwargs) -> PnlBook:
    positions = Table("positions", bucket="p", value_type=PositionUpdate, key_type=tuple[str, str])
    marks = Table("marks", bucket="m", value_type=MarkState, default=MarkState)
    return PnlBook(positions, marks, **kwargs)


def test_a_price_change_revalues_every_position_in_the_symbol_once():
    book = make_book()
    book.on_position(worked_example_updates("A1")[-1])
    book.on_position(worked_example_updates("A2")[1])  # long 20 @ 105
    book.cache_changes.take()
    book.on_quote(quote("XYZ", "94", "96", T0 + 10 * S))
    book.on_quote(quote("XYZ", "96", "98", T0 + 11 * S))
    book.on_quote(quote("XYZ", "98", "100", T0 + 12 * S))
    assert book.row(("A1", "XYZ")).value.mark is None  # lazily: nothing is valued until a read
    before = book.revaluations
    book.refresh()
    assert book.revaluations - before == 2  # three ticks, two positions, each valued once
    assert book.row(("A1", "XYZ")).value.unrealized_pnl == D(-45)  # -5 x (99 - 90)
    assert book.row(("A2", "XYZ")).value.unrealized_pnl == D(-120)  # 20 x (99 - 105)
    assert book.row(("A2", "XYZ")).as_of == T0 + 12 * S
    assert not book.cache_changes  # price moves go to Valkey on their own cadence:
    keys, accounts = book.cache_price_changes.take()
    assert keys == {("A1", "XYZ"), ("A2", "XYZ")} and accounts == {"A1", "A2"}
    assert book.snapshot_changes.keys == keys


def test_a_reader_revalues_only_the_symbols_it_needs():
    book = make_book()
    book.on_position(worked_example_updates("A1", "XYZ")[-1])
    book.on_position(worked_example_updates("A1", "ABC")[-1])
    book.on_quote(quote("XYZ", "95", "95", T0 + 10 * S))
    book.on_quote(quote("ABC", "95", "95", T0 + 10 * S))
    book.refresh(["XYZ"])
    assert book.row(("A1", "XYZ")).value.mark == D(95) and book.row(("A1", "ABC")).value.mark is None
    book.refresh()
    assert book.row(("A1", "ABC")).value.mark == D(95)


def test_a_tick_that_leaves_the_mark_unchanged_changes_nothing():
    book = make_book()
    book.on_position(worked_example_updates()[-1])
    book.on_quote(quote("XYZ", "94", "96", T0 + 10 * S))
    book.refresh()
    book.cache_price_changes.take()
    book.on_quote(quote("XYZ", "93", "97", T0 + 11 * S))  # mid still 95
    book.refresh()
    assert not book.cache_price_changes
    assert book.row(("A1", "XYZ")).as_of == T0 + 10 * S
    assert book.marks["XYZ"].quote_ts == T0 + 11 * S  # the table still has the newest quote


def test_mark_priority_and_position_mark_fallback():
    book = make_book(priority=("last_trade", "quote_mid"))
    update = msgspec.structs.replace(worked_example_updates()[-1], mark=D("91"))
    book.on_position(update)
    row = book.row(("A1", "XYZ"))
    assert (row.value.mark, row.mark_source, row.value.unrealized_pnl) == (D(91), "position", D(-5))
    book.on_quote(quote("XYZ", "94", "96", T0 + 10 * S))
    book.refresh()
    assert book.row(("A1", "XYZ")).mark_source == "quote_mid"
    book.on_trade(MarketTrade(ts=T0 + 5 * S, symbol="XYZ", price=D("92"), size=D(1)))
    book.refresh()
    row = book.row(("A1", "XYZ"))
    assert (row.value.mark, row.mark_source, row.mark_ts) == (D(92), "last_trade", T0 + 5 * S)
    strict = make_book(use_position_mark=False)
    strict.on_position(update)
    assert strict.row(("A1", "XYZ")).value.unrealized_pnl is None


def test_resync_rebuilds_the_same_values_from_the_tables():
    book = make_book()
    for update in worked_example_updates("A1") + worked_example_updates("A2", "ABC"):
        book.on_position(update)
    book.on_quote(quote("XYZ", "94", "96", T0 + 10 * S))
    book.on_bar(Bar(ts=T0, symbol="ABC", interval="1s", open=D(1), high=D(99), low=D(1), close=D(99), volume=D(1)))
    book.refresh()
    before = {k: book.row(k) for k in book.keys()}
    totals = {a: book.totals(a) for a in book.accounts()}
    book.resync()
    assert {k: book.row(k) for k in book.keys()} == before
    assert {a: book.totals(a) for a in book.accounts()} == totals
    assert book.keys(symbol="ABC") == [("A2", "ABC")] and book.keys(account="A1") == [("A1", "XYZ")]


def revised(update: PositionUpdate, revision: int, ts: int) -> PositionUpdate:
    return msgspec.structs.replace(update, revision=revision, ts=ts)


def test_the_highest_revision_wins_not_the_newest_ts():
    """A late fill's update replaces the one before it although its ts is older; an
    older revision arriving afterwards (a republish, a replay) is ignored."""
    u1, u2, u3, u4 = worked_example_updates()
    book = make_book()
    assert book.on_position(revised(u3, 3, T0 + 30 * S))
    # Revision 4 is the late fill's update: ptrc stamps it with the fill's own, older time.
    assert book.on_position(revised(u4, 4, T0 + 20 * S))
    assert book.positions[("A1", "XYZ")].revision == 4
    assert book.row(("A1", "XYZ")).value.net_qty == D(-5) and book.row(("A1", "XYZ")).position_ts == T0 + 20 * S
    assert book.totals("A1").as_of == T0 + 20 * S  # the account is as new as its rows, as after a restart
    book.on_position(revised(worked_example_updates("A1", "ABC")[0], 1, T0 + 25 * S))
    book.on_position(revised(worked_example_updates("A1", "ABC")[1], 2, T0 + 15 * S))
    assert book.totals("A1").as_of == T0 + 20 * S
    book.cache_changes.take()
    before = book.revaluations
    assert not book.on_position(revised(u3, 3, T0 + 30 * S))  # revision 3 again, newer ts: stale
    assert not book.on_position(revised(u2, 2, T0 + 40 * S))
    assert book.positions[("A1", "XYZ")].revision == 4 and book.row(("A1", "XYZ")).value.net_qty == D(-5)
    assert book.revaluations == before and not book.cache_changes and book.totals("A1").value.fees == D(6)


def test_updates_without_revisions_apply_in_stream_order():
    u1, u2, *_ = worked_example_updates()
    book = make_book()
    assert book.on_position(u2) and book.on_position(u1)  # both revision 0: the later message wins
    assert book.row(("A1", "XYZ")).value.net_qty == D(10)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.sampled_from(["BUY", "SELL"]), quantities, prices,
                          st.one_of(st.none(), prices)), min_size=1, max_size=40))
def test_running_account_totals_equal_the_sums_of_the_rows(steps):
    """The book's incremental totals are exactly `account_value` over the current rows."""
    book = make_book()
    positions = {}
    keys = [("A1", "XYZ"), ("A1", "ABC"), ("A2", "XYZ"), ("A2", "ABC"), ("A2", "DEF"), ("A3", "XYZ")]
    for i, (k, side, qty, price, mark) in enumerate(steps):
        account, symbol = keys[k]
        position = positions.setdefault(keys[k], Position(account, symbol))
        position.apply(Fill(ts=T0 + i, fill_id=f"f{i}", account=account, symbol=symbol, side=side, qty=qty, price=price))
        if i % 7 == 3:
            position.roll_day(mark)
        book.on_position(update_of(position, T0 + i))
        if mark is not None:
            book.on_quote(quote(symbol, str(mark), str(mark), T0 + i))
        if i % 3 == 0:
            book.refresh()
    book.refresh()
    for account in book.accounts():
        rows = [book.row(k) for k in book.keys(account=account)]
        assert book.totals(account).value == account_value(account, [row.value for row in rows])
        assert book.totals(account).as_of == max(row.as_of for row in rows)


def test_changes_give_back():
    changes = Changes()
    changes.keys.add(("A", "X"))
    keys, accounts = changes.take()
    assert not changes
    changes.give_back(keys, {"A"})
    assert changes.keys == {("A", "X")} and changes.accounts == {"A"}


# -- the service on the in-memory transport -------------------------------------------------


def memory_config(**env: str):
    base = {"POSTTRADE_PNL__CACHE__REDIS": "null", "POSTTRADE_PNL__DATABASES__QUESTDB": "null"}
    return load_config("pnl", pnl.CONFIG, env={**base, **env})


async def wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


class MemoryService:
    def __init__(self, transport: MemoryTransport | None = None, **env: str):
        self.transport = transport or MemoryTransport()
        self.service = pnl.build(memory_config(**env), transport=self.transport)
        self.app = self.service.app
        self.app.runtime.poll_timeout_s = 0.02
        self.http = httpx.AsyncClient(transport=httpx.ASGITransport(app=build_web_app(self.app)), base_url="http://t")

    async def __aenter__(self) -> MemoryService:
        await self.app.start()
        # New consumers start at the latest message of each subject: let them exist
        # before publishing, so that every message is delivered.
        await wait_for(lambda: all(runner.running for runner in self.app.agents.values()))
        return self

    async def __aexit__(self, *exc) -> None:
        await self.http.aclose()
        await self.app.stop()

    def floor(self, stream: str, agent: str) -> int:
        return self.transport.ack_floors.get((stream, f"pnl-{agent}"), 0)

    async def publish_position(self, update: PositionUpdate) -> None:
        await self.transport.publish(subjects.position_subject(update.account, update.symbol), encode(update))

    async def publish_quote(self, q: Quote) -> None:
        await self.transport.publish(subjects.quote_subject(q.symbol), encode(q))

    async def settle(self) -> None:
        """Wait until every agent has acknowledged everything published."""
        for stream, agent in (("POSITIONS", "value_positions"), ("QUOTES", "mark_quotes"), ("TRADES", "mark_trades"), ("BARS", "mark_bars")):
            count = len(self.transport.streams[stream].messages)
            await wait_for(lambda: self.floor(stream, agent) >= count)

    async def realtime(self, query: str = "") -> dict:
        response = await self.http.get(f"/pnl/realtime{query}")
        assert response.status_code == 200, response.text
        return response.json()


async def test_worked_example_through_the_service():
    async with MemoryService() as svc:
        for update in worked_example_updates("A1"):
            await svc.publish_position(update)
        await svc.settle()
        body = await svc.realtime("?account=A1&symbol=XYZ")
        assert body["count"] == 1 and body["as_of"] == T0 + 4 * S
        (row,) = body["positions"]
        assert row["mark"] is None and row["unrealized_pnl"] is None and row["total_pnl"] is None  # no mark yet
        assert (row["realized_pnl_gross"], row["fees"], row["realized_pnl_net"]) == ("150", "4", "146")

        await svc.publish_quote(quote("XYZ", "94.5", "95.5", T0 + 10 * S))
        await svc.settle()
        body = await svc.realtime("?account=A1")
        (row,) = body["positions"]
        assert {k: row[k] for k in ("net_qty", "avg_open_price", "mark", "mark_source", "unrealized_pnl",
                                    "fifo_unrealized_pnl", "total_pnl", "day_pnl")} == {
            "net_qty": "-5", "avg_open_price": "90", "mark": "95", "mark_source": "quote_mid",
            "unrealized_pnl": "-25", "fifo_unrealized_pnl": "-25", "total_pnl": "121", "day_pnl": "121",
        }
        assert body["as_of"] == row["as_of"] == T0 + 10 * S
        (account,) = body["accounts"]
        assert (account["account"], account["total_pnl"], account["day_pnl"], account["positions"]) == ("A1", "121", "121", 1)


async def test_a_stale_revision_published_later_does_not_replace_the_newer_one():
    u1, u2, u3, u4 = worked_example_updates()
    async with MemoryService() as svc:
        await svc.publish_position(revised(u4, 4, T0 + 2 * S))  # the late fill's update
        await svc.publish_position(revised(u3, 3, T0 + 3 * S))  # republished older revision
        await svc.settle()
        (row,) = (await svc.realtime("?account=A1"))["positions"]
        assert (row["net_qty"], row["realized_pnl_net"], row["position_ts"]) == ("-5", "146", T0 + 2 * S)
        assert svc.app.tables["positions"][("A1", "XYZ")].revision == 4


async def test_prices_revalue_every_account_and_filters_work():
    async with MemoryService() as svc:
        await svc.publish_position(worked_example_updates("A1")[-1])  # short 5 @ 90
        await svc.publish_position(worked_example_updates("A2")[1])  # long 20 @ 105
        await svc.publish_position(worked_example_updates("A2", "ABC")[0])  # long 10 @ 100
        await svc.publish_quote(quote("XYZ", "99", "101", T0 + 10 * S))
        await svc.publish_quote(quote("ABC", "101", "101", T0 + 10 * S))
        await svc.settle()
        body = await svc.realtime()
        assert [(r["account"], r["symbol"], r["unrealized_pnl"]) for r in body["positions"]] == [
            ("A1", "XYZ", "-50"), ("A2", "ABC", "10"), ("A2", "XYZ", "-100"),
        ]
        assert [(a["account"], a["unrealized_pnl"], a["realized_pnl_net"], a["total_pnl"]) for a in body["accounts"]] == [
            ("A1", "-50", "146", "96"), ("A2", "-90", "-3", "-93"),
        ]
        body = await svc.realtime("?symbol=XYZ")
        assert [r["account"] for r in body["positions"]] == ["A1", "A2"]
        body = await svc.realtime("?account=nobody")
        assert body == {"as_of": None, "count": 0, "positions": [], "accounts": []}
        response = await svc.http.get("/pnl/realtime?account=%20A1")
        assert response.status_code == 400 and response.json()["detail"]["parameter"] == "account"


async def test_roll_update_moves_day_pnl():
    position = Position("A1", "XYZ")
    for i, (side, qty, price) in enumerate(WORKED_EXAMPLE, 1):
        position.apply(fill(i, side, qty, price))
    async with MemoryService() as svc:
        await svc.publish_position(update_of(position, T0 + 4 * S))
        await svc.publish_quote(quote("XYZ", "95", "95", T0 + 10 * S))
        await svc.settle()
        assert (await svc.realtime())["positions"][0]["day_pnl"] == "121"
        position.roll_day(D("95"))
        await svc.publish_position(update_of(position, T0 + 20 * S, reason="roll"))
        await svc.publish_quote(quote("XYZ", "100", "100", T0 + 21 * S))
        await svc.settle()
        row = (await svc.realtime())["positions"][0]
        assert (row["total_pnl"], row["day_pnl"], row["sod_realized_pnl_net"], row["sod_unrealized_pnl"]) == (
            "96", "-25", "146", "-25",
        )


async def test_restart_recovers_from_the_changelogs_and_redelivery_changes_nothing():
    transport = MemoryTransport()
    async with MemoryService(transport) as svc:
        for update in worked_example_updates("A1"):
            await svc.publish_position(update)
        await svc.publish_quote(quote("XYZ", "95", "95", T0 + 10 * S))
        await svc.settle()
        before = await svc.realtime()
    # A crash after the changelog was written but before the acknowledgement:
    transport.ack_floors[("POSITIONS", "pnl-value_positions")] = 1
    transport.ack_floors[("QUOTES", "pnl-mark_quotes")] = 0
    async with MemoryService(transport) as svc:
        assert await svc.realtime() == before  # recovered, before anything is redelivered
        await svc.settle()
        assert await svc.realtime() == before
        assert svc.app.tables["positions"].last_applied(("A1", "XYZ")) == {"POSITIONS": 4}


async def test_an_invalid_position_update_is_dead_lettered():
    async with MemoryService() as svc:
        await svc.transport.publish("posttrade.positions.A1.XYZ", b'{"ts": 5, "account": "A1"}')
        await svc.transport.publish("posttrade.positions.A1.ABC", b'not json')
        await svc.publish_position(worked_example_updates()[0])
        await svc.settle()
        assert len(transport_dlq(svc.transport)) == 2
        assert (await svc.realtime())["count"] == 1


def transport_dlq(transport: MemoryTransport) -> list:
    return transport.streams["DLQ"].messages


async def test_history_parameters_are_validated_before_anything_else():
    async with MemoryService() as svc:
        for query, parameter in [
            ("?interval=7x", "interval"),
            ("?interval=0m", "interval"),
            ("?from=yesterday", "from"),
            ("?to=1700000000", "to"),  # seconds, not ns
            ("?from=2024-01-02T00:00:00Z&to=2024-01-01T00:00:00Z", "from"),
            ("?from=2024-01-01T00:00:00Z&to=2024-01-02T00:00:00Z&interval=1s", "interval"),  # 86,400 points
            ("?symbol=%00", "symbol"),
        ]:
            response = await svc.http.get(f"/pnl/history{query}")
            assert response.status_code == 400, (query, response.text)
            assert response.json()["detail"]["parameter"] == parameter, query
        response = await svc.http.get("/pnl/history?from=2024-01-01T00:00:00Z&to=1704078000000000000&interval=1h")
        assert response.status_code == 503  # valid, but this app has no QuestDB
        assert "QuestDB" in response.json()["detail"]["error"]


def test_history_sql_and_time_parsing():
    from starlette.requests import Request

    def request(query: str) -> Request:
        return Request({"type": "http", "query_string": query.encode(), "headers": []})

    section = pnl.HistorySection()
    q = pnl_pages.history_query(request("account=A'1&symbol=XYZ&from=2024-01-01T00:00:00%2B01:00&to=1704067200000000000&interval=5m"), section)
    assert (q.start, q.end) == (1704063600 * S, 1704067200 * S)
    assert not q.account_level
    sql = history_sql(q, HistoryTables(), 1001)
    assert "FROM pnl_snapshots" in sql and "account = 'A''1'" in sql and "SAMPLE BY 5m ALIGN TO CALENDAR" in sql
    assert "ts >= '2023-12-31T23:00:00.000000Z'" in sql and "LIMIT 1001" in sql
    q = pnl_pages.history_query(request(""), section, now_ns=T0)
    assert (q.start, q.end, q.interval, q.account_level) == (T0 - 3600 * S, T0, "1m", True)
    assert "FROM pnl_account_snapshots" in history_sql(q, HistoryTables(), 10)
    assert "FROM t2" in history_sql(q, HistoryTables("t1", "t2"), 10)
    assert pnl_pages.parse_time("from", "2024-01-01T00:00:00.123456") == 1704067200123456000


# -- Valkey key scheme -----------------------------------------------------------------------


def test_key_scheme_escapes_what_would_make_keys_ambiguous():
    keys = PnlKeys("pt")
    assert keys.position("A1", "XYZ") == "pt:pnl:pos:A1:XYZ"
    assert keys.position("A:1", "B") != keys.position("A", "1:B")
    assert keys.position("A:1", "BRK.B") == "pt:pnl:pos:A%3A1:BRK.B"
    assert keys.account("desk 1") == "pt:pnl:acct:desk%201"
    assert keys.symbols("A1") == "pt:pnl:symbols:A1" and keys.accounts == "pt:pnl:accounts"
    assert key_part("%*?[]{}") == "%25%2A%3F%5B%5D%7B%7D"
    assert key_part("ÄÖ") == "ÄÖ"


# -- snapshots on the PNL stream -----------------------------------------------------------


async def test_snapshot_values_round_only_beyond_12_places_and_refuse_what_cannot_fit():
    assert snapshot_decimal(D("1.5")) == D("1.5")
    assert snapshot_decimal(D("0.0123456712345678")) == D("0.012345671235")
    assert snapshot_decimal(D("0.0000000000005")) == D(0)  # half to even
    assert snapshot_decimal(D(10) ** 26 - 1) == D(10) ** 26 - 1
    assert snapshot_decimal(None) is None
    assert str(snapshot_decimal(D("225.000"))) == "225" and str(snapshot_decimal(D("-0.00"))) == "0"
    with pytest.raises(ValueError, match="does not fit"):
        snapshot_decimal(-(D(10) ** 26))
    rows = [value_update(u, MARK_95) for u in worked_example_updates()]
    huge = msgspec.structs.replace(rows[0], value=msgspec.structs.replace(rows[0].value, total_pnl=D(10) ** 26))
    converted, dropped = await snapshot_rows([*rows, huge], position_row)
    assert len(converted) == 4 and [row for row, _ in dropped] == [huge] and "does not fit" in dropped[0][1]
    last = converted[3]
    assert (last.account, last.symbol, last.mark_source, last.as_of, last.currency) == (
        "A1", "XYZ", "quote_mid", T0 + 10 * S, "USD",
    )
    assert (last.total_pnl, last.unrealized_pnl, last.fill_count) == (D(121), D(-25), 4)
    unmarked, _ = await snapshot_rows([value_update(u, None) for u in worked_example_updates()], position_row)
    assert all(r.mark_source is None and r.total_pnl is None and r.mark is None for r in unmarked)  # NULLs
    wire = msgspec.json.decode(encode(unmarked[0]))
    assert "total_pnl" not in wire and wire["realized_pnl_net"] == "-1"  # absent: NULL; decimals exact strings
    account = AccountPnl(value=account_value("A1", [rows[-1].value]), as_of=rows[-1].as_of)
    (totals,), _ = await snapshot_rows([account], account_row)
    assert (totals.positions, totals.day_pnl, totals.missing_rates) == (1, D(121), None)


async def test_large_snapshots_are_converted_in_slices_with_the_same_result():
    rows = [value_update(u, MARK_95) for u in worked_example_updates()] * 50  # 200 rows: 4 slices
    huge = msgspec.structs.replace(rows[0], value=msgspec.structs.replace(rows[0].value, day_pnl=D(-(10**27))))
    converted, dropped = await snapshot_rows([*rows[:130], huge, *rows[130:]], position_row)
    assert [r.total_pnl for r in converted] == [r.value.total_pnl for r in rows] and [r for r, _ in dropped] == [huge]


def published(transport: MemoryTransport) -> list[tuple[str | None, PnlSnapshot]]:
    """The PNL stream: each message's id and snapshot."""
    stream = transport.streams["PNL"]
    ids = {seq: msg_id for msg_id, seq in stream.msg_ids.items()}
    return [(ids.get(seq), decode(PnlSnapshot, data)) for seq, (_, data, _, _) in enumerate(stream.messages, 1)]


class Flaky:
    """Makes the transport's pipelined publishes fail: the first `failures` calls publish
    `get_through` messages of their batch, then raise `error` (NATS went away mid-window,
    or no stream took the messages: a clustered PNL electing its leader)."""

    def __init__(self, transport: MemoryTransport, failures: int, get_through: int = 0,
                 error: Exception = ConnectionError("nats: connection closed")):
        self.failures = failures
        self.error = error
        self.get_through = get_through
        self.calls = 0
        real = transport.publish_many

        async def publish_many(messages):
            self.calls += 1
            if self.failures:
                self.failures -= 1
                await real(messages[: self.get_through])
                raise self.error
            return await real(messages)

        transport.publish_many = publish_many


FAST_RETRY = {"POSTTRADE_PNL__BATCH__RETRY_INITIAL_S": "0.01", "POSTTRADE_PNL__BATCH__RETRY_MAX_S": "0.02"}


@pytest.mark.parametrize("error", [ConnectionError("nats: connection closed"),
                                   PublishFailed("no JetStream stream stored the message (503)")])
async def test_snapshots_are_published_in_order_and_wait_for_nats_without_losing_any(error):
    svc = MemoryService(**FAST_RETRY, POSTTRADE_PNL__PNL__SNAPSHOTS__FULL_EVERY="3",
                        POSTTRADE_PNL__PNL__SNAPSHOTS__INTERVAL_S="3600")
    snapshots = svc.service.snapshots
    async with svc:
        flaky = Flaky(svc.transport, failures=3, error=error)
        await svc.publish_position(worked_example_updates("A1")[-1])
        await svc.publish_position(worked_example_updates("A2")[-1])
        await svc.settle()
        taken = await snapshots.take(now_ns=T0)  # the first one is full
        assert [(len(m.event.positions), len(m.event.accounts), m.msg_id) for m in taken] == [
            (2, 0, f"pnl:{T0}:0"), (0, 2, f"pnl:{T0}:1"),
        ]
        assert await snapshots.take(now_ns=T0) == []  # nothing changed (and ts would not repeat)
        await svc.publish_quote(quote("XYZ", "95", "95", T0 + 10 * S))
        await svc.settle()
        await svc.publish_position(worked_example_updates("A3")[0])
        await svc.settle()
        taken = await snapshots.take(now_ns=T0)
        assert [m.rows for m in taken] == [3, 3]  # the quote moved A1 and A2; A3 is new
        assert taken[0].event.ts == T0 + 2000  # strictly increasing, whole microseconds
        full = await snapshots.take(now_ns=T0 + S)  # the third: full again
        assert [m.rows for m in full] == [3, 3]
        await wait_for(lambda: snapshots.pending_rows == 0)
        assert flaky.calls > 3 and snapshots.stats.retries >= 3
    stream = published(svc.transport)
    # The last one is stop()'s own snapshot: nothing changed since, so there is none.
    assert [(msg_id, s.ts, s.part, len(s.positions), len(s.accounts)) for msg_id, s in stream] == [
        (f"pnl:{T0}:0", T0, 0, 2, 0), (f"pnl:{T0}:1", T0, 1, 0, 2),
        (f"pnl:{T0 + 2000}:0", T0 + 2000, 0, 3, 0), (f"pnl:{T0 + 2000}:1", T0 + 2000, 1, 0, 3),
        (f"pnl:{T0 + S}:0", T0 + S, 0, 3, 0), (f"pnl:{T0 + S}:1", T0 + S, 1, 0, 3),
    ]
    a1 = next(row for row in stream[2][1].positions if row.account == "A1")
    assert (a1.symbol, a1.mark, a1.mark_source, a1.unrealized_pnl, a1.total_pnl) == ("XYZ", D(95), "quote_mid", D(-25), D(121))
    assert [row.account for row in stream[3][1].accounts] == ["A1", "A2", "A3"]


async def test_a_window_published_again_after_a_failure_is_stored_once(monkeypatch):
    monkeypatch.setattr(agents_pnl, "ROWS_PER_MESSAGE", 3)
    svc = MemoryService(**FAST_RETRY, POSTTRADE_PNL__PNL__SNAPSHOTS__INTERVAL_S="3600")
    async with svc:
        for i in range(7):
            await svc.publish_position(worked_example_updates(f"A{i}")[-1])
        await svc.settle()
        flaky = Flaky(svc.transport, failures=1, get_through=2)  # two messages got there, then NATS went
        taken = await svc.service.snapshots.take(now_ns=T0)
        assert [(m.event.part, m.rows) for m in taken] == [(0, 3), (1, 3), (2, 1), (3, 3), (4, 3), (5, 1)]
        await wait_for(lambda: svc.service.snapshots.pending_rows == 0)
        assert flaky.calls == 2
    stream = published(svc.transport)
    assert [s.part for _, s in stream] == [0, 1, 2, 3, 4, 5]  # the server dropped the resent 0 and 1
    assert [row.account for _, s in stream for row in s.positions] == [f"A{i}" for i in range(7)]
    assert [row.account for _, s in stream for row in s.accounts] == [f"A{i}" for i in range(7)]


async def test_a_message_over_the_servers_max_payload_is_split():
    transport = MemoryTransport(max_payload=4000)
    svc = MemoryService(transport, POSTTRADE_PNL__PNL__SNAPSHOTS__INTERVAL_S="3600")
    async with svc:
        for i in range(12):
            await svc.publish_position(worked_example_updates(f"A{i:02d}")[-1])
        await svc.settle()
        taken = await svc.service.snapshots.take(now_ns=T0)
        await wait_for(lambda: svc.service.snapshots.pending_rows == 0)
    assert len(taken) > 2 and [m.event.part for m in taken] == list(range(len(taken)))
    assert all(len(m.data) < 4000 for m in taken)
    stream = published(transport)
    assert [row.account for _, s in stream for row in s.positions] == [f"A{i:02d}" for i in range(12)]


async def test_a_row_that_does_not_fit_is_dead_lettered_and_the_rest_published():
    svc = MemoryService(POSTTRADE_PNL__PNL__SNAPSHOTS__INTERVAL_S="3600")
    async with svc:
        await svc.publish_position(worked_example_updates("A1")[-1])
        big = Position("A2", "BIG")
        big.apply(fill(1, "BUY", "5E+18", "19", fee="0", account="A2", symbol="BIG"))
        await svc.publish_position(update_of(big, T0 + S))
        await svc.publish_quote(quote("BIG", "9E+19", "9E+19", T0 + 2 * S))  # notional 4.5E+38
        await svc.settle()
        taken = await svc.service.snapshots.take(now_ns=T0)
        assert [row.account for m in taken for row in m.event.positions] == ["A1"]
        assert [row.account for m in taken for row in m.event.accounts] == ["A1"]  # A2's totals are as big
        position, totals = [(headers, msgspec.json.decode(data)) for _, data, headers, _ in transport_dlq(svc.transport)
                            if headers["Posttrade-Agent"] == "snapshots"]
        assert "does not fit" in position[0]["Posttrade-Reason"] and position[0]["Posttrade-Stream"] == "pnl_snapshots"
        assert [(row["account"], row["symbol"]) for row in position[1]["rows"]] == [("A2", "BIG")]
        assert totals[0]["Posttrade-Stream"] == "pnl_account_snapshots" and totals[1]["rows"][0]["account"] == "A2"


async def test_the_snapshot_backlog_is_bounded():
    svc = MemoryService(POSTTRADE_PNL__PNL__SNAPSHOTS__FULL_EVERY="1",
                        POSTTRADE_PNL__PNL__SNAPSHOTS__MAX_PENDING_ROWS="7")
    book = svc.service.book
    for account in ("A1", "A2", "A3"):
        book.on_position(worked_example_updates(account)[-1])
    snapshots = svc.service.snapshots  # not started: nothing is published
    for i in range(3):
        await snapshots.take(now_ns=T0 + i * S)
    # 3 snapshots x (3 position + 3 account rows) = 18 > 7: the oldest went, the newest stays.
    assert [(m.event.ts, m.event.part) for m in snapshots.queue] == [(T0 + 2 * S, 0), (T0 + 2 * S, 1)]
    assert snapshots.pending_rows == 6


# -- config ---------------------------------------------------------------------------------


def test_the_shipped_config_loads():
    config = load_config("pnl", pnl.CONFIG, env={})
    assert config.service.port == 8100
    assert (config.cache.redis.db, config.cache.redis.ttl) == (4, 300)
    assert config.pnl.snapshots.table == "pnl_snapshots" and config.pnl.snapshots.interval_s == 1
    assert config.pnl.mark_priority == ["quote_mid", "last_trade", "bar_close"]


@pytest.mark.parametrize(
    "variable, value",
    [
        ("POSTTRADE_PNL__PNL__KEY_PREFIX", "a:b"),
        ("POSTTRADE_PNL__PNL__SNAPSHOTS__TABLE", "x; DROP TABLE y"),
        ("POSTTRADE_PNL__PNL__SNAPSHOTS__INTERVAL_S", "0"),
        ("POSTTRADE_PNL__PNL__HISTORY__DEFAULT_INTERVAL", "fortnight"),
        ("POSTTRADE_PNL__PNL__MARK_PRIORITY", "[mid]"),
        ("POSTTRADE_PNL__PNL__UNKNOWN", "1"),
    ],
)
def test_bad_config_values_stop_the_service(variable, value):
    with pytest.raises(ConfigError):
        load_config("pnl", pnl.CONFIG, env={variable: value})


async def test_the_valkey_sink_waits_for_valkey_while_it_is_away_and_writes_every_change_once_back():
    from types import SimpleNamespace

    from prometheus_client import CollectorRegistry
    from redis.exceptions import ConnectionError as RedisConnectionError, ResponseError

    from posttrade.sinks import RetryPolicy
    from posttrade.stores.valkey.pnl import PnlCacheMetrics, PnlCacheSink, PnlKeys

    book = make_book()
    book.on_position(worked_example_updates("A1")[-1])
    store = SimpleNamespace(redis=SimpleNamespace(register_script=lambda source: None), location="valkey-double")
    sink = PnlCacheSink(
        book, store, PnlKeys("pt"), ttl_s=300, min_interval_s=0, price_interval_s=1, refresh_s=100,
        metrics=PnlCacheMetrics(CollectorRegistry()), retry=RetryPolicy(attempts=2, initial_s=0.001, max_s=0.002),
    )  # fmt: skip
    answers = [RedisConnectionError("Connection refused"), RedisConnectionError("Connection refused"), None]
    written = []

    async def write_keys(keys, accounts):
        answer = answers.pop(0)
        if answer is not None:
            raise answer
        written.append((set(keys), set(accounts)))
        return len(keys) + len(accounts)

    sink.write_keys = write_keys
    assert await sink.flush() == 2  # Valkey away twice: waited for, not raised
    assert written == [({("A1", "XYZ")}, {"A1"})] and sink.stats.retries == 2
    assert not sink.unavailable(ResponseError("WRONGTYPE")) and sink.unavailable(RedisConnectionError("x"))
