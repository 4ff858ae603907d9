"""The thin Redis client: one method per script, typed results, no policy.

Everything here is a single round trip; what to call and when is decided by
the API, the promotion loop and the worker.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec
from redis.asyncio.cluster import PipelineCommand, RedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import AskError, MovedError, RedisError, ResponseError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from app import metrics
from app.log import get_logger
from app.model import NewMessage, Record
from app.settings import Settings
from app.store.client import StoreRedis
from app.store.codec import (
    FORMAT,
    UUID_BYTES,
    decode_record,
    pack_body,
    split_body,
    uuid_key,
    uuid_text,
)
from app.store.keys import CONSUMER_GROUP, Keyspace
from app.store.replicated import Replication
from app.store.scripts import Scripts

log = get_logger("store")

EPOCH_WIDTH = 20  # digits: a 64-bit ZooKeeper zxid fits, and padded strings compare like numbers
PURGE_PER_ACK = 100
# The leader record outlives the promoter's longest idle wait (1 s) several times over,
# so it disappears only when no leader has promoted for this long.
LEADER_TTL_MS = 5000


def encode_epoch(epoch: int) -> str:
    if not 0 <= epoch < 10**EPOCH_WIDTH:
        raise ValueError(f"epoch out of range: {epoch}")
    return f"{epoch:0{EPOCH_WIDTH}d}"


def group_missing(exc: BaseException) -> bool:
    """Whether Redis answered NOGROUP: the stream or its consumer group is gone (a DEL, an
    eviction, a Redis restarted without its data). A worker makes the group anew."""
    return isinstance(exc, ResponseError) and str(exc).startswith("NOGROUP")


class StorageFormatError(RuntimeError):
    """Redis holds this prefix's data in a format this release does not read."""


class Accepted(msgspec.Struct, frozen=True, gc=False):
    created: bool
    state: str
    run_at: int


@dataclass(frozen=True, slots=True)
class Promoted:
    """Result of one promote call. ``refused_by`` is set when a newer epoch is stored;
    ``quarantined`` counts the due members moved aside instead (records or members that
    could not be decoded)."""

    moved: int = 0
    now_ms: int = 0
    next_due_ms: int | None = None
    refused_by: int | None = None
    quarantined: int = 0


@dataclass(frozen=True, slots=True)
class ConsumerFigures:
    """One consumer of the workers group, as XINFO CONSUMERS reports it."""

    name: str
    pending: int
    idle_ms: int


@dataclass(frozen=True, slots=True)
class QueueStats:
    """Cluster-wide figures, read in one pipeline."""

    delayed: int
    stream_length: int
    pending: int
    lag: int
    consumers: int
    dead: int
    # How long the earliest message of the delayed set has been due (Redis' clock);
    # None when none is due. Promotion keeps this near 0 while a leader works.
    oldest_overdue_ms: int | None = None
    members: tuple[ConsumerFigures, ...] = ()


@dataclass(slots=True)
class Delivery:
    """One stream entry handed to a worker (not frozen: a frozen dataclass costs a
    microsecond more to build, per message, on the worker's hot path)."""

    id: str
    uuid: str
    key: bytes  # the uuid as stored (its 16 bytes)
    message: str
    run_at: int
    attempts: int  # failed handler runs before this delivery
    # The partition whose stream it came from (0 with one partition): its acknowledgement,
    # failure, claim renewal and reclaim go to that partition's keys.
    partition: int = 0
    # The webhook target the message names (None: none; see codec.pack_body).
    target: str | None = None


_FIELD_ORDER = (b"u", b"m", b"r", b"a")
# Storage format 1: a uuid as its canonical text; a sorted-set member, 12 hex digits first.
_UUID_TEXT = 36
_FORMAT_1_SEQ = 12
_PROBLEM_BYTES = 200  # of what was wrong with an entry, kept in its quarantine entry


class CorruptEntry(ValueError):
    """A stream entry that cannot be made a delivery: ``Store.read`` and ``Store.reclaim``
    quarantine it (``app/store/lua/quarantine.lua``) instead of handing it out."""

    def __init__(self, entry_id: str, problem: str) -> None:
        super().__init__(f"stream entry {entry_id} cannot be decoded: {problem}")
        self.entry_id = entry_id
        self.problem = problem


QUEUE_FIGURES_READS = 7
_LOST = (RedisConnectionError, RedisTimeoutError, OSError)
Read = tuple[tuple, dict]  # a command's arguments, and the options its reply is parsed with


