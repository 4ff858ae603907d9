"""The worker's fan-in on a real 3-master Redis Cluster, 16 partitions: one XREADGROUP per
partition feeding one set of ``--concurrency`` slots, and every acknowledgement, failure,
reclaim, quarantine and NOGROUP recovery in the partition the entry came from. No
partition starves another: a backlog in one, or every partition due at one instant."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import time
import uuid as uuidlib
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from structlog.testing import capture_logs

from app.model import NewMessage, State
from app.settings import Settings
from app.store import Delivery, Store, open_client
from app.store.keys import CONSUMER_GROUP
from app.store.partitions import Partitions
from election.gate import LeadershipGate, Role
from election.promoter import Promoter, wake_promoters
from tests.aio import reap
from tests.wait import async_wait_until
from workers.handlers import make_echo
from workers.worker import Worker

PARTITIONS = 16
DEADLINE = 15.0


def now_ms() -> int:
    return int(time.time() * 1000)


@pytest.fixture
def settings(cluster_url: str, prefix: str) -> Settings:
    return Settings.from_env({}, redis_url=cluster_url, prefix=prefix, partitions=PARTITIONS)


@pytest.fixture
def echo_out(tmp_path: Path):
    path = tmp_path / "echo.jsonl"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        yield path, fd
    finally:
        os.close(fd)


def echoed(path: Path) -> list[str]:
    return [json.loads(line)["uuid"] for line in path.read_text().splitlines()]


@contextlib.asynccontextmanager
async def opened(settings: Settings) -> AsyncIterator[Partitions]:
    client = await open_client(settings)
    try:
        yield Partitions(client, settings)
    finally:
        await client.aclose()


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


@contextlib.asynccontextmanager
async def leading(partitions: Partitions) -> AsyncIterator[None]:
    gate = LeadershipGate()
    gate.set_role(Role.LEADER, 1)
    promoters = [Promoter(store, gate, max_idle=0.2) for store in partitions]
    tasks = [asyncio.create_task(p.run()) for p in promoters]
    tasks.append(asyncio.create_task(wake_promoters(partitions.client, promoters)))
    try:
        yield
    finally:
        for promoter in promoters:
            promoter.stop()
        await reap(*tasks)


def uuid_in(partitions: Partitions, partition: int) -> str:
    while True:
        uuid = str(uuidlib.uuid4())
        if partitions.index_of(uuid) == partition:
            return uuid


async def accept(partitions: Partitions, counts: dict[int, int], run_at: int | None = None):
    """Accept ``counts[p]`` messages in partition ``p``, due at ``run_at`` (now); uuids."""
    msgs = [
        NewMessage(uuid_in(partitions, p), f"p{p}-{i}", run_at or now_ms())
        for p, n in counts.items()
        for i in range(n)
    ]
    for start in range(0, len(msgs), 500):
        accepted = await partitions.accept_many(msgs[start : start + 500])
        assert all(a.created for a in accepted)
    return [m.uuid for m in msgs]


def every(n: int) -> dict[int, int]:
    return dict.fromkeys(range(PARTITIONS), n)


async def pending(store: Store) -> int:
    return int((await store.client.xpending(store.keys.stream, CONSUMER_GROUP))["pending"])


async def drained(partitions: Partitions) -> bool:
    for store in partitions:
        if await store.client.xlen(store.keys.stream) or await pending(store):
            return False
    return True


class Recorder:
    """An async handler that takes ``seconds`` and notes what it ran, in which partition,
    and how many ran at once (and how many entries the worker had in hand)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.worker: Worker | None = None
        self.running = 0
        self.most_running = 0
        self.most_in_hand = 0
        self.done: list[tuple[str, int, float]] = []  # uuid, partition, monotonic time

    async def __call__(self, delivery: Delivery) -> None:
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        if self.worker is not None:
            self.most_in_hand = max(self.most_in_hand, self.worker._capacity.in_hand)
        try:
            await asyncio.sleep(self.seconds)
        finally:
            self.running -= 1
        self.done.append((delivery.uuid, delivery.partition, time.monotonic()))


