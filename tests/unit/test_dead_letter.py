"""Dead-lettering cannot fail, every crash is charged to a message, /health tells the truth.

On the in-memory transport, which refuses a message over its `max_payload` as a NATS
server would (headers, the `Nats-Msg-Id` header and the payload together). How crashes
are charged and what cannot be dead-lettered is terminated, on both transports:
tests/runtime_guarantees.py.
"""

from __future__ import annotations

import asyncio
from decimal import Decimal

import httpx
import pytest

from posttrade.app import App, RecentCount, dead_letter_record
from posttrade.streams.events import Fill, encode
from posttrade.streams.memory import MemoryTransport
from posttrade.streams.transport import PayloadTooLarge, message_size
from posttrade.web.server import build_web_app

T0 = 1_700_000_000_000_000_000
ORIGIN = {
    "Posttrade-Reason": "invalid Fill: expected JSON",
    "Posttrade-Service": "ptrc",
    "Posttrade-Agent": "track_positions",
    "Posttrade-Stream": "FILLS",
    "Posttrade-Subject": "trading.fills.A.XYZ",
    "Posttrade-Seq": "42",
}
MSG_ID = "dlq:ptrc:track_positions:FILLS:42"


def fill(i: int, account: str = "A") -> bytes:
    return encode(Fill(ts=T0 + i, fill_id=f"f{i}", account=account, symbol="XYZ", side="BUY",
                       qty=Decimal(1), price=Decimal(10)))


def weight(data: bytes, headers: dict[str, str]) -> int:
    """What the record weighs against max_payload, as the server counts it."""
    return message_size(data, {**headers, "Nats-Msg-Id": MSG_ID})


# -- the record ---------------------------------------------------------------------------


def test_a_record_that_fits_is_kept_whole_and_says_nothing_was_cut():
    data, headers = dead_letter_record(b"garbage", dict(ORIGIN), msg_id=MSG_ID, max_payload=1024 * 1024)
    assert data == b"garbage"
    assert headers == ORIGIN


@pytest.mark.parametrize("max_payload", [1024 * 1024, 64 * 1024, 2048, 1000])
@pytest.mark.parametrize("size", [1_048_376, 1_048_576, 5_000])
def test_a_near_max_payload_message_is_cut_to_fit_with_reason_and_origin_kept(max_payload, size):
    original = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    data, headers = dead_letter_record(original, dict(ORIGIN), msg_id=MSG_ID, max_payload=max_payload)
    if size + 500 <= max_payload:
        assert data == original
        return
    # The record: 1,048,376 bytes + its headers was 1,048,673, over 1,048,576.
    assert weight(data, headers) <= max_payload
    assert weight(data, headers) > max_payload - 8  # and nothing was given away needlessly
    assert original.startswith(data)
    assert headers["Posttrade-Truncated"] == str(size)
    assert {k: headers[k] for k in ORIGIN} == ORIGIN


def test_header_values_cannot_break_the_header_block_and_a_long_reason_is_cut():
    reason = "line one\r\nline two\x00\t" + "é" * 10_000
    data, headers = dead_letter_record(b"x", {**ORIGIN, "Posttrade-Reason": reason}, msg_id=MSG_ID,
                                       max_payload=1024 * 1024)
    assert data == b"x"
    assert headers["Posttrade-Reason"].startswith("line one  line two")
    assert not any(c in headers["Posttrade-Reason"] for c in "\r\n\x00\t")
    assert len(headers["Posttrade-Reason"].encode()) <= 4000
    headers["Posttrade-Reason"].encode().decode()  # cut on a character boundary


def test_a_reason_too_long_for_a_small_max_payload_is_cut_and_headers_alone_too_large_are_refused():
    long = {**ORIGIN, "Posttrade-Reason": "why " * 1000}
    data, headers = dead_letter_record(b"y" * 2000, long, msg_id=MSG_ID, max_payload=1000)
    assert weight(data, headers) <= 1000
    assert headers["Posttrade-Reason"].startswith("why why") and headers["Posttrade-Truncated"] == "2000"
    with pytest.raises(PayloadTooLarge):
        dead_letter_record(b"z", long, msg_id=MSG_ID, max_payload=300)


