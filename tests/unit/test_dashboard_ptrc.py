"""What ptrc keeps for its page: the live blotter (`LivePositions`: rows as /positions
gives them, sent when a fill changes a position or its mark moves, bounded), the alerts
as they are raised (`LiveLog`) and the fill flow over time (`FlowSample`)."""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal as D

import pytest

from posttrade.agents.positions import PositionKeeper
from posttrade.app import App
from posttrade.core.positions import position_row
from posttrade.web.ptrc import FlowSample, LivePositions, position_view
from posttrade.streams import subjects
from posttrade.streams.events import Fill, encode
from posttrade.streams.memory import MemoryTransport
from posttrade.web.live import LiveLog
from posttrade.web.server import encode_json

T0 = 1_795_000_000_000_000_000


def fill(fill_id: str, account: str, symbol: str, side: str, qty, price, ts: int) -> Fill:
    return Fill(ts=T0 + ts, fill_id=fill_id, account=account, symbol=symbol, side=side, qty=D(qty), price=D(price))


class _Request:
    async def is_disconnected(self) -> bool:
        return False


async def next_line(lines) -> dict:
    return json.loads(await asyncio.wait_for(anext(lines), 5))


async def wait_until(predicate, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.02)


def new_keeper(**live) -> tuple[App, PositionKeeper, LivePositions]:
    app = App("ptrc_dash", MemoryTransport())
    app.runtime.poll_timeout_s = 0.02
    keeper = PositionKeeper(app, live_alerts=LiveLog("alerts", keep=3, interval_s=0.01))
    blotter = LivePositions(keeper, **live)
    blotter.topic.interval_s = 0.01
    keeper.live_positions = blotter.topic
    keeper.on_marks_moved = blotter.marks_moved
    return app, keeper, blotter


async def send(app: App, *fills: Fill) -> None:
    for f in fills:
        await app.transport.publish(subjects.fill_subject(f.account, f.symbol), encode(f))


def as_json(value) -> dict:
    return json.loads(encode_json(value))


async def test_a_page_gets_the_positions_filled_last_then_each_changed_one_as_positions_gives_it():
    app, keeper, blotter = new_keeper(first_rows=2)
    async with app:
        await send(app, fill("f1", "A", "X", "BUY", 10, "100", 1), fill("f2", "A", "Y", "BUY", 5, "20", 2),
                   fill("f3", "B", "X", "SELL", 3, "101", 3))
        await wait_until(lambda: keeper.outcomes["fill"] == 3)
        # Nothing is kept for a page while none is open.
        assert not blotter.topic.followed and not blotter.sent

        keeper.book.set_mark("X", D("102.5"))
        lines = blotter.topic._lines(_Request())
        first = await next_line(lines)
        # The two filled last (not the whole book), newest first, each exactly /positions' row.
        assert [(r["account"], r["symbol"]) for r in first["items"]] == [("B", "X"), ("A", "Y")]
        row = first["items"][0]
        assert row == as_json(position_view(keeper, keeper.book.get("B", "X")))
        assert row["net_qty"] == "-3" and row["unrealized_pnl"] == "-4.5" and row["total_pnl"] == "-4.5"
        local = as_json(position_row(keeper.book.get("B", "X"), D("102.5"), "both", keeper.fx))
        assert {k: row[k] for k in local} == local  # the local and base figures, then the book's

        # Two fills on one key within the interval: one row, its last state.
        await send(app, fill("f4", "A", "X", "SELL", 4, "103", 4), fill("f5", "A", "X", "SELL", 1, "104", 5))
        await wait_until(lambda: keeper.outcomes["fill"] == 5)
        batch = await next_line(lines)
        while not any(r["fill_count"] == 3 for r in batch["items"]):
            batch = await next_line(lines)
        (row,) = batch["items"]
        assert (row["account"], row["symbol"], row["net_qty"], row["realized_pnl_net"]) == ("A", "X", "5", "16")
        assert row["revision"] == 3
        await lines.aclose()


