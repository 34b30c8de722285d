"""pnl's page data: the live account figures, the desk history ring and the top movers
(posttrade/web/pnl.py), in memory."""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal as D

import httpx

from posttrade.agents.positions import position_update
from posttrade.core.positions import Position
from posttrade.web.pnl import SymbolSums, desk_sample, rank_movers, sum_by_symbol
from posttrade.web.live import History
from posttrade.web.server import build_web_app

from .test_pnl import T0, S, MemoryService, fill, make_book, quote, worked_example_updates


def long_position(account: str, symbol: str, qty: str, price: str, i: int = 1):
    position = Position(account, symbol)
    position.apply(fill(i, "BUY", qty, price, fee="0", account=account, symbol=symbol))
    return position_update(position, None, "fill", T0 + i * S)


class _Request:
    async def is_disconnected(self) -> bool:
        return False


# -- the book's hook -------------------------------------------------------------------------


def test_every_revalued_row_is_told():
    book = make_book()
    told: list = []
    book.on_row_change = told.append
    book.on_position(worked_example_updates("A1")[-1])
    book.on_position(long_position("A2", "XYZ", "20", "105"))
    assert told == [("A1", "XYZ"), ("A2", "XYZ")]
    book.on_quote(quote("XYZ", "99", "101", T0 + 10 * S))
    assert len(told) == 2  # a price move is valued lazily: nothing yet
    book.refresh()
    assert sorted(told[2:]) == [("A1", "XYZ"), ("A2", "XYZ")]


# -- top movers ----------------------------------------------------------------------------------


async def test_symbols_are_summed_exactly_over_their_positions():
    book = make_book()
    book.on_position(long_position("A1", "XYZ", "10", "100"))
    book.on_position(long_position("A2", "XYZ", "3", "100.1"))
    book.on_position(long_position("A1", "ABC", "1", "50"))
    book.on_position(worked_example_updates("A3", "DEF")[-1])  # short 5, realized 146 net
    book.on_quote(quote("XYZ", "100.3", "100.3", T0 + 10 * S))
    book.on_quote(quote("ABC", "40", "40", T0 + 10 * S))
    book.refresh()
    sums = await sum_by_symbol(book, book.accounts())
    assert set(sums) == {"XYZ", "ABC", "DEF"}
    xyz = sums["XYZ"]
    # 10 x 0.3 + 3 x 0.2 = 3.6, exactly (a float sum would not be)
    assert (xyz.positions, xyz.open_positions, xyz.net_qty, xyz.mark) == (2, 2, D(13), D("100.3"))
    assert xyz.figure("total_pnl") == D("3.6") and xyz.figure("day_pnl") == D("3.6")
    assert sums["ABC"].figure("total_pnl") == D(-10)
    # DEF has no mark: its open position's P&L is unknown, and so is the symbol's sum
    assert sums["DEF"].figure("total_pnl") is None and sums["DEF"].data()["total_pnl"] is None
    ranked = rank_movers(sums.values(), "total_pnl", 10)
    assert [s.symbol for s in ranked] == ["ABC", "XYZ", "DEF"]  # |-10| > |3.6|, unknown last
    assert [s.symbol for s in rank_movers(sums.values(), "total_pnl", 1)] == ["ABC"]
    assert xyz.data() == {
        "symbol": "XYZ", "currency": "USD", "positions": 2, "open_positions": 2, "net_qty": "13",
        "mark": "100.3", "day_pnl": "3.6", "total_pnl": "3.6", "as_of": T0 + 10 * S,
    }
    only_a1 = await sum_by_symbol(book, ["A1"])
    assert only_a1["XYZ"].figure("total_pnl") == D(3)


def test_ties_rank_by_symbol():
    a, b = SymbolSums("B", "USD"), SymbolSums("A", "USD")
    a.total_pnl = D(5)
    b.total_pnl = D(-5)
    assert [s.symbol for s in rank_movers([a, b], "total_pnl", 5)] == ["A", "B"]


