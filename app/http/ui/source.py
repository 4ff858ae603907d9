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

import re
from dataclasses import dataclass

from app.model import RUN_AT_MAX, InvalidInput, State
from app.recurrence import check_name, every_text, occurrences
from app.store.browse import Browser, MessageView, Scheduled, scheduled_across
from app.store.history import Minute, read_history
from app.store.lifecycle import LeaderRecord, Outcome, QueueReport
from app.store.lifecycles import DeadPageItem, Lifecycles, parse_cursor
from app.store.partitions import Partitions
from app.store.schedules import Schedules, Stored
from app.store.store import ConsumerFigures

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
class ScheduleRow:
    """One schedule as its page shows it."""

    stored: Stored
    how: str  # "cron <expr> <zone>" or "every <interval>"
    next_ms: int | None  # its next occurrence (None: paused, or none left)


def scheduled_cursor(item: Scheduled) -> str:
    return f"{item.run_at}.{item.member.hex()}"


def parse_scheduled_cursor(text: str) -> tuple[int, bytes]:
    found = _SCHEDULED_CURSOR.match(text)
    if not found:
        raise BadCursor(text)
    return int(found.group(1)), bytes.fromhex(found.group(2))


class Source:
    """:param partitions: the api's partitions (one today); their stores' client is the
    api's.
    :param prefix: EAT_PREFIX, for the per-minute history."""

    def __init__(self, partitions: Partitions) -> None:
        self.partitions = partitions
        self.prefix = partitions.settings.prefix
        # The JSON API's own: a message's actions in its partition, what spans them across.
        self.lifecycles = Lifecycles(partitions)
        self.browsers = [Browser(store) for store in partitions.stores]
        self.schedule_store = Schedules(partitions)

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

    def _lifecycle(self, uuid: str):
        return self.lifecycles.of(uuid)

    # --- figures -------------------------------------------------------------------------

    async def overview(self) -> Overview:
        report = await self.lifecycles.stats()
        rows = [
            PartitionRow(
                index,
                lc.keys.tag,
                figures.master or browser.serving_node(),
                figures,
            )
            for index, (lc, browser, figures) in enumerate(
                zip(self.lifecycles.each, self.browsers, report.partitions, strict=True)
            )
        ]
        return Overview(
            delayed=report.delayed,
            stream_length=report.stream_length,
            pending=report.pending,
            lag=report.lag,
            dead=report.dead,
            oldest_overdue_ms=report.oldest_overdue_ms,
            leader=report.leader,
            consumers=sorted(report.consumers, key=lambda c: (c.idle_ms, c.name)),
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

    async def dead(self, limit: int, cursor: str | None) -> tuple[list[DeadPageItem], str | None]:
        """Oldest first across partitions, with the JSON API's cursor (``/dead``'s)."""
        try:
            after = None if cursor is None else parse_cursor(cursor, self.count)
        except ValueError:
            raise BadCursor(cursor) from None
        return await self.lifecycles.dead_page(limit, after)

    async def schedules(
        self, limit: int, cursor: str | None, now_ms: int
    ) -> tuple[list[ScheduleRow], str | None, list[str]]:
        """A page of schedules by name (the JSON API's ``GET /schedules``), each with its
        next occurrence after ``now_ms``; the cursor of the next page; the names on this
        page whose definitions cannot be read."""
        if cursor is not None:
            try:
                check_name(cursor)
            except InvalidInput:
                raise BadCursor(cursor) from None
        page = await self.schedule_store.page(cursor, limit)
        rows = []
        for stored in page.items:
            d = stored.definition
            how = (
                f"cron {d.cron} {d.timezone}" if d.cron else f"every {every_text(d.every_ms or 0)}"
            )
            after = max(now_ms, stored.created_ms)
            upcoming = (
                [] if d.paused else list(occurrences(d, stored.created_ms, after, RUN_AT_MAX, 1))
            )
            rows.append(ScheduleRow(stored, how, upcoming[0] if upcoming else None))
        return rows, page.next, page.unreadable

    async def replay_all(self) -> tuple[int, int]:
        return await self.lifecycles.replay_all()

    async def purge_dead(self) -> int:
        return await self.lifecycles.purge_dead()


# The actions each state allows, as the scripts decide them (a stale page's request is
# answered by the script's own conflict, never decided here).
ACTIONS: dict[State, tuple[str, ...]] = {
    State.SCHEDULED: ("cancel", "reschedule", "run-now"),
    State.RETRYING: ("cancel", "reschedule", "run-now"),
    State.DEAD: ("replay", "delete-dead"),
}
