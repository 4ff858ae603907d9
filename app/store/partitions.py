"""The keyspace's partitions: one Store per partition, and routing by uuid.

With ``EAT_PARTITIONS=N`` every message lives in partition
``partition_of(uuid, N)`` (``app.store.keys``), which holds the full set of keys
under its own hash tag, so every script still touches one slot and a Redis
Cluster spreads the partitions over its masters. A re-posted uuid always meets
its own record: idempotency holds across partitions. With N = 1 there is one
partition under ``{<prefix>}``: the keyspace of every release before partitions.

The count is part of how the data is laid out, like the storage format: it is
recorded under ``Keyspace.partition_count`` at the first start and every process
checks it (:meth:`Partitions.check`): reading data written with another count
would look for messages in the wrong partitions.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence

from app.model import NewMessage
from app.settings import Settings
from app.store.codec import uuid_key
from app.store.keys import Keyspace, partition_of
from app.store.replicated import Replication
from app.store.store import Accepted, ConsumerFigures, QueueStats, StorageFormatError, Store


class PartitionCountError(StorageFormatError):
    """The data was written with another EAT_PARTITIONS than this process has."""


class Partitions:
    """One :class:`Store` per partition over one client, in partition order.

    :param client: from ``connect`` (a Redis or a Redis Cluster client).
    :param settings: ``partitions`` is the count.
    :param identifier: the scheduler's name in each partition's leader record.
    :param wait_replicas: the api's EAT_WAIT_REPLICAS: each change it answers for waits
        until that many replicas confirmed it (``app.store.replicated``); 0 (the
        scheduler's and the worker's) waits for none.
    """

    def __init__(
        self, client, settings: Settings, identifier: str = "", *, wait_replicas: int = 0
    ) -> None:
        self.client = client
        self.settings = settings
        self.count = settings.partitions
        numbers: Sequence[int | None] = [None] if self.count == 1 else range(self.count)
        replication = (
            Replication(client, wait_replicas, settings.wait_timeout_ms) if wait_replicas else None
        )
        self.stores = [Store(client, settings, identifier, p, replication) for p in numbers]

    def __len__(self) -> int:
        return self.count

    def __iter__(self):
        return iter(self.stores)

    def index_of(self, uuid: str) -> int:
        return partition_of(uuid_key(uuid), self.count)

    def store_for(self, uuid: str) -> Store:
        """The partition a message (by its canonical uuid) lives in."""
        return self.stores[self.index_of(uuid)]

    async def answers(self) -> bool:
        return await self.stores[0].answers()

    async def check(self) -> None:
        """Refuse (StorageFormatError) data of another storage format or partition count.

        The first process with several partitions to start on a prefix records the count;
        a prefix that already holds data of one partition counts as 1, and one partition
        records nothing (it only refuses another count recorded).
        """
        await check_partition_count(self.client, self.settings.prefix, self.count)
        await asyncio.gather(*(store.check_format() for store in self.stores))

    async def accept_many(self, msgs: Sequence[NewMessage]) -> list[Accepted]:
        """Each message accepted by its partition's script, the partitions concurrently;
        results in the order given. Atomic per partition, not across them: a partition
        that fails raises its error (once every partition has answered)."""
        if self.count == 1:
            return await self.stores[0].accept_many(list(msgs))
        results = await self.accept_each(msgs)
        for result in results:
            if isinstance(result, Exception):
                raise result
        return results  # type: ignore[return-value]

    async def accept_each(self, msgs: Sequence[NewMessage]) -> list[Accepted | Exception]:
        """Each message accepted by its partition's script, the partitions concurrently;
        results in the order given. A partition whose call fails (its master failing
        over, or down) answers its exception in place of each of its messages' results,
        and the other partitions' results stand."""
        groups: dict[int, list[int]] = {}
        for position, msg in enumerate(msgs):
            groups.setdefault(self.index_of(msg.uuid), []).append(position)
        answers = await asyncio.gather(
            *(
                self.stores[p].accept_many([msgs[i] for i in positions])
                for p, positions in groups.items()
            ),
            return_exceptions=True,
        )
        results: list[Accepted | Exception | None] = [None] * len(msgs)
        for positions, answer in zip(groups.values(), answers, strict=True):
            if isinstance(answer, BaseException):
                if not isinstance(answer, Exception):
                    raise answer  # cancelled: not a partition's failure
                for i in positions:
                    results[i] = answer
                continue
            for i, result in zip(positions, answer, strict=True):
                results[i] = result
        return results  # type: ignore[return-value]

    async def each_queue_stats(self) -> list[QueueStats]:
        """The figures of each partition, in partition order (one round trip each, all at
        once): what the queue gauges show, labelled by partition."""
        return list(await asyncio.gather(*(store.queue_stats() for store in self.stores)))

    async def queue_stats(self) -> QueueStats:
        """The figures of every partition, summed."""
        return summed(await self.each_queue_stats())


def summed(each: Sequence[QueueStats]) -> QueueStats:
    """The figures of several partitions as one: counts summed, the oldest overdue the
    largest, a consumer (a worker reads every partition) one row with its pending summed."""
    if len(each) == 1:
        return each[0]
    overdue = [s.oldest_overdue_ms for s in each if s.oldest_overdue_ms is not None]
    members = merged_consumers(s.members for s in each)
    return QueueStats(
        delayed=sum(s.delayed for s in each),
        stream_length=sum(s.stream_length for s in each),
        pending=sum(s.pending for s in each),
        lag=sum(s.lag for s in each),
        consumers=max((s.consumers for s in each), default=0),
        dead=sum(s.dead for s in each),
        oldest_overdue_ms=max(overdue, default=None),
        members=tuple(members),
    )


def merged_consumers(each: Iterable[Iterable[ConsumerFigures]]) -> list[ConsumerFigures]:
    """The consumers of several partitions' groups, one row per name (a worker is a
    consumer in every partition's group): pending summed, idle the least."""
    members: dict[str, ConsumerFigures] = {}
    for consumers in each:
        for m in consumers:
            seen = members.get(m.name)
            if seen is not None:
                m = ConsumerFigures(m.name, seen.pending + m.pending, min(seen.idle_ms, m.idle_ms))
            members[m.name] = m
    return list(members.values())


async def check_partition_count(client, prefix: str, count: int) -> None:
    """Record ``count`` for ``prefix`` if none is recorded; refuse another one."""
    key = Keyspace(prefix).partition_count
    recorded = await client.get(key)
    if recorded is None and count == 1:
        # One partition writes no key of its own: its keyspace stays exactly that of every
        # release before partitions (its data, once there, tells a process with several
        # partitions that it is one; see below).
        return
    if recorded is None:
        if await _holds_unpartitioned_data(client, prefix):
            recorded = b"1"
        else:
            # NX: of two processes starting at once with different counts, one loses here.
            await client.set(key, str(count), nx=True)
            recorded = await client.get(key)
    if int(recorded) != count:
        raise PartitionCountError(
            f"Redis holds the data of prefix {prefix!r} in {int(recorded)} partition(s); "
            f"this process has EAT_PARTITIONS={count}. Start it with "
            f"EAT_PARTITIONS={int(recorded)}, or let the running release drain (nothing "
            "delayed, queued or dead), delete the prefix's keys, and start with the new count "
            "(or use another EAT_PREFIX)."
        )


async def _holds_unpartitioned_data(client, prefix: str) -> bool:
    keys = Keyspace(prefix)
    return bool(await client.exists(keys.messages, keys.delayed, keys.stream, keys.dead))
