"""Report generation for a day of 1,000,000 trades: how long `POST /reports` takes.

Runs against the QuestDB of the local stack (the env of `posttrade stack env`), on
tables of its own (unique names, dropped at the end unless --keep), with ptrc's
reports service (`install_reports`) serving HTTP on a local port:

1. position snapshots as ptrc stores them — one per fill plus the two day rolls of
   every position — into `<bench>_snapshots`, and `--alerts` compliance alerts into an
   embedded ClickHouse (a temporary chdb path); not timed;
2. the day's fills into `<bench>_trades` (ptrc_trades' schema), then **the spool
   through the day**: the service's spool step (`spool_step(now)`, its timer's work)
   runs every `--spool-step-s` of the day on a simulated clock, as if it were that
   time plus the settle time, so it checks and exports exactly the cells that had ended
   by then. Its cost — wall, CPU of this process, CPU of QuestDB less the shared
   server's idle rate — is the *background* cost, reported per trade. (The fills are
   stored first: QuestDB's CPU in those windows is then the spool's queries, not its
   housekeeping of fresh writes.) The last `--tail-s` of the day is never spooled: a
   generation during the day finds the latest minutes not yet exported (the current
   cell, plus up to one timer interval);
3. `--quiet-runs` generations with nothing new but the unspooled tail, then `--runs`
   generations each after `--late` late fills were stored at random times of the day
   (cells the spool already holds: they must be exported again). Each is
   `POST /reports {"date": DAY}` over HTTP, timed by the client from request to
   response: all four reports, CSV and Parquet, into a local object store (a
   temporary directory: what ptrc uses without an S3 endpoint);
4. one *cold* generation with the spool emptied (what a generation costs when nothing
   was kept: a restart on a fresh disk, or a day older than the spool keeps). Its
   blotter files must equal the last warm run's byte for byte (CSV) and row for row
   (Parquet) — checked.

`report_seconds` is the median client-side wall time of the runs with late fills (the
harder case); `report_seconds_without_late_fills` that of the quiet runs. Also recorded:
each step's median (`steps`; they overlap), where the blotter's rows came from, the CPU
seconds this process and QuestDB's process used (from /proc, when the stack's pid file
is there: other users of the shared QuestDB add to it), and the machine's load average
before and after each run — on a shared 2-core machine the wall time is mostly a matter
of how much CPU the run got.

Writes benchmarks/results/reports.json and prints a table.

    python benchmarks/reports.py [--trades 1000000] [--runs 3] [--late 10] [--keep]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import socket
import statistics
import sys
import tempfile
import time
import uuid
from datetime import date, datetime, timezone
from decimal import Decimal
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from posttrade import stack
from posttrade.agents.reports import ReportsSection, install_reports
from posttrade.app import App
from posttrade.core.positions import PositionState
from posttrade.core.reports import NS, TradingDay
from posttrade.stores.clickhouse import open_clickhouse
from posttrade.stores.objects import LocalObjectStore
from posttrade.stores.questdb import QuestDBClient, QuestDBWriter
from posttrade.streams.memory import MemoryTransport
from posttrade.web.server import WebServer, build_web_app

from _proc_cpu import cpu_seconds  # benchmarks/_proc_cpu.py (the script's folder is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "reports.json"
GOAL_S = 2.0
FLOOR_S = 5.0
DAY = date(2026, 11, 20)
DEC = "DECIMAL(38, 12)"
TRADES_COLUMNS = {
    "ts": "TIMESTAMP_NS", "fill_id": "VARCHAR", "account": "SYMBOL", "symbol": "SYMBOL", "side": "SYMBOL",
    "qty": DEC, "price": DEC, "fee": DEC, "realized_pnl_fill": DEC, "order_id": "VARCHAR", "venue": "SYMBOL",
    "net_qty_after": DEC,
}
SNAPSHOT_COLUMNS = {
    "ts": "TIMESTAMP_NS", "account": "SYMBOL", "symbol": "SYMBOL", "reason": "SYMBOL", "net_qty": DEC,
    "avg_open_price": DEC, "realized_pnl_gross": DEC, "fees": DEC, "realized_pnl_net": DEC, "mark": DEC,
    "unrealized_pnl": DEC, "day_pnl": DEC,
}
ALERTS_DDL = """
CREATE TABLE IF NOT EXISTS bench.compliance_alerts (
    alert_id String, ts DateTime64(9, 'UTC'), rule String, severity String, account String, symbol String,
    message String, observed String, `limit` String
) ENGINE = ReplacingMergeTree ORDER BY alert_id
"""
LOAD_BATCH = 200_000
TRADE_SYMBOLS = ("account", "symbol", "side", "venue")


def decimals(rng: np.random.Generator, n: int, low: int, high: int, places: int, pool: int = 4096) -> np.ndarray:
    """n Decimals with `places` decimal places, drawn from a pool (building millions of
    distinct Decimal objects would dominate the load)."""
    values = np.array([Decimal(int(v)).scaleb(-places) for v in rng.integers(low, high, pool)], dtype=object)
    return values[rng.integers(0, pool, n)]


def trades_frame(rng, ts: np.ndarray, index: np.ndarray, accounts: int, symbols: int, prefix: str = "F"):
    n = len(index)
    return pd.DataFrame({
        "ts": ts,
        "fill_id": [f"{prefix}{i:010d}" for i in index],
        "account": pd.Categorical([f"ACC{i:03d}" for i in (index // 7) % accounts]),
        "symbol": pd.Categorical([f"SYM{i:04d}" for i in index % symbols]),
        "side": pd.Categorical(np.where(rng.integers(0, 2, n) == 1, "BUY", "SELL")),
        "qty": decimals(rng, n, 1, 5_000, 0),
        "price": decimals(rng, n, 100_000, 50_000_000, 4),
        "fee": decimals(rng, n, -50, 500, 2),
        "realized_pnl_fill": decimals(rng, n, -1_000_000, 1_000_000, 2),
        "order_id": [f"O{i // 3:010d}" for i in index],
        "venue": pd.Categorical(np.array(["XNAS", "XNYS", "ARCX", "BATS"])[rng.integers(0, 4, n)]),
        "net_qty_after": decimals(rng, n, -20_000, 20_000, 0),
    })


def snapshots_frame(rng, ts: np.ndarray, accounts, symbols, reason: str) -> pd.DataFrame:
    n = len(ts)
    return pd.DataFrame({
        "ts": ts,
        "account": pd.Categorical(accounts),
        "symbol": pd.Categorical(symbols),
        "reason": pd.Categorical([reason] * n),
        "net_qty": decimals(rng, n, -20_000, 20_000, 0),
        "avg_open_price": decimals(rng, n, 100_000, 50_000_000, 4),
        "realized_pnl_gross": decimals(rng, n, -10_000_000, 10_000_000, 2),
        "fees": decimals(rng, n, 0, 100_000, 2),
        "realized_pnl_net": decimals(rng, n, -10_000_000, 10_000_000, 2),
        "mark": decimals(rng, n, 100_000, 50_000_000, 4),
        "unrealized_pnl": decimals(rng, n, -10_000_000, 10_000_000, 2),
        "day_pnl": decimals(rng, n, -10_000_000, 10_000_000, 2),
    })


def fill_times(args) -> tuple[int, int, int]:
    """(day start, day end, spacing): fill i happens at start + i * spacing."""
    start, end = TradingDay().window_ns(DAY)
    return start, end, (end - start) // args.trades


async def load_snapshots(questdb, writer, snapshots, args) -> dict:
    """One snapshot per fill and the two day rolls of every position (not timed)."""
    rng = np.random.default_rng(11)
    start, end, spacing = fill_times(args)
    await questdb.create_table(snapshots, SNAPSHOT_COLUMNS, dedup_keys=("ts", "account", "symbol", "reason"))
    rows = 0
    if args.snapshots:
        for first in range(0, args.trades, LOAD_BATCH):
            index = np.arange(first, min(first + LOAD_BATCH, args.trades))
            snaps = snapshots_frame(rng, start + index * spacing, [f"ACC{i:03d}" for i in (index // 7) % args.accounts],
                                    [f"SYM{i:04d}" for i in index % args.symbols], "fill")
            await writer.write_batch(snapshots, snaps, symbols=("account", "symbol", "reason"))
            rows += len(index)
    keys = sorted({(f"ACC{(i // 7) % args.accounts:03d}", f"SYM{i % args.symbols:04d}")
                   for i in range(min(args.trades, 7 * args.accounts * args.symbols))})
    for roll_at in (start + 1_000_000, end + 1_000_000):
        ts = np.full(len(keys), roll_at, dtype=np.int64) + np.arange(len(keys))
        rolls = snapshots_frame(rng, ts, [k[0] for k in keys], [k[1] for k in keys], "roll")
        await writer.write_batch(snapshots, rolls, symbols=("account", "symbol", "reason"))
        rows += len(keys)
    await questdb.wait_visible(snapshots, rows, timeout=600)
    return {"snapshots": rows, "positions": len(keys)}


def questdb_cpu_reader(endpoints):
    """A function giving QuestDB's process CPU seconds so far (None when unknown)."""
    pid_file = endpoints.home / "run" / "questdb.pid"
    try:
        pid = int(pid_file.read_text().split()[0])
    except (OSError, ValueError):
        return lambda: None

    def read() -> float | None:
        try:
            return cpu_seconds(pid)
        except OSError:
            return None

    return read


