"""`posttrade demo feed`: publish synthetic market data, orders and fills on NATS."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import signal
import sys
import time

from posttrade.demo.feed import DemoFeed, FeedProgress, FeedSettings
from posttrade.stack import endpoints
from posttrade.streams.nats import NatsTransport

FEED_HELP = """\
Publish a synthetic trading day on NATS, in real time: 25 instruments whose quotes follow
a random walk (20 US equities; the future ESU4, the FX pairs USDJPY and EURUSD, BTCUSDT
and SAP, in USD, JPY, EUR and USDT as config/backend/reference.yaml says), market trades
around them, and orders from five accounts filled by a simple execution simulator
against the quotes (fills with slippage, partly filled and cancelled orders). Every
service consumes it. The same --seed gives the same events.
"""


def add_feed_options(parser: argparse.ArgumentParser) -> None:
    """The feed's options; `posttrade up` takes the same ones."""
    parser.add_argument("--rate", type=float, default=300.0, help="events per second, all kinds (default 300)")
    parser.add_argument("--seed", type=int, help="random seed (default: a new one, printed)")
    parser.add_argument(
        "--tag", help="append -TAG to every symbol and account, to keep this feed's data apart from others' "
        "(`up` gives its services reference data under the tagged names)"
    )


def settings_from(args: argparse.Namespace) -> FeedSettings:
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1_000_000)
    return FeedSettings(rate=args.rate, seed=seed, tag=args.tag)


def default_nats_url() -> str:
    # What the services use (their config override), else the local stack's.
    return os.environ.get("POSTTRADE__NATS__URL") or endpoints().nats_url


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="synthetic data for local runs", description=__doc__)
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    feed = actions.add_parser("feed", help="publish synthetic quotes, trades, orders and fills", description=FEED_HELP)
    add_feed_options(feed)
    feed.add_argument("--duration", type=float, help="seconds to run (default: until Ctrl-C)")
    feed.add_argument("--nats-url", help="default: $POSTTRADE__NATS__URL, else the local stack's NATS")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = settings_from(args)
    except ValueError as exc:
        print(f"posttrade demo feed: {exc}", file=sys.stderr)
        return 2
    url = args.nats_url or default_nats_url()
    print(
        f"posttrade demo feed: {settings.rate:g} events/s to {url}, seed {settings.seed}"
        + (f", tag {settings.tag}" if settings.tag else "")
        + (f", for {args.duration:g} s" if args.duration else ", until Ctrl-C"),
        flush=True,
    )
    try:
        progress = asyncio.run(_feed(url, settings, args.duration))
    except OSError as exc:
        print(f"posttrade demo feed: cannot reach NATS at {url}: {exc}", file=sys.stderr)
        return 1
    print(f"published {progress.summary()}")
    return 0


async def _feed(url: str, settings: FeedSettings, duration: float | None) -> FeedProgress:
    transport = NatsTransport(url, name="posttrade-demo-feed")
    feed = DemoFeed(transport, settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    last_report = [time.monotonic()]

    def report(progress: FeedProgress) -> None:
        if time.monotonic() - last_report[0] >= 10:
            last_report[0] = time.monotonic()
            print(f"  {progress.summary()}", flush=True)

    try:
        # nats-py retries a refused connection forever; a feed that cannot start should say so.
        await asyncio.wait_for(transport.connect(), 15)
        return await feed.run(duration, stop, on_step=report)
    except asyncio.TimeoutError:
        raise OSError("no connection within 15 s") from None
    finally:
        await transport.close()
