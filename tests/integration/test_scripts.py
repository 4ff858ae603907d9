"""Every Lua script, through app.store.Store, against the real Redis.

Tests are synchronous; each drives its Store on a private event loop (no
pytest-asyncio). Timing-dependent steps wait for a condition with a deadline,
measured on Redis' clock where the scripts use Redis' clock.
"""

from __future__ import annotations

import time
import uuid as uuidlib
from collections import Counter
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from hypothesis import Phase
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from app.model import NewMessage, State
from app.settings import Settings
from app.store import Delivery, StorageFormatError, Store, StoreRedis, encode_epoch
from app.store.codec import decode_record, member_uuid, uuid_key, uuid_text
from app.store.keys import CONSUMER_GROUP, Keyspace
from tests.aio import Harness
from tests.wait import wait_until

# --- helpers ---------------------------------------------------------------------------------


def redis_now_ms(r: redis.Redis) -> int:
    sec, usec = r.time()
    return sec * 1000 + usec // 1000


def wait_for_redis_time(r: redis.Redis, at_ms: int) -> None:
    wait_until(lambda: redis_now_ms(r) >= at_ms, f"Redis time {at_ms}", 3.0, interval=0.002)


def new(message: str = "hello", run_at: int = 0, uuid: str | None = None) -> NewMessage:
    return NewMessage(uuid=uuid or str(uuidlib.uuid4()), message=message, run_at=run_at)


def stream_uuids(r: redis.Redis, key: str) -> list[str]:
    return [uuid_text(fields[b"u"]) for _id, fields in r.xrange(key)]


def delayed_members(r: redis.Redis, ks: Keyspace) -> list[tuple[str, float]]:
    return [(member_uuid(m), s) for m, s in r.zrange(ks.delayed, 0, -1, withscores=True)]


def retained(r: redis.Redis, ks: Keyspace) -> dict[str, int]:
    """uuid -> ms after which its record may be purged, from the retention list."""
    return {
        uuid_text(item[6:]): int.from_bytes(item[:6], "big")
        for item in r.lrange(ks.retention, 0, -1)
    }


def pending(r: redis.Redis, ks: Keyspace) -> dict[str, dict[str, Any]]:
    """entry id -> XPENDING details (consumer, idle ms, deliveries)."""
    rows = r.xpending_range(ks.stream, CONSUMER_GROUP, min="-", max="+", count=1000)
    return {
        row["message_id"].decode(): {
            "consumer": row["consumer"].decode(),
            "idle": row["time_since_delivered"],
            "deliveries": row["times_delivered"],
        }
        for row in rows
    }


def snapshot(r: redis.Redis, ks: Keyspace) -> dict[str, object]:
    """Everything a script may write, by value."""
    return {
        "delayed": r.zrange(ks.delayed, 0, -1, withscores=True),
        "stream": r.xrange(ks.stream),
        "dead": r.xrange(ks.dead),
        "messages": r.hgetall(ks.messages),
        "retention": r.lrange(ks.retention, 0, -1),
        "seq": r.get(ks.sequence),
        "epoch": r.get(ks.epoch),
    }


def locations(r: redis.Redis, ks: Keyspace) -> dict[str, list[str]]:
    """uuid -> every place it is found: delayed, stream, delivered, dead."""
    found: dict[str, list[str]] = {}
    for uuid, _score in delayed_members(r, ks):
        found.setdefault(uuid, []).append("delayed")
    for uuid in stream_uuids(r, ks.stream):
        found.setdefault(uuid, []).append("stream")
    for uuid in stream_uuids(r, ks.dead):
        found.setdefault(uuid, []).append("dead")
    for field, packed in r.hgetall(ks.messages).items():
        if decode_record(uuid_text(field), packed).state is State.DELIVERED:
            found.setdefault(uuid_text(field), []).append("delivered")
    return found


EXPECTED_STATE = {
    "delayed": {State.SCHEDULED, State.RETRYING},
    "stream": {State.QUEUED},
    "delivered": {State.DELIVERED},
    "dead": {State.DEAD},
}


def accept_due_soon(
    h: Harness, store: Store, r: redis.Redis, n: int, ahead_ms: int = 40
) -> list[str]:
    """Accept n messages due ``ahead_ms`` from now (so they are scheduled), then wait until due."""
    run_at = redis_now_ms(r) + ahead_ms
    uuids = []
    for i in range(n):
        msg = new(f"m{i}", run_at)
        assert h.run(store.accept(msg)).state == "scheduled"
        uuids.append(msg.uuid)
    wait_for_redis_time(r, run_at)
    return uuids


# --- accept ----------------------------------------------------------------------------------


def test_accept_of_a_due_message_appends_it_to_the_stream_as_queued(h, r, ks):
    store = h.store()
    msg = new("due now", run_at=redis_now_ms(r) - 5)
    got = h.run(store.accept(msg))
    assert (got.created, got.state, got.run_at) == (True, "queued", msg.run_at)
    entries = r.xrange(ks.stream)
    assert len(entries) == 1
    fields = entries[0][1]
    assert uuid_text(fields[b"u"]) == msg.uuid
    assert fields[b"m"] == b"due now"
    assert int(fields[b"r"]) == msg.run_at
    assert fields[b"a"] == b"0"
    assert r.zcard(ks.delayed) == 0
    record = h.run(store.record(msg.uuid))
    assert record is not None and record.state is State.QUEUED and record.attempts == 0


