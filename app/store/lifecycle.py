"""The Redis side of the lifecycle API: look up, cancel, reschedule, bulk accept,
dead letters, stats. Thin like ``app.store.store``: one script call per state change,
typed results (plain dataclasses: the HTTP layer turns them into its wire structs).

Every change is atomic (one Lua script, or one MULTI for a purge). Lookups of a
dead entry by uuid start from the id the record keeps (``ref``) and fall back
to a scan of the dead stream in bounded script calls: the record may be gone
(its retention window passed while the entry stayed) or predate ``ref``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Literal

from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript

from app.model import NewMessage, Record, State
from app.store.codec import STREAM_ID, CorruptRecord, split_body, uuid_key, uuid_text_or_none
from app.store.scripts import source
from app.store.store import (
    QUEUE_FIGURES_READS,
    Accepted,
    ConsumerFigures,
    Store,
    queue_figures,
    queue_figures_reads,
    read_pipelined,
)

# Dead entries one replay/delete script call examines: bounds the time it blocks Redis.
DEAD_BATCH = 200


@dataclass(frozen=True, slots=True)
class Outcome:
    """Result of a change to one message.

    ``done``: it happened (``state``/``run_at`` are the new ones); ``missing``: no such
    message; ``conflict``: the message is in ``state``, which does not allow the change.
    """

    kind: Literal["done", "missing", "conflict"]
    state: str | None = None
    run_at: int | None = None


@dataclass(frozen=True, slots=True)
class DeadEntry:
    """One dead-stream entry; what it lacks (a malformed legacy item) is None."""

    id: str
    uuid: str | None
    message: str | None
    run_at: int | None
    attempts: int | None
    reason: str | None
    dead_at: int | None
    target: str | None = None  # the webhook target the message names


@dataclass(frozen=True, slots=True)
class LeaderRecord:
    identifier: str
    epoch: int
    since: int  # epoch ms this leader first promoted under this epoch


@dataclass(frozen=True, slots=True)
class QueueReport:
    """Every figure of ``/stats``, read in one round trip."""

    delayed: int
    stream_length: int
    pending: int
    lag: int
    dead: int
    consumers: list[ConsumerFigures]
    leader: LeaderRecord | None
    oldest_overdue_ms: int | None
    partition: int = 0
    master: str | None = None  # host:port of the cluster master serving the partition


@dataclass(frozen=True, slots=True)
class _Scan:
    changed: int
    examined: int
    last: str
    blocked: str


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("utf-8", "replace")


def _int(value: bytes | None) -> int | None:
    try:
        return None if value is None else int(value)
    except ValueError:
        return None


def parse_dead(entry_id: bytes, fields: dict[bytes, bytes]) -> DeadEntry:
    body, target = fields.get(b"m"), None
    if body is not None:
        with contextlib.suppress(ValueError):  # a cut envelope is shown as it is
            body, target = split_body(body)
    return DeadEntry(
        id=entry_id.decode(),
        uuid=uuid_text_or_none(fields.get(b"u")),
        message=_text(body),
        target=target,
        run_at=_int(fields.get(b"r")),
        attempts=_int(fields.get(b"a")),
        reason=_text(fields.get(b"reason")),
        dead_at=_int(fields.get(b"at")),
    )


def _outcome(reply: list) -> Outcome:
    """The reply of cancel or reschedule; a third element counts a quarantined record."""
    kind = reply[0].decode()
    if kind == "missing":
        return Outcome("missing")
    if kind == "conflict":
        return Outcome("conflict", state=reply[1].decode())
    return Outcome("done", state=kind, run_at=int(reply[1]))


class Lifecycle:
    """Lifecycle operations over a Store's client, settings and keys."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.client = store.client
        self.settings = store.settings
        self.keys = store.keys
        register = self.client.register_script
        self._cancel: AsyncScript = register(source("cancel"))
        self._reschedule: AsyncScript = register(source("reschedule"))
        self._replay: AsyncScript = register(source("replay"))
        self._drop_dead: AsyncScript = register(source("drop_dead"))

    # --- one message -------------------------------------------------------------------------

    async def record(self, uuid: str) -> Record | None:
        return await self.store.record(uuid)

    async def cancel(self, uuid: str) -> Outcome:
        k = self.keys
        reply = await self.store.change(
            self._cancel,
            [k.messages, k.delayed, k.retention, k.dead],
            [uuid_key(uuid), self._keep_ms, self.settings.dead_maxlen],
        )
        return self._changed(reply, "cancel")

    async def reschedule(self, uuid: str, run_at: int) -> Outcome:
        k = self.keys
        reply = await self.store.change(
            self._reschedule,
            [k.messages, k.delayed, k.stream, k.sequence, k.dead, k.retention],
            [uuid_key(uuid), run_at, k.wake_channel, self.settings.dead_maxlen, self._keep_ms],
        )
        return self._changed(reply, "reschedule")

    @property
    def _keep_ms(self) -> int:
        return int(self.settings.retention * 1000)

    def _changed(self, reply: list, during: str) -> Outcome:
        if len(reply) > 2:
            self.store.report_quarantined(during, int(reply[2]))
        return _outcome(reply)

    async def accept_many(self, msgs: list[NewMessage]) -> list[Accepted]:
        """All in one accept script call: one round trip, one atomic step."""
        return await self.store.accept_many(msgs) if msgs else []

    # --- dead letters ------------------------------------------------------------------------

    async def dead_page(self, limit: int, cursor: str | None) -> tuple[list[DeadEntry], str | None]:
        """Up to ``limit`` entries after ``cursor`` (an entry id), oldest first, and the
        cursor of the next page (None when this is the last)."""
        entries = await self.dead_entries("-" if cursor is None else "(" + cursor, limit + 1)
        items = entries[:limit]
        return items, (items[-1].id if len(entries) > limit else None)

    async def dead_entries(self, start: str, count: int) -> list[DeadEntry]:
        """Up to ``count`` entries from ``start`` (an XRANGE bound), oldest first."""
        entries = await self.client.xrange(self.keys.dead, min=start, max="+", count=count)
        return [parse_dead(eid, fields) for eid, fields in entries]

    async def _replay_range(self, start: str, end: str, count: int, uuid: str) -> _Scan:
        k = self.keys
        replayed, examined, last, blocked, quarantined = await self.store.change(
            self._replay,
            [k.messages, k.dead, k.stream],
            [start, end, count, uuid_key(uuid) if uuid else "", self.settings.dead_maxlen],
        )
        if quarantined:
            self.store.report_quarantined("replay", int(quarantined))
        return _Scan(int(replayed), int(examined), last.decode(), blocked.decode())

    async def _drop_range(self, start: str, end: str, count: int, uuid: str) -> _Scan:
        deleted, examined, last = await self.store.change(
            self._drop_dead, [self.keys.dead], [start, end, count, uuid_key(uuid)]
        )
        return _Scan(int(deleted), int(examined), last.decode(), "")

    async def _by_uuid(self, uuid: str, step) -> _Scan:
        """Apply ``step`` (replay or drop) to the dead entry of ``uuid``: first at the id its
        record keeps, else scanning the whole dead stream, DEAD_BATCH entries per call."""
        try:
            record = await self.store.record(uuid)
        except CorruptRecord:
            record = None  # the script quarantines it; the scan finds the entry
        if record is not None and record.state is State.DEAD and STREAM_ID.match(record.ref or ""):
            found = await step(record.ref, record.ref, 1, uuid)
            if found.changed or found.blocked:
                return found
        start, blocked = "-", ""
        while True:
            scan = await step(start, "+", DEAD_BATCH, uuid)
            blocked = blocked or scan.blocked
            if scan.changed or scan.examined < DEAD_BATCH:
                return _Scan(scan.changed, 0, scan.last, blocked)
            start = "(" + scan.last

    async def replay(self, uuid: str) -> Outcome:
        """Send the dead message ``uuid`` back to the stream, attempts reset."""
        scan = await self._by_uuid(uuid, self._replay_range)
        if scan.changed:
            return Outcome("done", state=State.QUEUED.value)
        if scan.blocked:
            return Outcome("conflict", state=scan.blocked)
        return Outcome("missing")

    async def replay_all(self) -> tuple[int, int]:
        """Replay every entry present when called, DEAD_BATCH per atomic script call.

        Returns (replayed, skipped). Entries dead-lettered meanwhile (after the last id
        seen at the start) are left for the next call, so this always ends.
        """
        tail = await self.client.xrevrange(self.keys.dead, max="+", min="-", count=1)
        if not tail:
            return 0, 0
        end = tail[0][0].decode()
        start, replayed, skipped = "-", 0, 0
        while True:
            scan = await self._replay_range(start, end, DEAD_BATCH, "")
            replayed += scan.changed
            skipped += scan.examined - scan.changed
            if scan.examined < DEAD_BATCH or scan.last == end:
                return replayed, skipped
            start = "(" + scan.last

    async def drop_dead(self, uuid: str) -> bool:
        """Delete the dead entry of ``uuid``; False when there is none."""
        return bool((await self._by_uuid(uuid, self._drop_range)).changed)

    async def purge_dead(self) -> int:
        """Delete the whole dead stream at once (UNLINK frees it off the main thread)."""
        replication = self.store.replication
        if replication is not None:
            dead = self.keys.dead
            length, _ = await replication.transaction(dead, [("XLEN", dead), ("UNLINK", dead)])
            return int(length)
        if isinstance(self.client, RedisCluster):
            # redis-py's cluster pipeline answers a MULTI of it as one value: spell it out,
            # on the connection to the partition's master.
            dead = self.keys.dead
            commands = [(("MULTI",), {}), (("XLEN", dead), {}), (("UNLINK", dead), {})]
            replies = await read_pipelined(self.client, dead, [*commands, (("EXEC",), {})])
            for reply in replies:
                if isinstance(reply, Exception):
                    raise reply
            return int(replies[-1][0])
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.xlen(self.keys.dead)
            pipe.unlink(self.keys.dead)
            length, _ = await pipe.execute()
        return int(length)

    # --- stats -------------------------------------------------------------------------------

    async def stats(self) -> QueueReport:
        """Every figure in one pipelined round trip (read-only, so not a transaction)."""
        k = self.keys
        reads = [*queue_figures_reads(k), (("HGETALL", k.leader), {})]
        replies = await read_pipelined(self.client, k.delayed, reads)
        figures = queue_figures(replies)
        leader = replies[QUEUE_FIGURES_READS]
        master = None
        if isinstance(self.client, RedisCluster):
            master = self.client.get_node_from_key(k.delayed).name
        return QueueReport(
            delayed=figures.delayed,
            stream_length=figures.stream_length,
            pending=figures.pending,
            lag=figures.lag,
            dead=figures.dead,
            consumers=list(figures.members),
            leader=_leader(leader),
            oldest_overdue_ms=figures.oldest_overdue_ms,
            partition=self.store.partition,
            master=master,
        )


def _leader(fields: dict[bytes, bytes] | Exception) -> LeaderRecord | None:
    if not isinstance(fields, dict) or not fields:
        return None
    try:
        return LeaderRecord(
            identifier=fields[b"identifier"].decode("utf-8", "replace"),
            epoch=int(fields[b"epoch"]),
            since=int(fields[b"since"]),
        )
    except (KeyError, ValueError):
        return None
