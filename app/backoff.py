"""The one retry/backoff primitive: how long to wait before trying again.

Every loop that retries (a worker's read and acknowledge, the promoter, the
legacy bridge, the start-up checks, ``echo-at-time up`` restarting a child) and
the handler retry policy take their delays from here, so a cap or a jitter
rule is spelled once. Pure: the random source is injected.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

from redis.exceptions import RedisClusterException, RedisError

from app.log import get_logger

log = get_logger("retry")

T = TypeVar("T")

# What a loop retries: Redis down, refusing, or a connection cut. Anything else is a bug
# that must reach the supervisor, not be retried forever. redis-py's cluster client raises
# RedisClusterException (not a RedisError) when no seed node answers or a slot has no
# master in its map (during a failover): Redis unavailable too.
RETRIED = (RedisError, OSError, RedisClusterException)


def exponential(attempt: int, first: float, cap: float) -> float:
    """``first``, doubled for each attempt after the first, at most ``cap``; from attempt 1."""
    if attempt < 1:
        raise ValueError("attempt counts from 1")
    return min(cap, first * 2.0 ** min(attempt - 1, 62))


def equal_jitter(delay: float, rand: Callable[[], float] = random.random) -> float:
    """Half of ``delay`` fixed, half random: retries of work that failed together spread
    out instead of returning as one burst, and the wait never collapses to zero."""
    return delay / 2 + delay / 2 * rand()


class Backoff:
    """Delays for consecutive failures: ``first``, doubling, at most ``cap``; ``reset()``
    after a success starts again from ``first``.

    :param first: seconds before the first retry.
    :param cap: longest wait, seconds.
    :param jitter: spread each delay with :func:`equal_jitter` (for many processes that
        failed together, such as children of ``echo-at-time up``).
    :param rand: the random source (tests pass a fixed one).
    """

    def __init__(
        self,
        first: float = 0.05,
        cap: float = 2.0,
        *,
        jitter: bool = False,
        rand: Callable[[], float] = random.random,
    ) -> None:
        if not 0 < first <= cap:
            raise ValueError("need 0 < first <= cap")
        self.first = first
        self.cap = cap
        self.jitter = jitter
        self.rand = rand
        self.failures = 0

    def next(self) -> float:
        """The delay before the next try; each call counts one more failure."""
        self.failures += 1
        delay = exponential(self.failures, self.first, self.cap)
        return equal_jitter(delay, self.rand) if self.jitter else delay

    def reset(self) -> None:
        self.failures = 0

    async def wait(self, stop: asyncio.Event) -> float:
        """Sleep for :meth:`next`, or less if ``stop`` is set meanwhile; returns the delay."""
        delay = self.next()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)
        return delay


def describe(exc: BaseException) -> str:
    """An error for a log line: its type and message, bounded (never a message body: no
    caller passes one into an exception)."""
    text = str(exc)
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


class Stopped(Exception):
    """The stop event was set before the call succeeded."""


async def until_done(
    call: Callable[[], Awaitable[T]], stop: asyncio.Event, what: str, backoff: Backoff | None = None
) -> T:
    """``call()`` until it succeeds (its result), retrying Redis errors with a backoff.

    Raises Stopped if ``stop`` is set first; other exceptions go up at once.
    """
    backoff = backoff or Backoff(0.05, 2.0)
    while not stop.is_set():
        try:
            return await call()
        except RETRIED as exc:
            if stop.is_set():
                break
            log.warning("redis unavailable, retrying", during=what, error=describe(exc))
            await backoff.wait(stop)
    raise Stopped(what)
