"""Issue 3's figures: fills/s through the position core, and fill → /pnl/realtime latency.

Core: fills/s through the position and P&L core (both methods updated on every fill).

300,000 pre-built random fills (100 symbols, 10 accounts, one symbol with multiplier
50) are applied in chunks of 10,000; each chunk is timed on its own, and the median and
best chunk are reported for `PositionBook.apply_many` (what a batch agent calls) and
`PositionBook.apply` (one fill at a time). Chunk timing keeps a busy neighbour on a
shared machine from hiding the core's own speed; the load average is recorded.

Latency (needs the local stack): ptrc and pnl run as their own processes
(`posttrade worker`, uniquely named, starting at the end of the shared streams). Fills
are published at `--rate` per second over 200 positions: first for `--warmup` seconds
unmeasured (the latency *at* a rate is the steady state: a freshly started pnl first
reads the newest update of every position in the stream, every earlier run's included,
writes them all to Valkey and takes its first full snapshot), then for `--seconds`, in
which every 20 ms one of them is a *probe* fill for a dedicated account. A poller asks
`/pnl/realtime?account=<probe>` back to back while a probe is unseen; a probe's latency
is from just before its publish to the first answer showing its fill count (an upper
bound: the change became visible somewhere inside that request). Report generation is
measured by `benchmarks/reports.py`.

Writes benchmarks/results/positions.json and prints a table.

    python benchmarks/positions.py [--fills 300000] [--rate 1000] [--warmup 3] [--seconds 20] [--no-latency]
"""

from __future__ import annotations

import argparse
import asyncio
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

import httpx
import nats

from posttrade import stack
from posttrade.core.positions import PositionBook
from posttrade.streams.events import Fill, encode
from posttrade.streams.subjects import fill_subject

from _proc_cpu import cpu_seconds  # benchmarks/_proc_cpu.py (the script's folder is on sys.path)

RESULTS = Path(__file__).parent / "results" / "positions.json"
CHUNK = 10_000


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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_service(service: str, endpoints, log_dir: Path) -> tuple[subprocess.Popen, str]:
    prefix = f"POSTTRADE_{service.upper()}__"
    port = _free_port()
    env = {
        **os.environ,
        **endpoints.service_env(),
        f"{prefix}SERVICE__NAME": f"{service}_bench_{uuid.uuid4().hex[:6]}",
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


async def fill_to_pnl_latency(pnl_url: str, nats_url: str, rate: int, seconds: float, warmup: float) -> dict:
    tag = uuid.uuid4().hex[:6].upper()
    probe_account = f"PROBE{tag}"
    accounts = [f"BENCH{tag}{i}" for i in range(50)]
    symbols = ["S0", "S1", "S2", "S3"]
    rng = random.Random(11)
    published: dict[int, float] = {}
    seen: dict[int, float] = {}
    probes = 0
    stop = asyncio.Event()
    nc = await nats.connect(nats_url, pending_size=64 * 1024 * 1024)

    def fill(account: str, symbol: str, n: int) -> Fill:
        return Fill(ts=time.time_ns(), fill_id=f"{tag}-{n}", account=account, symbol=symbol, side=rng.choice(("BUY", "SELL")),
                    qty=Decimal(rng.randint(1, 9)), price=Decimal(rng.randint(9900, 10100)).scaleb(-2))

    async def poll(http: httpx.AsyncClient) -> None:
        shown = 0
        while not (stop.is_set() and shown >= probes):
            if shown >= probes:
                await asyncio.sleep(0.001)
                continue
            body = (await http.get("/pnl/realtime", params={"account": probe_account})).json()
            received = time.perf_counter()
            count = body["positions"][0]["fill_count"] if body["positions"] else 0
            for n in range(shown + 1, count + 1):
                seen.setdefault(n, received - published[n])
            shown = max(shown, count)

    async with httpx.AsyncClient(base_url=pnl_url, timeout=10) as http:
        poller = asyncio.create_task(poll(http))
        tick_s, per_tick, n = 0.010, max(1, rate // 100), 0
        started = time.perf_counter()
        warmup_ticks = int(warmup / tick_s)
        for tick in range(warmup_ticks + int(seconds / tick_s)):
            for _ in range(per_tick):
                n += 1
                account, symbol = rng.choice(accounts), rng.choice(symbols)
                await nc.publish(fill_subject(account, symbol), encode(fill(account, symbol, n)))
            if tick >= warmup_ticks and tick % 2 == 0:
                n += 1
                probes += 1
                published[probes] = time.perf_counter()
                await nc.publish(fill_subject(probe_account, "XYZ"), encode(fill(probe_account, "XYZ", n)))
            await nc.flush()
            await asyncio.sleep(max(0.0, started + (tick + 1) * tick_s - time.perf_counter()))
        stop.set()
        try:
            await asyncio.wait_for(poller, 30)
        except asyncio.TimeoutError:
            poller.cancel()
    await nc.close()
    latencies = sorted(v * 1000 for v in seen.values())
    pick = lambda q: round(latencies[min(len(latencies) - 1, int(q * len(latencies)))], 3)  # noqa: E731
    return {
        "pnl_latency_ms_p50": pick(0.50),
        "pnl_latency_ms_p99": pick(0.99),
        "pnl_latency_ms_max": round(latencies[-1], 3),
        "latency_probes": probes,
        "latency_probes_seen": len(seen),
        "latency_fills_per_s": rate,
    }


def measure_latency(rate: int, seconds: float, warmup: float) -> dict:
    endpoints = stack.endpoints()
    with tempfile.TemporaryDirectory() as logs:
        procs = []
        try:
            ptrc, _ = start_service("ptrc", endpoints, Path(logs))
            procs.append(ptrc)
            pnl, pnl_url = start_service("pnl", endpoints, Path(logs))
            procs.append(pnl)
            cpu_before = [cpu_seconds(proc.pid) for proc in procs]
            result = asyncio.run(fill_to_pnl_latency(pnl_url, endpoints.nats_url, rate, seconds, warmup))
            fills = rate * (warmup + seconds)
            for proc, before, name in zip(procs, cpu_before, ("ptrc", "pnl")):
                # CPU is what a busier machine cannot give: the figure that travels between runs.
                result[f"{name}_cpu_us_per_fill"] = round((cpu_seconds(proc.pid) - before) / fills * 1e6)
            return result
        finally:
            for proc in procs:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fills", type=int, default=300_000)
    parser.add_argument("--rate", type=int, default=1000, help="fills/s during the latency run")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds at the rate before probing")
    parser.add_argument("--seconds", type=float, default=20.0, help="seconds of probing (50 probes/s)")
    parser.add_argument("--no-latency", action="store_true", help="only the core (no servers needed)")
    args = parser.parse_args()
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
    if not args.no_latency:
        result.update(measure_latency(args.rate, args.seconds, args.warmup))
        result["latency_warmup_s"] = args.warmup
        result["goal_pnl_latency_ms_p99"] = 10
        print(
            f"fill -> /pnl/realtime at {args.rate} fills/s: p50 {result['pnl_latency_ms_p50']} ms, "
            f"p99 {result['pnl_latency_ms_p99']} ms ({result['latency_probes_seen']}/{result['latency_probes']} probes); "
            f"CPU per fill: ptrc {result['ptrc_cpu_us_per_fill']} µs, pnl {result['pnl_cpu_us_per_fill']} µs"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {RESULTS}")


if __name__ == "__main__":
    main()
