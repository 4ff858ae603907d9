"""A consumer-group worker: read, handle, acknowledge; reclaim what dead workers left.

Delivery guarantee: at least once. An entry is acknowledged only after its
handler returned. A worker that dies (or stalls past the visibility timeout)
between handling and acknowledging leaves the entry pending; another worker
reclaims it and handles it again. That is the only source of duplicates.

Order: entries are started in stream order. With ``concurrency=1`` (or an
inline handler such as ``echo``) they are also finished in that order. With several
partitions that holds per partition: each partition has its own stream, and the
worker reads each with its own XREADGROUP (a call cannot span two slots).

Partitions (fan-in): one read loop per partition, each blocking on its own
stream's XREADGROUP on a connection of its own, all feeding the worker's one set
of ``concurrency`` slots. An entry read counts against the slots from the moment
it is read until its handler ends ("in hand"), so ``concurrency`` bounds what the
worker takes across partitions, and an entry waiting for a slot has its claim
renewed like a running one. Each partition keeps one blocking read of one entry
out at all times (a doorbell: it waits for no slot, so an entry in an idle partition
is seen at once); a read that came back full is followed by a non-blocking one that
waits for free slots and reserves those it asks for, so a busy partition is drained
quickly, and the worker holds at most ``concurrency`` entries plus one per
partition. Free slots go to the reads that asked first (:class:`Capacity`), so no
partition starves another: one with a backlog takes its turn.
Acknowledgements are batched per partition, each partition with its own loop, so
a master that fails delays only its own partitions' acknowledgements; failures,
claim renewals, reclaims and quarantines go to the partition the entry came from.

Bounded handler time: an async handler still running after ``handler_timeout``
is cancelled, a sync one (run in a thread of its own) is abandoned; either way
the delivery counts as failed with the reason ``timeout`` (retried with backoff,
then dead-lettered) and its slot and claim are released. Inline handlers (echo)
never block, so they are not timed.

A lost stream or consumer group (``NOGROUP``: a DEL, an eviction, a Redis restarted
without its data) is made anew, at id ``0``, by whichever loop meets it first, so the
worker carries on by itself (see ``Store.ensure_group``); per partition.

Shape: the read, acknowledge, reclaim and extend loops, and the periodic check of
Redis' maxmemory-policy (:mod:`app.store.memory`), run under a
:class:`~app.supervise.Supervisor`; one that dies stops the worker (it reads no
more, finishes and acknowledges what it holds) and ``run()`` raises
:class:`~app.supervise.TaskDied`, so the process exits non-zero and is restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from dataclasses import dataclass
from typing import Any

from app import metrics
from app.backoff import RETRIED, Backoff, Stopped, describe, until_done
from app.log import get_logger
from app.store import Delivery, Store, group_missing
from app.store.history import HistoryRecorder
from app.store.memory import MemoryPolicy
from app.store.partitions import Partitions
from app.supervise import Supervisor
from workers.capacity import Capacity
from workers.handlers import DeliveryFailed, Handler, is_async
from workers.retry import backoff_seconds

log = get_logger("worker")

BLOCK_MS = 1000  # longest XREADGROUP wait; also bounds how long a stop waits for a read


ACK_FLUSH_GRACE = 10.0  # seconds the ack loop gets, once stopping, to acknowledge what is handled
DEFAULT_HANDLER_TIMEOUT = 300.0
# Every worker process reads under a name of its own, so dead workers (restarts, pods
# scaled away) leave consumers behind in each partition's group. Every FORGET_EVERY
# seconds a worker records that it lives and deletes the consumers with no such record
# for FORGET_AFTER_MIN seconds or 10 visibility timeouts, whichever is longer, idle as
# long and holding nothing (their entries were reclaimed).
FORGET_EVERY = 60.0
FORGET_AFTER_MIN = 300.0


def forget_after_default(visibility_timeout: float) -> float:
    """Seconds a consumer holding nothing must be idle before it is deleted: long past
    any read a live worker makes (each blocks at most a second), and long enough for the
    dashboard to show a worker that just died."""
    return max(FORGET_AFTER_MIN, 10 * visibility_timeout)


class _HandleOneByOne(Exception):
    """The handler has no batch form."""


class HandlerTimeout(Exception):
    """The handler ran past its time limit; the delivery failed."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"handler still running after {seconds:g} s")
        self.seconds = seconds

    @property
    def reason(self) -> str:
        return f"timeout: {self}"


