"""hot_cache (port 8088): recent bars, last quotes and current positions served from Valkey.

Four agents keep Valkey current:

* `build_bars`   market trades → OHLCV+VWAP bars per symbol for each interval of
                 `hot_cache.bar_intervals` (event-time tumbling windows with a grace
                 period, `posttrade.agents.bars`);
* `take_bars`    bar messages → bars of the other intervals;
* `take_quotes`  quotes → the last quote per symbol;
* `take_positions` ptrc's `PositionUpdate`s → the current positions per account.

Pages read Valkey first and, on a miss, the source (cache-aside): bars and quotes from
QuestDB, positions from ptrc's POSITIONS stream (the last message of each
`posttrade.positions.<account>.<symbol>` subject: ptrc's own figures, never computed
again here). The answer is stored in Valkey and then served, and every answer says
whether it was a hit. A background warmer fills bars keys from QuestDB when the feed
first writes them. `hot_cache.consume: false` runs the read API alone (read replicas).
docs/hot_cache.md has the endpoints, the key scheme and the read-through queries.

Valkey key scheme (`P` is `hot_cache.key_prefix`, default `pt`; every key but the meta
key has the TTL `cache.redis.ttl`, renewed by each write):

| key                          | type       | content                                          |
|------------------------------|------------|--------------------------------------------------|
| `P:bars:{symbol}:{interval}` | sorted set | member = Bar JSON, score = bar open time in ms;  |
|                              |            | the newest `bars_kept` bars; the member          |
|                              |            | `#complete` (score 0) marks a key filled from    |
|                              |            | QuestDB: it holds all there is, however few      |
| `P:quote:{symbol}`           | string     | Quote JSON                                       |
| `P:pos:{account}`            | hash       | field = symbol, value = PositionUpdate JSON (as  |
|                              |            | ptrc published it); the field `#complete` marks  |
|                              |            | a hash filled from the POSITIONS stream (it      |
|                              |            | lists every symbol of the account)               |
| `P:meta:newest`              | sorted set | member = family, score = newest event time       |
|                              |            | written, ms (no TTL: freshness of the feed)      |
| `P:meta:sentinel:{service}`  | string     | Valkey's run_id when the feed's process wrote it |
|                              |            | (no TTL): gone or older means Valkey lost the    |
|                              |            | keys, and `CacheRebuilder` rebuilds them         |

Writes are whole values (never increments) made by Lua scripts that take a whole batch
(one call per 1,000 items), queued on one pipeline (one round trip). A quote is replaced
only by a quote of a later event time `ts`. A position is replaced only by an update of
a higher `revision`: ptrc counts each key's updates, and a late fill's update carries an
*older* `ts` than the update it supersedes, so event time cannot order positions. A
replay, a resend or a late read-through therefore never moves a value back.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from functools import lru_cache
from decimal import Decimal
from typing import Any

import msgspec
import nats.errors
from prometheus_client import Counter, Histogram
from redis.exceptions import BusyLoadingError, NoScriptError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from ..agents.bars import (
    BarMessageCounters,
    SinkUnavailable,
    TradeBarBuilder,
    add_bar_message_agent,
    add_trade_bar_agent,
    check_built_interval,
    write_until_done,
)
from ..app import DEGRADED, App
from ..config import QuestDBSection, RedisSection, ServiceConfig, _Section
from ..core.bars import NS_PER_S, bar_from_totals, interval_seconds, plain, plain_decimals
from ..streams import subjects
from ..streams.channel import Channel
from ..streams.events import Bar, InvalidEvent, PositionUpdate, Quote, decode, encode, subject_token
from ..streams.stream import Stream
from ..streams.transport import ConsumerSpec, Delivery, StartPosition, Transport
from ..stores.questdb import (
    QuestDBClient,
    QuestDBError,
    QuestDBUnavailableError,
    check_identifier,
    sql_literal,
)
from ..stores.valkey import ValkeyLoss, ValkeyStore, ValkeyWatch, open_valkey
from ..web.live import History
from ..web.params import BadRequest, check_interval, path_name, query_int
from ..web.server import JSON
from .wiring import new_app

log = logging.getLogger(__name__)

FAMILIES = ("bars", "quotes", "positions")
DASHBOARD_SYMBOLS = 2000  # symbols the page's picker lists at most
# The marker member / field of a key filled from its source (QuestDB, or for positions
# the POSITIONS stream): the key holds everything there is.
COMPLETE = b"#complete"


# -- configuration --------------------------------------------------------------------


class ReadThroughTables(_Section):
    """QuestDB tables a miss of bars or quotes reads (written by questdb_writer)."""

    market_trades: str = "market_trades"
    quotes: str = "quotes"
    bars: str = "bars"

    def __post_init__(self) -> None:
        for name in (self.market_trades, self.quotes, self.bars):
            check_identifier(name)


class ReadThroughSection(_Section):
    tables: ReadThroughTables = msgspec.field(default_factory=ReadThroughTables)
    # How long a miss waits for QuestDB (bars, quotes) or the POSITIONS stream (positions).
    timeout_s: float = 5.0

    def __post_init__(self) -> None:
        if self.timeout_s <= 0:
            raise ValueError("read_through needs timeout_s > 0")


class HotCacheSection(_Section):
    # False: serve the read API only, with no agents (read replicas: the API is
    # stateless, Valkey and QuestDB hold everything it reads).
    consume: bool = True
    key_prefix: str = "pt"
    bars_kept: int = 200  # N: the newest bars kept per (symbol, interval)
    bar_intervals: list[str] = msgspec.field(default_factory=lambda: ["1s", "1m", "5m"])  # built from trades
    grace_s: float = 5.0  # how far behind the newest trade a trade may be and still count
    default_bar_interval: str = "1m"
    default_bar_limit: int = 100
    # Keys the feed writes for the first time are filled from QuestDB in the background
    # by this many workers (0: never), so a read of more bars than the feed has built
    # since a start is a hit, not a miss.
    warm_concurrency: int = 1
    write_batch: int = 1000  # events folded into one Valkey pipeline at most
    write_within_s: float = 0.05  # ...or fewer, once this long has passed
    # How often the feed's process looks whether Valkey lost the keys (restarted: new
    # run_id; emptied: the sentinel key gone); a loss rebuilds them at once (CacheRebuilder).
    valkey_check_s: float = 1.0
    read_through: ReadThroughSection = msgspec.field(default_factory=ReadThroughSection)

    def __post_init__(self) -> None:
        if not self.key_prefix or any(c.isspace() or c in ":*?[]" for c in self.key_prefix):
            raise ValueError("key_prefix must be non-empty, without spaces, ':' or glob characters")
        if self.bars_kept < 1:
            raise ValueError("bars_kept must be >= 1")
        if not 1 <= self.default_bar_limit <= self.bars_kept:
            raise ValueError("default_bar_limit must be between 1 and bars_kept")
        if not self.bar_intervals:
            raise ValueError("bar_intervals must list at least one interval")
        for interval in self.bar_intervals:
            check_built_interval(interval)
        if len(set(self.bar_intervals)) != len(self.bar_intervals):
            raise ValueError("bar_intervals lists an interval twice")
        interval_seconds(self.default_bar_interval)
        if self.grace_s < 0 or self.write_batch < 1 or self.write_within_s <= 0 or self.warm_concurrency < 0:
            raise ValueError("grace_s, warm_concurrency must be >= 0, write_batch >= 1 and write_within_s > 0")
        if self.valkey_check_s <= 0:
            raise ValueError("valkey_check_s must be > 0")


class HotCacheConfig(ServiceConfig):
    hot_cache: HotCacheSection = msgspec.field(default_factory=HotCacheSection)


CONFIG = HotCacheConfig


# -- the position events ptrc publishes ---------------------------------------------------


def highest_revisions(updates: Iterable[PositionUpdate]) -> list[PositionUpdate]:
    """The update of the highest `revision` of each (account, symbol), in first-seen order.

    ptrc counts every update of a key up by one, and a late fill's update has an older
    `ts` than the one it supersedes: the revision orders a key's updates, the event time
    does not. Of two updates of one revision (the same update, resent) the first is
    kept, as the Valkey scripts keep the stored one.
    """
    highest: dict[tuple[str, str], PositionUpdate] = {}
    for update in updates:
        key = (update.account, update.symbol)
        held = highest.get(key)
        if held is None or update.revision > held.revision:
            highest[key] = update
    return list(highest.values())


# -- Valkey -------------------------------------------------------------------------------

# Each script takes a batch: KEYS lists the keys, the last ARGV is a JSON array of items
# that name their key by index. One call per batch (chunks of WRITE_CHUNK items) keeps
# the Python side to a single encode and a single command; Valkey runs it atomically.

# Replace the bar of each item's open time (mode "replace"), or add it only where no bar
# of that open time is held (modes "fill", "fill_complete": a read-through must not
# overwrite a bar the live feed wrote meanwhile). Items: [key index, score, bar JSON].
_PUT_BARS = """
local ttl, keep, mode = ARGV[1], tonumber(ARGV[2]), ARGV[3]
for _, item in ipairs(cjson.decode(ARGV[4])) do
  local key, score = KEYS[item[1]], item[2]
  if mode == 'replace' then
    redis.call('ZREMRANGEBYSCORE', key, score, score)
    redis.call('ZADD', key, score, item[3])
  elseif redis.call('ZCOUNT', key, score, score) == 0 then
    redis.call('ZADD', key, score, item[3])
  end
