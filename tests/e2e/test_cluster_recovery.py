"""A whole stack on the 3-master Redis Cluster with 16 partitions: idempotency across api
processes, and scripts flushed from a master while messages flow.

Both come from issue 12's tests: the same uuid posted through two api processes,
concurrently, many times, is one message delivered once (a uuid's partition is a fixed
function of its bytes, so every api meets the same record); and ``SCRIPT FLUSH`` on one
master (what a restarted master or a promoted replica looks like to a client: an empty
script cache) is recovered by every process without a failed request.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis

from tests.e2e.conftest import Backend
from tests.e2e.harness import ApiClient, Cluster, Posted, assert_echoed_exactly_once, now_ms
from tests.e2e.test_pipeline import new_uuid, settle

ON_CLUSTER = [pytest.param("cluster", id="cluster-16-partitions")]


@pytest.mark.parametrize("backend", ON_CLUSTER, indirect=True)
def test_one_uuid_posted_concurrently_through_two_apis_many_times_is_one_message_echoed_once(
    cluster: Callable[..., Cluster], backend: Backend
) -> None:
    c = cluster(apis=2, schedulers=1, workers=2)
    uuids = [new_uuid() for _ in range(40)]
    assert len({backend.partition_of(u) for u in uuids}) > 8, "too few partitions used"
    # Half due now, half a second ahead: both the stream and the delayed set are raced.
    run_at = {u: now_ms() + (0 if i % 2 else 1500) for i, u in enumerate(uuids)}
    clients = [c.client(0), c.client(1), c.client(0), c.client(1)]  # 2 connections per api
    locks = [threading.Lock() for _ in clients]
    rounds = 10

    def post(job: tuple[int, str, int]) -> tuple[str, Posted]:
        index, uuid, n = job
        with locks[index]:  # an httpx.Client is not shared between threads
            return uuid, clients[index].post(f"{uuid} via {index} #{n}", run_at[uuid], uuid)

    jobs = [(i, u, n) for n in range(rounds) for u in uuids for i in range(len(clients))]
    with ThreadPoolExecutor(max_workers=len(clients)) as pool:
        answers = list(pool.map(post, jobs))
    for client in clients:
        client.close()

    by_uuid: dict[str, list[Posted]] = defaultdict(list)
    for uuid, answer in answers:
        by_uuid[uuid].append(answer)
    for uuid, posted in by_uuid.items():
        statuses = Counter(p.status for p in posted)
        assert statuses == {201: 1, 200: len(posted) - 1}, (uuid, statuses)
        assert {p.body["runAt"] for p in posted} == {run_at[uuid]}
        created = next(p for p in posted if p.status == 201)
        assert all(p.body.get("duplicate") for p in posted if p is not created)

    echoes = settle(c, backend, set(uuids), 15)
    assert_echoed_exactly_once(set(uuids), echoes)
    first = {
        u: next(p for p in by_uuid[u] if p.status == 201).message for u in uuids
    }  # the body that won is the one echoed
    assert {e["uuid"]: e["message"] for e in echoes} == first


@pytest.mark.parametrize("backend", ON_CLUSTER, indirect=True)
def test_scripts_flushed_on_a_master_under_traffic_are_reloaded_without_a_failed_request(
    cluster: Callable[..., Cluster], backend: Backend, redis_cluster
) -> None:
    """SCRIPT FLUSH, three times, on the master serving the most partitions while the api
    accepts, the leader promotes and the workers acknowledge: every post answered 201 at
    the first try (no 5xx, no retry), every message echoed once."""
    c = cluster(apis=1, schedulers=2, workers=2)
    client = backend.client
    assert isinstance(client, redis.RedisCluster)
    per_master = Counter(client.get_node_from_key(keys.stream).port for keys in backend.keyspaces)
    port, served = per_master.most_common(1)[0]
    posts: list[Posted] = []
    stop = threading.Event()

    def traffic() -> None:
        with ApiClient(c.apis[0].base_url) as api:
            n = 0
            while not stop.is_set():
                # Due now (the stream, the ack) and up to 1.5 s ahead (the promotion).
                posts.append(api.post(f"m{n}", now_ms() + (n % 4) * 500, new_uuid()))
                n += 1
                time.sleep(0.005)

    noscript_before = noscript_errors(port)
    poster = threading.Thread(target=traffic, name="traffic")
    poster.start()
    flushed = 0
    try:
        for _ in range(3):
            time.sleep(0.7)
            with redis.Redis(port=port) as master:
                assert master.script_flush()
            flushed += 1
        time.sleep(0.7)
    finally:
        stop.set()
        poster.join(15)
    assert flushed == 3 and served >= 3
    # The case was exercised: the master answered NOSCRIPT after the flushes.
    noscript = noscript_errors(port) - noscript_before
    assert noscript > 0, "no process met NOSCRIPT"

    refused = [p for p in posts if p.status != 201]
    assert not refused, f"{len(refused)} of {len(posts)} posts failed: {refused[:3]}"
    on_master = [p for p in posts if backend.partition_of(p.uuid) in partitions_on(backend, port)]
    assert len(on_master) > 50, "too little traffic on the flushed master"
    expected = {p.uuid for p in posts}
    echoes = settle(c, backend, expected, 20)
    assert_echoed_exactly_once(expected, echoes)
    print(
        f"[noscript] {len(posts)} posts, {len(on_master)} on the flushed master, all 201; "
        f"NOSCRIPT answered {noscript} times"
    )


def partitions_on(backend: Backend, port: int) -> set[int]:
    client = backend.client
    assert isinstance(client, redis.RedisCluster)
    return {
        p
        for p, keys in enumerate(backend.keyspaces)
        if client.get_node_from_key(keys.stream).port == port
    }


def noscript_errors(port: int) -> int:
    """How many NOSCRIPT errors the Redis on ``port`` has answered (INFO errorstats)."""
    with redis.Redis(port=port) as master:
        stats = master.info("errorstats")
    return int(stats.get("errorstat_NOSCRIPT", {}).get("count", 0))
