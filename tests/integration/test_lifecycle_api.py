"""The lifecycle API in-process (TestClient runs the lifespan) against the real Redis:
status, cancel, reschedule, bulk accept, dead letters, stats, and their refusals.

Scheduler and worker steps (promote, read, fail, ack) are driven directly through
Store on a private event loop, so each test decides exactly when they happen.
"""

from __future__ import annotations

import json
import time
import uuid as uuidlib
import warnings
from collections.abc import Iterator

import pytest
import redis

from app.http.app import create_app
from app.model import State
from app.settings import Settings
from app.store import Store
from app.store.codec import encode_record, uuid_key
from app.store.keys import Keyspace
from tests.aio import Harness
from tests.integration.test_scripts import (
    redis_now_ms,
    retained,
    stream_uuids,
    wait_for_redis_time,
)

with warnings.catch_warnings():
    # Starlette's test client asks for httpx2 at import; the project's test extra has httpx.
    warnings.filterwarnings("ignore", "Using `httpx` with `starlette.testclient`", UserWarning)
    from starlette.testclient import TestClient

V1 = "/api/v1"
UUID = "123e4567-e89b-12d3-a456-426614174000"
OTHER = "00000000-0000-4000-8000-000000000001"
FAR = 253402300799999  # 9999-12-31: scheduled, never due during a test
MAX_MESSAGE = 100
BATCH_BYTES = 200_000
TOKEN = "s3cret-token-0123456789"


@pytest.fixture
def settings(redis_url: str, prefix: str) -> Settings:
    return Settings.from_env(
        {},
        redis_url=redis_url,
        prefix=prefix,
        max_message_bytes=MAX_MESSAGE,
        max_batch_bytes=BATCH_BYTES,
        max_deliveries=1,
    )


@pytest.fixture
def client(settings: Settings, redis_client: redis.Redis) -> Iterator[TestClient]:
    # redis_client: the test's keys are deleted afterwards.
    with TestClient(create_app(settings), raise_server_exceptions=True) as test_client:
        yield test_client


@pytest.fixture
def store(h: Harness) -> Store:
    """The scheduler's and the worker's side: one delivery before a message is dead."""
    s = h.store(max_deliveries=1)
    h.run(s.ensure_group())
    return s


def save(client: TestClient, message: str = "hello", run_at: int = FAR, uuid: str | None = None):
    body: dict[str, object] = {"message": message, "runAt": run_at}
    if uuid:
        body["uuid"] = uuid
    response = client.post(f"{V1}/save-message", json=body)
    assert response.status_code == 201, response.text
    return response.json()["uuid"]


def patch(client: TestClient, uuid: str, raw: bytes | str, content_type: str = "application/json"):
    return client.patch(
        f"{V1}/messages/{uuid}",
        content=raw.encode() if isinstance(raw, str) else raw,
        headers={"content-type": content_type},
    )


