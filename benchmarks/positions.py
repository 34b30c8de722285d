"""The position core's speed, and fill → /pnl/realtime latency beside the bus's own.

Core: fills/s through the position and P&L core (both methods updated on every fill).

300,000 pre-built random fills (100 symbols, 10 accounts, one symbol with multiplier
50) are applied in chunks of 10,000; each chunk is timed on its own, and the median and
best chunk are reported for `PositionBook.apply_many` (what a batch agent calls) and
`PositionBook.apply` (one fill at a time). Chunk timing keeps a busy neighbour on a
shared machine from hiding the core's own speed; the load average is recorded.

New core against today's (`core_*_vs_*`): `ExecutionBook.receive_many` (what keeps each
position equal to a fresh book over its effective history) and `PositionBook.apply` in a
loop (how ptrc applied fills before it) on the same 20,000 in-order fills (10 accounts x
50 symbols), side by side in one process: `--side-rounds` rounds, the order of the calls
alternating, each call on a fresh book. Reported: each call's median fills/s and the
median of the per-round ratios (the issue's goal: ExecutionBook / apply >= 0.9); also
ExecutionBook against `PositionBook.apply_many`, and `ExecutionBook.receive` one message
at a time (as ptrc's agent calls it).

Late fills (`late_fill_rederive_us`): one key with a 10,000-execution day (one second
apart, default horizon and checkpoint_every); the time of receiving one fill whose ts
places it 1,000 executions before the end, median over `--late-trials` trials (a fresh
book each, its building not timed). For contrast, the same for a fill 9,000 executions
late and for an in-order fill: the cost grows with what follows the late fill.

Latency (needs the local stack): ptrc and pnl run as their own processes
(`posttrade worker`, uniquely named, starting at the end of the shared streams, each
with a chdb path of the run's own). Fills are published at `--rate` per second over 200
positions: first unmeasured, for at least `--warmup` seconds and until the run is in its
steady state (the agents a probe goes through within 100 messages of their stream's
end, every other agent within two seconds' worth: a freshly started pnl first reads the
newest update of every position in the stream, every earlier run's included, writes
them all to Valkey and publishes its first full snapshot), then for `--seconds`, in
which every 20 ms one of them is a *probe* fill for a dedicated account. A poller asks
`/pnl/realtime?account=<probe>` back to back while a probe is unseen; a probe's latency
is from just before its publish to the first answer showing its fill count (an upper
bound: the change became visible somewhere inside that request). The slowest probes are
reported with where their time went. CPU per fill is measured over the probing, for each
service and for the stack's NATS, QuestDB and Valkey (`server_*`: shared servers, so
whatever else used them meanwhile counts too). The run's services are then forgotten on
NATS (`posttrade forget`). Report generation is measured by `benchmarks/reports.py`.

The bus's own latency, in the same run (`bus_latency_ms_*`, and `pnl_over_bus_p50/p99`,
the ratio): two bare no-op JetStream hops beside ptrc and pnl, on the same fills
(`benchmarks/_bus_hops.py`). `forward` stands where ptrc does: a durable pull consumer
on FILLS that republishes every fill unchanged into a stream of the run's and
acknowledges each batch once JetStream stored the copies (as ptrc publishes one
PositionUpdate per fill and acknowledges after they are stored); `count` stands where pnl
does: a durable consumer on that stream that counts the copies per account and
acknowledges. Each is a process of its own, on the project's own transport (the lean
pull protocol, AckPolicy.ALL, the acked publisher) with the runtime's batch size and poll
timeout, but without anything above it (decoding, the position and P&L work, tables,
changelogs, sinks, Starlette). `count` serves the count over a minimal keep-alive
HTTP/1.1 server, and a second poller of the same kind asks it back to back for the same
probes; so both figures include publishing, two stored JetStream hops, an acknowledged
republish and one local HTTP poll, measured from the same publish on the same clock
under the same load, and the ratio is what the services add to the bus. The hops cost
some CPU beside the services (their `bus_*_cpu_us_per_fill`); `--no-bus` leaves them out.

With `--beside-all` the latency is also measured with all six services running:
questdb_writer (writing the run's own tables, dropped after), hot_cache, feast_pipeline
(a Feast data folder of the run's own) and execution_quality start beside ptrc and pnl,
the same way. Runs with ptrc and pnl alone and with all six alternate, each on fresh
services; the six's figures are prefixed `beside_all_`, with the p99 ratio
(`beside_all_pnl_p99_over_alone`) and the other four's CPU per fill
(`beside_all_extra_services_cpu_us_per_fill`): what they cost. `--repeats N` makes N runs
of each configuration; the figures are then medians over the runs (ratios: the median of
the per-run ratios; the slowest probes: those of the run with the median p99), and each
run's headline figures are kept under `latency_runs`.

Writes benchmarks/results/positions.json and prints a table, with the 1-minute load
average at the start and the end (and at each latency run's start, probing and end).

    python benchmarks/positions.py [--fills 300000] [--rate 1000] [--warmup 3] [--seconds 20] [--no-latency]
                                   [--side-fills 20000] [--side-rounds 15] [--late-trials 31]
                                   [--repeats 1] [--beside-all] [--no-bus] [--no-core]

With `--no-latency` the latency fields of the previous results file are kept (marked
`latency_from_previous_run`), so a core-only run does not erase them; with `--no-core`
the core's fields are kept the same way (`core_from_previous_run`).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from operator import itemgetter
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import nats
import nats.js.errors
import yaml

from posttrade import stack
from posttrade.core.history import DEFAULT_CHECKPOINT_EVERY, ExecutionBook
from posttrade.core.positions import PositionBook
from posttrade.stores.questdb import QuestDBClient
from posttrade.streams.events import Fill, encode
from posttrade.streams.nats import forget_apps
from posttrade.streams.subjects import fill_subject, position_subject

from _proc_cpu import CpuMeter, stack_server_pids  # benchmarks/_proc_cpu.py (the script's folder is on sys.path)

RESULTS = Path(__file__).parent / "results" / "positions.json"
CHUNK = 10_000
CAUGHT_UP_LAG = 100  # messages an agent may hold or have pending and count as caught up
LATENCY_PATH = {"ptrc": "track_positions", "pnl": "value_positions"}  # the agents a probe goes through
MAX_WARMUP_S = 120.0
#: What the latency part writes (prefixes; and every `*_cpu_us_per_fill`): kept from the
#: previous file by a --no-latency run.
LATENCY_FIELDS = ("pnl_latency_", "bus_latency_", "pnl_over_bus_", "bus_", "latency_", "slowest_probes",
                  "goal_pnl_latency_", "beside_all_")
#: Per run, under `latency_runs`: the headline figures.
RUN_SUMMARY = ("pnl_latency_ms_", "bus_latency_ms_", "pnl_over_bus_", "latency_probes", "bus_probes_seen",
               "latency_warmup_s", "latency_caught_up")
#: The services --beside-all starts too (ptrc and pnl always run).
BESIDE_ALL = ("questdb_writer", "hot_cache", "feast_pipeline", "execution_quality")
STARTUP_TIMEOUT_S = {"feast_pipeline": 180.0}  # the rest: 90 s
BUS_HOPS = Path(__file__).with_name("_bus_hops.py")
WRITER_CONFIG = Path(__file__).resolve().parents[1] / "config" / "backend" / "questdb_writer" / "config.yaml"


def random_fills(n: int, symbols: int = 100, accounts: int = 10, seed: int = 7) -> list[Fill]:
    rng = random.Random(seed)
    names = [f"SYM{i:03d}" for i in range(symbols)]
    account_names = [f"ACC{i:02d}" for i in range(accounts)]
    cents = [rng.randint(1_000, 50_000) for _ in names]
    fills = []
    for i in range(n):
        s = rng.randrange(symbols)
        fills.append(
            Fill(
                ts=1_700_000_000_000_000_000 + i,
                fill_id=f"F{i}",
                account=rng.choice(account_names),
                symbol=names[s],
                side=rng.choice(("BUY", "SELL")),
                qty=Decimal(rng.randint(1, 500)),
                price=Decimal(cents[s] + rng.randint(-200, 200)).scaleb(-2),
                fee=Decimal(rng.randint(-50, 200)).scaleb(-2),
            )
        )
    return fills


def chunk_rates(fills: list[Fill], mode: str, rounds: int = 3) -> list[float]:
    rates = []
    for _ in range(rounds):
        book = PositionBook(multipliers={"SYM000": 50})
        for i in range(0, len(fills), CHUNK):
            part = fills[i : i + CHUNK]
            started = time.perf_counter()
            if mode == "apply_many":
                book.apply_many(part)
            else:
                for fill in part:
                    book.apply(fill)
            rates.append(len(part) / (time.perf_counter() - started))
    return sorted(rates)


MULTIPLIERS = {"SYM000": 50}
SIDE_CALLS = ("execution_book", "apply", "apply_many", "execution_book_receive")


def side_by_side(fills: list[Fill], rounds: int) -> dict:
    """The new core against today's on the same fills, interleaved: per round each call
    runs once on a fresh book, in an order that alternates between rounds. Returns each
    call's fills/s per round."""
    messages = [(fill, seq, None) for seq, fill in enumerate(fills, 1)]

    def execution_book() -> None:
        ExecutionBook(MULTIPLIERS).receive_many(messages)

    def execution_book_receive() -> None:
        receive = ExecutionBook(MULTIPLIERS).receive
        for fill, seq, raw in messages:
            receive(fill, seq, raw)

    def apply() -> None:
        book = PositionBook(multipliers=MULTIPLIERS)
        for fill in fills:
            book.apply(fill)

    def apply_many() -> None:
        PositionBook(multipliers=MULTIPLIERS).apply_many(fills)

    calls = {"execution_book": execution_book, "apply": apply, "apply_many": apply_many,
             "execution_book_receive": execution_book_receive}
    for run in calls.values():  # warm up (first-use allocations, caches)
        run()
    rates: dict[str, list[float]] = {name: [] for name in calls}
    for i in range(rounds):
        order = list(SIDE_CALLS) if i % 2 == 0 else list(reversed(SIDE_CALLS))
        for name in order:
            gc.collect()
            started = time.perf_counter()
            calls[name]()
            rates[name].append(len(fills) / (time.perf_counter() - started))
    return rates


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def one_key_day(n: int, start_ns: int = 1_700_000_000_000_000_000, step_ns: int = 1_000_000_000) -> list[Fill]:
    """`n` executions of one key, `step_ns` apart, random sides (a position that keeps
    opening, reducing and flipping)."""
    rng = random.Random(5)
    return [
        Fill(ts=start_ns + i * step_ns, fill_id=f"D{i}", account="ACC", symbol="SYM", side=rng.choice(("BUY", "SELL")),
             qty=Decimal(rng.randint(1, 500)), price=Decimal(rng.randint(9_000, 11_000)).scaleb(-2),
             fee=Decimal(rng.randint(0, 100)).scaleb(-2))
        for i in range(n)
    ]