def test_accept_of_a_future_message_adds_it_to_the_sorted_set_as_scheduled(h, r, ks):
    store = h.store()
    msg = new("later", run_at=redis_now_ms(r) + 60_000)
    got = h.run(store.accept(msg))
    assert (got.created, got.state, got.run_at) == (True, "scheduled", msg.run_at)
    assert r.xlen(ks.stream) == 0
    assert delayed_members(r, ks) == [(msg.uuid, float(msg.run_at))]
    record = h.run(store.record(msg.uuid))
    assert record is not None and record.state is State.SCHEDULED and record.run_at == msg.run_at


def test_accept_decides_due_or_future_with_redis_clock(h, r, ks):
    store = h.store()
    before = redis_now_ms(r)
    at_redis_now = h.run(store.accept(new("a", run_at=before)))
    past = h.run(store.accept(new("b", run_at=before - 1000)))
    future = h.run(store.accept(new("c", run_at=int(time.time() * 1000) + 1000)))
    after = redis_now_ms(r)
    assert at_redis_now.state == "queued"  # runAt <= Redis now is due
    assert past.state == "queued"
    assert future.state == "scheduled"
    # The stored acceptance time is Redis' TIME, read inside the script.
    for packed in r.hgetall(ks.messages).values():
        rec = decode_record("x", packed)
        assert before <= rec.accepted_at <= after


def test_duplicate_uuid_changes_nothing_and_returns_the_stored_record(h, r, ks):
    store = h.store()
    future = new("first", run_at=redis_now_ms(r) + 60_000)
    due = new("due", run_at=1)
    assert h.run(store.accept(future)).created
    assert h.run(store.accept(due)).created
    before = snapshot(r, ks)
    # Same uuids, different body and time: the stored record wins.
    again_future = h.run(store.accept(new("other", run_at=5, uuid=future.uuid)))
    again_due = h.run(store.accept(new("other", run_at=redis_now_ms(r) + 1, uuid=due.uuid)))
    assert (again_future.created, again_future.state, again_future.run_at) == (
        False,
        "scheduled",
        future.run_at,
    )
    assert (again_due.created, again_due.state, again_due.run_at) == (False, "queued", 1)
    assert snapshot(r, ks) == before


def test_a_uuid_twice_in_one_call_is_accepted_once_and_then_a_duplicate(h, r, ks):
    store = h.store()
    now = redis_now_ms(r)
    a, b = new("a", run_at=now + 60_000), new("b", run_at=1)
    later = new("later", run_at=now + 60_000)
    got = h.run(
        store.accept_many(
            [a, b, new("a again", run_at=5, uuid=a.uuid), new("b again", uuid=b.uuid), later]
        )
    )
    assert [(g.created, g.state, g.run_at) for g in got] == [
        (True, "scheduled", a.run_at),
        (True, "queued", 1),
        (False, "scheduled", a.run_at),
        (False, "queued", 1),
        (True, "scheduled", later.run_at),
    ]
    # One record, one place each; equal runAt keep the call's order.
    assert delayed_members(r, ks) == [(a.uuid, float(a.run_at)), (later.uuid, float(a.run_at))]
    assert stream_uuids(r, ks.stream) == [b.uuid]
    assert r.hlen(ks.messages) == 3
    assert h.run(store.record(a.uuid)).state is State.SCHEDULED


def test_duplicate_of_a_delivered_message_reports_delivered(h, r, ks):
    store = h.store()
    h.run(store.ensure_group())
    msg = new(run_at=1)
    h.run(store.accept(msg))
    h.run(store.ack(h.run(store.read("w", 10, None))))
    before = snapshot(r, ks)
    got = h.run(store.accept(msg))
    assert (got.created, got.state) == (False, "delivered")
    assert snapshot(r, ks) == before


def test_accept_publishes_a_wake_up_only_when_the_message_becomes_the_earliest(h, r, ks):
    store = h.store()
    pubsub = r.pubsub()
    try:
        pubsub.subscribe(ks.wake_channel)
        confirm = pubsub.get_message(timeout=2.0)
        assert confirm is not None and confirm["type"] == "subscribe"
        now = redis_now_ms(r)
        first = now + 50_000
        later = now + 90_000
        earlier = now + 10_000
        h.run(store.accept(new(run_at=first)))  # earliest of an empty set: wake
        h.run(store.accept(new(run_at=later)))  # not the earliest: no wake
        h.run(store.accept(new(run_at=1)))  # due now, goes to the stream: no wake
        h.run(store.accept(new(run_at=earlier)))  # new earliest: wake
        received: list[int] = []
        deadline = time.monotonic() + 2.0
        while len(received) < 2 and time.monotonic() < deadline:
            message = pubsub.get_message(timeout=0.1)
            if message and message["type"] == "message":
                received.append(int(message["data"]))
        # Pub/sub keeps order on one connection: a wake from `later` would come before `earlier`.
        assert received == [first, earlier]
    finally:
        pubsub.close()


