"""The Starlette API in-process (TestClient runs the lifespan) against the real Redis."""

from __future__ import annotations

import json
import time
import uuid as uuidlib
import warnings
from collections.abc import Iterator

import pytest
import redis

from app.http.app import BODY_OVERHEAD, create_app
from app.settings import Settings
from app.store import StorageFormatError
from app.store.codec import uuid_key
from app.store.keys import Keyspace
from tests.servers import free_port

with warnings.catch_warnings():
    # Starlette's test client asks for httpx2 at import; the project's test extra has httpx.
    warnings.filterwarnings("ignore", "Using `httpx` with `starlette.testclient`", UserWarning)
    from starlette.testclient import TestClient

URL = "/api/v1/save-message"
MAX_MESSAGE = 100
UUID = "123e4567-e89b-12d3-a456-426614174000"
FUTURE = 253402300799999  # 9999-12-31: scheduled, never due during a test


@pytest.fixture
def settings(redis_url: str, prefix: str) -> Settings:
    return Settings.from_env({}, redis_url=redis_url, prefix=prefix, max_message_bytes=MAX_MESSAGE)


@pytest.fixture
def client(settings: Settings, redis_client: redis.Redis) -> Iterator[TestClient]:
    # redis_client: the test's keys are deleted afterwards.
    with TestClient(create_app(settings), raise_server_exceptions=True) as test_client:
        yield test_client


def keys_of(r: redis.Redis, prefix: str) -> list[bytes]:
    return sorted(r.scan_iter(match=f"*{prefix}*", count=1000))


def redis_state(r: redis.Redis, ks: Keyspace) -> dict[str, object]:
    return {
        "keys": sorted(r.scan_iter(match=f"*{ks.prefix}*", count=1000)),
        "messages": r.hgetall(ks.messages),
        "delayed": r.zrange(ks.delayed, 0, -1, withscores=True),
        "stream": r.xrange(ks.stream) if r.exists(ks.stream) else [],
        "seq": r.get(ks.sequence),
    }