def late_fill_costs(history: int, trials: int) -> dict[str, list[float]]:
    """µs to receive one fill into a key holding `history` executions, by how many
    executions follow the place its ts gives it (0: in order). A fresh book per trial
    (built untimed), the cases interleaved."""
    day = one_key_day(history)
    step = day[1].ts - day[0].ts
    cases = {"late_1000": 1_000, "late_9000": 9_000, "in_order": 0}
    times: dict[str, list[float]] = {name: [] for name in cases}
    for trial in range(trials + 1):  # the first round warms up and is dropped
        for name, behind in (cases.items() if trial % 2 == 0 else reversed(cases.items())):
            book = ExecutionBook()
            book.receive_many((fill, seq, None) for seq, fill in enumerate(day, 1))
            ts = day[-1].ts + step if behind == 0 else day[history - behind].ts - step // 2
            fill = Fill(ts=ts, fill_id="LATE", account="ACC", symbol="SYM", side="BUY", qty=Decimal(7),
                        price=Decimal("100.25"), fee=Decimal("0.10"))
            # No collection inside the timed call, and none just before it either: a full
            # collection leaves the caches cold (an in-order fill then takes ~55 µs, not ~12).
            gc.disable()
            started = time.perf_counter()
            result = book.receive(fill, history + 1, None)
            elapsed = time.perf_counter() - started
            gc.enable()
            assert result.status == "applied" and result.reason == ("fill" if behind == 0 else "late"), result.reason
            if trial:
                times[name].append(elapsed * 1e6)
    return times


