"""Chaos on a Redis Cluster: a master killed, a slot resharded, skewed and synchronised load.

Every test starts its own Redis Cluster of 3 masters and 3 replicas (AOF
``appendfsync always``, ``cluster-node-timeout`` 1 s), its own 3-node ZooKeeper
ensemble and 2 api, 3 scheduler and 3 worker processes with ``EAT_PARTITIONS=16``
and ``EAT_REDIS_CLUSTER=true``, then proceeds as the single-Redis scenarios do
(``test_failover.py``): a known load over both apis (a 503 retried with the same
uuid), faults, settle, the checker. Rows 15-19 of the table.

What holds everywhere: nothing early; nothing twice but what a worker fault or a
killed master explains (an acknowledgement or a promotion the replica never
received is undone: delivered again, never lost); nothing lost that was answered
2xx, except, without ``EAT_WAIT_REPLICAS``, what a killed master had answered and
not yet sent to its replica: that row counts it (lost column) and asserts that
each such message was answered by that master in the moments before it died.
"""

from __future__ import annotations

import time
import uuid as uuidlib
from collections import defaultdict
from collections.abc import Callable, Iterable

import httpx
import pytest

from tests.chaos.checker import Echo, Report, echoes_of, percentile
from tests.chaos.cluster_rig import ClusterChaosEnv, ClusterFaults, Failover, Loads, Posted
from tests.chaos.load import LoadGenerator, Post
from tests.chaos.test_failover import (
    DURATION,
    HEALTHY_LATENESS_MS,
    MESSAGES,
    at,
    describe_dups,
)

pytestmark = pytest.mark.chaos

Record = Callable[[str, Report], None]

# The replication link cut this long before the second master is killed (a network cut,
# a replica falling behind): what asynchronous replication loses is then large enough
# to count.
REPLICA_LAG = 0.5
# A message answered this long around a kill may be in the writes the replica missed.
KILL_MARGIN = 0.1
# Bounds: a partition whose master or slot is disturbed is late by at most the failover
# (node timeout 1 s + election) plus the clients' backoff; a backlog of a few thousand
# messages in one partition drains within a few seconds on this 2-core machine.
DISTURBED_LATENESS_MS = 8000
# EAT_VISIBILITY_TIMEOUT in the failover rows: an entry a dying master delivered to a worker
# that never got the reply stays pending on the promoted replica until it is reclaimed.
VISIBILITY = 2.5
BACKLOG_LATENESS_MS = 6000


# -- helpers --------------------------------------------------------------------------


def uuid_in(env: ClusterChaosEnv, partition: int) -> str:
    """A random uuid of ``partition``."""
    while True:
        candidate = str(uuidlib.uuid4())
        if env.partition_of(candidate) == partition:
            return candidate


def post_bulk(api_url: str, items: Iterable[tuple[str, str, int]], within: float = 30.0) -> Posted:
    """POST /save-messages ``(uuid, message, runAt)`` items, 1,000 a request; a 503 is
    retried with the same items (the stored ones then answer ``duplicate``)."""
    posts = [
        Post(uuid, message, run_at, "bulk", thread=-1, seq=i)
        for i, (uuid, message, run_at) in enumerate(items)
    ]
    deadline = time.monotonic() + within
    with httpx.Client(base_url=api_url, timeout=30.0) as client:
        for start in range(0, len(posts), 1000):
            chunk = posts[start : start + 1000]
            body = [{"uuid": p.uuid, "message": p.message, "runAt": p.run_at} for p in chunk]
            sent_at = time.time()
            while True:
                answer = client.post("/api/v1/save-messages", json=body)
                for post in chunk:
                    post.answers.append(str(answer.status_code))
                if answer.status_code == 200 or time.monotonic() >= deadline:
                    break
                assert answer.status_code == 503, answer.text
                time.sleep(0.1)
            assert answer.status_code == 200, answer.text
            for post, result in zip(chunk, answer.json()["results"], strict=True):
                post.status = {"accepted": 201, "duplicate": 200}.get(result["status"])
                post.state = result.get("state")
                post.sent_at, post.answered_at = sent_at, time.time()
    return Posted(posts)


def first_echoes(env: ClusterChaosEnv) -> dict[str, Echo]:
    assert env.cluster is not None
    first: dict[str, Echo] = {}
    for echo in echoes_of(env.cluster):
        if echo.uuid not in first or echo.handled_at < first[echo.uuid].handled_at:
            first[echo.uuid] = echo
    return first


