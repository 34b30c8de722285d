"""The JetStream transport.

Consumers are durable *pull* consumers with AckPolicy.ALL. We speak the pull protocol
ourselves (`$JS.API.CONSUMER.MSG.NEXT`) over one core subscription instead of using
nats-py's `fetch()`: its per-message bookkeeping costs about 3x our whole budget, and
with AckPolicy.ALL a batch is committed by one `+ACK` on its last message.

Ordering after a crash: JetStream redelivers an unacknowledged message only when its
ack wait expires, by which time later messages may have been processed. Agents rely on
in-order delivery (a position is a fold over fills), so when a durable consumer is
opened with unacknowledged deliveries outstanding it is recreated where its
acknowledged history ends (`resume_point`): what was in flight comes back first, in
order, at once.

Clusters: `url` is one server or several (a list, or one comma-separated string); the
client connects through any that answers and follows the cluster from there.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.js import api

from .natslink import AckedPublisher, DeliveryCallback, LeanLink, LinkClosed
from .transport import (
    DEFAULT_MAX_PAYLOAD,
    Consumer,
    ConsumerSpec,
    Delivery,
    KeyValueStore,
    PayloadTooLarge,
    StartPosition,
    StreamSpec,
    StreamState,
    Transport,
    message_size,
)

log = logging.getLogger(__name__)

_NS = 1_000_000_000


def server_urls(url: str | Sequence[str]) -> list[str]:
    """The seed servers `url` names: one URL, a comma-separated string of them (what an
    environment variable can hold) or a list (YAML)."""
    parts = [url] if isinstance(url, str) else list(url)
    urls = [u.strip() for part in parts for u in part.split(",") if u.strip()]
    if not urls:
        raise ValueError(f"no NATS server URL in {url!r}")
    return urls


def without_passwords(url: str | Sequence[str]) -> str:
    """The server URLs as one comma-separated string with any credentials masked, for
    messages and logs."""
    masked = []
    for one in server_urls(url):
        scheme, sep, rest = one.partition("://")
        masked.append(scheme + sep + ("***@" + rest.split("@", 1)[1] if "@" in rest else rest))
    return ",".join(masked)


class NatsTransport(Transport):
    def __init__(
        self,
        url: str | Sequence[str] = "nats://127.0.0.1:4222",
        *,
        name: str = "posttrade",
        user: str | None = None,
        password: str | None = None,
        token: str | None = None,
        creds_file: str | None = None,
        tls: ssl.SSLContext | None = None,
        request_timeout: float = 5.0,
        replicas: int = 1,
    ):
        if replicas < 1:
            raise ValueError("replicas must be >= 1")
        self.servers = server_urls(url)
        self.replicas = replicas  # of the streams and changelog buckets this transport creates
        self._options = dict(
            name=name,
            user=user,
            password=password,
            token=token,
            user_credentials=creds_file,
            tls=tls,
        )
        self._request_timeout = request_timeout
        # Consumers pull, and JetStream publishes go, over lean connections of their own
        # unless auth needs nats-py (JWT credential files).
        self.fast_consumers = creds_file is None
        self._publisher: AckedPublisher | None = (
            AckedPublisher(self.open_lean_link, timeout_s=request_timeout * 2) if self.fast_consumers else None
        )
        self.nc: NatsClient | None = None
        self.js = None
        self._closing = False
        self._server = "no server"  # host:port of the server connected to, for the logs

    async def connect(self) -> None:
        if self.nc is not None and self.nc.is_connected:
            return
        self._closing = False

        async def on_error(exc: Exception) -> None:
            log.warning("NATS error: %s", exc)

        async def on_disconnect() -> None:
            if not self._closing:
                log.warning("NATS disconnected from %s; reconnecting", self._server)

        async def on_reconnect() -> None:
            # The server actually reached: in a cluster it is often not the one that went away.
            self._server = self._connected_server()
            log.info("NATS reconnected to %s", self._server)

        options = {k: v for k, v in self._options.items() if v is not None}
        self.nc = await nats.connect(
            servers=self.servers,
            # A server that goes away is waited for, forever; this also makes the first
            # connect go on to the next seed when one is down.
            max_reconnect_attempts=-1,
            reconnect_time_wait=1,
            error_cb=on_error,
            disconnected_cb=on_disconnect,
            reconnected_cb=on_reconnect,
            pending_size=64 * 1024 * 1024,
            **options,
        )
        self.js = self.nc.jetstream(timeout=self._request_timeout)
        self._server = self._connected_server()

    def _connected_server(self) -> str:
        """host:port of the server nats-py is connected to (no credentials: it is logged)."""
        url = self.nc.connected_url if self.nc is not None else None
        return f"{url.hostname}:{url.port}" if url is not None else "no server"

    async def open_lean_link(self, on_message: DeliveryCallback, purpose: str = "publish") -> LeanLink:
        """A lean connection to the server nats-py is connected to, else to the first seed
        server that answers (the cluster moves on while nats-py reconnects)."""
        options = self._options
        nc = self.nc
        candidates = list(self.servers)
        if nc is not None and nc.connected_url is not None:
            candidates.insert(0, nc.connected_url.geturl())
        failures = []
        for url in candidates:
            try:
                return await LeanLink.open(
                    url,
                    on_message,
                    user=options["user"],
                    password=options["password"],
                    token=options["token"],
                    tls=options["tls"],
                    name=f"{options['name']}-{purpose}",
                )
            except (OSError, asyncio.TimeoutError) as exc:  # LinkClosed is an OSError too
                failures.append(exc)
        raise LinkClosed(f"no NATS server answered: {failures[-1]!r}")

    async def close(self) -> None:
        if self._publisher is not None:
            await self._publisher.close()
        if self.nc is not None:
            self._closing = True
            try:
                await self.nc.drain()
            except Exception:  # closing a broken connection must not hide the real error
                await self.nc.close()
            self.nc = None
            self._closing = False

    @property
    def connected(self) -> bool:
        return self.nc is not None and self.nc.is_connected

    @property
    def max_payload(self) -> int:
        """The smallest `max_payload` of the servers our connections are on (their INFO):
        in a cluster the publishing link may be on another node than nats-py."""
        known = [self.nc.max_payload] if self.nc is not None else []
        if self._publisher is not None and self._publisher.max_payload is not None:
            known.append(self._publisher.max_payload)
        return min(known) if known else DEFAULT_MAX_PAYLOAD

    async def ensure_stream(self, spec: StreamSpec) -> None:
        config = api.StreamConfig(
            name=spec.name,
            subjects=list(spec.subjects),
            retention=api.RetentionPolicy.LIMITS,
            storage=api.StorageType.FILE,
            max_age=spec.max_age_s,
            max_bytes=spec.max_bytes,
            # At a limit the oldest messages go (never the new ones: a full dead-letter
            # stream must not make dead-lettering fail).
            discard=api.DiscardPolicy.OLD,
            duplicate_window=spec.duplicate_window_s,
            num_replicas=self.replicas,
        )
        try:
            await self.js.add_stream(config)
        except nats.js.errors.BadRequestError:
            # Exists with another configuration: bring it to the declared one.
            await self.js.update_stream(config)

    async def stream_state(self, name: str) -> StreamState:
        info = await self.js.stream_info(name)
        return StreamState(info.state.first_seq, info.state.last_seq, info.state.messages)

    async def publish(self, subject, data, headers=None, msg_id=None) -> int:
        return await (await self.publish_deferred(subject, data, headers, msg_id))

    async def publish_deferred(self, subject, data, headers=None, msg_id=None) -> asyncio.Future:
        """The future resolves to the message's stream sequence."""
        if msg_id is not None:
            headers = {**(headers or {}), "Nats-Msg-Id": msg_id}
        if self._publisher is not None:
            # The lean link refuses a message over its server's max_payload (PayloadTooLarge).
            return await self._publisher.publish(subject, data, headers)
        # nats-py weighs the payload alone, without the headers.
        size = message_size(data, headers)
        if size > self.nc.max_payload:
            raise PayloadTooLarge(f"{size} bytes to {subject}: over the server's max_payload of {self.nc.max_payload}")
        ack = await self.js.publish_async(subject, data, headers=headers)
        return asyncio.ensure_future(_sequence_of(ack))

    async def publish_many(self, messages) -> list[int]:
        futures = [await self.publish_deferred(*message) for message in messages]
        return list(await asyncio.gather(*futures))

    async def publish_fire(self, subject: str, data: bytes) -> None:
        await self.nc.publish(subject, data)

    async def flush(self) -> None:
        await self.nc.flush()

    async def open_consumer(self, spec: ConsumerSpec) -> Consumer:
        consumer = NatsPullConsumer(self, spec)
        await consumer.start()
        return consumer

    async def key_value(self, bucket: str) -> KeyValueStore:
        kv = await self.js.create_key_value(bucket=bucket, history=1, replicas=self.replicas)
        return NatsKeyValue(self, bucket, kv)

    async def app_state(self, app_name: str) -> list[tuple[str, str]]:
        """What an app named `app_name` keeps on the server: ("consumer", "<stream>/<name>")
        for its agents' durable consumers and ("bucket", name) for its tables' changelogs.

        Both are named `<app>-<agent or table>`, so they are found by that prefix. An app
        whose name is another's followed by "-" would be counted in with it; names of
        deployments (`ptrc`, `ptrc_eu`) and of test instances never are.
        """
        prefix = f"{app_name}-"
        found: list[tuple[str, str]] = []
        for name in await self._names("$JS.API.STREAM.NAMES", "streams"):
            if name.startswith("KV_"):
                if name[3:].startswith(prefix):
                    found.append(("bucket", name[3:]))
                continue
            for consumer in await self._names(f"$JS.API.CONSUMER.NAMES.{name}", "consumers"):
                if consumer.startswith(prefix):
                    found.append(("consumer", f"{name}/{consumer}"))
        return found

    async def _names(self, api_subject: str, field: str) -> list[str]:
        """Every name a JetStream names API lists, page by page (it pages at 1,024)."""
        names: list[str] = []
        while True:
            reply = await self.nc.request(api_subject, json.dumps({"offset": len(names)}).encode(),
                                          timeout=self._request_timeout)
            page = json.loads(reply.data)
            if "error" in page:
                raise nats.js.errors.APIError(description=str(page["error"]))
            names += page.get(field) or []
            if not page.get(field) or len(names) >= page.get("total", 0):
                return names

    async def forget_app(self, app_name: str) -> list[tuple[str, str]]:
        """Delete what `app_state` lists; returns it.

        A durable consumer stays on the server after its app is gone, and the server does
        work for it on every message its stream takes: forget a deployment taken out of
        service, and every uniquely named instance a test or benchmark started.
        """
        found = await self.app_state(app_name)
        for kind, name in found:
            try:
                if kind == "bucket":
                    await self.js.delete_key_value(name)
                else:
                    stream, consumer = name.split("/", 1)
                    await self.js.delete_consumer(stream, consumer)
            except nats.js.errors.NotFoundError:
                pass  # gone meanwhile
        return found


