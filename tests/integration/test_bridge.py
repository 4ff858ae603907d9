"""The legacy list bridge and the ``list`` handler, in-process, against a real Redis.

Each test names its legacy lists after its own prefix (``{prefix}:Queue`` ...)
so they are deleted with the test's keys. "Accepted exactly once" is read from
Redis itself: every valid item's uuid is in the stream or in the delayed set
exactly once, and the lists are empty.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import random
import time
import uuid as uuidlib
from collections import Counter
from collections.abc import AsyncIterator

import pytest
import redis

from app.model import NewMessage, State
from app.settings import Settings
from app.store import Delivery, Store, connect
from app.store.codec import member_uuid, uuid_key, uuid_text
from app.store.keys import Keyspace, LegacyLists
from app.store.partitions import Partitions
from election import bridge as bridge_module
from election.bridge import LegacyBridge, legacy_uuid
from election.gate import LeadershipGate, Role
from tests.aio import open_store
from tests.wait import async_wait_until
from workers.handlers import make_list_handler
from workers.worker import Worker

DEADLINE = 15.0  # generous: the machine is shared; the bridge needs well under a second


def now_ms() -> int:
    return int(time.time() * 1000)


def new_uuid() -> str:
    return str(uuidlib.uuid4())


@pytest.fixture
def settings(redis_url: str, prefix: str, redis_client: redis.Redis) -> Settings:
    # redis_client: deletes this test's keys (the lists carry the prefix too) afterwards.
    tag = "{" + prefix + "}"
    settings = Settings(
        redis_url=redis_url,
        prefix=prefix,
        legacy_queue=f"{tag}:Queue",
        legacy_delayed=f"{tag}:QueueDelayed",
        legacy_in_flight=f"{tag}:QueueDead",
    )
    settings.validate()
    return settings


def leading_gate(epoch: int = 1) -> LeadershipGate:
    gate = LeadershipGate()
    gate.set_role(Role.LEADER, epoch)
    return gate


@contextlib.asynccontextmanager
async def bridging(
    store: Store, gate: LeadershipGate, **options: int
) -> AsyncIterator[LegacyBridge]:
    bridge = LegacyBridge(store, gate, LegacyLists.of(store.settings), **options)
    task = asyncio.create_task(bridge.run(), name="bridge")
    try:
        yield bridge
    finally:
        bridge.stop()
        await asyncio.wait_for(task, 5.0)


def item(message: str, run_at: int, uuid: str | None) -> bytes:
    fields: dict[str, object] = {"message": message, "runAt": run_at}
    if uuid is not None:
        fields["uuid"] = uuid
    return json.dumps(fields).encode()


def stream_uuids(client: redis.Redis, settings: Settings) -> list[str]:
    return [uuid_text(f[b"u"]) for _id, f in client.xrange(Keyspace(settings.prefix).stream)]


def delayed_uuids(client: redis.Redis, settings: Settings) -> dict[str, int]:
    members = client.zrange(Keyspace(settings.prefix).delayed, 0, -1, withscores=True)
    return {member_uuid(member): int(score) for member, score in members}


def dead_entries(client: redis.Redis, settings: Settings) -> list[dict[bytes, bytes]]:
    return [fields for _id, fields in client.xrange(Keyspace(settings.prefix).dead)]


def list_lengths(client: redis.Redis, settings: Settings) -> tuple[int, int, int]:
    lists = LegacyLists.of(settings)
    return (client.llen(lists.queue), client.llen(lists.delayed), client.llen(lists.in_flight))


def assert_each_accepted_once(
    client: redis.Redis, settings: Settings, expected: set[str]
) -> tuple[list[str], dict[str, int]]:
    """Every expected uuid in the stream or the delayed set exactly once, nothing else."""
    in_stream = stream_uuids(client, settings)
    delayed = delayed_uuids(client, settings)
    counts = Counter(in_stream) + Counter(delayed.keys())
    assert set(counts) == expected, (
        f"missing {sorted(expected - set(counts))[:5]}, extra {sorted(set(counts) - expected)[:5]}"
    )
    repeated = {u: n for u, n in counts.items() if n > 1}
    assert not repeated, f"accepted more than once: {repeated}"
    assert client.hlen(Keyspace(settings.prefix).messages) == len(expected)
    return in_stream, delayed


def test_one_thousand_legacy_items_are_each_accepted_exactly_once_and_malformed_ones_dead_lettered(
    settings: Settings, redis_client: redis.Redis
) -> None:
    rng = random.Random(4)
    lists = LegacyLists.of(settings)
    now = now_ms()
    later = now + 3_600_000
    queue_items: list[tuple[bytes, str]] = []  # (raw, uuid), in push order
    delayed_items: list[tuple[bytes, str, int]] = []  # (raw, uuid, runAt)
    malformed: list[bytes] = []
    pushes: list[tuple[str, bytes]] = []
    for i in range(1000):
        kind = rng.random()
        if i % 10 == 9:  # 100 malformed, on either list
            bad = rng.choice(
                [
                    b"{not json",
                    item("no runAt", 0, None).replace(b'"runAt": 0', b'"when": 0'),
                    item("bad uuid", now, "not-a-uuid"),
                    item("negative", -5, new_uuid()),
                    json.dumps({"message": 42, "runAt": now}).encode(),
                    b"",
                ]
            ) + f" {i}".encode() * (rng.random() < 0.5)
            malformed.append(bad)
            pushes.append((rng.choice([lists.queue, lists.delayed]), bad))
        elif kind < 0.5:
            # Queue: due now whatever runAt says (some say the future); some without uuid.
            uuid = new_uuid() if rng.random() < 0.8 else None
            raw = item(f"now {i}", rng.choice([now - 1000, now, later]), uuid)
            queue_items.append((raw, uuid or legacy_uuid(raw)))
            pushes.append((lists.queue, raw))
        else:
            uuid = new_uuid() if rng.random() < 0.8 else None
            run_at = later + i if rng.random() < 0.8 else now - i  # mostly future, some overdue
            raw = item(f"delayed {i}", run_at, uuid)
            delayed_items.append((raw, uuid or legacy_uuid(raw), run_at))
            pushes.append((lists.delayed, raw))
    # A few producers pushed the same item twice: one message.
    for raw, _ in queue_items[:5]:
        pushes.append((lists.queue, raw))
    with redis_client.pipeline(transaction=False) as pipe:
        for name, raw in pushes:
            pipe.lpush(name, raw)
        pipe.execute()
    expected = {u for _, u in queue_items} | {u for _, u, _ in delayed_items}

    async def scenario() -> LegacyBridge:
        async with open_store(settings) as store, bridging(store, leading_gate()) as bridge:
            await async_wait_until(
                lambda: (
                    list_lengths(redis_client, settings) == (0, 0, 0)
                    and bridge.stats.moved == len(pushes)
                ),
                "every legacy item moved and settled",
                DEADLINE,
            )
            return bridge

    bridge = asyncio.run(scenario())

    in_stream, delayed = assert_each_accepted_once(redis_client, settings, expected)
    # Queue items are due now, in the order they were pushed (RPOP of an LPUSHed list).
    queue_uuids = [u for _, u in queue_items]
    assert [u for u in in_stream if u in set(queue_uuids)] == queue_uuids
    for _, uuid, run_at in delayed_items:
        if run_at > now_ms():
            assert delayed[uuid] == run_at
        else:
            assert uuid in in_stream
    assert bridge.stats.accepted == len(expected)
    assert bridge.stats.duplicates == 5
    assert bridge.stats.malformed == len(malformed)

    dead = dead_entries(redis_client, settings)
    assert sorted(entry[b"raw"] for entry in dead) == sorted(malformed)
    for entry in dead:
        assert entry[b"reason"]
        assert {b"u", b"a", b"at"} <= entry.keys()
        assert len(entry[b"u"]) == 16


def test_items_left_in_flight_by_a_crash_are_redriven_without_loss_or_duplicates(
    settings: Settings, redis_client: redis.Redis
) -> None:
    """A bridge died after moving items into QueueDead: some it had accepted, some not."""
    lists = LegacyLists.of(settings)
    now = now_ms()
    accepted_before = [item(f"accepted {i}", now + 3_600_000, new_uuid()) for i in range(50)]
    accepted_before += [item(f"accepted, no uuid {i}", now, None) for i in range(20)]
    not_accepted = [item(f"lost? {i}", now - i, new_uuid()) for i in range(60)]
    not_accepted += [item(f"lost?, no uuid {i}", now + 3_600_000, None) for i in range(20)]
    malformed = [b'{"message": "half', b'{"runAt": 1}']
    fresh = [item(f"fresh {i}", now, new_uuid()) for i in range(30)]
    in_flight = accepted_before + not_accepted + malformed
    random.Random(7).shuffle(in_flight)

    def uuid_of(raw: bytes) -> str:
        return json.loads(raw).get("uuid") or legacy_uuid(raw)

    async def scenario() -> LegacyBridge:
        async with open_store(settings) as store:
            for raw in accepted_before:
                body = json.loads(raw)
                await store.accept(NewMessage(uuid_of(raw), body["message"], body["runAt"]))
            for raw in in_flight:
                await store.client.lpush(lists.in_flight, raw)
            for raw in fresh:
                await store.client.lpush(lists.queue, raw)
            async with bridging(store, leading_gate(), batch=16) as bridge:
                await async_wait_until(
                    lambda: (
                        list_lengths(redis_client, settings) == (0, 0, 0)
                        and bridge.stats.moved == len(fresh)
                    ),
                    "in-flight items re-driven and fresh ones bridged",
                    DEADLINE,
                )
                return bridge

    bridge = asyncio.run(scenario())

    expected = {uuid_of(raw) for raw in accepted_before + not_accepted + fresh}
    assert_each_accepted_once(redis_client, settings, expected)
    assert bridge.stats.redriven == len(in_flight)
    assert bridge.stats.duplicates == len(accepted_before)
    assert bridge.stats.accepted == len(not_accepted) + len(fresh)
    assert sorted(e[b"raw"] for e in dead_entries(redis_client, settings)) == sorted(malformed)


DEEP = 5000  # levels of nesting: past Python's recursion limit, which msgspec and json obey


def test_an_item_nested_too_deeply_is_dead_lettered_and_the_items_after_it_are_accepted(
    settings: Settings, redis_client: redis.Redis
) -> None:
    """Such an item used to end the bridge task (RecursionError); left in QueueDead, it
    ended every next leader's bridge the same way, and no legacy item was delivered again."""
    lists = LegacyLists.of(settings)
    hostile = b'{"message": "m", "runAt": 5, "x": ' + b"[" * DEEP + b"]" * DEEP + b"}"
    stranded = hostile.replace(b'"m"', b'"left in flight by a crashed leader"')
    after = [item(f"after {i}", now_ms(), new_uuid()) for i in range(5)]

    async def scenario() -> LegacyBridge:
        async with open_store(settings) as store:
            await store.client.lpush(lists.in_flight, stranded)
            await store.client.lpush(lists.delayed, hostile, *after)  # the oldest first
            async with bridging(store, leading_gate()) as bridge:
                await async_wait_until(
                    lambda: (
                        list_lengths(redis_client, settings) == (0, 0, 0)
                        and bridge.stats.moved == 1 + len(after)
                    ),
                    "the hostile items dead-lettered and the later ones accepted",
                    DEADLINE,
                )
                return bridge

    bridge = asyncio.run(scenario())
    assert_each_accepted_once(redis_client, settings, {json.loads(r)["uuid"] for r in after})
    assert bridge.stats.malformed == 2
    dead = dead_entries(redis_client, settings)
    assert [e[b"raw"] for e in dead] == [stranded, hostile]
    for entry in dead:
        assert b"nested too deeply" in entry[b"reason"]
        assert b"m" not in entry and b"r" not in entry  # nothing a replay could send on