def test_a_worker_reads_every_partition_and_acknowledges_each_entry_in_its_own(
    settings: Settings, echo_out
) -> None:
    path, fd = echo_out

    async def scenario() -> None:
        async with opened(settings) as partitions:
            uuids = await accept(partitions, every(10))
            worker = Worker(partitions, make_echo("w1", fd), "w1")
            async with running(worker):
                await async_wait_until(lambda: worker.stats.acked == 160, "acked", DEADLINE)
            assert sorted(echoed(path)) == sorted(uuids)
            assert await drained(partitions)
            for uuid in uuids:
                record = await partitions.store_for(uuid).record(uuid)
                assert record is not None and record.state is State.DELIVERED

    asyncio.run(scenario())


def test_concurrency_bounds_the_handlers_running_across_partitions(settings: Settings) -> None:
    async def scenario() -> None:
        async with opened(settings) as partitions:
            uuids = await accept(partitions, every(8))
            handler = Recorder(0.02)
            worker = Worker(partitions, handler, "w1", concurrency=3)
            handler.worker = worker
            async with running(worker):
                await async_wait_until(lambda: worker.stats.acked == 128, "acked", DEADLINE)
            assert handler.most_running == 3
            # Read ahead of the slots: at most one entry per partition's blocked read.
            assert handler.most_in_hand <= 3 + PARTITIONS, handler.most_in_hand
            assert Counter(uuid for uuid, _p, _t in handler.done) == Counter(uuids)
            # Each delivery says the partition it came from.
            assert all(partitions.index_of(u) == p for u, p, _t in handler.done)
            assert await drained(partitions)

    asyncio.run(scenario())


def test_a_backlog_in_one_partition_does_not_delay_messages_due_in_the_others(
    settings: Settings,
) -> None:
    # About two seconds of work in partition 0: on a loaded machine a second was once
    # nearly done before the other partitions' messages were even accepted.
    backlog, slots, seconds = 400, 4, 0.02

    async def scenario() -> None:
        async with opened(settings) as partitions:
            await accept(partitions, {0: backlog})
            handler = Recorder(seconds)
            worker = Worker(partitions, handler, "w1", concurrency=slots)
            async with running(worker):
                await async_wait_until(lambda: len(handler.done) >= 20, "the backlog", DEADLINE)
                sent = time.monotonic()
                others = await accept(partitions, {p: 1 for p in range(1, PARTITIONS)})
                await async_wait_until(
                    lambda: set(others) <= {u for u, _p, _t in handler.done}, "others", DEADLINE
                )
                backlog_left = backlog - sum(1 for _u, p, _t in handler.done if p == 0)
                await async_wait_until(lambda: worker.stats.acked == backlog + 15, "all", DEADLINE)
            waited = {u: t - sent for u, _p, t in handler.done if u in others}
            print(f"[skew] others handled after {max(waited.values()) * 1000:.0f} ms at most")
            assert backlog_left > backlog // 4, "the backlog was nearly done: nothing measured"
            assert max(waited.values()) < 0.3, waited

    asyncio.run(scenario())


def test_two_partitions_with_backlogs_take_turns_at_the_slots(settings: Settings) -> None:
    # Accepted one after the other: the first is in Redis well before the second.
    backlog, slots = 150, 2

    async def scenario() -> None:
        async with opened(settings) as partitions:
            await accept(partitions, {0: backlog})
            await accept(partitions, {1: backlog})
            handler = Recorder(0.005)
            worker = Worker(partitions, handler, "w1", concurrency=slots)
            async with running(worker):
                await async_wait_until(
                    lambda: worker.stats.acked == 2 * backlog, "all handled", DEADLINE
                )
            first_half = Counter(p for _u, p, _t in handler.done[:backlog])
            print(f"[turns] first {backlog} handled by partition: {dict(first_half)}")
            # Whichever reads again first must not take every freed slot: each partition
            # has at least a third of the first half.
            assert min(first_half[0], first_half[1]) >= backlog // 3, first_half

    asyncio.run(scenario())


