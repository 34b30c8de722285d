"""execution_quality: the summary over 1,000,000 fills as a user sees it, and ingest.

* summary: 1,000,000 fill rows (20 accounts x 200 symbols x 5 venues x 2 sides, one
  fill every 10 ms, ~2.8 h; prices and mids in 0.0001 steps, so nearly every slippage
  value is distinct and the exact quantiles have real work) and 100,000 orders are
  written to embedded ClickHouse (chdb) the way the service writes them
  (`ExecutionStore`: Arrow inserts into the fills and orders tables, then the per-minute
  rollup refreshed for the minutes written), in batches of 100,000, plus 100,000
  rewrites of existing fills with a newer version (so `FINAL` has duplicates to fold).
  The engine is closed and `posttrade worker execution_quality` is started on that data
  path as its own process; the benchmark then times `GET /analytics/summary` over HTTP
  from this process, end to end (request, query, JSON, response read):
  - `summary_seconds_1m_fills`: `?bucket=1h` (default group_by account, symbol, venue,
    side): whole-hour buckets, so the service reads the per-minute rollup. Median of
    the runs, parts as loaded (not merged).
  - `summary_seconds_fills_table`: the same groups with `from` one nanosecond before
    the first fill: not on a whole minute, so the service reads the fills table itself
    (FINAL) — what a request costs when the rollup cannot answer it.
  - `*_cpu_seconds`: CPU time the service process spent per request (chdb runs in it),
    which other programs on a shared machine do not inflate: wall time on an idle
    machine is about CPU time / cores in use.
  - `summary_seconds_after_merge`: the same after `OPTIMIZE ... FINAL` (service restarted).
  Before the service starts, the benchmark checks in-process that the rollup and the
  fills table give identical answers for the hourly summary.
* ingest: N fills (10 per order, each order NEW then FILLED) with one quote and one
  market trade per fill are preloaded on NATS (namespaced streams), then a fresh
  service consumes everything; `ingest_fills_per_s` = N / seconds from start until
  every fill's row is in ClickHouse complete (slippage, spread and all three
  markouts). Every event is decoded, joined, written to ClickHouse, changelogged and
  acknowledged, as in production. `ingest_cpu_seconds` is this process's CPU time over
  the same span (the service and chdb run in it).

Writes benchmarks/results/execution.json (with the load average: the machine may be
shared) and prints a table.

    python benchmarks/execution.py [--summary-fills 1000000] [--ingest-fills 20000] [--runs 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
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
import numpy as np
import pyarrow as pa

from posttrade import stack
from posttrade.agents.execution.state import FILL_ALL, MINUTE_NS, ORDER_ALL
from posttrade.config import load_config
from posttrade.services import execution_quality as eq
from posttrade.stores.clickhouse import open_clickhouse
from posttrade.stores.clickhouse.execution import (
    FILL_COLUMNS,
    FILLS_TABLE,
    MINUTES_TABLE,
    ORDER_COLUMNS,
    ORDERS_TABLE,
    SETTLED,
    ExecutionStore,
)
from posttrade.stores.clickhouse.execution_queries import ExecutionQueries, Filters
from posttrade.streams.events import Fill, MarketTrade, Order, Quote, encode

from _proc_cpu import cpu_seconds  # benchmarks/_proc_cpu.py (the script's folder is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results" / "execution.json"
T0 = 1_704_205_800_000_000_000
NS = 1_000_000_000
HOUR_NS = 3600 * NS


# -- synthetic rows, built as Arrow columns (Python Decimals would take minutes) ----------


def decimals(units: np.ndarray, places: int, scale: int = 18) -> pa.Array:
    """Exact decimals `units x 10^-places` as decimal128(38, scale) (units: int64)."""
    units = np.asarray(units, dtype=np.int64)
    words = np.empty((len(units), 2), dtype=np.int64)  # little-endian 128-bit two's complement
    words[:, 0] = units
    words[:, 1] = np.where(units < 0, -1, 0)
    exact = pa.Array.from_buffers(pa.decimal128(38, places), len(units), [None, pa.py_buffer(words.tobytes())])
    return exact if places == scale else exact.cast(pa.decimal128(38, scale))


def bps_units(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator x 10^4 in units of 10^-8 bps (float rounding is fine here:
    these are synthetic values, not a check of the formulas)."""
    return np.round(numerator / denominator * 1e12).astype(np.int64)


