"""A message's webhook ``target`` at the api (save-message, bulk, lookup, dead letters) and
at the legacy bridge: the allowlist and the SSRF rules refuse with 422 ``field: "target"``
and store nothing.

Names resolve through a table injected into the api (``TargetPolicy``'s resolver seam):
no test depends on this machine's DNS or hosts file.
"""

from __future__ import annotations

import asyncio
import json
import warnings
from collections.abc import Iterator

import pytest
import redis

from app.http.app import create_app
from app.settings import Settings
from app.store.codec import pack_body, record_body, uuid_key
from app.store.keys import Keyspace, LegacyLists
from app.targets import TargetPolicy
from election.bridge import LegacyBridge
from election.gate import LeadershipGate, Role
from tests.aio import open_store

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", "Using `httpx` with `starlette.testclient`", UserWarning)
    from starlette.testclient import TestClient

URL = "/api/v1/save-message"
FUTURE = 253402300799999
UUID = "123e4567-e89b-12d3-a456-426614174000"

NAMES = {
    "hooks.example.com": ["93.184.216.34"],
    "internal.example.com": ["10.0.0.7"],  # a name that resolves to a private address
    "mixed.example.com": ["93.184.216.35", "192.168.1.1"],
    "mapped.example.com": ["::ffff:127.0.0.1"],
    "ula.example.com": ["fd12:3456::1"],
    "named.internal": ["10.1.2.3"],
}


async def table(host: str, port: int) -> list[str]:
    try:
        return list(NAMES[host])
    except KeyError:
        raise OSError(f"no such name: {host}") from None


ALLOW = "*.example.com, named.internal, http://127.0.0.1:9000"


@pytest.fixture
def settings(redis_url: str, prefix: str) -> Settings:
    return Settings.from_env(
        {},
        redis_url=redis_url,
        prefix=prefix,
        webhook_url="https://default.example.net/hook",
        webhook_allow=ALLOW,
    )


@pytest.fixture
def client(settings: Settings, redis_client: redis.Redis) -> Iterator[TestClient]:
    app = create_app(settings, targets=TargetPolicy.of(settings, table))
    with TestClient(app, raise_server_exceptions=True) as test_client:
        yield test_client


def post(client: TestClient, payload: object):
    return client.post(
        URL, content=json.dumps(payload).encode(), headers={"content-type": "application/json"}
    )


def stored(r: redis.Redis, prefix: str) -> int:
    return r.hlen(Keyspace(prefix).messages)


REFUSED = [
    ("http://127.0.0.1/x", "not allowed"),  # loopback, not in the list
    ("http://169.254.169.254/latest/meta-data/", "not allowed"),
    ("http://[::1]/", "not allowed"),
    ("http://internal.example.com/x", "10.0.0.7 is a private address"),
    ("https://mixed.example.com/x", "192.168.1.1 is a private address"),
    ("http://mapped.example.com/x", "is a loopback address"),
    ("http://ula.example.com/x", "fd12:3456::1 is a private address"),
    ("http://nowhere.example.com/x", "does not resolve"),
    ("ftp://hooks.example.com/x", "http:// or https://"),
    ("file:///etc/passwd", "http:// or https://"),
    ("https://user:pw@hooks.example.com/x", "user:password@"),
    ("https://hooks.example.com/" + "a" * 2100, "the limit is 2048"),
    ("http://127.0.0.1:9001/x", "not allowed"),  # the allowed origin is port 9000
    ("https://example.com.evil.net/x", "not allowed"),
]


@pytest.mark.parametrize(("target", "why"), REFUSED)
def test_a_refused_target_is_422_naming_target_and_nothing_is_stored(
    client, redis_client, prefix, target: str, why: str
):
    response = post(client, {"message": "m", "runAt": FUTURE, "uuid": UUID, "target": target})
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["field"] == "target"
    assert why in body["error"]
    assert stored(redis_client, prefix) == 0


ALLOWED = [
    "https://hooks.example.com/in?x=1",
    "http://named.internal/in",  # named explicitly: its private address is the operator's choice
    "http://127.0.0.1:9000/in",  # an origin named explicitly: loopback allowed
    "https://default.example.net/hook",  # the default URL: always allowed
]


@pytest.mark.parametrize("target", ALLOWED)
def test_an_allowed_target_is_stored_and_the_lookup_shows_it(client, target: str):
    response = post(client, {"message": "m", "runAt": FUTURE, "uuid": UUID, "target": target})
    assert response.status_code == 201, response.text
    got = client.get(f"/api/v1/messages/{UUID}").json()
    assert got["target"] == target
    assert got["state"] == "scheduled"


def test_a_message_without_target_is_stored_as_before_and_its_lookup_has_no_target(
    client, redis_client, prefix
):
    assert post(client, {"message": "plain", "runAt": FUTURE, "uuid": UUID}).status_code == 201
    assert "target" not in client.get(f"/api/v1/messages/{UUID}").json()
    # The record's body is the message's bytes alone: the format of a message without a target.
    packed = redis_client.hget(Keyspace(prefix).messages, uuid_key(UUID))
    assert record_body(packed) == b"plain"


