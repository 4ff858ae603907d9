"""The api with several partitions, in-process: on the session's 3-master Redis Cluster
with EAT_PARTITIONS=16, and on one Redis with EAT_PARTITIONS=4 (the same tests).

Single posts, bulk, lookup, cancel, reschedule, /stats, /dead paging, replay and purge:
each lands in, or spans, the partitions of the uuids concerned.
"""

from __future__ import annotations

import asyncio
import uuid as uuidlib
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis
import redis.cluster

from app.http.app import create_app
from app.settings import Settings
from app.store import open_client
from app.store.codec import uuid_key
from app.store.keys import Keyspace, partition_of
from app.store.partitions import Partitions

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", "Using `httpx` with `starlette.testclient`", UserWarning)
    from starlette.testclient import TestClient

V1 = "/api/v1"
FAR = 253402300799999


@dataclass
class Deployment:
    settings: Settings
    raw: Any  # a synchronous client of the same Redis (or cluster)
    cluster: bool

    @property
    def count(self) -> int:
        return self.settings.partitions

    def keys(self, p: int) -> Keyspace:
        return Keyspace(self.settings.prefix, p)


@pytest.fixture(params=["cluster-16", "redis-4"])
def deployment(request: pytest.FixtureRequest, prefix: str) -> Iterator[Deployment]:
    if request.param == "cluster-16":
        url = request.getfixturevalue("cluster_url")  # deletes the prefix's keys afterwards
        raw = redis.cluster.RedisCluster.from_url(url)
        settings = Settings.from_env(
            {}, redis_url=url, prefix=prefix, partitions=16, max_deliveries=1
        )
        try:
            yield Deployment(settings, raw, cluster=True)
        finally:
            raw.close()
    else:
        raw = request.getfixturevalue("redis_client")  # deletes the prefix's keys afterwards
        url = request.getfixturevalue("redis_url")
        settings = Settings.from_env(
            {}, redis_url=url, prefix=prefix, partitions=4, max_deliveries=1
        )
        yield Deployment(settings, raw, cluster=False)


@pytest.fixture
def client(deployment: Deployment) -> Iterator[TestClient]:
    with TestClient(create_app(deployment.settings), raise_server_exceptions=True) as test_client:
        yield test_client


def uuids_over(count: int, each: int = 2) -> list[str]:
    """At least ``each`` uuids in every one of ``count`` partitions."""
    found: dict[int, list[str]] = {p: [] for p in range(count)}
    while any(len(v) < each for v in found.values()):
        u = str(uuidlib.uuid4())
        p = partition_of(uuid_key(u), count)
        if len(found[p]) < each:
            found[p].append(u)
    return [u for p in range(count) for u in found[p]]


def save(client: TestClient, uuid: str, run_at: int = FAR, status: int = 201) -> dict:
    response = client.post(
        f"{V1}/save-message", json={"message": uuid, "runAt": run_at, "uuid": uuid}
    )
    assert response.status_code == status, response.text
    return response.json()


def partition_holding(d: Deployment, uuid: str) -> list[int]:
    return [p for p in range(d.count) if d.raw.hexists(d.keys(p).messages, uuid_key(uuid))]


def kill_all(d: Deployment) -> int:
    """The worker's side: read every partition's stream and fail each delivery once (one
    delivery allowed): all dead. How many."""

    async def scenario() -> int:
        client = await open_client(d.settings)
        try:
            dead = 0
            for store in Partitions(client, d.settings).stores:
                await store.ensure_group()
                for delivery in await store.read("w", 1000, None):
                    outcome, _ = await store.fail(delivery, 0, "ValueError: boom")
                    dead += outcome == "dead"
            return dead
        finally:
            await client.aclose()

    return asyncio.run(asyncio.wait_for(scenario(), 30))


# --- single messages -------------------------------------------------------------------------


def test_each_post_lands_in_its_uuids_partition_and_a_repost_is_a_duplicate(
    deployment: Deployment, client: TestClient
) -> None:
    uuids = uuids_over(deployment.count)
    for u in uuids:
        assert save(client, u)["state"] == "scheduled"
    for u in uuids:
        assert partition_holding(deployment, u) == [partition_of(uuid_key(u), deployment.count)]
    for u in uuids:
        again = save(client, u, run_at=0, status=200)
        assert again == {"uuid": u, "runAt": FAR, "state": "scheduled", "duplicate": True}
    total = sum(deployment.raw.hlen(deployment.keys(p).messages) for p in range(deployment.count))
    assert total == len(uuids)


