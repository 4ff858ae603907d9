"""The schedule routes in-process (TestClient runs the lifespan) against the real Redis:
create, replace, idempotent PUT, paging, show, delete, pause, resume, every refusal with
its field, the token, /stats."""

from __future__ import annotations

import asyncio
import itertools
import warnings
from collections.abc import Iterator

import pytest
import redis

from app.http.app import create_app
from app.recurrence import occurrence_uuid
from app.settings import Settings
from app.store import open_client
from app.store.keys import Keyspace
from app.store.partitions import Partitions
from app.store.schedules import Schedules
from election.gate import LeadershipGate, Role
from election.materialiser import Materialiser

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", "Using `httpx` with `starlette.testclient`", UserWarning)
    from starlette.testclient import TestClient

BASE = "/api/v1/schedules"
TOKEN = "s3cret-token-0123456789"
MAX_MESSAGE = 100


@pytest.fixture
def settings(redis_url: str, prefix: str) -> Settings:
    return Settings.from_env(
        {},
        redis_url=redis_url,
        prefix=prefix,
        max_message_bytes=MAX_MESSAGE,
        schedule_min_interval=2.0,
    )


@pytest.fixture
def client(settings: Settings, redis_client: redis.Redis) -> Iterator[TestClient]:
    with TestClient(create_app(settings), raise_server_exceptions=True) as test_client:
        yield test_client


def put(client, name, **body):
    return client.put(f"{BASE}/{name}", json={"message": "hello", **body})


def materialise(settings: Settings) -> None:
    """One pass of a leader, as the scheduler's task makes it."""

    async def once():
        c = await open_client(settings)
        try:
            gate = LeadershipGate()
            gate.set_role(Role.LEADER, 1)
            await Materialiser(Schedules(Partitions(c, settings)), gate).materialise(1)
        finally:
            await c.aclose()

    asyncio.run(once())


def test_put_creates_201_then_the_same_put_is_200_unchanged_and_another_replaces(client):
    first = put(client, "daily", cron="0 7 * * *", timezone="Europe/Berlin")
    assert first.status_code == 201, first.text
    body = first.json()
    assert body["outcome"] == "created"
    assert (body["cron"], body["timezone"], body["paused"]) == ("0 7 * * *", "Europe/Berlin", False)
    again = put(client, "daily", cron="0  7 * * *", timezone="Europe/Berlin")
    assert again.status_code == 200
    assert again.json()["outcome"] == "unchanged"
    assert again.json()["generation"] == body["generation"]
    other = put(client, "daily", cron="0 8 * * *", timezone="Europe/Berlin")
    assert other.status_code == 200
    assert other.json()["outcome"] == "replaced"
    assert other.json()["generation"] > body["generation"]


def test_get_shows_the_definition_the_next_occurrences_and_the_produced_messages(client, settings):
    assert put(client, "tick", every="2s").status_code == 201
    materialise(settings)
    got = client.get(f"{BASE}/tick")
    assert got.status_code == 200
    body = got.json()
    assert body["every"] == "2s"
    nxt = body["next"]
    assert len(nxt) == 5 and all(b - a == 2000 for a, b in itertools.pairwise(nxt))
    produced = body["produced"]
    assert len(produced) == 5
    assert produced[0]["runAt"] == body["materialisedThrough"]
    assert produced[0]["uuid"] == occurrence_uuid(
        "tick", body["generation"], body["materialisedThrough"]
    )
    assert {p["state"] for p in produced} <= {"scheduled", "queued"}
    status = client.get(f"/api/v1/messages/{produced[0]['uuid']}")
    assert status.status_code == 200 and status.json()["state"] == "scheduled"


def test_list_pages_by_name_with_a_cursor(client):
    names = [f"s{i:02d}" for i in range(7)]
    for name in reversed(names):
        assert put(client, name, every="1h").status_code == 201
    seen, cursor = [], None
    while True:
        params = {"limit": 3} | ({"cursor": cursor} if cursor else {})
        page = client.get(BASE, params=params)
        assert page.status_code == 200
        seen += [item["name"] for item in page.json()["items"]]
        cursor = page.json()["next"]
        if cursor is None:
            break
    assert seen == names


def test_delete_then_get_is_404_and_a_second_delete_is_404(client):
    put(client, "gone", every="1h")
    deleted = client.delete(f"{BASE}/gone")
    assert deleted.status_code == 200 and deleted.json() == {"name": "gone", "deleted": True}
    assert client.get(f"{BASE}/gone").status_code == 404
    again = client.delete(f"{BASE}/gone")
    assert again.status_code == 404 and again.json()["field"] == "name"


def test_delete_cancels_the_produced_messages_that_are_not_yet_due(client, settings):
    put(client, "tick", every="2s")
    materialise(settings)
    produced = client.get(f"{BASE}/tick").json()["produced"]
    assert client.delete(f"{BASE}/tick").status_code == 200
    states = {client.get(f"/api/v1/messages/{p['uuid']}").json()["state"] for p in produced}
    assert states == {"cancelled"}


