"""Generated hostile JSON for every JSON route and every legacy list, against the real
app, a real Redis and the real bridge: the class of bugs in test_hostile_input stays
closed.

Each example takes a valid message and makes it hostile one way: nested past
Python's recursion limit (or just deep), a repeated key (written plainly or with
``\\u`` escapes), a huge or fractional number, a lone surrogate (escaped, or as
raw bytes that are not UTF-8), or digits of another script. Every such body must
be answered with a 4xx JSON error (``{"error", "field"}``), or, by the bulk route,
with 200 and every item ``invalid``; it stores nothing, and the app answers the
next request. Every such legacy item, on any of the three lists, must be
dead-lettered with its bytes and leave the lists, the bridge still running and
still accepting the valid item pushed after it.

Bounded for CI: a fixed number of examples per test and a deadline per example;
the whole module takes a few seconds.
"""

from __future__ import annotations

import asyncio
import json
import uuid as uuidlib
import warnings
from collections.abc import Iterator
from datetime import timedelta

import pytest
import redis
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from app.http.app import create_app
from app.model import RUN_AT_MAX
from app.settings import Settings
from app.store.codec import uuid_key
from app.store.keys import Keyspace, LegacyLists
from election.bridge import RAW_KEEP, LegacyBridge
from election.gate import LeadershipGate, Role
from tests.aio import open_store
from tests.integration.test_hostile_input import (
    BULK,
    FAR,
    JSON,
    SAVE,
    UUID,
    V1,
    assert_json_error,
    snapshot,
)
from tests.wait import async_wait_until

with warnings.catch_warnings():
    # Starlette's test client asks for httpx2 at import; the project's test extra has httpx.
    warnings.filterwarnings("ignore", "Using `httpx` with `starlette.testclient`", UserWarning)
    from starlette.testclient import TestClient

EXAMPLES = 40  # per test
FUZZ = hsettings(
    max_examples=EXAMPLES,
    deadline=timedelta(seconds=10),  # per example; generous for a shared CI machine
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,  # the app and Redis are meant to persist
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
# Past Python's recursion limit (msgspec and json stop there) even for a value the legacy
# parser skips, and a shallow depth the API refuses all the same.
DEEP = [3_000, 20_000]
SHALLOW = [1, 40]


@pytest.fixture
def settings(redis_url: str, prefix: str, redis_client: redis.Redis) -> Settings:
    # redis_client: this test's keys are deleted afterwards (the lists carry the prefix).
    tag = "{" + prefix + "}"
    return Settings.from_env(
        {},
        redis_url=redis_url,
        prefix=prefix,
        max_batch_bytes=400_000,
        legacy_queue=f"{tag}:Queue",
        legacy_delayed=f"{tag}:QueueDelayed",
        legacy_in_flight=f"{tag}:QueueDead",
    )


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    # Exceptions become the 500 a real server would send, which the assertions refuse.
    with TestClient(create_app(settings), raise_server_exceptions=False) as test_client:
        yield test_client


# --- strategies ------------------------------------------------------------------------------

Member = tuple[bytes, bytes]  # a name and a value, each as written in JSON

other_digits = st.characters(categories=("Nd",), exclude_characters="0123456789")
plain_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=12)


@st.composite
def key(draw: st.DrawFn, name: str) -> bytes:
    """A member name as JSON: mostly plain, else letters as ``\\u`` escapes (either case)."""
    if draw(st.integers(0, 2)):
        return b'"%s"' % name.encode()
    letters = [
        f"\\u{ord(c):04{'x' if draw(st.booleans()) else 'X'}}" if draw(st.booleans()) else c
        for c in name
    ]
    return b'"' + "".join(letters).encode() + b'"'


@st.composite
def valid_value(draw: st.DrawFn, name: str) -> bytes:
    if name == "message":
        return json.dumps(draw(plain_text), ensure_ascii=draw(st.booleans())).encode()
    if name == "runAt":
        return b"%d" % draw(st.integers(min_value=0, max_value=RUN_AT_MAX))
    return json.dumps(str(draw(st.uuids()))).encode()


def nesting(depth: int, as_objects: bool) -> bytes:
    if as_objects:
        return b'{"a": ' * depth + b"1" + b"}" * depth
    return b"[" * depth + b"]" * depth


