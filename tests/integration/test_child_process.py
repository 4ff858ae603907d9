"""app/ops/child.py: the one way this project starts, stops and reaps a process."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from app.ops.child import STDOUT, ChildProcess, stop_all
from tests.wait import wait_until

PY = sys.executable

# Says "ready" on stdout once its SIGTERM disposition is set, then sleeps.
SLEEPER = "import sys, time; print('ready', flush=True); time.sleep(60)"
STUBBORN = (
    "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "print('ready', flush=True); time.sleep(60)"
)


def said_ready(path: Path) -> bool:
    return path.exists() and "ready" in path.read_text()


def test_output_goes_to_the_files_given_with_the_environment_given(tmp_path: Path) -> None:
    out, err = tmp_path / "out", tmp_path / "err"
    out.write_text("earlier run\n")  # appended to, not truncated
    code = (
        "import os, sys; print(os.environ['GREETING']); print('oops', file=sys.stderr); sys.exit(3)"
    )
    child = ChildProcess([PY, "-c", code], env={"GREETING": "hello"}, stdout=out, stderr=err)

    assert child.wait(10) == 3
    assert child.poll() == 3 and not child.running
    assert out.read_text() == "earlier run\nhello\n"
    assert err.read_text() == "oops\n"


def test_stderr_can_share_the_stdout_file(tmp_path: Path) -> None:
    log = tmp_path / "log"
    code = "import sys; print('a', flush=True); print('b', file=sys.stderr)"
    assert ChildProcess([PY, "-c", code], stdout=log, stderr=STDOUT).wait(10) == 0
    assert log.read_text() == "a\nb\n"


def test_a_child_runs_in_its_own_session(tmp_path: Path) -> None:
    child = ChildProcess([PY, "-c", SLEEPER], stdout=tmp_path / "out")
    try:
        assert os.getsid(child.pid) == child.pid != os.getsid(0)
    finally:
        child.kill()


def test_stop_ends_a_child_with_sigterm_and_reaps_it(tmp_path: Path) -> None:
    out = tmp_path / "out"
    child = ChildProcess([PY, "-c", SLEEPER], stdout=out)
    wait_until(lambda: said_ready(out), "the child to start", 10)

    assert child.stop(grace=10) == -signal.SIGTERM
    assert not child.running
    assert child.stop(grace=10) == -signal.SIGTERM  # stopping twice is harmless


def test_stop_kills_a_child_that_ignores_sigterm_after_the_grace_period(tmp_path: Path) -> None:
    out = tmp_path / "out"
    child = ChildProcess([PY, "-c", STUBBORN], stdout=out)
    wait_until(lambda: said_ready(out), "the child to ignore SIGTERM", 10)

    started = time.monotonic()
    assert child.stop(grace=0.5) == -signal.SIGKILL
    assert time.monotonic() - started >= 0.5


def test_stop_wakes_a_paused_child_so_that_it_exits_on_sigterm(tmp_path: Path) -> None:
    out = tmp_path / "out"
    child = ChildProcess([PY, "-c", SLEEPER], stdout=out)
    wait_until(lambda: said_ready(out), "the child to start", 10)
    child.send_signal(signal.SIGSTOP)

    assert child.stop(grace=10) == -signal.SIGTERM


def test_stop_all_shares_one_grace_period(tmp_path: Path) -> None:
    outs = [tmp_path / f"out{i}" for i in range(3)]
    children = [ChildProcess([PY, "-c", STUBBORN], stdout=out) for out in outs]
    wait_until(lambda: all(said_ready(out) for out in outs), "the children to start", 10)

    started = time.monotonic()
    assert stop_all(children, grace=0.5) == [-signal.SIGKILL] * 3
    assert time.monotonic() - started < 3 * 0.5


def test_a_child_gets_the_parent_death_signal_when_its_parent_dies(tmp_path: Path) -> None:
    """The parent spawns a child with the primitive and is then killed -9, with no chance
    to clean up: the kernel sends the child SIGTERM."""
    pid_file = tmp_path / "grandchild.pid"
    parent_code = f"""
import sys, time
from pathlib import Path
from app.ops.child import ChildProcess
child = ChildProcess([sys.executable, "-c", {SLEEPER!r}], stdout=Path({str(tmp_path / "gc")!r}))
Path({str(pid_file)!r}).write_text(str(child.pid))
time.sleep(60)
"""
    parent = ChildProcess([PY, "-c", parent_code], stdout=tmp_path / "parent")
    grandchild = int(wait_until(lambda: pid_file.exists() and pid_file.read_text(), "a pid", 10))
    wait_until(lambda: said_ready(tmp_path / "gc"), "the grandchild to start", 10)

    parent.kill()

    def gone() -> bool:
        # Reparented, it is reaped by whoever adopted it; a zombie has exited too.
        try:
            state = Path(f"/proc/{grandchild}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        return state in ("Z", "X")

    try:
        wait_until(gone, "the grandchild to exit after its parent died", 10)
    finally:
        if not gone():  # the assertion failed: do not leave it running
            os.kill(grandchild, signal.SIGKILL)