def measure_new_core(fills: int, rounds: int, history: int, trials: int) -> tuple[dict, list[str]]:
    """The new core against today's, and the cost of a late fill: (results, table lines)."""
    result: dict = {"load_average_new_core_start": round(os.getloadavg()[0], 2)}
    rates = side_by_side(random_fills(fills, symbols=50, accounts=10, seed=13), rounds)
    ratios = {
        other: [new / old for new, old in zip(rates["execution_book"], rates[other])]
        for other in ("apply", "apply_many")
    }
    ratios["receive_vs_apply"] = [new / old for new, old in zip(rates["execution_book_receive"], rates["apply"])]
    result.update({
        "side_by_side_fills": fills,
        "side_by_side_rounds": rounds,
        # Not `core_fills_per_s_<call>_*`: those are the 300,000-fill chunk figures above.
        **{f"side_by_side_fills_per_s_{name}_median": round(_median(r)) for name, r in rates.items()},
        # The figure: the new core (receive_many) over today's (apply in a loop).
        "core_ratio_execution_book_vs_apply_median": round(_median(ratios["apply"]), 3),
        "core_ratio_execution_book_vs_apply_min": round(min(ratios["apply"]), 3),
        "core_ratio_execution_book_vs_apply_max": round(max(ratios["apply"]), 3),
        "goal_core_ratio_execution_book_vs_apply": 0.9,
        # Labelled apart: today's batch call, which the old ptrc did not use.
        "core_ratio_execution_book_vs_apply_many_median": round(_median(ratios["apply_many"]), 3),
        # ptrc's agent calls receive() per message.
        "core_ratio_execution_book_receive_vs_apply_median": round(_median(ratios["receive_vs_apply"]), 3),
    })
    costs = late_fill_costs(history, trials)
    result.update({
        "late_fill_history": history,
        "late_fill_trials": trials,
        "late_fill_checkpoint_every": DEFAULT_CHECKPOINT_EVERY,
        "late_fill_rederive_us": round(_median(costs["late_1000"]), 1),  # 1,000 executions follow it
        "late_fill_rederive_us_9000_late": round(_median(costs["late_9000"]), 1),
        "in_order_fill_us": round(_median(costs["in_order"]), 1),
        "load_average_new_core_end": round(os.getloadavg()[0], 2),
    })
    lines = [
        f"new core vs today's: {fills:,} fills, {rounds} interleaved rounds "
        f"(load {result['load_average_new_core_start']} -> {result['load_average_new_core_end']})",
        f"{'call':<44}{'median fills/s':>16}{'ratio new/this':>16}",
        f"{'ExecutionBook.receive_many':<44}{result['side_by_side_fills_per_s_execution_book_median']:>16,}{'':>16}",
        f"{'PositionBook.apply loop (ptrc before)':<44}{result['side_by_side_fills_per_s_apply_median']:>16,}"
        f"{result['core_ratio_execution_book_vs_apply_median']:>16} (goal >= 0.9; rounds "
        f"{result['core_ratio_execution_book_vs_apply_min']}-{result['core_ratio_execution_book_vs_apply_max']})",
        f"{'PositionBook.apply_many':<44}{result['side_by_side_fills_per_s_apply_many_median']:>16,}"
        f"{result['core_ratio_execution_book_vs_apply_many_median']:>16}",
        f"{'ExecutionBook.receive loop (ptrc now)':<44}{result['side_by_side_fills_per_s_execution_book_receive_median']:>16,}"
        f"{'':>16} (vs apply loop: {result['core_ratio_execution_book_receive_vs_apply_median']})",
        f"one fill into a {history:,}-execution key (checkpoint_every {DEFAULT_CHECKPOINT_EVERY}), median of {trials}:",
        f"{'  1,000 executions late (late_fill_rederive_us)':<50}{result['late_fill_rederive_us']:>10,} µs",
        f"{'  9,000 executions late':<50}{result['late_fill_rederive_us_9000_late']:>10,} µs",
        f"{'  in order':<50}{result['in_order_fill_us']:>10,} µs",
    ]
    return result, lines


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def writer_tables(tag: str) -> dict[str, str]:
    """questdb_writer's routes (the shipped config's) → the run's own table for each, so
    a run writes no rows into the shared tables (they are dropped after it)."""
    routes = yaml.safe_load(WRITER_CONFIG.read_text())["writer"]["routes"]
    return {route: f"bench_{tag}_{route}" for route in routes}