def queue_figures_reads(keys: Keyspace) -> list[Read]:
    """The QUEUE_FIGURES_READS reads :func:`queue_figures` makes QueueStats of."""
    return [
        (("ZCARD", keys.delayed), {}),
        (("XLEN", keys.stream), {}),
        (("XLEN", keys.dead), {}),
        (("XINFO GROUPS", keys.stream), {}),
        (("XINFO CONSUMERS", keys.stream, CONSUMER_GROUP), {}),
        (
            ("ZRANGE", keys.delayed, 0, 0, "WITHSCORES"),
            {"withscores": True, "score_cast_func": float},
        ),
        # Redis' clock, from the master that holds the partition (overdue is measured by it).
        (("TIME",), {}),
    ]


async def read_pipelined(client, key: str, reads: list[Read]) -> list:
    """``reads`` in one round trip to the master serving ``key``: the parsed replies, an
    error reply in its place (as ``raise_on_error=False`` gives them).

    A cluster pipeline cannot do this: it sends a command without a key (TIME) to another
    node, so the partition's own master is asked directly, and a redirection (a reshard,
    a failover) updates the slot map and asks again.
    """
    if not isinstance(client, RedisCluster):
        async with client.pipeline(transaction=False) as pipe:
            for args, options in reads:
                pipe.execute_command(*args, **options)
            return await pipe.execute(raise_on_error=False)
    for attempt in range(3):
        node = client.get_node_from_key(key)
        commands = [PipelineCommand(i, *args, **options) for i, (args, options) in enumerate(reads)]
        await node.execute_pipeline(commands)
        replies = [c.result for c in commands]
        # execute_pipeline keeps every exception in its place, a lost connection's too.
        lost = next((r for r in replies if isinstance(r, _LOST)), None)
        if lost is not None:
            raise lost
        moved = next((r for r in replies if isinstance(r, AskError | TryAgainError)), None)
        if moved is None:
            return replies
        if isinstance(moved, MovedError):
            await client.nodes_manager.move_slot(moved)
        elif attempt == 2:
            raise moved
    raise RedisError(f"the slot of {key} kept moving")


def queue_figures(replies: list) -> QueueStats:
    """QueueStats from the replies to :func:`queue_figures_reads` (``raise_on_error=False``:
    XINFO fails while the stream or its group does not exist yet, which means zeros)."""
    delayed, length, dead, groups, members, first, now = replies[:QUEUE_FIGURES_READS]
    pending = consumers = 0
    if isinstance(groups, list):
        for info in groups:  # redis-py parses each group into a dict with str keys
            if info.get("name") in (CONSUMER_GROUP, CONSUMER_GROUP.encode()):
                pending = int(info.get("pending", 0))
                consumers = int(info.get("consumers", 0))
    length = length if isinstance(length, int) else 0
    return QueueStats(
        delayed=delayed if isinstance(delayed, int) else 0,
        stream_length=length,
        pending=pending,
        # Acknowledged entries are deleted, so what is in the stream and not pending is
        # exactly what no worker has read yet (XINFO's own lag is unknown after XDEL).
        lag=max(0, length - pending),
        consumers=consumers,
        dead=dead if isinstance(dead, int) else 0,
        oldest_overdue_ms=_overdue_ms(first, now),
        members=_consumer_figures(members),
    )


def _overdue_ms(first: list | Exception, now: list | Exception) -> int | None:
    if not first or isinstance(first, Exception) or isinstance(now, Exception):
        return None
    now_ms = int(now[0]) * 1000 + int(now[1]) // 1000
    due = int(first[0][1])
    return now_ms - due if due <= now_ms else None


def _consumer_figures(members: list | Exception) -> tuple[ConsumerFigures, ...]:
    if not isinstance(members, list):  # no stream or group yet: no consumers
        return ()
    figures = []
    for c in members:  # redis-py parses each consumer into a dict with str keys
        name = c.get("name", b"")
        figures.append(
            ConsumerFigures(
                name=name.decode() if isinstance(name, bytes) else str(name),
                pending=int(c.get("pending", 0)),
                idle_ms=int(c.get("idle", 0)),
            )
        )
    return tuple(figures)


def parse_entry(entry_id: bytes | str, fields: list | dict, partition: int = 0) -> Delivery:
    """A stream entry (raw XREADGROUP or XAUTOCLAIM fields) of ``partition``'s stream as a
    Delivery; CorruptEntry when it is not one (a field missing, a uuid not of 16 bytes,
    runAt or attempts not an integer, a body not UTF-8)."""
    if (
        isinstance(fields, list)
        and len(fields) == 8
        and tuple(fields[::2]) == _FIELD_ORDER
        and len(fields[1]) == UUID_BYTES
    ):
        # The scripts write every entry in this order: no dict needed.
        try:
            return Delivery(
                id=entry_id.decode() if isinstance(entry_id, bytes) else entry_id,
                uuid=uuid_text(fields[1]),
                key=fields[1],
                message=fields[3].decode("utf-8", "surrogatepass"),
                run_at=int(fields[5]),
                attempts=int(fields[7]),
                partition=partition,
            )
        except ValueError:  # UnicodeDecodeError included; the slow path names the field
            pass
    text_id = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return _parse_checked(text_id, fields, partition)


