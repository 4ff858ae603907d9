"""tests/wait.py: the one way the tests wait for a condition."""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest

from tests.wait import async_wait_until, wait_until


def test_returns_the_first_truthy_result_of_the_check() -> None:
    looks = itertools.count(1)
    assert wait_until(lambda: next(looks) >= 3 and "found", "the third look", 5) == "found"


def test_times_out_naming_what_was_awaited_with_the_diagnostics() -> None:
    started = time.monotonic()
    with pytest.raises(AssertionError, match=r"limit 0.1 s\) waiting for the moon\nno moon"):
        wait_until(lambda: False, "the moon", 0.1, diagnostics=lambda: "no moon")
    assert 0.1 <= time.monotonic() - started < 1.0


def test_the_check_is_tried_once_even_with_no_time_left() -> None:
    assert wait_until(lambda: 42, "an answer", 0) == 42


def test_the_async_helper_awaits_a_coroutine_check_and_fails_the_same_way() -> None:
    looks = itertools.count(1)

    async def check() -> bool:
        return next(looks) >= 3

    async def scenario() -> None:
        assert await async_wait_until(check, "the third look", 5) is True
        with pytest.raises(AssertionError, match="waiting for nothing"):
            await async_wait_until(lambda: 0, "nothing", 0.05)

    asyncio.run(scenario())
