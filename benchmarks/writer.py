"""questdb_writer end to end: quotes published on NATS → rows in QuestDB, sustained, against
what QuestDB's own Python client does with the same rows.

Runs against the local stack (the env of `posttrade stack env`), on its own stream and
table names (dropped after). Every run of the writer is the real service (`python -m
posttrade.cli worker questdb_writer`, only the quotes route, batch.size/interval from
the flags) as a subprocess; every run ends with the exactness check: duplicates (rows -
distinct stream sequences) and lost (published - distinct stream sequences).

1. sustained (the headline): a live publisher sends quotes at a steady `--rate` (default
   the goal, 100,000 a second; core NATS publishes, paced in 10 ms ticks, payloads
   encoded beforehand) for `--seconds` (60 or more for the figure) while the writer
   writes. `rows_per_s` is what the writer wrote per second over the publishing window
   after `--settle` seconds (from its /stats, sampled every second; the samples are
   kept as `timeline`), so a backlog drained after the publisher stops is not in it.
   When that is below what the publisher achieved (`kept_up` false) it is the writer's
   capacity under a live load on this machine; when the writer kept up it is only the
   offered rate: raise `--rate`. The writer process's CPU per row is taken from the
   publish's start until the last row is in QuestDB; beside it the stack's NATS and
   QuestDB (`server_*`, shared servers: whatever else used them meanwhile counts too)
   and this process (the publisher).
2. the limit, in the same run: QuestDB's own Python client (`questdb.Sender` over
   ILP/HTTP, `dataframe()` then `flush()` per chunk of `--limit-batch` rows, default the
   writer's batch.size) ingesting the same rows (the same quotes and stream sequences,
   decoded and laid out as the writer lays them out, in pandas DataFrames built before
   the clock starts) into a table of the same layout and dedup keys, on one thread:
   rows/s from the first `dataframe()` to the last `flush()` answered, that thread's
   CPU per row and QuestDB's. `writer_over_limit` is the writer's rows/s over it,
   `writer_cpu_over_limit` its CPU per row over the client thread's (the fair figure
   when the writer kept up).
   With `--repeats N` both run N times, alternating which goes first; the figures are
   medians (ratios: the median of the per-repeat ratios) and every run is kept.
3. burst (`--rows`, 0 skips it): all rows published as fast as nats-py can while the
   writer writes (it mostly drains a backlog), once with the shipped batch.size and
   once with `--also-batch` (default 1000, the platform's config example); the clock
   stops when `SELECT count()` reaches the number published.
4. naive baseline: the same messages through an agent that writes each message as it
   arrives (one ILP/HTTP request per row), fewer of them (it is slow).
5. where the time goes, per row, measured stage by stage in this process on the same
   messages: decoding + validating (the runtime's work before the agent sees an event),
   building the columns, serialising to ILP (CPU time of this thread), the HTTP request
   with QuestDB's commit (wall time), and the runtime alone (a no-op agent draining the
   stream: CPU per event) as the transport's ceiling.

Writes benchmarks/results/writer.json and prints a table, with the 1-minute load average
at the start and the end (and at each sustained and limit run's). At the defaults the
rows (6,000,000) take about a minute to encode and lay out and a few GB of memory, and
the whole run about five minutes.

    python benchmarks/writer.py [--rate 100000] [--seconds 60] [--settle 5] [--repeats 1] [--limit-batch N]
                                [--rows 200000] [--batch N] [--also-batch 1000] [--baseline-rows 2000]
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
from contextlib import asynccontextmanager
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import httpx
import nats
import nats.js.errors
import pandas as pd
import questdb

from posttrade import stack
from posttrade.app import App
from posttrade.stores.questdb import QuestDBClient, QuestDBWriter
from posttrade.stores.questdb.layouts import LAYOUTS
from posttrade.streams.events import Quote, decode, encode
from posttrade.streams.nats import NatsTransport
from posttrade.streams.stream import EventRecord

from _proc_cpu import CpuMeter, cpu_seconds, stack_server_pids  # benchmarks/_proc_cpu.py (on sys.path)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "writer.json"
CONFIG_FILE = ROOT / "config" / "backend" / "questdb_writer" / "config.yaml"
T0 = 1_700_000_000_000_000_000
GOAL_ROWS_PER_S = 100_000
FLOOR_ROWS_PER_S = 10_000
LAYOUT = LAYOUTS["quotes"]
TICK_S = 0.010  # the paced publisher's tick
KEPT_UP = 0.97  # written / published over the window at or above this: the writer kept up


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


def median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


async def publish(url: str, subject: str, payloads: list[bytes]) -> float:
    """Core-NATS publish of every payload as fast as nats-py goes; returns the seconds it took.

    Flushed (PING/PONG) every 10,000 messages. A leaner publisher (pre-built PUB frames
    written in chunks) was tried: at ~200,000 msg/s un-acknowledged core publishes into
    JetStream were dropped by the server, so it would need PubAck flow control to be a
    fair load generator.
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