def assert_error(response, status: int, field: str | None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error", "field"}
    assert isinstance(body["error"], str) and body["error"]
    assert body["field"] == field
    return body


def assert_conflict(response, state: str) -> None:
    assert response.status_code == 409, response.text
    body = response.json()
    assert set(body) == {"error", "field", "state"}
    assert (body["field"], body["state"]) == ("state", state)
    assert state in body["error"]


def snapshot(r: redis.Redis, ks: Keyspace) -> dict[str, object]:
    return {
        "messages": r.hgetall(ks.messages),
        "delayed": r.zrange(ks.delayed, 0, -1, withscores=True),
        "stream": r.xrange(ks.stream),
        "dead": r.xrange(ks.dead),
        "retention": r.lrange(ks.retention, 0, -1),
    }


def kill(h: Harness, store: Store, client: TestClient, message: str = "poison") -> str:
    """A message that failed its one delivery: it is in the dead stream."""
    uuid = save(client, message, run_at=0)
    [delivery] = [d for d in h.run(store.read("w", 100, None)) if d.uuid == uuid]
    assert h.run(store.fail(delivery, 0, "ValueError: boom")) == ("dead", 1)
    return uuid


def in_state(h: Harness, store: Store, client: TestClient, state: str) -> str:
    """A message in ``state`` (one that may not be cancelled or rescheduled)."""
    if state == "queued":
        return save(client, run_at=0)
    if state == "delivered":
        uuid = save(client, run_at=0)
        assert h.run(store.ack(h.run(store.read("w", 100, None)))) == 1
        return uuid
    if state == "dead":
        return kill(h, store, client)
    assert state == "cancelled"
    uuid = save(client)
    assert client.delete(f"{V1}/messages/{uuid}").status_code == 200
    return uuid


# --- GET /messages/{uuid} --------------------------------------------------------------------


def test_status_of_a_scheduled_message_has_its_times_and_one_transition(client, r):
    before = redis_now_ms(r)
    save(client, uuid=UUID)
    response = client.get(f"{V1}/messages/{UUID.upper()}")  # any case finds it
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {
        "uuid",
        "state",
        "runAt",
        "attempts",
        "acceptedAt",
        "updatedAt",
        "transitions",
    }
    assert (body["uuid"], body["state"], body["runAt"], body["attempts"]) == (
        UUID,
        "scheduled",
        FAR,
        0,
    )
    assert before <= body["acceptedAt"] == body["updatedAt"] <= redis_now_ms(r)
    assert body["transitions"] == {"scheduled": body["acceptedAt"]}


def test_status_follows_a_message_through_queued_retrying_and_delivered(client, h, r):
    store = h.store(max_deliveries=3)
    h.run(store.ensure_group())
    uuid = save(client, run_at=0)
    [d] = h.run(store.read("w", 10, None))
    assert h.run(store.fail(d, 0, "boom")) == ("retrying", 1)
    retrying = client.get(f"{V1}/messages/{uuid}").json()
    assert (retrying["state"], retrying["attempts"]) == ("retrying", 1)
    h.run(store.promote(1))
    h.run(store.ack(h.run(store.read("w", 10, None))))
    body = client.get(f"{V1}/messages/{uuid}").json()
    assert (body["state"], body["attempts"], body["runAt"]) == ("delivered", 2, 0)
    assert set(body["transitions"]) == {"queued", "retrying", "delivered"}
    assert body["transitions"]["delivered"] == body["updatedAt"]
    assert body["transitions"]["retrying"] <= body["transitions"]["queued"]


def test_status_reads_every_field_of_a_stored_record(client, r, ks):
    r.hset(
        ks.messages,
        uuid_key(UUID),
        encode_record(
            State.DELIVERED,
            7,
            100,
            attempts=1,
            first=State.QUEUED,
            marks={State.DELIVERED: 200},
        ),
    )
    body = client.get(f"{V1}/messages/{UUID}").json()
    assert body == {
        "uuid": UUID,
        "state": "delivered",
        "runAt": 7,
        "attempts": 1,
        "acceptedAt": 100,
        "updatedAt": 200,
        "transitions": {"queued": 100, "delivered": 200},
    }


def test_status_of_an_unknown_uuid_is_404(client):
    assert_error(client.get(f"{V1}/messages/{UUID}"), 404, "uuid")


@pytest.mark.parametrize("bad", ["abc", UUID[:-1], UUID + "0", UUID.replace("-", ""), "%20"])
def test_every_uuid_route_refuses_a_non_canonical_uuid_with_422(client, r, prefix, bad):
    for method, path in [
        ("GET", f"{V1}/messages/{bad}"),
        ("DELETE", f"{V1}/messages/{bad}"),
        ("POST", f"{V1}/dead/{bad}/replay"),
        ("DELETE", f"{V1}/dead/{bad}"),
    ]:
        assert_error(client.request(method, path), 422, "uuid")
    assert_error(patch(client, bad, '{"runAt": 1}'), 422, "uuid")
    assert list(r.scan_iter(match=f"*{prefix}*")) == []


# --- DELETE /messages/{uuid} -----------------------------------------------------------------


def test_cancelled_message_is_never_promoted(client, store, h, r, ks):
    run_at = redis_now_ms(r) + 100
    uuid = save(client, "never", run_at=run_at)
    response = client.delete(f"{V1}/messages/{uuid}")
    assert response.status_code == 200
    assert response.json() == {"uuid": uuid, "state": "cancelled", "runAt": run_at}
    assert r.zcard(ks.delayed) == 0
    wait_for_redis_time(r, run_at + 1)
    assert h.run(store.promote(1)).moved == 0
    assert r.xlen(ks.stream) == 0
    status = client.get(f"{V1}/messages/{uuid}").json()
    assert status["state"] == "cancelled"
    assert set(status["transitions"]) == {"scheduled", "cancelled"}
    # Kept for the retention window, then purged like a delivered record.
    assert uuid in retained(r, ks)


def test_cancel_of_a_retrying_message_takes_it_out_of_the_sorted_set(client, h, r, ks):
    store = h.store(max_deliveries=3)
    h.run(store.ensure_group())
    uuid = save(client, run_at=0)
    [d] = h.run(store.read("w", 10, None))
    assert h.run(store.fail(d, 60_000, "boom"))[0] == "retrying"
    response = client.delete(f"{V1}/messages/{uuid}")
    assert response.status_code == 200
    assert response.json() == {"uuid": uuid, "state": "cancelled", "runAt": 0}
    assert r.zcard(ks.delayed) == 0
    assert client.get(f"{V1}/messages/{uuid}").json()["attempts"] == 1


def test_cancel_leaves_other_messages_alone(client, h, store, r, ks):
    keep = save(client, "keep", run_at=redis_now_ms(r) + 50)
    drop = save(client, "drop", run_at=redis_now_ms(r) + 50)
    assert client.delete(f"{V1}/messages/{drop}").status_code == 200
    wait_for_redis_time(r, redis_now_ms(r) + 60)
    assert h.run(store.promote(1)).moved == 1
    assert stream_uuids(r, ks.stream) == [keep]


@pytest.mark.parametrize("state", ["queued", "delivered", "dead", "cancelled"])
def test_cancel_is_409_naming_the_state_and_changes_nothing(client, h, store, r, ks, state):
    uuid = in_state(h, store, client, state)
    before = snapshot(r, ks)
    assert_conflict(client.delete(f"{V1}/messages/{uuid}"), state)
    assert snapshot(r, ks) == before


def test_cancel_of_an_unknown_uuid_is_404(client):
    assert_error(client.delete(f"{V1}/messages/{UUID}"), 404, "uuid")


# --- PATCH /messages/{uuid} ------------------------------------------------------------------


def test_reschedule_later_delays_the_promotion(client, h, store, r, ks):
    now = redis_now_ms(r)
    moved = save(client, "moved", run_at=now + 60)
    stays = save(client, "stays", run_at=now + 120)
    response = patch(client, moved, json.dumps({"runAt": now + 250}))
    assert response.status_code == 200
    assert response.json() == {"uuid": moved, "runAt": now + 250, "state": "scheduled"}
    wait_for_redis_time(r, now + 120)
    got = h.run(store.promote(1))
    assert (got.moved, got.next_due_ms) == (1, now + 250)
    assert stream_uuids(r, ks.stream) == [stays]
    wait_for_redis_time(r, now + 250)
    assert h.run(store.promote(1)).moved == 1
    assert stream_uuids(r, ks.stream) == [stays, moved]
    assert client.get(f"{V1}/messages/{moved}").json()["runAt"] == now + 250


def test_reschedule_earlier_promotes_it_first(client, h, store, r, ks):
    # Margins wide enough that the requests end before either time on a loaded machine.
    now = redis_now_ms(r)
    first = save(client, "first", run_at=now + 1000)
    moved = save(client, "moved", run_at=FAR)
    assert patch(client, moved, json.dumps({"runAt": now + 500})).status_code == 200
    wait_for_redis_time(r, now + 1000)
    assert h.run(store.promote(1)).moved == 2
    assert stream_uuids(r, ks.stream) == [moved, first]
    [delivery, _] = h.run(store.read("w", 10, None))
    assert (delivery.message, delivery.run_at) == ("moved", now + 500)


def test_reschedule_to_an_equal_run_at_goes_behind_messages_already_at_that_time(
    client, h, store, r, ks
):
    at = redis_now_ms(r) + 1000
    a = save(client, "a", run_at=at)
    b = save(client, "b", run_at=at)
    assert patch(client, a, json.dumps({"runAt": at})).status_code == 200
    wait_for_redis_time(r, at)
    h.run(store.promote(1))
    assert stream_uuids(r, ks.stream) == [b, a]


def test_reschedule_to_a_passed_time_queues_it_at_once(client, h, store, r, ks):
    uuid = save(client, "now please", run_at=FAR)
    response = patch(client, uuid, '{"runAt": 5}')
    assert response.json() == {"uuid": uuid, "runAt": 5, "state": "queued"}
    assert r.zcard(ks.delayed) == 0
    [delivery] = h.run(store.read("w", 10, None))
    assert (delivery.uuid, delivery.message, delivery.run_at) == (uuid, "now please", 5)
    status = client.get(f"{V1}/messages/{uuid}").json()
    assert status["state"] == "queued" and "queued" in status["transitions"]


def test_reschedule_wakes_the_leader_when_it_becomes_the_earliest(client, r, ks):
    later = redis_now_ms(r) + 60_000
    save(client, "earliest", run_at=later)
    moved = save(client, "moved", run_at=FAR)
    pubsub = r.pubsub()
    try:
        pubsub.subscribe(ks.wake_channel)
        assert pubsub.get_message(timeout=2.0)["type"] == "subscribe"
        patch(client, moved, json.dumps({"runAt": later + 1}))  # not the earliest: no wake
        patch(client, moved, json.dumps({"runAt": later - 1}))  # the earliest now: wake
        received = []
        deadline = time.monotonic() + 2.0
        while not received and time.monotonic() < deadline:
            message = pubsub.get_message(timeout=0.1)
            if message and message["type"] == "message":
                received.append(int(message["data"]))
        assert received == [later - 1]
    finally:
        pubsub.close()


@pytest.mark.parametrize("state", ["queued", "delivered", "dead", "cancelled"])
def test_reschedule_is_409_naming_the_state_and_changes_nothing(client, h, store, r, ks, state):
    uuid = in_state(h, store, client, state)
    before = snapshot(r, ks)
    assert_conflict(patch(client, uuid, '{"runAt": 5}'), state)
    assert snapshot(r, ks) == before


@pytest.mark.parametrize(
    ("raw", "status", "field"),
    [
        pytest.param('{"runAt": "5"}', 422, "runAt", id="string"),
        pytest.param('{"runAt": 1.5}', 422, "runAt", id="float"),
        pytest.param('{"runAt": true}', 422, "runAt", id="bool"),
        pytest.param('{"runAt": -1}', 422, "runAt", id="negative"),
        pytest.param('{"runAt": 253402300800000}', 422, "runAt", id="after-9999"),
        pytest.param("{}", 422, "runAt", id="missing"),
        pytest.param('{"runAt": 5, "message": "x"}', 422, "message", id="unknown-field"),
        pytest.param("[5]", 422, None, id="array"),
        pytest.param('{"runAt": ', 400, None, id="truncated"),
        pytest.param("", 400, None, id="empty"),
        pytest.param('{"runAt": 5' + " " * 1100 + "}", 413, None, id="over-1-KiB"),
    ],
)
def test_bad_reschedule_body_is_refused_and_changes_nothing(client, r, ks, raw, status, field):
    uuid = save(client)
    before = snapshot(r, ks)
    assert_error(patch(client, uuid, raw), status, field)
    assert snapshot(r, ks) == before


def test_reschedule_needs_a_json_content_type(client):
    uuid = save(client)
    assert_error(patch(client, uuid, '{"runAt": 5}', "text/plain"), 415, None)


def test_reschedule_of_an_unknown_uuid_is_404(client):
    assert_error(patch(client, UUID, '{"runAt": 5}'), 404, "uuid")


# --- POST /save-messages ---------------------------------------------------------------------


def bulk(client: TestClient, payload: object, content_type: str = "application/json"):
    return client.post(
        f"{V1}/save-messages",
        content=json.dumps(payload).encode(),
        headers={"content-type": content_type},
    )


def test_bulk_accepts_the_valid_items_and_reports_each_invalid_and_duplicate(client, r, ks):
    save(client, "stored before", uuid=OTHER)
    fresh = str(uuidlib.uuid4())
    items = [
        {"message": "due", "runAt": 0},  # 0 accepted, queued
        {"message": "later", "runAt": FAR, "uuid": fresh.upper()},  # 1 accepted, scheduled
        {"message": "no time"},  # 2 invalid: runAt
        {"message": "x", "runAt": 5, "uuid": "nope"},  # 3 invalid: uuid
        {"message": "again", "runAt": 0, "uuid": OTHER},  # 4 duplicate of an earlier post
        {"message": "twice", "runAt": 0, "uuid": fresh},  # 5 duplicate inside this batch
        {"message": "é" * 51, "runAt": 0},  # 6 invalid: over 100 bytes
        42,  # 7 invalid: not an object
    ]
    response = bulk(client, items)
    assert response.status_code == 200
    body = response.json()
    assert (body["accepted"], body["duplicates"], body["invalid"]) == (2, 2, 4)
    results = body["results"]
    assert [x["index"] for x in results] == list(range(8))
    assert [x["status"] for x in results] == [
        "accepted",
        "accepted",
        "invalid",
        "invalid",
        "duplicate",
        "duplicate",
        "invalid",
        "invalid",
    ]
    assert results[0]["state"] == "queued" and results[0]["runAt"] == 0
    assert results[1] == {
        "index": 1,
        "status": "accepted",
        "uuid": fresh,
        "runAt": FAR,
        "state": "scheduled",
    }
    assert results[2]["field"] == "runAt" and results[3]["field"] == "uuid"
    assert results[6]["field"] == "message" and results[7]["field"] is None
    assert {k for x in results if x["status"] == "invalid" for k in x} == {
        "index",
        "status",
        "error",
        "field",
    }
    assert results[4] == {
        "index": 4,
        "status": "duplicate",
        "uuid": OTHER,
        "runAt": FAR,
        "state": "scheduled",
    }
    assert results[5]["uuid"] == fresh and results[5]["state"] == "scheduled"
    # The duplicate inside the batch counted once: one record, one sorted-set member.
    assert r.hlen(ks.messages) == 3
    assert stream_uuids(r, ks.stream) == [results[0]["uuid"]]
    assert r.zcard(ks.delayed) == 2


def test_bulk_accepts_the_messages_envelope(client):
    response = bulk(client, {"messages": [{"message": "a", "runAt": FAR}]})
    assert response.status_code == 200
    assert response.json()["accepted"] == 1


def test_bulk_of_1000_is_stored_by_one_script_call(client, r, ks):
    # Warm up: the first call of a script loads it (NOSCRIPT, SCRIPT LOAD, retry).
    assert bulk(client, [{"message": "w", "runAt": FAR}]).status_code == 200

    def evalsha_calls() -> int:
        return int(r.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))

    before = evalsha_calls()
    items = [{"message": f"m{i}", "runAt": i % 2 and FAR} for i in range(1000)]
    body = bulk(client, items).json()
    assert evalsha_calls() - before == 1
    assert body["accepted"] == 1000
    assert r.xlen(ks.stream) == 500 and r.zcard(ks.delayed) == 501
    # Accepted in request order: the due half is in the stream in that order.
    assert stream_uuids(r, ks.stream) == [x["uuid"] for x in body["results"][::2]]


