"""Reconciliation on an App (in-memory transport): runs, the cut, storage, the HTTP face.

`MiniPtrc` is the part of ptrc reconciliation relies on — the fills channel, the
`positions` changelog table keyed (account, symbol) with `PositionState` values, an
agent that applies each fill once — so these tests (and the integration tests on NATS)
exercise the same contract the real service provides.
"""

from __future__ import annotations

import asyncio
from decimal import Decimal as D

import httpx
import pytest

from posttrade.agents.reconciliation import (
    ReconciliationRun,
    ReconciliationSection,
    install_reconciliation,
)
from posttrade.app import App
from posttrade.core.positions import PositionBook, PositionState
from posttrade.core.reconciliation import Tolerance
from posttrade.streams.events import Fill, encode
from posttrade.streams.memory import MemoryTransport
from posttrade.streams.transport import Transport
from posttrade.web.server import build_web_app

T0 = 1_795_000_000_000_000_000
HEADER = "account,symbol,net_qty,avg_open_price,realized_pnl\n"

# Issue 3's worked example (fee 1 per fill): ACC1/XYZ ends short 5 @ 90, realized net 146.
WORKED_EXAMPLE = [("BUY", "10", "100"), ("BUY", "10", "110"), ("SELL", "15", "120"), ("SELL", "10", "90")]


def example_fills() -> list[Fill]:
    fills = [
        Fill(ts=T0 + i, fill_id=f"x{i}", account="ACC1", symbol="XYZ", side=side, qty=D(qty), price=D(price), fee=D(1))
        for i, (side, qty, price) in enumerate(WORKED_EXAMPLE)
    ]
    fills += [
        Fill(ts=T0 + 10, fill_id="es1", account="ACC2", symbol="ES", side="BUY", qty=D(2), price=D("5000.25"), fee=D("2.1")),
        Fill(ts=T0 + 11, fill_id="es2", account="ACC2", symbol="ES", side="SELL", qty=D(1), price=D("5010.5"), fee=D("2.1")),
        Fill(ts=T0 + 12, fill_id="b1", account="ACC1", symbol="ABC", side="SELL", qty=D("0.5"), price=D("12.345"), fee=D("-0.01")),
    ]
    return fills


# Statement of example_fills (ES multiplier 50): ES realized (5010.5-5000.25)*1*50 - 4.2 = 508.3
GOOD_STATEMENT = HEADER + "ACC1,XYZ,-5,90,146\nACC2,ES,1,5000.25,508.3\nACC1,ABC,-0.5,12.345,0.01\n"
MULTIPLIERS = {"ES": D(50)}


class MiniPtrc:
    """The live side of the contract: fills → positions table, exactly once per key."""

    def __init__(self, transport: Transport, *, name: str, stream: str, subject_root: str,
                 settings: ReconciliationSection = ReconciliationSection()):
        self.app = App(name, transport)
        self.app.runtime.poll_timeout_s = 0.05
        self.app.runtime.batch_size = 2
        self.subject_root = subject_root
        self.fills = self.app.channel("fills", stream=stream, subjects=[f"{subject_root}.>"], value_type=Fill)
        self.positions = self.app.table("positions", value_type=PositionState, key_type=tuple[str, str])
        self.book = PositionBook(MULTIPLIERS)
        self.gate = asyncio.Event()
        self.gate.set()
        self.marks = {"ES": D("5020"), "XYZ": D("95")}
        self.app.agent(self.fills, name="track_positions")(self.track)
        self.app.on_startup.append(self.recover)
        self.reconciliation = install_reconciliation(
            self.app, fills=self.fills, positions=self.positions, multipliers=MULTIPLIERS,
            mark_of=self.marks.get, settings=settings,
        )

    async def recover(self) -> None:
        from posttrade.core.positions import Position

        self.book = PositionBook(MULTIPLIERS, positions=[Position.from_state(s) for s in self.positions.values()])

    async def track(self, stream) -> None:
        async for fill in stream:
            await self.gate.wait()  # tests hold the live agent back to make it lag
            key = (fill.account, fill.symbol)
            if self.positions.already_applied(key):
                continue
            self.positions[key] = self.book.apply(fill).to_state()

    def subject(self, fill: Fill) -> str:
        return f"{self.subject_root}.{fill.account}.{fill.symbol}"

    def applied_through(self) -> int:
        stream = self.fills.stream.name
        return max((self.positions.last_applied(k).get(stream, 0) for k in self.positions.keys()), default=0)

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=build_web_app(self.app)), base_url="http://ptrc")