class PacedPublisher:
    """Core-NATS publishes at `rate` a second: every 10 ms tick the messages due by then,
    then a flush (PING/PONG), then a sleep to the next tick. A publisher that falls
    behind (a busy machine) catches up in the next ticks rather than lowering the rate."""

    def __init__(self, url: str, subject: str, payloads: list[bytes], rate: int):
        self.url, self.subject, self.payloads, self.rate = url, subject, payloads, rate
        self.sent = 0
        self.started = self.finished = 0.0

    async def run(self) -> None:
        nc = await nats.connect(self.url, pending_size=256 * 1024 * 1024)
        payloads, subject, n = self.payloads, self.subject, len(self.payloads)
        self.started = time.perf_counter()
        tick = 0
        try:
            while self.sent < n:
                tick += 1
                due = min(n, round(self.rate * tick * TICK_S))
                while self.sent < due:
                    await nc.publish(subject, payloads[self.sent])
                    self.sent += 1
                await nc.flush()
                await asyncio.sleep(max(0.0, self.started + tick * TICK_S - time.perf_counter()))
            self.finished = time.perf_counter()
        finally:
            await nc.close()


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


async def stream_messages(url: str, name: str) -> int:
    nc = await nats.connect(url)
    try:
        return (await nc.jetstream().stream_info(name)).state.messages
    except nats.js.errors.NotFoundError:
        return 0
    finally:
        await nc.close()


def load_1m() -> float:
    return round(os.getloadavg()[0], 2)


# -- the service -------------------------------------------------------------------------


@dataclass
class WriterUnderTest:
    """A questdb_writer process with its own stream, subject and table."""

    worker: subprocess.Popen
    http: httpx.AsyncClient
    qdb: QuestDBClient
    stream: str
    subject: str
    table: str

    async def stats(self) -> dict:
        return (await self.http.get("/stats")).json()

    def table_stats(self, stats: dict) -> dict:
        table_stats = stats["tables"][self.table]
        return {
            "batches": table_stats["batches"],
            "batch_size_mean": table_stats["batch_size"]["mean"],
            "batch_size_max": table_stats["batch_size"]["max"],
            "flush_latency_ms_p50": table_stats["flush_latency_ms"]["p50"],
            "flush_latency_ms_p99": table_stats["flush_latency_ms"]["p99"],
            "errors": table_stats["errors"],
            "retries": table_stats["retries"],
            "dead_lettered": table_stats["dead_lettered"],
        }


@asynccontextmanager
async def writer_under_test(ep: stack.Endpoints, batch: int, interval: float, label: str):
    """Start the writer on a stream and table of its own; stop it, drop both after."""
    suffix = uuid.uuid4().hex[:8]
    stream, table, subject = f"BENCH_QW_{suffix}", f"bench_{label}_{suffix}", f"benchqw{suffix}.quotes.x"
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
            yield WriterUnderTest(worker, http, qdb, stream, subject, table)
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
        await qdb.drop_table(table)
        await qdb.close()
        await delete_stream(ep.nats_url, stream)
    log.unlink(missing_ok=True)  # kept only when the run failed


# -- 1. sustained, with a live publisher ---------------------------------------------------


