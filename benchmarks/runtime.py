"""Events/s through the runtime on the real NATS server of the local stack.

Preloads a stream with N Fill events (core NATS publishes, confirmed by the stream's
message count), then times a fresh durable agent consuming all of them:

* noop:  decode + validate each Fill, nothing else;
* table: decode + update a changelog table keyed by (account, symbol), flushed and
         acknowledged batch by batch (the path every stateful agent takes).

Writes benchmarks/results/runtime.json and prints a table.

    python benchmarks/runtime.py [--events 200000] [--batch 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from decimal import Decimal
from pathlib import Path

import nats

from posttrade import stack
from posttrade.app import App
from posttrade.streams.events import Fill, encode
from posttrade.streams.nats import NatsTransport

RESULTS = Path(__file__).parent / "results" / "runtime.json"


def sample_fills(n: int) -> list[bytes]:
    out = []
    for i in range(n):
        out.append(
            encode(
                Fill(
                    ts=1_700_000_000_000_000_000 + i,
                    fill_id=f"f{i}",
                    account=f"ACC{i % 10}",
                    symbol=f"SYM{i % 100}",
                    side="BUY" if i % 3 else "SELL",
                    qty=Decimal("100"),
                    price=Decimal("101.25"),
                    fee=Decimal("0.35"),
                )
            )
        )
    return out


async def preload(url: str, stream: str, payloads: list[bytes]) -> None:
    nc = await nats.connect(url, pending_size=256 * 1024 * 1024)
    js = nc.jetstream()
    await js.add_stream(name=stream, subjects=[f"{stream.lower()}.>"])
    subject = f"{stream.lower()}.fills"
    for i, data in enumerate(payloads):
        await nc.publish(subject, data)
        if i % 20_000 == 0:
            await nc.flush()
    await nc.flush()
    while (await js.stream_info(stream)).state.messages < len(payloads):
        await asyncio.sleep(0.05)
    await nc.close()


async def run_agent(url: str, stream: str, kind: str, n: int, batch: int) -> float:
    app = App(f"bench{uuid.uuid4().hex[:6]}", NatsTransport(url))
    app.runtime.batch_size = batch
    app.runtime.max_ack_pending = 4 * batch
    fills = app.channel("fills", stream=stream, subjects=[f"{stream.lower()}.>"], value_type=Fill)
    done = asyncio.Event()
    seen = 0

    if kind == "noop":

        @app.agent(fills)
        async def noop(s):
            nonlocal seen
            async for _ in s:
                seen += 1
                if seen == n:
                    done.set()

    else:
        positions = app.table("qty", value_type=Decimal, key_type=tuple[str, str], default=lambda: Decimal(0))

        @app.agent(fills)
        async def table(s):
            nonlocal seen
            async for f in s:
                key = (f.account, f.symbol)
                positions.apply(key, lambda q: q + f.qty if f.side == "BUY" else q - f.qty)
                seen += 1
                if seen == n:
                    done.set()

    await app.start()
    started = time.perf_counter()
    await done.wait()
    # The last batch must be committed (changelog + ack) before the clock stops.
    for runner in app.agents.values():
        await runner.stream.commit()
    elapsed = time.perf_counter() - started
    for changelog in app.tables.values():
        await (await app.transport.key_value(changelog.bucket)).destroy()
    await app.stop()
    return n / elapsed


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=1000)
    args = parser.parse_args()
    url = stack.endpoints().nats_url
    stream = f"BENCH_{uuid.uuid4().hex[:8].upper()}"
    await preload(url, stream, sample_fills(args.events))
    noop = await run_agent(url, stream, "noop", args.events, args.batch)
    table = await run_agent(url, stream, "table", args.events, args.batch)
    nc = await nats.connect(url)
    await nc.jetstream().delete_stream(stream)
    await nc.close()

    result = {
        "noop_events_per_s": round(noop),
        "table_events_per_s": round(table),
        "events": args.events,
        "batch_size": args.batch,
        "goal_noop_events_per_s": 50_000,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'agent':<8}{'events':>10}{'events/s':>12}")
    print(f"{'noop':<8}{args.events:>10}{noop:>12,.0f}")
    print(f"{'table':<8}{args.events:>10}{table:>12,.0f}")
    print(f"(goal: >= 50,000 events/s through the no-op agent) -> {RESULTS}")


if __name__ == "__main__":
    asyncio.run(main())
