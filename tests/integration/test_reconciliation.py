"""Reconciliation on the real NATS JetStream server of the local stack.

Fills are published on NATS into a stream of this test's own (`RECT<hex>_FILLS` on
`rect<hex>.trading.fills.>`: the server is shared), a live agent builds the positions
table the way ptrc does (`MiniPtrc`), and reconciliation replays the stream through an
ephemeral JetStream consumer. A statement with an injected break yields exactly that
break; without it, none. `posttrade reconcile` is run against the app served over HTTP.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import uuid

import nats
import pytest

from posttrade.commands import reconcile as reconcile_command
from posttrade.streams.events import encode
from posttrade.streams.nats import NatsTransport
from posttrade.web.server import WebServer, build_web_app
from tests.unit.test_reconciliation_service import GOOD_STATEMENT, MiniPtrc, example_fills, finished, wait_for


@pytest.fixture
async def live(stack):
    suffix = uuid.uuid4().hex[:8]
    svc = MiniPtrc(
        NatsTransport(stack.nats_url, name=f"rect{suffix}"),
        name=f"rect{suffix}",
        stream=f"RECT{suffix.upper()}_FILLS",
        subject_root=f"rect{suffix}.trading.fills",
    )
    async with svc.app:
        yield svc
    nc = await nats.connect(stack.nats_url)
    js = nc.jetstream()
    try:
        await js.delete_stream(svc.fills.stream.name)
        for table in ("positions", "reconciliations"):
            try:
                await js.delete_key_value(f"{svc.app.name}-{table}")
            except nats.js.errors.NotFoundError:
                pass
    finally:
        await nc.close()


async def publish_on_nats(url: str, svc: MiniPtrc, fills) -> None:
    """Publish through a plain NATS client, as the trading services do."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        for fill in fills:
            await js.publish(svc.subject(fill), encode(fill), headers={"Nats-Msg-Id": fill.fill_id})
    finally:
        await nc.close()


async def test_replay_from_jetstream_finds_a_break_injected_into_a_statement_and_none_without(stack, live):
    await publish_on_nats(stack.nats_url, live, example_fills())
    await wait_for(lambda: live.applied_through() == 7, timeout=30)
    async with live.client() as http:
        clean = await finished(http, (await http.post("/reconciliation", json={"statement": GOOD_STATEMENT})).json()["id"])
        injected = GOOD_STATEMENT.replace("ACC1,XYZ,-5,90,146", "ACC1,XYZ,-5,90,145.5")
        broken = await finished(http, (await http.post("/reconciliation", json={"statement": injected})).json()["id"])
        listed = (await http.get("/reconciliation")).json()["runs"]
    assert clean["status"] == "done" and clean["break_count"] == 0, clean
    assert (clean["cut_seq"], clean["fills_replayed"], clean["replay_positions"], clean["live_positions"]) == (7, 7, 3, 3)
    assert broken["break_count"] == 1
    (item,) = broken["breaks"]
    assert (item["against"], item["account"], item["symbol"], item["field"], item["replay"], item["other"],
            item["difference"]) == ("statement", "ACC1", "XYZ", "realized_pnl", "146", "145.5", "-0.5")
    assert {run["id"] for run in listed} == {clean["id"], broken["id"]}


async def test_fills_arriving_during_the_run_do_not_make_breaks(stack, live):
    await publish_on_nats(stack.nats_url, live, example_fills()[:3])
    await wait_for(lambda: live.applied_through() == 3, timeout=30)
    live.gate.clear()  # the live agent holds the next fills: the stream runs ahead of the table
    await publish_on_nats(stack.nats_url, live, example_fills()[3:])
    async with live.client() as http:
        run = await finished(http, (await http.post("/reconciliation", json={"from_seq": 1})).json()["id"])
    live.gate.set()
    await wait_for(lambda: live.applied_through() == 7, timeout=30)
    assert run["break_count"] == 0, run["breaks"]
    assert (run["cut_seq"], run["stream_last_seq"], run["fills_replayed"]) == (3, 7, 3)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_the_reconcile_command_prints_the_breaks_and_exits_1(stack, live, tmp_path, capsys):
    await publish_on_nats(stack.nats_url, live, example_fills())
    await wait_for(lambda: live.applied_through() == 7, timeout=30)
    port = free_port()
    server = WebServer(build_web_app(live.app), "127.0.0.1", port)
    serving = asyncio.create_task(server.serve())
    try:
        await wait_for(lambda: server.started, timeout=10)
        good = tmp_path / "good.csv"
        good.write_text(GOOD_STATEMENT)
        bad = tmp_path / "bad.csv"
        bad.write_text(GOOD_STATEMENT.replace("ACC2,ES,1,", "ACC2,ES,3,"))
        parser = argparse.ArgumentParser()
        reconcile_command.register(parser.add_subparsers())

        def command(*argv: str) -> int:
            args = parser.parse_args(["reconcile", "--url", f"http://127.0.0.1:{port}", *argv])
            return args.handler(args)

        clean_exit = await asyncio.to_thread(command, "--from", "1", "--statement", str(good))
        clean_out = capsys.readouterr().out
        broken_exit = await asyncio.to_thread(command, "--from", "2026-01-01T00:00:00Z", "--statement", str(bad))
        broken_out = capsys.readouterr().out
        refused_exit = await asyncio.to_thread(command, "--statement", str(tmp_path / "missing.csv"))
        refused_err = capsys.readouterr().err
    finally:
        server.should_exit = True
        await serving
    assert clean_exit == 0 and "no breaks" in clean_out
    assert broken_exit == 1
    assert "statement  ACC2     ES      net_qty  1       3      2" in broken_out
    assert broken_out.rstrip().endswith("1 break")
    assert refused_exit == 2 and "cannot read the statement" in refused_err
