"""ZooKeeper leader election (kazoo) with a fencing epoch.

The epoch is the czxid of this contender's election znode: ZooKeeper assigns
zxids in one ensemble-wide increasing order, so a leader elected later always
holds a larger epoch than every earlier one, whatever happened in between.

States and transitions (reported through ``report(role, epoch)``)::

    FOLLOWER  --wins the election-------------------------------> LEADER(epoch)
    LEADER    --connection SUSPENDED or LOST--------------------> SUSPENDED
    SUSPENDED --CONNECTED, same session, election node present--> LEADER(same epoch)
    SUSPENDED --LOST, new session, or node gone------------------> FOLLOWER, then rejoin
    any       --stop()-------------------------------------------> FOLLOWER (node deleted)

SUSPENDED is reported from kazoo's listener, at once and without blocking; a
partitioned client hears nothing else until it reconnects. Resuming on the same
session, rather than resigning, keeps the leader in place through a ZooKeeper
leader change, which suspends every client for under a second. None of this can
stop a leader that was paused past its session and resumes: the promote script
refuses its stale epoch.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from kazoo.client import KazooClient, KazooState
from kazoo.exceptions import KazooException
from kazoo.handlers.threading import KazooTimeoutError
from kazoo.security import make_digest_acl

from app.log import get_logger
from election.gate import Role

log = get_logger("election")

Report = Callable[[Role, "int | None"], None]


class LeaderElection:
    """One contender. ``report`` is called from kazoo threads and must not block."""

    def __init__(
        self,
        hosts: str,
        path: str,
        identifier: str,
        session_timeout: float,
        report: Report,
        auth: str | None = None,
    ) -> None:
        self.path = path
        self.identifier = identifier
        self._report = report
        acl_options = {}
        if auth:
            # Digest auth; the znodes this client creates are readable and writable by that
            # user only, so another tenant of the ensemble cannot join or break the election.
            user, _, password = auth.partition(":")
            acl_options = {
                "auth_data": [("digest", auth)],
                "default_acl": [make_digest_acl(user, password, all=True)],
            }
        self._client = KazooClient(
            hosts=hosts,
            **acl_options,
            timeout=session_timeout,
            connection_retry={"max_tries": -1, "delay": 0.05, "max_delay": 1.0},
            command_retry={"max_tries": 3, "delay": 0.05, "max_delay": 0.5},
        )
        self._client.add_listener(self._on_connection_state)
        self._changed = threading.Event()
        self._stopping = threading.Event()
        self._election = None
        self._thread = threading.Thread(target=self._run, name="election", daemon=True)
        self.epoch: int | None = None

    @property
    def client(self) -> KazooClient:
        return self._client

    def start(self) -> None:
        self._client.start_async()
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Leave the election; a leader deletes its node so another takes over at once."""
        self._stopping.set()
        self._changed.set()
        election = self._election
        if election is not None:
            election.cancel()
        self._thread.join(timeout)
        try:
            self._client.stop()
        finally:
            self._client.close()

    def contenders(self) -> list[str]:
        """Identifiers in election order: the first one leads."""
        if self._election is None:
            return []
        return self._election.contenders()

    def _on_connection_state(self, state: str) -> bool:
        # After stop() the client's own LOST is no news: FOLLOWER stays the last word.
        if state != KazooState.CONNECTED and not self._stopping.is_set():
            self._report(Role.SUSPENDED, None)
        self._changed.set()
        return False  # keep listening

    def _run(self) -> None:
        while not self._stopping.is_set():
            if not self._client.connected:
                self._changed.wait(0.5)
                self._changed.clear()
                continue
            self._election = self._client.Election(self.path, self.identifier)
            try:
                self._election.run(self._lead)
            except (KazooException, KazooTimeoutError) as exc:
                log.warning("election interrupted, rejoining", error=type(exc).__name__)
                self._stopping.wait(0.1)
            except Exception:
                log.exception("election failed, rejoining")
                self._stopping.wait(1.0)

    def _lead(self) -> None:
        lock = self._election.lock
        node_path = f"{lock.path}/{lock.node}"
        session = self._client.client_id
        stat = self._client.exists(node_path)
        if stat is None or session is None or stat.ephemeralOwner != session[0]:
            return
        self.epoch = stat.czxid
        log.info("leadership acquired", epoch=self.epoch, node=lock.node)
        self._report(Role.LEADER, self.epoch)
        suspended = False
        try:
            while not self._stopping.is_set():
                self._changed.clear()
                state = self._client.state
                # client_id is None while disconnected (SUSPENDED): that is not a new session.
                client_id = self._client.client_id
                if state == KazooState.LOST or client_id not in (None, session):
                    log.warning("leadership lost: session expired", epoch=self.epoch)
                    return
                if state == KazooState.SUSPENDED:
                    if not suspended:
                        log.warning("leadership suspended: connection in doubt", epoch=self.epoch)
                    suspended = True
                elif suspended:
                    try:
                        stat = self._client.exists(node_path)
                    except KazooException:
                        continue
                    if stat is None or stat.ephemeralOwner != session[0]:
                        log.warning("leadership lost: election node gone", epoch=self.epoch)
                        return
                    suspended = False
                    log.info("leadership resumed", epoch=self.epoch)
                    self._report(Role.LEADER, self.epoch)
                self._changed.wait(1.0)
        finally:
            self._report(Role.FOLLOWER, None)
            if self._stopping.is_set():
                log.info("leadership released", epoch=self.epoch)
