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
before acknowledging the input. A flush writes the changed keys on one connection, in
the order they were first changed since the last flush; the server stores what it
receives in that order, so a flush cut short by a crash leaves a prefix of it written.
`write_mark()` and `written_after(mark)` tell when everything changed before a moment
is durable. State whose keys depend on one another orders its writes by these (ptrc's
book: `core.history`, "Persistence").

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
import re
from typing import Any, Callable, Generic, Iterator, TypeVar

import msgspec

from ..core.bounds import payload_bound
from ..streams.stream import current_agent, current_event
from ..streams.transport import DEFAULT_MAX_PAYLOAD, KeyValueStore, Transport

V = TypeVar("V")

_MISSING = object()
_BUCKET_SAFE = re.compile(r"[^A-Za-z0-9_-]")


class ValueTooLarge(ValueError):
    """A table value whose changelog write the server would refuse for its size."""


class Table(Generic[V]):
    def __init__(
        self,
        name: str,
        *,
        bucket: str,
        value_type: Any = Any,
        key_type: Any = str,
        default: Callable[[], V] | None = None,
    ):
        self.name = name
        self.bucket = _BUCKET_SAFE.sub("_", bucket)
        self.default = default
        self._data: dict[Any, V] = {}
        self._seqs: dict[Any, dict[str, int]] = {}
        # Changed since the last flush, in the write order (module doc).
        self._dirty: dict[Any, None] = {}
        self._undo: dict[Any, tuple[Any, dict[str, int] | None, str | None]] = {}
        self._kv: KeyValueStore | None = None
        self._flush_lock = asyncio.Lock()
        self._key_encoder = msgspec.msgpack.Encoder()
        self._key_decoder = msgspec.msgpack.Decoder(key_type)
        self._value_encoder = msgspec.msgpack.Encoder(decimal_format="string")
        self._entry_decoder = msgspec.msgpack.Decoder(tuple[value_type, dict[str, int]])
        self.max_payload = DEFAULT_MAX_PAYLOAD  # the server's, once opened
        self._flushes_started = 0
        self._durable_through = 0  # the last flush started whose changes are all durable

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
        self._dirty[key] = None

    def __delitem__(self, key) -> None:
        self._remember_undo(key)
        del self._data[key]
        self._seqs.pop(key, None)
        self._dirty[key] = None

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
            self._dirty.pop(key, None)

    # -- durability ------------------------------------------------------------------------

    def _kv_key(self, key) -> str:
        return base64.urlsafe_b64encode(self._key_encoder.encode(key)).decode()

    async def open(self, transport: Transport) -> None:
        """Attach the changelog and recover the table's contents from it."""
        self._kv = await transport.key_value(self.bucket)
        self.max_payload = transport.max_payload
        entries = await self._kv.load_all()
        self._data.clear()
        self._seqs.clear()
        for kv_key, raw in entries.items():
            key = self._key_decoder.decode(base64.urlsafe_b64decode(kv_key))
            value, seqs = self._entry_decoder.decode(raw)
            self._data[key] = value
            self._seqs[key] = seqs
        self._dirty.clear()
        self._undo.clear()

    @property
    def dirty(self) -> int:
        return len(self._dirty)

    def write_mark(self) -> int:
        """A mark for `written_after`: the flushes started so far."""
        return self._flushes_started

    def written_after(self, mark: int) -> bool:
        """Whether every change made before `mark` was taken is durable (a flush started
        after it has completed, and with it every earlier one)."""
        return self._durable_through > mark

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
            dirty, self._dirty = self._dirty, {}
            self._undo.clear()
            if self._kv is None:
                raise RuntimeError(f"table {self.name} was written before it was opened")
            self._flushes_started += 1
            started = self._flushes_started
            try:
                await self._kv.put_many(items)
            except BaseException:
                self._dirty = {**dirty, **self._dirty}  # try again at the next commit
                raise
            # (the changes of an earlier flush that failed were put back, and went with this one)
            self._durable_through = started

    async def clear(self) -> None:
        """Delete every key, durably (used by resets and tests)."""
        for key in list(self._data):
            del self[key]
        await self.flush()
