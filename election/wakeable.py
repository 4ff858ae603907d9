"""A loop that sleeps until a deadline or until poked, and stops when told.

The promoter and the legacy bridge are both such loops: each sleeps until its
next piece of work is due (the earliest message, the next poll) and is woken
early by a wake-up (pub/sub), a leadership change or a stop. Between looks it
calls :meth:`rearm` before looking, so a poke that arrives after the look is
not lost: the following :meth:`pause` returns at once.
"""

from __future__ import annotations

import asyncio
import contextlib


class WakeableLoop:
    def __init__(self) -> None:
        self._poke = asyncio.Event()
        self._stopping = False

    def poke(self) -> None:
        """Look again now: a wake-up, a leadership change or a stop."""
        self._poke.set()

    def stop(self) -> None:
        """End the loop at its next look (what is in hand is finished first)."""
        self._stopping = True
        self._poke.set()

    @property
    def stopping(self) -> bool:
        return self._stopping

    def rearm(self) -> None:
        """Forget the pokes so far; call it just before looking."""
        self._poke.clear()

    async def pause(self, seconds: float | None) -> None:
        """Sleep ``seconds`` (None: until poked), or less if poked meanwhile."""
        if seconds is not None and seconds <= 0:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._poke.wait(), seconds)
