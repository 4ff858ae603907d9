"""End to end: ``echo-at-time up`` against the test's Redis and ZooKeeper.

With ``EAT_REDIS_URL`` and ``EAT_ZK_HOSTS`` set, ``up`` starts no server, only
the api, schedulers and workers, as its own children; their output goes to
``up``'s stdout and stderr, read back here. A child killed -9 must be started
again (a new pid in a "started" line), with its exit logged, and the stack must
keep echoing; SIGTERM then stops every child gracefully and ``up`` exits 0.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import uuid as uuidlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from app.ops.cluster import cluster_ports
from tests.e2e.harness import ApiClient, Cluster, ServiceProcess, assert_echoed_exactly_once, now_ms
from tests.servers import free_port

pytestmark = pytest.mark.e2e


def up_lines(up: ServiceProcess, event: str) -> list[dict[str, Any]]:
    """``up``'s own log lines with this event (the children's share its stderr)."""
    return [
        line for line in up.log_lines() if line.get("process") == "up" and line["event"] == event
    ]


def current_pids(up: ServiceProcess) -> dict[str, int]:
    """Each child's latest pid, from the "started" lines."""
    return {line["child"]: line["pid"] for line in up_lines(up, "started")}


def parent_of(pid: int) -> int | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return None
    return int(next(line for line in status.splitlines() if line.startswith("PPid:")).split()[1])


def echo_through(c: Cluster, up: ServiceProcess, api: ApiClient, message: str) -> None:
    """Post a message due in half a second (the leader must promote it); wait for its echo."""
    posted = api.post(message, now_ms() + 500, str(uuidlib.uuid4()))
    assert posted.status == 201, posted.body
    c.wait_until(
        lambda: any(line["uuid"] == posted.uuid for line in up.echo_lines()),
        f"{message!r} to be echoed",
        15,
    )


def test_up_restarts_a_child_killed_9_with_its_exit_logged_and_the_stack_keeps_echoing(
    cluster: Callable[..., Cluster], tmp_path: Path
) -> None:
    c = cluster(apis=0, schedulers=0, workers=0)  # the environment and teardown, no processes
    port = free_port()
    argv = [c.script, "up", "--port", str(port), "--schedulers", "1", "--workers", "1"]
    up = ServiceProcess(
        "up", [*argv, "--data-dir", str(tmp_path / "up")], c.env, c.workdir, port=port
    )
    c.launch([up], timeout=60)
    children = {"api", "scheduler-1", "worker-1"}
    first = c.wait_until(
        lambda: (pids := current_pids(up)).keys() == children and pids,
        "up to start every child",
        15,
    )
    assert not up_lines(up, "redis started") and not up_lines(up, "zookeeper started")
    with ApiClient(up.base_url) as api:
        echo_through(c, up, api, "before the crash")
        crash_and_restart(c, up, first)
        echo_through(c, up, api, "after the crash")

    assert up.terminate(timeout=30) == 0
    stopped = {line["child"]: line["code"] for line in up_lines(up, "child stopped")}
    assert stopped.keys() == children
    assert all(code == 0 for code in stopped.values()), stopped
    assert up_lines(up, "stack stopped")


def crash_and_restart(c: Cluster, up: ServiceProcess, first: dict[str, int]) -> None:
    """kill -9 worker-1; up must log its exit and start it again, leaving the others."""
    victim = first["worker-1"]
    assert parent_of(victim) == up.pid  # the process up started, nothing else
    os.kill(victim, signal.SIGKILL)

    restarted = c.wait_until(
        lambda: (pid := current_pids(up)["worker-1"]) != victim and pid,
        "worker-1 to be started again",
        15,
    )
    [exited] = up_lines(up, "child exited, restarting")
    assert (exited["child"], exited["pid"], exited["code"]) == ("worker-1", victim, -9)
    assert 0 < exited["restart_in_s"] <= 0.5  # the first delay, with jitter
    assert parent_of(restarted) == up.pid
    assert current_pids(up)["api"] == first["api"]  # the others were left alone
    assert current_pids(up)["scheduler-1"] == first["scheduler-1"]


def test_up_cluster_starts_a_local_3_master_cluster_and_carries_messages_over_its_partitions(
    cluster: Callable[..., Cluster], tmp_path: Path
) -> None:
    c = cluster(apis=0, schedulers=0, workers=0)  # ZooKeeper, a prefix and teardown
    # No Redis named: up starts its own cluster, on the ports its data dir recorded
    # (here: free ones, so a test never meets a developer's cluster on 7000-7002).
    env = {k: v for k, v in c.env.items() if not k.startswith(("EAT_REDIS", "EAT_PARTITIONS"))}
    env = {k: v for k, v in env.items() if not k.startswith("EAT_LEGACY_")}
    data_dir = tmp_path / "up"
    ports = cluster_ports(3)
    (data_dir / "redis-cluster").mkdir(parents=True)
    (data_dir / "redis-cluster" / "ports").write_text(" ".join(map(str, ports)))
    port = free_port()
    argv = [c.script, "up", "--port", str(port), "--schedulers", "2", "--workers", "1"]
    argv += ["--cluster", "--partitions", "4", "--data-dir", str(data_dir)]
    up = ServiceProcess("up", argv, env, c.workdir, port=port)
    c.launch([up], timeout=90)

    [started] = up_lines(up, "redis cluster started")
    assert started["ports"] == ports and started["partitions"] == "4"
    with ApiClient(up.base_url) as api:
        posts = [api.post(f"m{i}", now_ms() + 500, str(uuidlib.uuid4())) for i in range(40)]
        assert all(p.status == 201 for p in posts), [p.body for p in posts if p.status != 201]
        expected = {p.uuid for p in posts}
        # An old producer's item, on the legacy list name up gave the cluster.
        legacy = str(uuidlib.uuid4())
        item = json.dumps({"message": "legacy", "runAt": now_ms(), "uuid": legacy})
        with redis.RedisCluster(host="127.0.0.1", port=ports[0]) as client:
            client.lpush("{legacy}Queue", item)
        expected.add(legacy)
        c.wait_until(
            lambda: expected <= {line["uuid"] for line in up.echo_lines()},
            "every message to be echoed",
            30,
        )
        stats = httpx.get(f"{up.base_url}/api/v1/stats", timeout=10).json()
    assert_echoed_exactly_once(expected, up.echo_lines())
    # Four partitions, each served by one of up's masters; 40 uuids touch them all.
    assert [p["partition"] for p in stats["partitions"]] == [0, 1, 2, 3]
    assert {int(p["master"].rsplit(":", 1)[1]) for p in stats["partitions"]} <= set(ports)
    # The schedulers took the cluster's legacy list names (one hash tag) and did not
    # refuse them: no child exited.
    assert not up_lines(up, "child exited, restarting")

    assert up.terminate(timeout=30) == 0
    assert up_lines(up, "stack stopped")
    for node in ports:  # up stopped the masters it started
        c.wait_until(lambda node=node: nothing_listens(node), f"port {node} to be closed", 10)


def nothing_listens(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) != 0