def test_scripts_are_reloaded_after_script_flush(h, r, ks):
    store = h.store()
    h.run(store.ensure_group())
    assert h.run(store.accept(new(run_at=1))).created
    r.script_flush()
    assert r.script_exists(store.scripts.accept.sha) == [False]
    second = h.run(store.accept(new(run_at=1)))
    assert second.created and second.state == "queued"
    r.script_flush()
    assert h.run(store.promote(1)).refused_by is None
    r.script_flush()
    assert h.run(store.ack(h.run(store.read("w", 10, None)))) == 2
    assert r.xlen(ks.stream) == 0


# --- promote ---------------------------------------------------------------------------------


def test_promote_moves_equal_run_at_members_in_acceptance_order(h, r, ks):
    store = h.store()
    uuids = accept_due_soon(h, store, r, 50, ahead_ms=300)
    got = h.run(store.promote(1))
    assert (got.moved, got.next_due_ms, got.refused_by) == (50, None, None)
    assert stream_uuids(r, ks.stream) == uuids
    assert r.zcard(ks.delayed) == 0
    for uuid in uuids:
        record = h.run(store.record(uuid))
        assert record is not None and record.state is State.QUEUED


def test_promote_moves_only_due_members_in_run_at_order_and_returns_next_due(h, r, ks):
    store = h.store()
    now = redis_now_ms(r)
    far = new("far", run_at=now + 3_600_000)
    second = new("second", run_at=now + 40)
    first = new("first", run_at=now + 30)
    for msg in (far, second, first):
        assert h.run(store.accept(msg)).state == "scheduled"
    wait_for_redis_time(r, second.run_at)
    got = h.run(store.promote(1))
    assert got.moved == 2
    assert got.next_due_ms == far.run_at
    assert got.now_ms >= second.run_at
    assert stream_uuids(r, ks.stream) == [first.uuid, second.uuid]
    entry = r.xrange(ks.stream)[0][1]
    assert (entry[b"m"], int(entry[b"r"]), entry[b"a"]) == (b"first", first.run_at, b"0")
    assert delayed_members(r, ks) == [(far.uuid, float(far.run_at))]
    record = h.run(store.record(far.uuid))
    assert record is not None and record.state is State.SCHEDULED


def test_promote_respects_the_batch_limit(h, r, ks):
    store = h.store(promote_batch=2)
    uuids = accept_due_soon(h, store, r, 5)
    got = h.run(store.promote(1))
    assert got.moved == 2
    assert got.next_due_ms is not None and got.next_due_ms <= got.now_ms  # more are due
    assert h.run(store.promote(1, limit=1)).moved == 1
    last = h.run(store.promote(1, limit=10))
    assert (last.moved, last.next_due_ms) == (2, None)
    assert stream_uuids(r, ks.stream) == uuids


def test_promote_of_an_empty_set_moves_nothing(h, r, ks):
    store = h.store()
    got = h.run(store.promote(1))
    assert (got.moved, got.next_due_ms, got.refused_by) == (0, None, None)
    assert r.xlen(ks.stream) == 0


def test_promote_refuses_a_lower_epoch_and_moves_nothing(h, r, ks):
    store = h.store()
    assert h.run(store.promote(10**12)).refused_by is None
    accept_due_soon(h, store, r, 3)
    before = snapshot(r, ks)
    got = h.run(store.promote(10**12 - 1))
    assert got.refused_by == 10**12
    assert got.moved == 0
    assert snapshot(r, ks) == before
    assert r.get(ks.epoch) == encode_epoch(10**12).encode()


def test_promote_accepts_an_equal_or_higher_epoch_and_stores_the_highest(h, r, ks):
    store = h.store()
    accept_due_soon(h, store, r, 2)
    assert h.run(store.promote(9, limit=1)).moved == 1
    assert r.get(ks.epoch) == encode_epoch(9).encode()
    equal = h.run(store.promote(9, limit=1))
    assert (equal.refused_by, equal.moved) == (None, 1)
    higher = h.run(store.promote(10))  # 10 > 9 as numbers, and as padded strings
    assert higher.refused_by is None
    assert r.get(ks.epoch) == encode_epoch(10).encode()
    assert h.run(store.promote(9)).refused_by == 10


# --- ack -------------------------------------------------------------------------------------


def test_ack_acknowledges_deletes_marks_delivered_and_keeps_the_record_for_retention(h, r, ks):
    store = h.store(retention=3600)
    h.run(store.ensure_group())
    msg = new(run_at=1)
    h.run(store.accept(msg))
    [delivery] = h.run(store.read("w1", 10, None))
    assert (delivery.uuid, delivery.message, delivery.attempts) == (msg.uuid, msg.message, 0)
    assert r.xlen(ks.stream) == 1
    before = redis_now_ms(r)
    assert h.run(store.ack([delivery])) == 1
    after = redis_now_ms(r)
    assert r.xlen(ks.stream) == 0
    assert pending(r, ks) == {}
    record = h.run(store.record(msg.uuid))
    assert record is not None
    assert (record.state, record.attempts) == (State.DELIVERED, 1)
    assert before <= record.updated_at <= after
    keep_until = retained(r, ks)[msg.uuid]
    assert before + 3_600_000 <= keep_until <= after + 3_600_000