def test_concurrent_posts_of_many_uuids_each_stored_once_in_its_partition(
    deployment: Deployment, client: TestClient
) -> None:
    uuids = [str(uuidlib.uuid4()) for _ in range(200)]

    async def post_all() -> list[int]:
        transport = __import__("httpx").ASGITransport(app=client.app)
        async with __import__("httpx").AsyncClient(transport=transport, base_url="http://t") as c:
            replies = await asyncio.gather(
                *(
                    c.post(f"{V1}/save-message", json={"message": "m", "runAt": FAR, "uuid": u})
                    for u in uuids + uuids[:50]
                )
            )
        return [r.status_code for r in replies]

    statuses = client.portal.call(post_all)
    assert Counter(statuses) == {201: 200, 200: 50}
    for u in uuids:
        assert partition_holding(deployment, u) == [partition_of(uuid_key(u), deployment.count)]


def test_lookup_cancel_and_reschedule_reach_a_message_in_any_partition(
    deployment: Deployment, client: TestClient
) -> None:
    uuids = uuids_over(deployment.count, each=1)
    for u in uuids:
        save(client, u)
    for u in uuids:
        assert client.get(f"{V1}/messages/{u}").json()["state"] == "scheduled"
        moved = client.patch(f"{V1}/messages/{u}", json={"runAt": FAR - 1})
        assert moved.json() == {"uuid": u, "runAt": FAR - 1, "state": "scheduled"}
        cancelled = client.delete(f"{V1}/messages/{u}")
        assert cancelled.json() == {"uuid": u, "runAt": FAR - 1, "state": "cancelled"}
        p = partition_of(uuid_key(u), deployment.count)
        assert deployment.raw.zcard(deployment.keys(p).delayed) == 0
    unknown = str(uuidlib.uuid4())
    assert client.get(f"{V1}/messages/{unknown}").status_code == 404


# --- bulk ------------------------------------------------------------------------------------


def test_bulk_mixes_partitions_and_answers_each_item_in_order(
    deployment: Deployment, client: TestClient
) -> None:
    uuids = uuids_over(deployment.count, each=1)
    save(client, uuids[3])  # accepted before: a duplicate in the bulk
    items: list[Any] = [{"message": u, "runAt": FAR, "uuid": u} for u in uuids]
    items.insert(5, {"message": "no runAt"})
    items.append({"message": "again", "runAt": 0, "uuid": uuids[0]})  # repeated in the request
    body = client.post(f"{V1}/save-messages", json=items).json()
    results = body["results"]
    assert [r["index"] for r in results] == list(range(len(items)))
    expected = ["accepted"] * len(uuids)
    expected[3] = "duplicate"
    expected.insert(5, "invalid")
    expected.append("duplicate")
    assert [r["status"] for r in results] == expected
    valid = [r for r in results if r["status"] != "invalid"]
    assert [r["uuid"] for r in valid] == [*uuids, uuids[0]]
    assert (body["accepted"], body["duplicates"], body["invalid"]) == (len(uuids) - 1, 2, 1)
    for u in uuids:
        assert partition_holding(deployment, u) == [partition_of(uuid_key(u), deployment.count)]


# --- across partitions -----------------------------------------------------------------------


def test_stats_lists_every_partition_and_the_sums_match(
    deployment: Deployment, client: TestClient
) -> None:
    uuids = uuids_over(deployment.count, each=2)
    for u in uuids[: deployment.count]:
        save(client, u)  # delayed
    for u in uuids[deployment.count :]:
        save(client, u, run_at=0)  # due: in the stream
    body = client.get(f"{V1}/stats").json()
    parts = body["partitions"]
    assert [p["partition"] for p in parts] == list(range(deployment.count))
    for name in ("delayed", "streamLength", "pending", "lag", "dead"):
        assert body[name] == sum(p[name] for p in parts), name
    assert (body["delayed"], body["streamLength"], body["lag"]) == (
        deployment.count,
        deployment.count,
        deployment.count,
    )
    for p in parts:
        held = deployment.raw.hlen(deployment.keys(p["partition"]).messages)
        assert p["delayed"] + p["streamLength"] == held
    if deployment.cluster:
        owners = {
            p["partition"]: deployment.raw.get_node_from_key(
                deployment.keys(p["partition"]).delayed
            )
            for p in parts
        }
        assert all(
            p["master"] == f"{owners[p['partition']].host}:{owners[p['partition']].port}"
            for p in parts
        )
        assert len({p["master"] for p in parts}) == 3
    else:
        assert all(p["master"] is None for p in parts)


