"""Gate test 3, performance: the SPEC's floors, measured live against the running services.

| figure                  | floor        | how it is measured here                                            |
|-------------------------|--------------|--------------------------------------------------------------------|
| hot cache hit rate      | > 80 %       | a read pattern over the run's keys (bars, quotes, positions); the  |
|                         |              | `hit` flag of each answer, beside hot_cache's `/cache/stats` delta |
| questdb_writer rows/s   | > 10,000     | N bar messages published on NATS → `count()` in the writer's table |
|                         |              | reaching N: N / (first publish → count seen), end to end          |
| P&L latency (p99)       | < 100 ms     | a fill published → the first `/pnl/realtime` answer that shows it, |
|                         |              | one probe fill at a time (as benchmarks/positions.py does)         |
| report generation       | < 5 s        | `POST /reports` (the day's four reports), timed by the client      |

The loads are bounded (default 100,000 rows, 200 probes, 300 reads): the gate checks
the floors on a shared machine in seconds, it does not chase the benchmarks' goals.
What the run adds is measured together with whatever else the stack is doing.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

from ..stores.questdb import check_identifier, sql_literal
from ..streams.events import Bar, Fill, encode
from ..streams.subjects import bar_subject, fill_subject
from .context import GateContext, ServiceError
from .report import Check, failed

SECTION = 3
HIT_RATE_FLOOR = 0.80
WRITER_FLOOR_ROWS_PER_S = 10_000
PNL_LATENCY_CEILING_MS = 100.0
REPORT_CEILING_S = 5.0
# Bars of an interval hot_cache builds itself from trades (it skips such messages), so
# the load lands on the writer and only costs the other consumers a decode each.
WRITER_LOAD_INTERVAL = "1s"


def percentile(values: list[float], q: float) -> float:
    """The value at rank ⌈q·n⌉ (nearest rank) of the sorted values: of 200, p99 is
    the 198th, so the two slowest probes may exceed it."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(round(q * len(ordered), 9))))
    return ordered[rank - 1]


# -- hot cache hit rate -----------------------------------------------------------------------


def read_pattern(ctx: GateContext, reads: int) -> list[tuple[str, dict[str, Any]]]:
    """The reads: the run's market-data symbol's bars (three intervals, and one larger
    read that misses once and is filled from QuestDB), the quotes of the test symbols
    and the test account's positions, round robin."""
    md = ctx.state["md_symbol"]
    keys: list[tuple[str, dict[str, Any]]] = [
        (f"/bars/{md}", {"interval": "1s", "limit": 1}),
        (f"/bars/{md}", {"interval": "1m", "limit": 1}),
        (f"/bars/{md}", {"interval": "5m", "limit": 1}),
        (f"/bars/{md}", {"interval": "1m", "limit": 20}),
    ]
    keys += [(f"/quotes/{s.symbol}", {}) for s in ctx.state.get("accuracy_scenarios", [])]
    keys.append((f"/positions/{ctx.account}", {}))
    return [keys[i % len(keys)] for i in range(reads)]


async def cache_hit_rate(ctx: GateContext, reads: int) -> Check:
    name = "performance.cache_hit_rate"
    criterion = "hot cache hit rate > 80 %"
    pattern = read_pattern(ctx, reads)
    try:
        before = await ctx.get_json("hot_cache", "/cache/stats")
        hits = misses = 0
        errors: list[str] = []
        for path, params in pattern:
            response = await ctx.get("hot_cache", path, params)
            if response.status_code != 200:
                errors.append(f"GET {path} {params}: HTTP {response.status_code} {response.text[:120]}")
                misses += 1
                continue
            if response.json().get("hit") is True:
                hits += 1
            else:
                misses += 1
        after = await ctx.get_json("hot_cache", "/cache/stats")
    except ServiceError as exc:
        return failed(SECTION, name, criterion, str(exc))
    rate = hits / len(pattern)
    stats_hits = after.get("hits", 0) - before.get("hits", 0)
    stats_misses = after.get("misses", 0) - before.get("misses", 0)
    stats_rate = stats_hits / (stats_hits + stats_misses) if stats_hits + stats_misses else None
    measured = (f"{rate:.1%} ({hits}/{len(pattern)} reads hit); /cache/stats delta "
                + (f"{stats_rate:.1%} ({stats_hits} hits, {stats_misses} misses)" if stats_rate is not None else "n/a"))
    return Check(SECTION, name, criterion, rate > HIT_RATE_FLOOR, measured, value=round(rate, 4), limit=HIT_RATE_FLOOR,
                 unit="ratio", details={"reads": len(pattern), "keys": len(set((p, tuple(q.items())) for p, q in pattern)),
                                        "stats_delta": {"hits": stats_hits, "misses": stats_misses},
                                        "errors": errors[:20]})  # fmt: skip


