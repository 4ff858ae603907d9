"""Data that cannot be decoded is quarantined, never fatal: every script and the worker's
read against the real Redis.

A record overwritten with garbage, a stream entry written by hand, a sorted-set member of
the wrong shape: each goes to the dead stream with the reason ``corrupt ...`` and its raw
bytes, and the messages around it keep flowing. Without that, the one script call that
meets it fails, and is retried forever with the same data (no promotion, no
acknowledgement), or the worker's read raises and the process dies at every restart.
"""

from __future__ import annotations

import asyncio
import uuid as uuidlib

import pytest
import redis

from app.model import NewMessage, State
from app.store import CorruptEntry, Store, parse_entry
from app.store.codec import CorruptRecord, encode_record, uuid_key, uuid_text
from app.store.keys import CONSUMER_GROUP, Keyspace
from app.store.lifecycle import Lifecycle
from app.store.store import parse_entries
from tests.aio import Harness
from tests.wait import wait_until

GARBAGE = b"\x07garbage"


def redis_now_ms(r: redis.Redis) -> int:
    sec, usec = r.time()
    return sec * 1000 + usec // 1000


def new(message: str = "m", run_at: int = 1) -> NewMessage:
    return NewMessage(uuid=str(uuidlib.uuid4()), message=message, run_at=run_at)


def quarantined(r: redis.Redis, ks: Keyspace) -> list[tuple[str, dict[bytes, bytes]]]:
    """(id, fields) of every dead entry whose reason starts with "corrupt"."""
    return [
        (entry_id.decode(), fields)
        for entry_id, fields in r.xrange(ks.dead)
        if fields[b"reason"].startswith(b"corrupt")
    ]


def schedule_due_soon(h: Harness, store: Store, r: redis.Redis, n: int) -> list[NewMessage]:
    """n scheduled messages (in the sorted set), then wait until they are due."""
    run_at = redis_now_ms(r) + 40
    msgs = [new(f"m{i}", run_at) for i in range(n)]
    assert {a.state for a in h.run(store.accept_many(msgs))} == {"scheduled"}
    wait_until(lambda: redis_now_ms(r) >= run_at, "due", 3.0, interval=0.002)
    return msgs


def stream_uuids(r: redis.Redis, ks: Keyspace) -> list[str]:
    return [uuid_text(fields[b"u"]) for _id, fields in r.xrange(ks.stream)]


# --- promote ---------------------------------------------------------------------------------


def test_one_corrupt_scheduled_record_is_quarantined_and_every_message_behind_it_is_promoted(
    h, r, ks
):
    store = h.store(retention=3600)
    msgs = schedule_due_soon(h, store, r, 3)
    score = r.zscore(ks.delayed, r.zrange(ks.delayed, 1, 1)[0])
    r.hset(ks.messages, uuid_key(msgs[1].uuid), GARBAGE)

    promoted = h.run(store.promote(1))

    assert (promoted.moved, promoted.quarantined) == (3, 1)
    assert stream_uuids(r, ks) == [msgs[0].uuid, msgs[2].uuid]
    assert r.zcard(ks.delayed) == 0
    [(dead_id, fields)] = quarantined(r, ks)
    assert fields[b"reason"] == b"corrupt record"
    assert fields[b"raw"] == GARBAGE
    assert uuid_text(fields[b"u"]) == msgs[1].uuid
    assert b"m" not in fields and b"r" not in fields  # nothing a replay could send on
    # Its body was in the record: the message is dead, and a lookup says so.
    record = h.run(store.record(msgs[1].uuid))
    assert (record.state, record.ref, record.run_at) == (State.DEAD, dead_id, int(score))
    assert msgs[1].uuid in {uuid_text(i[6:]) for i in r.lrange(ks.retention, 0, -1)}
    # The next call has nothing left to trip on.
    assert h.run(store.promote(1)).quarantined == 0


def test_a_sorted_set_member_of_the_wrong_shape_is_quarantined_with_its_score(h, r, ks):
    store = h.store()
    [msg] = schedule_due_soon(h, store, r, 1)
    r.zadd(ks.delayed, {b"short member": 5})
    promoted = h.run(store.promote(1))
    assert (promoted.moved, promoted.quarantined) == (2, 1)
    assert stream_uuids(r, ks) == [msg.uuid]
    [(_id, fields)] = quarantined(r, ks)
    assert fields[b"reason"] == b"corrupt sorted-set member"
    assert (fields[b"raw"], fields[b"r"]) == (b"short member", b"5")