def lateness_by_partition(
    env: ClusterChaosEnv, posts: Iterable[Post], keep: Callable[[Post], bool] = lambda p: True
) -> dict[int, list[int]]:
    """Lateness of the accepted ``posts`` that ``keep`` selects, per partition: from its
    runAt, or from its first send if that came later (a poster thread held up retrying a
    503 sends the rest of a group with one runAt late: not the service's lateness), to
    its first echo."""
    first = first_echoes(env)
    out: dict[int, list[int]] = defaultdict(list)
    for post in posts:
        echo = first.get(post.uuid)
        if post.accepted and echo is not None and keep(post):
            since = max(echo.run_at, int((post.sent_at or 0) * 1000))
            out[env.partition_of(post.uuid)].append(echo.handled_at - since)
    return out


def worst(by_partition: dict[int, list[int]]) -> dict[int, int]:
    return {p: max(v) for p, v in sorted(by_partition.items())}


def assert_cluster_core(
    report: Report, load: LoadGenerator | Loads, *, may_lose: set[str] | None = None
) -> None:
    """Every post accepted, nothing early, no echo of an unknown uuid, every duplicate
    explained; nothing lost but what ``may_lose`` allows (counted, not failed)."""
    errors = [e for sub in getattr(load, "loads", [load]) for e in getattr(sub, "errors", [])]
    assert not errors, f"valid posts refused: {errors[:5]}"
    unanswered = [p.uuid for p in load.snapshot() if not p.accepted]
    assert not unanswered, f"{len(unanswered)} posts never accepted despite retries"
    beyond = set(report.lost) - (may_lose or set())
    assert not beyond, f"{len(beyond)} accepted messages never echoed: {sorted(beyond)[:5]}"
    assert not report.early, f"echoed before runAt: {report.early[:5]}"
    assert not report.unknown_echoes, f"echoes nobody posted: {report.unknown_echoes[:5]}"
    assert not report.unexplained_duplicates, describe_dups(report.unexplained_duplicates)
    assert report.inversions == 0, report.inversion_examples


def server_errors(load: LoadGenerator) -> list[str]:
    """Answers a client must not see: a 5xx other than 503 (retry with the same uuid)."""
    return [a for a in load.answer_counts() if a.startswith("5") and a != "503"]


# -- 15, 16: a master killed ------------------------------------------------------------


def at_risk(load: LoadGenerator, env: ClusterChaosEnv, failover: Failover) -> set[str]:
    """Messages the killed master may have answered before its replica had them: of its
    partitions, answered from the start of the replica's lag until just after the kill."""
    since = failover.killed_at - failover.replica_lag - KILL_MARGIN
    until = failover.killed_at + KILL_MARGIN
    return {
        p.uuid
        for p in load.snapshot()
        if p.accepted
        and env.partition_of(p.uuid) in failover.partitions
        and since <= (p.answered_at or 0) <= until
    }


def kill_two_masters(
    env: ClusterChaosEnv, faults: ClusterFaults, wait_replicas: int
) -> tuple[LoadGenerator, float, list[tuple[Failover, float]]]:
    """Under load: kill -9 one master (its replica promoted), start it again (it rejoins
    as the new master's replica); then another master, its replication link cut 0.5 s
    before.
    Returns the load, its start and each failover with when its replica was back in sync."""
    env.start_cluster(
        env={"EAT_WAIT_REPLICAS": str(wait_replicas), "EAT_VISIBILITY_TIMEOUT": f"{VISIBILITY:g}"}
    )
    load = env.load(MESSAGES, DURATION).start()
    start = time.time()
    seed = env.redis_cluster.nodes[0].port  # the processes' seed stays up throughout
    done: list[tuple[Failover, float]] = []
    for moment, lag in ((2.5, 0.0), (6.5, REPLICA_LAG)):
        at(load, moment)
        victim = next(
            m
            for m in env.redis_cluster.live_masters()
            if m.port != seed and all(m.port != f.promoted_port for f, _ in done)
        )
        failover = faults.kill_master(victim.port, replica_lag=lag)
        faults.restart_node(victim.port)
        done.append((failover, time.time()))
    return load, start, done


