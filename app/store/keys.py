"""The one place that spells Redis keys, channels and ZooKeeper paths, and the one
place that decides which partition a message lives in.

Every key carries a hash tag, so all keys one Lua script touches live in one
Redis Cluster slot: ``{<prefix>}`` with one partition (``EAT_PARTITIONS=1``, the
keyspace of every release before partitions), ``{<prefix>:<p>}`` for partition
``p`` of several. The prefix namespaces a deployment (or a test): two prefixes
never share a key or a ZooKeeper path.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

from app.settings import Settings

# The consumer group every worker joins on the stream.
CONSUMER_GROUP = "workers"


@dataclass(frozen=True, slots=True)
class LegacyLists:
    """The original service's three lists, named by settings (``EAT_LEGACY_*``).

    Old producers hard-code the names, so they are not prefixed. They LPUSH a
    JSON message onto ``queue`` (run now) or ``delayed`` (run at its runAt); the
    bridge moves each into ``in_flight`` while it accepts it, and removes it from
    there afterwards. In Redis Cluster the three must share one slot: the bridge's
    LMOVE spans two of them, so the names carry one hash tag, e.g. "{legacy}Queue"
    (``Settings.validate`` checks the tags agree).
    """

    delayed: str  # LIST: legacy messages to run at their runAt
    queue: str  # LIST: legacy messages to run now
    in_flight: str  # LIST: taken by the bridge, not yet accepted

    @classmethod
    def of(cls, settings: Settings) -> LegacyLists:
        return cls(settings.legacy_delayed, settings.legacy_queue, settings.legacy_in_flight)


def partition_of(uuid: bytes, count: int) -> int:
    """The partition of a message: CRC-32 of its uuid's 16 bytes, modulo the count.

    Fixed forever (a re-posted uuid must meet its own record, whichever process
    routes it), so never Python's salted ``hash()``; hashing every byte spreads
    uuids whose low bytes repeat (v1's node id, v7's ordered time) as well as
    random ones.
    """
    return zlib.crc32(uuid) % count if count > 1 else 0


def keyspaces(prefix: str, count: int) -> list[Keyspace]:
    """The keyspace of each partition, in partition order."""
    if count == 1:
        return [Keyspace(prefix)]
    return [Keyspace(prefix, p) for p in range(count)]


@dataclass(frozen=True, slots=True)
class Keyspace:
    """Names derived from one prefix, for one partition (None: the only one)."""

    prefix: str
    partition: int | None = None

    @property
    def tag(self) -> str:
        if self.partition is None:
            return "{" + self.prefix + "}"
        return "{" + f"{self.prefix}:{self.partition}" + "}"

    @property
    def partition_count(self) -> str:
        """STRING: the EAT_PARTITIONS this prefix's data was written with (all partitions
        share it: it is spelled from the prefix alone). Absent before the first start."""
        return "{" + self.prefix + "}:partitions"

    @property
    def delayed(self) -> str:
        """ZSET: member ``<6-byte seq><16-byte uuid>`` scored by runAt ms; only future messages.

        The fixed-width acceptance sequence in front of the uuid makes members
        with equal runAt sort in acceptance order (ZSET ties sort by member).
        """
        return f"{self.tag}:delayed"

    @property
    def messages(self) -> str:
        """HASH: uuid (16 bytes) -> record (state, runAt, attempts, times, body; see ``codec``).

        One hash field per message costs far less than one key per message.
        """
        return f"{self.tag}:messages"

    @property
    def retention(self) -> str:
        """LIST: ``<6-byte ms after which it may go><uuid>`` per record that reached a final
        state, in expiry order (see ``app/lua/_record.lua``).

        Redis 7.0 cannot expire a single hash field, so finished records are
        purged from ``messages`` by the ack script, a bounded number per call.
        """
        return f"{self.tag}:retention"

    @property
    def sequence(self) -> str:
        """STRING: acceptance counter, the tie-breaker for equal runAt."""
        return f"{self.tag}:seq"

    @property
    def stream(self) -> str:
        """STREAM: due messages, read by the ``workers`` consumer group."""
        return f"{self.tag}:stream"

    @property
    def dead(self) -> str:
        """STREAM: messages that exhausted their deliveries, for inspection and replay."""
        return f"{self.tag}:dead"

    @property
    def epoch(self) -> str:
        """STRING: highest leader epoch that promoted (fencing against zombie leaders)."""
        return f"{self.tag}:epoch"

    @property
    def workers(self) -> str:
        """HASH: worker consumer name -> when it last said it lives (ms), so consumers that
        dead workers left in the group can be told from quiet live ones and deleted."""
        return f"{self.tag}:workers"

    @property
    def leader(self) -> str:
        """HASH: identifier, epoch, since of the scheduler that promotes now (for /stats).

        Written by every promote call with a TTL of a few seconds, so it vanishes
        soon after the leader stops promoting.
        """
        return f"{self.tag}:leader"

    def history(self, minute: int) -> str:
        """HASH: what the processes counted during one minute (``minute``: epoch seconds
        // 60), field -> count: ``accepted``, ``delivered``, ``failed``, ``dead`` and one
        ``late:<bound>`` per lateness bucket (``app.store.history``). Expires after a few
        hours, like Sidekiq's daily stats. The dashboard's charts read the last hour.

        Under the prefix's own tag, whatever the partition: the figures are the
        deployment's, and one minute is one key to read.
        """
        return "{" + self.prefix + "}:history:" + str(minute)

    @property
    def wake_channel(self) -> str:
        """Pub/sub channel: the accept script publishes when a message becomes the earliest."""
        return f"{self.tag}:wake"

    @property
    def zk_root(self) -> str:
        return f"/{self.prefix}"

    @property
    def zk_election(self) -> str:
        """ZooKeeper path of the scheduler election."""
        return f"/{self.prefix}/election"

    # --- recurring schedules (app.recurrence, app.store.schedules) -----------------------------
    # Under the prefix's own tag whatever the partition, like the partition count: one
    # slot holds every definition (10,000 of them are a few MB), so each change to one is
    # one script. The messages a schedule produces live in their uuids' partitions.

    @property
    def schedules(self) -> str:
        """HASH: schedule name -> its definition (``app.recurrence.Definition`` as JSON)."""
        return "{" + self.prefix + "}:schedules"

    @property
    def schedule_meta(self) -> str:
        """HASH: schedule name -> ``<generation>:<stored at ms>`` of its definition."""
        return "{" + self.prefix + "}:schedules:meta"

    @property
    def schedule_progress(self) -> str:
        """HASH: schedule name -> ``<generation>:<ms>``: the last occurrence the leader
        materialised (or skipped) for that generation; the next pass starts after it."""
        return "{" + self.prefix + "}:schedules:progress"

    @property
    def schedule_retired(self) -> str:
        """HASH: generation -> JSON {name, generation, created, until, definition} of a
        definition replaced or deleted whose pending occurrences are still to be voided
        (the api voids them at once; the leader finishes what an api that died left)."""
        return "{" + self.prefix + "}:schedules:retired"

    @property
    def schedule_generation(self) -> str:
        """STRING: counter of definitions ever stored; each new one takes the next number,
        so a name deleted and created again never reuses a generation (nor its uuids)."""
        return "{" + self.prefix + "}:schedules:generation"

    @property
    def schedule_version(self) -> str:
        """STRING: counter of changes to any definition: the leader reloads when it moves."""
        return "{" + self.prefix + "}:schedules:version"

    @property
    def schedule_epoch(self) -> str:
        """STRING: highest leader epoch that recorded progress (fencing, as ``epoch``)."""
        return "{" + self.prefix + "}:schedules:epoch"