async def forget_apps(url: str | Sequence[str], app_names: list[str]) -> None:
    """Connect to `url` and forget each app (`NatsTransport.forget_app`): what tests and
    benchmarks call for the uniquely named instances they started."""
    transport = NatsTransport(url, name="posttrade-forget")
    await transport.connect()
    try:
        for name in app_names:
            await transport.forget_app(name)
    finally:
        await transport.close()


async def _sequence_of(puback: asyncio.Future) -> int:
    return (await puback).seq


@dataclass(frozen=True)
class ResumePoint:
    """Where a durable consumer with deliveries outstanding is recreated: a stream
    sequence, a time, or (neither) its first configuration again."""

    seq: int | None = None
    time: datetime | None = None


def resume_point(info: api.ConsumerInfo) -> ResumePoint | None:
    """None when nothing delivered is unacknowledged (the consumer resumes as it is);
    otherwise the first message that was delivered and not acknowledged.

    Acknowledged history is read from consumer sequences, which count deliveries, and
    never from an ack floor's stream sequence alone: until its first acknowledgement a
    replicated (R3) consumer created at stream sequence S reports an ack floor of 0, a
    single server S - 1, and "0 + 1" replayed the whole stream after every failover.
    Before the first acknowledgement the consumer's own configured start is its position.
    """
    if info.num_ack_pending == 0 and info.delivered.consumer_seq <= info.ack_floor.consumer_seq:
        return None
    config = info.config
    created_at = config.opt_start_seq if config.deliver_policy == api.DeliverPolicy.BY_START_SEQUENCE else None
    if info.ack_floor.consumer_seq > 0:
        # Something was acknowledged, so the floor's stream sequence is real; never below
        # the configured start either (its messages before that were not this consumer's).
        return ResumePoint(seq=max(info.ack_floor.stream_seq + 1, created_at or 1))
    if created_at is not None:
        return ResumePoint(seq=created_at)
    if config.deliver_policy == api.DeliverPolicy.BY_START_TIME:
        return ResumePoint(time=config.opt_start_time)
    if config.deliver_policy == api.DeliverPolicy.NEW:
        # "New" meant: stored after the consumer was created. A message stored in the same
        # instant comes again, which the tables' per-key sequences make harmless.
        return ResumePoint(time=info.created)
    if config.deliver_policy == api.DeliverPolicy.ALL:
        return ResumePoint(seq=1)
    # The last message (per subject): what that is now, as when it was first created.
    return ResumePoint()