def describe_late(
    env: ClusterChaosEnv,
    posts: list[Post],
    failovers: list[tuple[Failover, float]],
    keep: Callable[[Post], bool],
    count: int = 12,
) -> str:
    """The latest of the selected messages, timed from the nearest kill."""
    first = first_echoes(env)
    rows = []
    for post in posts:
        echo = first.get(post.uuid)
        if echo is None or not keep(post):
            continue
        kill = min((f.killed_at for f, _ in failovers), key=lambda k: abs(k - post.run_at / 1000))
        rows.append(
            (
                echo.handled_at - echo.run_at,
                f"p{env.partition_of(post.uuid)} {post.kind} runAt {post.run_at / 1000 - kill:+.2f}"
                f" sent {(post.sent_at or 0) - kill:+.2f}"
                f" answered {(post.answered_at or 0) - kill:+.2f}"
                f" handled {echo.handled_at / 1000 - kill:+.2f} by {echo.process.name}"
                f" answers {post.answers}",
            )
        )
    rows.sort(reverse=True)
    return "\n".join(f"{late} ms: {text}" for late, text in rows[:count])


def reclaimed(env: ClusterChaosEnv) -> set[str]:
    """Every uuid a worker reclaimed (its entry pending past the visibility timeout)."""
    assert env.cluster is not None
    return {
        uuid
        for proc in env.cluster.history
        if proc.role == "worker"
        for line in proc.log_lines()
        if line.get("event") == "reclaimed"
        for uuid in line.get("uuids", [])
    }


def check_failover_lateness(
    env: ClusterChaosEnv, load: LoadGenerator, failovers: list[tuple[Failover, float]]
) -> dict[str, object]:
    """Partitions of the masters never killed keep their lateness; the killed masters'
    partitions are on time again once their new master serves (and, with WAIT, has its
    replica back); meanwhile they are late by at most the failover."""
    disturbed = {p for f, _ in failovers for p in f.partitions}
    posts = load.snapshot()
    # A read in flight on a live master whose connection the cluster client reset while
    # another master failed over loses its reply: the entries it delivered wait for the
    # visibility timeout and are reclaimed (late, not lost; XREADGROUP is not re-sent
    # blindly, docs/cluster.md). Those are bounded apart.
    again = reclaimed(env)
    healthy = lateness_by_partition(env, posts, lambda p: p.uuid not in again)
    healthy = {p: v for p, v in healthy.items() if p not in disturbed}
    late_reads = lateness_by_partition(env, posts, lambda p: p.uuid in again)
    late_reads = {p: v for p, v in late_reads.items() if p not in disturbed}
    if late_reads:
        assert max(max(v) for v in late_reads.values()) <= (VISIBILITY + 2) * 1000, late_reads
    assert healthy, "no partition on a master that was not killed"
    assert max(max(v) for v in healthy.values()) <= HEALTHY_LATENESS_MS, (
        f"partitions on a live master were late: {worst(healthy)}\n"
        + describe_late(env, posts, failovers, lambda p: env.partition_of(p.uuid) not in disturbed)
    )

    def after_failover(post: Post) -> bool:
        partition = env.partition_of(post.uuid)
        return any(
            partition in f.partitions and (post.sent_at or 0) > synced + 1
            for f, synced in failovers
        )

    resumed = lateness_by_partition(env, posts, after_failover)
    assert resumed, "no message of a failed-over partition after the failovers"
    assert max(max(v) for v in resumed.values()) <= HEALTHY_LATENESS_MS, (
        f"failed-over partitions still late after the failover: {worst(resumed)}"
    )
    during = lateness_by_partition(env, posts, lambda p: env.partition_of(p.uuid) in disturbed)
    assert max(max(v) for v in during.values()) <= DISTURBED_LATENESS_MS, worst(during)
    return {
        "failover_s": [round(f.took, 2) for f, _ in failovers],
        "live_masters_reclaimed": sum(len(v) for v in late_reads.values()),
        "healthy_max_ms": max(max(v) for v in healthy.values()),
        "failed_over_max_ms": max(max(v) for v in during.values()),
    }


def test_kill_9_of_a_master_with_wait_replicas_1_loses_nothing_accepted_and_spares_other_masters(
    cluster_chaos: ClusterChaosEnv, cluster_faults: ClusterFaults, record_cluster_scenario: Record
) -> None:
    """With EAT_WAIT_REPLICAS=1 the api answers 2xx only once the replica has the
    message: whatever the killed master took with it had been answered 503 (retried
    with its uuid, accepted by the promoted replica), so nothing accepted is lost, even
    from the master whose replica lagged."""
    env = cluster_chaos
    load, start, failovers = kill_two_masters(env, cluster_faults, wait_replicas=1)
    env.settle(load)
    report = env.analyze(load, start)
    record_cluster_scenario("15 cluster: kill -9 master x2, WAIT 1", report)

    assert_cluster_core(report, load)
    assert not report.lost
    assert not server_errors(load), load.answer_counts()
    figures = check_failover_lateness(env, load, failovers)
    retried = sum(1 for p in load.snapshot() if "503" in p.answers)
    print(f"[15] {figures}; posts answered 503 then retried: {retried}; {load.answer_counts()}")


