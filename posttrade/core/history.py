"""Execution histories: every position equals a fresh book over its effective history.

A real execution feed resends fills, corrects and busts executions, delivers some late,
and starts from positions already held. `ExecutionBook` takes the feed's messages in
arrival order and keeps, per (account, symbol), the **effective history**:

1. the key's openings (`exec_type` OPENING), in arrival order;
2. then its executions in `ts` order, ties broken by the arrival sequence of each
   execution's first message;

with resent `fill_id`s dropped, corrections applied (the execution keeps its place in
time, its economics replaced) and busted executions removed. At every moment the key's
position (`core.positions.Position`) equals the position a fresh `PositionBook` computes
from that history, under both methods. Only where the feed contradicts itself does
arrival order decide: the first arrival of a `fill_id` wins, and amendments apply in
arrival order.

The rules, message by message (`receive`):

- **Duplicates.** A `fill_id` the book knows is never applied again, and a message
  whose arrival sequence is not above every one received is that message again. A
  resend equal to the first arrival is counted and dropped (`duplicate`); any other
  message with a known id (other economics, time or key) is dropped as a `conflict`,
  with the version that won.
- **NEW.** Placed in time order. One later than everything of its key is applied to the
  position directly; an earlier one (a late fill) re-derives the key from its place.
- **CORRECT / BUST.** `ref_fill_id` names the original or an earlier amendment of it
  (both resolve to the original). A CORRECT replaces side, qty, price and fee (order,
  venue and liquidity only when given); a BUST removes the execution. Refused: an
  amendment that names another account or symbol than the original's, or a busted
  execution. An amendment whose original is unknown is kept **pending** with the bytes
  it arrived as, and decided by the same rules when the original arrives (or refused
  with it, if the original is refused).
- **OPENING.** A lot held before the feed: applied before every execution of its key,
  several of them in arrival order (a SELL opens a short). An opening, or an amendment
  of one, re-derives the whole key.
- **The horizon** (event time, default 7 days) bounds how far back the history can
  change. With `newest` the highest `ts` of any execution the key ever applied:
  a NEW older than `newest - horizon`, an amendment of such an execution, and an
  amendment that arrives pending while its own `ts` is that old, are refused; a pending
  amendment expires (refused) once `newest` moves more than the horizon past its `ts`;
  an OPENING (or an amendment of one) is refused once the key has an execution older
  than `newest - horizon`. The same messages in the same order therefore give the same
  decisions live, in replay and in `posttrade positions compute`.

- **Bounds** (`core.bounds`). A message is refused when the fold of its key's history
  with it would not fit at some step, its own or a later execution's: a figure (net
  quantity, open cost, realized P&L gross or net, fees, a fill's notional or the P&L
  it realizes) of 1E+26 or more, or more than `MAX_OPEN_LOTS` open lots. The
  re-derivation is checked before the book takes it (`Unfit`; `_Undo` puts back what
  the message changed on the way), so a refused message leaves the book as it was. An
  execution takes at most `MAX_AMENDMENTS` amendments, and at most as many may wait
  for one unknown id.

What the book remembers is bounded by the horizon: executions older than it are folded
into the key's base state (`HistoryRecord.base`) in blocks of `checkpoint_every`, and
their ids (and those of their amendments) are forgotten. An id counts as known only
while its execution is within its key's horizon, whether or not it has been folded yet,
so folding never changes a decision. Openings are never folded.

Re-deriving from a place costs what follows it: the book keeps the key's state before
every `checkpoint_every`-th execution and replays from the nearest checkpoint. The
start-of-day snapshot (`sod_*`) is not re-derived: days already rolled keep theirs, so
today's day P&L carries an adjustment to earlier days.

Persistence: the book reports what changed (`take_changes`); `id_record(fill_id)` and
`history_record(key)` give the msgspec structs to store, and `restore` rebuilds the book
from them and the positions (checkpoints are rebuilt on first use).

What is stored is a consistent state of the book after some message (the caller
writes the records of a batch atomically, with `received_through`): an execution's
record is written once and never changes, and what its amendments did (its economics,
its bust, the key's correction and bust counts) is derived from their records. A
message whose arrival sequence is not above `received_through` is one delivered
again, and is a duplicate: what it did is in the book already.
"""

from __future__ import annotations

import bisect
import heapq
from dataclasses import dataclass
from decimal import Decimal, getcontext, setcontext
from typing import Iterable, Literal, Mapping, Sequence

import msgspec

from posttrade.core.bounds import MAX_AMENDMENTS, step_problem
from posttrade.core.exact import EXACT, ONE, ZERO, parse_decimal
from posttrade.core.positions import Position, PositionBook, PositionState
from posttrade.core.reference import Reference
from posttrade.streams.events import Fill

Key = tuple[str, str]
DEFAULT_HORIZON_NS = 7 * 86_400 * 1_000_000_000
DEFAULT_CHECKPOINT_EVERY = 64
DEFAULT_MAX_RECORDS = 1_000_000

#: What a message did: `applied` changed its key's position; the others did not.
Status = Literal["applied", "duplicate", "conflict", "pending", "refused"]
#: Why an applied message changed the position (the PositionUpdate's reason).
ChangeReason = Literal["fill", "late", "correction", "bust", "opening"]


class Execution:
    """One execution (NEW or OPENING) of a key's history, in the state it is in now."""

    __slots__ = ("fill", "first", "seq", "busted", "amendments")

    def __init__(self, first: Fill, seq: int):
        self.first = first  # the message that introduced the id: resends are compared to it
        self.fill = first  # the economics in force (a corrected copy after a CORRECT)
        self.seq = seq  # arrival sequence of the first message: breaks ties in ts
        self.busted = False
        self.amendments: Sequence[str] = ()  # ids of the amendments applied to it

    @property
    def fill_id(self) -> str:
        return self.first.fill_id

    @property
    def ts(self) -> int:
        return self.first.ts

    @property
    def opening(self) -> bool:
        return self.first.exec_type == "OPENING"


