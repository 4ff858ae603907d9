"""A read whose reply is lost after Redis delivered the entries (its connection closed
under it: a failover, a reshard's redirections) costs milliseconds, not the visibility
timeout: the worker reads back what was delivered to its name and does not hold.

Real Redis; the lost reply is made by letting the real XREADGROUP run and then raising
the error a closed connection raises, as redis-py does when it happens mid-command.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid as uuidlib
from collections import Counter
from pathlib import Path

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from app.model import NewMessage
from app.settings import Settings
from app.store import Store
from app.store.keys import CONSUMER_GROUP
from tests.aio import open_store, reap
from tests.wait import async_wait_until
from workers.handlers import make_echo
from workers.worker import Worker

WITHIN = 5.0  # far below the visibility timeout, after which a reclaim would rescue them


@pytest.fixture
def settings(redis_url: str, prefix: str, redis_client) -> Settings:
    # redis_client: deletes this test's keys afterwards.
    return Settings(redis_url=redis_url, prefix=prefix, visibility_timeout=30.0)


def lose_first_reply(store: Store) -> list[int]:
    """The first read that brings entries runs in Redis, then its reply is lost."""
    real = store.read
    lost: list[int] = []

    async def read(consumer, count, block_ms, own_pending=False):
        deliveries = await real(consumer, count, block_ms, own_pending)
        if deliveries and not own_pending and not lost:
            lost.append(len(deliveries))
            raise RedisConnectionError("Connection closed by server.")
        return deliveries

    store.read = read  # type: ignore[method-assign]
    return lost


@pytest.mark.parametrize("inline", [True, False], ids=["inline-echo", "concurrent-handler"])
def test_entries_a_lost_read_reply_delivered_are_read_back_and_handled_once_at_once(
    settings: Settings, tmp_path: Path, inline: bool
) -> None:
    path = tmp_path / "echo.jsonl"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    async def scenario() -> None:
        async with open_store(settings) as store:
            await store.ensure_group()
            lost = lose_first_reply(store)
            echo = make_echo("w1", fd)
            if not inline:

                async def handler(delivery):  # not inline: runs in its own task
                    echo(delivery)

                handler_used = handler
            else:
                handler_used = echo
            worker = Worker(store, handler_used, "w1", concurrency=4)
            task = asyncio.create_task(worker.run())
            try:
                started = time.monotonic()
                for i in range(5):
                    await store.accept(
                        NewMessage(str(uuidlib.uuid4()), f"m{i}", int(time.time() * 1000))
                    )
                await async_wait_until(lambda: worker.stats.acked == 5, "all 5 acked", WITHIN)
                assert lost, "no reply was lost: the case was not exercised"
                assert time.monotonic() - started < WITHIN
                pending = await store.client.xpending(store.keys.stream, CONSUMER_GROUP)
                assert pending["pending"] == 0
            finally:
                worker.stop()
                await asyncio.wait_for(asyncio.shield(task), 10)
                await reap(task)

    try:
        asyncio.run(scenario())
    finally:
        os.close(fd)
    echoed = Counter(json.loads(line)["uuid"] for line in path.read_text().splitlines())
    assert len(echoed) == 5 and set(echoed.values()) == {1}, echoed
