"""The save-message fast path (app/http/ingest.py) answers exactly like the Starlette route.

ApiApp serves ``POST /api/v1/save-message`` itself; under a ``root_path`` the same
handler is reached through Starlette's routing and middleware instead. Each case is
posted both ways and must get the same status, body and headers, be counted the same,
and write the same; the cases an HTTP client cannot produce (a bad Content-Length, a
disconnect, repeated headers) are driven through ASGI directly.
"""

from __future__ import annotations

import asyncio
import json
import uuid as uuidlib
import warnings
from collections.abc import Iterator

import httpx
import pytest
import redis

from app import metrics
from app.http.app import BODY_OVERHEAD, ApiApp, create_app
from app.settings import Settings
from app.store.codec import uuid_key
from app.store.keys import Keyspace

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", "Using `httpx` with `starlette.testclient`", UserWarning)
    from starlette.testclient import TestClient

URL = "/api/v1/save-message"
ROOT = "/svc"  # under a root_path the request goes through Starlette's router
MAX_MESSAGE = 100
LIMIT = MAX_MESSAGE * 6 + BODY_OVERHEAD
TOKEN = "tok-" + "0123456789abcdef" * 2
FUTURE = 253402300799999


@pytest.fixture
def settings(redis_url: str, prefix: str) -> Settings:
    return Settings.from_env({}, redis_url=redis_url, prefix=prefix, max_message_bytes=MAX_MESSAGE)


