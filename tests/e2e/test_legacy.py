"""End to end: old producers' legacy lists, with real api, scheduler and worker processes.

The legacy lists are named after the test's prefix (``{prefix}:Queue`` ...)
through the EAT_LEGACY_* variables, so tests never share them. Items are pushed
with LPUSH as the original service's producers did; "once" is each uuid's echo
count across every worker, after the stream, the delayed set and the three
lists are all empty.
"""

from __future__ import annotations

import json
import random
import time
import uuid as uuidlib
from collections.abc import Callable
from typing import Any

import pytest
import redis

from app.store.keys import CONSUMER_GROUP, Keyspace, LegacyLists
from election.bridge import legacy_uuid
from tests.e2e.harness import (
    Cluster,
    ServiceProcess,
    accepted_uuids,
    assert_echoed_exactly_once,
    now_ms,
)

pytestmark = pytest.mark.e2e

BRIDGE_RUNNING = "legacy bridge running"  # the bridge's log event once it works for a leader


def new_uuid() -> str:
    return str(uuidlib.uuid4())


def legacy_lists(prefix: str) -> LegacyLists:
    tag = "{" + prefix + "}"
    return LegacyLists(f"{tag}:QueueDelayed", f"{tag}:Queue", f"{tag}:QueueDead")


def legacy_env(prefix: str) -> dict[str, str]:
    lists = legacy_lists(prefix)
    return {
        "EAT_LEGACY_QUEUE": lists.queue,
        "EAT_LEGACY_DELAYED": lists.delayed,
        "EAT_LEGACY_IN_FLIGHT": lists.in_flight,
    }


def item(message: str, run_at: int, uuid: str | None) -> tuple[bytes, str]:
    """A legacy item and the uuid it will be echoed under."""
    fields: dict[str, Any] = {"message": message, "runAt": run_at}
    if uuid is not None:
        fields["uuid"] = uuid
    raw = json.dumps(fields).encode()
    return raw, uuid or legacy_uuid(raw)


def is_drained(client: redis.Redis, keys: Keyspace, lists: LegacyLists) -> bool:
    """Nothing in a legacy list, scheduled, in the stream or pending: all work is done."""
    if any(client.llen(name) for name in (lists.queue, lists.delayed, lists.in_flight)):
        return False
    if client.zcard(keys.delayed) or client.xlen(keys.stream):
        return False
    try:
        return client.xpending(keys.stream, CONSUMER_GROUP)["pending"] == 0
    except redis.ResponseError:
        return True


def settle(
    c: Cluster, client: redis.Redis, prefix: str, expected: set[str], seconds: float
) -> list[dict[str, Any]]:
    keys, lists = Keyspace(prefix), legacy_lists(prefix)

    def done() -> bool:
        echoed = {e["uuid"] for e in c.all_echoes()}
        return expected <= echoed and is_drained(client, keys, lists)

    c.wait_until(done, f"{len(expected)} messages echoed and everything drained", seconds)
    return c.all_echoes()


def bridge_runs(proc: ServiceProcess) -> list[dict[str, Any]]:
    return [line for line in proc.log_lines() if line.get("event") == BRIDGE_RUNNING]


def test_kill_9_of_the_bridge_running_leader_with_items_in_flight_loses_and_duplicates_nothing(
    cluster: Callable[..., Cluster], redis_client: redis.Redis, prefix: str
) -> None:
    c = cluster(env=legacy_env(prefix))
    lists = legacy_lists(prefix)
    leader = c.leader()
    assert leader is not None
    epoch = c.leader_epoch(leader)
    c.wait_until(lambda: bridge_runs(leader), "the leader's bridge to run", 10)
    api = c.client()
    start = now_ms()

    # The state a crash between the move and the removal leaves: items in QueueDead,
    # some already accepted (here through the API, same uuid and body), some not.
    in_flight: list[tuple[bytes, str]] = []
    for i in range(150):
        uuid = new_uuid() if i % 5 else None
        raw, echoed_as = item(f"in flight {i}", start + 1500 + i, uuid)
        in_flight.append((raw, echoed_as))
        if i % 3 == 0:
            post = api.post(f"in flight {i}", start + 1500 + i, echoed_as)
            assert post.status == 201, post.body
    # And the bridge busy with fresh items when the kill comes.
    fresh = [item(f"fresh {i}", start, new_uuid() if i % 4 else None) for i in range(400)]
    redis_client.lpush(lists.in_flight, *[raw for raw, _ in in_flight])
    redis_client.lpush(lists.queue, *[raw for raw, _ in fresh[:200]])
    redis_client.lpush(lists.delayed, *[raw for raw, _ in fresh[200:]])

    leader.kill()
    successor = c.wait_for_leader(30, newer_than=epoch).process
    assert successor is not leader
    runs = c.wait_until(lambda: bridge_runs(successor), "the successor's bridge", 10)
    assert runs[0]["redriven"] >= len(in_flight), runs[0]

    expected = {u for _, u in in_flight} | {u for _, u in fresh}
    echoes = settle(c, redis_client, prefix, expected, 60)
    assert_echoed_exactly_once(expected, echoes)


