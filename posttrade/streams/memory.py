"""An in-process transport with JetStream's semantics, for unit tests only.

Streams are lists, consumers keep an ack floor, key-value buckets are dicts. A
"restart" is modelled by opening the same durable consumer again: like the NATS
transport, it resumes right after the ack floor.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from .transport import (
    DEFAULT_MAX_PAYLOAD,
    Consumer,
    ConsumerSpec,
    Delivery,
    KeyValueStore,
    PayloadTooLarge,
    PublishFailed,
    StreamSpec,
    StreamState,
    Transport,
    message_size,
)


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS wildcard matching: `*` is one token, a trailing `>` one or more."""
    p_tokens = pattern.split(".")
    s_tokens = subject.split(".")
    for i, p in enumerate(p_tokens):
        if p == ">":
            return len(s_tokens) > i
        if i >= len(s_tokens) or (p != "*" and p != s_tokens[i]):
            return False
    return len(p_tokens) == len(s_tokens)


@dataclass
class _Stream:
    spec: StreamSpec
    messages: list[tuple[str, bytes, dict | None, int]] = field(default_factory=list)  # subject, data, headers, ts
    msg_ids: dict[str, int] = field(default_factory=dict)
    appended: asyncio.Event = field(default_factory=asyncio.Event)


class MemoryTransport(Transport):
    def __init__(self, max_payload: int = DEFAULT_MAX_PAYLOAD) -> None:
        self._max_payload = max_payload  # what a NATS server's INFO would say
        self.streams: dict[str, _Stream] = {}
        self.ack_floors: dict[tuple[str, str], int] = {}
        self.buckets: dict[str, dict[str, bytes]] = {}
        self.published_without_stream: list[tuple[str, bytes]] = []
        self.terminated: list[tuple[str, int, str]] = []  # (stream, seq, reason) of `term`
        self._connected = False

    async def connect(self) -> None:
        self._connected = True

    async def close(self) -> None:
        self._connected = False

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def max_payload(self) -> int:
        return self._max_payload

    async def ensure_stream(self, spec: StreamSpec) -> None:
        if spec.name in self.streams:
            self.streams[spec.name].spec = spec
        else:
            self.streams[spec.name] = _Stream(spec)

    async def stream_state(self, name: str) -> StreamState:
        n = len(self.streams[name].messages)
        return StreamState(1 if n else 0, n, n)

    def _stream_for(self, subject: str) -> _Stream | None:
        for stream in self.streams.values():
            if any(subject_matches(p, subject) for p in stream.spec.subjects):
                return stream
        return None

    async def publish(self, subject, data, headers=None, msg_id=None) -> int:
        # Weighed as NATS would receive it: with the Nats-Msg-Id header the id becomes.
        size = message_size(data, {**(headers or {}), "Nats-Msg-Id": msg_id} if msg_id is not None else headers)
        if size > self._max_payload:
            raise PayloadTooLarge(f"{size} bytes to {subject}: over the server's max_payload of {self._max_payload}")
        stream = self._stream_for(subject)
        if stream is None:
            raise PublishFailed(f"no stream captures subject {subject!r}")
        if msg_id is not None and msg_id in stream.msg_ids:
            return stream.msg_ids[msg_id]
        stream.messages.append((subject, bytes(data), dict(headers) if headers else None, time.time_ns()))
        seq = len(stream.messages)
        if msg_id is not None:
            stream.msg_ids[msg_id] = seq
        stream.appended.set()
        return seq

    async def publish_deferred(self, subject, data, headers=None, msg_id=None) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        future.set_result(await self.publish(subject, data, headers, msg_id))
        return future

    async def publish_many(self, messages) -> list[int]:
        return [await self.publish(s, d, h, m) for s, d, h, m in messages]

    async def publish_fire(self, subject: str, data: bytes) -> None:
        if self._stream_for(subject) is None:
            self.published_without_stream.append((subject, data))
        else:
            await self.publish(subject, data)

    async def flush(self) -> None:
        pass

    async def open_consumer(self, spec: ConsumerSpec) -> Consumer:
        stream = self.streams[spec.stream]
        key = (spec.stream, spec.durable or f"ephemeral-{id(spec)}-{time.monotonic_ns()}")
        if key not in self.ack_floors:
            start = spec.start
            if start.seq is not None:
                floor = start.seq - 1
            elif start.time is not None:
                since_epoch = start.time - datetime(1970, 1, 1, tzinfo=timezone.utc)
                cutoff = since_epoch // timedelta(microseconds=1) * 1000
                floor = next((i for i, m in enumerate(stream.messages) if m[3] >= cutoff), len(stream.messages))
            elif start.new_only:
                floor = len(stream.messages)
            else:
                floor = 0
            self.ack_floors[key] = floor
        consumer = MemoryConsumer(self, spec, key)
        if spec.start.last_per_subject:
            # Of what exists now, only the newest message per subject is delivered.
            latest = {m[0]: i for i, m in enumerate(stream.messages)}
            consumer.skip = set(range(len(stream.messages))) - set(latest.values())
        return consumer

    async def key_value(self, bucket: str) -> KeyValueStore:
        return MemoryKeyValue(self.buckets.setdefault(bucket, {}), self, bucket)


class MemoryConsumer(Consumer):
    def __init__(self, transport: MemoryTransport, spec: ConsumerSpec, key: tuple[str, str]):
        self.transport = transport
        self.spec = spec
        self.key = key
        self.stream = transport.streams[spec.stream]
        self.cursor = transport.ack_floors[key]  # index of the next message to deliver
        self.skip: set[int] = set()  # indexes never to deliver (last_per_subject start)

    def _wanted(self, subject: str) -> bool:
        filters = self.spec.filter_subjects
        return not filters or any(subject_matches(f, subject) for f in filters)

    async def next_batch(self, max_messages: int, timeout: float) -> list[Delivery]:
        deadline = time.monotonic() + timeout
        while True:
            batch = []
            messages = self.stream.messages
            while self.cursor < len(messages) and len(batch) < max_messages:
                subject, data, headers, ts = messages[self.cursor]
                self.cursor += 1
                if self.cursor - 1 not in self.skip and self._wanted(subject):
                    batch.append(Delivery(subject, data, self.cursor, ts, headers, 1, self.cursor))
            if batch:
                return batch
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            self.stream.appended.clear()
            try:
                await asyncio.wait_for(self.stream.appended.wait(), remaining)
            except asyncio.TimeoutError:
                return []

    async def ack_through(self, delivery: Delivery) -> None:
        floors = self.transport.ack_floors
        floors[self.key] = max(floors[self.key], delivery.seq)

    async def in_progress(self, delivery: Delivery) -> None:
        pass

    async def term(self, delivery: Delivery, reason: str) -> None:
        self.transport.terminated.append((self.spec.stream, delivery.seq, reason))

    async def pending(self) -> int:
        floor = self.transport.ack_floors[self.key]
        return sum(1 for m in self.stream.messages[floor:] if self._wanted(m[0]))

    async def close(self) -> None:
        pass


class MemoryKeyValue(KeyValueStore):
    def __init__(self, data: dict[str, bytes], transport: MemoryTransport, bucket: str):
        self.data = data
        self.transport = transport
        self.bucket = bucket

    async def put_many(self, items: dict[str, bytes | None]) -> None:
        for key, value in items.items():
            if value is None:
                self.data.pop(key, None)
            else:
                self.data[key] = bytes(value)

    async def load_all(self) -> dict[str, bytes]:
        return dict(self.data)

    async def destroy(self) -> None:
        self.transport.buckets.pop(self.bucket, None)
        self.data.clear()

