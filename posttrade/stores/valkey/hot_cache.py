"""hot_cache's Valkey: the key scheme, the Lua scripts, the cache's reads and writes
(`ValkeyCache`), and the sinks every write of the feed and of a rebuild goes through.

Key scheme (`P` is `hot_cache.key_prefix`, default `pt`; every key but the meta keys
has the TTL `cache.redis.ttl`, renewed by each write):

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
|                              |            | keys, and the cache is rebuilt                   |

Writes are whole values (never increments) made by Lua scripts that take a whole batch
(one call per 1,000 items), queued on one pipeline (one round trip). A quote is replaced
only by a quote of a later event time `ts`. A position is replaced only by an update of
a higher `revision`: ptrc counts each key's updates, and a late fill's update carries an
*older* `ts` than the update it supersedes, so event time cannot order positions. A
replay, a resend or a late read-through therefore never moves a value back.

The feed's writes and a rebuild's are `posttrade.sinks.Sink`s (`ValkeyBarsSink`,
`ValkeyQuotesSink`, `ValkeyPositionsSink`, `ValkeyRestoreSink`): retried under the
service's policy while Valkey is away (or out of memory), refused (`SinkRefused`) when
Valkey rejects the command itself. A read-through's fill is a direct `ValkeyCache` call:
the read is answered from its source whether or not the fill lands.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec
from redis.exceptions import NoScriptError, ResponseError

from ...core.bars import interval_seconds
from ...sinks import RetryPolicy, Sink, SinkRefused, SinkUnavailable
from ...streams.events import Bar, PositionUpdate, Quote, encode
from . import VALKEY_AWAY, ValkeyStore

FAMILIES = ("bars", "quotes", "positions")
# The marker member / field of a key filled from its source (QuestDB, or for positions
# the POSITIONS stream): the key holds everything there is.
COMPLETE = b"#complete"

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


_json = msgspec.json.Encoder()


class ValkeyCache:
    """The hot cache's reads and writes in Valkey. Every method raises SinkUnavailable
    when Valkey cannot be reached (or refuses writes for lack of memory), and redis'
    ResponseError when it refuses the command itself."""

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
            except VALKEY_AWAY as exc:
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
        except VALKEY_AWAY as exc:
            raise SinkUnavailable(f"Valkey at {self.store.location}: {exc}") from exc

    async def _call(self, command: Callable[[], Awaitable[Any]]) -> Any:
        try:
            return await command()
        except VALKEY_AWAY as exc:
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

    # -- rebuilding after Valkey lost the keys (ValkeyRestoreSink) ----------------------------

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


# -- the sinks ----------------------------------------------------------------------------------

T = TypeVar("T")


class _CacheSink(Sink[T]):
    """Writes one kind of item to the cache, one pipeline a flush. Valkey away, loading or
    out of memory (`SinkUnavailable`): retried under the policy, nothing acknowledged
    meanwhile. Valkey rejecting the command itself (a key of another type, a script
    error): `SinkRefused`, so the agent's batch fails and, failing again, is dead-lettered."""

    def __init__(self, name: str, cache: ValkeyCache, retry: RetryPolicy | None = None):
        super().__init__(name, retry)
        self.cache = cache

    async def write(self, batch: list[T]) -> None:
        try:
            await self._write(batch)
        except ResponseError as exc:
            raise SinkRefused(f"Valkey refused the {self.name} write: {exc}") from exc

    async def _write(self, batch: list[T]) -> None:
        raise NotImplementedError


class ValkeyBarsSink(_CacheSink[Bar]):
    """Whole bars, each replacing the bar of its window (`posttrade.agents.bars.BarSink`).
    `on_written` is told the bars once Valkey has them (the warmer queues their keys)."""

    def __init__(
        self,
        name: str,
        cache: ValkeyCache,
        retry: RetryPolicy | None = None,
        *,
        on_written: Callable[[Sequence[Bar]], None] | None = None,
    ):
        super().__init__(name, cache, retry)
        self.on_written = on_written
        self.newest_event_ts = 0

    def add_bars(self, bars: Sequence[Bar], newest_event_ts: int) -> None:
        """Bars to write, and the newest input event time they include (freshness)."""
        self.extend(list(bars))
        self.newest_event_ts = max(self.newest_event_ts, newest_event_ts)

    async def _write(self, batch: list[Bar]) -> None:
        await self.cache.write_bars(batch, self.newest_event_ts)
        if self.on_written is not None:
            self.on_written(batch)


class ValkeyQuotesSink(_CacheSink[Quote]):
    """Last quotes: each replaces the stored one unless that one is newer (`ts`)."""

    async def _write(self, batch: list[Quote]) -> None:
        await self.cache.write_quotes(batch)


class ValkeyPositionsSink(_CacheSink[PositionUpdate]):
    """ptrc's position updates: each replaces its symbol's field where its revision is higher."""

    async def _write(self, batch: list[PositionUpdate]) -> None:
        await self.cache.write_positions(batch)


@dataclass
class CacheImage:
    """What a rebuild writes back after Valkey lost the keys: every published position
    (and the accounts whose every position is among them), the last quote per symbol,
    the bars still forming."""

    positions: list[PositionUpdate]
    complete_accounts: list[str]
    quotes: list[Quote]
    open_bars: list[Bar]


class ValkeyRestoreSink(_CacheSink[CacheImage]):
    """A rebuild's writes: through the same compare-and-set scripts as the feed's, so a
    value the feed wrote meanwhile is never replaced by an older one; in several
    pipelines, yielding in between, so the agents keep writing. Every write is
    idempotent: a retried flush writes the whole image again. One image is one row of
    the sink's statistics (a rebuild)."""

    async def _write(self, batch: list[CacheImage]) -> None:
        for image in batch:
            await self.cache.restore_positions(image.positions, image.complete_accounts)
            await self.cache.restore_quotes(image.quotes)
            await self.cache.restore_bars(image.open_bars)