def test_ack_purges_records_whose_retention_passed(h, r, ks):
    store = h.store(retention=0.001)
    h.run(store.ensure_group())
    old, young = new("old", run_at=1), new("young", run_at=1)
    h.run(store.accept(old))
    h.run(store.accept(young))
    d_old, d_young = h.run(store.read("w", 10, None))
    assert h.run(store.ack([d_old])) == 1
    keep_until = retained(r, ks)[old.uuid]
    assert r.hexists(ks.messages, uuid_key(old.uuid))
    wait_for_redis_time(r, int(keep_until) + 1)
    assert h.run(store.ack([d_young])) == 1
    assert not r.hexists(ks.messages, uuid_key(old.uuid))
    assert old.uuid not in retained(r, ks)
    record = h.run(store.record(young.uuid))
    assert record is not None and record.state is State.DELIVERED


def test_ack_leaves_exactly_the_unacknowledged_entries_in_the_stream(h, r, ks):
    """Entries behind a slower worker's pending one are deleted too, not only the older ones."""
    store = h.store()
    h.run(store.ensure_group())
    h.run(store.accept_many([new(f"m{i}", run_at=1) for i in range(6)]))
    [first] = h.run(store.read("slow", 1, None))
    a, b, c, d, e = h.run(store.read("fast", 10, None))
    unread = new("unread", run_at=1)
    h.run(store.accept(unread))
    assert h.run(store.ack([c, d])) == 2  # newer than the pending `first`
    assert stream_uuids(r, ks.stream) == [x.uuid for x in (first, a, b, e, unread)]
    assert h.run(store.ack([first, a, b])) == 3  # the oldest pending goes
    assert stream_uuids(r, ks.stream) == [e.uuid, unread.uuid]
    assert h.run(store.ack([e])) == 1  # nothing pending after
    assert stream_uuids(r, ks.stream) == [unread.uuid]
    [last] = h.run(store.read("fast", 10, None))
    assert last.uuid == unread.uuid
    assert h.run(store.ack([last])) == 1
    assert r.xlen(ks.stream) == 0


def test_ack_of_an_entry_already_acknowledged_returns_0_and_leaves_the_record(h, r, ks):
    store = h.store()
    h.run(store.ensure_group())
    msg = new(run_at=1)
    h.run(store.accept(msg))
    [delivery] = h.run(store.read("w1", 10, None))
    assert h.run(store.ack([delivery])) == 1
    before = snapshot(r, ks)
    wait_for_redis_time(r, redis_now_ms(r) + 2)  # a second ack would stamp a later time
    assert h.run(store.ack([delivery])) == 0
    assert snapshot(r, ks) == before


def test_ack_by_a_worker_whose_entry_was_reclaimed_and_acked_by_another_returns_0(h, r, ks):
    slow = h.store()
    fast = h.store(visibility_timeout=0.01)
    h.run(slow.ensure_group())
    msg = new(run_at=1)
    h.run(slow.accept(msg))
    [held] = h.run(slow.read("slow", 10, None))
    claimed: list[Delivery] = []

    def reclaimed() -> bool:
        claimed.extend(h.run(fast.reclaim("fast", "0-0", 10))[1])
        return bool(claimed)

    wait_until(reclaimed, "the entry to be reclaimed", 3.0)
    assert h.run(fast.ack(claimed)) == 1
    before = snapshot(r, ks)
    assert h.run(slow.ack([held])) == 0
    assert snapshot(r, ks) == before
    record = h.run(slow.record(msg.uuid))
    assert record is not None and (record.state, record.attempts) == (State.DELIVERED, 1)


def test_ack_of_nothing_is_a_no_op(h, r, ks):
    assert h.run(h.store().ack([])) == 0


# --- a lost stream or consumer group ---------------------------------------------------------


def test_ack_after_the_stream_was_deleted_marks_the_handled_messages_delivered(h, r, ks):
    """Their entries went with the stream, but their handlers ran: delivered is the truth,
    and the records must not stay queued at an entry that no longer exists."""
    store = h.store()
    h.run(store.ensure_group())
    msgs = [new(f"m{i}", run_at=1) for i in range(3)]
    h.run(store.accept_many(msgs))
    deliveries = h.run(store.read("w", 10, None))
    r.delete(ks.stream)
    assert h.run(store.ack(deliveries)) == 3
    for msg in msgs:
        record = h.run(store.record(msg.uuid))
        assert record is not None and record.state is State.DELIVERED
    assert set(retained(r, ks)) == {m.uuid for m in msgs}
    assert not r.exists(ks.stream)


def test_ack_of_entries_read_before_the_group_was_made_anew_deletes_only_them(h, r, ks):
    """The group is destroyed and made anew at "0" while a worker holds entries: its ack
    must delete exactly those (so the new group does not run them again) and must not trim
    the entries the new group has yet to deliver, which the old trim took for done."""
    store = h.store()
    h.run(store.ensure_group())
    msgs = [new(f"m{i}", run_at=1) for i in range(4)]
    h.run(store.accept_many(msgs))
    held = h.run(store.read("old", 3, None))
    r.xgroup_destroy(ks.stream, CONSUMER_GROUP)
    h.run(store.ensure_group())
    assert h.run(store.ack([held[2]])) == 1
    assert stream_uuids(r, ks.stream) == [msgs[i].uuid for i in (0, 1, 3)]
    again = h.run(store.read("new", 10, None))
    assert [d.uuid for d in again] == [msgs[i].uuid for i in (0, 1, 3)]
    record = h.run(store.record(msgs[2].uuid))
    assert record is not None and record.state is State.DELIVERED