def test_the_memory_transport_refuses_what_a_nats_server_would():
    async def scenario():
        transport = MemoryTransport(max_payload=100)
        app = App("svc", transport)
        app.channel("fills", stream="FILLS", subjects=["trading.fills.>"], value_type=Fill)
        async with app:
            await transport.publish("trading.fills.A", b"x" * 100)
            with pytest.raises(PayloadTooLarge):
                await transport.publish("trading.fills.A", b"x" * 101)
            with pytest.raises(PayloadTooLarge):  # the msg id's header counts
                await transport.publish("trading.fills.A", b"x" * 90, msg_id="m")

    asyncio.run(scenario())


# -- the runtime ------------------------------------------------------------------------------


def make_app(transport: MemoryTransport, *, batch_size: int = 10, poison_attempts: int = 2):
    app = App("svc", transport)
    app.runtime.batch_size = batch_size
    app.runtime.poll_timeout_s = 0.02
    app.runtime.poison_attempts = poison_attempts
    fills = app.channel("fills", stream="FILLS", subjects=["trading.fills.>"], value_type=Fill)
    totals = app.table("totals", value_type=Decimal, default=lambda: Decimal(0))
    return app, fills, totals


async def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


def floor(transport: MemoryTransport, durable: str = "svc-add") -> int:
    return transport.ack_floors.get(("FILLS", durable), 0)


def fast_restarts(app: App) -> None:
    for runner in app.agents.values():
        runner.RESTART_BACKOFF_S = (0.01,)


def dlq(transport: MemoryTransport) -> list[tuple]:
    return transport.streams["DLQ"].messages


async def test_garbage_near_max_payload_is_dead_lettered_cut_and_the_stream_goes_on():
    transport = MemoryTransport(max_payload=4096)
    app, fills, totals = make_app(transport)

    @app.agent(fills)
    async def add(stream):
        async for f in stream:
            totals.apply(f.account, lambda t: t + 1)

    async with app:
        await transport.publish("trading.fills.A", b"\x00garbage" + b"g" * (4096 - 8))  # exactly max_payload
        for i in range(1, 11):
            await transport.publish("trading.fills.A", fill(i))
        await wait_for(lambda: floor(transport) == 11)
    assert totals["A"] == 10
    [(subject, data, headers, _)] = dlq(transport)
    assert subject == "posttrade.dlq.svc"
    assert headers["Posttrade-Truncated"] == "4096" and data.startswith(b"\x00garbage")
    assert headers["Posttrade-Seq"] == "1" and headers["Posttrade-Stream"] == "FILLS"
    assert "malformed JSON" in headers["Posttrade-Reason"]
    assert message_size(data, {**headers, "Nats-Msg-Id": "dlq:svc:add:FILLS:1"}) <= 4096
    assert app.metrics.dead_letters_truncated.labels("add")._value.get() == 1
    assert app.agents["add"].crashes == 0


async def test_the_dead_letter_stream_has_the_configured_limits_also_when_it_existed_without():
    from posttrade.streams.transport import StreamSpec

    transport = MemoryTransport()
    await transport.ensure_stream(StreamSpec("DLQ", ("posttrade.dlq.>",)))  # an older deployment's
    app, _, _ = make_app(transport)
    app.runtime.dead_letter_max_age_s = 3600.0
    async with app:
        spec = transport.streams["DLQ"].spec
    assert (spec.max_age_s, spec.max_bytes) == (3600.0, 1024**3)


# -- health ---------------------------------------------------------------------------------


def test_recent_count_counts_per_second_over_a_window_and_forgets_older_ones():
    counts = RecentCount(keep_s=60)
    for second in range(100):
        counts.add(2, now=1000.0 + second)
    # Counted by whole seconds: the 11 that overlap (1089.5, 1099.5].
    assert counts.within(10, now=1099.5) == 22
    assert counts.within(60, now=1099.5) == 122
    assert len(counts._seconds) <= 62
    assert counts.total == 200


async def health(app: App) -> tuple[int, dict]:
    web = build_web_app(app)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=web), base_url="http://test") as http:
        response = await http.get("/health")
    return response.status_code, response.json()