def _sort_key(execution: Execution) -> tuple[int, int]:
    return (execution.first.ts, execution.seq)


def _amend(execution: Execution, amendment: Fill) -> None:
    """Apply one CORRECT or BUST to the state of `execution`."""
    if amendment.exec_type == "BUST":
        execution.busted = True
    else:
        execution.fill = execution.fill.corrected_by(amendment)
    execution.amendments = [*execution.amendments, amendment.fill_id]


@dataclass(slots=True, eq=False)
class Amendment:
    """A CORRECT or BUST message and what became of it."""

    message: Fill
    seq: int
    status: Literal["applied", "pending", "refused"]
    root: str | None = None  # the original execution's fill_id, once known
    reason: str | None = None  # why it was refused
    raw: bytes | None = None  # a pending or refused message as it arrived
    # Pending: the unknown execution it waits for (through a chain of pending amendments).
    waits_on: str | None = None


@dataclass(slots=True, eq=False)
class Settled:
    """A pending amendment decided by a later message: applied, or refused with why."""

    amendment: Amendment
    applied: bool


class Unfit(Exception):
    """A fold step after which a position would not fit the bounds (`core.bounds`):
    the message that caused the re-derivation is refused, and the book left as it was."""

    def __init__(self, reason: str, fill_id: str | None):
        super().__init__(reason)
        self.reason = reason
        self.fill_id = fill_id  # the execution at whose step it happened


def _check_step(position: Position, fill: Fill, realized_before: Decimal) -> None:
    problem = step_problem(position, fill, realized_before)
    if problem is not None:
        raise Unfit(problem, fill.fill_id)


class _Undo:
    """What a message on the slow path (`_new`, `_opening`, `_amend`) may change before
    its re-derivation is checked, kept so that an `Unfit` one leaves the book as it was.

    The key's executions are not copied (a long history would make every late fill pay
    for it): the message adds at most its own execution and removes at most the one it
    busts, and `restore` undoes exactly that."""

    __slots__ = (
        "book", "history", "fill_id", "prior_id", "lists", "amendments", "waiting", "target", "counters",
    )

    def __init__(self, book: ExecutionBook, history: History, fill: Fill):
        self.book = book
        self.history = history
        self.fill_id = fill.fill_id
        self.prior_id = book._ids.get(fill.fill_id)
        histories = {id(history): history}
        waiting = book._waiting.get(fill.fill_id)
        self.waiting = list(waiting) if waiting is not None else None
        self.amendments = []
        for amendment in waiting or ():
            self.amendments.append((amendment, amendment.status, amendment.root, amendment.raw, amendment.reason))
            owner = book._histories.get((amendment.message.account, amendment.message.symbol))
            if owner is not None:
                histories[id(owner)] = owner
        self.lists = [
            (h, list(h.openings), list(h.checkpoints), list(h.pending), list(h.refused)) for h in histories.values()
        ]
        target = book._resolve(fill.ref_fill_id) if fill.ref_fill_id is not None else None
        self.target = (target, target.fill, target.busted, target.amendments) if isinstance(target, Execution) else None
        self.counters = (history.corrections, history.busts)

    def restore(self) -> None:
        book, entries = self.book, self.history.entries
        created = book._ids.get(self.fill_id)
        if isinstance(created, Execution) and created is not self.prior_id and not created.opening:
            place = bisect.bisect_left(entries, _sort_key(created), key=_sort_key)
            if place < len(entries) and entries[place] is created:
                del entries[place]
            else:  # a BUST waiting for it took it out
                self.history.busted.remove(created)
        if self.prior_id is None:
            book._ids.pop(self.fill_id, None)
        else:
            book._ids[self.fill_id] = self.prior_id
        book._changed_ids.add(self.fill_id)
        for history, openings, checkpoints, pending, refused in self.lists:
            history.openings, history.checkpoints = openings, checkpoints
            history.pending, history.refused = pending, refused
        for amendment, status, root, raw, reason in self.amendments:
            amendment.status, amendment.root, amendment.raw, amendment.reason = status, root, raw, reason
        if self.waiting is not None:
            book._waiting[self.fill_id] = self.waiting
        if self.target is not None:
            target, fill, busted, amendments = self.target
            if target.busted and not busted and not target.opening:  # this BUST took it out
                self.history.busted.remove(target)
                bisect.insort(entries, target, key=_sort_key)
            target.fill, target.busted, target.amendments = fill, busted, amendments
        self.history.corrections, self.history.busts = self.counters


class Result:
    """What `receive` did with one message.

    - `status`: applied (the key's position changed), duplicate, conflict, pending, refused;
    - `reason`: applied: a ChangeReason; pending or refused: why, in words;
    - `position`, `realized`: applied: the key's position now, and the change of its
      average-cost realized gross;
    - `first`: conflict: the version that won;
    - `execution`: applied, when an amendment changed it: the execution concerned, as
      now in force (a busted one as it was when busted);
    - `settled`: pending amendments this message decided; `expired`: pending ones it
      pushed past the horizon.

    A plain class: one is made per message, and the common case sets four fields.
    """

    first: Fill | None = None
    execution: Execution | None = None
    settled: Sequence[Settled] = ()
    expired: Sequence[Amendment] = ()

    def __init__(
        self, status: Status, reason: str | None = None, position: Position | None = None,
        realized: Decimal | None = None, first: Fill | None = None,
    ):
        self.status = status
        self.reason = reason
        self.position = position
        self.realized = realized
        if first is not None:
            self.first = first