def service_env(service: str, name: str, port: int, run_dir: Path, tag: str) -> dict[str, str]:
    """What one of the run's services is told on top of the stack's environment."""
    prefix = f"POSTTRADE_{service.upper()}__"
    env = {
        f"{prefix}SERVICE__NAME": name,
        f"{prefix}SERVICE__PORT": str(port),
        f"{prefix}SERVICE__HOST": "127.0.0.1",
        f"{prefix}RUNTIME__START_FROM": "new",
        # chdb runs one engine per data path, and a second process on a path fails to
        # start: each service gets a path of the run's own (ptrc's alerts, execution_quality).
        f"{prefix}DATABASES__CLICKHOUSE__DSN": f"chdb://{run_dir / (service + '-chdb')}",
    }
    if service == "ptrc":
        env[f"{prefix}SERVICE__METRICS_PORT"] = str(_free_port())
    if service == "feast_pipeline":
        env[f"{prefix}FEAST__DATA_DIR"] = str(run_dir / "feast")
    if service == "questdb_writer":
        for route, table in writer_tables(tag).items():
            env[f"{prefix}WRITER__ROUTES__{route.upper()}__TABLE"] = table
    return env


def start_process(label: str, argv: list[str], env: dict[str, str], port: int, log_dir: Path,
                  timeout: float = 90.0) -> tuple[subprocess.Popen, str]:
    """Start `argv` (its output to `<log_dir>/<label>.log`) and wait until
    http://127.0.0.1:<port>/health answers 200: (process, base URL)."""
    log_path = log_dir / f"{label}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.3)
    proc.kill()
    tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-20:])
    raise RuntimeError(f"{label} did not become healthy within {timeout:g} s; its log ends:\n{tail}")


def start_service(service: str, name: str, endpoints, run_dir: Path, tag: str) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = {**os.environ, **endpoints.service_env(), **service_env(service, name, port, run_dir, tag)}
    argv = [sys.executable, "-m", "posttrade.cli", "worker", service]
    return start_process(service, argv, env, port, run_dir, STARTUP_TIMEOUT_S.get(service, 90.0))


def start_hop(role: str, hops_app: str, nats_url: str, run_dir: Path, *options: str) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    argv = [sys.executable, str(BUS_HOPS), role, "--nats", nats_url, "--app", hops_app, "--port", str(port), *options]
    return start_process(f"bus_{role}", argv, dict(os.environ), port, run_dir)


class KeepAliveGet:
    """JSON GETs over one keep-alive HTTP/1.1 connection, read by hand.

    The poller runs on the same two cores as what it measures: httpx spent about 1 ms of
    CPU per request here (half of this benchmark's CPU, a fifth of a core), this a tenth
    of that. Answers must carry Content-Length (Starlette's JSON responses do).
    """

    def __init__(self, url: str):
        parsed = urlsplit(url)
        self.host, self.port = parsed.hostname, parsed.port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def get_json(self, path: str) -> dict:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.write(f"GET {path} HTTP/1.1\r\nHost: {self.host}\r\n\r\n".encode())
        head = await self.reader.readuntil(b"\r\n\r\n")
        status_line, _, fields = head.partition(b"\r\n")
        length = None
        for line in fields.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if length is None or status_line.split(b" ")[1] != b"200":
            raise RuntimeError(f"GET {path}: unexpected answer {head[:200]!r}")
        return json.loads(await self.reader.readexactly(length))

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            await self.writer.wait_closed()


@dataclass
class ProbePath:
    """One way a probe fill becomes visible: where to ask and how to read its count."""

    name: str  # "pnl" (through ptrc and pnl) or "bus" (through the two no-op hops)
    url: str
    query: str
    count: Callable[[dict], int]
    seen: dict[int, float] = field(default_factory=dict)  # probe number → seconds to visible
    polls: int = 0


Processes = dict[str, tuple[subprocess.Popen, str]]