def test_pause_and_resume_change_the_generation_and_repeat_as_no_ops(client):
    created = put(client, "p", every="1h").json()
    paused = client.post(f"{BASE}/p/pause")
    assert paused.status_code == 200 and paused.json()["paused"] is True
    assert paused.json()["generation"] > created["generation"]
    again = client.post(f"{BASE}/p/pause")
    assert again.json()["generation"] == paused.json()["generation"]
    assert client.get(f"{BASE}/p").json()["next"] == []
    resumed = client.post(f"{BASE}/p/resume")
    assert resumed.status_code == 200 and resumed.json()["paused"] is False
    assert client.post(f"{BASE}/missing/pause").status_code == 404


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({"cron": "61 * * * *"}, 422, "cron"),
        ({"cron": "* * *"}, 422, "cron"),
        ({"cron": "* * * * *", "timezone": "Nowhere/Land"}, 422, "timezone"),
        ({"every": "1s"}, 422, "every"),  # below the floor of 2 s set above
        ({"every": "soon"}, 422, "every"),
        ({"every": "1h", "startAt": 2000, "endAt": 1000}, 422, "endAt"),
        ({"every": "1h", "startAt": -5}, 422, "startAt"),
        ({"every": "1h", "message": "x" * (MAX_MESSAGE + 1)}, 413, "message"),
        ({"every": "1h", "cron": "* * * * *"}, 422, "every"),
        ({}, 422, "cron"),
        ({"every": "1h", "target": "https://example.com"}, 422, "target"),
        ({"every": "1h", "paused": "yes"}, 422, "paused"),
    ],
)
def test_a_bad_definition_is_refused_naming_its_field(client, body, status, field):
    got = put(client, "bad", **body)
    assert got.status_code == status, got.text
    assert got.json()["field"] == field
    assert set(got.json()) == {"error", "field"}
    assert client.get(f"{BASE}/bad").status_code == 404


@pytest.mark.parametrize("name", ["-x", "a%20b", "x" * 129, "%C3%BC", "a!"])
def test_a_bad_name_is_refused_with_422(client, name):
    got = client.put(f"{BASE}/{name}", json={"message": "m", "every": "1h"})
    assert got.status_code == 422 and got.json()["field"] == "name"


def test_a_bad_limit_or_cursor_is_refused(client):
    assert client.get(BASE, params={"limit": 0}).json()["field"] == "limit"
    assert client.get(BASE, params={"limit": "1001"}).json()["field"] == "limit"
    assert client.get(BASE, params={"cursor": "/../"}).json()["field"] == "cursor"


def test_not_json_and_malformed_bodies_are_refused(client):
    assert (
        client.put(
            f"{BASE}/x", content=b"{", headers={"content-type": "application/json"}
        ).status_code
        == 400
    )
    assert (
        client.put(f"{BASE}/x", content=b"{}", headers={"content-type": "text/plain"}).status_code
        == 415
    )


def test_a_stored_definition_this_release_cannot_read_is_named_and_mended_by_put_or_delete(
    client, settings, redis_client
):
    """Written by another release or by hand: the list still pages the others and names
    it, reading or pausing it answers 409 saying what to do, and PUT or DELETE mends it."""
    keys = Keyspace(settings.prefix)
    for name in ("a-good", "b-broken", "c-broken", "d-good"):
        assert put(client, name, every="1h").status_code == 201
    for name in ("b-broken", "c-broken"):
        redis_client.hset(keys.schedules, name, b"\xff not a definition")
    page = client.get(BASE, params={"limit": 3})
    assert page.status_code == 200
    assert [i["name"] for i in page.json()["items"]] == ["a-good"]
    assert page.json()["unreadable"] == ["b-broken", "c-broken"]
    rest = client.get(BASE, params={"cursor": page.json()["next"]}).json()
    assert [i["name"] for i in rest["items"]] == ["d-good"] and rest["unreadable"] == []
    for method, path in [("GET", f"{BASE}/b-broken"), ("POST", f"{BASE}/b-broken/pause")]:
        refused = client.request(method, path)
        assert refused.status_code == 409, refused.text
        assert refused.json()["field"] == "name"
        assert "cannot read" in refused.json()["error"] and "DELETE" in refused.json()["error"]
    replaced = put(client, "b-broken", every="2h")
    assert replaced.status_code == 200 and replaced.json()["outcome"] == "replaced"
    assert client.get(f"{BASE}/b-broken").json()["every"] == "2h"
    assert client.delete(f"{BASE}/c-broken").status_code == 200
    assert client.get(f"{BASE}/c-broken").status_code == 404
    assert client.get(BASE).json()["unreadable"] == []
    assert redis_client.hlen(keys.schedule_retired) == 0, "nothing left to nag the leader"


def test_stats_counts_the_schedules(client):
    assert "schedules" not in client.get("/api/v1/stats").json()  # as before schedules
    put(client, "a", every="1h")
    put(client, "b", every="1h")
    assert client.get("/api/v1/stats").json()["schedules"] == 2


def test_the_schedule_routes_need_the_token_when_one_is_set(redis_url, prefix, redis_client):
    settings = Settings.from_env({}, redis_url=redis_url, prefix=prefix, api_token=TOKEN)
    with TestClient(create_app(settings)) as c:
        for method, path in [
            ("PUT", f"{BASE}/a"),
            ("GET", BASE),
            ("GET", f"{BASE}/a"),
            ("DELETE", f"{BASE}/a"),
            ("POST", f"{BASE}/a/pause"),
            ("POST", f"{BASE}/a/resume"),
        ]:
            assert c.request(method, path, json={"message": "m", "every": "1h"}).status_code == 401
        ok = c.put(
            f"{BASE}/a",
            json={"message": "m", "every": "1h"},
            headers={"authorization": f"Bearer {TOKEN}"},
        )
        assert ok.status_code == 201
