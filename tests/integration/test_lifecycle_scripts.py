"""The lifecycle scripts (cancel, reschedule, replay, drop_dead) and what they need from
the others (transitions, ref, the leader record), through Store and Lifecycle, against
the real Redis. Same style as test_scripts.py: sync tests, a private event loop.
"""

from __future__ import annotations

import pytest

from app.model import State
from app.store import LEADER_TTL_MS, Store, encode_epoch, lifecycle
from app.store.codec import decode_record, encode_record, member, uuid_key, uuid_text
from app.store.keys import Keyspace
from app.store.lifecycle import Lifecycle, Outcome
from tests.aio import Harness
from tests.integration.test_scripts import (
    delayed_members,
    new,
    pending,
    redis_now_ms,
    retained,
    stream_uuids,
    wait_for_redis_time,
)
from tests.wait import wait_until

FAR = 253402300799999


def named(h: Harness, identifier: str) -> Store:
    base = h.store()
    return Store(base.client, base.settings, identifier=identifier)


def dead_letter(h: Harness, store: Store, message: str = "poison") -> str:
    """Accept a due message and fail it once with max_deliveries=1: it is dead."""
    msg = new(message, run_at=1)
    h.run(store.accept(msg))
    [delivery] = [d for d in h.run(store.read("w", 100, None)) if d.uuid == msg.uuid]
    assert h.run(store.fail(delivery, 0, "ValueError: boom")) == ("dead", 1)
    return msg.uuid


# --- transitions and ref ---------------------------------------------------------------------


def test_every_state_change_stamps_its_transition(h, r, ks):
    store = h.store(max_deliveries=2)
    h.run(store.ensure_group())
    now = redis_now_ms(r)
    msg = new("t", run_at=now + 30)
    h.run(store.accept(msg))
    record = h.run(store.record(msg.uuid))
    assert record.transitions == {"scheduled": record.accepted_at}
    wait_for_redis_time(r, msg.run_at)
    h.run(store.promote(1))
    [d] = h.run(store.read("w", 10, None))
    assert h.run(store.fail(d, 0, "boom")) == ("retrying", 1)
    h.run(store.promote(1))
    [d] = h.run(store.read("w", 10, None))
    assert h.run(store.fail(d, 0, "boom")) == ("dead", 2)
    record = h.run(store.record(msg.uuid))
    assert set(record.transitions) == {"scheduled", "queued", "retrying", "dead"}
    assert record.transitions["dead"] == record.updated_at
    # Each state's last entry: queued again after retrying.
    ordered = [record.transitions[s] for s in ("scheduled", "retrying", "queued", "dead")]
    assert ordered == sorted(ordered)
    [(dead_id, _fields)] = r.xrange(ks.dead)
    assert record.ref == dead_id.decode()

    lc = Lifecycle(store)
    assert h.run(lc.replay(msg.uuid)) == Outcome("done", state="queued")
    [d] = h.run(store.read("w", 10, None))
    h.run(store.ack([d]))
    record = h.run(store.record(msg.uuid))
    assert record.state is State.DELIVERED
    assert record.ref is None
    assert record.transitions["queued"] >= record.transitions["dead"]
    assert record.transitions["delivered"] == record.updated_at


def test_a_scheduled_record_keeps_the_sequence_of_its_sorted_set_member(h, r, ks):
    store = h.store()
    msg = new(run_at=FAR)
    h.run(store.accept(msg))
    [stored] = r.zrange(ks.delayed, 0, -1)
    record = h.run(store.record(msg.uuid))
    assert record.ref is not None and stored == bytes.fromhex(record.ref) + uuid_key(msg.uuid)


def test_reclaim_dead_letter_keeps_the_dead_entry_id(h, r, ks):
    store = h.store(visibility_timeout=0.01, max_deliveries=1)
    h.run(store.ensure_group())
    msg = new(run_at=1)
    h.run(store.accept(msg))
    [delivery] = h.run(store.read("w1", 10, None))
    wait_until(lambda: pending(r, ks)[delivery.id]["idle"] > 10, "idle", 3.0)
    assert h.run(store.reclaim("w2", "0-0", 10))[2] == 1
    record = h.run(store.record(msg.uuid))
    [(dead_id, _)] = r.xrange(ks.dead)
    assert record.state is State.DEAD and record.ref == dead_id.decode()
    assert "dead" in record.transitions


def test_python_and_lua_spell_the_same_record(h, r, ks):
    """app/store/codec.py (tests, status reads) and _record.lua (every write) share one format."""
    store = h.store()
    msg = new("the body", run_at=FAR)
    h.run(store.accept(msg))
    written = r.hget(ks.messages, uuid_key(msg.uuid))
    record = decode_record(msg.uuid, written)
    assert written == encode_record(
        State.SCHEDULED,
        FAR,
        record.accepted_at,
        ref=bytes.fromhex(record.ref or ""),
        body=b"the body",
    )


