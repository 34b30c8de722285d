"""A minimal NATS client connection for the hot path: JetStream pulls and publishes.

Why it exists: nats-py turns every message into a `Msg` object, parses its control line
with a regular expression and passes it through an asyncio queue to a task — about
20 µs per message, which caps an agent near 20,000 events/s — and its `publish_async`
costs as much again per published message (a NUID, a future, a semaphore, a PubAck
object). Both protocols need very little of a client: subscribe to one inbox, publish
requests, acks and messages with a reply subject, answer PING. `LeanLink` does exactly
that, parsing whole socket reads in one loop and handing out plain tuples;
`AckedPublisher` publishes on one and resolves each message's JetStream PubAck.
Everything else (stream and consumer management, key-value reads) stays on nats-py.

Supported: nats:// and tls:// URLs, user/password and token auth (from the transport's
options or the URL), TLS when asked or when the server requires it. Not supported:
credential files (JWT/nkeys) — the transport then keeps consumers on nats-py.
A message over the server's `max_payload` is refused (`PayloadTooLarge`) instead of
sent: the server would answer it by closing the connection.
A lost connection is not reconnected here: the consumer fails, its agent restarts and
resumes at its ack floor, which is the recovery path anyway; the publisher fails what it
had in flight (those commits fail, so their inputs are redelivered) and opens a new link
at its next publish.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import time
from typing import Awaitable, Callable

import msgspec
from urllib.parse import unquote, urlparse

from .transport import DEFAULT_MAX_PAYLOAD, PayloadTooLarge, PublishFailed

# (subject, reply or None, payload, status header line or None, headers or None)
DeliveryCallback = Callable[[str, bytes | None, bytes, bytes | None, dict | None], None]


class LinkClosed(ConnectionError):
    pass


class _Protocol(asyncio.Protocol):
    def __init__(self, on_message: DeliveryCallback):
        self.on_message = on_message
        # What is left of a message that has not fully arrived, as the reads came (joined
        # once it is whole: re-joining at every read copied a 1 MB message ~16 times),
        # and how many bytes it needs before parsing is worth trying again.
        self.partial: list[bytes] = []
        self.have = 0
        self.need = 0
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
        # Parsed as immutable bytes: a slice is one copy, where a bytearray slice turned
        # into bytes is two. What is left of a partial message waits in `self.partial`.
        if self.partial:
            self.partial.append(data)
            self.have += len(data)
            if self.have < self.need:
                return
            buf = b"".join(self.partial)
        else:
            buf = data
        need = 0
        pos = 0
        end_of_buf = len(buf)
        find = buf.find
        on_message = self.on_message
        while pos < end_of_buf:
            eol = find(b"\r\n", pos)
            if eol < 0:
                break
            op = buf[pos : pos + 4]
            if op == b"MSG ":
                parts = buf[pos + 4 : eol].split(b" ")
                start = eol + 2
                stop = start + int(parts[-1])
                if stop + 2 > end_of_buf:
                    need = stop + 2 - pos
                    break  # the payload has not fully arrived
                on_message(parts[0].decode(), parts[2] if len(parts) == 4 else None, buf[start:stop], None, None)
                pos = stop + 2
            elif op == b"HMSG":
                parts = buf[pos + 5 : eol].split(b" ")
                header_size, total = int(parts[-2]), int(parts[-1])
                start = eol + 2
                stop = start + total
                if stop + 2 > end_of_buf:
                    need = stop + 2 - pos
                    break
                reply = parts[2] if len(parts) == 5 else None
                status, headers = _parse_headers(buf[start : start + header_size])
                on_message(parts[0].decode(), reply, buf[start + header_size : stop], status, headers)
                pos = stop + 2
            else:
                line = buf[pos:eol]
                pos = eol + 2
                self._control(line)
        if pos < end_of_buf:
            rest = buf[pos:]
            self.partial, self.have, self.need = [rest], len(rest), need
        else:
            self.partial, self.have, self.need = [], 0, 0

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


class LeanLink:
    """One socket to the server: one consumer's deliveries, pulls and acks, or one
    publisher's messages and their PubAcks."""

    def __init__(self, protocol: _Protocol, max_payload: int = DEFAULT_MAX_PAYLOAD):
        self._protocol = protocol
        self._sid = 1
        # The server's limit on one message (headers and payload): one over it makes the
        # server close the connection, so `publish` refuses it instead.
        self.max_payload = max_payload
        # Writes made during one pass of the event loop leave in one system call: an
        # agent publishing a batch's events would otherwise pay a send() per message.
        self._out: list[bytes] = []
        self._loop = asyncio.get_running_loop()

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
    ) -> LeanLink:
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
        link = cls(protocol, info.get("max_payload") or DEFAULT_MAX_PAYLOAD)
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
        if not self._out:
            self._loop.call_soon(self._send_out)
        self._out.append(data)

    def _send_out(self) -> None:
        out, self._out = self._out, []
        if self.is_open:
            self._protocol.transport.write(b"".join(out))

    def subscribe(self, subject: str) -> None:
        self._write(f"SUB {subject} {self._sid}\r\n".encode())

    def publish(
        self, subject: str | bytes, payload: bytes, reply: str | bytes | None = None, headers: dict | None = None
    ) -> None:
        if isinstance(subject, str):
            subject = subject.encode()
        if isinstance(reply, str):
            reply = reply.encode()
        target = subject + b" " + reply if reply else subject
        if headers:
            block = b"NATS/1.0\r\n" + b"".join(f"{k}: {v}\r\n".encode() for k, v in headers.items()) + b"\r\n"
            size = len(block) + len(payload)
            if size > self.max_payload:
                raise PayloadTooLarge(self._too_large(subject, size))
            self._write(b"HPUB %s %d %d\r\n" % (target, len(block), size) + block + payload + b"\r\n")
        else:
            if len(payload) > self.max_payload:
                raise PayloadTooLarge(self._too_large(subject, len(payload)))
            self._write(b"PUB %s %d\r\n" % (target, len(payload)) + payload + b"\r\n")

    def _too_large(self, subject: bytes, size: int) -> str:
        return f"{size} bytes to {subject.decode(errors='replace')}: over the server's max_payload of {self.max_payload}"

    async def flush(self, timeout: float = 5.0) -> None:
        """Returns once the server has read everything written before it (PING/PONG)."""
        protocol = self._protocol
        protocol.pong = asyncio.get_running_loop().create_future()
        self._write(b"PING\r\n")
        await asyncio.wait_for(protocol.pong, timeout)

    def closed_callback(self, callback: Callable[[], None]) -> None:
        """Call `callback` once the connection is gone, however it went."""
        self._protocol.closed.add_done_callback(lambda _: callback())

    async def close(self) -> None:
        transport = self._protocol.transport
        if transport is not None and not transport.is_closing():
            if self._out:
                self._send_out()
            transport.close()


