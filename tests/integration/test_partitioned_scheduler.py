"""The leader's side of partitions on a real 3-master Redis Cluster, 16 partitions: one
promoter per partition behind one gate, one wake-up subscription for all, the legacy
bridge into each uuid's partition, and the start-up checks (every master's
maxmemory-policy, legacy lists that a cluster can bridge).

Promotion lateness is measured as a worker sees it: one blocking XREADGROUP per
partition notes the wall-clock time an entry arrives, minus its runAt.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
import uuid as uuidlib
from collections.abc import AsyncIterator, Callable

import pytest
import redis
from redis.exceptions import ConnectionError as RedisConnectionError

from app.model import NewMessage, State
from app.ops.cluster import RedisCluster
from app.settings import Settings
from app.store import Store, encode_epoch, open_client
from app.store.codec import uuid_text
from app.store.keys import LegacyLists
from app.store.memory import EvictingPolicyError, MemoryPolicy
from app.store.partitions import Partitions
from election.bridge import LegacyBridge, LegacyListsError, check_lists_share_a_slot, legacy_uuid
from election.gate import LeadershipGate, Role
from election.promoter import Promoter, wake_promoters
from election.scheduler import run_scheduler
from tests.aio import reap
from tests.wait import async_wait_until

PARTITIONS = 16
EPOCH = 7
# Correctness, not performance (2 shared cores, a cluster of three and the test's own
# sixteen reads): a partition held up by another would be late by seconds.
LATENESS_BOUND_MS = 300
DEADLINE = 10.0


def now_ms() -> int:
    return int(time.time() * 1000)


@pytest.fixture
def settings(cluster_url: str, prefix: str) -> Settings:
    return Settings.from_env({}, redis_url=cluster_url, prefix=prefix, partitions=PARTITIONS)


@contextlib.asynccontextmanager
async def opened(settings: Settings) -> AsyncIterator[Partitions]:
    client = await open_client(settings)
    try:
        partitions = Partitions(client, settings, identifier="test-leader")
        await partitions.check()
        for store in partitions:
            await store.ensure_group()
        yield partitions
    finally:
        await client.aclose()


def uuid_in(partitions: Partitions, partition: int) -> str:
    while True:
        uuid = str(uuidlib.uuid4())
        if partitions.index_of(uuid) == partition:
            return uuid


async def accept_in_each(partitions: Partitions, run_at: int, per_partition: int = 1) -> list[str]:
    msgs = [
        NewMessage(uuid_in(partitions, p), f"p{p}", run_at)
        for p in range(partitions.count)
        for _ in range(per_partition)
    ]
    accepted = await partitions.accept_many(msgs)
    assert all(a.created for a in accepted)
    return [m.uuid for m in msgs]


class FaultyPromote:
    """A partition's Store whose promote fails with a Redis error (its master is down) or
    hangs (its master is slow) while ``fault`` is set; the rest is the real Store."""

    def __init__(self, store: Store, fault: str) -> None:
        self._store = store
        self.fault = fault
        self.released = asyncio.Event()
        self.calls = 0

    def __getattr__(self, name: str):
        return getattr(self._store, name)

    async def promote(self, epoch: int, limit: int | None = None):
        self.calls += 1
        if not self.released.is_set():
            if self.fault == "failing":
                raise RedisConnectionError("injected: this partition's master does not answer")
            await self.released.wait()  # "hanging": a master that answers very late
        return await self._store.promote(epoch, limit)


@contextlib.asynccontextmanager
async def leading(
    partitions: Partitions,
    *,
    epoch: int = EPOCH,
    max_idle: float = 1.0,
    wrap: Callable[[Store], Store] = lambda store: store,
) -> AsyncIterator[tuple[LeadershipGate, list[Promoter]]]:
    """What a leader runs: a promoter per partition and one wake-up listener."""
    gate = LeadershipGate()
    gate.set_role(Role.LEADER, epoch)
    promoters = [Promoter(wrap(store), gate, max_idle=max_idle) for store in partitions]
    tasks = [asyncio.create_task(p.run()) for p in promoters]
    tasks.append(asyncio.create_task(wake_promoters(partitions.client, promoters)))
    try:
        yield gate, promoters
    finally:
        for promoter in promoters:
            promoter.stop()
        await reap(*tasks)


async def first_arrival(store: Store) -> tuple[str, int]:
    """Block on one partition's stream for its first entry: (uuid, arrival ms)."""
    delivered = await store.read("probe", 1, 5000)
    arrived = now_ms()
    assert delivered, f"nothing reached {store.keys.stream} within 5 s"
    return delivered[0].uuid, arrived


