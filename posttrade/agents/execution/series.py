"""Per-symbol series over event time (mids, the cumulative tape) and the fills and orders
waiting for one of them to decide a value (see the package docstring, "How the join works")."""

from __future__ import annotations

import heapq
from bisect import bisect_right
from collections.abc import Iterable
from typing import Any


class _Series:
    __slots__ = ("times", "values", "seqs", "watermark", "last_seq", "base", "complete")

    def __init__(self, base: Any, complete: bool):
        self.times: list[int] = []
        self.values: list[Any] = []
        self.seqs: list[int] = []
        self.watermark = -1
        self.last_seq = 0
        self.base = base  # the value just before the first point (None: unknown)
        self.complete = complete  # nothing was pruned: `base` is the value at any earlier time


class EventTimeSeries:
    """Per-symbol values over event time with a bounded history, appended in order.

    `base` is the value of a symbol before its first point while nothing has been
    pruned (the tape: zero; quotes: None, no mid before the first quote)."""

    def __init__(self, base: Any = None):
        self._base = base
        self._series: dict[str, _Series] = {}
        self.watermark = -1  # newest event time of any symbol
        self.late = 0
        self.duplicates = 0

    def __contains__(self, symbol: str) -> bool:
        return symbol in self._series

    def symbols(self) -> Iterable[str]:
        return self._series.keys()

    def points(self, symbol: str) -> int:
        s = self._series.get(symbol)
        return len(s.times) if s else 0

    def total_points(self) -> int:
        return sum(len(s.times) for s in self._series.values())

    def seed(self, symbol: str, *, base: Any, complete: bool) -> None:
        """Start a symbol's series (used when rebuilding from a changelog entry)."""
        self._series[symbol] = _Series(base, complete)

    def reset_to(self, symbol: str, ts: int, value: Any, seq: int) -> None:
        """Forget the symbol's history but its one latest point (rebuild fallback)."""
        s = self._series[symbol] = _Series(None, False)
        s.times.append(ts)
        s.values.append(value)
        s.seqs.append(seq)
        s.watermark = ts
        s.last_seq = seq
        self.watermark = max(self.watermark, ts)

    def _get(self, symbol: str) -> _Series:
        s = self._series.get(symbol)
        if s is None:
            s = self._series[symbol] = _Series(self._base, True)
        return s

    def check(self, symbol: str, ts: int, seq: int) -> str:
        """'new', 'duplicate' (sequence already applied) or 'late' (older than the watermark)."""
        s = self._series.get(symbol)
        if s is None:
            return "new"
        if seq <= s.last_seq:
            return "duplicate"
        if ts < s.watermark:
            return "late"
        return "new"

    def append(self, symbol: str, ts: int, value: Any, seq: int) -> None:
        """Add a point that `check` called new."""
        s = self._get(symbol)
        s.times.append(ts)
        s.values.append(value)
        s.seqs.append(seq)
        s.watermark = ts
        s.last_seq = seq
        if ts > self.watermark:
            self.watermark = ts

    def skip(self, symbol: str, seq: int) -> None:
        """Record that `seq` was seen (late) without adding a point."""
        s = self._get(symbol)
        s.last_seq = max(s.last_seq, seq)

    def watermark_of(self, symbol: str) -> int:
        s = self._series.get(symbol)
        return s.watermark if s else -1

    def decided(self, symbol: str, t: int, quiet_grace_ns: int) -> bool:
        """Whether the value at `t` can no longer change (see the package docstring)."""
        return self.watermark_of(symbol) >= t or self.watermark >= t + quiet_grace_ns

    def value_at(self, symbol: str, t: int) -> Any:
        """The last point at or before `t`; before the first point the base (None: unknown)."""
        s = self._series.get(symbol)
        if s is None:
            return self._base
        i = bisect_right(s.times, t) - 1
        if i >= 0:
            return s.values[i]
        return s.base if s.complete else None

    def latest(self, symbol: str) -> tuple[int, Any] | None:
        s = self._series.get(symbol)
        if not s or not s.times:
            return None
        return s.times[-1], s.values[-1]

    def current(self, symbol: str) -> Any:
        """The value now: after the newest point, or the base when there is none."""
        s = self._series.get(symbol)
        if s is None:
            return self._base
        return s.values[-1] if s.values else s.base

    def prune(self, symbol: str, keep_ns: int) -> tuple[int, Any] | None:
        """Drop points older than `watermark - keep_ns`, keeping the last point at or
        before that cut (it is still the value there). Returns (first seq kept, value
        before it) when something was dropped."""
        s = self._series.get(symbol)
        if s is None or len(s.times) < 2:
            return None
        i = bisect_right(s.times, s.watermark - keep_ns) - 1
        if i <= 0:
            return None
        s.base = s.values[i - 1]
        s.complete = False
        del s.times[:i], s.values[:i], s.seqs[:i]
        return s.seqs[0], s.base


class Waits:
    """Fills and orders waiting for a series to decide the value at some time.

    Each waiter has one current wait (the earliest time it still needs); it sits in its
    symbol's heap and in a heap over all symbols (the quiet-symbol rule), and whichever
    serves it first wins: entries that are no longer a waiter's current wait are stale
    and skipped."""

    def __init__(self) -> None:
        self.by_symbol: dict[str, list[tuple[int, str, str]]] = {}
        self.everywhere: list[tuple[int, str, str]] = []
        self.current: dict[tuple[str, str], int] = {}

    def add(self, symbol: str, t: int, kind: str, key: str) -> None:
        if self.current.get((kind, key)) == t:
            return  # already waiting for exactly this
        self.current[(kind, key)] = t
        item = (t, kind, key)
        heapq.heappush(self.by_symbol.setdefault(symbol, []), item)
        heapq.heappush(self.everywhere, item)

    def _serve(self, item: tuple[int, str, str], out: list[tuple[str, str]]) -> None:
        t, kind, key = item
        if self.current.get((kind, key)) == t:
            del self.current[(kind, key)]
            out.append((kind, key))

    def due(self, series: EventTimeSeries, symbols: Iterable[str], quiet_grace_ns: int) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        for symbol in symbols:
            heap = self.by_symbol.get(symbol)
            if not heap:
                continue
            watermark = series.watermark_of(symbol)
            while heap and heap[0][0] <= watermark:
                self._serve(heapq.heappop(heap), out)
            if not heap:
                del self.by_symbol[symbol]
        heap = self.everywhere
        limit = series.watermark - quiet_grace_ns
        while heap and heap[0][0] <= limit:
            self._serve(heapq.heappop(heap), out)
        return out

    def drop_decided(self, series: EventTimeSeries, quiet_grace_ns: int) -> None:
        """Forget per-symbol entries the quiet-symbol rule has already served."""
        limit = series.watermark - quiet_grace_ns
        for symbol in list(self.by_symbol):
            heap = self.by_symbol[symbol]
            while heap and heap[0][0] <= limit:
                heapq.heappop(heap)
            if not heap:
                del self.by_symbol[symbol]

    def __len__(self) -> int:
        return len(self.current)
