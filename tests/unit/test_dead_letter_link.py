"""The lean NATS link around the size limit: messages as large as the server takes are
parsed whatever the reads, and one over `max_payload` is refused before it is sent."""

from __future__ import annotations

import asyncio
import random

import pytest

from posttrade.streams.natslink import LeanLink, _Protocol
from posttrade.streams.transport import PayloadTooLarge


def wire() -> tuple[bytes, list[tuple]]:
    """A server's byte stream (a 1 MB message among small ones) and what it carries."""
    big = bytes(range(256)) * 4096  # 1 MiB
    header = b"NATS/1.0\r\nNats-Msg-Id: m1\r\n\r\n"
    data = (
        b"INFO {\"max_payload\": 1048576}\r\n"
        b"MSG a.b 1 5\r\nhello\r\n"
        b"PING\r\n"
        + b"MSG big 1 $JS.ACK.S.c.1.2.3.4.0 %d\r\n" % len(big) + big + b"\r\n"
        + b"HMSG h 1 %d %d\r\n" % (len(header), len(header) + 3) + header + b"abc\r\n"
        + b"MSG empty 1 0\r\n\r\n"
    )
    expected = [
        ("a.b", None, b"hello", None, None),
        ("big", b"$JS.ACK.S.c.1.2.3.4.0", big, None, None),
        ("h", None, b"abc", None, {"Nats-Msg-Id": "m1"}),
        ("empty", None, b"", None, None),
    ]
    return data, expected


class Sink:
    def __init__(self):
        self.written = b""

    def write(self, data: bytes) -> None:
        self.written += data


@pytest.mark.parametrize("seed", range(6))
async def test_messages_up_to_the_limit_are_parsed_whatever_the_reads(seed):
    data, expected = wire()
    got: list[tuple] = []
    protocol = _Protocol(lambda *message: got.append(message))
    protocol.transport = Sink()
    rng = random.Random(seed)
    pos = 0
    while pos < len(data):
        # 1-byte reads, socket-sized reads and everything in between.
        step = rng.choice([1, 2, 7, 1000, 65536, 300_000])
        protocol.data_received(data[pos : pos + step])
        pos += step
    assert got == expected
    assert protocol.transport.written == b"PONG\r\n"
    assert protocol.partial == [] and protocol.have == 0


async def test_a_message_over_max_payload_is_refused_and_nothing_is_sent():
    protocol = _Protocol(lambda *message: None)

    class Transport(Sink):
        def is_closing(self) -> bool:
            return False

    protocol.transport = Transport()
    link = LeanLink(protocol, max_payload=1000)
    link.publish("s", b"x" * 1000)
    link.publish("s", b"x" * 900, headers={"Nats-Msg-Id": "m"})  # 900 + a 32-byte header block
    with pytest.raises(PayloadTooLarge, match="1001 bytes to s"):
        link.publish("s", b"x" * 1001)
    with pytest.raises(PayloadTooLarge):
        link.publish("s", b"x" * 990, "reply", {"Nats-Msg-Id": "m"})
    await asyncio.sleep(0)  # the writes of this loop pass leave together
    assert protocol.transport.written.count(b"PUB s") == 2
