"""pnl latency: a PositionUpdate published on NATS → its P&L visible at /pnl/realtime.

The pnl service runs in its own process (as `posttrade worker pnl` would, with its
Valkey cache and its snapshots on the PNL stream) against the local stack, in a
namespace of its own (its streams, consumers and buckets). This process publishes
ptrc-shaped PositionUpdates at `--rate` per second over `--keys` positions (plus a
quote every 10 ms so prices move too), and among them,
every 20 ms, an update of one *probe* position with a rising `fill_count`. While a probe
is unseen, a poller asks `/pnl/realtime?account=PROBE&symbol=XYZ` back to back (only
then: constant polling would load the service more than the updates do); its latency is the
time from just before its publish to the receipt of the first answer that shows it:
an upper bound (the change became visible somewhere inside that last request). The
lower bound is the time to when the previous request, which did not show it yet, went
out.

Also read from the service's /metrics: `pnl_position_visible_seconds`, measured inside
the service from the moment JetStream stored each update to its P&L being in memory
(coarse: histogram buckets).

With `--currencies` the positions are in three currencies (S1 and S3 in JPY, S2 in
EUR, S0 in USD; the accounts' base is USD) and every tick also moves an FX quote
(USDJPY or EURUSD): each FX move revalues every position converted through it. `--both`
runs the plain case and then that one against the same service settings, and reports
the ratio of their p99s (what FX costs the P&L path).

With `--pages N` it measures what an open dashboard costs the P&L path: `--pairs` runs
without a page and with N pages open, alternating, each on a fresh service. A page does
what pages/pnl.js does: it follows `/live/accounts` and polls `/dashboard/history` and
`/dashboard/movers` every 2 s. The result is the ratio of the median latencies.

Writes benchmarks/results/pnl.json (with `--both`: pnl_fx.json, with `--pages`:
pnl_pages.json) and prints a table.

    python benchmarks/pnl.py [--rate 1000] [--seconds 10] [--keys 200] [--currencies | --both] [--pages N [--pairs 3]]

Run with the stack's environment (`eval "$(posttrade stack env)"`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import multiprocessing
import os
import random
import socket
import statistics
import time
import uuid
from decimal import Decimal
from pathlib import Path

import httpx
import nats

from posttrade import stack
from posttrade.agents.positions import position_update
from posttrade.config import load_config
from posttrade.core.positions import Position
from posttrade.services import pnl
from posttrade.stores.valkey import open_valkey
from posttrade.streams.events import Fill, PositionUpdate, Quote, encode
from posttrade.streams.nats import forget_apps

from _proc_cpu import cpu_seconds  # benchmarks/_proc_cpu.py (the script's folder is on sys.path)

RESULTS = Path(__file__).parent / "results" / "pnl.json"
T_MS = 10  # publishing tick
PROBE_EVERY_TICKS = 2  # a probe every 20 ms
SYMBOLS = ("S0", "S1", "S2", "S3")
FX_SYMBOLS = ("USDJPY", "EURUSD")
#: The reference data of `--currencies` (JSON is YAML).
CURRENCIES_REFERENCE = {
    "instruments": {
        "S1": {"currency": "JPY"}, "S2": {"currency": "EUR"}, "S3": {"currency": "JPY"},
        "USDJPY": {"fx": {"base": "USD", "quote": "JPY"}}, "EURUSD": {"fx": {"base": "EUR", "quote": "USD"}},
    },
}


# The platform's subjects (posttrade.streams.subjects) per stream, before the namespace.
SUBJECTS = {"POSITIONS": "posttrade.positions", "QUOTES": "md.quotes"}
STREAMS = ("POSITIONS", "QUOTES", "TRADES", "BARS", "PNL", "DLQ")  # what the service declares


class BenchNames:
    def __init__(self, suffix: str):
        self.suffix = suffix
        self.app = f"pnl_bench_{suffix}"
        self.namespace = f"pnlb{suffix}"
        self.prefix = f"ptbench{suffix}"

    def stream(self, kind: str) -> str:
        return f"{self.namespace.upper()}_{kind}"

    def subject(self, kind: str, *tokens: str) -> str:
        return ".".join([self.namespace, SUBJECTS[kind], *tokens])

    def env(self, port: int, reference: str | None = None) -> dict[str, str]:
        return {
            **stack.endpoints().service_env(),
            **({"POSTTRADE_PNL__REFERENCE_FILE": reference} if reference else {}),
            "POSTTRADE_PNL__SERVICE__NAME": self.app,
            "POSTTRADE_PNL__SERVICE__NAMESPACE": self.namespace,
            "POSTTRADE_PNL__SERVICE__PORT": str(port),
            "POSTTRADE_PNL__PNL__KEY_PREFIX": self.prefix,
        }


def serve(suffix: str, port: int, reference: str | None = None) -> None:
    """The service process: pnl.build in the benchmark's namespace, run until SIGTERM."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    names = BenchNames(suffix)
    config = load_config("pnl", pnl.CONFIG, env={**os.environ, **names.env(port, reference)})
    app = pnl.build(config).app
    asyncio.run(app.run(host="127.0.0.1", port=port))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PAGE_POLL_S = 2.0  # how often pnl's page polls its history ring and movers