# -- questdb_writer rows/s ---------------------------------------------------------------------


def writer_load(symbol: str, rows: int, t0_ns: int) -> list[bytes]:
    """`rows` bar messages for one symbol, 1 µs apart (distinct dedup keys, one time
    range at the end of the table, so QuestDB appends rather than merges)."""
    out = []
    for i in range(rows):
        price = Decimal(10_000 + i % 500).scaleb(-2)
        bar = Bar(ts=t0_ns + i * 1_000, symbol=symbol, interval=WRITER_LOAD_INTERVAL, open=price, high=price + 1,
                  low=price, close=price, volume=Decimal(100), count=1)  # fmt: skip
        out.append(encode(bar))
    return out


async def writer_throughput(ctx: GateContext, rows: int, timeout_s: float = 90.0) -> Check:
    name = "performance.writer_rows_per_s"
    criterion = "questdb_writer > 10,000 rows/s (NATS publish -> rows counted in QuestDB)"
    symbol = ctx.symbol("W")
    try:
        stats = await ctx.get_json("questdb_writer", "/stats")
    except ServiceError as exc:
        return failed(SECTION, name, criterion, str(exc))
    route = next(((t, i) for t, i in stats.get("tables", {}).items() if i.get("route") == "bars"), None)
    if route is None:
        return failed(SECTION, name, criterion, "the writer has no `bars` route (its /stats lists none)")
    table = check_identifier(route[0])
    payloads = writer_load(symbol, rows, time.time_ns())
    subject = bar_subject(WRITER_LOAD_INTERVAL, symbol)
    ctx.state["writer_load_subject"] = (route[1].get("stream", "BARS"), subject)
    count_sql = f"SELECT count() FROM {table} WHERE symbol = {sql_literal(symbol)}"

    writer_pid = ctx.state.get("service_pids", {}).get("questdb_writer")
    cpu_before = process_cpu_s(writer_pid)
    started = time.perf_counter()
    publisher = asyncio.create_task(_publish_core(ctx, subject, payloads))
    count, counted_at, polls = 0, started, 0
    deadline = started + timeout_s
    while count < rows and time.perf_counter() < deadline:
        await asyncio.sleep(0.2)  # gently: QuestDB is ingesting meanwhile
        try:
            count = int((await ctx.questdb.query(count_sql)).scalar() or 0)
        except Exception:  # noqa: BLE001 - the rows (or the table) are not visible yet
            count = 0
        counted_at = time.perf_counter()
        polls += 1
    cpu_after = process_cpu_s(writer_pid)
    publish_s = await publisher
    elapsed = counted_at - started
    rate = count / elapsed if elapsed > 0 else 0.0
    complete = count >= rows
    measured = (f"{rate:,.0f} rows/s ({count:,}/{rows:,} rows in {elapsed:.2f} s; published at "
                f"{rows / publish_s:,.0f} msg/s)")  # fmt: skip
    cpu = {}
    if cpu_before is not None and cpu_after is not None and cpu_after > cpu_before:
        # What the writer would do with a core of its own (its CPU, whatever the load).
        cpu = {"writer_cpu_s": round(cpu_after - cpu_before, 3),
               "writer_rows_per_cpu_s": round(count / (cpu_after - cpu_before))}  # fmt: skip
        measured += f"; writer process {cpu['writer_rows_per_cpu_s']:,} rows per CPU-second"
    return Check(SECTION, name, criterion, complete and rate > WRITER_FLOOR_ROWS_PER_S, measured, value=round(rate),
                 limit=WRITER_FLOOR_ROWS_PER_S, unit="rows/s",
                 details={"table": table, "symbol": symbol, "rows_sent": rows, "rows_counted": count,
                          "seconds": round(elapsed, 3), "publish_seconds": round(publish_s, 3), **cpu,
                          **({} if complete else {"error": f"only {count} of {rows} rows after {timeout_s:.0f} s"})})  # fmt: skip