def cpu_delta(before, after) -> float | None:
    return None if before is None or after is None else round(after - before, 3)


async def idle_rate(questdb_cpu, seconds: float) -> float | None:
    """QuestDB's CPU seconds per second while this benchmark asks nothing of it: what
    the shared server's other users (and its own housekeeping) add to every figure."""
    before, began = questdb_cpu(), time.perf_counter()
    await asyncio.sleep(seconds)
    used = cpu_delta(before, questdb_cpu())
    return None if used is None else used / (time.perf_counter() - began)


async def load_trades(questdb, writer, trades, args) -> int:
    """The day's fills into `trades` (ptrc_trades' schema), in time order (not timed)."""
    rng = np.random.default_rng(7)
    start, _, spacing = fill_times(args)
    await questdb.create_table(trades, TRADES_COLUMNS, dedup_keys=("ts", "fill_id"))
    for first in range(0, args.trades, LOAD_BATCH):
        index = np.arange(first, min(first + LOAD_BATCH, args.trades))
        frame = trades_frame(rng, start + index * spacing, index, args.accounts, args.symbols)
        await writer.write_batch(trades, frame, symbols=TRADE_SYMBOLS)
    await questdb.wait_visible(trades, args.trades, timeout=600)
    return args.trades


async def spool_through_the_day(service, args, questdb_cpu, noise: float | None) -> dict:
    """The spool timer's runs through the day, on a simulated clock.

    Every `--spool-step-s` of the day the step runs as if it were that time (plus the
    settle time): it checks and exports exactly the cells that had ended by then — the
    same queries, over the same rows, as during the live day. The fills are already in
    QuestDB, so QuestDB's CPU in these windows is the spool's alone (less the shared
    server's idle rate, measured separately), not its housekeeping of fresh writes.
    """
    start, end, spacing = fill_times(args)
    step_ns = int(args.spool_step_s * NS)
    settle_ns = int(service.settings.spool_settle_s * NS)
    spool_until = end - int(args.tail_s * NS)  # the day's last minutes stay for the generation
    steps = []
    for at in range(start + step_ns, spool_until + 1, step_ns):
        now = datetime.fromtimestamp((at + settle_ns) / NS, timezone.utc)
        cpu, qdb, wall = time.process_time(), questdb_cpu(), time.perf_counter()
        done = await service.spool_step(now)
        steps.append({"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu,
                      "questdb_cpu": cpu_delta(qdb, questdb_cpu()), **done})
    spooled = sum(s["rows_exported"] for s in steps)
    cpu = sum(s["cpu"] for s in steps)
    wall = sum(s["wall"] for s in steps)
    qdb_cpus = [s["questdb_cpu"] for s in steps]
    raw = None if any(c is None for c in qdb_cpus) else sum(qdb_cpus)
    less_idle = None if raw is None or noise is None else max(0.0, raw - noise * wall)
    return {
        "spool_steps": len(steps),
        "step_every_s_of_the_day": args.spool_step_s,
        "trades_spooled": spooled,
        "trades_not_spooled_at_generation": args.trades - spooled,
        "wall_seconds_total": round(wall, 3),
        "wall_seconds_per_step_max": round(max(s["wall"] for s in steps), 3),
        "cpu_seconds_this_process": round(cpu, 3),
        "cpu_seconds_questdb_raw": None if raw is None else round(raw, 3),
        "cpu_seconds_questdb_less_idle": None if less_idle is None else round(less_idle, 3),
        "cpu_us_per_trade_this_process": round(cpu / spooled * 1e6, 2),
        "cpu_us_per_trade_questdb_less_idle": None if less_idle is None else round(less_idle / spooled * 1e6, 2),
        "exports": sum(s["exports"] for s in steps),
        "cells_checked": sum(s["cells_checked"] for s in steps),
    }