def test_bulk_of_nothing_is_fine_and_writes_nothing(client, r, prefix):
    response = bulk(client, [])
    assert response.json() == {"results": [], "accepted": 0, "duplicates": 0, "invalid": 0}
    assert list(r.scan_iter(match=f"*{prefix}*")) == []


def test_bulk_of_only_invalid_items_writes_nothing(client, r, prefix):
    body = bulk(client, [{"runAt": 1}, {"message": "x"}]).json()
    assert body["invalid"] == 2
    assert list(r.scan_iter(match=f"*{prefix}*")) == []


@pytest.mark.parametrize(
    ("raw", "status", "field"),
    [
        pytest.param(b'{"message": "x", "runAt": 0}', 422, "message", id="one-message"),
        pytest.param(b'{"messages": [], "extra": 1}', 422, "extra", id="unknown-envelope-field"),
        pytest.param(b'{"messages": 5}', 422, "messages", id="messages-not-a-list"),
        pytest.param(b'"x"', 422, None, id="scalar"),
        pytest.param(b"[", 400, None, id="truncated"),
        pytest.param(b"[" + b'{"message": "x", "runAt": 0},' * 1000 + b"{}]", 413, None, id="1001"),
        pytest.param(b'[{"message": "' + b"x" * BATCH_BYTES + b'"}]', 413, None, id="body-limit"),
    ],
)
def test_bad_bulk_body_is_refused_and_writes_nothing(client, r, prefix, raw, status, field):
    response = client.post(
        f"{V1}/save-messages", content=raw, headers={"content-type": "application/json"}
    )
    body = assert_error(response, status, field)
    if status == 422:
        assert '{"messages": [...]}' in body["error"]
    assert list(r.scan_iter(match=f"*{prefix}*")) == []