def update_of(position: Position, ts: int) -> PositionUpdate:
    return position_update(position, None, "fill", ts)


def histogram(text: str, name: str, labels: str = "") -> dict[float, float]:
    """Cumulative bucket counts {le: count} of a Prometheus histogram."""
    out = {}
    for line in text.splitlines():
        if line.startswith(f"{name}_bucket{{{labels}"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            out[float("inf") if le == "+Inf" else float(le)] = float(line.rsplit(" ", 1)[1])
    return out


def counter(text: str, name: str, labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(f"{name}{{{labels}}}"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def bucket_quantile(before: dict[float, float], after: dict[float, float], q: float) -> float | None:
    """The upper bound of the bucket holding quantile q of what was observed between."""
    counts = {le: after.get(le, 0) - before.get(le, 0) for le in after}
    total = counts.get(float("inf"), 0)
    if not total:
        return None
    for le in sorted(counts):
        if counts[le] >= q * total:
            return le
    return None


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run(rate: int, seconds: float, key_count: int, port: int, names: BenchNames, pid: int,
              currencies: bool = False, pages: int = 0) -> dict:  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(base_url=base, timeout=10) as http:
        deadline = time.monotonic() + 60
        while True:
            try:
                if (await http.get("/health")).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the pnl service did not become healthy")
            await asyncio.sleep(0.2)
        text = (await http.get("/metrics")).text
        metrics_before = histogram(text, "pnl_position_visible_seconds")
        commits_before = histogram(text, "posttrade_commit_seconds", 'agent="value_positions",')
        batches_before = counter(text, "posttrade_batches_total", 'agent="value_positions"')

        nc = await nats.connect(stack.endpoints().nats_url, pending_size=64 * 1024 * 1024)
        rng = random.Random(7)
        accounts = [f"B{i}" for i in range(max(1, key_count // len(SYMBOLS)))]
        positions = [Position(a, s) for a in accounts for s in SYMBOLS]
        probe = Position("PROBE", "XYZ")
        mids = {s: Decimal(100) for s in SYMBOLS}
        fx_mids = {"USDJPY": Decimal("150.00"), "EURUSD": Decimal("1.0800")}
        published: dict[int, float] = {}  # probe fill_count -> perf_counter at publish
        seen: dict[int, float] = {}  # probe fill_count -> latency upper bound (s)
        seen_low: dict[int, float] = {}  # ... and lower bound (s)
        request_s: list[float] = []
        stop = asyncio.Event()
        stop_at = [0.0]

        outstanding = asyncio.Event()  # set while a published probe has not been seen

        async def poll() -> None:
            # Polls only while a probe is outstanding: back-to-back requests all the
            # time would load the service (and the machine) more than the updates do.
            shown = 0
            previous_sent = 0.0  # when the last request that did not show the next probe went out
            while True:
                if shown >= probe.fill_count:
                    if stop.is_set():
                        return
                    outstanding.clear()
                    try:
                        await asyncio.wait_for(outstanding.wait(), 0.5)
                    except asyncio.TimeoutError:
                        pass
                    continue
                sent = time.perf_counter()
                body = (await http.get("/pnl/realtime?account=PROBE&symbol=XYZ")).json()
                received = time.perf_counter()
                request_s.append(received - sent)
                count = body["positions"][0]["fill_count"] if body["positions"] else 0
                for n in range(shown + 1, count + 1):
                    if n in published:
                        # Visible after the previous request was handled (it did not show
                        # it) and before this answer arrived.
                        seen[n] = received - published[n]
                        seen_low[n] = max(0.0, previous_sent - published[n])
                shown = max(shown, count)
                previous_sent = sent
                if stop.is_set() and time.perf_counter() - stop_at[0] > 10:
                    return

        poller = asyncio.create_task(poll())
        page_lines = [0]
        readers = [asyncio.create_task(open_page(base, page_lines, stop)) for _ in range(pages)]
        per_tick = max(1, rate * T_MS // 1000)
        ticks = int(seconds * 1000 / T_MS)
        sent = 0
        cpu_before = cpu_seconds(pid)
        started = time.perf_counter()
        fill_id = 0
        for tick in range(ticks):
            target = started + tick * T_MS / 1000
            delay = target - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            now = time.time_ns()
            for i in range(per_tick):
                fill_id += 1
                is_probe = i == 0 and tick % PROBE_EVERY_TICKS == 0
                position = probe if is_probe else rng.choice(positions)
                side = "BUY" if rng.random() < 0.5 else "SELL"
                price = Decimal(rng.randint(9_000, 11_000)) / 100
                position.apply(Fill(ts=now, fill_id=f"f{fill_id}", account=position.account, symbol=position.symbol,
                                    side=side, qty=Decimal(rng.randint(1, 10)), price=price, fee=Decimal("0.5")))
                data = encode(update_of(position, now))
                subject = names.subject("POSITIONS", position.account, position.symbol)
                if is_probe:
                    published[probe.fill_count] = time.perf_counter()
                await nc.publish(subject, data)
                if is_probe:
                    outstanding.set()
                sent += 1
            symbol = SYMBOLS[tick % len(SYMBOLS)]
            mids[symbol] += Decimal(rng.randint(-5, 5)) / 100
            await nc.publish(names.subject("QUOTES", symbol),
                             encode(Quote(ts=now, symbol=symbol, bid=mids[symbol] - Decimal("0.01"), ask=mids[symbol] + Decimal("0.01"))))
            if currencies:
                pair = FX_SYMBOLS[tick % len(FX_SYMBOLS)]
                step = Decimal("0.01") if pair == "USDJPY" else Decimal("0.0001")
                fx_mids[pair] += rng.randint(-3, 3) * step
                await nc.publish(names.subject("QUOTES", pair),
                                 encode(Quote(ts=now, symbol=pair, bid=fx_mids[pair] - step, ask=fx_mids[pair] + step)))
        elapsed = time.perf_counter() - started
        service_cpu = cpu_seconds(pid) - cpu_before
        await nc.flush()
        stop_at[0] = time.perf_counter()
        stop.set()
        await poller
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        text = (await http.get("/metrics")).text
        metrics_after = histogram(text, "pnl_position_visible_seconds")
        commits_after = histogram(text, "posttrade_commit_seconds", 'agent="value_positions",')
        batches = counter(text, "posttrade_batches_total", 'agent="value_positions"') - batches_before
        final = (await http.get("/pnl/realtime?account=PROBE&symbol=XYZ")).json()["positions"][0]
        await nc.close()

    latencies = [seen[n] * 1000 for n in sorted(seen)]
    lower = [seen_low[n] * 1000 for n in sorted(seen_low)]
    missing = len(published) - len(seen)
    return {
        "currencies": currencies,
        "rate_per_s": rate,
        "achieved_rate_per_s": round(sent / elapsed),
        "seconds": seconds,
        "keys": len(positions),
        "updates_published": sent,
        "probes": len(published),
        "probes_not_seen": missing,
        "probe_final_fill_count_ok": final["fill_count"] == probe.fill_count,
        "pnl_latency_ms_p50": round(percentile(latencies, 0.50), 3),
        "pnl_latency_ms_p90": round(percentile(latencies, 0.90), 3),
        "pnl_latency_ms_p99": round(percentile(latencies, 0.99), 3),
        "pnl_latency_ms_max": round(max(latencies), 3),
        "pnl_latency_lower_bound_ms_p50": round(percentile(lower, 0.50), 3),
        "pnl_latency_lower_bound_ms_p99": round(percentile(lower, 0.99), 3),
        "realtime_request_ms_p50": round(statistics.median(request_s) * 1000, 3),
        "service_cpu_percent_of_a_core": round(100 * service_cpu / elapsed, 1),
        "load_average_1m": os.getloadavg()[0],
        "cpus": os.cpu_count(),
        "service_visible_ms_p50_bucket": _ms(bucket_quantile(metrics_before, metrics_after, 0.50)),
        "service_visible_ms_p99_bucket": _ms(bucket_quantile(metrics_before, metrics_after, 0.99)),
        "positions_agent_batches": int(batches),
        "positions_agent_mean_batch": round(sent / batches, 1) if batches else None,
        "positions_commit_ms_p50_bucket": _ms(bucket_quantile(commits_before, commits_after, 0.50)),
        "positions_commit_ms_p99_bucket": _ms(bucket_quantile(commits_before, commits_after, 0.99)),
        "goal_pnl_latency_ms_p99": 10,
        "pages_open": pages,
        "page_stream_lines": page_lines[0],
    }


async def open_page(base: str, lines: list[int], stop: asyncio.Event) -> None:
    """What pnl's page does while open (pages/pnl.js): follow the live account figures
    and poll the history ring and the movers every 2 s. Counts the stream's lines."""
    async with httpx.AsyncClient(base_url=base, timeout=None) as http:

        async def follow() -> None:
            async with http.stream("GET", "/live/accounts") as answer:
                async for _ in answer.aiter_lines():
                    lines[0] += 1

        follower = asyncio.create_task(follow())
        try:
            while not stop.is_set():
                await http.get("/dashboard/history")
                await http.get("/dashboard/movers")
                try:
                    await asyncio.wait_for(stop.wait(), PAGE_POLL_S)
                except asyncio.TimeoutError:
                    pass
        finally:
            follower.cancel()
            await asyncio.gather(follower, return_exceptions=True)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


async def cleanup(names: BenchNames) -> None:
    endpoints = stack.endpoints()
    await forget_apps(endpoints.nats_url, [f"{names.namespace}-{names.app}"])  # consumers, changelog buckets
    nc = await nats.connect(endpoints.nats_url)
    js = nc.jetstream()
    for kind in STREAMS:
        try:
            await js.delete_stream(names.stream(kind))
        except nats.js.errors.NotFoundError:
            pass
    await nc.close()
    valkey = open_valkey(host=endpoints.valkey_host, port=endpoints.valkey_port, db=4)
    keys = [k async for k in valkey.redis.scan_iter(match=f"{names.prefix}:*")]
    if keys:
        await valkey.redis.delete(*keys)
    await valkey.close()


def measure(args: argparse.Namespace, currencies: bool, pages: int = 0) -> dict:
    """One run against a fresh pnl process on streams of its own."""
    names = BenchNames(uuid.uuid4().hex[:8])
    port = free_port()
    reference = None
    if currencies:
        reference = str(RESULTS.parent / f"pnl_reference_{names.suffix}.tmp")
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        Path(reference).write_text(json.dumps(CURRENCIES_REFERENCE))
    process = multiprocessing.get_context("spawn").Process(target=serve, args=(names.suffix, port, reference), daemon=True)
    process.start()
    try:
        return asyncio.run(run(args.rate, args.seconds, args.keys, port, names, process.pid, currencies, pages))
    finally:
        process.terminate()  # SIGTERM: the app stops cleanly
        process.join(15)
        asyncio.run(cleanup(names))
        if reference:
            Path(reference).unlink(missing_ok=True)


def show(result: dict, path: Path) -> None:
    what = "in three currencies, FX moving" if result["currencies"] else "in one currency"
    print(f"{'PositionUpdate published -> visible at /pnl/realtime, ' + what:<70}{'ms':>8}")
    for name in ("p50", "p90", "p99", "max"):
        print(f"  {name + ' (upper bound, probe poll)':<68}{result[f'pnl_latency_ms_{name}']:>8}")
    print(f"  {'p50 / p99 lower bound (previous poll did not show it)':<56}"
          f"{result['pnl_latency_lower_bound_ms_p50']:>5}/{result['pnl_latency_lower_bound_ms_p99']}")
    print(f"  {'p50 / p99 stored -> in memory (service histogram bucket)':<56}"
          f"{result['service_visible_ms_p50_bucket']!s:>5}/{result['service_visible_ms_p99_bucket']!s}")
    print(f"  {'one /pnl/realtime request, p50':<56}{result['realtime_request_ms_p50']:>10}")
    print(f"positions agent: {result['positions_agent_batches']} batches (mean {result['positions_agent_mean_batch']}), "
          f"commit p50/p99 <= {result['positions_commit_ms_p50_bucket']}/{result['positions_commit_ms_p99_bucket']} ms")
    print(f"service CPU {result['service_cpu_percent_of_a_core']}% of a core; machine load average "
          f"{result['load_average_1m']:.1f} on {result['cpus']} CPUs")
    print(f"rate {result['achieved_rate_per_s']}/s over {result['keys']} positions, {result['probes']} probes "
          f"({result['probes_not_seen']} not seen); goal p99 < 10 ms -> {path}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rate", type=int, default=1000, help="PositionUpdates per second")
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--keys", type=int, default=200, help="positions the updates spread over")
    parser.add_argument("--currencies", action="store_true", help="positions in three currencies, FX quotes moving")
    parser.add_argument("--both", action="store_true", help="one currency, then three: the ratio of the p99s")
    parser.add_argument("--pages", type=int, default=0, metavar="N",
                        help="runs without and with N open dashboard pages, --pairs times each, alternating: "
                             "the ratio of the medians (what an open page costs the P&L path)")
    parser.add_argument("--pairs", type=int, default=3)
    args = parser.parse_args()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    if args.pages:
        compare_pages(args)
        return
    if not args.both:
        result = measure(args, args.currencies)
        RESULTS.write_text(json.dumps(result, indent=2) + "\n")
        show(result, RESULTS)
        return
    plain, fx = measure(args, False), measure(args, True)
    path = RESULTS.with_name("pnl_fx.json")
    ratio = {q: round(fx[f"pnl_latency_ms_{q}"] / plain[f"pnl_latency_ms_{q}"], 2) for q in ("p50", "p99")}
    path.write_text(json.dumps({"one_currency": plain, "three_currencies": fx, "ratio": ratio}, indent=2) + "\n")
    show(plain, path)
    show(fx, path)
    print(f"three currencies with FX moving / one currency: p50 x{ratio['p50']}, p99 x{ratio['p99']}")


def compare_pages(args: argparse.Namespace) -> None:
    """Alternating runs without and with `args.pages` open pages on fresh services."""
    runs: dict[str, list[dict]] = {"without": [], "with": []}
    for _ in range(args.pairs):
        runs["without"].append(measure(args, args.currencies))
        runs["with"].append(measure(args, args.currencies, args.pages))
    med = {
        side: {q: statistics.median(r[f"pnl_latency_ms_{q}"] for r in results) for q in ("p50", "p99")}
        for side, results in runs.items()
    }
    cpu = {side: statistics.median(r["service_cpu_percent_of_a_core"] for r in results) for side, results in runs.items()}
    ratio = {q: round(med["with"][q] / med["without"][q], 2) for q in ("p50", "p99")}
    path = RESULTS.with_name("pnl_pages.json")
    path.write_text(json.dumps({"pages": args.pages, "pairs": args.pairs, "median_ms": med, "service_cpu_percent": cpu,
                                "ratio_with_over_without": ratio, "runs": runs}, indent=2) + "\n")  # fmt: skip
    print(f"{'P&L latency (upper bound), median of ' + str(args.pairs) + ' runs':<52}{'p50 ms':>9}{'p99 ms':>9}{'CPU %':>8}")
    for side in ("without", "with"):
        label = "no page open" if side == "without" else f"{args.pages} pnl pages open (live + polls)"
        print(f"  {label:<50}{med[side]['p50']:>9}{med[side]['p99']:>9}{cpu[side]:>8}")
    lines = statistics.median(r["page_stream_lines"] for r in runs["with"])
    print(f"with / without: p50 x{ratio['p50']}, p99 x{ratio['p99']}; the pages read {lines:g} live lines per run "
          f"(median); load average {os.getloadavg()[0]:.1f} -> {path}")


if __name__ == "__main__":
    main()
