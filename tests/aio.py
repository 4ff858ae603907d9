"""asyncio helpers shared by the in-process integration tests."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar

from app.settings import Settings
from app.store import Store, connect


@contextlib.asynccontextmanager
async def open_store(settings: Settings) -> AsyncIterator[Store]:
    client = connect(settings)
    try:
        yield Store(client, settings)
    finally:
        await client.aclose()


async def reap(*tasks: asyncio.Task) -> None:
    """Cancel until done, then await: one cancel() is not always enough.

    On Python 3.11 ``asyncio.wait_for`` drops a cancellation that arrives as
    its inner future completes (fixed in 3.12), and redis-py wraps every socket
    write in ``wait_for``: a task cancelled mid-command may carry on.
    """
    for task in tasks:
        while not task.done():
            task.cancel()
            await asyncio.wait([task], timeout=0.1)
        with contextlib.suppress(asyncio.CancelledError):
            await task


T = TypeVar("T")


class Harness:
    """A private event loop and the Stores built on it, all closed at the end."""

    def __init__(self, redis_url: str, prefix: str) -> None:
        self.redis_url = redis_url
        self.prefix = prefix
        self.loop = asyncio.new_event_loop()
        self.clients: list[Any] = []

    def store(self, **overrides: Any) -> Store:
        settings = Settings.from_env({}, redis_url=self.redis_url, prefix=self.prefix, **overrides)
        client = connect(settings, socket_timeout=2.0)
        self.clients.append(client)
        return Store(client, settings)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    def close(self) -> None:
        try:
            for client in self.clients:
                self.run(client.aclose())
        finally:
            self.loop.close()
