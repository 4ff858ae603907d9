"""Health, readiness, metrics and the API token, in-process against the real Redis."""

from __future__ import annotations

import asyncio
import uuid as uuidlib
import warnings
from collections.abc import Iterator

import httpx
import pytest
import redis

from app.health import HealthServer
from app.http.app import create_app
from app.settings import Settings
from app.store import Store, connect
from app.store.keys import Keyspace
from tests.integration.test_scripts import redis_now_ms, wait_for_redis_time
from tests.servers import free_port

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", "Using `httpx` with `starlette.testclient`", UserWarning)
    from starlette.testclient import TestClient

TOKEN = "tok-" + "0123456789abcdef" * 2
URL = "/api/v1/save-message"
FUTURE = 253402300799999


@pytest.fixture
def client(redis_url: str, prefix: str, redis_client: redis.Redis) -> Iterator[TestClient]:
    settings = Settings.from_env({}, redis_url=redis_url, prefix=prefix, api_token=TOKEN)
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def post(client: TestClient, token: str | None, **body) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    body.setdefault("message", "m")
    body.setdefault("runAt", FUTURE)
    return client.post(URL, json=body, headers=headers)


def metric(text: str, name: str) -> float:
    """The value of one sample line (``name`` includes its labels)."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in metrics")


def test_api_without_the_token_is_refused_with_401_json_and_nothing_is_written(
    client: TestClient, redis_client: redis.Redis, prefix: str
) -> None:
    for token in (None, "wrong-token-0123456789", TOKEN + "x", TOKEN[:-1]):
        reply = post(client, token, uuid=str(uuidlib.uuid4()))
        assert reply.status_code == 401
        assert reply.json() == {
            "error": "missing or wrong bearer token",
            "field": "Authorization",
        }
        assert reply.headers["www-authenticate"] == "Bearer"
    assert list(redis_client.scan_iter(match=f"*{prefix}*")) == []


def test_api_with_the_token_accepts(client: TestClient) -> None:
    assert post(client, TOKEN).status_code == 201


def test_health_and_metrics_stay_open_when_a_token_is_set(client: TestClient) -> None:
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").json() == {"status": "ok", "redis": True, "memory_policy": True}
    assert client.get("/metrics").status_code == 200


def test_metrics_count_accepted_messages_by_kind_and_http_requests_by_route(
    client: TestClient,
) -> None:
    before = client.get("/metrics").text
    uid = str(uuidlib.uuid4())
    post(client, TOKEN, uuid=uid)  # delayed
    post(client, TOKEN, uuid=uid)  # duplicate
    post(client, TOKEN, runAt=1)  # due
    post(client, TOKEN, runAt="soon")  # invalid
    after = client.get("/metrics").text
    for kind in ("delayed", "duplicate", "due", "invalid"):
        name = f'eat_messages_accepted_total{{kind="{kind}"}}'
        assert metric(after, name) - metric(before, name) == 1, kind
    created = 'eat_http_requests_total{method="POST",route="/api/v1/save-message",status="201"}'
    assert metric(after, created) - metric(before, created) == 2
    # The queue gauges are read from Redis at scrape time: one delayed, one due.
    assert metric(after, 'eat_delayed_messages{partition="0"}') == 1
    assert metric(after, 'eat_stream_length{partition="0"}') == 1
    assert metric(after, 'eat_stream_lag{partition="0"}') == 1


def test_unknown_paths_are_counted_under_one_label_so_cardinality_stays_bounded(
    client: TestClient,
) -> None:
    for n in range(5):
        client.get(f"/nope/{n}")
    text = client.get("/metrics").text
    assert "/nope/" not in text
    assert metric(text, 'eat_http_requests_total{method="GET",route="other",status="404"}') >= 5


def test_health_server_of_a_scheduler_or_worker_answers_and_reports_redis_readiness(
    redis_url: str, prefix: str
) -> None:
    async def scenario() -> None:
        port = free_port()
        settings = Settings.from_env({}, redis_url=redis_url, prefix=prefix)
        down = Settings.from_env({}, redis_url=f"redis://127.0.0.1:{free_port()}/0", prefix=prefix)
        for cfg, ready_expected in ((settings, True), (down, False)):
            client = connect(cfg)
            store = Store(client, cfg)

            async def ready(store: Store = store) -> dict[str, bool]:
                return {"redis": await store.answers()}

            server = HealthServer("127.0.0.1", port, ready, store.queue_stats)
            await server.start()
            try:
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
                    assert (await http.get("/healthz")).status_code == 200
                    readyz = await http.get("/readyz")
                    assert readyz.status_code == (200 if ready_expected else 503)
                    assert readyz.json()["redis"] is ready_expected
                    scrape = await http.get("/metrics")
                    assert scrape.status_code == 200
                    assert "eat_stream_pending" in scrape.text
            finally:
                await server.stop()
                await client.aclose()

    asyncio.run(scenario())


def test_metrics_report_pending_and_lag_of_the_workers_group(
    client: TestClient, redis_client: redis.Redis, prefix: str
) -> None:
    for _ in range(3):
        post(client, TOKEN, runAt=1)
    stream = Keyspace(prefix).stream
    redis_client.xgroup_create(stream, "workers", id="0")
    redis_client.xreadgroup("workers", "w1", {stream: ">"}, count=1)
    text = client.get("/metrics").text
    assert metric(text, 'eat_stream_length{partition="0"}') == 3
    assert metric(text, 'eat_stream_pending{partition="0"}') == 1
    assert metric(text, 'eat_stream_lag{partition="0"}') == 2
    assert metric(text, 'eat_consumers{partition="0"}') == 1


def test_metrics_report_how_long_the_oldest_due_message_has_waited_unpromoted(
    client: TestClient, redis_client: redis.Redis
) -> None:
    assert metric(client.get("/metrics").text, 'eat_oldest_overdue_seconds{partition="0"}') == 0
    post(client, TOKEN, runAt=redis_now_ms(redis_client) + 60_000)  # not due: still 0
    assert metric(client.get("/metrics").text, 'eat_oldest_overdue_seconds{partition="0"}') == 0
    due_at = redis_now_ms(redis_client) + 20
    post(client, TOKEN, runAt=due_at)  # delayed, then due; no leader promotes it
    wait_for_redis_time(redis_client, due_at + 100)
    waited = metric(client.get("/metrics").text, 'eat_oldest_overdue_seconds{partition="0"}')
    assert 0.1 <= waited <= (redis_now_ms(redis_client) - due_at) / 1000


def test_metrics_report_what_each_consumer_holds_and_leave_out_those_holding_nothing(
    client: TestClient, redis_client: redis.Redis, prefix: str
) -> None:
    for _ in range(4):
        post(client, TOKEN, runAt=1)
    stream = Keyspace(prefix).stream
    redis_client.xgroup_create(stream, "workers", id="0")
    redis_client.xreadgroup("workers", "w1", {stream: ">"}, count=2)
    [[_, [(held, _)]]] = redis_client.xreadgroup("workers", "w2", {stream: ">"}, count=1)
    text = client.get("/metrics").text
    assert metric(text, 'eat_consumer_pending{consumer="w1",partition="0"}') == 2
    assert metric(text, 'eat_consumer_pending{consumer="w2",partition="0"}') == 1
    redis_client.xack(stream, "workers", held)
    text = client.get("/metrics").text
    assert metric(text, 'eat_consumer_pending{consumer="w1",partition="0"}') == 2
    assert 'consumer="w2"' not in text, "a consumer holding nothing drops out"
    assert metric(text, 'eat_consumers{partition="0"}') == 2
