"""Two no-op JetStream hops: the bus's own share of fill → /pnl/realtime (positions.py).

    python benchmarks/_bus_hops.py forward --nats URL --app NAME --prefix P --port N
    python benchmarks/_bus_hops.py count   --nats URL --app NAME --from STREAM --port N

`forward` stands where ptrc stands: a durable pull consumer on the fill stream (FILLS,
every fill subject, from the messages published after it exists); every message's
payload is published unchanged on `<prefix>.<its subject>`, and the batch is
acknowledged once JetStream has stored every copy, as ptrc acknowledges a batch of fills
once its PositionUpdates are stored. The stream that captures `<prefix>.>` is the
caller's to create (and delete).

`count` stands where pnl stands: a durable pull consumer on that stream; it counts the
messages per account (the fill subject's account token) and acknowledges the batch.

Each process serves a minimal HTTP/1.1 server (keep-alive, one JSON answer per GET) on
127.0.0.1:`--port`: `/lag` (the consumer's pending messages, as /health gives an agent's)
and, for `count`, `/count?account=<token>` → `{"count": n}`.

What they share with the services: the project's own transport (`NatsTransport`: the
lean pull protocol with AckPolicy.ALL and its acked publisher), the runtime's batch size
(1,000) and poll timeout (1 s), a process each. What they leave out is everything the
services do on top: decoding and validating, the position and P&L work, tables and their
changelogs, sinks, timers, Starlette. Consumers are named `<app>-forward` and
`<app>-count`, so `posttrade forget <app>` (`forget_apps`) removes them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from collections import Counter
from urllib.parse import parse_qs, urlsplit

from posttrade.streams.nats import NatsTransport
from posttrade.streams.transport import ConsumerSpec, StartPosition

BATCH = 1000  # the runtime's default batch_size
POLL_TIMEOUT_S = 1.0  # the runtime's poll_timeout_s
FILL_STREAM, FILL_SUBJECTS = "FILLS", ("trading.fills.>",)


async def serve_json(port: int, answer) -> asyncio.AbstractServer:
    """GET <path> → `await answer(path)` as JSON, keep-alive, Content-Length set (what
    positions.py's poller reads)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                body = json.dumps(await answer(head.split(b" ", 2)[1].decode())).encode()
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                    % (len(body), body)
                )
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", port)


async def run(args: argparse.Namespace) -> None:
    transport = NatsTransport(args.nats, name=f"{args.app}-{args.role}")
    await transport.connect()
    if args.role == "forward":
        spec = ConsumerSpec(FILL_STREAM, f"{args.app}-forward", FILL_SUBJECTS, StartPosition(new_only=True))
    else:
        spec = ConsumerSpec(args.source, f"{args.app}-count", (), StartPosition(new_only=True))
    consumer = await transport.open_consumer(spec)
    counts: Counter[str] = Counter()

    async def answer(path: str) -> dict:
        parts = urlsplit(path)
        if parts.path == "/count":
            return {"count": counts[parse_qs(parts.query)["account"][0]]}
        if parts.path == "/lag":
            return {"lag": await consumer.pending()}
        return {"status": "ok"}

    server = await serve_json(args.port, answer)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    publish = transport.publish_deferred
    try:
        while not stop.is_set():
            batch = await consumer.next_batch(BATCH, POLL_TIMEOUT_S)
            if not batch:
                continue
            if args.role == "forward":
                stored = [await publish(f"{args.prefix}.{d.subject}", d.data) for d in batch]
                await asyncio.gather(*stored)
            else:
                for d in batch:  # ...<prefix>.trading.fills.<account>.<symbol>
                    counts[d.subject.rsplit(".", 2)[-2]] += 1
            await consumer.ack_through(batch[-1])
    finally:
        server.close()
        await consumer.close()
        await transport.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("role", choices=("forward", "count"))
    parser.add_argument("--nats", required=True)
    parser.add_argument("--app", required=True, help="prefix of the durable consumers' names")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--prefix", help="forward: the subject prefix of the copies (a stream captures <prefix>.>)")
    parser.add_argument("--from", dest="source", help="count: the stream it reads")
    args = parser.parse_args()
    if args.role == "forward" and not args.prefix:
        parser.error("forward needs --prefix")
    if args.role == "count" and not args.source:
        parser.error("count needs --from")
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
