"""What the runtime needs from a message bus, and nothing more.

Two implementations: `NatsTransport` (JetStream, the real thing) and `MemoryTransport`
(unit tests only). Both give the same guarantees the agents rely on:

* a stream is an append-only log with sequence numbers starting at 1;
* a consumer delivers the stream in sequence order, in batches, and remembers an
  *ack floor*: everything at or below it is done. `ack_through(d)` moves the floor to
  `d.seq` (JetStream's AckPolicy.ALL), so one acknowledgement commits a whole batch;
* after a crash the consumer starts again right after its ack floor, so unacknowledged
  messages are redelivered *in order* (never later than messages after them);
* a key-value bucket keeps the last value per key and can be read back whole (the
  changelog tables recover from);
* a message larger than the server's `max_payload` (headers and payload together) is
  refused with `PayloadTooLarge` before anything is sent: NATS answers one by closing
  the connection, which would fail every other publish and acknowledgement on it.
"""

from __future__ import annotations

import abc
import asyncio
from dataclasses import dataclass, field
from datetime import datetime

# nats-server's default `max_payload`; the connected server's INFO says the real one.
DEFAULT_MAX_PAYLOAD = 1024 * 1024
# The header block's fixed parts: "NATS/1.0\r\n" before the headers, "\r\n" after them.
_HEADER_BLOCK_FRAME = len(b"NATS/1.0\r\n") + len(b"\r\n")


class PayloadTooLarge(ValueError):
    """A message the server would refuse for its size (headers and payload together
    over `max_payload`)."""


def header_block_size(headers: dict[str, str] | None) -> int:
    """Bytes the NATS header block of `headers` takes on the wire: what the server adds to
    the payload's length before comparing it with `max_payload`. Keys and values are
    counted as sent (UTF-8, `key: value\r\n` each); they must not need the trimming or
    newline replacement some clients apply."""
    if not headers:
        return 0
    return _HEADER_BLOCK_FRAME + sum(len(k.encode()) + len(v.encode()) + 4 for k, v in headers.items())


def message_size(data: bytes, headers: dict[str, str] | None) -> int:
    """What a message weighs against the server's `max_payload`."""
    return header_block_size(headers) + len(data) if headers else len(data)


class PublishFailed(Exception):
    """The server did not store a message (JetStream refused it, or no stream listens on
    its subject)."""


@dataclass(frozen=True, slots=True)
class StreamSpec:
    """A durable log: its name and the subjects it captures."""

    name: str
    subjects: tuple[str, ...]
    max_age_s: float | None = None  # None: keep forever (replay needs history)
    max_bytes: int | None = None  # None: no limit; when reached, the oldest messages go
    duplicate_window_s: float = 120.0  # publishes with the same msg id inside it are dropped


@dataclass(frozen=True, slots=True)
class StartPosition:
    """Where a consumer begins the first time it is created (or a replay begins)."""

    seq: int | None = None  # first stream sequence to deliver
    time: datetime | None = None  # first message at or after this time
    new_only: bool = False  # only messages published after the consumer exists
    last_per_subject: bool = False  # the latest message of each subject, then new ones

    def __post_init__(self) -> None:
        chosen = (self.seq is not None, self.time is not None, self.new_only, self.last_per_subject)
        if sum(chosen) > 1:
            raise ValueError("StartPosition takes at most one of seq, time, new_only, last_per_subject")
        if self.seq is not None and self.seq < 1:
            raise ValueError("stream sequences start at 1")


@dataclass(frozen=True, slots=True)
class ConsumerSpec:
    stream: str
    durable: str | None  # None: an ephemeral consumer (replays)
    filter_subjects: tuple[str, ...] = ()
    start: StartPosition = field(default_factory=StartPosition)
    max_ack_pending: int = 20_000  # in-flight bound: backpressure from the server
    ack_wait_s: float = 60.0