def test_reads_and_scripts_meeting_a_lost_group_raise_nogroup_which_group_missing_names(h, r, ks):
    from app.store import group_missing

    store = h.store()
    h.run(store.ensure_group())
    r.delete(ks.stream)
    calls = {
        "read": lambda: store.read("w", 10, None),
        "own pending": lambda: store.read("w", 10, None, own_pending=True),
        "reclaim": lambda: store.reclaim("w", "0-0", 10),
        "extend": lambda: store.extend("w", ["1-1"]),
    }
    for name, call in calls.items():
        with pytest.raises(redis.ResponseError) as caught:
            h.run(call())
        assert group_missing(caught.value), name
    assert not group_missing(redis.ResponseError("ERR something else"))
    assert not group_missing(redis.ConnectionError("NOGROUP lookalike"))


# --- fail ------------------------------------------------------------------------------------


def test_fail_reschedules_with_the_delay_and_marks_retrying(h, r, ks):
    store = h.store(max_deliveries=3)
    h.run(store.ensure_group())
    msg = new("flaky", run_at=1)
    h.run(store.accept(msg))
    [delivery] = h.run(store.read("w", 10, None))
    before = redis_now_ms(r)
    assert h.run(store.fail(delivery, 5_000, "RuntimeError: boom")) == ("retrying", 1)
    after = redis_now_ms(r)
    assert r.xlen(ks.stream) == 0
    assert pending(r, ks) == {}
    [(uuid, score)] = delayed_members(r, ks)
    assert uuid == msg.uuid
    assert before + 5_000 <= score <= after + 5_000
    record = h.run(store.record(msg.uuid))
    assert record is not None
    assert (record.state, record.attempts, record.run_at) == (State.RETRYING, 1, 1)


def test_fail_after_max_deliveries_dead_letters_with_the_reason(h, r, ks):
    store = h.store(max_deliveries=3)
    h.run(store.ensure_group())
    msg = new("poison", run_at=1)
    h.run(store.accept(msg))
    outcomes = []
    for attempt in range(3):
        h.run(store.promote(1))
        [delivery] = h.run(store.read("w", 10, None))
        assert delivery.attempts == attempt
        assert delivery.message == "poison"
        outcomes.append(h.run(store.fail(delivery, 0, f"ValueError: try {attempt}")))
    assert outcomes == [("retrying", 1), ("retrying", 2), ("dead", 3)]
    assert r.xlen(ks.stream) == 0
    assert r.zcard(ks.delayed) == 0
    [(_id, fields)] = r.xrange(ks.dead)
    assert uuid_text(fields[b"u"]) == msg.uuid
    assert fields[b"m"] == b"poison"
    assert fields[b"a"] == b"3"
    assert fields[b"reason"] == b"ValueError: try 2"
    record = h.run(store.record(msg.uuid))
    assert record is not None and (record.state, record.attempts) == (State.DEAD, 3)


def test_fail_with_one_delivery_allowed_dead_letters_at_once(h, r, ks):
    store = h.store(max_deliveries=1)
    h.run(store.ensure_group())
    h.run(store.accept(new(run_at=1)))
    [delivery] = h.run(store.read("w", 10, None))
    assert h.run(store.fail(delivery, 1000, "boom")) == ("dead", 1)
    assert r.xlen(ks.dead) == 1 and r.zcard(ks.delayed) == 0


@pytest.mark.parametrize("record_gone", [False, True], ids=["record", "record purged"])
def test_fail_dead_letter_names_the_dead_entry_in_a_dead_record_kept_for_retention(
    h, r, ks, record_gone
):
    store = h.store(max_deliveries=1, retention=3600)
    h.run(store.ensure_group())
    msg = new("poison", run_at=1)
    h.run(store.accept(msg))
    [delivery] = h.run(store.read("w", 10, None))
    if record_gone:
        r.hdel(ks.messages, uuid_key(msg.uuid))
    assert h.run(store.fail(delivery, 0, "boom")) == ("dead", 1)
    [(dead_id, fields)] = r.xrange(ks.dead)
    assert uuid_text(fields[b"u"]) == msg.uuid
    assert (fields[b"m"], fields[b"r"], fields[b"a"], fields[b"reason"]) == (
        b"poison",
        b"1",
        b"1",
        b"boom",
    )
    record = h.run(store.record(msg.uuid))
    assert record is not None
    assert (record.state, record.ref) == (State.DEAD, dead_id.decode())
    assert (record.attempts, record.run_at) == (1, 1)
    assert retained(r, ks) == {msg.uuid: int(fields[b"at"]) + 3_600_000}


def test_fail_of_an_entry_no_longer_pending_is_gone_and_changes_nothing(h, r, ks):
    store = h.store()
    h.run(store.ensure_group())
    h.run(store.accept(new(run_at=1)))
    [delivery] = h.run(store.read("w", 10, None))
    assert h.run(store.ack([delivery])) == 1
    before = snapshot(r, ks)
    assert h.run(store.fail(delivery, 0, "late failure")) == ("gone", 0)
    assert snapshot(r, ks) == before