def test_bulk_needs_a_json_content_type(client):
    assert_error(bulk(client, [], "text/plain"), 415, None)


# --- dead letters ----------------------------------------------------------------------------


def test_dead_list_pages_oldest_first_with_a_cursor(client, h, store):
    uuids = [kill(h, store, client, f"m{i}") for i in range(5)]
    seen: list[dict] = []
    pages = []
    cursor = None
    while True:
        query = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        page = client.get(f"{V1}/dead", params=query).json()
        pages.append(len(page["items"]))
        seen += page["items"]
        cursor = page["next"]
        if cursor is None:
            break
    assert pages == [2, 2, 1]
    assert [x["uuid"] for x in seen] == uuids
    first = seen[0]
    assert set(first) == {"id", "uuid", "message", "runAt", "attempts", "reason", "deadAt"}
    assert (first["message"], first["runAt"], first["attempts"]) == ("m0", 0, 1)
    assert first["reason"] == "ValueError: boom"
    assert int(first["id"].split("-")[0]) == pytest.approx(first["deadAt"], abs=1000)


def test_dead_list_of_an_exact_page_has_no_next(client, h, store):
    for i in range(2):
        kill(h, store, client, f"m{i}")
    page = client.get(f"{V1}/dead", params={"limit": 2}).json()
    assert len(page["items"]) == 2 and page["next"] is None
    assert client.get(f"{V1}/dead").json()["next"] is None  # default limit 100