def process_cpu_s(pid: int | None) -> float | None:
    """User + system CPU seconds of a local process (Linux /proc); None if unknown."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _publish_core(ctx: GateContext, subject: str, payloads: list[bytes]) -> float:
    """Plain NATS publishes (JetStream stores them; no per-message acknowledgement, as
    a feed publishes); returns the seconds it took."""
    started = time.perf_counter()
    for i, data in enumerate(payloads):
        await ctx.nc.publish(subject, data)
        if i % 5_000 == 4_999:
            await ctx.nc.flush()
    await ctx.nc.flush()
    return time.perf_counter() - started


# -- P&L latency -------------------------------------------------------------------------------


async def pnl_latency(ctx: GateContext, probes: int, timeout_s: float = 5.0, budget_s: float = 60.0) -> Check:
    """One probe fill at a time for an account of its own; from just before its publish
    to the first `/pnl/realtime` answer showing its fill count (asked back to back).
    Stops early after `budget_s` (a slow stack would otherwise hold the run up)."""
    name = "performance.pnl_latency_p99"
    criterion = "P&L latency < 100 ms (p99, fill published -> visible at /pnl/realtime)"
    account, symbol = ctx.sub_account("LAT"), ctx.symbol("LAT")
    subject = fill_subject(account, symbol)
    latencies: list[float] = []
    lost = 0
    deadline = time.perf_counter() + budget_s
    try:
        for n in range(1, probes + 1):
            if time.perf_counter() > deadline:
                break
            fill = Fill(ts=time.time_ns(), fill_id=f"VALIDATE-{ctx.run_id}-LAT{n}", account=account, symbol=symbol,
                        side="BUY" if n % 2 else "SELL", qty=Decimal(1), price=Decimal("100.25"))  # fmt: skip
            data = encode(fill)
            published = time.perf_counter()
            await ctx.nc.publish(subject, data, headers={"Nats-Msg-Id": f"validate:{fill.fill_id}"})
            await ctx.nc.flush()
            while True:
                body = await ctx.get_json("pnl", "/pnl/realtime", {"account": account})
                seen = time.perf_counter()
                rows = body.get("positions") or [{}]
                if (rows[0].get("fill_count") or 0) >= n:
                    latencies.append((seen - published) * 1000)
                    break
                if seen - published > timeout_s:
                    lost += 1
                    break
    except ServiceError as exc:
        return failed(SECTION, name, criterion, str(exc))
    if not latencies:
        return failed(SECTION, name, criterion, f"none of {probes} probe fills became visible within {timeout_s} s")
    p50, p99 = percentile(latencies, 0.50), percentile(latencies, 0.99)
    measured = f"p99 {p99:.1f} ms, p50 {p50:.1f} ms, max {max(latencies):.1f} ms over {len(latencies)} fills"
    if lost:
        measured += f"; {lost} not seen within {timeout_s:.0f} s"
    if len(latencies) + lost < probes:
        measured += f" (time budget {budget_s:.0f} s used up after {len(latencies) + lost} of {probes})"
    return Check(SECTION, name, criterion, p99 < PNL_LATENCY_CEILING_MS and not lost, measured, value=round(p99, 3),
                 limit=PNL_LATENCY_CEILING_MS, unit="ms",
                 details={"probes": probes, "seen": len(latencies), "p50_ms": round(p50, 3), "p99_ms": round(p99, 3),
                          "max_ms": round(max(latencies), 3)})  # fmt: skip


# -- report generation -------------------------------------------------------------------------


def report_time(ctx: GateContext) -> Check:
    name = "performance.report_generation"
    criterion = "report generation < 5 s (POST /reports: the day's 4 reports, CSV and Parquet)"
    generation = ctx.state.get("report_generation")
    if generation is None:
        return failed(SECTION, name, criterion, "no report was generated (see accuracy.report)")
    seconds = generation["seconds"]
    body = generation["body"]
    rows = {r["kind"]: r["rows"] for r in body.get("reports", [])}
    measured = (f"{seconds:.2f} s (service: {body.get('generation_seconds', 0):.2f} s; "
                f"blotter {rows.get('trade_blotter', 0):,} rows); load {generation.get('load_average_1m')}")  # fmt: skip
    return Check(SECTION, name, criterion, seconds < REPORT_CEILING_S, measured, value=round(seconds, 3),
                 limit=REPORT_CEILING_S, unit="s",
                 details={"date": body.get("date"), "rows": rows, "load_average_1m": generation.get("load_average_1m"),
                          "steps": body.get("steps", {})})  # fmt: skip


async def run(ctx: GateContext, *, reads: int, writer_rows: int, probes: int) -> list[Check]:
    # The writer's load last: its messages also reach the other consumers of the bars
    # stream (pnl, ptrc, hot_cache), whose backlog would lengthen the latency probes.
    # The machine's load average goes beside each figure: on a shared machine it says
    # how much of the CPU the services had.
    steps = (lambda: cache_hit_rate(ctx, reads), lambda: pnl_latency(ctx, probes),
             lambda: writer_throughput(ctx, writer_rows))  # fmt: skip
    cache, latency, writer = [_with_load(await step()) for step in steps]
    return [cache, writer, latency, report_time(ctx)]


def _with_load(check: Check) -> Check:
    load = round(os.getloadavg()[0], 2)
    check.details["load_average_1m"] = load
    if check.value is not None:
        check.measured += f"; load {load}"
    return check
