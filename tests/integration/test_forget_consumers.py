"""Consumers that dead or stopped workers leave in the group are deleted, and never
one that holds an entry (real Redis, and the session's Redis Cluster for partitions).

A worker reads under a name of its own (host and pid), so without this every restart
and every pod scaled away would leave a consumer in each partition's group forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid as uuidlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from app.model import NewMessage
from app.settings import Settings
from app.store import Store, open_client
from app.store.keys import CONSUMER_GROUP
from app.store.partitions import Partitions
from tests.aio import open_store, reap
from tests.wait import async_wait_until
from workers.handlers import make_echo
from workers.worker import Worker, forget_after_default

DEADLINE = 10.0


def now_ms() -> int:
    return int(time.time() * 1000)


@pytest.fixture
def settings(redis_url: str, prefix: str, redis_client) -> Settings:
    # redis_client: deletes this test's keys afterwards.
    return Settings(redis_url=redis_url, prefix=prefix, visibility_timeout=0.5)


@pytest.fixture
def echo_fd(tmp_path: Path):
    fd = os.open(tmp_path / "echo.jsonl", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        yield fd
    finally:
        os.close(fd)


async def consumers(store: Store, field: str = "pending") -> dict[str, int]:
    """Each consumer of the group in ``store``'s partition, with its pending count (or
    its idle milliseconds)."""
    found = await store.client.xinfo_consumers(store.keys.stream, CONSUMER_GROUP)
    return {
        (c["name"].decode() if isinstance(c["name"], bytes) else c["name"]): int(c[field])
        for c in found
    }


async def all_idle(store: Store, names: set[str], ms: int) -> bool:
    idle = await consumers(store, "idle")
    return all(idle[name] >= ms for name in names)


async def join(store: Store, consumer: str, count: int = 0) -> None:
    """``consumer`` joins the group as a worker would, holding ``count`` entries it read
    (or nothing), then falls silent as a killed worker does."""
    await store.ensure_group()
    if count:
        await store.client.xreadgroup(
            CONSUMER_GROUP, consumer, {store.keys.stream: ">"}, count=count
        )
    else:
        await store.client.xgroup_createconsumer(store.keys.stream, CONSUMER_GROUP, consumer)


async def records(store: Store) -> set[str]:
    return {k.decode() for k in await store.client.hkeys(store.keys.workers)}


async def accept_due(store: Store, count: int) -> None:
    for i in range(count):
        accepted = await store.accept(NewMessage(str(uuidlib.uuid4()), f"m{i}", now_ms()))
        assert accepted.created


async def forgotten(store: Store, name: str) -> bool:
    return name not in await consumers(store)


@contextlib.asynccontextmanager
async def running(worker: Worker) -> AsyncIterator[asyncio.Task]:
    task = asyncio.create_task(worker.run())
    try:
        yield task
    finally:
        worker.stop()
        try:
            await asyncio.wait_for(asyncio.shield(task), DEADLINE)
        finally:
            await reap(task)


def test_the_limit_is_past_any_read_and_grows_with_the_visibility_timeout() -> None:
    assert forget_after_default(0.5) == 300.0
    assert forget_after_default(30.0) == 300.0
    assert forget_after_default(120.0) == 1200.0


def test_only_gone_workers_consumers_holding_nothing_are_forgotten(settings: Settings) -> None:
    async def scenario() -> None:
        async with open_store(settings) as store:
            await accept_due(store, 1)
            await join(store, "dead-holding", count=1)  # holds the one entry
            await join(store, "dead-empty")
            await join(store, "quiet-live")  # never delivered anything, but says it lives
            await async_wait_until(
                lambda: all_idle(store, {"dead-holding", "dead-empty", "quiet-live"}, 250),
                "the three to be idle 250 ms",
                DEADLINE,
            )
            await store.forget_consumers("quiet-live", 60_000)  # its minutely record
            assert await consumers(store) == {
                "dead-holding": 1,
                "dead-empty": 0,
                "quiet-live": 0,
            }

            assert await store.forget_consumers("me", 200) == 1
            assert await consumers(store) == {"dead-holding": 1, "quiet-live": 0}
            assert await records(store) == {"quiet-live", "me"}
            # The one entry is still pending under its holder, for a reclaim to deliver.
            pending = await store.client.xpending(store.keys.stream, CONSUMER_GROUP)
            assert pending["pending"] == 1

            # A worker that stops takes its record and its consumer (it holds nothing).
            assert await store.forget_consumers("quiet-live", 0, leaving=True) == 1
            assert await consumers(store) == {"dead-holding": 1}
            assert await records(store) == {"me"}

    asyncio.run(scenario())


def test_a_worker_leaving_while_it_holds_entries_keeps_its_consumer(settings: Settings) -> None:
    async def scenario() -> None:
        async with open_store(settings) as store:
            await accept_due(store, 2)
            await join(store, "w", count=2)
            assert await store.forget_consumers("w", 0, leaving=True) == 0
            assert await consumers(store) == {"w": 2}

    asyncio.run(scenario())


def test_records_of_workers_gone_long_ago_are_dropped(settings: Settings) -> None:
    async def scenario() -> None:
        async with open_store(settings) as store:
            await store.client.hset(store.keys.workers, "long-gone", now_ms() - 10_000)
            await store.client.hset(store.keys.workers, "lately", now_ms() - 1_000)
            await store.forget_consumers("me", 4_000)
            assert await records(store) == {"lately", "me"}

    asyncio.run(scenario())


def test_forgetting_where_there_is_no_stream_or_group_yet_records_the_worker(
    settings: Settings,
) -> None:
    async def scenario() -> None:
        async with open_store(settings) as store:
            assert await store.forget_consumers("me", 0) == 0
            assert await records(store) == {"me"}

    asyncio.run(scenario())


def test_a_worker_forgets_a_dead_workers_consumer_once_its_entries_were_reclaimed(
    settings: Settings, echo_fd: int
) -> None:
    async def scenario() -> None:
        async with open_store(settings) as store:
            await accept_due(store, 3)
            await join(store, "dead", count=3)
            worker = Worker(
                store, make_echo("w1", echo_fd), "w1", forget_after=0.3, forget_every=0.1
            )
            async with running(worker):
                # The worker reclaims the dead one's 3 entries (past the visibility
                # timeout), then deletes the consumer that holds nothing any more.
                await async_wait_until(
                    lambda: worker.stats.acked == 3, "the 3 to be handled", DEADLINE
                )
                await async_wait_until(
                    lambda: forgotten(store, "dead"), "the dead consumer to be forgotten", DEADLINE
                )
                assert "w1" in await consumers(store)

    asyncio.run(scenario())


def test_a_worker_that_stops_leaves_no_consumer_and_no_record_in_any_partition(
    cluster_url: str, prefix: str, echo_fd: int
) -> None:
    settings = Settings.from_env({}, redis_url=cluster_url, prefix=prefix, partitions=4)

    async def scenario() -> None:
        client = await open_client(settings)
        partitions = Partitions(client, settings)
        try:
            msgs = [NewMessage(str(uuidlib.uuid4()), f"m{i}", now_ms()) for i in range(40)]
            await partitions.accept_many(msgs)
            worker = Worker(partitions, make_echo("w1", echo_fd), "w1")
            async with running(worker):
                await async_wait_until(lambda: worker.stats.acked == 40, "all acked", DEADLINE)
                for store in partitions:
                    assert "w1" in await records(store)
                    assert "w1" in await consumers(store)
            for store in partitions:
                assert "w1" not in await consumers(store)
                assert await records(store) == set()
        finally:
            await client.aclose()

    asyncio.run(scenario())