def test_dead_list_shows_a_malformed_entry_with_nulls(client, r, ks):
    r.xadd(ks.dead, {"reason": "legacy item is not JSON"})
    [item] = client.get(f"{V1}/dead").json()["items"]
    assert item["reason"] == "legacy item is not JSON"
    assert item["uuid"] is None and item["runAt"] is None


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("limit=-1", "limit"),
        ("limit=abc", "limit"),
        ("limit=1.5", "limit"),
        ("limit=", "limit"),
        ("cursor=abc", "cursor"),
        ("cursor=1-2-3", "cursor"),
        ("cursor=" + "9" * 21 + "-0", "cursor"),
        ("cursor=1-18446744073709551616", "cursor"),  # 2**64: found by schemathesis
    ],
)
def test_dead_list_refuses_a_bad_limit_or_cursor(client, query, field):
    assert_error(client.get(f"{V1}/dead?{query}"), 422, field)


def test_replayed_message_is_handled_again_with_attempts_reset(client, h, store, r, ks):
    uuid = kill(h, store, client, "second chance")
    response = client.post(f"{V1}/dead/{uuid}/replay")
    assert response.status_code == 200
    assert response.json() == {"uuid": uuid, "state": "queued"}
    assert r.xlen(ks.dead) == 0
    status = client.get(f"{V1}/messages/{uuid}").json()
    assert (status["state"], status["attempts"]) == ("queued", 0)
    [delivery] = h.run(store.read("w", 10, None))
    assert (delivery.uuid, delivery.message, delivery.attempts) == (uuid, "second chance", 0)
    assert h.run(store.ack([delivery])) == 1
    assert client.get(f"{V1}/messages/{uuid}").json()["state"] == "delivered"


