"""Which fills a batch holds for the first time: resends are never written."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator, Sequence
from operator import attrgetter
from typing import TYPE_CHECKING
from urllib.parse import quote_plus

import numpy as np

from . import QuestDBError, sql_literal
from .layouts import Column

if TYPE_CHECKING:
    from . import QuestDBClient
    from ...streams.stream import EventRecord

log = logging.getLogger(__name__)
_VALUE = attrgetter("value")

# URL-encoded characters of the `IN (...)` list of one look-up query. /exec takes the query
# in the request line, and QuestDB closes the connection when the request's head passes
# its header buffer (`http.request.header.buffer.size`, 32 KiB by default; a 28,600-byte
# URL went through, a 38,000-byte one did not); this leaves room for the rest.
LOOKUP_LIST_BUDGET = 16_000
# Rows per query when the keys of a table are read (~10 MB of JSON for fill ids).
READ_PAGE_ROWS = 500_000
# Hashes of keys written kept in a set (~70 bytes each) before they go into the sorted
# array: merging copies the array, so not after every batch.
ADDED_HASHES_MERGED_AT = 1 << 18
# How long a look-up waits, polling, for QuestDB to apply the commits made before it;
# then it counts as a failed attempt and is retried with back-off.
WAL_WAIT_S = 5.0


def in_lists(values: Sequence[str], budget: int = LOOKUP_LIST_BUDGET) -> Iterator[str]:
    """`values` as the insides of SQL `IN (...)` lists, each within `budget` URL-encoded."""
    literals: list[str] = []
    size = 0
    for value in values:
        literal = sql_literal(value)
        cost = len(quote_plus(literal)) + 4  # with the ", " before the next one (%2C+)
        if literals and size + cost > budget:
            yield ", ".join(literals)
            literals, size = [], 0
        literals.append(literal)
        size += cost
    if literals:
        yield ", ".join(literals)


class FirstArrivals:
    """Which records of a batch are the first arrival of their key (fills: `fill_id`).

    The table is the memory: a key has arrived once a row has it, so a restart forgets
    nothing, however long ago the first arrival was. Asking QuestDB about every new key
    would scan the key column of the whole table once per `IN` list (a few hundred
    keys; 5 million rows take ~0.1 s here), so the keys the table holds are known here
    as 64-bit hashes in a sorted array (8 bytes a row), read from the table before the
    first batch. A key whose hash is not there is new; one whose hash is (a resend, or
    rarely another key with the same hash) is looked up in QuestDB, which has the last
    word. The hashes are Python's `hash()`, salted per process: they are never kept
    beyond it.

    A WAL table shows a commit to SQL a little after accepting it, so the table is read,
    and keys are looked up, only once every commit is applied. One process writes the
    table: another's rows would be missing from the hashes.
    """

    def __init__(self, table: str, column: Column, client: QuestDBClient):
        self.table = table
        self.column = column.name
        self._key = attrgetter(column.field or column.name)
        self.client = client
        self._table_read = False
        self._hashes = np.empty(0, dtype=np.int64)  # sorted hashes of the keys the table has
        self._added: set[int] = set()  # those of keys written since, merged into _hashes in bulk

    async def select(self, records: Sequence[EventRecord]) -> list[EventRecord]:
        """The records to write: the first of their key in the batch, in no row yet.

        Raises QuestDBError when QuestDB cannot tell yet (away, or still applying
        commits): ask again later.
        """
        firsts: dict[str, EventRecord] = {}
        for record in records:
            firsts.setdefault(self._key(record.value), record)
        if not self._table_read:
            await self._wait_applied()
            self._hashes = await self._read_hashes()
            self._table_read = True
        keys = list(firsts)
        maybe = [key for key, known in zip(keys, self._known(keys)) if known]
        if not maybe:
            return list(firsts.values())
        await self._wait_applied()
        stored = await self._stored(maybe)
        return [record for key, record in firsts.items() if key not in stored]

    def accepted(self, records: Sequence[EventRecord]) -> None:
        """QuestDB took the rows of `records`: their keys have arrived."""
        self._added.update(map(hash, map(self._key, map(_VALUE, records))))
        if len(self._added) >= ADDED_HASHES_MERGED_AT:
            added = np.fromiter(self._added, dtype=np.int64, count=len(self._added))
            added.sort()
            self._hashes = np.insert(self._hashes, np.searchsorted(self._hashes, added), added)
            self._added.clear()

    def _known(self, keys: list[str]) -> np.ndarray:
        """Per key: True when a key with its hash has arrived."""
        hash_list = list(map(hash, keys))
        hashes = np.array(hash_list, dtype=np.int64)
        known = np.zeros(len(keys), dtype=bool)
        if len(self._hashes):
            at = np.searchsorted(self._hashes, hashes).clip(max=len(self._hashes) - 1)
            known = self._hashes[at] == hashes
        if not self._added.isdisjoint(hash_list):  # rarely: a resend of a recent write
            known |= np.array([h in self._added for h in hash_list], dtype=bool)
        return known

    async def _read_hashes(self) -> np.ndarray:
        """The hashes of every key in the table, sorted (read in pages of rows)."""
        pages = []
        start = 0
        while True:
            result = await self.client.query(
                f"SELECT {self.column} FROM {self.table} LIMIT {start}, {start + READ_PAGE_ROWS}"
            )
            keys = [row[0] for row in result.rows]
            pages.append(np.fromiter(map(hash, keys), dtype=np.int64, count=len(keys)))
            if len(keys) < READ_PAGE_ROWS:
                break
            start += READ_PAGE_ROWS
        hashes = np.concatenate(pages)
        hashes.sort()
        log.info(
            "table %s: %d %ss read (as hashes: %.1f MB)", self.table, len(hashes), self.column, hashes.nbytes / 1e6
        )
        return hashes

    async def _wait_applied(self) -> None:
        """Return once SQL shows every commit made to the table (polling a while)."""
        deadline = time.monotonic() + WAL_WAIT_S
        while True:
            result = await self.client.query(
                "SELECT writerTxn, sequencerTxn, suspended, errorMessage FROM wal_tables() "
                f"WHERE name = {sql_literal(self.table)}"
            )
            if not result.rows:
                raise QuestDBError(f"table {self.table} is not in wal_tables()")
            writer_txn, sequencer_txn, suspended, error = result.rows[0]
            if writer_txn >= sequencer_txn:
                return
            if suspended or time.monotonic() >= deadline:
                state = f"suspended ({error})" if suspended else f"not applied after {WAL_WAIT_S:g}s"
                raise QuestDBError(
                    f"{sequencer_txn - writer_txn} transactions committed to {self.table} are {state}; "
                    f"{self.column}s are looked up once they are applied"
                )
            await asyncio.sleep(0.02)

    async def _stored(self, keys: list[str]) -> set[str]:
        found: set[str] = set()
        for in_list in in_lists(keys):
            result = await self.client.query(
                f"SELECT {self.column} FROM {self.table} WHERE {self.column} IN ({in_list})"
            )
            found.update(result.column(self.column))
        return found
