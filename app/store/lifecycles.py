"""The lifecycle operations over every partition (``EAT_PARTITIONS``).

A change to one message goes to the partition of its uuid; the dead letters,
the figures, replay-all and purge span them all, each partition asked once and
all at once (each is one slot, so one master on a cluster: a slow master delays
the answer, it does not serialise the others).

**The dead-letter cursor.** Every partition has its own dead stream, whose entry
ids (``<ms>-<seq>``, the master's clock) only grow. The pages list all of them in
one order, ``(entry id, partition)``, oldest first, and a page's ``next`` is the
last position it showed, ``<ms>-<seq>-<partition>``: the next page is whatever
comes after it in that order. An entry present when paging started is shown
exactly once, whatever is added or removed meanwhile; one added meanwhile is
shown at most once (later in the order than the cursor, or not at all). With one
partition the cursor is the entry id, as it always was, and ``<ms>-<seq>`` is
still read with several (as "after this id, in every partition").
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field

from app.model import NewMessage
from app.store.browse import Browser, MessageView
from app.store.lifecycle import DeadEntry, LeaderRecord, Lifecycle, Outcome, QueueReport
from app.store.partitions import Partitions, merged_consumers
from app.store.store import Accepted, ConsumerFigures

# ASCII digits only (int() reads the digits of every script); each part of an id fits
# 64 bits, which Redis requires of an id (checked by :func:`parse_cursor`).
CURSOR = re.compile(r"([0-9]{1,20})-([0-9]{1,20})(?:-([0-9]{1,4}))?\Z")
_U64 = 2**64


@dataclass(frozen=True, slots=True)
class Cursor:
    """A position in the order of every partition's dead entries."""

    ms: int
    seq: int
    partition: int | None  # None: after this id in every partition

    @property
    def id(self) -> str:
        return f"{self.ms}-{self.seq}"


def parse_cursor(text: str, count: int) -> Cursor:
    """``<ms>-<seq>`` or ``<ms>-<seq>-<partition>``; ValueError for anything else (a
    partition there is not, or a part over 64 bits)."""
    match = CURSOR.match(text)
    if match is None:
        raise ValueError(text)
    ms, seq, partition = match.groups()
    cursor = Cursor(int(ms), int(seq), None if partition is None else int(partition))
    if cursor.ms >= _U64 or cursor.seq >= _U64:
        raise ValueError(text)
    if cursor.partition is not None and cursor.partition >= count:
        raise ValueError(text)
    return cursor


@dataclass(frozen=True, slots=True)
class DeadPageItem:
    partition: int
    entry: DeadEntry


@dataclass(frozen=True, slots=True)
class Report:
    """``/stats``: the figures summed over the partitions, and each partition's own."""

    delayed: int
    stream_length: int
    pending: int
    lag: int
    dead: int
    consumers: list[ConsumerFigures]
    leader: LeaderRecord | None
    oldest_overdue_ms: int | None
    partitions: list[QueueReport] = field(default_factory=list)


class Lifecycles:
    """:class:`Lifecycle` per partition of ``partitions``, and what spans them."""

    def __init__(self, partitions: Partitions) -> None:
        self.partitions = partitions
        self.count = partitions.count
        self.each = [Lifecycle(store) for store in partitions.stores]
        self.browsers = [Browser(store) for store in partitions.stores]

    def of(self, uuid: str) -> Lifecycle:
        """The lifecycle of the partition ``uuid`` lives in."""
        return self.each[self.partitions.index_of(uuid)] if self.count > 1 else self.each[0]

    # --- one message: its partition ----------------------------------------------------------

    async def record(self, uuid: str):
        return await self.of(uuid).record(uuid)

    async def message(self, uuid: str) -> MessageView | None:
        """The record and, while the service holds it, the body (with the target it
        names): ``Browser.message`` of the partition ``uuid`` lives in."""
        index = self.partitions.index_of(uuid) if self.count > 1 else 0
        return await self.browsers[index].message(uuid)

    async def cancel(self, uuid: str) -> Outcome:
        return await self.of(uuid).cancel(uuid)

    async def reschedule(self, uuid: str, run_at: int) -> Outcome:
        return await self.of(uuid).reschedule(uuid, run_at)

    async def replay(self, uuid: str) -> Outcome:
        return await self.of(uuid).replay(uuid)

    async def drop_dead(self, uuid: str) -> bool:
        return await self.of(uuid).drop_dead(uuid)

    async def accept_many(self, msgs: list[NewMessage]) -> list[Accepted]:
        """Grouped by partition, one accept call per partition touched: atomic per
        partition, not across them."""
        return await self.partitions.accept_many(msgs) if msgs else []

    # --- across partitions -------------------------------------------------------------------

    async def dead_page(
        self, limit: int, cursor: Cursor | None
    ) -> tuple[list[DeadPageItem], str | None]:
        """Up to ``limit`` dead entries after ``cursor``, oldest first over every partition,
        and the cursor of the next page (None on the last)."""
        if self.count == 1:
            entries, next_id = await self.each[0].dead_page(
                limit, None if cursor is None else cursor.id
            )
            return [DeadPageItem(0, e) for e in entries], next_id
        # Each partition's entries after the cursor's position: those with a greater id,
        # and in a partition after the cursor's, those with the same id too.
        last = self.count - 1 if cursor is None or cursor.partition is None else cursor.partition
        starts = [
            "-" if cursor is None else ("(" if p <= last else "") + cursor.id
            for p in range(self.count)
        ]
        # limit + 1 from each: if the merge has more than limit, a next page exists.
        reads = (lc.dead_entries(at, limit + 1) for lc, at in zip(self.each, starts, strict=True))
        pages = await asyncio.gather(*reads)
        merged = sorted(
            (
                (_id_order(entry.id), p, entry)
                for p, entries in enumerate(pages)
                for entry in entries
            ),
            key=lambda row: row[:2],
        )
        items = [DeadPageItem(p, entry) for _, p, entry in merged[:limit]]
        if len(merged) <= limit:
            return items, None
        tail = items[-1]
        return items, f"{tail.entry.id}-{tail.partition}"

    async def replay_all(self) -> tuple[int, int]:
        """Every partition's dead entries replayed (each in atomic batches); the sums of
        (replayed, skipped)."""
        each = await asyncio.gather(*(lc.replay_all() for lc in self.each))
        return sum(r for r, _ in each), sum(s for _, s in each)

    async def purge_dead(self) -> int:
        """Every partition's dead stream deleted (one UNLINK each); how many entries went."""
        return sum(await asyncio.gather(*(lc.purge_dead() for lc in self.each)))

    async def stats(self) -> Report:
        """Each partition's figures (one round trip each, all at once), and their sums."""
        each = await asyncio.gather(*(lc.stats() for lc in self.each))
        overdue = [r.oldest_overdue_ms for r in each if r.oldest_overdue_ms is not None]
        leaders = [r.leader for r in each if r.leader is not None]
        return Report(
            delayed=sum(r.delayed for r in each),
            stream_length=sum(r.stream_length for r in each),
            pending=sum(r.pending for r in each),
            lag=sum(r.lag for r in each),
            dead=sum(r.dead for r in each),
            consumers=merged_consumers(r.consumers for r in each),
            # One leader promotes every partition: the newest record names it (a partition
            # it has not promoted for a few seconds has none).
            leader=max(leaders, key=lambda r: r.epoch, default=None),
            oldest_overdue_ms=max(overdue, default=None),
            partitions=list(each),
        )


def _id_order(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq)