def test_a_member_whose_record_moved_on_is_dropped_and_never_promoted_twice(h, r, ks):
    """A member left behind by a record that is no longer scheduled (delivered here) would
    otherwise send a delivered message to the stream again."""
    store = h.store()
    h.run(store.ensure_group())
    [msg] = schedule_due_soon(h, store, r, 1)
    [member] = r.zrange(ks.delayed, 0, 0)
    h.run(store.promote(1))
    h.run(store.ack(h.run(store.read("w", 10, None))))
    r.zadd(ks.delayed, {member: 1})
    promoted = h.run(store.promote(1))
    assert (promoted.moved, promoted.quarantined) == (1, 0)
    assert r.xlen(ks.stream) == 0 and r.zcard(ks.delayed) == 0
    assert h.run(store.record(msg.uuid)).state is State.DELIVERED


# --- accept, cancel, reschedule, replay ------------------------------------------------------


def test_a_duplicate_of_a_corrupt_record_is_quarantined_and_the_rest_of_the_call_accepted(h, r, ks):
    """The api batches many posts into one accept call: one bad record must not fail them all."""
    store = h.store()
    old = new("old")
    h.run(store.accept(old))
    r.hset(ks.messages, uuid_key(old.uuid), GARBAGE)
    fresh = new("fresh")
    again = NewMessage(uuid=old.uuid, message="again", run_at=1)
    answers = h.run(store.accept_many([again, fresh, again]))
    assert [(a.created, a.state) for a in answers] == [
        (False, "dead"),
        (True, "queued"),
        (False, "dead"),
    ]
    [(dead_id, fields)] = quarantined(r, ks)
    assert (fields[b"reason"], fields[b"raw"]) == (b"corrupt record", GARBAGE)
    assert h.run(store.record(old.uuid)).ref == dead_id
    assert h.run(store.record(fresh.uuid)).state is State.QUEUED


@pytest.mark.parametrize("change", ["cancel", "reschedule"])
def test_cancel_and_reschedule_of_a_corrupt_record_quarantine_it_and_answer_dead(h, r, ks, change):
    store = h.store()
    lifecycle = Lifecycle(store)
    msg = new(run_at=redis_now_ms(r) + 60_000)
    h.run(store.accept(msg))
    r.hset(ks.messages, uuid_key(msg.uuid), GARBAGE)
    if change == "cancel":
        outcome = h.run(lifecycle.cancel(msg.uuid))
    else:
        outcome = h.run(lifecycle.reschedule(msg.uuid, redis_now_ms(r) + 120_000))
    assert (outcome.kind, outcome.state) == ("conflict", "dead")
    [(_id, fields)] = quarantined(r, ks)
    assert fields[b"raw"] == GARBAGE
    assert h.run(store.record(msg.uuid)).state is State.DEAD


def test_replay_of_a_dead_message_whose_record_is_corrupt_quarantines_it_and_replays(h, r, ks):
    store = h.store(max_deliveries=1)
    h.run(store.ensure_group())
    msg = new("poison")
    h.run(store.accept(msg))
    [delivery] = h.run(store.read("w", 10, None))
    assert h.run(store.fail(delivery, 0, "boom"))[0] == "dead"
    r.hset(ks.messages, uuid_key(msg.uuid), GARBAGE)
    outcome = h.run(Lifecycle(store).replay(msg.uuid))
    assert (outcome.kind, outcome.state) == ("done", "queued")
    assert stream_uuids(r, ks) == [msg.uuid]
    assert [f[b"raw"] for _id, f in quarantined(r, ks)] == [GARBAGE]


def test_replay_passes_quarantined_entries_by(h, r, ks):
    store = h.store()
    [msg] = schedule_due_soon(h, store, r, 1)
    r.hset(ks.messages, uuid_key(msg.uuid), GARBAGE)
    h.run(store.promote(1))
    replayed, skipped = h.run(Lifecycle(store).replay_all())
    assert (replayed, skipped) == (0, 1)
    assert r.xlen(ks.stream) == 0


def test_the_dead_listing_shows_quarantined_entries_with_their_reason(h, r, ks):
    store = h.store()
    [msg] = schedule_due_soon(h, store, r, 1)
    r.hset(ks.messages, uuid_key(msg.uuid), GARBAGE)
    r.zadd(ks.delayed, {b"odd": 1})
    h.run(store.promote(1))
    items, _cursor = h.run(Lifecycle(store).dead_page(10, None))
    assert sorted((i.reason, i.uuid, i.message) for i in items) == [
        ("corrupt record", msg.uuid, None),
        ("corrupt sorted-set member", None, None),
    ]