def test_a_due_message_with_a_target_shows_it_while_queued(client):
    response = post(client, {"message": "m", "runAt": 0, "uuid": UUID, "target": ALLOWED[0]})
    assert response.json()["state"] == "queued"
    assert client.get(f"/api/v1/messages/{UUID}").json()["target"] == ALLOWED[0]


def test_with_an_empty_allowlist_only_the_default_url_may_be_named(redis_url, prefix, redis_client):
    settings = Settings.from_env(
        {}, redis_url=redis_url, prefix=prefix, webhook_url="https://hooks.example.com/in"
    )
    app = create_app(settings, targets=TargetPolicy.of(settings, table))
    with TestClient(app) as client:
        refused = post(client, {"message": "m", "runAt": FUTURE, "target": ALLOWED[0]})
        assert refused.status_code == 422 and refused.json()["field"] == "target"
        assert "EAT_WEBHOOK_ALLOW is empty" in refused.json()["error"]
        default = {"message": "m", "runAt": FUTURE, "target": "https://hooks.example.com/in"}
        assert post(client, default).status_code == 201


def test_bulk_refuses_each_bad_target_as_an_invalid_item_and_stores_the_rest(
    client, redis_client, prefix
):
    items = [
        {"message": "a", "runAt": FUTURE, "target": "http://169.254.169.254/"},
        {"message": "b", "runAt": FUTURE, "target": ALLOWED[0]},
        {"message": "c", "runAt": FUTURE, "target": "gopher://hooks.example.com/"},
    ]
    response = client.post(
        "/api/v1/save-messages",
        content=json.dumps(items).encode(),
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["status"] for r in results] == ["invalid", "accepted", "invalid"]
    assert results[0]["field"] == results[2]["field"] == "target"
    assert stored(redis_client, prefix) == 1
    assert client.get(f"/api/v1/messages/{results[1]['uuid']}").json()["target"] == ALLOWED[0]


def test_a_repeated_target_key_is_refused(client, redis_client, prefix):
    body = b'{"message": "m", "runAt": 1, "target": "https://hooks.example.com/a", '
    body += b'"target": "http://169.254.169.254/"}'
    response = client.post(URL, content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert response.json()["field"] == "target"
    assert stored(redis_client, prefix) == 0


def test_the_dead_letter_list_shows_a_dead_messages_target(client, redis_client, prefix):
    ks = Keyspace(prefix)
    redis_client.xadd(
        ks.dead,
        {
            "u": uuid_key(UUID),
            "m": pack_body("m", ALLOWED[0]),
            "r": "1",
            "a": "1",
            "reason": "HTTP 410",
            "at": "1",
        },
    )
    (item,) = client.get("/api/v1/dead").json()["items"]
    assert item["message"] == "m"
    assert item["target"] == ALLOWED[0]


def test_a_legacy_item_with_a_refused_target_is_dead_lettered_with_the_reason(
    settings: Settings, redis_client: redis.Redis, prefix: str
):
    lists = LegacyLists(delayed=f"{prefix}:QD", queue=f"{prefix}:Q", in_flight=f"{prefix}:QF")
    bad = json.dumps({"message": "m", "runAt": 1, "uuid": UUID, "target": "http://10.0.0.1/x"})
    good_uuid = "223e4567-e89b-12d3-a456-426614174000"
    good = json.dumps({"message": "g", "runAt": 1, "uuid": good_uuid, "target": ALLOWED[0]})
    redis_client.lpush(lists.queue, bad, good)

    async def scenario() -> None:
        async with open_store(settings) as store:
            gate = LeadershipGate()
            gate.set_role(Role.LEADER, 1)
            bridge = LegacyBridge(store, gate, lists, targets=TargetPolicy.of(settings, table))
            assert await bridge.round() == 2

    try:
        asyncio.run(scenario())
        ks = Keyspace(prefix)
        (dead,) = redis_client.xrange(ks.dead)
        fields = dead[1]
        assert fields[b"u"] == uuid_key(UUID)
        assert fields[b"reason"].startswith(b"invalid target: target http://10.0.0.1:80 is not")
        # Kept with its target: a replay cannot send it to the default URL instead.
        assert fields[b"m"] == pack_body("m", "http://10.0.0.1/x")
        assert redis_client.hexists(ks.messages, uuid_key(good_uuid))
        assert not redis_client.hexists(ks.messages, uuid_key(UUID))
    finally:
        redis_client.delete(lists.queue, lists.delayed, lists.in_flight)


def test_the_dashboards_message_page_shows_the_target(client):
    target = "https://hooks.example.com/in?a=<b>"
    assert post(client, {"message": "m", "runAt": FUTURE, "uuid": UUID, "target": target})
    page = client.get(f"/ui/messages/{UUID}")
    assert page.status_code == 200
    assert '<code id="target">https://hooks.example.com/in?a=&lt;b&gt;</code>' in page.text
