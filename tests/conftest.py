"""Shared fixtures: one real Redis and one real ZooKeeper per test session.

Why local processes: the service's guarantees (Lua scripts, streams, consumer
groups, fencing through ZooKeeper's czxid) only mean something against the real
servers, and fakes would hide exactly the bugs the tests are there to catch. CI
and developer machines may have no Docker engine, but Debian's ``redis-server``
and ``zookeeper`` packages run fine as plain child processes (see
``tests/servers.py`` and ENVIRONMENT.md): Redis is ready in ~15 ms, ZooKeeper
in ~0.5 s, and as children of the test process they can be killed and restarted
by chaos tests.

How the choice is made: ``docker_engine_available()`` runs ``docker info`` (2 s
timeout) if a ``docker`` binary is on PATH; only a zero exit counts as an engine.
With an engine, the session servers are testcontainers (``redis:7.0`` and
``zookeeper:3.8``); without one, local child processes. ``EAT_TEST_SERVERS=local``
or ``=docker`` overrides the detection. Nothing is ever skipped: a server that
cannot start makes the fixture raise, so the tests that need it error.

In the local case ``redis_server`` / ``zk_server`` *are* the
:class:`~tests.servers.RedisServer` / :class:`~tests.servers.ZooKeeperServer`
objects (``kill()``, ``restart()``, ``pid``...); with containers they are small
handles with ``.url`` / ``.hosts`` and ``.process = None``. Each test gets a
unique ``prefix`` to put in its Redis keys (as a hash tag, ``{prefix}``) and ZK
paths, so tests never see each other's data.
"""

from __future__ import annotations

import contextlib
import functools
import os
import secrets
import shutil
import subprocess
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis

from app.ops.cluster import RedisCluster
from tests.servers import (
    RedisServer,
    ZooKeeperServer,
    redis_answers_ping,
    zookeeper_mode,
)
from tests.wait import wait_until

SERVERS_ENV = "EAT_TEST_SERVERS"  # "local", "docker", or unset (auto-detect)


def _import_anyio_now() -> None:
    """anyio imports its modules on first use; the first use may be inside a request a
    test client serves in its own thread, and pytest parses the module there (anyio is a
    pytest plugin, so pytest rewrites its modules). CPython 3.11's AST constructor then
    failed once with a spurious "recursion depth mismatch" (python/cpython#106905, seen
    in threaded programs). Importing everything here, in the main thread, at start,
    leaves nothing to parse later."""
    import anyio

    for name in dir(anyio):
        getattr(anyio, name, None)


_import_anyio_now()