# --- leader record ---------------------------------------------------------------------------


def test_promote_records_the_leader_with_a_ttl_and_keeps_since_while_the_epoch_holds(h, r, ks):
    store = named(h, "sched-a")
    before = redis_now_ms(r)
    assert h.run(store.promote(7)).refused_by is None
    first = r.hgetall(ks.leader)
    assert first[b"identifier"] == b"sched-a"
    assert first[b"epoch"] == encode_epoch(7).encode()
    assert before <= int(first[b"since"]) <= redis_now_ms(r)
    assert 0 < r.pttl(ks.leader) <= LEADER_TTL_MS
    wait_for_redis_time(r, int(first[b"since"]) + 2)
    h.run(store.promote(7))
    assert r.hgetall(ks.leader) == first  # same leader, same epoch: since unchanged
    other = named(h, "sched-b")
    h.run(other.promote(8))
    second = r.hgetall(ks.leader)
    assert second[b"identifier"] == b"sched-b"
    assert int(second[b"since"]) > int(first[b"since"])


def test_a_refused_promote_does_not_claim_leadership(h, r, ks):
    store = named(h, "new")
    h.run(store.promote(9))
    zombie = named(h, "zombie")
    assert h.run(zombie.promote(3)).refused_by == 9
    assert r.hget(ks.leader, "identifier") == b"new"


# --- cancel and reschedule of records the scripts did not write ----------------------------


def test_cancel_removes_the_member_a_python_encoded_record_names(h, r, ks):
    lc = Lifecycle(h.store())
    uuid, other = "11111111-1111-1111-1111-111111111111", "22222222-2222-2222-2222-222222222222"
    r.hset(ks.messages, uuid_key(uuid), encode_record(State.SCHEDULED, FAR, 1, ref=member(2, b"")))
    r.zadd(ks.delayed, {member(1, uuid_key(other)): FAR, member(2, uuid_key(uuid)): FAR})
    assert h.run(lc.cancel(uuid)) == Outcome("done", state="cancelled", run_at=FAR)
    assert [u for u, _ in delayed_members(r, ks)] == [other]
    record = decode_record(uuid, r.hget(ks.messages, uuid_key(uuid)))
    assert (record.state, record.ref) == (State.CANCELLED, None)


def test_reschedule_of_a_retrying_record_keeps_it_retrying_under_a_new_sequence(h, r, ks):
    lc = Lifecycle(h.store())
    uuid = "33333333-3333-3333-3333-333333333333"
    # Retrying: the score is the retry time, not the record's runAt.
    r.hset(
        ks.messages,
        uuid_key(uuid),
        encode_record(State.RETRYING, 5, 1, attempts=2, ref=member(0xFFFF, b""), body=b"b"),
    )
    for i in range(300):  # big enough to be a skiplist
        r.zadd(ks.delayed, {member(i, uuid_key(f"{i:08d}-0000-0000-0000-000000000000")): FAR - 1})
    r.zadd(ks.delayed, {member(0xFFFF, uuid_key(uuid)): FAR - 1})
    assert h.run(lc.reschedule(uuid, FAR)) == Outcome("done", state="retrying", run_at=FAR)
    members = delayed_members(r, ks)
    assert len(members) == 301
    assert members[-1] == (uuid, float(FAR))
    record = decode_record(uuid, r.hget(ks.messages, uuid_key(uuid)))
    assert (record.run_at, record.attempts) == (FAR, 2)
    assert record.ref == r.zrange(ks.delayed, -1, -1)[0][:6].hex()
    assert int(record.ref, 16) == int(r.get(ks.sequence))


def test_reschedule_to_a_passed_time_puts_the_stored_body_in_the_stream(h, r, ks):
    store = h.store()
    lc = Lifecycle(store)
    msg = new("the body", run_at=FAR)
    h.run(store.accept(msg))
    assert h.run(lc.reschedule(msg.uuid, 10)) == Outcome("done", state="queued", run_at=10)
    [(_id, fields)] = r.xrange(ks.stream)
    assert (uuid_text(fields[b"u"]), fields[b"m"], fields[b"r"], fields[b"a"]) == (
        msg.uuid,
        b"the body",
        b"10",
        b"0",
    )
    assert r.zcard(ks.delayed) == 0


# --- dead letters ----------------------------------------------------------------------------


