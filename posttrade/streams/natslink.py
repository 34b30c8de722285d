"""A minimal NATS client connection that only pulls from JetStream consumers.

Why it exists: nats-py turns every message into a `Msg` object, parses its control line
with a regular expression and passes it through an asyncio queue to a task — about
20 µs per message, which caps an agent near 20,000 events/s. The pull protocol needs
very little of a client: subscribe to one inbox, publish pull requests and acks, answer
PING. This connection does exactly that, parsing whole socket reads in one loop, and
hands the consumer plain tuples. Everything else (stream and consumer management,
publishing, key-value) stays on nats-py.

Supported: nats:// and tls:// URLs, user/password and token auth (from the transport's
options or the URL), TLS when asked or when the server requires it. Not supported:
credential files (JWT/nkeys) — the transport then keeps consumers on nats-py.
A lost connection is not reconnected here: the consumer fails, its agent restarts and
resumes at its ack floor, which is the recovery path anyway.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from typing import Callable
from urllib.parse import unquote, urlparse

# (subject, reply or None, payload, status header line or None, headers or None)
DeliveryCallback = Callable[[str, bytes | None, bytes, bytes | None, dict | None], None]


class LinkClosed(ConnectionError):
    pass


class _Protocol(asyncio.Protocol):
    def __init__(self, on_message: DeliveryCallback):
        self.on_message = on_message
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.info: asyncio.Future = asyncio.get_running_loop().create_future()
        self.pong: asyncio.Future | None = None
        self.error: str | None = None
        self.closed: asyncio.Future = asyncio.get_running_loop().create_future()

    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        if not self.closed.done():
            self.closed.set_result(exc)
        for future in (self.info, self.pong):
            if future is not None and not future.done():
                future.set_exception(LinkClosed(self.error or f"connection lost: {exc}"))

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        pos = 0
        end_of_buf = len(buf)
        on_message = self.on_message
        while pos < end_of_buf:
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                break
            op = buf[pos : pos + 4]
            if op == b"MSG ":
                parts = bytes(buf[pos + 4 : eol]).split(b" ")
                size = int(parts[-1])
                start = eol + 2
                stop = start + size
                if stop + 2 > end_of_buf:
                    break  # the payload has not fully arrived
                reply = parts[2] if len(parts) == 4 else None
                on_message(parts[0].decode(), reply, bytes(buf[start:stop]), None, None)
                pos = stop + 2
            elif op == b"HMSG":
                parts = bytes(buf[pos + 5 : eol]).split(b" ")
                header_size, total = int(parts[-2]), int(parts[-1])
                start = eol + 2
                stop = start + total
                if stop + 2 > end_of_buf:
                    break
                reply = parts[2] if len(parts) == 5 else None
                status, headers = _parse_headers(bytes(buf[start : start + header_size]))
                on_message(parts[0].decode(), reply, bytes(buf[start + header_size : stop]), status, headers)
                pos = stop + 2
            else:
                line = bytes(buf[pos:eol])
                pos = eol + 2
                self._control(line)
        del buf[:pos]

    def _control(self, line: bytes) -> None:
        if line == b"PING":
            self.transport.write(b"PONG\r\n")
        elif line == b"PONG":
            if self.pong is not None and not self.pong.done():
                self.pong.set_result(None)
        elif line.startswith(b"INFO "):
            if not self.info.done():
                self.info.set_result(json.loads(line[5:]))
        elif line.startswith(b"-ERR"):
            self.error = line[5:].decode(errors="replace").strip(" '")
            if self.pong is not None and not self.pong.done():
                self.pong.set_exception(LinkClosed(f"server refused: {self.error}"))
        # +OK and anything else: nothing to do


def _parse_headers(block: bytes) -> tuple[bytes | None, dict | None]:
    lines = block.split(b"\r\n")
    first = lines[0]  # "NATS/1.0" or "NATS/1.0 408 Request Timeout"
    status = first[9:] if len(first) > 9 else None
    headers = {}
    for line in lines[1:]:
        if line:
            key, _, value = line.partition(b":")
            headers[key.decode().strip()] = value.decode().strip()
    return status, headers or None


class PullLink:
    """One socket to the server for one consumer's deliveries, pulls and acks."""

    def __init__(self, protocol: _Protocol):
        self._protocol = protocol
        self._sid = 1

    @classmethod
    async def open(
        cls,
        url: str,
        on_message: DeliveryCallback,
        *,
        user: str | None = None,
        password: str | None = None,
        token: str | None = None,
        tls: ssl.SSLContext | None = None,
        name: str = "posttrade-pull",
        timeout: float = 5.0,
    ) -> PullLink:
        parsed = urlparse(url if "://" in url else f"nats://{url}")
        host, port = parsed.hostname or "127.0.0.1", parsed.port or 4222
        if parsed.username and not (user or token):
            if parsed.password is None:
                token = unquote(parsed.username)
            else:
                user, password = unquote(parsed.username), unquote(parsed.password)
        loop = asyncio.get_running_loop()
        protocol = _Protocol(on_message)
        transport, _ = await asyncio.wait_for(loop.create_connection(lambda: protocol, host, port), timeout)
        info = await asyncio.wait_for(protocol.info, timeout)
        if tls is None and (parsed.scheme == "tls" or info.get("tls_required")):
            tls = ssl.create_default_context()
        if tls is not None:
            transport = await loop.start_tls(transport, protocol, tls, server_hostname=host)
            protocol.transport = transport
        connect = {
            "verbose": False,
            "pedantic": False,
            "tls_required": tls is not None,
            "name": name,
            "lang": "python-posttrade",
            "version": "1",
            "protocol": 1,
            "headers": True,
            "no_responders": True,
        }
        if user:
            connect.update(user=user, **({"pass": password} if password is not None else {}))
        if token:
            connect["auth_token"] = token
        link = cls(protocol)
        protocol.pong = loop.create_future()
        transport.write(b"CONNECT " + json.dumps(connect).encode() + b"\r\nPING\r\n")
        await asyncio.wait_for(protocol.pong, timeout)
        return link

    @property
    def is_open(self) -> bool:
        t = self._protocol.transport
        return t is not None and not t.is_closing() and not self._protocol.closed.done()

    def _write(self, data: bytes) -> None:
        if not self.is_open:
            raise LinkClosed(self._protocol.error or "connection to the server is closed")
        self._protocol.transport.write(data)

    def subscribe(self, subject: str) -> None:
        self._write(f"SUB {subject} {self._sid}\r\n".encode())

    def publish(self, subject: str | bytes, payload: bytes, reply: str | None = None) -> None:
        if isinstance(subject, str):
            subject = subject.encode()
        head = b"PUB " + subject + (b" " + reply.encode() if reply else b"") + b" %d\r\n" % len(payload)
        self._write(head + payload + b"\r\n")

    async def flush(self, timeout: float = 5.0) -> None:
        """Returns once the server has read everything written before it (PING/PONG)."""
        protocol = self._protocol
        protocol.pong = asyncio.get_running_loop().create_future()
        self._write(b"PING\r\n")
        await asyncio.wait_for(protocol.pong, timeout)

    async def close(self) -> None:
        transport = self._protocol.transport
        if transport is not None and not transport.is_closing():
            transport.close()
