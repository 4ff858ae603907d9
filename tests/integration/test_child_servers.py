"""Real redis-server and ZooKeeper processes: the servers ``echo-at-time up`` starts
(app/ops/servers.py) and the tests' extensions of them (tests/servers.py)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from kazoo.client import KazooClient

from app.ops import servers
from tests.servers import (
    MissingBinaryError,
    RedisServer,
    ServerStartError,
    ZooKeeperEnsemble,
    ZooKeeperServer,
    free_port,
    redis_answers_ping,
    zookeeper_mode,
)


def _accepts_connections(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture
def kazoo_factory() -> Iterator[list[KazooClient]]:
    clients: list[KazooClient] = []
    yield clients
    for client in clients:
        client.stop()
        client.close()


def _kazoo(clients: list[KazooClient], hosts: str) -> KazooClient:
    client = KazooClient(hosts=hosts, timeout=4.0)
    clients.append(client)
    client.start(timeout=15)
    return client


def test_redis_server_starts_on_loopback_with_aof_and_answers_ping(tmp_path: Path) -> None:
    with servers.RedisServer(tmp_path) as server:
        assert server.running
        assert server.process is not None and server.process.running
        assert server.url == f"redis://127.0.0.1:{server.port}/0"
        assert redis_answers_ping("127.0.0.1", server.port)
        client = redis.Redis.from_url(server.url)
        try:
            assert client.ping() is True
            assert client.config_get("bind")["bind"] == "127.0.0.1"
            assert client.config_get("appendonly")["appendonly"] == "yes"
            assert client.config_get("appendfsync")["appendfsync"] == "everysec"
        finally:
            client.close()
    assert not server.running


def test_redis_data_survives_kill_and_restart_through_the_aof(tmp_path: Path) -> None:
    server = RedisServer(tmp_path, appendfsync="always").start()
    try:
        port = server.port
        client = redis.Redis.from_url(server.url)
        try:
            assert client.config_get("appendfsync")["appendfsync"] == "always"
            client.set("survivor", b"still here")
            client.xadd("stream", {"f": "v"})
        finally:
            client.close()
        old_pid = server.pid

        server.kill()
        assert not server.running
        assert server.last_exit_code == -9

        server.restart()
        assert server.port == port
        assert server.pid != old_pid
        client = redis.Redis.from_url(server.url)
        try:
            assert client.get("survivor") == b"still here"
            assert client.xlen("stream") == 1
        finally:
            client.close()
    finally:
        server.stop()


def test_zookeeper_serves_znodes_to_a_kazoo_client(
    tmp_path: Path, kazoo_factory: list[KazooClient]
) -> None:
    with servers.ZooKeeperServer(tmp_path) as server:
        assert server.hosts == f"127.0.0.1:{server.port}"
        assert zookeeper_mode("127.0.0.1", server.port) == "standalone"
        zk = _kazoo(kazoo_factory, server.hosts)
        zk.create("/echo/hello", b"world", makepath=True)
        data, stat = zk.get("/echo/hello")
        assert data == b"world"
        assert stat.czxid > 0


def test_zookeeper_data_survives_kill_and_restart(
    tmp_path: Path, kazoo_factory: list[KazooClient]
) -> None:
    server = ZooKeeperServer(tmp_path).start()
    try:
        zk = _kazoo(kazoo_factory, server.hosts)
        zk.create("/kept", b"1")
        zk.stop()
        server.kill()
        server.restart()
        zk = _kazoo(kazoo_factory, server.hosts)
        assert zk.get("/kept")[0] == b"1"
    finally:
        server.stop()


@pytest.mark.parametrize("server_class", [RedisServer, ZooKeeperServer])
def test_stop_exits_cleanly_and_frees_the_port(
    tmp_path: Path, server_class: type[RedisServer | ZooKeeperServer]
) -> None:
    server = server_class(tmp_path).start()
    port = server.port
    assert _accepts_connections(port)

    code = server.stop()

    assert code in server.CLEAN_EXIT_CODES
    assert not server.running
    assert server.pid is None
    assert not _accepts_connections(port)
    assert server.stop() == code  # stopping twice is harmless


def test_an_auto_chosen_port_taken_by_another_process_is_replaced(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)
    taken = server.port
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", taken))
        squatter.listen()
        server.start()
        try:
            assert server.port != taken
            assert redis_answers_ping("127.0.0.1", server.port)
        finally:
            server.stop()


def test_an_explicit_port_that_is_taken_fails_with_the_log_tail_and_leaves_nothing_running(
    tmp_path: Path,
) -> None:
    port = free_port()
    server = RedisServer(tmp_path, port=port)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        with pytest.raises(ServerStartError, match="Address already in use") as excinfo:
            server.start()
    assert excinfo.value.exited
    assert str(tmp_path / "redis.log") in str(excinfo.value)
    assert not server.running
    assert server.port == port


def test_a_missing_redis_server_binary_names_the_redis_server_package(tmp_path: Path) -> None:
    server = RedisServer(tmp_path, binary=tmp_path / "no" / "redis-server")
    with pytest.raises(MissingBinaryError, match="'redis-server'"):
        server.start()
    assert not server.running


def test_a_missing_zookeeper_jar_names_the_zookeeper_package(tmp_path: Path) -> None:
    server = ZooKeeperServer(tmp_path, zookeeper_jar=tmp_path / "no" / "zookeeper.jar")
    with pytest.raises(MissingBinaryError, match="'zookeeper'"):
        server.start()
    assert not server.running


def test_a_missing_java_names_the_default_jre_headless_package(tmp_path: Path) -> None:
    server = ZooKeeperServer(tmp_path, java=tmp_path / "no" / "java")
    with pytest.raises(MissingBinaryError, match="'default-jre-headless'"):
        server.start()
    assert not server.running


def test_a_three_node_ensemble_serves_and_survives_losing_its_leader(
    tmp_path: Path, kazoo_factory: list[KazooClient]
) -> None:
    with ZooKeeperEnsemble(tmp_path, size=3) as ensemble:
        assert sorted(node.mode or "" for node in ensemble.nodes) == [
            "follower",
            "follower",
            "leader",
        ]
        assert ensemble.hosts.count(",") == 2
        leader = ensemble.leader()
        assert leader is not None
        followers = [node for node in ensemble.nodes if node is not leader]
        zk = _kazoo(kazoo_factory, followers[0].hosts)
        zk.create("/replicated", b"yes")

        leader.kill()

        zk = _kazoo(kazoo_factory, followers[1].hosts)
        assert zk.get("/replicated")[0] == b"yes"
    assert not any(node.running for node in ensemble.nodes)


def test_session_fixtures_give_reachable_servers_and_a_unique_prefix(
    redis_client: redis.Redis, zk_hosts: str, prefix: str, kazoo_factory: list[KazooClient]
) -> None:
    assert prefix.startswith("t")
    assert len(prefix) == 13
    assert redis_client.set(f"{{{prefix}}}:k", b"v")
    zk = _kazoo(kazoo_factory, zk_hosts)
    zk.create(f"/{prefix}/node", makepath=True)
    assert zk.exists(f"/{prefix}/node")