@pytest.mark.parametrize("failing", ["parse_item", "_malformed"])
def test_an_item_the_parser_or_the_salvage_fails_on_is_dead_lettered_with_the_reason(
    settings: Settings, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    """Whatever reading an item raises (a bug included), the item leaves the lists."""
    lists = LegacyLists.of(settings)
    poison = b'{"message": "poison", "runAt": 5' + (b"}" if failing == "parse_item" else b"")
    fine = [item(f"fine {i}", now_ms(), new_uuid()) for i in range(3)]
    real = getattr(bridge_module, failing)

    def broken(raw: bytes, *args: object) -> object:
        if b"poison" in raw:
            raise RuntimeError("a bug \ud800")  # text a careless reason would keep
        return real(raw, *args)

    monkeypatch.setattr(bridge_module, failing, broken)

    async def scenario() -> LegacyBridge:
        async with open_store(settings) as store:
            await store.client.lpush(lists.queue, fine[0], poison, *fine[1:])
            async with bridging(store, leading_gate()) as bridge:
                await async_wait_until(
                    lambda: (
                        list_lengths(redis_client, settings) == (0, 0, 0)
                        and bridge.stats.moved == 1 + len(fine)
                    ),
                    "every item settled",
                    DEADLINE,
                )
                return bridge

    bridge = asyncio.run(scenario())
    assert_each_accepted_once(redis_client, settings, {json.loads(r)["uuid"] for r in fine})
    [dead] = dead_entries(redis_client, settings)
    assert dead[b"raw"] == poison
    assert dead[b"reason"] == b"unreadable legacy item: RuntimeError: a bug \\ud800"
    assert dead[b"u"] == uuid_key(legacy_uuid(poison))
    assert bridge.stats.malformed == 1


def test_the_bridge_does_nothing_while_the_gate_is_closed_and_redrives_first_when_it_opens(
    settings: Settings, redis_client: redis.Redis
) -> None:
    lists = LegacyLists.of(settings)
    waiting = [item(f"w{i}", now_ms(), new_uuid()) for i in range(10)]
    stranded = item("left in flight", now_ms(), new_uuid())

    async def scenario() -> None:
        async with open_store(settings) as store:
            for raw in waiting:
                await store.client.lpush(lists.queue, raw)
            await store.client.lpush(lists.in_flight, stranded)
            gate = LeadershipGate()
            async with bridging(store, gate) as bridge:
                await asyncio.sleep(0.5)
                assert list_lengths(redis_client, settings) == (10, 0, 1)
                assert redis_client.xlen(Keyspace(settings.prefix).stream) == 0
                assert bridge.stats.moved == bridge.stats.redriven == 0

                gate.set_role(Role.LEADER, 3)
                await async_wait_until(
                    lambda: list_lengths(redis_client, settings) == (0, 0, 0), "bridged", DEADLINE
                )
                assert stream_uuids(redis_client, settings)[0] == json.loads(stranded)["uuid"]

                # Leadership lost (or in doubt): new items wait for the next leader.
                gate.set_role(Role.SUSPENDED)
                await asyncio.sleep(0.1)  # a round under way finishes what it took
                moved = bridge.stats.moved
                await store.client.lpush(lists.delayed, item("later", now_ms(), new_uuid()))
                await asyncio.sleep(0.5)
                assert list_lengths(redis_client, settings) == (0, 1, 0)
                assert bridge.stats.moved == moved

                gate.set_role(Role.LEADER, 4)
                await async_wait_until(
                    lambda: list_lengths(redis_client, settings) == (0, 0, 0), "resumed", DEADLINE
                )

    asyncio.run(scenario())
    assert len(stream_uuids(redis_client, settings)) == 12


def test_an_item_pushed_while_idle_is_accepted_within_the_legacy_latency(
    settings: Settings, redis_client: redis.Redis
) -> None:
    async def scenario() -> float:
        async with open_store(settings) as store, bridging(store, leading_gate()):
            await asyncio.sleep(1.0)  # idle long enough for the poll to back off fully
            pushed = time.monotonic()
            await store.client.lpush(
                LegacyLists.of(settings).queue, item("hi", now_ms(), new_uuid())
            )
            await async_wait_until(
                lambda: redis_client.xlen(Keyspace(settings.prefix).stream) == 1,
                "accepted",
                within=5.0,
            )
            return time.monotonic() - pushed

    latency = asyncio.run(scenario())
    assert latency < 1.0, f"a legacy item took {latency:.3f} s"  # ~0.1 s when the machine is calm


def test_two_bridges_at_once_accept_each_item_exactly_once_without_a_lock(
    settings: Settings, redis_client: redis.Redis
) -> None:
    """A paused old leader waking up next to the new one: LMOVE and idempotency suffice."""
    lists = LegacyLists.of(settings)
    raws = [item(f"m{i}", now_ms(), new_uuid() if i % 2 else None) for i in range(600)]

    async def scenario() -> tuple[LegacyBridge, LegacyBridge]:
        async with open_store(settings) as a, open_store(settings) as b:
            # Some sit in flight, as if a third bridge had died mid-move: both re-drive them.
            await a.client.lpush(lists.in_flight, *raws[::50])
            async with (
                bridging(a, leading_gate(5), batch=7) as one,
                bridging(b, leading_gate(6), batch=7) as two,
            ):
                for start in range(0, len(raws), 50):
                    await a.client.lpush(lists.queue, *raws[start : start + 50])
                    await asyncio.sleep(0.01)
                await async_wait_until(
                    lambda: (
                        list_lengths(redis_client, settings) == (0, 0, 0)
                        and one.stats.moved + two.stats.moved == len(raws)
                    ),
                    "both bridges settled",
                    DEADLINE,
                )
                return one, two

    one, two = asyncio.run(scenario())
    expected = {json.loads(r).get("uuid") or legacy_uuid(r) for r in raws}
    assert_each_accepted_once(redis_client, settings, expected)
    assert one.stats.accepted + two.stats.accepted == len(raws)


def test_list_handler_pushes_each_due_message_where_an_old_consumer_finds_it(
    settings: Settings, redis_client: redis.Redis, prefix: str
) -> None:
    target = "{" + prefix + "}:ConsumerQueue"
    old_in_flight = "{" + prefix + "}:ConsumerQueueDead"
    uuids = [new_uuid() for _ in range(3)]

    async def scenario() -> None:
        async with open_store(settings) as store:
            created: list[object] = []

            def factory() -> object:
                created.append(store.client)
                return store.client

            worker = Worker(store, make_list_handler(factory, target), "w-list", concurrency=1)
            task = asyncio.create_task(worker.run())
            try:
                for i, uuid in enumerate(uuids):
                    await store.accept(NewMessage(uuid, f"héllo {i}", now_ms() - 10 + i))
                await async_wait_until(
                    lambda: redis_client.llen(target) == 3, "pushed onto the list", DEADLINE
                )
                await async_wait_until(
                    lambda: all(
                        redis_client.hget(Keyspace(settings.prefix).messages, uuid_key(u))
                        is not None
                        for u in uuids
                    ),
                    "records",
                    DEADLINE,
                )
            finally:
                worker.stop()
                await asyncio.wait_for(task, 10.0)
            assert len(created) == 1  # the factory is asked once, on first use
            for uuid in uuids:
                assert (await store.record(uuid)).state is State.DELIVERED

    asyncio.run(scenario())
    # The old consumer: RPOPLPUSH from the list into its own in-flight list, oldest first.
    got = [redis_client.rpoplpush(target, old_in_flight) for _ in uuids]
    assert [json.loads(raw)["uuid"] for raw in got] == uuids
    first = got[0].decode()
    assert list(json.loads(first)) == ["message", "runAt", "uuid"]
    assert json.loads(first)["message"] == "héllo 0"


def test_list_handler_pushes_the_delivery_as_json(
    settings: Settings, redis_client: redis.Redis, prefix: str
) -> None:
    target = "{" + prefix + "}:Out"
    uuid = new_uuid()
    delivery = Delivery(
        id="1-0", uuid=uuid, key=uuid_key(uuid), message='say "hi"', run_at=1234, attempts=0
    )

    async def scenario() -> None:
        async with open_store(settings) as store:
            await make_list_handler(lambda: store.client, target)(delivery)

    asyncio.run(scenario())
    assert redis_client.lrange(target, 0, -1) == [
        json.dumps(
            {"message": 'say "hi"', "runAt": 1234, "uuid": delivery.uuid}, separators=(",", ":")
        ).encode()
    ]


def test_a_failing_partition_keeps_its_items_in_flight_and_holds_up_no_other(
    settings: Settings, redis_client: redis.Redis
) -> None:
    """One partition's accept fails (its messages key holds the wrong type: a Redis error
    like a master failing over, or down): the other partitions' items are accepted on
    time, its own wait in QueueDead, oldest first, and are accepted once it is mended;
    nothing is lost and nothing is accepted twice."""
    settings = dataclasses.replace(settings, partitions=4)
    lists = LegacyLists.of(settings)
    broken = 2
    later = now_ms() + 3_600_000

    async def scenario() -> LegacyBridge:
        client = connect(settings)
        try:
            partitions = Partitions(client, settings)

            def uuids_in(partition: int, n: int) -> list[str]:
                found: list[str] = []
                while len(found) < n:
                    uuid = new_uuid()
                    if partitions.index_of(uuid) == partition:
                        found.append(uuid)
                return found

            async def accepted(uuids: list[str]) -> bool:
                for uuid in uuids:
                    if await partitions.store_for(uuid).record(uuid) is None:
                        return False
                return True

            first = {p: uuids_in(p, 10) for p in range(4)}
            bad_key = partitions.stores[broken].keys.messages
            await client.set(bad_key, b"not a hash")
            # Left in flight by a crash: its own oldest, more than a read (8), then others'.
            crashed = uuids_in(broken, 10) + [u for p in (0, 1, 3) for u in uuids_in(p, 2)]
            for uuid in crashed:
                await client.lpush(lists.in_flight, item("m", later, uuid))
            for p in range(4):
                for uuid in first[p]:
                    await client.lpush(lists.delayed, item("m", later, uuid))
            async with bridging(partitions, leading_gate(), batch=8) as bridge:
                others = [u for p in (0, 1, 3) for u in first[p]] + crashed[10:]
                await async_wait_until(lambda: accepted(others), "others", DEADLINE)
                await async_wait_until(
                    lambda: redis_client.llen(lists.in_flight) == 20, "its 20", DEADLINE
                )
                # Items pushed meanwhile: the others' flow at once, its own join the wait.
                second = {p: uuids_in(p, 3) for p in range(4)}
                for p in range(4):
                    for uuid in second[p]:
                        await client.lpush(lists.delayed, item("m", later, uuid))
                others = [u for p in (0, 1, 3) for u in second[p]]
                await async_wait_until(lambda: accepted(others), "others", DEADLINE)
                await async_wait_until(
                    lambda: redis_client.llen(lists.in_flight) == 23, "its 23", DEADLINE
                )
                assert list_lengths(redis_client, settings)[:2] == (0, 0)
                await async_wait_until(lambda: bridge.stats.errors >= 3, "tried again", DEADLINE)
                assert redis_client.llen(lists.in_flight) == 23
                await client.delete(bad_key)
                mine = crashed[:10] + first[broken] + second[broken]
                await async_wait_until(lambda: accepted(mine), "its own, mended", DEADLINE)
                await async_wait_until(
                    lambda: list_lengths(redis_client, settings) == (0, 0, 0), "none", DEADLINE
                )
                every = crashed + [u for p in range(4) for u in first[p] + second[p]]
                records = {u: await partitions.store_for(u).record(u) for u in every}
                assert all(r is not None and r.state is State.SCHEDULED for r in records.values())
                counted = sum([await client.zcard(s.keys.delayed) for s in partitions], 0)
                assert counted == len(every), "each message once"
                # Its items were accepted in the order they were pushed (the oldest first):
                # the delayed set's sequence grows with each accept.
                seqs = [int(records[u].ref or "", 16) for u in mine]
                assert seqs == sorted(seqs), seqs
                return bridge
        finally:
            await client.aclose()

    bridge = asyncio.run(scenario())
    assert bridge.stats.accepted == 68 and bridge.stats.duplicates == 0