async def run_sustained(ep: stack.Endpoints, payloads: list[bytes], rate: int, settle: float, batch: int,
                        interval: float) -> dict:
    """The writer while a publisher sends `payloads` at `rate` a second."""
    async with writer_under_test(ep, batch, interval, "sustained") as writer:
        load_start = load_1m()
        meter = CpuMeter({"writer": writer.worker.pid,
                          **{f"server_{name}": pid for name, pid in stack_server_pids(ep, ("nats", "questdb")).items()}})
        publisher = PacedPublisher(ep.nats_url, writer.subject, payloads, rate)
        timeline: list[tuple[float, int, int]] = []  # (s since the publish started, published, written)
        meter.start()
        own_cpu = time.process_time()
        publishing = asyncio.create_task(publisher.run())
        while not publishing.done():
            await asyncio.wait([publishing], timeout=1.0)
            if publisher.started:  # connected and publishing
                rows = (await writer.stats())["totals"]["rows"]
                timeline.append((round(time.perf_counter() - publisher.started, 3), publisher.sent, rows))
        await publishing  # raises what the publisher raised
        publish_s = publisher.finished - publisher.started
        load_publish_end = load_1m()
        done_at, _ = await wait_count(writer.qdb, writer.table, len(payloads), timeout=900)
        cpu = meter.stop()
        own_cpu = time.process_time() - own_cpu
        drain_s = max(0.0, done_at - publisher.finished)
        stats = await writer.stats()
        in_stream = await stream_messages(ep.nats_url, writer.stream)
        exact = await exactness(writer.qdb, writer.table, len(payloads))
    # The window: from the first sample after `settle` seconds to the last one taken while
    # the publisher was still at it.
    window = [sample for sample in timeline if settle <= sample[0] <= publish_s] or timeline
    (t0, sent0, rows0), (t1, sent1, rows1) = window[0], window[-1]
    span = max(t1 - t0, 1e-9)
    written_per_s, published_per_s = (rows1 - rows0) / span, (sent1 - sent0) / span
    n = len(payloads)
    per_row = lambda seconds: round(seconds / n * 1e6, 2)  # noqa: E731
    return {
        "rows_per_s": round(written_per_s),
        "offered_rows_per_s": rate,
        "publish_rows_per_s": round(published_per_s),  # what the publisher achieved in the window
        "kept_up": written_per_s >= KEPT_UP * published_per_s,
        "window_s": round(span, 1),
        "publish_s": round(publish_s, 1),
        "backlog_rows_at_publish_end": max(0, sent1 - rows1),
        "drain_s_after_publish": round(drain_s, 2),
        "rows_sent": n,
        "stored_in_stream": in_stream,  # below rows_sent: JetStream dropped core publishes
        **exact,
        "writer_cpu_us_per_row": per_row(cpu["writer"]),
        "writer_rows_per_cpu_s": round(n / cpu["writer"]) if cpu.get("writer") else None,
        **{f"{name}_cpu_us_per_row": per_row(used) for name, used in cpu.items() if name != "writer"},
        "publisher_process_cpu_us_per_row": per_row(own_cpu),
        "writer_stats": writer.table_stats(stats),
        "load_average_1m": {"start": load_start, "publish_end": load_publish_end, "end": load_1m()},
        "timeline": timeline,
    }


# -- 2. the limit: QuestDB's own client on one thread, the same rows -----------------------------------


def dataframe_chunks(payloads: list[bytes], size: int) -> list[pd.DataFrame]:
    """The rows as the writer lays them out (stream sequences 1..n, as in a fresh stream),
    in DataFrames of `size` rows."""
    chunks = []
    for start in range(0, len(payloads), size):
        records = [EventRecord(decode(Quote, raw), "S", start + i + 1, "x", 0, 1, None)
                   for i, raw in enumerate(payloads[start : start + size])]
        columns = LAYOUT.build_columns(records)
        chunks.append(pd.DataFrame({**columns, "ts": columns["ts"].astype("datetime64[ns]")}, copy=False))
    return chunks


def ingest_on_one_thread(ep: stack.Endpoints, table: str, chunks: list[pd.DataFrame]) -> tuple[float, float]:
    """`Sender.dataframe` + `flush` per chunk over ILP/HTTP: (wall seconds, this thread's CPU seconds)."""
    with questdb.Sender(questdb.Protocol.Http, ep.questdb_host, ep.questdb_http_port, auto_flush=False) as sender:
        started, cpu = time.perf_counter(), time.thread_time()
        for frame in chunks:
            sender.dataframe(frame, table_name=table, symbols=LAYOUT.symbols, at="ts")
            sender.flush()
        return time.perf_counter() - started, time.thread_time() - cpu