def test_replay_of_a_uuid_not_in_the_dead_stream_is_404(client, h, store):
    assert_error(client.post(f"{V1}/dead/{UUID}/replay"), 404, "uuid")
    scheduled = save(client)
    assert_error(client.post(f"{V1}/dead/{scheduled}/replay"), 404, "uuid")


def test_replay_is_409_when_the_uuid_lives_elsewhere(client, r, ks):
    uuid = save(client)
    r.xadd(ks.dead, {"u": uuid_key(uuid), "m": "x", "r": "1", "a": "1", "reason": "?", "at": "1"})
    assert_conflict(client.post(f"{V1}/dead/{uuid}/replay"), "scheduled")
    assert r.xlen(ks.dead) == 1


def test_replay_all_replays_every_dead_message_once(client, h, store, r, ks):
    uuids = [kill(h, store, client, f"m{i}") for i in range(3)]
    r.xadd(ks.dead, {"reason": "malformed"})
    response = client.post(f"{V1}/dead/replay")
    assert response.json() == {"replayed": 3, "skipped": 1}
    assert stream_uuids(r, ks.stream) == uuids
    assert client.post(f"{V1}/dead/replay").json() == {"replayed": 0, "skipped": 1}


def test_delete_of_a_dead_message_removes_only_its_entry(client, h, store, r, ks):
    gone, kept = kill(h, store, client, "a"), kill(h, store, client, "b")
    response = client.delete(f"{V1}/dead/{gone}")
    assert response.json() == {"uuid": gone, "deleted": True}
    assert stream_uuids(r, ks.dead) == [kept]
    assert client.get(f"{V1}/messages/{gone}").json()["state"] == "dead"
    assert_error(client.delete(f"{V1}/dead/{gone}"), 404, "uuid")


