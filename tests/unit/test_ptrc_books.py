"""ptrc's position agent on the in-memory transport: resends, amendments, late fills and
openings reach the published updates, the tables, the dead-letter subject and the alerts,
and a restart rebuilds the same book from the tables."""

from __future__ import annotations

import asyncio
from decimal import Decimal as D

import msgspec

from posttrade.agents.positions import PositionKeeper
from posttrade.streams.events import ComplianceAlert
from posttrade.app import App
from posttrade.core.positions import PositionBook
from posttrade.core.reference import Instrument, Reference
from posttrade.streams import subjects
from posttrade.streams.events import Fill, PositionUpdate, encode
from posttrade.streams.memory import MemoryTransport

T0 = 1_795_000_000_000_000_000


def fill(fill_id: str, side: str | None, qty, price, ts: int, **fields) -> Fill:
    return Fill(
        ts=T0 + ts, fill_id=fill_id, account="ACC", symbol="ES", side=side,
        qty=None if qty is None else D(qty), price=None if price is None else D(price), **fields,
    )


FEED = [
    fill("o1", "BUY", 2, "5000", 0, exec_type="OPENING"),
    fill("f1", "BUY", 1, "5010", 10, fee=D("2")),
    fill("f3", "SELL", 2, "5030", 30, fee=D("2")),
    fill("f2", "BUY", 1, "5020", 20, fee=D("2")),  # late
    fill("f2", "BUY", 1, "5020", 20, fee=D("2")),  # identical resend
    fill("f2", "BUY", 5, "5020", 20, fee=D("2")),  # conflicting resend
    fill("c1", "SELL", 2, "5035", 31, fee=D("2"), exec_type="CORRECT", ref_fill_id="f3"),
    fill("b9", None, None, None, 40, exec_type="BUST", ref_fill_id="f9"),  # before its original
    fill("f9", "BUY", 3, "5040", 35),
    fill("c2", "BUY", 1, "5000", 41, fee=D("1"), exec_type="CORRECT", ref_fill_id="f9"),  # busted: refused
]


def expected_book() -> PositionBook:
    """The effective history by hand: o1, f1, f2, f3 corrected by c1; f9 busted."""
    book = PositionBook({"ES": D(50)})
    for f in (FEED[0], FEED[1], FEED[3], msgspec.structs.replace(FEED[2], price=D("5035"))):
        book.apply(f)
    return book


def new_keeper(transport: MemoryTransport) -> tuple[App, PositionKeeper]:
    app = App("ptrc_books", transport)
    app.runtime.poll_timeout_s = 0.02
    app.runtime.batch_size = 3
    keeper = PositionKeeper(app, reference=Reference({"ES": Instrument(multiplier=D(50))}))
    return app, keeper


async def published(transport: MemoryTransport, stream: str) -> list[tuple[str, bytes, dict | None]]:
    return [(s, d, h) for s, d, h, _ in transport.streams[stream].messages] if stream in transport.streams else []


async def wait_until(predicate, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.02)


FOLD = ("net_qty", "open_cost", "realized_pnl_gross", "fees", "fifo_lots", "fifo_open_cost",
        "fifo_realized_pnl_gross", "fill_count")


def fold(position) -> dict:
    return {name: getattr(position, name) for name in FOLD}


def test_feed_through_the_agent_then_a_restart():
    async def main():
        transport = MemoryTransport()
        app, keeper = new_keeper(transport)
        async with app:
            for f in FEED:
                await transport.publish(subjects.fill_subject(f.account, f.symbol), encode(f))
            await wait_until(lambda: sum(keeper.outcomes.values()) == len(FEED))
            await app.flush_tables()
            position = keeper.book.get("ACC", "ES")
            assert fold(position) == fold(expected_book().get("ACC", "ES"))
            assert (position.corrections, position.busts) == (1, 1)
            assert keeper.outcomes == {
                "opening": 1, "fill": 2, "late": 1, "bust": 1, "duplicate": 1, "conflict": 1, "correction": 1,
                "pending": 1, "refused": 1,
            }
            updates = [msgspec.json.decode(d, type=PositionUpdate) for _, d, _ in await published(transport, "POSITIONS")]
            assert [u.revision for u in updates] == list(range(1, len(updates) + 1))
            assert [u.reason for u in updates] == ["opening", "fill", "fill", "late", "correction", "bust"]
            # f9 arrived with its pending BUST: the update shows the bust applied.
            assert updates[-1].busts == 1 and updates[-1].net_qty == position.net_qty
            alerts = [msgspec.json.decode(d, type=ComplianceAlert) for _, d, _ in await published(transport, "ALERTS")]
            rules = sorted(a.rule for a in alerts)
            assert rules == ["conflicting_duplicate", "pending_amendment", "refused_execution"]
            conflict = next(a for a in alerts if a.rule == "conflicting_duplicate")
            assert [v.qty for v in conflict.versions] == [D(1), D(5)]
            dead = [d for s, d in transport.published_without_stream if s == "posttrade.dlq.ptrc_books"]
            dead += [d for st in transport.streams.values() for s, d, _, _ in st.messages if s == "posttrade.dlq.ptrc_books"]
            assert [msgspec.json.decode(d)["fill_id"] for d in dead] == ["c2"]

        # A restart rebuilds the same book from the tables; a late fill then re-derives.
        app, keeper = new_keeper(transport)
        async with app:
            await wait_until(lambda: keeper.book.get("ACC", "ES") is not None)
            assert fold(keeper.book.get("ACC", "ES")) == fold(expected_book().get("ACC", "ES"))
            late = fill("f0", "SELL", 1, "4990", 5, fee=D("1"))
            resend = FEED[1]
            for f in (late, resend):
                await transport.publish(subjects.fill_subject(f.account, f.symbol), encode(f))
            await wait_until(lambda: keeper.outcomes["late"] == 1 and keeper.outcomes["duplicate"] == 1)
            fresh = PositionBook({"ES": D(50)})
            for f in (FEED[0], late, FEED[1], FEED[3], msgspec.structs.replace(FEED[2], price=D("5035"))):
                fresh.apply(f)
            assert fold(keeper.book.get("ACC", "ES")) == fold(fresh.get("ACC", "ES"))
            assert keeper.book.get("ACC", "ES").revision == 7

    asyncio.run(main())