def test_the_leader_promotes_every_partition_on_time_under_its_epoch(settings: Settings) -> None:
    async def scenario() -> None:
        async with opened(settings) as partitions:
            run_at = now_ms() + 400
            uuids = await accept_in_each(partitions, run_at)
            async with leading(partitions):
                arrivals = await asyncio.gather(*(first_arrival(s) for s in partitions))
            assert [uuid for uuid, _ in arrivals] == uuids
            lateness = [arrived - run_at for _, arrived in arrivals]
            assert min(lateness) >= 0, f"promoted early: {lateness}"
            assert max(lateness) < LATENESS_BOUND_MS, f"lateness per partition: {lateness}"
            # Each partition fences with its own stored epoch: every one now holds ours.
            for store in partitions:
                assert await store.client.get(store.keys.epoch) == encode_epoch(EPOCH).encode()

    asyncio.run(scenario())


@pytest.mark.parametrize("fault", ["failing", "hanging"])
def test_a_partition_whose_master_fails_or_hangs_does_not_hold_up_the_others(
    settings: Settings, fault: str
) -> None:
    stuck = 0

    async def scenario() -> None:
        async with opened(settings) as partitions:
            run_at = now_ms() + 400
            uuids = await accept_in_each(partitions, run_at)
            faulty: list[FaultyPromote] = []

            def wrap(store: Store) -> Store:
                if store.partition != stuck:
                    return store
                faulty.append(FaultyPromote(store, fault))
                return faulty[0]  # type: ignore[return-value]

            healthy = [s for s in partitions if s.partition != stuck]
            async with leading(partitions, wrap=wrap) as (gate, promoters):
                arrivals = await asyncio.gather(*(first_arrival(s) for s in healthy))
                lateness = [arrived - run_at for _, arrived in arrivals]
                assert [uuid for uuid, _ in arrivals] == uuids[1:]
                assert max(lateness) < LATENESS_BOUND_MS, f"lateness per partition: {lateness}"
                # The stuck partition promoted nothing, and kept trying.
                store = partitions.stores[stuck]
                assert await store.client.zcard(store.keys.delayed) == 1
                if fault == "failing":
                    await async_wait_until(lambda: faulty[0].calls >= 2, "a retry", DEADLINE)
                    assert promoters[stuck].stats.errors >= 1
                assert gate.is_open
                # Its master answers again: it resumes at once (within its backoff, <= 1 s).
                faulty[0].released.set()
                uuid, _ = await first_arrival(store)
                assert uuid == uuids[stuck]

    asyncio.run(scenario())