def mounted(app: ApiApp):
    """The app, with requests under ROOT given that root_path, as a proxy mounting it would."""

    async def asgi(scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(ROOT + "/"):
            scope = {**scope, "root_path": ROOT}
        await app(scope, receive, send)

    return asgi


@pytest.fixture
def app(settings: Settings) -> ApiApp:
    return create_app(settings)


@pytest.fixture
def client(app: ApiApp, redis_client: redis.Redis) -> Iterator[TestClient]:
    # One client for both ways: its lifespan's Redis client lives on this client's loop.
    # redis_client: the test's keys are deleted afterwards.
    with TestClient(mounted(app), raise_server_exceptions=False) as test_client:
        yield test_client


WAYS = ("fast", "starlette")
ROOT_OF = {"fast": "", "starlette": ROOT}


def post(
    client: TestClient, way: str, content: bytes | Iterator[bytes], **headers: str
) -> httpx.Response:
    return client.post(ROOT_OF[way] + URL, content=content, headers=headers)


def http_count(status: int) -> float:
    labels = {"route": URL, "method": "POST", "status": str(status)}
    return metrics.REGISTRY.get_sample_value("eat_http_requests_total", labels) or 0.0


def accepted(kind: str) -> float:
    labels = {"kind": kind}
    return metrics.REGISTRY.get_sample_value("eat_messages_accepted_total", labels) or 0.0


def requests_counted(status: str) -> float:
    """eat_http_requests_total of save-message with ``status``."""
    return sum(
        sample.value
        for family in metrics.REGISTRY.collect()
        if family.name == "eat_http_requests"
        for sample in family.samples
        if sample.name == "eat_http_requests_total"
        and sample.labels.get("status") == status
        and "save-message" in sample.labels.get("route", "")
    )


def comparable(response: httpx.Response) -> tuple[int, dict[str, str], bytes]:
    headers = {
        name: response.headers[name]
        for name in ("content-type", "content-length", "www-authenticate")
        if name in response.headers
    }
    return response.status_code, headers, response.content


def keys_of(r: redis.Redis, prefix: str) -> list[bytes]:
    return sorted(r.scan_iter(match=f"*{prefix}*", count=1000))


JSON = {"content-type": "application/json"}

CASES = [
    pytest.param(JSON, b'{"message": "x", "runAt": ', 400, id="truncated-json"),
    pytest.param(JSON, b"", 400, id="empty-body"),
    pytest.param(JSON, b'{"message": "\xff", "runAt": 0}', 400, id="invalid-utf8"),
    pytest.param(JSON, b'{"message": "x", "runAt": "0"}', 422, id="string-runAt"),
    pytest.param(JSON, b'{"runAt": 0}', 422, id="missing-message"),
    pytest.param(JSON, b'{"message": "x", "runAt": 0, "delay": 5}', 422, id="unknown-field"),
    pytest.param(JSON, b'{"message": "x", "runAt": 0, "uuid": "abc"}', 422, id="bad-uuid"),
    pytest.param(JSON, ('{"message": "%s", "runAt": 0}' % ("é" * 51)).encode(), 413, id="long"),
    pytest.param(JSON, b'{"message": "' + b"x" * LIMIT + b'", "runAt": 0}', 413, id="oversized"),
    pytest.param({"content-type": "text/plain"}, b'{"message": "x", "runAt": 0}', 415, id="text"),
    pytest.param({}, b'{"message": "x", "runAt": 0}', 415, id="no-content-type"),
]


@pytest.mark.parametrize(("headers", "raw", "status"), CASES)
def test_a_refusal_is_the_same_on_the_fast_path_and_through_starlette(
    client, redis_client, prefix, headers, raw, status
):
    answers = {}
    for way in WAYS:
        before = (http_count(status), accepted("invalid"))
        response = post(client, way, raw, **headers)
        assert response.status_code == status, (way, response.text)
        assert set(response.json()) == {"error", "field"}
        assert (http_count(status), accepted("invalid")) == (before[0] + 1, before[1] + 1), way
        answers[way] = comparable(response)
    assert answers["fast"] == answers["starlette"]
    assert keys_of(redis_client, prefix) == []


def test_acceptance_and_duplicate_are_the_same_on_both_paths(client, redis_client, prefix):
    answers: dict[str, list] = {}
    for way in WAYS:
        uid = str(uuidlib.uuid4())
        body = json.dumps({"message": "hi", "runAt": FUTURE, "uuid": uid.upper()}).encode()
        counts = (http_count(201), http_count(200), accepted("delayed"), accepted("duplicate"))
        first, again = post(client, way, body, **JSON), post(client, way, body, **JSON)
        assert first.json() == {"uuid": uid, "runAt": FUTURE, "state": "scheduled"}
        assert again.json() == {**first.json(), "duplicate": True}
        assert (http_count(201), http_count(200), accepted("delayed"), accepted("duplicate")) == (
            counts[0] + 1,
            counts[1] + 1,
            counts[2] + 1,
            counts[3] + 1,
        )
        answers[way] = [comparable(r) for r in (first, again)]
        assert redis_client.hexists(Keyspace(prefix).messages, uuid_key(uid))
    # The bodies differ only by the uuid, which has the same length.
    fast, slow = answers["fast"], answers["starlette"]
    assert [(s, h) for s, h, _ in fast] == [(s, h) for s, h, _ in slow]
    assert [s for s, _, _ in fast] == [201, 200]
    assert fast[0][1] == {"content-type": "application/json", "content-length": "91"}


def test_a_chunked_body_within_the_limit_is_accepted(client):
    def chunks() -> Iterator[bytes]:
        yield b'{"message": "'
        yield b"x" * 50
        yield b'", "runAt": 0}'

    for way in WAYS:
        response = post(client, way, chunks(), **JSON)
        assert "content-length" not in response.request.headers
        assert response.status_code == 201, response.text
        assert response.json()["state"] == "queued"


@pytest.fixture
def token_client(redis_url: str, prefix: str, redis_client: redis.Redis) -> Iterator[TestClient]:
    settings = Settings.from_env({}, redis_url=redis_url, prefix=prefix, api_token=TOKEN)
    with TestClient(mounted(create_app(settings)), raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.mark.parametrize(
    ("authorization", "status"),
    [
        (None, 401),
        ("", 401),
        (f"Basic {TOKEN}", 401),
        (f"Bearer {TOKEN[:-1]}", 401),
        (f"Bearer {TOKEN}x", 401),
        (TOKEN, 401),
        (f"Bearer {TOKEN}", 201),
        (f"bearer {TOKEN}", 201),
        (f"Bearer   {TOKEN}  ", 201),
    ],
)
def test_the_bearer_token_is_checked_the_same_on_both_paths(
    token_client, redis_client, prefix, authorization, status
):
    answers = {}
    for way in WAYS:
        headers = dict(JSON) if authorization is None else {**JSON, "authorization": authorization}
        # A body over the limit too: the token is checked before anything is read.
        raw = b'{"message": "x", "runAt": %d}' % FUTURE if status == 201 else b"x" * LIMIT * 2
        before = http_count(status)
        response = post(token_client, way, raw, **headers)
        assert response.status_code == status, (way, response.text)
        assert http_count(status) == before + 1
        answers[way] = comparable(response)
    if status == 401:
        assert answers["fast"] == answers["starlette"]
        assert answers["fast"][1]["www-authenticate"] == "Bearer"
        assert json.loads(answers["fast"][2]) == {
            "error": "missing or wrong bearer token",
            "field": "Authorization",
        }
        assert keys_of(redis_client, prefix) == []


def test_an_unexpected_error_is_a_json_500_counted_and_raised_both_ways(app, monkeypatch):
    class Broken:
        async def accept(self, msg):
            raise RuntimeError("boom")

    # No lifespan needed: nothing here reaches Redis.
    monkeypatch.setattr(app.ingest, "batcher", Broken())
    body = b'{"message": "x", "runAt": 0}'
    client = TestClient(mounted(app), raise_server_exceptions=False)
    answers = {}
    for way in WAYS:
        before = http_count(500)
        response = post(client, way, body, **JSON)
        assert response.status_code == 500
        assert response.json() == {"error": "internal error", "field": None}
        assert http_count(500) == before + 1
        answers[way] = comparable(response)
        with pytest.raises(RuntimeError, match="boom"):
            post(TestClient(mounted(app)), way, body, **JSON)
    assert answers["fast"] == answers["starlette"]


# --- through ASGI directly: what an HTTP client will not send ---------------------------------


def asgi_post(
    app: ApiApp, headers: list[tuple[bytes, bytes]], messages: list[dict], root_path: str = ""
) -> tuple[int, dict[bytes, bytes], bytes]:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": root_path + URL,
        "raw_path": (root_path + URL).encode(),
        "root_path": root_path,
        "query_string": b"",
        "headers": [(b"host", b"test"), *headers],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    incoming = iter(messages)
    sent: list[dict] = []

    async def receive() -> dict:
        return next(incoming, {"type": "http.disconnect"})

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    start, body = sent
    assert start["type"] == "http.response.start" and body["type"] == "http.response.body"
    return start["status"], dict(start["headers"]), body["body"]


def both_ways(app: ApiApp, headers: list[tuple[bytes, bytes]], messages: list[dict]):
    fast = asgi_post(app, headers, messages)
    assert asgi_post(app, headers, messages, root_path=ROOT) == fast
    return fast


def test_a_content_length_that_is_not_a_number_is_400(settings):
    app = create_app(settings)
    status, _, body = both_ways(
        app,
        [(b"content-type", b"application/json"), (b"content-length", b"12x")],
        [{"type": "http.request", "body": b"{}", "more_body": False}],
    )
    assert status == 400
    assert json.loads(body) == {"error": "invalid Content-Length", "field": None}


def test_a_client_gone_before_the_body_arrived_is_counted_499_not_400(settings):
    """Nobody receives the answer: the request metrics say "client closed request"
    (nginx's 499), not a 400 no client was sent."""
    app = create_app(settings)
    for messages in (
        [{"type": "http.disconnect"}],
        [{"type": "http.request", "body": b'{"mess', "more_body": True}],
    ):
        before = accepted("invalid")
        counted = requests_counted("499"), requests_counted("400")
        status, _, body = both_ways(app, [(b"content-type", b"application/json")], messages)
        assert status == 499
        # both_ways sends it twice (with and without a root path).
        assert (requests_counted("499"), requests_counted("400")) == (counted[0] + 2, counted[1])
        assert json.loads(body)["error"] == "client disconnected before the body was read"
        assert accepted("invalid") == before  # not counted as invalid input


def test_the_first_of_repeated_headers_counts(settings):
    app = create_app(settings)
    body = b'{"message": "x"}'  # invalid: reaching validation shows the headers passed
    message = [{"type": "http.request", "body": body, "more_body": False}]
    json_first = [(b"content-type", b"application/json"), (b"content-type", b"text/plain")]
    text_first = list(reversed(json_first))
    assert both_ways(app, json_first, message)[0] == 422
    assert both_ways(app, text_first, message)[0] == 415
    small_first = [
        (b"content-type", b"application/json"),
        (b"content-length", b"%d" % len(body)),
        (b"content-length", b"%d" % (LIMIT + 1)),
    ]
    assert both_ways(app, small_first, message)[0] == 422
    assert both_ways(app, [small_first[0], *reversed(small_first[1:])], message)[0] == 413


def test_only_post_save_message_at_the_root_takes_the_fast_path(app, client, monkeypatch):
    taken: list[str] = []
    dispatch = app.ingest.dispatch

    async def spy(scope, receive, send) -> None:
        taken.append(scope["path"])
        await dispatch(scope, receive, send)

    monkeypatch.setattr(app.ingest, "dispatch", spy)
    body = b'{"message": "x", "runAt": %d}' % FUTURE
    assert post(client, "fast", body, **JSON).status_code == 201
    assert post(client, "starlette", body, **JSON).status_code == 201
    assert client.get(URL).status_code == 405
    assert taken == [URL]


def test_other_methods_and_paths_still_go_through_starlette(client):
    assert client.get(URL).status_code == 405
    assert client.put(URL, json={}).status_code == 405
    assert client.post(URL + "x", json={}).status_code == 404
    assert client.get("/healthz").json() == {"status": "ok"}
