"""Coalesce concurrent accepts into shared round trips.

Requests that arrive while a round trip is in flight wait for the next one,
which carries all of them in one accept script call. Nothing waits on a timer:
a lone request goes out at once, and under load each round trip carries
whatever queued up during the previous one. The script treats each message as
if it came alone, so batching changes no guarantee: a request is answered only
after its message is stored, and a failed call fails only the requests in it
(nothing of them was written: a script is atomic).

No request is left waiting: whatever goes wrong in a round trip (Redis, or an
error nobody expected, such as a reply the client cannot read) fails every
request it carries, and every request still queued when the flush ends, with
an error the routes answer as 503 "retry with the same uuid" (safe: accept is
idempotent by uuid).
"""

from __future__ import annotations

import asyncio

from redis.exceptions import RedisError

from app.log import get_logger
from app.model import NewMessage
from app.store import Accepted, Store
from app.store.partitions import Partitions

log = get_logger("api")

MAX_BATCH = 256  # bounds one script call's size, and so the Redis time it blocks others


class AcceptFailed(RedisError):
    """An accept round trip failed unexpectedly; whether it wrote is unknown, so the
    client retries with the same uuid (a duplicate then answers 200)."""


class AcceptBatcher:
    def __init__(self, store: Store, max_batch: int = MAX_BATCH) -> None:
        self.store = store
        self.max_batch = max_batch
        # Two parallel lists rather than one of pairs: the script call takes the messages as
        # they are, with no per-request tuple to build and take apart.
        self._msgs: list[NewMessage] = []
        self._futures: list[asyncio.Future[Accepted]] = []
        self._flushing = False
        # The loop keeps only a weak reference to a task: hold the running flush.
        self._flush_task: asyncio.Task[None] | None = None

    async def accept(self, msg: NewMessage) -> Accepted:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Accepted] = loop.create_future()
        self._msgs.append(msg)
        self._futures.append(future)
        if not self._flushing:
            self._flushing = True
            self._flush_task = loop.create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        futures: list[asyncio.Future[Accepted]] = []
        try:
            while self._msgs:
                if len(self._msgs) <= self.max_batch:
                    msgs, futures = self._msgs, self._futures
                    self._msgs, self._futures = [], []
                else:
                    msgs, futures = self._msgs[: self.max_batch], self._futures[: self.max_batch]
                    del self._msgs[: self.max_batch], self._futures[: self.max_batch]
                try:
                    results = await self.store.accept_many(msgs)
                    if len(results) != len(futures):
                        raise AcceptFailed(f"{len(results)} results for {len(futures)} messages")
                except (RedisError, OSError) as exc:
                    _fail(futures, exc)
                    continue
                except Exception as exc:
                    log.exception("accept failed unexpectedly", messages=len(msgs))
                    _fail(futures, AcceptFailed(f"accept failed: {type(exc).__name__}"))
                    continue
                for future, result in zip(futures, results, strict=True):
                    if not future.done():  # done: the client went away; its message is stored
                        future.set_result(result)
                futures = []
        finally:
            # Cancelled (shutdown) or a bug above: nobody may be left waiting.
            stranded = AcceptFailed("accept interrupted")
            _fail(futures, stranded)
            _fail(self._futures, stranded)
            self._msgs, self._futures = [], []
            self._flushing = False


def _fail(futures: list[asyncio.Future[Accepted]], exc: BaseException) -> None:
    for future in futures:
        if not future.done():
            future.set_exception(exc)


class PartitionBatchers:
    """One :class:`AcceptBatcher` per partition (EAT_PARTITIONS > 1): a message joins the
    batch of its uuid's partition, so every round trip is one script call on one slot."""

    def __init__(self, partitions: Partitions, max_batch: int = MAX_BATCH) -> None:
        self.batchers = [AcceptBatcher(store, max_batch) for store in partitions.stores]
        self.index_of = partitions.index_of

    async def accept(self, msg: NewMessage) -> Accepted:
        return await self.batchers[self.index_of(msg.uuid)].accept(msg)
