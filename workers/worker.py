"""A consumer-group worker: read, handle, acknowledge; reclaim what dead workers left.

Delivery guarantee: at least once. An entry is acknowledged only after its
handler returned. A worker that dies (or stalls past the visibility timeout)
between handling and acknowledging leaves the entry pending; another worker
reclaims it and handles it again. That is the only source of duplicates.

Order: entries are started in stream order. With ``concurrency=1`` (or an
inline handler such as ``echo``) they are also finished in that order.

Bounded handler time: an async handler still running after ``handler_timeout``
is cancelled, a sync one (run in a thread of its own) is abandoned; either way
the delivery counts as failed with the reason ``timeout`` (retried with backoff,
then dead-lettered) and its slot and claim are released. Inline handlers (echo)
never block, so they are not timed.

A lost stream or consumer group (``NOGROUP``: a DEL, an eviction, a Redis restarted
without its data) is made anew, at id ``0``, by whichever loop meets it first, so the
worker carries on by itself (see ``Store.ensure_group``).

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

from redis.exceptions import RedisError

from app import metrics
from app.backoff import Backoff, Stopped, describe, until_done
from app.log import get_logger
from app.store import Delivery, Store, group_missing
from app.store.history import HistoryRecorder
from app.store.memory import MemoryPolicy
from app.supervise import Supervisor
from workers.handlers import Handler, is_async
from workers.retry import backoff_seconds

log = get_logger("worker")

BLOCK_MS = 1000  # longest XREADGROUP wait; also bounds how long a stop waits for a read


ACK_FLUSH_GRACE = 10.0  # seconds the ack loop gets, once stopping, to acknowledge what is handled
DEFAULT_HANDLER_TIMEOUT = 300.0


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


class Worker:
    """
    :param store: the Redis client.
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
    """

    def __init__(
        self,
        store: Store,
        handler: Handler,
        consumer: str,
        concurrency: int = 1,
        handler_timeout: float = DEFAULT_HANDLER_TIMEOUT,
        memory_policy: MemoryPolicy | None = None,
        history: HistoryRecorder | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if not handler_timeout > 0:
            raise ValueError("handler_timeout must be greater than 0")
        self.store = store
        self.settings = store.settings
        self.handler = handler
        self.consumer = consumer
        self.concurrency = concurrency
        self.handler_timeout = handler_timeout
        self.memory_policy = memory_policy or MemoryPolicy(
            store.client, self.settings.allow_eviction, self.settings.memory_policy_interval
        )
        self.history = history
        self.stats = WorkerStats()
        self._inline = bool(getattr(handler, "inline", False))
        self._async = is_async(handler)
        self._slots = asyncio.Semaphore(concurrency)
        self._in_flight: dict[str, float] = {}  # entry id -> monotonic start
        self._tasks: set[asyncio.Task] = set()
        self._to_ack: list[Delivery] = []
        self._ack_wanted = asyncio.Event()
        self._stopping = asyncio.Event()
        self._draining = False  # set once no handler can add to the ack queue any more
        # Set once the entries delivered to this name before a restart were read: the reclaim
        # loop waits for it, or what it claims for this name would be read back as our own
        # pending entries and handled a second time.
        self._own_read = asyncio.Event()
        self._supervisor = Supervisor("worker", self._stopping)

    def stop(self) -> None:
        """Stop taking new entries; what is in hand is finished and acknowledged."""
        self._stopping.set()
        self._ack_wanted.set()

    async def run(self) -> None:
        """Until :meth:`stop`; raises TaskDied if one of its loops died (it stops first),
        StorageFormatError or EvictingPolicyError if it must not start at all."""
        stop = self._stopping
        try:
            await until_done(self.store.check_format, stop, "storage format check")
            await until_done(self.memory_policy.require, stop, "maxmemory-policy check")
            await until_done(self.store.ensure_group, stop, "consumer group")
        except Stopped:
            return
        supervisor = self._supervisor
        supervisor.spawn(self._ack_loop(), "ack")
        supervisor.spawn(self._extend_loop(), "extend")
        supervisor.spawn(self.memory_policy.watch(stop), "memory-policy")
        if self.history is not None:
            supervisor.spawn(self.history.run(stop), "history")
        # The two loops that hand out work: both end before the ack queue is drained.
        feeders = {
            supervisor.spawn(self._reclaim_loop(), "reclaim"),
            supervisor.spawn(self._consume(), "read"),
        }
        log.info("worker started", worker=self.consumer, concurrency=self.concurrency)
        try:
            await supervisor.wait()
        finally:
            # Read no more (a loop died, or stop() was called); finish what is in hand:
            # what the feeders are dispatching now, then the handlers running.
            self._stopping.set()
            await asyncio.wait(feeders, timeout=BLOCK_MS / 1000 + self.settings.visibility_timeout)
            if self._tasks:
                await asyncio.wait(self._tasks, timeout=self.settings.visibility_timeout)
            self._draining = True
            self._ack_wanted.set()
            # The ack loop flushes what is handled, then ends. If Redis stays down the
            # entries stay pending and another worker reclaims them (a counted duplicate).
            await supervisor.close(ACK_FLUSH_GRACE)
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

    async def _regroup(self, exc: BaseException, during: str) -> bool:
        """On NOGROUP (the stream or its group was lost), make the group anew; whether it did.

        Every loop meets it (read, reclaim, extend, the own pending read); whichever does
        first makes the group, the others find it there (BUSYGROUP is success).
        """
        if not group_missing(exc):
            return False
        log.warning(
            "consumer group missing, making it anew",
            worker=self.consumer,
            during=during,
            error=describe(exc),
        )
        try:
            await self.store.ensure_group()
        except (RedisError, OSError) as err:
            log.warning("could not make the consumer group", error=describe(err))
            return False
        return True

    async def _own_pending(self) -> list[Delivery]:
        try:
            return await self.store.read(self.consumer, 10_000, None, own_pending=True)
        except (RedisError, OSError) as exc:
            if await self._regroup(exc, "reading own pending entries"):
                return []  # a new group holds nothing of ours
            raise

    async def _consume(self) -> None:
        """Entries delivered to this name before a restart first, then new ones."""
        asked = time.monotonic()
        try:
            own = await until_done(self._own_pending, self._stopping, "reading own pending entries")
        except Stopped:
            return
        finally:
            self._own_read.set()
        await self._dispatch(await self._still_ours(own, asked))
        await self._read_loop()

    async def _read_loop(self) -> None:
        backoff = Backoff(0.05, 2.0)
        while not self._stopping.is_set():
            free = await self._wait_for_capacity()
            if self._stopping.is_set():
                return
            asked = time.monotonic()
            try:
                deliveries = await self.store.read(
                    self.consumer, min(free, self.settings.read_count), BLOCK_MS
                )
            except (RedisError, OSError) as exc:
                if await self._regroup(exc, "read"):
                    continue
                log.warning("read failed", worker=self.consumer, error=describe(exc))
                await backoff.wait(self._stopping)
                continue
            backoff.reset()
            await self._dispatch(await self._still_ours(deliveries, asked))

    async def _still_ours(self, deliveries: list[Delivery], asked: float) -> list[Delivery]:
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
                renewed = await self.store.extend(self.consumer, [delivery.id])
            except (RedisError, OSError) as exc:
                log.warning("claim check failed", uuid=delivery.uuid, error=describe(exc))
                renewed = 0
            if renewed:
                kept.append(delivery)
        if len(kept) < len(deliveries):
            ours = {d.id for d in kept}
            log.warning(
                "skipped entries taken over during a stall",
                worker=self.consumer,
                stalled_s=round(time.monotonic() - asked, 3),
                uuids=[d.uuid for d in deliveries if d.id not in ours],
            )
        return kept

    async def _wait_for_capacity(self) -> int:
        if self._inline:
            # An inline batch is finished before the next read: a full read is always room.
            return self.settings.read_count
        free = self.concurrency - len(self._in_flight)
        if free > 0:
            return free
        # Wait for one slot, then hand it straight back: only the count matters here.
        await self._slots.acquire()
        self._slots.release()
        return max(1, self.concurrency - len(self._in_flight))

    async def _dispatch(self, deliveries: list[Delivery]) -> None:
        if self._inline:
            await self._handle_inline(deliveries)
            return
        for delivery in deliveries:
            await self._slots.acquire()
            self._in_flight[delivery.id] = time.monotonic()
            task = asyncio.create_task(self._handle(delivery), name=f"handle-{delivery.id}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            # An exception escaping _handle is a bug: it fails the worker, not just one message.
            self._supervisor.watch(task)

    async def _handle_inline(self, deliveries: list[Delivery]) -> None:
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
        self._to_ack.extend(done)
        self._ack_wanted.set()
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
            self._to_ack.append(delivery)
            self._ack_wanted.set()
        finally:
            self._in_flight.pop(delivery.id, None)
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
        timed_out = isinstance(exc, HandlerTimeout)
        reason = exc.reason if timed_out else f"{type(exc).__name__}: {exc}"
        try:
            outcome, attempts = await self.store.fail(delivery, int(delay * 1000), reason)
        except (RedisError, OSError) as err:
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
            attempts=attempts,
            outcome=outcome,
            retry_in_s=round(delay, 3) if outcome == "retrying" else None,
        )

    async def _ack_loop(self) -> None:
        """Acknowledge in batches: every handled entry waiting goes in one script call."""
        backoff = Backoff(0.05, 2.0)
        while True:
            await self._ack_wanted.wait()
            self._ack_wanted.clear()
            if self._to_ack:
                batch, self._to_ack = self._to_ack, []
                try:
                    acked = await self.store.ack(batch)
                    self.stats.acked += acked
                    metrics.DELIVERED.inc(acked)
                    backoff.reset()
                except (RedisError, OSError) as exc:
                    log.warning("ack failed, retrying", count=len(batch), error=describe(exc))
                    self._to_ack[:0] = batch
                    self._ack_wanted.set()
                    await asyncio.sleep(backoff.next())
                    continue
            if self._draining and not self._to_ack:
                return

    async def _reclaim_loop(self) -> None:
        interval = min(max(self.settings.visibility_timeout / 2, 0.05), 5.0)
        await self._own_read.wait()
        cursor = "0-0"
        while not self._stopping.is_set():
            asked = time.monotonic()
            try:
                free = max(1, self.concurrency - len(self._in_flight))
                cursor, claimed, dead = await self.store.reclaim(
                    self.consumer, cursor, min(free, self.settings.read_count)
                )
            except (RedisError, OSError) as exc:
                if not await self._regroup(exc, "reclaim"):
                    log.warning("reclaim failed", error=describe(exc))
                await self._sleep(interval)
                continue
            self.stats.dead += dead
            metrics.DEAD_LETTERED.inc(dead)
            # An entry this process is still handling can come back if its renewal was late.
            claimed = [d for d in claimed if d.id not in self._in_flight]
            claimed = await self._still_ours(claimed, asked)
            if claimed:
                self.stats.reclaimed += len(claimed)
                metrics.RECLAIMED.inc(len(claimed))
                log.info("reclaimed", count=len(claimed), uuids=[d.uuid for d in claimed])
                await self._dispatch(claimed)
            if dead:
                log.warning("dead-lettered unacknowledged entries", count=dead)
            if cursor == "0-0":
                await self._sleep(interval)

    async def _extend_loop(self) -> None:
        """Renew claims on entries handled for longer than a third of the visibility timeout."""
        period = self.settings.visibility_timeout / 3
        while not self._stopping.is_set():
            await self._sleep(period)
            cutoff = time.monotonic() - period
            ids = [eid for eid, started in self._in_flight.items() if started <= cutoff]
            if not ids:
                continue
            try:
                await self.store.extend(self.consumer, ids)
            except (RedisError, OSError) as exc:
                if not await self._regroup(exc, "claim renewal"):
                    log.warning("claim renewal failed", error=describe(exc))

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