def strings(prefix: str, values: np.ndarray) -> pa.Array:
    return pa.array(np.char.add(prefix, values.astype(str)), pa.string())


def timestamps(ns: np.ndarray) -> pa.Array:
    return pa.array(ns, pa.timestamp("ns", tz="UTC"))


def synthetic_fills(start: int, n: int, clock: int, rng: np.random.Generator) -> pa.Table:
    i = np.arange(start, start + n)
    buy = i % 2 == 0
    sign = np.where(buy, 1, -1)
    mid = 1_000_000 + rng.integers(-20_000, 20_000, n)  # 100 +- 2, in 0.0001 steps
    price = mid + sign * rng.integers(-30, 120, n)  # mostly a cost, sometimes better than the mid
    arrival = mid + rng.integers(-50, 51, n)
    qty = rng.integers(1, 50, n) * 10
    ts = T0 + i * 10_000_000
    slip = bps_units(sign * (price - arrival), arrival)
    cols = {
        "fill_id": strings("f", i),
        "order_id": strings("o", i // 10),
        "account": strings("ACC", i % 20),
        "symbol": strings("SYM", i % 200),
        "currency": pa.array(np.full(n, "USD")),  # the symbols are not in the reference data
        "venue": strings("V", i % 5),
        "side": pa.array(np.where(buy, "BUY", "SELL")),
        "liquidity": pa.array(np.where(i % 3 == 0, "MAKER", "TAKER")),
        "ts": timestamps(ts),
        "qty": decimals(qty, 0),
        "price": decimals(price, 4),
        "fee": decimals(qty, 3),
        "fee_currency": pa.array(np.full(n, "USD")),
        "notional": decimals(qty * price, 4),
        "arrival_ts": timestamps(ts - 50_000_000),
        "arrival_mid": decimals(arrival, 4),
        "arrival_notional": decimals(qty * arrival, 4),
        "slippage_bps": decimals(slip, 8, 8),
        "slippage_cost": decimals(qty * sign * (price - arrival), 4),
        "mid_at_fill": decimals(mid, 4),
        "effective_spread_bps": decimals(bps_units(2 * np.abs(price - mid), mid), 8, 8),
    }
    for horizon in ("1s", "5s", "60s"):
        later = mid + rng.integers(-300, 301, n)
        cols[f"mid_{horizon}"] = decimals(later, 4)
        cols[f"markout_{horizon}_bps"] = decimals(bps_units(sign * (later - price), price), 8, 8)
    cols["amendments"] = pa.array(np.zeros(n, np.uint16))
    cols["busted"] = pa.array(np.zeros(n, np.uint8))
    cols["complete"] = pa.array(np.ones(n, np.uint8))
    cols["progress"] = pa.array(np.full(n, FILL_ALL, np.uint8))
    cols["version"] = pa.array(np.full(n, clock | SETTLED, np.uint64))
    return pa.table({c.name: cols[c.name] for c in FILL_COLUMNS})


def synthetic_orders(n: int, clock: int, rng: np.random.Generator) -> pa.Table:
    i = np.arange(n)
    qty = rng.integers(10, 100, n) * 100
    filled = np.minimum(qty, rng.integers(0, 120, n) * 100)
    mid = 1_000_000 + rng.integers(-20_000, 20_000, n)
    ts = T0 + i * 100_000_000
    cols = {c.name: pa.nulls(n, _arrow_type(c)) for c in ORDER_COLUMNS}
    cols.update({
        "order_id": strings("o", i),
        "account": strings("ACC", (i * 10) % 20),
        "symbol": strings("SYM", (i * 10) % 200),
        "currency": pa.array(np.full(n, "USD")),
        "venue": strings("V", (i * 10) % 5),
        "side": pa.array(np.where(i % 2 == 0, "BUY", "SELL")),
        "order_type": pa.array(np.full(n, "LIMIT")),
        "status": pa.array(np.full(n, "CANCELED")),
        "qty": decimals(qty, 0),
        "arrival_ts": timestamps(ts),
        "end_ts": timestamps(ts + 60 * NS),
        "arrival_mid": decimals(mid, 4),
        "fills": pa.array(np.full(n, 10, np.uint32)),
        "filled_qty": decimals(filled, 0),
        "unfilled_qty": decimals(qty - filled, 0),
        "fill_ratio": decimals(filled * 1_000_000 // qty, 6),
        "filled_notional": decimals(filled * mid, 4),
        "fees": decimals(filled, 3),
        "fees_other": pa.array([[]] * n, _arrow_type(next(c for c in ORDER_COLUMNS if c.name == "fees_other"))),
        "benchmark_notional": decimals(qty * mid, 4),
        "implementation_shortfall": decimals(rng.integers(-500, 1500, n), 2),
        "implementation_shortfall_bps": decimals(rng.integers(-50_000_000, 150_000_000, n), 8, 8),
        "vwap_slippage_bps": decimals(rng.integers(-50_000_000, 150_000_000, n), 8, 8),
        "time_to_first_fill_ns": pa.array(rng.integers(1, 10_000, n) * 1_000_000, pa.int64()),
        "time_to_last_fill_ns": pa.array(rng.integers(10_000, 60_000, n) * 1_000_000, pa.int64()),
        "is_final": pa.array(np.ones(n, np.uint8)),
        "progress": pa.array(np.full(n, ORDER_ALL, np.uint8)),
        "version": pa.array(np.full(n, clock | SETTLED, np.uint64)),
    })
    return pa.table({c.name: cols[c.name] for c in ORDER_COLUMNS})


def _arrow_type(column) -> pa.DataType:
    return {
        "string": pa.string(), "ts": pa.timestamp("ns", tz="UTC"), "d18": pa.decimal128(38, 18),
        "bps": pa.decimal128(38, 8), "int64": pa.int64(), "uint8": pa.uint8(), "uint16": pa.uint16(), "uint32": pa.uint32(),
        "uint64": pa.uint64(), "d18_map": pa.map_(pa.string(), pa.decimal128(38, 18)),
    }[column.arrow]


async def load_summary_data(engine: Path, database: str, n_fills: int) -> dict:
    """Write the rows as the service does; check rollup == fills table for the summary."""
    store = open_clickhouse(f"chdb://{engine}")
    try:
        tables = ExecutionStore(store, database)
        await tables.create_schema()
        rng = np.random.default_rng(7)
        batch = 100_000
        write_seconds = 0.0
        rows = 0

        async def write(fills: pa.Table) -> None:
            nonlocal write_seconds, rows
            ts = fills.column("ts").cast(pa.int64()).to_numpy()
            minutes = {int(m) for m in np.unique(ts - ts % MINUTE_NS)}
            started = time.perf_counter()
            await tables.insert(FILLS_TABLE, fills)
            await tables.refresh_minutes(minutes, time.time_ns())
            write_seconds += time.perf_counter() - started
            rows += fills.num_rows

        for start in range(0, n_fills, batch):
            await write(synthetic_fills(start, min(batch, n_fills - start), time.time_ns(), rng))
        rewrites = n_fills // 10
        await write(synthetic_fills(0, rewrites, time.time_ns(), rng))  # newer versions of existing fills
        await tables.insert(ORDERS_TABLE, synthetic_orders(n_fills // 10, time.time_ns(), rng))

        parts = dict((await store.query(
            "SELECT table, count() FROM system.parts WHERE database = {d:String} AND active GROUP BY table",
            {"d": database},
        )).rows)
        queries = ExecutionQueries(database, lambda: store)
        group_by = ("account", "symbol", "venue", "side")
        from_rollup = await queries.summary(Filters(), group_by, HOUR_NS)
        from_fills = await queries.summary(Filters(), group_by, HOUR_NS, use_rollup=False)
        assert from_rollup == from_fills, "the rollup and the fills table disagree"
        rollup_rows = (await store.query(f"SELECT count() FROM {database}.{MINUTES_TABLE} FINAL")).scalar()
        return {
            "summary_fill_rows": n_fills,
            "summary_rewritten_rows": rewrites,
            "summary_groups": len(from_rollup),
            "summary_rollup_rows": rollup_rows,
            "summary_parts_as_loaded": parts,
            "store_write_rows_per_s": round(rows / write_seconds),
        }
    finally:
        await store.close()


async def optimize(engine: Path, database: str) -> None:
    store = open_clickhouse(f"chdb://{engine}")
    try:
        for table in (FILLS_TABLE, ORDERS_TABLE, MINUTES_TABLE):
            await store.command(f"OPTIMIZE TABLE {database}.{table} FINAL")
    finally:
        await store.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServiceProcess:
    """`posttrade worker execution_quality` on a data path, as a user runs it."""

    def __init__(self, nats_url: str, engine: Path, database: str):
        suffix = uuid.uuid4().hex[:8]
        self.namespace = self.service = f"eqbs{suffix}"
        self.port = free_port()
        p = "POSTTRADE_EXECUTION_QUALITY__"
        self.env = {
            **os.environ,
            "POSTTRADE__NATS__URL": nats_url,
            "POSTTRADE__DATABASES__CLICKHOUSE__DSN": f"chdb://{engine}",
            f"{p}DATABASES__CLICKHOUSE__DATABASE": database,
            f"{p}SERVICE__NAME": self.service,
            f"{p}SERVICE__HOST": "127.0.0.1",
            f"{p}SERVICE__PORT": str(self.port),
            f"{p}SERVICE__NAMESPACE": self.namespace,
        }
        self.proc: subprocess.Popen | None = None

    async def __aenter__(self) -> ServiceProcess:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "posttrade.cli", "worker", "execution_quality"],
            cwd=ROOT, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        async with httpx.AsyncClient(base_url=self.url, timeout=30) as client:
            deadline = time.monotonic() + 120
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"the service exited: {self.proc.stderr.read().decode()[-2000:]}")
                try:
                    health = (await client.get("/health")).json()
                    clickhouse = health["checks"].get("sink:clickhouse", {})
                    if clickhouse.get("ok") and not clickhouse.get("degraded"):  # connected, answering
                        return self
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("the service did not connect to ClickHouse in time")
                await asyncio.sleep(0.2)

    async def __aexit__(self, *exc) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        await cleanup(self.env["POSTTRADE__NATS__URL"], self.namespace, self.service)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def time_get(self, path: str, runs: int) -> tuple[list[float], list[float], dict]:
        """Wall seconds per request (as the client sees it) and the service's CPU seconds."""
        assert self.proc is not None
        walls, cpus, body = [], [], {}
        async with httpx.AsyncClient(base_url=self.url, timeout=120) as client:
            for _ in range(runs):
                cpu = cpu_seconds(self.proc.pid)
                started = time.perf_counter()
                response = await client.get(path)
                body = response.json()
                walls.append(time.perf_counter() - started)
                cpus.append(cpu_seconds(self.proc.pid) - cpu)
                assert response.status_code == 200, body
        return walls, cpus, body


async def bench_summary(nats_url: str, engine: Path, n_fills: int, runs: int) -> dict:
    database = "bench_eq"
    loaded = await load_summary_data(engine, database, n_fills)
    result = dict(loaded)
    hourly = "/analytics/summary?bucket=1h"
    fills_table = f"/analytics/summary?bucket=1h&from={T0 - 1}"  # not on a minute: no rollup
    async with ServiceProcess(nats_url, engine, database) as service:
        walls, cpus, body = await service.time_get(hourly, runs)
        assert body["total"] == loaded["summary_groups"]
        raw_walls, raw_cpus, raw_body = await service.time_get(fills_table, max(3, runs // 2))
        assert raw_body["groups"] == body["groups"]
    await optimize(engine, database)
    async with ServiceProcess(nats_url, engine, database) as service:
        merged, merged_cpus, _ = await service.time_get(hourly, runs)
    result.update({
        "summary_seconds_1m_fills": round(statistics.median(walls), 3),
        "summary_seconds_runs": [round(x, 3) for x in walls],
        "summary_cpu_seconds_1m_fills": round(statistics.median(cpus), 3),
        "summary_seconds_fills_table": round(statistics.median(raw_walls), 3),
        "summary_cpu_seconds_fills_table": round(statistics.median(raw_cpus), 3),
        "summary_seconds_after_merge": round(statistics.median(merged), 3),
        "summary_cpu_seconds_after_merge": round(statistics.median(merged_cpus), 3),
        "summary_request": hourly,
        "summary_request_fills_table": fills_table,
    })
    return result


# -- ingest through the service ----------------------------------------------------------------


def ingest_workload(n_fills: int) -> dict[str, list[tuple[str, bytes]]]:
    symbols = [f"S{k}" for k in range(20)]
    out: dict[str, list[tuple[str, bytes]]] = {"orders": [], "fills": [], "quotes": [], "trades": []}
    step = 10_000_000  # one fill every 10 ms of event time
    for i in range(n_fills):
        ts = T0 + i * step
        symbol = symbols[i % len(symbols)]
        account = f"A{i % 7}"
        order_id = f"O{i // 10}"
        price = Decimal(100) + Decimal(i % 50) / 100
        if i % 10 == 0:
            out["orders"].append((f"trading.orders.{account}.{symbol}", encode(Order(
                ts=ts - 1_000_000, order_id=order_id, account=account, symbol=symbol, side="BUY", qty=Decimal(1000),
                venue="XNAS"))))
        out["fills"].append((f"trading.fills.{account}.{symbol}", encode(Fill(
            ts=ts, fill_id=f"F{i}", order_id=order_id, account=account, symbol=symbol, side="BUY",
            qty=Decimal(100), price=price, fee=Decimal("0.1"), venue="XNAS"))))
        if i % 10 == 9:  # the tenth fill completes the order
            out["orders"].append((f"trading.orders.{account}.{symbol}", encode(Order(
                ts=ts + 1_000_000, order_id=order_id, account=account, symbol=symbol, side="BUY",
                qty=Decimal(1000), venue="XNAS", status="FILLED"))))
        out["quotes"].append((f"md.quotes.{symbol}", encode(Quote(
            ts=ts - 500_000, symbol=symbol, bid=price - Decimal("0.01"), ask=price + Decimal("0.01")))))
        out["trades"].append((f"md.trades.{symbol}", encode(MarketTrade(
            ts=ts, symbol=symbol, price=price, size=Decimal(100)))))
    # Event time must pass the last fill's +60 s markout for every symbol.
    end = T0 + n_fills * step + 61 * NS
    for symbol in symbols:
        out["quotes"].append((f"md.quotes.{symbol}", encode(Quote(ts=end, symbol=symbol, bid=Decimal(99), ask=Decimal(101)))))
        out["trades"].append((f"md.trades.{symbol}", encode(MarketTrade(ts=end, symbol=symbol, price=Decimal(100), size=Decimal(1)))))
    return out


async def preload(url: str, namespace: str, workload) -> int:
    """Create the namespaced streams and fill them (core publishes, confirmed by count)."""
    nc = await nats.connect(url, pending_size=256 * 1024 * 1024)
    js = nc.jetstream()
    prefix = namespace.upper()
    streams = {"orders": "ORDERS", "fills": "FILLS", "quotes": "QUOTES", "trades": "TRADES"}
    subjects = {"orders": "trading.orders.>", "fills": "trading.fills.>", "quotes": "md.quotes.>", "trades": "md.trades.>"}
    total = 0
    for key, messages in workload.items():
        name = f"{prefix}_{streams[key]}"
        await js.add_stream(name=name, subjects=[f"{namespace}.{subjects[key]}"])
        for k, (subject, data) in enumerate(messages):
            await nc.publish(f"{namespace}.{subject}", data)
            if k % 20_000 == 0:
                await nc.flush()
        await nc.flush()
        while (await js.stream_info(name)).state.messages < len(messages):
            await asyncio.sleep(0.05)
        total += len(messages)
    await nc.close()
    return total


async def cleanup(url: str, namespace: str, service: str) -> None:
    nc = await nats.connect(url)
    js = nc.jetstream()
    for stream in ("ORDERS", "FILLS", "QUOTES", "TRADES", "DLQ"):
        try:
            await js.delete_stream(f"{namespace.upper()}_{stream}")
        except nats.js.errors.NotFoundError:
            pass
    for table in ("fills", "orders", "quote_book", "tape", "amendments"):
        try:
            await js.delete_key_value(f"{namespace}-{service}-{table}")  # the App's namespaced bucket
        except nats.js.errors.NotFoundError:
            pass
    await nc.close()


async def bench_ingest(url: str, engine: Path, n_fills: int) -> dict:
    suffix = uuid.uuid4().hex[:8]
    namespace, service_name, database = f"eqb{suffix}", f"eqb{suffix}", f"eqb_{suffix}"
    workload = ingest_workload(n_fills)
    events = await preload(url, namespace, workload)
    p = "POSTTRADE_EXECUTION_QUALITY__"
    config = load_config("execution_quality", eq.CONFIG, env={
        "POSTTRADE__NATS__URL": url,
        "POSTTRADE__DATABASES__CLICKHOUSE__DSN": f"chdb://{engine}",
        f"{p}SERVICE__NAME": service_name,
        f"{p}DATABASES__CLICKHOUSE__DATABASE": database,
        f"{p}SERVICE__NAMESPACE": namespace,
    })
    service = eq.build(config)
    try:
        started, cpu = time.perf_counter(), time.process_time()
        await service.app.start()
        while True:
            await asyncio.sleep(0.2)
            store = service.store
            if store is None or service.tracker.stats.fills < n_fills:
                continue
            complete = (await store.query(
                f"SELECT count() FROM {database}.{FILLS_TABLE} FINAL WHERE complete = 1"
            )).scalar()
            if complete == n_fills:
                break
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
        writes = service.sink.writes
        await service.app.stop()
        scratch = open_clickhouse(f"chdb://{engine}")
        await scratch.command(f"DROP DATABASE {database}")
        await scratch.close()
    finally:
        await cleanup(url, namespace, service_name)
    return {
        "ingest_fills_per_s": round(n_fills / elapsed),
        "ingest_events_per_s": round(events / elapsed),
        "ingest_fills": n_fills,
        "ingest_events": events,
        "ingest_seconds": round(elapsed, 2),
        "ingest_cpu_seconds": round(cpu, 2),
        "ingest_fills_per_cpu_second": round(n_fills / cpu),
        "ingest_fill_rows_written_per_fill": round(writes.fill_rows / n_fills, 2),
        "ingest_order_rows_written": writes.order_rows,
        "ingest_clickhouse_writes": writes.inserts + writes.refreshes,
    }


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--summary-fills", type=int, default=1_000_000)
    parser.add_argument("--ingest-fills", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    url = stack.endpoints().nats_url
    load_before = round(os.getloadavg()[0], 2)
    scratch = Path(tempfile.mkdtemp(prefix="posttrade-bench-eq-"))
    engine = scratch / "engine"  # one chdb data path: this process opens it between the service's runs
    try:
        summary = await bench_summary(url, engine, args.summary_fills, args.runs)
        load_between = round(os.getloadavg()[0], 2)
        ingest = await bench_ingest(url, engine, args.ingest_fills)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    result = {
        **summary,
        **ingest,
        "goal_summary_seconds_1m_fills": 1.0,
        "clickhouse": "chdb (embedded)",
        "cpus": os.cpu_count(),
        # The machine may be shared: the 1-minute load average at the start, between the
        # two parts and at the end.
        "load_average_1m": [load_before, load_between, round(os.getloadavg()[0], 2)],
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'measure':<44}{'value':>14}")
    for key in ("summary_seconds_1m_fills", "summary_cpu_seconds_1m_fills", "summary_seconds_fills_table",
                "summary_cpu_seconds_fills_table", "summary_seconds_after_merge", "summary_cpu_seconds_after_merge",
                "summary_groups", "summary_rollup_rows", "store_write_rows_per_s", "ingest_fills_per_s",
                "ingest_events_per_s", "ingest_seconds", "ingest_cpu_seconds", "ingest_fills_per_cpu_second",
                "ingest_fill_rows_written_per_fill"):
        print(f"{key:<44}{result[key]:>14}")
    print(f"load average (1 min): {result['load_average_1m']} on {result['cpus']} CPUs")
    print(f"(goal: summary over {args.summary_fills:,} fills < 1 s) -> {RESULTS}")


if __name__ == "__main__":
    asyncio.run(main())
