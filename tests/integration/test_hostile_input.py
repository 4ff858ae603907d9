"""Hostile input against the real app and a real Redis: every malformed body, query or
path is a 4xx JSON error (``{"error", "field"}``), stores nothing, and leaves the
process serving.

Each class of attack has its regression tests here (JSON nested past Python's
recursion limit, repeated keys, non-ASCII digits, a trailing slash with a forged
Host); the property test at the end generates hostile JSON for every JSON route so
the class stays closed.
"""

from __future__ import annotations

import asyncio
import json
import warnings
from collections.abc import Iterator

import pytest
import redis
from starlette.routing import Route

from app.http.app import create_app
from app.settings import Settings

with warnings.catch_warnings():
    # Starlette's test client asks for httpx2 at import; the project's test extra has httpx.
    warnings.filterwarnings("ignore", "Using `httpx` with `starlette.testclient`", UserWarning)
    from starlette.testclient import TestClient

V1 = "/api/v1"
SAVE = f"{V1}/save-message"
BULK = f"{V1}/save-messages"
UUID = "123e4567-e89b-12d3-a456-426614174000"
OTHER = "00000000-0000-4000-8000-000000000001"
FAR = 253402300799999  # 9999-12-31: scheduled, never due during a test
JSON = {"content-type": "application/json"}


@pytest.fixture
def settings(redis_url: str, prefix: str) -> Settings:
    return Settings.from_env({}, redis_url=redis_url, prefix=prefix, max_batch_bytes=400_000)


@pytest.fixture
def client(settings: Settings, redis_client: redis.Redis) -> Iterator[TestClient]:
    # redis_client: the test's keys are deleted afterwards. Exceptions become the 500 a
    # real server would send, which the assertions then refuse.
    with TestClient(create_app(settings), raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.fixture
def scheduled(client: TestClient) -> str:
    """A scheduled message, so PATCH reaches its body instead of answering 404."""
    response = client.post(SAVE, json={"message": "target", "runAt": FAR, "uuid": UUID})
    assert response.status_code == 201, response.text
    return UUID


def snapshot(r: redis.Redis, prefix: str) -> dict[bytes, object]:
    """Every key of the test's keyspace with its whole value."""
    state: dict[bytes, object] = {}
    for key in sorted(r.scan_iter(match=f"*{prefix}*", count=1000)):
        kind = r.type(key)
        if kind == b"hash":
            state[key] = r.hgetall(key)
        elif kind == b"zset":
            state[key] = r.zrange(key, 0, -1, withscores=True)
        elif kind == b"stream":
            state[key] = r.xrange(key)
        elif kind == b"list":
            state[key] = r.lrange(key, 0, -1)
        else:
            state[key] = r.dump(key)
    return state


def assert_json_error(response, status: int | None = None, field: str | None = "?") -> dict:
    """A 4xx (``status`` if given) JSON ``{"error", "field"}`` (``field`` if given)."""
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])
    if status is not None:
        assert response.status_code == status, response.text[:300]
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error", "field"} and body["error"], body
    if field != "?":
        assert body["field"] == field, body
    return body


# --- JSON nested past the recursion limit ----------------------------------------------------

DEEP = 5000


def nested(depth: int = DEEP) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        pytest.param(SAVE, nested(), 422, id="save-message"),
        pytest.param(SAVE, '{"message": "m", "runAt": 5, "x": ' + nested() + "}", 422, id="field"),
        pytest.param(BULK, nested(), 400, id="bulk"),
        pytest.param(BULK, '{"messages": ' + nested() + "}", 400, id="bulk-envelope"),
        pytest.param(BULK, '[{"message": "m", "x": ' + nested() + "}]", 400, id="bulk-item"),
        pytest.param(BULK, "[" + '{"a": ' * DEEP + "1" + "}" * DEEP + "]", 400, id="bulk-objects"),
    ],
)
def test_a_body_nested_too_deeply_is_a_4xx_json_error_and_stores_nothing(
    client, redis_client, prefix, path, body, status
):
    # Before: RecursionError, which the bulk route answered 500 text/plain.
    before = snapshot(redis_client, prefix)
    assert_json_error(client.post(path, content=body, headers=JSON), status)
    assert snapshot(redis_client, prefix) == before


def test_a_reschedule_body_nested_as_deep_as_its_limit_allows_is_a_json_error(
    client, redis_client, prefix, scheduled
):
    before = snapshot(redis_client, prefix)
    deep = nested(500)
    for body in ('{"runAt": ' + deep + "}", nested(510), '{"runAt": 5, "x": ' + deep + "}"):
        response = client.patch(f"{V1}/messages/{scheduled}", content=body, headers=JSON)
        assert_json_error(response)
    assert snapshot(redis_client, prefix) == before


# --- repeated keys ---------------------------------------------------------------------------


def obj(*members: str) -> str:
    """A JSON object written member by member, as given (repeats and escapes kept)."""
    return "{" + ", ".join(members) + "}"


