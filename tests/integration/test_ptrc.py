"""ptrc (and pnl) on the real servers: fills on NATS → /positions, /pnl/summary and
/pnl/realtime equal to what the reconciliation CLI computes from the same fills,
through a SIGKILL of ptrc; alerts stored."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import time
import uuid
from decimal import Decimal
from pathlib import Path

import nats
import pytest

from posttrade.stores.questdb import QuestDBClient
from posttrade.streams.events import Fill, Quote, encode
from posttrade.streams.subjects import fill_subject, quote_subject

from .service_process import REPO, ServiceProcess, questdb_writer, reference_setting

MULTIPLIERS = {"FUT": "50"}


def ptrc_config(restricted: str) -> str:
    base = (REPO / "config/backend/ptrc/config.yaml").read_text()
    return base + (
        reference_setting("instruments:\n  FUT: {multiplier: 50}\n")
        + f"compliance:\n  restricted_symbols: [{restricted}]\n  max_position: 1000000\n"
    )


def random_fills(accounts: list[str], symbols: list[str], n: int, seed: int) -> list[Fill]:
    rng = random.Random(seed)
    t0 = time.time_ns()
    fills = []
    for i in range(n):
        symbol = rng.choice(symbols)
        fills.append(
            Fill(
                ts=t0 + i * 1000,
                fill_id=f"{uuid.uuid4().hex}",
                account=rng.choice(accounts),
                symbol=symbol,
                side=rng.choice(["BUY", "SELL"]),
                qty=Decimal(rng.randint(1, 50)),
                price=Decimal(rng.randint(9000, 11000)) / 100,
                fee=Decimal(rng.randint(-10, 100)) / 100,
            )
        )
    return fills


async def publish(url: str, fills: list[Fill], quotes: dict[str, Decimal]) -> None:
    nc = await nats.connect(url)
    js = nc.jetstream()
    futures = [await js.publish_async(fill_subject(f.account, f.symbol), encode(f)) for f in fills]
    t = time.time_ns()
    for symbol, mid in quotes.items():
        quote = Quote(ts=t, symbol=symbol, bid=mid - Decimal("0.01"), ask=mid + Decimal("0.01"))
        futures.append(await js.publish_async(quote_subject(symbol), encode(quote)))
    await asyncio.gather(*futures)
    await nc.close()


def cli_positions(tmp_path: Path, fills: list[Fill], marks: dict[str, Decimal]) -> dict:
    fills_file = tmp_path / "fills.jsonl"
    fills_file.write_text("".join(encode(f).decode() + "\n" for f in fills))
    marks_file = tmp_path / "marks.json"
    marks_file.write_text(json.dumps({s: str(m) for s, m in marks.items()}))
    multipliers_file = tmp_path / "multipliers.json"
    multipliers_file.write_text(json.dumps(MULTIPLIERS))
    out = subprocess.run(
        [sys.executable, "-m", "posttrade.cli", "positions", "compute", str(fills_file),
         "--marks", str(marks_file), "--multipliers", str(multipliers_file)],
        capture_output=True, check=True, cwd=REPO,
    )
    return {(r["account"], r["symbol"]): r for r in json.loads(out.stdout)["positions"]}


def wait_positions(ptrc: ServiceProcess, accounts: list[str], fills: int, timeout: float = 90) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        rows = {}
        for account in accounts:
            for row in ptrc.get("/positions", account=account).json()["positions"]:
                rows[(row["account"], row["symbol"])] = row
        if sum(r["fill_count"] for r in rows.values()) >= fills:
            return rows
        if time.monotonic() > deadline:
            raise AssertionError(f"ptrc applied {sum(r['fill_count'] for r in rows.values())} of {fills} fills\n{ptrc.tail()}")
        time.sleep(0.3)


FIELDS = ("net_qty", "avg_open_price", "realized_pnl_gross", "fees", "realized_pnl_net", "mark",
          "unrealized_pnl", "fifo_realized_pnl_gross", "fifo_unrealized_pnl")


def assert_same_positions(live: dict, expected: dict) -> None:
    assert live.keys() == expected.keys()
    for key, row in expected.items():
        for field in FIELDS:
            assert live[key][field] == row[field], (key, field, live[key][field], row[field])


PNL_FIELDS = ("net_qty", "realized_pnl_gross", "fees", "realized_pnl_net", "mark", "unrealized_pnl",
              "fifo_unrealized_pnl")


def same_number(a: str | None, b: str | None) -> bool:
    return a is None and b is None or (a is not None and b is not None and Decimal(a) == Decimal(b))


def assert_same_numbers(live: dict, expected: dict) -> None:
    assert live.keys() == expected.keys()
    for key, row in expected.items():
        for field in PNL_FIELDS:
            assert same_number(live[key][field], row[field]), (key, field, live[key][field], row[field])


def wait_realtime(pnl: ServiceProcess, accounts: list[str], expected: dict, timeout: float = 60) -> dict:
    """/pnl/realtime rows once they match `expected` (or the last seen, at the timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        rows = {}
        for account in accounts:
            for row in pnl.get("/pnl/realtime", account=account).json()["positions"]:
                rows[(row["account"], row["symbol"])] = row
        settled = rows.keys() == expected.keys() and all(
            same_number(rows[k][f], expected[k][f]) for k in expected for f in PNL_FIELDS
        )
        if settled or time.monotonic() > deadline:
            return rows
        time.sleep(0.3)


@pytest.fixture
def accounts():
    tag = uuid.uuid4().hex[:6].upper()
    return [f"IT{tag}A", f"IT{tag}B"]


def test_fills_to_positions_and_pnl_match_the_cli_through_a_sigkill(stack, tmp_path, accounts):
    symbols = ["AAA", "BBB", "FUT"]
    marks = {"AAA": Decimal("100.25"), "BBB": Decimal("99.5"), "FUT": Decimal("101")}
    fills = random_fills(accounts, symbols, 3000, seed=7)
    ptrc = ServiceProcess("ptrc", stack, tmp_path, ptrc_config("NOPE"))
    pnl = ServiceProcess("pnl", stack, tmp_path)
    writer = questdb_writer(stack, tmp_path, ("ptrc_trades",))
    writer.start()
    ptrc.start()
    pnl.start()
    try:
        asyncio.run(publish(stack.nats_url, fills[:1500], {}))
        wait_positions(ptrc, accounts, 300)  # some applied, most still coming
        ptrc.kill()
        asyncio.run(publish(stack.nats_url, fills[1500:], marks))
        ptrc.start()
        live = wait_positions(ptrc, accounts, len(fills))
        # The quotes were published after the fills; wait until every mark is in.
        deadline = time.monotonic() + 30
        while any(r["mark"] is None for r in live.values()) and time.monotonic() < deadline:
            time.sleep(0.2)
            live = wait_positions(ptrc, accounts, len(fills))
        assert_same_positions(live, cli_positions(tmp_path, fills, marks))
        assert sum(r["fill_count"] for r in live.values()) == len(fills)  # none applied twice

        summary = ptrc.get("/pnl/summary", account=accounts[0]).json()
        [totals] = summary["by_account"]
        expected = [r for k, r in cli_positions(tmp_path, fills, marks).items() if k[0] == accounts[0]]
        assert Decimal(totals["realized_pnl_net"]) == sum(Decimal(r["realized_pnl_net"]) for r in expected)
        assert Decimal(totals["unrealized_pnl"]) == sum(Decimal(r["unrealized_pnl"]) for r in expected)

        # pnl values ptrc's positions at market: the same numbers as the CLI.
        cli = cli_positions(tmp_path, fills, marks)
        assert_same_numbers(wait_realtime(pnl, accounts, cli), cli)
        # Every fill reached QuestDB's trade blotter exactly once, through questdb_writer.
        assert asyncio.run(count_trades(stack, accounts, len(fills))) == len(fills), writer.tail()
    finally:
        ptrc.stop()
        pnl.stop()
        writer.stop()


async def count_trades(stack, accounts: list[str], expected: int) -> int:
    """Rows of `accounts` in ptrc_trades, once there are `expected` or 20 s passed."""
    async with QuestDBClient(host=stack.questdb_host, port=stack.questdb_http_port) as qdb:
        for _ in range(100):
            result = await qdb.query(f"SELECT count() FROM ptrc_trades WHERE account IN ('{accounts[0]}', '{accounts[1]}')")
            if result.scalar() >= expected:
                break
            await asyncio.sleep(0.2)
        return result.scalar()


def test_restricted_symbol_raises_a_stored_alert(stack, tmp_path, accounts):
    ptrc = ServiceProcess("ptrc", stack, tmp_path, ptrc_config("BANNED"))
    ptrc.start()
    try:
        fill = Fill(ts=time.time_ns(), fill_id=f"bad-{uuid.uuid4().hex}", account=accounts[0], symbol="BANNED",
                    side="BUY", qty=Decimal(1), price=Decimal(10))
        asyncio.run(publish(stack.nats_url, [fill], {}))
        deadline = time.monotonic() + 60
        alerts = []
        while time.monotonic() < deadline:
            alerts = ptrc.get("/compliance/alerts", account=accounts[0]).json()["alerts"]
            if alerts:
                break
            time.sleep(0.3)
        assert [a["rule"] for a in alerts] == ["restricted_symbol"], ptrc.tail()
        assert alerts[0]["fill_id"] == fill.fill_id
        assert ptrc.get("/compliance/alerts", limit="x").status_code == 400
    finally:
        ptrc.stop()


def test_bad_requests_get_json_errors(stack, tmp_path):
    ptrc = ServiceProcess("ptrc", stack, tmp_path, ptrc_config("NOPE"))
    ptrc.start()
    try:
        response = ptrc.get("/positions", method="lifo")
        assert response.status_code == 400
        assert response.json()["detail"]["parameter"] == "method"
        assert ptrc.get("/nope").status_code == 404
        metrics = ptrc.get("/metrics")
        assert "posttrade_events_total" in metrics.text
    finally:
        ptrc.stop()