class History:
    """One key's effective history (see the module doc)."""

    __slots__ = (
        "account", "symbol", "key", "multiplier", "currency", "position", "openings", "entries", "busted", "checkpoints",
        "folded", "folded_through", "folded_corrections", "folded_busts", "newest", "pending", "refused",
        "corrections", "busts",
    )

    def __init__(self, account: str, symbol: str, multiplier: Decimal, currency: str | None = None):
        self.account = account
        self.symbol = symbol
        self.key = (account, symbol)
        self.multiplier = multiplier
        self.currency = currency
        self.position: Position | None = None  # the key's position in the book, once it has one
        self.openings: list[Execution] = []  # arrival order; busted ones removed
        self.entries: list[Execution] = []  # live executions by (ts, seq); busted removed
        self.busted: list[Execution] = []  # busted executions (not openings) by (ts, seq)
        # checkpoints[j]: the fold before entries[j * every]; [0] is the base (openings
        # and folded executions). Valid for j < len(checkpoints), rebuilt on demand;
        # empty until first needed (most keys never need one: see `base_checkpoint`).
        self.checkpoints: list[Position] = []
        self.folded = 0  # executions folded into the base
        # The (ts, seq) of the last execution folded: everything up to it, busted ones
        # included, is in the base and its counts, and its ids are forgotten.
        self.folded_through: tuple[int, int] | None = None
        self.folded_corrections = 0  # the amendments of the executions forgotten
        self.folded_busts = 0
        self.newest: int | None = None  # highest ts of any execution ever applied
        self.pending: list[Amendment] = []  # amendments waiting for their original
        self.refused: list[Amendment] = []  # amendments refused (kept for the record)
        # Amendments applied to the key's executions, ever (the position shows them).
        self.corrections = 0
        self.busts = 0

    def base_checkpoint(self, check: bool = False) -> list[Position]:
        """The checkpoints, with the base built if it was not: the fold of the openings
        (nothing was folded into a base that was never built). `check`: raise `Unfit`
        at an opening after which the position would not fit the bounds."""
        checkpoints = self.checkpoints
        if not checkpoints:
            base = Position(self.account, self.symbol, self.multiplier, self.currency)
            for opening in self.openings:
                before = base.realized_pnl_gross
                base._apply(opening.fill)
                if check:
                    _check_step(base, opening.fill, before)
            checkpoints.append(base)
        return checkpoints

    def beyond_horizon(self, ts: int, horizon: int) -> bool:
        return self.newest is not None and ts < self.newest - horizon

    def reaches_past_horizon(self, horizon: int) -> bool:
        """True once the key has an execution older than the horizon: its openings
        can no longer change (the history before it may be folded)."""
        return self.folded > 0 or bool(self.entries) and self.beyond_horizon(self.entries[0].ts, horizon)


class HistoryRecord(msgspec.Struct, kw_only=True, tag=True):
    """What a key's executions cannot tell once some were folded (stored per such key,
    written when it folds): a key with nothing folded has its base in its openings and
    its newest time in its executions, so it needs no record."""

    account: str
    symbol: str
    base: PositionState  # the fold of the openings and the folded executions
    folded: int
    folded_through: tuple[int, int] | None = None  # see `History.folded_through`
    # The amendments of the executions forgotten (busted ones included).
    folded_corrections: int = 0
    folded_busts: int = 0


class IdRecord(msgspec.Struct, kw_only=True, tag=True):
    """One known `fill_id` (stored per id): an execution, or an amendment.

    An execution's record never changes: what its amendments did is derived from
    theirs (see the module doc)."""

    seq: int
    message: Fill  # the first arrival of the id
    # An amendment.
    status: Literal["applied", "pending", "refused"] | None = None
    root: str | None = None
    reason: str | None = None
    raw: bytes | None = None
    waits_on: str | None = None