def test_one_thousand_legacy_items_mixed_with_http_messages_are_each_echoed_once_within_60s(
    cluster: Callable[..., Cluster], redis_client: redis.Redis, prefix: str
) -> None:
    c = cluster(env=legacy_env(prefix))
    lists = legacy_lists(prefix)
    api = c.client()
    rng = random.Random(11)
    began = time.monotonic()
    start = now_ms()

    expected: set[str] = set()
    posts = []
    for round_ in range(10):
        batch: dict[str, list[bytes]] = {lists.queue: [], lists.delayed: []}
        for i in range(100):
            n = round_ * 100 + i
            uuid = new_uuid() if rng.random() < 0.8 else None
            if rng.random() < 0.5:
                raw, echoed_as = item(f"legacy now {n}", start, uuid)
                batch[lists.queue].append(raw)
            else:
                raw, echoed_as = item(f"legacy at {n}", start + rng.randint(0, 3000), uuid)
                batch[lists.delayed].append(raw)
            expected.add(echoed_as)
        for name, raws in batch.items():
            if raws:
                redis_client.lpush(name, *raws)
        for i in range(30):
            run_at = start + rng.randint(-500, 3000)
            posts.append(api.post(f"http {round_}-{i}", run_at, new_uuid()))
    assert len(expected) == 1000
    assert all(p.status == 201 for p in posts), [p.body for p in posts if p.status != 201][:3]
    expected |= accepted_uuids(posts)

    echoes = settle(c, redis_client, prefix, expected, 60)
    assert_echoed_exactly_once(expected, echoes)
    assert time.monotonic() - began < 60
    print(f"[legacy] 1000 items + {len(posts)} HTTP echoed in {time.monotonic() - began:.1f} s")


def test_a_legacy_item_nested_too_deeply_is_dead_lettered_and_no_scheduler_exits(
    cluster: Callable[..., Cluster], redis_client: redis.Redis, prefix: str
) -> None:
    """Such an item used to end the leader's bridge, and with it (supervised) the leader;
    left in QueueDead, it ended every next leader the same way: a crash loop."""
    lists = legacy_lists(prefix)
    deep = b"[" * 5000 + b"]" * 5000
    hostile = [
        b'{"message": "left in flight", "runAt": 0, "x": ' + deep + b"}",
        b'{"message": "waiting", "runAt": 0, "x": ' + deep + b"}",
    ]
    redis_client.lpush(lists.in_flight, hostile[0])
    redis_client.lpush(lists.delayed, hostile[1])
    c = cluster(env=legacy_env(prefix), apis=0)
    c.wait_until(
        lambda: redis_client.xlen(Keyspace(prefix).dead) == 2,
        "both hostile items dead-lettered",
        20,
    )
    raw, uuid = item("after them", now_ms(), new_uuid())
    redis_client.lpush(lists.queue, raw)
    settle(c, redis_client, prefix, {uuid}, 20)
    assert all(p.running for p in c.schedulers), [p.describe() for p in c.schedulers]
    dead = [fields for _, fields in redis_client.xrange(Keyspace(prefix).dead)]
    assert sorted(e[b"raw"] for e in dead) == sorted(hostile)
