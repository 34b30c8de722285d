"""`posttrade up` and `posttrade down`: the whole pipeline on this machine.

`up`: the local stack (idempotent), the six services as separate processes on their
documented ports, the demo feed; then it supervises in the foreground until Ctrl-C.
`down`, from any terminal: stops what `up` started (through its pidfiles), and the stack.

Decisions (docs/running.md says the same to users):
* A service that exits is reported with the tail of its log and restarted after a
  back-off (1, 2, 4 ... 30 s): the runtime resumes every agent at its acknowledged
  position, so a restart is the recovery the services are built for. After five crashes
  in a row, each within a minute of its start, it is left down (a crash loop buries the
  first traceback); `--no-restart` reports only.
* Ctrl-C stops the feed, the services and the stack servers *this* `up` started. A stack
  that was already running is left running: it was someone's (another `up`, `make test`,
  `posttrade stack up`); `posttrade down` stops it.
* `down` is "stop everything under this home": a running `up` is asked to stop (and
  waited for), then any service still in a pidfile, then the stack (`--keep-stack` keeps it).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

from posttrade.commands.demo import add_feed_options, settings_from
from posttrade.commands.stack import print_stops
from posttrade.demo.feed import DemoFeed, FeedSettings
from posttrade.stack import Endpoints, StackError, endpoints, stack_servers
from posttrade.stack import down as stack_down
from posttrade.stack import status as stack_status
from posttrade.stack import up as stack_up
from posttrade.stack.fleet import SERVICES, FleetError, ServiceFleet
from posttrade.stack.supervisor import STOP_TIMEOUT, send_signal
from posttrade.streams.nats import NatsTransport

START_TIMEOUT_S = 240.0  # six Python services importing at once on a 2-core machine
STATUS_EVERY_S = 60.0
RESTART_BACKOFF_S = (1, 2, 4, 8, 16, 30)
CRASH_LOOP_LIMIT = 5  # crashes in a row, each soon after its start, before giving up
STAYED_UP_S = 60.0  # a service that ran this long before crashing starts a new count
# `down` waits this long for a running `up` to stop everything it started.
UP_STOP_WAIT_S = STOP_TIMEOUT + 60.0

# What to look at first, per service: (path, what it shows).
FIRST_LOOKS = {
    "ptrc": [
        ("/", "the desk's pages: the live blotter here, the other five in its navigation bar"),
        ("/positions", "positions per account and symbol"),
        ("/pnl/summary", "P&L by account and symbol"),
    ],
    "pnl": [("/pnl/realtime", "P&L valued at the market, as it moves")],
    "hot_cache": [("/cache/stats", "hits, keys, freshness"), ("/quotes/{symbol}", "the last quote, from Valkey")],
    "questdb_writer": [("/stats", "rows batched into QuestDB")],
    "feast_pipeline": [("/features/status", "feature views: rows, freshness")],
    "execution_quality": [
        ("/metrics/execution?level=order", "orders: fill ratio, shortfall"),
        ("/analytics/summary", "slippage and markouts by account, symbol, venue"),
    ],
}


UP_HELP = """\
Run the whole pipeline on this machine: the local stack (NATS, Valkey, QuestDB; started
if not running), the six services as separate processes on their documented ports
(override with POSTTRADE_<SERVICE>__SERVICE__PORT), and a demo feed. Prints the URLs,
then supervises in the foreground: a service that exits is reported with its log tail
and restarted. Ctrl-C (or `posttrade down` from another terminal) stops what it started;
a stack that was already running stays up. See docs/running.md.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    up = subparsers.add_parser(
        "up", help="run everything locally: stack, the six services, a demo feed", description=UP_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    up.add_argument("--home", type=Path, help="data folder (env POSTTRADE_HOME, default ./.posttrade)")
    up.add_argument("--services", nargs="+", choices=SERVICES, default=list(SERVICES), metavar="SERVICE",
                    help=f"only these (default all: {' '.join(SERVICES)})")  # fmt: skip
    up.add_argument("--no-feed", action="store_true", help="no demo feed: bring your own data")
    add_feed_options(up)
    up.add_argument("--no-restart", action="store_true", help="report a service that exits, do not restart it")
    up.add_argument("--start-timeout", type=float, default=START_TIMEOUT_S, metavar="SECONDS",
                    help=f"how long the services may take to become healthy (default {START_TIMEOUT_S:.0f})")  # fmt: skip
    up.set_defaults(handler=run_up)
    down = subparsers.add_parser(
        "down", help="stop what `posttrade up` started, and the stack",
        description="Stop a running `posttrade up` (and wait for it), any service still in its pidfile "
        "under the home, then the local stack's servers.",
    )  # fmt: skip
    down.add_argument("--home", type=Path, help="data folder (env POSTTRADE_HOME, default ./.posttrade)")
    down.add_argument("--keep-stack", action="store_true", help="stop the services only")
    down.set_defaults(handler=run_down)


# -- the pidfile of `up` itself -------------------------------------------------------------
# `up` runs wherever the user stands, so its working directory cannot recognise it as the
# services' can. Its pidfile holds the pid and the process's start time (field 22 of
# /proc/<pid>/stat): a reused pid has another start time.


def _up_pidfile(home: Path) -> Path:
    return home / "run" / "up.pid"


def _start_time(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: count from its end.
    return int(stat[stat.rindex(")") + 2 :].split()[19])


def running_up(home: Path) -> int | None:
    """The pid of a `posttrade up` running from this home, if there is one."""
    try:
        pid_text, started = _up_pidfile(home).read_text().split()
        pid = int(pid_text)
    except (FileNotFoundError, ValueError):
        return None
    return pid if _start_time(pid) == int(started) else None


def _claim_up(home: Path) -> None:
    path = _up_pidfile(home)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"{os.getpid()} {_start_time(os.getpid())}\n")
    tmp.replace(path)


def _release_up(home: Path) -> None:
    if running_up(home) == os.getpid():
        _up_pidfile(home).unlink(missing_ok=True)


# -- up -------------------------------------------------------------------------------------


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM (e.g. from `posttrade down`) stops `up` like Ctrl-C


def run_up(args: argparse.Namespace) -> int:
    try:
        ep = endpoints(home=args.home)
        feed = None if args.no_feed else settings_from(args)
        # A tagged feed's symbols are not the reference data's: its services read a copy
        # naming them (ESU4-<tag> with ESU4's multiplier, USDJPY-<tag> quoting USD/JPY).
        fleet_env = {}
        if feed is not None and feed.tag:
            fleet_env["POSTTRADE__REFERENCE_FILE"] = str(tagged_reference_file(ep.home, feed.tag))
    except (ValueError, OSError) as exc:
        print(f"posttrade up: {exc}", file=sys.stderr)
        return 2
    other = running_up(ep.home)
    if other is not None:
        print(f"posttrade up: already running from {ep.home} (pid {other}); `posttrade down` stops it",
              file=sys.stderr)  # fmt: skip
        return 1
    _claim_up(ep.home)
    signal.signal(signal.SIGTERM, _interrupt)
    # The servers running before: `up` stops only the others (those it started, even if it
    # is interrupted while starting them).
    try:
        running_before = {state.server.name for state in stack_status(ep) if state.pid is not None}
    except StackError as exc:
        print(f"posttrade up: {exc}", file=sys.stderr)
        _release_up(ep.home)
        return 1
    # The feed's warnings (NATS trouble, falling behind) between the supervisor's lines.
    logging.basicConfig(level=logging.WARNING, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    fleet: ServiceFleet | None = None
    fleet_started = False
    status = 0
    try:
        print(f"posttrade up: the local stack under {_shown(ep.home)} ...", flush=True)
        states = stack_up(ep)
        print("  " + ", ".join(f"{s.server.name} {'started' if s.started else 'already running'}" for s in states))
        fleet = ServiceFleet(ep.home, services=args.services, env=fleet_env)
        print(f"starting {', '.join(fleet.services)} (logs in {_shown(ep.home / 'logs' / 'services')}) ...", flush=True)
        began = time.monotonic()
        # A start that fails stops what it started itself; services it refused to start
        # twice (another fleet's, from this home) are not ours to stop.
        fleet.start(timeout=args.start_timeout)
        fleet_started = True
        print(f"  all healthy after {time.monotonic() - began:.0f} s", flush=True)
        _print_welcome(fleet, ep, feed)
        asyncio.run(_supervise(fleet, ep, feed, restart=not args.no_restart))
    except KeyboardInterrupt:
        pass
    except (StackError, FleetError) as exc:
        print(f"posttrade up: {exc}", file=sys.stderr)
        status = 1
    finally:
        # Finish stopping whatever further signals come: leaving half a fleet is worse.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("\nstopping ...", flush=True)
        if fleet is not None and fleet_started:
            for result in fleet.stop_services():
                if result.pid is not None:
                    print(f"  {result.name}: {result.outcome}", flush=True)
        for result in stack_down(ep, names=[s.name for s in stack_servers(ep) if s.name not in running_before]):
            if result.pid is not None:
                print(f"  {result.name}: {result.outcome}", flush=True)
        if running_before:
            print(f"  {', '.join(sorted(running_before))}: running before `posttrade up`, left running "
                  "(`posttrade down` stops them)")  # fmt: skip
        _release_up(ep.home)
    return status


def tagged_reference_file(home: Path, tag: str) -> Path:
    """The reference data the services would read, with the demo's symbols renamed with
    the feed's tag (`posttrade.demo.market.tagged_reference`), written under the home."""
    import yaml

    from posttrade.config import default_config_dir, load_config
    from posttrade.core.reference import REFERENCE_FILE, Reference
    from posttrade.demo.market import INSTRUMENTS, tagged_reference
    from posttrade.services.ptrc import CONFIG

    configured = load_config("ptrc", CONFIG).reference_file
    source = Path(configured) if configured else default_config_dir() / REFERENCE_FILE
    data = yaml.safe_load(source.read_text()) if configured or source.exists() else None
    tagged = tagged_reference(data, INSTRUMENTS, tag)
    Reference.from_data(tagged)  # a ReferenceError (a ValueError) names the problem
    path = home / "run" / f"reference-{tag}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# {source} with the demo feed's symbols tagged -{tag} (posttrade up --tag)\n"
                    + yaml.safe_dump(tagged, sort_keys=False))  # fmt: skip
    return path.absolute()


def _print_welcome(fleet: ServiceFleet, ep: Endpoints, feed: FeedSettings | None) -> None:
    urls = fleet.urls()
    width = max(len(s) for s in fleet.services)
    print("\nposttrade is up:\n")
    for service in fleet.services:
        extra = f"   metrics :{fleet.metrics_ports[service]}" if service in fleet.metrics_ports else ""
        print(f"  {service:<{width}}  {urls[service]}{extra}   log {_shown(fleet.log_path(service))}")
    if feed is not None:
        print(f"\n  demo feed: {feed.rate:g} events/s, seed {feed.seed} (`--seed {feed.seed}` replays it)"
              + (f", tag {feed.tag}" if feed.tag else ""))  # fmt: skip
    else:
        print("\n  no demo feed (--no-feed): publish your own data to NATS at " + ep.nats_url)
    symbol = "AAPL" + (f"-{feed.tag}" if feed is not None and feed.tag else "")
    print("\nOpen first:")
    looks = [
        (urls[service] + path.replace("{symbol}", symbol), what)
        for service in fleet.services
        for path, what in FIRST_LOOKS.get(service, [])
    ]
    link_width = max(len(link) for link, _ in looks) if looks else 0
    for link, what in looks:
        print(f"  {link:<{link_width}}  {what}")
    print(f"  {ep.questdb_http_url + '/':<{link_width}}  QuestDB's console: SQL on what the services stored")
    print("\nCtrl-C stops what `posttrade up` started; `posttrade down` does the same from another terminal.\n",
          flush=True)  # fmt: skip


@dataclass
class _CrashRecord:
    in_a_row: int = 0
    restarting: bool = False
    given_up: bool = False
    started_at: float = 0.0


async def _supervise(fleet: ServiceFleet, ep: Endpoints, feed_settings: FeedSettings | None, restart: bool) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    transport = feed = feed_task = None
    if feed_settings is not None:
        transport = NatsTransport(ep.nats_url, name="posttrade-demo-feed")
        await asyncio.wait_for(transport.connect(), 15)
        feed = DemoFeed(transport, feed_settings)
        feed_task = asyncio.create_task(feed.run(stop=stop))
    records = {service: _CrashRecord(started_at=time.monotonic()) for service in fleet.services}
    restarts: set[asyncio.Task] = set()
    next_status = time.monotonic() + STATUS_EVERY_S
    try:
        while not stop.is_set():
            with suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
            if stop.is_set():
                break
            if feed_task is not None and feed_task.done():
                problem = feed_task.exception() if not feed_task.cancelled() else "cancelled"
                print(f"[{_now()}] the demo feed stopped: {problem!r}; the services keep running", flush=True)
                feed_task = None
            for service, code, tail in fleet.crashed():
                record = records[service]
                if record.restarting or record.given_up:
                    continue
                ran = time.monotonic() - record.started_at
                record.in_a_row = 1 if ran >= STAYED_UP_S else record.in_a_row + 1
                print(f"\n[{_now()}] {service} {_exit_text(code)} after {ran:.0f} s; "
                      f"last lines of {_shown(fleet.log_path(service))}:\n{_indent(tail)}", flush=True)  # fmt: skip
                if not restart:
                    record.given_up = True
                    print("  not restarting it (--no-restart); the others keep running", flush=True)
                elif record.in_a_row >= CRASH_LOOP_LIMIT:
                    record.given_up = True
                    print(f"  {record.in_a_row} crashes in a row: leaving {service} down; the others keep running",
                          flush=True)  # fmt: skip
                else:
                    delay = RESTART_BACKOFF_S[min(record.in_a_row - 1, len(RESTART_BACKOFF_S) - 1)]
                    print(f"  restarting it in {delay} s", flush=True)
                    record.restarting = True
                    task = asyncio.create_task(_restart(fleet, service, record, delay, stop))
                    restarts.add(task)
                    task.add_done_callback(restarts.discard)
            if time.monotonic() >= next_status:
                next_status = time.monotonic() + STATUS_EVERY_S
                alive = sum(1 for pid in fleet.pids().values() if pid is not None)
                line = f"[{_now()}] {alive}/{len(fleet.services)} services running"
                if feed is not None:
                    line += f"; feed: {feed.progress.summary()}"
                print(line, flush=True)
    finally:
        stop.set()
        for task in list(restarts):
            task.cancel()
        if feed_task is not None:
            with suppress(Exception):
                await asyncio.wait_for(feed_task, 10)
        if transport is not None:
            with suppress(Exception):
                await transport.close()
        if feed is not None:
            print(f"demo feed: published {feed.progress.summary()}", flush=True)


async def _restart(fleet: ServiceFleet, service: str, record: _CrashRecord, delay: float, stop: asyncio.Event) -> None:
    with suppress(asyncio.TimeoutError):
        await asyncio.wait_for(stop.wait(), delay)
    if stop.is_set():
        return
    record.started_at = time.monotonic()
    try:
        # A thread, so the feed goes on; fleet.stop_services() interrupts the wait.
        await asyncio.to_thread(fleet.restart, service)
        print(f"[{_now()}] {service} restarted and healthy", flush=True)
    except FleetError as exc:
        if not stop.is_set():
            print(f"[{_now()}] {service} did not come back: {exc}", flush=True)
    finally:
        record.restarting = False


# -- down -----------------------------------------------------------------------------------


def run_down(args: argparse.Namespace) -> int:
    try:
        ep = endpoints(home=args.home)
    except ValueError as exc:
        print(f"posttrade down: {exc}", file=sys.stderr)
        return 2
    status = 0
    up_pid = running_up(ep.home)
    if up_pid is not None:
        print(f"posttrade up (pid {up_pid}): asked to stop ...", flush=True)
        send_signal(up_pid, signal.SIGTERM)
        deadline = time.monotonic() + UP_STOP_WAIT_S
        while running_up(ep.home) == up_pid and _start_time(up_pid) is not None and time.monotonic() < deadline:
            time.sleep(0.2)
        if running_up(ep.home) == up_pid:
            print(f"  still running after {UP_STOP_WAIT_S:.0f} s; stopping its services directly", flush=True)
        else:
            print("  stopped", flush=True)
    try:
        status |= print_stops(ServiceFleet(ep.home).stop_services(adopt=True))
    except FleetError as exc:
        print(f"posttrade down: {exc}", file=sys.stderr)
        status = 1
    if not args.keep_stack:
        try:
            status |= print_stops(stack_down(ep))
        except StackError as exc:
            print(f"posttrade down: {exc}", file=sys.stderr)
            status = 1
    return int(status)


# -- helpers --------------------------------------------------------------------------------


def _now() -> str:
    return time.strftime("%H:%M:%S")


def _exit_text(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())


def _shown(path: Path) -> str:
    relative = os.path.relpath(path)
    return relative if not relative.startswith("..") else str(path)


__all__ = ["register", "run_down", "run_up", "running_up"]