class NatsPullConsumer(Consumer):
    # A pull request that produced nothing for this long is presumed lost (e.g. across a
    # reconnect) and replaced.
    PULL_EXPIRES_S = 2.0
    # The most bytes one pull brings (at least a few of the largest messages the server
    # takes): a batch of 1,000 near-max_payload messages would otherwise be 1 GB in hand.
    PULL_MAX_BYTES = 8 * 1024 * 1024

    def __init__(self, transport: NatsTransport, spec: ConsumerSpec):
        self.transport = transport
        self.spec = spec
        self.name: str | None = spec.durable
        self._buffer: list[Delivery] = []
        self._arrived = asyncio.Event()
        self._sub = None  # nats-py subscription (JWT auth) ...
        self._link: LeanLink | None = None  # ... or our lean pull connection
        self._inbox = ""
        self._request_seq = 0
        self._active_request: str | None = None  # reply subject of the pull in flight
        self._active_left = 0  # messages that pull may still bring
        self._active_deadline = 0.0
        self._active_brought = 0  # messages the pull in flight has brought so far
        # A pull bounded in bytes that brought nothing because the next message alone is
        # larger (the server's 409 "Message Size Exceeds MaxBytes"): the next pull is not.
        self._unbounded_next = False
        # Messages a pull asks for: the most the agent has asked for at once. A `take_events`
        # batch is gathered by several calls asking for what is left of it; pulling only
        # that left the server idle while the agent wrote the batch.
        self._max_messages = 0
        self._pending_cache: tuple[float, int] | None = None

    def _config(self, resume: ResumePoint | None = None) -> api.ConsumerConfig:
        start = self.spec.start
        kwargs: dict = {}
        resume = resume or ResumePoint()
        if resume.seq is not None:
            kwargs = dict(deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=resume.seq)
        elif resume.time is not None:
            kwargs = dict(deliver_policy=api.DeliverPolicy.BY_START_TIME, opt_start_time=resume.time)
        elif start.seq is not None:
            kwargs = dict(deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start.seq)
        elif start.time is not None:
            kwargs = dict(
                deliver_policy=api.DeliverPolicy.BY_START_TIME,
                opt_start_time=start.time.astimezone(timezone.utc).isoformat(),
            )
        elif start.new_only:
            kwargs = dict(deliver_policy=api.DeliverPolicy.NEW)
        elif start.last_per_subject:
            kwargs = dict(deliver_policy=api.DeliverPolicy.LAST_PER_SUBJECT)
        else:
            kwargs = dict(deliver_policy=api.DeliverPolicy.ALL)
        filters = list(self.spec.filter_subjects)
        if start.last_per_subject and not filters and resume == ResumePoint():
            # JetStream wants a filter to know what "per subject" ranges over.
            filters = list(self._stream_subjects)
        if len(filters) == 1:
            kwargs["filter_subject"] = filters[0]
        elif filters:
            kwargs["filter_subjects"] = filters
        return api.ConsumerConfig(
            durable_name=self.spec.durable,
            ack_policy=api.AckPolicy.ALL,
            ack_wait=self.spec.ack_wait_s,
            max_ack_pending=self.spec.max_ack_pending,
            max_deliver=-1,  # poison messages are dead-lettered by the runtime, not dropped
            inactive_threshold=None if self.spec.durable else 300.0,
            **kwargs,
        )

    async def start(self) -> None:
        js = self.transport.js
        self._stream_subjects = (await js.stream_info(self.spec.stream)).config.subjects or []
        if self.spec.durable is None:
            info = await js.add_consumer(self.spec.stream, self._config())
        else:
            try:
                info = await js.consumer_info(self.spec.stream, self.spec.durable)
            except nats.js.errors.NotFoundError:
                info = await js.add_consumer(self.spec.stream, self._config())
            else:
                resume = resume_point(info)
                if resume is not None:
                    log.info(
                        "consumer %s had %d unacknowledged deliveries; restarting it at %s",
                        self.spec.durable,
                        info.num_ack_pending,
                        f"seq {resume.seq}" if resume.seq is not None
                        else f"time {resume.time.isoformat()}" if resume.time is not None
                        else "its first configuration",
                    )
                    await js.delete_consumer(self.spec.stream, self.spec.durable)
                    info = await js.add_consumer(self.spec.stream, self._config(resume))
        self.name = info.name
        transport = self.transport
        self._inbox = transport.nc.new_inbox()
        if transport.fast_consumers:
            self._link = await transport.open_lean_link(self._on_delivery, purpose=f"pull-{self.name}")
            self._link.subscribe(f"{self._inbox}.*")
        else:
            self._sub = await transport.nc.subscribe(
                f"{self._inbox}.*", cb=self._on_nats_py_message, pending_msgs_limit=-1, pending_bytes_limit=-1
            )

    async def _on_nats_py_message(self, msg) -> None:
        headers = msg.headers
        status = None
        if headers and "Status" in headers:
            # nats-py splits "409 Message Size Exceeds MaxBytes" into two headers.
            description = next((v for k, v in headers.items() if k == "Description"), "")
            status = f"{headers['Status']} {description}".strip().encode()
        reply = msg.reply.encode() if msg.reply else None
        self._on_delivery(msg.subject, reply, msg.data, status, headers)

    def _on_delivery(self, subject: str, reply: bytes | None, data: bytes, status, headers) -> None:
        if reply is not None and reply.startswith(b"$JS.ACK."):
            # The ack subject carries the delivery's metadata (parsed inline: once per message):
            #   v1: $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>
            #   v2: $JS.ACK.<domain>.<account>.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>.<token>
            tokens = reply.split(b".")
            base = 4 if len(tokens) == 9 else 6
            self._buffer.append(
                Delivery(subject, data, int(tokens[base + 1]), int(tokens[base + 3]), headers, int(tokens[base]), reply)
            )
            # Messages carry their original subject, so they are counted against the one
            # pull in flight; when it has brought all it asked for, it is over.
            self._active_left -= 1
            self._active_brought += 1
            if self._active_left <= 0:
                self._active_request = None
        elif subject == self._active_request:
            # A status message (408 expired, 409 limits, 404 nothing): that pull is over.
            if status is not None and status.startswith(b"409") and b"MaxBytes" in status:
                self._unbounded_next = self._active_brought == 0
            self._active_request = None
        self._arrived.set()

    async def _publish(self, subject: str | bytes, payload: bytes, reply: str | None = None) -> None:
        if self._link is not None:
            self._link.publish(subject, payload, reply)
        else:
            if isinstance(subject, bytes):
                subject = subject.decode()
            await self.transport.nc.publish(subject, payload, reply=reply or "")

    async def _ensure_pull(self) -> None:
        if self._active_request is not None and time.monotonic() < self._active_deadline:
            return
        if len(self._buffer) >= self._max_messages:
            return  # backpressure: the agent has not caught up with what we hold
        self._request_seq += 1
        reply = f"{self._inbox}.{self._request_seq}"
        self._active_request = reply
        self._active_left = self._max_messages
        self._active_deadline = time.monotonic() + self.PULL_EXPIRES_S + 1.0
        self._active_brought = 0
        pull = {"batch": self._max_messages, "expires": int(self.PULL_EXPIRES_S * _NS)}
        if self._unbounded_next:
            self._unbounded_next = False
        elif not self.spec.start.last_per_subject:
            # Not for a consumer that starts at the last message per subject: while it
            # delivers those, a pull the byte bound ends (409) loses the message that did
            # not fit (nats-server 2.x: 20,000 subjects in 8 MiB pulls came back as 19,996).
            pull["max_bytes"] = max(self.PULL_MAX_BYTES, 4 * self.transport.max_payload)
        request = json.dumps(pull)
        await self._publish(f"$JS.API.CONSUMER.MSG.NEXT.{self.spec.stream}.{self.name}", request.encode(), reply)

    async def next_batch(self, max_messages: int, timeout: float) -> list[Delivery]:
        if max_messages > self._max_messages:
            self._max_messages = max_messages
        deadline = time.monotonic() + timeout
        while not self._buffer:
            # Clear before pulling: a message that lands while we publish the pull
            # request must wake the wait below, not be slept through.
            self._arrived.clear()
            await self._ensure_pull()
            if self._buffer:
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            try:
                await asyncio.wait_for(self._arrived.wait(), min(remaining, self.PULL_EXPIRES_S))
            except asyncio.TimeoutError:
                pass
        batch = self._buffer[:max_messages]
        del self._buffer[:max_messages]
        await self._ensure_pull()  # prefetch while the agent works on this batch
        return batch

    async def ack_through(self, delivery: Delivery) -> None:
        await self._publish(delivery.token, b"+ACK")

    async def in_progress(self, delivery: Delivery) -> None:
        await self._publish(delivery.token, b"+WPI")

    async def term(self, delivery: Delivery, reason: str) -> None:
        # "+TERM <reason>": the server records the reason in its MSG_TERMINATED advisory.
        text = " ".join(reason.split())[:1000]
        await self._publish(delivery.token, f"+TERM {text}".encode())

    async def pending(self) -> int:
        now = time.monotonic()
        if self._pending_cache is not None and now - self._pending_cache[0] < 1.0:
            return self._pending_cache[1]
        info = await self.transport.js.consumer_info(self.spec.stream, self.name)
        value = info.num_pending + info.num_ack_pending
        self._pending_cache = (now, value)
        return value

    async def close(self) -> None:
        # The last +ACK must reach the server before the connection goes.
        if self._link is not None:
            if self._link.is_open:
                try:
                    await self._link.flush()
                except (ConnectionError, asyncio.TimeoutError):
                    log.warning("could not flush the last acknowledgement of %s", self.name)
            await self._link.close()
            self._link = None
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None
            if self.transport.connected:
                await self.transport.nc.flush()
        if self.spec.durable is None and self.transport.connected:
            try:
                await self.transport.js.delete_consumer(self.spec.stream, self.name)
            except nats.js.errors.NotFoundError:
                pass