async def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


async def finished(http: httpx.AsyncClient, run_id: str, timeout: float = 30.0) -> dict:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        body = (await http.get(f"/reconciliation/{run_id}")).json()
        if body["status"] != "running":
            return body
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"run {run_id} still running")
        await asyncio.sleep(0.02)


def mini(transport: MemoryTransport | None = None, **kwargs) -> MiniPtrc:
    return MiniPtrc(transport or MemoryTransport(), name="ptrc", stream="FILLS", subject_root="trading.fills", **kwargs)


async def publish(svc: MiniPtrc, fills: list[Fill]) -> None:
    for fill in fills:
        await svc.app.transport.publish(svc.subject(fill), encode(fill))


async def test_live_and_replay_agree_and_a_good_statement_has_no_breaks(tmp_path):
    svc = mini()
    async with svc.app, svc.client() as http:
        await publish(svc, example_fills())
        await wait_for(lambda: svc.applied_through() == 7)
        response = await http.post("/reconciliation", json={"statement": GOOD_STATEMENT})
        assert response.status_code == 202
        assert response.headers["location"] == f"/reconciliation/{response.json()['id']}"
        run = await finished(http, response.json()["id"])
    assert run["status"] == "done", run
    assert run["break_count"] == 0 and run["breaks"] == []
    assert (run["cut_seq"], run["stream_last_seq"], run["fills_replayed"]) == (7, 7, 7)
    assert (run["live_positions"], run["replay_positions"]) == (3, 3)
    assert run["statement"] == {"source": "upload", "path": None, "positions": 3}
    assert run["tolerance"] == {"qty": "0", "avg_price": "0", "realized_pnl": "0"}


async def test_a_break_injected_into_the_statement_is_found_and_valued_at_the_mark():
    svc = mini()
    async with svc.app, svc.client() as http:
        await publish(svc, example_fills())
        await wait_for(lambda: svc.applied_through() == 7)
        bad = GOOD_STATEMENT.replace("ACC2,ES,1,5000.25,508.3", "ACC2,ES,2,5000.25,508.3")
        response = await http.post("/reconciliation", content=bad, headers={"content-type": "text/csv"})
        assert response.status_code == 202, response.text
        run = await finished(http, response.json()["id"])
    assert run["break_count"] == 1
    (item,) = run["breaks"]
    assert item == {
        "against": "statement", "account": "ACC2", "symbol": "ES", "field": "net_qty",
        "replay": "1", "other": "2", "difference": "1", "tolerance": "0", "missing_from": None,
        "value_at_mark": "251000",  # 1 x 5020 x 50
    }
    assert run["breaks_by_field"] == {"statement.net_qty": 1}


async def test_statement_tolerances_from_query_parameters_absorb_rounded_prices():
    svc = mini()
    async with svc.app, svc.client() as http:
        await publish(svc, example_fills())
        await wait_for(lambda: svc.applied_through() == 7)
        rounded = GOOD_STATEMENT.replace("12.345,0.01", "12.35,0.01")
        strict = await finished(http, (await http.post(
            "/reconciliation", content=rounded, headers={"content-type": "text/csv"})).json()["id"])
        loose = await finished(http, (await http.post(
            "/reconciliation?tolerance_avg_price=0.01", content=rounded,
            headers={"content-type": "text/csv"})).json()["id"])
    assert [b["field"] for b in strict["breaks"]] == ["avg_open_price"]
    assert loose["break_count"] == 0 and loose["tolerance"]["avg_price"] == "0.01"


async def test_a_live_position_that_differs_from_the_replay_is_a_break():
    svc = mini()
    async with svc.app, svc.client() as http:
        await publish(svc, example_fills())
        await wait_for(lambda: svc.applied_through() == 7)
        # Corrupt the live table outside any agent (its last-applied sequence stays).
        state = svc.positions[("ACC1", "XYZ")]
        import msgspec

        svc.positions[("ACC1", "XYZ")] = msgspec.structs.replace(state, net_qty=D(-6), open_cost=D(-540))
        run = await finished(http, (await http.post("/reconciliation", json={})).json()["id"])
    assert [(b["against"], b["field"], b["replay"], b["other"]) for b in run["breaks"]] == [
        ("live", "net_qty", "-5", "-6"),
    ]


