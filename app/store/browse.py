"""Read-only views for the operator's dashboard: the next messages to run, a paged
cursor at a time; one message with its body; which Redis node serves a partition.

Nothing here changes data: every change the dashboard makes goes through
``app.store.lifecycle`` (the scripts the JSON API calls). Each read is bounded:
a page of the delayed set is found from its cursor without reading what lies
before it (``lua/delayed_page.lua``), never by a scan.
"""

from __future__ import annotations

import asyncio
import heapq
from dataclasses import dataclass

from redis.commands.core import AsyncScript

from app.model import Record, State
from app.store.codec import (
    SEQ_BYTES,
    STREAM_ID,
    UUID_BYTES,
    CorruptRecord,
    decode_record,
    member_uuid,
    record_body,
    split_body,
    uuid_key,
)
from app.store.scripts import source
from app.store.store import Store

BODY_SHOWN = 64 * 1024  # bytes of a body a page shows; the rest is cut, and says so
MEMBER_BYTES = SEQ_BYTES + UUID_BYTES

# The member after which a page starts, with its score: (runAt ms, member bytes).
Cursor = tuple[int, bytes]


@dataclass(frozen=True, slots=True)
class Body:
    text: str
    size: int  # bytes of the whole message
    cut: bool  # only the first BODY_SHOWN bytes are in text
    target: str | None = None  # the webhook target the message names


@dataclass(frozen=True, slots=True)
class Scheduled:
    """One member of the delayed set, with what its record says (None: no record, or one
    that cannot be decoded; the promote script quarantines it when it is due)."""

    uuid: str
    run_at: int
    member: bytes
    state: str | None
    attempts: int | None
    body: Body | None


@dataclass(frozen=True, slots=True)
class MessageView:
    """A message's record and, where the service still holds it, its body."""

    record: Record
    body: Body | None
    reason: str | None = None  # why it is dead, from its dead entry


def body_of(raw: bytes | None) -> Body | None:
    """The message and target a stored body holds (``codec.split_body``)."""
    if raw is None:
        return None
    try:
        raw, target = split_body(raw)
    except ValueError:
        target = None  # shown as it is: the bytes say what went wrong
    text = raw[:BODY_SHOWN].decode("utf-8", "replace")
    return Body(text, len(raw), len(raw) > BODY_SHOWN, target)


class Browser:
    """The read-only views of one partition (one Store)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.client = store.client
        self.keys = store.keys
        self._page: AsyncScript = self.client.register_script(source("delayed_page"))

    async def scheduled(self, limit: int, after: Cursor | None) -> list[Scheduled]:
        """Up to ``limit`` members of the delayed set after ``after``, in runAt order."""
        score, member = ("", b"") if after is None else (str(after[0]), after[1])
        flat = await self._page(keys=[self.keys.delayed], args=[score, member, limit])
        pairs = [(bytes(m), int(float(s))) for m, s in zip(flat[::2], flat[1::2], strict=True)]
        valid = [(m, s) for m, s in pairs if len(m) == MEMBER_BYTES]
        records = []
        if valid:
            records = await self.client.hmget(self.keys.messages, [m[SEQ_BYTES:] for m, _ in valid])
        by_member = dict(zip((m for m, _ in valid), records, strict=True))
        return [_scheduled(m, run_at, by_member.get(m)) for m, run_at in pairs]

    async def message(self, uuid: str) -> MessageView | None:
        """The record of ``uuid`` and its body: kept in the record while scheduled or
        retrying, in the stream entry while queued, in the dead entry while dead, and
        nowhere once delivered or cancelled. CorruptRecord when the record cannot be
        decoded."""
        packed = await self.client.hget(self.keys.messages, uuid_key(uuid))
        if packed is None:
            return None
        record = decode_record(uuid, packed)
        if record.state in (State.SCHEDULED, State.RETRYING):
            return MessageView(record, body_of(record_body(packed)))
        where = {State.QUEUED: self.keys.stream, State.DEAD: self.keys.dead}.get(record.state)
        if where is None or not STREAM_ID.match(record.ref or ""):
            return MessageView(record, None)
        entries = await self.client.xrange(where, min=record.ref, max=record.ref, count=1)
        if not entries:
            return MessageView(record, None)
        fields = entries[0][1]
        if fields.get(b"u") != uuid_key(uuid):
            return MessageView(record, None)
        reason = fields.get(b"reason")
        return MessageView(
            record,
            body_of(fields.get(b"m")),
            None if reason is None else reason.decode("utf-8", "replace"),
        )

    def serving_node(self) -> str:
        """``host:port`` of the Redis node that holds this partition (its master on a
        cluster), as this client sees it."""
        find = getattr(self.client, "get_node_from_key", None)
        if find is not None:
            node = find(self.keys.delayed)
            return node.name if node is not None else "?"
        pool = getattr(self.client, "connection_pool", None)
        kwargs = getattr(pool, "connection_kwargs", {})
        if "path" in kwargs:
            return f"unix:{kwargs['path']}"
        return f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}"


def _scheduled(member: bytes, run_at: int, packed: bytes | None) -> Scheduled:
    if len(member) != MEMBER_BYTES:
        return Scheduled(member.hex(), run_at, member, None, None, None)
    uuid = member_uuid(member)
    if packed is None:
        return Scheduled(uuid, run_at, member, None, None, None)
    try:
        record = decode_record(uuid, packed)
    except CorruptRecord:
        return Scheduled(uuid, run_at, member, None, None, None)
    return Scheduled(
        uuid, run_at, member, record.state.value, record.attempts, body_of(record_body(packed))
    )


async def scheduled_across(
    browsers: list[Browser], limit: int, after: Cursor | None
) -> tuple[list[Scheduled], Cursor | None]:
    """A page over every partition in one (runAt, member) order: each partition's page
    after the cursor, merged, the first ``limit`` kept. Returns the page and the cursor
    of the next one (None when this page is the last)."""
    pages = await asyncio.gather(*(b.scheduled(limit + 1, after) for b in browsers))
    merged = list(heapq.merge(*pages, key=lambda s: (s.run_at, s.member)))
    page = merged[:limit]
    more = len(merged) > limit
    return page, ((page[-1].run_at, page[-1].member) if more and page else None)