def test_purge_deletes_every_dead_message(client, h, store, r, ks):
    for i in range(3):
        kill(h, store, client, f"m{i}")
    assert client.delete(f"{V1}/dead").json() == {"deleted": 3}
    assert r.xlen(ks.dead) == 0
    assert client.delete(f"{V1}/dead").json() == {"deleted": 0}


# --- GET /stats ------------------------------------------------------------------------------


def test_stats_of_an_empty_keyspace(client):
    assert client.get(f"{V1}/stats").json() == {
        "delayed": 0,
        "streamLength": 0,
        "pending": 0,
        "lag": 0,
        "dead": 0,
        "consumers": [],
        "leader": None,
        "oldestOverdueMs": None,
    }


def test_stats_figures_match_what_was_put_in(client, h, store, r):
    leader = Store(store.client, store.settings, identifier="sched-7")
    before = redis_now_ms(r)
    h.run(leader.promote(7))
    kill(h, store, client, "dead one")  # 1 dead; consumer "w" exists with nothing pending
    for _ in range(2):
        save(client)  # 2 far in the future
    for _ in range(3):
        save(client, run_at=0)  # 3 in the stream
    h.run(store.read("w1", 2, None))  # 2 of them pending with w1, 1 unread
    overdue_at = redis_now_ms(r) + 20
    save(client, run_at=overdue_at)  # in the sorted set, then overdue (no leader promotes)
    wait_for_redis_time(r, overdue_at + 30)
    body = client.get(f"{V1}/stats").json()
    assert (body["delayed"], body["streamLength"], body["pending"], body["lag"], body["dead"]) == (
        3,
        3,
        2,
        1,
        1,
    )
    consumers = {c["name"]: c for c in body["consumers"]}
    assert set(consumers) == {"w", "w1"}
    assert (consumers["w"]["pending"], consumers["w1"]["pending"]) == (0, 2)
    assert all(c["idleMs"] >= 0 for c in consumers.values())
    assert body["leader"]["identifier"] == "sched-7" and body["leader"]["epoch"] == 7
    assert before <= body["leader"]["since"] <= redis_now_ms(r)
    assert 30 <= body["oldestOverdueMs"] <= redis_now_ms(r) - overdue_at


def test_stats_has_no_leader_once_promote_calls_stop(client, h, store, r, ks):
    h.run(store.promote(1))
    assert client.get(f"{V1}/stats").json()["leader"] is not None
    r.pexpire(ks.leader, 1)  # as if the TTL ran out without another promote call
    wait_for_redis_time(r, redis_now_ms(r) + 5)
    assert client.get(f"{V1}/stats").json()["leader"] is None