async def caught_up(client: httpx.AsyncClient, services: Processes, hops: Processes, rate: int) -> bool:
    """Whether the run is in its steady state: the agents on the measured path (ptrc's
    and pnl's, LATENCY_PATH) and the hops within CAUGHT_UP_LAG of their stream's end,
    and every other agent of every service within two seconds' worth of fills (a
    storage sink holds up to a batch interval's messages by design)."""
    for service, (_, url) in services.items():
        checks = (await client.get(f"{url}/health")).json()["checks"]
        for check, detail in checks.items():
            if not check.startswith("agent:"):
                continue
            on_path = check == f"agent:{LATENCY_PATH.get(service)}"
            if detail.get("lag", 0) > (CAUGHT_UP_LAG if on_path else max(CAUGHT_UP_LAG, 2 * rate)):
                return False
    for _, url in hops.values():
        if (await client.get(f"{url}/lag")).json()["lag"] > CAUGHT_UP_LAG:
            return False
    return True


def percentiles(seconds: list[float]) -> dict[str, float]:
    """p50, p99 (nearest rank) and max, in ms."""
    latencies = sorted(v * 1000 for v in seconds)
    pick = lambda q: round(latencies[min(len(latencies) - 1, int(q * len(latencies)))], 3)  # noqa: E731
    return {"p50": pick(0.50), "p99": pick(0.99), "max": round(latencies[-1], 3)}


