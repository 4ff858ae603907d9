"""A consumer-group worker: read, handle, acknowledge; reclaim what dead workers left.

Delivery guarantee: at least once. An entry is acknowledged only after its
handler returned. A worker that dies (or stalls past the visibility timeout)
between handling and acknowledging leaves the entry pending; another worker
reclaims it and handles it again. That is the only source of duplicates.

Order: entries are started in stream order. With ``concurrency=1`` (or an
inline handler such as ``echo``) they are also finished in that order.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass

from redis.exceptions import RedisError

from app import metrics
from app.log import get_logger
from app.store import Delivery, Store
from workers.handlers import Handler, is_async
from workers.retry import backoff_seconds

log = get_logger("worker")

BLOCK_MS = 1000  # longest XREADGROUP wait; also bounds how long a stop waits for a read


class _HandleOneByOne(Exception):
    """The handler has no batch form."""


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
    """

    def __init__(self, store: Store, handler: Handler, consumer: str, concurrency: int = 1) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.store = store
        self.settings = store.settings
        self.handler = handler
        self.consumer = consumer
        self.concurrency = concurrency
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

    def stop(self) -> None:
        """Stop taking new entries; what is in hand is finished and acknowledged."""
        self._stopping.set()
        self._ack_wanted.set()

    async def run(self) -> None:
        await self._retry(self.store.check_format)
        await self._retry(self.store.ensure_group)
        helpers = [
            asyncio.create_task(self._ack_loop(), name="ack"),
            asyncio.create_task(self._reclaim_loop(), name="reclaim"),
            asyncio.create_task(self._extend_loop(), name="extend"),
        ]
        log.info("worker started", worker=self.consumer, concurrency=self.concurrency)
        try:
            # Entries delivered to this name before a restart come first.
            asked = time.monotonic()
            own = await self._retry(
                lambda: self.store.read(self.consumer, 10_000, None, own_pending=True)
            )
            await self._dispatch(await self._still_ours(own or [], asked))
            await self._read_loop()
        finally:
            if self._tasks:
                await asyncio.wait(self._tasks, timeout=self.settings.visibility_timeout)
            self._draining = True
            self._ack_wanted.set()
            # The ack loop flushes what is handled, then ends. If Redis stays down the
            # entries stay pending and another worker reclaims them (a counted duplicate).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(helpers[0], timeout=10.0)
            for task in helpers[1:]:
                task.cancel()
            for task in helpers[1:]:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            log.info(
                "worker stopped",
                worker=self.consumer,
                handled=self.stats.handled,
                failed=self.stats.failed,
                reclaimed=self.stats.reclaimed,
            )

    async def _read_loop(self) -> None:
        delay = 0.05
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
                log.warning("read failed", worker=self.consumer, error=type(exc).__name__)
                await self._sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            delay = 0.05
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
            except (RedisError, OSError):
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
            task = asyncio.create_task(self._handle(delivery))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

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
            if self._async:
                await self.handler(delivery)
            else:
                await asyncio.to_thread(self.handler, delivery)
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

    async def _failed(self, delivery: Delivery, exc: Exception) -> None:
        attempt = delivery.attempts + 1
        delay = backoff_seconds(attempt, self.settings.retry_base, self.settings.retry_max)
        reason = f"{type(exc).__name__}: {exc}"
        try:
            outcome, attempts = await self.store.fail(delivery, int(delay * 1000), reason)
        except (RedisError, OSError) as err:
            # Still pending: another worker reclaims it after the visibility timeout.
            log.error("could not record failure", uuid=delivery.uuid, error=type(err).__name__)
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
        delay = 0.05
        while True:
            await self._ack_wanted.wait()
            self._ack_wanted.clear()
            if self._to_ack:
                batch, self._to_ack = self._to_ack, []
                try:
                    acked = await self.store.ack(batch)
                    self.stats.acked += acked
                    metrics.DELIVERED.inc(acked)
                    delay = 0.05
                except (RedisError, OSError) as exc:
                    log.warning("ack failed, retrying", count=len(batch), error=type(exc).__name__)
                    self._to_ack[:0] = batch
                    self._ack_wanted.set()
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 2.0)
                    continue
            if self._draining and not self._to_ack:
                return

    async def _reclaim_loop(self) -> None:
        interval = min(max(self.settings.visibility_timeout / 2, 0.05), 5.0)
        cursor = "0-0"
        while not self._stopping.is_set():
            asked = time.monotonic()
            try:
                free = max(1, self.concurrency - len(self._in_flight))
                cursor, claimed, dead = await self.store.reclaim(
                    self.consumer, cursor, min(free, self.settings.read_count)
                )
            except (RedisError, OSError) as exc:
                log.warning("reclaim failed", error=type(exc).__name__)
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
                log.warning("claim renewal failed", error=type(exc).__name__)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    async def _retry(self, call):
        delay = 0.05
        while True:
            try:
                return await call()
            except (RedisError, OSError) as exc:
                if self._stopping.is_set():
                    return None
                log.warning("redis unavailable, retrying", error=type(exc).__name__)
                await self._sleep(delay)
                delay = min(delay * 2, 2.0)