def test_a_backlog_in_one_partition_does_not_delay_the_others_with_the_inline_echo(
    settings: Settings, echo_out
) -> None:
    path, fd = echo_out
    backlog = 20_000

    async def scenario() -> None:
        async with opened(settings) as partitions:
            await accept(partitions, {0: backlog})
            worker = Worker(partitions, make_echo("w1", fd), "w1")
            async with running(worker):
                await async_wait_until(lambda: worker.stats.handled >= 1000, "busy", DEADLINE)
                others = await accept(partitions, {p: 1 for p in range(1, PARTITIONS)})
                await async_wait_until(
                    lambda: worker.stats.acked == backlog + 15, "all handled", DEADLINE
                )
            lines = echoed(path)
            positions = [lines.index(u) for u in others]
            print(f"[skew, echo] others at lines {min(positions)}-{max(positions)} of {len(lines)}")
            # Behind at most a few of partition 0's reads (1,000 entries each), not its backlog.
            assert max(positions) < len(lines) - backlog // 2, positions

    asyncio.run(scenario())


def test_when_every_partition_falls_due_at_one_instant_each_is_served_from_the_start(
    settings: Settings,
) -> None:
    per_partition, slots = 30, 4

    async def scenario() -> None:
        async with opened(settings) as partitions:
            for store in partitions:
                await store.ensure_group()
            await accept(partitions, every(per_partition), run_at=now_ms() + 1000)
            handler = Recorder(0.005)
            worker = Worker(partitions, handler, "w1", concurrency=slots)
            async with leading(partitions), running(worker):
                total = PARTITIONS * per_partition
                await async_wait_until(lambda: worker.stats.acked == total, "all", DEADLINE)
            order = [p for _u, p, _t in handler.done]
            first = {p: order.index(p) for p in range(PARTITIONS)}
            print(f"[one instant] first handled per partition at {sorted(first.values())}")
            # Served in turn: every partition's first message within the first two rounds.
            assert max(first.values()) < 2 * PARTITIONS, first

    asyncio.run(scenario())


