"""app.ops.supervisor.ProcessSupervisor with real processes and a hand-moved clock: a child that
exits is started again when its backoff says, the others are left alone, stop() ends all."""

from __future__ import annotations

import signal
import sys

from app.ops.supervisor import ProcessSupervisor, Program, RestartPolicy
from tests.wait import wait_until

CRASHER = Program("crasher", [sys.executable, "-c", "import sys; sys.exit(3)"])
SLEEPER = Program("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"])


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def noted_exit(supervisor: ProcessSupervisor, name: str) -> bool:
    """One look by the supervisor; True once it has seen ``name`` exit."""
    supervisor.check()
    return supervisor.pids()[name] is None


def test_a_child_that_exits_is_restarted_after_its_backoff_and_the_others_are_left_alone() -> None:
    clock = Clock()

    def policy() -> RestartPolicy:
        return RestartPolicy(first=1.0, cap=3.0, steady_after=30.0, rand=lambda: 1.0)

    supervisor = ProcessSupervisor([CRASHER, SLEEPER], {}, policy=policy, grace=10.0, clock=clock)
    supervisor.start()
    try:
        sleeper = supervisor.pids()["sleeper"]
        seen = [supervisor.pids()["crasher"]]
        for delay in (1.0, 2.0, 3.0, 3.0):  # doubling, then the cap
            wait_until(lambda: noted_exit(supervisor, "crasher"), "the crasher to exit", 10)
            clock.now += delay - 0.001
            supervisor.check()
            assert supervisor.pids()["crasher"] is None, f"restarted before {delay} s"
            clock.now += 0.001
            supervisor.check()
            seen.append(supervisor.pids()["crasher"])
            assert seen[-1] is not None and seen[-1] not in seen[:-1]

        # It stayed up long enough (by the clock) this time: back to the first delay.
        clock.now += 30.0
        wait_until(lambda: noted_exit(supervisor, "crasher"), "the crasher to exit", 10)
        clock.now += 1.0
        supervisor.check()
        assert supervisor.pids()["crasher"] not in (None, *seen)

        assert supervisor.pids()["sleeper"] == sleeper
    finally:
        codes = supervisor.stop()
    assert codes["sleeper"] == -signal.SIGTERM
