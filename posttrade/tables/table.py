"""Tables: dict-like keyed state that survives a restart.

Every key remembers, per input stream, the sequence of the last event that changed
it. Writing a key from inside an agent records the current event's sequence; asking
`already_applied(key)` (or using `apply`) before changing it makes redelivered and
replayed events no-ops, key by key. That is what turns JetStream's at-least-once
delivery into an exactly-once *effect*, and it holds even when a crash interrupts a
changelog flush half-way: the keys that were written skip the event, the rest apply it.

The changelog is a JetStream key-value bucket holding the last value of each key
(msgpack of `[value, {stream: seq}]`); recovery reads it back whole on start.
Changes are buffered and written by `flush()`, which the stream's commit calls
before acknowledging the input.

One flush is many messages to the server, and a crash can stop it half-way. For most
tables that is harmless (each key is exact on its own, above). A table whose keys must
agree with one another (ptrc's book: an execution and its amendments) is `atomic`: its
flush first writes the whole batch as one record (`__batch__`, or parts it names when
the batch is over one message), then the keys, and a load applies that last batch over
what it reads. So it reads back as after some flush, never half of one, for one more
write per flush.

One key's value is one message to the server, so it must fit the server's
`max_payload`: a flush with a value over `core.bounds.payload_bound(max_payload)` raises
`ValueTooLarge` naming the table and key before anything is written, and leaves the
changes in place for the agent's rollback (its commit fails, and the runtime charges the
failure to the message that made the value). The state a key holds is bounded by design
(docs/ptrc.md, "Bounds"); this is the guard that says so when it is not.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import re
from typing import Any, Callable, Generic, Iterator, TypeVar

import msgspec

from ..core.bounds import payload_bound
from ..streams.stream import current_agent, current_event
from ..streams.transport import DEFAULT_MAX_PAYLOAD, KeyValueStore, Transport

V = TypeVar("V")

_MISSING = object()
_BUCKET_SAFE = re.compile(r"[^A-Za-z0-9_-]")


#: The KV key of an atomic table's last batch (never a key's: those are base64, whose
#: length is a multiple of four, and hold no ".").
_BATCH_KEY = "__batch__"
_BATCH_ENCODER = msgspec.msgpack.Encoder()
_BATCH_DECODER = msgspec.msgpack.Decoder(tuple[int, list[tuple[str, bytes | None]], list[str]])
_PART_DECODER = msgspec.msgpack.Decoder(list[tuple[str, bytes | None]])


class ValueTooLarge(ValueError):
    """A table value whose changelog write the server would refuse for its size."""


@contextlib.contextmanager
def outside_batch() -> Iterator[None]:
    """Table writes that belong to no agent's batch: a crashed agent's rollback leaves
    them, and they record no input sequence. For state that records a fact already
    durable elsewhere (rows a sink wrote): undoing it would make the next batch write
    them again. The next commit of any agent makes them durable."""
    agent, event = current_agent.set(None), current_event.set(None)
    try:
        yield
    finally:
        current_event.reset(event)
        current_agent.reset(agent)


class Table(Generic[V]):
    def __init__(
        self,
        name: str,
        *,
        bucket: str,
        value_type: Any = Any,
        key_type: Any = str,
        default: Callable[[], V] | None = None,
        atomic: bool = False,
    ):
        self.name = name
        self.atomic = atomic
        self._batch = 0  # the number of the last atomic batch
        self._batch_parts: list[str] = []  # the KV keys of its parts, when it has parts
        self.bucket = _BUCKET_SAFE.sub("_", bucket)
        self.default = default
        self._data: dict[Any, V] = {}
        self._seqs: dict[Any, dict[str, int]] = {}
        self._dirty: set = set()
        self._undo: dict[Any, tuple[Any, dict[str, int] | None, str | None]] = {}
        self._kv: KeyValueStore | None = None
        self._flush_lock = asyncio.Lock()
        self._key_encoder = msgspec.msgpack.Encoder()
        self._key_decoder = msgspec.msgpack.Decoder(key_type)
        self._value_encoder = msgspec.msgpack.Encoder(decimal_format="string")
        self._entry_decoder = msgspec.msgpack.Decoder(tuple[value_type, dict[str, int]])
        self.max_payload = DEFAULT_MAX_PAYLOAD  # the server's, once opened

    # -- reading -----------------------------------------------------------------------

    def __getitem__(self, key) -> V:
        try:
            return self._data[key]
        except KeyError:
            if self.default is None:
                raise
            return self.default()

    def get(self, key, default=None):
        return self._data.get(key, default)

    def __contains__(self, key) -> bool:
        return key in self._data

    def __len__(self) -> int:
        return len(self._data)

    def __iter__(self) -> Iterator:
        return iter(self._data)

    def keys(self):
        return self._data.keys()

    def values(self):
        return self._data.values()

    def items(self):
        return self._data.items()

    def last_applied(self, key) -> dict[str, int]:
        """{stream: seq} of the last events that changed `key`."""
        return dict(self._seqs.get(key, {}))

    # -- writing -------------------------------------------------------------------------

    def already_applied(self, key) -> bool:
        """True when the event being processed has already changed `key`."""
        event = current_event.get()
        if event is None:
            return False
        seqs = self._seqs.get(key)
        return seqs is not None and seqs.get(event.stream, 0) >= event.seq

    def apply(self, key, update: Callable[[V], V]) -> V:
        """Set `key` to `update(current value)` unless this event already did.

        The current value is the default (None without one) when the key is absent.
        Returns the value the key holds afterwards.
        """
        if self.already_applied(key):
            return self._data[key]
        current = self._data.get(key, _MISSING)
        if current is _MISSING:
            current = self.default() if self.default is not None else None
        value = update(current)
        self[key] = value
        return value

    def __setitem__(self, key, value: V) -> None:
        self._remember_undo(key)
        self._data[key] = value
        event = current_event.get()
        if event is not None:
            seqs = self._seqs.get(key)
            if seqs is None:
                self._seqs[key] = {event.stream: event.seq}
            else:
                seqs[event.stream] = max(seqs.get(event.stream, 0), event.seq)
        self._dirty.add(key)

    def __delitem__(self, key) -> None:
        self._remember_undo(key)
        del self._data[key]
        self._seqs.pop(key, None)
        self._dirty.add(key)

    def pop(self, key, default=_MISSING):
        if key in self._data:
            value = self._data[key]
            del self[key]
            return value
        if default is _MISSING:
            raise KeyError(key)
        return default

    def _remember_undo(self, key) -> None:
        if key not in self._undo:
            seqs = self._seqs.get(key)
            self._undo[key] = (
                self._data.get(key, _MISSING),
                dict(seqs) if seqs is not None else None,
                current_agent.get(),
            )

    def rollback(self, agent: str | None) -> None:
        """Forget the changes `agent` made that are not flushed yet (it crashed).

        A key written by two agents between flushes is restored to before the first
        write; keep each key's writer single (partition keys between agents).
        """
        for key, (value, seqs, owner) in list(self._undo.items()):
            if owner != agent:
                continue
            if value is _MISSING:
                self._data.pop(key, None)
            else:
                self._data[key] = value
            if seqs is None:
                self._seqs.pop(key, None)
            else:
                self._seqs[key] = seqs
            del self._undo[key]
            self._dirty.discard(key)

    # -- durability ------------------------------------------------------------------------

    def _kv_key(self, key) -> str:
        return base64.urlsafe_b64encode(self._key_encoder.encode(key)).decode()

    async def open(self, transport: Transport) -> None:
        """Attach the changelog and recover the table's contents from it."""
        self._kv = await transport.key_value(self.bucket)
        self.max_payload = transport.max_payload
        entries = await self._kv.load_all()
        replayed = self._apply_last_batch(entries)
        self._data.clear()
        self._seqs.clear()
        for kv_key, raw in entries.items():
            key = self._key_decoder.decode(base64.urlsafe_b64decode(kv_key))
            value, seqs = self._entry_decoder.decode(raw)
            self._data[key] = value
            self._seqs[key] = seqs
        self._dirty.clear()
        self._undo.clear()
        # The keys may not all have been written: the next batch writes them again,
        # before this one's record is replaced.
        self._dirty.update(self._key_decoder.decode(base64.urlsafe_b64decode(kv_key)) for kv_key in replayed)

    @property
    def dirty(self) -> int:
        return len(self._dirty)

    async def flush(self) -> None:
        """Write every changed key to the changelog; returns when all are durable."""
        if not self._dirty:
            return
        async with self._flush_lock:
            bound = payload_bound(self.max_payload)
            items: dict[str, bytes | None] = {}
            for key in self._dirty:
                if key in self._data:
                    value = items[self._kv_key(key)] = self._value_encoder.encode(
                        (self._data[key], self._seqs.get(key, {}))
                    )
                    if len(value) > bound:
                        # Before anything is written or forgotten: the rollback undoes it.
                        shown = repr(key)
                        raise ValueTooLarge(
                            f"table {self.name}: the value of key {shown[:200]} is {len(value)} bytes, over the "
                            f"{bound}-byte bound of one changelog value (the server's max_payload "
                            f"{self.max_payload} less room for headers); nothing was written"
                        )
                else:
                    items[self._kv_key(key)] = None
            dirty, self._dirty = self._dirty, set()
            self._undo.clear()
            if self._kv is None:
                raise RuntimeError(f"table {self.name} was written before it was opened")
            try:
                if self.atomic:
                    await self._write_atomically(items, bound)
                else:
                    await self._kv.put_many(items)
            except BaseException:
                self._dirty |= dirty  # try again at the next commit
                raise

    async def _write_atomically(self, items: dict[str, bytes | None], bound: int) -> None:
        """The batch's record first (it is durable when that is), then the keys."""
        kv = self._kv
        assert kv is not None
        self._batch += 1
        entries = list(items.items())
        record = _BATCH_ENCODER.encode((self._batch, entries, []))
        if len(record) > bound:
            parts: list[list[tuple[str, bytes | None]]] = [[]]
            size = 0
            for entry in entries:
                entry_size = len(entry[0]) + len(entry[1] or b"") + 16
                if size + entry_size > bound and parts[-1]:
                    parts.append([])
                    size = 0
                parts[-1].append(entry)
                size += entry_size
            names = [f"{_BATCH_KEY}.{self._batch}.{i}" for i in range(len(parts))]
            await kv.put_many({name: _BATCH_ENCODER.encode(part) for name, part in zip(names, parts)})
            record = _BATCH_ENCODER.encode((self._batch, [], names))
        else:
            names = []
        await kv.put_many({_BATCH_KEY: record})
        stale, self._batch_parts = self._batch_parts, names
        await kv.put_many({**items, **{name: None for name in stale}})

    def _apply_last_batch(self, entries: dict[str, bytes]) -> list[str]:
        """Take the batch records out of `entries` and apply the last batch over the
        keys (an atomic table; nothing for the others); returns the keys it applied."""
        record = entries.pop(_BATCH_KEY, None)
        parts = {key: entries.pop(key) for key in [k for k in entries if k.startswith(_BATCH_KEY + ".")]}
        if record is None:
            return []
        number, batch, names = _BATCH_DECODER.decode(record)
        for name in names:
            if name not in parts:
                raise RuntimeError(f"table {self.name}: batch {number} names part {name}, which is not in the bucket")
            batch.extend(_PART_DECODER.decode(parts[name]))
        for key, value in batch:
            if value is None:
                entries.pop(key, None)
            else:
                entries[key] = value
        self._batch = number
        self._batch_parts = list(parts)  # the last batch's, and any left over: deleted at the next flush
        return [key for key, _ in batch]

    async def clear(self) -> None:
        """Delete every key, durably (used by resets and tests)."""
        for key in list(self._data):
            del self[key]
        await self.flush()