def assert_error(response, status: int, field: str | None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error", "field"}
    assert isinstance(body["error"], str) and body["error"]
    assert body["field"] == field
    return body


def post_json(client: TestClient, payload: object, **headers: str):
    return client.post(
        URL,
        content=json.dumps(payload).encode(),
        headers={"content-type": "application/json", **headers},
    )


# --- acceptance ------------------------------------------------------------------------------


def test_first_acceptance_is_201_with_uuid_run_at_and_state(client, redis_client, prefix):
    response = post_json(client, {"message": "hi", "runAt": FUTURE, "uuid": UUID.upper()})
    assert response.status_code == 201
    assert response.json() == {"uuid": UUID, "runAt": FUTURE, "state": "scheduled"}
    ks = Keyspace(prefix)
    assert redis_client.hexists(ks.messages, uuid_key(UUID))
    assert redis_client.zcard(ks.delayed) == 1


def test_due_message_is_accepted_as_queued(client, redis_client, prefix):
    response = post_json(client, {"message": "now", "runAt": 0})
    assert response.status_code == 201
    body = response.json()
    assert body["state"] == "queued" and body["runAt"] == 0
    assert uuidlib.UUID(body["uuid"]).version == 4
    assert redis_client.xlen(Keyspace(prefix).stream) == 1


def test_json_subtype_content_type_is_accepted(client):
    response = client.post(
        URL,
        content=b'{"message": "x", "runAt": 0}',
        headers={"content-type": "application/vnd.api+json; charset=utf-8"},
    )
    assert response.status_code == 201


def test_repeated_uuid_is_200_with_the_same_record_and_changes_nothing(
    client, redis_client, prefix
):
    first = post_json(client, {"message": "hi", "runAt": FUTURE, "uuid": UUID})
    assert first.status_code == 201
    ks = Keyspace(prefix)
    before = redis_state(redis_client, ks)
    again = post_json(client, {"message": "changed", "runAt": 0, "uuid": UUID})
    assert again.status_code == 200
    body = again.json()
    assert {k: body[k] for k in ("uuid", "runAt", "state")} == first.json()
    assert body.get("duplicate") is True
    assert redis_state(redis_client, ks) == before


# --- refusals: each a JSON error naming the field, and nothing written ---------------------------


REFUSALS = [
    pytest.param(
        {"content-type": "text/plain"}, b'{"message": "x", "runAt": 0}', 415, None, id="text-plain"
    ),
    pytest.param(
        {"content-type": "application/x-www-form-urlencoded"},
        b"message=x&runAt=0",
        415,
        None,
        id="form",
    ),
    pytest.param({}, b'{"message": "x", "runAt": ', 400, None, id="truncated-json"),
    pytest.param({}, b"", 400, None, id="empty-body"),
    pytest.param({}, b'{"message": "\xff", "runAt": 0}', 400, None, id="invalid-utf8"),
    pytest.param({}, b'{"message": "\\ud800", "runAt": 0}', 400, None, id="lone-surrogate"),
    pytest.param({}, b'{"message": "x", "runAt": "0"}', 422, "runAt", id="string-runAt"),
    pytest.param({}, b'{"message": "x", "runAt": 1.5}', 422, "runAt", id="float-runAt"),
    pytest.param({}, b'{"message": "x", "runAt": true}', 422, "runAt", id="bool-runAt"),
    pytest.param({}, b'{"message": "x", "runAt": -1}', 422, "runAt", id="negative-runAt"),
    pytest.param({}, b'{"message": null, "runAt": 0}', 422, "message", id="null-message"),
    pytest.param({}, b'{"runAt": 0}', 422, "message", id="missing-message"),
    pytest.param({}, b'{"message": "x"}', 422, "runAt", id="missing-runAt"),
    pytest.param({}, b'{"message": "x", "runAt": 0, "delay": 5}', 422, "delay", id="unknown"),
    pytest.param({}, b'{"message": "x", "runAt": 0, "uuid": "abc"}', 422, "uuid", id="bad-uuid"),
    pytest.param({}, b'[{"message": "x", "runAt": 0}]', 422, None, id="array-body"),
    pytest.param({}, b'"x"', 422, None, id="scalar-body"),
    pytest.param(
        {},
        ('{"message": "%s", "runAt": 0}' % ("é" * 51)).encode(),
        413,
        "message",
        id="oversize-message",
    ),
]


@pytest.mark.parametrize(("headers", "raw", "status", "field"), REFUSALS)
def test_bad_request_is_a_json_error_naming_the_field_and_writes_nothing(
    client, redis_client, prefix, headers, raw, status, field
):
    response = client.post(
        URL, content=raw, headers={"content-type": "application/json", **headers}
    )
    assert_error(response, status, field)
    assert keys_of(redis_client, prefix) == []


def test_missing_content_type_is_415(client, redis_client, prefix):
    response = client.post(URL, content=b'{"message": "x", "runAt": 0}')
    assert "content-type" not in response.request.headers
    assert_error(response, 415, None)
    assert keys_of(redis_client, prefix) == []


def test_declared_content_length_over_the_limit_is_413_before_reading(client, redis_client, prefix):
    limit = MAX_MESSAGE * 6 + BODY_OVERHEAD
    raw = b'{"message": "' + b"x" * limit + b'", "runAt": 0}'
    response = client.post(URL, content=raw, headers={"content-type": "application/json"})
    assert int(response.request.headers["content-length"]) > limit
    assert_error(response, 413, None)
    assert keys_of(redis_client, prefix) == []


def test_chunked_body_over_the_limit_is_413(client, redis_client, prefix):
    limit = MAX_MESSAGE * 6 + BODY_OVERHEAD

    def chunks() -> Iterator[bytes]:
        yield b'{"message": "'
        for _ in range(limit // 1000 + 2):
            yield b"x" * 1000
        yield b'", "runAt": 0}'

    response = client.post(URL, content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in response.request.headers
    assert_error(response, 413, None)
    assert keys_of(redis_client, prefix) == []


def test_message_at_the_limit_is_accepted_and_one_byte_more_is_413(client, redis_client, prefix):
    ok = post_json(client, {"message": "é" * (MAX_MESSAGE // 2), "runAt": FUTURE})
    assert ok.status_code == 201
    before = keys_of(redis_client, prefix)
    over = post_json(client, {"message": "é" * (MAX_MESSAGE // 2) + "x", "runAt": FUTURE})
    assert_error(over, 413, "message")
    assert keys_of(redis_client, prefix) == before


# --- other routes ----------------------------------------------------------------------------


def test_healthz_is_200(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_readyz_is_200_with_redis_up(client):
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.json()["redis"] is True


def test_unknown_path_is_a_json_404(client):
    assert_error(client.get("/nope"), 404, None)
    assert_error(client.post("/api/v1/other", json={}), 404, None)


def test_wrong_method_is_a_json_405(client):
    assert_error(client.get(URL), 405, None)
    assert_error(client.post("/healthz"), 405, None)


# --- Redis unreachable -------------------------------------------------------------------------


@pytest.fixture
def unreachable_client(prefix: str) -> Iterator[TestClient]:
    settings = Settings.from_env({}, redis_url=f"redis://127.0.0.1:{free_port()}/0", prefix=prefix)
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def test_post_is_a_json_503_when_redis_is_unreachable(unreachable_client):
    started = time.monotonic()
    response = post_json(unreachable_client, {"message": "x", "runAt": 0, "uuid": UUID})
    assert_error(response, 503, None)
    assert "retry" in response.json()["error"]
    assert time.monotonic() - started < 2.0


def test_readyz_is_503_when_redis_is_unreachable(unreachable_client):
    started = time.monotonic()
    response = unreachable_client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["redis"] is False
    assert time.monotonic() - started < 2.0


def test_validation_still_answers_4xx_when_redis_is_unreachable(unreachable_client):
    assert_error(post_json(unreachable_client, {"message": "x"}), 422, "runAt")
    assert unreachable_client.get("/healthz").status_code == 200


def test_the_api_refuses_to_start_on_data_of_storage_format_1(settings, redis_client):
    # A format-1 sorted-set member: 12 hex digits of sequence, then the uuid's text.
    redis_client.zadd(Keyspace(settings.prefix).delayed, {"000000000001" + UUID: 1})
    app = create_app(settings)
    with pytest.raises(StorageFormatError, match="storage format 1"), TestClient(app):
        pass
