"""Report generation for a day of 1,000,000 trades: how long `POST /reports` takes.

Runs against the QuestDB of the local stack (the env of `posttrade stack env`), on
tables of its own (unique names, dropped at the end unless --keep):

1. load a day of `--trades` fills into `<bench>_trades` (ptrc_trades' schema) and, as
   ptrc stores them, one position snapshot per fill plus the day rolls (every position
   at the day's start and at the next day's start) into `<bench>_snapshots` —
   DataFrames through QuestDBWriter; not timed;
2. put `--alerts` compliance alerts into an embedded ClickHouse (a temporary chdb path);
3. generate the day's reports — all four kinds, CSV and Parquet, into a local object
   store (a temporary directory: what ptrc uses without an S3 endpoint) — `--runs`
   times through `ReportService.generate`, the code `POST /reports` runs.

`report_seconds` is the median wall time of a full generation. Where the time goes:
each step's median (`steps`: the trade blotter's export from QuestDB, its parse into
Arrow, Parquet encoding, the writes to storage; the small reports), the CPU seconds
this process used and the CPU seconds QuestDB's process used during a generation (from
/proc, when the stack's pid file is there), and the machine's load average — on a
shared 2-core machine the wall time is mostly a matter of how much CPU the run got.

Writes benchmarks/results/reports.json and prints a table.

    python benchmarks/reports.py [--trades 1000000] [--runs 3] [--alerts 1000] [--keep]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from datetime import date, datetime, timezone
from decimal import Decimal
from pathlib import Path

import numpy as np
import pandas as pd

from posttrade import stack
from posttrade.agents.reports import ReportsSection, install_reports
from posttrade.app import App
from posttrade.core.positions import PositionState
from posttrade.core.reports import TradingDay
from posttrade.stores.clickhouse import open_clickhouse
from posttrade.stores.objects import LocalObjectStore
from posttrade.stores.questdb import QuestDBClient, QuestDBWriter
from posttrade.streams.memory import MemoryTransport

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


def decimals(rng: np.random.Generator, n: int, low: int, high: int, places: int, pool: int = 4096) -> np.ndarray:
    """n Decimals with `places` decimal places, drawn from a pool (building millions of
    distinct Decimal objects would dominate the load)."""
    values = np.array([Decimal(int(v)).scaleb(-places) for v in rng.integers(low, high, pool)], dtype=object)
    return values[rng.integers(0, pool, n)]


def trades_frame(rng, start_ns: int, day_ns: int, first: int, n: int, total: int, accounts: int, symbols: int):
    index = np.arange(first, first + n)
    return pd.DataFrame({
        "ts": start_ns + index * (day_ns // total),
        "fill_id": [f"F{i:010d}" for i in index],
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


async def load(questdb, writer, trades, snapshots, args) -> dict:
    rng = np.random.default_rng(7)
    start, end = TradingDay().window_ns(DAY)
    await questdb.create_table(trades, TRADES_COLUMNS, dedup_keys=("ts", "fill_id"))
    await questdb.create_table(snapshots, SNAPSHOT_COLUMNS, dedup_keys=("ts", "account", "symbol", "reason"))
    began = time.perf_counter()
    for first in range(0, args.trades, LOAD_BATCH):
        n = min(LOAD_BATCH, args.trades - first)
        frame = trades_frame(rng, start, end - start, first, n, args.trades, args.accounts, args.symbols)
        await writer.write_batch(trades, frame, symbols=("account", "symbol", "side", "venue"))
        if args.snapshots:
            snaps = snapshots_frame(rng, frame["ts"].to_numpy(), frame["account"].astype(str).to_numpy(),
                                    frame["symbol"].astype(str).to_numpy(), "fill")
            await writer.write_batch(snapshots, snaps, symbols=("account", "symbol", "reason"))
    keys = sorted({(f"ACC{(i // 7) % args.accounts:03d}", f"SYM{i % args.symbols:04d}")
                   for i in range(min(args.trades, 7 * args.accounts * args.symbols))})
    for roll_at in (start + 1_000_000, end + 1_000_000):
        ts = np.full(len(keys), roll_at, dtype=np.int64) + np.arange(len(keys))
        rolls = snapshots_frame(rng, ts, [k[0] for k in keys], [k[1] for k in keys], "roll")
        await writer.write_batch(snapshots, rolls, symbols=("account", "symbol", "reason"))
    await questdb.wait_visible(trades, args.trades, timeout=600)
    snapshot_rows = (args.trades if args.snapshots else 0) + 2 * len(keys)
    await questdb.wait_visible(snapshots, snapshot_rows, timeout=600)
    return {"trades": args.trades, "snapshots": snapshot_rows, "positions": len(keys),
            "load_seconds": round(time.perf_counter() - began, 1)}


def questdb_cpu_reader(endpoints):
    """A function giving QuestDB's process CPU seconds so far (None when unknown)."""
    pid_file = endpoints.home / "run" / "questdb.pid"
    try:
        pid = int(pid_file.read_text().split()[0])
        ticks = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return lambda: None

    def read() -> float | None:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / ticks

    return read


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trades", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--alerts", type=int, default=1_000)
    parser.add_argument("--accounts", type=int, default=20)
    parser.add_argument("--symbols", type=int, default=500)
    parser.add_argument("--no-snapshots", dest="snapshots", action="store_false",
                        help="do not store a snapshot per fill (rolls only)")
    parser.add_argument("--slices", type=int, default=ReportsSection().export_slices)
    parser.add_argument("--parallelism", type=int, default=ReportsSection().export_parallelism)
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
    try:
        print(f"loading {args.trades:,} trades into {trades} ...", file=sys.stderr)
        loaded = await load(questdb, writer, trades, snapshots, args)
        await clickhouse.command("CREATE DATABASE IF NOT EXISTS bench")
        await clickhouse.command(ALERTS_DDL)
        start, end = TradingDay().window_ns(DAY)
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
        service = install_reports(
            app, positions=positions, mark_of=lambda symbol: None, multipliers={},
            object_store=LocalObjectStore(workdir / "objects"), questdb=questdb, clickhouse=clickhouse,
            settings=ReportsSection(trades_table=trades, snapshots_table=snapshots, alerts_table="bench.compliance_alerts",
                                    export_slices=args.slices, export_parallelism=args.parallelism,
                                    daily_delay_s=None),
        )
        runs = []
        async with app:
            for run in range(args.runs):
                load_before = os.getloadavg()[0]
                cpu_before, questdb_before = time.process_time(), questdb_cpu()
                generation = await service.generate(DAY)
                cpu_used = time.process_time() - cpu_before
                questdb_after = questdb_cpu()
                runs.append({
                    "seconds": round(generation.seconds, 3),
                    "steps": {k: round(v, 3) for k, v in generation.steps.items()},
                    "cpu_seconds_this_process": round(cpu_used, 3),
                    "cpu_seconds_questdb": None if questdb_before is None or questdb_after is None
                    else round(questdb_after - questdb_before, 3),
                    "load_average_1m_before": round(load_before, 2),
                    "files": {f.name: {"rows": f.rows, "bytes": f.size} for f in generation.files},
                })
                print(f"run {run + 1}: {generation.seconds:.2f} s (load {load_before:.1f})", file=sys.stderr)
    finally:
        if not args.keep:
            for table in (trades, snapshots):
                await questdb.execute(f"DROP TABLE IF EXISTS {table}")
        await writer.close()
        await questdb.close()
        await clickhouse.close()
        shutil.rmtree(workdir, ignore_errors=True)

    seconds = [r["seconds"] for r in runs]
    report_seconds = statistics.median(seconds)
    step_names = sorted({name for r in runs for name in r["steps"]})
    steps = {name: round(statistics.median(r["steps"].get(name, 0.0) for r in runs), 3) for name in step_names}
    result = {
        "benchmark": "reports",
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "setup": {**loaded, "alerts": args.alerts, "day": DAY.isoformat(), "export_slices": args.slices,
                  "export_parallelism": args.parallelism, "object_store": "local directory"},
        "report_seconds": report_seconds,
        "report_seconds_min": min(seconds),
        "goal_seconds": GOAL_S,
        "floor_seconds": FLOOR_S,
        "meets_goal": report_seconds < GOAL_S,
        "meets_floor": report_seconds < FLOOR_S,
        "steps_median": steps,
        "cpu_seconds_this_process_median": statistics.median(r["cpu_seconds_this_process"] for r in runs),
        "cpu_seconds_questdb_median": None if any(r["cpu_seconds_questdb"] is None for r in runs)
        else statistics.median(r["cpu_seconds_questdb"] for r in runs),
        "runs": runs,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")

    files = runs[-1]["files"]
    print(f"\nreport generation, one day of {args.trades:,} trades ({args.runs} runs; goal < {GOAL_S} s, floor < {FLOOR_S} s)")
    print(f"{'report_seconds (median)':<40}{report_seconds:>10.2f}")
    print(f"{'report_seconds (best)':<40}{min(seconds):>10.2f}")
    print(f"{'cpu s, this process (median)':<40}{result['cpu_seconds_this_process_median']:>10.2f}")
    if result["cpu_seconds_questdb_median"] is not None:
        print(f"{'cpu s, QuestDB (median)':<40}{result['cpu_seconds_questdb_median']:>10.2f}")
    print(f"{'load average before the runs':<40}{', '.join(str(r['load_average_1m_before']) for r in runs):>10}")
    print("steps (median s; they overlap):")
    for name, value in steps.items():
        print(f"  {name:<38}{value:>10.3f}")
    print("files:")
    for name, info in sorted(files.items()):
        print(f"  {name:<38}{info['rows']:>10,} rows {info['bytes']:>13,} bytes")
    print(f"\nwrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    asyncio.run(main())
