"""Partitions on one Redis: routing by uuid, idempotency across partitions, the recorded count."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid as uuidlib
from collections import Counter

import pytest
import redis

from app.model import NewMessage
from app.settings import Settings
from app.store import connect
from app.store.codec import uuid_key
from app.store.keys import Keyspace, keyspaces, partition_of
from app.store.partitions import PartitionCountError, Partitions

FUTURE = 253402300799999


def test_one_partition_is_the_keyspace_of_every_release_before_partitions() -> None:
    assert keyspaces("eat", 1) == [Keyspace("eat")]
    assert Keyspace("eat").delayed == "{eat}:delayed"
    assert [k.delayed for k in keyspaces("eat", 3)] == [
        "{eat:0}:delayed",
        "{eat:1}:delayed",
        "{eat:2}:delayed",
    ]


def test_the_partition_of_a_uuid_never_changes() -> None:
    # Golden values: changing the function would send re-posted uuids to the wrong partition.
    assert partition_of(bytes(range(16)), 16) == 8
    assert partition_of(b"\xff" * 16, 7) == 0
    assert partition_of(uuidlib.UUID("123e4567-e89b-12d3-a456-426614174000").bytes, 16) == (
        partition_of(uuid_key("123e4567-e89b-12d3-a456-426614174000"), 16)
    )
    assert partition_of(uuid_key("123e4567-e89b-12d3-a456-426614174000"), 16) == 0
    assert partition_of(uuid_key("123e4567-e89b-12d3-a456-426614174001"), 16) == 6
    assert partition_of(b"\x00" * 16, 1) == 0


@pytest.mark.parametrize("make", [uuidlib.uuid4, uuidlib.uuid1], ids=["uuid4", "uuid1"])
def test_uuids_spread_evenly_over_the_partitions(make) -> None:
    counts = Counter(partition_of(make().bytes, 16) for _ in range(32_000))
    assert set(counts) == set(range(16))
    assert max(counts.values()) < 2000 * 1.15 and min(counts.values()) > 2000 * 0.85


@pytest.fixture
def settings(redis_url: str, prefix: str, redis_client: redis.Redis) -> Settings:
    return Settings.from_env({}, redis_url=redis_url, prefix=prefix, partitions=4)


def message(uid: str | None = None) -> NewMessage:
    return NewMessage(uuid=uid or str(uuidlib.uuid4()), message="m", run_at=FUTURE)


def test_each_message_lands_in_its_uuids_partition_and_answers_come_back_in_order(
    settings: Settings, redis_client: redis.Redis
) -> None:
    msgs = [message() for _ in range(40)]

    async def scenario():
        client = connect(settings)
        try:
            partitions = Partitions(client, settings)
            return await partitions.accept_many([*msgs, msgs[5]])
        finally:
            await client.aclose()

    results = asyncio.run(scenario())
    assert [r.created for r in results] == [True] * 40 + [False]
    assert all(r.run_at == FUTURE and r.state == "scheduled" for r in results)
    for msg in msgs:
        home = keyspaces(settings.prefix, 4)[partition_of(uuid_key(msg.uuid), 4)]
        assert redis_client.hexists(home.messages, uuid_key(msg.uuid))
        others = [k for k in keyspaces(settings.prefix, 4) if k != home]
        assert not any(redis_client.hexists(k.messages, uuid_key(msg.uuid)) for k in others)
    assert not redis_client.exists(Keyspace(settings.prefix).messages)


def test_a_uuid_posted_again_in_another_call_is_a_duplicate_whichever_partitions_it_meets(
    settings: Settings,
) -> None:
    uid = str(uuidlib.uuid4())

    async def scenario():
        client = connect(settings)
        try:
            partitions = Partitions(client, settings)
            first = await partitions.accept_many([message(uid)])
            again = await asyncio.gather(
                *(partitions.accept_many([message(), message(uid)]) for _ in range(10))
            )
            return first, again
        finally:
            await client.aclose()

    first, again = asyncio.run(scenario())
    assert first[0].created
    assert all(not pair[1].created for pair in again)


def check(settings: Settings, count: int) -> None:
    """Start-up's check of a process with EAT_PARTITIONS=count."""

    async def run() -> None:
        client = connect(settings)
        try:
            await Partitions(client, dataclasses.replace(settings, partitions=count)).check()
        finally:
            await client.aclose()

    asyncio.run(run())


def test_the_first_start_records_the_count_and_another_count_is_refused(
    settings: Settings, redis_client: redis.Redis
) -> None:
    check(settings, 4)
    assert redis_client.get(Keyspace(settings.prefix).partition_count) == b"4"
    check(settings, 4)
    with pytest.raises(PartitionCountError, match="EAT_PARTITIONS=4") as refused:
        check(settings, 8)
    assert "in 4 partition(s)" in str(refused.value)
    assert redis_client.get(Keyspace(settings.prefix).partition_count) == b"4"


def test_data_of_a_release_without_partitions_counts_as_one_partition(
    settings: Settings, redis_client: redis.Redis
) -> None:
    redis_client.hset(Keyspace(settings.prefix).messages, b"x" * 16, b"r")

    with pytest.raises(PartitionCountError, match="in 1 partition"):
        check(settings, 4)
    assert redis_client.get(Keyspace(settings.prefix).partition_count) is None


def test_one_partition_records_no_count_so_its_keys_stay_as_before_and_refuses_another(
    settings: Settings, redis_client: redis.Redis
) -> None:
    async def check(count: int) -> None:
        client = connect(settings)
        try:
            await Partitions(client, dataclasses.replace(settings, partitions=count)).check()
        finally:
            await client.aclose()

    asyncio.run(check(1))
    assert redis_client.keys(f"*{settings.prefix}*") == []
    asyncio.run(check(4))
    with pytest.raises(PartitionCountError, match="EAT_PARTITIONS=1"):
        asyncio.run(check(1))