async def run_limit(ep: stack.Endpoints, chunks: list[pd.DataFrame]) -> dict:
    table = f"bench_limit_{uuid.uuid4().hex[:8]}"
    n = sum(len(frame) for frame in chunks)
    qdb = QuestDBClient(host=ep.questdb_host, port=ep.questdb_http_port)
    try:
        # The writer's table: the same columns, partitioning and dedup keys (QuestDBSink.ensure_table).
        await qdb.create_table(table, LAYOUT.table_columns, timestamp="ts", partition_by="DAY",
                               dedup_keys=LAYOUT.dedup_keys, wal=True)
        load_start = load_1m()
        meter = CpuMeter({f"server_{name}": pid for name, pid in stack_server_pids(ep, ("questdb",)).items()})
        meter.start()
        wall, cpu = ingest_on_one_thread(ep, table, chunks)
        server = meter.stop()
        exact = await exactness(qdb, table, n)
        return {
            "rows_per_s": round(n / wall),
            "rows_sent": n,
            "seconds": round(wall, 2),
            "chunk_rows": len(chunks[0]) if chunks else 0,
            "chunks": len(chunks),
            "client_cpu_us_per_row": round(cpu / n * 1e6, 2),
            **{f"{name}_cpu_us_per_row": round(used / n * 1e6, 2) for name, used in server.items()},
            **exact,
            "load_average_1m": {"start": load_start, "end": load_1m()},
        }
    finally:
        await qdb.drop_table(table)
        await qdb.close()


# -- 3. burst: everything published at once ------------------------------------------------------


async def run_service(ep: stack.Endpoints, payloads: list[bytes], batch: int, interval: float) -> dict:
    async with writer_under_test(ep, batch, interval, "quotes") as writer:
        cpu_before = cpu_seconds(writer.worker.pid)
        started = time.perf_counter()
        publish_task = asyncio.create_task(publish(ep.nats_url, writer.subject, payloads))
        done_at, count = await wait_count(writer.qdb, writer.table, len(payloads), timeout=600)
        cpu_s = cpu_seconds(writer.worker.pid) - cpu_before
        publish_s = await publish_task
        stats = await writer.stats()
        elapsed = done_at - started
        return {
            "rows_sent": len(payloads),
            "rows_per_s": round(count / elapsed),
            "seconds": round(elapsed, 2),
            "publish_rows_per_s": round(len(payloads) / publish_s),
            # The writer process's own CPU per row, whatever else the machine ran meanwhile;
            # rows per CPU-second is what it would do with a core of its own.
            "writer_cpu_us_per_row": round(cpu_s / len(payloads) * 1e6, 2),
            "writer_rows_per_cpu_s": round(len(payloads) / cpu_s),
            **await exactness(writer.qdb, writer.table, len(payloads)),
            "writer_stats": writer.table_stats(stats),
        }


# -- 4. the naive baseline -------------------------------------------------------------------


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


# -- 5. where the time goes ----------------------------------------------------------------------


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


