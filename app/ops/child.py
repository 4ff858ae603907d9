"""One child process: spawned in its own session, stopped gracefully, always reaped.

The one primitive under every process this project starts from Python: the
Redis and ZooKeeper servers of ``echo-at-time up``, the api, schedulers and
workers that ``up`` supervises, and the test harness and benchmarks (which
build on it rather than on ``subprocess.Popen``).

Why each choice:

* Own session (``start_new_session``): a terminal's Ctrl-C reaches only the
  parent, which then stops its children in order (services before servers),
  instead of everything at once.
* Parent-death signal (``setpriv --pdeathsig``, no ``preexec_fn``): if the
  parent dies without cleaning up (kill -9), the kernel signals the child, so
  nothing is left running. The kernel sends it when the *thread* that forked the
  child exits, so it is only asked for from the main thread, which lives as long
  as the process. setpriv execs the command: ``pid`` is the command itself.
* ``stop(grace)``: SIGTERM (and SIGCONT, since a stopped process cannot act on
  SIGTERM until it runs again), then SIGKILL after ``grace`` seconds, then reap.
  Every path reaps: no zombie, no ``ResourceWarning``.

Signals go through ``Popen``, which refuses to signal a pid it has reaped: a
recycled pid is never hit.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

__all__ = ["STDOUT", "ChildProcess", "stop_all"]

#: As ``stderr``: send standard error to the same place as standard output.
STDOUT = subprocess.STDOUT


def _parent_death_prefix(sig: signal.Signals | None) -> list[str]:
    if sig is None or threading.current_thread() is not threading.main_thread():
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return []
    return [setpriv, "--pdeathsig", sig.name.removeprefix("SIG"), "--"]


class ChildProcess:
    """Spawn ``argv`` at once; then ``poll``, ``wait``, ``send_signal``, ``stop``, ``kill``.

    :param argv: the command line.
    :param env: the child's complete environment (default: this process's).
    :param cwd: its working directory (default: ours).
    :param stdout: a file its standard output is appended to (default: inherited).
    :param stderr: a file for standard error, or :data:`STDOUT` (default: inherited).
    :param parent_death_signal: what the kernel sends it if we die first; None for
        nothing. Only applied when spawned from the main thread.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | str | None = None,
        stdout: Path | None = None,
        stderr: Path | int | None = None,
        parent_death_signal: signal.Signals | None = signal.SIGTERM,
    ) -> None:
        self.argv = list(argv)
        with contextlib.ExitStack() as files:
            out = None if stdout is None else files.enter_context(open(stdout, "ab"))
            if isinstance(stderr, Path):
                err: object = files.enter_context(open(stderr, "ab"))
            else:
                err = stderr
            self._popen = subprocess.Popen(
                [*_parent_death_prefix(parent_death_signal), *self.argv],
                env=None if env is None else dict(env),
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                close_fds=True,
                start_new_session=True,
            )
        # The child holds its own copies of the files; ours are closed on leaving.

    def __repr__(self) -> str:
        return f"<ChildProcess pid={self.pid} returncode={self.poll()} {self.argv[:2]}>"

    @property
    def pid(self) -> int:
        return self._popen.pid

    def poll(self) -> int | None:
        """The exit code (negative: killed by that signal), or None while it runs; reaps."""
        return self._popen.poll()

    @property
    def running(self) -> bool:
        return self._popen.poll() is None

    def wait(self, timeout: float | None = None) -> int:
        """Reap and return the exit code; raises ``subprocess.TimeoutExpired``."""
        return self._popen.wait(timeout)

    def send_signal(self, sig: int) -> None:
        """Signal it if it has not been reaped yet (never a recycled pid)."""
        if self._popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self._popen.send_signal(sig)

    def terminate(self) -> None:
        """SIGTERM, and SIGCONT so that a paused (SIGSTOP) process wakes to hear it."""
        self.send_signal(signal.SIGTERM)
        self.send_signal(signal.SIGCONT)

    def kill(self) -> int:
        """SIGKILL (a crash) and reap; returns the exit code."""
        self.send_signal(signal.SIGKILL)
        return self._popen.wait()

    def stop(self, grace: float) -> int:
        """SIGTERM, up to ``grace`` s to exit, then SIGKILL; reaped. Returns the exit code."""
        return stop_all([self], grace)[0]


def stop_all(children: Iterable[ChildProcess], grace: float) -> list[int]:
    """Stop several children in parallel: SIGTERM to each, then one shared ``grace``
    period, then SIGKILL for any left. Returns their exit codes, in order."""
    chosen = list(children)
    for child in chosen:
        child.terminate()
    deadline = time.monotonic() + grace
    codes: list[int] = []
    for child in chosen:
        try:
            codes.append(child.wait(max(0.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            codes.append(child.kill())
    return codes
