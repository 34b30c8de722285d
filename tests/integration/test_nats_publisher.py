"""The transport's JetStream publishes (`AckedPublisher` on a lean connection) against the
real server: sequences, deduplication, refusals, and a connection that goes away."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from posttrade.streams.natslink import LinkClosed, PublishFailed
from posttrade.streams.nats import NatsTransport
from posttrade.streams.transport import StreamSpec


async def open_transport(url: str) -> tuple[NatsTransport, str]:
    transport = NatsTransport(url, name=f"it-publisher-{uuid.uuid4().hex[:6]}")
    await transport.connect()
    name = f"PUB_{uuid.uuid4().hex[:8].upper()}"
    await transport.ensure_stream(StreamSpec(name=name, subjects=(f"{name.lower()}.>",)))
    return transport, name


def test_publishes_resolve_to_stream_sequences_in_order_and_duplicates_are_dropped(stack):
    async def run() -> None:
        transport, name = await open_transport(stack.nats_url)
        try:
            subject = f"{name.lower()}.x"
            futures = [await transport.publish_deferred(subject, b"%d" % i) for i in range(2000)]
            assert list(await asyncio.gather(*futures)) == list(range(1, 2001))
            first = await transport.publish(subject, b"once", msg_id="same-id")
            again = await transport.publish(subject, b"once", msg_id="same-id")
            assert first == again == 2001  # the server dropped the repeat: no second message
            assert (await transport.stream_state(name)).messages == 2001
        finally:
            await transport.js.delete_stream(name)
            await transport.close()

    asyncio.run(run())


def test_a_subject_no_stream_stores_fails_the_publish(stack):
    async def run() -> None:
        transport, name = await open_transport(stack.nats_url)
        try:
            with pytest.raises(PublishFailed, match="no JetStream stream"):
                await transport.publish(f"nowhere.{uuid.uuid4().hex}", b"lost?")
        finally:
            await transport.js.delete_stream(name)
            await transport.close()

    asyncio.run(run())


def test_a_lost_connection_fails_what_was_in_flight_and_the_next_publish_reconnects(stack):
    async def run() -> None:
        transport, name = await open_transport(stack.nats_url)
        subject = f"{name.lower()}.x"
        try:
            await transport.publish(subject, b"before")
            publisher = transport._publisher
            in_flight = await transport.publish_deferred(subject, b"in flight")
            await publisher._link.close()  # as if the server went away before answering
            with pytest.raises(LinkClosed):
                await in_flight
            assert await transport.publish(subject, b"after") >= 2  # a new link, same publisher
        finally:
            await transport.js.delete_stream(name)
            await transport.close()

    asyncio.run(run())
