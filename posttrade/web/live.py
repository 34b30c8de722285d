"""What a dashboard follows live, and the short history its charts draw.

A page follows a service over one long `GET` answered as NDJSON (one JSON object per
line), read with a streamed `fetch`: unlike the browser's EventSource, `fetch` sends the
`Authorization` header, so a token never goes in a URL. Every line is
`{"items": [...]}` (possibly empty: a heartbeat every `HEARTBEAT_S`, so that the page
notices a service that went away).

* `LiveTopic` — keyed state (a position, an order). The stream logic only `mark`s a key
  that changed: a set insert, and nothing at all while no page is open. Each open page
  gets, at most every `interval_s`, the *current* value of every key marked since its
  last batch, looked up then. So a page costs the service one lookup per changed key per
  interval however many fills moved it, and never shows a value the service does not
  hold (a batch that was rolled back and redone is looked up after it is redone).
* `LiveLog` — events (a compliance alert): the last `keep` are kept; a page gets them
  at once, then every new one, coalesced the same way. A page that falls more than
  `keep` events behind is told how many it missed (`"missed"`).
* `History` — a bounded ring of samples (`(time, {name: number})`) taken by a timer, for
  the figures a page shows over time (a hit rate, rows per second). It lives as long as
  the process: a chart of the last hour, not a store.

Each has `serve(app, path)`, which registers its route undocumented (`documented=False`):
they are for the pages, not for API clients, and API fuzzers must not follow a stream
that never ends.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Iterable
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import StreamingResponse

from .server import JSON, encode_json

if TYPE_CHECKING:
    from ..app import App

HEARTBEAT_S = 10.0
DEFAULT_INTERVAL_S = 0.25  # at most four updates a second per page
NDJSON = "application/x-ndjson"



def _line(payload: dict) -> bytes:
    return encode_json(payload) + b"\n"


class _Follower:
    """One open page: what it has not been sent yet."""

    __slots__ = ("keys", "events", "missed", "wake")

    def __init__(self) -> None:
        self.keys: set[Hashable] = set()
        self.events: list[Any] = []
        self.missed = 0
        self.wake = asyncio.Event()


class _Followed:
    """What a topic and a log share: the open pages and the streamed answer."""

    def __init__(self, name: str, interval_s: float):
        self.name = name
        self.interval_s = interval_s
        self.followers: set[_Follower] = set()

    @property
    def followed(self) -> bool:
        return bool(self.followers)

    def _first(self) -> list[Any]:
        return []

    def _take(self, follower: _Follower) -> dict:
        raise NotImplementedError

    async def _lines(self, request: Request):
        follower = _Follower()
        self.followers.add(follower)
        try:
            yield _line({"topic": self.name, "items": self._first()})
            while True:
                try:
                    await asyncio.wait_for(follower.wake.wait(), HEARTBEAT_S)
                except TimeoutError:
                    yield b'{"items":[]}\n'
                    continue
                # Coalesce: whatever arrives within the interval goes in one line.
                await asyncio.sleep(self.interval_s)
                follower.wake.clear()
                if await request.is_disconnected():
                    return
                yield _line(self._take(follower))
        finally:
            self.followers.discard(follower)

    def serve(self, app: App, path: str) -> None:
        """Answer `GET path` with this stream (undocumented; confidential unless the
        service has no token)."""
        app.page(path, documented=False)(self.handler)

    async def handler(self, request: Request) -> StreamingResponse:
        # Proxies must pass each line on at once, and nothing may cache a live answer.
        headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
        return StreamingResponse(self._lines(request), media_type=NDJSON, headers=headers)


class LiveTopic(_Followed):
    """Keyed state a page follows. `lookup(key)` is the key's current value as the page
    shows it, or None when the key is gone (the page drops its row); `snapshot()` is
    every value a page starts from."""

    def __init__(
        self,
        name: str,
        *,
        lookup: Callable[[Any], Any],
        snapshot: Callable[[], Iterable[Any]],
        interval_s: float = DEFAULT_INTERVAL_S,
    ):
        super().__init__(name, interval_s)
        self.lookup = lookup
        self.snapshot = snapshot

    def mark(self, key: Hashable) -> None:
        """`key` changed. Cheap enough for the hot path: nothing while no page is open."""
        for follower in self.followers:
            follower.keys.add(key)
            follower.wake.set()

    def _first(self) -> list[Any]:
        return list(self.snapshot())

    def _take(self, follower: _Follower) -> dict:
        keys, follower.keys = follower.keys, set()
        items, gone = [], []
        for key in keys:
            value = self.lookup(key)
            if value is None:
                gone.append(list(key) if isinstance(key, tuple) else key)
            else:
                items.append(value)
        return {"items": items, "gone": gone}


class LiveLog(_Followed):
    """Events a page follows: the last `keep`, then each new one."""

    def __init__(self, name: str, *, keep: int = 500, interval_s: float = DEFAULT_INTERVAL_S):
        super().__init__(name, interval_s)
        self.keep = keep
        self.recent: deque[Any] = deque(maxlen=keep)

    def append(self, event: Any) -> None:
        self.recent.append(event)
        for follower in self.followers:
            if len(follower.events) >= self.keep:
                follower.events.pop(0)
                follower.missed += 1
            follower.events.append(event)
            follower.wake.set()

    def _first(self) -> list[Any]:
        return list(self.recent)

    def _take(self, follower: _Follower) -> dict:
        events, follower.events = follower.events, []
        missed, follower.missed = follower.missed, 0
        return {"items": events, "missed": missed} if missed else {"items": events}


Sample = dict[str, float | None]


class History:
    """The last `keep` samples of some figures, one taken every `every_s` seconds by
    `sample()` (sync or async; a dict of name -> number, a figure missing from a sample
    is a gap). The default keeps an hour at one sample per 2 s."""

    def __init__(
        self, sample: Callable[[], Sample | Awaitable[Sample]], *, every_s: float = 2.0, keep: int = 1800
    ):
        self.sample = sample
        self.every_s = every_s
        self.samples: deque[tuple[float, Sample]] = deque(maxlen=keep)

    def serve(self, app: App, path: str, *, public: bool = False) -> None:
        """Sample on a timer of `app`; answer `GET path` with the ring (undocumented).
        `public`: the figures carry no account data (counters, rates)."""
        app.timer(self.every_s, name=f"history {path}")(self.take)
        app.page(path, public=public, documented=False)(self.handler)

    async def take(self) -> None:
        values = self.sample()
        if inspect.isawaitable(values):
            values = await values
        self.samples.append((time.time(), values))

    def columns(self) -> dict:
        """The ring as columns, the shape a time-series chart draws: `t` (epoch seconds)
        and one list per figure, None where a sample lacks it."""
        names = sorted({name for _, values in self.samples for name in values})
        return {
            "every_s": self.every_s,
            "t": [t for t, _ in self.samples],
            "series": {name: [values.get(name) for _, values in self.samples] for name in names},
        }

    async def handler(self, request: Request) -> JSON:
        return JSON(self.columns())
