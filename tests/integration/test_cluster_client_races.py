"""The cluster client when its connections are closed under running commands.

redis-py's asyncio cluster client answers CLUSTERDOWN (every node says so between a
master's failure and its replica's promotion) by closing the connections of every node,
those carrying other tasks' commands to healthy masters too, and rebuilding its slot
map. A command caught that way must fail as a lost connection (a RedisError the loops
retry, or an outcome unknown), never with an AttributeError or a RuntimeError from
inside the stream: those are bugs to a task Supervisor, and the process would exit
(the chaos rows on a cluster saw every scheduler exit at once on a master's kill -9).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis.exceptions import RedisError

from app.model import NewMessage
from app.ops.cluster import RedisCluster
from app.settings import Settings
from app.store import open_client
from app.store.codec import uuid_key
from app.store.keys import partition_of
from app.store.partitions import Partitions

PARTITIONS = 16
FUTURE = 253402300799999


@pytest.fixture
def settings(cluster_url: str, prefix: str) -> Settings:
    return Settings.from_env({}, redis_url=cluster_url, prefix=prefix, partitions=PARTITIONS)


def test_commands_whose_connections_a_cluster_refresh_closes_fail_as_redis_errors_only(
    settings: Settings,
) -> None:
    async def scenario() -> tuple[int, list[BaseException]]:
        client = await open_client(settings)
        partitions = Partitions(client, settings)
        failures: list[BaseException] = []
        done = 0
        stop = asyncio.Event()

        async def traffic() -> None:
            nonlocal done
            while not stop.is_set():
                try:
                    msgs = [NewMessage(str(uuidlib.uuid4()), "m", FUTURE) for _ in range(4)]
                    await partitions.accept_many(msgs)
                    await partitions.queue_stats()
                    done += 1
                except Exception as exc:  # sorted out by the assertion
                    failures.append(exc)

        async def refresh() -> None:
            # What RedisCluster.aclose() does on CLUSTERDOWN: every node disconnected.
            for _ in range(60):
                await asyncio.sleep(0.01)
                await client.nodes_manager.aclose()
                client._initialize = True  # as aclose() leaves it
            stop.set()

        try:
            await asyncio.gather(refresh(), *(traffic() for _ in range(40)))
        finally:
            with contextlib.suppress(Exception):
                await client.aclose()
        return done, failures

    done, failures = asyncio.run(asyncio.wait_for(scenario(), 60))
    not_redis = [f"{type(f).__name__}: {f}" for f in failures if not isinstance(f, RedisError)]
    assert not not_redis, (
        f"{len(not_redis)} of {len(failures)} failures not RedisErrors: {not_redis[:3]}"
    )
    assert done > 0


# --- a master dies ---------------------------------------------------------------------


@pytest.fixture
def own_cluster(tmp_path: Path) -> Iterator[RedisCluster]:
    """3 masters of this test's own (one is killed)."""
    cluster = RedisCluster(tmp_path / "cluster", masters=3).start()
    try:
        yield cluster
    finally:
        cluster.stop()


def test_a_client_whose_default_node_is_a_dead_master_serves_the_other_masters_partitions(
    own_cluster: RedisCluster, prefix: str
) -> None:
    """The default node (the first master of the client's slot map) dies while a refresh
    of the map is due (a refused connection, a MOVED, CLUSTERDOWN set it). The partitions
    of the other masters go on being written and read: redis-py would read its command
    table, and every read's key, from the default node, so that every command of every
    partition failed until a failover took the dead node out of the map (the chaos rows
    saw the leader promote nothing for seconds)."""
    settings = Settings.from_env(
        {}, redis_url=own_cluster.url, prefix=prefix, partitions=PARTITIONS
    )

    async def scenario() -> dict[int, str]:
        client = await open_client(settings)
        try:
            partitions = Partitions(client, settings)
            for store in partitions.stores:
                await store.ensure_group()
            manager = client.nodes_manager
            victim = next(n for n in client.get_primaries() if n.port != own_cluster.nodes[0].port)
            # First in the map's order, so that every refresh makes it the default node.
            manager.nodes_cache = {
                victim.name: victim,
                **{name: n for name, n in manager.nodes_cache.items() if name != victim.name},
            }
            manager.default_node = victim
            stores = dict(enumerate(partitions.stores))
            live = [
                p
                for p, s in stores.items()
                if client.get_node_from_key(s.keys.stream).port != victim.port
            ]
            next(n for n in own_cluster.nodes if n.port == victim.port).process.kill()
            client._initialize = True  # a refresh is due, as after any refused connection
            outcome: dict[int, str] = {}
            for p in live:
                uid = uuid_in(p)
                deadline = time.monotonic() + 1.0
                while True:  # a loop would retry a Redis error: for a second, here
                    try:
                        await partitions.accept_many([NewMessage(uid, "m", 0)])
                        got = await stores[p].read("c", 10, None)
                        outcome[p] = "ok" if [d.uuid for d in got] == [uid] else f"read {got}"
                        break
                    except RedisError as exc:
                        outcome[p] = f"{type(exc).__name__}: {exc}"
                        if time.monotonic() > deadline:
                            break
                        await asyncio.sleep(0.05)
            return outcome
        finally:
            with contextlib.suppress(Exception):
                await client.aclose()

    def uuid_in(partition: int) -> str:
        while True:
            candidate = str(uuidlib.uuid4())
            if partition_of(uuid_key(candidate), PARTITIONS) == partition:
                return candidate

    outcome = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert set(outcome.values()) == {"ok"}, outcome