async def store_late_fills(questdb, writer, trades, args, run: int, stored: int) -> int:
    """`--late` fills at random times of the day (before the unspooled tail), stored now."""
    if not args.late:
        return stored
    rng = np.random.default_rng(100 + run)
    start, end, _ = fill_times(args)
    ts = np.sort(rng.integers(start, end - int(args.tail_s * NS), args.late))
    frame = trades_frame(rng, ts, np.arange(args.late) + run * args.late, args.accounts, args.symbols, prefix="L")
    await writer.write_batch(trades, frame, symbols=TRADE_SYMBOLS)
    await questdb.wait_visible(trades, stored + args.late, timeout=600)
    return stored + args.late


async def post_reports(client: httpx.AsyncClient, questdb_cpu, objects: Path) -> dict:
    load_before = os.getloadavg()[0]
    cpu, qdb = time.process_time(), questdb_cpu()
    began = time.perf_counter()
    response = await client.post("/reports", json={"date": DAY.isoformat()})
    seconds = time.perf_counter() - began
    cpu_used = time.process_time() - cpu
    if response.status_code != 201:
        raise RuntimeError(f"POST /reports answered {response.status_code}: {response.text}")
    body = response.json()
    return {
        "seconds": round(seconds, 3),
        "generation_seconds": round(body["generation_seconds"], 3),
        "steps": {k: round(v, 3) for k, v in body["steps"].items()},
        "trade_blotter": body.get("trade_blotter"),
        "cpu_seconds_this_process": round(cpu_used, 3),
        "cpu_seconds_questdb": cpu_delta(qdb, questdb_cpu()),
        "load_average_1m_before": round(load_before, 2),
        "load_average_1m_after": round(os.getloadavg()[0], 2),
        "files": {r["name"]: {"rows": r["rows"], "bytes": r["size"]} for r in body["reports"]},
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trades", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--late", type=int, default=10, help="late fills stored before each generation")
    parser.add_argument("--quiet-runs", type=int, default=2,
                        help="generations first, with no late fill (only the unspooled tail to export)")
    parser.add_argument("--alerts", type=int, default=1_000)
    parser.add_argument("--accounts", type=int, default=20)
    parser.add_argument("--symbols", type=int, default=500)
    parser.add_argument("--spool-step-s", type=float, default=ReportsSection().spool_interval_s,
                        help="seconds of the day between spool steps (the timer's interval)")
    parser.add_argument("--tail-s", type=float, default=ReportsSection().spool_cell_s + ReportsSection().spool_interval_s,
                        help="the day's last seconds not spooled when the generations run")
    parser.add_argument("--no-snapshots", dest="snapshots", action="store_false",
                        help="do not store a snapshot per fill (rolls only)")
    parser.add_argument("--no-cold", dest="cold", action="store_false", help="skip the run with an empty spool")
    parser.add_argument("--idle-probe-s", type=float, default=10.0,
                        help="seconds QuestDB's CPU is sampled while idle (before and after), to subtract its noise")
    parser.add_argument("--keep", action="store_true", help="keep the QuestDB tables")
    args = parser.parse_args()

    endpoints = stack.endpoints()
    suffix = uuid.uuid4().hex[:8]
    trades, snapshots = f"bench_reports_{suffix}_trades", f"bench_reports_{suffix}_snapshots"
    questdb = QuestDBClient(host=endpoints.questdb_host, port=endpoints.questdb_http_port, timeout=300)
    writer = QuestDBWriter(host=endpoints.questdb_host, port=endpoints.questdb_http_port)
    workdir = Path(tempfile.mkdtemp(prefix="bench-reports-"))
    clickhouse = await asyncio.to_thread(open_clickhouse, f"chdb://{workdir / 'chdb'}")
    questdb_cpu = questdb_cpu_reader(endpoints)
    settings = ReportsSection(trades_table=trades, snapshots_table=snapshots, alerts_table="bench.compliance_alerts",
                              daily_delay_s=None, spool_dir=str(workdir / "spool"))
    server = None
    try:
        print(f"storing snapshots and alerts for {args.trades:,} trades ...", file=sys.stderr)
        setup = await load_snapshots(questdb, writer, snapshots, args)
        await clickhouse.command("CREATE DATABASE IF NOT EXISTS bench")
        await clickhouse.command(ALERTS_DDL)
        start, end, _ = fill_times(args)
        step = (end - start) // max(args.alerts, 1)
        await clickhouse.insert(
            "bench.compliance_alerts",
            [[f"alert-{i}", start + i * step, "max_position", "warning", f"ACC{i % args.accounts:03d}",
              f"SYM{i % args.symbols:04d}", f"position over the limit ({i})", str(100 + i), "100"]
             for i in range(args.alerts)],
            column_names=["alert_id", "ts", "rule", "severity", "account", "symbol", "message", "observed", "limit"],
        )

        app = App("bench", MemoryTransport())
        positions = app.table("positions", value_type=PositionState, key_type=tuple[str, str])
        objects = workdir / "objects"
        service = install_reports(
            app, positions=positions, mark_of=lambda symbol: None, multipliers={},
            object_store=LocalObjectStore(objects), questdb=questdb, clickhouse=clickhouse, settings=settings,
        )
        app.timers.clear()  # the benchmark runs the spool steps itself, on the simulated clock
        runs = []
        async with app:
            print(f"storing {args.trades:,} trades ...", file=sys.stderr)
            stored = await load_trades(questdb, writer, trades, args)
            idle_before = await idle_rate(questdb_cpu, args.idle_probe_s)
            print(f"the spool through the day, every {args.spool_step_s:g} s ...", file=sys.stderr)
            background = await spool_through_the_day(service, args, questdb_cpu, idle_before)
            port = free_port()
            server = WebServer(build_web_app(app), "127.0.0.1", port)
            serving = asyncio.create_task(server.serve())
            while not server.started:
                await asyncio.sleep(0.01)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=600) as client:
                quiet_runs = []
                for run in range(args.quiet_runs):
                    result = await post_reports(client, questdb_cpu, objects)
                    quiet_runs.append(result)
                    print(f"run without late fills {run + 1}: {result['seconds']:.2f} s "
                          f"(load {result['load_average_1m_before']:.1f})", file=sys.stderr)
                for run in range(args.runs):
                    stored = await store_late_fills(questdb, writer, trades, args, run, stored)
                    result = await post_reports(client, questdb_cpu, objects)
                    runs.append(result)
                    print(f"run {run + 1}: {result['seconds']:.2f} s (load {result['load_average_1m_before']:.1f})",
                          file=sys.stderr)
                cold = None
                if args.cold:
                    warm_csv = (objects / "reports" / DAY.isoformat() / "trade_blotter.csv").read_bytes()
                    warm_parquet = pq.read_table(objects / "reports" / DAY.isoformat() / "trade_blotter.parquet")
                    shutil.rmtree(service.spool.root, ignore_errors=True)
                    cold = await post_reports(client, questdb_cpu, objects)
                    cold_csv = (objects / "reports" / DAY.isoformat() / "trade_blotter.csv").read_bytes()
                    cold_parquet = pq.read_table(objects / "reports" / DAY.isoformat() / "trade_blotter.parquet")
                    cold["blotter_equals_the_warm_runs"] = warm_csv == cold_csv and warm_parquet.equals(cold_parquet)
                    if not cold["blotter_equals_the_warm_runs"]:
                        raise RuntimeError("the blotter generated from the spool differs from a full export")
                    print(f"cold: {cold['seconds']:.2f} s (load {cold['load_average_1m_before']:.1f})", file=sys.stderr)
            server.should_exit = True
            await serving
            idle_after = await idle_rate(questdb_cpu, args.idle_probe_s)
    finally:
        if not args.keep:
            for table in (trades, snapshots):
                await questdb.execute(f"DROP TABLE IF EXISTS {table}")
        await writer.close()
        await questdb.close()
        await clickhouse.close()
        shutil.rmtree(workdir, ignore_errors=True)

    rates = [r for r in (idle_before, idle_after) if r is not None]
    noise = statistics.mean(rates) if rates else None
    bg = background
    for r in [*quiet_runs, *runs, *([cold] if cold else [])]:
        if r["cpu_seconds_questdb"] is not None and noise is not None:
            r["cpu_seconds_questdb_less_idle"] = round(max(0.0, r["cpu_seconds_questdb"] - noise * r["seconds"]), 3)
    seconds = [r["seconds"] for r in runs]
    report_seconds = statistics.median(seconds)
    step_names = sorted({name for r in runs for name in r["steps"]})
    steps = {name: round(statistics.median(r["steps"].get(name, 0.0) for r in runs), 3) for name in step_names}
    qdb = [r["cpu_seconds_questdb"] for r in runs]
    result = {
        "benchmark": "reports",
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "setup": {
            "trades": args.trades, **setup, "alerts": args.alerts, "day": DAY.isoformat(),
            "late_fills_per_run": args.late, "spool_cell_s": settings.spool_cell_s,
            "spool_step_every_s": args.spool_step_s, "unspooled_tail_s": args.tail_s,
            "export_parallelism": settings.export_parallelism, "export_chunk_rows": settings.export_chunk_rows,
            "object_store": "local directory",
        },
        "report_seconds": report_seconds,
        "report_seconds_min": min(seconds),
        "report_seconds_max": max(seconds),
        "goal_seconds": GOAL_S,
        "floor_seconds": FLOOR_S,
        "meets_goal": report_seconds < GOAL_S,
        "meets_floor": report_seconds < FLOOR_S,
        "load_average_1m_before_runs": [r["load_average_1m_before"] for r in runs],
        "report_seconds_without_late_fills": statistics.median(r["seconds"] for r in quiet_runs) if quiet_runs else None,
        "runs_without_late_fills": quiet_runs,
        "steps_median": steps,
        "cpu_seconds_this_process_median": statistics.median(r["cpu_seconds_this_process"] for r in runs),
        "cpu_seconds_questdb_median": None if any(c is None for c in qdb) else statistics.median(qdb),
        "cpu_seconds_questdb_less_idle_median": None if any("cpu_seconds_questdb_less_idle" not in r for r in runs)
        else statistics.median(r["cpu_seconds_questdb_less_idle"] for r in runs),
        "questdb_idle_cpu_per_s": None if noise is None else round(noise, 3),
        "background": background,
        "cold": cold,
        "runs": runs,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")

    files = runs[-1]["files"]
    print(f"\nreport generation, one day of {args.trades:,} trades ({args.runs} runs of POST /reports, "
          f"{args.late} late fills before each; goal < {GOAL_S} s, floor < {FLOOR_S} s)")
    print(f"{'report_seconds (median)':<44}{report_seconds:>10.2f}")
    print(f"{'report_seconds (best, worst)':<44}{min(seconds):>10.2f}{max(seconds):>8.2f}")
    if quiet_runs:
        print(f"{'report_seconds without late fills (median)':<44}{result['report_seconds_without_late_fills']:>10.2f}"
              f"  (load {', '.join(str(r['load_average_1m_before']) for r in quiet_runs)})")
    print(f"{'cpu s per generation, this process (median)':<44}{result['cpu_seconds_this_process_median']:>10.2f}")
    if result["cpu_seconds_questdb_median"] is not None:
        print(f"{'cpu s per generation, QuestDB (median)':<44}{result['cpu_seconds_questdb_median']:>10.2f}"
              f"  ({result['cpu_seconds_questdb_less_idle_median']} less its idle rate {noise:.2f}/s)")
    print(f"{'load average before the runs':<44}{', '.join(str(x) for x in result['load_average_1m_before_runs']):>10}")
    if cold is not None:
        print(f"{'cold generation (empty spool)':<44}{cold['seconds']:>10.2f}  (load {cold['load_average_1m_before']})")
    print(f"background spool: {bg['spool_steps']} steps, {bg['cpu_us_per_trade_this_process']} µs CPU/trade here"
          + (f", {bg['cpu_us_per_trade_questdb_less_idle']} µs CPU/trade in QuestDB (less its idle rate)"
             if bg["cpu_us_per_trade_questdb_less_idle"] is not None else "")
          + f"; longest step {bg['wall_seconds_per_step_max']} s")
    print("steps (median s; they overlap):")
    for name, value in steps.items():
        print(f"  {name:<42}{value:>10.3f}")
    print(f"blotter (last run): {runs[-1]['trade_blotter']}")
    print("files:")
    for name, info in sorted(files.items()):
        print(f"  {name:<42}{info['rows']:>10,} rows {info['bytes']:>13,} bytes")
    print(f"\nwrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    asyncio.run(main())
