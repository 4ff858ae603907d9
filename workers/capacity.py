"""The worker's slots as its readers see them, granted first come, first served."""

from __future__ import annotations

import asyncio
from collections import deque


class Capacity:
    """Entries in hand plus slots reserved by reads under way, against ``slots``.

    Reservations are granted in the order they were asked for. With one waiter per
    partition, an event that woke every reader let whichever ran first take each freed
    slot: a partition with a backlog, reading again at once, could win every time and
    keep another partition's reader waiting for its whole backlog. A freed slot now goes
    to the reader that has waited longest.
    """

    def __init__(self, slots: int) -> None:
        if slots < 1:
            raise ValueError("slots must be at least 1")
        self.slots = slots
        self.in_hand = 0  # entries read and not finished
        self.reserved = 0  # slots granted to reads under way
        self._waiting: deque[tuple[asyncio.Future[int], int]] = deque()
        self._closed = False

    @property
    def free(self) -> int:
        return self.slots - self.in_hand - self.reserved

    @property
    def waiting(self) -> int:
        return sum(1 for future, _most in self._waiting if not future.done())

    async def reserve(self, most: int) -> int:
        """Up to ``most`` slots (at least one), reserved for the caller once they are free
        and every earlier request has been served; 0 once :meth:`close` was called. The
        caller gives them back with :meth:`release` when what it read is in hand."""
        if most < 1:
            raise ValueError("most must be at least 1")
        if self._closed:
            return 0
        if self.free > 0 and not self.waiting:
            return self._take(most)
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiting.append((future, most))
        try:
            return await future
        except asyncio.CancelledError:
            # Granted, but cancelled before it could run: the slots go to the next one.
            if future.done() and not future.cancelled():
                self.release(future.result())
            raise

    def release(self, count: int) -> None:
        """Slots a read had reserved, given back (after what it brought is in hand)."""
        self.reserved -= count
        self._grant()

    def hold(self, count: int) -> None:
        self.in_hand += count

    def let_go(self, count: int = 1) -> None:
        self.in_hand -= count
        self._grant()

    def close(self) -> None:
        """Every waiting and later request answers 0 (the worker is stopping)."""
        self._closed = True
        while self._waiting:
            future, _most = self._waiting.popleft()
            if not future.done():
                future.set_result(0)

    def _take(self, most: int) -> int:
        count = min(self.free, most)
        self.reserved += count
        return count

    def _grant(self) -> None:
        while self._waiting and self.free > 0:
            future, most = self._waiting.popleft()
            if not future.done():
                future.set_result(self._take(most))
