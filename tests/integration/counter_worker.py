"""A worker process for the runtime's integration tests.

Consumes `Tick` events from a stream and keeps, per key, the count and the sum of
their values in a changelog table — so any event applied twice or lost shows in the
totals. Runs until SIGTERM (or SIGKILL, which is the point of some tests).

    python counter_worker.py NATS_URL STREAM APP_NAME [BATCH_SIZE]
"""

from __future__ import annotations

import asyncio
import logging
import sys

import msgspec

from posttrade.app import App
from posttrade.streams.nats import NatsTransport


class Tick(msgspec.Struct, frozen=True):
    key: str
    value: int


class Totals(msgspec.Struct):
    count: int = 0
    total: int = 0


def build(url: str, stream: str, name: str, batch_size: int = 100) -> tuple[App, object]:
    app = App(name, NatsTransport(url, name=name))
    app.runtime.batch_size = batch_size
    ticks = app.channel("ticks", stream=stream, subjects=[f"{stream.lower()}.>"], value_type=Tick)
    totals = app.table("totals", value_type=Totals, default=Totals)

    @app.agent(ticks)
    async def count(stream):
        async for tick in stream:
            totals.apply(tick.key, lambda t: Totals(t.count + 1, t.total + tick.value))

    return app, totals


async def main(url: str, stream: str, name: str, batch_size: int) -> None:
    app, _ = build(url, stream, name, batch_size)
    await app.run(host="127.0.0.1", port=0)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    url, stream, name = sys.argv[1:4]
    batch = int(sys.argv[4]) if len(sys.argv) > 4 else 100
    asyncio.run(main(url, stream, name, batch))
