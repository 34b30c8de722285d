"""hot_cache's stream logic (its reads are `posttrade.web.hot_cache`).

The feed (the process with `hot_cache.consume`), four agents writing Valkey through
sinks (`posttrade.stores.valkey.hot_cache`), each flushed before its batch is
acknowledged:

* `build_bars`     market trades -> bars of `hot_cache.bar_intervals` (`posttrade.agents.bars`);
* `take_bars`      bar messages -> bars of the other intervals (`posttrade.agents.bars`);
* `take_quotes`    quotes -> the last quote per symbol;
* `take_positions` ptrc's `PositionUpdate`s -> the current positions per account.

Beside them, `CacheWarmer` fills bars keys from QuestDB when the feed first writes them,
and `CacheRebuilder` writes everything back when Valkey lost the keys (restarted,
emptied), from the POSITIONS and QUOTES streams and the open bar windows.

The reads (`posttrade.web.hot_cache.HotCacheReads`, every process): Valkey first and, on a miss, the source:
bars and quotes from QuestDB (`posttrade.stores.questdb.read_through`), positions from
ptrc's POSITIONS stream (`PublishedPositions`: the last message of each
`posttrade.positions.<account>.<symbol>` subject, ptrc's own figures, never computed
again here). The answer is stored in Valkey and served, and says whether it was a hit.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import msgspec
import nats.errors
from redis.exceptions import RedisError

from ..app import DEGRADED, App
from ..config import _Section
from ..core.bars import interval_seconds, plain_decimals
from ..sinks import SinkRefused, SinkStopping, SinkUnavailable, wait_set
from ..stores.questdb.read_through import ReadThroughTables
from ..stores.valkey import ValkeyLoss, ValkeyStore, ValkeyWatch
from ..stores.valkey.hot_cache import (
    CacheImage,
    ValkeyCache,
    ValkeyPositionsSink,
    ValkeyQuotesSink,
    ValkeyRestoreSink,
)
from ..streams.channel import Channel
from ..streams.events import Bar, InvalidEvent, PositionUpdate, Quote, decode, subject_token
from ..streams.stream import Stream
from ..streams.transport import ConsumerSpec, Delivery, StartPosition, Transport
from .bars import TradeBarBuilder, check_built_interval

if TYPE_CHECKING:
    from ..web.hot_cache import HotCacheReads

log = logging.getLogger(__name__)


# -- configuration (the service's `hot_cache:` section) -------------------------------------------


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


# -- the position and quote agents ---------------------------------------------------------------


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


def newest_quotes(quotes: Iterable[Quote]) -> list[Quote]:
    """The newest quote (`ts`) per symbol, canonical Decimals; of equal times the later one."""
    newest: dict[str, Quote] = {}
    for quote in quotes:
        held = newest.get(quote.symbol)
        if held is None or quote.ts >= held.ts:
            newest[quote.symbol] = quote
    return [plain_decimals(quote) for quote in newest.values()]


def add_quote_agent(app: App, quotes: Channel, sink: ValkeyQuotesSink, *, max_events: int, within_s: float) -> None:
    @app.agent(quotes, name="take_quotes", sinks=[sink])
    async def take_quotes(stream: Stream) -> None:
        async for batch in stream.take(max_events, within_s):
            sink.extend(newest_quotes(batch))


def add_position_agent(
    app: App, positions: Channel, sink: ValkeyPositionsSink, *, max_events: int, within_s: float
) -> None:
    @app.agent(positions, name="take_positions", sinks=[sink])
    async def take_positions(stream: Stream) -> None:
        async for batch in stream.take(max_events, within_s):
            sink.extend([plain_decimals(update) for update in highest_revisions(batch)])


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


# -- the warmer ----------------------------------------------------------------------------------


class CacheWarmer:
    """Fills bars keys from QuestDB in the background when the feed first writes them.

    After a start (or a key's expiry) the feed rebuilds only the newest bars; a read of
    more bars than that would miss and wait for QuestDB. The warmer loads each new key's
    history ahead of such reads, a few keys at a time (`warm_concurrency`), sharing the
    read path's single flight, and again once a key may have expired (TTL). Its fills are
    not reads: they count neither as hits nor as misses.
    """

    def __init__(self, cache: ValkeyCache, reads: HotCacheReads, *, concurrency: int):
        self.cache = cache
        self.reads = reads
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
                await self.reads.fill_bars(symbol, interval)
                self.warmed += 1
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a failed warm-up only means a later miss
                self.errors += 1
                log.debug("warming %s %s failed: %s", symbol, interval, exc)

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

    The writes go through `sink` (`ValkeyRestoreSink`: the same compare-and-set scripts
    as the live feed's, so a value the feed wrote meanwhile is never replaced by an older
    one). Until positions, quotes and open bars are written, `rebuilding` is the loss
    (/health: degraded, with the reason). Reading the streams and writing Valkey are each
    retried under the sink's policy while NATS or Valkey is away; a rebuild that fails
    otherwise (Valkey refusing a command) is tried again at the next look.
    """

    def __init__(
        self,
        sink: ValkeyRestoreSink,
        published: PublishedPositions,
        quotes: Channel,
        watch: ValkeyWatch,
        *,
        builder: TradeBarBuilder | None,
        warmer: CacheWarmer | None,
        check_s: float,
        timeout_s: float,
    ):
        self.sink = sink
        self.published = published
        self.quotes = quotes
        self.watch = watch
        self.builder = builder
        self.warmer = warmer
        self.check_s = check_s
        self.timeout_s = timeout_s
        self.progress: dict[str, Any] = {}  # of the rebuild under way
        self.last_rebuild: dict[str, Any] | None = None
        self.check_error: str | None = None
        self._failed: str | None = None  # why the last rebuild gave up (retried at the next look)
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    @property
    def rebuilding(self) -> ValkeyLoss | None:
        return self.watch.lost

    @property
    def last_error(self) -> str | None:
        """Why the rebuild under way is not through yet: its last failed attempt."""
        stats = self.sink.stats
        return stats.last_error if stats.failing_since is not None else self._failed

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
        except (RedisError, OSError) as exc:
            self.check_error = f"{type(exc).__name__}: {exc}"
            return None
        self.check_error = None
        if loss is not None:
            log.warning("hot_cache: Valkey lost the keys (%s: %s); rebuilding them", loss.reason, loss.detail)
            self._wake.set()
        return loss

    async def _run(self) -> None:
        delay = 0.0  # the first look at once
        while True:
            await wait_set(self._wake, delay)
            self._wake.clear()
            await self.check()
            loss = self.watch.lost
            if loss is None:
                delay = self.check_s
                continue
            try:
                await self.rebuild(loss)
            except SinkStopping:
                return
            except Exception as exc:  # noqa: BLE001 - refused by Valkey, or a bug: tried again at the next look
                self._failed = exc.reason if isinstance(exc, SinkRefused) else f"{type(exc).__name__}: {exc}"
                log.error("hot_cache: rebuilding Valkey failed; again in %.1f s: %s", self.check_s, self._failed,
                          exc_info=not isinstance(exc, SinkRefused))
                delay = self.check_s
                continue
            self._failed = None
            delay = 0.0 if self.watch.lost is not None else self.check_s  # lost again meanwhile: at once

    async def rebuild(self, loss: ValkeyLoss) -> dict[str, Any]:
        """Write positions, quotes and the open bars again (see the class); returns what
        was written."""
        progress = self.progress = {"step": "reading the streams"}
        image = await self.sink.retrying(
            lambda: self._read_streams(progress), what="reading POSITIONS and QUOTES", rows=0, counts=False
        )
        image.open_bars = self._open_bars()
        progress.update(step="writing", open_bars=len(image.open_bars))
        self.sink.discard()  # an image a stopped or refused rebuild left behind is superseded
        self.sink.add(image)
        await self.sink.flush()
        progress["step"] = "done"
        progress["bars_keys_to_warm"] = self.warmer.offer_again() if self.warmer is not None else 0
        if self.watch.rebuilt(loss):  # else lost again meanwhile: the next rebuild is due
            seconds = round(time.time() - loss.noticed_at, 3)  # from noticing, as pnl's
            self.last_rebuild = {"reason": loss.reason, "noticed_at": loss.noticed_at, "seconds": seconds,
                                 **{k: v for k, v in progress.items() if k != "step"}}
            log.warning("hot_cache: Valkey rebuilt in %.3f s: %s", seconds, self.last_rebuild)
        return progress

    async def _read_streams(self, progress: dict[str, Any]) -> CacheImage:
        """One attempt at reading what the rebuild writes; NATS away: `SinkUnavailable`."""
        try:
            updates, complete, skipped = await self.published.all_positions()
            progress.update(positions=len(updates), accounts=len(complete), unusable_messages=skipped)
            quotes = await self._last_quotes()
        except (PositionsUnavailable, nats.errors.Error, OSError) as exc:
            raise SinkUnavailable(f"reading the streams: {type(exc).__name__}: {exc}") from exc
        progress["quotes"] = len(quotes)
        return CacheImage(positions=updates, complete_accounts=sorted(complete), quotes=quotes, open_bars=[])

    async def _last_quotes(self) -> list[Quote]:
        spec = ConsumerSpec(
            stream=self.quotes.stream.name, durable=None,
            filter_subjects=tuple(self.quotes.subjects or self.quotes.stream.subjects),
            start=StartPosition(last_per_subject=True),
        )
        deliveries = await last_per_subject(self.published.transport, spec, self.timeout_s)
        return await asyncio.to_thread(_decoded_quotes, deliveries)

    def _open_bars(self) -> list[Bar]:
        if self.builder is None:
            return []
        bars = []
        for interval, windows in self.builder.windows.items():
            for (symbol, start), state in list(windows.table.items()):
                if state.count:
                    bars.append(state.to_bar(symbol, interval, start))
        return bars


async def valkey_health(store: ValkeyStore, rebuilder: CacheRebuilder | None) -> tuple[bool | str, Any]:
    """The `valkey` check of /health: unhealthy while Valkey does not answer, degraded
    while a rebuild is under way (with the loss, the progress and the last error)."""
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


def _decoded_quotes(deliveries: Sequence[Delivery]) -> list[Quote]:
    """The newest quote per symbol among the messages (undecodable ones are skipped)."""
    quotes = []
    for delivery in deliveries:
        try:
            quotes.append(decode(Quote, delivery.data))
        except InvalidEvent:
            continue
    return newest_quotes(quotes)


# -- the read side ------------------------------------------------------------------------------