end
for _, key in ipairs(KEYS) do
  if mode == 'fill_complete' then
    redis.call('ZADD', key, 0, '#complete')
  end
  redis.call('ZREMRANGEBYRANK', key, 0, -(keep + 1))
  redis.call('EXPIRE', key, ttl)
end
return #KEYS
"""

# Values are flat JSON objects written by msgspec (no spaces) with a top-level
# `"ts":<digits>` (quotes) or `"revision":<digits>` (positions). Inside a JSON string a
# quote is escaped, so the bytes `"ts":` can only be that key. Compare the digit
# strings: Lua numbers are doubles, too coarse for epoch nanoseconds.
_DIGITS_HELPERS = """
local function digits_greater(a, b)
  if #a ~= #b then return #a > #b end
  return a > b
end
"""

_NEWER_HELPERS = _DIGITS_HELPERS + """
local function ts_of(v) return string.match(v, '"ts":(%d+)') end
local function stored_is_newer(stored, value)
  local a, b = ts_of(stored), ts_of(value)
  if not a or not b then return false end
  return digits_greater(a, b)
end
"""

# Items: [key index, value]. A key holding a newer value keeps it (and its TTL).
_SET_IF_NEWER = _NEWER_HELPERS + """
local ttl, written = ARGV[1], 0
for _, item in ipairs(cjson.decode(ARGV[2])) do
  local key, value = KEYS[item[1]], item[2]
  local current = redis.call('GET', key)
  if not (current and stored_is_newer(current, value)) then
    redis.call('SET', key, value, 'EX', ttl)
    written = written + 1
  end
end
return written
"""

# Positions: compare-and-set on ptrc's `revision` (never on `ts`: a late fill's update
# is older in event time than the update it supersedes). A value is written only over
# a lower revision; a stored value without one (written before revisions existed) is
# replaced, a value without one never replaces anything.
_REVISION_HELPERS = _DIGITS_HELPERS + """
local function revision_of(v) return string.match(v, '"revision":(%d+)') end
local function supersedes(value, stored)
  local new, held = revision_of(value), revision_of(stored)
  if not new then return false end
  if not held then return true end
  return digits_greater(new, held)
end
"""

# Items: [key index, field, value]. ARGV[2] = '1' marks every key as complete (filled
# from the POSITIONS stream: it lists every symbol of the account).
_HSET_IF_HIGHER_REVISION = _REVISION_HELPERS + """
local ttl, complete, written = ARGV[1], ARGV[2], {}
for _, item in ipairs(cjson.decode(ARGV[3])) do
  local key, field, value = KEYS[item[1]], item[2], item[3]
  local current = redis.call('HGET', key, field)
  if not current or supersedes(value, current) then
    redis.call('HSET', key, field, value)
    written[key] = true
  end
end
for _, key in ipairs(KEYS) do
  if complete == '1' then
    redis.call('HSET', key, '#complete', '1')
    written[key] = true
  end
  if written[key] then redis.call('EXPIRE', key, ttl) end
end
return 1
"""

WRITE_CHUNK = 1000  # items per script call: bounds how long one call holds Valkey
_RESTORE_CALLS = 8  # script calls per pipeline of a rebuild (then the agents get a turn)


class _Script:
    def __init__(self, source: str):
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()


class CacheKeys:
    """The key scheme (see the module docstring)."""

    def __init__(self, prefix: str):
        self.prefix = prefix

    def bars(self, symbol: str, interval: str) -> str:
        return f"{self.prefix}:bars:{symbol}:{interval}"

    def quote(self, symbol: str) -> str:
        return f"{self.prefix}:quote:{symbol}"

    def positions(self, account: str) -> str:
        return f"{self.prefix}:pos:{account}"

    @property
    def newest(self) -> str:
        """Sorted set: member = family, score = newest event time written (ms)."""
        return f"{self.prefix}:meta:newest"

    def pattern(self, family: str) -> str:
        token = {"bars": "bars", "quotes": "quote", "positions": "pos"}[family]
        return f"{self.prefix}:{token}:*"

    def sentinel(self, service: str) -> str:
        """The feed process's sentinel (`stores.valkey.ValkeyWatch`): gone means Valkey was emptied."""
        return f"{self.prefix}:meta:sentinel:{service}"


def _stored(event: msgspec.Struct) -> str:
    """The JSON stored for an event. Its Decimals are already canonical (plain, no
    trailing zeros: built bars and read-through values are made so, and the agents
    pass bus events through `plain_decimals`), as the read API answers numbers, so the
    stored JSON is served as it is."""
    return encode(event).decode()


