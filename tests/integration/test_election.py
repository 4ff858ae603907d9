"""Leader election against a real ZooKeeper: one leader, growing epochs, partitions.

Every contender is an ``election.leadership.LeaderElection`` whose ``report``
callback appends ``(role, epoch)`` to a thread-safe log; tests wait on that log
with deadlines. Network partitions go through a small pausable TCP proxy that
sits between one client and ZooKeeper.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from kazoo.client import KazooClient, KazooState

from election.gate import LeadershipGate, Role
from election.leadership import LeaderElection
from tests.wait import wait_until

Event = tuple[Role, "int | None"]

SESSION = 2.0  # seconds; the fixture's tickTime (500 ms) allows 1-10 s
DEADLINE = 5.0  # generous bound for anything that should take well under a second


class Reports:
    """The ``report`` callback: a thread-safe, waitable log of (role, epoch)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.events: list[Event] = []

    def __call__(self, role: Role, epoch: int | None) -> None:
        with self._cond:
            self.events.append((role, epoch))
            self._cond.notify_all()

    def snapshot(self) -> list[Event]:
        with self._cond:
            return list(self.events)

    def mark(self) -> int:
        """Position to wait from: only events reported after this call count."""
        with self._cond:
            return len(self.events)

    def wait_for(self, match: Callable[[Event], bool], timeout: float, since: int = 0) -> Event:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for event in self.events[since:]:
                    if match(event):
                        return event
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"no matching report within {timeout} s; got {self.events[since:]}"
                    )
                self._cond.wait(left)

    def wait_role(self, role: Role, timeout: float = DEADLINE, since: int = 0) -> Event:
        return self.wait_for(lambda e: e[0] is role, timeout, since)

    def roles(self, since: int = 0) -> list[Role]:
        return [role for role, _ in self.snapshot()[since:]]


class Contender:
    def __init__(self, election: LeaderElection, reports: Reports) -> None:
        self.election = election
        self.reports = reports
        self.stopped = False

    def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            self.election.stop()


@pytest.fixture
def contenders(zk_hosts: str, prefix: str) -> Iterator[Callable[..., Contender]]:
    """Factory of started contenders on this test's election path; all stopped afterwards."""
    made: list[Contender] = []

    def make(name: str, hosts: str | None = None, session_timeout: float = SESSION) -> Contender:
        reports = Reports()
        election = LeaderElection(
            hosts or zk_hosts, f"/{prefix}/election", name, session_timeout, reports
        )
        contender = Contender(election, reports)
        made.append(contender)
        election.start()
        return contender

    yield make
    for contender in reversed(made):
        contender.stop()


def safe_contenders(contender: Contender) -> list[str]:
    with contextlib.suppress(Exception):
        return contender.election.contenders()
    return []


def wait_contending(contender: Contender, count: int) -> None:
    """Until ``contender`` sees ``count`` election nodes (its own included)."""
    wait_until(lambda: len(safe_contenders(contender)) >= count, "contenders joined", DEADLINE)


def expire_session(client: KazooClient, hosts: str, timeout: float = DEADLINE) -> None:
    """Expire ``client``'s session for real, the way kazoo's harness used to.

    A second client attaches to the same session (same id and password) and
    closes it: ZooKeeper ends the session, deletes its ephemeral nodes, and the
    first client learns it on its next reconnection (LOST, then a new session).
    Repeated if the first client won the session back before the close landed.
    """
    deadline = time.monotonic() + timeout
    original = client.client_id
    assert original is not None, "client is not connected"
    while True:
        twin = KazooClient(hosts=hosts, client_id=original, timeout=SESSION)
        try:
            twin.start(timeout=DEADLINE)
        finally:
            twin.stop()
            twin.close()
        with contextlib.suppress(AssertionError):
            wait_until(
                lambda: client.client_id not in (None, original) or client.state == KazooState.LOST,
                "session expired",
                1.0,
            )
            return
        if time.monotonic() >= deadline:
            raise AssertionError("could not expire the session")


# --------------------------------------------------------------------------- TCP proxy


