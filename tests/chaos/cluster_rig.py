"""The chaos rig on a Redis Cluster: 3 masters + 3 replicas, 16 partitions, its faults.

:class:`ChaosRedisCluster` is the product's local cluster (``app/ops/cluster.py``)
whose nodes keep their AOF with ``appendfsync always``, as the single Redis of the
other chaos scenarios does, and can be killed, restarted and frozen.
:class:`ClusterChaosEnv` is :class:`~tests.chaos.rig.ChaosEnv` on it: the processes
get ``EAT_PARTITIONS=16`` and ``EAT_REDIS_CLUSTER=true``, and the Redis-side views
(drained, pending_of, stored epochs) read every partition on whichever master serves
it now. :class:`ClusterFaults` adds what only a cluster has: a master killed (its
replica promoted after about the node timeout plus an election) and a reshard of a
partition's slot, done step by step as ``redis-cli --cluster reshard`` does.

The slot map is read from the nodes themselves (``CLUSTER NODES`` of a live node),
never from a client's cache, since the faults are what change it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from redis.crc import key_slot

from app.ops.cluster import ClusterNode, RedisCluster, redis_command
from app.store.codec import uuid_key, uuid_text
from app.store.keys import CONSUMER_GROUP, Keyspace, keyspaces, partition_of
from tests.chaos.checker import Report, Timeline, analyze
from tests.chaos.load import LoadGenerator, Post
from tests.chaos.rig import ChaosEnv, Faults
from tests.servers import ZooKeeperEnsemble, _Breakable
from tests.wait import wait_until

PARTITIONS = 16
NODE_TIMEOUT_MS = 1000  # cluster-node-timeout: a master silent this long is failed over


class ChaosClusterNode(_Breakable, ClusterNode):
    """A cluster node that fsyncs every write (``appendfsync always``) and can be
    killed, restarted on its port and data (it finds its cluster in ``nodes.conf``),
    frozen and thawed."""

    def _command(self) -> list[str]:
        return [*super()._command(), "--appendfsync", "always"]  # the last one counts

    def freeze(self) -> None:
        assert self.pid is not None
        os.kill(self.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        if self.pid is not None:
            os.kill(self.pid, signal.SIGCONT)


class ChaosRedisCluster(RedisCluster):
    node_class = ChaosClusterNode
    nodes: list[ChaosClusterNode]  # type: ignore[assignment]

    def node(self, port: int) -> ChaosClusterNode:
        return next(n for n in self.nodes if n.port == port)

    def topology(self) -> list[NodeView]:
        """The cluster as a live node sees it (empty if none answers)."""
        for node in self.nodes:
            if node.running:
                text = redis_command(node.port, "CLUSTER", "NODES")
                if text:
                    return [NodeView.parse(line) for line in text.splitlines() if line.strip()]
        return []

    def master_of_slot(self, slot: int) -> NodeView | None:
        for view in self.topology():
            if view.is_master and not view.failed and view.serves(slot):
                return view
        return None

    def replica_of(self, master: NodeView) -> NodeView | None:
        return next((v for v in self.topology() if v.master_id == master.id and not v.failed), None)

    def live_masters(self) -> list[NodeView]:
        return [v for v in self.topology() if v.is_master and not v.failed and v.slots]

    def replicas_in_sync(self) -> bool:
        """Every master has one replica whose link is up, and every node says ok."""
        links = 0
        for node in self.nodes:
            if not node.running:
                return False
            info = redis_command(node.port, "INFO", "replication")
            if "role:master" in info and "connected_slaves:1" not in info:
                return False
            links += "master_link_status:up" in info
            if node.info.get("cluster_state") != "ok":
                return False
        return links == self.replicas * self.masters

    def wait_replicas_in_sync(self, within: float = 30.0) -> None:
        wait_until(self.replicas_in_sync, "every master with its replica in sync", within)


@dataclass(frozen=True)
class NodeView:
    """One line of ``CLUSTER NODES``."""

    id: str
    port: int
    flags: frozenset[str]
    master_id: str | None
    slots: tuple[tuple[int, int], ...]

    @classmethod
    def parse(cls, line: str) -> NodeView:
        fields = line.split()
        address = fields[1].split("@", 1)[0]
        slots: list[tuple[int, int]] = []
        for item in fields[8:]:
            if item.startswith("["):  # a slot being migrated or imported
                continue
            low, _, high = item.partition("-")
            slots.append((int(low), int(high or low)))
        return cls(
            id=fields[0],
            port=int(address.rsplit(":", 1)[1]),
            flags=frozenset(fields[2].split(",")),
            master_id=None if fields[3] == "-" else fields[3],
            slots=tuple(slots),
        )

    @property
    def is_master(self) -> bool:
        return "master" in self.flags

    @property
    def failed(self) -> bool:
        return bool(self.flags & {"fail", "fail?", "noaddr", "handshake"})

    def serves(self, slot: int) -> bool:
        return any(low <= slot <= high for low, high in self.slots)


class Loads:
    """Several loads (a load generator, bulk posts) seen as one by settle and analyze."""

    def __init__(self, *loads: Any) -> None:
        self.loads = loads

    @property
    def done(self) -> bool:
        return all(load.done for load in self.loads)

    @property
    def duration(self) -> float:
        return max(load.duration for load in self.loads)

    @property
    def give_up_after(self) -> float:
        return max(load.give_up_after for load in self.loads)

    def snapshot(self) -> list[Post]:
        return [post for load in self.loads for post in load.snapshot()]

    def accepted(self) -> list[Post]:
        return [post for post in self.snapshot() if post.accepted]


class Posted:
    """Messages posted at once through the bulk endpoint, as :class:`Post` records."""

    duration = 0.0
    give_up_after = 0.0
    done = True

    def __init__(self, posts: Sequence[Post]) -> None:
        self.posts = list(posts)

    def snapshot(self) -> list[Post]:
        return list(self.posts)


class ClusterChaosEnv(ChaosEnv):
    """:class:`ChaosEnv` on a Redis Cluster with ``partitions`` partitions."""

    def __init__(
        self,
        redis_cluster: ChaosRedisCluster,
        ensemble: ZooKeeperEnsemble,
        prefix: str,
        workdir: Path,
        timeline: Timeline,
        partitions: int = PARTITIONS,
    ) -> None:
        # No single Redis: the base class's constructor would open one; its attributes
        # are set here instead, and every view that reads Redis is replaced below.
        self.redis_server = None  # type: ignore[assignment]
        self.redis_cluster = redis_cluster
        self.ensemble = ensemble
        self.prefix = prefix
        self.keys = Keyspace(prefix)
        self.partitions = partitions
        self.keyspaces = keyspaces(prefix, partitions)
        self.workdir = workdir
        self.timeline = timeline
        self.zk_proxies = {}
        self.redis_proxies = {}
        self.cluster = None
        self.redis = redis.RedisCluster.from_url(  # type: ignore[assignment]
            redis_cluster.url, socket_timeout=5.0, socket_connect_timeout=1.0
        )
        self.created = time.time()
        self.loads = []
        # The legacy lists in one slot of this test's own, so the bridge runs as it would.
        tag = "{" + prefix + "-legacy}"
        self.cluster_env = {
            "EAT_PARTITIONS": str(partitions),
            "EAT_REDIS_CLUSTER": "true",
            "EAT_LEGACY_QUEUE": f"{tag}Queue",
            "EAT_LEGACY_DELAYED": f"{tag}QueueDelayed",
            "EAT_LEGACY_IN_FLIGHT": f"{tag}QueueDead",
        }

    @property
    def redis_url(self) -> str:
        return self.redis_cluster.url

    def start_cluster(self, *, env: Mapping[str, str] | None = None, **options: Any):  # type: ignore[override]
        if options.get("redis_proxied"):
            raise ValueError("a proxy in front of one cluster node would hide the others")
        return super().start_cluster(env={**self.cluster_env, **(env or {})}, **options)

    # -- partitions and the slot map --------------------------------------------------

    def partition_of(self, uuid: str) -> int:
        return partition_of(uuid_key(uuid), self.partitions)

    def slot_of(self, partition: int) -> int:
        return key_slot(self.keyspaces[partition].stream.encode())

    def partitions_of_master(self, port: int) -> list[int]:
        """The partitions whose slot the master on ``port`` serves now."""
        views = {v.port: v for v in self.redis_cluster.topology()}
        master = views[port]
        return [p for p in range(self.partitions) if master.serves(self.slot_of(p))]

    def master_of(self, partition: int) -> NodeView:
        view = self.redis_cluster.master_of_slot(self.slot_of(partition))
        assert view is not None, f"no master serves partition {partition}"
        return view

    # -- Redis-side views, every partition ----------------------------------------------

    def drained(self) -> bool:
        try:
            for keys in self.keyspaces:
                if self.redis.zcard(keys.delayed) or self.redis.xlen(keys.stream):
                    return False
                with contextlib.suppress(redis.ResponseError):  # no group yet
                    if self.redis.xpending(keys.stream, CONSUMER_GROUP)["pending"]:
                        return False
        except redis.RedisError:  # a master failing over, a slot moving
            return False
        return True

    def pending_of(self, consumer: str) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        for keys in self.keyspaces:
            try:
                rows = self.redis.xpending_range(
                    keys.stream, CONSUMER_GROUP, min="-", max="+", count=10_000,
                    consumername=consumer,
                )  # fmt: skip
            except redis.ResponseError:
                continue
            for row in rows:
                entry_id = row["message_id"]
                entries = self.redis.xrange(keys.stream, entry_id, entry_id)
                uuid = uuid_text(entries[0][1][b"u"]) if entries else ""
                out.append((entry_id.decode() if isinstance(entry_id, bytes) else entry_id, uuid))
        return out

    def stored_epochs(self) -> dict[int, int | None]:
        values = {p: self.redis.get(keys.epoch) for p, keys in enumerate(self.keyspaces)}
        return {p: None if v is None else int(v) for p, v in values.items()}

    def stored_epoch(self) -> int | None:
        """The oldest epoch stored in any partition (each partition fences by its own)."""
        epochs = [e for e in self.stored_epochs().values() if e is not None]
        return min(epochs) if epochs else None

    def analyze(  # type: ignore[override]
        self,
        load: LoadGenerator | Loads,
        start: float,
        exclude: set[str] | None = None,
        accounted: Mapping[str, str] | None = None,
    ) -> Report:
        assert self.cluster is not None
        return analyze(
            self.cluster,
            load.snapshot(),
            self.timeline,
            start=start,
            end=time.time(),
            exclude=exclude,
            accounted=accounted,
            partition_of=self.partition_of,
        )


@dataclass
class Failover:
    """A master killed: when, which partitions it served, how long until served again."""

    port: int
    partitions: list[int]
    killed_at: float
    promoted_at: float
    promoted_port: int
    replica_lag: float

    @property
    def took(self) -> float:
        return self.promoted_at - self.killed_at


class ClusterFaults(Faults):
    """Fault injectors for a Redis Cluster, on top of the process faults."""

    env: ClusterChaosEnv

    def __init__(self, env: ClusterChaosEnv) -> None:
        super().__init__(env)
        self.servers = env.redis_cluster
        self._frozen: list[ChaosClusterNode] = []

    def kill_master(self, port: int, *, replica_lag: float = 0.0, within: float = 15.0) -> Failover:
        """kill -9 the master on ``port`` and wait until its replica serves its slots.

        ``replica_lag`` > 0: the replication link is cut that long before the kill, so
        the replica misses what the master answered meanwhile, as a network cut or a
        replica falling behind would make it: what asynchronous replication loses in a
        failover is then large enough to count. (A frozen replica alone would miss
        nothing: what the master sent waits in the replica's socket buffer on this
        machine.) The replica is frozen (SIGSTOP, so it cannot reconnect), the master
        closes its link (CLIENT KILL TYPE replica: what it writes from then on stays in
        its backlog), and the replica is thawed right after the master's kill.
        """
        env, servers = self.env, self.servers
        partitions = env.partitions_of_master(port)
        views = {v.port: v for v in servers.topology()}
        replica_view = servers.replica_of(views[port])
        assert replica_view is not None, f"the master on {port} has no replica"
        replica = servers.node(replica_view.port)
        if replica_lag > 0:
            replica.freeze()
            self._frozen.append(replica)
            with redis.Redis(port=port, socket_timeout=5) as master:
                master.client_kill_filter(_type="replica")
            self.timeline.record("partition", f"redis-{replica.port}", role="replica")
            time.sleep(replica_lag)
        servers.node(port).kill()
        killed = self.timeline.record("kill", f"redis-{port}", partitions=partitions)
        if replica_lag > 0:
            replica.thaw()
            self._frozen.remove(replica)
            self.timeline.record("heal", f"redis-{replica.port}", role="replica")

        def promoted() -> NodeView | None:
            view = servers.master_of_slot(env.slot_of(partitions[0]))
            return view if view is not None and view.port != port else None

        new = wait_until(promoted, f"the replica of {port} to be promoted", within, interval=0.02)
        wait_until(
            lambda: all(n.info.get("cluster_state") == "ok" for n in servers.nodes if n.running),
            "every live node to say cluster_state:ok",
            within,
            interval=0.02,
        )
        promoted_at = time.time()
        self.timeline.record("failover", f"redis-{new.port}", partitions=partitions)
        return Failover(port, partitions, killed.at, promoted_at, new.port, replica_lag)

    def restart_node(self, port: int, within: float = 30.0) -> None:
        """Start a killed node again on its data: it rejoins as the replica of the master
        promoted in its place (a full sync drops what its AOF had that the new one lacks)."""
        self.servers.node(port).restart()
        self.timeline.record("start", f"redis-{port}")
        self.servers.wait_replicas_in_sync(within)

    def reshard(self, partition: int, to_port: int, *, step: float = 0.05) -> dict[str, Any]:
        """Move partition ``partition``'s slot, with its keys, to the master on ``to_port``
        under load, as ``redis-cli --cluster reshard`` does: the target IMPORTING, the
        source MIGRATING, the keys moved with MIGRATE (one key per call, ``step`` s apart, so
        that for a while some of the partition's keys are on each side: ASK and TRYAGAIN),
        then SETSLOT NODE on the target, the source and every other master."""
        env = self.env
        slot = env.slot_of(partition)
        source = env.master_of(partition)
        target = next(v for v in self.servers.live_masters() if v.port == to_port)
        assert source.port != target.port
        src = redis.Redis(port=source.port, socket_timeout=10)
        dst = redis.Redis(port=target.port, socket_timeout=10)
        moved: list[bytes] = []
        try:
            self.timeline.record("reshard", f"slot {slot}", partition=partition, to=to_port)
            dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source.id)
            src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target.id)
            while keys := src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 1):
                src.execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *keys)
                moved += keys
                time.sleep(step)
            dst.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target.id)
            src.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target.id)
            for other in self.servers.live_masters():
                if other.port not in (source.port, target.port):
                    with redis.Redis(port=other.port, socket_timeout=5) as client:
                        client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target.id)
        finally:
            src.close()
            dst.close()
        self.timeline.record("resharded", f"slot {slot}", partition=partition, to=to_port)
        return {"slot": slot, "from": source.port, "to": target.port, "keys": len(moved)}

    def thaw_all(self) -> None:
        for node in self._frozen:
            node.thaw()
        self._frozen.clear()


@contextlib.contextmanager
def cluster_chaos_env(
    redis_cluster: ChaosRedisCluster,
    ensemble: ZooKeeperEnsemble,
    prefix: str,
    workdir: Path,
    timeline: Timeline,
) -> Iterator[ClusterChaosEnv]:
    env = ClusterChaosEnv(redis_cluster, ensemble, prefix, workdir, timeline)
    try:
        yield env
    finally:
        env.close()