class NatsKeyValue(KeyValueStore):
    LOAD_BATCH = 5_000  # entries per pull while loading a bucket (below max_ack_pending)

    def __init__(self, transport: NatsTransport, bucket: str, kv):
        self.transport = transport
        self.bucket = bucket
        self._kv = kv

    async def put_many(self, items: dict[str, bytes | None]) -> None:
        publish = self.transport.publish_deferred
        futures = []
        for key, value in items.items():
            subject = f"$KV.{self.bucket}.{key}"
            if value is None:
                futures.append(await publish(subject, b"", {"KV-Operation": "DEL"}))
            else:
                futures.append(await publish(subject, value))
        if futures:
            await asyncio.gather(*futures)

    async def load_all(self) -> dict[str, bytes]:
        # A pull consumer over the bucket's stream, last message per key, in batches:
        # a KV watch hands every entry through nats-py's per-message callback, which was
        # most of a restart's time (2.5 s per 55,000 keys).
        prefix = f"$KV.{self.bucket}."
        spec = ConsumerSpec(
            stream=f"KV_{self.bucket}", durable=None, filter_subjects=(f"{prefix}>",),
            start=StartPosition(last_per_subject=True),
        )
        consumer = NatsPullConsumer(self.transport, spec)
        await consumer.start()
        try:
            info = await self.transport.js.consumer_info(spec.stream, consumer.name)
            remaining = info.num_pending
            values: dict[str, bytes] = {}
            start = len(prefix)
            while remaining > 0:
                batch = await consumer.next_batch(min(remaining, self.LOAD_BATCH), timeout=30.0)
                if not batch:
                    raise TimeoutError(f"loading bucket {self.bucket}: {remaining} entries did not arrive")
                for delivery in batch:
                    headers = delivery.headers
                    if headers and headers.get("KV-Operation") in ("DEL", "PURGE"):
                        values.pop(delivery.subject[start:], None)
                    else:
                        values[delivery.subject[start:]] = delivery.data
                remaining -= len(batch)
                await consumer.ack_through(batch[-1])  # AckAll: keeps max_ack_pending open
            return values
        finally:
            await consumer.close()

    async def destroy(self) -> None:
        await self.transport.js.delete_key_value(self.bucket)
