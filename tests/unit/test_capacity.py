"""The worker's slots: reservations granted first come, first served."""

from __future__ import annotations

import asyncio

import pytest

from workers.capacity import Capacity


def run(coro):
    return asyncio.run(coro)


def test_a_request_with_free_slots_is_granted_at_once_up_to_what_is_free() -> None:
    async def scenario() -> None:
        capacity = Capacity(4)
        capacity.hold(1)
        assert await capacity.reserve(10) == 3
        assert capacity.free == 0 and capacity.reserved == 3
        capacity.release(3)
        assert await capacity.reserve(2) == 2

    run(scenario())


def test_freed_slots_go_to_the_request_that_waited_longest_not_to_the_latest() -> None:
    async def scenario() -> None:
        capacity = Capacity(1)
        capacity.hold(1)
        granted: list[str] = []

        async def reader(name: str) -> None:
            count = await capacity.reserve(1)
            granted.append(name)
            capacity.hold(count)
            capacity.release(count)

        first = asyncio.create_task(reader("first"))
        await asyncio.sleep(0)
        second = asyncio.create_task(reader("second"))
        await asyncio.sleep(0)
        assert capacity.waiting == 2
        capacity.let_go()
        # A request made after the slot freed, while others wait, queues behind them.
        assert capacity.free == 0 and capacity.reserved == 1
        late = asyncio.create_task(reader("late"))
        await asyncio.sleep(0)
        assert granted == ["first"]
        capacity.let_go()
        await asyncio.sleep(0)
        capacity.let_go()
        await asyncio.gather(first, second, late)
        assert granted == ["first", "second", "late"]

    run(scenario())


def test_one_freed_slot_wakes_one_request_not_all() -> None:
    async def scenario() -> None:
        capacity = Capacity(2)
        capacity.hold(2)
        waiters = [asyncio.create_task(capacity.reserve(5)) for _ in range(3)]
        await asyncio.sleep(0)
        capacity.let_go()
        await asyncio.sleep(0)
        assert [w.done() for w in waiters] == [True, False, False]
        assert waiters[0].result() == 1
        capacity.close()
        assert [await w for w in waiters[1:]] == [0, 0]

    run(scenario())


def test_a_granted_request_cancelled_before_it_ran_passes_its_slots_on() -> None:
    async def scenario() -> None:
        capacity = Capacity(1)
        capacity.hold(1)
        cancelled = asyncio.create_task(capacity.reserve(1))
        await asyncio.sleep(0)
        nxt = asyncio.create_task(capacity.reserve(1))
        await asyncio.sleep(0)
        capacity.let_go()  # granted to the first, which has not run yet
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        assert await asyncio.wait_for(nxt, 1) == 1
        assert capacity.reserved == 1

    run(scenario())


def test_a_cancelled_waiter_is_skipped() -> None:
    async def scenario() -> None:
        capacity = Capacity(1)
        capacity.hold(1)
        gone = asyncio.create_task(capacity.reserve(1))
        await asyncio.sleep(0)
        stays = asyncio.create_task(capacity.reserve(1))
        await asyncio.sleep(0)
        gone.cancel()
        await asyncio.sleep(0)
        assert capacity.waiting == 1
        capacity.let_go()
        assert await asyncio.wait_for(stays, 1) == 1

    run(scenario())


def test_after_close_every_request_answers_zero() -> None:
    async def scenario() -> None:
        capacity = Capacity(3)
        capacity.close()
        assert await capacity.reserve(2) == 0
        assert capacity.reserved == 0

    run(scenario())


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="slots"):
        Capacity(0)

    async def scenario() -> None:
        with pytest.raises(ValueError, match="most"):
            await Capacity(1).reserve(0)

    run(scenario())