@st.composite
def hostile_members(draw: st.DrawFn, names: tuple[str, ...]) -> list[Member] | bytes:
    """The members of a message made hostile one way, or a whole hostile body (bytes).

    Every way is refused by the API and the legacy parser alike: only a value nested past
    the recursion limit is put under a name that is not a field (the legacy parser ignores
    such names otherwise).
    """
    members = [(draw(key(name)), draw(valid_value(name))) for name in names]
    target = draw(st.sampled_from(names))
    at = names.index(target)
    way = draw(st.sampled_from(["deep", "repeat", "huge", "surrogate", "digits"]))
    if way == "deep":
        where = draw(st.sampled_from(["field", "other name", "whole body"]))
        depth = draw(st.sampled_from(DEEP if where == "other name" else DEEP + SHALLOW))
        deep = nesting(depth, draw(st.booleans()))
        if where == "whole body":
            return deep
        if where == "other name":
            members.insert(draw(st.integers(0, len(members))), (b'"x"', deep))
        else:
            members[at] = (members[at][0], deep)
    elif way == "repeat":
        value = draw(valid_value(target)) if draw(st.booleans()) else members[at][1]
        members.insert(draw(st.integers(0, len(members))), (draw(key(target)), value))
    elif way == "huge":
        index = names.index("runAt")
        members[index] = (members[index][0], draw(huge_number))
    elif way == "surrogate":
        index = names.index("message" if "message" in names else target)
        members[index] = (members[index][0], draw(lone_surrogate))
    else:  # other digits: a message of them is valid, a runAt or a uuid is not
        index = names.index("runAt" if target == "message" else target)
        members[index] = (members[index][0], draw(other_digit_value(names[index])))
    return members


huge_number = st.sampled_from(
    [
        b"1" + b"0" * 19,  # past 64 bits
        b"1" + b"0" * 400,
        b"9" * 5000,  # past int()'s 4,300 digits
        b"-1" + b"0" * 30,
        b"-1",
        b"253402300800000",  # year 10000
        b"1e400",
        b"-1e400",
        b"1.5e300",
        b"1E2",
        b"0.0",
        b"5.5",
    ]
)
lone_surrogate = st.sampled_from(
    [
        b'"\\ud800"',
        b'"a\\udc00b"',
        b'"\\ud800\\u0041"',
        b'"\\udfff\\ud800"',
        b'"\\uD83D"',
        b'"\xed\xa0\x80"',  # a surrogate encoded as UTF-8: not UTF-8
        b'"\xed\xbf\xbf tail"',
    ]
)


@st.composite
def other_digit_value(draw: st.DrawFn, name: str) -> bytes:
    """A value in digits of another script: a string, or bare (not JSON at all)."""
    if name == "uuid":
        text = str(draw(st.uuids(version=4)))  # a version-4 uuid always has a digit
        swapped = "".join(
            draw(other_digits) if c.isascii() and c in "0123456789" else c for c in text
        )
        return json.dumps(swapped, ensure_ascii=draw(st.booleans())).encode()
    digits = "".join(draw(st.lists(other_digits, min_size=1, max_size=15)))
    if draw(st.booleans()):
        return digits.encode()
    return json.dumps(digits, ensure_ascii=draw(st.booleans())).encode()


def render(members: list[Member] | bytes) -> bytes:
    if isinstance(members, bytes):
        return members
    return b"{" + b", ".join(name + b": " + value for name, value in members) + b"}"


MESSAGE = ("message", "runAt", "uuid")
hostile_message = st.permutations(MESSAGE).flatmap(
    lambda names: hostile_members(tuple(names)).map(render)
)
hostile_reschedule = hostile_members(("runAt",)).map(render)


@st.composite
def hostile_bulk(draw: st.DrawFn) -> bytes:
    """A hostile envelope, or an array (maybe in an envelope) of hostile messages."""
    if draw(st.booleans()):
        items = draw(st.lists(hostile_message, min_size=1, max_size=3))
        array = b"[" + b", ".join(items) + b"]"
        return b'{"messages": ' + array + b"}" if draw(st.booleans()) else array
    inner = draw(
        st.sampled_from([b"[]", b"null", b"1e400", b'"\\ud800"', b'"\xed\xa0\x80"'])
        | other_digit_value("messages")
        | st.sampled_from(DEEP + SHALLOW).map(lambda depth: nesting(depth, False))
    )
    if inner == b"[]" or draw(st.booleans()):
        return b'{"messages": [], ' + draw(key("messages")) + b": " + inner + b"}"
    return b'{"messages": ' + inner + b"}"


# --- the API ---------------------------------------------------------------------------------


def assert_refused_and_serving(client: TestClient, r: redis.Redis, prefix: str, response) -> None:
    if response.status_code == 200 and response.request.url.path == BULK:
        body = response.json()
        assert body["results"] and all(x["status"] == "invalid" for x in body["results"]), body
        assert body["accepted"] == body["duplicates"] == 0, body
    else:
        assert_json_error(response)
    # Still serving, Redis client and all.
    assert client.get(f"{V1}/stats").status_code == 200


@FUZZ
@given(body=hostile_message)
def test_hostile_json_posted_to_save_message_is_a_4xx_json_error_storing_nothing(
    client, redis_client, prefix, body
):
    before = snapshot(redis_client, prefix)
    response = client.post(SAVE, content=body, headers=JSON)
    assert_refused_and_serving(client, redis_client, prefix, response)
    assert snapshot(redis_client, prefix) == before