def test_kill_9_of_a_master_without_wait_loses_only_what_its_replica_had_not_received(
    cluster_chaos: ClusterChaosEnv, cluster_faults: ClusterFaults, record_cluster_scenario: Record
) -> None:
    """EAT_WAIT_REPLICAS=0: a master answers before its replica has the write, so a
    master killed takes what its replica had not received. Counted as lost (the table's
    lost column), not failed: every lost message was answered by the killed master in the
    moments before it died (its replica's lag); anything else lost fails the row."""
    env = cluster_chaos
    load, start, failovers = kill_two_masters(env, cluster_faults, wait_replicas=0)
    risky = {f.port: at_risk(load, env, f) for f, _ in failovers}
    may_lose = set().union(*risky.values())
    env.settle(load, exclude=may_lose)
    report = env.analyze(load, start)
    lost_per_kill = {
        f"{'lagging ' if f.replica_lag else ''}master {f.port}": len(
            risky[f.port] & set(report.lost)
        )
        for f, _ in failovers
    }
    record_cluster_scenario("16 cluster: kill -9 master x2, no WAIT", report)

    assert_cluster_core(report, load, may_lose=may_lose)
    assert not server_errors(load), load.answer_counts()
    figures = check_failover_lateness(env, load, failovers)
    print(
        f"[16] lost per kill: {lost_per_kill} (at risk: "
        f"{ {p: len(u) for p, u in risky.items()} }); {figures}"
    )


# -- 17: a reshard ----------------------------------------------------------------------


def test_a_reshard_of_a_partitions_slot_under_load_loses_nothing_and_runs_nothing_early_or_twice(
    cluster_chaos: ClusterChaosEnv, cluster_faults: ClusterFaults, record_cluster_scenario: Record
) -> None:
    """Twice under load, a partition's slot moves to another master with its keys, one key
    per MIGRATE 50 ms apart: for a while the partition's scripts meet ASK (its keys gone)
    or TRYAGAIN (some here, some there), then MOVED. Every process follows; the api
    (EAT_WAIT_REPLICAS=1, so its own redirect handling) answers 503 at worst."""
    env = cluster_chaos
    cluster = env.start_cluster(env={"EAT_WAIT_REPLICAS": "1"})
    load = env.load(MESSAGES, DURATION).start()
    start = time.time()
    moves = []
    for moment, partition in ((3.0, 3), (7.5, 11)):
        at(load, moment)
        source = env.master_of(partition)
        target = next(m for m in env.redis_cluster.live_masters() if m.port != source.port)
        moves.append(cluster_faults.reshard(partition, target.port))
        assert env.master_of(partition).port == target.port
    env.settle(load)
    report = env.analyze(load, start)
    record_cluster_scenario("17 cluster: reshard a partition's slot x2", report)

    assert_cluster_core(report, load)
    assert not report.duplicated, describe_dups(report.duplicated)
    assert not server_errors(load), load.answer_counts()
    assert all(m["keys"] >= 3 for m in moves), f"a slot moved without its keys: {moves}"
    by_partition = lateness_by_partition(env, load.snapshot())
    moved = {3, 11}
    others = {p: v for p, v in by_partition.items() if p not in moved}
    assert max(max(v) for v in others.values()) <= HEALTHY_LATENESS_MS, worst(others)
    assert max(max(by_partition[p]) for p in moved) <= DISTURBED_LATENESS_MS, worst(by_partition)
    assert all(proc.running for proc in cluster.history), "a process died"
    print(
        f"[17] moves: {moves}; moved partitions' max lateness: "
        f"{ {p: max(by_partition[p]) for p in moved} } ms; {load.answer_counts()}"
    )


# -- 18, 19: no partition starves ---------------------------------------------------------


