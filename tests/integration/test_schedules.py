"""Schedules against a real Redis (one partition) and a real 3-master Redis Cluster (16
partitions): the leader's passes, replace and delete while occurrences are pending, the
race of a pass with a replace or a delete, catch-up after a gap, fencing."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

import pytest
from structlog.testing import capture_logs

from app.model import State
from app.recurrence import MAX_PER_CALL, Definition, occurrence_uuid
from app.settings import Settings
from app.store import open_client
from app.store.keys import Keyspace
from app.store.partitions import Partitions
from app.store.schedules import HORIZON_MS, Schedules
from election.gate import LeadershipGate, Role
from election.materialiser import Materialiser

EPOCH = 5
EVERY_SECOND = Definition(message="tick", every_ms=1000)


@pytest.fixture(params=["redis", "cluster"])
def settings(request, prefix: str) -> Settings:
    if request.param == "redis":
        url = request.getfixturevalue("redis_url")
        request.getfixturevalue("redis_client")  # deletes the test's keys afterwards
        return Settings.from_env({}, redis_url=url, prefix=prefix)
    url = request.getfixturevalue("cluster_url")
    return Settings.from_env({}, redis_url=url, prefix=prefix, partitions=16)


@contextlib.asynccontextmanager
async def opened(settings: Settings) -> AsyncIterator[Schedules]:
    client = await open_client(settings)
    try:
        partitions = Partitions(client, settings)
        await partitions.check()
        yield Schedules(partitions)
    finally:
        await client.aclose()


def leader(schedules: Schedules, catchup: str = "latest", epoch: int = EPOCH) -> Materialiser:
    gate = LeadershipGate()
    gate.set_role(Role.LEADER, epoch)
    return Materialiser(schedules, gate, catchup)


async def states(schedules: Schedules, name: str, generation: int, instants) -> dict[int, str]:
    """occurrence instant -> state of its message ("none": no record)."""
    out = {}
    for at in instants:
        uuid = occurrence_uuid(name, generation, at)
        record = await schedules.partitions.store_for(uuid).record(uuid)
        out[at] = "none" if record is None else record.state.value
    return out


def test_a_pass_turns_the_occurrences_within_the_horizon_into_delayed_messages(settings):
    async def scenario():
        async with opened(settings) as s:
            put = await s.put("tick", EVERY_SECOND)
            assert put.kind == "created"
            m = leader(s)
            await m.materialise(EPOCH)
            stored = await s.get("tick")
            assert stored is not None
            expected = list(range(put.at_ms + 1000, stored.progress_ms + 1, 1000))
            # Every occurrence up to the pass's time + the horizon, no other.
            assert len(expected) >= HORIZON_MS // 1000
            found = await states(s, "tick", put.generation, expected)
            assert set(found.values()) <= {"scheduled", "queued"}
            assert m.stats.created == len(expected)
            beyond = await states(s, "tick", put.generation, [stored.progress_ms + 1000])
            assert beyond == {stored.progress_ms + 1000: "none"}

    asyncio.run(scenario())


def test_a_repeated_pass_or_a_second_leader_produces_only_duplicates(settings):
    async def scenario():
        async with opened(settings) as s:
            await s.put("tick", EVERY_SECOND)
            first = leader(s)
            await first.materialise(EPOCH)
            # A second leader with no memory, and the progress record lost: it recomputes
            # the same uuids, and the accept script keeps the first of each.
            await s.client.hdel(Keyspace(settings.prefix).schedule_progress, "tick")
            second = leader(s, epoch=EPOCH + 1)
            await second.materialise(EPOCH + 1)
            assert second.stats.produced >= first.stats.created
            assert second.stats.created <= 1  # at most the one the clock moved on to

    asyncio.run(scenario())


def test_an_identical_put_changes_nothing_and_a_different_one_takes_a_new_generation(settings):
    async def scenario():
        async with opened(settings) as s:
            first = await s.put("tick", EVERY_SECOND)
            again = await s.put("tick", EVERY_SECOND)
            assert (again.kind, again.generation) == ("unchanged", first.generation)
            other = await s.put("tick", Definition(message="tock", every_ms=1000))
            assert other.kind == "replaced" and other.generation > first.generation
            # Deleted and created again: never a generation used before (nor its uuids).
            assert await s.delete("tick")
            anew = await s.put("tick", EVERY_SECOND)
            assert anew.kind == "created" and anew.generation > other.generation

    asyncio.run(scenario())


@pytest.mark.parametrize("change", ["replace", "delete", "pause"])
def test_replace_delete_or_pause_cancels_every_pending_occurrence_of_the_old_definition(
    settings, change
):
    async def scenario():
        async with opened(settings) as s:
            put = await s.put("tick", EVERY_SECOND)
            await leader(s).materialise(EPOCH)
            stored = await s.get("tick")
            pending = list(range(put.at_ms + 1000, stored.progress_ms + 1, 1000))
            if change == "replace":
                await s.put("tick", Definition(message="tock", every_ms=2000))
            elif change == "delete":
                assert await s.delete("tick")
            else:
                await s.put("tick", Definition(message="tick", every_ms=1000, paused=True))
            now, _, retired = await s.clock()
            assert retired == 0  # voided before the change answered
            found = await states(s, "tick", put.generation, pending)
            not_due = {at: state for at, state in found.items() if at > now}
            assert not_due and set(not_due.values()) == {"cancelled"}

    asyncio.run(scenario())


@pytest.mark.parametrize("every", [1000, 20])
@pytest.mark.parametrize("change", ["replace", "delete"])
def test_a_pass_racing_a_replace_or_delete_leaves_no_old_occurrence_that_can_run(
    settings, change, every
):
    """The pass reads the definitions, then the change lands (and voids), then the pass
    accepts the old generation's occurrences: each meets a tombstone, none is scheduled.
    Every 20 ms (below any floor the api allows): a first pass produces 1,000 (a pass's
    most per schedule), the racing one the next 500, and the change voids 1,750."""

    async def scenario():
        async with opened(settings) as s:
            put = await s.put("tick", Definition(message="tick", every_ms=every))
            m = leader(s)
            if every == 20:
                await m.materialise(EPOCH)
                assert m.stats.created == MAX_PER_CALL
            produce = s.produce
            changed_at = []

            async def change_then_produce(msgs):
                if not changed_at:
                    if change == "replace":
                        await s.put("tick", Definition(message="tock", every_ms=1000))
                    else:
                        await s.delete("tick")
                    changed_at.append((await s.clock())[0])
                return await produce(msgs)

            s.produce = change_then_produce  # type: ignore[method-assign]
            await m.materialise(EPOCH)
            assert changed_at
            assert m.stats.produced >= HORIZON_MS // every
            if every == 1000:  # none was due before the change: every one met a tombstone
                assert m.stats.created == 0
            instants = range(put.at_ms + every, changed_at[0] + HORIZON_MS + 1000, every)
            found = await states(s, "tick", put.generation, instants)
            # Due before the change: the old definition's to run. After it: none may run.
            after = {v for at, v in found.items() if at > changed_at[0]}
            assert after and after <= {"cancelled", "none"}
            # The pass's progress named the old generation stale: the next one reloads.
            s.produce = produce  # type: ignore[method-assign]
            await m.materialise(EPOCH)
            if change == "replace":
                current = await s.get("tick")
                assert current is not None and current.generation != put.generation
                assert m.stats.created > 0
            else:
                assert await s.get("tick") is None

    asyncio.run(scenario())


def test_a_replaced_definition_an_api_left_unvoided_is_voided_by_the_leader(settings):
    async def scenario():
        async with opened(settings) as s:
            put = await s.put("tick", EVERY_SECOND)
            await leader(s).materialise(EPOCH)
            stored = await s.get("tick")
            pending = list(range(put.at_ms + 1000, stored.progress_ms + 1, 1000))
            # The api dies right after its replace script: nothing voided.
            void = s.void_retired

            async def died(generation):
                return 0, 0

            s.void_retired = died  # type: ignore[method-assign]
            await s.put("tick", Definition(message="tock", every_ms=1000))
            s.void_retired = void  # type: ignore[method-assign]
            ks = Keyspace(settings.prefix)
            raw = json.loads(await s.client.hget(ks.schedule_retired, put.generation))
            raw["at"] -= 60_000  # long ago: past the grace the leader leaves the api
            await s.client.hset(ks.schedule_retired, put.generation, json.dumps(raw))
            m = leader(s)
            await m.materialise(EPOCH)
            assert m.stats.voided == 1
            now, _, retired = await s.clock()
            assert retired == 0
            found = await states(s, "tick", put.generation, [p for p in pending if p > now])
            assert set(found.values()) == {"cancelled"}

    asyncio.run(scenario())


@pytest.mark.parametrize("catchup", ["latest", "all", "none"])
def test_after_a_gap_without_a_leader_the_catchup_rule_decides_the_missed_occurrences(
    settings, catchup
):
    async def scenario():
        async with opened(settings) as s:
            now, _, _ = await s.clock()
            start = now - 120_000  # an interval anchored two minutes ago
            d = Definition(message="tick", every_ms=2000, start_at=start)
            put = await s.put("tick", d)
            # Created two minutes ago; the leader last materialised then, and none ran since.
            ks = Keyspace(settings.prefix)
            await s.client.hset(ks.schedule_meta, "tick", f"{put.generation}:{start - 1}")
            await s.client.hset(ks.schedule_progress, "tick", f"{put.generation}:{start - 1}")
            before, _, _ = await s.clock()
            m = leader(s, catchup)
            await m.materialise(EPOCH)
            after, _, _ = await s.clock()
            # Surely missed (due more than the horizon before the pass), and surely late
            # only (less than the horizon before it); the pass's own time lies between.
            grid = range(start, after, 2000)  # every occurrence until now
            missed = [at for at in grid if at < before - HORIZON_MS]
            late = [at for at in grid if at >= after - HORIZON_MS]
            border = [at for at in grid if before - HORIZON_MS <= at < after - HORIZON_MS]
            found = await states(s, "tick", put.generation, missed + border + late)
            made = [at for at in missed if found[at] != "none"]
            if catchup == "all":
                assert made == missed
            elif catchup == "none":
                assert made == []
            else:  # the newest missed one: the last surely missed, or one on the border
                assert made in ([missed[-1]], [])
                assert made or any(found[at] != "none" for at in border)
                assert len(missed) > 10
            assert all(found[at] != "none" for at in late)

    asyncio.run(scenario())


def test_progress_from_an_older_epoch_is_refused_and_closes_its_gate(settings):
    async def scenario():
        async with opened(settings) as s:
            await s.put("tick", EVERY_SECOND)
            await leader(s, epoch=EPOCH + 1).materialise(EPOCH + 1)
            await s.put("tock", EVERY_SECOND)
            zombie = leader(s, epoch=EPOCH)
            await zombie.materialise(EPOCH)
            assert zombie.stats.refused == 1
            assert not zombie.gate.is_open

    asyncio.run(scenario())


def test_a_paused_schedule_produces_nothing_and_resumes_from_now(settings):
    async def scenario():
        async with opened(settings) as s:
            put = await s.put("tick", Definition(message="tick", every_ms=1000, paused=True))
            m = leader(s)
            await m.materialise(EPOCH)
            assert m.stats.produced == 0
            resumed = await s.put("tick", EVERY_SECOND, expect=put.generation)
            assert resumed.kind == "replaced"
            await m.materialise(EPOCH)
            assert m.stats.created >= HORIZON_MS // 1000
            stale = await s.put("tick", EVERY_SECOND, expect=put.generation)
            assert stale.kind == "conflict"

    asyncio.run(scenario())


def test_the_produced_messages_of_a_schedule_are_listed_with_their_state(settings):
    async def scenario():
        async with opened(settings) as s:
            put = await s.put("tick", EVERY_SECOND)
            await leader(s).materialise(EPOCH)
            stored = await s.get("tick")
            rows = await s.produced(stored, 3)
            assert [at for at, _, _ in rows] == [
                stored.progress_ms,
                stored.progress_ms - 1000,
                stored.progress_ms - 2000,
            ]
            assert all(rec is not None and rec.state is State.SCHEDULED for _, _, rec in rows)
            assert rows[0][1] == occurrence_uuid("tick", put.generation, stored.progress_ms)

    asyncio.run(scenario())


def test_a_definition_or_retired_entry_that_cannot_be_decoded_is_skipped_and_the_rest_run(
    settings,
):
    async def scenario():
        async with opened(settings) as s:
            put = await s.put("tick", EVERY_SECOND)
            keys = Keyspace(settings.prefix)
            await s.client.hset(keys.schedules, "broken", b"\xff not a definition")
            await s.client.hset(keys.schedule_meta, "broken", b"1:0")
            await s.client.hset(keys.schedule_retired, "999", b"{not json")
            m = leader(s)
            with capture_logs() as logs:
                await m.materialise(EPOCH)  # before: the decode error ended the task
            assert m.stats.created >= HORIZON_MS // 1000
            stored = await s.get("tick")
            found = await states(s, "tick", put.generation, [stored.progress_ms])
            assert set(found.values()) <= {"scheduled", "queued"}
            events = {(e["event"], e.get("schedule", e.get("generation"))) for e in logs}
            assert ("schedule cannot be decoded, skipped", "broken") in events
            assert ("retired schedule cannot be decoded", "999") in events

    asyncio.run(scenario())