def _parse_checked(entry_id: str, fields: list | dict, partition: int) -> Delivery:
    """parse_entry for an entry not in the scripts' shape: each field checked, by name."""
    if isinstance(fields, list):
        if len(fields) % 2:
            raise CorruptEntry(entry_id, "an odd number of field names and values")
        fields = dict(zip(fields[::2], fields[1::2], strict=True))
    key = fields.get(b"u")
    if not isinstance(key, bytes) or len(key) != UUID_BYTES:
        raise CorruptEntry(entry_id, "u is not a uuid's 16 bytes")
    body = fields.get(b"m")
    if not isinstance(body, bytes):
        raise CorruptEntry(entry_id, "m (the body) is missing")
    try:
        # The fast path's decode fails on an envelope's first byte: it comes here.
        body, target = split_body(body)
    except ValueError:
        target = None  # no envelope: judged as a message below, where 0xFF is not UTF-8
    try:
        message = body.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        raise CorruptEntry(entry_id, "m (the body) is not UTF-8") from None
    numbers = []
    for name in (b"r", b"a"):
        try:
            numbers.append(int(fields[name]))
        except (KeyError, ValueError, TypeError):
            raise CorruptEntry(entry_id, f"{name.decode()} is not an integer") from None
    return Delivery(
        id=entry_id,
        uuid=uuid_text(key),
        key=key,
        message=message,
        run_at=numbers[0],
        attempts=numbers[1],
        partition=partition,
        target=target,
    )


def parse_entries(entries, partition: int = 0) -> tuple[list[Delivery], list[CorruptEntry]]:
    """parse_entry of each ``(id, fields)``: the deliveries, and the entries that are none.
    An entry without fields (deleted since it was delivered) is neither: nothing to do."""
    out: list[Delivery] = []
    corrupt: list[CorruptEntry] = []
    for entry_id, fields in entries:
        if fields:
            try:
                out.append(parse_entry(entry_id, fields, partition))
            except CorruptEntry as bad:
                corrupt.append(bad)
    return out, corrupt