def test_skewed_load_all_in_one_partition_starves_no_other_partition(
    cluster_chaos: ClusterChaosEnv, cluster_faults: ClusterFaults, record_cluster_scenario: Record
) -> None:
    """The load (3,000 over 12 s) all in one partition, and twice a burst of 3,000 more due
    at one instant there, a backlog the workers take seconds to clear; meanwhile a trickle
    into every other partition. Each other partition is handled on time."""
    env = cluster_chaos
    cluster = env.start_cluster()
    hot = 5
    load = env.load(MESSAGES, DURATION, make_uuid=lambda: uuid_in(env, hot)).start()
    others = [p for p in range(env.partitions) if p != hot]
    cycle = iter(others * 1000)
    trickle = env.load(
        300, DURATION, threads=1, label="t", make_uuid=lambda: uuid_in(env, next(cycle))
    ).start()
    start = time.time()
    bursts = []
    for moment in (3.0, 7.5):
        at(load, moment)
        due = int((time.time() + 1.0) * 1000)
        items = [(uuid_in(env, hot), f"burst-{moment}-{i}", due) for i in range(3000)]
        bursts.append(post_bulk(cluster.apis[0].base_url, items))
    both = Loads(load, trickle, *bursts)
    env.settle(both)  # type: ignore[arg-type]
    report = env.analyze(both, start)
    record_cluster_scenario("18 cluster: skew, all in 1 of 16 partitions", report)

    assert_cluster_core(report, both)
    assert not report.duplicated, describe_dups(report.duplicated)
    by_partition = lateness_by_partition(env, both.snapshot())
    assert set(by_partition) == set(range(env.partitions)), "a partition got no message"
    cold = {p: v for p, v in by_partition.items() if p != hot}
    assert max(max(v) for v in cold.values()) <= HEALTHY_LATENESS_MS, (
        f"a partition starved beside the hot one: {worst(cold)}"
    )
    assert max(by_partition[hot]) <= BACKLOG_LATENESS_MS, max(by_partition[hot])
    print(
        f"[18] hot partition {hot}: {len(by_partition[hot])} messages, p99 "
        f"{percentile(by_partition[hot], 99)} max {max(by_partition[hot])} ms; the 15 others: "
        f"{sum(len(v) for v in cold.values())} messages, worst {max(worst(cold).values())} ms"
    )


def test_every_partition_falling_due_at_one_instant_starves_none(
    cluster_chaos: ClusterChaosEnv, cluster_faults: ClusterFaults, record_cluster_scenario: Record
) -> None:
    """The usual load, and twice 150 messages in each of the 16 partitions all due at one
    instant (2,400 at once): every partition's first message of the instant is handled
    within the healthy bound, and each partition's last one soon after."""
    env = cluster_chaos
    cluster = env.start_cluster()
    load = env.load(MESSAGES, DURATION).start()
    start = time.time()
    instants: list[tuple[int, Posted]] = []
    for moment in (3.0, 7.5):
        at(load, moment)
        due = int((time.time() + 1.5) * 1000)
        items = [
            (uuid_in(env, p), f"instant-{moment}-{p}-{i}", due)
            for i in range(150)
            for p in range(env.partitions)
        ]
        instants.append((due, post_bulk(cluster.apis[0].base_url, items)))
    both = Loads(load, *(posted for _, posted in instants))
    env.settle(both)  # type: ignore[arg-type]
    report = env.analyze(both, start)
    record_cluster_scenario("19 cluster: 16 partitions due at once x2", report)

    assert_cluster_core(report, both)
    assert not report.duplicated, describe_dups(report.duplicated)
    first_of_instant: dict[int, list[int]] = defaultdict(list)
    for _due, posted in instants:
        by_partition = lateness_by_partition(env, posted.snapshot())
        assert set(by_partition) == set(range(env.partitions))
        for p, values in by_partition.items():
            first_of_instant[p].append(min(values))
            assert max(values) <= BACKLOG_LATENESS_MS, (p, max(values))
        assert all(len(v) == 150 for v in by_partition.values())
    assert max(max(v) for v in first_of_instant.values()) <= HEALTHY_LATENESS_MS, (
        f"a partition's first message of the instant waited: {dict(first_of_instant)}"
    )
    load_lateness = [v for v in lateness_by_partition(env, load.snapshot()).values() for v in v]
    print(
        f"[19] first of each partition at the instant (ms): {dict(first_of_instant)}; "
        f"the instant's last: {max(report.lateness_ms)} ms; the load's p99 "
        f"{percentile(load_lateness, 99)} ms"
    )
