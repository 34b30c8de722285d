"""Soak: every service's memory (RSS) over a long run of the demo feed, at the demo rate
and at ten times it.

For each rate, as `posttrade up` runs them: the six services as separate processes (a
`ServiceFleet` on free ports, under a temporary home of this run, so their chdb and
object data are the run's own) against the local stack's servers, and the demo feed
(`DemoFeed`) publishing at the rate. The services get names of their own and start at
the end of the shared streams; the feed's symbols and accounts carry a tag of the run.
Every `--sample-every` seconds each service's RSS (`VmRSS`) and CPU seconds are read
from /proc, with the machine's load average and what the feed has published; every
`--health-every` seconds each service's /health (status code, and the largest agent
lag it reports). When the rate is done the fleet is stopped, its consumers and table
buckets are forgotten on NATS and its home is removed; the next rate starts fresh.

Per service and rate the summary has the RSS at the first sample after `--warm-up`
seconds, at the end, the highest, and the growth in MB per minute after the warm-up:
the slope of a least-squares line through the samples of the second half of the run
(a service still filling a bounded state grows in the first half and is flat in the
second; one that grows without bound grows in both).

Writes benchmarks/results/soak.json (one entry per rate, every sample) and prints a
table. Defaults: 30 minutes at 300 events/s, then 30 minutes at 3,000.

    python benchmarks/soak.py [--rates 300,3000] [--minutes 30[,30]] [--sample-every 10]
                              [--services ptrc pnl ...] [--env KEY=VALUE ...]

Run with the stack's environment (`eval "$(posttrade stack env)"`). A full run takes an
hour and loads the machine (at 3,000 events/s more than two cores can follow: the
services fall behind, which the lag column shows; their memory is what is measured).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
import uuid
from contextlib import ExitStack
from pathlib import Path

import httpx

from posttrade import stack
from posttrade.demo.feed import DemoFeed, FeedSettings
from posttrade.stack.fleet import SERVICES, ServiceFleet
from posttrade.streams.nats import NatsTransport, forget_apps

from _proc_cpu import cpu_seconds  # benchmarks/_proc_cpu.py (the script's folder is on sys.path)

RESULTS = Path(__file__).parent / "results" / "soak.json"
DEMO_RATE = 300.0
START_TIMEOUT_S = 300.0


def free_ports(count: int) -> list[int]:
    # All bound at once so the kernel hands out distinct ports.
    with ExitStack() as sockets:
        probes = [sockets.enter_context(socket.socket()) for _ in range(count)]
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in probes]


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def slope_mb_per_min(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, MB) points, in MB per minute."""
    if len(points) < 3:
        return None
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    if var == 0:
        return None
    return round(sum((t - mean_t) * (v - mean_v) for t, v in points) / var * 60, 3)


def max_lag(body: dict) -> int | None:
    lags = [c.get("lag") for c in body.get("checks", {}).values() if isinstance(c, dict) and "lag" in c]
    return max(lags) if lags else None


