"""The api starts while Redis is down, answers 503 meanwhile, and serves once Redis
answers; data it must refuse, found only then, stops it (run_api then exits 2)."""

from __future__ import annotations

import uuid as uuidlib
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from app.http.app import create_app
from app.settings import Settings
from app.store import StorageFormatError
from app.store.keys import Keyspace
from tests.servers import RedisServer, free_port
from tests.wait import wait_until

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", "Using `httpx` with `starlette.testclient`", UserWarning)
    from starlette.testclient import TestClient

URL = "/api/v1/save-message"
FAR = 253402300799999


@pytest.fixture
def later_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis on a port of its own, not started yet."""
    server = RedisServer(tmp_path / "redis", free_port())
    try:
        yield server
    finally:
        if server.running:
            server.stop()


def test_the_api_started_before_redis_answers_503_then_serves_once_redis_answers(
    later_redis: RedisServer, prefix: str
) -> None:
    settings = Settings.from_env(
        {}, redis_url=f"redis://127.0.0.1:{later_redis.port}/0", prefix=prefix
    )
    body = {"message": "m", "runAt": FAR, "uuid": str(uuidlib.uuid4())}
    with TestClient(create_app(settings)) as client:
        refused = client.post(URL, json=body)
        assert refused.status_code == 503 and "retry" in refused.json()["error"]
        assert client.get(f"/api/v1/messages/{body['uuid']}").status_code == 503
        assert client.get("/readyz").json() == {
            "status": "unavailable",
            "redis": False,
            "memory_policy": False,
        }
        later_redis.start()
        wait_until(lambda: client.get("/readyz").status_code == 200, "ready", 15)
        assert client.post(URL, json=body).status_code == 201
        assert client.get(f"/api/v1/messages/{body['uuid']}").json()["state"] == "scheduled"


def test_data_refused_once_redis_answers_stops_the_api_and_is_kept_unready(
    later_redis: RedisServer, prefix: str
) -> None:
    # Storage format 1 data (a member with a uuid's text), written before the api starts.
    later_redis.start()
    with redis.Redis(port=later_redis.port) as r:
        r.zadd(Keyspace(prefix).delayed, {"000000000001" + str(uuidlib.uuid4()): 1})
    later_redis.stop()
    settings = Settings.from_env(
        {}, redis_url=f"redis://127.0.0.1:{later_redis.port}/0", prefix=prefix
    )
    stopped: list[bool] = []
    app = create_app(settings, stop=lambda: stopped.append(True))
    with TestClient(app) as client:
        later_redis.start()
        wait_until(lambda: stopped == [True], "the api told to stop", 15)
        assert isinstance(app.state.refused, StorageFormatError)
        assert client.get("/readyz").status_code == 503
        body = {"message": "m", "runAt": FAR, "uuid": str(uuidlib.uuid4())}
        assert client.post(URL, json=body).status_code == 503
    with redis.Redis(port=later_redis.port) as r:
        assert r.zcard(Keyspace(prefix).delayed) == 1, "nothing written"
