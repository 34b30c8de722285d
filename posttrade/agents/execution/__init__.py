"""Execution quality: joining orders, fills, quotes and market trades by event time.

Four agents (`agents.py`) consume four streams independently, so any of them can be
ahead of the others: a fill can be consumed before its order, a quote after the fill
it prices. `ExecutionTracker` (`tracker.py`, over the values of `state.py` and the
series of `series.py`) makes the results independent of that interleaving. Its rows go
to ClickHouse through `ExecutionSink` (`posttrade/stores/clickhouse/execution_sink.py`);
the tables, the row layout and the pages' SQL are beside it in
`posttrade/stores/clickhouse/`; the TCA formulas are `posttrade/core/execution.py`.

How the join works
------------------
* **Series by event time.** Quotes become a per-symbol series of mids, market trades a
  per-symbol series of the cumulative tape `(sum of price x size, sum of size)`. Each
  series has a *watermark*: the newest event time it has seen for the symbol. Points
  arrive in stream order; a point older than the symbol's watermark is *late*, counted
  and dropped (the series only grows forward, so every lookup is reproducible).
* **A value at time t** (the mid at a fill, at an order's arrival, one second after a
  fill; the tape at an order's start and end) is the last point at or before `t`. It
  is *decided* once the symbol's watermark has reached `t` (no earlier point can still
  come), or once the watermark of the whole stream (every symbol) has passed
  `t + quiet_symbol_grace` (the symbol has gone quiet: its last point still holds).
  Until then the fill or order waits in an in-memory heap keyed by `t`; the quote and
  trade agents wake the waiters whose time has come after each batch. A decided value
  can still be *unavailable* (no quote at or before `t` is known): it is then NULL.
* **Fills before their order.** A fill whose order is not yet known creates a
  placeholder order that collects the fill; when the order arrives it completes the
  placeholder and passes its arrival mid down to the fills. Orders are written to
  ClickHouse only once their NEW event (the arrival) is known.
* **Markouts** at +1 s, +5 s, +60 s are values at `fill.ts + horizon`, decided by the
  rule above: they appear when quote event time passes the horizon, not wall time.

Executions, corrections, busts, resends
---------------------------------------
The FILLS stream carries executions (NEW), amendments of them (CORRECT, BUST: each a
message of its own fill_id, naming the execution in `ref_fill_id`, directly or through
an earlier amendment of it) and openings (positions held before the feed: not
executions, ignored and counted). One rule for every metric:

* **A fill_id counts once**: its first arrival wins, and any later message with the
  same fill_id (a resend, however late, identical or not) changes nothing. Memory
  knows the fill_ids of the state it holds; the **ledger** (`execution_fill_ids` in
  ClickHouse: each fill_id's first stream sequence, what it amends and what became of
  it) knows every other. The fills agent asks it once per batch for the fill_ids
  memory cannot place. The same message again (a redelivery: same sequence) is not a
  resend: when the ledger has it but memory does not, a crash lost its state before
  the commit, and it is handled again.
* **An amendment is applied to the execution's state**, and everything derives from
  that state: a CORRECT replaces side, qty, price and fee (order, venue and liquidity
  when it gives them; a new order means a new arrival), so the fill's row is rebuilt
  from it and the orders it left and joined are recomputed from their executions; a
  BUST marks it busted: its row stays in ClickHouse with `busted = 1` (readers and the
  rollup leave it out) and its order is recomputed without it. The row of an amended
  fill or order ranks above every row written before the amendment (`row_version`).
* **An amendment whose execution has not arrived** waits, durably (the `amendments`
  table), and is applied when it does; amendments of one execution apply in stream
  order. One whose execution was busted, is an opening, has left the state
  (retention) or is of another account or symbol changes nothing and is counted.

State, writes and restarts
--------------------------
The tracker works on its own dictionaries (`fills`, `orders`, `book`, `tape`); the
changelog tables are their durable copy, and what reaches a table follows one rule:

    a fill's or order's state is copied to its table (persisted) only after the
    ClickHouse row built from that state is written.

So the changelog never holds a state newer than ClickHouse's row, and a restart has
nothing to rewrite: it loads the tables, rebuilds the series history (below) and the
waiting heaps, and writes only what then *progresses* (a value that has become
decidable): the changelog can be older than ClickHouse (rows written, then the commit
lost with a crash or an agent's roll-back), never newer. The tables also never see the agents' uncommitted work, so the runtime's roll-back of
a crashed agent has nothing of ours to undo: persisting happens outside any agent's
batch (`tables.table.outside_batch`).

ClickHouse can still be *ahead* of the changelog after a crash (a write done, its
commit lost); the unacknowledged events then come again and re-derive the newer
states step by step. So that no step writes a row behind the stored one, every fill
and order loaded at start, or touched by an event that was in its stream before the
process started, is compared with its stored row (`progress`) before its first write
here; a row further along is kept (`hold`) until the state has caught up with it.

Who waits for ClickHouse: the orders and fills agents acknowledge a batch only after
its rows are in ClickHouse and its state is persisted (`ExecutionSink.flush`: one
write, i.e. one insert per table, for everything changed so far). The quote and
trade agents persist the book and tape (which have no rows) at the end of each batch
and do not wait: what their events change in fills and orders (a decided mid, a
markout, a market VWAP) can be re-derived from the market-data history, which a
restart rebuilds; the sink's writer writes it within `interval_s`, and they are held
only when more than `max_unwritten` rows wait (ClickHouse down).

Every handler is idempotent by content: a fill_id that came before changes nothing,
an order's NEW only sets the arrival once, a fill joins its order's aggregates once
(`fill_ids`), an amendment changes an order once (`amendment_ids`), a quote or trade
whose stream sequence is not above the symbol's recorded one is skipped.

The series history (the last `history_s` of points per symbol) is memory only. On
start it is rebuilt by replaying the QUOTES and TRADES streams from the sequence of
the oldest point kept (`history_from_seq`, recorded in the book/tape entry) up to the
last sequence applied.

Rows
----
`fill_row` / `order_row` (`posttrade/stores/clickhouse/execution.py`) build a row from
a state; `ExecutionStore` owns the ClickHouse tables (`ReplacingMergeTree(version)`, readers use `FINAL`), the
per-minute rollup the summary reads and the ledger of fill_ids. Each write carries a
`version`: a nanosecond clock, strictly increasing in the process, with bit 62
(`SETTLED`) set when the row is settled (a complete fill, a final order). A settled row
therefore always outranks an unsettled one: whatever path tried to write a less settled
row later (a replay, an operator's reset), readers keep seeing the settled one. Rows
of amended fills and orders rank by their amendment count first (`row_version`).

Every row carries its instrument's `currency` (the tracker's reference data): all its
money is in it. Nothing adds two currencies: a fee charged in another one (a fill's
`fee_currency`) stays out of the order's `fees` and shortfall (`fees_other`), and the
rollup has `currency` in its key (docs/execution_quality.md, "Currencies").
"""
