"""The promotion loop against a real Redis, with a LeadershipGate opened by hand.

Lateness is measured the way a worker sees it: the test blocks in XREADGROUP on
the stream and notes the wall-clock time an entry arrives, minus its runAt
(Redis and the test share this machine's clock).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid as uuidlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from app.model import NewMessage, State
from app.settings import Settings
from app.store import Store
from app.store.codec import uuid_key, uuid_text
from app.store.keys import CONSUMER_GROUP
from election.gate import LeadershipGate, Role
from election.promoter import Promoter, listen_for_wakeups
from tests.aio import open_store, reap
from tests.wait import async_wait_until

LATENESS_BOUND_MS = 100  # correctness, not performance: the sleep is timed in Python


def now_ms() -> int:
    return int(time.time() * 1000)


def new_uuid() -> str:
    return str(uuidlib.uuid4())


@contextlib.asynccontextmanager
async def running(*coros: Awaitable[None]) -> AsyncIterator[list[asyncio.Task]]:
    """Run background coroutines for the block's duration; cancel and reap them after."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        yield tasks
    finally:
        await reap(*tasks)


async def stop_promoter(promoter: Promoter, task: asyncio.Task) -> None:
    promoter.stop()
    try:
        await asyncio.wait_for(asyncio.shield(task), 2.0)
    finally:
        await reap(task)


# The uuids accepted straight into the stream: due by the time the accept script ran
# (a runAt a few ms ahead, on a loaded machine). No promoter moves those.
QUEUED_AT_ACCEPT: set[str] = set()


async def accept(store: Store, run_at: int, message: str = "hello") -> str:
    uuid = new_uuid()
    accepted = await store.accept(NewMessage(uuid=uuid, message=message, run_at=run_at))
    assert accepted.created
    if accepted.state == "queued":
        QUEUED_AT_ACCEPT.add(uuid)
    return uuid


async def read_one(store: Store, consumer: str = "probe", block_ms: int = 3000) -> tuple[str, int]:
    """Block on the stream for one entry; return (uuid, arrival wall-clock ms)."""
    delivered = await store.read(consumer, 1, block_ms)
    arrived = now_ms()
    assert delivered, f"nothing reached the stream within {block_ms} ms"
    return delivered[0].uuid, arrived


async def stream_uuids(store: Store) -> list[str]:
    entries = await store.client.xrange(store.keys.stream)
    return [uuid_text(fields[b"u"]) for _id, fields in entries]


@pytest.fixture
def settings(redis_url: str, prefix: str, redis_client) -> Settings:
    # redis_client: deletes this test's keys afterwards.
    return Settings(redis_url=redis_url, prefix=prefix)


def test_future_message_is_promoted_within_milliseconds_of_its_run_at(settings) -> None:
    async def scenario() -> None:
        async with open_store(settings) as store:
            await store.ensure_group()
            gate = LeadershipGate()
            gate.set_role(Role.LEADER, 1)
            promoter = Promoter(store, gate)
            run_at = now_ms() + 300
            uuid = await accept(store, run_at)
            assert (await store.record(uuid)).state is State.SCHEDULED

            task = asyncio.create_task(promoter.run())
            try:
                got, arrived = await read_one(store)
            finally:
                await stop_promoter(promoter, task)

            assert got == uuid
            lateness = arrived - run_at
            assert 0 <= lateness < LATENESS_BOUND_MS, f"promoted {lateness} ms after runAt"
            record = await store.record(uuid)
            assert record.state is State.QUEUED
            assert promoter.stats.moved == 1 and promoter.stats.refused == 0

    asyncio.run(scenario())


def test_earlier_message_accepted_while_sleeping_wakes_the_promoter_and_is_on_time(
    settings, redis_client
) -> None:
    async def scenario() -> None:
        async with open_store(settings) as store:
            await store.ensure_group()
            gate = LeadershipGate()
            gate.set_role(Role.LEADER, 1)
            # A long idle cap: only a wake-up can bring the promoter back before the later one.
            promoter = Promoter(store, gate, max_idle=30.0)
            later = await accept(store, now_ms() + 20_000, "later")

            async with running(promoter.run(), listen_for_wakeups(store, promoter)):
                channel = store.keys.wake_channel
                await async_wait_until(
                    lambda: dict(redis_client.pubsub_numsub(channel)).get(channel.encode(), 0) >= 1,
                    "wake-up subscription",
                    2.0,
                )
                # It has looked at least once: now it sleeps toward `later` (20 s away).
                await async_wait_until(lambda: promoter.stats.calls >= 1, "first promote call", 2.0)
                calls_before = promoter.stats.calls

                run_at = now_ms() + 300
                early = await accept(store, run_at, "early")
                got, arrived = await read_one(store)
                promoter.stop()

            assert got == early
            lateness = arrived - run_at
            assert 0 <= lateness < LATENESS_BOUND_MS, f"promoted {lateness} ms after runAt"
            assert promoter.stats.calls > calls_before
            assert (await store.record(later)).state is State.SCHEDULED
            assert await stream_uuids(store) == [early]

    asyncio.run(scenario())