async def test_the_replay_stops_at_the_sequence_the_live_table_reflects():
    svc = mini()
    async with svc.app, svc.client() as http:
        await publish(svc, example_fills()[:2])
        await wait_for(lambda: svc.applied_through() == 2)
        svc.gate.clear()  # the live agent lags: the next fills are in the stream, not in the table
        await publish(svc, example_fills()[2:])
        await asyncio.sleep(0.2)
        assert svc.applied_through() == 2
        run = await finished(http, (await http.post("/reconciliation", json={})).json()["id"])
        svc.gate.set()
    assert run["break_count"] == 0, run["breaks"]
    assert (run["cut_seq"], run["stream_last_seq"], run["fills_replayed"]) == (2, 7, 2)


async def test_a_replay_from_a_later_sequence_misses_the_earlier_fills():
    svc = mini()
    async with svc.app, svc.client() as http:
        await publish(svc, example_fills())
        await wait_for(lambda: svc.applied_through() == 7)
        run = await finished(http, (await http.post("/reconciliation", json={"from_seq": 5})).json()["id"])
    assert run["fills_replayed"] == 3 and run["from_seq"] == 5
    # ES and ABC have all their fills after seq 5; XYZ's are all before: live only.
    assert [(b["account"], b["symbol"], b["field"], b["missing_from"]) for b in run["breaks"]] == [
        ("ACC1", "XYZ", "position", "replay"),
    ]


async def test_runs_are_listed_newest_first_and_survive_a_restart():
    transport = MemoryTransport()
    svc = mini(transport)
    async with svc.app, svc.client() as http:
        await publish(svc, example_fills())
        await wait_for(lambda: svc.applied_through() == 7)
        first = await finished(http, (await http.post("/reconciliation", json={})).json()["id"])
        await asyncio.sleep(1.1)  # ids start with the second they were requested in
        second = await finished(http, (await http.post("/reconciliation", json={"statement": GOOD_STATEMENT})).json()["id"])
        listing = (await http.get("/reconciliation")).json()
    assert [r["id"] for r in listing["runs"]] == [second["id"], first["id"]]
    assert "breaks" not in listing["runs"][0] and listing["runs"][0]["url"] == f"/reconciliation/{second['id']}"
    again = mini(transport)
    async with again.app, again.client() as http:
        assert (await http.get(f"/reconciliation/{first['id']}")).json() == first


async def test_a_run_interrupted_by_a_stop_is_failed_after_the_restart():
    transport = MemoryTransport()
    svc = mini(transport)
    async with svc.app:
        run = ReconciliationRun(id="20260101T000000-dead", status="running", requested_at="2026-01-01T00:00:00+00:00",
                                stream="FILLS", tolerance=Tolerance())
        await svc.reconciliation._store(run)
    again = mini(transport)
    async with again.app, again.client() as http:
        body = (await http.get("/reconciliation/20260101T000000-dead")).json()
    assert body["status"] == "failed" and "interrupted" in body["error"]


async def test_only_the_newest_runs_are_kept():
    svc = mini(settings=ReconciliationSection(keep_runs=2))
    async with svc.app:
        for i in range(3):
            await svc.reconciliation._store(
                ReconciliationRun(id=f"2026010{i}T000000-aaaa", status="done", requested_at="x", stream="FILLS",
                                  tolerance=Tolerance())
            )
        await svc.reconciliation._prune()
        assert sorted(svc.reconciliation.runs.keys()) == ["20260101T000000-aaaa", "20260102T000000-aaaa"]


async def test_at_most_max_breaks_are_stored_quantity_breaks_first():
    svc = mini(settings=ReconciliationSection(max_breaks=2))
    async with svc.app, svc.client() as http:
        await publish(svc, example_fills())
        await wait_for(lambda: svc.applied_through() == 7)
        statement = HEADER + "ACC1,XYZ,-5,91,140\nACC2,ES,3,5000.25,508.3\nACC1,ABC,-0.5,12.345,0.01\n"
        run = await finished(http, (await http.post("/reconciliation", json={"statement": statement})).json()["id"])
    assert run["break_count"] == 3 and run["breaks_truncated"]
    assert [(b["symbol"], b["field"]) for b in run["breaks"]] == [("ES", "net_qty"), ("XYZ", "realized_pnl")]


