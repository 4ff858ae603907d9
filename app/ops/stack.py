"""``echo-at-time up``: the whole service on one machine, for trying it and for development.

Starts its own Redis (AOF on) and ZooKeeper as child processes when
``EAT_REDIS_URL`` / ``EAT_ZK_HOSTS`` are not set, keeping their data under
``--data-dir`` so a restart keeps every message; with ``--cluster``, a local
3-master Redis Cluster instead of one Redis, and the processes partition the
keyspace over it (``--partitions``, 16 by default); then the API, the schedulers
and the workers as child processes under a :class:`~app.ops.supervisor.ProcessSupervisor`,
which restarts any that exits, with a backoff. Ctrl-C (or SIGTERM) stops the
processes first, gracefully, then the servers.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading
from contextlib import ExitStack
from pathlib import Path

from app.log import get_logger
from app.ops.cluster import RedisCluster, cluster_ports
from app.ops.servers import (
    MissingBinaryError,
    RedisServer,
    ServerStartError,
    ZooKeeperServer,
)
from app.ops.supervisor import ProcessSupervisor, Program

log = get_logger("stack")

GRACE_SECONDS = 20.0
CLUSTER_PORTS = (7000, 7001, 7002)  # the conventional local cluster, when free


def _port_if_free(port: int) -> int | None:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return None
    return port


# The legacy list names `up --cluster` gives the processes unless set: the usual names
# under one hash tag, which the old producers must then use too.
LEGACY_CLUSTER_LISTS = {
    "EAT_LEGACY_QUEUE": "{legacy}Queue",
    "EAT_LEGACY_DELAYED": "{legacy}QueueDelayed",
    "EAT_LEGACY_IN_FLIGHT": "{legacy}QueueDead",
}


def _local_cluster(data_dir: Path) -> RedisCluster:
    """The local 3-master cluster, on the ports it had before (its nodes.conf names them)."""
    base = data_dir / "redis-cluster"
    recorded = base / "ports"
    if recorded.is_file():
        ports = [int(p) for p in recorded.read_text().split()]
    elif all(_port_if_free(p) and _port_if_free(p + 10000) for p in CLUSTER_PORTS):
        ports = list(CLUSTER_PORTS)
    else:
        ports = cluster_ports(3)
    # Redis' own default node timeout, not the tests' short one: without replicas there
    # is no failover to hasten, and a laptop that sleeps or a loaded machine would see
    # its masters marked failed.
    cluster = RedisCluster(base, masters=3, ports=ports, node_timeout_ms=15_000)
    base.mkdir(parents=True, exist_ok=True)
    recorded.write_text(" ".join(str(p) for p in ports) + "\n")
    return cluster


def programs(args: argparse.Namespace) -> list[Program]:
    base = [sys.executable, "-m", "app"]
    found = [Program("api", [*base, "api", "--host", args.host, "--port", str(args.port)])]
    found += [
        Program(f"scheduler-{i}", [*base, "scheduler"]) for i in range(1, args.schedulers + 1)
    ]
    found += [
        Program(
            f"worker-{i}",
            [*base, "worker", "--consumer-name", f"{socket.gethostname()}-worker-{i}"],
        )
        for i in range(1, args.workers + 1)
    ]
    return found


def run_stack(args: argparse.Namespace) -> int:
    data_dir = Path(args.data_dir).resolve()
    env = dict(os.environ)
    stop = threading.Event()

    def request_stop(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)

    # The servers are stopped last: they outlive every process that uses them.
    with ExitStack() as servers:
        try:
            if not env.get("EAT_REDIS_URL") and args.cluster:
                cluster = servers.enter_context(_local_cluster(data_dir))
                env["EAT_REDIS_URL"] = cluster.url
                env["EAT_REDIS_CLUSTER"] = "true"
                env.setdefault("EAT_PARTITIONS", str(args.partitions))
                # The bridge moves items between the legacy lists in one command, so on a
                # cluster they need one hash tag (docs/legacy.md#redis-cluster).
                for name, value in LEGACY_CLUSTER_LISTS.items():
                    env.setdefault(name, value)
                log.info(
                    "redis cluster started", ports=cluster.ports, partitions=env["EAT_PARTITIONS"]
                )
            elif not env.get("EAT_REDIS_URL"):
                redis = RedisServer(data_dir / "redis", port=_port_if_free(6379))
                servers.enter_context(redis)
                env["EAT_REDIS_URL"] = redis.url
                log.info("redis started", url=redis.url, data_dir=str(redis.data_dir))
            if not env.get("EAT_ZK_HOSTS"):
                zookeeper = ZooKeeperServer(data_dir / "zookeeper", port=_port_if_free(2181))
                servers.enter_context(zookeeper)
                env["EAT_ZK_HOSTS"] = zookeeper.hosts
                log.info("zookeeper started", hosts=zookeeper.hosts)
        except MissingBinaryError as exc:
            print(f"echo-at-time up: {exc}", file=sys.stderr)
            return 2
        except ServerStartError as exc:
            print(f"echo-at-time up: {exc}", file=sys.stderr)
            return 1
        if stop.is_set():  # Ctrl-C while the servers started
            return 0

        supervisor = ProcessSupervisor(programs(args), env, grace=GRACE_SECONDS)
        try:
            supervisor.start()
            log.info(
                "stack ready",
                api=f"http://{args.host}:{args.port}/api/v1/save-message",
                redis=env["EAT_REDIS_URL"].split("@")[-1],
                zookeeper=env["EAT_ZK_HOSTS"],
            )
            supervisor.run(stop)
        finally:
            supervisor.stop()
    log.info("stack stopped")
    return 0
