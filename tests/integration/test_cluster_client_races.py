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
import uuid as uuidlib

import pytest
from redis.exceptions import RedisError

from app.model import NewMessage
from app.settings import Settings
from app.store import open_client
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
