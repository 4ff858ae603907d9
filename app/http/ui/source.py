"""The dashboard's one way to its data: a thin adapter over the storage core.

Every figure, page and action of the dashboard goes through :class:`Source`, and
it through ``app.store``: the actions are ``Lifecycle``'s (the scripts the JSON
API runs: no second cancel or replay), the reads are ``Lifecycle.stats``, the
dead-letter pages, ``app.store.browse`` and ``app.store.history``. One
``Lifecycle`` and one ``Browser`` per partition: a message's actions go to its
uuid's partition, pages and figures span every partition. When the api gets
partition-wide stats and a dead-letter cursor of its own, only this module
changes.
"""

from __future__ import annotations

import asyncio
import heapq
import re
from dataclasses import dataclass

from app.model import State
from app.store.browse import Browser, MessageView, Scheduled, scheduled_across
from app.store.history import Minute, read_history
from app.store.lifecycle import DeadEntry, LeaderRecord, Lifecycle, Outcome, QueueReport
from app.store.partitions import Partitions
from app.store.store import ConsumerFigures

MAX_U64 = 2**64 - 1
_DEAD_CURSOR = re.compile(r"^([0-9]{1,20})-([0-9]{1,20})\.([0-9]{1,4})\Z")
_SCHEDULED_CURSOR = re.compile(r"^([0-9]{1,15})\.([0-9a-f]{44})\Z")


class BadCursor(ValueError):
    """A cursor this dashboard did not hand out."""


@dataclass(frozen=True, slots=True)
class PartitionRow:
    index: int
    tag: str
    node: str
    report: QueueReport


@dataclass(frozen=True, slots=True)
class Overview:
    """Every figure of the overview, read from every partition at once."""

    delayed: int
    stream_length: int
    pending: int
    lag: int
    dead: int
    oldest_overdue_ms: int | None
    leader: LeaderRecord | None
    consumers: list[ConsumerFigures]
    partitions: list[PartitionRow]


@dataclass(frozen=True, slots=True)
class DeadRow:
    entry: DeadEntry
    partition: int


def dead_cursor(row: DeadRow) -> str:
    return f"{row.entry.id}.{row.partition}"


def parse_dead_cursor(text: str, count: int) -> tuple[int, int, int]:
    """(ms, seq, partition) of a dead-letter page's cursor; BadCursor otherwise."""
    found = _DEAD_CURSOR.match(text)
    if not found:
        raise BadCursor(text)
    ms, seq, partition = (int(part) for part in found.groups())
    if ms > MAX_U64 or seq > MAX_U64 or partition >= count:
        raise BadCursor(text)
    return ms, seq, partition


def scheduled_cursor(item: Scheduled) -> str:
    return f"{item.run_at}.{item.member.hex()}"


def parse_scheduled_cursor(text: str) -> tuple[int, bytes]:
    found = _SCHEDULED_CURSOR.match(text)
    if not found:
        raise BadCursor(text)
    return int(found.group(1)), bytes.fromhex(found.group(2))


def _before(ms: int, seq: int) -> str | None:
    """The id just before ``ms-seq``: an exclusive start that includes ``ms-seq``."""
    if seq:
        return f"{ms}-{seq - 1}"
    return f"{ms - 1}-{MAX_U64}" if ms else None


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq)