class PausableProxy:
    """Forwards 127.0.0.1:<port> to a target; ``pause()`` blackholes traffic both ways.

    Paused, nothing is forwarded and nothing is refused: connections are still
    accepted and bytes wait in socket buffers, as on a network that silently
    drops packets. ``resume()`` forwards everything again.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)
        self.port = self._listener.getsockname()[1]
        self._flowing = threading.Event()
        self._flowing.set()
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._spawn(self._accept_loop, "proxy-accept")

    @property
    def hosts(self) -> str:
        return f"127.0.0.1:{self.port}"

    def pause(self) -> None:
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    def close(self) -> None:
        self._closed.set()
        self._flowing.set()
        for thread in list(self._threads):
            thread.join(5)
        with self._lock:
            for sock in self._sockets:
                sock.close()
        self._listener.close()

    def _spawn(self, target: Callable[..., None], name: str, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        with self._lock:
            self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                downstream, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self._target, timeout=2.0)
            except OSError:
                downstream.close()
                continue
            for sock in (downstream, upstream):
                sock.settimeout(0.05)
            with self._lock:
                self._sockets += [downstream, upstream]
            self._spawn(self._pipe, "proxy-up", downstream, upstream)
            self._spawn(self._pipe, "proxy-down", upstream, downstream)

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while not self._closed.is_set():
                try:
                    data = src.recv(65536)
                except TimeoutError:
                    continue
                if not data:
                    break
                while not self._flowing.wait(0.05):
                    if self._closed.is_set():
                        return
                if self._closed.is_set():
                    return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            # Either side gone: end both directions, as a broken connection would.
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def zk_proxy(zk_hosts: str) -> Iterator[PausableProxy]:
    host, port = zk_hosts.split(",")[0].rsplit(":", 1)
    proxy = PausableProxy(host, int(port))
    try:
        yield proxy
    finally:
        proxy.close()


# --------------------------------------------------------------------------- election


def _leader_epoch(contender: Contender, since: int = 0, timeout: float = DEADLINE) -> int:
    _role, epoch = contender.reports.wait_role(Role.LEADER, timeout, since)
    assert epoch is not None
    return epoch


def test_exactly_one_of_two_contenders_leads_and_the_other_follows(contenders) -> None:
    a = contenders("a")
    b = contenders("b")
    wait_contending(a, 2)
    wait_contending(b, 2)
    first = a.election.contenders()
    assert sorted(first) == ["a", "b"]
    leader, follower = (a, b) if first[0] == "a" else (b, a)

    epoch = _leader_epoch(leader)
    assert epoch > 0
    assert leader.election.epoch == epoch
    # The follower is in the election (its node exists) but never reported leading.
    assert Role.LEADER not in follower.reports.roles()
    assert follower.election.epoch is None
    # One LEADER report, no churn, and ZooKeeper agrees on who is first.
    assert leader.reports.roles() == [Role.LEADER]
    assert leader.election.contenders()[0] == leader.election.identifier


def test_stopping_the_leader_hands_over_at_once_with_a_strictly_greater_epoch(
    contenders,
) -> None:
    a = contenders("a")
    old_epoch = _leader_epoch(a)
    b = contenders("b")
    wait_contending(b, 2)
    assert Role.LEADER not in b.reports.roles()

    started = time.monotonic()
    a.stop()  # deletes a's election node: no session timeout to wait for
    new_epoch = _leader_epoch(b, timeout=DEADLINE)
    handover = time.monotonic() - started

    assert new_epoch > old_epoch
    # Typically ~15 ms; a session timeout (what a crash costs) would mean the node was not deleted.
    assert handover < SESSION / 2, f"hand-over took {handover:.2f} s"
    # The stopped leader's last word is FOLLOWER: it promotes nothing any more.
    roles = a.reports.roles()
    assert roles[0] is Role.LEADER
    assert roles[-1] is Role.FOLLOWER, roles


def test_expired_leader_session_hands_over_and_the_old_leader_rejoins_with_a_larger_epoch(
    contenders, zk_hosts: str
) -> None:
    a = contenders("a")
    epoch_a1 = _leader_epoch(a)
    b = contenders("b")
    wait_contending(b, 2)

    mark_a = a.reports.mark()
    expire_session(a.election.client, zk_hosts)

    # The old leader stops leading: SUSPENDED at once, then FOLLOWER as it leaves.
    a.reports.wait_for(lambda e: e[0] in (Role.SUSPENDED, Role.FOLLOWER), DEADLINE, mark_a)
    a.reports.wait_role(Role.FOLLOWER, DEADLINE, mark_a)
    epoch_b = _leader_epoch(b)
    assert epoch_b > epoch_a1
    # No LEADER report from a after the expiry while b leads.
    assert Role.LEADER not in a.reports.roles(mark_a)

    # a rejoins as a contender on its new session, behind b.
    wait_until(lambda: safe_contenders(b) == ["b", "a"], "a rejoined behind b", DEADLINE)

    mark_a = a.reports.mark()
    b.stop()
    epoch_a2 = _leader_epoch(a, since=mark_a)
    assert epoch_a2 > epoch_b > epoch_a1


def test_short_partition_suspends_the_leader_then_resumes_it_with_the_same_epoch(
    zk_proxy: PausableProxy, contenders
) -> None:
    # (zk_proxy first: the contenders stop before the proxy closes.)
    # Session long enough that the reconnection after a detected cut lands well
    # inside it: kazoo detects a silent link after ~2/3 of the session timeout.
    session = 4.0
    a = contenders("a", hosts=zk_proxy.hosts, session_timeout=session)
    epoch = _leader_epoch(a)
    b = contenders("b")
    wait_contending(b, 2)

    mark = a.reports.mark()
    cut_at = time.monotonic()
    zk_proxy.pause()
    a.reports.wait_role(Role.SUSPENDED, session, mark)
    detected = time.monotonic() - cut_at
    zk_proxy.resume()

    resumed = a.reports.wait_role(Role.LEADER, session, mark)
    assert resumed == (Role.LEADER, epoch), "same session, same node: same epoch"
    assert a.reports.roles(mark) == [Role.SUSPENDED, Role.LEADER], a.reports.snapshot()
    assert detected < session
    # Nobody took over meanwhile, and the leader's node is still first.
    assert Role.LEADER not in b.reports.roles()
    assert a.election.contenders()[0] == "a"
    assert a.election.epoch == epoch


# --------------------------------------------------------------------------- gate


def test_gate_opens_with_leader_epoch_and_closes_on_any_other_role() -> None:
    gate = LeadershipGate()
    changes: list[tuple[Role, int | None]] = []
    gate.on_change(lambda: changes.append((gate.role, gate.epoch)))
    assert not gate.is_open and gate.role is Role.FOLLOWER and gate.epoch is None

    assert gate.set_role(Role.LEADER, 3) is True
    assert gate.is_open and gate.epoch == 3 and gate.role is Role.LEADER
    assert gate.set_role(Role.SUSPENDED) is True
    assert not gate.is_open and gate.epoch is None
    assert gate.set_role(Role.LEADER, 3) is True  # resume, same epoch
    assert gate.set_role(Role.FOLLOWER) is True
    assert not gate.is_open
    # LEADER without an epoch is meaningless and ignored.
    assert gate.set_role(Role.LEADER, None) is False
    assert not gate.is_open
    assert changes == [
        (Role.LEADER, 3),
        (Role.SUSPENDED, None),
        (Role.LEADER, 3),
        (Role.FOLLOWER, None),
    ]


def test_gate_marked_stale_refuses_that_epoch_and_older_ones_but_accepts_a_newer_one() -> None:
    gate = LeadershipGate()
    gate.set_role(Role.LEADER, 5)
    gate.mark_stale(5)
    assert not gate.is_open and gate.role is Role.SUSPENDED

    assert gate.set_role(Role.LEADER, 5) is False
    assert gate.set_role(Role.LEADER, 4) is False
    assert not gate.is_open and gate.role is Role.SUSPENDED
    assert gate.set_role(Role.LEADER, 6) is True
    assert gate.is_open and gate.epoch == 6
    # An older mark never lowers the bar.
    gate.mark_stale(2)
    assert gate.set_role(Role.LEADER, 5) is False
    assert gate.set_role(Role.LEADER, 6) is True


def test_gate_wait_open_returns_the_epoch_once_leadership_arrives() -> None:
    async def scenario() -> None:
        gate = LeadershipGate()
        waiter = asyncio.create_task(gate.wait_open())
        await asyncio.sleep(0)
        assert not waiter.done()
        gate.set_role(Role.SUSPENDED)
        await asyncio.sleep(0)
        assert not waiter.done()
        gate.set_role(Role.LEADER, 9)
        assert await asyncio.wait_for(waiter, 1.0) == 9
        assert await asyncio.wait_for(gate.wait_open(), 1.0) == 9

    asyncio.run(scenario())
