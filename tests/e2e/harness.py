"""A process harness for end-to-end and chaos tests.

Starts the service's real processes (``echo-at-time api|scheduler|worker``)
through the installed console script, each with its stdout and stderr in a
file, and reads what they wrote back: echo lines (stdout, one JSON object per
handled message) and structured logs (stderr, JSON lines).

Nothing here sleeps "long enough": every wait is a condition polled until a
deadline (:func:`tests.wait.wait_until`), and a timeout raises
``AssertionError`` naming what was awaited, with the tail of every process's
stderr.

A harness only ever signals processes it started: each is an
:class:`app.ops.child.ChildProcess` (own session, reaped, never a recycled
pid), and it never looks processes up by name. When started from the main
thread, the kernel sends a child SIGKILL should the test process die without
cleaning up.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

import httpx

from app.ops.child import ChildProcess, stop_all
from tests.servers import free_port
from tests.wait import wait_until

LOCALHOST = "127.0.0.1"
POLL_INTERVAL = 0.02  # seconds between two looks at a cluster (reading every log)
DEFAULT_GRACE = 10.0  # seconds a process gets to exit after SIGTERM before SIGKILL
STDERR_TAIL_LINES = 30

T = TypeVar("T")

# The stderr log line (its "event") that says a process has started, per role.
# The api is ready when GET /healthz answers instead.
START_EVENTS: dict[str, str] = {
    "scheduler": "scheduler starting",
    "worker": "worker started",
}

# Leadership log events of the scheduler (election/leadership.py).
LEADING_EVENTS = frozenset({"leadership acquired", "leadership resumed"})
NOT_LEADING_PREFIXES = ("leadership lost", "leadership suspended", "leadership released")


# -- small helpers -----------------------------------------------------------------


def now_ms() -> int:
    """Wall-clock epoch milliseconds: the unit of ``runAt`` (Redis runs on this host)."""
    return time.time_ns() // 1_000_000


def console_script() -> str:
    """The installed ``echo-at-time`` script: next to this interpreter, else on PATH."""
    candidate = Path(sys.executable).parent / "echo-at-time"
    if candidate.is_file():
        return str(candidate)
    found = shutil.which("echo-at-time")
    if found is None:
        raise RuntimeError("the echo-at-time console script is not installed (pip install -e .)")
    return found


def parse_timestamp(value: object) -> float | None:
    """A structlog ISO timestamp (``...Z``) as epoch seconds, or None."""
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


class JsonLines:
    """The complete JSON-object lines of a growing file, read incrementally.

    A last line without its newline is not complete yet and waits for the next
    read; lines that are not JSON objects are skipped.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._partial = b""
        self._items: list[dict[str, Any]] = []

    def read(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as file:
                file.seek(self._offset)
                data = file.read()
        except FileNotFoundError:
            return list(self._items)
        self._offset += len(data)
        *complete, self._partial = (self._partial + data).split(b"\n")
        for line in complete:
            try:
                item = json.loads(line)
            except ValueError:
                continue
            if isinstance(item, dict):
                self._items.append(item)
        return list(self._items)


# -- one process ----------------------------------------------------------------------


class ServiceProcess:
    """One service process (``role``: api, scheduler, worker, ...) and its two log files.

    :param argv: the full command line.
    :param env: the complete environment of the child.
    :param log_dir: where ``<name>.stdout`` and ``<name>.stderr`` go.
    :param name: unique within a log directory (default: the role).
    :param port: the api's HTTP port; readiness is then ``GET /healthz``.
    :param ready_event: stderr log event that means "started" (default by role).
    :param slot: the place this process fills in a cluster (kept across restarts).
    """

    def __init__(
        self,
        role: str,
        argv: Sequence[str],
        env: Mapping[str, str],
        log_dir: Path,
        *,
        name: str | None = None,
        port: int | None = None,
        ready_event: str | None = None,
        slot: str | None = None,
        clock_offset: float = 0.0,
    ) -> None:
        self.role = role
        self.argv = list(argv)
        self.env = dict(env)
        self.name = name or role
        self.slot = slot or self.name
        self.port = port
        self.ready_event = ready_event if ready_event is not None else START_EVENTS.get(role)
        self.log_dir = Path(log_dir)
        self.stdout_path = self.log_dir / f"{self.name}.stdout"
        self.stderr_path = self.log_dir / f"{self.name}.stderr"
        self._child: ChildProcess | None = None
        self._stdout = JsonLines(self.stdout_path)
        self._stderr = JsonLines(self.stderr_path)
        self.started_at: float | None = None  # wall clock, epoch seconds
        # Seconds this process's wall clock is ahead of ours (run under faketime):
        # subtracted from its log timestamps to put them on the test's clock.
        self.clock_offset = clock_offset

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} pid={self.pid} returncode={self.returncode}>"

    # -- state -------------------------------------------------------------------------

    @property
    def child(self) -> ChildProcess | None:
        """The process, once started."""
        return self._child

    @property
    def pid(self) -> int | None:
        return None if self._child is None else self._child.pid

    @property
    def started(self) -> bool:
        return self._child is not None

    @property
    def running(self) -> bool:
        return self._child is not None and self._child.running

    @property
    def returncode(self) -> int | None:
        return None if self._child is None else self._child.poll()

    @property
    def base_url(self) -> str:
        if self.port is None:
            raise ValueError(f"{self.name} has no HTTP port")
        return f"http://{LOCALHOST}:{self.port}"

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> Self:
        if self._child is not None:
            raise RuntimeError(f"{self.name} was already started; make a new ServiceProcess")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._child = ChildProcess(
            self.argv,
            env=self.env,
            stdout=self.stdout_path,
            stderr=self.stderr_path,
            parent_death_signal=signal.SIGKILL,
        )
        self.started_at = time.time()
        return self

    def _started(self) -> ChildProcess:
        if self._child is None:
            raise RuntimeError(f"{self.name} was not started")
        return self._child

    def is_ready(self) -> bool:
        """One look: raises AssertionError if the process has exited."""
        code = self._started().poll()
        if code is not None:
            raise AssertionError(
                f"{self.name} exited with code {code} before it was ready\n{self.describe()}"
            )
        if self.port is not None:
            try:
                with httpx.Client(timeout=0.5) as client:
                    return client.get(f"{self.base_url}/healthz").status_code == 200
            except httpx.HTTPError:
                return False
        if self.ready_event is not None:
            return any(line.get("event") == self.ready_event for line in self.log_lines())
        return True

    def wait_ready(self, within: float) -> Self:
        """Wait until ready (api: /healthz answers; others: alive and start line logged)."""
        wait_until(
            self.is_ready,
            f"{self.name} to be ready",
            within,
            interval=0.05,
            diagnostics=self.describe,
        )
        return self

    def send_signal(self, sig: int) -> None:
        """Signal the process if it is still running (never a recycled pid)."""
        if self._child is not None:
            self._child.send_signal(sig)

    def wait(self, timeout: float | None = None) -> int:
        """Reap and return the exit code; raises subprocess.TimeoutExpired."""
        return self._started().wait(timeout)

    def terminate(self, timeout: float = DEFAULT_GRACE) -> int:
        """SIGTERM and wait; returns the exit code (negative: killed by that signal).

        A process still running after ``timeout`` is killed, and that is a
        failure: AssertionError.
        """
        self.send_signal(signal.SIGTERM)
        try:
            return self.wait(timeout)
        except subprocess.TimeoutExpired:
            code = self.kill()
            raise AssertionError(
                f"{self.name} did not exit within {timeout:g} s of SIGTERM "
                f"(killed, code {code})\n{self.describe()}"
            ) from None

    def kill(self) -> int:
        """SIGKILL (a crash) and reap; returns the exit code."""
        return self._started().kill()

    def pause(self) -> None:
        """SIGSTOP: frozen as in a long GC pause or a suspended VM."""
        self.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        self.send_signal(signal.SIGCONT)

    # -- output ------------------------------------------------------------------------

    def echo_lines(self) -> list[dict[str, Any]]:
        """Complete stdout lines whose ``event`` is ``echo``, in the order written."""
        return [line for line in self._stdout.read() if line.get("event") == "echo"]

    def log_lines(self) -> list[dict[str, Any]]:
        """Complete stderr lines that are JSON objects (others are skipped)."""
        return self._stderr.read()

    def stdout_lines(self) -> list[dict[str, Any]]:
        """Every complete stdout line that is a JSON object, whatever its event."""
        return self._stdout.read()

    def log_time(self, line: Mapping[str, Any]) -> float | None:
        """A log line's timestamp on the test's clock (epoch seconds), or None."""
        at = parse_timestamp(line.get("timestamp"))
        return None if at is None else at - self.clock_offset

    def stderr_tail(self, lines: int = STDERR_TAIL_LINES) -> str:
        try:
            text = self.stderr_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def describe(self, lines: int = STDERR_TAIL_LINES) -> str:
        state = "running" if self.running else f"exited {self.returncode}"
        if not self.started:
            state = "not started"
        tail = self.stderr_tail(lines) or "(empty)"
        indented = "\n".join("    " + line for line in tail.splitlines())
        return f"--- {self.name} (pid {self.pid}, {state}) stderr tail:\n{indented}"


