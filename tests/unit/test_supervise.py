"""app.supervise.Supervisor: a task that ends before the process is told to stop fails it."""

from __future__ import annotations

import asyncio

import pytest

from app.supervise import Supervisor, TaskDied


async def forever(stop: asyncio.Event) -> None:
    await stop.wait()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 5.0))


def test_a_task_that_raises_fails_the_supervisor_naming_the_task_and_the_error() -> None:
    async def scenario() -> TaskDied:
        stop = asyncio.Event()
        supervisor = Supervisor("test", stop)
        supervisor.spawn(forever(stop), "steady")

        async def broken() -> None:
            await asyncio.sleep(0.01)
            raise KeyError("odd record")

        supervisor.spawn(broken(), "promoter")
        with pytest.raises(TaskDied) as died:
            await supervisor.wait()
        stop.set()
        await supervisor.close(1.0)
        return died.value

    died = run(scenario())
    assert died.name == "promoter"
    assert isinstance(died.error, KeyError)
    assert "promoter" in str(died) and "KeyError" in str(died)


def test_a_task_that_returns_before_the_stop_is_a_death_too() -> None:
    async def scenario() -> TaskDied:
        stop = asyncio.Event()
        supervisor = Supervisor("test", stop)

        async def quits() -> None:
            await asyncio.sleep(0.01)

        supervisor.spawn(quits(), "reader")
        with pytest.raises(TaskDied) as died:
            await supervisor.wait()
        return died.value

    died = run(scenario())
    assert died.name == "reader" and died.error is None


def test_tasks_that_end_once_stop_is_set_are_a_clean_stop() -> None:
    async def scenario() -> Supervisor:
        stop = asyncio.Event()
        supervisor = Supervisor("test", stop)
        for name in ("a", "b"):
            supervisor.spawn(forever(stop), name)
        asyncio.get_running_loop().call_later(0.02, stop.set)
        await supervisor.wait()
        await supervisor.close(1.0)
        return supervisor

    assert run(scenario()).failed is None


def test_close_cancels_a_task_that_does_not_end_within_the_grace() -> None:
    async def scenario() -> asyncio.Task:
        stop = asyncio.Event()
        supervisor = Supervisor("test", stop)
        stubborn = supervisor.spawn(asyncio.sleep(3600), "stubborn")
        stop.set()
        await supervisor.wait()
        await supervisor.close(0.05)
        return stubborn

    task = run(scenario())
    assert task.cancelled()


def test_a_watched_short_task_may_end_but_not_with_an_exception() -> None:
    async def scenario() -> TaskDied:
        stop = asyncio.Event()
        supervisor = Supervisor("test", stop)
        supervisor.spawn(forever(stop), "loop")
        fine = asyncio.create_task(asyncio.sleep(0), name="handle-1")
        supervisor.watch(fine)
        await fine
        await asyncio.sleep(0.01)
        assert supervisor.failed is None

        async def bug() -> None:
            raise ZeroDivisionError

        supervisor.watch(asyncio.create_task(bug(), name="handle-2"))
        with pytest.raises(TaskDied) as died:
            await supervisor.wait()
        stop.set()
        await supervisor.close(1.0)
        return died.value

    died = run(scenario())
    assert died.name == "handle-2" and isinstance(died.error, ZeroDivisionError)


def test_only_the_first_death_is_reported() -> None:
    async def scenario() -> TaskDied:
        stop = asyncio.Event()
        supervisor = Supervisor("test", stop)

        async def fails(delay: float, error: Exception) -> None:
            await asyncio.sleep(delay)
            raise error

        supervisor.spawn(fails(0.01, ValueError("first")), "first")
        supervisor.spawn(fails(0.02, ValueError("second")), "second")
        with pytest.raises(TaskDied) as died:
            await supervisor.wait()
        await asyncio.sleep(0.05)
        assert supervisor.failed is died.value
        await supervisor.close(1.0)
        return died.value

    assert run(scenario()).name == "first"
