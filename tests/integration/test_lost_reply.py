"""A Redis reply lost on the way back: the api says the outcome is unknown, never a lie.

The api reaches Redis through a pausable proxy. Each test holds the replies
(requests still pass), waits until Redis has applied the change (read with a
direct client), then cuts the connection: the reply is lost. redis-py would
send the command again on a new connection, and the second run would answer
for itself (a message accepted a moment ago as a duplicate, a cancel that
worked as "already cancelled"). Instead the answer is 503 "outcome unknown",
and a retry by the client, with the same uuid, gets the truth.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import uuid as uuidlib
import warnings
from collections.abc import Iterator
from urllib.parse import urlparse

import httpx
import pytest
import redis

from app.http.app import create_app
from app.settings import Settings
from app.store import OutcomeUnknown, connect
from app.store.codec import uuid_key
from app.store.keys import Keyspace
from tests.chaos.proxy import PausableProxy
from tests.wait import async_wait_until, wait_until

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", "Using `httpx` with `starlette.testclient`", UserWarning)
    from starlette.testclient import TestClient

FUTURE = 253402300799999
WITHIN = 5.0


@pytest.fixture
def proxy(redis_url: str) -> Iterator[PausableProxy]:
    target = urlparse(redis_url)
    with PausableProxy(target.hostname or "127.0.0.1", target.port or 6379, "redis") as started:
        yield started


@pytest.fixture
def settings(proxy: PausableProxy, prefix: str) -> Settings:
    return Settings.from_env({}, redis_url=f"redis://{proxy.address}/0", prefix=prefix)


@pytest.fixture
def client(settings: Settings, redis_client: redis.Redis) -> Iterator[TestClient]:
    # redis_client: deletes this test's keys afterwards.
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def lose_the_reply(proxy: PausableProxy, request, applied) -> httpx.Response:
    """Send ``request()`` with replies held; once ``applied()`` holds in Redis, cut."""
    proxy.pause(up=False, down=True)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        answer = pool.submit(request)
        try:
            wait_until(applied, "Redis to apply the change", WITHIN)
        finally:
            proxy.cut()
            proxy.resume()
        return answer.result(timeout=WITHIN)


def message(uid: str) -> dict:
    return {"message": "hello", "runAt": FUTURE, "uuid": uid}


def test_an_accept_whose_reply_is_lost_answers_503_outcome_unknown_not_a_false_duplicate(
    client: TestClient, proxy: PausableProxy, redis_client: redis.Redis, prefix: str
) -> None:
    keys = Keyspace(prefix)
    warm = client.post("/api/v1/save-message", json=message(str(uuidlib.uuid4())))
    assert warm.status_code == 201  # the scripts are loaded; what follows is one EVALSHA
    uid = str(uuidlib.uuid4())

    answer = lose_the_reply(
        proxy,
        lambda: client.post("/api/v1/save-message", json=message(uid)),
        lambda: redis_client.hexists(keys.messages, uuid_key(uid)),
    )

    assert answer.status_code == 503, answer.text
    body = answer.json()
    assert body["field"] is None
    assert body["error"].startswith("outcome unknown")
    assert "retry with the same uuid" in body["error"]
    # It was applied once; the client's retry with its uuid learns so, truthfully.
    assert redis_client.zcard(keys.delayed) == 2
    retried = client.post("/api/v1/save-message", json=message(uid))
    assert retried.status_code == 200 and retried.json()["duplicate"] is True
    assert redis_client.zcard(keys.delayed) == 2


def test_a_cancel_whose_reply_is_lost_answers_503_outcome_unknown_not_a_false_conflict(
    client: TestClient, proxy: PausableProxy, redis_client: redis.Redis, prefix: str
) -> None:
    warm, uid = str(uuidlib.uuid4()), str(uuidlib.uuid4())
    for each in (warm, uid):
        assert client.post("/api/v1/save-message", json=message(each)).status_code == 201
    # The cancel script is loaded; what follows is one EVALSHA.
    assert client.delete(f"/api/v1/messages/{warm}").status_code == 200

    answer = lose_the_reply(
        proxy,
        lambda: client.delete(f"/api/v1/messages/{uid}"),
        lambda: redis_client.zcard(Keyspace(prefix).delayed) == 0,
    )

    assert answer.status_code == 503, answer.text
    assert answer.json()["error"].startswith("outcome unknown")
    assert client.get(f"/api/v1/messages/{uid}").json()["state"] == "cancelled"


def test_a_read_whose_reply_is_lost_is_sent_again_and_answers_normally(
    client: TestClient, proxy: PausableProxy
) -> None:
    uid = str(uuidlib.uuid4())
    assert client.post("/api/v1/save-message", json=message(uid)).status_code == 201
    held = concurrent.futures.ThreadPoolExecutor(1)
    proxy.pause(up=False, down=True)
    try:
        answer = held.submit(client.get, f"/api/v1/messages/{uid}")
        wait_until(lambda: proxy.open_connections > 0, "the read to be in flight", WITHIN)
    finally:
        proxy.cut()
        proxy.resume()
    try:
        response = answer.result(timeout=WITHIN)
    finally:
        held.shutdown()
    assert response.status_code == 200
    assert response.json()["uuid"] == uid


def test_a_pipeline_that_changes_data_is_not_sent_again_but_one_that_reads_is(
    settings: Settings, proxy: PausableProxy, redis_client: redis.Redis, prefix: str
) -> None:
    keys = Keyspace(prefix)
    redis_client.xadd(keys.dead, {"u": b"x"})

    async def purge() -> None:
        client = connect(settings)
        try:
            await client.ping()
            proxy.pause(up=False, down=True)

            async def cut_once_applied() -> None:
                await async_wait_until(
                    lambda: not redis_client.exists(keys.dead), "the purge applied", WITHIN
                )
                proxy.cut()
                proxy.resume()

            cutter = asyncio.create_task(cut_once_applied())
            async with client.pipeline(transaction=True) as pipe:
                pipe.xlen(keys.dead)
                pipe.unlink(keys.dead)
                with pytest.raises(OutcomeUnknown):
                    await asyncio.wait_for(pipe.execute(), WITHIN)
            await cutter
            # The connection that lost its reply is gone: the next command gets its own.
            assert await client.ping() is True
            proxy.pause(up=False, down=True)
            loop = asyncio.get_running_loop()
            loop.call_later(0.2, proxy.cut)
            loop.call_later(0.25, proxy.resume)
            async with client.pipeline(transaction=False) as pipe:
                pipe.exists(keys.dead)
                pipe.xlen(keys.dead)
                assert await asyncio.wait_for(pipe.execute(), WITHIN) == [0, 0]
        finally:
            await client.aclose()

    asyncio.run(purge())