# --- auth ------------------------------------------------------------------------------------

LIFECYCLE_ROUTES = [
    ("GET", f"{V1}/messages/{UUID}"),
    ("DELETE", f"{V1}/messages/{UUID}"),
    ("PATCH", f"{V1}/messages/{UUID}"),
    ("POST", f"{V1}/save-messages"),
    ("GET", f"{V1}/dead"),
    ("DELETE", f"{V1}/dead"),
    ("POST", f"{V1}/dead/replay"),
    ("POST", f"{V1}/dead/{UUID}/replay"),
    ("DELETE", f"{V1}/dead/{UUID}"),
    ("GET", f"{V1}/stats"),
    ("GET", f"{V1}/openapi.json"),
]


@pytest.fixture
def token_client(settings: Settings, redis_client: redis.Redis) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(**{**_fields(settings), "api_token": TOKEN}))) as c:
        yield c


def _fields(settings: Settings) -> dict[str, object]:
    return {f: getattr(settings, f) for f in settings.__dataclass_fields__}


@pytest.mark.parametrize(("method", "path"), LIFECYCLE_ROUTES)
def test_every_lifecycle_route_needs_the_token_when_one_is_set(
    token_client, r, prefix, method, path
):
    response = token_client.request(method, path)
    assert_error(response, 401, "Authorization")
    assert response.headers["www-authenticate"] == "Bearer"
    wrong = token_client.request(method, path, headers={"authorization": "Bearer nope"})
    assert wrong.status_code == 401
    right = token_client.request(method, path, headers={"authorization": f"Bearer {TOKEN}"})
    assert right.status_code != 401
    assert list(r.scan_iter(match=f"*{prefix}*")) == []


# --- Redis unreachable -----------------------------------------------------------------------


@pytest.fixture
def unreachable_client(prefix: str) -> Iterator[TestClient]:
    from tests.servers import free_port

    settings = Settings.from_env({}, redis_url=f"redis://127.0.0.1:{free_port()}/0", prefix=prefix)
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.mark.parametrize(("method", "path"), LIFECYCLE_ROUTES[:-1])
def test_every_lifecycle_route_is_a_json_503_when_redis_is_unreachable(
    unreachable_client, method, path
):
    kwargs: dict[str, object] = {}
    if method in ("PATCH", "POST") and "save-messages" in path:
        kwargs = {"json": [{"message": "x", "runAt": 0}]}
    elif method == "PATCH":
        kwargs = {"json": {"runAt": 5}}
    started = time.monotonic()
    response = unreachable_client.request(method, path, **kwargs)
    assert_error(response, 503, None)
    assert time.monotonic() - started < 2.0


# --- metrics ---------------------------------------------------------------------------------


def test_requests_to_a_path_with_a_uuid_are_counted_under_the_route_template(client):
    client.get(f"{V1}/messages/{UUID}")
    client.get(f"{V1}/messages/{OTHER}")
    text = client.get("/metrics").text
    assert 'route="/api/v1/messages/{uuid}",status="404"' in text
    assert UUID not in text and OTHER not in text


def test_a_message_whose_stored_record_is_corrupt_answers_a_json_500_naming_the_uuid(
    client: TestClient, redis_client: redis.Redis, prefix: str
) -> None:
    uid = str(uuidlib.uuid4())
    redis_client.hset(Keyspace(prefix).messages, uuid_key(uid), b"\x00garbage")
    answer = client.get(f"/api/v1/messages/{uid}")
    assert answer.status_code == 500
    assert answer.json()["field"] == "uuid"
    assert "corrupt" in answer.json()["error"]


def test_an_unexpected_error_on_a_lifecycle_route_is_a_json_500(
    settings: Settings, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = create_app(settings)
    with TestClient(app, raise_server_exceptions=False) as test_client:

        async def broken(*args, **kwargs):
            raise ZeroDivisionError

        monkeypatch.setattr(app.state.lifecycle, "stats", broken)
        answer = test_client.get("/api/v1/stats")
    assert answer.status_code == 500
    assert answer.json() == {"error": "internal error", "field": None}
