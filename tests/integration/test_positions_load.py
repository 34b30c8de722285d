"""`posttrade positions load` against the real NATS: the openings land on the FILLS
stream, on the subjects the services read, and loading again adds nothing."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from pathlib import Path

import nats
import nats.errors

from posttrade.app import App
from posttrade.core.history import ExecutionBook
from posttrade.streams import subjects
from posttrade.streams.events import Fill, decode, subject_token
from posttrade.streams.memory import MemoryTransport

ROOT = Path(__file__).resolve().parents[2]
AS_OF = "2025-01-31T22:00:00Z"


def fills_stream() -> str:
    """The stream the services declare for fills (posttrade.streams.subjects)."""
    stream = subjects.fills(App("it_positions_load", MemoryTransport())).stream
    assert stream.subjects == ("trading.fills.>",)
    return stream.name


def posttrade(*argv: str, nats_url: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "POSTTRADE__NATS__URL": nats_url}
    return subprocess.run(
        [sys.executable, "-m", "posttrade.cli", "positions", *argv], capture_output=True, text=True, cwd=ROOT,
        env=env, timeout=60,
    )


async def read_back(url: str, stream: str, account: str) -> list:
    """Every message of the account's fill subjects, from the start of the stream."""
    nc = await nats.connect(url, connect_timeout=5, max_reconnect_attempts=1)
    try:
        js = nc.jetstream()
        sub = await js.subscribe(f"trading.fills.{subject_token(account)}.>", stream=stream, ordered_consumer=True)
        messages = []
        while True:
            try:
                messages.append(await sub.next_msg(timeout=1))
            except nats.errors.TimeoutError:
                break
        await sub.unsubscribe()
        return messages
    finally:
        await nc.close()


async def purge(url: str, stream: str, account: str) -> None:
    nc = await nats.connect(url, connect_timeout=5, max_reconnect_attempts=1)
    try:
        await nc.jetstream().purge_stream(stream, subject=f"trading.fills.{subject_token(account)}.>")
    finally:
        await nc.close()


def test_load_publishes_openings_and_a_reload_adds_nothing(stack, tmp_path):
    stream = fills_stream()
    account = f"IT-LOAD-{uuid.uuid4().hex[:8]}"
    other = f"{account}.B"  # a dot: its subject token is escaped
    statement = tmp_path / "statement.csv"
    statement.write_text(
        "account,symbol,net_qty,avg_open_price,currency\n"
        f"{account},ESZ5,3,4500.25,USD\n"
        f"{account},BRK.B,-10,410.5,USD\n"
        f"{account},FLAT,0,,USD\n"
        f"{account},ESZ5,3,4500.25,USD\n"  # a second, identical lot
        f"{other},XYZ,7,12,USD\n"
    )
    dry = posttrade("load", str(statement), "--as-of", AS_OF, "--dry-run", nats_url=stack.nats_url)
    assert dry.returncode == 0, dry.stderr
    expected = [decode(Fill, line.encode()) for line in dry.stdout.splitlines()]
    assert len(expected) == 4 and len({f.fill_id for f in expected}) == 4
    try:
        first = posttrade("load", str(statement), "--as-of", AS_OF, nats_url=stack.nats_url)
        assert first.returncode == 0, first.stderr
        assert "published 4 opening(s)" in first.stdout and "already on the bus" not in first.stdout
        assert "1 zero row(s) skipped (line 4)" in first.stdout and "ignored columns: currency" in first.stdout

        messages = asyncio.run(read_back(stack.nats_url, stream, account))
        messages += asyncio.run(read_back(stack.nats_url, stream, other))
        assert [m.subject for m in messages] == [
            f"trading.fills.{account}.ESZ5",
            f"trading.fills.{account}.BRK%2EB",
            f"trading.fills.{account}.ESZ5",
            f"trading.fills.{subject_token(other)}.XYZ",
        ]
        received = [decode(Fill, m.data) for m in messages]
        assert received == expected  # the dry run shows exactly what is published
        assert [m.headers["Nats-Msg-Id"] for m in messages] == [f.fill_id for f in expected]
        assert all(f.exec_type == "OPENING" and f.fee == 0 for f in received)
        assert [(f.side, str(f.qty), str(f.price)) for f in received] == [
            ("BUY", "3", "4500.25"), ("SELL", "10", "410.5"), ("BUY", "3", "4500.25"), ("BUY", "7", "12"),
        ]

        # Again: the same ids, so JetStream drops every message (within its duplicate window).
        second = posttrade("load", str(statement), "--as-of", AS_OF, nats_url=stack.nats_url)
        assert second.returncode == 0, second.stderr
        assert "published 0 opening(s)" in second.stdout and "4 already on the bus" in second.stdout
        again = asyncio.run(read_back(stack.nats_url, stream, account))
        again += asyncio.run(read_back(stack.nats_url, stream, other))
        assert [(m.subject, m.data) for m in again] == [(m.subject, m.data) for m in messages]

        # After the window JetStream would store a reload; the history drops it as duplicates.
        book = ExecutionBook()
        for seq, fill in enumerate(received + received, start=1):
            book.receive(fill, seq)
        assert book.duplicates == 4
        rows = {(row["account"], row["symbol"]): row for row in book.positions.rows()}
        assert {key: (row["net_qty"], row["avg_open_price"]) for key, row in rows.items()} == {
            (account, "ESZ5"): ("6", "4500.25"),
            (account, "BRK.B"): ("-10", "410.5"),
            (other, "XYZ"): ("7", "12"),
        }
    finally:
        asyncio.run(purge(stack.nats_url, stream, account))
        asyncio.run(purge(stack.nats_url, stream, other))
