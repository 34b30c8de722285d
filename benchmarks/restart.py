"""ptrc's restart time with 50,000 positions (issue's bound: under 5 s).

On the local stack's NATS (no servers of its own beyond ptrc):

1. ptrc runs as its own process (`posttrade worker ptrc`), uniquely named, its agents
   starting at the end of the shared streams. It is stopped and started again once
   with empty tables: the baseline (process start, imports, connections, empty tables).
2. `--positions` fills, one per (account, symbol) over `--accounts` accounts of this run
   alone (`trading.fills.RS<tag>A<n>.<symbol>`), then `--extra` (a fraction) more fills on
   randomly chosen keys, are published to the FILLS stream; ptrc applies them (its
   `positions` and `book` tables fill up) until every agent is caught up (/health lag 0)
   and /stats shows the positions.
3. ptrc is stopped (SIGTERM: it commits and flushes) and started again `--restarts`
   times. A restart is timed from just before the process is started to the first
   /health 200 (the web server starts once every table is recovered and the book rebuilt),
   and to /stats showing every position; ptrc's CPU seconds at /health 200 are recorded.
4. Where the time goes: this process then opens the same two tables from their
   changelog buckets and rebuilds an `ExecutionBook` from them, timing each step
   (what ptrc's start-up does, without the imports and the web server).

The run's consumers and buckets are forgotten at the end (`forget_apps`); the fills it
published stay in FILLS, and ptrc's PositionUpdates in POSITIONS (as with the other
benchmarks). The load average is recorded at each restart.

Writes benchmarks/results/restart.json and prints a table.

    python benchmarks/restart.py [--positions 50000] [--extra 0.1] [--accounts 100] [--restarts 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from decimal import Decimal
from pathlib import Path

import httpx
import nats

from posttrade import stack
from posttrade.agents.positions import BOOK_MARK, BookMark
from posttrade.core.history import ExecutionBook, HistoryRecord, IdRecord
from posttrade.core.positions import PositionState
from posttrade.streams.events import Fill, encode
from posttrade.streams.nats import NatsTransport, forget_apps
from posttrade.streams.subjects import fill_subject
from posttrade.tables.table import Table

from _proc_cpu import cpu_seconds  # benchmarks/_proc_cpu.py (the script's folder is on sys.path)

RESULTS = Path(__file__).parent / "results" / "restart.json"
GOAL_S = 5.0
CATCH_UP_TIMEOUT_S = 600.0
START_TIMEOUT_S = 120.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Ptrc:
    """One `posttrade worker ptrc` process of the app `name` (same name: same tables)."""

    def __init__(self, name: str, endpoints, log_dir: Path):
        self.name = name
        self.endpoints = endpoints
        self.log_dir = log_dir
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self.starts = 0

    def start(self, expected_positions: int | None = None) -> dict:
        """Start the process; returns seconds to /health 200 (and to /stats showing
        `expected_positions`), and its CPU seconds at /health 200."""
        prefix = "POSTTRADE_PTRC__"
        port = _free_port()
        env = {
            **os.environ,
            **self.endpoints.service_env(),
            f"{prefix}SERVICE__NAME": self.name,
            f"{prefix}SERVICE__PORT": str(port),
            f"{prefix}SERVICE__HOST": "127.0.0.1",
            f"{prefix}SERVICE__METRICS_PORT": str(_free_port()),
            f"{prefix}RUNTIME__START_FROM": "new",  # a new consumer begins at the end; a durable one resumes
        }
        self.starts += 1
        log = (self.log_dir / f"ptrc-{self.starts}.log").open("wb")
        self.url = f"http://127.0.0.1:{port}"
        load = os.getloadavg()[0]
        started = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "posttrade.cli", "worker", "ptrc"], env=env, stdout=log, stderr=log
        )
        result: dict = {"load_average": round(load, 2)}
        with httpx.Client(timeout=5) as client:
            deadline = started + START_TIMEOUT_S
            while "health_s" not in result:
                if time.perf_counter() > deadline or self.proc.poll() is not None:
                    self.kill()
                    raise RuntimeError(f"ptrc did not become healthy; see {self.log_dir}/ptrc-{self.starts}.log")
                try:
                    if client.get(f"{self.url}/health").status_code == 200:
                        result["health_s"] = round(time.perf_counter() - started, 3)
                        result["cpu_s_at_health"] = round(cpu_seconds(self.proc.pid), 2)
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.02)
            while True:
                positions = client.get(f"{self.url}/stats").json()["positions"]
                if expected_positions is None or positions >= expected_positions:
                    result["positions_s"] = round(time.perf_counter() - started, 3)
                    result["positions"] = positions
                    break
                if time.perf_counter() > deadline:
                    raise RuntimeError(f"ptrc shows {positions} positions, expected {expected_positions}")
                time.sleep(0.02)
        return result

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=10).json()

    def stats(self) -> dict:
        return httpx.get(f"{self.url}/stats", timeout=10).json()

    def stop(self) -> float:
        """SIGTERM (commit, flush, exit); returns the seconds it took."""
        assert self.proc is not None
        started = time.perf_counter()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None
        return round(time.perf_counter() - started, 3)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


def make_fills(tag: str, positions: int, accounts: int, extra: float, seed: int = 17) -> list[Fill]:
    """One fill per key, then `extra` x `positions` more on random keys (in time order)."""
    rng = random.Random(seed)
    per_account = -(-positions // accounts)
    keys = [(f"RS{tag}A{n:03d}", f"S{s:04d}") for n in range(accounts) for s in range(per_account)][:positions]
    chosen = keys + [rng.choice(keys) for _ in range(int(positions * extra))]
    base = time.time_ns()
    return [
        Fill(ts=base + i, fill_id=f"RS{tag}-{i}", account=account, symbol=symbol, side=rng.choice(("BUY", "SELL")),
             qty=Decimal(rng.randint(1, 500)), price=Decimal(rng.randint(1_000, 50_000)).scaleb(-2),
             fee=Decimal(rng.randint(0, 200)).scaleb(-2))
        for i, (account, symbol) in enumerate(chosen)
    ]


async def publish(url: str, fills: list[Fill]) -> float:
    """Core NATS publishes into FILLS (ptrc's stream), flushed every 1,000; returns seconds."""
    nc = await nats.connect(url, pending_size=64 * 1024 * 1024)
    started = time.perf_counter()
    try:
        for i, fill in enumerate(fills, 1):
            await nc.publish(fill_subject(fill.account, fill.symbol), encode(fill))
            if i % 1_000 == 0:
                await nc.flush()
        await nc.flush()
    finally:
        await nc.close()
    return time.perf_counter() - started


def wait_caught_up(ptrc: Ptrc, positions: int, fills: int) -> dict:
    """Until every agent's lag is 0 and /stats shows `positions` and `fills` messages."""
    started = time.perf_counter()
    while True:
        checks = ptrc.health()["checks"]
        lags = {name: c.get("lag", 0) for name, c in checks.items() if name.startswith("agent:")}
        stats = ptrc.stats()
        seen = sum(stats["fills"].values())
        if not any(lags.values()) and stats["positions"] >= positions and seen >= fills:
            return {"catch_up_s": round(time.perf_counter() - started, 1), "positions": stats["positions"],
                    "fill_messages": seen, "outcomes": stats["fills"]}
        if time.perf_counter() - started > CATCH_UP_TIMEOUT_S:
            raise RuntimeError(f"ptrc not caught up after {CATCH_UP_TIMEOUT_S} s: lags {lags}, {stats}")
        time.sleep(0.5)


async def recovery_steps(url: str, app_name: str) -> dict:
    """ptrc's recovery in this process, step by step: each table read back from its
    changelog bucket, then the book rebuilt from them (seconds)."""
    transport = NatsTransport(url, name="posttrade-restart-bench")
    await transport.connect()
    steps: dict = {}
    try:
        tables: dict[str, Table] = {
            "positions": Table("positions", bucket=f"{app_name}-positions", value_type=PositionState,
                               key_type=tuple[str, str]),
            "book": Table("book", bucket=f"{app_name}-book", value_type=IdRecord | HistoryRecord | BookMark,
                          key_type=str | tuple[str, str], atomic=True),
        }
        for name, table in tables.items():
            started = time.perf_counter()
            await table.open(transport)
            steps[f"open_{name}_s"] = round(time.perf_counter() - started, 3)
            steps[f"{name}_keys"] = len(table)
        book = ExecutionBook()
        started = time.perf_counter()
        records = tables["book"]
        book.restore(
            [r for r in records.values() if isinstance(r, HistoryRecord)],
            {k: r for k, r in records.items() if isinstance(r, IdRecord)},
            tables["positions"].values(),  # type: ignore[arg-type]
            records[BOOK_MARK].received_through if BOOK_MARK in records else 0,
        )
        steps["restore_book_s"] = round(time.perf_counter() - started, 3)
    finally:
        await transport.close()
    return steps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--positions", type=int, default=50_000)
    parser.add_argument("--extra", type=float, default=0.1, help="more fills, as a fraction of --positions")
    parser.add_argument("--accounts", type=int, default=100)
    parser.add_argument("--restarts", type=int, default=3)
    args = parser.parse_args()
    endpoints = stack.endpoints()
    tag = uuid.uuid4().hex[:6].upper()
    name = f"ptrc_restart_{tag.lower()}"
    result: dict = {"positions": args.positions, "goal_restart_s": GOAL_S, "load_average_start": round(os.getloadavg()[0], 2)}
    with tempfile.TemporaryDirectory() as logs:
        ptrc = Ptrc(name, endpoints, Path(logs))
        try:
            result["first_start"] = ptrc.start()
            ptrc.stop()
            result["empty_restart"] = ptrc.start()  # the baseline: same app, empty tables
            fills = make_fills(tag, args.positions, args.accounts, args.extra)
            result["fills"] = len(fills)
            result["publish_s"] = round(asyncio.run(publish(endpoints.nats_url, fills)), 1)
            result["loaded"] = wait_caught_up(ptrc, args.positions, len(fills))
            expected = result["loaded"]["positions"]  # more than --positions if others publish fills meanwhile
            result["stop_s"] = [ptrc.stop()]
            restarts = []
            for _ in range(args.restarts):
                restarts.append(ptrc.start(expected))
                result["stop_s"].append(ptrc.stop())
            result["restarts"] = restarts
            result["restart_s_median"] = statistics.median(r["health_s"] for r in restarts)
            result["restart_positions_s_median"] = statistics.median(r["positions_s"] for r in restarts)
            result["restart_cpu_s_median"] = statistics.median(r["cpu_s_at_health"] for r in restarts)
            result["recovery_steps"] = asyncio.run(recovery_steps(endpoints.nats_url, name))
        finally:
            ptrc.kill()
            asyncio.run(forget_apps(endpoints.nats_url, [name]))
    result["load_average_end"] = round(os.getloadavg()[0], 2)

    print(f"ptrc {name}: {result['fills']:,} fills -> {result['loaded']['positions']:,} positions "
          f"(published in {result['publish_s']} s, applied and caught up {result['loaded']['catch_up_s']} s later)")
    print(f"{'start':<30}{'to /health 200 s':>18}{'positions shown s':>19}{'CPU s':>8}{'load':>7}")
    rows = [("first start (empty)", result["first_start"]), ("restart, empty tables", result["empty_restart"])]
    rows += [(f"restart {i}, {expected:,} positions", r) for i, r in enumerate(result["restarts"], 1)]
    for label, r in rows:
        print(f"{label:<30}{r['health_s']:>18}{r['positions_s']:>19}{r['cpu_s_at_health']:>8}{r['load_average']:>7}")
    steps = result["recovery_steps"]
    print(f"restart median {result['restart_s_median']} s (goal < {GOAL_S} s); "
          f"CPU {result['restart_cpu_s_median']} s; stop {result['stop_s']} s")
    print("recovery in this process: " + ", ".join(
        f"open {t} {steps[f'open_{t}_s']} s ({steps[f'{t}_keys']:,} keys)" for t in ("positions", "book")
    ) + f", restore the book {steps['restore_book_s']} s")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {RESULTS}")


if __name__ == "__main__":
    main()