# -- HTTP --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Posted:
    """One POST /api/v1/save-message: what was sent and what came back."""

    uuid: str
    message: str
    run_at: int
    status: int
    body: dict[str, Any]

    @property
    def accepted(self) -> bool:
        """201 (created) or 200 (a duplicate of an accepted uuid): the service owns it."""
        return self.status in (200, 201)


class ApiClient:
    """A synchronous httpx client for one api process. Close it (or use ``with``)."""

    PATH = "/api/v1/save-message"

    def __init__(self, base_url: str, timeout: float = 10.0) -> None:
        self.base_url = base_url
        self._http = httpx.Client(base_url=base_url, timeout=timeout)

    def post(self, message: str, run_at: int, uuid: str | None = None) -> Posted:
        body: dict[str, Any] = {"message": message, "runAt": run_at}
        if uuid is not None:
            body["uuid"] = uuid
        response = self._http.post(self.PATH, json=body)
        try:
            answer = response.json()
        except ValueError:
            answer = {"raw": response.text}
        if not isinstance(answer, dict):
            answer = {"raw": answer}
        return Posted(
            uuid=str(answer.get("uuid", uuid)),
            message=message,
            run_at=run_at,
            status=response.status_code,
            body=answer,
        )

    def post_many(self, items: Iterable[tuple[str, int, str | None]]) -> list[Posted]:
        """Post (message, runAt, uuid) triples one after another, in order."""
        return [self.post(message, run_at, uuid) for message, run_at, uuid in items]

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- checks shared by tests ---------------------------------------------------------


