"""The legacy list bridge: messages old producers LPUSH onto ``Queue`` / ``QueueDelayed``.

The original service's producers push a JSON message ``{"message", "runAt",
"uuid"}`` onto ``Queue`` (run now) or ``QueueDelayed`` (run at ``runAt``). The
bridge runs in the leading scheduler only (while its
:class:`~election.gate.LeadershipGate` is open) and takes each item through
three steps:

1. ``LMOVE <list> QueueDead RIGHT LEFT`` (what ``RPOPLPUSH`` does): the item is
   now in flight, oldest first;
2. accept it with the API's idempotent accept script (:meth:`Store.accept`);
   an item from ``Queue`` is due now whatever its ``runAt`` says;
3. ``LREM QueueDead 1 <item>``.

A crash between 1 and 3 leaves the item in ``QueueDead``. Whoever leads next
re-drives ``QueueDead`` before taking anything new, and the uuid makes that
safe: an item accepted before the crash is a duplicate and changes nothing. An
item without a uuid gets one derived from its bytes (:func:`legacy_uuid`,
uuid5-style), so its re-drive is a duplicate as well.

Bridge loop states, per process::

    idle (gate closed) --gate opens--> re-driving --QueueDead empty--> bridging
    bridging --nothing waiting--> polling (5 ms doubling to 100 ms) --items--> bridging
    bridging --gate closes or a new epoch--> idle / re-driving
    bridging --a failing partition due to be tried again--> re-driving (its items)
    any --Redis error of the lists--> backoff (50 ms doubling to 1 s) --> re-driving
    any --stop()--> stopped, after finishing the items already taken

What may happen twice, and what not:

- No message is accepted twice: accept is idempotent by uuid. So two bridges
  at once (a paused old leader waking up next to the new one) are safe too:
  ``LMOVE`` hands each item to one of them, and a re-drive of the other's
  in-flight item is a duplicate. No Redis lock is needed.
- A malformed item (bad JSON, JSON nested too deeply, a missing or wrong field,
  a value the API would refuse), or one that reading fails on for any other
  reason, goes to the dead stream with the reason and its original bytes
  (``raw``), and leaves ``QueueDead``; it never blocks the bridge. A bridge
  that dies between those two steps dead-letters it a second time on re-drive.
  Only Redis errors are retried.
- A partition whose accept fails (a Redis error: its master failing over, or down)
  holds up no other: its items stay in ``QueueDead``, it is not tried again before
  its backoff (50 ms doubling to 1 s), and then its items are re-driven, oldest
  first, before any newer one of it; the other partitions' items go on meanwhile.
- An item re-driven from ``QueueDead`` no longer says which list it came from:
  it is accepted at its own ``runAt`` (an item pushed onto ``Queue`` with a
  future ``runAt`` then waits for that time).
- Two byte-identical items without a uuid are one message.

Unknown fields in an item are ignored (old producers may add their own); a
message is never logged, only its uuid.

Partitions: the legacy lists are not partitioned (old producers hard-code their
names): they stay where they are, and each item is accepted into its uuid's
partition, the items of one round grouped into one accept call per partition
(:meth:`Partitions.accept_many`, the partitions concurrently); a malformed item is
dead-lettered in the partition of the uuid it is filed under.

In Redis Cluster the three lists must share one slot (one hash tag in the
configured names) because ``LMOVE`` spans two of them; see :mod:`app.store.keys`.
The scheduler refuses to start on a cluster with lists that do not
(:func:`check_lists_share_a_slot`).
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid as uuidlib
from dataclasses import dataclass

import msgspec
from redis.cluster import key_slot

from app.backoff import RETRIED, Backoff, describe
from app.log import get_logger
from app.model import (
    NESTED_TOO_DEEPLY,
    RUN_AT_MAX,
    RUN_AT_MIN,
    InvalidInput,
    NewMessage,
    RepeatedKeys,
    SaveMessage,
    field_names,
    validate,
)
from app.settings import Settings
from app.store import Store
from app.store.codec import pack_body, uuid_key
from app.store.keys import LegacyLists
from app.store.partitions import Partitions
from app.targets import TargetPolicy, TargetRefused
from election.gate import LeadershipGate
from election.wakeable import WakeableLoop

log = get_logger("bridge")

# Fixed namespace of the uuids derived from uuid-less legacy items (uuid5 over the raw bytes).
LEGACY_NAMESPACE = uuidlib.UUID("5b0b3c55-2d1e-4e0a-9f38-6c6567616379")

DEFAULT_BATCH = 100  # most items moved from each list per round
POLL_MIN = 0.005  # seconds: first idle poll interval once the lists are empty
POLL_MAX = 0.1  # seconds: longest idle poll interval (the legacy latency bound)
RAW_KEEP = 70_000  # bytes of a malformed item kept in its dead entry


class LegacyItem(msgspec.Struct, frozen=True):
    """One legacy list item; unknown fields are ignored, unlike the API's body."""

    message: str
    runAt: int
    uuid: str | None = None
    target: str | None = None  # a webhook URL, checked like the api's (docs/webhooks.md)


