"""Chaos for recurring schedules: what the failover suite does to the leader, while
every-second schedules run next to the ordinary load. Each occurrence is a message the
checker expects exactly once (a post of its own, uuid derived as the leader derives it),
so the row's lost/duplicated/early columns count occurrences and load messages alike.
"""

from __future__ import annotations

import time

import httpx
import pytest

from app.recurrence import occurrence_uuid
from tests.chaos.checker import analyze
from tests.chaos.load import Post
from tests.chaos.rig import SESSION_TIMEOUT, ChaosEnv, Faults
from tests.chaos.test_failover import DURATION, MESSAGES, Record, assert_core, at

pytestmark = pytest.mark.chaos

SCHEDULES = 3


def test_schedules_keep_exactly_one_message_per_occurrence_through_leader_kills_and_a_zombie(
    chaos: ChaosEnv, faults: Faults, record_scenario: Record
) -> None:
    cluster = chaos.start_cluster()
    api = httpx.Client(base_url=chaos.api_urls()[0], timeout=10)
    defined = {}
    for i in range(SCHEDULES):
        answer = api.put(
            f"/api/v1/schedules/s{i}", json={"message": f"occurrence s{i}", "every": "1s"}
        )
        assert answer.status_code == 201, answer.text
        defined[f"s{i}"] = answer.json()
    load = chaos.load(MESSAGES // 2, DURATION).start()
    start = time.time()

    for moment, fault in ((2.5, "kill"), (6.5, "zombie"), (10.5, "kill")):
        at(load, moment)
        leader = cluster.leader()
        assert leader is not None
        old_epoch = cluster.leader_epoch(leader)
        if fault == "kill":
            faults.kill(leader)
            cluster.wait_for_leader(SESSION_TIMEOUT + 5, newer_than=old_epoch)
            faults.restart(leader)
        else:  # frozen past its session while a new leader produces occurrences
            faults.pause(leader)
            cluster.wait_for_leader(SESSION_TIMEOUT + 5, newer_than=old_epoch)
            time.sleep(1.0)
            faults.resume(leader)
            cluster.wait_until(
                lambda leader=leader: any(
                    str(line.get("event")).startswith("leadership lost")
                    for line in leader.log_lines()
                ),
                "the zombie to learn it lost its session",
                10,
            )
    at(load, DURATION + 1)
    for name in defined:
        assert api.delete(f"/api/v1/schedules/{name}").status_code == 200
    deleted_ms = int(time.time() * 1000)
    api.close()

    # Occurrences due up to a second before the delete are expected, each once; those
    # after it must never run (an echo of one is an "unknown echo"); the second around
    # the delete may have run or not.
    posts, around = [], set()
    for name, body in defined.items():
        at_ms = body["createdAt"] + 1000
        while at_ms <= deleted_ms + 40_000:
            uuid = occurrence_uuid(name, body["generation"], at_ms)
            if at_ms < deleted_ms - 1000:
                posts.append(Post(uuid, name, at_ms, "delayed", 0, len(posts), status=201))
            elif at_ms <= deleted_ms + 1000:
                around.add(uuid)
            at_ms += 1000
    chaos.settle(load)
    cluster.wait_until(chaos.drained, "every occurrence handled", 15)
    report = analyze(
        cluster,
        [*load.snapshot(), *posts],
        chaos.timeline,
        start=start,
        end=time.time(),
        exclude=around,
    )
    print(f"occurrences expected once: {len(posts)}; around the delete: {len(around)}")
    record_scenario("20 schedules 3x1s: kill -9 x2 + zombie", report)

    assert_core(report, load)
    assert report.inversions == 0, report.inversion_examples
    assert report.leader_changes >= 3
