"""The Redis side of recurring schedules: definitions, progress, voiding, producing.

Definitions live under the prefix's own tag (``Keyspace.schedules`` and its
companions: one slot, one script per change); the messages a schedule produces are
ordinary messages, accepted into their uuids' partitions by the accept script.

**Why an old definition's occurrence never runs after a replace or a delete.** A
replace (or delete) is one script on the definitions' slot: it gives the name a new
generation (or none) and files the old definition under ``retired`` with a bound,
``until`` = the change's time + HORIZON_MS + VOID_SLACK_MS. No leader ever
materialises an occurrence later than its pass's Redis time + HORIZON_MS, and a pass
reads Redis' time and the definitions' version in one round trip before it produces
anything: a pass that read the old version read a time before the change, so every
old occurrence it may produce is at most ``until``. The api then *voids* every
occurrence of the old generation from the change's time to ``until`` (``void.lua``):
one waiting in the sorted set is cancelled, one not accepted yet gets a cancelled
record, so a leader that accepts it later (it read the old definition a moment
before) meets a duplicate and changes nothing. Voiding is idempotent; the leader
voids what an api that died part way left under ``retired``. Occurrences due
before the change are the old definition's to run and are left alone.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import msgspec
from redis.commands.core import AsyncScript

from app.log import get_logger
from app.model import NewMessage, Record
from app.recurrence import (
    MAX_PER_CALL,
    Definition,
    decode,
    encode,
    occurrence_uuid,
    occurrences,
    previous,
)
from app.store.codec import uuid_key
from app.store.keys import Keyspace
from app.store.partitions import Partitions
from app.store.scripts import source
from app.store.store import Accepted, encode_epoch, read_pipelined

# How far ahead of Redis' now the leader materialises occurrences, ms. Long enough that a
# leader failover (a ZooKeeper session timeout, 6 s by default, plus an election) loses
# nothing: the next occurrences are already delayed messages, which the new leader
# promotes on time or at once. Short enough that a replace voids few (30 for an
# every-second schedule) and that Redis holds at most one or two pending messages per
# minutely schedule. A constant, not a setting: the api sizes its voiding by it, so every
# process must agree.
HORIZON_MS = 30_000
# Added to the horizon when voiding: clock differences between the Redis masters that
# answered the change and the leader's pass (a failover of the definitions' master).
VOID_SLACK_MS = 5_000
# A retired definition older than this is voided by the leader (its api died part way):
# long enough that the api, which voids in milliseconds, is not doubled for nothing;
# short, since an old occurrence due before the leader voids it may still run.
RETIRED_GRACE_MS = 1_000


log = get_logger("schedules")


@dataclass(frozen=True, slots=True)
class Stored:
    """A schedule as Redis holds it."""

    name: str
    definition: Definition
    generation: int
    created_ms: int  # when this generation was stored (Redis' clock)
    progress_ms: int  # the last occurrence materialised or skipped (created_ms at first)


@dataclass(frozen=True, slots=True)
class PutResult:
    kind: str  # created, replaced, unchanged, conflict
    generation: int = 0
    at_ms: int = 0
    old_generation: int | None = None


@dataclass(frozen=True, slots=True)
class Retired:
    name: str
    generation: int
    created_ms: int
    until_ms: int
    at_ms: int
    definition: Definition


class UnreadableSchedule(Exception):
    """A schedule whose stored definition this release cannot decode (written by another
    release, or by hand): it is neither shown nor run until it is replaced or deleted."""

    def __init__(self, name: str, error: BaseException) -> None:
        super().__init__(f"schedule {name} is stored in a form this release cannot read")
        self.name = name
        self.error = error


@dataclass(frozen=True, slots=True)
class Page:
    """A page of schedules by name: the readable ones, the cursor of the next page, and
    the names on this page whose definitions cannot be read."""

    items: list[Stored]
    next: str | None
    unreadable: list[str]


def _split(meta: bytes | None) -> tuple[int, int] | None:
    if meta is None:
        return None
    gen, _, ms = meta.partition(b":")
    return int(gen), int(ms)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class Schedules:
    """Every read and change of schedule definitions, and the producing and voiding of
    their occurrences, over one client and its :class:`Partitions`."""

    def __init__(self, partitions: Partitions) -> None:
        self.partitions = partitions
        self.client = partitions.client
        self.settings = partitions.settings
        self.keys = Keyspace(self.settings.prefix)
        register = self.client.register_script
        self._put: AsyncScript = register(source("schedule_put"))
        self._delete: AsyncScript = register(source("schedule_delete"))
        self._progress: AsyncScript = register(source("schedule_progress"))
        self._void: AsyncScript = register(source("void"))

    # --- definitions ---------------------------------------------------------------------------

    async def put(self, name: str, definition: Definition, expect: int | None = None) -> PutResult:
        """Create or replace; a replaced definition's pending occurrences are voided before
        this returns. ``expect``: only if the current generation is this one."""
        k = self.keys
        reply = await self._put(
            keys=[
                k.schedules,
                k.schedule_meta,
                k.schedule_progress,
                k.schedule_retired,
                k.schedule_generation,
                k.schedule_version,
            ],
            args=[name, encode(definition), "" if expect is None else expect, self.void_ms],
        )
        kind = _text(reply[0])
        if kind == "conflict":
            return PutResult("conflict")
        result = PutResult(
            kind,
            int(reply[1]),
            int(reply[2]),
            int(reply[3]) if kind == "replaced" else None,
        )
        if result.old_generation is not None:
            await self.void_retired(result.old_generation)
        return result

    async def delete(self, name: str) -> bool:
        """Delete; its pending occurrences are voided before this returns. False: none."""
        k = self.keys
        reply = await self._delete(
            keys=[
                k.schedules,
                k.schedule_meta,
                k.schedule_progress,
                k.schedule_retired,
                k.schedule_version,
            ],
            args=[name, self.void_ms],
        )
        if _text(reply[0]) == "missing":
            return False
        await self.void_retired(int(reply[1]))
        return True

    @property
    def void_ms(self) -> int:
        return HORIZON_MS + VOID_SLACK_MS

    async def get(self, name: str) -> Stored | None:
        k = self.keys
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.hget(k.schedules, name)
            pipe.hget(k.schedule_meta, name)
            pipe.hget(k.schedule_progress, name)
            raw, meta, progress = await pipe.execute()
        try:
            return _stored(name, raw, meta, progress)
        except UNREADABLE as exc:
            raise UnreadableSchedule(name, exc) from exc

    async def count(self) -> int:
        return int(await self.client.hlen(self.keys.schedules))

    async def page(self, after: str | None, limit: int) -> Page:
        """Up to ``limit`` schedules by name after ``after``, and the cursor of the next page
        (the last name on this page; None on the last page). One that cannot be read is
        named, not shown: the others still are. Sorting every name costs O(n log n) per
        page: a few ms for 10,000 schedules."""
        names = sorted(_text(n) for n in await self.client.hkeys(self.keys.schedules))
        if after is not None:
            names = [n for n in names if n > after]
        shown = names[:limit]
        k = self.keys
        stored: list[Stored] = []
        unreadable: list[str] = []
        if shown:
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.hmget(k.schedules, shown)
                pipe.hmget(k.schedule_meta, shown)
                pipe.hmget(k.schedule_progress, shown)
                raws, metas, progresses = await pipe.execute()
            for row in zip(shown, raws, metas, progresses, strict=True):
                try:
                    item = _stored(*row)
                except UNREADABLE as exc:
                    log.error("schedule cannot be decoded", schedule=row[0], error=repr(exc))
                    unreadable.append(row[0])
                    continue
                if item is not None:  # deleted between the two reads
                    stored.append(item)
        return Page(stored, shown[-1] if len(names) > limit else None, unreadable)

    async def load_all(self) -> dict[str, Stored]:
        """Every schedule (the leader's reload after a change)."""
        k = self.keys
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.hgetall(k.schedules)
            pipe.hgetall(k.schedule_meta)
            pipe.hgetall(k.schedule_progress)
            raws, metas, progresses = await pipe.execute()
        out: dict[str, Stored] = {}
        for key, raw in raws.items():
            name = _text(key)
            try:
                item = _stored(name, raw, metas.get(key), progresses.get(key))
            except UNREADABLE as exc:
                # One bad definition must not end every leader in turn (and with them all
                # promotion): the others run, and this one is named at every reload.
                log.error("schedule cannot be decoded, skipped", schedule=name, error=repr(exc))
                continue
            if item is not None:
                out[name] = item
        return out

    async def clock(self) -> tuple[int, int, int]:
        """(Redis' now in ms, the definitions' version, how many retired wait to be voided),
        in one round trip to the definitions' master, the time read first (see the module
        docstring: a pass that reads an old version read a time before the change)."""
        k = self.keys
        reads = [
            (("TIME",), {}),
            (("GET", k.schedule_version), {}),
            (("HLEN", k.schedule_retired), {}),
        ]
        now, version, retired = await read_pipelined(self.client, k.schedules, reads)
        for reply in (now, version, retired):
            if isinstance(reply, Exception):
                raise reply
        return int(now[0]) * 1000 + int(now[1]) // 1000, int(version or 0), int(retired)

    async def record_progress(
        self, epoch: int, rows: Sequence[tuple[str, int, int]]
    ) -> tuple[int | None, list[str]]:
        """Record (name, generation, last occurrence) rows under ``epoch``: (the stored epoch
        that refused it, or None; the names whose generation is gone)."""
        k = self.keys
        args: list[object] = [encode_epoch(epoch)]
        for name, gen, last in rows:
            args += [name, gen, last]
        reply = await self._progress(
            keys=[k.schedule_meta, k.schedule_progress, k.schedule_epoch], args=args
        )
        if _text(reply[0]) == "refused":
            return int(reply[1]), []
        return None, [_text(n) for n in reply[1:]]

    # --- occurrences -----------------------------------------------------------------------

    async def produce(self, msgs: list[NewMessage]) -> list[Accepted]:
        """Accept occurrences as messages, each into its uuid's partition (the accept script:
        a second accept of the same occurrence is a duplicate)."""
        return await self.partitions.accept_many(msgs) if msgs else []

    async def retired(self) -> list[Retired]:
        raw = await self.client.hgetall(self.keys.schedule_retired)
        out = []
        for key, value in raw.items():
            try:
                out.append(_retired(value))
            except UNREADABLE as exc:
                # Left in place, and said at every look: its old occurrences are not voided.
                log.error(
                    "retired schedule cannot be decoded", generation=_text(key), error=repr(exc)
                )
        return out

    async def void_retired(self, generation: int) -> tuple[int, int]:
        """Void the pending occurrences of the retired ``generation``, then forget it."""
        raw = await self.client.hget(self.keys.schedule_retired, generation)
        if raw is None:
            return 0, 0
        try:
            retired = _retired(raw)
        except UNREADABLE as exc:
            # Replacing or deleting a definition no release here can read is how an operator
            # mends it; its occurrences cannot be derived, so nothing could ever void them.
            log.error(
                "retired schedule cannot be decoded: its occurrences already produced (up to "
                f"{HORIZON_MS // 1000} s ahead) are not cancelled",
                generation=generation,
                error=repr(exc),
            )
            await self.client.hdel(self.keys.schedule_retired, generation)
            return 0, 0
        done = await self.void(retired)
        await self.client.hdel(self.keys.schedule_retired, generation)
        return done

    async def void(self, retired: Retired) -> tuple[int, int]:
        """(cancelled, tombstoned): every occurrence of ``retired`` from its change's time to
        its ``until``, whatever its state, made sure never to run (void.lua)."""
        instants: list[int] = []
        after = retired.at_ms - 1
        while True:  # in slices: occurrences() yields at most MAX_PER_CALL at a time
            found = list(
                occurrences(
                    retired.definition, retired.created_ms, after, retired.until_ms, MAX_PER_CALL
                )
            )
            instants += found
            if len(found) < MAX_PER_CALL:
                break
            after = found[-1]
        uuids = [(occurrence_uuid(retired.name, retired.generation, at), at) for at in instants]
        return await self.void_uuids(uuids)

    async def void_uuids(self, uuids: Iterable[tuple[str, int]]) -> tuple[int, int]:
        groups: dict[int, list[object]] = {}
        for uuid, at in uuids:
            groups.setdefault(self.partitions.index_of(uuid), []).extend([uuid_key(uuid), at])
        settings = self.settings
        keep = int(settings.retention * 1000)

        async def one(p: int, args: list[object]) -> list:
            k = self.partitions.stores[p].keys
            return await self._void(
                keys=[k.messages, k.delayed, k.retention, k.dead],
                args=[keep, settings.dead_maxlen, *args],
            )

        replies = await asyncio.gather(*(one(p, args) for p, args in groups.items()))
        return sum(int(r[0]) for r in replies), sum(int(r[1]) for r in replies)

    async def produced(self, stored: Stored, count: int) -> list[tuple[int, str, Record | None]]:
        """The last ``count`` occurrences materialised, newest first: (instant, uuid, record
        or None when it is gone: purged after the retention window)."""
        instants = previous(stored.definition, stored.created_ms, stored.progress_ms, count)
        uuids = [occurrence_uuid(stored.name, stored.generation, at) for at in instants]
        records = await asyncio.gather(*(self.partitions.store_for(u).record(u) for u in uuids))
        return list(zip(instants, uuids, records, strict=True))


# What a definition, its meta or a retired entry that is not what this release writes
# raises on decoding.
UNREADABLE = (ValueError, KeyError, TypeError, msgspec.DecodeError, msgspec.ValidationError)


def _retired(raw: bytes | str) -> Retired:
    item = json.loads(raw)
    return Retired(
        name=item["name"],
        generation=int(item["generation"]),
        created_ms=int(item["created"]),
        until_ms=int(item["until"]),
        at_ms=int(item["at"]),
        definition=decode(item["definition"].encode()),
    )


def _stored(
    name: str, raw: bytes | None, meta: bytes | None, progress: bytes | None
) -> Stored | None:
    if raw is None or meta is None:
        return None
    gen, created = _split(meta)  # type: ignore[misc]
    done = _split(progress)
    return Stored(
        name=name,
        definition=decode(raw),
        generation=gen,
        created_ms=created,
        progress_ms=done[1] if done is not None and done[0] == gen else created,
    )
