"""The stream an agent iterates over, and the commit that ends each batch.

An agent body looks like Faust's:

    @app.agent(fills)
    async def track(stream):
        async for fill in stream:          # or: async for batch in stream.take(1000, 1.0)
            positions[fill.account] = ...

Events arrive from the consumer in batches. When the agent asks for the event after
the last one of a batch, the batch is *committed*: the tables' changed keys are written
to their changelogs, the messages the agent published are confirmed by the server, and
only then is the batch acknowledged (one `+ACK` on its last message). A crash at any
point before that means the whole batch is redelivered, and the tables' per-key input
sequences make re-applying it a no-op.

Every crash is charged to a message, so that `runtime.poison_attempts` ends any loop: the
event being handled; the message whose dead-lettering failed, or whose output the server
refused (`MessageFailed`); otherwise (a commit that failed, a sink's batch) the runner
narrows the batches it takes until the failing one is a single message (`AgentRunner`).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import contextvars
import logging
import time
from dataclasses import dataclass
from operator import attrgetter
from typing import TYPE_CHECKING, Any, AsyncIterator, Iterator

import msgspec

from .events import InvalidEvent, decode, event_size_limit
from .transport import Consumer, Delivery, PayloadTooLarge, PublishFailed

if TYPE_CHECKING:
    from ..app import AgentRunner

log = logging.getLogger(__name__)

# Inside a batch, the agent hands the event loop back every this many events. Without
# it a batch of 1,000 runs as one step: pages wait, and what the agent publishes stays
# in the connection's buffer (flushed once per loop pass) until the batch's last event.
YIELD_EVERY = 32

# One msgspec decoder per event type, for decoding a whole batch in one call.
_batch_decoders: dict[type, msgspec.json.Decoder] = {}
_SEQ_OF = attrgetter("seq")


class MessageFailed(Exception):
    """A failure that belongs to one input message: its agent's crash is charged to `seq`
    (the message could not be dead-lettered, or what handling it published was refused)."""

    def __init__(self, seq: int, message: str):
        super().__init__(message)
        self.seq = seq


@dataclass(slots=True)
class EventRecord:
    """A decoded event with where it came from."""

    value: Any
    stream: str  # JetStream stream name
    seq: int  # stream sequence: the input position tables record
    subject: str
    ts: int  # stored-at time, epoch ns
    delivered: int
    delivery: Delivery


# The event the current agent task is working on; tables read it to record sequences.
current_event: contextvars.ContextVar[EventRecord | None] = contextvars.ContextVar(
    "posttrade_current_event", default=None
)
# The agent whose task this is: tables remember who changed a key, so a crash rolls
# back only that agent's uncommitted changes.
current_agent: contextvars.ContextVar[str | None] = contextvars.ContextVar("posttrade_current_agent", default=None)


class Stream:
    def __init__(self, runner: AgentRunner, consumer: Consumer, batch_size: int, poll_timeout: float = 1.0):
        self.runner = runner
        self.consumer = consumer
        self.channel = runner.channel
        self.batch_size = batch_size
        self.poll_timeout = poll_timeout
        self._uncommitted: Delivery | None = None  # last delivery of the batch in hand
        self._in_hand: list[Delivery] = []  # every delivery not yet acknowledged
        self._last_seq = 0  # highest sequence handed to the agent
        # PubAcks the commit must wait for, each with the sequence of the event that
        # published it (None: published between events).
        self._outbox: list[tuple[asyncio.Future, int | None]] = []
        self._stopping = False

    # -- iteration -------------------------------------------------------------------

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._values()

    async def _values(self) -> AsyncIterator[Any]:
        async for record in self.events():
            yield record.value

    async def events(self) -> AsyncIterator[EventRecord]:
        """Like iterating the stream, but yields EventRecords (value, seq, subject, ts)."""
        while True:
            batch = await self._next_batch()
            if batch is None:
                return
            for n, record in enumerate(batch):
                if n and not n % YIELD_EVERY:
                    await asyncio.sleep(0)
                current_event.set(record)
                self.runner.current = record
                yield record
            current_event.set(None)
            self.runner.current = None

    async def take(self, max_events: int, within: float) -> AsyncIterator[list[Any]]:
        """Batches of up to `max_events` values, or fewer once `within` seconds have passed.

        For sinks: do the batch's side effect in the loop body; the batch is committed
        when the next one is requested. Use `take_events` for the EventRecords.
        """
        async for records in self.take_events(max_events, within):
            yield [r.value for r in records]

    async def take_events(
        self, max_events: int, within: float, *, auto_commit: bool = True
    ) -> AsyncIterator[list[EventRecord]]:
        """Batches of up to `max_events` EventRecords, or fewer once `within` seconds passed.

        `auto_commit=False` is for sinks that overlap writing one batch with taking the
        next: nothing is acknowledged on its own. Right after receiving a batch, take
        `mark = stream.mark()`; once the batch's side effect is durable,
        `await stream.commit_to(mark)`, in the order the batches came. A window in which
        only dead letters arrived yields an empty list, so that its mark is committed too.
        """
        asked = max_events
        while True:
            # While the runner narrows down a crash it could not charge to one event, a
            # window holds no more than it allows.
            max_events = self.runner.batch_limit(asked)
            records: list[EventRecord] = []
            deadline = time.monotonic() + within
            while len(records) < max_events:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._stopping:
                    break
                batch = await self._next_batch(
                    max_messages=max_events - len(records),
                    timeout=remaining,
                    commit=auto_commit and not records,
                )
                if batch is None:
                    break
                records.extend(batch)
            if not auto_commit:
                if records or self._uncommitted is not None:
                    yield records
                elif self._stopping:
                    return
                continue
            if self._stopping and not records:
                await self.commit()
                return
            if records:
                yield records
            else:
                await self.commit()

    @contextlib.contextmanager
    def processing(self, record: EventRecord) -> Iterator[EventRecord]:
        """Handle one record of a `take_events` batch as the current event.

        Inside it, table writes record this event's sequence (so `table.apply` is
        exactly-once per record), `app.send` joins the batch's commit, and a crash is
        charged to this record (after `poison_attempts` it is dead-lettered).
        """
        token = current_event.set(record)
        previous, self.runner.current = self.runner.current, record
        try:
            yield record
            self.runner.current = previous  # on a crash it stays: the crash is this record's
        finally:
            current_event.reset(token)

    # -- batches and commits ------------------------------------------------------------

    async def _next_batch(
        self, max_messages: int | None = None, timeout: float | None = None, commit: bool = True
    ) -> list[EventRecord] | None:
        if commit:
            await self.commit()
        while not self._stopping:
            deliveries = await self.consumer.next_batch(
                self.runner.batch_limit(max_messages or self.batch_size),
                self.poll_timeout if timeout is None else timeout,
            )
            if not deliveries:
                if not self._in_hand:
                    self.runner.caught_up()
                if timeout is not None:
                    return []
                continue
            self._uncommitted = deliveries[-1]
            self._in_hand.extend(deliveries)
            records = await self._decode(deliveries)
            self.runner.metrics_batch(len(deliveries))
            if records or timeout is not None:
                return records
            await self.commit()  # a batch of nothing but dead letters: commit and go on
        return None

    async def _decode(self, deliveries: list[Delivery]) -> list[EventRecord]:
        value_type = self.channel.value_type
        stream_name = self.channel.stream.name
        runner = self.runner
        fresh = []
        last_seq = self._last_seq
        for d in deliveries:
            if d.seq <= last_seq:
                continue  # redelivered while we still hold it: already handed over
            last_seq = d.seq
            if runner.failed_seqs:
                poison = runner.poison_reason(d.seq)
                if poison is not None:
                    self._last_seq = last_seq
                    await self._dead_letter_or_terminate(d, poison)
                    continue
            fresh.append(d)
        self._last_seq = last_seq
        values = _decode_all(value_type, fresh) if len(fresh) > 1 else None
        if values is not None:
            return [
                EventRecord(value, stream_name, d.seq, d.subject, d.ts, d.delivered, d)
                for value, d in zip(values, fresh)
            ]
        records = []
        for d in fresh:
            try:
                value = decode(value_type, d.data)
            except InvalidEvent as exc:
                await self.dead_letter(d, exc.reason)
                continue
            records.append(EventRecord(value, stream_name, d.seq, d.subject, d.ts, d.delivered, d))
        return records

    async def commit(self) -> None:
        """Make the batch in hand durable, then acknowledge it."""
        await self.commit_to(self._uncommitted)

    def mark(self) -> Delivery | None:
        """The last delivery in hand: `commit_to` it to acknowledge everything up to here."""
        return self._uncommitted

    async def commit_to(self, delivery: Delivery | None) -> None:
        """Make what is in hand durable and acknowledge it up to `delivery` (a `mark()`);
        later deliveries stay in hand, unacknowledged. The order: the agent's sinks, the
        tables' changelogs, what the batch published, then the acknowledgement."""
        if delivery is None and not self._outbox:
            return
        started = time.perf_counter()
        await self.runner.flush_sinks(self)
        await self.runner.app.flush_tables()
        if self._outbox:
            outbox, self._outbox = self._outbox, []
            await self._confirm(outbox)
        if delivery is not None:
            await self.consumer.ack_through(delivery)
            if self._uncommitted is delivery:
                self._uncommitted = None
                self._in_hand.clear()
            else:
                del self._in_hand[: bisect.bisect_right(self._in_hand, delivery.seq, key=_SEQ_OF)]
            self.runner.committed_through(delivery.seq)
        self.runner.metrics_commit(time.perf_counter() - started)

    @staticmethod
    async def _confirm(outbox: list[tuple[asyncio.Future, int | None]]) -> None:
        """Wait for every PubAck; a message the server refused fails the commit, charged
        to the event that published it."""
        results = await asyncio.gather(*(future for future, _ in outbox), return_exceptions=True)
        for (_, seq), result in zip(outbox, results):
            if isinstance(result, BaseException):
                if seq is not None and isinstance(result, (PayloadTooLarge, PublishFailed)):
                    raise MessageFailed(seq, f"what seq {seq} published was refused: {result}") from result
                raise result

    async def keep_alive(self) -> None:
        """Tell the server the batch in hand is still being worked on (long retries).

        Every message has its own ack timer, so each one is told.
        """
        for delivery in self._in_hand:
            await self.consumer.in_progress(delivery)

    def add_pending_publish(self, future: asyncio.Future, seq: int | None = None) -> None:
        """Make the commit wait for `future` (a PubAck); `seq`: the event that published it."""
        self._outbox.append((future, seq))

    def in_hand(self) -> list[Delivery]:
        """Every delivery received and not yet acknowledged, in sequence order."""
        return self._in_hand

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        """Send one message to the service's dead-letter subject, with its reason.

        Raises `MessageFailed` (charged to the message) when the subject did not take it:
        a message is never acknowledged without being kept.
        """
        try:
            await self.runner.app.dead_letter(
                delivery.data,
                reason=reason,
                agent=self.runner.name,
                stream=self.channel.stream.name,
                subject=delivery.subject,
                seq=delivery.seq,
            )
        except Exception as exc:
            # The reason is cut: it becomes part of the poison reason of the next attempt.
            raise MessageFailed(
                delivery.seq,
                f"dead-lettering seq {delivery.seq} failed ({type(exc).__name__}: {exc}); why: {reason[:300]}",
            ) from exc

    async def _dead_letter_or_terminate(self, delivery: Delivery, reason: str) -> None:
        """Dead-letter a message that crashed the agent `poison_attempts` times. One whose
        dead-lettering then fails as often again is terminated: the server never
        delivers it again, and the runtime logs and counts it."""
        try:
            await self.dead_letter(delivery, reason)
        except MessageFailed as exc:
            if self.runner.failed_seqs.get(delivery.seq, 0) < 2 * self.runner.app.runtime.poison_attempts:
                raise  # charged once more: the dead-letter subject may take it next time
            await self.consumer.term(delivery, f"{reason}; {exc}")
            self.runner.app.terminated(
                agent=self.runner.name, stream=self.channel.stream.name, subject=delivery.subject,
                seq=delivery.seq, reason=f"{reason}; {exc}",
            )

    def stop(self) -> None:
        self._stopping = True


