"""Windowed tables: per-key state over event-time windows.

Tumbling windows are `[start, start + size)` with `start` a multiple of `size`;
hopping windows have the same length but start every `step`, so an event belongs to
`size / step` of them. Time is *event* time (the event's `ts`), and the table's
watermark is the newest event time it has seen. A window stays open until the
watermark passes `end + grace`; an event for a window that is already closed is late:
it is counted and dropped, never silently folded into a newer window.

Underneath is an ordinary changelog-backed `Table` keyed by `(key, window_start)`, so
windows survive restarts and the per-key sequences make replays idempotent. The
watermark is kept in a second, one-key table: after a restart, a window that was
already closed (and emitted) stays closed.
"""

from __future__ import annotations

from typing import Any, Callable, Generic, TypeVar

from .table import Table

V = TypeVar("V")

_NS = 1_000_000_000


class WindowedTable(Generic[V]):
    def __init__(
        self, table: Table, meta: Table, *, size_s: float, step_s: float | None = None, grace_s: float = 0.0
    ):
        if size_s <= 0:
            raise ValueError("window size must be > 0")
        step_s = size_s if step_s is None else step_s
        if step_s <= 0 or step_s > size_s:
            raise ValueError("hop step must be > 0 and <= the window size")
        self.table = table
        self.meta = meta
        self.size = int(round(size_s * _NS))
        self.step = int(round(step_s * _NS))
        if self.size % self.step:
            raise ValueError("window size must be a whole number of hop steps")
        self.grace = int(round(grace_s * _NS))
        self.watermark = 0  # newest event time seen, ns
        self.late_events = 0

    @property
    def name(self) -> str:
        return self.table.name

    async def open(self, transport) -> None:
        await self.table.open(transport)
        await self.meta.open(transport)
        self.watermark = self.meta.get("watermark", 0)

    def windows_for(self, ts: int) -> list[int]:
        """Start times (ns) of every window that contains event time `ts`."""
        last = ts - ts % self.step
        first = last - self.size + self.step
        return list(range(max(first, 0), last + 1, self.step))

    def is_closed(self, window_start: int) -> bool:
        return window_start + self.size + self.grace <= self.watermark

    def apply(self, key, ts: int, update: Callable[[V], V]) -> list[tuple[int, V]]:
        """Fold an event into every open window containing `ts`.

        Returns the (window_start, new value) pairs; empty when the event was late.
        """
        if ts > self.watermark:
            self.watermark = ts
            self.meta["watermark"] = ts
        result = []
        for start in self.windows_for(ts):
            if self.is_closed(start):
                continue
            result.append((start, self.table.apply((key, start), update)))
        if not result:
            self.late_events += 1
        return result

    def get(self, key, window_start: int, default=None):
        return self.table.get((key, window_start), default)

    def latest(self, key) -> tuple[int, V] | None:
        """The newest window held for `key`, or None."""
        starts = [start for k, start in self.table.keys() if k == key]
        if not starts:
            return None
        start = max(starts)
        return start, self.table[(key, start)]

    def pop_closed(self) -> list[tuple[Any, int, V]]:
        """Remove and return every closed window as (key, window_start, value), oldest first."""
        closed = sorted(
            ((key, start) for key, start in self.table.keys() if self.is_closed(start)),
            key=lambda ks: ks[1],
        )
        return [(key, start, self.table.pop((key, start))) for key, start in closed]

    def __len__(self) -> int:
        return len(self.table)
