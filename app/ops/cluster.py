"""A local Redis Cluster: ``echo-at-time up --cluster``, and the tests' cluster fixtures.

``masters`` servers (plus ``replicas`` per master) with ``--cluster-enabled
yes`` on 127.0.0.1, each with its data, log and ``nodes.conf`` in a directory
of its own. The first start creates the cluster with ``redis-cli --cluster
create``; a later start on the same directories finds it again (each node
remembers the cluster in its ``nodes.conf``), so a restarted local cluster keeps
every message, as a restarted single Redis does.

Facts this relies on (ENVIRONMENT.md): the cluster serves about 2 s after
``--cluster create``; every node must report ``cluster_state:ok`` before a
client can count on any slot; ``redis-cli`` comes with Debian's
``redis-tools``. Standard library only.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Self

from app.ops.servers import (
    LOCALHOST,
    MissingBinaryError,
    RedisServer,
    ServerStartError,
    free_port,
)

REDIS_CLI_BIN = Path("/usr/bin/redis-cli")
SLOTS = 16384
_POLL = 0.05


def redis_command(port: int, *args: str, host: str = LOCALHOST, timeout: float = 1.0) -> str:
    """One command to a Redis, its reply as text (a bulk or simple string); "" on any error.

    Enough for ``CLUSTER INFO`` and ``CLUSTER NODES`` without a client library.
    """
    request = f"*{len(args)}\r\n" + "".join(f"${len(a.encode())}\r\n{a}\r\n" for a in args)
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(request.encode())
            reply = b""
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                reply += chunk
                if _complete(reply):
                    break
    except OSError:
        return ""
    if reply.startswith(b"+"):
        return reply[1:].split(b"\r\n", 1)[0].decode()
    if reply.startswith(b"$"):
        header, _, rest = reply.partition(b"\r\n")
        size = int(header[1:])
        return rest[:size].decode(errors="replace") if size >= 0 else ""
    return ""


def _complete(reply: bytes) -> bool:
    if reply[:1] in (b"+", b"-", b":"):
        return reply.endswith(b"\r\n")
    if reply[:1] == b"$":
        header, sep, rest = reply.partition(b"\r\n")
        return bool(sep) and (int(header[1:]) < 0 or len(rest) >= int(header[1:]) + 2)
    return False


def cluster_info(port: int) -> dict[str, str]:
    """``CLUSTER INFO`` of one node as a dict (empty while it does not answer)."""
    pairs = (line.split(":", 1) for line in redis_command(port, "CLUSTER", "INFO").splitlines())
    return {p[0]: p[1].strip() for p in pairs if len(p) == 2}


class ClusterNode(RedisServer):
    """The product's Redis (AOF on) with cluster mode: ``nodes.conf`` in its data dir."""

    name = "redis-cluster-node"

    def __init__(
        self, data_dir: Path, port: int | None = None, *, node_timeout_ms: int = 2000
    ) -> None:
        super().__init__(data_dir, port)
        self.node_timeout_ms = node_timeout_ms

    def _command(self) -> list[str]:
        return [
            *super()._command(),
            "--cluster-enabled", "yes",
            "--cluster-config-file", str(self.data_dir / "nodes.conf"),
            "--cluster-node-timeout", str(self.node_timeout_ms),
            # Partitions are independent: while one master fails over, the others keep
            # serving theirs. Redis' default (yes) refuses every slot (CLUSTERDOWN) from
            # the moment a master is marked failed until its replica is promoted.
            "--cluster-require-full-coverage", "no",
        ]  # fmt: skip

    @property
    def info(self) -> dict[str, str]:
        return cluster_info(self.port)