def test_fail_wakes_the_leader_when_the_retry_becomes_the_earliest(h, r, ks):
    store = h.store()
    h.run(store.ensure_group())
    pubsub = r.pubsub()
    try:
        pubsub.subscribe(ks.wake_channel)
        assert pubsub.get_message(timeout=2.0)["type"] == "subscribe"
        h.run(store.accept(new(run_at=1)))
        [delivery] = h.run(store.read("w", 10, None))
        assert h.run(store.fail(delivery, 2_000, "boom"))[0] == "retrying"
        [(_uuid, score)] = delayed_members(r, ks)
        message = None
        deadline = time.monotonic() + 2.0
        while message is None and time.monotonic() < deadline:
            message = pubsub.get_message(timeout=0.1)
        assert message is not None and int(message["data"]) == int(score)
    finally:
        pubsub.close()


# --- reclaim and extend ----------------------------------------------------------------------


def test_reclaim_leaves_entries_idle_less_than_the_visibility_timeout(h, r, ks):
    store = h.store(visibility_timeout=30)
    h.run(store.ensure_group())
    h.run(store.accept(new(run_at=1)))
    [delivery] = h.run(store.read("w1", 10, None))
    assert h.run(store.reclaim("w2", "0-0", 10)) == ("0-0", [], 0)
    assert pending(r, ks)[delivery.id]["consumer"] == "w1"


def test_reclaim_takes_over_entries_idle_longer_than_the_visibility_timeout(h, r, ks):
    store = h.store(visibility_timeout=0.05)
    h.run(store.ensure_group())
    msg = new("orphan", run_at=1)
    h.run(store.accept(msg))
    [delivery] = h.run(store.read("crashed", 10, None))
    wait_until(lambda: pending(r, ks)[delivery.id]["idle"] > 50, "the entry to go idle", 3.0)
    cursor, claimed, dead = h.run(store.reclaim("alive", "0-0", 10))
    assert (cursor, dead) == ("0-0", 0)
    assert [(d.id, d.uuid, d.message) for d in claimed] == [(delivery.id, msg.uuid, "orphan")]
    info = pending(r, ks)[delivery.id]
    assert (info["consumer"], info["deliveries"]) == ("alive", 2)


def test_reclaim_dead_letters_an_entry_delivered_more_than_max_deliveries(h, r, ks):
    store = h.store(visibility_timeout=0.01, max_deliveries=2)
    h.run(store.ensure_group())
    msg = new("crashes every worker", run_at=1)
    h.run(store.accept(msg))
    [delivery] = h.run(store.read("w1", 10, None))  # delivery 1
    wait_until(lambda: pending(r, ks)[delivery.id]["idle"] > 10, "idle", 3.0)
    assert len(h.run(store.reclaim("w2", "0-0", 10))[1]) == 1  # delivery 2
    wait_until(lambda: pending(r, ks)[delivery.id]["idle"] > 10, "idle", 3.0)
    _cursor, claimed, dead = h.run(store.reclaim("w3", "0-0", 10))  # would be delivery 3
    assert (claimed, dead) == ([], 1)
    assert r.xlen(ks.stream) == 0
    assert pending(r, ks) == {}
    [(_id, fields)] = r.xrange(ks.dead)
    assert uuid_text(fields[b"u"]) == msg.uuid
    assert fields[b"m"] == msg.message.encode()
    assert fields[b"a"] == b"2"
    assert b"deliveries exhausted" in fields[b"reason"]
    record = h.run(store.record(msg.uuid))
    assert record is not None and (record.state, record.attempts) == (State.DEAD, 2)
    assert list(retained(r, ks)) == [msg.uuid]


def test_reclaim_dead_letters_an_entry_whose_record_is_gone_without_writing_a_record(h, r, ks):
    store = h.store(visibility_timeout=0.01, max_deliveries=1)
    h.run(store.ensure_group())
    msg = new("orphan", run_at=1)
    h.run(store.accept(msg))
    [delivery] = h.run(store.read("w1", 10, None))
    r.hdel(ks.messages, uuid_key(msg.uuid))
    wait_until(lambda: pending(r, ks)[delivery.id]["idle"] > 10, "idle", 3.0)
    assert h.run(store.reclaim("w2", "0-0", 10))[2] == 1
    [(_id, fields)] = r.xrange(ks.dead)
    assert (uuid_text(fields[b"u"]), fields[b"m"], fields[b"a"]) == (msg.uuid, b"orphan", b"1")
    assert h.run(store.record(msg.uuid)) is None
    assert retained(r, ks) == {}


def test_extend_renews_only_the_entries_the_caller_owns(h, r, ks):
    store = h.store()
    h.run(store.ensure_group())
    h.run(store.accept(new("mine", run_at=1)))
    h.run(store.accept(new("theirs", run_at=1)))
    [mine] = h.run(store.read("me", 1, None))
    [theirs] = h.run(store.read("other", 1, None))
    wait_until(
        lambda: all(p["idle"] >= 60 for p in pending(r, ks).values()),
        "both entries idle 60 ms",
        3.0,
    )
    before = pending(r, ks)
    assert h.run(store.extend("me", [mine.id, theirs.id, "1-1"])) == 1
    after = pending(r, ks)
    assert after[mine.id]["idle"] < before[mine.id]["idle"]
    assert after[mine.id]["deliveries"] == before[mine.id]["deliveries"] == 1
    assert after[theirs.id]["idle"] >= before[theirs.id]["idle"]
    assert after[theirs.id]["consumer"] == "other"
    assert h.run(store.extend("me", [])) == 0