class Feed(threading.Thread):
    """The demo feed in a thread of its own (its own event loop), until stopped."""

    def __init__(self, nats_url: str, settings: FeedSettings):
        super().__init__(name="soak-feed", daemon=True)
        self.nats_url = nats_url
        self.settings = settings
        self.feed: DemoFeed | None = None
        self.error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None

    def run(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stopping = asyncio.Event()
            transport = NatsTransport(self.nats_url, name="posttrade-soak-feed")
            self.feed = DemoFeed(transport, self.settings)
            try:
                await self.feed.run(stop=self._stopping)
            finally:
                await transport.close()

        try:
            asyncio.run(main())
        except BaseException as exc:  # noqa: BLE001 - reported by the sampler
            self.error = exc

    def published(self) -> int:
        return self.feed.progress.total if self.feed is not None else 0

    def stop(self) -> None:
        if self.is_alive() and self._loop is not None and self._stopping is not None:
            try:
                self._loop.call_soon_threadsafe(self._stopping.set)
            except RuntimeError:  # its loop has just ended
                pass
        self.join(timeout=30)


def soak(rate: float, seconds: float, args: argparse.Namespace, endpoints) -> dict:
    tag = "SK" + uuid.uuid4().hex[:6].upper()
    names = {service: f"{service}_soak_{tag.lower()}" for service in args.services}
    ports = free_ports(len(args.services) + 1)
    env = {"POSTTRADE_PTRC__SERVICE__METRICS_PORT": str(ports[-1])}
    for service in args.services:
        prefix = f"POSTTRADE_{service.upper()}__"
        env[f"{prefix}SERVICE__NAME"] = names[service]
        env[f"{prefix}RUNTIME__START_FROM"] = "new"
    for item in args.env:
        key, _, value = item.partition("=")
        env[key] = value
    home = Path(tempfile.mkdtemp(prefix=f"soak-{tag.lower()}-"))
    fleet = ServiceFleet(home, env=env, services=args.services, ports=dict(zip(args.services, ports)))
    samples: list[dict] = []
    feed: Feed | None = None
    crashed: list[str] = []
    print(f"\n{rate:g} events/s for {seconds / 60:g} min, tag {tag}: starting {', '.join(args.services)} ...", flush=True)
    try:
        fleet.start(timeout=START_TIMEOUT_S)
        pids = fleet.pids()
        urls = fleet.urls()
        feed = Feed(endpoints.nats_url, FeedSettings(rate=rate, seed=args.seed, tag=tag))
        feed.start()
        began = time.monotonic()
        next_health = began
        health: dict[str, dict] = {}
        with httpx.Client(trust_env=False, timeout=10) as http:
            while True:
                elapsed = time.monotonic() - began
                if time.monotonic() >= next_health:
                    next_health += args.health_every
                    for service in args.services:
                        try:
                            response = http.get(f"{urls[service]}/health")
                            health[service] = {"status": response.status_code, "max_lag": max_lag(response.json())}
                        except (httpx.HTTPError, ValueError) as exc:
                            health[service] = {"status": None, "error": type(exc).__name__}
                sample = {
                    "t_s": round(elapsed, 1),
                    "load1": round(os.getloadavg()[0], 2),
                    "published": feed.published(),
                    "rss_mb": {s: rss_mb(pid) if pid else None for s, pid in pids.items()},
                    "cpu_s": {},
                    "health": {s: dict(h) for s, h in health.items()},
                }
                for service, pid in pids.items():
                    try:
                        sample["cpu_s"][service] = round(cpu_seconds(pid), 2) if pid else None
                    except OSError:
                        sample["cpu_s"][service] = None
                samples.append(sample)
                line = "  ".join(f"{s[:6]} {sample['rss_mb'][s]}" for s in args.services)
                print(f"  {elapsed:6.0f} s  load {sample['load1']:5.2f}  published {sample['published']:>9,}  RSS MB: {line}",
                      flush=True)
                for service, code, _ in fleet.crashed():
                    if service not in crashed:
                        crashed.append(service)
                        print(f"  {service} exited with {code}; last lines:\n{fleet.log_tail(service)}", flush=True)
                if feed.error is not None:
                    raise RuntimeError(f"the demo feed failed: {feed.error!r}")
                if elapsed >= seconds:
                    break
                time.sleep(max(0.0, min(args.sample_every, seconds - elapsed)))
        published = feed.published()
        feed.stop()
        feed = None
    finally:
        try:
            if feed is not None:
                feed.stop()
        finally:
            fleet.stop()
        asyncio.run(forget_apps(endpoints.nats_url, list(names.values())))
        shutil.rmtree(home, ignore_errors=True)
    return {
        "rate_per_s": rate,
        "seconds": seconds,
        "tag": tag,
        "published": published,
        "achieved_rate_per_s": round(published / seconds, 1) if seconds else None,
        "crashed": crashed,
        "load1_mean": round(sum(s["load1"] for s in samples) / len(samples), 2) if samples else None,
        "load1_max": max((s["load1"] for s in samples), default=None),
        "summary": summarize(samples, args.services, args.warm_up),
        "samples": samples,
    }


def summarize(samples: list[dict], services: list[str], warm_up: float) -> dict:
    out = {}
    end_t = samples[-1]["t_s"] if samples else 0
    for service in services:
        series = [(s["t_s"], s["rss_mb"][service]) for s in samples if s["rss_mb"].get(service) is not None]
        after = [(t, v) for t, v in series if t >= warm_up] or series
        second_half = [(t, v) for t, v in after if t >= (after[0][0] + end_t) / 2] if after else []
        cpu = [s["cpu_s"].get(service) for s in samples if s["cpu_s"].get(service) is not None]
        lags = [s["health"].get(service, {}).get("max_lag") for s in samples]
        out[service] = {
            "rss_mb_start": series[0][1] if series else None,
            "rss_mb_after_warm_up": after[0][1] if after else None,
            "rss_mb_end": series[-1][1] if series else None,
            "rss_mb_max": max((v for _, v in series), default=None),
            "growth_mb_per_min_after_warm_up": slope_mb_per_min(after),
            "growth_mb_per_min_second_half": slope_mb_per_min(second_half),
            "cpu_percent_of_a_core": round((cpu[-1] - cpu[0]) / end_t * 100, 1) if len(cpu) > 1 and end_t else None,
            "max_lag_seen": max((lag for lag in lags if lag is not None), default=None),
        }
    return out


def print_table(runs: list[dict], services: list[str]) -> None:
    for run in runs:
        print(f"\n{run['rate_per_s']:g} events/s for {run['seconds'] / 60:g} min (achieved {run['achieved_rate_per_s']}/s), "
              f"load average mean {run['load1_mean']} max {run['load1_max']}"
              + (f"; exited: {', '.join(run['crashed'])}" if run["crashed"] else ""))
        print(f"  {'service':<18}{'RSS MB start':>13}{'after warm-up':>14}{'end':>8}{'max':>8}"
              f"{'MB/min':>9}{'2nd half':>10}{'CPU %':>8}{'max lag':>9}")
        for service in services:
            s = run["summary"][service]
            print(f"  {service:<18}{_f(s['rss_mb_start']):>13}{_f(s['rss_mb_after_warm_up']):>14}{_f(s['rss_mb_end']):>8}"
                  f"{_f(s['rss_mb_max']):>8}{_f(s['growth_mb_per_min_after_warm_up']):>9}"
                  f"{_f(s['growth_mb_per_min_second_half']):>10}{_f(s['cpu_percent_of_a_core']):>8}{_f(s['max_lag_seen']):>9}")


def _f(value) -> str:
    return "-" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", default=f"{DEMO_RATE:g},{DEMO_RATE * 10:g}",
                        help="events/s, comma-separated, one run each (default: the demo rate and ten times it)")
    parser.add_argument("--minutes", default="30",
                        help="per rate (default 30); comma-separated: one per rate, in the order of --rates")
    parser.add_argument("--sample-every", type=float, default=10.0, help="seconds between RSS samples (default 10)")
    parser.add_argument("--health-every", type=float, default=30.0, help="seconds between /health reads (default 30)")
    parser.add_argument("--warm-up", type=float, default=120.0,
                        help="seconds after the feed starts before growth is measured (default 120)")
    parser.add_argument("--services", nargs="+", choices=SERVICES, default=list(SERVICES), metavar="SERVICE")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment for the services (a config override), repeatable")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    rates = [float(r) for r in args.rates.split(",") if r.strip()]
    minutes = [float(m) for m in args.minutes.split(",") if m.strip()]
    if len(minutes) == 1:
        minutes *= len(rates)
    if len(minutes) != len(rates):
        parser.error("--minutes takes one value, or one per rate")
    endpoints = stack.endpoints()
    runs = [soak(rate, m * 60, args, endpoints) for rate, m in zip(rates, minutes)]
    result = {
        "benchmark": "soak",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "minutes_per_rate": minutes,
        "sample_every_s": args.sample_every,
        "warm_up_s": args.warm_up,
        "services": args.services,
        "env": args.env,
        "cpus": os.cpu_count(),
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print_table(runs, args.services)
    print(f"\nwritten to {args.out}")
    if any(run["crashed"] for run in runs):
        sys.exit(1)


if __name__ == "__main__":
    main()