@pytest.fixture
def small_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two entries per script call, so scans and replay-all take several calls."""
    monkeypatch.setattr(lifecycle, "DEAD_BATCH", 2)


def test_replay_all_replays_every_entry_over_several_atomic_batches(h, r, ks, small_batches):
    store = h.store(max_deliveries=1)
    h.run(store.ensure_group())
    uuids = [dead_letter(h, store, f"m{i}") for i in range(5)]
    r.xadd(ks.dead, {"reason": "malformed legacy item", "raw": "x"})  # no uuid: skipped
    assert h.run(Lifecycle(store).replay_all()) == (5, 1)
    assert stream_uuids(r, ks.stream) == uuids
    assert r.xlen(ks.dead) == 1
    for uuid in uuids:
        record = h.run(store.record(uuid))
        assert (record.state, record.attempts) == (State.QUEUED, 0)


def test_a_replayed_message_is_not_purged_while_queued_again(h, r, ks):
    store = h.store(max_deliveries=1, retention=0.001)
    h.run(store.ensure_group())
    uuid = dead_letter(h, store)
    wait_for_redis_time(r, retained(r, ks)[uuid] + 1)
    assert h.run(Lifecycle(store).replay(uuid)) == Outcome("done", state="queued")
    other = new(run_at=1)
    h.run(store.accept(other))
    deliveries = h.run(store.read("w", 10, None))
    h.run(store.ack([d for d in deliveries if d.uuid == other.uuid]))  # the ack purges
    assert uuid not in retained(r, ks)  # its entry was read and passed by
    assert h.run(store.record(uuid)).state is State.QUEUED
    [d] = [d for d in deliveries if d.uuid == uuid]
    h.run(store.ack([d]))
    assert uuid in retained(r, ks)  # kept again from its new final state


def test_replay_of_an_empty_dead_stream_replays_nothing(h):
    assert h.run(Lifecycle(h.store()).replay_all()) == (0, 0)


def test_replay_finds_an_entry_whose_record_was_purged_by_scanning(h, r, ks, small_batches):
    store = h.store(max_deliveries=1)
    h.run(store.ensure_group())
    uuids = [dead_letter(h, store, f"m{i}") for i in range(5)]
    r.hdel(ks.messages, uuid_key(uuids[3]))  # its retention window passed; the entry stayed
    lc = Lifecycle(store)
    assert h.run(lc.replay(uuids[3])) == Outcome("done", state="queued")
    assert stream_uuids(r, ks.stream) == [uuids[3]]
    record = h.run(store.record(uuids[3]))
    assert (record.state, record.attempts, record.run_at) == (State.QUEUED, 0, 1)
    assert [u for u in stream_uuids(r, ks.dead)] == uuids[:3] + uuids[4:]


def test_replay_refuses_an_entry_whose_uuid_lives_elsewhere(h, r, ks):
    store = h.store()
    msg = new(run_at=FAR)
    h.run(store.accept(msg))
    r.xadd(
        ks.dead, {"u": uuid_key(msg.uuid), "m": "x", "r": "1", "a": "3", "reason": "?", "at": "1"}
    )
    assert h.run(Lifecycle(store).replay(msg.uuid)) == Outcome("conflict", state="scheduled")
    assert r.xlen(ks.dead) == 1 and r.xlen(ks.stream) == 0


def test_drop_dead_deletes_only_that_uuid_and_keeps_its_record(h, r, ks, small_batches):
    store = h.store(max_deliveries=1)
    h.run(store.ensure_group())
    uuids = [dead_letter(h, store, f"m{i}") for i in range(4)]
    lc = Lifecycle(store)
    assert h.run(lc.drop_dead(uuids[1])) is True
    assert h.run(lc.drop_dead(uuids[1])) is False
    assert stream_uuids(r, ks.dead) == [uuids[0], *uuids[2:]]
    assert h.run(store.record(uuids[1])).state is State.DEAD
    assert h.run(lc.replay(uuids[1])) == Outcome("missing")


def test_purge_deletes_the_whole_dead_stream_and_counts_it(h, r, ks):
    store = h.store(max_deliveries=1)
    h.run(store.ensure_group())
    for i in range(3):
        dead_letter(h, store, f"m{i}")
    assert h.run(Lifecycle(store).purge_dead()) == 3
    assert not r.exists(ks.dead)
    assert h.run(Lifecycle(store).purge_dead()) == 0


def test_keyspace_names_the_leader_record():
    assert Keyspace("eat").leader == "{eat}:leader"


def test_lifecycle_scripts_keep_the_record_readable_by_the_core_scripts(h, r, ks):
    """A cancelled or rescheduled record goes on through promote/ack unchanged in shape."""
    store = h.store()
    h.run(store.ensure_group())
    lc = Lifecycle(store)
    now = redis_now_ms(r)
    msg = new("moved", run_at=FAR)
    h.run(store.accept(msg))
    assert h.run(lc.reschedule(msg.uuid, now + 30)).state == "scheduled"
    wait_for_redis_time(r, now + 30)
    assert h.run(store.promote(1)).moved == 1
    [d] = h.run(store.read("w", 10, None))
    assert (d.uuid, d.message, d.run_at) == (msg.uuid, "moved", now + 30)
    assert h.run(store.ack([d])) == 1
    record = h.run(store.record(msg.uuid))
    assert record.state is State.DELIVERED
    assert set(record.transitions) == {"scheduled", "queued", "delivered"}
