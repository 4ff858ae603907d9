"""Coalesce concurrent accepts into shared round trips.

Requests that arrive while a round trip is in flight wait for the next one,
which carries all of them in one accept script call. Nothing waits on a timer:
a lone request goes out at once, and under load each round trip carries
whatever queued up during the previous one. The script treats each message as
if it came alone, so batching changes no guarantee: a request is answered only
after its message is stored, and a failed call fails only the requests in it
(nothing of them was written: a script is atomic).
"""

from __future__ import annotations

import asyncio

from redis.exceptions import RedisError

from app.model import NewMessage
from app.store import Accepted, Store

MAX_BATCH = 256  # bounds one script call's size, and so the Redis time it blocks others


class AcceptBatcher:
    def __init__(self, store: Store, max_batch: int = MAX_BATCH) -> None:
        self.store = store
        self.max_batch = max_batch
        self._queue: list[tuple[NewMessage, asyncio.Future[Accepted]]] = []
        self._flushing = False

    async def accept(self, msg: NewMessage) -> Accepted:
        future: asyncio.Future[Accepted] = asyncio.get_running_loop().create_future()
        self._queue.append((msg, future))
        if not self._flushing:
            self._flushing = True
            asyncio.get_running_loop().create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        try:
            while self._queue:
                batch = self._queue[: self.max_batch]
                del self._queue[: self.max_batch]
                try:
                    results = await self.store.accept_many([msg for msg, _ in batch])
                except (RedisError, OSError) as exc:
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, future), result in zip(batch, results, strict=True):
                    if not future.done():  # done: the client went away; its message is stored
                        future.set_result(result)
        finally:
            self._flushing = False