def accepted_uuids(posts: Iterable[Posted]) -> set[str]:
    return {p.uuid for p in posts if p.accepted}


def echo_counts(echoes: Iterable[Mapping[str, Any]]) -> Counter[str]:
    return Counter(str(e["uuid"]) for e in echoes)


def assert_echoed_exactly_once(expected: set[str], echoes: Sequence[Mapping[str, Any]]) -> None:
    """Nothing lost (every expected uuid echoed), nothing extra, and each exactly once."""
    counts = echo_counts(echoes)
    missing = expected - counts.keys()
    unexpected = counts.keys() - expected
    repeated = {uuid: n for uuid, n in counts.items() if n > 1}
    assert not missing, f"{len(missing)} accepted messages never echoed: {sorted(missing)[:10]}"
    assert not unexpected, f"echoed but never accepted: {sorted(unexpected)[:10]}"
    assert not repeated, f"echoed more than once: {repeated}"


# -- a cluster ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Acquisition:
    """A "leadership acquired" log line of a scheduler process."""

    process: ServiceProcess
    epoch: int
    at: float  # the line's timestamp, epoch seconds


class Cluster:
    """api, scheduler and worker processes sharing one prefix, stopped together.

    Every process ever started stays in :attr:`history` (so echoes of a killed
    or restarted worker still count); :attr:`apis`, :attr:`schedulers` and
    :attr:`workers` hold the current one of each slot.
    """

    def __init__(
        self,
        redis_url: str,
        zk_hosts: str,
        prefix: str,
        workdir: Path,
        *,
        session_timeout: float = 2.0,
        env: Mapping[str, str] | None = None,
        grace: float = DEFAULT_GRACE,
    ) -> None:
        self.prefix = prefix
        self.workdir = Path(workdir)
        self.session_timeout = session_timeout
        self.grace = grace
        base = {k: v for k, v in os.environ.items() if not k.startswith("EAT_")}
        base.update(
            {
                "EAT_REDIS_URL": redis_url,
                "EAT_ZK_HOSTS": zk_hosts,
                "EAT_PREFIX": prefix,
                "EAT_ZK_SESSION_TIMEOUT": f"{session_timeout:g}",
                "EAT_LOG_FORMAT": "json",
                "PYTHONUNBUFFERED": "1",
            }
        )
        base.update(env or {})
        self.env = base
        self.script = console_script()
        self.apis: list[ServiceProcess] = []
        self.schedulers: list[ServiceProcess] = []
        self.workers: list[ServiceProcess] = []
        self.history: list[ServiceProcess] = []
        self._generation: Counter[str] = Counter()
        self._clients: list[ApiClient] = []
        # slot -> (extra env, command prefix, clock offset): what a restart must repeat
        self._specs: dict[str, tuple[dict[str, str], list[str], float]] = {}

    # -- building ----------------------------------------------------------------------

    def _new(
        self,
        role: str,
        slot: str,
        args: Sequence[str],
        port: int | None = None,
        *,
        env: Mapping[str, str] | None = None,
        command_prefix: Sequence[str] = (),
        clock_offset: float = 0.0,
    ) -> ServiceProcess:
        """``env`` is added to the cluster's environment for this process (and its
        restarts); ``command_prefix`` goes before the console script (e.g. faketime)."""
        self._generation[slot] += 1
        generation = self._generation[slot]
        name = slot if generation == 1 else f"{slot}.run{generation}"
        self._specs[slot] = (dict(env or {}), list(command_prefix), clock_offset)
        return ServiceProcess(
            role,
            [*command_prefix, self.script, role, *args],
            {**self.env, **(env or {})},
            self.workdir,
            name=name,
            port=port,
            slot=slot,
            clock_offset=clock_offset,
        )

    def add_api(self, *, env: Mapping[str, str] | None = None) -> ServiceProcess:
        port = free_port()
        slot = f"api-{len(self.apis) + 1}"
        proc = self._new(
            "api", slot, ["--host", LOCALHOST, "--port", str(port)], port=port, env=env
        )
        self.apis.append(proc)
        return proc

    def add_scheduler(
        self,
        *,
        env: Mapping[str, str] | None = None,
        command_prefix: Sequence[str] = (),
        clock_offset: float = 0.0,
    ) -> ServiceProcess:
        slot = f"scheduler-{len(self.schedulers) + 1}"
        proc = self._new(
            "scheduler",
            slot,
            [],
            env=env,
            command_prefix=command_prefix,
            clock_offset=clock_offset,
        )
        self.schedulers.append(proc)
        return proc

    def add_worker(
        self,
        concurrency: int | None = None,
        consumer_name: str | None = None,
        *,
        handler: str | None = None,
        env: Mapping[str, str] | None = None,
        command_prefix: Sequence[str] = (),
    ) -> ServiceProcess:
        """A worker with a stable consumer name (``<prefix>-worker-N`` unless given):
        restarted, it takes back the entries delivered to its previous run."""
        slot = f"worker-{len(self.workers) + 1}"
        args = ["--consumer-name", consumer_name or f"{self.prefix}-{slot}"]
        if concurrency is not None:
            args += ["--concurrency", str(concurrency)]
        if handler is not None:
            args += ["--handler", handler]
        proc = self._new("worker", slot, args, env=env, command_prefix=command_prefix)
        self.workers.append(proc)
        return proc

    def consumer_name(self, proc: ServiceProcess) -> str:
        """The consumer-group name a worker process reads under."""
        return proc.argv[proc.argv.index("--consumer-name") + 1]

    def launch(self, processes: Sequence[ServiceProcess], timeout: float = 30.0) -> None:
        """Start the processes together, then wait until every one is ready."""
        for proc in processes:
            self.history.append(proc)
            proc.start()
        waiting = list(processes)

        def all_ready() -> bool:
            waiting[:] = [proc for proc in waiting if not proc.is_ready()]
            return not waiting

        names = ", ".join(proc.name for proc in processes)
        wait_until(
            all_ready, f"{names} to be ready", timeout, interval=0.05, diagnostics=self.describe
        )

    def start(
        self,
        apis: int = 1,
        schedulers: int = 2,
        workers: int = 2,
        *,
        worker_concurrency: int | None = None,
        timeout: float = 30.0,
    ) -> Self:
        """Start the processes; with schedulers, also wait until one of them leads."""
        new = [self.add_api() for _ in range(apis)]
        new += [self.add_scheduler() for _ in range(schedulers)]
        new += [self.add_worker(worker_concurrency) for _ in range(workers)]
        self.launch(new, timeout)
        if schedulers:
            self.wait_for_leader(timeout)
        return self

    def restart(self, *procs: ServiceProcess, timeout: float = 30.0) -> list[ServiceProcess]:
        """Start a fresh process in each stopped process's slot, same command line,
        together, and wait until all are ready. Returns the new processes."""
        new: list[ServiceProcess] = []
        for proc in procs:
            if proc.running:
                raise RuntimeError(f"{proc.name} is still running; stop it first")
            slots = {"api": self.apis, "scheduler": self.schedulers, "worker": self.workers}
            role_list = slots[proc.role]
            env, command_prefix, clock_offset = self._specs.get(proc.slot, ({}, [], 0.0))
            args = proc.argv[len(command_prefix) + 2 :]
            fresh = self._new(
                proc.role,
                proc.slot,
                args,
                port=proc.port,
                env=env,
                command_prefix=command_prefix,
                clock_offset=clock_offset,
            )
            role_list[role_list.index(proc)] = fresh
            new.append(fresh)
        self.launch(new, timeout)
        return new

    def stop(self, grace: float | None = None) -> dict[str, int | None]:
        """SIGTERM every running process, SIGKILL those not gone after ``grace`` s.

        Returns each started process's exit code by name. Closes the HTTP clients.
        """
        grace = self.grace if grace is None else grace
        for client in self._clients:
            client.close()
        self._clients.clear()
        stop_all([proc.child for proc in self.history if proc.child is not None], grace)
        return {proc.name: proc.returncode for proc in self.history}

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- talking to it -------------------------------------------------------------------

    def client(self, index: int = 0) -> ApiClient:
        """A new HTTP client for api ``index``, closed by :meth:`stop`."""
        client = ApiClient(self.apis[index].base_url)
        self._clients.append(client)
        return client

    # -- looking at it ------------------------------------------------------------------

    def running(self, role: str | None = None) -> list[ServiceProcess]:
        return [p for p in self.history if p.running and (role is None or p.role == role)]

    def all_echoes(self) -> list[dict[str, Any]]:
        """Echo lines of every worker process ever started, each worker's in its order."""
        return [line for p in self.history if p.role == "worker" for line in p.echo_lines()]

    def acquisitions(self) -> list[Acquisition]:
        """Every "leadership acquired" line of every scheduler ever started, oldest first."""
        found: list[Acquisition] = []
        for proc in self.history:
            if proc.role != "scheduler":
                continue
            for line in proc.log_lines():
                if line.get("event") == "leadership acquired":
                    at = proc.log_time(line) or 0.0
                    found.append(Acquisition(proc, int(line["epoch"]), at))
        found.sort(key=lambda a: (a.at, a.epoch))
        return found

    def leader(self) -> ServiceProcess | None:
        """The running scheduler that leads: the latest "leadership acquired" among
        running schedulers whose last leadership line does not say they stopped leading."""
        candidates: list[Acquisition] = []
        for acquisition in self.acquisitions():
            proc = acquisition.process
            if not proc.running:
                continue
            last = None
            for line in proc.log_lines():
                event = str(line.get("event", ""))
                if event in LEADING_EVENTS or event.startswith(NOT_LEADING_PREFIXES):
                    last = event
            if last in LEADING_EVENTS:
                candidates.append(acquisition)
        return candidates[-1].process if candidates else None

    def leader_epoch(self, proc: ServiceProcess) -> int | None:
        epochs = [a.epoch for a in self.acquisitions() if a.process is proc]
        return epochs[-1] if epochs else None

    def wait_for_leader(self, within: float, *, newer_than: int | None = None) -> Acquisition:
        """Wait up to ``within`` s for a current leader (whose epoch is above ``newer_than``);
        returns its acquisition."""

        def found() -> Acquisition | None:
            leader = self.leader()
            if leader is None:
                return None
            for acquisition in reversed(self.acquisitions()):
                if acquisition.process is leader and (
                    newer_than is None or acquisition.epoch > newer_than
                ):
                    return acquisition
            return None

        what = "a scheduler to lead" + (f" with an epoch above {newer_than}" if newer_than else "")
        return self.wait_until(found, what, within)

    def wait_until(self, check: Callable[[], T], what: str, within: float) -> T:
        """:func:`tests.wait.wait_until` whose failure carries every process's stderr tail."""
        return wait_until(check, what, within, interval=POLL_INTERVAL, diagnostics=self.describe)

    def describe(self, lines: int = STDERR_TAIL_LINES) -> str:
        return "\n".join(proc.describe(lines) for proc in self.history)
