"""The books through what a real execution feed sends, on the real servers.

One random history — openings, executions out of time order, identical resends,
corrections (some naming an earlier correction, some arriving before their original)
and busts — is published in a shuffled order, with ptrc SIGKILLed while the amendments
arrive. Then ptrc's /positions and /pnl/summary, pnl's /pnl/realtime, hot_cache's
positions (hit and miss) and `posttrade positions compute` over the published order
must all equal a fresh book over the effective history (`core.history.ExecutionBook`).
"""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import time
import uuid
from decimal import Decimal, InvalidOperation
from pathlib import Path

import httpx
import nats
import redis

from posttrade.core.history import ExecutionBook
from posttrade.core.positions import PositionBook, position_row
from posttrade.streams.events import Fill, Quote, encode
from posttrade.streams.subjects import fill_subject, quote_subject

from .service_process import REPO, ServiceProcess, reference_setting

MULTIPLIERS = {"FUT": Decimal(50)}
MARKS = {"AAA": Decimal("100.25"), "FUT": Decimal("101")}
FIELDS = ("net_qty", "avg_open_price", "realized_pnl_gross", "fees", "realized_pnl_net", "mark",
          "unrealized_pnl", "fifo_realized_pnl_gross", "fifo_unrealized_pnl")  # fmt: skip
PNL_FIELDS = ("net_qty", "avg_open_price", "realized_pnl_gross", "fees", "realized_pnl_net", "mark",
              "unrealized_pnl", "fifo_realized_pnl_gross", "fifo_unrealized_pnl", "fill_count")  # fmt: skip


