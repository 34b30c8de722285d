"""questdb_writer end to end: quotes published on NATS → rows counted in QuestDB.

Runs against the local stack (the env of `posttrade stack env`), on its own stream and
table names:

1. writer: the real service (`python -m posttrade.cli worker questdb_writer`, only the
   quotes route, batch.size/interval from the flags) as a subprocess; once with the
   shipped batch.size (the headline figure) and once with another (default 1000, the
   value of the platform's config example). The clock starts
   when publishing starts and stops when `SELECT count()` in QuestDB reaches the number
   published: `rows_per_s` is that, end to end. Then duplicates (rows - distinct
   stream sequences) and lost (published - distinct stream sequences).
2. naive baseline: the same messages through an agent that writes each message as it
   arrives (one ILP/HTTP request per row), fewer of them (it is slow).
3. where the time goes, per row, measured stage by stage in this process on the same
   messages: decoding + validating (the runtime's work before the agent sees an event),
   building the columns, serialising to ILP (CPU time of this thread), the HTTP request
   with QuestDB's commit (wall time), and the runtime alone (a no-op agent draining the
   stream: CPU per event) as the transport's ceiling. The writer process's own CPU per
   row is recorded too: on a shared machine, CPU figures say more than wall-clock rates.

Writes benchmarks/results/writer.json and prints a table.

    python benchmarks/writer.py [--rows 200000] [--batch N] [--also-batch 1000] [--baseline-rows 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from decimal import Decimal
from pathlib import Path

import httpx
import nats
import pandas as pd
import questdb

from posttrade import stack
from posttrade.stores.questdb.sink import LAYOUTS
from posttrade.app import App
from posttrade.stores.questdb import QuestDBClient, QuestDBWriter
from posttrade.streams.events import Quote, decode, encode
from posttrade.streams.nats import NatsTransport
from posttrade.streams.stream import EventRecord

from _proc_cpu import cpu_seconds  # benchmarks/_proc_cpu.py (the script's folder is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "writer.json"
CONFIG_FILE = ROOT / "config" / "backend" / "questdb_writer" / "config.yaml"
T0 = 1_700_000_000_000_000_000
GOAL_ROWS_PER_S = 100_000
FLOOR_ROWS_PER_S = 10_000
LAYOUT = LAYOUTS["quotes"]


def shipped_batch_size() -> int:
    """batch.size in config/backend/questdb_writer/config.yaml (environment ignored)."""
    from posttrade.config import load_config
    from posttrade.services.questdb_writer import CONFIG

    return load_config("questdb_writer", CONFIG, path=CONFIG_FILE, env={}).batch.size


def quote_payloads(n: int) -> list[bytes]:
    """Realistic quotes: 500 symbols, prices with cents, distinct timestamps."""
    out = []
    for i in range(n):
        bid = Decimal(10_000 + (i * 7919) % 5_000) / 100
        out.append(
            encode(
                Quote(
                    ts=T0 + i * 1_000,
                    symbol=f"SYM{i % 500}",
                    bid=bid,
                    ask=bid + Decimal("0.01"),
                    bid_size=Decimal(100 * (1 + i % 9)),
                    ask_size=Decimal(100 * (1 + i % 7)),
                    venue=("XNAS", "XNYS", "BATS")[i % 3],
                )
            )
        )
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def publish(url: str, subject: str, payloads: list[bytes]) -> float:
    """Core-NATS publish of every payload; returns the seconds it took.

    nats-py, flushed (PING/PONG) every 10,000 messages. A leaner publisher (pre-built
    PUB frames written in chunks) was tried: at ~200,000 msg/s un-acknowledged core
    publishes into JetStream were dropped by the server, so it would need PubAck flow
    control to be a fair load generator.
    """
    nc = await nats.connect(url, pending_size=256 * 1024 * 1024)
    started = time.perf_counter()
    for i, data in enumerate(payloads):
        await nc.publish(subject, data)
        if i % 10_000 == 9_999:
            await nc.flush()
    await nc.flush()
    elapsed = time.perf_counter() - started
    await nc.close()
    return elapsed


async def wait_count(qdb: QuestDBClient, table: str, n: int, timeout: float) -> tuple[float, int]:
    """Poll `count()` until it reaches `n`; (perf_counter when it did, last count)."""
    deadline = time.monotonic() + timeout
    count = 0
    while True:
        try:
            count = int((await qdb.query(f"SELECT count() FROM {table}")).scalar())
        except Exception:  # noqa: BLE001 - the table may not be visible yet
            count = 0
        if count >= n:
            return time.perf_counter(), count
        if time.monotonic() > deadline:
            return time.perf_counter(), count
        await asyncio.sleep(0.1)  # gently: the count is a query QuestDB runs while it ingests


async def exactness(qdb: QuestDBClient, table: str, sent: int) -> dict:
    await qdb.wait_visible(table, 0, timeout=60)  # every committed transaction applied
    rows, distinct = (await qdb.query(f"SELECT count(), count_distinct(stream_seq) FROM {table}")).rows[0]
    return {"rows_in_questdb": rows, "duplicates": rows - distinct, "lost": sent - distinct}


async def delete_stream(url: str, name: str) -> None:
    nc = await nats.connect(url)
    try:
        await nc.jetstream().delete_stream(name)
    except Exception:  # noqa: BLE001 - already gone
        pass
    await nc.close()


# -- 1. the service ------------------------------------------------------------------------


async def run_service(ep: stack.Endpoints, payloads: list[bytes], batch: int, interval: float) -> dict:
    suffix = uuid.uuid4().hex[:8]
    stream, table, subject = f"BENCH_QW_{suffix}", f"bench_quotes_{suffix}", f"benchqw{suffix}.quotes.x"
    port = free_port()
    env = {**os.environ, **ep.service_env()}
    env.update(
        {
            "POSTTRADE_QUESTDB_WRITER__SERVICE__NAME": f"bench_qw_{suffix}",
            "POSTTRADE_QUESTDB_WRITER__SERVICE__HOST": "127.0.0.1",
            "POSTTRADE_QUESTDB_WRITER__SERVICE__PORT": str(port),
            "POSTTRADE_QUESTDB_WRITER__SERVICE__LOG_LEVEL": "WARNING",
            "POSTTRADE_QUESTDB_WRITER__BATCH__SIZE": str(batch),
            "POSTTRADE_QUESTDB_WRITER__BATCH__INTERVAL_SEC": str(interval),
            "POSTTRADE_QUESTDB_WRITER__RUNTIME__MAX_ACK_PENDING": str(max(20_000, 4 * batch)),
        }
    )
    for route in LAYOUTS:
        prefix = f"POSTTRADE_QUESTDB_WRITER__WRITER__ROUTES__{route.upper()}__"
        env[prefix + "ENABLED"] = "true" if route == "quotes" else "false"
    env["POSTTRADE_QUESTDB_WRITER__WRITER__ROUTES__QUOTES__STREAM"] = stream
    env["POSTTRADE_QUESTDB_WRITER__WRITER__ROUTES__QUOTES__SUBJECTS"] = f"benchqw{suffix}.quotes.>"
    env["POSTTRADE_QUESTDB_WRITER__WRITER__ROUTES__QUOTES__TABLE"] = table
    log = Path(tempfile.gettempdir()) / f"bench_writer_{suffix}.log"
    qdb = QuestDBClient(host=ep.questdb_host, port=ep.questdb_http_port)
    with log.open("wb") as out:
        worker = subprocess.Popen(
            [sys.executable, "-m", "posttrade.cli", "worker", "questdb_writer", "--config", str(CONFIG_FILE)],
            env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            deadline = time.monotonic() + 60
            while True:  # healthy: connected, stream declared, table created
                try:
                    if (await http.get("/health")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline or worker.poll() is not None:
                    raise RuntimeError(f"writer did not become healthy; see {log}")
                await asyncio.sleep(0.2)
            cpu_before = cpu_seconds(worker.pid)
            started = time.perf_counter()
            publish_task = asyncio.create_task(publish(ep.nats_url, subject, payloads))
            done_at, count = await wait_count(qdb, table, len(payloads), timeout=600)
            cpu_s = cpu_seconds(worker.pid) - cpu_before
            publish_s = await publish_task
            stats = (await http.get("/stats")).json()
        elapsed = done_at - started
        result = {
            "rows_sent": len(payloads),
            "rows_per_s": round(count / elapsed),
            "seconds": round(elapsed, 2),
            "publish_rows_per_s": round(len(payloads) / publish_s),
            # The writer process's own CPU per row, whatever else the machine ran meanwhile;
            # rows per CPU-second is what it would do with a core of its own.
            "writer_cpu_us_per_row": round(cpu_s / len(payloads) * 1e6, 2),
            "writer_rows_per_cpu_s": round(len(payloads) / cpu_s),
            **await exactness(qdb, table, len(payloads)),
        }
        table_stats = stats["tables"][table]
        result["writer_stats"] = {
            "batches": table_stats["batches"],
            "batch_size_mean": table_stats["batch_size"]["mean"],
            "batch_size_max": table_stats["batch_size"]["max"],
            "flush_latency_ms_p50": table_stats["flush_latency_ms"]["p50"],
            "flush_latency_ms_p99": table_stats["flush_latency_ms"]["p99"],
            "errors": table_stats["errors"],
            "retries": table_stats["retries"],
            "dead_lettered": table_stats["dead_lettered"],
        }
        return result
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
        await qdb.drop_table(table)
        await qdb.close()
        await delete_stream(ep.nats_url, stream)


# -- 2. the naive baseline -------------------------------------------------------------------


async def run_naive(ep: stack.Endpoints, payloads: list[bytes]) -> dict:
    """Write each message as it arrives: one request per row, acknowledged after it."""
    suffix = uuid.uuid4().hex[:8]
    stream, table, subject = f"BENCH_QWN_{suffix}", f"bench_naive_{suffix}", f"benchqwn{suffix}.quotes.x"
    qdb = QuestDBClient(host=ep.questdb_host, port=ep.questdb_http_port)
    writer = QuestDBWriter(host=ep.questdb_host, port=ep.questdb_http_port, retry_timeout_ms=0)
    await qdb.create_table(table, LAYOUT.table_columns, dedup_keys=LAYOUT.dedup_keys)
    app = App(f"bench_qwn_{suffix}", NatsTransport(ep.nats_url))
    quotes = app.channel("quotes", stream=stream, subjects=[f"benchqwn{suffix}.>"], value_type=Quote)

    @app.agent(quotes)
    async def write_each(s):
        async for record in s.events():
            quote = record.value
            row = {c.name: record.seq if c.kind == "stream_seq" else getattr(quote, c.name) for c in LAYOUT.columns}
            await writer.write_batch(table, [row], symbols=LAYOUT.symbols)

    try:
        async with app:
            started = time.perf_counter()
            await publish(ep.nats_url, subject, payloads)
            done_at, count = await wait_count(qdb, table, len(payloads), timeout=600)
        elapsed = done_at - started
        return {
            "rows_sent": len(payloads),
            "rows_per_s": round(count / elapsed),
            "seconds": round(elapsed, 2),
            **await exactness(qdb, table, len(payloads)),
        }
    finally:
        await writer.close()
        await qdb.drop_table(table)
        await qdb.close()
        await delete_stream(ep.nats_url, stream)


# -- 3. where the time goes ----------------------------------------------------------------------


async def profile_stages(ep: stack.Endpoints, payloads: list[bytes], batch: int) -> dict:
    """Microseconds per row of each stage, on the same messages, in batches of `batch`."""
    suffix = uuid.uuid4().hex[:8]
    table = f"bench_stages_{suffix}"
    qdb = QuestDBClient(host=ep.questdb_host, port=ep.questdb_http_port)
    await qdb.create_table(table, LAYOUT.table_columns, dedup_keys=LAYOUT.dedup_keys)
    writer = QuestDBWriter(host=ep.questdb_host, port=ep.questdb_http_port, retry_timeout_ms=0)
    sender = questdb.Sender(questdb.Protocol.Http, ep.questdb_host, ep.questdb_http_port, auto_flush=False)
    sender.establish()
    n = len(payloads)
    try:
        # CPU stages on this thread's CPU clock (robust to a busy machine); the request on
        # the wall clock (it waits for QuestDB).
        started = time.thread_time()
        events = [decode(Quote, raw) for raw in payloads]
        decode_s = time.thread_time() - started
        records = [EventRecord(e, "S", i + 1, "x", 0, 1, None) for i, e in enumerate(events)]
        batches = [records[i : i + batch] for i in range(0, n, batch)]
        build_s = serialise_s = write_s = 0.0
        for part in batches:
            t0 = time.thread_time()
            columns = LAYOUT.build_columns(part)
            t1 = time.thread_time()
            # What the writer does before the request: a DataFrame, then ILP bytes.
            frame = pd.DataFrame({**columns, "ts": columns["ts"].astype("datetime64[ns]")}, copy=False)
            buffer = sender.new_buffer()
            buffer.dataframe(frame, table_name=table, symbols=LAYOUT.symbols, at="ts")
            t2 = time.thread_time()
            wall = time.perf_counter()
            writer.write_batch_sync(table, columns, symbols=LAYOUT.symbols)  # serialise + HTTP + commit
            write_s += time.perf_counter() - wall
            build_s += t1 - t0
            serialise_s += t2 - t1
    finally:
        sender.close()
        writer.close_sync()
        await qdb.drop_table(table)
        await qdb.close()
    http_s = max(0.0, write_s - serialise_s)
    noop_wall, noop_cpu = await runtime_ceiling(ep, payloads, batch)
    per_row = lambda seconds: round(seconds / n * 1e6, 2)  # noqa: E731
    return {
        "rows": n,
        "batch": batch,
        "decode_validate_us_per_row": per_row(decode_s),
        "build_columns_us_per_row": per_row(build_s),
        "serialise_ilp_us_per_row": per_row(serialise_s),
        "http_and_commit_us_per_row": per_row(http_s),
        "runtime_noop_agent_events_per_s": round(noop_wall),
        "runtime_noop_agent_cpu_us_per_event": round(noop_cpu / n * 1e6, 2),
    }


async def runtime_ceiling(ep: stack.Endpoints, payloads: list[bytes], batch: int) -> tuple[float, float]:
    """A no-op agent draining the stream through the runtime (NATS pull, decode, ack):
    (events per wall second, CPU seconds this process spent)."""
    suffix = uuid.uuid4().hex[:8]
    stream, subject = f"BENCH_QWR_{suffix}", f"benchqwr{suffix}.quotes.x"
    app = App(f"bench_qwr_{suffix}", NatsTransport(ep.nats_url))
    app.runtime.max_ack_pending = max(20_000, 4 * batch)
    quotes = app.channel("quotes", stream=stream, subjects=[f"benchqwr{suffix}.>"], value_type=Quote)
    done = asyncio.Event()
    seen = 0

    @app.agent(quotes, batch_size=batch)
    async def drain(s):
        nonlocal seen
        async for records in s.take_events(batch, within=1.0):
            seen += len(records)
            if seen >= len(payloads):
                done.set()

    try:
        await app.transport.connect()
        await app.transport.ensure_stream(quotes.stream)
        await publish(ep.nats_url, subject, payloads)  # preloaded: the agent's rate alone
        nc = await nats.connect(ep.nats_url)
        while (await nc.jetstream().stream_info(stream)).state.messages < len(payloads):
            await asyncio.sleep(0.05)
        await nc.close()
        async with app:
            started, cpu = time.perf_counter(), time.process_time()
            await asyncio.wait_for(done.wait(), timeout=600)
            elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
        return len(payloads) / elapsed, cpu
    finally:
        await delete_stream(ep.nats_url, stream)


# -- main ----------------------------------------------------------------------------------------


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=shipped_batch_size(), help="batch.size (default: the shipped config's)")
    parser.add_argument("--interval", type=float, default=1.0, help="batch.interval_sec")
    parser.add_argument(
        "--also-batch", type=int, default=1000, help="run the writer again with this batch.size (0: skip)"
    )
    parser.add_argument("--baseline-rows", type=int, default=2_000)
    parser.add_argument("--profile-rows", type=int, default=50_000)
    args = parser.parse_args()
    ep = stack.endpoints()
    payloads = quote_payloads(args.rows)
    load_before = os.getloadavg()[0]

    service = await run_service(ep, payloads, args.batch, args.interval)
    other = await run_service(ep, payloads, args.also_batch, args.interval) if args.also_batch else None
    naive = await run_naive(ep, payloads[: args.baseline_rows])
    stages = await profile_stages(ep, payloads[: args.profile_rows], args.batch)

    # Per row the stages add up to the writer's CPU (the QuestDB request overlaps with
    # taking the next batch, but everything else shares the one Python thread); the
    # largest one bounds.
    serial_stages = {
        "runtime: NATS pull + decode/validate + ack (CPU)": stages["runtime_noop_agent_cpu_us_per_event"],
        "sink: building the columns (CPU)": stages["build_columns_us_per_row"],
        "sink: serialising ILP (CPU)": stages["serialise_ilp_us_per_row"],
        "QuestDB request: HTTP + parse + WAL commit (wall)": stages["http_and_commit_us_per_row"],
    }
    stages["serial_us_per_row"] = round(sum(serial_stages.values()), 2)
    stages["bottleneck"] = max(serial_stages, key=serial_stages.get)
    result = {
        "rows_per_s": service["rows_per_s"],
        "rows_sent": service["rows_sent"],
        "rows_in_questdb": service["rows_in_questdb"],
        "duplicates": service["duplicates"],
        "lost": service["lost"],
        "seconds": service["seconds"],
        "publish_rows_per_s": service["publish_rows_per_s"],
        "writer_cpu_us_per_row": service["writer_cpu_us_per_row"],
        "writer_rows_per_cpu_s": service["writer_rows_per_cpu_s"],
        "batch_size": args.batch,
        "batch_interval_sec": args.interval,
        "writer_stats": service["writer_stats"],
        "other_batch_size": other and {"batch_size": args.also_batch, **other},
        "naive_baseline": naive,
        "speedup_over_naive": round(service["rows_per_s"] / max(1, naive["rows_per_s"]), 1),
        "stages": stages,
        "goal_rows_per_s": GOAL_ROWS_PER_S,
        "floor_rows_per_s": FLOOR_ROWS_PER_S,
        "event": "Quote (8 columns: TIMESTAMP_NS, 2 SYMBOL, 4 DECIMAL(38,12), LONG)",
        "cpus": os.cpu_count(),
        # The machine is shared: the 1-minute load average says how contended the run was.
        "load_average_1m": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")

    print(f"{'run':<26}{'rows':>9}{'rows/s':>10}{'in QuestDB':>12}{'dups':>6}{'lost':>6}")
    print(f"{'writer (batch ' + str(args.batch) + ')':<26}{service['rows_sent']:>9}{service['rows_per_s']:>10,}{service['rows_in_questdb']:>12}{service['duplicates']:>6}{service['lost']:>6}")  # fmt: skip
    if other:
        print(f"{'writer (batch ' + str(args.also_batch) + ')':<26}{other['rows_sent']:>9}{other['rows_per_s']:>10,}{other['rows_in_questdb']:>12}{other['duplicates']:>6}{other['lost']:>6}")  # fmt: skip
    print(f"{'naive (a request per row)':<26}{naive['rows_sent']:>9}{naive['rows_per_s']:>10,}{naive['rows_in_questdb']:>12}{naive['duplicates']:>6}{naive['lost']:>6}")  # fmt: skip
    ws = service["writer_stats"]
    print(f"writer: {ws['batches']} batches, mean {ws['batch_size_mean']} rows, flush p50 {ws['flush_latency_ms_p50']} ms, p99 {ws['flush_latency_ms_p99']} ms")  # fmt: skip
    print("per row (us):  decode+validate {decode_validate_us_per_row}  build {build_columns_us_per_row}  "
          "serialise {serialise_ilp_us_per_row}  http+commit {http_and_commit_us_per_row}".format(**stages))  # fmt: skip
    print(f"writer process CPU: {service['writer_cpu_us_per_row']} us/row = {service['writer_rows_per_cpu_s']:,} rows per CPU-second")  # fmt: skip
    print(f"runtime alone (no-op agent): {stages['runtime_noop_agent_events_per_s']:,} events/s, {stages['runtime_noop_agent_cpu_us_per_event']} CPU us/event")  # fmt: skip
    print(f"bottleneck: {stages['bottleneck']}")
    print(f"load average (1 min) before/after: {load_before:.2f}/{os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    print(f"(goal: >= {GOAL_ROWS_PER_S:,} rows/s, floor {FLOOR_ROWS_PER_S:,}) -> {RESULTS}")


if __name__ == "__main__":
    asyncio.run(main())