async def sustained_and_limit(ep: stack.Endpoints, args) -> dict:
    """`--repeats` pairs of (sustained writer run, limit run) on the same rows, the order
    alternating; the medians, the per-repeat ratios and every run."""
    n = round(args.rate * args.seconds)
    started = time.perf_counter()
    payloads = quote_payloads(n)
    chunks = dataframe_chunks(payloads, args.limit_batch)
    print(f"{n:,} quotes encoded and laid out in DataFrames in {time.perf_counter() - started:.1f} s")
    sustained: list[dict] = []
    limits: list[dict] = []
    for i in range(args.repeats):
        for part in ("sustained", "limit") if i % 2 == 0 else ("limit", "sustained"):
            if part == "sustained":
                run = await run_sustained(ep, payloads, args.rate, args.settle, args.batch, args.interval)
                sustained.append(run)
                print(f"  sustained {i + 1}/{args.repeats}: {run['rows_per_s']:,} rows/s written "
                      f"(published {run['publish_rows_per_s']:,}/s, kept up: {run['kept_up']}), "
                      f"{run['writer_cpu_us_per_row']} writer CPU µs/row, lost {run['lost']}, dups {run['duplicates']} "
                      f"(load {run['load_average_1m']['start']} -> {run['load_average_1m']['end']})")
            else:
                run = await run_limit(ep, chunks)
                limits.append(run)
                print(f"  limit {i + 1}/{args.repeats}: {run['rows_per_s']:,} rows/s, "
                      f"{run['client_cpu_us_per_row']} client CPU µs/row, lost {run['lost']}, dups {run['duplicates']} "
                      f"(load {run['load_average_1m']['start']} -> {run['load_average_1m']['end']})")
    rows_ratio = [s["rows_per_s"] / limit["rows_per_s"] for s, limit in zip(sustained, limits)]
    cpu_ratio = [s["writer_cpu_us_per_row"] / limit["client_cpu_us_per_row"] for s, limit in zip(sustained, limits)]
    pick = lambda runs, key: median([run[key] for run in runs])  # noqa: E731
    return {
        "rows_per_s": round(pick(sustained, "rows_per_s")),
        "offered_rows_per_s": args.rate,
        "publish_rows_per_s": round(pick(sustained, "publish_rows_per_s")),
        "kept_up": all(run["kept_up"] for run in sustained),
        "sustained_seconds": args.seconds,
        "settle_seconds": args.settle,
        "rows_sent": n,
        "writer_cpu_us_per_row": round(pick(sustained, "writer_cpu_us_per_row"), 2),
        "writer_rows_per_cpu_s": round(pick(sustained, "writer_rows_per_cpu_s")),
        "limit_rows_per_s": round(pick(limits, "rows_per_s")),
        "limit_client_cpu_us_per_row": round(pick(limits, "client_cpu_us_per_row"), 2),
        "limit_batch": args.limit_batch,
        "writer_over_limit": round(median(rows_ratio), 3),
        "writer_cpu_over_limit": round(median(cpu_ratio), 2),
        "repeats": args.repeats,
        "sustained_runs": sustained,
        "limit_runs": limits,
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=int, default=GOAL_ROWS_PER_S, help="rows/s the sustained run's publisher offers")
    parser.add_argument("--seconds", type=float, default=60.0, help="seconds the sustained run publishes (>= 60)")
    parser.add_argument("--settle", type=float, default=5.0, help="seconds of the sustained run left out of its rate")
    parser.add_argument("--repeats", type=int, default=1, help="sustained + limit pairs (medians reported)")
    parser.add_argument("--limit-batch", type=int, default=None,
                        help="rows per flush of QuestDB's client in the limit run (default: --batch)")
    parser.add_argument("--rows", type=int, default=200_000, help="rows of the burst runs (0: skip them)")
    parser.add_argument("--batch", type=int, default=shipped_batch_size(), help="batch.size (default: the shipped config's)")
    parser.add_argument("--interval", type=float, default=1.0, help="batch.interval_sec")
    parser.add_argument(
        "--also-batch", type=int, default=1000, help="run the burst again with this batch.size (0: skip)"
    )
    parser.add_argument("--baseline-rows", type=int, default=2_000)
    parser.add_argument("--profile-rows", type=int, default=50_000)
    args = parser.parse_args()
    args.limit_batch = args.limit_batch or args.batch
    if args.rate < 1 or args.seconds <= args.settle or args.repeats < 1:
        parser.error("--rate and --repeats must be positive and --seconds above --settle")
    ep = stack.endpoints()
    load_before = load_1m()

    headline = await sustained_and_limit(ep, args)
    burst_payloads = quote_payloads(max(args.rows, args.baseline_rows, args.profile_rows))
    service = await run_service(ep, burst_payloads[: args.rows], args.batch, args.interval) if args.rows else None
    other = (await run_service(ep, burst_payloads[: args.rows], args.also_batch, args.interval)
             if args.rows and args.also_batch else None)  # fmt: skip
    naive = await run_naive(ep, burst_payloads[: args.baseline_rows])
    stages = await profile_stages(ep, burst_payloads[: args.profile_rows], args.batch)

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
    every_run = [*headline["sustained_runs"], *headline["limit_runs"], *filter(None, (service, other)), naive]
    result = {
        **{k: v for k, v in headline.items() if k not in ("sustained_runs", "limit_runs")},
        # Over every run of this invocation (sustained, limit, burst, naive); each run has its own.
        "lost": sum(run["lost"] for run in every_run),
        "duplicates": sum(run["duplicates"] for run in every_run),
        "batch_size": args.batch,
        "batch_interval_sec": args.interval,
        "sustained_runs": headline["sustained_runs"],
        "limit_runs": headline["limit_runs"],
        "burst": service and {"batch_size": args.batch, **service},
        "other_batch_size": other and {"batch_size": args.also_batch, **other},
        "naive_baseline": naive,
        "speedup_over_naive": round(headline["rows_per_s"] / max(1, naive["rows_per_s"]), 1),
        "stages": stages,
        "goal_rows_per_s": GOAL_ROWS_PER_S,
        "floor_rows_per_s": FLOOR_ROWS_PER_S,
        "event": "Quote (8 columns: TIMESTAMP_NS, 2 SYMBOL, 4 DECIMAL(38,12), LONG)",
        "cpus": os.cpu_count(),
        # The machine is shared: the 1-minute load average says how contended the run was.
        "load_average_1m": {"before": load_before, "after": load_1m()},
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")

    repeats = f"median of {args.repeats}" if args.repeats > 1 else "one run"
    print(f"\nsustained {args.seconds:g} s at {args.rate:,} rows/s offered, batch {args.batch} ({repeats}):")
    print(f"{'run':<44}{'rows/s':>10}{'CPU µs/row':>12}{'ratio':>8}")
    print(f"{'questdb_writer, live publisher':<44}{headline['rows_per_s']:>10,}{headline['writer_cpu_us_per_row']:>12}"
          f"{headline['writer_over_limit']:>8}  (kept up: {headline['kept_up']}; published {headline['publish_rows_per_s']:,}/s)")
    print(f"{'QuestDB client, DataFrame, one thread':<44}{headline['limit_rows_per_s']:>10,}"
          f"{headline['limit_client_cpu_us_per_row']:>12}{1:>8}  ({args.limit_batch} rows per flush)")
    print(f"writer CPU per row over the client thread's: x{headline['writer_cpu_over_limit']}")
    print(f"\n{'run':<26}{'rows':>9}{'rows/s':>10}{'in QuestDB':>12}{'dups':>6}{'lost':>6}")
    for label, run in [(f"sustained {i + 1}", r) for i, r in enumerate(headline["sustained_runs"])] + \
                      [(f"limit {i + 1}", r) for i, r in enumerate(headline["limit_runs"])] + \
                      ([(f"burst (batch {args.batch})", service)] if service else []) + \
                      ([(f"burst (batch {args.also_batch})", other)] if other else []) + \
                      [("naive (a request per row)", naive)]:
        print(f"{label:<26}{run['rows_sent']:>9}{run['rows_per_s']:>10,}{run['rows_in_questdb']:>12}"
              f"{run['duplicates']:>6}{run['lost']:>6}")
    ws = result["sustained_runs"][0]["writer_stats"]
    print(f"sustained writer: {ws['batches']} batches, mean {ws['batch_size_mean']} rows, "
          f"flush p50 {ws['flush_latency_ms_p50']} ms, p99 {ws['flush_latency_ms_p99']} ms")
    print("per row (us):  decode+validate {decode_validate_us_per_row}  build {build_columns_us_per_row}  "
          "serialise {serialise_ilp_us_per_row}  http+commit {http_and_commit_us_per_row}".format(**stages))  # fmt: skip
    print(f"runtime alone (no-op agent): {stages['runtime_noop_agent_events_per_s']:,} events/s, {stages['runtime_noop_agent_cpu_us_per_event']} CPU us/event")  # fmt: skip
    print(f"bottleneck: {stages['bottleneck']}")
    print(f"load average (1 min) at start / end: {load_before:.2f} / {result['load_average_1m']['after']:.2f} on {os.cpu_count()} CPUs")
    print(f"(goal: >= {GOAL_ROWS_PER_S:,} rows/s, floor {FLOOR_ROWS_PER_S:,}; lost {result['lost']}, duplicates {result['duplicates']} over every run) -> {RESULTS}")


if __name__ == "__main__":
    asyncio.run(main())
