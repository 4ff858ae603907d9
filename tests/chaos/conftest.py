"""Fixtures for the chaos suite: its own servers, a cluster, fault injectors, the table.

Each test gets a fresh Redis (AOF, ``appendfsync always``; not the session
Redis, since tests kill and restart it), or with ``cluster_chaos`` a fresh Redis
Cluster of 3 masters and 3 replicas, and a fresh 3-node ZooKeeper ensemble
(tickTime 500 ms, so the 2 s session timeout is allowed). ``chaos`` builds the
cluster on them; ``faults`` and the fixtures after it inject failures and
record them in the test's timeline. Each scenario adds one row to a table
printed at the end of the run (``pytest_terminal_summary``), followed by each
chaos test's duration.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Iterator
from pathlib import Path

import pytest

from tests.chaos.checker import Report, Timeline, table_header, table_row, table_rule
from tests.chaos.cluster_rig import (
    NODE_TIMEOUT_MS,
    ChaosRedisCluster,
    ClusterChaosEnv,
    ClusterFaults,
    cluster_chaos_env,
)
from tests.chaos.rig import ChaosEnv, Faults, chaos_env
from tests.e2e.harness import ServiceProcess
from tests.servers import RedisServer, ZooKeeperEnsemble

_ROWS = pytest.StashKey[list[str]]()
_DURATIONS = pytest.StashKey[dict[str, float]]()
_REPORTS = pytest.StashKey[dict[str, pytest.TestReport]]()


_config: pytest.Config | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _config
    _config = config
    config.stash[_ROWS] = []
    config.stash[_DURATIONS] = {}


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    item.stash.setdefault(_REPORTS, {})[report.when] = report
    return report


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if "tests/chaos/" in report.nodeid.replace("\\", "/"):
        durations = _config.stash[_DURATIONS] if _config is not None else {}
        durations[report.nodeid] = durations.get(report.nodeid, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    rows = config.stash.get(_ROWS, [])
    durations = config.stash.get(_DURATIONS, {})
    if not rows and not durations:
        return
    write = terminalreporter.write_line
    terminalreporter.section("chaos scenarios")
    if rows:
        write(table_header())
        write(table_rule())
        for row in rows:
            write(row)
        write(
            "lost/dup/early: messages; inv: order inversions within one worker among equal "
            "runAt; p50/p99/max: lateness (handledAt - runAt) of first echoes; no leader: "
            "seconds without a leading scheduler; refused: stale-epoch promotions refused; "
            "wall: setup + load + faults + settle."
        )
    if durations:
        write("")
        write("chaos test durations (setup + call + teardown):")
        for nodeid, seconds in sorted(durations.items(), key=lambda kv: -kv[1]):
            write(f"  {seconds:7.1f} s  {nodeid.rpartition('::')[2]}")
        write(f"  {sum(durations.values()):7.1f} s  total")


@pytest.fixture(scope="session")
def scenario_rows(pytestconfig: pytest.Config) -> list[str]:
    """The session's table rows (printed by ``pytest_terminal_summary``)."""
    return pytestconfig.stash[_ROWS]


@pytest.fixture
def timeline() -> Timeline:
    return Timeline()


@pytest.fixture
def chaos_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of this test's own, AOF with ``appendfsync always``."""
    server = RedisServer(tmp_path / "redis", appendfsync="always")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def zk_ensemble(tmp_path: Path) -> Iterator[ZooKeeperEnsemble]:
    """Three ZooKeeper nodes (tickTime 500 ms) of this test's own."""
    ensemble = ZooKeeperEnsemble(tmp_path / "zk", size=3, tick_time_ms=500)
    ensemble.start()
    try:
        yield ensemble
    finally:
        ensemble.stop()


@pytest.fixture
def chaos(
    request: pytest.FixtureRequest,
    chaos_redis: RedisServer,
    zk_ensemble: ZooKeeperEnsemble,
    prefix: str,
    tmp_path: Path,
    timeline: Timeline,
) -> Iterator[ChaosEnv]:
    """The test's world; call ``chaos.start_cluster(...)`` to start the processes.

    At teardown every process is stopped; if the test failed, the tail of each
    process's stderr and the fault timeline are printed.
    """
    with chaos_env(chaos_redis, zk_ensemble, prefix, tmp_path, timeline) as env:
        try:
            yield env
        finally:
            _describe_if_failed(request, env)