# --- bounded stream --------------------------------------------------------------------------


def test_stream_does_not_grow_after_messages_are_handled(h, r, ks):
    store = h.store(max_deliveries=2)
    h.run(store.ensure_group())
    for i in range(60):
        h.run(store.accept(new(f"m{i}", run_at=1)))
    assert r.xlen(ks.stream) == 60
    failed = 0
    while batch := h.run(store.read("w", 7, None)):
        ok = [d for d in batch if int(d.message[1:]) % 5]
        for d in batch:
            if d not in ok:
                h.run(store.fail(d, 0, "boom"))
                failed += 1
        h.run(store.ack(ok))
        h.run(store.promote(1))
    assert failed > 0
    assert r.xlen(ks.stream) == 0
    assert r.zcard(ks.delayed) == 0
    assert r.xinfo_groups(ks.stream)[0]["pending"] == 0


# --- randomized interleavings ----------------------------------------------------------------


def check_exactly_one_place(r: redis.Redis, ks: Keyspace, accepted: set[str]) -> None:
    found = locations(r, ks)
    assert set(found) == accepted, "a message appeared from nowhere or was lost"
    for uuid, places in found.items():
        assert len(places) == 1, f"{uuid} is in {places}"
        packed = r.hget(ks.messages, uuid_key(uuid))
        assert packed is not None, f"{uuid} has no record"
        state = decode_record(uuid, packed).state
        assert state in EXPECTED_STATE[places[0]], f"{uuid} in {places[0]} but {state}"