class ExecutionBook:
    """Positions of a whole feed, each a fresh book over its effective history.

    `receive(fill, seq, raw)` takes one message in arrival order (`seq` increasing from
    1: the stream sequence live, the line number in a file; one not above the highest
    received is that message delivered again) and returns a `Result`. The
    positions, marks and account totals are read through `positions`
    (a `core.positions.PositionBook`).
    """

    def __init__(
        self,
        multipliers: Mapping[str, Decimal | str | int] | None = None,
        *,
        reference: Reference | None = None,
        horizon_ns: int = DEFAULT_HORIZON_NS,
        checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
        max_records: int = DEFAULT_MAX_RECORDS,
    ):
        if horizon_ns < 0:
            raise ValueError("horizon_ns must be >= 0")
        if checkpoint_every < 1:
            raise ValueError("checkpoint_every must be >= 1")
        if max_records < 2 * checkpoint_every:
            raise ValueError(f"max_records must be at least twice checkpoint_every ({2 * checkpoint_every})")
        self.max_records = max_records
        self.positions = PositionBook(multipliers, reference=reference)
        self.horizon = horizon_ns
        self.every = checkpoint_every
        self._histories: dict[Key, History] = {}
        self._ids: dict[str, Execution | Amendment] = {}
        self._waiting: dict[str, list[Amendment]] = {}  # unknown id -> amendments naming it
        self._changed_ids: set[str] = set()
        self._changed_keys: set[Key] = set()
        self.received_through = 0  # the highest arrival sequence received
        self.shed = 0  # executions folded within the horizon to stay within max_records
        self.duplicates = 0
        self.conflicts = 0

    # -- receiving -----------------------------------------------------------------------

    def receive(self, fill: Fill, seq: int, raw: bytes | None = None) -> Result:
        """Apply one message (see the module doc); `raw` is kept for a pending amendment."""
        saved = getcontext()
        setcontext(EXACT)
        try:
            result = self._receive(fill, seq, raw)
            if len(self._ids) > self.max_records:
                self._shed()
            return result
        finally:
            setcontext(saved)

    def receive_many(self, messages: Iterable[tuple[Fill, int, bytes | None]]) -> list[Result]:
        """`receive` for each (fill, seq, raw) in order; the exact context is set once."""
        saved = getcontext()
        setcontext(EXACT)
        try:
            results = []
            receive, ids, most = self._receive, self._ids, self.max_records
            for fill, seq, raw in messages:
                results.append(receive(fill, seq, raw))
                if len(ids) > most:
                    self._shed()
            return results
        finally:
            setcontext(saved)

    def _receive(self, fill: Fill, seq: int, raw: bytes | None) -> Result:
        if seq <= self.received_through:
            # This very message delivered again: what it did is in the book already.
            self.duplicates += 1
            return Result("duplicate")
        self.received_through = seq
        fill_id = fill.fill_id
        if fill.exec_type == "NEW" and fill_id not in self._ids and fill_id not in self._waiting:
            history = self._histories.get((fill.account, fill.symbol))
            if history is not None and history.position is not None:
                result = self._append(history, fill, seq)
                if result is not None:
                    return result
        known = self._known(fill_id)
        if known is None and fill_id in self._ids:
            self._retire(fill_id)  # known once, now past its horizon: the id is free again
        if known is not None:
            first = known.first if isinstance(known, Execution) else known.message
            if first == fill:
                self.duplicates += 1
                return Result("duplicate")
            self.conflicts += 1
            return Result("conflict", first=first)
        history = self._history(fill.account, fill.symbol)
        exec_type = fill.exec_type
        undo = _Undo(self, history, fill)
        try:
            if exec_type == "NEW":
                return self._new(history, fill, seq)
            if exec_type == "OPENING":
                return self._opening(history, fill, seq)
            return self._amend(history, fill, seq, raw)
        except Unfit as unfit:
            # The re-derivation is checked before it is committed: the book stays as it
            # was, and the message is refused with why.
            undo.restore()
            at = "" if unfit.fill_id == fill_id else f" (at execution {unfit.fill_id}, which follows it)"
            why = f"the position would not fit the bounds{at}: {unfit.reason}"
            if exec_type == "NEW" or exec_type == "OPENING":
                result = Result("refused", why)
                result.settled = self._refuse_waiting(fill)
                return result
            return self._refuse_amendment(history, fill, seq, raw, why)

    def _append(self, history: History, fill: Fill, seq: int) -> Result | None:
        """The common case, kept lean: a new execution later than everything of its key
        and nothing waiting for it, applied in place. None: not that case."""
        ts = fill.ts
        entries = history.entries
        if entries:
            last = entries[-1]
            last_ts = last.first.ts
            if last_ts > ts or (last_ts == ts and last.seq > seq):
                return None
        newest = history.newest
        if newest is not None and ts < newest - self.horizon:
            return None
        if history.folded_through is not None and ts < history.folded_through[0]:
            return None
        position = history.position
        execution = Execution(fill, seq)
        self._ids[fill.fill_id] = execution
        self._changed_ids.add(fill.fill_id)
        place = len(entries)
        every = self.every
        if place and not place % every:
            checkpoints = history.base_checkpoint()
            if len(checkpoints) == place // every:
                checkpoints.append(position.copy())  # type: ignore[union-attr]
        realized_before = position.realized_pnl_gross  # type: ignore[union-attr]
        position._apply(fill)  # type: ignore[union-attr]
        problem = step_problem(position, fill, realized_before)
        if problem is not None:  # rare: undone by folding the history it is not part of
            del self._ids[fill.fill_id]
            self._rederive(history, place, "fill", check=False)
            return Result("refused", f"the position would not fit the bounds: {problem}")
        entries.append(execution)
        result = Result("applied", "fill", position, position.realized_pnl_gross - realized_before)  # type: ignore[union-attr]
        if newest is None or ts > newest:
            self._advance(history, ts, result)
        return result

    def _new(self, history: History, fill: Fill, seq: int) -> Result:
        if history.beyond_horizon(fill.ts, self.horizon):
            return self._refused_new(history, fill, "an execution older than the horizon")
        if history.folded_through is not None and fill.ts < history.folded_through[0]:
            # (only after `_shed`: what the horizon folds is beyond it)
            return self._refused_new(history, fill, (
                f"an execution older than the oldest the book still holds for the key, ts "
                f"{history.folded_through[0]} (it holds at most {self.max_records} records: books.max_records)"
            ))
        execution = Execution(fill, seq)
        self._index(execution)
        entries = history.entries
        place = bisect.bisect_right(entries, (fill.ts, seq), key=_sort_key)
        entries.insert(place, execution)
        settled = self._settle_waiting(history, execution)
        applied = [s.amendment.message.exec_type for s in settled if s.applied]
        if applied:  # it arrived after amendments of it: they say what changed
            reason: ChangeReason = "bust" if applied[-1] == "BUST" else "correction"
        else:
            reason = "late" if place < len(entries) - 1 else "fill"
        result = self._rederive(history, place, reason)
        result.settled = settled
        if applied:
            result.execution = execution
        self._advance(history, fill.ts, result)
        return result

    def _opening(self, history: History, fill: Fill, seq: int) -> Result:
        if history.reaches_past_horizon(self.horizon):
            return self._refused_new(history, fill, "an opening after the key's history reaches past the horizon")
        execution = Execution(fill, seq)
        self._index(execution)
        history.openings.append(execution)
        settled = self._settle_waiting(history, execution)
        result = self._rederive(history, None, "opening")
        result.settled = settled
        if any(s.applied for s in settled):
            result.execution = execution
        return result

    def _amend(self, history: History, fill: Fill, seq: int, raw: bytes | None) -> Result:
        target = self._resolve(fill.ref_fill_id)  # type: ignore[arg-type]
        if target is None:
            return self._park(history, fill, seq, raw)
        if isinstance(target, str):  # refused: says why
            return self._refuse_amendment(history, fill, seq, raw, target)
        amendment = Amendment(fill, seq, "applied", root=target.fill_id)
        why = self._why_not(history, target, fill)
        if why is not None:
            return self._refuse_amendment(history, fill, seq, raw, why)
        self._ids[fill.fill_id] = amendment
        self._changed_ids.add(fill.fill_id)
        place = self._amend_execution(history, target, amendment)
        result = self._rederive(history, place, "correction" if fill.exec_type == "CORRECT" else "bust")
        result.execution = target
        return result

    # -- amendments ------------------------------------------------------------------------

    def _resolve(self, ref: str) -> Execution | str | None:
        """The execution `ref` amends: None while unknown, or why it cannot be amended."""
        known = self._known(ref)
        if known is None:
            return None
        if isinstance(known, Execution):
            return known
        if known.status == "pending":
            return None  # its own original is unknown: wait with it
        if known.root is not None:
            root = self._known(known.root)
            if isinstance(root, Execution):
                return root
        return f"it names amendment {ref}, which was refused"

    def _why_not(self, history: History, target: Execution, fill: Fill) -> str | None:
        """Why `fill` cannot amend `target`, or None when it can."""
        first = target.first
        if (first.account, first.symbol) != (fill.account, fill.symbol):
            return (
                f"{fill.exec_type} of {target.fill_id} names {fill.account}/{fill.symbol}, but the execution "
                f"is {first.account}/{first.symbol}: send a BUST and a new fill instead"
            )
        if target.busted:
            return f"{target.fill_id} was busted: it cannot be amended"
        if len(target.amendments) >= MAX_AMENDMENTS:
            return f"{target.fill_id} was amended {len(target.amendments)} times: the most one execution may be"
        if target.opening:
            if history.reaches_past_horizon(self.horizon):
                return f"opening {target.fill_id} cannot change: the key's history reaches past the horizon"
            if fill.exec_type == "CORRECT" and fill.fee:
                return f"a correction of opening {target.fill_id} carries a fee ({fill.fee}): an opening has none"
        elif history.beyond_horizon(target.ts, self.horizon):
            return f"{target.fill_id} is older than the horizon"
        return None

    def _amend_execution(self, history: History, target: Execution, amendment: Amendment) -> int | None:
        """Apply `amendment` to `target`; returns the entry index the key changed from
        (None: the openings, so everything)."""
        fill = amendment.message
        place = None if target.opening else self._place_of(history, target)
        if fill.exec_type == "BUST":
            if place is None:
                history.openings.remove(target)
            else:
                del history.entries[place]
                bisect.insort(history.busted, target, key=_sort_key)
            history.busts += 1
        else:
            history.corrections += 1
        _amend(target, fill)
        return place

    def _place_of(self, history: History, target: Execution) -> int:
        entries = history.entries
        place = bisect.bisect_left(entries, _sort_key(target), key=_sort_key)
        assert entries[place] is target, "an execution is where its (ts, seq) says"
        return place

    def _park(self, history: History, fill: Fill, seq: int, raw: bytes | None) -> Result:
        if history.beyond_horizon(fill.ts, self.horizon):
            return self._refuse_amendment(
                history, fill, seq, raw, f"its original {fill.ref_fill_id} is unknown and it is older than the horizon"
            )
        amendment = Amendment(fill, seq, "pending", raw=raw)
        self._wait(amendment)
        waiting = self._waiting[amendment.waits_on]  # type: ignore[index]
        if len(waiting) > MAX_AMENDMENTS:  # they are released in one update: bounded
            waiting.pop()
            return self._refuse_amendment(
                history, fill, seq, raw, f"{MAX_AMENDMENTS} amendments already wait for {amendment.waits_on}"
            )
        self._ids[fill.fill_id] = amendment
        history.pending.append(amendment)
        self._changed_ids.add(fill.fill_id)
        return Result("pending", f"its original {amendment.waits_on} is not known yet")

    def _wait(self, amendment: Amendment) -> None:
        """Register a pending amendment under the unknown execution it waits for: naming
        a pending amendment means waiting for that one's original."""
        if amendment.waits_on is None:
            ref = amendment.message.ref_fill_id
            known = self._ids.get(ref)  # type: ignore[arg-type]
            amendment.waits_on = known.waits_on if isinstance(known, Amendment) and known.status == "pending" else ref
        self._waiting.setdefault(amendment.waits_on, []).append(amendment)  # type: ignore[arg-type]

    def _settle_waiting(self, history: History, execution: Execution) -> list[Settled]:
        """Decide the amendments that were waiting for `execution` (now known), in
        arrival order, changing its state but not re-deriving (the caller does)."""
        waiting = self._waiting.pop(execution.fill_id, None)
        if not waiting:
            return []
        settled = []
        for amendment in sorted(waiting, key=lambda a: a.seq):
            owner = self._history(amendment.message.account, amendment.message.symbol)
            owner.pending.remove(amendment)
            target = self._resolve(amendment.message.ref_fill_id)  # type: ignore[arg-type]
            why = target if isinstance(target, str) else (
                "its original is unknown" if target is None else self._why_not(history, target, amendment.message)
            )
            self._changed_ids.add(amendment.message.fill_id)
            if why is None:
                amendment.status = "applied"
                amendment.root = target.fill_id  # type: ignore[union-attr]
                amendment.raw = None
                self._amend_execution(history, target, amendment)  # type: ignore[arg-type]
                settled.append(Settled(amendment, True))
            else:
                self._mark_refused(owner, amendment, why)
                settled.append(Settled(amendment, False))
        return settled

    def _refuse_waiting(self, fill: Fill) -> list[Settled]:
        """The original `fill` was refused: so are the amendments waiting for it."""
        settled = []
        for amendment in sorted(self._waiting.pop(fill.fill_id, ()), key=lambda a: a.seq):
            owner = self._history(amendment.message.account, amendment.message.symbol)
            owner.pending.remove(amendment)
            self._mark_refused(owner, amendment, f"its original {fill.fill_id} was refused")
            self._changed_ids.add(amendment.message.fill_id)
            settled.append(Settled(amendment, False))
        return settled

    def _mark_refused(self, history: History, amendment: Amendment, why: str) -> None:
        amendment.status = "refused"
        amendment.reason = why
        history.refused.append(amendment)

    def _refuse_amendment(
        self, history: History, fill: Fill, seq: int, raw: bytes | None, why: str
    ) -> Result:
        amendment = Amendment(fill, seq, "refused", raw=raw)
        self._mark_refused(history, amendment, why)
        self._ids[fill.fill_id] = amendment
        self._changed_ids.add(fill.fill_id)
        return Result("refused", why)

    def _refused_new(self, history: History, fill: Fill, why: str) -> Result:
        newest = history.newest
        result = Result(
            "refused", f"{why}: ts {fill.ts} < newest {newest} of {fill.account}/{fill.symbol} - horizon {self.horizon} ns"
        )
        result.settled = self._refuse_waiting(fill)
        return result

    # -- deriving ------------------------------------------------------------------------

    def _rederive(self, history: History, place: int | None, reason: ChangeReason, check: bool = True) -> Result:
        """Recompute the key's position from entry `place` (None: from the openings).
        `check`: every step of the fold must fit the bounds (else `Unfit` is raised
        before the book takes the new position); restore does not check what was."""
        every = self.every
        if place is None:  # the openings changed: a new base
            history.checkpoints.clear()
            history.base_checkpoint(check)
            start = 0
        else:
            checkpoints = history.base_checkpoint()
            keep = min(place // every, len(checkpoints) - 1)
            del checkpoints[keep + 1:]
            start = keep * every
        fresh = self._replay(history, start, record=True, check=check)
        old = self.positions.get(history.account, history.symbol)
        realized_before = ZERO
        if old is not None:
            realized_before = old.realized_pnl_gross
            for name in _CARRIED:
                setattr(fresh, name, getattr(old, name))
        fresh.corrections, fresh.busts = history.corrections, history.busts
        self.positions.restore(fresh)
        history.position = fresh
        return Result("applied", reason, fresh, fresh.realized_pnl_gross - realized_before)

    def _replay(self, history: History, start: int, *, record: bool, check: bool = False) -> Position:
        """The fold of the key from entry `start` (a checkpoint) to the end, recording
        the checkpoints it passes when `record`; `check`: raising `Unfit` at the first
        step that does not fit the bounds."""
        every = self.every
        checkpoints = history.base_checkpoint()
        position = checkpoints[start // every].copy()
        entries = history.entries
        for index in range(start, len(entries)):
            if record and index and not index % every and len(checkpoints) == index // every:
                checkpoints.append(position.copy())
            fill = entries[index].fill
            if check:
                before = position.realized_pnl_gross
                position._apply(fill)
                problem = step_problem(position, fill, before)
                if problem is not None:
                    raise Unfit(problem, fill.fill_id)
            else:
                position._apply(fill)
        return position

    def _advance(self, history: History, ts: int, result: Result) -> None:
        """A NEW with `ts` was applied: move the key's newest time, expire what falls
        behind the horizon, and fold what can be folded."""
        if history.newest is not None and ts <= history.newest:
            return
        history.newest = ts
        if history.pending or history.refused:
            self._expire(history, result)
        entries, every = history.entries, self.every
        if len(entries) >= every and entries[every - 1].first.ts < ts - self.horizon:
            self._fold(history)

    def _expire(self, history: History, result: Result) -> None:
        """Pending amendments past the horizon are refused (reported in `result`);
        refused ones past it are forgotten."""
        for amendment in [a for a in history.pending if history.beyond_horizon(a.message.ts, self.horizon)]:
            history.pending.remove(amendment)
            waiting = self._waiting.get(amendment.waits_on)  # type: ignore[arg-type]
            if waiting is not None:
                waiting.remove(amendment)
                if not waiting:
                    del self._waiting[amendment.waits_on]  # type: ignore[arg-type]
            self._mark_refused(history, amendment, "pending past the horizon: its original never arrived")
            self._changed_ids.add(amendment.message.fill_id)
            result.expired = [*result.expired, amendment]
        for amendment in [a for a in history.refused if self._amendment_expired(history, a)]:
            history.refused.remove(amendment)
            if self._ids.get(amendment.message.fill_id) is amendment:
                del self._ids[amendment.message.fill_id]
                self._changed_ids.add(amendment.message.fill_id)

    def _shed(self) -> None:
        """Over `max_records`: fold whole blocks of executions into their keys' bases,
        the key whose oldest execution is oldest first, until 1/64 of the bound is free.
        What is folded can no longer change: a late fill older than it is refused, an
        amendment of it waits as for an unknown id (then expires)."""
        target = self.max_records - max(1, self.max_records // 64)
        oldest = [(h.entries[0].first.ts, key) for key, h in self._histories.items() if h.entries]
        heapq.heapify(oldest)
        while len(self._ids) > target and oldest:
            _, key = heapq.heappop(oldest)
            history = self._histories[key]
            place = min(self.every, len(history.entries)) - 1
            self._fold_through(history, place, _sort_key(history.entries[place]))
            self.shed += place + 1
            if history.entries:
                heapq.heappush(oldest, (history.entries[0].first.ts, key))

    def _fold(self, history: History) -> None:
        """Fold whole checkpoint blocks older than the horizon into the base, and forget
        their ids (they already count as unknown: see `_known`)."""
        every = self.every
        entries = history.entries
        checkpoints = history.base_checkpoint()
        if len(checkpoints) < 2:
            self._replay(history, (len(checkpoints) - 1) * every, record=True)  # after a restart
        blocks = 0
        while (blocks + 1) * every <= len(entries) and blocks + 1 < len(checkpoints) and history.beyond_horizon(
            entries[(blocks + 1) * every - 1].ts, self.horizon
        ):
            blocks += 1
        if not blocks:
            return
        count = blocks * every
        folded = entries[:count]
        del entries[:count]
        del checkpoints[:blocks]
        self._folded(history, folded, _sort_key(folded[-1]))

    def _retire(self, fill_id: str) -> None:
        """Drop the record of an id past its horizon before the id is used again. An
        execution (or the execution an applied amendment changed: its state lives in
        its amendments' records) is folded into the base with everything before it
        (all of it is past the horizon too: entries are in time order), so that every
        live entry keeps its records."""
        record = self._ids[fill_id]
        if isinstance(record, Amendment) and record.status == "applied":
            root = self._ids.get(record.root)  # type: ignore[arg-type]
            if isinstance(root, Execution) and not root.opening:
                record = root
        if isinstance(record, Execution):  # (openings never pass the horizon)
            first = record.first
            history = self._histories[(first.account, first.symbol)]
            place = bisect.bisect_right(history.entries, _sort_key(record), key=_sort_key) - 1
            self._fold_through(history, place, _sort_key(record))
        else:
            history = self._histories[(record.message.account, record.message.symbol)]
            if record in history.refused:
                history.refused.remove(record)
        if self._ids.pop(fill_id, None) is not None:
            self._changed_ids.add(fill_id)

    def _fold_through(self, history: History, place: int, through: tuple[int, int]) -> None:
        """Fold entries[0..place] (-1: none) and the busted executions up to `through`
        into the base (they are all past the horizon)."""
        every = self.every
        checkpoints = history.base_checkpoint()
        start = min((place + 1) // every, len(checkpoints) - 1) * every
        base = checkpoints[start // every].copy()
        entries = history.entries
        for index in range(start, place + 1):
            base._apply(entries[index].fill)
        folded = entries[: place + 1]
        del entries[: place + 1]
        history.checkpoints = [base]
        self._folded(history, folded, through)

    def _folded(self, history: History, folded: list[Execution], through: tuple[int, int]) -> None:
        """`folded` (the first entries, now in `history`'s new base) and the busted
        executions up to `through` leave the history: their ids are forgotten, their
        amendments counted."""
        busted = history.busted
        cut = bisect.bisect_right(busted, through, key=_sort_key)
        gone = [*folded, *busted[:cut]]
        del busted[:cut]
        for execution in gone:
            self._forget(execution)
            history.folded_busts += execution.busted
            history.folded_corrections += len(execution.amendments) - execution.busted
        history.folded += len(folded)
        if history.folded_through is None or through > history.folded_through:
            history.folded_through = through
        self._changed_keys.add(history.key)

    def _forget(self, execution: Execution) -> None:
        # An id past the horizon may have been used again since (it counts as unknown
        # there): only this execution's own records go.
        ids = self._ids
        if ids.get(execution.fill_id) is execution:
            del ids[execution.fill_id]
            self._changed_ids.add(execution.fill_id)
        for fill_id in execution.amendments:
            record = ids.get(fill_id)
            if isinstance(record, Amendment) and record.root == execution.fill_id:
                del ids[fill_id]
                self._changed_ids.add(fill_id)

    # -- the id index ------------------------------------------------------------------------

    def _index(self, execution: Execution) -> None:
        self._ids[execution.fill_id] = execution
        self._changed_ids.add(execution.fill_id)

    def _known(self, fill_id: str) -> Execution | Amendment | None:
        """The record of `fill_id`, or None when unknown or behind its key's horizon."""
        known = self._ids.get(fill_id)
        if known is None:
            return None
        if isinstance(known, Execution):
            if known.opening:
                return known
            first = known.first
            history = self._histories.get((first.account, first.symbol))
            if history is not None and history.beyond_horizon(first.ts, self.horizon):
                return None
            return known
        if known.status == "pending":
            return known
        message = known.message
        history = self._histories.get((message.account, message.symbol))
        if history is not None and self._amendment_expired(history, known):
            return None
        return known

    def _amendment_expired(self, history: History, amendment: Amendment) -> bool:
        if amendment.root is not None:
            root = self._ids.get(amendment.root)
            if isinstance(root, Execution):
                if root.opening:
                    return False
                owner = self._histories.get((root.first.account, root.first.symbol), history)
                return owner.beyond_horizon(root.ts, self.horizon)
            return True  # its execution was folded
        return history.beyond_horizon(amendment.message.ts, self.horizon)

    def _history(self, account: str, symbol: str) -> History:
        history = self._histories.get((account, symbol))
        if history is None:
            book = self.positions
            history = self._histories[(account, symbol)] = History(
                account, symbol, book.multipliers.get(symbol, ONE), book.reference.currency(symbol)
            )
            history.position = self.positions.get(account, symbol)
        return history

    # -- reads ----------------------------------------------------------------------------

    def history(self, account: str, symbol: str) -> History | None:
        return self._histories.get((account, symbol))

    def effective_history(self, account: str, symbol: str) -> list[Fill]:
        """The openings, then the live executions in order, as in force now (the folded
        part of the history is not included)."""
        history = self._histories.get((account, symbol))
        if history is None:
            return []
        return [e.fill for e in history.openings] + [e.fill for e in history.entries]

    def pending(self) -> list[Amendment]:
        """Amendments waiting for their original, in arrival order."""
        return sorted((a for h in self._histories.values() for a in h.pending), key=lambda a: a.seq)

    def refused(self) -> list[Amendment]:
        """Amendments refused (within the horizon), in arrival order."""
        return sorted((a for h in self._histories.values() for a in h.refused), key=lambda a: a.seq)

    # -- persistence ------------------------------------------------------------------------

    def take_changes(self) -> tuple[set[str], set[Key]]:
        """The ids and keys whose records changed since the last call."""
        ids, keys = self._changed_ids, self._changed_keys
        self._changed_ids, self._changed_keys = set(), set()
        return ids, keys

    def records_changed(self) -> list[tuple[str | Key, IdRecord | HistoryRecord | None]]:
        """What changed since the last call: (fill_id or key, its record; None: delete it)."""
        ids, keys = self.take_changes()
        changed: list[tuple[str | Key, IdRecord | HistoryRecord | None]] = [(i, self.id_record(i)) for i in ids]
        changed.extend((key, self.history_record(key)) for key in keys)
        return changed

    def id_record(self, fill_id: str) -> IdRecord | None:
        """What to store for `fill_id` (None: delete it)."""
        known = self._ids.get(fill_id)
        if known is None:
            return None
        if isinstance(known, Execution):
            return IdRecord(seq=known.seq, message=known.first)
        return IdRecord(
            seq=known.seq, message=known.message, status=known.status, root=known.root,
            reason=known.reason, raw=known.raw, waits_on=known.waits_on if known.status == "pending" else None,
        )

    def history_record(self, key: Key) -> HistoryRecord | None:
        """What to store for `key` (None: nothing, delete any)."""
        history = self._histories[key]
        if history.folded_through is None:
            return None
        return HistoryRecord(
            account=history.account,
            symbol=history.symbol,
            base=history.checkpoints[0].to_state(),
            folded=history.folded,
            folded_through=history.folded_through,
            folded_corrections=history.folded_corrections,
            folded_busts=history.folded_busts,
        )

    def restore(
        self,
        histories: Iterable[HistoryRecord],
        ids: Mapping[str, IdRecord],
        positions: Iterable[PositionState],
        received_through: int = 0,
    ) -> None:
        """Rebuild the book (it must be empty) from the records stored after the message
        with sequence `received_through`, and the positions stored (taken for what is not
        derived: the start of day and the revision)."""
        if self._histories or self._ids:
            raise RuntimeError("restore needs an empty book")
        self.received_through = received_through
        stored = {(state.account, state.symbol): state for state in positions}
        for record in histories:
            history = self._history(record.account, record.symbol)
            history.checkpoints = [Position.from_state(record.base)]
            history.folded = record.folded
            history.folded_through = record.folded_through
            if record.folded_through is not None:
                history.newest = record.folded_through[0]
            history.corrections = history.folded_corrections = record.folded_corrections
            history.busts = history.folded_busts = record.folded_busts
        amendments: list[Amendment] = []
        for fill_id, record in sorted(ids.items(), key=lambda item: item[1].seq):
            message = record.message
            history = self._history(message.account, message.symbol)
            if record.status is None:
                execution = self._ids[fill_id] = Execution(message, record.seq)
                if not execution.opening and (history.newest is None or message.ts > history.newest):
                    history.newest = message.ts
            else:
                amendment = Amendment(
                    message, record.seq, record.status, record.root, record.reason, record.raw, record.waits_on
                )
                self._ids[fill_id] = amendment
                amendments.append(amendment)
        for amendment in amendments:  # in arrival order: the order they applied in
            owner = self._histories[(amendment.message.account, amendment.message.symbol)]
            if amendment.status == "applied":
                _amend(self._ids[amendment.root], amendment.message)  # type: ignore[index, arg-type]
                if amendment.message.exec_type == "BUST":
                    owner.busts += 1
                else:
                    owner.corrections += 1
            else:
                (owner.pending if amendment.status == "pending" else owner.refused).append(amendment)
        for known in self._ids.values():
            if isinstance(known, Execution):
                history = self._histories[(known.first.account, known.first.symbol)]
                if known.opening:
                    if not known.busted:
                        history.openings.append(known)
                else:
                    (history.busted if known.busted else history.entries).append(known)
        saved = getcontext()
        setcontext(EXACT)
        try:
            for history in self._histories.values():
                history.entries.sort(key=_sort_key)
                history.busted.sort(key=_sort_key)
                if history.entries or history.openings or history.folded or history.busted or history.busts:
                    # (a position stored for a key without records is one written ahead of them)
                    state = stored.get(history.key)
                    history.position = self.positions.restore(state) if state is not None else None
                    self._rederive(history, None if not history.folded else 0, "fill", check=False)
        finally:
            setcontext(saved)
        for amendment in sorted((a for h in self._histories.values() for a in h.pending), key=lambda a: a.seq):
            self._wait(amendment)
        if len(self._ids) > self.max_records:  # (a lower bound than the records were kept under)
            setcontext(EXACT)
            try:
                self._shed()
            finally:
                setcontext(saved)


#: Position fields a re-derivation keeps from the position it replaces.
_CARRIED = (
    "sod_realized_pnl_gross", "sod_fees", "sod_foreign_fees", "sod_unrealized_pnl", "sod_mark", "revision",
)


def parse_horizon(value: str | int | float) -> int:
    """A horizon in ns from seconds (`604800`) or a duration (`7d`, `36h`, `90m`, `30s`)."""
    if isinstance(value, (int, float)):
        seconds = Decimal(str(value))
    else:
        text = value.strip()
        units = {"d": 86_400, "h": 3_600, "m": 60, "s": 1}
        unit = units.get(text[-1:].lower()) if text else None
        number = text[:-1] if unit is not None else text
        seconds = parse_decimal("horizon", number) * (unit or 1)
    if seconds < 0:
        raise ValueError(f"horizon must be >= 0, got {value!r}")
    return int(seconds * 1_000_000_000)
