"""`posttrade forget NAME`: delete what a service instance keeps on NATS.

A service's agents read through durable consumers (`<name>-<agent>`) and its tables
live in key-value buckets (`<name>-<table>`). Both outlive the process on purpose: a
restart resumes where it stopped. When a deployment is taken out of service for good,
they are left behind, and the server keeps doing work for every stale consumer on every
message its stream takes. This lists them, and deletes them with --yes.
"""

from __future__ import annotations

import argparse
import asyncio
import os

from ..streams.nats import NatsTransport

HELP = __doc__.split("\n", 2)[2]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "forget",
        help="delete a retired service instance's durable consumers and tables on NATS",
        description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("name", help="the instance's service.name (e.g. ptrc, or ptrc_eu)")
    parser.add_argument("--nats", default=os.environ.get("POSTTRADE__NATS__URL", "nats://127.0.0.1:4222"),
                        help="NATS URL (default: $POSTTRADE__NATS__URL or %(default)s)")
    parser.add_argument("--yes", action="store_true", help="delete them (without it: only list)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    return asyncio.run(_run(args))


async def _run(args: argparse.Namespace) -> int:
    transport = NatsTransport(args.nats, name="posttrade-forget")
    await transport.connect()
    try:
        found = await (transport.forget_app(args.name) if args.yes else transport.app_state(args.name))
    finally:
        await transport.close()
    for kind, name in found:
        print(f"{'deleted' if args.yes else 'would delete'} {kind} {name}")
    if not found:
        print(f"nothing on NATS belongs to {args.name!r}")
    elif not args.yes:
        print("run again with --yes to delete these")
    return 0