async def fill_to_pnl_latency(services: Processes, hops: Processes, nats_url: str, rate: int, seconds: float,
                              warmup: float, server_pids: dict[str, int]) -> dict:
    tag = uuid.uuid4().hex[:6].upper()
    probe_account = f"PROBE{tag}"
    accounts = [f"BENCH{tag}{i}" for i in range(50)]
    symbols = ["S0", "S1", "S2", "S3"]
    rng = random.Random(11)
    published: dict[int, float] = {}
    published_ns: dict[int, int] = {}
    probes = 0
    stop = asyncio.Event()
    paths = [ProbePath("pnl", services["pnl"][1], f"/pnl/realtime?account={probe_account}",
                       lambda body: body["positions"][0]["fill_count"] if body["positions"] else 0)]
    if hops:
        paths.append(ProbePath("bus", hops["bus_count"][1], f"/count?account={probe_account}", itemgetter("count")))
    meter = CpuMeter({**{name: proc.pid for name, (proc, _) in {**services, **hops}.items()},
                      **{f"server_{name}": pid for name, pid in server_pids.items()}})
    nc = await nats.connect(nats_url, pending_size=64 * 1024 * 1024)

    def fill(account: str, symbol: str, n: int) -> Fill:
        return Fill(ts=time.time_ns(), fill_id=f"{tag}-{n}", account=account, symbol=symbol, side=rng.choice(("BUY", "SELL")),
                    qty=Decimal(rng.randint(1, 9)), price=Decimal(rng.randint(9900, 10100)).scaleb(-2))

    async def poll(path: ProbePath) -> None:
        """Ask back to back while a probe is unseen; note when each one first shows."""
        http = KeepAliveGet(path.url)
        shown = 0
        try:
            while not (stop.is_set() and shown >= probes):
                if shown >= probes:
                    await asyncio.sleep(0.001)
                    continue
                body = await http.get_json(path.query)
                path.polls += 1
                received = time.perf_counter()
                count = path.count(body)
                for n in range(shown + 1, min(count, probes) + 1):
                    path.seen.setdefault(n, received - published[n])
                shown = max(shown, count)
        finally:
            await http.close()

    health = httpx.AsyncClient(timeout=10)  # one client for the warm-up's checks
    pollers = [asyncio.create_task(poll(path)) for path in paths]
    try:
        tick_s, per_tick, n = 0.010, max(1, rate // 100), 0
        probe_ticks = int(seconds / tick_s)
        started = time.perf_counter()
        next_check = started + warmup
        probe_from = None  # the tick probing starts at
        caught = False
        tick = 0
        while probe_from is None or tick < probe_from + probe_ticks:
            if probe_from is None and time.perf_counter() >= next_check:
                caught = await caught_up(health, services, hops, rate)
                if caught or time.perf_counter() - started > MAX_WARMUP_S:
                    probe_from, fills_before_probes = tick, n
                    meter.start()
                    load_at_probe_start = os.getloadavg()[0]
                next_check = time.perf_counter() + 0.5
                # The check took a while: go on from now, rather than make up the missed
                # ticks in a burst (the first probes would be sent into it).
                started = time.perf_counter() - tick * tick_s
            for _ in range(per_tick):
                n += 1
                account, symbol = rng.choice(accounts), rng.choice(symbols)
                await nc.publish(fill_subject(account, symbol), encode(fill(account, symbol, n)))
            if probe_from is not None and (tick - probe_from) % 2 == 0:
                n += 1
                probes += 1
                published[probes] = time.perf_counter()
                published_ns[probes] = time.time_ns()
                await nc.publish(fill_subject(probe_account, "XYZ"), encode(fill(probe_account, "XYZ", n)))
            await nc.flush()
            tick += 1
            await asyncio.sleep(max(0.0, started + tick * tick_s - time.perf_counter()))
        cpu = meter.stop()
        fills_probed = n - fills_before_probes
        stop.set()
        try:
            await asyncio.wait_for(asyncio.gather(*pollers), 30)
        except asyncio.TimeoutError:
            pass  # a probe never showed: counted as unseen
    finally:
        for poller in pollers:
            poller.cancel()
        await asyncio.gather(*pollers, return_exceptions=True)
        await health.aclose()
    pnl = paths[0]
    slowest = sorted(sorted(pnl.seen, key=pnl.seen.get)[-10:])
    fills_stored = await stored_at(nc, fill_subject(probe_account, "XYZ"), probes)
    positions_stored = await stored_at(nc, position_subject(probe_account, "XYZ"), probes)
    await nc.close()
    result: dict = {}
    for path in paths:
        if not path.seen:
            raise RuntimeError(f"none of {probes} probes became visible at {path.url}{path.query}")
        figures = percentiles(list(path.seen.values()))
        result.update({f"{path.name}_latency_ms_{k}": v for k, v in figures.items()})
    if hops:
        result["pnl_over_bus_p50"] = round(result["pnl_latency_ms_p50"] / result["bus_latency_ms_p50"], 2)
        result["pnl_over_bus_p99"] = round(result["pnl_latency_ms_p99"] / result["bus_latency_ms_p99"], 2)
        result["bus_probes_seen"] = len(paths[1].seen)
        result["bus_polls"] = paths[1].polls
    result.update({
        "latency_probes": probes,
        "latency_probes_seen": len(pnl.seen),
        "latency_polls": pnl.polls,  # /pnl/realtime requests, back to back while a probe is unseen
        "latency_fills_per_s": rate,
        "latency_warmup_s": round(probe_from * tick_s, 2),
        "latency_caught_up": caught,  # false: probing began after MAX_WARMUP_S regardless
        "latency_services": list(services),
        "latency_load_average_1m": {"probe_start": round(load_at_probe_start, 2), "end": round(os.getloadavg()[0], 2)},
        # CPU is what a busier machine cannot give: the figure that travels between runs.
        # The servers' (server_*) are shared: they include whatever else used them meanwhile.
        **{f"{name}_cpu_us_per_fill": round(used / fills_probed * 1e6) for name, used in cpu.items()},
        # Whether the tail is one stall or spread out, and where the time went: the slowest
        # probes by when they were sent, each split at the JetStream stored-at times of the
        # fill and of ptrc's PositionUpdate (same clock: everything runs on this machine).
        "slowest_probes": [
            probe_split(probe, published, published_ns, pnl.seen, fills_stored, positions_stored) for probe in slowest
        ],
    })
    return result


async def stored_at(nc, subject: str, count: int) -> list[int]:
    """JetStream's stored-at times (epoch ns) of the first `count` messages on `subject`."""
    sub = await nc.jetstream().subscribe(subject, ordered_consumer=True)
    times = []
    try:
        while len(times) < count:
            msg = await sub.next_msg(timeout=10)
            times.append(int(msg.metadata.timestamp.timestamp() * 1e6) * 1000)
    except nats.errors.TimeoutError:
        pass
    finally:
        await sub.unsubscribe()
    return times


def probe_split(n: int, published: dict, published_ns: dict, seen: dict, fills_stored: list, positions_stored: list) -> dict:
    split = {"at_s": round(published[n] - published[1], 3), "ms": round(seen[n] * 1000, 1)}
    if n <= min(len(fills_stored), len(positions_stored)):
        fill_ns, position_ns = fills_stored[n - 1], positions_stored[n - 1]
        split["to_fill_stored_ms"] = round((fill_ns - published_ns[n]) / 1e6, 1)
        split["ptrc_ms"] = round((position_ns - fill_ns) / 1e6, 1)  # fill stored -> PositionUpdate stored
        split["pnl_and_poll_ms"] = round(split["ms"] - (position_ns - published_ns[n]) / 1e6, 1)
    return split


async def _hop_stream(nats_url: str, name: str, prefix: str, create: bool) -> None:
    nc = await nats.connect(nats_url)
    try:
        if create:
            await nc.jetstream().add_stream(name=name, subjects=[f"{prefix}.>"])
        else:
            await nc.jetstream().delete_stream(name)
    except nats.js.errors.NotFoundError:
        pass  # never made
    finally:
        await nc.close()


async def _drop_tables(endpoints, tables: list[str]) -> None:
    qdb = QuestDBClient(host=endpoints.questdb_host, port=endpoints.questdb_http_port)
    try:
        for table in tables:
            await qdb.drop_table(table)
    finally:
        await qdb.close()


def measure_latency(rate: int, seconds: float, warmup: float, *, beside_all: bool, bus: bool) -> dict:
    """One latency run on services (and hops) of its own, stopped and forgotten after."""
    endpoints = stack.endpoints()
    tag = uuid.uuid4().hex[:6]
    wanted = ("ptrc", "pnl", *(BESIDE_ALL if beside_all else ()))
    names = {service: f"{service}_bench_{tag}" for service in wanted}
    hops_app, hop_stream, hop_prefix = f"bench_hops_{tag}", f"BENCH_HOPS_{tag.upper()}", f"benchhops{tag}"
    services: Processes = {}
    hops: Processes = {}
    load_start = os.getloadavg()[0]
    # The services' logs and data folders; kept when the run fails, for its logs.
    run_dir = Path(tempfile.mkdtemp(prefix=f"bench-positions-{tag}-"))
    measured = False
    try:
        for service, name in names.items():
            services[service] = start_service(service, name, endpoints, run_dir, tag)
        if bus:
            asyncio.run(_hop_stream(endpoints.nats_url, hop_stream, hop_prefix, create=True))
            hops["bus_forward"] = start_hop("forward", hops_app, endpoints.nats_url, run_dir, "--prefix", hop_prefix)
            hops["bus_count"] = start_hop("count", hops_app, endpoints.nats_url, run_dir, "--from", hop_stream)
        result = asyncio.run(fill_to_pnl_latency(services, hops, endpoints.nats_url, rate, seconds, warmup,
                                                 stack_server_pids(endpoints)))
        measured = True
    finally:
        for proc, _ in [*services.values(), *hops.values()]:
            proc.terminate()
        for proc, _ in [*services.values(), *hops.values()]:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        # Left behind, the run's durable consumers would be work for the server on every
        # later message (and in every later run).
        asyncio.run(forget_apps(endpoints.nats_url, [*names.values(), hops_app]))
        if bus:
            asyncio.run(_hop_stream(endpoints.nats_url, hop_stream, hop_prefix, create=False))
        if beside_all:
            asyncio.run(_drop_tables(endpoints, list(writer_tables(tag).values())))
        if measured:
            shutil.rmtree(run_dir, ignore_errors=True)
        else:
            print(f"the run failed; its services' logs are in {run_dir}", file=sys.stderr)
    result["latency_load_average_1m"]["run_start"] = round(load_start, 2)
    return result


def _median_run(runs: list[dict]) -> dict:
    """The figures of several runs of one configuration: medians of the numbers (ratios:
    the median of the per-run ratios), the slowest probes of the run whose p99 is the
    median, and each run's headline figures under `latency_runs`."""
    by_p99 = sorted(runs, key=itemgetter("pnl_latency_ms_p99"))
    middle = by_p99[(len(by_p99) - 1) // 2]
    merged: dict = {}
    for key, value in runs[0].items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            merged[key] = middle[key]
        else:
            values = [run[key] for run in runs if key in run]
            median = _median(values)
            merged[key] = round(median) if all(isinstance(v, int) for v in values) else round(median, 3)
    merged["latency_caught_up"] = all(run["latency_caught_up"] for run in runs)
    merged["latency_runs"] = [
        {k: v for k, v in run.items() if k.startswith(RUN_SUMMARY) or k == "latency_load_average_1m"} for run in runs
    ]
    return merged


def measure_latencies(args) -> tuple[dict, list[str]]:
    """`--repeats` runs of each configuration (ptrc and pnl; with --beside-all also all
    six), alternating, on services of their own: (results, table lines)."""
    configurations = ("alone", "beside_all") if args.beside_all else ("alone",)
    runs: dict[str, list[dict]] = {c: [] for c in configurations}
    for i in range(args.repeats):
        for configuration in configurations if i % 2 == 0 else reversed(configurations):
            run = measure_latency(args.rate, args.seconds, args.warmup, beside_all=configuration == "beside_all",
                                  bus=not args.no_bus)
            runs[configuration].append(run)
            print(f"  run {i + 1}/{args.repeats} ({configuration}): pnl p99 {run['pnl_latency_ms_p99']} ms"
                  + (f", bus p99 {run['bus_latency_ms_p99']} ms" if "bus_latency_ms_p99" in run else "")
                  + f" after a {run['latency_warmup_s']} s warm-up"
                  + f" (load {run['latency_load_average_1m']['run_start']} -> {run['latency_load_average_1m']['end']})")
    result = {**_median_run(runs["alone"]), "latency_repeats": args.repeats, "goal_pnl_latency_ms_p99": 10}
    if args.beside_all:
        beside = _median_run(runs["beside_all"])
        result.update({f"beside_all_{k}": v for k, v in beside.items()})
        # What the other four cost: the same path's latency with them running, and their CPU.
        result["beside_all_pnl_p99_over_alone"] = round(beside["pnl_latency_ms_p99"] / result["pnl_latency_ms_p99"], 2)
        result["beside_all_extra_services_cpu_us_per_fill"] = sum(
            beside.get(f"{service}_cpu_us_per_fill", 0) for service in BESIDE_ALL)
    return result, latency_lines(result, args)


def latency_lines(result: dict, args) -> list[str]:
    median = f"median of {args.repeats} runs" if args.repeats > 1 else "one run"
    lines = [f"fill -> visible at {args.rate} fills/s, {args.seconds:g} s of probes (50/s), {median}:",
             f"{'path':<44}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}{'seen':>12}"]
    configurations = [("", "ptrc + pnl")] + ([("beside_all_", "all six")] if args.beside_all else [])
    for prefix, label in configurations:
        get = lambda key: result.get(prefix + key, "-")  # noqa: E731
        lines.append(f"{label + ': fill -> /pnl/realtime':<44}{get('pnl_latency_ms_p50'):>9}{get('pnl_latency_ms_p99'):>9}"
                     f"{get('pnl_latency_ms_max'):>9}{get('latency_probes_seen'):>7}/{get('latency_probes'):<4}")
        if prefix + "bus_latency_ms_p99" in result:
            lines.append(f"{label + ': two no-op JetStream hops':<44}{get('bus_latency_ms_p50'):>9}"
                         f"{get('bus_latency_ms_p99'):>9}{get('bus_latency_ms_max'):>9}"
                         f"{get('bus_probes_seen'):>7}/{get('latency_probes'):<4}")
            lines.append(f"{label + ': ratio pnl / bus':<44}{get('pnl_over_bus_p50'):>9}{get('pnl_over_bus_p99'):>9}")
        cpu = "  ".join(f"{k[len(prefix):-len('_cpu_us_per_fill')]} {v}" for k, v in result.items()
                        if k.startswith(prefix) and k.endswith("_cpu_us_per_fill") and (prefix or not k.startswith("beside_all_")))
        lines.append(f"  CPU µs per fill: {cpu}")
    lines.append("(goal: p99 <= 10 ms for ptrc + pnl; server_* CPU is the shared servers', whatever else used them)")
    if args.beside_all:
        lines.append(f"all six beside: p99 x{result['beside_all_pnl_p99_over_alone']}, the other four "
                     f"{result['beside_all_extra_services_cpu_us_per_fill']} CPU µs per fill")
    return lines


def is_latency_field(key: str) -> bool:
    """What the latency part writes: kept from the previous file by a --no-latency run."""
    return key.startswith(LATENCY_FIELDS) or key.endswith("_cpu_us_per_fill")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fills", type=int, default=300_000)
    parser.add_argument("--rate", type=int, default=1000, help="fills/s during the latency run")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds at the rate before probing")
    parser.add_argument("--seconds", type=float, default=20.0, help="seconds of probing (50 probes/s)")
    parser.add_argument("--no-latency", action="store_true", help="only the core (no servers needed)")
    parser.add_argument("--no-core", action="store_true", help="only the latency (skip the core's figures)")
    parser.add_argument("--no-bus", action="store_true", help="latency without the two no-op hops beside")
    parser.add_argument("--beside-all", action="store_true",
                        help="also run the latency with all six services, alternating with ptrc + pnl alone")
    parser.add_argument("--repeats", type=int, default=1, help="latency runs per configuration (medians reported)")
    parser.add_argument("--side-fills", type=int, default=20_000, help="fills of the new-vs-old core comparison")
    parser.add_argument("--side-rounds", type=int, default=15, help="interleaved rounds of that comparison")
    parser.add_argument("--late-history", type=int, default=10_000, help="executions of the key a late fill goes into")
    parser.add_argument("--late-trials", type=int, default=31, help="trials per late-fill case")
    args = parser.parse_args()
    if args.late_history <= 9_000:
        parser.error("--late-history must be above 9,000 (a fill 9,000 executions late is one of the cases)")
    if args.no_latency and args.no_core:
        parser.error("--no-latency and --no-core leave nothing to measure")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    load_start = round(os.getloadavg()[0], 2)
    result: dict = {"load_average_1m_start": load_start, "cpus": os.cpu_count()}
    previous = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    if args.no_core:
        # A latency-only run keeps the last core figures rather than erase them.
        kept = {k: v for k, v in previous.items() if not is_latency_field(k) and k not in result
                and k not in ("core_from_previous_run", "latency_from_previous_run", "load_average_1m_end")}
        result.update({**kept, "core_from_previous_run": True} if kept else {})
    else:
        result.update({"fills": args.fills, "goal_core_fills_per_s": 200_000, "load_average": load_start})
        print(f"{'call':<12}{'median fills/s':>16}{'best fills/s':>14}")
        fills = random_fills(args.fills)
        for mode in ("apply_many", "apply"):
            rates = chunk_rates(fills, mode)
            median, best = rates[len(rates) // 2], rates[-1]
            result[f"core_fills_per_s_{mode}_median"] = round(median)
            result[f"core_fills_per_s_{mode}_best"] = round(best)
            print(f"{mode:<12}{median:>16,.0f}{best:>14,.0f}")
        result["core_fills_per_s"] = result["core_fills_per_s_apply_many_median"]
        print(f"core_fills_per_s = {result['core_fills_per_s']:,} (goal 200,000)")
        new_core, lines = measure_new_core(args.side_fills, args.side_rounds, args.late_history, args.late_trials)
        result.update(new_core)
        print("\n".join(lines))
    if not args.no_latency:
        latency, lines = measure_latencies(args)
        result.update(latency)
        print("\n".join(lines))
        print(f"{'slowest probe at s':>18}{'ms':>8}{'to stored':>11}{'ptrc':>8}{'pnl+poll':>10}  (ptrc + pnl, median run)")
        for probe in result["slowest_probes"]:
            print(f"{probe['at_s']:>18}{probe['ms']:>8}{probe.get('to_fill_stored_ms', '-'):>11}"
                  f"{probe.get('ptrc_ms', '-'):>8}{probe.get('pnl_and_poll_ms', '-'):>10}")
    else:
        # A core-only run keeps the last latency figures rather than erase them.
        kept = {k: v for k, v in previous.items() if is_latency_field(k) and k != "latency_from_previous_run"}
        if kept:
            result.update(kept)
            result["latency_from_previous_run"] = True
    result["load_average_1m_end"] = round(os.getloadavg()[0], 2)
    print(f"load average (1 min) at start / end: {result['load_average_1m_start']} / {result['load_average_1m_end']}"
          f" on {os.cpu_count()} CPUs")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {RESULTS}")


if __name__ == "__main__":
    main()