class _PubAck(msgspec.Struct):
    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    error: dict | None = None


_decode_puback = msgspec.json.Decoder(_PubAck).decode


class AckedPublisher:
    """JetStream publishes over a `LeanLink`: `publish` returns a future that resolves to
    the message's stream sequence once the server has stored it.

    Each message gets the reply subject `<inbox>.<n>`; the PubAck that comes back on it
    settles future n. A PubAck that never comes (the server lost the message, or the link
    broke) fails its future after `timeout_s`, so a commit waiting on it fails instead of
    hanging and its input is redelivered. At most `max_pending` messages wait for their
    acknowledgement; `publish` waits for room beyond that (backpressure).
    """

    def __init__(self, open_link: Callable[[DeliveryCallback], Awaitable[LeanLink]], *,
                 timeout_s: float = 10.0, max_pending: int = 20_000):
        self._open_link = open_link
        self.timeout_s = timeout_s
        self.max_pending = max_pending
        self._link: LeanLink | None = None
        self._opening: asyncio.Lock | None = None
        self._inbox = b""
        self._next = 0
        self._pending: dict[bytes, tuple[asyncio.Future, float]] = {}
        self._room: asyncio.Event | None = None
        self._sweeper: asyncio.Task | None = None

    async def publish(self, subject: str | bytes, data: bytes, headers: dict | None = None) -> asyncio.Future:
        link = self._link
        if link is None or not link.is_open:
            link = await self._connect()
        while len(self._pending) >= self.max_pending:
            self._room.clear()
            await asyncio.wait_for(self._room.wait(), self.timeout_s)
        self._next += 1
        token = b"%d" % self._next
        # Sent first: a message the link refuses (PayloadTooLarge) leaves nothing pending.
        # Its PubAck cannot overtake the registration: it is read on a later loop pass.
        link.publish(subject, data, self._inbox + token, headers)
        future = asyncio.get_running_loop().create_future()
        self._pending[token] = (future, time.monotonic() + self.timeout_s)
        return future

    @property
    def max_payload(self) -> int | None:
        """The limit of the server the open link is connected to (None: no link yet)."""
        link = self._link
        return link.max_payload if link is not None and link.is_open else None

    async def _connect(self) -> LeanLink:
        if self._opening is None:
            self._opening = asyncio.Lock()
            self._room = asyncio.Event()
        async with self._opening:
            if self._link is not None and self._link.is_open:
                return self._link
            self._fail_all(LinkClosed("the connection to the server was lost before the PubAck"))
            link = await self._open_link(self._on_message)
            self._inbox = b"_INBOX.%s." % os.urandom(8).hex().encode()
            link.subscribe(self._inbox.decode() + "*")
            link.closed_callback(lambda: self._link_lost(link))
            self._link = link
            if self._sweeper is None or self._sweeper.done():
                self._sweeper = asyncio.get_running_loop().create_task(self._expire())
            return link

    def _on_message(self, subject: str, reply, data: bytes, status, headers) -> None:
        token = subject.encode()[len(self._inbox):]
        entry = self._pending.pop(token, None)
        if entry is None:
            return  # already timed out, or a previous link's inbox
        future = entry[0]
        if len(self._pending) < self.max_pending:
            self._room.set()
        if future.done():
            return
        if status is not None:  # 503: no stream listens on the subject
            future.set_exception(PublishFailed(f"no JetStream stream stored the message ({status.decode(errors='replace')})"))
            return
        try:
            ack = _decode_puback(data)
        except msgspec.DecodeError as exc:
            future.set_exception(PublishFailed(f"unreadable PubAck {data[:200]!r}: {exc}"))
            return
        if ack.error is not None:
            future.set_exception(PublishFailed(f"JetStream refused the message: {ack.error}"))
        else:
            future.set_result(ack.seq)

    def _link_lost(self, link: LeanLink) -> None:
        if self._link is link:
            self._fail_all(LinkClosed("the connection to the server was lost before the PubAck"))

    def _fail_all(self, exc: Exception) -> None:
        pending, self._pending = self._pending, {}
        for future, _ in pending.values():
            if not future.done():
                future.set_exception(exc)
        if self._room is not None:
            self._room.set()

    async def _expire(self) -> None:
        while self._link is not None:
            await asyncio.sleep(min(1.0, self.timeout_s / 2))
            now = time.monotonic()
            expired = [token for token, (_, deadline) in self._pending.items() if deadline < now]
            for token in expired:
                future, _ = self._pending.pop(token)
                if not future.done():
                    future.set_exception(asyncio.TimeoutError(f"no PubAck within {self.timeout_s}s"))
            if expired:
                self._room.set()

    async def close(self) -> None:
        link, self._link = self._link, None
        if self._sweeper is not None:
            self._sweeper.cancel()
        if link is not None:
            try:
                if link.is_open and self._pending:
                    await link.flush()
            finally:
                await link.close()
        self._fail_all(LinkClosed("the publisher was closed"))
