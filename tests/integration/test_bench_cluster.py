"""B8 and B9's tools against a real Redis Cluster: the backlog loader writes what an
accept writes, in the partition each uuid belongs to, on its master; balance() evens
the partitions over the masters and the product's client follows the moved slots."""

from __future__ import annotations

import asyncio

import redis

from app.model import NewMessage, State
from app.ops.cluster import RedisCluster
from app.settings import Settings
from app.store import open_client
from app.store.codec import uuid_text
from app.store.keys import Keyspace
from app.store.partitions import Partitions
from bench.loader import load_backlog
from bench.placement import balance, owners, partition_slot

FIRST_RUN_AT = 253402300000000  # far future: nothing falls due


def _env(url: str, prefix: str, partitions: int) -> dict[str, str]:
    return {
        "EAT_REDIS_URL": url,
        "EAT_PREFIX": prefix,
        "EAT_PARTITIONS": str(partitions),
        "EAT_REDIS_CLUSTER": "true",
    }


async def _lookup(env: dict[str, str], samples: list[tuple[int, str]]) -> list:
    settings = Settings.from_env(env)
    client = await open_client(settings)
    try:
        parts = Partitions(client, settings)
        return [
            (parts.index_of(uuid), await parts.store_for(uuid).record(uuid)) for _, uuid in samples
        ]
    finally:
        await client.aclose()


def test_load_backlog_writes_accepted_messages_into_each_uuids_partition_on_its_master(
    redis_cluster: RedisCluster, cluster_url: str, prefix: str
):
    count, partitions = 3_000, 4
    env = _env(cluster_url, prefix, partitions)
    urls = [redis_cluster.nodes[o].url for o in owners(redis_cluster, prefix, partitions)]

    written = asyncio.run(load_backlog(env, urls, count, FIRST_RUN_AT, batch=200, in_flight=3))

    assert sum(written) == count and all(w > 0 for w in written)
    samples = []
    for p, url in enumerate(urls):
        with redis.Redis.from_url(url) as node:
            keys = Keyspace(prefix, p)
            assert node.zcard(keys.delayed) == node.hlen(keys.messages) == written[p]
            samples += [(p, uuid_text(u)) for u in node.hrandfield(keys.messages, 5)]
    found = asyncio.run(_lookup(env, samples))
    for (p, _uuid), (found_in, record) in zip(samples, found, strict=True):
        assert found_in == p
        assert record.state is State.SCHEDULED
        assert FIRST_RUN_AT <= record.run_at < FIRST_RUN_AT + count


def test_balance_evens_the_partitions_over_the_masters_and_clients_follow(tmp_path):
    # The default prefix falls 4/6/6 over three fresh masters (partition 14 on the second).
    with RedisCluster(tmp_path / "cluster") as cluster:
        before, after = balance(cluster, "eat", 16)

        assert sorted(before.count(m) for m in range(3)) == [4, 6, 6]
        assert sorted(after.count(m) for m in range(3)) == [5, 5, 6]
        assert all(owners(cluster, "eat", 16, node.port) == after for node in cluster.nodes)
        moved = [p for p in range(16) if before[p] != after[p]]
        assert len(moved) == 1

        env = _env(cluster.url, "eat", 16)
        settings = Settings.from_env(env)

        async def accept_in_moved() -> str:
            client = await open_client(settings)
            try:
                parts = Partitions(client, settings)
                uuid = next(
                    u
                    for u in (f"00000000-0000-4000-8000-{i:012x}" for i in range(10_000))
                    if parts.index_of(u) == moved[0]
                )
                await parts.accept_many([NewMessage(uuid, "x", FIRST_RUN_AT)])
                return uuid
            finally:
                await client.aclose()

        asyncio.run(accept_in_moved())
        target = cluster.nodes[after[moved[0]]]
        with redis.Redis(port=target.port) as node:
            assert node.cluster("countkeysinslot", partition_slot("eat", moved[0])) > 0
