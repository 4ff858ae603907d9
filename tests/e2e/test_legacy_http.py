"""EAT_LEGACY_HTTP: the original service's clients, unchanged, against a real api process.

The original's end-to-end tests (mocha + chai-http) post a message 10 s ahead,
one 60 s ahead and one 60 s in the past, and compare each whole answer with
``200 {"message": {"message", "runAt", "uuid"}, "ok": true}``. So do these,
through a running cluster, and then wait for every message to be echoed at its
time (the 60 s one too: that is the scenario).
"""

from __future__ import annotations

import uuid as uuidlib
from collections.abc import Callable

import httpx
import pytest
import redis

from app.store.keys import Keyspace
from tests.e2e.harness import Cluster, assert_echoed_exactly_once, now_ms

pytestmark = pytest.mark.e2e

PATH = "/api/v1/save-message"
LATE_MS = 1000  # a healthy cluster echoes well within this after runAt


def original(message: str, run_at: int, uuid: str) -> dict:
    """The original service's answer, key for key."""
    return {"message": {"message": message, "runAt": run_at, "uuid": uuid}, "ok": True}


def test_with_legacy_http_every_answer_is_the_original_services_and_each_message_runs_on_time(
    cluster: Callable[..., Cluster], redis_client: redis.Redis, prefix: str
) -> None:
    c = cluster(schedulers=1, workers=1, env={"EAT_LEGACY_HTTP": "true"})
    api = httpx.Client(base_url=c.apis[0].base_url, timeout=10)
    start = now_ms()
    cases = [
        ("in ten seconds", start + 10_000, str(uuidlib.uuid4())),
        ("in a minute", start + 60_000, str(uuidlib.uuid4())),
        ("a minute ago", start - 60_000, str(uuidlib.uuid4())),
    ]
    with api:
        for message, run_at, uuid in cases:
            answer = api.post(PATH, json={"message": message, "runAt": run_at, "uuid": uuid})
            assert answer.status_code == 200
            assert answer.json() == original(message, run_at, uuid)
            # Key order too: a client may compare the serialised text.
            assert list(answer.json()) == ["message", "ok"]
            assert list(answer.json()["message"]) == ["message", "runAt", "uuid"]

        # Without a uuid: the answer names the uuid the message is stored under.
        anonymous = api.post(PATH, json={"message": "no uuid", "runAt": start + 10_000})
        assert anonymous.status_code == 200
        stored_as = anonymous.json()["message"]["uuid"]
        assert anonymous.json() == original("no uuid", start + 10_000, stored_as)
        assert api.get(f"/api/v1/messages/{stored_as}").json()["state"] == "scheduled"

        # A duplicate answers the same shape (and changes nothing).
        message, run_at, uuid = cases[0]
        again = api.post(PATH, json={"message": message, "runAt": run_at, "uuid": uuid})
        assert (again.status_code, again.json()) == (200, original(message, run_at, uuid))

        # Errors keep their JSON shape.
        refused = api.post(PATH, json={"message": "no runAt"})
        assert refused.status_code == 422
        assert refused.json() == {"error": "field is required: runAt", "field": "runAt"}

    expected = {uuid for _, _, uuid in cases} | {stored_as}
    c.wait_until(
        lambda: expected <= {e["uuid"] for e in c.all_echoes()},
        "every message echoed (the last one a minute after posting)",
        80,
    )
    echoes = c.all_echoes()
    assert_echoed_exactly_once(expected, echoes)
    by_uuid = {e["uuid"]: e for e in echoes}
    for _message, run_at, uuid in cases:
        handled = by_uuid[uuid]["handledAt"]
        assert handled >= run_at, f"{uuid} ran early"
        assert handled - max(run_at, start) < LATE_MS, f"{uuid} ran {handled - run_at} ms late"
    assert redis_client.zcard(Keyspace(prefix).delayed) == 0


def test_without_legacy_http_the_answers_are_unchanged(cluster: Callable[..., Cluster]) -> None:
    c = cluster(schedulers=1, workers=1)
    uuid = str(uuidlib.uuid4())
    run_at = now_ms() + 60_000
    with httpx.Client(base_url=c.apis[0].base_url, timeout=10) as api:
        first = api.post(PATH, json={"message": "m", "runAt": run_at, "uuid": uuid})
        again = api.post(PATH, json={"message": "m", "runAt": run_at, "uuid": uuid})
    assert (first.status_code, first.json()) == (
        201,
        {"uuid": uuid, "runAt": run_at, "state": "scheduled"},
    )
    assert (again.status_code, again.json()) == (
        200,
        {"uuid": uuid, "runAt": run_at, "state": "scheduled", "duplicate": True},
    )