def test_zombie_leader_is_refused_once_a_newer_epoch_promoted_and_nothing_is_promoted_twice(
    settings,
) -> None:
    async def scenario() -> None:
        async with open_store(settings) as store_a, open_store(settings) as store_b:
            gate_a, gate_b = LeadershipGate(), LeadershipGate()
            promoter_a = Promoter(store_a, gate_a, max_idle=0.05)
            promoter_b = Promoter(store_b, gate_b, max_idle=0.05)
            uuids: list[str] = []

            # A leads under epoch 5 and promotes what is due.
            gate_a.set_role(Role.LEADER, 5)
            uuids += [await accept(store_a, now_ms() + 20, f"a{i}") for i in range(5)]
            uuids += [await accept(store_a, now_ms() + 150, f"a-later{i}") for i in range(5)]
            async with running(promoter_a.run()) as (task_a,):
                await async_wait_until(lambda: promoter_a.stats.moved >= 5, "A promoted", 2.0)

                # B is elected with epoch 7 while A, paused or partitioned, still thinks it leads.
                gate_b.set_role(Role.LEADER, 7)
                async with running(promoter_b.run()) as (task_b,):
                    await async_wait_until(
                        lambda: promoter_b.stats.calls >= 1, "B promoted once", 2.0
                    )
                    b_uuids = [await accept(store_b, now_ms() + 50, f"b{i}") for i in range(5)]
                    uuids += b_uuids
                    promoter_a.poke()
                    await async_wait_until(lambda: promoter_a.stats.refused >= 1, "A refused", 2.0)
                    assert not gate_a.is_open and gate_a.role is Role.SUSPENDED
                    # The stale epoch (or an older one) cannot reopen A's gate.
                    assert gate_a.set_role(Role.LEADER, 5) is False
                    assert gate_a.set_role(Role.LEADER, 4) is False

                    await async_wait_until(_all_promoted(store_b), "everything promoted by B", 3.0)
                    moved_by_a = promoter_a.stats.moved
                    await stop_promoter(promoter_b, task_b)
                await stop_promoter(promoter_a, task_a)

            # A fenced call straight to the script says who won.
            refused = await store_a.promote(5)
            assert refused.refused_by == 7
            assert promoter_a.stats.refused >= 1
            assert promoter_a.stats.moved == moved_by_a
            in_stream = await stream_uuids(store_a)
            assert sorted(in_stream) == sorted(uuids), "each uuid exactly once"
            assert len(in_stream) == len(set(in_stream))
            promoted = [u for u in uuids if u not in QUEUED_AT_ACCEPT]
            assert promoter_a.stats.moved + promoter_b.stats.moved == len(promoted)
            assert promoter_b.stats.moved >= len(set(b_uuids) - QUEUED_AT_ACCEPT)

    asyncio.run(scenario())


def _all_promoted(store: Store) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return await store.client.zcard(store.keys.delayed) == 0

    return check


def test_closing_the_gate_stops_promotion_and_reopening_resumes_it(settings, redis_client) -> None:
    async def scenario() -> None:
        async with open_store(settings) as store:
            await store.ensure_group()
            gate = LeadershipGate()
            gate.set_role(Role.LEADER, 1)
            promoter = Promoter(store, gate)
            async with running(promoter.run(), listen_for_wakeups(store, promoter)):
                first_at = now_ms() + 50
                first = await accept(store, first_at)
                assert (await read_one(store))[0] == first

                gate.set_role(Role.SUSPENDED)
                # A call already on its way when the gate closed may still land; no more after it.
                calls = promoter.stats.calls + 1
                run_at = now_ms() + 50
                held = await accept(store, run_at)
                # Well past its runAt, and still not promoted while the gate is closed.
                await async_wait_until(lambda: now_ms() >= run_at + 300, "time passes", 1.0)
                assert (await store.record(held)).state is State.SCHEDULED
                assert await store.client.xlen(store.keys.stream) == 1
                assert promoter.stats.calls <= calls

                gate.set_role(Role.LEADER, 1)
                got, _ = await read_one(store)
                assert got == held
                promoter.stop()
            assert (await store.record(held)).state is State.QUEUED
            groups = redis_client.xinfo_groups(store.keys.stream)
            assert [g["name"] for g in groups] == [CONSUMER_GROUP.encode()]

    asyncio.run(scenario())


def test_a_corrupt_record_does_not_stop_the_promoter_and_every_message_behind_it_is_promoted(
    settings, redis_client
) -> None:
    async def scenario() -> None:
        async with open_store(settings) as store:
            await store.ensure_group()
            run_at = now_ms() + 100
            uuids = [await accept(store, run_at, f"m{i}") for i in range(3)]
            await store.client.hset(store.keys.messages, uuid_key(uuids[0]), b"\x00bad")
            gate = LeadershipGate()
            gate.set_role(Role.LEADER, 1)
            promoter = Promoter(store, gate, max_idle=0.1)
            async with running(promoter.run()):
                await async_wait_until(
                    lambda: redis_client.xlen(store.keys.stream) == 2, "the others promoted", 3.0
                )
                assert promoter.stats.errors == 0
                promoter.stop()
            assert await stream_uuids(store) == uuids[1:]
            assert (await store.record(uuids[0])).state is State.DEAD

    asyncio.run(scenario())
