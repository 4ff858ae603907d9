"""The storage core on a real 3-master Redis Cluster, 16 partitions: every script in one
slot, every partition on its master, idempotency across processes, NOSCRIPT recovered."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid as uuidlib
from collections import Counter

import pytest
import redis

from app.model import NewMessage
from app.ops.cluster import RedisCluster
from app.settings import Settings
from app.store import OutcomeUnknown, StoreCluster, StoreRedis, open_client
from app.store.partitions import Partitions
from tests.wait import async_wait_until

PARTITIONS = 16
FUTURE = 253402300799999


@pytest.fixture
def settings(cluster_url: str, prefix: str) -> Settings:
    return Settings.from_env({}, redis_url=cluster_url, prefix=prefix, partitions=PARTITIONS)


def now_ms() -> int:
    return int(time.time() * 1000)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_the_client_is_a_cluster_client_on_a_cluster_and_a_plain_one_elsewhere(
    settings: Settings, redis_url: str
) -> None:
    async def kinds() -> tuple[type, type]:
        on_cluster = await open_client(settings)
        plain = await open_client(Settings.from_env({}, redis_url=redis_url))
        try:
            return type(on_cluster), type(plain)
        finally:
            await on_cluster.aclose()
            await plain.aclose()

    assert run(kinds()) == (StoreCluster, StoreRedis)


def test_messages_flow_through_every_partition_and_the_partitions_spread_over_the_masters(
    settings: Settings, redis_cluster: RedisCluster
) -> None:
    async def scenario() -> tuple[int, int, Counter]:
        client = await open_client(settings)
        try:
            partitions = Partitions(client, settings, identifier="test")
            await partitions.check()
            msgs = [NewMessage(str(uuidlib.uuid4()), f"m{i}", now_ms() - 1) for i in range(400)]
            accepted = await partitions.accept_many(msgs)
            assert all(a.created and a.state == "queued" for a in accepted)
            handled = 0
            for store in partitions:
                await store.ensure_group()
                deliveries = await store.read("w", 1000, None)
                handled += await store.ack(deliveries)
            masters = Counter(
                client.get_node_from_key(store.keys.stream).port for store in partitions
            )
            return len(msgs), handled, masters
        finally:
            await client.aclose()

    sent, handled, masters = run(scenario())
    assert handled == sent
    # 16 tags over 3 masters: every master serves some (5/5/6 here).
    assert set(masters) == set(redis_cluster.ports[:3])
    assert all(count >= 3 for count in masters.values()), masters


def test_one_uuid_posted_concurrently_through_two_clients_is_one_message(
    settings: Settings,
) -> None:
    uids = [str(uuidlib.uuid4()) for _ in range(20)]

    async def post_all(partitions: Partitions) -> list[bool]:
        created = []
        for _ in range(5):
            batch = [NewMessage(u, "m", FUTURE) for u in uids]
            created += [a.created for a in await partitions.accept_many(batch)]
        return created

    async def scenario() -> int:
        one, two = await open_client(settings), await open_client(settings)
        try:
            results = await asyncio.gather(
                post_all(Partitions(one, settings)), post_all(Partitions(two, settings))
            )
            return sum(sum(r) for r in results)
        finally:
            await one.aclose()
            await two.aclose()

    assert run(scenario()) == len(uids)


def test_a_master_whose_scripts_were_flushed_answers_the_next_call_without_a_failure(
    settings: Settings, redis_cluster: RedisCluster
) -> None:
    async def scenario() -> None:
        client = await open_client(settings)
        try:
            partitions = Partitions(client, settings)
            await partitions.accept_many([NewMessage(str(uuidlib.uuid4()), "warm", FUTURE)])
            for node in redis_cluster.nodes:
                with redis.Redis(port=node.port) as direct:
                    direct.script_flush()
            msgs = [NewMessage(str(uuidlib.uuid4()), "after", FUTURE) for _ in range(64)]
            accepted = await partitions.accept_many(msgs)
            assert all(a.created for a in accepted)
        finally:
            await client.aclose()

    run(scenario())


def test_a_lost_reply_on_a_cluster_node_is_outcome_unknown_not_a_second_run(
    settings: Settings, redis_cluster: RedisCluster, prefix: str
) -> None:
    """The master of the message's partition freezes (SIGSTOP) after the accept reached
    it: the reply times out. The cluster client would re-send the script; the guarded
    connection says the outcome is unknown instead, and once the master wakes the
    message exists exactly once."""
    uid = str(uuidlib.uuid4())

    async def scenario() -> None:
        client = await open_client(settings, socket_timeout=0.5)
        try:
            partitions = Partitions(client, settings)
            store = partitions.store_for(uid)
            await store.accept(NewMessage(str(uuidlib.uuid4()), "warm", FUTURE))
            for node in client.get_nodes():
                assert "Guarded" in node.connection_class.__name__
            master = client.get_node_from_key(store.keys.messages)
            frozen = next(n for n in redis_cluster.nodes if n.port == master.port)
            os.kill(frozen.process.pid, signal.SIGSTOP)
            try:
                with pytest.raises(OutcomeUnknown):
                    await store.accept(NewMessage(uid, "once", FUTURE))
            finally:
                os.kill(frozen.process.pid, signal.SIGCONT)
            again = await store.accept(NewMessage(uid, "once", FUTURE))
            assert not again.created, "the accept that lost its reply had been applied"
        finally:
            await client.aclose()

    run(scenario())


def clients_named(cluster: RedisCluster, name: str) -> int:
    count = 0
    for node in cluster.nodes:
        with redis.Redis(port=node.port) as direct:
            count += sum(1 for c in direct.client_list() if c.get("name") == name)
    return count


def test_closing_a_client_that_awaits_a_new_slot_map_closes_every_connection_it_opened(
    settings: Settings, redis_cluster: RedisCluster
) -> None:
    """A read timed out on a frozen master: redis-py marks the client for a new slot map
    and its own close then closes nothing. Every connection must still be closed (the
    servers see none left), not left to the garbage collector."""
    name = f"close-probe-{uuidlib.uuid4().hex[:8]}"

    async def scenario() -> None:
        client = await open_client(settings, socket_timeout=0.3, client_name=name)
        partitions = Partitions(client, settings)
        closed = False
        try:
            for store in partitions:
                await store.client.xlen(store.keys.stream)
            assert clients_named(redis_cluster, name) >= 3, "a connection to every master"
            store = next(iter(partitions))
            master = client.get_node_from_key(store.keys.stream)
            frozen = next(n for n in redis_cluster.nodes if n.port == master.port)
            os.kill(frozen.process.pid, signal.SIGSTOP)
            try:
                with pytest.raises(redis.exceptions.TimeoutError):
                    await store.client.xlen(store.keys.stream)
                assert client._initialize, "the client waits to rebuild its slot map"
                await client.aclose()
                closed = True
            finally:
                os.kill(frozen.process.pid, signal.SIGCONT)
            await async_wait_until(
                lambda: clients_named(redis_cluster, name) == 0, "every connection closed", 5
            )
        finally:
            if not closed:
                await client.aclose()

    run(scenario())


def test_a_client_closed_by_redis_py_itself_serves_the_next_command(
    settings: Settings, redis_cluster: RedisCluster
) -> None:
    """redis-py closes the client to start afresh (on CLUSTERDOWN, a slot not covered):
    the next command must build the slot map and connect again, not find it closed."""

    async def scenario() -> None:
        client = await open_client(settings)
        try:
            partitions = Partitions(client, settings)
            msg = NewMessage(str(uuidlib.uuid4()), "m", FUTURE)
            await client.aclose()  # what RedisCluster._execute_command does on CLUSTERDOWN
            assert (await partitions.accept_many([msg]))[0].created
            for store in partitions:
                await store.client.xlen(store.keys.stream)
        finally:
            await client.aclose()

    run(scenario())