def test_dead_pages_over_the_partitions_in_order_without_skipping_or_repeating(
    deployment: Deployment, client: TestClient
) -> None:
    for u in uuids_over(deployment.count, each=3):
        save(client, u, run_at=0)
    initial = kill_all(deployment)
    assert initial == 3 * deployment.count
    seen: list[dict] = []
    cursor = None
    added: list[str] = []
    while True:
        query = {"limit": 5} | ({"cursor": cursor} if cursor else {})
        page = client.get(f"{V1}/dead", params=query).json()
        seen += page["items"]
        cursor = page["next"]
        if cursor is None:
            break
        # Meanwhile, more messages die (in whichever partitions their uuids fall).
        if len(added) < 2 * deployment.count:
            batch = [str(uuidlib.uuid4()) for _ in range(3)]
            for u in batch:
                save(client, u, run_at=0)
            assert kill_all(deployment) == len(batch)
            added += batch
    keys = [(tuple(int(x) for x in i["id"].split("-")), i["partition"]) for i in seen]
    assert keys == sorted(keys), "oldest first, over the partitions"
    assert len(set(keys)) == len(keys), "nothing repeated"
    shown = Counter(i["uuid"] for i in seen)
    assert all(n == 1 for n in shown.values())
    everything = client.get(f"{V1}/dead", params={"limit": 1000}).json()["items"]
    first = {i["uuid"] for i in everything} - set(added)
    assert len(first) == initial and first <= set(shown), "every entry there at the start shown"
    for item in seen:
        assert item["partition"] == partition_of(uuid_key(item["uuid"]), deployment.count)


def test_dead_cursor_refuses_a_partition_that_does_not_exist_and_reads_the_old_form(
    deployment: Deployment, client: TestClient
) -> None:
    bad = client.get(f"{V1}/dead", params={"cursor": f"1-0-{deployment.count}"})
    assert bad.status_code == 422 and bad.json()["field"] == "cursor"
    for cursor in ("1-0-0", "1-0", f"1-0-{deployment.count - 1}"):
        assert client.get(f"{V1}/dead", params={"cursor": cursor}).status_code == 200


def test_replay_all_and_purge_span_every_partition(
    deployment: Deployment, client: TestClient
) -> None:
    uuids = uuids_over(deployment.count, each=1)
    for u in uuids:
        save(client, u, run_at=0)
    assert kill_all(deployment) == len(uuids)
    assert client.post(f"{V1}/dead/replay").json() == {"replayed": len(uuids), "skipped": 0}
    stats = client.get(f"{V1}/stats").json()
    assert (stats["dead"], stats["streamLength"]) == (0, len(uuids))
    assert kill_all(deployment) == len(uuids)
    one = uuids[-1]
    assert client.post(f"{V1}/dead/{one}/replay").json() == {"uuid": one, "state": "queued"}
    assert client.delete(f"{V1}/dead/{uuids[0]}").json() == {"uuid": uuids[0], "deleted": True}
    assert client.delete(f"{V1}/dead").json() == {"deleted": len(uuids) - 2}
    assert all(deployment.raw.xlen(deployment.keys(p).dead) == 0 for p in range(deployment.count))


def test_metrics_show_each_partitions_figures_and_they_sum_to_the_totals(
    deployment: Deployment, client: TestClient
) -> None:
    uuids = uuids_over(deployment.count, each=1)
    for u in uuids:
        save(client, u)
    text = client.get("/metrics").text
    delayed = {
        line.split('partition="')[1].split('"')[0]: float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("eat_delayed_messages{")
    }
    assert delayed == {str(p): 1.0 for p in range(deployment.count)}