def _decode_all(value_type: type, deliveries: list[Delivery]) -> list[Any] | None:
    """Every delivery's value in one msgspec call, or None when any of them does not decode
    (the caller then decodes one by one, to dead-letter each bad one with its reason).

    The payloads are joined one per line. msgspec's `decode_lines` skips blank lines and
    reads several values from one line, so the values map one-to-one onto the messages
    only if no payload has a newline or is blank: then every line yields at least one
    value, and as many values as messages means exactly one each.
    """
    payloads = [d.data for d in deliveries]
    try:
        joined = b"\n".join(payloads)
        if joined.count(b"\n") != len(payloads) - 1 or not all(payloads) or any(map(bytes.isspace, payloads)):
            return None
    except TypeError:  # a payload that is not bytes
        return None
    limit = event_size_limit(value_type)
    if limit is not None and max(map(len, payloads)) > limit:  # `decode` refuses it, with why
        return None
    decoder = _batch_decoders.get(value_type)
    if decoder is None:
        try:
            decoder = _batch_decoders[value_type] = msgspec.json.Decoder(value_type)
        except TypeError:  # not a type msgspec decodes
            return None
    try:
        values = decoder.decode_lines(joined)
    except (msgspec.ValidationError, msgspec.DecodeError):
        return None
    return values if len(values) == len(payloads) else None