class FaultyAck:
    """A partition's Store whose acknowledgements fail (its master does not answer) until
    ``released`` is set."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.released = asyncio.Event()
        self.failures = 0

    def __getattr__(self, name: str):
        return getattr(self._store, name)

    async def ack(self, deliveries: list[Delivery]) -> int:
        if not self.released.is_set():
            self.failures += 1
            raise RedisConnectionError("injected: this partition's master does not answer")
        return await self._store.ack(deliveries)


def test_acknowledgements_failing_in_one_partition_hold_up_no_other_and_are_retried(
    settings: Settings, echo_out
) -> None:
    _path, fd = echo_out

    async def scenario() -> None:
        async with opened(settings) as partitions:
            uuids = await accept(partitions, every(5))
            faulty = FaultyAck(partitions.stores[0])
            partitions.stores[0] = faulty  # type: ignore[call-overload]
            worker = Worker(partitions, make_echo("w1", fd), "w1")
            async with running(worker):
                await async_wait_until(lambda: worker.stats.acked == 75, "the others", DEADLINE)
                await async_wait_until(lambda: faulty.failures >= 2, "retries", DEADLINE)
                assert await pending(faulty._store) == 5
                for uuid in uuids:
                    home = partitions.index_of(uuid)
                    record = await partitions.store_for(uuid).record(uuid)
                    assert record is not None
                    assert record.state is (State.QUEUED if home == 0 else State.DELIVERED)
                faulty.released.set()
                await async_wait_until(lambda: worker.stats.acked == 80, "all", DEADLINE)
            assert worker.stats.handled == 80  # acknowledged late, never handled twice
            assert await drained(partitions)

    asyncio.run(scenario())


def test_entries_a_dead_worker_left_in_every_partition_are_reclaimed_and_acknowledged_there(
    settings: Settings, echo_out
) -> None:
    path, fd = echo_out
    settings = dataclasses.replace(settings, visibility_timeout=0.3)

    async def scenario() -> None:
        async with opened(settings) as partitions:
            uuids = await accept(partitions, every(2))
            for store in partitions:  # a worker that read them all, then died
                await store.ensure_group()
                assert len(await store.read("dead", 10, None)) == 2
            worker = Worker(partitions, make_echo("live", fd), "live")
            async with running(worker):
                await async_wait_until(lambda: worker.stats.acked == 32, "acked", DEADLINE)
            assert worker.stats.reclaimed == 32
            assert sorted(echoed(path)) == sorted(uuids)
            assert await drained(partitions)

    asyncio.run(scenario())


def test_entries_delivered_to_this_name_before_a_restart_are_handled_first_in_every_partition(
    settings: Settings, echo_out
) -> None:
    path, fd = echo_out

    async def scenario() -> None:
        async with opened(settings) as partitions:
            uuids = await accept(partitions, every(1))
            for store in partitions:  # this worker's previous run read them, then died
                await store.ensure_group()
                assert len(await store.read("w1", 10, None)) == 1
            worker = Worker(partitions, make_echo("w1", fd), "w1")
            async with running(worker):
                await async_wait_until(lambda: worker.stats.acked == 16, "acked", DEADLINE)
            assert worker.stats.reclaimed == 0  # its own, read back, not reclaimed
            assert sorted(echoed(path)) == sorted(uuids)
            assert await drained(partitions)

    asyncio.run(scenario())


def test_a_stream_lost_in_one_partition_is_made_anew_there_and_every_partition_carries_on(
    settings: Settings, echo_out
) -> None:
    path, fd = echo_out
    lost = 3

    async def scenario() -> None:
        async with opened(settings) as partitions:
            worker = Worker(partitions, make_echo("w1", fd), "w1")
            with capture_logs() as logs:
                async with running(worker):
                    await async_wait_until(
                        lambda: len(worker._supervisor._tasks) > PARTITIONS, "loops", DEADLINE
                    )
                    store = partitions.stores[lost]
                    await store.client.xgroup_destroy(store.keys.stream, CONSUMER_GROUP)
                    after = await accept(partitions, every(2))
                    await async_wait_until(lambda: worker.stats.acked == 32, "acked", DEADLINE)
            assert sorted(echoed(path)) == sorted(after)
            regrouped = [
                line for line in logs if line["event"].startswith("consumer group missing")
            ]
            assert regrouped and {line["partition"] for line in regrouped} == {lost}

    asyncio.run(scenario())


def test_an_undecodable_entry_is_quarantined_in_its_own_partition_and_the_rest_flows(
    settings: Settings, echo_out
) -> None:
    path, fd = echo_out
    bad = 9

    async def scenario() -> None:
        async with opened(settings) as partitions:
            store = partitions.stores[bad]
            await store.ensure_group()
            await store.client.xadd(store.keys.stream, {"u": b"\x01" * 16, "m": "x", "r": "soon"})
            uuids = await accept(partitions, every(1))
            worker = Worker(partitions, make_echo("w1", fd), "w1")
            async with running(worker):
                await async_wait_until(lambda: worker.stats.acked == 16, "acked", DEADLINE)
            assert sorted(echoed(path)) == sorted(uuids)
            for each in partitions:
                dead = await each.client.xrange(each.keys.dead)
                assert len(dead) == (1 if each.partition == bad else 0)
            assert await drained(partitions)

    asyncio.run(scenario())