def test_random_interleavings_never_lose_or_duplicate_a_message(redis_url: str, prefix: str):
    counter = iter(range(10**6))

    class Interleavings(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.h = Harness(redis_url, f"{prefix}-{next(counter)}")
            self.ks = Keyspace(self.h.prefix)
            self.r = redis.Redis.from_url(redis_url)
            # A 1 ms visibility timeout and 2 deliveries make reclaims and dead letters common.
            self.store = self.h.store(visibility_timeout=0.001, max_deliveries=2)
            self.h.run(self.store.ensure_group())
            self.accepted: list[str] = []
            # What each consumer holds depends on timing, so rules never draw from it
            # (Hypothesis needs draws to depend only on earlier draws): they draw a
            # number and take the held delivery it points at, if any.
            self.held: dict[str, list[Delivery]] = {"a": [], "b": []}

        def _take(self, consumer: str, pick: int) -> Delivery | None:
            held = self.held[consumer]
            return held.pop(pick % len(held)) if held else None

        @rule(due=st.booleans(), ahead_ms=st.integers(1, 20))
        def accept(self, due: bool, ahead_ms: int) -> None:
            run_at = redis_now_ms(self.r) + (-1 if due else ahead_ms)
            msg = new("body", run_at)
            got = self.h.run(self.store.accept(msg))
            assert got.created
            self.accepted.append(msg.uuid)

        @precondition(lambda self: self.accepted)
        @rule(pick=st.integers(0, 1000))
        def accept_again(self, pick: int) -> None:
            uuid = self.accepted[pick % len(self.accepted)]
            before = snapshot(self.r, self.ks)
            got = self.h.run(self.store.accept(new("again", 1, uuid)))
            assert not got.created
            assert snapshot(self.r, self.ks) == before

        @rule(limit=st.integers(1, 5))
        def promote(self, limit: int) -> None:
            assert self.h.run(self.store.promote(1, limit=limit)).refused_by is None

        @rule(consumer=st.sampled_from(["a", "b"]), count=st.integers(1, 3))
        def read(self, consumer: str, count: int) -> None:
            self.held[consumer] += self.h.run(self.store.read(consumer, count, None))

        @rule(consumer=st.sampled_from(["a", "b"]), pick=st.integers(0, 1000))
        def ack(self, consumer: str, pick: int) -> None:
            if delivery := self._take(consumer, pick):
                assert self.h.run(self.store.ack([delivery])) in (0, 1)

        @rule(
            consumer=st.sampled_from(["a", "b"]),
            pick=st.integers(0, 1000),
            delay=st.sampled_from([0, 5]),
        )
        def fail(self, consumer: str, pick: int, delay: int) -> None:
            if delivery := self._take(consumer, pick):
                outcome, _ = self.h.run(self.store.fail(delivery, delay, "boom"))
                assert outcome in ("retrying", "dead", "gone")

        @rule(consumer=st.sampled_from(["a", "b"]))
        def reclaim(self, consumer: str) -> None:
            # Let held entries pass the 1 ms visibility timeout (Redis' clock decides).
            wait_for_redis_time(self.r, redis_now_ms(self.r) + 2)
            _cursor, claimed, _dead = self.h.run(self.store.reclaim(consumer, "0-0", 10))
            self.held[consumer] += claimed

        @invariant()
        def every_message_is_in_exactly_one_place(self) -> None:
            check_exactly_one_place(self.r, self.ks, set(self.accepted))

        def teardown(self) -> None:
            try:
                self._drain()
            finally:
                try:
                    keys = list(self.r.scan_iter(match=f"*{self.h.prefix}*"))
                    if keys:
                        self.r.unlink(*keys)
                finally:
                    self.r.close()
                    self.h.close()

        def _drain(self) -> None:
            """Handle everything left; afterwards each message is delivered or dead."""
            deadline = time.monotonic() + 2.0
            while self.r.zcard(self.ks.delayed) or self.r.xlen(self.ks.stream):
                assert time.monotonic() < deadline, "could not drain"
                self.h.run(self.store.promote(1))
                self.h.run(self.store.ack(self.h.run(self.store.read("z", 100, None))))
                _c, claimed, _d = self.h.run(self.store.reclaim("z", "0-0", 100))
                self.h.run(self.store.ack(claimed))
                time.sleep(0.002)
            check_exactly_one_place(self.r, self.ks, set(self.accepted))
            final = Counter(p for places in locations(self.r, self.ks).values() for p in places)
            assert set(final) <= {"delivered", "dead"}
            assert sum(final.values()) == len(self.accepted)

    run_state_machine_as_test(
        Interleavings,
        # No shrink phase: shrinking replays whole examples against Redis (minutes, past the
        # pytest timeout); the failing 30-step sequence is printed as it is.
        settings=hsettings(
            max_examples=25,
            stateful_step_count=30,
            deadline=None,
            phases=[Phase.explicit, Phase.reuse, Phase.generate],
        ),
    )


# --- storage format --------------------------------------------------------------------------


def test_check_format_passes_on_an_empty_prefix_and_on_its_own_data(h, r, ks):
    store = h.store(max_deliveries=1)
    h.run(store.check_format())
    h.run(store.ensure_group())
    h.run(store.accept_many([new(run_at=253402300799999), new(run_at=1), new(run_at=1)]))
    [delivery, dead] = h.run(store.read("w", 10, None))
    h.run(store.ack([delivery]))
    h.run(store.fail(dead, 0, "boom"))
    assert r.type(ks.retention) == b"list"
    h.run(store.check_format())


FORMAT_1_DATA = {
    "delayed member": lambda r, ks: r.zadd(ks.delayed, {"000000000001" + str(uuidlib.uuid4()): 1}),
    "record": lambda r, ks: r.hset(ks.messages, str(uuidlib.uuid4()), b"\x96\xa9scheduled"),
    "stream entry": lambda r, ks: r.xadd(ks.stream, {"u": str(uuidlib.uuid4()), "m": "x"}),
    "retention zset": lambda r, ks: r.zadd(ks.retention, {str(uuidlib.uuid4()): 1}),
}


@pytest.mark.parametrize("kind", FORMAT_1_DATA)
def test_check_format_refuses_data_of_format_1(h, r, ks, kind):
    FORMAT_1_DATA[kind](r, ks)
    before = snapshot(r, ks) if kind != "retention zset" else None
    with pytest.raises(StorageFormatError, match="storage format 1"):
        h.run(h.store().check_format())
    if before is not None:
        assert snapshot(r, ks) == before  # read only


DAMAGED_DATA = {
    "delayed member": lambda r, ks: r.zadd(ks.delayed, {b"short": 1}),
    "record field": lambda r, ks: r.hset(ks.messages, b"odd field", b"x"),
    "stream entry": lambda r, ks: r.xadd(ks.stream, {"u": b"\x01" * 15, "m": "x"}),
}


@pytest.mark.parametrize("kind", DAMAGED_DATA)
def test_check_format_starts_on_one_damaged_item_which_is_not_format_1(h, r, ks, kind):
    """Refusing would make every restart refuse again; the scripts quarantine it instead."""
    DAMAGED_DATA[kind](r, ks)
    h.run(h.store().check_format())


# --- the client ------------------------------------------------------------------------------


def test_connect_gives_a_client_whose_xreadgroup_replies_are_the_raw_field_lists(h, r, ks):
    store = h.store()
    assert isinstance(store.client, StoreRedis)
    h.run(store.ensure_group())
    h.run(store.accept(new("raw", run_at=1)))
    reply = h.run(
        store.client.execute_command(
            "XREADGROUP", "GROUP", CONSUMER_GROUP, "w", "COUNT", 1, "STREAMS", ks.stream, ">"
        )
    )
    # A map of stream -> entries on RESP3, [stream, entries] pairs on RESP2.
    [(stream, [[_id, fields]])] = list(reply.items() if isinstance(reply, dict) else reply)
    assert stream == ks.stream.encode()
    assert fields[::2] == [b"u", b"m", b"r", b"a"]  # not redis-py's dict
    assert fields[3] == b"raw"


def test_a_store_leaves_the_callbacks_of_the_client_it_is_given_alone(h):
    plain = aioredis.Redis.from_url(h.redis_url)
    try:
        callbacks = dict(plain.response_callbacks)
        Store(plain, Settings.from_env({}, redis_url=h.redis_url, prefix=h.prefix))
        assert dict(plain.response_callbacks) == callbacks
    finally:
        h.run(plain.aclose())