async def test_a_moved_mark_resends_the_positions_a_page_was_sent_and_no_more_than_the_bound():
    app, keeper, blotter = new_keeper(first_rows=10, revalued=2)
    async with app:
        await send(app, fill("f1", "A", "X", "BUY", 1, "10", 1), fill("f2", "B", "X", "BUY", 1, "10", 2),
                   fill("f3", "C", "X", "BUY", 1, "10", 3), fill("f4", "A", "Y", "BUY", 1, "10", 4))
        await wait_until(lambda: keeper.outcomes["fill"] == 4)
        blotter.marks_moved({"X"})  # no page: nothing marked, nothing kept
        assert not blotter.sent

        lines = blotter.topic._lines(_Request())
        assert len((await next_line(lines))["items"]) == 4
        # Remembered for revaluation: the last two sent (the newest fills).
        assert list(blotter.sent) == [("C", "X"), ("A", "Y")]

        keeper.book.set_mark("X", D(11))
        keeper.book.set_mark("Y", D(12))
        blotter.marks_moved({"X"})
        batch = await next_line(lines)
        assert [(r["account"], r["symbol"], r["unrealized_pnl"]) for r in batch["items"]] == [("C", "X", "1")]
        await lines.aclose()


async def test_a_mark_check_tells_the_blotter_which_symbols_moved():
    app, keeper, blotter = new_keeper()
    moved: list[set[str]] = []
    keeper.on_marks_moved = moved.append
    keeper._marks_changed = {"X", "Y"}
    await keeper._check_limits_at_marks()
    assert moved == [{"X", "Y"}]
    await keeper._check_limits_at_marks()  # nothing moved since: not called
    assert moved == [{"X", "Y"}]


async def test_alerts_go_to_the_page_as_they_are_raised_and_the_last_few_are_kept():
    app, keeper, _ = new_keeper()
    async with app:
        lines = keeper.live_alerts._lines(_Request())
        assert (await next_line(lines))["items"] == []
        resend = fill("f1", "A", "X", "BUY", 2, "10", 1)
        await send(app, fill("f1", "A", "X", "BUY", 1, "10", 1), resend)
        batch = await next_line(lines)
        (alert,) = batch["items"]
        assert (alert["rule"], alert["account"], alert["symbol"], alert["fill_id"]) == ("conflicting_duplicate", "A", "X", "f1")
        assert [v["qty"] for v in alert["versions"]] == ["1", "2"]
        await lines.aclose()
        for n in range(5):
            await send(app, Fill(ts=T0 + 10 + n, fill_id=f"b{n}", account="A", symbol="X", exec_type="BUST", ref_fill_id=f"ghost{n}"))
        await wait_until(lambda: keeper.outcomes["pending"] == 5)
        assert [a.fill_id for a in keeper.live_alerts.recent] == ["b2", "b3", "b4"]  # keep=3


def test_the_flow_sample_is_counts_per_second_and_levels():
    app, keeper, _ = new_keeper()
    sample = FlowSample(keeper)
    first = sample()
    assert first == {"positions": 0, "pending_amendments": 0}  # no rate before a second sample
    keeper.outcomes.update({"fill": 10, "opening": 2, "correction": 1, "bust": 3, "duplicate": 4})
    keeper.alerts_raised = 5
    start = sample.last[0]
    sample.last = (start - 2.0, sample.last[1])  # two seconds ago
    second = sample()
    assert second["fills_per_s"] == pytest.approx(12 / 2, rel=0.05)
    assert second["amendments_per_s"] == pytest.approx(4 / 2, rel=0.05)
    assert second["resends_per_s"] == pytest.approx(4 / 2, rel=0.05)
    assert second["alerts_per_s"] == pytest.approx(5 / 2, rel=0.05)
    assert second["late_per_s"] == second["refused_per_s"] == 0