def _bar_score(bar: Bar) -> str:
    # Milliseconds: exact in a double (epoch ns are not) and finer than any bar.
    return str(bar.ts // 1_000_000)


class _Batch:
    """Items for one script call: keys numbered in order of first use."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.items: list[list] = []
        self._index: dict[str, int] = {}

    def add(self, key: str, *values: Any) -> None:
        index = self._index.get(key)
        if index is None:
            self.keys.append(key)
            index = self._index[key] = len(self.keys)  # Lua arrays count from 1
        self.items.append([index, *values])


def _batches(entries, size: int = WRITE_CHUNK):
    """Split (key, *values) entries into _Batches of at most `size` items."""
    batch = _Batch()
    for key, *values in entries:
        batch.add(key, *values)
        if len(batch.items) >= size:
            yield batch
            batch = _Batch()
    if batch.items:
        yield batch


_TRANSIENT = (RedisConnectionError, RedisTimeoutError, BusyLoadingError, OSError)
_json = msgspec.json.Encoder()


class ValkeyCache:
    """The hot cache's reads and writes in Valkey. Every method raises SinkUnavailable
    when Valkey cannot be reached (or refuses writes for lack of memory)."""

    PUT_BARS = _Script(_PUT_BARS)
    SET_IF_NEWER = _Script(_SET_IF_NEWER)
    HSET_IF_HIGHER_REVISION = _Script(_HSET_IF_HIGHER_REVISION)

    def __init__(self, store: ValkeyStore, keys: CacheKeys, *, ttl_s: int, bars_kept: int):
        if ttl_s < 1:
            raise ValueError("the cache TTL must be >= 1 s")
        self.store = store
        self.redis = store.redis
        self.keys = keys
        self.ttl_s = ttl_s
        self.bars_kept = bars_kept
        # What this process's agents wrote (read-through fills are not news: not counted).
        self.writes = {family: 0 for family in FAMILIES}
        self.pipelines = 0

    # -- plumbing ------------------------------------------------------------------------

    async def _execute(self, build: Callable[[Any], None]) -> list[Any]:
        """Run the commands `build` queues on a pipeline: one round trip. Scripts are
        called by SHA; if Valkey does not know them (restart, SCRIPT FLUSH) they are
        loaded and the whole pipeline runs again (every write here is idempotent)."""
        for attempt in range(2):
            pipe = self.redis.pipeline(transaction=False)
            build(pipe)
            try:
                return await pipe.execute()
            except NoScriptError:
                if attempt:
                    raise
                await self._load_scripts()
            except _TRANSIENT as exc:
                raise SinkUnavailable(f"Valkey at {self.store.location}: {exc}") from exc
            except ResponseError as exc:
                if str(exc).startswith("OOM"):
                    raise SinkUnavailable(f"Valkey at {self.store.location} is out of memory: {exc}") from exc
                raise
        raise AssertionError("unreachable")

    async def _load_scripts(self) -> None:
        try:
            for script in (self.PUT_BARS, self.SET_IF_NEWER, self.HSET_IF_HIGHER_REVISION):
                await self.redis.script_load(script.source)
        except _TRANSIENT as exc:
            raise SinkUnavailable(f"Valkey at {self.store.location}: {exc}") from exc

    async def _call(self, command: Callable[[], Awaitable[Any]]) -> Any:
        try:
            return await command()
        except _TRANSIENT as exc:
            raise SinkUnavailable(f"Valkey at {self.store.location}: {exc}") from exc

    def _queue_newest(self, pipe, family: str, newest_event_ts: int) -> None:
        # GT: the score only ever moves forward, whichever process writes. No TTL: when
        # the feed stops, the lag should grow (a stale feed), not become unknown.
        pipe.zadd(self.keys.newest, {family: newest_event_ts // 1_000_000}, gt=True)

    def _counted(self, family: str, count: int) -> None:
        self.writes[family] += count
        self.pipelines += 1

    # -- writes ----------------------------------------------------------------------------

    def _queue_bars(self, pipe, bars: Sequence[Bar], mode: str) -> None:
        entries = ((self.keys.bars(b.symbol, b.interval), _bar_score(b), _stored(b)) for b in bars)
        for batch in _batches(entries):
            pipe.evalsha(self.PUT_BARS.sha, len(batch.keys), *batch.keys, self.ttl_s, self.bars_kept, mode,
                         _json.encode(batch.items))

    async def write_bars(self, bars: Sequence[Bar], newest_event_ts: int) -> None:
        """The live path: replace each bar's window."""

        def build(pipe) -> None:
            self._queue_bars(pipe, bars, "replace")
            self._queue_newest(pipe, "bars", newest_event_ts)

        await self._execute(build)
        self._counted("bars", len(bars))

    async def fill_bars(self, symbol: str, interval: str, bars: Sequence[Bar]) -> None:
        """The read-through path: add the bars of windows not held, mark the key complete."""
        await self._execute(lambda pipe: self._queue_bars(pipe, bars, "fill_complete"))

    def _queue_quotes(self, pipe, quotes: Sequence[Quote]) -> None:
        for batch in _batches((self.keys.quote(q.symbol), _stored(q)) for q in quotes):
            pipe.evalsha(self.SET_IF_NEWER.sha, len(batch.keys), *batch.keys, self.ttl_s, _json.encode(batch.items))

    async def write_quotes(self, quotes: Sequence[Quote]) -> None:
        def build(pipe) -> None:
            self._queue_quotes(pipe, quotes)
            self._queue_newest(pipe, "quotes", max(q.ts for q in quotes))

        if quotes:
            await self._execute(build)
            self._counted("quotes", len(quotes))

    async def fill_quote(self, quote: Quote) -> None:
        await self._execute(lambda pipe: self._queue_quotes(pipe, [quote]))

    def _queue_positions(self, pipe, updates: Sequence[PositionUpdate], complete: bool) -> None:
        entries = ((self.keys.positions(u.account), u.symbol, _stored(u)) for u in updates)
        for batch in _batches(entries):
            pipe.evalsha(self.HSET_IF_HIGHER_REVISION.sha, len(batch.keys), *batch.keys, self.ttl_s,
                         "1" if complete else "0", _json.encode(batch.items))

    async def write_positions(self, updates: Sequence[PositionUpdate]) -> None:
        """The live path: each update replaces its symbol's field where its revision is
        higher than the stored one's."""

        def build(pipe) -> None:
            self._queue_positions(pipe, updates, complete=False)
            self._queue_newest(pipe, "positions", max(u.ts for u in updates))

        if updates:
            await self._execute(build)
            self._counted("positions", len(updates))

    async def fill_positions(self, account: str, updates: Sequence[PositionUpdate]) -> None:
        """The read-through path: store the account's updates read from the POSITIONS
        stream (where the live feed already wrote a higher revision, that one stays) and
        mark the hash complete: it now lists every symbol ptrc has published for it."""

        def build(pipe) -> None:
            if updates:
                self._queue_positions(pipe, updates, complete=True)
            else:  # nothing in the stream: what the live feed put there is all there is
                pipe.evalsha(self.HSET_IF_HIGHER_REVISION.sha, 1, self.keys.positions(account), self.ttl_s, "1", "[]")

        await self._execute(build)

    # -- rebuilding after Valkey lost the keys (CacheRebuilder) ------------------------------

    async def restore_positions(self, updates: Sequence[PositionUpdate], complete: Iterable[str]) -> None:
        """Store positions read from the POSITIONS stream (a higher revision the live feed
        wrote meanwhile stays), then mark the `complete` accounts' hashes complete: only
        once every one of their symbols is in, so no reader sees a complete hash that
        lacks one. Several pipelines, yielding in between: the agents keep writing."""
        entries = ((self.keys.positions(u.account), u.symbol, _stored(u)) for u in updates)
        await self._restore(self.HSET_IF_HIGHER_REVISION, entries, lambda: ("0",))
        accounts = [(self.keys.positions(account),) for account in complete]
        for start in range(0, len(accounts), WRITE_CHUNK * _RESTORE_CALLS):
            part = accounts[start : start + WRITE_CHUNK * _RESTORE_CALLS]

            def build(pipe, part=part) -> None:
                for first in range(0, len(part), WRITE_CHUNK):
                    keys = [key for key, in part[first : first + WRITE_CHUNK]]
                    pipe.evalsha(self.HSET_IF_HIGHER_REVISION.sha, len(keys), *keys, self.ttl_s, "1", "[]")

            await self._execute(build)
            await asyncio.sleep(0)
        if updates:
            await self._execute(lambda pipe: self._queue_newest(pipe, "positions", max(u.ts for u in updates)))

    async def restore_quotes(self, quotes: Sequence[Quote]) -> None:
        """Store quotes read from the QUOTES stream (a newer one stays)."""
        entries = ((self.keys.quote(q.symbol), _stored(q)) for q in quotes)
        await self._restore(self.SET_IF_NEWER, entries, lambda: ())
        if quotes:
            await self._execute(lambda pipe: self._queue_newest(pipe, "quotes", max(q.ts for q in quotes)))

    async def restore_bars(self, bars: Sequence[Bar]) -> None:
        """Store the bars of the open windows where the key has no bar of that open time
        (a bar the live feed wrote meanwhile is newer: it stays)."""
        entries = ((self.keys.bars(b.symbol, b.interval), _bar_score(b), _stored(b)) for b in bars)
        await self._restore(self.PUT_BARS, entries, lambda: (self.bars_kept, "fill"))

    async def _restore(self, script: _Script, entries, extra: Callable[[], tuple]) -> None:
        """Script calls of WRITE_CHUNK items, `_RESTORE_CALLS` calls per pipeline."""
        calls: list[_Batch] = []

        def build(pipe) -> None:
            for batch in calls:
                pipe.evalsha(script.sha, len(batch.keys), *batch.keys, self.ttl_s, *extra(), _json.encode(batch.items))

        for batch in _batches(entries):
            calls.append(batch)
            if len(calls) >= _RESTORE_CALLS:
                await self._execute(build)
                calls = []
                await asyncio.sleep(0)  # let the agents in
        if calls:
            await self._execute(build)

    # -- reads -------------------------------------------------------------------------------

    async def read_bars(self, symbol: str, interval: str, limit: int) -> tuple[list[bytes], bool]:
        """(the newest `limit` bars as JSON, newest first; whether that answers the read).

        It does when `limit` bars are held, or when the key was filled from QuestDB (it
        then holds everything there is, and the marker shows up among the newest
        `limit` members exactly when fewer bars are held)."""
        members = await self._call(lambda: self.redis.zrevrange(self.keys.bars(symbol, interval), 0, limit - 1))
        if members and members[-1] == COMPLETE:
            return members[:-1], True
        return members, len(members) >= limit

    async def is_complete(self, symbol: str, interval: str) -> bool:
        """Whether the bars key holds the marker of a fill from QuestDB."""
        score = await self._call(lambda: self.redis.zscore(self.keys.bars(symbol, interval), COMPLETE))
        return score is not None

    async def read_quote(self, symbol: str) -> bytes | None:
        return await self._call(lambda: self.redis.get(self.keys.quote(symbol)))

    async def read_positions(self, account: str) -> tuple[dict[bytes, bytes], bool]:
        """(symbol → position JSON, whether the hash lists every symbol of the account)."""
        fields = await self._call(lambda: self.redis.hgetall(self.keys.positions(account)))
        complete = fields.pop(COMPLETE, None) is not None
        return fields, complete

    # -- stats -------------------------------------------------------------------------------

    async def server_stats(self) -> dict[str, Any]:
        async def info() -> tuple[dict, dict, int, list]:
            pipe = self.redis.pipeline(transaction=False)
            pipe.info("memory").info("stats").dbsize().zrange(self.keys.newest, 0, -1, withscores=True)
            return await pipe.execute()

        memory, stats, dbsize, newest = await self._call(info)
        return {
            "memory": {
                "used_bytes": memory.get("used_memory"),
                "used_human": memory.get("used_memory_human"),
                "peak_bytes": memory.get("used_memory_peak"),
                "maxmemory_bytes": memory.get("maxmemory"),
                "maxmemory_policy": memory.get("maxmemory_policy"),
            },
            "evictions": stats.get("evicted_keys"),
            "expired_keys": stats.get("expired_keys"),
            "keys_in_db": dbsize,
            # family -> newest event time written by any hot_cache process, ns (ms precision)
            "newest_event_ts": {family.decode(): int(score) * 1_000_000 for family, score in newest},
        }

    async def count_keys(self) -> dict[str, int]:
        """Keys per family: one SCAN of the prefix over the database (the database may
        hold other services' keys, so DBSIZE alone would not tell; one pass, not one per
        family: a SCAN walks the whole database whatever its pattern)."""
        families = {"bars": "bars", "quote": "quotes", "pos": "positions"}
        start = len(self.keys.prefix) + 1

        async def scan() -> dict[str, int]:
            counts = dict.fromkeys(FAMILIES, 0)
            async for key in self.redis.scan_iter(match=f"{self.keys.prefix}:*", count=1000):
                family = families.get(key[start:key.find(b":", start)].decode(errors="replace"))
                if family is not None:
                    counts[family] += 1
            return counts

        return await self._call(scan)

    async def bar_series(self, limit: int) -> dict[str, list[str]]:
        """symbol -> intervals of the bars keys held (the page's symbol picker): a SCAN of
        the bars keys, at most `limit` symbols (alphabetically first)."""
        prefix = f"{self.keys.prefix}:bars:"

        async def scan() -> dict[str, set[str]]:
            series: dict[str, set[str]] = {}
            async for key in self.redis.scan_iter(match=self.keys.pattern("bars"), count=1000):
                # The interval (`30s`, `1m`) has no ':'; a symbol may.
                symbol, _, interval = key.decode(errors="replace")[len(prefix):].rpartition(":")
                if symbol:
                    series.setdefault(symbol, set()).add(interval)
            return series

        series = await self._call(scan)
        return {symbol: sorted(series[symbol], key=_interval_order) for symbol in sorted(series)[:limit]}


def _interval_order(interval: str) -> tuple[float, str]:
    try:
        return interval_seconds(interval), interval
    except ValueError:
        return float("inf"), interval


# -- QuestDB read-through ---------------------------------------------------------------------


class TableMissing(LookupError):
    """A table the read needs does not exist yet (questdb_writer has not created it)."""


class ReadThroughError(RuntimeError):
    """QuestDB answered, but with something that cannot be used."""


_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()


@lru_cache(maxsize=4096)
def _day_start_s(day: str) -> int:
    return (date.fromisoformat(day).toordinal() - _EPOCH_ORDINAL) * 86_400


def iso_to_ns(text: str) -> int:
    """QuestDB's `2024-01-02T03:04:05.123456Z` (TIMESTAMP) or nine-digit TIMESTAMP_NS
    text → epoch ns, exactly (no float on the way). Hand-parsed: `time.strptime` costs
    more than the rest of a read-through together."""
    if not (isinstance(text, str) and len(text) >= 20 and text[-1] == "Z" and text[10] == "T"
            and text[13] == ":" and text[16] == ":"):
        raise ReadThroughError(f"not a QuestDB timestamp: {text!r}")
    fraction = text[20:-1] if text[19] == "." else ""
    try:
        hour, minute, second = int(text[11:13]), int(text[14:16]), int(text[17:19])
        if hour > 23 or minute > 59 or second > 60 or (fraction and not fraction.isdigit()) or len(fraction) > 9:
            raise ValueError
        seconds = _day_start_s(text[:10]) + hour * 3600 + minute * 60 + second
    except ValueError:
        raise ReadThroughError(f"not a QuestDB timestamp: {text!r}") from None
    return seconds * NS_PER_S + int((fraction + "000000000")[:9])


def _ns_literal(ts: int) -> str:
    return sql_literal(datetime.fromtimestamp(ts // NS_PER_S, tz=timezone.utc))


def to_decimal(value: Any) -> Decimal | None:
    """A QuestDB JSON value as a Decimal: DECIMAL columns come as strings (exact),
    DOUBLE as JSON numbers (read through their shortest repr)."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ReadThroughError(f"not a number: {value!r}")
    if isinstance(value, float):
        value = repr(value)
    try:
        return plain(Decimal(value))
    except ArithmeticError:
        raise ReadThroughError(f"not a number: {value!r}") from None


class QuestDBReadThrough:
    """The queries a miss of bars or quotes runs. Bars of the intervals built from
    trades are aggregated from `market_trades` (the same buckets the windows make);
    other intervals come from `bars`. (Positions come from ptrc: `PublishedPositions`.)"""

    def __init__(self, client: QuestDBClient, tables: ReadThroughTables, *, built_intervals: Sequence[str]):
        self.client = client
        self.tables = tables
        self.built_intervals = frozenset(built_intervals)
        self.skipped_rows = 0

    async def _query(self, sql: str) -> list[dict[str, Any]]:
        try:
            return (await self.client.query(sql)).dicts()
        except QuestDBUnavailableError:
            raise
        except QuestDBError as exc:
            if "does not exist" in exc.message:
                raise TableMissing(exc.message) from None
            raise

    # Turning rows into events is the CPU-heavy part of a miss (hundreds of Decimals and
    # validations): it runs in a thread so that the event loop keeps answering hits.

    async def bars(self, symbol: str, interval: str, count: int) -> list[Bar]:
        """Up to `count` newest bars, oldest first."""
        if interval in self.built_intervals:
            return await self._bars_from_trades(symbol, interval, count)
        table = self.tables.bars
        rows = await self._query(
            f'SELECT * FROM {table} WHERE "symbol" = {sql_literal(symbol)} AND "interval" = {sql_literal(interval)} '
            f"ORDER BY ts DESC LIMIT {int(count)}"
        )
        bars, skipped = await asyncio.to_thread(self._stored_bars, table, symbol, interval, rows[::-1])
        self.skipped_rows += skipped
        return bars

    @staticmethod
    def _stored_bars(table: str, symbol: str, interval: str, rows: list[dict]) -> tuple[list[Bar], int]:
        bars, skipped = [], 0
        for row in rows:
            try:
                bars.append(
                    Bar(
                        ts=iso_to_ns(row["ts"]),
                        symbol=symbol,
                        interval=interval,
                        open=to_decimal(row["open"]),
                        high=to_decimal(row["high"]),
                        low=to_decimal(row["low"]),
                        close=to_decimal(row["close"]),
                        volume=to_decimal(row["volume"]),
                        vwap=to_decimal(row.get("vwap")),
                        count=int(row.get("count") or 0),
                    )
                )
            except (KeyError, TypeError, ValueError, ArithmeticError, ReadThroughError) as exc:
                skipped += 1
                log.warning("skipping a row of %s that is not a bar: %s (%s)", table, row, exc)
        return bars, skipped

    async def _bars_from_trades(self, symbol: str, interval: str, count: int) -> list[Bar]:
        table = self.tables.market_trades
        where = f'"symbol" = {sql_literal(symbol)}'
        # LATEST ON reads backwards from the newest partition: no scan of the whole table.
        latest = await self._query(f'SELECT ts latest FROM {table} WHERE {where} LATEST ON ts PARTITION BY "symbol"')
        if not latest or latest[0]["latest"] is None:
            return []
        size_ns = interval_seconds(interval) * NS_PER_S
        latest_ns = iso_to_ns(latest[0]["latest"])
        first_start = latest_ns - latest_ns % size_ns - (count - 1) * size_ns
        rows = await self._query(
            'SELECT ts, first("price") open, max("price") high, min("price") low, last("price") close, '
            'sum("size") volume, sum("price" * "size") notional, count() n '
            f"FROM {table} WHERE {where} AND ts >= {_ns_literal(first_start)} "
            f"SAMPLE BY {interval} ALIGN TO CALENDAR"
        )
        bars, skipped = await asyncio.to_thread(self._aggregated_bars, table, symbol, interval, rows[-count:])
        self.skipped_rows += skipped
        return bars

    @staticmethod
    def _aggregated_bars(table: str, symbol: str, interval: str, rows: list[dict]) -> tuple[list[Bar], int]:
        bars, skipped = [], 0
        for row in rows:
            try:
                bars.append(
                    bar_from_totals(
                        ts=iso_to_ns(row["ts"]),
                        symbol=symbol,
                        interval=interval,
                        open=to_decimal(row["open"]),
                        high=to_decimal(row["high"]),
                        low=to_decimal(row["low"]),
                        close=to_decimal(row["close"]),
                        volume=to_decimal(row["volume"]),
                        notional=to_decimal(row["notional"]),
                        count=int(row["n"]),
                    )
                )
            except (KeyError, TypeError, ValueError, ArithmeticError, ReadThroughError) as exc:
                # e.g. a trade with a zero or negative price in the table
                skipped += 1
                log.warning("skipping a %s bucket of %s that is not a bar: %s (%s)", interval, table, row, exc)
        return bars, skipped

    async def quote(self, symbol: str) -> Quote | None:
        rows = await self._query(
            f'SELECT * FROM {self.tables.quotes} WHERE "symbol" = {sql_literal(symbol)} '
            'LATEST ON ts PARTITION BY "symbol"'
        )
        if not rows:
            return None
        row = rows[0]
        try:
            return Quote(
                ts=iso_to_ns(row["ts"]),
                symbol=symbol,
                bid=to_decimal(row["bid"]),
                ask=to_decimal(row["ask"]),
                bid_size=to_decimal(row.get("bid_size")) or Decimal(0),
                ask_size=to_decimal(row.get("ask_size")) or Decimal(0),
                venue=row.get("venue"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ReadThroughError(
                f"the newest row of {self.tables.quotes} for {symbol} is not a quote: {exc}"
            ) from None


# -- positions read-through: ptrc's POSITIONS stream ---------------------------------------------


#: Messages per pull of a DeliverLastPerSubject read. nats-server 2.15 drops a subject's
#: last message from such a consumer when a pull request's max_bytes cuts the batch
#: before it (a read of 50,000 positions in pulls of 50,000 missed 5, one per ~8 MB
#: pulled): pulls this small stay far below the transport's max_bytes.
LAST_PER_SUBJECT_PULL = 1000


async def last_per_subject(transport: Transport, spec: ConsumerSpec, timeout_s: float) -> list[Delivery]:
    """The messages an ephemeral consumer of `spec` (DeliverLastPerSubject) has pending
    when it is created: the last message of each subject its filter matches."""
    consumer = await transport.open_consumer(spec)
    try:
        expected = await consumer.pending()
        deliveries: list[Delivery] = []
        while len(deliveries) < expected:
            want = min(expected - len(deliveries), LAST_PER_SUBJECT_PULL)
            batch = await consumer.next_batch(want, timeout_s)
            if not batch:
                raise TimeoutError(f"{len(deliveries)} of {expected} messages within {timeout_s} s")
            deliveries += batch
            # Acknowledged as they come: more subjects than the consumer's
            # max_ack_pending would otherwise stall the delivery.
            await consumer.ack_through(batch[-1])
        return deliveries
    finally:
        await consumer.close()


class PositionsUnavailable(RuntimeError):
    """The POSITIONS stream could not be read (NATS unreachable, or no answer in time)."""


class PositionsUnusable(RuntimeError):
    """The POSITIONS stream holds a message on the account's subjects that is not a
    PositionUpdate of that account: its symbol's position is unknown."""


class PublishedPositions:
    """A positions miss: the account's positions exactly as ptrc last published them.

    ptrc publishes every change of a position on `<prefix>.<account>.<symbol>` (stream
    POSITIONS, kept forever), so the last message of each of the account's subjects *is*
    its current position: hot_cache never computes one itself (a second computation
    would disagree with ptrc's multipliers, amendments and marks). One ephemeral
    consumer per miss, filtered on `<prefix>.<account>.>` and starting at the last
    message per subject (JetStream's DeliverLastPerSubject), lets the server pick those
    messages in one step. Its pending count, asked before the first pull, is how many
    to wait for; an update published meanwhile may come along and is kept only if its
    revision is higher.
    """

    def __init__(self, transport: Transport, channel: Channel, *, timeout_s: float):
        patterns = channel.subjects or channel.stream.subjects
        if len(patterns) != 1 or not patterns[0].endswith(".>"):
            raise ValueError(f"the positions channel needs one subject pattern `<prefix>.>`, got {list(patterns)}")
        self.transport = transport
        self.stream = channel.stream.name
        self._prefix = patterns[0][:-1]  # `posttrade.positions.`: the account token follows
        self.timeout_s = timeout_s

    def account_subjects(self, account: str) -> str:
        return f"{self._prefix}{subject_token(account)}.>"

    async def positions(self, account: str) -> list[PositionUpdate]:
        """The account's positions (one per symbol, canonical Decimals); [] when ptrc
        has published none. Raises PositionsUnavailable or PositionsUnusable."""
        spec = ConsumerSpec(
            stream=self.stream,
            durable=None,
            filter_subjects=(self.account_subjects(account),),
            start=StartPosition(last_per_subject=True),
        )
        try:
            deliveries = await self._last_per_subject(spec)
        except (nats.errors.Error, OSError) as exc:  # OSError: connection errors and timeouts
            raise PositionsUnavailable(f"stream {self.stream}: {exc!r}") from exc
        # Decoding many updates is CPU work: off the event loop, which keeps answering hits.
        return await asyncio.to_thread(self._updates, account, deliveries)

    async def _last_per_subject(self, spec: ConsumerSpec) -> list[Delivery]:
        return await last_per_subject(self.transport, spec, self.timeout_s)

    async def all_positions(self) -> tuple[list[PositionUpdate], set[str], int]:
        """Every account's positions as ptrc last published them (a rebuild after Valkey
        lost them): the updates, the accounts whose every position is among them, and
        how many messages were unusable (their account is left out of the complete ones).
        Raises PositionsUnavailable."""
        spec = ConsumerSpec(
            stream=self.stream, durable=None, filter_subjects=(f"{self._prefix}>",),
            start=StartPosition(last_per_subject=True),
        )
        try:
            deliveries = await self._last_per_subject(spec)
        except (nats.errors.Error, OSError) as exc:
            raise PositionsUnavailable(f"stream {self.stream}: {exc!r}") from exc
        return await asyncio.to_thread(self._all_updates, deliveries)

    def _all_updates(self, deliveries: list[Delivery]) -> tuple[list[PositionUpdate], set[str], int]:
        updates: list[PositionUpdate] = []
        bad_tokens: set[str] = set()
        unusable = 0
        for delivery in deliveries:
            # `<prefix><account token>.<symbol token>`: the account token names the hash.
            token = delivery.subject[len(self._prefix):].split(".", 1)[0]
            try:
                update = decode(PositionUpdate, delivery.data)
            except InvalidEvent as exc:
                bad_tokens.add(token)
                unusable += 1
                log.warning("%s seq %d (%s) is not a PositionUpdate: %s", self.stream, delivery.seq,
                            delivery.subject, exc.reason)
                continue
            if subject_token(update.account) != token:
                bad_tokens.add(token)
                unusable += 1
                log.warning("%s seq %d (%s) is a position of account %r", self.stream, delivery.seq,
                            delivery.subject, update.account)
                continue
            updates.append(plain_decimals(update))
        # Updates published during the read may come along: the highest revision counts.
        updates = highest_revisions(updates)
        complete = {u.account for u in updates if subject_token(u.account) not in bad_tokens}
        return updates, complete, unusable

    def _updates(self, account: str, deliveries: list[Delivery]) -> list[PositionUpdate]:
        updates = []
        for delivery in deliveries:
            where = f"{self.stream} seq {delivery.seq} ({delivery.subject})"
            try:
                update = decode(PositionUpdate, delivery.data)
            except InvalidEvent as exc:
                # Its symbol's position would be missing from an answer marked complete: refuse.
                raise PositionsUnusable(f"{where} is not a PositionUpdate: {exc.reason}") from None
            if update.account != account:
                raise PositionsUnusable(f"{where} is a position of account {update.account!r}, not {account!r}")
            updates.append(plain_decimals(update))
        return highest_revisions(updates)


# -- the read side ------------------------------------------------------------------------------


@dataclass
class ReadCounters:
    hits: dict[str, int] = field(default_factory=lambda: {f: 0 for f in FAMILIES})
    misses: dict[str, int] = field(default_factory=lambda: {f: 0 for f in FAMILIES})
    read_through_queries: int = 0
    read_through_not_found: int = 0
    read_through_errors: int = 0
    cache_errors: int = 0


def _rate(hits: int, misses: int) -> float | None:
    total = hits + misses
    return round(hits / total, 6) if total else None


class CachedJSON(Response):
    """A JSON answer that embeds values stored in Valkey as they are (`msgspec.Raw`):
    they were stored canonically (`_stored`), so decoding and re-encoding them would
    only cost time on the hot path. Everything else is encoded like `web.server.JSON`."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return _answer_json.encode(content)


_answer_json = msgspec.json.Encoder(decimal_format="string")


def _raw(members: Sequence[bytes]) -> list[msgspec.Raw]:
    return [msgspec.Raw(m) for m in members]


class CacheWarmer:
    """Fills bars keys from QuestDB in the background when the feed first writes them.

    After a start (or a key's expiry) the feed rebuilds only the newest bars; a read of
    more bars than that would miss and wait for QuestDB. The warmer loads each new key's
    history ahead of such reads, a few keys at a time (`warm_concurrency`), sharing the
    read path's single flight, and again once a key may have expired (TTL). Its fills are
    not reads: they count neither as hits nor as misses.
    """

    def __init__(self, cache: ValkeyCache, service: HotCache, *, concurrency: int):
        self.cache = cache
        self.service = service
        self.concurrency = concurrency
        self.queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        self._offered_at: dict[tuple[str, str], float] = {}
        self._tasks: list[asyncio.Task] = []
        self.warmed = 0
        self.already_complete = 0
        self.errors = 0

    def offer(self, bars: Sequence[Bar]) -> None:
        now = time.monotonic()
        for bar in bars:
            key = (bar.symbol, bar.interval)
            offered = self._offered_at.get(key)
            if offered is None or now - offered > self.cache.ttl_s:
                self._offered_at[key] = now
                self.queue.put_nowait(key)

    def offer_again(self) -> int:
        """Queue every key offered so far once more (Valkey lost them); returns how many."""
        now = time.monotonic()
        keys = list(self._offered_at)
        for key in keys:
            self._offered_at[key] = now
            self.queue.put_nowait(key)
        return len(keys)

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._work(), name=f"warmer:{i}") for i in range(self.concurrency)]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _work(self) -> None:
        while True:
            symbol, interval = await self.queue.get()
            try:
                if await self.cache.is_complete(symbol, interval):
                    self.already_complete += 1
                    continue
                await self.service.fill_bars(symbol, interval)
                self.warmed += 1
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a failed warm-up only means a later miss
                self.errors += 1
                log.debug("warming %s %s failed: %s", symbol, interval, exc)


class WarmingBarSink:
    """The bar agents' sink: writes to Valkey, then offers the keys to the warmer."""

    def __init__(self, cache: ValkeyCache, warmer: CacheWarmer | None):
        self.cache = cache
        self.warmer = warmer

    async def write_bars(self, bars: Sequence[Bar], newest_event_ts: int) -> None:
        await self.cache.write_bars(bars, newest_event_ts)
        if self.warmer is not None:
            self.warmer.offer(bars)


class HotCache:
    """The pages' logic: cache first, the source on a miss (QuestDB for bars and quotes,
    ptrc's POSITIONS stream for positions), fill, answer."""

    def __init__(
        self,
        app: App,
        cache: ValkeyCache,
        questdb: QuestDBReadThrough,
        published: PublishedPositions,
        section: HotCacheSection,
    ):
        self.cache = cache
        self.questdb = questdb
        self.published = published
        # Set by build() when this process consumes the feed (None on a read replica).
        self.builder: TradeBarBuilder | None = None
        self.bar_messages: BarMessageCounters | None = None
        self.section = section
        self.counters = ReadCounters()
        self.warmer: CacheWarmer | None = None
        self._in_flight: dict[tuple, asyncio.Future] = {}
        registry = app.metrics.registry
        self._reads = Counter(
            "hot_cache_reads_total", "Reads by key family and result", ["family", "result"], registry=registry
        )
        self._read_through_seconds = Histogram(
            "hot_cache_read_through_seconds",
            "Time to answer a miss from its source, QuestDB or the POSITIONS stream (read and cache fill)",
            ["family"],
            registry=registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )

    # -- accounting -----------------------------------------------------------------------

    def _hit(self, family: str) -> None:
        self.counters.hits[family] += 1
        self._reads.labels(family, "hit").inc()

    def _miss(self, family: str) -> None:
        self.counters.misses[family] += 1
        self._reads.labels(family, "miss").inc()

    async def _read_through(self, family: str, key: tuple, load: Callable[[], Awaitable[Any]]) -> Any:
        """Run `load` (source read + cache fill) once for concurrent misses of one key,
        mapping the source's failures to HTTP errors."""
        future = self._in_flight.get(key)
        if future is None:
            future = asyncio.ensure_future(self._load(family, load))
            self._in_flight[key] = future
            future.add_done_callback(lambda _: self._in_flight.pop(key, None))
        return await asyncio.shield(future)

    async def _load(self, family: str, load: Callable[[], Awaitable[Any]]) -> Any:
        self.counters.read_through_queries += 1
        started = time.perf_counter()
        try:
            return await load()
        except TableMissing as exc:
            self.counters.read_through_not_found += 1
            raise HTTPException(404, detail={"error": "not in QuestDB yet", "questdb": str(exc)}) from None
        except QuestDBUnavailableError as exc:
            self.counters.read_through_errors += 1
            raise HTTPException(503, detail={"error": "QuestDB unavailable", "questdb": str(exc)}) from None
        except (QuestDBError, ReadThroughError) as exc:
            self.counters.read_through_errors += 1
            raise HTTPException(502, detail={"error": "QuestDB answer unusable", "questdb": str(exc)}) from None
        except PositionsUnavailable as exc:
            self.counters.read_through_errors += 1
            raise HTTPException(503, detail={"error": "POSITIONS stream unavailable", "stream": str(exc)}) from None
        except PositionsUnusable as exc:
            self.counters.read_through_errors += 1
            raise HTTPException(502, detail={"error": "POSITIONS stream answer unusable", "stream": str(exc)}) from None
        finally:
            self._read_through_seconds.labels(family).observe(time.perf_counter() - started)

    # -- bars -----------------------------------------------------------------------------------

    async def bars(self, symbol: str, interval: str, limit: int, *, counted: bool = True) -> dict[str, Any]:
        """The answer of /bars. `counted=False` only for the dashboard's own reads
        (`/dashboard/bars`): the hit rate is the desk's, a page looking must not move it."""
        answer = {"symbol": symbol, "interval": interval}
        try:
            members, answered = await self.cache.read_bars(symbol, interval, limit)
        except SinkUnavailable:
            self.counters.cache_errors += 1
            members, answered = None, False
        if answered:
            if counted:
                self._hit("bars")
            return {**answer, "hit": True, "source": "cache", "bars": _raw(members[::-1])}
        if counted:
            self._miss("bars")
        cache_up = members is not None
        try:
            bars = await self.fill_bars(symbol, interval, cache_up=cache_up)
        except HTTPException as exc:
            if not members:
                raise
            # QuestDB cannot add to what the cache holds: serve that, and say so.
            return {**answer, "hit": False, "source": "cache", "complete": False, "read_through_error": exc.detail,
                    "bars": _raw(members[::-1])}
        if cache_up and bars:
            try:
                members, _ = await self.cache.read_bars(symbol, interval, limit)
                return {**answer, "hit": False, "source": "questdb", "bars": _raw(members[::-1])}
            except SinkUnavailable:
                self.counters.cache_errors += 1
        if not bars:
            if members:
                return {**answer, "hit": False, "source": "cache", "complete": False, "bars": _raw(members[::-1])}
            self.counters.read_through_not_found += 1
            raise HTTPException(404, detail={"error": "no bars", "symbol": symbol, "interval": interval})
        return {**answer, "hit": False, "source": "questdb", "bars": bars[-limit:]}

    async def fill_bars(self, symbol: str, interval: str, *, cache_up: bool = True) -> list[Bar]:
        """Read the newest `bars_kept` bars from QuestDB and add them to the key (once for
        concurrent callers); returns them, oldest first. Raises HTTPException."""

        async def load() -> list[Bar]:
            bars = await self.questdb.bars(symbol, interval, self.section.bars_kept)
            if bars and cache_up:
                try:
                    await self.cache.fill_bars(symbol, interval, bars)
                except SinkUnavailable:
                    self.counters.cache_errors += 1
            return bars

        return await self._read_through("bars", ("bars", symbol, interval), load)

    # -- quotes ---------------------------------------------------------------------------------

    async def quote(self, symbol: str) -> dict[str, Any]:
        try:
            raw = await self.cache.read_quote(symbol)
            cache_up = True
        except SinkUnavailable:
            self.counters.cache_errors += 1
            raw, cache_up = None, False
        if raw is not None:
            self._hit("quotes")
            return {"symbol": symbol, "hit": True, "source": "cache", "quote": msgspec.Raw(raw)}
        self._miss("quotes")

        async def load() -> Quote | None:
            quote = await self.questdb.quote(symbol)
            if quote is not None and cache_up:
                try:
                    await self.cache.fill_quote(quote)
                except SinkUnavailable:
                    self.counters.cache_errors += 1
            return quote

        quote = await self._read_through("quotes", ("quotes", symbol), load)
        if quote is None:
            self.counters.read_through_not_found += 1
            raise HTTPException(404, detail={"error": "no quote", "symbol": symbol})
        return {"symbol": symbol, "hit": False, "source": "questdb", "quote": quote}

    # -- positions --------------------------------------------------------------------------------

    async def positions(self, account: str) -> dict[str, Any]:
        try:
            fields, complete = await self.cache.read_positions(account)
        except SinkUnavailable:
            self.counters.cache_errors += 1
            fields, complete = None, False
        if complete:
            self._hit("positions")
            return {"account": account, "hit": True, "source": "cache", "positions": self._sorted(fields)}
        self._miss("positions")
        cache_up = fields is not None

        async def load() -> list[PositionUpdate]:
            updates = await self.published.positions(account)
            if cache_up and (updates or fields):
                try:
                    await self.cache.fill_positions(account, updates)
                except SinkUnavailable:
                    self.counters.cache_errors += 1
            return updates

        try:
            updates = await self._read_through("positions", ("positions", account), load)
        except HTTPException as exc:
            if not fields:
                raise
            return {"account": account, "hit": False, "source": "cache", "complete": False,
                    "read_through_error": exc.detail, "positions": self._sorted(fields)}
        if cache_up and (updates or fields):
            # Read back: where the live feed wrote a higher revision meanwhile, that one
            # is the position, not the stream's older message.
            try:
                fields, _ = await self.cache.read_positions(account)
                return {"account": account, "hit": False, "source": "stream", "positions": self._sorted(fields)}
            except SinkUnavailable:
                self.counters.cache_errors += 1
        if not updates:
            self.counters.read_through_not_found += 1
            raise HTTPException(404, detail={"error": "no positions", "account": account})
        return {"account": account, "hit": False, "source": "stream",
                "positions": sorted(updates, key=lambda u: u.symbol)}

    @staticmethod
    def _sorted(fields: dict[bytes, bytes]) -> list[msgspec.Raw]:
        return [msgspec.Raw(fields[symbol]) for symbol in sorted(fields)]

    # -- stats -----------------------------------------------------------------------------------

    async def stats(self) -> dict[str, Any]:
        """What /cache/stats answers. Reads are this process's; keys, memory, evictions
        and freshness are Valkey's, so they cover every hot_cache process sharing it."""
        c = self.counters
        hits, misses = sum(c.hits.values()), sum(c.misses.values())
        families: dict[str, dict[str, Any]] = {
            family: {
                "hits": c.hits[family],
                "misses": c.misses[family],
                "hit_rate": _rate(c.hits[family], c.misses[family]),
                "writes": self.cache.writes[family],
            }
            for family in FAMILIES
        }
        body: dict[str, Any] = {
            "hits": hits,
            "misses": misses,
            "hit_rate": _rate(hits, misses),
            "freshness_lag_s": None,
            "families": families,
            "read_through": {
                "queries": c.read_through_queries,
                "not_found": c.read_through_not_found,
                "errors": c.read_through_errors,
                "skipped_rows": self.questdb.skipped_rows,
            },
            "cache_errors": c.cache_errors,
            "write_pipelines": self.cache.pipelines,
            "ttl_s": self.cache.ttl_s,
            "bars_kept": self.cache.bars_kept,
        }
        if self.warmer is not None:
            body["warmer"] = {
                "queued": self.warmer.queue.qsize(),
                "warmed": self.warmer.warmed,
                "already_complete": self.warmer.already_complete,
                "errors": self.warmer.errors,
            }
        if self.builder is not None:
            body["bars"] = {
                "built_intervals": list(self.builder.intervals),
                "trades_folded": self.builder.trades_folded,
                "late_trades": self.builder.late_trades(),
                "windows_open": sum(len(t) for t in self.builder.windows.values()),
                "windows_closed": self.builder.windows_closed,
                "bar_messages_written": self.bar_messages.written,
                "bar_messages_skipped_built_interval": self.bar_messages.skipped_built_interval,
                "bar_messages_dead_lettered": self.bar_messages.dead_lettered,
            }
        try:
            server = await self.cache.server_stats()
            keys = await self.cache.count_keys()
        except SinkUnavailable as exc:
            body["valkey"] = {"ok": False, "error": str(exc)}
            return body
        now = time.time_ns()
        newest = server.pop("newest_event_ts")
        for family in FAMILIES:
            ts = newest.get(family)
            families[family]["keys"] = keys[family]
            families[family]["newest_event_ts"] = ts
            families[family]["freshness_lag_s"] = round((now - ts) / NS_PER_S, 3) if ts else None
        if newest:
            body["freshness_lag_s"] = round((now - max(newest.values())) / NS_PER_S, 3)
        body["keys"] = sum(keys.values())
        body.update(server)
        body["valkey"] = {"ok": True, "location": self.cache.store.location}
        return body


# -- the page's figures over time ------------------------------------------------------------------


class StatsSampler:
    """One sample of what the page draws over time (a `History` ring, `/dashboard/history`):
    the hit rate since the start (as /cache/stats) and over the last interval, reads per
    second, the freshness lag per family and overall, Valkey's memory.

    Cheap, since it runs every few seconds whether a page is open or not: the counters
    are in memory and Valkey is asked once (the pipeline of INFO and the newest-event
    set /cache/stats also reads), never the SCAN of the keys (/cache/stats, polled by an
    open page, gives those). Valkey away: the counters alone (the lag is a gap)."""

    def __init__(self, service: HotCache, *, clock: Callable[[], float] = time.monotonic,
                 wall_ns: Callable[[], int] = time.time_ns):
        self.service = service
        self.clock, self.wall_ns = clock, wall_ns
        self._last: tuple[float, int, int] | None = None  # (clock time, hits, misses)

    async def __call__(self) -> dict[str, float | None]:
        counters = self.service.counters
        hits, misses = sum(counters.hits.values()), sum(counters.misses.values())
        now = self.clock()
        sample: dict[str, float | None] = {"hit_rate": _rate(hits, misses)}
        if self._last is not None:
            then, hits_then, misses_then = self._last
            recent_hits, recent_misses = hits - hits_then, misses - misses_then
            sample["hit_rate_recent"] = _rate(recent_hits, recent_misses)
            sample["reads_per_s"] = round((recent_hits + recent_misses) / (now - then), 3) if now > then else None
        self._last = (now, hits, misses)
        try:
            server = await self.service.cache.server_stats()
        except SinkUnavailable:
            return sample
        now_ns = self.wall_ns()
        newest = server["newest_event_ts"]
        for family in FAMILIES:
            ts = newest.get(family)
            sample[f"lag.{family}"] = round((now_ns - ts) / NS_PER_S, 3) if ts else None
        sample["lag"] = round((now_ns - max(newest.values())) / NS_PER_S, 3) if newest else None
        sample["memory_bytes"] = server["memory"]["used_bytes"]
        return sample


# -- Valkey lost the keys: the rebuild -----------------------------------------------------------


class CacheRebuilder:
    """Rebuilds at once what the feed's process keeps in Valkey when Valkey has lost it.

    `watch` (`stores.valkey.ValkeyWatch`) looks every `check_s`, and at every /health,
    whether Valkey was restarted (its run_id changed) or emptied (the sentinel key is
    gone). After a loss the keys are rebuilt from what hot_cache can read again:

    * **positions**: the last message of every subject of the POSITIONS stream, i.e.
      ptrc's latest update of every position of every account (one ephemeral consumer,
      DeliverLastPerSubject, as a positions miss reads one account); each account's hash
      is marked complete once all its symbols are in, so reads of quiet accounts are
      hits again at once;
    * **quotes**: the last message of every subject of the QUOTES stream, the last quote
      of every symbol;
    * **bars**: the bars still forming (the open windows of the built intervals, from the
      windowed tables). The closed bars of every bars key this process has written are
      queued for the warmer, which fills them from QuestDB in the background (with
      `warm_concurrency: 0` they come back through the read-through on a miss).

    The writes go through the same compare-and-set scripts as the live feed's, so a
    value the feed wrote meanwhile is never replaced by an older one. Until positions,
    quotes and open bars are written, `rebuilding` is the loss (/health: degraded, with
    the reason); a rebuild that fails (Valkey or NATS away) is retried with back-off.
    """

    BACKOFF_S = (0.5, 1, 2, 5, 10)

    def __init__(
        self,
        cache: ValkeyCache,
        service: HotCache,
        published: PublishedPositions,
        quotes: Channel,
        watch: ValkeyWatch,
        *,
        check_s: float,
        timeout_s: float,
    ):
        self.cache = cache
        self.service = service
        self.published = published
        self.quotes = quotes
        self.watch = watch
        self.check_s = check_s
        self.timeout_s = timeout_s
        self.progress: dict[str, Any] = {}  # of the rebuild under way
        self.last_rebuild: dict[str, Any] | None = None
        self.last_error: str | None = None
        self.check_error: str | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    @property
    def rebuilding(self) -> ValkeyLoss | None:
        return self.watch.lost

    async def start(self) -> None:
        # The first look at once, in the background: a start does not wait for a rebuild
        # (it can take seconds: the whole POSITIONS stream is read).
        self._task = asyncio.create_task(self._run(), name="hot_cache:rebuild")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def check(self) -> ValkeyLoss | None:
        """Look whether Valkey lost the keys; a loss starts the rebuild. Valkey
        unreachable: nothing to decide yet (look again later)."""
        try:
            loss = await self.watch.check()
        except _TRANSIENT + (ResponseError,) as exc:
            self.check_error = f"{type(exc).__name__}: {exc}"
            return None
        self.check_error = None
        if loss is not None:
            log.warning("hot_cache: Valkey lost the keys (%s: %s); rebuilding them", loss.reason, loss.detail)
            self._wake.set()
        return loss

    async def _run(self) -> None:
        attempt = 0
        delay = 0.0  # the first look at once
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), delay)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            await self.check()
            loss = self.watch.lost
            if loss is None:
                delay = self.check_s
                continue
            try:
                await self.rebuild(loss)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - Valkey or NATS away: again, later
                self.last_error = f"{type(exc).__name__}: {exc}"
                delay = self.BACKOFF_S[min(attempt, len(self.BACKOFF_S) - 1)]
                attempt += 1
                log.warning("hot_cache: rebuilding Valkey failed (attempt %d), again in %.1fs: %s", attempt, delay,
                            self.last_error)
                continue
            attempt = 0
            self.last_error = None
            delay = 0.0 if self.watch.lost is not None else self.check_s  # lost again meanwhile: at once

    async def rebuild(self, loss: ValkeyLoss) -> dict[str, Any]:
        """Write positions, quotes and the open bars again (see the class); returns what
        was written."""
        progress = self.progress = {"step": "positions"}
        updates, complete, skipped = await self.published.all_positions()
        await self.cache.restore_positions(updates, sorted(complete))
        progress.update(step="quotes", positions=len(updates), accounts=len(complete), unusable_messages=skipped)
        quotes = await self._last_quotes()
        await self.cache.restore_quotes(quotes)
        progress.update(step="bars", quotes=len(quotes))
        bars = self._open_bars()
        await self.cache.restore_bars(bars)
        progress.update(step="done", open_bars=len(bars))
        warmer = self.service.warmer
        progress["bars_keys_to_warm"] = warmer.offer_again() if warmer is not None else 0
        if self.watch.rebuilt(loss):  # else lost again meanwhile: the next rebuild is due
            seconds = round(time.time() - loss.noticed_at, 3)  # from noticing, as pnl's
            self.last_rebuild = {"reason": loss.reason, "noticed_at": loss.noticed_at, "seconds": seconds,
                                 **{k: v for k, v in progress.items() if k != "step"}}
            log.warning("hot_cache: Valkey rebuilt in %.3f s: %s", seconds, self.last_rebuild)
        return progress

    async def _last_quotes(self) -> list[Quote]:
        spec = ConsumerSpec(
            stream=self.quotes.stream.name, durable=None,
            filter_subjects=tuple(self.quotes.subjects or self.quotes.stream.subjects),
            start=StartPosition(last_per_subject=True),
        )
        deliveries = await last_per_subject(self.published.transport, spec, self.timeout_s)
        return await asyncio.to_thread(_newest_quotes, deliveries)

    def _open_bars(self) -> list[Bar]:
        builder = self.service.builder
        if builder is None:
            return []
        bars = []
        for interval, windows in builder.windows.items():
            for (symbol, start), state in list(windows.table.items()):
                if state.count:
                    bars.append(state.to_bar(symbol, interval, start))
        return bars


def _newest_quotes(deliveries: Sequence[Delivery]) -> list[Quote]:
    """The newest quote per symbol among the messages (undecodable ones are skipped)."""
    newest: dict[str, Quote] = {}
    for delivery in deliveries:
        try:
            quote = decode(Quote, delivery.data)
        except InvalidEvent:
            continue
        held = newest.get(quote.symbol)
        if held is None or quote.ts >= held.ts:
            newest[quote.symbol] = quote
    return [plain_decimals(quote) for quote in newest.values()]


# -- agents for quotes and positions -----------------------------------------------------------


def add_quote_agent(app: App, quotes: Channel, cache: ValkeyCache, *, max_events: int, within_s: float) -> None:
    @app.agent(quotes, name="take_quotes")
    async def take_quotes(stream: Stream) -> None:
        async for batch in stream.take(max_events, within_s):
            newest: dict[str, Quote] = {}
            for quote in batch:
                held = newest.get(quote.symbol)
                if held is None or quote.ts >= held.ts:
                    newest[quote.symbol] = quote
            latest = [plain_decimals(quote) for quote in newest.values()]
            await write_until_done(stream, lambda: cache.write_quotes(latest), what="quotes")


def add_position_agent(app: App, positions: Channel, cache: ValkeyCache, *, max_events: int, within_s: float) -> None:
    @app.agent(positions, name="take_positions")
    async def take_positions(stream: Stream) -> None:
        async for batch in stream.take(max_events, within_s):
            latest = [plain_decimals(update) for update in highest_revisions(batch)]
            await write_until_done(stream, lambda: cache.write_positions(latest), what="positions")


# -- assembly ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HotCacheChannels:
    trades: Channel
    bars: Channel
    quotes: Channel
    positions: Channel


def bus_channels(app: App) -> HotCacheChannels:
    """The platform's streams (posttrade.streams.subjects)."""
    return HotCacheChannels(
        trades=subjects.market_trades(app),
        bars=subjects.bars(app),
        quotes=subjects.quotes(app),
        positions=subjects.positions(app),
    )


def _name(request: Request, parameter: str) -> str:
    """A symbol or account in the path (web/params.py `Name`)."""
    return path_name(request, parameter)


def build(config: HotCacheConfig, *, channels: Callable[[App], HotCacheChannels] = bus_channels) -> App:
    """The hot_cache App. `channels` picks the streams (tests use uniquely named ones)."""
    section = config.hot_cache
    app = new_app(config)
    redis_config = config.cache.redis or RedisSection()
    store = open_valkey(
        host=redis_config.host,
        port=redis_config.port,
        db=redis_config.db,
        username=redis_config.username,
        password=redis_config.password,
        ssl=redis_config.ssl,
        client_name=f"posttrade-{config.service.name}",
    )
    cache = ValkeyCache(store, CacheKeys(section.key_prefix), ttl_s=redis_config.ttl, bars_kept=section.bars_kept)
    questdb_config = config.databases.questdb or QuestDBSection()
    questdb_client = QuestDBClient(
        host=questdb_config.host,
        port=questdb_config.port,
        username=questdb_config.user,
        password=questdb_config.password,
        tls=questdb_config.tls,
        timeout=section.read_through.timeout_s,
    )
    read_through = QuestDBReadThrough(
        questdb_client, section.read_through.tables, built_intervals=section.bar_intervals
    )
    # Declared on a read replica too: its positions misses read the POSITIONS stream.
    streams = channels(app)
    published = PublishedPositions(app.transport, streams.positions, timeout_s=section.read_through.timeout_s)

    builder: TradeBarBuilder | None = None
    bar_messages: BarMessageCounters | None = None
    service = HotCache(app, cache, read_through, published, section)
    app.hot_cache = service  # type: ignore[attr-defined]  # for tests and benchmarks
    if section.consume:
        if section.warm_concurrency:
            service.warmer = CacheWarmer(cache, service, concurrency=section.warm_concurrency)
            app.on_startup.append(service.warmer.start)
            app.on_shutdown.append(service.warmer.stop)
        bar_sink = WarmingBarSink(cache, service.warmer)
        batching = {"max_events": section.write_batch, "within_s": section.write_within_s}
        builder = TradeBarBuilder(app, section.bar_intervals, grace_s=section.grace_s)
        add_trade_bar_agent(app, streams.trades, builder, bar_sink, **batching)
        bar_messages = add_bar_message_agent(
            app, streams.bars, bar_sink, built_intervals=section.bar_intervals, **batching
        )
        add_quote_agent(app, streams.quotes, cache, **batching)
        add_position_agent(app, streams.positions, cache, **batching)
    service.builder, service.bar_messages = builder, bar_messages
    # The feed's process rebuilds Valkey when it lost the keys (a read replica holds
    # nothing of its own to rebuild from).
    rebuilder: CacheRebuilder | None = None
    if section.consume:
        rebuilder = CacheRebuilder(
            cache, service, published, streams.quotes,
            ValkeyWatch(store, cache.keys.sentinel(config.service.name)),
            check_s=section.valkey_check_s, timeout_s=section.read_through.timeout_s,
        )
        app.hot_cache_rebuilder = rebuilder  # type: ignore[attr-defined]  # for tests and benchmarks
        app.on_startup.append(rebuilder.start)
        app.on_shutdown.append(rebuilder.stop)

    @app.page("/bars/{symbol:path}")
    async def get_bars(request: Request) -> CachedJSON:
        """The newest bars of a symbol and interval: Valkey, or QuestDB on a miss.

        ---
        path:
          symbol: {$ref: Name, description: the symbol}
        query:
          interval: {$ref: Interval, description: "bar interval; default `hot_cache.default_bar_interval`"}
          limit: {type: integer, minimum: 1, maximum: BARS_KEPT, description: "bars to return, newest last; at most `hot_cache.bars_kept` (BARS_KEPT); default `hot_cache.default_bar_limit`"}
        responses:
          200: {description: "the bars, with `hit` (answered from Valkey alone) and `source` (cache or questdb)", schema: {type: object}}
          404: nothing in Valkey nor QuestDB
          502: "QuestDB's answer cannot be used"
          503: QuestDB is needed for a miss and cannot be reached
        """
        return CachedJSON(await service.bars(*bars_query(request)))

    # The documented maximum is this service's configured one.
    get_bars.__doc__ = (get_bars.__doc__ or "").replace("BARS_KEPT", str(section.bars_kept))

    def bars_query(request: Request) -> tuple[str, str, int]:
        """(symbol, interval, limit) of a bars read, or the 400 of /bars."""
        symbol = _name(request, "symbol")
        interval = check_interval("interval", request.query_params.get("interval", section.default_bar_interval))
        try:
            interval_seconds(interval)
        except ValueError as exc:
            raise BadRequest({"parameter": "interval", "error": str(exc)}) from None
        limit = query_int(request, "limit", section.default_bar_limit, minimum=1, maximum=section.bars_kept)
        return symbol, interval, limit

    # -- the page's own reads (undocumented; web/dashboard). A separate path, not a flag
    # on /bars: an API client cannot skip the count by accident (a header or a parameter
    # copied along would silently take its reads out of the hit rate), and the path says
    # in every access log which reads were the page's.

    @app.page("/dashboard/bars/{symbol:path}", documented=False)
    async def dashboard_bars(request: Request) -> CachedJSON:
        # /bars exactly (answer, errors, read-through and fill), not counted as a hit or
        # a miss: a page looking at the cache must not move the desk's hit rate.
        return CachedJSON(await service.bars(*bars_query(request), counted=False))

    @app.page("/dashboard/symbols", documented=False)
    async def dashboard_symbols(request: Request) -> JSON:
        # The picker: symbol -> intervals of the bars keys held, and the built intervals.
        try:
            series = await cache.bar_series(DASHBOARD_SYMBOLS)
        except SinkUnavailable as exc:
            raise HTTPException(503, detail={"error": "Valkey unavailable", "valkey": str(exc)}) from None
        return JSON({"symbols": series, "limit": DASHBOARD_SYMBOLS, "built_intervals": list(section.bar_intervals),
                     "default_interval": section.default_bar_interval, "default_limit": section.default_bar_limit,
                     "bars_kept": section.bars_kept})

    # The page's charts over time: the last hour at one sample per 2 s (1,800 samples of
    # nine figures, a few hundred KB at most).
    History(StatsSampler(service)).serve(app, "/dashboard/history", public=True)

    @app.page("/quotes/{symbol:path}")
    async def get_quote(request: Request) -> CachedJSON:
        """The last quote of a symbol: Valkey, or QuestDB on a miss.

        ---
        path:
          symbol: {$ref: Name, description: the symbol}
        responses:
          200: {description: "`symbol`, `quote`, with `hit` and `source`", schema: {type: object}}
          404: nothing in Valkey nor QuestDB
          502: "QuestDB's answer cannot be used"
          503: QuestDB is needed for a miss and cannot be reached
        """
        return CachedJSON(await service.quote(_name(request, "symbol")))

    @app.page("/positions/{account:path}")
    async def get_positions(request: Request) -> CachedJSON:
        """The current positions of an account as ptrc published them: Valkey, or on a miss
        the last message of each of the account's subjects in the POSITIONS stream.

        ---
        path:
          account: {$ref: Name, description: the account}
        responses:
          200: {description: "`account`, `positions` (ptrc's PositionUpdates) sorted by symbol, with `hit` and `source` (cache or stream)", schema: {type: object}}
          404: nothing in Valkey nor in the POSITIONS stream
          502: "a message on the account's subjects is not a PositionUpdate of that account"
          503: the POSITIONS stream is needed for a miss and cannot be read
        """
        return CachedJSON(await service.positions(_name(request, "account")))

    @app.page("/cache/stats", public=True)  # counters, no account data
    async def cache_stats(request: Request) -> JSON:
        """Hits, misses, hit rate, key count, memory and freshness lag of the cache.

        ---
        responses:
          200: {description: the statistics, schema: {type: object}}
        """
        return JSON(await service.stats())

    @app.health_check("valkey")
    async def valkey_check() -> tuple[bool | str, Any]:
        try:
            await store.ping()
        except Exception as exc:  # noqa: BLE001 - any failure means not healthy
            return False, str(exc)
        if rebuilder is None:
            return True, store.location
        # Look now too: a Valkey back empty is said at once, not a check interval later.
        await rebuilder.check()
        detail: dict[str, Any] = {"location": store.location}
        if rebuilder.last_rebuild is not None:
            detail["last_rebuild"] = rebuilder.last_rebuild
        loss = rebuilder.rebuilding
        if loss is not None:
            detail["rebuilding"] = {**loss.describe(), "progress": rebuilder.progress}
            if rebuilder.last_error:
                detail["rebuilding"]["last_error"] = rebuilder.last_error
            return DEGRADED, detail
        return True, detail

    @app.health_check("questdb")
    async def questdb_check() -> tuple[bool, Any]:
        try:
            await questdb_client.ping()
            return True, questdb_client.base_url
        except Exception as exc:  # noqa: BLE001
            return False, str(exc)

    async def close_clients() -> None:
        await store.close()
        await questdb_client.close()

    app.on_shutdown.append(close_clients)
    return app