def feed(accounts: list[str], seed: int) -> list[Fill]:
    """The messages in publishing order (see the module doc)."""
    rng = random.Random(seed)
    t0 = time.time_ns() - 3_600_000_000_000
    keys = [(a, s) for a in accounts for s in MARKS]
    openings = [
        Fill(ts=t0, fill_id=f"open-{uuid.uuid4().hex}", account=a, symbol=s, exec_type="OPENING",
             side=rng.choice(["BUY", "SELL"]), qty=Decimal(rng.randint(1, 30)), price=Decimal(rng.randint(9000, 11000)) / 100)
        for a, s in keys[:-1]
    ]  # fmt: skip
    executions = []
    for i in range(400):
        account, symbol = rng.choice(keys)
        executions.append(Fill(
            ts=t0 + rng.randint(1, 3_000) * 1_000_000_000 + i,  # within the hour: far from time order
            fill_id=f"x-{uuid.uuid4().hex}", account=account, symbol=symbol,
            side=rng.choice(["BUY", "SELL"]), qty=Decimal(rng.randint(1, 40)),
            price=Decimal(rng.randint(9000, 11000)) / 100, fee=Decimal(rng.randint(-10, 100)) / 100,
        ))  # fmt: skip
    amendments: list[tuple[Fill, Fill]] = []  # (amendment, the message it must follow or precede)
    for i in range(60):
        target = rng.choice(executions)
        earlier = [a for a, t in amendments if t is target and a.exec_type == "CORRECT"]
        ref = rng.choice(earlier).fill_id if earlier and rng.random() < 0.5 else target.fill_id
        if i % 3 == 0:
            amendment = Fill(ts=target.ts + 1, fill_id=f"b-{uuid.uuid4().hex}", account=target.account,
                             symbol=target.symbol, exec_type="BUST", ref_fill_id=ref)  # fmt: skip
        else:
            amendment = Fill(
                ts=target.ts + 1, fill_id=f"c-{uuid.uuid4().hex}", account=target.account, symbol=target.symbol,
                exec_type="CORRECT", ref_fill_id=ref, side=rng.choice(["BUY", "SELL"]),
                qty=Decimal(rng.randint(1, 40)), price=Decimal(rng.randint(9000, 11000)) / 100,
                fee=Decimal(rng.randint(0, 50)) / 100,
            )
        amendments.append((amendment, target))
    rng.shuffle(executions)
    messages = openings[:-1] + executions
    # Amendments after their original, some before it (they wait); one opening late.
    for amendment, target in amendments:
        place = messages.index(target)
        if rng.random() < 0.15:
            messages.insert(rng.randint(len(openings), place), amendment)
        else:
            messages.insert(rng.randint(place + 1, len(messages)), amendment)
    messages.insert(len(messages) // 2, openings[-1])
    for _ in range(40):  # identical resends, anywhere after their first arrival
        original = rng.choice(messages[: len(messages) // 2])
        messages.insert(rng.randint(messages.index(original) + 1, len(messages)), original)
    return messages


def expected_rows(messages: list[Fill]) -> tuple[ExecutionBook, dict]:
    book = ExecutionBook(MULTIPLIERS)
    for seq, message in enumerate(messages, start=1):
        book.receive(message, seq)
    for symbol, mark in MARKS.items():
        book.positions.set_mark(symbol, mark)
    rows = {(p.account, p.symbol): position_row(p, book.positions.mark(p.symbol)) for p in book.positions}
    # The rule itself: a fresh book over each key's effective history gives these rows.
    fresh = PositionBook(MULTIPLIERS, marks=MARKS)
    for account, symbol in rows:
        fresh.apply_many(book.effective_history(account, symbol))
    assert {(p.account, p.symbol): position_row(p, MARKS[p.symbol]) for p in fresh} == rows
    return book, rows


async def publish(url: str, messages: list[Fill]) -> None:
    nc = await nats.connect(url)
    js = nc.jetstream()
    # No msg ids: a resend must reach the services, as a gateway replaying its log would.
    futures = [await js.publish_async(fill_subject(m.account, m.symbol), encode(m)) for m in messages]
    await asyncio.gather(*futures)
    await nc.close()


async def publish_marks(url: str) -> None:
    nc = await nats.connect(url)
    js = nc.jetstream()
    t = time.time_ns()
    for symbol, mid in MARKS.items():
        quote = Quote(ts=t, symbol=symbol, bid=mid - Decimal("0.01"), ask=mid + Decimal("0.01"))
        await js.publish(quote_subject(symbol), encode(quote))
    await nc.close()


def same(a, b) -> bool:
    """Equal as numbers when both are (`"1.50"` is `1.5`), else equal as they are."""
    try:
        return Decimal(str(a)) == Decimal(str(b))
    except InvalidOperation:  # None, a currency code, a list
        return a == b


def differences(rows: dict, expected: dict, fields) -> list:
    if rows.keys() != expected.keys():
        return [("keys", sorted(rows), sorted(expected))]
    return [(k, f, rows[k].get(f), e[f]) for k, e in expected.items() for f in fields if not same(rows[k].get(f), e[f])]


def settle(read, expected: dict, fields, what: str, timeout: float = 90) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        rows = read()
        found = differences(rows, expected, fields)
        if not found:
            return rows
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: {len(found)} differences, e.g. {found[:5]}")
        time.sleep(0.5)


def ptrc_config() -> str:
    return (REPO / "config/backend/ptrc/config.yaml").read_text() + reference_setting("instruments:\n  FUT: {multiplier: 50}\n")


def cli_rows(tmp_path: Path, messages: list[Fill]) -> dict:
    feed_file = tmp_path / "published.jsonl"
    feed_file.write_text("".join(encode(m).decode() + "\n" for m in messages))
    (tmp_path / "marks.json").write_text(json.dumps({s: str(m) for s, m in MARKS.items()}))
    (tmp_path / "multipliers.json").write_text(json.dumps({s: str(m) for s, m in MULTIPLIERS.items()}))
    out = subprocess.run(
        [sys.executable, "-m", "posttrade.cli", "positions", "compute", str(feed_file),
         "--marks", str(tmp_path / "marks.json"), "--multipliers", str(tmp_path / "multipliers.json")],
        capture_output=True, check=True, cwd=REPO,
    )  # fmt: skip
    return {(r["account"], r["symbol"]): r for r in json.loads(out.stdout)["positions"]}


def test_a_shuffled_feed_with_resends_and_amendments_through_a_sigkill(stack, tmp_path):
    tag = uuid.uuid4().hex[:6].upper()
    accounts = [f"TB{tag}A", f"TB{tag}B"]
    messages = feed(accounts, seed=12)
    book, expected = expected_rows(messages)
    assert book.duplicates >= 40 and book.positions.get(accounts[0], "AAA") is not None
    assert sum(p.corrections for p in book.positions) > 10 and sum(p.busts for p in book.positions) > 5

    ptrc = ServiceProcess("ptrc", stack, tmp_path, ptrc_config())
    pnl = ServiceProcess("pnl", stack, tmp_path)
    hot_cache = ServiceProcess("hot_cache", stack, tmp_path)
    services = [ptrc, pnl, hot_cache]

    def ptrc_rows() -> dict:
        return {
            (r["account"], r["symbol"]): r
            for account in accounts for r in ptrc.get("/positions", account=account).json()["positions"]
        }  # fmt: skip

    for service in services:
        service.start()
    try:
        asyncio.run(publish_marks(stack.nats_url))
        # The first executions, then a SIGKILL while the amendments are arriving.
        first_amendment = next(i for i, m in enumerate(messages) if m.exec_type in ("CORRECT", "BUST"))
        cut = max(first_amendment + 40, len(messages) // 2)
        asyncio.run(publish(stack.nats_url, messages[:cut]))
        deadline = time.monotonic() + 30
        while sum(r["corrections"] + r["busts"] for r in ptrc_rows().values()) == 0:  # the amendments have begun
            assert time.monotonic() < deadline, ptrc.tail()
            time.sleep(0.05)
        ptrc.kill()
        asyncio.run(publish(stack.nats_url, messages[cut:]))
        ptrc.start()

        live = settle(ptrc_rows, expected, FIELDS, "ptrc /positions")
        for key, row in live.items():
            position = book.positions.get(*key)
            assert (row["corrections"], row["busts"], row["fill_count"]) == (
                position.corrections, position.busts, position.fill_count), key

        for account in accounts:
            [totals] = ptrc.get("/pnl/summary", account=account).json()["by_account"]
            mine = [r for k, r in expected.items() if k[0] == account]
            for field in ("realized_pnl_net", "unrealized_pnl", "fees"):
                assert Decimal(totals[field]) == sum(Decimal(r[field]) for r in mine), (account, field)

        # The CLI over the published order says the same.
        assert not differences(cli_rows(tmp_path, messages), expected, FIELDS)

        # pnl values ptrc's positions at its own marks (the same quotes).
        expected_pnl = {k: {**r, "fill_count": book.positions.get(*k).fill_count} for k, r in expected.items()}

        def pnl_rows() -> dict:
            return {
                (r["account"], r["symbol"]): r
                for account in accounts for r in pnl.get("/pnl/realtime", account=account).json()["positions"]
            }  # fmt: skip

        settle(pnl_rows, expected_pnl, PNL_FIELDS, "pnl /pnl/realtime")

        # hot_cache serves ptrc's figures: from Valkey (hit), and from the stream (miss).
        cache_fields = ("net_qty", "avg_open_price", "realized_pnl_gross", "fees", "realized_pnl_net")

        def cache_rows() -> dict:
            rows = {}
            for account in accounts:
                body = httpx.get(f"{hot_cache.url}/positions/{account}", timeout=10).json()
                rows.update({(account, r["symbol"]): r for r in body["positions"]})
            return rows

        settle(cache_rows, expected, cache_fields, "hot_cache positions (live)")
        client = redis.Redis(host=stack.valkey_host, port=stack.valkey_port, db=4)
        client.delete(*[f"pt:pos:{a}" for a in accounts])
        misses = {}
        for account in accounts:
            body = httpx.get(f"{hot_cache.url}/positions/{account}", timeout=10).json()
            assert body["hit"] is False and body["source"] == "stream", body
            misses.update({(account, r["symbol"]): r for r in body["positions"]})
        assert not differences(misses, expected, cache_fields)
        revisions = {k: r["revision"] for k, r in misses.items()}
        assert revisions == {k: r["revision"] for k, r in ptrc_rows().items()}
    finally:
        for service in services:
            service.stop()
