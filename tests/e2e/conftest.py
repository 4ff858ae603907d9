"""Fixtures for end-to-end tests: whole clusters of real service processes."""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

from app.store.codec import uuid_key
from app.store.keys import Keyspace, keyspaces, partition_of
from tests.e2e.harness import Cluster

# The two places a cluster of processes can keep its data. A test runs on the single
# Redis (one partition, the keyspace of every release before partitions) unless it asks
# for both with ``@pytest.mark.parametrize("backend", BACKENDS, indirect=True)``.
BACKENDS = [
    pytest.param("redis", id="redis-1-partition"),
    pytest.param("cluster", id="cluster-16-partitions"),
]
CLUSTER_PARTITIONS = 16


@dataclass
class Backend:
    """Where the processes keep their data, and a synchronous client to look at it.

    ``client`` is a ``redis.RedisCluster`` on the cluster: each command goes to the
    master of its key's slot. ``env`` is what the processes need on top of the URL.
    """

    name: str
    url: str
    prefix: str
    partitions: int
    client: redis.Redis
    env: dict[str, str] = field(default_factory=dict)

    @property
    def keyspaces(self) -> list[Keyspace]:
        """Every partition's keys, in partition order."""
        return keyspaces(self.prefix, self.partitions)

    def partition_of(self, uuid: str) -> int:
        return partition_of(uuid_key(uuid), self.partitions)

    def keys_of(self, uuid: str) -> Keyspace:
        """The keys of the partition ``uuid`` lives in."""
        return self.keyspaces[self.partition_of(uuid)]


@pytest.fixture
def backend(
    request: pytest.FixtureRequest, prefix: str, redis_client: redis.Redis
) -> Iterator[Backend]:
    """The single Redis by default; the session's 3-master Redis Cluster with 16
    partitions when parametrised with "cluster" (its teardown deletes the prefix's keys
    on every master, after the processes stopped)."""
    kind = getattr(request, "param", "redis")
    if kind == "redis":
        url = request.getfixturevalue("redis_url")
        yield Backend("redis", url, prefix, 1, redis_client)
        return
    url = request.getfixturevalue("cluster_url")
    client = redis.RedisCluster.from_url(url)
    # The legacy bridge runs (as it does by default), on lists a cluster can bridge: one
    # hash tag, and one of this test's own (the teardown deletes them with the prefix).
    tag = "{" + prefix + "-legacy}"
    env = {
        "EAT_PARTITIONS": str(CLUSTER_PARTITIONS),
        "EAT_LEGACY_QUEUE": f"{tag}Queue",
        "EAT_LEGACY_DELAYED": f"{tag}QueueDelayed",
        "EAT_LEGACY_IN_FLIGHT": f"{tag}QueueDead",
    }
    try:
        yield Backend("cluster", url, prefix, CLUSTER_PARTITIONS, client, env)
    finally:
        client.close()


_REPORTS = pytest.StashKey[dict[str, pytest.TestReport]]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Keep each phase's report on the item, so fixtures can tell a failed test."""
    report = yield
    item.stash.setdefault(_REPORTS, {})[report.when] = report
    return report


def _failed(request: pytest.FixtureRequest) -> bool:
    reports = request.node.stash.get(_REPORTS, {})
    return any(report.failed for report in reports.values())


@pytest.fixture
def cluster(
    request: pytest.FixtureRequest,
    backend: Backend,  # its teardown deletes the prefix's keys, after ours
    zk_hosts: str,
    prefix: str,
    tmp_path: Path,
) -> Iterator[Callable[..., Cluster]]:
    """Factory: ``cluster(apis=1, schedulers=2, workers=2, **start_options)`` starts
    a :class:`Cluster` on this test's prefix, on the test's :class:`Backend`, and waits
    until it is ready (and led).

    Every cluster made is stopped at teardown, whatever the test did (SIGTERM,
    then SIGKILL after the grace period). When the test failed, the tail of each
    process's stderr is printed (pytest shows it under "Captured stdout teardown").
    """
    made: list[Cluster] = []

    def make(
        apis: int = 1,
        schedulers: int = 2,
        workers: int = 2,
        *,
        session_timeout: float = 2.0,
        env: dict[str, str] | None = None,
        **start_options: object,
    ) -> Cluster:
        instance = Cluster(
            backend.url,
            zk_hosts,
            prefix,
            tmp_path / f"cluster-{len(made) + 1}",
            session_timeout=session_timeout,
            env={**backend.env, **(env or {})},
        )
        made.append(instance)
        instance.start(apis, schedulers, workers, **start_options)  # type: ignore[arg-type]
        return instance

    try:
        yield make
    finally:
        for instance in made:
            instance.stop()
        if _failed(request):
            for instance in made:
                print(f"\n===== cluster in {instance.workdir} =====")
                print(instance.describe(lines=60))
