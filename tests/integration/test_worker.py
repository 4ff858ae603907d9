"""The consumer-group worker in-process, against a real Redis.

Messages are accepted due now through ``Store.accept`` (straight into the
stream); the worker runs as a task and is stopped with ``worker.stop()``.
Retries go back through the sorted set, so those tests also run a Promoter
behind a hand-opened gate.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import os
import threading
import time
import uuid as uuidlib
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from app.model import NewMessage, State
from app.settings import Settings
from app.store import Delivery, Store
from app.store.codec import uuid_text
from app.store.keys import CONSUMER_GROUP
from app.supervise import TaskDied
from election.gate import LeadershipGate, Role
from election.promoter import Promoter, listen_for_wakeups
from tests.aio import open_store, reap
from tests.wait import async_wait_until
from workers.handlers import make_echo
from workers.worker import Worker

DEADLINE = 5.0


def now_ms() -> int:
    return int(time.time() * 1000)


@pytest.fixture
def settings(redis_url: str, prefix: str, redis_client) -> Settings:
    # redis_client: deletes this test's keys afterwards.
    return Settings(redis_url=redis_url, prefix=prefix)


@contextlib.asynccontextmanager
async def running_worker(worker: Worker) -> AsyncIterator[asyncio.Task]:
    """Run ``worker`` for the block; on the way out stop it and wait for run() to return."""
    task = asyncio.create_task(worker.run(), name=f"worker-{worker.consumer}")
    try:
        yield task
    finally:
        worker.stop()
        try:
            await asyncio.wait_for(asyncio.shield(task), DEADLINE)
        finally:
            await reap(task)


@contextlib.asynccontextmanager
async def running_promoter(store: Store) -> AsyncIterator[Promoter]:
    gate = LeadershipGate()
    gate.set_role(Role.LEADER, 1)
    promoter = Promoter(store, gate, max_idle=0.2)
    tasks = [
        asyncio.create_task(promoter.run()),
        asyncio.create_task(listen_for_wakeups(store, promoter)),
    ]
    try:
        yield promoter
    finally:
        promoter.stop()
        try:
            await asyncio.wait_for(asyncio.shield(tasks[0]), DEADLINE)
        finally:
            await reap(*tasks)  # listen_for_wakeups runs until cancelled


async def accept_due(store: Store, count: int, tag: str = "m") -> list[str]:
    """Accept ``count`` messages due now, one after another; their uuids in acceptance order."""
    uuids = []
    for i in range(count):
        uuid = str(uuidlib.uuid4())
        accepted = await store.accept(NewMessage(uuid=uuid, message=f"{tag}{i}", run_at=now_ms()))
        assert accepted.created and accepted.state == "queued"
        uuids.append(uuid)
    return uuids


async def states(store: Store, uuids: list[str]) -> list[State]:
    return [(await store.record(u)).state for u in uuids]


async def pending_count(store: Store) -> int:
    summary = await store.client.xpending(store.keys.stream, CONSUMER_GROUP)
    return int(summary["pending"])


def read_lines(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    assert text == "" or text.endswith("\n"), "every line is complete"
    return [json.loads(line) for line in text.splitlines()]


@pytest.fixture
def echo_out(tmp_path: Path):
    path = tmp_path / "echo.jsonl"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        yield path, fd
    finally:
        os.close(fd)


def test_echo_writes_one_json_line_per_message_and_every_message_is_acked(
    settings, echo_out
) -> None:
    path, fd = echo_out

    async def scenario() -> None:
        async with open_store(settings) as store:
            uuids = await accept_due(store, 5)
            worker = Worker(store, make_echo("w1", fd), "w1")
            async with running_worker(worker):
                await async_wait_until(lambda: worker.stats.acked == 5, "all acked", DEADLINE)
            lines = read_lines(path)
            assert [line["uuid"] for line in lines] == uuids
            for i, line in enumerate(lines):
                assert line["event"] == "echo"
                assert line["message"] == f"m{i}"
                assert isinstance(line["runAt"], int)
                assert isinstance(line["lateness_ms"], int)
                assert 0 <= line["lateness_ms"] < 5000
                assert line["worker"] == "w1"
                assert line["attempt"] == 1
            assert await store.client.xlen(store.keys.stream) == 0
            assert await pending_count(store) == 0
            assert await states(store, uuids) == [State.DELIVERED] * 5
            assert worker.stats.handled == 5 and worker.stats.failed == 0

    asyncio.run(scenario())


def test_one_worker_handles_a_hundred_due_messages_in_acceptance_order(settings, echo_out) -> None:
    path, fd = echo_out

    async def scenario() -> None:
        async with open_store(settings) as store:
            uuids = await accept_due(store, 100)
            worker = Worker(store, make_echo("w1", fd), "w1")
            async with running_worker(worker):
                await async_wait_until(lambda: worker.stats.acked == 100, "all acked", DEADLINE)
            assert [line["uuid"] for line in read_lines(path)] == uuids
            assert await store.client.xlen(store.keys.stream) == 0

    asyncio.run(scenario())


def test_failing_handler_is_retried_with_backoff_until_max_deliveries_then_dead_lettered(
    settings,
) -> None:
    settings = dataclasses.replace(settings, retry_base=0.01, retry_max=0.05, max_deliveries=3)
    calls: list[tuple[str, int, float]] = []

    async def always_fails(delivery: Delivery) -> None:
        calls.append((delivery.uuid, delivery.attempts, time.monotonic()))
        raise RuntimeError("downstream is down")

    async def scenario() -> None:
        async with open_store(settings) as store, running_promoter(store):
            (uuid,) = await accept_due(store, 1)
            worker = Worker(store, always_fails, "w1")
            async with running_worker(worker):
                await async_wait_until(lambda: worker.stats.dead == 1, "dead-lettered", DEADLINE)

            # One run per allowed delivery, each one seeing the failures before it.
            assert [(u, a) for u, a, _ in calls] == [(uuid, 0), (uuid, 1), (uuid, 2)]
            gaps = [b[2] - a[2] for a, b in itertools.pairwise(calls)]
            assert all(gap >= 0.004 for gap in gaps), f"no backoff between runs: {gaps}"
            record = await store.record(uuid)
            assert record.state is State.DEAD and record.attempts == 3
            dead = await store.client.xrange(store.keys.dead)
            assert len(dead) == 1
            fields = dead[0][1]
            assert uuid_text(fields[b"u"]) == uuid
            assert fields[b"m"] == b"m0"
            assert fields[b"a"] == b"3"
            assert fields[b"reason"] == b"RuntimeError: downstream is down"
            assert await store.client.xlen(store.keys.stream) == 0
            assert await store.client.zcard(store.keys.delayed) == 0
            assert await pending_count(store) == 0
            assert worker.stats.failed == 3 and worker.stats.handled == 0

    asyncio.run(scenario())


def test_handler_failing_once_then_succeeding_ends_delivered_with_two_attempts(settings) -> None:
    settings = dataclasses.replace(settings, retry_base=0.01, retry_max=0.05)
    seen: Counter[str] = Counter()

    async def flaky(delivery: Delivery) -> None:
        seen[delivery.uuid] += 1
        if delivery.attempts == 0:
            raise ConnectionError("first try fails")

    async def scenario() -> None:
        async with open_store(settings) as store, running_promoter(store):
            uuids = await accept_due(store, 3)
            worker = Worker(store, flaky, "w1")
            async with running_worker(worker):
                await async_wait_until(lambda: worker.stats.acked == 3, "all delivered", DEADLINE)
            assert seen == {u: 2 for u in uuids}
            for uuid in uuids:
                record = await store.record(uuid)
                assert record.state is State.DELIVERED
                assert record.attempts == 2
            assert await store.client.xlen(store.keys.dead) == 0
            assert worker.stats.failed == 3 and worker.stats.handled == 3

    asyncio.run(scenario())


def test_entries_left_pending_by_a_dead_worker_are_reclaimed_after_the_visibility_timeout(
    settings, echo_out
) -> None:
    settings = dataclasses.replace(settings, visibility_timeout=0.2)
    path, fd = echo_out

    async def scenario() -> None:
        async with open_store(settings) as store:
            await store.ensure_group()
            uuids = await accept_due(store, 3)
            taken = await store.read("dead-worker", 10, None)
            assert [d.uuid for d in taken] == uuids
            assert await pending_count(store) == 3  # ...and "dead-worker" never acks

            started = time.monotonic()
            worker = Worker(store, make_echo("live", fd), "live")
            async with running_worker(worker):
                await async_wait_until(
                    lambda: worker.stats.acked == 3, "reclaimed and acked", DEADLINE
                )
            elapsed = time.monotonic() - started

            assert worker.stats.reclaimed == 3
            assert elapsed >= 0.15, "not reclaimed before the visibility timeout"
            assert sorted(line["uuid"] for line in read_lines(path)) == sorted(uuids)
            assert await pending_count(store) == 0
            assert await states(store, uuids) == [State.DELIVERED] * 3

    asyncio.run(scenario())


def test_slow_handler_extends_its_claim_and_a_second_worker_never_reclaims_it(settings) -> None:
    vt = 0.5
    settings = dataclasses.replace(settings, visibility_timeout=vt)
    invocations: Counter[str] = Counter()
    by_worker: dict[str, str] = {}
    give_up = asyncio.Event()  # bounded: set only if the test is already failing

    def slow(name: str):
        async def handler(delivery: Delivery) -> None:
            invocations[delivery.uuid] += 1
            by_worker.setdefault(delivery.uuid, name)
            # ~3 x the visibility timeout, cut short only by give_up.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(give_up.wait(), 3 * vt)

        return handler

    async def scenario() -> None:
        async with open_store(settings) as store:
            uuids = await accept_due(store, 3)
            first = Worker(store, slow("first"), "first", concurrency=3)
            second = Worker(store, slow("second"), "second", concurrency=3)
            max_idle_ms, max_times_delivered = 0, 0
            sampling = True

            async def sample_pending() -> None:
                nonlocal max_idle_ms, max_times_delivered
                while sampling:
                    for entry in await store.client.xpending_range(
                        store.keys.stream, CONSUMER_GROUP, "-", "+", 10
                    ):
                        max_idle_ms = max(max_idle_ms, entry["time_since_delivered"])
                        max_times_delivered = max(max_times_delivered, entry["times_delivered"])
                    await asyncio.sleep(0.02)

            async with running_worker(first):
                await async_wait_until(
                    lambda: len(invocations) == 3, "first worker holds all three", DEADLINE
                )
                async with running_worker(second):
                    sampler = asyncio.create_task(sample_pending())
                    try:
                        await async_wait_until(
                            lambda: first.stats.acked == 3, "slow handlers done", DEADLINE
                        )
                    finally:
                        give_up.set()
                        sampling = False
                        await reap(sampler)
                    assert second.stats.reclaimed == 0

            # The claim was renewed in time (never idle for the visibility timeout), and
            # renewing is not a delivery: nobody, not even the owner, re-claimed it.
            assert 0 < max_idle_ms < vt * 1000, max_idle_ms
            assert max_times_delivered == 1

            assert invocations == {u: 1 for u in uuids}, "a live worker's entries were reclaimed"
            assert set(by_worker.values()) == {"first"}
            assert await pending_count(store) == 0
            assert await states(store, uuids) == [State.DELIVERED] * 3

    asyncio.run(scenario())


def test_stop_finishes_and_acks_the_messages_in_hand_then_run_returns(settings) -> None:
    started: list[str] = []
    release = asyncio.Event()

    async def handler(delivery: Delivery) -> None:
        started.append(delivery.uuid)
        await asyncio.wait_for(release.wait(), DEADLINE)

    async def scenario() -> None:
        async with open_store(settings) as store:
            uuids = await accept_due(store, 3)
            worker = Worker(store, handler, "w1", concurrency=3)
            task = asyncio.create_task(worker.run())
            try:
                await async_wait_until(lambda: len(started) == 3, "three in hand", DEADLINE)
                worker.stop()
                await asyncio.sleep(0)
                assert not task.done(), "run() returned with handlers still running"
                release.set()
                await asyncio.wait_for(asyncio.shield(task), DEADLINE)
            finally:
                release.set()
                await reap(task)

            assert sorted(started) == sorted(uuids)
            assert worker.stats.handled == 3 and worker.stats.acked == 3
            assert await pending_count(store) == 0
            assert await states(store, uuids) == [State.DELIVERED] * 3

    asyncio.run(scenario())


def test_entries_pending_for_this_consumer_before_a_restart_are_handled_first(
    settings, echo_out
) -> None:
    path, fd = echo_out

    async def scenario() -> None:
        async with open_store(settings) as store:
            await store.ensure_group()
            before = await accept_due(store, 3, "before")
            # The previous life of "w1" read these, then died before handling them.
            assert [d.uuid for d in await store.read("w1", 10, None)] == before
            after = await accept_due(store, 3, "after")

            worker = Worker(store, make_echo("w1", fd), "w1")
            async with running_worker(worker):
                await async_wait_until(lambda: worker.stats.acked == 6, "all acked", DEADLINE)
            assert [line["uuid"] for line in read_lines(path)] == before + after
            assert worker.stats.reclaimed == 0
            assert await pending_count(store) == 0

    asyncio.run(scenario())


def test_async_and_sync_threaded_handlers_both_deliver(settings) -> None:
    async_seen: list[str] = []
    sync_seen: list[tuple[str, str]] = []
    main_thread = threading.get_ident()

    async def async_handler(delivery: Delivery) -> None:
        await asyncio.sleep(0)
        async_seen.append(delivery.uuid)

    def sync_handler(delivery: Delivery) -> None:
        time.sleep(0.01)  # blocking is fine: it runs in a thread, not on the event loop
        sync_seen.append((delivery.uuid, str(threading.get_ident() != main_thread)))

    async def scenario() -> None:
        async with open_store(settings) as store:
            first = await accept_due(store, 3, "async")
            worker = Worker(store, async_handler, "async-worker")
            async with running_worker(worker):
                await async_wait_until(
                    lambda: worker.stats.acked == 3, "async handler acked", DEADLINE
                )
            assert async_seen == first

            second = await accept_due(store, 3, "sync")
            worker = Worker(store, sync_handler, "sync-worker")
            assert not getattr(sync_handler, "inline", False)
            async with running_worker(worker):
                await async_wait_until(
                    lambda: worker.stats.acked == 3, "sync handler acked", DEADLINE
                )
            assert [u for u, _ in sync_seen] == second
            assert all(off_loop == "True" for _, off_loop in sync_seen)
            assert await states(store, first + second) == [State.DELIVERED] * 6
            assert await pending_count(store) == 0

    asyncio.run(scenario())


# --- bounded handler time -------------------------------------------------------------------


async def dead_reasons(store: Store) -> dict[str, str]:
    return {
        uuid_text(fields[b"u"]): fields[b"reason"].decode()
        for _id, fields in await store.client.xrange(store.keys.dead)
    }


@pytest.mark.parametrize("kind", ["async", "sync", "async ignoring cancel"])
def test_a_handler_past_its_timeout_is_retried_then_dead_lettered_as_timeout_without_holding_others(
    settings, kind: str
) -> None:
    """One message hangs its handler forever; with concurrency 2 the others still run at once
    (before the hung one's first timeout), and the hung one is failed on each timeout,
    retried with backoff, and dead-lettered with the reason ``timeout``."""
    timeout = 0.6
    settings = dataclasses.replace(settings, retry_base=0.01, retry_max=0.05, max_deliveries=2)
    handled: dict[str, float] = {}
    hung_runs: list[float] = []
    never = threading.Event()  # set at the end, so no thread outlives the test

    def note(delivery: Delivery) -> bool:
        if delivery.message == "hang":
            hung_runs.append(time.monotonic())
            return True
        handled[delivery.uuid] = time.monotonic()
        return False

    async def async_handler(delivery: Delivery) -> None:
        if note(delivery):
            await asyncio.sleep(3600)

    async def stubborn_handler(delivery: Delivery) -> None:
        if note(delivery):
            while not never.is_set():
                try:
                    await asyncio.sleep(0.05)
                except asyncio.CancelledError:
                    continue  # a handler that will not be cancelled

    def sync_handler(delivery: Delivery) -> None:
        if note(delivery):
            never.wait(30)

    handler = {
        "async": async_handler,
        "sync": sync_handler,
        "async ignoring cancel": stubborn_handler,
    }[kind]

    async def scenario() -> None:
        async with open_store(settings) as store, running_promoter(store):
            accepted = await store.accept(NewMessage(str(uuidlib.uuid4()), "hang", now_ms()))
            assert accepted.created
            hung = (await store.client.xrange(store.keys.stream))[0]
            hung_uuid = uuid_text(hung[1][b"u"])
            others = await accept_due(store, 10, "ok")
            worker = Worker(store, handler, "w1", concurrency=2, handler_timeout=timeout)
            started = time.monotonic()
            async with running_worker(worker):
                await async_wait_until(
                    lambda: set(handled) == set(others), "the others handled", DEADLINE
                )
                # All ten ran in the one free slot while the first run of "hang" was held.
                assert max(handled.values()) - started < timeout
                assert worker.stats.failed == 0
                await async_wait_until(
                    lambda: worker.stats.dead == 1, "hung message dead-lettered", DEADLINE
                )
            never.set()

            assert len(hung_runs) == 2  # max_deliveries
            assert hung_runs[1] - hung_runs[0] >= timeout
            reason = (await dead_reasons(store))[hung_uuid]
            assert reason.startswith("timeout"), reason
            record = await store.record(hung_uuid)
            assert record.state is State.DEAD and record.attempts == 2
            assert await states(store, others) == [State.DELIVERED] * 10
            # Nothing is left claimed: the timed-out deliveries were failed, not extended.
            assert await pending_count(store) == 0
            assert worker.stats.failed == 2

    try:
        asyncio.run(scenario())
    finally:
        never.set()


def test_handler_timeout_must_be_positive(settings) -> None:
    async def handler(delivery: Delivery) -> None:
        return None

    async def scenario() -> None:
        async with open_store(settings) as store:
            with pytest.raises(ValueError, match="handler_timeout"):
                Worker(store, handler, "w1", handler_timeout=0)

    asyncio.run(scenario())


# --- supervised loops -----------------------------------------------------------------------


class AckBug(Exception):
    """Stands for a bug in the acknowledge path (e.g. an odd reply it cannot read)."""


def test_a_worker_whose_loop_dies_stops_reading_raises_and_another_worker_takes_its_entries(
    settings, echo_out
) -> None:
    settings = dataclasses.replace(settings, visibility_timeout=0.5)
    path, fd = echo_out

    async def scenario() -> None:
        async with open_store(settings) as store:
            uuids = await accept_due(store, 5)
            broken = Worker(store, make_echo("broken", fd), "broken")

            async def ack_with_a_bug(deliveries):
                raise AckBug("cannot read the reply")

            broken.store = _StoreWith(store, ack=ack_with_a_bug)
            run = asyncio.create_task(broken.run())
            done, _ = await asyncio.wait({run}, timeout=DEADLINE)
            if not done:
                await reap(run)
            assert done, "the worker kept running with a dead ack loop"
            with pytest.raises(TaskDied) as died:
                run.result()
            assert died.value.name == "ack" and isinstance(died.value.error, AckBug)
            # It handled them but could not acknowledge: they are still pending, its own.
            assert await pending_count(store) == 5

            live = Worker(store, make_echo("live", fd), "live")
            async with running_worker(live):
                await async_wait_until(
                    lambda: live.stats.acked == 5, "reclaimed and acked", DEADLINE
                )
            assert await states(store, uuids) == [State.DELIVERED] * 5
            # Each once: what its reclaim loop claimed is not read back as its own pending.
            assert live.stats.handled == 5
            echoed = [line["uuid"] for line in read_lines(path)]
            assert sorted(set(echoed)) == sorted(uuids)

    asyncio.run(scenario())


class _StoreWith:
    """A Store with some methods replaced: the fault goes in the worker, not in Redis."""

    def __init__(self, store: Store, **replaced) -> None:
        self._store = store
        self._replaced = replaced

    def __getattr__(self, name: str):
        return self._replaced.get(name) or getattr(self._store, name)


# --- a lost stream or consumer group --------------------------------------------------------


def missing_group_lines(logs: list[dict]) -> list[dict]:
    return [line for line in logs if line["event"] == "consumer group missing, making it anew"]


def test_a_worker_makes_its_group_anew_when_the_stream_is_deleted_and_handles_what_comes_after(
    settings, echo_out
) -> None:
    path, fd = echo_out

    async def scenario() -> None:
        async with open_store(settings) as store:
            before = await accept_due(store, 3, "before")
            worker = Worker(store, make_echo("w1", fd), "w1")
            with capture_logs() as logs:
                async with running_worker(worker):
                    await async_wait_until(lambda: worker.stats.acked == 3, "acked", DEADLINE)
                    await store.client.delete(store.keys.stream)
                    # Accepted due after the loss: the XADD makes a stream without a group.
                    after = await accept_due(store, 3, "after")
                    await async_wait_until(
                        lambda: worker.stats.acked == 6, "the messages after the loss", DEADLINE
                    )
            assert [line["uuid"] for line in read_lines(path)] == before + after
            assert await states(store, after) == [State.DELIVERED] * 3
            missing = missing_group_lines(logs)
            assert missing, "the worker never said it made the group anew"
            # With Redis' own message, not only the exception's type.
            assert missing[0]["error"].startswith("ResponseError: NOGROUP")

    asyncio.run(scenario())


def test_a_worker_whose_group_was_destroyed_makes_it_anew_at_0_and_runs_what_was_waiting(
    settings, echo_out
) -> None:
    """Made at "$", the new group would never deliver the entries already in the stream."""
    path, fd = echo_out

    async def scenario() -> None:
        async with open_store(settings) as store:
            worker = Worker(store, make_echo("w1", fd), "w1")
            async with running_worker(worker):
                await async_wait_until(
                    lambda: worker._supervisor._tasks, "the worker's loops", DEADLINE
                )
                await store.client.xgroup_destroy(store.keys.stream, CONSUMER_GROUP)
                waiting = await accept_due(store, 4)
                await async_wait_until(lambda: worker.stats.acked == 4, "acked", DEADLINE)
            assert [line["uuid"] for line in read_lines(path)] == waiting
            assert await store.client.xlen(store.keys.stream) == 0

    asyncio.run(scenario())


def test_the_own_pending_read_on_a_lost_group_makes_it_anew_and_finds_nothing_of_ours(
    settings, echo_out
) -> None:
    _path, fd = echo_out

    async def scenario() -> None:
        async with open_store(settings) as store:
            await store.ensure_group()
            await store.client.delete(store.keys.stream)
            worker = Worker(store, make_echo("w1", fd), "w1")
            assert await worker._own_pending() == []
            groups = await store.client.xinfo_groups(store.keys.stream)
            assert [g["name"] for g in groups] == [CONSUMER_GROUP.encode()]

    asyncio.run(scenario())


def test_a_worker_quarantines_an_entry_it_cannot_decode_and_neither_dies_nor_stops(
    settings, echo_out
) -> None:
    """Raising on it would kill the read loop, and the process, at every restart alike."""
    path, fd = echo_out

    async def scenario() -> None:
        async with open_store(settings) as store:
            before = await accept_due(store, 2, "before")
            await store.client.xadd(store.keys.stream, {"u": b"\x01" * 16, "m": "x", "r": "soon"})
            after = await accept_due(store, 2, "after")
            worker = Worker(store, make_echo("w1", fd), "w1")
            async with running_worker(worker) as task:
                await async_wait_until(lambda: worker.stats.acked == 4, "acked", DEADLINE)
                assert not task.done()
            assert [line["uuid"] for line in read_lines(path)] == before + after
            [(_id, fields)] = await store.client.xrange(store.keys.dead)
            assert fields[b"reason"].startswith(b"corrupt stream entry")
            assert await store.client.xlen(store.keys.stream) == 0
            assert await pending_count(store) == 0

    asyncio.run(scenario())