_decoder = msgspec.json.Decoder(LegacyItem)
_repeated = RepeatedKeys(field_names(LegacyItem))


class LegacyListsError(ValueError):
    """The legacy lists cannot be bridged on this Redis (a cluster, lists in two slots)."""


def check_lists_share_a_slot(lists: LegacyLists) -> None:
    """On a Redis Cluster: refuse lists that do not hash to one slot (LegacyListsError).

    ``LMOVE`` from a legacy list into the in-flight list is one command over two keys; a
    cluster refuses it unless both are in one slot, and the bridge would fail on every
    round. The names need one hash tag, e.g. ``{legacy}Queue``.
    """
    names = (lists.queue, lists.delayed, lists.in_flight)
    if len({key_slot(name.encode()) for name in names}) > 1:
        raise LegacyListsError(
            f"the legacy lists {', '.join(names)} are in different Redis Cluster slots, and "
            "the legacy bridge moves items between them in one command: give the three names "
            "one hash tag (EAT_LEGACY_QUEUE={legacy}Queue, EAT_LEGACY_DELAYED={legacy}"
            "QueueDelayed, EAT_LEGACY_IN_FLIGHT={legacy}QueueDead, and the same names to the "
            "old producers), or set EAT_LEGACY_BRIDGE=false"
        )


def legacy_uuid(raw: bytes) -> str:
    """The uuid of an item that has none: SHA-1 of a fixed namespace and its bytes (uuid5).

    Deterministic, so re-driving the same bytes is a duplicate, never a second message.
    (``uuid.uuid5`` takes only ``str`` before Python 3.12; items are bytes.)
    """
    digest = hashlib.sha1(LEGACY_NAMESPACE.bytes + raw, usedforsecurity=False).digest()
    return str(uuidlib.UUID(bytes=digest[:16], version=5))


