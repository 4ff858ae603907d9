"""Keep a few named child processes running: ``echo-at-time up``'s api, schedulers, workers.

A child that exits is started again after a delay from :class:`RestartPolicy`
(the project's one :class:`~app.backoff.Backoff`): a child that keeps dying at
start waits longer each time instead of spinning, and children that died
together (Redis went away) come back spread out by the jitter. Each exit is
logged with the child's name and exit code, each start with its pid.

State per child: *running* (``process`` alive), then *exited* (a restart is
due at ``restart_at``), then *running* again with a new process. ``stop()``
ends every child gracefully (SIGTERM, a grace period, SIGKILL), in parallel.

The loop polls every ``poll_interval`` s while waiting on the stop event, so
``stop_event.set()`` (a signal handler) ends it at once.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from app.backoff import Backoff
from app.log import get_logger
from app.ops.child import ChildProcess, stop_all

log = get_logger("supervisor")


@dataclass(frozen=True)
class Program:
    """What to keep running: a name for the logs and a command line."""

    name: str
    argv: Sequence[str]


class RestartPolicy:
    """How long a child waits before it is started again. Pure: the random source is injected.

    :param first: seconds before the first restart.
    :param cap: longest wait, seconds.
    :param steady_after: a child that ran at least this long counts as healthy again:
        its next restart waits only ``first``.
    :param rand: the jitter's random source (tests pass a fixed one).
    """

    def __init__(
        self,
        first: float = 0.5,
        cap: float = 10.0,
        steady_after: float = 5.0,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.backoff = Backoff(first, cap, jitter=True, rand=rand)
        self.steady_after = steady_after

    def delay(self, ran_for: float) -> float:
        """The wait before restarting a child that exited after running ``ran_for`` s."""
        if ran_for >= self.steady_after:
            self.backoff.reset()
        return self.backoff.next()


@dataclass
class _Slot:
    program: Program
    policy: RestartPolicy
    process: ChildProcess | None = None
    started_at: float = 0.0
    restart_at: float | None = None
    starts: int = 0


class ProcessSupervisor:
    """Start ``programs`` with ``env``, restart those that exit, stop them all at the end.

    :param programs: what to run, each under a unique name.
    :param env: the children's complete environment.
    :param policy: makes each child's :class:`RestartPolicy`.
    :param grace: seconds the children get to exit after SIGTERM in :meth:`stop`.
    :param poll_interval: seconds between two looks at the children.
    :param clock: monotonic seconds (tests may pass another).
    """

    def __init__(
        self,
        programs: Sequence[Program],
        env: Mapping[str, str],
        *,
        policy: Callable[[], RestartPolicy] = RestartPolicy,
        grace: float = 20.0,
        poll_interval: float = 0.2,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        names = [program.name for program in programs]
        if len(set(names)) != len(names):
            raise ValueError(f"program names must be unique: {names}")
        self.env = dict(env)
        self.grace = grace
        self.poll_interval = poll_interval
        self.clock = clock
        self._slots = [_Slot(program, policy()) for program in programs]

    def pids(self) -> dict[str, int | None]:
        """Each child's current pid (None while it waits to be restarted)."""
        return {
            slot.program.name: slot.process.pid
            if slot.process is not None and slot.restart_at is None
            else None
            for slot in self._slots
        }

    def start(self) -> None:
        """Start every child that has not been started."""
        now = self.clock()
        for slot in self._slots:
            if slot.process is None:
                self._start(slot, now)

    def run(self, stop_event: threading.Event) -> None:
        """Restart children that exit until ``stop_event`` is set (does not stop them)."""
        while not stop_event.wait(self.poll_interval):
            self.check()

    def check(self) -> None:
        """One look: note children that exited, start those whose restart is due."""
        now = self.clock()
        for slot in self._slots:
            if slot.restart_at is not None:
                if now >= slot.restart_at:
                    self._start(slot, now)
                continue
            process = slot.process
            code = None if process is None else process.poll()
            if process is None or code is None:
                continue
            delay = slot.policy.delay(now - slot.started_at)
            slot.restart_at = now + delay
            log.warning(
                "child exited, restarting",
                child=slot.program.name,
                pid=process.pid,
                code=code,
                restart_in_s=round(delay, 3),
            )

    def stop(self) -> dict[str, int]:
        """SIGTERM to every child, ``grace`` s for all of them to exit, SIGKILL for the rest.
        Returns each child's exit code by name (a child waiting for its restart keeps
        the code it exited with)."""
        started = [(slot.program.name, slot.process) for slot in self._slots if slot.process]
        codes = stop_all([process for _, process in started], self.grace)
        for (name, _), code in zip(started, codes, strict=True):
            log.info("child stopped", child=name, code=code)
        return {name: code for (name, _), code in zip(started, codes, strict=True)}

    def _start(self, slot: _Slot, now: float) -> None:
        slot.process = ChildProcess(slot.program.argv, env=self.env)
        slot.started_at = now
        slot.restart_at = None
        slot.starts += 1
        log.info(
            "started",
            child=slot.program.name,
            pid=slot.process.pid,
            restarts=slot.starts - 1,
        )
