"""app/ops/cluster.py: a local Redis Cluster on loopback, as `up --cluster` and the
cluster tests start it."""

from __future__ import annotations

from pathlib import Path

import redis
from redis.cluster import RedisCluster as ClusterClient

from app.ops.cluster import SLOTS, RedisCluster, cluster_info, cluster_ports, redis_command
from tests.wait import wait_until


def test_cluster_ports_leave_room_for_each_bus_port() -> None:
    ports = cluster_ports(6)
    assert len(set(ports)) == 6
    assert all(port + 10000 <= 65535 for port in ports)


def test_three_masters_serve_every_slot_and_keep_their_data_across_a_restart(
    tmp_path: Path,
) -> None:
    cluster = RedisCluster(tmp_path, masters=3).start()
    try:
        for node in cluster.nodes:
            info = cluster_info(node.port)
            assert info["cluster_state"] == "ok"
            assert info["cluster_slots_assigned"] == str(SLOTS)
            assert info["cluster_size"] == "3"
        client = ClusterClient.from_url(cluster.url)
        tags = [f"{{t:{i}}}:k" for i in range(16)]
        for tag in tags:
            client.set(tag, tag)
        owners = {client.get_node_from_key(tag).port for tag in tags}
        assert owners == set(cluster.ports), "16 hash tags landed on every master"
        client.close()
    finally:
        cluster.stop()

    again = RedisCluster(tmp_path, masters=3, ports=cluster.ports).start()
    try:
        client = ClusterClient.from_url(again.url)
        assert [client.get(tag) for tag in tags] == [tag.encode() for tag in tags]
        client.close()
    finally:
        again.stop()


def test_with_replicas_each_master_has_one(tmp_path: Path) -> None:
    cluster = RedisCluster(tmp_path, masters=3, replicas=1, node_timeout_ms=1000).start()
    try:
        roles = []
        for node in cluster.nodes:
            with redis.Redis(port=node.port) as client:
                roles.append(client.info("replication")["role"])
        assert sorted(roles) == ["master"] * 3 + ["slave"] * 3
    finally:
        cluster.stop()


def test_with_one_master_down_and_no_replica_the_other_masters_keep_serving_their_slots(
    tmp_path: Path,
) -> None:
    """cluster-require-full-coverage no: partitions are independent, so a master that
    fails does not take the others' partitions with it (Redis' default refuses every
    slot, CLUSTERDOWN, once the cluster marks a master failed)."""
    cluster = RedisCluster(tmp_path, masters=3, node_timeout_ms=500).start()
    try:
        seed = ClusterClient(host="127.0.0.1", port=cluster.nodes[0].port)
        victim = cluster.nodes[1]
        live_key = next(
            f"k{i}"
            for i in range(10_000)
            if seed.get_node_from_key(f"k{i}").port == cluster.nodes[2].port
        )
        victim.process.kill()
        # Once the others have marked it failed (node timeout, then a majority agreeing).
        wait_until(
            lambda: (
                "fail"
                in redis_command(cluster.nodes[2].port, "CLUSTER", "NODES")
                .split(f":{victim.port}@", 1)[1]
                .split()[1]
                .split(",")
            ),
            "the live masters to mark the dead one failed",
            10,
        )
        with redis.Redis(port=cluster.nodes[2].port) as live:
            assert live.set(live_key, "still served")
            assert live.get(live_key) == b"still served"
        seed.close()
    finally:
        cluster.stop()