@functools.cache
def docker_engine_available() -> bool:
    """True only if ``docker info`` exits 0 within 2 s (cached for the session)."""
    docker = shutil.which("docker")
    if docker is None:
        return False
    try:
        result = subprocess.run(
            [docker, "info"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=2,
            check=False,
        )
    except (subprocess.TimeoutExpired, OSError):
        return False
    return result.returncode == 0


def use_containers() -> bool:
    choice = os.environ.get(SERVERS_ENV, "").strip().lower()
    if choice == "local":
        return False
    if choice == "docker":
        return True
    if choice:
        raise pytest.UsageError(f"{SERVERS_ENV} must be 'local' or 'docker', not {choice!r}")
    return docker_engine_available()


@dataclass
class ContainerRedis:
    url: str
    container: Any
    process: None = None


@dataclass
class ContainerZooKeeper:
    hosts: str
    container: Any
    process: None = None


@contextlib.contextmanager
def _quiet_testcontainers() -> Iterator[None]:
    # testcontainers' deprecation warnings point at the caller; pyproject turns
    # warnings into errors, and they are not about our code.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


def _redis_container() -> Iterator[ContainerRedis]:
    with _quiet_testcontainers():
        try:
            from testcontainers.community.redis import RedisContainer
        except ImportError:
            from testcontainers.redis import RedisContainer
        container = RedisContainer("redis:7.0")
        container.start()
    try:
        host = container.get_container_host_ip()
        port = int(container.get_exposed_port(6379))
        wait_until(lambda: redis_answers_ping(host, port), "redis container", 30, interval=0.05)
        yield ContainerRedis(url=f"redis://{host}:{port}/0", container=container)
    finally:
        with _quiet_testcontainers():
            container.stop()


def _zookeeper_container() -> Iterator[ContainerZooKeeper]:
    with _quiet_testcontainers():
        from testcontainers.core.container import DockerContainer

        container = (
            DockerContainer("zookeeper:3.8")
            .with_env("ZOO_4LW_COMMANDS_WHITELIST", "srvr,ruok,mntr")
            .with_exposed_ports(2181)
        )
        container.start()
    try:
        host = container.get_container_host_ip()
        port = int(container.get_exposed_port(2181))
        wait_until(
            lambda: zookeeper_mode(host, port) is not None,
            "zookeeper container",
            60,
            interval=0.05,
        )
        yield ContainerZooKeeper(hosts=f"{host}:{port}", container=container)
    finally:
        with _quiet_testcontainers():
            container.stop()


@pytest.fixture(scope="session")
def redis_server(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RedisServer | ContainerRedis]:
    if use_containers():
        yield from _redis_container()
        return
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def zk_server(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ZooKeeperServer | ContainerZooKeeper]:
    if use_containers():
        yield from _zookeeper_container()
        return
    server = ZooKeeperServer(tmp_path_factory.mktemp("zookeeper"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def prefix() -> str:
    """A fresh ``t`` + 12 hex chars per test, for Redis keys and ZK paths."""
    return "t" + secrets.token_hex(6)


@pytest.fixture
def redis_url(redis_server: RedisServer | ContainerRedis) -> str:
    # A chaos test that killed the shared local server must not break the next tests.
    if isinstance(redis_server, RedisServer) and not redis_server.running:
        redis_server.restart()
    return redis_server.url


@pytest.fixture
def zk_hosts(zk_server: ZooKeeperServer | ContainerZooKeeper) -> str:
    if isinstance(zk_server, ZooKeeperServer) and not zk_server.running:
        zk_server.restart()
    return zk_server.hosts


@pytest.fixture
def redis_client(redis_url: str, prefix: str) -> Iterator[redis.Redis]:
    """Synchronous client; afterwards every key containing the test's prefix is deleted."""
    client = redis.Redis.from_url(redis_url, decode_responses=False)
    try:
        yield client
    finally:
        try:
            # Keys are unique to this test, so if the server is down (a chaos test
            # left it stopped) leaving them behind cannot affect another test.
            with contextlib.suppress(redis.exceptions.ConnectionError):
                batch: list[bytes] = []
                for key in client.scan_iter(match=f"*{prefix}*", count=1000):
                    batch.append(key)
                    if len(batch) >= 500:
                        client.unlink(*batch)
                        batch.clear()
                if batch:
                    client.unlink(*batch)
        finally:
            client.close()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """A real 3-master Redis Cluster on loopback for the session (local processes
    always: ``redis-cli --cluster create`` needs the nodes' own addresses)."""
    cluster = RedisCluster(tmp_path_factory.mktemp("redis-cluster"), masters=3).start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def cluster_url(redis_cluster: RedisCluster, prefix: str) -> Iterator[str]:
    """The cluster's seed URL; afterwards every key of the test's prefix is deleted from
    every master."""
    try:
        yield redis_cluster.url
    finally:
        for node in redis_cluster.nodes:
            if not node.running:
                continue
            with (
                redis.Redis(port=node.port) as client,
                contextlib.suppress(redis.exceptions.RedisError),
            ):
                if client.info("replication")["role"] != "master":
                    continue
                keys = list(client.scan_iter(match=f"*{prefix}*", count=1000))
                for key in keys:  # one by one: a cluster refuses a multi-slot UNLINK
                    client.unlink(key)