# --- ack, fail -------------------------------------------------------------------------------


def test_ack_quarantines_a_corrupt_record_and_marks_the_message_delivered(h, r, ks):
    store = h.store()
    h.run(store.ensure_group())
    msgs = [new(f"m{i}") for i in range(3)]
    h.run(store.accept_many(msgs))
    deliveries = h.run(store.read("w", 10, None))
    r.hset(ks.messages, uuid_key(msgs[1].uuid), GARBAGE)
    assert h.run(store.ack(deliveries)) == 3
    assert r.xlen(ks.stream) == 0
    assert {h.run(store.record(m.uuid)).state for m in msgs} == {State.DELIVERED}
    [(_id, fields)] = quarantined(r, ks)
    assert (fields[b"reason"], fields[b"raw"]) == (b"corrupt record", GARBAGE)


def test_the_retention_purge_quarantines_what_it_cannot_read_and_acks_go_on(h, r, ks):
    """The ack script purges expired records: a bad one there would fail every ack."""
    store = h.store(retention=0.001)
    h.run(store.ensure_group())
    first, second = new("first"), new("second")
    h.run(store.accept(first))
    h.run(store.ack(h.run(store.read("w", 10, None))))
    r.hset(ks.messages, uuid_key(first.uuid), GARBAGE)
    r.lpush(ks.retention, b"short")
    h.run(store.accept(second))
    wait_until(
        lambda: redis_now_ms(r) > int.from_bytes(r.lindex(ks.retention, -1)[:6], "big"),
        "the retention window to pass",
        3.0,
    )
    assert h.run(store.ack(h.run(store.read("w", 10, None)))) == 1
    reasons = sorted((f[b"reason"], f[b"raw"]) for _id, f in quarantined(r, ks))
    assert reasons == [(b"corrupt record", GARBAGE), (b"corrupt retention item", b"short")]
    assert h.run(store.record(first.uuid)).state is State.DEAD
    assert h.run(store.record(second.uuid)).state is State.DELIVERED


def test_fail_quarantines_a_corrupt_record_and_retries_the_message_from_its_entry(h, r, ks):
    store = h.store(max_deliveries=3)
    h.run(store.ensure_group())
    msg = new("flaky")
    h.run(store.accept(msg))
    [delivery] = h.run(store.read("w", 10, None))
    r.hset(ks.messages, uuid_key(msg.uuid), GARBAGE)
    assert h.run(store.fail(delivery, 0, "boom")) == ("retrying", 1)
    record = h.run(store.record(msg.uuid))
    assert (record.state, record.attempts, record.run_at) == (State.RETRYING, 1, 1)
    assert [f[b"raw"] for _id, f in quarantined(r, ks)] == [GARBAGE]


def test_fail_of_an_entry_the_scripts_cannot_use_quarantines_it(h, r, ks):
    """Attempts past what a record holds: Python reads the entry, the script cannot."""
    store = h.store()
    h.run(store.ensure_group())
    msg = new()
    entry_id = r.xadd(ks.stream, {"u": uuid_key(msg.uuid), "m": "x", "r": "1", "a": "70000"})
    [delivery] = h.run(store.read("w", 10, None))
    assert h.run(store.fail(delivery, 0, "boom")) == ("quarantined", 0)
    [(_id, fields)] = quarantined(r, ks)
    assert fields[b"reason"] == b"corrupt stream entry"
    assert (fields[b"entry"], fields[b"raw:a"]) == (entry_id, b"70000")
    assert r.xlen(ks.stream) == 0 and r.zcard(ks.delayed) == 0


# --- the worker's read, and reclaim ----------------------------------------------------------


BAD_ENTRIES = {
    "no body": ({"u": b"\x01" * 16, "r": "1", "a": "0"}, "m (the body) is missing"),
    "runAt not a number": ({"u": b"\x02" * 16, "m": "x", "r": "soon", "a": "0"}, "r is not"),
    "body not UTF-8": ({"u": b"\x03" * 16, "m": b"\xff\xfe", "r": "1", "a": "0"}, "not UTF-8"),
    "short uuid": ({"u": b"\x04" * 15, "m": "x", "r": "1", "a": "0"}, "16 bytes"),
}