class Source:
    """:param partitions: the api's partitions (one today); their stores' client is the
    api's.
    :param prefix: EAT_PREFIX, for the per-minute history."""

    def __init__(self, partitions: Partitions) -> None:
        self.partitions = partitions
        self.prefix = partitions.settings.prefix
        self.lifecycles = [Lifecycle(store) for store in partitions.stores]
        self.browsers = [Browser(store) for store in partitions.stores]

    @classmethod
    def of(cls, state) -> Source:
        """From the api's lifespan state: its Partitions, or its one Store's client."""
        partitions = getattr(state, "partitions", None)
        if partitions is None:
            store = state.store
            partitions = Partitions(store.client, store.settings)
        return cls(partitions)

    @property
    def count(self) -> int:
        return self.partitions.count

    def _lifecycle(self, uuid: str) -> Lifecycle:
        return self.lifecycles[self.partitions.index_of(uuid)]

    # --- figures -------------------------------------------------------------------------

    async def overview(self) -> Overview:
        reports = await asyncio.gather(*(lc.stats() for lc in self.lifecycles))
        rows = [
            PartitionRow(index, lc.keys.tag, browser.serving_node(), report)
            for index, (lc, browser, report) in enumerate(
                zip(self.lifecycles, self.browsers, reports, strict=True)
            )
        ]
        leaders = [r.leader for r in reports if r.leader is not None]
        overdue = [r.oldest_overdue_ms for r in reports if r.oldest_overdue_ms is not None]
        # A worker is a consumer in every partition's group: one row per name.
        consumers: dict[str, ConsumerFigures] = {}
        for report in reports:
            for c in report.consumers:
                seen = consumers.get(c.name)
                consumers[c.name] = (
                    c
                    if seen is None
                    else ConsumerFigures(
                        c.name, seen.pending + c.pending, min(seen.idle_ms, c.idle_ms)
                    )
                )
        return Overview(
            delayed=sum(r.delayed for r in reports),
            stream_length=sum(r.stream_length for r in reports),
            pending=sum(r.pending for r in reports),
            lag=sum(r.lag for r in reports),
            dead=sum(r.dead for r in reports),
            oldest_overdue_ms=max(overdue, default=None),
            leader=max(leaders, key=lambda leader: leader.epoch, default=None),
            consumers=sorted(consumers.values(), key=lambda c: (c.idle_ms, c.name)),
            partitions=rows,
        )

    async def history(self, now: float, minutes: int = 60) -> list[Minute]:
        return await read_history(self.partitions.client, self.prefix, now, minutes)

    # --- one message ---------------------------------------------------------------------

    async def message(self, uuid: str) -> MessageView | None:
        return await self.browsers[self.partitions.index_of(uuid)].message(uuid)

    async def cancel(self, uuid: str) -> Outcome:
        return await self._lifecycle(uuid).cancel(uuid)

    async def reschedule(self, uuid: str, run_at: int) -> Outcome:
        return await self._lifecycle(uuid).reschedule(uuid, run_at)

    async def run_now(self, uuid: str) -> Outcome:
        """Reschedule to Redis' own now: the script finds it due and queues it."""
        lc = self._lifecycle(uuid)
        seconds, micros = await lc.client.time()
        return await lc.reschedule(uuid, int(seconds) * 1000 + int(micros) // 1000)

    async def replay(self, uuid: str) -> Outcome:
        return await self._lifecycle(uuid).replay(uuid)

    async def drop_dead(self, uuid: str) -> bool:
        return await self._lifecycle(uuid).drop_dead(uuid)

    # --- pages ---------------------------------------------------------------------------

    async def scheduled(self, limit: int, cursor: str | None) -> tuple[list[Scheduled], str | None]:
        after = None if cursor is None else parse_scheduled_cursor(cursor)
        page, more = await scheduled_across(self.browsers, limit, after)
        return page, (None if more is None else scheduled_cursor(page[-1]))

    async def dead(self, limit: int, cursor: str | None) -> tuple[list[DeadRow], str | None]:
        """Oldest first across partitions, in (entry id, partition) order."""
        starts: list[str | None] = [None] * self.count
        if cursor is not None:
            ms, seq, at = parse_dead_cursor(cursor, self.count)
            # Partitions up to the cursor's: after its id; those after it: from its id on.
            starts = [f"{ms}-{seq}" if p <= at else _before(ms, seq) for p in range(self.count)]
        pages = await asyncio.gather(
            *(
                lc.dead_page(limit + 1, start)
                for lc, start in zip(self.lifecycles, starts, strict=True)
            )
        )
        rows = heapq.merge(
            *([DeadRow(entry, p) for entry in entries] for p, (entries, _) in enumerate(pages)),
            key=lambda row: (_id_key(row.entry.id), row.partition),
        )
        merged = list(rows)
        page = merged[:limit]
        return page, (dead_cursor(page[-1]) if len(merged) > limit and page else None)

    async def replay_all(self) -> tuple[int, int]:
        done = await asyncio.gather(*(lc.replay_all() for lc in self.lifecycles))
        return sum(r for r, _ in done), sum(s for _, s in done)

    async def purge_dead(self) -> int:
        return sum(await asyncio.gather(*(lc.purge_dead() for lc in self.lifecycles)))


# The actions each state allows, as the scripts decide them (a stale page's request is
# answered by the script's own conflict, never decided here).
ACTIONS: dict[State, tuple[str, ...]] = {
    State.SCHEDULED: ("cancel", "reschedule", "run-now"),
    State.RETRYING: ("cancel", "reschedule", "run-now"),
    State.DEAD: ("replay", "delete-dead"),
}