async def test_movers_endpoint_desk_account_and_bad_input():
    async with MemoryService() as svc:
        await svc.publish_position(long_position("A1", "XYZ", "10", "100"))
        await svc.publish_position(long_position("A2", "XYZ", "10", "100"))
        await svc.publish_position(long_position("A2", "ABC", "1", "100"))
        await svc.publish_quote(quote("XYZ", "101", "101", T0 + 10 * S))
        await svc.publish_quote(quote("ABC", "50", "50", T0 + 10 * S))
        await svc.settle()
        body = (await svc.http.get("/dashboard/movers")).json()
        assert (body["account"], body["by"], body["symbols"]) == (None, "day_pnl", 2)
        assert [(m["symbol"], m["total_pnl"], m["positions"]) for m in body["movers"]] == [("ABC", "-50", 1), ("XYZ", "20", 2)]
        body = (await svc.http.get("/dashboard/movers?account=A1&by=total_pnl&limit=1")).json()
        assert [(m["symbol"], m["total_pnl"]) for m in body["movers"]] == [("XYZ", "10")]
        for query, parameter in (("limit=0", "limit"), ("limit=x", "limit"), ("by=pnl", "by"), ("account=%20A1", "account")):
            response = await svc.http.get(f"/dashboard/movers?{query}")
            assert response.status_code == 400, query
            assert response.json()["detail"]["parameter"] == parameter
        # The desk's sums are shared for MOVERS_MAX_AGE_S: a second page asking at once
        # gets the same pass.
        movers = svc.service.page.movers
        movers.max_age_s = 0
        first, again = await asyncio.gather(movers.desk(), movers.desk())
        assert first[1] == again[1]
        # A later pass sums only the symbols that moved since: ABC's position, not XYZ's two.
        await svc.publish_quote(quote("ABC", "60", "60", T0 + 11 * S))
        await svc.settle()
        summed = movers.summed_rows
        sums, _ = await movers.desk()
        assert movers.summed_rows - summed == 1
        assert (sums["ABC"].figure("total_pnl"), sums["XYZ"].figure("total_pnl")) == (D(-40), D(20))
        body = (await svc.http.get("/dashboard/movers?by=total_pnl")).json()
        assert [(m["symbol"], m["total_pnl"]) for m in body["movers"]] == [("ABC", "-40"), ("XYZ", "20")]
        # A new position in a new symbol shows up too.
        await svc.publish_position(long_position("A3", "NEW", "1", "100"))
        await svc.publish_quote(quote("NEW", "200", "200", T0 + 12 * S))
        await svc.settle()
        body = (await svc.http.get("/dashboard/movers?by=total_pnl")).json()
        assert [(m["symbol"], m["total_pnl"]) for m in body["movers"]] == [("NEW", "100"), ("ABC", "-40"), ("XYZ", "20")]


# -- live account figures ----------------------------------------------------------------------


async def test_live_accounts_start_with_every_account_then_send_the_revalued_ones():
    async with MemoryService() as svc:
        await svc.publish_position(long_position("A1", "XYZ", "10", "100"))
        await svc.publish_position(long_position("A2", "ABC", "1", "100"))
        await svc.settle()
        topic = svc.service.page.accounts
        assert not topic.followed
        lines = topic._lines(_Request())
        first = await anext(lines)
        assert topic.followed
        assert [(a["account"], a["positions"]) for a in json.loads(first)["items"]] == [("A1", 1), ("A2", 1)]
        await svc.publish_quote(quote("XYZ", "101", "101", T0 + 10 * S))
        await svc.settle()
        await svc.realtime("?symbol=XYZ")  # a reader revalues the symbol
        line = json.loads(await asyncio.wait_for(anext(lines), 5))
        assert [(a["account"], a["total_pnl"]) for a in line["items"]] == [("A1", "10")]
        await lines.aclose()
        assert not topic.followed


# -- the desk's history ring -----------------------------------------------------------------------


async def test_desk_sample_sums_known_totals_per_base_currency():
    book = make_book()
    state: dict = {}
    book.on_position(long_position("A1", "XYZ", "10", "100"))
    book.on_position(long_position("A2", "XYZ", "1", "100"))
    book.on_position(long_position("A3", "NOMARK", "1", "100"))
    book.on_quote(quote("XYZ", "100.5", "100.5", T0 + 10 * S))
    first = await desk_sample(book, state)
    assert first["total_pnl.USD"] == 5.5 and first["day_pnl.USD"] == 5.5
    assert first["unknown_total.USD"] == 1  # A3's position has no mark
    assert (first["positions"], first["accounts"], first["revaluations_per_s"]) == (3, 3, None)
    book.on_quote(quote("XYZ", "101", "101", T0 + 11 * S))
    second = await desk_sample(book, state)
    assert second["total_pnl.USD"] == 11 and second["revaluations_per_s"] > 0


async def test_the_page_routes_stay_out_of_openapi_and_need_the_token():
    async with MemoryService() as svc:
        await svc.publish_position(long_position("A1", "XYZ", "10", "100"))
        await svc.settle()
        history = svc.service.page.desk_history
        await history.take()
        web = build_web_app(svc.app, auth_token="secret", read_token="reader")
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=web), base_url="http://t") as http:
            paths = (await http.get("/openapi.json")).json()["paths"]
            assert "/pnl/realtime" in paths
            assert not [p for p in paths if p.startswith(("/dashboard", "/live")) or p == "/"]
            for path in ("/dashboard/movers", "/dashboard/history", "/live/accounts"):
                assert (await http.get(path)).status_code == 401, path
            auth = {"Authorization": "Bearer reader"}
            body = (await http.get("/dashboard/history", headers=auth)).json()
            assert body["every_s"] == 2.0 and len(body["t"]) == 1
            assert body["series"]["positions"] == [1.0] and body["series"]["unknown_total.USD"] == [1.0]
            assert (await http.get("/dashboard/movers", headers=auth)).status_code == 200
            assert (await http.get("/")).status_code == 200  # the page itself is public


async def test_the_ring_is_bounded():
    keep = 3
    book = make_book()
    state: dict = {}

    async def sample():
        return await desk_sample(book, state)

    history = History(sample, keep=keep)
    for _ in range(keep + 2):
        await history.take()
    assert len(history.columns()["t"]) == keep