@dataclass(slots=True)
class Delivery:
    """One message as delivered by a consumer."""

    subject: str
    data: bytes
    seq: int  # stream sequence
    ts: int  # time the stream stored it, epoch ns
    headers: dict[str, str] | None = None
    delivered: int = 1  # delivery attempt, 1 the first time
    token: object = None  # transport-private handle used for acknowledgement


@dataclass(frozen=True, slots=True)
class StreamState:
    first_seq: int
    last_seq: int
    messages: int


class Consumer(abc.ABC):
    spec: ConsumerSpec

    @abc.abstractmethod
    async def next_batch(self, max_messages: int, timeout: float) -> list[Delivery]:
        """Up to `max_messages` deliveries in sequence order; [] after `timeout` seconds."""

    @abc.abstractmethod
    async def ack_through(self, delivery: Delivery) -> None:
        """Everything delivered up to and including `delivery` is done."""

    @abc.abstractmethod
    async def in_progress(self, delivery: Delivery) -> None:
        """Still working on `delivery` (and its batch): do not redeliver yet."""

    @abc.abstractmethod
    async def term(self, delivery: Delivery, reason: str) -> None:
        """Never deliver `delivery` again (what the runtime does with an input it could
        not even dead-letter); `reason` goes to the server's advisory where it has one."""

    @abc.abstractmethod
    async def pending(self) -> int:
        """Messages not yet acknowledged: the consumer's lag."""

    @abc.abstractmethod
    async def close(self) -> None: ...


class KeyValueStore(abc.ABC):
    """Last value per key; keys are strings of `[A-Za-z0-9_=-]`."""

    @abc.abstractmethod
    async def put_many(self, items: dict[str, bytes | None]) -> None:
        """Write all (None deletes); returns only when every write is durable."""

    @abc.abstractmethod
    async def load_all(self) -> dict[str, bytes]:
        """Every live key with its latest value."""

    @abc.abstractmethod
    async def destroy(self) -> None:
        """Delete the bucket (tests and table resets)."""


class Transport(abc.ABC):
    @abc.abstractmethod
    async def connect(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    @property
    @abc.abstractmethod
    def connected(self) -> bool: ...

    @property
    def max_payload(self) -> int:
        """The largest message (headers and payload) the server takes."""
        return DEFAULT_MAX_PAYLOAD

    @abc.abstractmethod
    async def ensure_stream(self, spec: StreamSpec) -> None:
        """Create the stream, or update it to `spec`; idempotent."""

    @abc.abstractmethod
    async def stream_state(self, name: str) -> StreamState: ...

    @abc.abstractmethod
    async def publish(
        self,
        subject: str,
        data: bytes,
        headers: dict[str, str] | None = None,
        msg_id: str | None = None,
    ) -> int:
        """Publish durably; returns the stream sequence. `msg_id` deduplicates retries.
        Raises `PayloadTooLarge`, sending nothing, for a message over `max_payload`
        (the `Nats-Msg-Id` header `msg_id` becomes counts)."""

    @abc.abstractmethod
    async def publish_many(
        self, messages: list[tuple[str, bytes, dict[str, str] | None, str | None]]
    ) -> list[int]:
        """Publish (subject, data, headers, msg_id) tuples pipelined; all durable on return."""

    @abc.abstractmethod
    async def publish_deferred(
        self, subject: str, data: bytes, headers: dict[str, str] | None = None, msg_id: str | None = None
    ) -> asyncio.Future:
        """Send now, confirm later: the returned future resolves when the stream has it."""

    @abc.abstractmethod
    async def publish_fire(self, subject: str, data: bytes) -> None:
        """Publish without waiting for the stream's acknowledgement (feeds, benchmarks)."""

    @abc.abstractmethod
    async def flush(self) -> None:
        """Everything `publish_fire` sent has reached the server."""

    @abc.abstractmethod
    async def open_consumer(self, spec: ConsumerSpec) -> Consumer: ...

    @abc.abstractmethod
    async def key_value(self, bucket: str) -> KeyValueStore: ...
