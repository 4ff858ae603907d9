"""Waiting for a condition in tests: poll it until a deadline, then fail naming it.

One sync and one async helper, with one argument order, ``(check, what, within)``:
what to look at, what it means (for the failure message), and how many seconds
it may take. Nothing in the tests sleeps "long enough": they wait for an event
with a deadline, and a timeout says what never happened.

Both try ``check`` at least once, return its first truthy result (so a check can
hand back what it found), and raise ``AssertionError`` on timeout, followed by
``diagnostics()`` when given (the e2e harness passes every process's stderr
tail).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

__all__ = ["async_wait_until", "wait_until"]

T = TypeVar("T")
INTERVAL = 0.01  # seconds between two looks


class _Deadline:
    def __init__(
        self, what: str, within: float, diagnostics: Callable[[], str] | None = None
    ) -> None:
        self.what = what
        self.within = within
        self.diagnostics = diagnostics
        self.started = time.monotonic()
        self.at = self.started + within

    def pause(self, interval: float) -> float:
        """How long to sleep before the next look; raises once the deadline has passed."""
        now = time.monotonic()
        if now >= self.at:
            message = (
                f"timed out after {now - self.started:.2f} s (limit {self.within:g} s) "
                f"waiting for {self.what}"
            )
            if self.diagnostics is not None:
                message += "\n" + self.diagnostics()
            raise AssertionError(message)
        return min(interval, self.at - now)


def wait_until(
    check: Callable[[], T],
    what: str,
    within: float,
    *,
    interval: float = INTERVAL,
    diagnostics: Callable[[], str] | None = None,
) -> T:
    """Call ``check`` until it returns something truthy, and return that; after
    ``within`` s raise AssertionError naming ``what``."""
    deadline = _Deadline(what, within, diagnostics)
    while True:
        result = check()
        if result:
            return result
        time.sleep(deadline.pause(interval))


async def async_wait_until(
    check: Callable[[], T | Awaitable[T]],
    what: str,
    within: float,
    *,
    interval: float = INTERVAL,
    diagnostics: Callable[[], str] | None = None,
) -> T:
    """:func:`wait_until` for a check that may be a coroutine function; sleeps on the loop."""
    deadline = _Deadline(what, within, diagnostics)
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result  # type: ignore[return-value]
        await asyncio.sleep(deadline.pause(interval))