class RedisCluster:
    """A local Redis Cluster of ``masters`` masters and ``replicas`` replicas of each.

    :param base_dir: each node keeps its data in ``<base_dir>/node-<port>``.
    :param ports: the nodes' ports (masters first), for a cluster that must come back on
        the same addresses (its ``nodes.conf`` records them); free ports when None.
    :param node_timeout_ms: ``cluster-node-timeout``: how long a master may be silent
        before its replica is promoted.
    """

    node_class: type[ClusterNode] = ClusterNode

    def __init__(
        self,
        base_dir: Path,
        masters: int = 3,
        replicas: int = 0,
        *,
        ports: Sequence[int] | None = None,
        node_timeout_ms: int = 2000,
    ) -> None:
        if masters < 3:
            raise ValueError("a Redis Cluster needs at least 3 masters")
        count = masters * (1 + replicas)
        if ports is not None and len(ports) != count:
            raise ValueError(f"{count} ports needed, got {len(ports)}")
        self.base_dir = Path(base_dir).absolute()
        self.masters = masters
        self.replicas = replicas
        chosen = list(ports) if ports is not None else cluster_ports(count)
        self.nodes = [
            self.node_class(self.base_dir / f"node-{port}", port, node_timeout_ms=node_timeout_ms)
            for port in chosen
        ]

    @property
    def url(self) -> str:
        """A seed for clients: the first node (the client learns the others from it)."""
        return self.nodes[0].url

    @property
    def ports(self) -> list[int]:
        return [node.port for node in self.nodes]

    def start(self, timeout: float = 30.0) -> Self:
        """Start every node; create the cluster unless the nodes already form one; wait
        until every node says ``cluster_state:ok``."""
        deadline = time.monotonic() + timeout
        try:
            for node in self.nodes:
                node.spawn()
            for node in self.nodes:
                node.wait_until_ready(max(0.1, deadline - time.monotonic()))
            if not self._created():
                self._create(max(1.0, deadline - time.monotonic()))
            self.wait_until_ok(max(0.1, deadline - time.monotonic()))
        except BaseException:
            self.stop()
            raise
        return self

    def wait_until_ok(self, timeout: float = 30.0) -> None:
        """Until every running node says ``cluster_state:ok`` with every slot assigned."""
        deadline = time.monotonic() + timeout
        while True:
            states = {n.port: n.info for n in self.nodes if n.running}
            if states and all(
                info.get("cluster_state") == "ok"
                and info.get("cluster_slots_assigned") == str(SLOTS)
                for info in states.values()
            ):
                return
            if time.monotonic() >= deadline:
                seen = {port: info.get("cluster_state", "?") for port, info in states.items()}
                raise ServerStartError(
                    f"Redis Cluster not ok within {timeout:g} s: {seen}", exited=False
                )
            time.sleep(_POLL)

    def stop(self, timeout: float = 10.0) -> None:
        for node in self.nodes:
            node.stop(timeout)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _created(self) -> bool:
        """The nodes already form a cluster (a restart of an existing local cluster)."""
        return all(
            node.info.get("cluster_known_nodes") == str(len(self.nodes)) for node in self.nodes
        )

    def _create(self, timeout: float) -> None:
        cli = _redis_cli()
        command = [
            cli,
            "--cluster",
            "create",
            *(f"{LOCALHOST}:{node.port}" for node in self.nodes),
            "--cluster-replicas",
            str(self.replicas),
            "--cluster-yes",
        ]
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, check=False
        )
        if result.returncode != 0:
            raise ServerStartError(
                f"redis-cli --cluster create failed ({result.returncode}):\n"
                + (result.stdout + result.stderr)[-4000:],
                exited=True,
            )


def _redis_cli() -> str:
    if REDIS_CLI_BIN.is_file():
        return str(REDIS_CLI_BIN)
    found = shutil.which("redis-cli")
    if found is None:
        raise MissingBinaryError(
            f"redis-cli ({REDIS_CLI_BIN}) not found; install the Debian package 'redis-tools' "
            "(apt-get install -y --no-install-recommends redis-tools)"
        )
    return found


BUS_OFFSET = 10000  # a node's cluster bus listens on its port + 10000


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((LOCALHOST, port))
        except OSError:
            return False
    return True


def cluster_ports(count: int) -> list[int]:
    """``count`` distinct ports, each free with its bus port (port + 10000) free too."""
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port + BUS_OFFSET > 65535 or port in ports or not _port_free(port + BUS_OFFSET):
            continue
        ports.append(port)
    return ports
