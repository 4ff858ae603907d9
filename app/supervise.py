"""Supervised tasks: the shape of every long-running process.

A process (scheduler, worker) is a small tree of tasks that are each meant to
run until the process stops: the promoter, the wake-up listener, the legacy
bridge; a worker's read, acknowledge, reclaim and extend loops. If one of them
ends on its own (an exception nobody expected, or a plain return before a stop
was asked for), the process must not carry on with a hole in it while it still
looks healthy and still holds what it leads or claims. :meth:`Supervisor.wait`
then logs the task's traceback and raises :class:`TaskDied`; the process
releases what it holds and exits non-zero, so Kubernetes or ``echo-at-time up``
starts it again and, for a scheduler, another one leads at once.

States of a supervisor::

    running  --stop event set-------------------------> stopping (wait returns)
    running  --a task raised or returned--------------> failed (wait raises TaskDied)
    stopping, failed  --close(grace)------------------> closed: every task ended or cancelled

Short-lived tasks a loop spawns (one per delivery) are :meth:`watch`-ed: they
may end whenever they like, but one that raises fails the process the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Any

from app.log import get_logger

log = get_logger("supervise")


class TaskDied(RuntimeError):
    """A supervised task ended while the process was meant to keep running."""

    def __init__(self, name: str, error: BaseException | None) -> None:
        what = f"{type(error).__name__}: {error}" if error is not None else "returned"
        super().__init__(f"task {name!r} died ({what})")
        self.name = name
        self.error = error


class Supervisor:
    """Runs a process' long-lived tasks; the first one to end unexpectedly fails the process.

    :param process: the process' name, for the log line.
    :param stop: set when the process is asked to stop (a signal): from then on a task
        may end, and is expected to.
    """

    def __init__(self, process: str, stop: asyncio.Event) -> None:
        self.process = process
        self.stop = stop
        self._tasks: dict[asyncio.Task[Any], str] = {}
        self._died = asyncio.Event()
        self._death: TaskDied | None = None
        self._closing = False

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Run ``coro`` as a task that must not end before the process stops."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks[task] = name
        task.add_done_callback(self._ended)
        return task

    def watch(self, task: asyncio.Task[Any]) -> None:
        """A short-lived task: it may end, but not with an exception."""
        task.add_done_callback(self._finished)

    @property
    def failed(self) -> TaskDied | None:
        return self._death

    async def wait(self) -> None:
        """Return once the stop event is set; raise :class:`TaskDied` if a task died first."""
        stopped = asyncio.ensure_future(self.stop.wait())
        died = asyncio.ensure_future(self._died.wait())
        try:
            await asyncio.wait({stopped, died}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in (stopped, died):
                waiter.cancel()
        if self._death is not None:
            raise self._death

    async def close(self, grace: float) -> None:
        """Give every task ``grace`` seconds to end by itself, then cancel what is left.

        Cancellation is repeated: Python 3.11's ``wait_for`` (inside redis-py) can
        swallow a cancel that arrives as its inner future completes.
        """
        self._closing = True
        tasks = list(self._tasks)
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=grace)
        while pending:
            for task in pending:
                task.cancel()
            _, pending = await asyncio.wait(pending, timeout=0.5)
        for task in tasks:
            # Their exceptions were logged when they died; closing raises nothing.
            with contextlib.suppress(asyncio.CancelledError, Exception):
                task.result()

    def _ended(self, task: asyncio.Task[Any]) -> None:
        name = self._tasks.get(task, task.get_name())
        expected = self._closing or self.stop.is_set()
        if task.cancelled():
            if not expected:
                self._fail(name, None)
            return
        error = task.exception()
        if error is not None:
            self._fail(name, error)
        elif not expected:
            self._fail(name, None)

    def _finished(self, task: asyncio.Task[Any]) -> None:
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            self._fail(task.get_name(), error)

    def _fail(self, name: str, error: BaseException | None) -> None:
        if self._death is not None:
            return
        self._death = TaskDied(name, error)
        # Set before logging: a log call that fails (a closed stream) must not leave the
        # process waiting on a death nobody was told about.
        self._died.set()
        with contextlib.suppress(Exception):
            log.error(
                "task died, stopping the process",
                process=self.process,
                task=name,
                error=type(error).__name__ if error is not None else "returned",
                exc_info=error,
            )