class MalformedItem(ValueError):
    """An item the bridge cannot accept, with what could be read of it for the dead entry.

    ``message`` and ``run_at`` are None when the item has no usable value for them.
    """

    def __init__(
        self,
        reason: str,
        uuid: str,
        message: str | None,
        run_at: int | None,
        target: str | None = None,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.uuid = uuid
        self.message = message
        self.run_at = run_at
        self.target = target  # kept with the message in the dead entry: a replay keeps it


def parse_item(raw: bytes, max_message_bytes: int) -> NewMessage:
    """Decode and validate one legacy item as the API would; raise MalformedItem."""
    try:
        item = _decoder.decode(raw)
    except msgspec.ValidationError as exc:
        raise _malformed(raw, f"invalid legacy item: {exc}", max_message_bytes) from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise _malformed(raw, f"malformed JSON: {exc}", max_message_bytes) from None
    except RecursionError:
        # msgspec, like json, stops at Python's recursion limit (even inside ignored fields).
        raise _malformed(raw, NESTED_TOO_DEEPLY, max_message_bytes) from None
    try:
        repeated = _repeated.find(raw)
    except InvalidInput as exc:
        raise _malformed(raw, exc.error, max_message_bytes) from None
    if repeated is not None:
        # Which of its values counts is the very thing readers disagree on: keep none.
        reason = f"repeated key: {repeated}"
        raise _malformed(raw, reason, max_message_bytes, distrust=repeated) from None
    uuid = item.uuid if item.uuid is not None else legacy_uuid(raw)
    try:
        return validate(
            SaveMessage(message=item.message, runAt=item.runAt, uuid=uuid, target=item.target),
            max_message_bytes,
        )
    except InvalidInput as exc:
        raise _malformed(raw, f"invalid {exc.field}: {exc.error}", max_message_bytes) from None


def read_item(raw: bytes, max_message_bytes: int) -> NewMessage | MalformedItem:
    """:func:`parse_item`, with whatever else it raises (a bug) as a MalformedItem too.

    An item the bridge cannot read, for any reason, must leave the lists: re-driven by
    every next leader, an exception would end each one's bridge in turn.
    """
    try:
        return parse_item(raw, max_message_bytes)
    except MalformedItem as bad:
        return bad
    except Exception as exc:
        # The reason goes with the item to the dead stream; the log gets the type only.
        log.error("legacy item unreadable", error=type(exc).__name__)
        # Any text: a lone surrogate in it would make the XADD of the dead entry fail.
        reason = f"unreadable legacy item: {describe(exc)}"[:1000]
        reason = reason.encode("utf-8", "backslashreplace").decode("utf-8")
        return MalformedItem(reason, legacy_uuid(raw), None, None)


def _malformed(
    raw: bytes, reason: str, max_message_bytes: int, distrust: str | None = None
) -> MalformedItem:
    """What can be salvaged from a bad item: its uuid if canonical, message and runAt if
    valid, except the field ``distrust``."""
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        obj = None
    if not isinstance(obj, dict):
        obj = {}
    obj.pop(distrust, None)
    uuid = obj.get("uuid")
    try:
        if not isinstance(uuid, str):
            raise InvalidInput("no uuid")
        validate(SaveMessage(message="", runAt=0, uuid=uuid), 1)
        uuid = uuid.lower()
    except InvalidInput:
        uuid = legacy_uuid(raw)
    message = obj.get("message")
    try:
        if not isinstance(message, str) or len(message.encode()) > max_message_bytes:
            message = None
    except UnicodeEncodeError:
        message = None
    if obj.get("target") is not None:
        # The message named a target that cannot be kept: without its message the dead
        # entry cannot be replayed, which would send it to the default URL instead.
        message = None
    run_at = obj.get("runAt")
    valid = isinstance(run_at, int) and not isinstance(run_at, bool)
    if not valid or not RUN_AT_MIN <= run_at <= RUN_AT_MAX:
        run_at = None
    return MalformedItem(reason[:1000], uuid, message, run_at)


@dataclass
class BridgeStats:
    moved: int = 0  # items taken from the legacy lists
    accepted: int = 0  # new messages
    duplicates: int = 0  # uuids accepted before (re-drives, repeated pushes)
    malformed: int = 0  # dead-lettered
    redriven: int = 0  # items found in the in-flight list and re-driven
    errors: int = 0  # Redis errors (each followed by a backoff and a re-drive)
    waiting: int = 0  # items the last re-drive left in flight for a failing partition


class LegacyBridge(WakeableLoop):
    """
    :param store: the partitions (or the one partition's Store): each item is accepted
        by its uuid's partition, and the lists are read through their client.
    :param gate: open while this process leads; the bridge works only then.
    :param lists: the three legacy list names.
    :param batch: most items taken from each list per round.
    """

    def __init__(
        self,
        store: Partitions | Store,
        gate: LeadershipGate,
        lists: LegacyLists,
        batch: int = DEFAULT_BATCH,
        targets: TargetPolicy | None = None,
    ) -> None:
        if batch < 1:
            raise ValueError("batch must be at least 1")
        super().__init__()
        if isinstance(store, Store):
            store = Partitions(store.client, store.settings, store.identifier)
        self.partitions = store
        self.settings: Settings = store.settings
        self.client = store.client
        self.gate = gate
        self.lists = lists
        self.batch = batch
        # An item's webhook target: checked as the api checks one, dead-lettered if refused.
        self.targets = targets or TargetPolicy.of(self.settings)
        self.stats = BridgeStats()
        # Partitions whose last accept (or dead-lettering) failed: when to try again.
        self._failing: dict[int, _Retry] = {}
        gate.on_change(self.poke)

    async def run(self) -> None:
        """Until stopped (after the items already taken: they are accepted and removed
        first). Redis errors are retried with a backoff; any other exception ends the
        task, and with it the process (it is supervised)."""
        backoff = Backoff(0.05, 1.0)
        while not self.stopping:
            self.rearm()
            epoch = self.gate.epoch
            if epoch is None:
                await self.pause(None)
                continue
            try:
                self._failing.clear()  # a new start tries every partition
                redriven = await self.redrive()
                log.info("legacy bridge running", epoch=epoch, redriven=redriven)
                await self._bridge(epoch)
            except RETRIED as exc:
                self.stats.errors += 1
                delay = backoff.next()
                log.warning("legacy bridge failed", error=describe(exc), retry_in=delay)
                await self.pause(delay)
                continue
            backoff.reset()

    def _leading(self, epoch: int) -> bool:
        return not self.stopping and self.gate.epoch == epoch

    async def _bridge(self, epoch: int) -> None:
        """Rounds while leading under ``epoch``; poll with backoff when nothing waits."""
        idle = Backoff(POLL_MIN, POLL_MAX)
        while self._leading(epoch):
            self.rearm()
            if self._retry_due():
                # Before any new item: a partition that is back takes its own in order.
                await self.redrive()
            if await self.round():
                idle.reset()
                continue
            await self.pause(min(idle.next(), self._until_retry()))

    async def redrive(self) -> int:
        """Accept and remove what the in-flight list holds, oldest first; how many.

        Items whose partition fails stay where they are, for the next re-drive (when that
        partition is due to be tried again); the items settled around them go. Those
        left are the oldest, so each read skips them: the next items are just before.
        """
        total = left = 0
        in_flight = self.lists.in_flight
        retrying = bool(self._failing)  # else a start: every item is tried
        for partition in [p for p, retry in self._failing.items() if retry.due()]:
            self._failing[partition].trying = True
        while not self.stopping:
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.lrange(in_flight, -(left + self.batch), -(left + 1))
                pipe.execute_command("TIME")  # a cluster pipeline refuses .time()
                raws, now = await pipe.execute()
            if not raws:
                break
            # LMOVE pushes at the head, so the oldest item is last.
            kept = await self._settle([(raw, False) for raw in reversed(raws)], _ms(now))
            left += kept
            total += len(raws) - kept
            self.stats.redriven += len(raws) - kept
            if retrying and not any(r.trying for r in self._failing.values()):
                # Each partition tried has failed again: what is left is theirs (read and
                # parsed at every retry, a long outage's backlog would cost CPU for nothing).
                break
        for partition, retry in list(self._failing.items()):
            if retry.trying:  # tried and did not fail: it is back
                del self._failing[partition]
                log.info("legacy items of a partition accepted again", partition=partition)
        self.stats.waiting = left  # of the items read: at least those
        return total

    def _retry_due(self) -> bool:
        return any(retry.due() for retry in self._failing.values())

    def _until_retry(self) -> float:
        if not self._failing:
            return POLL_MAX
        return max(0.0, min(retry.at for retry in self._failing.values()) - time.monotonic())

    async def round(self) -> int:
        """Move up to ``batch`` items from each legacy list, accept them; how many."""
        lists = self.lists
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.llen(lists.queue)
            pipe.llen(lists.delayed)
            pipe.execute_command("TIME")  # a cluster pipeline refuses .time()
            waiting_now, waiting_later, now = await pipe.execute()
        if not waiting_now and not waiting_later:
            return 0
        take_now = min(waiting_now, self.batch)
        take_later = min(waiting_later, self.batch)
        async with self.client.pipeline(transaction=False) as pipe:
            for _ in range(take_now):
                pipe.lmove(lists.queue, lists.in_flight, "RIGHT", "LEFT")
            for _ in range(take_later):
                pipe.lmove(lists.delayed, lists.in_flight, "RIGHT", "LEFT")
            moved = await pipe.execute()
        # None: the list ran short meanwhile (another bridge took the item).
        items = [(raw, True) for raw in moved[:take_now] if raw is not None]
        items += [(raw, False) for raw in moved[take_now:] if raw is not None]
        self.stats.moved += len(items)
        await self._settle(items, _ms(now))
        return len(items)

    async def _settle(self, items: list[tuple[bytes, bool]], now_ms: int) -> int:
        """Accept (or dead-letter) each in-flight item, then remove those settled from the
        list; how many were left in it, for a failing partition.

        The readable items are accepted together: one accept call per partition they
        fall in (in their order, so equal runAt keep the lists' order within a
        partition), the partitions concurrently. A partition that fails (a Redis error:
        its master failing over, or down) keeps its items in the in-flight list and is
        not tried again before its backoff, so it holds up no other partition, and its
        items are re-driven, oldest first, before any newer one of it. An error of the
        lists themselves leaves every item in the in-flight list, for a re-drive.
        """
        limit = self.settings.max_message_bytes
        settled: list[bytes] = []
        kept: list[tuple[bytes, int]] = []  # raw, partition
        errors: dict[int, Exception] = {}
        msgs: list[NewMessage] = []
        raws: list[bytes] = []
        for raw, due_now in items:
            msg = read_item(raw, limit)
            if not isinstance(msg, MalformedItem) and msg.target is not None:
                msg = await self._checked(msg)
            partition = self.partitions.index_of(msg.uuid)
            if not self._may_try(partition):
                kept.append((raw, partition))
                continue
            if isinstance(msg, MalformedItem):
                try:
                    await self._dead_letter(raw, msg, now_ms)
                except RETRIED as exc:
                    errors[partition] = exc
                    kept.append((raw, partition))
                else:
                    settled.append(raw)
                continue
            if due_now and msg.run_at > now_ms:
                # Queue means "run now"; now_ms is Redis' clock, read before the move.
                msg = msgspec.structs.replace(msg, run_at=now_ms)
            msgs.append(msg)
            raws.append(raw)
        if msgs:
            results = await self.partitions.accept_each(msgs)
            for raw, msg, result in zip(raws, msgs, results, strict=True):
                if isinstance(result, Exception):
                    if not isinstance(result, RETRIED):
                        raise result
                    partition = self.partitions.index_of(msg.uuid)
                    errors[partition] = result
                    kept.append((raw, partition))
                    continue
                settled.append(raw)
                if result.created:
                    self.stats.accepted += 1
                else:
                    self.stats.duplicates += 1
        self._back_off(errors, kept)
        if settled:
            async with self.client.pipeline(transaction=False) as pipe:
                for raw in settled:
                    pipe.lrem(self.lists.in_flight, 1, raw)
                await pipe.execute()
        return len(kept)

    def _may_try(self, partition: int) -> bool:
        retry = self._failing.get(partition)
        return retry is None or retry.trying

    def _back_off(self, errors: dict[int, Exception], kept: list[tuple[bytes, int]]) -> None:
        """Not to try each partition that failed again before its backoff has passed."""
        for partition, exc in errors.items():
            retry = self._failing.setdefault(partition, _Retry())
            delay = retry.failed()
            self.stats.errors += 1
            log.warning(
                "legacy items wait for their partition",
                partition=partition,
                items=sum(1 for _raw, p in kept if p == partition),
                error=describe(exc),
                retry_in=round(delay, 3),
            )

    async def _checked(self, msg: NewMessage) -> NewMessage | MalformedItem:
        """``msg``, or a MalformedItem when its target is refused (the reason says why)."""
        assert msg.target is not None
        try:
            await self.targets.check(msg.target)
        except TargetRefused as exc:
            return MalformedItem(
                f"invalid target: {exc}", msg.uuid, msg.message, msg.run_at, msg.target
            )
        return msg

    async def _dead_letter(self, raw: bytes, bad: MalformedItem, now_ms: int) -> None:
        """XADD to the dead stream with the fields of other dead entries, plus ``raw``.

        ``m`` and ``r`` are left out when the item has no valid value for them, so a
        replay (which needs both) cannot send an unreadable item on as a message.
        """
        fields: dict[str, str | bytes] = {"u": uuid_key(bad.uuid)}
        if bad.message is not None:
            fields["m"] = pack_body(bad.message, bad.target)
        if bad.run_at is not None:
            fields["r"] = str(bad.run_at)
        fields.update(a="0", reason=bad.reason, at=str(now_ms), raw=raw[:RAW_KEEP])
        await self.client.xadd(
            self.partitions.store_for(bad.uuid).keys.dead,
            fields,
            maxlen=self.settings.dead_maxlen,
            approximate=True,
        )
        self.stats.malformed += 1
        log.warning("legacy item dead-lettered", uuid=bad.uuid, reason=bad.reason[:200])


class _Retry:
    """When a failing partition is tried again (50 ms doubling to 1 s, as the bridge's
    own backoff); ``trying`` while a re-drive tries it."""

    def __init__(self) -> None:
        self.backoff = Backoff(0.05, 1.0)
        self.at = 0.0
        self.trying = False

    def failed(self) -> float:
        self.trying = False
        delay = self.backoff.next()
        self.at = time.monotonic() + delay
        return delay

    def due(self) -> bool:
        return time.monotonic() >= self.at


def _ms(redis_time: tuple[int, int]) -> int:
    seconds, micros = redis_time
    return int(seconds) * 1000 + int(micros) // 1000