@FUZZ
@given(body=hostile_bulk())
def test_hostile_json_posted_to_save_messages_stores_nothing(client, redis_client, prefix, body):
    before = snapshot(redis_client, prefix)
    response = client.post(BULK, content=body, headers=JSON)
    assert_refused_and_serving(client, redis_client, prefix, response)
    assert snapshot(redis_client, prefix) == before


@pytest.fixture
def scheduled(client: TestClient) -> str:
    response = client.post(SAVE, json={"message": "target", "runAt": FAR, "uuid": UUID})
    assert response.status_code == 201, response.text
    return UUID


@FUZZ
@given(body=hostile_reschedule)
def test_hostile_json_patched_onto_a_message_is_a_4xx_json_error_changing_nothing(
    client, redis_client, prefix, scheduled, body
):
    before = snapshot(redis_client, prefix)
    response = client.patch(f"{V1}/messages/{scheduled}", content=body, headers=JSON)
    assert_refused_and_serving(client, redis_client, prefix, response)
    assert snapshot(redis_client, prefix) == before


@st.composite
def other_digit_uuid(draw: st.DrawFn) -> str:
    text = str(draw(st.uuids(version=4)))
    return "".join(draw(other_digits) if c in "0123456789" else c for c in text)


@FUZZ
@given(
    cursor=st.tuples(other_digits, st.text("0123456789", max_size=3), other_digits).map(
        lambda parts: f"{parts[0]}{parts[1]}-{parts[2]}"
    ),
    limit=st.lists(other_digits, min_size=1, max_size=4).map("".join),
    uuid=other_digit_uuid(),
)
def test_digits_of_other_scripts_in_a_query_or_a_path_are_a_422(
    client, redis_client, prefix, cursor, limit, uuid
):
    before = snapshot(redis_client, prefix)
    assert_json_error(client.get(f"{V1}/dead", params={"cursor": cursor}), 422, "cursor")
    assert_json_error(client.get(f"{V1}/dead", params={"limit": limit}), 422, "limit")
    for method, path in (
        ("GET", f"{V1}/messages/{uuid}"),
        ("DELETE", f"{V1}/messages/{uuid}"),
        ("POST", f"{V1}/dead/{uuid}/replay"),
        ("DELETE", f"{V1}/dead/{uuid}"),
    ):
        assert_json_error(client.request(method, path), 422, "uuid")
    response = client.patch(f"{V1}/messages/{uuid}", json={"runAt": 1})
    assert_json_error(response, 422, "uuid")
    assert snapshot(redis_client, prefix) == before


# --- the legacy bridge -----------------------------------------------------------------------


def leading_gate() -> LeadershipGate:
    gate = LeadershipGate()
    gate.set_role(Role.LEADER, 1)
    return gate


@FUZZ
@given(
    items=st.lists(hostile_message, min_size=1, max_size=3),
    where=st.sampled_from(["queue", "delayed", "in_flight"]),
)
def test_hostile_legacy_items_are_dead_lettered_and_the_bridge_runs_on(
    settings, redis_client, items, where
):
    lists = LegacyLists.of(settings)
    keys = Keyspace(settings.prefix)
    redis_client.delete(keys.dead, keys.messages, keys.stream, keys.delayed)
    valid_uuid = str(uuidlib.uuid4())
    valid = json.dumps({"message": "after", "runAt": 0, "uuid": valid_uuid}).encode()
    # In flight: what a crashed leader left, re-driven first when the bridge starts.
    redis_client.lpush(getattr(lists, where), *items)

    async def scenario() -> None:
        async with open_store(settings) as store:
            bridge = LegacyBridge(store, leading_gate(), lists)
            task = asyncio.create_task(bridge.run(), name="bridge")
            try:
                await async_wait_until(
                    lambda: bridge.stats.malformed == len(items) or task.done(),
                    "the hostile items dead-lettered",
                    10.0,
                )
                assert not task.done(), "the bridge ended"
                await store.client.lpush(lists.queue, valid)
                await async_wait_until(
                    lambda: bridge.stats.accepted == 1 or task.done(),
                    "the valid item after them accepted",
                    10.0,
                )
                assert not task.done(), "the bridge ended"
            finally:
                bridge.stop()
                await asyncio.wait_for(task, 5.0)

    asyncio.run(scenario())
    assert [redis_client.llen(name) for name in (lists.queue, lists.delayed, lists.in_flight)] == [
        0,
        0,
        0,
    ]
    dead = [fields for _, fields in redis_client.xrange(keys.dead)]
    assert sorted(entry[b"raw"] for entry in dead) == sorted(item[:RAW_KEEP] for item in items)
    assert all(entry[b"reason"] for entry in dead)
    # Nothing of the hostile items was stored: only the valid one is.
    assert list(redis_client.hkeys(keys.messages)) == [uuid_key(valid_uuid)]