@dataclass
class WorkerStats:
    handled: int = 0
    failed: int = 0
    acked: int = 0
    reclaimed: int = 0
    dead: int = 0


class _Lane:
    """What the worker keeps per partition: its store, the entries of it in hand (read,
    not yet finished: waiting for a slot or running), and those handled and waiting to
    be acknowledged."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.partition = store.partition
        self.in_flight: dict[str, float] = {}  # entry id -> monotonic time it was read
        self.to_ack: list[Delivery] = []
        self.acking: set[str] = set()  # ids of the batch the ack loop is sending now
        self.ack_wanted = asyncio.Event()
        # Held while entries become this worker's and are taken in hand (a reclaim, or
        # reading back what a lost read reply delivered), so that neither takes in hand
        # what the other just did.
        self.claiming = asyncio.Lock()
        # Set once the entries delivered to this name before a restart were read: the
        # reclaim loop waits for it, or what it claims for this name would be read back
        # as our own pending entries and handled a second time.
        self.own_read = asyncio.Event()
        self.reclaim_cursor = "0-0"

    def known(self) -> set[str]:
        """Ids of the entries this worker holds in this partition: in hand, or handled and
        waiting for (or being sent for) acknowledgement."""
        return self.in_flight.keys() | {d.id for d in self.to_ack} | self.acking

    def named(self, loop: str, lanes: int) -> str:
        """A loop's task name: the bare name with one partition, as before partitions."""
        return loop if lanes == 1 else f"{loop}-{self.partition}"