def test_a_partition_holding_a_newer_epoch_refuses_and_closes_the_gate_for_every_partition(
    settings: Settings,
) -> None:
    fenced = 5

    async def scenario() -> None:
        async with opened(settings) as partitions:
            # Our epoch is stored everywhere once we promoted ...
            async with leading(partitions):
                await asyncio.gather(
                    *(first_arrival(s) for s in partitions),
                    accept_in_each(partitions, now_ms()),
                )
            # ... then a newer leader promoted one partition (a paused old leader wakes).
            store = partitions.stores[fenced]
            await store.client.set(store.keys.epoch, encode_epoch(EPOCH + 100))
            async with leading(partitions, max_idle=0.05) as (gate, promoters):
                await async_wait_until(
                    lambda: promoters[fenced].stats.refused >= 1, "the refusal", DEADLINE
                )
                assert not gate.is_open, "a stale leader kept promoting"
                # The gate stays shut for this epoch: no partition promotes under it now.
                late = await accept_in_each(partitions, now_ms())

                # A call another partition's promoter sent before the gate closed may
                # still be on its way back: count from once none is.
                async def settled() -> bool:
                    before = sum(p.stats.calls for p in promoters)
                    await asyncio.sleep(0.15)  # three max_idle periods
                    return sum(p.stats.calls for p in promoters) == before

                await async_wait_until(settled, "calls in flight to come back", DEADLINE)
                calls = sum(p.stats.calls for p in promoters)
                await asyncio.sleep(0.2)  # several max_idle periods: nothing may happen
                assert sum(p.stats.calls for p in promoters) == calls
                for uuid in late:
                    record = await partitions.store_for(uuid).record(uuid)
                    assert record is not None and record.state is State.QUEUED
            assert await store.client.get(store.keys.epoch) == encode_epoch(EPOCH + 100).encode()

    asyncio.run(scenario())


def subscribers(cluster: RedisCluster, channel: str) -> int:
    """Subscribers of a plain pub/sub channel, over every node of the cluster."""
    total = 0
    for node in cluster.nodes:
        with redis.Redis(port=node.port) as client:
            total += dict(client.pubsub_numsub(channel)).get(channel.encode(), 0)
    return total


def test_one_subscription_wakes_the_promoter_of_the_partition_that_got_an_earlier_message(
    settings: Settings, redis_cluster: RedisCluster
) -> None:
    async def scenario() -> None:
        # Long idle sleeps: only a wake-up can bring a promoter back in time.
        async with (
            opened(settings) as partitions,
            leading(partitions, max_idle=30.0) as (_gate, promoters),
        ):
            for store in partitions:
                channel = store.keys.wake_channel
                await async_wait_until(
                    lambda c=channel: subscribers(redis_cluster, c) == 1,
                    f"one subscription to {channel}",
                    DEADLINE,
                )
            await async_wait_until(
                lambda: all(p.stats.calls >= 1 for p in promoters), "first looks", DEADLINE
            )
            # Partitions served by each of the three masters.
            by_master: dict[int, int] = {}
            for store in partitions:
                port = partitions.client.get_node_from_key(store.keys.stream).port
                by_master.setdefault(port, store.partition)
            assert len(by_master) == 3
            run_at = now_ms() + 300
            woken = []
            for p in by_master.values():
                uuid = uuid_in(partitions, p)
                await partitions.accept_many([NewMessage(uuid, "wake", run_at)])
                woken.append((p, uuid))
            for p, uuid in woken:
                got, arrived = await first_arrival(partitions.stores[p])
                assert got == uuid
                assert 0 <= arrived - run_at < LATENESS_BOUND_MS, (p, arrived - run_at)

    asyncio.run(scenario())


# -- the legacy bridge ------------------------------------------------------------------------


def legacy_settings(settings: Settings, prefix: str) -> Settings:
    tag = "{" + prefix + "-legacy}"
    return Settings.from_env(
        {},
        redis_url=settings.redis_url,
        prefix=settings.prefix,
        partitions=settings.partitions,
        legacy_queue=f"{tag}Queue",
        legacy_delayed=f"{tag}QueueDelayed",
        legacy_in_flight=f"{tag}QueueDead",
    )


