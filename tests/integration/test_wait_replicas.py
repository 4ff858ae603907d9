"""EAT_WAIT_REPLICAS=1: the api answers a change only once WAIT confirmed a replica has it.

On one Redis with one replica (a second redis-server, ``--replicaof``) and on a
3-master + 3-replica Redis Cluster with 16 partitions. A healthy replica: the change
answers 2xx, and the replica holds it the moment the answer arrives (WAIT counted it).
The replica paused (SIGSTOP): 503 "not replicated in time" within the timeout, the
master keeps the change, and once the replica runs again a retry with the same uuid
answers the duplicate.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import threading
import time
import uuid as uuidlib
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import redis.cluster

from app.http.app import create_app
from app.ops.cluster import RedisCluster
from app.settings import Settings
from app.store.codec import uuid_key
from app.store.keys import Keyspace, partition_of
from app.store.scripts import source
from tests.servers import RedisServer
from tests.wait import wait_until

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", "Using `httpx` with `starlette.testclient`", UserWarning)
    from starlette.testclient import TestClient

V1 = "/api/v1"
FAR = 253402300799999
WAIT_MS = 1000
NOT_REPLICATED = "not replicated in time: retry with the same uuid"


def replicated_count(client: TestClient, outcome: str) -> float:
    name = f'eat_replication_waits_total{{outcome="{outcome}"}}'
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


@contextlib.contextmanager
def paused(pid: int) -> Iterator[None]:
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def save(client: TestClient, uuid: str, run_at: int = FAR):
    return client.post(f"{V1}/save-message", json={"message": "m", "runAt": run_at, "uuid": uuid})


# --- one Redis, one replica ------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RedisServer, RedisServer]]:
    master = RedisServer(tmp_path_factory.mktemp("master")).start()
    replica = RedisServer(
        tmp_path_factory.mktemp("replica"),
        extra_args=["--replicaof", "127.0.0.1", str(master.port)],
    ).start()
    try:
        with redis.Redis(port=replica.port) as r:
            wait_until(
                lambda: r.info("replication").get("master_link_status") == "up",
                "replica in sync",
                30,
            )
        yield master, replica
    finally:
        replica.stop()
        master.stop()


@pytest.fixture
def single(pair, prefix: str) -> Iterator[tuple[redis.Redis, redis.Redis, Settings]]:
    master, replica = pair
    settings = Settings.from_env(
        {},
        redis_url=master.url,
        prefix=prefix,
        wait_replicas=1,
        wait_timeout_ms=WAIT_MS,
        max_deliveries=1,
    )
    with redis.Redis(port=master.port) as m, redis.Redis(port=replica.port) as r:
        try:
            yield m, r, settings
        finally:
            for key in m.scan_iter(match=f"*{prefix}*"):
                m.unlink(key)


def test_with_a_healthy_replica_every_change_answers_2xx_once_the_replica_has_it(
    single, pair
) -> None:
    _, r, settings = single
    ks = Keyspace(settings.prefix)
    uuids = [str(uuidlib.uuid4()) for _ in range(4)]
    with TestClient(create_app(settings)) as client:
        before = replicated_count(client, "replicated")
        assert save(client, uuids[0]).status_code == 201
        # WAIT counted the replica: it holds the record the moment the api answers.
        assert r.hexists(ks.messages, uuid_key(uuids[0]))
        bulk = [{"message": "b", "runAt": FAR, "uuid": u} for u in uuids[1:]]
        assert client.post(f"{V1}/save-messages", json=bulk).json()["accepted"] == 3
        assert all(r.hexists(ks.messages, uuid_key(u)) for u in uuids[1:])
        assert client.patch(f"{V1}/messages/{uuids[1]}", json={"runAt": FAR - 1}).status_code == 200
        assert r.zscore(ks.delayed, r.zrange(ks.delayed, 0, 0)[0]) == FAR - 1
        assert client.delete(f"{V1}/messages/{uuids[1]}").json()["state"] == "cancelled"
        assert r.zcard(ks.delayed) == 3
        assert client.delete(f"{V1}/dead").status_code == 200
        assert replicated_count(client, "replicated") - before == 5
        assert replicated_count(client, "timed_out") == 0


def test_with_the_replica_paused_the_api_answers_503_in_time_and_a_retry_is_the_duplicate(
    single, pair
) -> None:
    m, r, settings = single
    _, replica = pair
    ks = Keyspace(settings.prefix)
    uuid = str(uuidlib.uuid4())
    with TestClient(create_app(settings)) as client:
        with paused(replica.pid):
            started = time.monotonic()
            refused = save(client, uuid)
            took = time.monotonic() - started
            assert refused.status_code == 503
            assert refused.json() == {"error": NOT_REPLICATED, "field": None}
            assert WAIT_MS / 1000 - 0.05 <= took < WAIT_MS / 1000 + 1.0
            assert m.hexists(ks.messages, uuid_key(uuid)), "the master keeps the change"
            cancel = client.delete(f"{V1}/messages/{uuid}")
            assert cancel.status_code == 503 and "not replicated in time" in cancel.json()["error"]
        assert replicated_count(client, "timed_out") >= 2
        retried = save(client, uuid)
        assert retried.status_code == 200 and retried.json()["duplicate"] is True
        assert r.hexists(ks.messages, uuid_key(uuid))


def test_a_flushed_script_cache_is_reloaded_and_the_change_sent_once(single) -> None:
    m, r, settings = single
    ks = Keyspace(settings.prefix)
    with TestClient(create_app(settings)) as client:
        m.script_flush()
        uuid = str(uuidlib.uuid4())
        assert save(client, uuid).status_code == 201
        assert r.hexists(ks.messages, uuid_key(uuid))
        assert m.zcard(ks.delayed) == 1


def test_a_flushed_script_cache_with_the_replica_paused_still_answers_within_one_timeout(
    single, pair
) -> None:
    """The send that met NOSCRIPT carried a WAIT too, and it blocks (the connection's
    earlier change is unconfirmed): the resend WAITs only what is left of the timeout."""
    m, _r, settings = single
    _, replica = pair
    ks = Keyspace(settings.prefix)
    with TestClient(create_app(settings)) as client, paused(replica.pid):
        # A change the replica cannot confirm, on the connection the next one reuses.
        assert save(client, str(uuidlib.uuid4())).status_code == 503
        m.script_flush()
        accept_sha = hashlib.sha1(source("accept").encode()).hexdigest()
        assert not m.script_exists(accept_sha)[0]
        uuid = str(uuidlib.uuid4())
        started = time.monotonic()
        refused = save(client, uuid)
        took = time.monotonic() - started
        assert refused.status_code == 503 and refused.json()["error"] == NOT_REPLICATED
        assert m.script_exists(accept_sha)[0], "NOSCRIPT was met and the script loaded"
        # One timeout, with room for a loaded machine; two (the fault) would be 2 s.
        assert WAIT_MS / 1000 - 0.05 <= took < WAIT_MS / 1000 + 0.9, took
        assert m.hexists(ks.messages, uuid_key(uuid)), "the change ran once, after the load"
        assert m.zcard(ks.delayed) == 2


def test_a_connection_lost_during_wait_answers_outcome_unknown_and_nothing_is_sent_twice(
    single, pair
) -> None:
    m, _r, settings = single
    _, replica = pair
    ks = Keyspace(settings.prefix)
    uuid = str(uuidlib.uuid4())
    with TestClient(create_app(settings)) as client, paused(replica.pid):
        answer: list = []
        post = threading.Thread(target=lambda: answer.append(save(client, uuid)))
        post.start()
        wait_until(lambda: any(c.get("cmd") == "wait" for c in m.client_list()), "WAIT blocking", 5)
        m.client_kill_filter(_type="normal", skipme=True)
        post.join(10)
        assert answer[0].status_code == 503
        assert answer[0].json()["error"].startswith("outcome unknown")
        assert m.hexists(ks.messages, uuid_key(uuid))
        assert m.zcard(ks.delayed) == 1


# --- a Redis Cluster, 3 masters + 3 replicas -------------------------------------------------


@pytest.fixture(scope="module")
def replicated_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    cluster = RedisCluster(
        Path(tmp_path_factory.mktemp("cluster-3x2")), masters=3, replicas=1, node_timeout_ms=1000
    ).start()
    try:

        def replicas_linked() -> bool:
            roles = []
            for node in cluster.nodes:
                with redis.Redis(port=node.port) as c:
                    roles.append(c.info("replication"))
            masters = [i for i in roles if i["role"] == "master"]
            linked = [i for i in roles if i.get("master_link_status") == "up"]
            return len(masters) == 3 and len(linked) == 3

        wait_until(replicas_linked, "replicas in sync", 30)
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def on_cluster(replicated_cluster: RedisCluster, prefix: str):
    settings = Settings.from_env(
        {},
        redis_url=replicated_cluster.url,
        prefix=prefix,
        partitions=16,
        wait_replicas=1,
        wait_timeout_ms=WAIT_MS,
    )
    rc = redis.cluster.RedisCluster.from_url(replicated_cluster.url)
    try:
        yield rc, settings
    finally:
        for p in range(16):
            ks = Keyspace(prefix, p)
            for key in (ks.messages, ks.delayed, ks.stream, ks.sequence, ks.dead, ks.retention):
                with contextlib.suppress(redis.RedisError):
                    rc.unlink(key)
        with contextlib.suppress(redis.RedisError):
            rc.unlink(Keyspace(prefix).partition_count)
        rc.close()


def master_and_replica(rc: redis.cluster.RedisCluster, key: str, cluster: RedisCluster):
    """The master serving ``key`` (as the cluster reports it now) and its replica."""
    rc.nodes_manager.initialize()
    primary = rc.get_node_from_key(key)
    return primary, replica_of(primary.port, cluster)


def replica_of(port: int, cluster: RedisCluster):
    for node in cluster.nodes:
        with redis.Redis(port=node.port) as c:
            if c.info("replication").get("master_port") == port:
                return node
    raise AssertionError(f"no replica of {port}")


def node_pid(cluster: RedisCluster, port: int) -> int:
    return next(n.process.pid for n in cluster.nodes if n.port == port)


def replica_holds(replica_port: int, key: str, field: bytes) -> bool:
    with redis.Redis(port=replica_port) as c:
        c.execute_command("READONLY")
        try:
            return bool(c.hexists(key, field))
        except redis.ResponseError:  # MOVED: it does not know yet that it serves the slot
            return False


def test_on_a_cluster_the_partitions_replica_has_the_message_when_the_api_answers(
    on_cluster, replicated_cluster
) -> None:
    rc, settings = on_cluster
    with TestClient(create_app(settings)) as client:
        for _ in range(6):  # over several partitions, so several masters
            uuid = str(uuidlib.uuid4())
            ks = Keyspace(settings.prefix, partition_of(uuid_key(uuid), 16))
            assert save(client, uuid).status_code == 201
            _, replica = master_and_replica(rc, ks.messages, replicated_cluster)
            assert replica_holds(replica.port, ks.messages, uuid_key(uuid))
        assert replicated_count(client, "replicated") >= 6


def test_on_a_cluster_a_paused_replica_makes_503_and_a_retry_answers_the_duplicate(
    on_cluster, replicated_cluster
) -> None:
    rc, settings = on_cluster
    uuid = str(uuidlib.uuid4())
    ks = Keyspace(settings.prefix, partition_of(uuid_key(uuid), 16))
    primary, replica = master_and_replica(rc, ks.messages, replicated_cluster)
    with TestClient(create_app(settings)) as client:
        with paused(node_pid(replicated_cluster, replica.port)):
            started = time.monotonic()
            refused = save(client, uuid)
            took = time.monotonic() - started
            assert refused.status_code == 503 and refused.json()["error"] == NOT_REPLICATED
            assert WAIT_MS / 1000 - 0.05 <= took < WAIT_MS / 1000 + 1.0
            with redis.Redis(port=primary.port) as m:
                assert m.hexists(ks.messages, uuid_key(uuid)), "the master keeps the change"
        wait_until(lambda: save(client, uuid).status_code == 200, "the duplicate, replicated", 10)
        assert replica_holds(replica.port, ks.messages, uuid_key(uuid))


def test_on_a_cluster_a_moved_partition_is_followed_and_waited_for_on_its_new_master(
    on_cluster, replicated_cluster
) -> None:
    """The slot of an (empty) partition moves to another master after the api learnt the
    slot map: the first send answers MOVED (nothing ran), the api updates its map and
    sends the script and its WAIT to the new master."""
    rc, settings = on_cluster
    uuid = str(uuidlib.uuid4())
    ks = Keyspace(settings.prefix, partition_of(uuid_key(uuid), 16))
    slot = rc.keyslot(ks.messages)
    with TestClient(create_app(settings)) as client:
        source, _ = master_and_replica(rc, ks.messages, replicated_cluster)
        # Before the move: /metrics reads every partition, and would learn of it first.
        confirmed = replicated_count(client, "replicated")
        masters = [n for n in rc.get_primaries() if n.name != source.name]
        target = masters[0]
        with redis.Redis(port=target.port) as t:
            target_id = t.execute_command("CLUSTER MYID").decode()
        # Every master learns the new owner (the slot holds no key: nothing to migrate).
        for node in [target, source, *masters[1:]]:
            with redis.Redis(port=node.port) as c:
                c.execute_command("CLUSTER SETSLOT", slot, "NODE", target_id)
        try:
            assert save(client, uuid).status_code == 201
            assert replicated_count(client, "replicated") == confirmed + 1
            with redis.Redis(port=target.port) as t:
                assert t.hexists(ks.messages, uuid_key(uuid))
            # The new master's replica has it (it serves the slot once gossip tells it).
            replica = replica_of(target.port, replicated_cluster)
            wait_until(
                lambda: replica_holds(replica.port, ks.messages, uuid_key(uuid)),
                "the replica serving the moved slot",
                10,
            )
        finally:
            # Give the slot back (with its keys) so the cluster is as the other tests expect.
            for key in (ks.messages, ks.delayed, ks.sequence, ks.retention):
                with contextlib.suppress(redis.RedisError):
                    rc.unlink(key)
            with redis.Redis(port=source.port) as s:
                source_id = s.execute_command("CLUSTER MYID").decode()
            for node in [source, target, *masters[1:]]:
                with redis.Redis(port=node.port) as c:
                    c.execute_command("CLUSTER SETSLOT", slot, "NODE", source_id)