async def test_a_crash_looping_agent_makes_health_503():
    transport = MemoryTransport()
    app, fills, _ = make_app(transport)
    app.runtime.crash_loop_crashes = 3

    @app.agent(fills)
    async def broken(stream):
        raise RuntimeError("cannot start")

    fast_restarts(app)
    async with app:
        await wait_for(lambda: app.agents["broken"].crashes >= 3)
        status, body = await health(app)
    assert status == 503 and body["status"] == "unhealthy"
    assert body["checks"]["agent:broken"]["crash_looping"] is True
    assert "crash-looping" in body["reasons"]["agent:broken"] and "cannot start" in body["reasons"]["agent:broken"]


async def test_crashes_with_progress_in_between_are_not_a_loop():
    transport = MemoryTransport()
    app, fills, totals = make_app(transport)
    app.runtime.crash_loop_crashes = 2
    app.runtime.poison_attempts = 1

    @app.agent(fills)
    async def add(stream):
        async for f in stream:
            if f.account == "BAD":
                raise RuntimeError("bad account")
            totals.apply(f.account, lambda t: t + 1)

    fast_restarts(app)
    async with app:
        for i in range(1, 4):
            await transport.publish("trading.fills.A", fill(i, "BAD" if i == 2 else "A"))
            await wait_for(lambda: floor(transport) == i)
        await transport.publish("trading.fills.A", fill(4, "BAD"))
        await wait_for(lambda: floor(transport) == 4)
        await wait_for(lambda: app.agents["add"].running)
        assert app.agents["add"].crashes == 2
        assert not app.agents["add"].crash_looping()
        status, body = await health(app)
    assert status == 200 and body["checks"]["agent:add"]["ok"] is True


async def test_a_dead_letter_rate_over_the_limit_is_degraded_with_the_reason():
    transport = MemoryTransport()
    app, fills, totals = make_app(transport)
    app.runtime.health_window_s = 60.0
    app.runtime.dead_letter_rate_limit = 5.0

    @app.agent(fills)
    async def add(stream):
        async for f in stream:
            totals.apply(f.account, lambda t: t + 1)

    async with app:
        for _ in range(5):
            await transport.publish("trading.fills.A", b"garbage")
        await wait_for(lambda: floor(transport) == 5)
        status, body = await health(app)
        assert status == 200 and body["status"] == "ok"
        assert body["checks"]["agent:add"]["dead_letters_per_min"] == 5.0
        await transport.publish("trading.fills.A", b"garbage")
        await wait_for(lambda: floor(transport) == 6)
        status, body = await health(app)
    assert status == 200 and body["status"] == "degraded"
    check = body["checks"]["agent:add"]
    assert check["ok"] is True and check["degraded"] is True
    assert check["dead_letters_per_min"] == 6.0 and check["dead_letter_rate_limit"] == 5.0
    assert "6 messages dead-lettered" in body["reasons"]["agent:add"]


async def test_a_check_may_say_degraded_and_unhealthy_wins_over_degraded():
    app, _, _ = make_app(MemoryTransport())
    state = {"cache": ("degraded", "rebuilding the cache copy: 40 %"), "store": (True, "up")}

    @app.health_check("cache")
    async def cache():
        return state["cache"]

    @app.health_check("store")
    async def store():
        return state["store"]

    async with app:
        status, body = await health(app)
        assert status == 200 and body["status"] == "degraded"
        assert body["checks"]["cache"] == {"ok": True, "degraded": True, "detail": "rebuilding the cache copy: 40 %"}
        assert body["reasons"] == {"cache": "rebuilding the cache copy: 40 %"}
        state["store"] = (False, {"error": "connection refused"})
        status, body = await health(app)
        assert status == 503 and body["status"] == "unhealthy"
        assert body["reasons"]["store"] == '{"error": "connection refused"}'
        state["cache"] = state["store"] = (True, "fine")
        status, body = await health(app)
    assert status == 200 and body["status"] == "ok" and body["reasons"] == {}
    assert (await app.health())[0] is False  # stopped