async def test_statement_paths_are_read_inside_the_statement_directory_only(tmp_path):
    inside = tmp_path / "statements"
    inside.mkdir()
    (inside / "broker.csv").write_text(GOOD_STATEMENT)
    (tmp_path / "secret.csv").write_text(GOOD_STATEMENT)
    svc = mini(settings=ReconciliationSection(statement_dir=str(inside)))
    async with svc.app, svc.client() as http:
        await publish(svc, example_fills())
        await wait_for(lambda: svc.applied_through() == 7)
        response = await http.post("/reconciliation", json={"statement_path": "broker.csv"})
        assert response.status_code == 202
        run = await finished(http, response.json()["id"])
        escape = await http.post("/reconciliation", json={"statement_path": "../secret.csv"})
        missing = await http.post("/reconciliation", json={"statement_path": "nope.csv"})
    assert run["break_count"] == 0 and run["statement"]["source"] == "path"
    assert escape.status_code == 400 and "leaves the statement directory" in escape.json()["detail"]["error"]
    assert missing.status_code == 400 and "no statement file" in missing.json()["detail"]["error"]


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"from_seq": 1, "from_time": "2026-01-01T00:00:00Z"}, "not both"),
        ({"from_seq": 0}, "start at 1"),
        ({"from_time": "yesterday"}, "ISO-8601"),
        ({"statement": "x", "statement_path": "y"}, "not both"),
        ({"tolerance": {"qty": "-1"}}, "tolerance"),
        ({"tolerance": {"qty": "abc"}}, "must be a decimal"),
        ({"tolerance": {"qty": 1.5}}, "Expected `str | null`"),  # a plain decimal string, as documented
        ({"tolerance": {"quantity": "1"}}, "unknown field"),
        ({"from": 1}, "unknown field"),
        ({"statement_path": "a.csv"}, "statement paths are disabled"),
    ],
)
async def test_invalid_requests_are_400_json(body, needle):
    svc = mini()
    async with svc.app, svc.client() as http:
        response = await http.post("/reconciliation", json=body)
    assert response.status_code == 400, response.text
    assert needle in response.text


async def test_a_bad_statement_is_400_with_its_bad_lines():
    svc = mini()
    async with svc.app, svc.client() as http:
        response = await http.post("/reconciliation", json={"statement": HEADER + "A,X,1,1,0\nA,Y,one,1,0\n"})
        raw = await http.post("/reconciliation", content=b"not,a,statement\n", headers={"content-type": "text/csv"})
        other = await http.post("/reconciliation", content=b"x", headers={"content-type": "application/xml"})
        broken_json = await http.post("/reconciliation", content=b"{", headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["detail"]["errors"] == [{"line": 3, "error": "net_qty is not a decimal number: 'one'"}]
    assert raw.status_code == 400 and raw.json()["detail"]["errors"][0]["line"] == 1
    assert other.status_code == 415
    assert broken_json.status_code == 400


async def test_unknown_run_is_404_json_and_a_second_run_waits_for_the_first():
    svc = mini()
    async with svc.app, svc.client() as http:
        missing = await http.get("/reconciliation/nope")
        await publish(svc, example_fills()[:1])
        await wait_for(lambda: svc.applied_through() == 1)
        blocker = asyncio.Event()
        original = svc.reconciliation.replay

        async def slow_replay(start, cut):
            await blocker.wait()
            return await original(start, cut)

        svc.reconciliation.replay = slow_replay
        first = await http.post("/reconciliation", json={})
        second = await http.post("/reconciliation", json={})
        blocker.set()
        await finished(http, first.json()["id"])
    assert missing.status_code == 404 and missing.json()["detail"]["id"] == "nope"
    assert second.status_code == 409 and second.json()["detail"]["id"] == first.json()["id"]


async def test_replay_from_a_time_and_an_empty_stream():
    svc = mini()
    async with svc.app, svc.client() as http:
        empty = await finished(http, (await http.post("/reconciliation", json={})).json()["id"])
        await publish(svc, example_fills())
        await wait_for(lambda: svc.applied_through() == 7)
        later = await finished(http, (await http.post(
            "/reconciliation", json={"from_time": "2100-01-01T00:00:00"})).json()["id"])
    assert empty["status"] == "done" and empty["cut_seq"] == 0 and empty["break_count"] == 0
    assert later["from_time"] == "2100-01-01T00:00:00+00:00"
    assert later["fills_replayed"] == 0 and later["break_count"] == 3  # every live position is missing from the replay
