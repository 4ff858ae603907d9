"""app.backoff: the one retry primitive of every loop."""

from __future__ import annotations

import asyncio

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from app.backoff import Backoff, Stopped, describe, equal_jitter, exponential, until_done


def test_exponential_starts_at_first_doubles_and_stops_at_the_cap() -> None:
    assert [exponential(n, 0.05, 1.0) for n in range(1, 8)] == [
        0.05,
        0.1,
        0.2,
        0.4,
        0.8,
        1.0,
        1.0,
    ]
    assert exponential(10**9, 0.05, 2.0) == 2.0
    with pytest.raises(ValueError):
        exponential(0, 1.0, 2.0)


def test_equal_jitter_keeps_half_fixed() -> None:
    assert equal_jitter(4.0, lambda: 0.0) == 2.0
    assert equal_jitter(4.0, lambda: 1.0) == 4.0


def test_backoff_grows_per_failure_and_reset_starts_again() -> None:
    backoff = Backoff(0.5, 3.0)
    assert [backoff.next() for _ in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    backoff.reset()
    assert backoff.next() == 0.5


def test_backoff_with_jitter_stays_between_half_and_the_full_delay() -> None:
    low = Backoff(1.0, 8.0, jitter=True, rand=lambda: 0.0)
    high = Backoff(1.0, 8.0, jitter=True, rand=lambda: 1.0)
    assert [low.next() for _ in range(4)] == [0.5, 1.0, 2.0, 4.0]
    assert [high.next() for _ in range(4)] == [1.0, 2.0, 4.0, 8.0]


def test_backoff_refuses_a_first_delay_above_the_cap() -> None:
    with pytest.raises(ValueError):
        Backoff(2.0, 1.0)


def test_until_done_retries_redis_errors_then_returns_the_result() -> None:
    calls: list[int] = []

    async def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise RedisConnectionError("Connection refused")
        return "ok"

    async def scenario() -> str:
        return await until_done(flaky, asyncio.Event(), "test", Backoff(0.001, 0.002))

    assert asyncio.run(scenario()) == "ok"
    assert len(calls) == 3


def test_until_done_raises_stopped_when_stop_is_set_while_retrying() -> None:
    async def never() -> None:
        raise RedisConnectionError("down")

    async def scenario() -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(0.05, stop.set)
        await until_done(never, stop, "test", Backoff(0.01, 0.01))

    with pytest.raises(Stopped):
        asyncio.run(scenario())


def test_until_done_lets_any_other_exception_out_at_once() -> None:
    calls: list[int] = []

    async def bug() -> None:
        calls.append(1)
        raise TypeError("not a Redis problem")

    with pytest.raises(TypeError):
        asyncio.run(until_done(bug, asyncio.Event(), "test"))
    assert calls == [1]


def test_describe_gives_type_and_bounded_message() -> None:
    assert describe(RedisConnectionError("Error 111 connecting")) == (
        "ConnectionError: Error 111 connecting"
    )
    assert describe(TimeoutError()) == "TimeoutError"
    assert len(describe(ValueError("x" * 10_000))) < 400