class Store:
    """Every state change of a message, each one Lua script call."""

    def __init__(
        self,
        client: StoreRedis,
        settings: Settings,
        identifier: str = "",
        partition: int | None = None,
        replication: Replication | None = None,
    ) -> None:
        """``client`` comes from ``connect`` (``read`` needs its raw XREADGROUP replies);
        ``identifier`` names the scheduler in the leader record its promote calls write;
        ``partition`` is the one this store works on (None: the only one);
        ``replication``, the api's alone, makes each change it answers for (accept, and
        the lifecycle's) wait for its replicas (``app.store.replicated``)."""
        self.client = client
        self.settings = settings
        self.keys = Keyspace(settings.prefix, partition)
        self.partition = partition or 0
        self.identifier = identifier
        self.scripts = Scripts.register(client)
        self.replication = replication

    async def change(self, script: AsyncScript, keys: list, args: list) -> Any:
        """A script the api answers a client for: with ``replication``, only once its
        replicas confirmed it (NotReplicated otherwise)."""
        if self.replication is None:
            return await script(keys=keys, args=args)
        return await self.replication.script(script, keys, args)

    async def answers(self) -> bool:
        """Whether Redis answers a PING now: the readiness of every process."""
        try:
            await self.client.ping()
        except (RedisError, OSError):
            return False
        return True

    async def check_format(self) -> None:
        """Raise StorageFormatError when the prefix holds data of storage format 1.

        Format 1 (text uuids, msgpack records, a retention sorted set) read as
        format 2 would be misread: its sorted-set members name no record, and the
        promote script would drop them. One sample of each key tells: format 1 kept
        a uuid as its 36-character text wherever it stored one (a member was 12 hex
        digits of sequence and the uuid). A sample of another odd shape is not
        format 1 but one damaged item, which the scripts quarantine when they meet
        it: refusing to start on it would only make every restart refuse again.
        """
        k = self.keys
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.zrange(k.delayed, 0, 0)
            pipe.hrandfield(k.messages)
            pipe.xrange(k.stream, count=1)
            pipe.type(k.retention)
            first, field, entry, retention = await pipe.execute()
        old = (
            (first and len(first[0]) == _FORMAT_1_SEQ + _UUID_TEXT)
            or (field is not None and len(field) == _UUID_TEXT)
            or (entry and len(entry[0][1].get(b"u", b"")) == _UUID_TEXT)
            or retention in (b"zset", "zset")
        )
        if old:
            raise StorageFormatError(
                f"Redis holds data of storage format 1 (text uuids) under the prefix "
                f"{k.prefix!r}; this release reads format {FORMAT}. Let the release that "
                "wrote it drain the delayed set and the stream, then delete the prefix's "
                "keys, or give this release another EAT_PREFIX."
            )

    async def accept(self, msg: NewMessage) -> Accepted:
        return (await self.accept_many([msg]))[0]

    async def accept_many(self, msgs: list[NewMessage]) -> list[Accepted]:
        """Accept messages in one script call (one round trip), in order."""
        k = self.keys
        args: list[object] = [k.wake_channel, self.settings.dead_maxlen, self._keep_ms]
        for msg in msgs:
            if msg.target is None:
                body = msg.message.encode("utf-8")
            else:
                body = pack_body(msg.message, msg.target)
            args += [uuid_key(msg.uuid), body, msg.run_at]
        keys = [k.messages, k.delayed, k.stream, k.sequence, k.dead, k.retention]
        if self.replication is None:
            flat = await self.scripts.accept(keys=keys, args=args)
        else:
            flat = await self.replication.script(self.scripts.accept, keys, args)
        if len(flat) % 3:
            self.report_quarantined("accept", flat.pop())
        return [
            Accepted(created=bool(flat[i]), state=flat[i + 1].decode(), run_at=int(flat[i + 2]))
            for i in range(0, len(flat), 3)
        ]

    async def promote(self, epoch: int, limit: int | None = None) -> Promoted:
        k = self.keys
        reply = await self.scripts.promote(
            keys=[k.delayed, k.messages, k.stream, k.epoch, k.leader, k.dead, k.retention],
            args=[
                encode_epoch(epoch),
                limit or self.settings.promote_batch,
                self.identifier,
                LEADER_TTL_MS,
                self.settings.dead_maxlen,
                self._keep_ms,
            ],
        )
        if reply[0] == -1:
            return Promoted(refused_by=int(reply[1]))
        moved, now_ms, next_due, quarantined = reply
        if quarantined:
            self.report_quarantined("promote", quarantined)
        return Promoted(
            moved=moved,
            now_ms=now_ms,
            next_due_ms=None if next_due < 0 else next_due,
            quarantined=quarantined,
        )

    async def ensure_group(self) -> None:
        """Create the stream and its consumer group; BUSYGROUP means it exists, which is success.

        The group starts at "0", not "$": when it is made anew after a loss (the stream
        deleted or evicted, Redis restarted empty), the stream may already hold entries
        added since (messages accepted due, or promoted, meanwhile). "$" would never deliver
        those, and the ack script's trim would later delete them as done. Acknowledged
        entries are deleted, so "0" delivers only work not yet done.
        """
        try:
            await self.client.xgroup_create(self.keys.stream, CONSUMER_GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def read(
        self, consumer: str, count: int, block_ms: int | None, own_pending: bool = False
    ) -> list[Delivery]:
        """New entries (``>``), or with ``own_pending`` the entries already delivered to us."""
        # execute_command, not xreadgroup(): redis-py 8 wraps that in a streaming-lag
        # recorder that inspects every reply, even with observability off.
        args: list[object] = ["GROUP", CONSUMER_GROUP, consumer, "COUNT", count]
        if not own_pending and block_ms is not None:
            args += ["BLOCK", block_ms]
        args += ["STREAMS", self.keys.stream, "0" if own_pending else ">"]
        reply = await self.client.execute_command("XREADGROUP", *args)
        # Raw (see StoreRedis): a map of stream -> entries on RESP3, pairs on RESP2.
        streams = reply.values() if isinstance(reply, dict) else [e for _s, e in reply or []]
        out: list[Delivery] = []
        for entries in streams:
            deliveries, corrupt = parse_entries(entries, self.partition)
            out.extend(deliveries)
            if corrupt:
                await self.quarantine(corrupt, "read")
        return out

    async def quarantine(self, corrupt: list[CorruptEntry], during: str) -> int:
        """Move stream entries that cannot be decoded to the dead stream; how many moved.

        Until this succeeds they stay pending (a Redis error goes up to the caller), and
        whoever meets them next, here or in reclaim, quarantines them.
        """
        k = self.keys
        args: list[object] = [CONSUMER_GROUP, self.settings.dead_maxlen, self._keep_ms]
        for bad in corrupt:
            args += [bad.entry_id, bad.problem[:_PROBLEM_BYTES]]
        moved = await self.scripts.quarantine(
            keys=[k.stream, k.messages, k.dead, k.retention], args=args
        )
        self.report_quarantined(during, moved, problems=[bad.problem for bad in corrupt[:5]])
        return int(moved)

    @property
    def _keep_ms(self) -> int:
        return int(self.settings.retention * 1000)

    def report_quarantined(self, during: str, count: int, **detail: object) -> None:
        """Count and report what a script moved to the dead stream as undecodable."""
        if count:
            metrics.QUARANTINED.inc(count)
            log.warning(
                "quarantined data that could not be decoded",
                during=during,
                count=count,
                dead_stream=self.keys.dead,
                **detail,
            )

    async def ack(self, deliveries: list[Delivery]) -> int:
        """Acknowledge handled deliveries; how many records were marked delivered."""
        if not deliveries:
            return 0
        k = self.keys
        args: list[object] = [
            CONSUMER_GROUP,
            self._keep_ms,
            PURGE_PER_ACK,
            self.settings.dead_maxlen,
        ]
        for d in deliveries:
            args += [d.id, d.key]
        delivered, quarantined = await self.scripts.ack(
            keys=[k.stream, k.messages, k.retention, k.dead], args=args
        )
        if quarantined:
            self.report_quarantined("ack", quarantined)
        return delivered

    async def fail(
        self, delivery: Delivery, delay_ms: int, reason: str, *, dead_now: bool = False
    ) -> tuple[str, int]:
        """Retry or dead-letter a delivery; (outcome, attempts), outcome as fail.lua says.
        ``dead_now``: dead-letter it whatever attempts are left (the script is told that
        none are: a limit of 0 runs)."""
        k = self.keys
        outcome, attempts, quarantined = await self.scripts.fail(
            keys=[k.stream, k.messages, k.delayed, k.dead, k.sequence, k.retention],
            args=[
                CONSUMER_GROUP,
                delivery.id,
                delay_ms,
                0 if dead_now else self.settings.max_deliveries,
                reason[:1000],
                self.settings.dead_maxlen,
                k.wake_channel,
                self._keep_ms,
            ],
        )
        if quarantined:
            self.report_quarantined("fail", quarantined)
        return outcome.decode(), int(attempts)

    async def reclaim(
        self, consumer: str, cursor: str, count: int
    ) -> tuple[str, list[Delivery], int]:
        k = self.keys
        next_cursor, flat, dead, quarantined = await self.scripts.reclaim(
            keys=[k.stream, k.messages, k.dead, k.retention],
            args=[
                CONSUMER_GROUP,
                consumer,
                int(self.settings.visibility_timeout * 1000),
                cursor,
                count,
                self.settings.max_deliveries,
                self.settings.dead_maxlen,
                self._keep_ms,
            ],
        )
        if quarantined:
            self.report_quarantined("reclaim", quarantined)
        claimed, corrupt = parse_entries(zip(flat[::2], flat[1::2], strict=True), self.partition)
        if corrupt:
            await self.quarantine(corrupt, "reclaim")
        return next_cursor.decode(), claimed, int(dead)

    async def extend(self, consumer: str, ids: list[str]) -> int:
        if not ids:
            return 0
        return await self.scripts.extend(
            keys=[self.keys.stream], args=[CONSUMER_GROUP, consumer, *ids]
        )

    async def forget_consumers(
        self, me: str, after_ms: int, *, leaving: bool = False, most: int = 100
    ) -> int:
        """Record that worker ``me`` lives and delete the group's consumers of workers that
        are gone (no record for ``after_ms``, idle as long, holding nothing); or, leaving,
        delete ``me``'s record and its consumer if it holds nothing. How many consumers
        were deleted."""
        k = self.keys
        return int(
            await self.scripts.forget_consumers(
                keys=[k.stream, k.workers],
                args=[CONSUMER_GROUP, me, after_ms, "1" if leaving else "0", most],
            )
        )

    async def queue_stats(self) -> QueueStats:
        reads = queue_figures_reads(self.keys)
        return queue_figures(await read_pipelined(self.client, self.keys.delayed, reads))

    async def record(self, uuid: str) -> Record | None:
        """The record of ``uuid``, None when there is none; CorruptRecord when it cannot be
        decoded (the next script that meets it quarantines it)."""
        packed = await self.client.hget(self.keys.messages, uuid_key(uuid))
        return None if packed is None else decode_record(uuid, packed)