def test_read_quarantines_entries_it_cannot_decode_and_hands_out_the_rest(h, r, ks):
    store = h.store()
    h.run(store.ensure_group())
    before = new("before")
    h.run(store.accept(before))
    bad_ids = {r.xadd(ks.stream, fields).decode(): why for fields, why in BAD_ENTRIES.values()}
    after = new("after")
    h.run(store.accept(after))

    deliveries = h.run(store.read("w", 100, None))

    assert [d.uuid for d in deliveries] == [before.uuid, after.uuid]
    assert stream_uuids(r, ks) == [before.uuid, after.uuid]
    pending = r.xpending_range(ks.stream, CONSUMER_GROUP, min="-", max="+", count=100)
    assert len(pending) == 2
    found = {f[b"entry"].decode(): f[b"reason"].decode() for _id, f in quarantined(r, ks)}
    assert found.keys() == bad_ids.keys()
    for entry_id, why in bad_ids.items():
        assert found[entry_id].startswith("corrupt stream entry: ")
        assert why in found[entry_id]
    # The raw fields are kept, byte for byte.
    body = next(f for _i, f in quarantined(r, ks) if f.get(b"raw:m") == b"\xff\xfe")
    assert body[b"raw:u"] == b"\x03" * 16


def test_a_quarantined_entry_takes_its_message_record_to_dead(h, r, ks):
    store = h.store()
    h.run(store.ensure_group())
    msg = new()
    # A damaged entry, and the message's record queued at it.
    entry_id = r.xadd(ks.stream, {"u": uuid_key(msg.uuid), "m": b"\xff", "r": "1", "a": "0"})
    r.hset(ks.messages, uuid_key(msg.uuid), encode_record(State.QUEUED, 1, 1, ref=entry_id))
    assert h.run(store.read("w", 10, None)) == []
    [(dead_id, _f)] = quarantined(r, ks)
    record = h.run(store.record(msg.uuid))
    assert (record.state, record.ref) == (State.DEAD, dead_id)


def test_reclaim_quarantines_entries_it_cannot_decode(h, r, ks):
    store = h.store(visibility_timeout=0.01)
    h.run(store.ensure_group())
    entry_id = r.xadd(ks.stream, {"u": b"\x05" * 16, "m": "x", "r": "1"})  # no attempts
    good = new("good")
    h.run(store.accept(good))
    # Read raw by a worker that then died: Store.read would have quarantined it at once.
    r.xreadgroup(CONSUMER_GROUP, "crashed", {ks.stream: ">"}, count=10)
    wait_until(
        lambda: all(
            p["time_since_delivered"] > 10
            for p in r.xpending_range(ks.stream, CONSUMER_GROUP, min="-", max="+", count=10)
        ),
        "the entries to go idle",
        3.0,
    )
    _cursor, claimed, dead = h.run(store.reclaim("alive", "0-0", 10))
    assert ([d.uuid for d in claimed], dead) == ([good.uuid], 0)
    [(_id, fields)] = quarantined(r, ks)
    assert (fields[b"reason"], fields[b"entry"]) == (b"corrupt stream entry", entry_id)
    assert stream_uuids(r, ks) == [good.uuid]


def test_parse_entry_raises_corrupt_entry_naming_the_problem_and_parse_entries_sorts_them():
    with pytest.raises(CorruptEntry, match="a is not an integer") as caught:
        parse_entry(b"1-1", [b"u", b"\x01" * 16, b"m", b"x", b"r", b"1", b"a", b"many"])
    assert caught.value.entry_id == "1-1"
    good = [b"u", b"\x01" * 16, b"m", b"x", b"r", b"1", b"a", b"0"]
    deliveries, corrupt = parse_entries(
        [(b"1-1", good), (b"1-2", [b"u", b"x"]), (b"1-3", []), (b"1-4", [b"u"])]
    )
    assert [d.id for d in deliveries] == ["1-1"]
    assert [c.entry_id for c in corrupt] == ["1-2", "1-4"]


def test_a_lookup_of_a_corrupt_record_raises_corrupt_record_naming_the_uuid(h, r, ks):
    store = h.store()
    msg = new()
    h.run(store.accept(msg))
    r.hset(ks.messages, uuid_key(msg.uuid), GARBAGE)
    with pytest.raises(CorruptRecord, match=msg.uuid):
        h.run(store.record(msg.uuid))


def test_every_quarantine_counts_in_the_metric(h, r, ks):
    from app import metrics

    store = h.store()
    before = metrics.QUARANTINED._value.get()
    [msg] = schedule_due_soon(h, store, r, 1)
    r.hset(ks.messages, uuid_key(msg.uuid), GARBAGE)
    h.run(store.promote(1))
    asyncio.run(asyncio.sleep(0))
    assert metrics.QUARANTINED._value.get() == before + 1
