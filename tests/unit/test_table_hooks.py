"""What an agent keeps beside its tables follows them through a crash (`on_rollback`), and
state recording facts already durable elsewhere survives one (`outside_batch`)."""

from __future__ import annotations

import asyncio

from posttrade.app import App
from posttrade.streams.memory import MemoryTransport
from posttrade.tables.table import outside_batch


async def wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


async def test_a_crash_rolls_back_the_batch_but_not_what_was_written_outside_it_and_calls_the_hook():
    transport = MemoryTransport()
    app = App("svc", transport)
    app.runtime.poll_timeout_s = 0.05
    channel = app.channel("c", stream="S", subjects=["s.>"], value_type=dict)
    counts = app.table("counts", value_type=int)
    written = app.table("written", value_type=int)
    shadow = {"total": 0}  # state kept beside the table, like a book
    rollbacks: list[int] = []
    crashed = False

    def follow_the_table_back() -> None:
        rollbacks.append(counts.get("n", 0))
        shadow["total"] = counts.get("n", 0)

    @app.agent(channel, name="count", on_rollback=follow_the_table_back)
    async def count(stream):
        nonlocal crashed
        async for event in stream:
            counts.apply("n", lambda n: (n or 0) + 1)
            shadow["total"] += 1
            with outside_batch():
                written["rows"] = written.get("rows", 0) + 1  # as if a sink had stored it
            if event["i"] == 2 and not crashed:
                crashed = True
                raise RuntimeError("boom")

    async with app:
        for i in range(1, 4):
            await transport.publish(f"s.{i}", b'{"i": %d}' % i)
        await wait_for(lambda: counts.get("n") == 3)
    # The crash undid the first batch's count (redelivered, counted again) and the hook
    # brought the shadow back with it; the writes outside the batch were kept.
    assert rollbacks == [0]
    assert shadow["total"] == counts["n"] == 3
    assert written["rows"] > 3
