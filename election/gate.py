"""Whether this process may promote right now, and under which epoch.

Written from kazoo's threads (through ``call_soon_threadsafe``), read by the
promotion loop on the event loop. It never blocks the writer.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Callable


class Role(enum.StrEnum):
    FOLLOWER = "follower"  # waiting in the election
    LEADER = "leader"  # won the election, connected: promotes under its epoch
    SUSPENDED = "suspended"  # leader whose ZooKeeper connection is in doubt: promotes nothing


class LeadershipGate:
    """Open (an epoch) only while this process leads and its session is healthy.

    An epoch the store refused as stale stays refused: only a newer epoch,
    from a fresh election node, reopens the gate.
    """

    def __init__(self) -> None:
        self.role = Role.FOLLOWER
        self.epoch: int | None = None
        self._stale_below = 0
        self._opened = asyncio.Event()
        self._listeners: list[Callable[[], None]] = []

    def on_change(self, callback: Callable[[], None]) -> None:
        self._listeners.append(callback)

    @property
    def is_open(self) -> bool:
        return self.epoch is not None

    def set_role(self, role: Role, epoch: int | None = None) -> bool:
        """Apply a leadership change; returns False when it was ignored (stale epoch)."""
        if role is Role.LEADER:
            if epoch is None or epoch < self._stale_below:
                return False
            self.epoch = epoch
            self._opened.set()
        else:
            self.epoch = None
            self._opened.clear()
        self.role = role
        for callback in self._listeners:
            callback()
        return True

    def mark_stale(self, epoch: int) -> None:
        """The store saw a newer leader: this epoch may never promote again."""
        self._stale_below = max(self._stale_below, epoch + 1)
        self.set_role(Role.SUSPENDED)

    async def wait_open(self) -> int:
        while self.epoch is None:
            await self._opened.wait()
        return self.epoch
