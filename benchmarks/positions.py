"""Issue 3's figures: fills/s through the position core, and fill → /pnl/realtime latency.

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
(`posttrade worker`, uniquely named, starting at the end of the shared streams). Fills
are published at `--rate` per second over 200 positions: first unmeasured, for at least
`--warmup` seconds and until the agents a probe goes through are caught up with their streams
(the latency *at* a rate is the steady state: a freshly started pnl first reads the
newest update of every position in the stream, every earlier run's included, writes
them all to Valkey and takes its first full snapshot), then for `--seconds`, in which
every 20 ms one of them is a *probe* fill for a dedicated account. A poller asks
`/pnl/realtime?account=<probe>` back to back while a probe is unseen; a probe's latency
is from just before its publish to the first answer showing its fill count (an upper
bound: the change became visible somewhere inside that request). The slowest probes are
reported with where their time went. CPU per fill is measured over the probing. The
run's services are then forgotten on NATS (`posttrade forget`). Report generation is
measured by `benchmarks/reports.py`.

Writes benchmarks/results/positions.json and prints a table.

    python benchmarks/positions.py [--fills 300000] [--rate 1000] [--warmup 3] [--seconds 20] [--no-latency]
                                   [--side-fills 20000] [--side-rounds 15] [--late-trials 31]

With `--no-latency` the latency fields of the previous results file are kept (marked
`latency_from_previous_run`), so a core-only run does not erase them.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from decimal import Decimal
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import nats

from posttrade import stack
from posttrade.core.history import DEFAULT_CHECKPOINT_EVERY, ExecutionBook
from posttrade.core.positions import PositionBook
from posttrade.streams.events import Fill, encode
from posttrade.streams.nats import forget_apps
from posttrade.streams.subjects import fill_subject, position_subject

from _proc_cpu import cpu_seconds  # benchmarks/_proc_cpu.py (the script's folder is on sys.path)

RESULTS = Path(__file__).parent / "results" / "positions.json"
CHUNK = 10_000
CAUGHT_UP_LAG = 100  # messages an agent may hold or have pending and count as caught up
LATENCY_PATH = {"ptrc": "track_positions", "pnl": "value_positions"}  # the agents a probe goes through
MAX_WARMUP_S = 120.0
#: What the latency part writes (prefixes): kept from the previous file by a --no-latency run.
LATENCY_FIELDS = ("pnl_latency_", "latency_", "ptrc_cpu_us_per_fill", "pnl_cpu_us_per_fill", "slowest_probes",
                  "goal_pnl_latency_")


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


def start_service(service: str, name: str, endpoints, log_dir: Path) -> tuple[subprocess.Popen, str]:
    prefix = f"POSTTRADE_{service.upper()}__"
    port = _free_port()
    env = {
        **os.environ,
        **endpoints.service_env(),
        f"{prefix}SERVICE__NAME": name,
        f"{prefix}SERVICE__PORT": str(port),
        f"{prefix}SERVICE__HOST": "127.0.0.1",
        f"{prefix}RUNTIME__START_FROM": "new",
    }
    if service == "ptrc":
        env[f"{prefix}SERVICE__METRICS_PORT"] = str(_free_port())
    log = (log_dir / f"{service}.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "posttrade.cli", "worker", service], env=env, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
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
    raise RuntimeError(f"{service} did not become healthy; see {log_dir / (service + '.log')}")


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


async def caught_up(client: httpx.AsyncClient, services: dict[str, tuple[subprocess.Popen, str]]) -> bool:
    """Whether the agents on the measured path are within CAUGHT_UP_LAG of their stream's
    end. (Not every agent: a storage sink holds up to a batch interval's messages.)"""
    for service, (_, url) in services.items():
        checks = (await client.get(f"{url}/health")).json()["checks"]
        if checks[f"agent:{LATENCY_PATH[service]}"].get("lag", 0) > CAUGHT_UP_LAG:
            return False
    return True


async def fill_to_pnl_latency(services: dict[str, tuple[subprocess.Popen, str]], nats_url: str, rate: int,
                              seconds: float, warmup: float) -> dict:
    pnl_url = services["pnl"][1]
    cpu_at_probe_start: dict[str, float] = {}
    tag = uuid.uuid4().hex[:6].upper()
    probe_account = f"PROBE{tag}"
    accounts = [f"BENCH{tag}{i}" for i in range(50)]
    symbols = ["S0", "S1", "S2", "S3"]
    rng = random.Random(11)
    published: dict[int, float] = {}
    published_ns: dict[int, int] = {}
    seen: dict[int, float] = {}
    probes = polls = 0
    stop = asyncio.Event()
    nc = await nats.connect(nats_url, pending_size=64 * 1024 * 1024)

    def fill(account: str, symbol: str, n: int) -> Fill:
        return Fill(ts=time.time_ns(), fill_id=f"{tag}-{n}", account=account, symbol=symbol, side=rng.choice(("BUY", "SELL")),
                    qty=Decimal(rng.randint(1, 9)), price=Decimal(rng.randint(9900, 10100)).scaleb(-2))

    async def poll(http: KeepAliveGet) -> None:
        nonlocal polls
        shown = 0
        while not (stop.is_set() and shown >= probes):
            if shown >= probes:
                await asyncio.sleep(0.001)
                continue
            body = await http.get_json(f"/pnl/realtime?account={probe_account}")
            polls += 1
            received = time.perf_counter()
            count = body["positions"][0]["fill_count"] if body["positions"] else 0
            for n in range(shown + 1, count + 1):
                seen.setdefault(n, received - published[n])
            shown = max(shown, count)

    http = KeepAliveGet(pnl_url)
    health = httpx.AsyncClient(timeout=10)  # one client for the warm-up's checks
    try:
        poller = asyncio.create_task(poll(http))
        tick_s, per_tick, n = 0.010, max(1, rate // 100), 0
        probe_ticks = int(seconds / tick_s)
        started = time.perf_counter()
        next_check = started + warmup
        probe_from = None  # the tick probing starts at
        caught = False
        tick = 0
        while probe_from is None or tick < probe_from + probe_ticks:
            if probe_from is None and time.perf_counter() >= next_check:
                caught = await caught_up(health, services)
                if caught or time.perf_counter() - started > MAX_WARMUP_S:
                    probe_from, fills_before_probes = tick, n
                    cpu_at_probe_start = {name: cpu_seconds(proc.pid) for name, (proc, _) in services.items()}
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
        stop.set()
        try:
            await asyncio.wait_for(poller, 30)
        except asyncio.TimeoutError:
            poller.cancel()
    finally:
        await http.close()
        await health.aclose()
    slowest = sorted(sorted(seen, key=seen.get)[-10:])
    fills_stored = await stored_at(nc, fill_subject(probe_account, "XYZ"), probes)
    positions_stored = await stored_at(nc, position_subject(probe_account, "XYZ"), probes)
    await nc.close()
    latencies = sorted(v * 1000 for v in seen.values())
    pick = lambda q: round(latencies[min(len(latencies) - 1, int(q * len(latencies)))], 3)  # noqa: E731
    return {
        "pnl_latency_ms_p50": pick(0.50),
        "pnl_latency_ms_p99": pick(0.99),
        "pnl_latency_ms_max": round(latencies[-1], 3),
        "latency_probes": probes,
        "latency_probes_seen": len(seen),
        "latency_polls": polls,  # /pnl/realtime requests, back to back while a probe is unseen
        "latency_fills_per_s": rate,
        "latency_warmup_s": round(probe_from * tick_s, 2),
        "latency_caught_up": caught,  # false: probing began after MAX_WARMUP_S regardless
        # CPU is what a busier machine cannot give: the figure that travels between runs.
        **{f"{name}_cpu_us_per_fill": round((cpu_seconds(proc.pid) - cpu_at_probe_start[name]) / (n - fills_before_probes) * 1e6)
           for name, (proc, _) in services.items()},
        # Whether the tail is one stall or spread out, and where the time went: the slowest
        # probes by when they were sent, each split at the JetStream stored-at times of the
        # fill and of ptrc's PositionUpdate (same clock: everything runs on this machine).
        "slowest_probes": [
            probe_split(probe, published, published_ns, seen, fills_stored, positions_stored) for probe in slowest
        ],
    }


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


def measure_latency(rate: int, seconds: float, warmup: float) -> dict:
    endpoints = stack.endpoints()
    names = {service: f"{service}_bench_{uuid.uuid4().hex[:6]}" for service in ("ptrc", "pnl")}
    services: dict[str, tuple[subprocess.Popen, str]] = {}
    with tempfile.TemporaryDirectory() as logs:
        try:
            for service, name in names.items():
                services[service] = start_service(service, name, endpoints, Path(logs))
            return asyncio.run(fill_to_pnl_latency(services, endpoints.nats_url, rate, seconds, warmup))
        finally:
            for proc, _ in services.values():
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
            # Left behind, the run's durable consumers would be work for the server on every
            # later message (and in every later run).
            asyncio.run(forget_apps(endpoints.nats_url, list(names.values())))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fills", type=int, default=300_000)
    parser.add_argument("--rate", type=int, default=1000, help="fills/s during the latency run")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds at the rate before probing")
    parser.add_argument("--seconds", type=float, default=20.0, help="seconds of probing (50 probes/s)")
    parser.add_argument("--no-latency", action="store_true", help="only the core (no servers needed)")
    parser.add_argument("--side-fills", type=int, default=20_000, help="fills of the new-vs-old core comparison")
    parser.add_argument("--side-rounds", type=int, default=15, help="interleaved rounds of that comparison")
    parser.add_argument("--late-history", type=int, default=10_000, help="executions of the key a late fill goes into")
    parser.add_argument("--late-trials", type=int, default=31, help="trials per late-fill case")
    args = parser.parse_args()
    if args.late_history <= 9_000:
        parser.error("--late-history must be above 9,000 (a fill 9,000 executions late is one of the cases)")
    fills = random_fills(args.fills)
    result: dict = {"fills": args.fills, "goal_core_fills_per_s": 200_000, "load_average": os.getloadavg()[0]}
    print(f"{'call':<12}{'median fills/s':>16}{'best fills/s':>14}")
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
        result.update(measure_latency(args.rate, args.seconds, args.warmup))
        result["goal_pnl_latency_ms_p99"] = 10
        print(
            f"fill -> /pnl/realtime at {args.rate} fills/s: p50 {result['pnl_latency_ms_p50']} ms, "
            f"p99 {result['pnl_latency_ms_p99']} ms ({result['latency_probes_seen']}/{result['latency_probes']} probes, "
            f"after a {result['latency_warmup_s']} s warm-up); "
            f"CPU per fill: ptrc {result['ptrc_cpu_us_per_fill']} µs, pnl {result['pnl_cpu_us_per_fill']} µs"
        )
        print(f"{'slowest probe at s':>18}{'ms':>8}{'to stored':>11}{'ptrc':>8}{'pnl+poll':>10}")
        for probe in result["slowest_probes"]:
            print(f"{probe['at_s']:>18}{probe['ms']:>8}{probe.get('to_fill_stored_ms', '-'):>11}"
                  f"{probe.get('ptrc_ms', '-'):>8}{probe.get('pnl_and_poll_ms', '-'):>10}")
    elif RESULTS.exists():
        # A core-only run keeps the last latency figures rather than erase them.
        previous = json.loads(RESULTS.read_text())
        kept = {k: v for k, v in previous.items() if k.startswith(LATENCY_FIELDS) and k != "latency_from_previous_run"}
        if kept:
            result.update(kept)
            result["latency_from_previous_run"] = True
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {RESULTS}")


if __name__ == "__main__":
    main()