def _describe_if_failed(request: pytest.FixtureRequest, env: ChaosEnv) -> None:
    reports = request.node.stash.get(_REPORTS, {})
    if any(r.failed for r in reports.values()) and env.cluster is not None:
        print(f"\n===== chaos cluster in {env.workdir} =====")
        print("faults:", env.timeline.describe(env.created))
        print(env.cluster.describe(lines=40))


@pytest.fixture
def faults(chaos: ChaosEnv) -> Iterator[Faults]:
    """Every fault injector, bound to this test's world. At teardown, paused processes
    are resumed, partitions healed and stopped ZooKeeper nodes restarted."""
    injector = Faults(chaos)
    try:
        yield injector
    finally:
        injector.resume_all()
        injector.heal_all()
        injector.restore_zk()
        if not chaos.redis_server.running:
            chaos.redis_server.restart()


# Thin aliases, so a test can ask for just the injector it uses.


@pytest.fixture
def kill9(faults: Faults) -> Callable[[ServiceProcess], None]:
    return faults.kill


@pytest.fixture
def freeze(faults: Faults) -> Faults:
    """``freeze.pause(proc)`` / ``freeze.resume(proc)``: SIGSTOP / SIGCONT."""
    return faults


@pytest.fixture
def restart_redis(faults: Faults) -> Callable[[float], None]:
    return faults.restart_redis


@pytest.fixture
def expire_session(faults: Faults) -> Callable[..., None]:
    return faults.expire_session


@pytest.fixture
def record_scenario(
    request: pytest.FixtureRequest, scenario_rows: list[str], chaos: ChaosEnv
) -> Callable[[str, Report], None]:
    """``record(label, report)``: add this scenario's row to the table."""

    return _recorder(scenario_rows, chaos)


def _recorder(scenario_rows: list[str], env: ChaosEnv) -> Callable[[str, Report], None]:
    def record(label: str, report: Report) -> None:
        scenario_rows.append(table_row(label, report, time.time() - env.created))
        print(f"[{label}] {report.summary()}")

    return record


# -- on a Redis Cluster -----------------------------------------------------------------


@pytest.fixture
def chaos_redis_cluster(tmp_path: Path) -> Iterator[ChaosRedisCluster]:
    """3 masters + 3 replicas of this test's own (AOF ``appendfsync always``,
    ``cluster-node-timeout`` 1 s), every replica in sync before the test starts."""
    servers = ChaosRedisCluster(
        tmp_path / "redis-cluster", masters=3, replicas=1, node_timeout_ms=NODE_TIMEOUT_MS
    )
    servers.start()
    try:
        servers.wait_replicas_in_sync()
        yield servers
    finally:
        servers.stop()


@pytest.fixture
def cluster_chaos(
    request: pytest.FixtureRequest,
    chaos_redis_cluster: ChaosRedisCluster,
    zk_ensemble: ZooKeeperEnsemble,
    prefix: str,
    tmp_path: Path,
    timeline: Timeline,
) -> Iterator[ClusterChaosEnv]:
    """``chaos`` on the Redis Cluster: the processes run with 16 partitions."""
    with cluster_chaos_env(chaos_redis_cluster, zk_ensemble, prefix, tmp_path, timeline) as env:
        try:
            yield env
        finally:
            _describe_if_failed(request, env)


@pytest.fixture
def cluster_faults(cluster_chaos: ClusterChaosEnv) -> Iterator[ClusterFaults]:
    """Every fault injector, a cluster's too. At teardown frozen nodes and processes are
    resumed, partitions healed, stopped ZooKeeper nodes restarted."""
    injector = ClusterFaults(cluster_chaos)
    try:
        yield injector
    finally:
        injector.thaw_all()
        injector.resume_all()
        injector.heal_all()
        injector.restore_zk()


@pytest.fixture
def record_cluster_scenario(
    scenario_rows: list[str], cluster_chaos: ClusterChaosEnv
) -> Callable[[str, Report], None]:
    return _recorder(scenario_rows, cluster_chaos)