class Worker:
    """
    :param store: the Redis client: one :class:`Store` (one partition), or the
        :class:`Partitions`, every one of which the worker reads.
    :param handler: called once per delivery; raising means failure.
    :param consumer: this worker's name in the consumer group (unique per process).
    :param concurrency: most handlers running at once in this process.
    :param handler_timeout: seconds a (non-inline) handler may run before its delivery
        counts as failed with the reason ``timeout``.
    :param memory_policy: the check of Redis' maxmemory-policy (default: from the store's
        settings): at start, refusing an evicting one (EvictingPolicyError goes up from
        :meth:`run`), then periodically as one of the supervised loops.
    :param history: files what this process counts into the dashboard's per-minute
        history (``app.store.history``), as one of the supervised loops; None: not kept.
    :param forget_after: seconds a consumer holding nothing, whose worker stopped saying
        it lives, must be idle before this worker deletes it from the group (default
        :func:`forget_after_default`); it says it lives and looks every ``forget_every``
        seconds. A worker that stops deletes its own consumer if it holds nothing.
    """

    def __init__(
        self,
        store: Store | Partitions,
        handler: Handler,
        consumer: str,
        concurrency: int = 1,
        handler_timeout: float = DEFAULT_HANDLER_TIMEOUT,
        memory_policy: MemoryPolicy | None = None,
        history: HistoryRecorder | None = None,
        forget_after: float | None = None,
        forget_every: float = FORGET_EVERY,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if not handler_timeout > 0:
            raise ValueError("handler_timeout must be greater than 0")
        self.partitions = store if isinstance(store, Partitions) else None
        stores = list(store.stores) if isinstance(store, Partitions) else [store]
        self.settings = stores[0].settings
        self.handler = handler
        self.consumer = consumer
        self.concurrency = concurrency
        self.handler_timeout = handler_timeout
        self.memory_policy = memory_policy or MemoryPolicy(
            stores[0].client, self.settings.allow_eviction, self.settings.memory_policy_interval
        )
        self.history = history
        self.forget_after = (
            forget_after_default(self.settings.visibility_timeout)
            if forget_after is None
            else forget_after
        )
        self.forget_every = forget_every
        self.stats = WorkerStats()
        self._inline = bool(getattr(handler, "inline", False))
        self._async = is_async(handler)
        self._lanes = {s.partition: _Lane(s) for s in stores}
        if len(self._lanes) != len(stores):
            raise ValueError("one store per partition")
        self._fan_in = len(stores) > 1
        self._slots = asyncio.Semaphore(concurrency)  # handlers running
        self._capacity = Capacity(concurrency)  # entries in hand over every partition
        self._tasks: set[asyncio.Task] = set()
        self._stopping = asyncio.Event()
        self._draining = False  # set once no handler can add to the ack queues any more
        self._supervisor = Supervisor("worker", self._stopping)

    @property
    def store(self) -> Store:
        """The first partition's store: the only one with one partition."""
        return next(iter(self._lanes.values())).store

    @store.setter
    def store(self, store: Store) -> None:
        """Put another store in place of a one-partition worker's (before :meth:`run`)."""
        if self._fan_in:
            raise ValueError("a worker of several partitions has one store per partition")
        next(iter(self._lanes.values())).store = store

    def stop(self) -> None:
        """Stop taking new entries; what is in hand is finished and acknowledged."""
        self._stopping.set()
        self._capacity.close()
        for lane in self._lanes.values():
            lane.ack_wanted.set()

    def _lane(self, delivery: Delivery) -> _Lane:
        return self._lanes[delivery.partition]

    def _spawn_per_lane(self, loop, name: str) -> set[asyncio.Task]:
        count = len(self._lanes)
        return {
            self._supervisor.spawn(loop(lane), lane.named(name, count))
            for lane in self._lanes.values()
        }

    async def run(self) -> None:
        """Until :meth:`stop`; raises TaskDied if one of its loops died (it stops first),
        StorageFormatError or EvictingPolicyError if it must not start at all."""
        stop = self._stopping
        check = self.partitions.check if self.partitions is not None else self.store.check_format
        try:
            await until_done(check, stop, "storage format check")
            await until_done(self.memory_policy.require, stop, "maxmemory-policy check")
            await until_done(self._ensure_groups, stop, "consumer group")
        except Stopped:
            return
        supervisor = self._supervisor
        self._spawn_per_lane(self._ack_loop, "ack")
        supervisor.spawn(self._extend_loop(), "extend")
        supervisor.spawn(self.memory_policy.watch(stop), "memory-policy")
        supervisor.spawn(self._forget_loop(), "forget-consumers")
        if self.history is not None:
            supervisor.spawn(self.history.run(stop), "history")
        # The loops that hand out work: all end before the ack queues are drained.
        feeders = self._spawn_per_lane(self._reclaim_loop, "reclaim")
        feeders |= self._spawn_per_lane(self._consume, "read")
        log.info(
            "worker started",
            worker=self.consumer,
            concurrency=self.concurrency,
            partitions=len(self._lanes),
        )
        try:
            await supervisor.wait()
        finally:
            # Read no more (a loop died, or stop() was called); finish what is in hand:
            # what the feeders are dispatching now, then the handlers running.
            self.stop()
            await asyncio.wait(feeders, timeout=BLOCK_MS / 1000 + self.settings.visibility_timeout)
            if self._tasks:
                await asyncio.wait(self._tasks, timeout=self.settings.visibility_timeout)
            self._draining = True
            for lane in self._lanes.values():
                lane.ack_wanted.set()
            # The ack loop flushes what is handled, then ends. If Redis stays down the
            # entries stay pending and another worker reclaims them (a counted duplicate).
            await supervisor.close(ACK_FLUSH_GRACE)
            await self._leave_groups()
            if self.history is not None:
                await self.history.close()  # after the last acknowledgements are counted
            log.info(
                "worker stopped",
                worker=self.consumer,
                handled=self.stats.handled,
                failed=self.stats.failed,
                reclaimed=self.stats.reclaimed,
                died=supervisor.failed is not None,
            )

    async def _ensure_groups(self) -> None:
        await asyncio.gather(*(lane.store.ensure_group() for lane in self._lanes.values()))

    async def _regroup(self, lane: _Lane, exc: BaseException, during: str) -> bool:
        """On NOGROUP (the stream or its group was lost), make the group anew; whether it did.

        Every loop meets it (read, reclaim, extend, the own pending read); whichever does
        first makes the group, the others find it there (BUSYGROUP is success). Per
        partition: each has its own stream and group.
        """
        if not group_missing(exc):
            return False
        log.warning(
            "consumer group missing, making it anew",
            worker=self.consumer,
            during=during,
            error=describe(exc),
            **self._where(lane),
        )
        try:
            await lane.store.ensure_group()
        except RETRIED as err:
            log.warning("could not make the consumer group", error=describe(err))
            return False
        return True

    def _where(self, lane: _Lane) -> dict[str, int]:
        """The partition a log line is about, when there are several."""
        return {"partition": lane.partition} if self._fan_in else {}

    async def _own_pending(self, lane: _Lane | None = None) -> list[Delivery]:
        """The entries delivered to this name before a restart, in ``lane``'s partition (by
        default the first)."""
        lane = lane or next(iter(self._lanes.values()))
        try:
            return await lane.store.read(self.consumer, 10_000, None, own_pending=True)
        except RETRIED as exc:
            if await self._regroup(lane, exc, "reading own pending entries"):
                return []  # a new group holds nothing of ours
            raise

    async def _consume(self, lane: _Lane) -> None:
        """Entries delivered to this name before a restart first, then new ones."""
        asked = time.monotonic()
        try:
            own = await until_done(
                lambda: self._own_pending(lane), self._stopping, "reading own pending entries"
            )
        except Stopped:
            return
        finally:
            lane.own_read.set()
        self._hold(lane, own)
        await self._dispatch(lane, await self._still_ours(lane, own, asked))
        await self._read_loop(lane)

    async def _read_loop(self, lane: _Lane) -> None:
        backoff = Backoff(0.05, 2.0)
        more = False  # the last read came back full: more may be waiting in this partition
        # A read failed: Redis may have delivered entries to this name whose reply was lost
        # (a connection closed under the read: a failover, a reshard's redirections).
        lost_reply = False
        while not self._stopping.is_set():
            if lost_reply:
                asked = time.monotonic()
                try:
                    recovered = await self._read_back(lane)
                except RETRIED as exc:
                    log.warning(
                        "reading back failed",
                        worker=self.consumer,
                        error=describe(exc),
                        **self._where(lane),
                    )
                    await backoff.wait(self._stopping)
                    continue
                lost_reply = False
                if recovered:
                    await self._dispatch(lane, await self._still_ours(lane, recovered, asked))
                    continue
            count, reserved = await self._read_size(more)
            if self._stopping.is_set():
                self._capacity.release(reserved)
                return
            # After a full read, more may be waiting: take it now, within the slots
            # reserved for it (held one round trip only). Otherwise wait for entries.
            block = None if more else BLOCK_MS
            asked = time.monotonic()
            try:
                deliveries = await lane.store.read(self.consumer, count, block)
            except RETRIED as exc:
                self._capacity.release(reserved)
                more = False
                if await self._regroup(lane, exc, "read"):
                    continue
                lost_reply = True
                log.warning(
                    "read failed", worker=self.consumer, error=describe(exc), **self._where(lane)
                )
                await backoff.wait(self._stopping)
                continue
            except BaseException:
                self._capacity.release(reserved)
                raise
            backoff.reset()
            self._hold(lane, deliveries)  # in hand before the reserved slots go back
            self._capacity.release(reserved)
            more = self._fan_in and not self._inline and len(deliveries) >= count
            await self._dispatch(lane, await self._still_ours(lane, deliveries, asked))

    async def _read_back(self, lane: _Lane) -> list[Delivery]:
        """After a failed read: the entries delivered to this name that it does not hold,
        taken in hand. Without this they would wait, pending under a live worker's name,
        for the visibility timeout (30 s by default) before another worker reclaimed them."""
        async with lane.claiming:
            own = await self._own_pending(lane)
            known = lane.known()
            lost = [d for d in own if d.id not in known]
            self._hold(lane, lost)
        if lost:
            log.info(
                "read back entries a lost read reply had delivered",
                count=len(lost),
                uuids=[d.uuid for d in lost],
                **self._where(lane),
            )
        return lost

    async def _read_size(self, more: bool) -> tuple[int, int]:
        """How many entries the next read asks for, and how many slots it reserved.

        Inline handlers finish a read before the next one: a full read is always room.
        With one partition, every free slot, reserved (the one reader waits for them).
        With several, a blocking read of one entry that waits for no slot: each
        partition's blocked read is a doorbell, always out, so an entry landing in an
        idle partition is seen at once however busy another partition keeps the slots.
        It brings at most one entry per partition beyond the slots. The non-blocking
        read that follows a full one waits its turn for free slots and takes what else
        is there within them.
        """
        if self._inline:
            return self.settings.read_count, 0
        if self._fan_in and not more:
            return 1, 0
        reserved = await self._capacity.reserve(self.settings.read_count)
        return reserved, reserved

    async def _still_ours(
        self, lane: _Lane, deliveries: list[Delivery], asked: float
    ) -> list[Delivery]:
        """Drop entries another worker may have taken over while this process stalled.

        Redis handed them over at some moment after ``asked``. When more than half
        the visibility timeout has passed since (this process was paused, or
        starved of CPU, with the reply waiting in its socket), another worker may
        already have reclaimed and handled them: handling them now would run them
        twice. Each one is checked and renewed with the extend script; those no
        longer ours are left to their new owner. On the usual fast path, nothing
        is checked. If Redis cannot answer, the entries stay pending and are
        reclaimed after the visibility timeout (late, not lost, not doubled).
        """
        if not deliveries or time.monotonic() - asked < self.settings.visibility_timeout / 2:
            return deliveries
        kept: list[Delivery] = []
        for delivery in deliveries:
            try:
                renewed = await lane.store.extend(self.consumer, [delivery.id])
            except RETRIED as exc:
                log.warning("claim check failed", uuid=delivery.uuid, error=describe(exc))
                renewed = 0
            if renewed:
                kept.append(delivery)
            else:
                self._let_go(lane, delivery)
        if len(kept) < len(deliveries):
            ours = {d.id for d in kept}
            log.warning(
                "skipped entries taken over during a stall",
                worker=self.consumer,
                stalled_s=round(time.monotonic() - asked, 3),
                uuids=[d.uuid for d in deliveries if d.id not in ours],
                **self._where(lane),
            )
        return kept

    def _hold(self, lane: _Lane, deliveries: list[Delivery]) -> None:
        """Entries read: in hand from now on (counted against the slots, claims renewed)."""
        if self._inline or not deliveries:
            return
        now = time.monotonic()
        for delivery in deliveries:
            if delivery.id not in lane.in_flight:
                lane.in_flight[delivery.id] = now
                self._capacity.hold(1)

    def _let_go(self, lane: _Lane, delivery: Delivery) -> None:
        """An entry no longer in hand (finished, or left to another worker)."""
        if lane.in_flight.pop(delivery.id, None) is not None:
            self._capacity.let_go()

    async def _dispatch(self, lane: _Lane, deliveries: list[Delivery]) -> None:
        if self._inline:
            await self._handle_inline(lane, deliveries)
            return
        for delivery in deliveries:
            await self._slots.acquire()
            task = asyncio.create_task(self._handle(delivery), name=f"handle-{delivery.id}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            # An exception escaping _handle is a bug: it fails the worker, not just one message.
            self._supervisor.watch(task)

    async def _handle_inline(self, lane: _Lane, deliveries: list[Delivery]) -> None:
        """Inline handlers never await: a whole read is handled here, in stream order.

        A handler with a ``batch`` method (echo: one write for all lines) takes the
        read at once; if that raises, each message is retried alone so only the
        failing ones count as failures.
        """
        if not deliveries:
            return
        failures: list[tuple[Delivery, Exception]] = []
        done = deliveries
        batch = getattr(self.handler, "batch", None)
        try:
            if batch is None:
                raise _HandleOneByOne
            batch(deliveries)
        except Exception:
            done = []
            for delivery in deliveries:
                try:
                    self.handler(delivery)
                except Exception as exc:
                    failures.append((delivery, exc))
                else:
                    done.append(delivery)
        now = time.time()
        lateness = metrics.LATENESS.labels()
        for delivery in done:
            lateness.observe(max(0.0, now - delivery.run_at / 1000))
        self.stats.handled += len(done)
        lane.to_ack.extend(done)
        lane.ack_wanted.set()
        for delivery, exc in failures:
            self.stats.failed += 1
            await self._failed(delivery, exc)

    async def _handle(self, delivery: Delivery) -> None:
        try:
            await self._run_handler(delivery)
        except Exception as exc:
            self.stats.failed += 1
            await self._failed(delivery, exc)
        else:
            self.stats.handled += 1
            metrics.LATENESS.labels().observe(max(0.0, time.time() - delivery.run_at / 1000))
            lane = self._lane(delivery)
            lane.to_ack.append(delivery)
            lane.ack_wanted.set()
        finally:
            self._let_go(self._lane(delivery), delivery)
            self._slots.release()

    async def _run_handler(self, delivery: Delivery) -> None:
        """Run the handler, at most ``handler_timeout`` seconds: HandlerTimeout after that.

        The handler is not awaited past its time: an async one is cancelled (and left to
        end as it will, should it ignore the cancel), a sync one keeps its thread, which
        is a daemon so that it cannot hold the process open on exit.
        """
        loop = asyncio.get_running_loop()
        if self._async:
            running: asyncio.Future[Any] = asyncio.ensure_future(self.handler(delivery))
        else:
            running = loop.create_future()
            threading.Thread(
                target=_call_in_thread,
                args=(self.handler, delivery, running, loop),
                name=f"handler-{delivery.id}",
                daemon=True,
            ).start()
        done, _ = await asyncio.wait({running}, timeout=self.handler_timeout)
        if not done:
            running.cancel()
            running.add_done_callback(_abandoned(delivery))
            raise HandlerTimeout(self.handler_timeout)
        running.result()

    async def _failed(self, delivery: Delivery, exc: Exception) -> None:
        attempt = delivery.attempts + 1
        delay = backoff_seconds(attempt, self.settings.retry_base, self.settings.retry_max)
        dead_now = False
        if isinstance(exc, HandlerTimeout):
            reason = exc.reason
        elif isinstance(exc, DeliveryFailed):
            # The handler said more: dead-letter now, or retry no sooner than it asks.
            reason, dead_now = exc.reason, not exc.retry
            delay = max(delay, min(exc.not_before, self.settings.retry_max))
        else:
            reason = f"{type(exc).__name__}: {exc}"
        try:
            store = self._lane(delivery).store
            outcome, attempts = await store.fail(
                delivery, int(delay * 1000), reason, dead_now=dead_now
            )
        except RETRIED as err:
            # Still pending: another worker reclaims it after the visibility timeout.
            log.error("could not record failure", uuid=delivery.uuid, error=describe(err))
            return
        if outcome == "dead":
            self.stats.dead += 1
            metrics.DEAD_LETTERED.inc()
        elif outcome == "retrying":
            metrics.RETRIED.inc()
        log.warning(
            "handler failed",
            uuid=delivery.uuid,
            error=type(exc).__name__,
            # A DeliveryFailed's reason is the handler's own words (a status, an answer).
            reason=reason[:200] if isinstance(exc, DeliveryFailed) else None,
            attempts=attempts,
            outcome=outcome,
            retry_in_s=round(delay, 3) if outcome == "retrying" else None,
        )

    async def _ack_loop(self, lane: _Lane) -> None:
        """Acknowledge in batches: every handled entry of this partition waiting goes in one
        script call."""
        backoff = Backoff(0.05, 2.0)
        while True:
            await lane.ack_wanted.wait()
            lane.ack_wanted.clear()
            if lane.to_ack:
                batch, lane.to_ack = lane.to_ack, []
                lane.acking = {d.id for d in batch}
                try:
                    acked = await lane.store.ack(batch)
                    self.stats.acked += acked
                    metrics.DELIVERED.inc(acked)
                    backoff.reset()
                except RETRIED as exc:
                    log.warning(
                        "ack failed, retrying",
                        count=len(batch),
                        error=describe(exc),
                        **self._where(lane),
                    )
                    lane.to_ack[:0] = batch
                    lane.ack_wanted.set()
                    await asyncio.sleep(backoff.next())
                    continue
                finally:
                    lane.acking = set()
            if self._draining and not lane.to_ack:
                return

    async def _reclaim_loop(self, lane: _Lane) -> None:
        interval = min(max(self.settings.visibility_timeout / 2, 0.05), 5.0)
        await lane.own_read.wait()
        while not self._stopping.is_set():
            asked = time.monotonic()
            async with lane.claiming:
                try:
                    free = max(1, self._capacity.free)
                    lane.reclaim_cursor, claimed, dead = await lane.store.reclaim(
                        self.consumer, lane.reclaim_cursor, min(free, self.settings.read_count)
                    )
                except RETRIED as exc:
                    if not await self._regroup(lane, exc, "reclaim"):
                        log.warning("reclaim failed", error=describe(exc), **self._where(lane))
                    claimed = None
                else:
                    # An entry this process still holds can come back if its renewal was
                    # late (or its acknowledgement is on its way).
                    known = lane.known()
                    claimed = [d for d in claimed if d.id not in known]
                    self._hold(lane, claimed)
            if claimed is None:
                await self._sleep(interval)
                continue
            self.stats.dead += dead
            metrics.DEAD_LETTERED.inc(dead)
            claimed = await self._still_ours(lane, claimed, asked)
            if claimed:
                self.stats.reclaimed += len(claimed)
                metrics.RECLAIMED.inc(len(claimed))
                log.info(
                    "reclaimed",
                    count=len(claimed),
                    uuids=[d.uuid for d in claimed],
                    **self._where(lane),
                )
                await self._dispatch(lane, claimed)
            if dead:
                log.warning("dead-lettered unacknowledged entries", count=dead, **self._where(lane))
            if lane.reclaim_cursor == "0-0":
                await self._sleep(interval)

    async def _extend_loop(self) -> None:
        """Renew claims on entries in hand for longer than a third of the visibility timeout
        (running, or waiting for a slot), each partition's on its own stream, the
        partitions concurrently."""
        period = self.settings.visibility_timeout / 3
        while not self._stopping.is_set():
            await self._sleep(period)
            cutoff = time.monotonic() - period
            renewals = []
            for lane in self._lanes.values():
                ids = [eid for eid, started in lane.in_flight.items() if started <= cutoff]
                if ids:
                    renewals.append(self._extend(lane, ids))
            await asyncio.gather(*renewals)

    async def _extend(self, lane: _Lane, ids: list[str]) -> None:
        try:
            await lane.store.extend(self.consumer, ids)
        except RETRIED as exc:
            if not await self._regroup(lane, exc, "claim renewal"):
                log.warning("claim renewal failed", error=describe(exc), **self._where(lane))

    async def _forget_loop(self) -> None:
        """Say this worker lives, and delete the consumers gone workers left, in every
        partition (every worker does: deleting one twice is nothing)."""
        after_ms = int(self.forget_after * 1000)
        while not self._stopping.is_set():
            for lane in self._lanes.values():
                try:
                    forgotten = await lane.store.forget_consumers(self.consumer, after_ms)
                except RETRIED as exc:
                    log.warning("forgetting gone workers failed", error=describe(exc))
                    continue
                if forgotten:
                    log.info("forgot gone workers", count=forgotten, **self._where(lane))
            await self._sleep(self.forget_every)

    async def _leave_groups(self) -> None:
        """Delete this worker's own consumer from each group where it holds nothing (what
        it still holds, when Redis did not take the last acknowledgements, stays pending
        under its name for another worker to reclaim)."""
        for lane in self._lanes.values():
            try:
                await lane.store.forget_consumers(self.consumer, 0, leaving=True, most=1)
            except RETRIED as exc:
                log.warning("leaving the group failed", error=describe(exc), **self._where(lane))

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)


def _call_in_thread(
    handler: Handler,
    delivery: Delivery,
    outcome: asyncio.Future[Any],
    loop: asyncio.AbstractEventLoop,
) -> None:
    """A sync handler's thread: run it, hand the outcome back to the event loop."""
    try:
        handler(delivery)
    except BaseException as exc:  # every outcome goes back to the loop
        settle = (_set_exception, exc)
    else:
        settle = (_set_result, None)
    # The loop is closed when an abandoned handler outlives the worker: nobody waits then.
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(settle[0], outcome, settle[1])


def _set_result(outcome: asyncio.Future[Any], value: Any) -> None:
    if not outcome.done():
        outcome.set_result(value)


def _set_exception(outcome: asyncio.Future[Any], exc: BaseException) -> None:
    if not outcome.done():
        outcome.set_exception(exc)


def _abandoned(delivery: Delivery):
    """Log how a handler given up on for its timeout ended, if it ever does."""

    def ended(outcome: asyncio.Future[Any]) -> None:
        error = None if outcome.cancelled() else outcome.exception()
        log.info(
            "timed-out handler ended",
            uuid=delivery.uuid,
            error=type(error).__name__ if error is not None else None,
        )

    return ended
