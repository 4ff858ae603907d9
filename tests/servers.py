"""Servers as the tests use them: the product's, plus crash, restart and an ensemble.

``app/ops/servers.py`` holds what ``echo-at-time up`` needs (start a Redis and a
standalone ZooKeeper, wait until they serve, stop them). The tests also break
servers and build a ZooKeeper ensemble; that tooling lives here, on top of the
product's classes, so the two never drift apart.

Facts the ensemble relies on (ENVIRONMENT.md): ``server.N=host:peer:election``
lines and ``<dataDir>/myid`` per node; three nodes serve ~1.2 s after spawn;
losing the ensemble's leader re-elects in ~0.4 s.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from app.ops import servers
from app.ops.servers import (
    LOCALHOST,
    MissingBinaryError,
    ServerStartError,
    free_port,
    redis_answers_ping,
    zookeeper_mode,
)

__all__ = [
    "MissingBinaryError",
    "RedisServer",
    "ServerStartError",
    "ZooKeeperEnsemble",
    "ZooKeeperPeer",
    "ZooKeeperServer",
    "free_port",
    "redis_answers_ping",
    "zookeeper_mode",
]


class _Breakable(servers.Server):
    """Crash and restart, for tests that prove what survives them."""

    @property
    def pid(self) -> int | None:
        process = self.process
        return process.pid if process is not None and process.running else None

    @property
    def last_exit_code(self) -> int | None:
        process = self.process
        return None if process is None else process.poll()

    def kill(self) -> int | None:
        """SIGKILL and reap, to simulate a crash. Returns the exit code."""
        process = self.process
        return None if process is None else process.kill()

    def restart(self, timeout: float | None = None) -> Self:
        """Start again on the same port with the same data (stopping it first if running)."""
        if self.running:
            self.stop()
        return self.start(timeout)


class RedisServer(_Breakable, servers.RedisServer):
    """The product's Redis, with another ``appendfsync`` (the chaos suite's ``always``)
    or extra command-line options (a password)."""

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        appendfsync: str = "everysec",
        extra_args: Sequence[str] = (),
        *,
        binary: Path | str | None = None,
    ) -> None:
        if appendfsync not in ("always", "everysec", "no"):
            raise ValueError(f"appendfsync must be always, everysec or no, not {appendfsync!r}")
        super().__init__(data_dir, port, binary=binary)
        self.appendfsync = appendfsync
        self.extra_args = tuple(extra_args)

    def _command(self) -> list[str]:
        # redis-server takes the last of a repeated option.
        return [*super()._command(), "--appendfsync", self.appendfsync, *self.extra_args]


@dataclass(frozen=True)
class ZooKeeperPeer:
    """One member of an ensemble: ``server.<server_id>=<host>:<peer_port>:<election_port>``."""

    server_id: int
    peer_port: int
    election_port: int
    host: str = LOCALHOST

    def cfg_line(self) -> str:
        return f"server.{self.server_id}={self.host}:{self.peer_port}:{self.election_port}"


class ZooKeeperServer(_Breakable, servers.ZooKeeperServer):
    """The product's ZooKeeper, standalone or, given ``peers`` and ``server_id``, one
    node of an ensemble."""

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        tick_time_ms: int = 500,
        *,
        peers: Sequence[ZooKeeperPeer] = (),
        server_id: int | None = None,
        java: Path | str | None = None,
        zookeeper_jar: Path | str | None = None,
        slf4j_jar: Path | str | None = None,
    ) -> None:
        ids = [peer.server_id for peer in peers]
        if peers and server_id not in ids:
            raise ValueError(f"server_id {server_id!r} must be one of the peers' ids {ids}")
        super().__init__(
            data_dir,
            port,
            tick_time_ms,
            java=java,
            zookeeper_jar=zookeeper_jar,
            slf4j_jar=slf4j_jar,
        )
        self.peers = tuple(peers)
        self.server_id = server_id

    @property
    def mode(self) -> str | None:
        """``srvr``'s Mode (standalone, leader, follower), None while not serving."""
        return zookeeper_mode(LOCALHOST, self.port)

    def _cfg_lines(self) -> list[str]:
        return [*super()._cfg_lines(), *(peer.cfg_line() for peer in self.peers)]

    def _prepare(self) -> None:
        super()._prepare()
        if self.peers:
            (self.znode_dir / "myid").write_text(f"{self.server_id}\n")


def _distinct_free_ports(count: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


class ZooKeeperEnsemble:
    """``size`` ZooKeeper nodes on 127.0.0.1, each in ``<base_dir>/zk<N>``."""

    def __init__(self, base_dir: Path, size: int = 3, tick_time_ms: int = 500) -> None:
        if size < 1:
            raise ValueError("an ensemble needs at least one node")
        self.base_dir = Path(base_dir).absolute()
        ports = _distinct_free_ports(3 * size)
        peers = [
            ZooKeeperPeer(server_id=n, peer_port=ports[3 * i + 1], election_port=ports[3 * i + 2])
            for i, n in enumerate(range(1, size + 1))
        ]
        self.nodes = [
            ZooKeeperServer(
                self.base_dir / f"zk{peer.server_id}",
                port=ports[3 * i],
                tick_time_ms=tick_time_ms,
                peers=peers,
                server_id=peer.server_id,
            )
            for i, peer in enumerate(peers)
        ]

    @property
    def hosts(self) -> str:
        return ",".join(node.hosts for node in self.nodes)

    def start(self, timeout: float = 30.0) -> Self:
        """Spawn every node, then wait until each answers ``srvr`` as leader or follower."""
        deadline = time.monotonic() + timeout
        try:
            for node in self.nodes:
                node.spawn()
            for node in self.nodes:
                node.wait_until_ready(max(0.0, deadline - time.monotonic()))
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 10.0) -> None:
        for node in self.nodes:  # signal all first: they shut down in parallel
            if node.process is not None:
                node.process.terminate()
        for node in self.nodes:
            node.stop(timeout)

    def leader(self) -> ZooKeeperServer | None:
        for node in self.nodes:
            if node.running and node.mode == "leader":
                return node
        return None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