def test_save_message_refuses_a_repeated_key_naming_it_and_stores_nothing(
    client, redis_client, prefix
):
    # Before: 201, storing the last uuid, where a proxy reading the first saw another key.
    for field, body in (
        ("uuid", obj('"message": "a"', '"runAt": 1', f'"uuid": "{UUID}"', f'"uuid": "{OTHER}"')),
        ("uuid", obj('"message": "a"', '"runAt": 1', f'"u\\u0075id": "{UUID}"', '"uuid": null')),
        ("message", obj('"message": "a"', '"message": "b"', '"runAt": 1')),
    ):
        response = client.post(SAVE, content=body, headers=JSON)
        assert_json_error(response, 422, field)
        assert response.json()["error"] == f"repeated key: {field}"
    assert snapshot(redis_client, prefix) == {}


def test_reschedule_refuses_a_repeated_key_and_changes_nothing(
    client, redis_client, prefix, scheduled
):
    before = snapshot(redis_client, prefix)
    for body in (obj('"runAt": 1', '"runAt": 2'), obj('"runAt": 1', '"run\\u0041t": 2')):
        response = client.patch(f"{V1}/messages/{scheduled}", content=body, headers=JSON)
        assert_json_error(response, 422, "runAt")
    assert snapshot(redis_client, prefix) == before


def test_bulk_refuses_a_repeated_envelope_key_and_marks_an_item_with_one_invalid(
    client, redis_client, prefix
):
    item = obj('"message": "a"', f'"runAt": {FAR}', f'"uuid": "{UUID}"')
    body = obj(f'"messages": [{item}]', '"messages": []')
    assert_json_error(client.post(BULK, content=body, headers=JSON), 422, "messages")
    assert snapshot(redis_client, prefix) == {}

    twice = obj('"message": "a"', f'"runAt": {FAR}', f'"uuid": "{UUID}"', f'"uuid": "{OTHER}"')
    response = client.post(BULK, content=f"[{twice}]", headers=JSON)
    assert response.status_code == 200, response.text
    assert response.json()["results"] == [
        {"index": 0, "status": "invalid", "error": "repeated key: uuid", "field": "uuid"}
    ]
    assert snapshot(redis_client, prefix) == {}


# --- digits of other scripts -----------------------------------------------------------------

OTHER_DIGITS = ["\u0661", "\uff11", "\U0001d7cf", "\u00b9"]  # Arabic-Indic, fullwidth, math, ¹


@pytest.mark.parametrize("digit", OTHER_DIGITS)
def test_a_cursor_or_limit_in_digits_of_another_script_is_a_422(client, digit):
    # Before: \d matched the cursor, Redis refused it: 503 and an error in the log.
    for query, field in ((f"cursor={digit}-{digit}", "cursor"), (f"limit={digit}", "limit")):
        assert_json_error(client.get(f"{V1}/dead?{query}"), 422, field)


@pytest.mark.parametrize(
    ("declared", "status"),
    [
        pytest.param(b"\xb2", 400, id="superscript-two"),  # "²".isdigit(), int("²") raises
        pytest.param(b"\xb9\xb2", 400, id="superscripts"),
        pytest.param(b"9" * 30, 413, id="30-digits"),
        pytest.param(b"9" * 5000, 413, id="5000-digits"),  # int() refuses over 4,300
    ],
)
def test_a_content_length_that_is_no_ascii_number_or_a_huge_one_is_a_json_error(
    client, redis_client, prefix, declared, status
):
    # Before: isdigit() passed "²" and int() raised: a 500.
    for path in (SAVE, BULK):  # the raw-ASGI path and Starlette's (its lifespan has run)
        answer = asgi_post(client.app, path, declared)
        assert answer[0] == status, (path, answer)
        assert answer[1] == b"application/json"
        assert set(json.loads(answer[2])) == {"error", "field"}
    assert snapshot(redis_client, prefix) == {}


def asgi_post(app, path: str, content_length: bytes) -> tuple[int, bytes, bytes]:
    """POST through ASGI directly: an HTTP client will not send such a Content-Length."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [
            (b"host", b"test"),
            (b"content-type", b"application/json"),
            (b"content-length", content_length),
        ],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    start, body = sent
    return start["status"], dict(start["headers"]).get(b"content-type", b""), body["body"]


# --- a trailing slash and a forged Host ------------------------------------------------------


def routed(app) -> list[tuple[str, str]]:
    """(method, path) of every route, path parameters filled in."""
    return [
        (method, route.path.replace("{uuid}", UUID))
        for route in app.routes
        if isinstance(route, Route)
        for method in sorted(route.methods or ())
        if method != "HEAD"
    ]


def test_no_route_redirects_a_trailing_slash_to_the_host_the_client_named(client):
    # Before: 307 to http://evil.example/api/v1/save-message, built from the Host header.
    checked = routed(client.app)
    assert len(checked) >= 14
    for method, path in checked:
        response = client.request(
            method,
            path + "/",
            content=b"{}",
            headers={"host": "evil.example", **JSON},
            follow_redirects=False,
        )
        assert "location" not in response.headers, (method, path, response.headers)
        assert_json_error(response, 404, None)