def test_the_bridge_accepts_each_legacy_item_into_its_uuids_partition(
    settings: Settings, prefix: str
) -> None:
    settings = legacy_settings(settings, prefix)
    lists = LegacyLists.of(settings)
    later = now_ms() + 3_600_000
    delayed = [str(uuidlib.uuid4()) for _ in range(40)]
    due = [str(uuidlib.uuid4()) for _ in range(10)]
    bad_json = b'{"message": "no end'
    bad_run_at_uuid = str(uuidlib.uuid4())
    bad_run_at = json.dumps({"message": "m", "runAt": "soon", "uuid": bad_run_at_uuid}).encode()

    async def scenario() -> None:
        async with opened(settings) as partitions:
            client = partitions.client
            for uuid in delayed:
                item = {"message": "later", "runAt": later, "uuid": uuid}
                await client.lpush(lists.delayed, json.dumps(item))
            for uuid in due:
                await client.lpush(
                    lists.queue, json.dumps({"message": "now", "runAt": later, "uuid": uuid})
                )
            await client.lpush(lists.delayed, bad_json)
            await client.lpush(lists.delayed, bad_run_at)
            gate = LeadershipGate()
            gate.set_role(Role.LEADER, EPOCH)
            bridge = LegacyBridge(partitions, gate, lists)
            while await bridge.round():
                pass
            assert bridge.stats.accepted == 50 and bridge.stats.malformed == 2
            for uuid, state in [(u, State.SCHEDULED) for u in delayed] + [
                (u, State.QUEUED) for u in due
            ]:
                home = partitions.store_for(uuid)
                record = await home.record(uuid)
                assert record is not None and record.state is state, uuid
                for other in partitions:
                    if other is not home:
                        assert await other.record(uuid) is None
            used = {partitions.index_of(u) for u in delayed + due}
            assert len(used) > PARTITIONS // 2, "the items should spread over the partitions"
            # Each malformed item is dead-lettered in the partition of the uuid it is filed
            # under (its own when valid, else the one derived from its bytes).
            for raw, uuid in [(bad_json, legacy_uuid(bad_json)), (bad_run_at, bad_run_at_uuid)]:
                home = partitions.store_for(uuid)
                entries = await home.client.xrange(home.keys.dead)
                assert [uuid_text(f[b"u"]) for _i, f in entries] == [uuid]
                assert entries[0][1][b"raw"] == raw
            for name in (lists.queue, lists.delayed, lists.in_flight):
                assert await client.llen(name) == 0

    asyncio.run(scenario())


def test_legacy_lists_in_different_slots_cannot_be_bridged_on_a_cluster() -> None:
    with pytest.raises(LegacyListsError, match="one hash tag"):
        check_lists_share_a_slot(LegacyLists("QueueDelayed", "Queue", "QueueDead"))
    check_lists_share_a_slot(
        LegacyLists("{legacy}QueueDelayed", "{legacy}Queue", "{legacy}QueueDead")
    )


def test_a_scheduler_on_a_cluster_refuses_to_start_with_untagged_legacy_lists_and_exits_2(
    settings: Settings,
) -> None:
    with pytest.raises(LegacyListsError):
        asyncio.run(asyncio.wait_for(run_scheduler(settings), DEADLINE))

    env = {k: v for k, v in os.environ.items() if not k.startswith("EAT_")}
    env |= {
        "EAT_REDIS_URL": settings.redis_url,
        "EAT_PREFIX": settings.prefix,
        "EAT_PARTITIONS": str(PARTITIONS),
        "EAT_ZK_HOSTS": "127.0.0.1:1",  # never reached: it refuses first
    }
    done = subprocess.run(
        [sys.executable, "-m", "app", "scheduler"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "EAT_LEGACY_BRIDGE=false" in done.stderr


# -- maxmemory-policy on every master ------------------------------------------------------------


def test_every_master_s_maxmemory_policy_is_checked_and_one_evicting_master_is_refused(
    settings: Settings, redis_cluster: RedisCluster
) -> None:
    async def scenario(node_port: int) -> None:
        client = await open_client(settings)
        try:
            policy = MemoryPolicy(client, allow=False, interval=30)
            with pytest.raises(EvictingPolicyError) as refused:
                await policy.require()
            assert refused.value.policy == "allkeys-lru"
            assert refused.value.nodes == [f"127.0.0.1:{node_port}"]
            assert f"127.0.0.1:{node_port}" in str(refused.value)
        finally:
            await client.aclose()

    for node in redis_cluster.nodes:  # three masters: whichever it is, it is found
        with redis.Redis(port=node.port) as direct:
            direct.config_set("maxmemory-policy", "allkeys-lru")
            try:
                asyncio.run(scenario(node.port))
            finally:
                direct.config_set("maxmemory-policy", "noeviction")
