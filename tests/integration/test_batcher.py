"""Coalesced accepts: many concurrent requests, few round trips, each its own answer."""

from __future__ import annotations

import asyncio
import uuid as uuidlib
import warnings

import pytest
import redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from app.http.app import create_app
from app.http.batcher import AcceptBatcher, AcceptFailed
from app.model import NewMessage
from app.settings import Settings
from app.store import Store, connect
from app.store.codec import uuid_key
from app.store.keys import Keyspace
from tests.servers import free_port

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", "Using `httpx` with `starlette.testclient`", UserWarning)
    from starlette.testclient import TestClient

FUTURE = 253402300799999


def message(run_at: int = FUTURE, uid: str | None = None) -> NewMessage:
    return NewMessage(uuid=uid or str(uuidlib.uuid4()), message="m", run_at=run_at)


class CountingStore(Store):
    calls = 0

    async def accept_many(self, msgs):
        self.calls += 1
        return await super().accept_many(msgs)


def test_concurrent_accepts_share_round_trips_and_each_gets_its_own_answer(
    redis_url: str, prefix: str, redis_client: redis.Redis
) -> None:
    settings = Settings.from_env({}, redis_url=redis_url, prefix=prefix)
    msgs = [message(run_at=1 if i % 3 == 0 else FUTURE) for i in range(300)]
    repeated = msgs[7]  # the same uuid twice in one burst is accepted once

    async def scenario():
        client = connect(settings)
        store = CountingStore(client, settings)
        batcher = AcceptBatcher(store, max_batch=64)
        try:
            results = await asyncio.gather(*(batcher.accept(m) for m in [*msgs, repeated]))
        finally:
            await client.aclose()
        return results, store.calls

    results, calls = asyncio.run(scenario())
    assert calls < len(msgs) / 10, calls  # coalesced: far fewer calls than requests
    for msg, result in zip(msgs, results, strict=False):
        assert result.created
        assert result.state == ("queued" if msg.run_at == 1 else "scheduled")
    assert not results[-1].created and results[-1].state == results[7].state
    keys = Keyspace(settings.prefix)
    assert redis_client.hlen(keys.messages) == len(msgs)
    assert redis_client.xlen(keys.stream) == 100
    assert redis_client.zcard(keys.delayed) == 200


def test_a_lone_request_goes_out_at_once_without_waiting_for_company(
    redis_url: str, prefix: str, redis_client: redis.Redis
) -> None:
    settings = Settings.from_env({}, redis_url=redis_url, prefix=prefix)

    async def scenario() -> float:
        client = connect(settings)
        batcher = AcceptBatcher(Store(client, settings))
        try:
            await batcher.accept(message())  # loads the script
            loop = asyncio.get_running_loop()
            start = loop.time()
            await batcher.accept(message())
            return loop.time() - start
        finally:
            await client.aclose()

    assert asyncio.run(scenario()) < 0.05


def test_redis_down_fails_every_waiting_request_and_the_batcher_recovers(prefix: str) -> None:
    settings = Settings.from_env({}, redis_url=f"redis://127.0.0.1:{free_port()}/0", prefix=prefix)

    async def scenario():
        client = connect(settings)
        batcher = AcceptBatcher(Store(client, settings))
        try:
            first = await asyncio.gather(
                *(batcher.accept(message()) for _ in range(20)), return_exceptions=True
            )
            second = await asyncio.gather(batcher.accept(message()), return_exceptions=True)
        finally:
            await client.aclose()
        return first, second

    first, second = asyncio.run(scenario())
    assert all(isinstance(r, RedisConnectionError) for r in first)
    assert isinstance(second[0], RedisConnectionError)  # not stuck: a new flush ran


@pytest.mark.parametrize("count", [1, 5])
def test_one_call_publishes_one_wake_up_when_it_brings_a_new_earliest(
    redis_url: str, prefix: str, redis_client: redis.Redis, count: int
) -> None:
    settings = Settings.from_env({}, redis_url=redis_url, prefix=prefix)
    pubsub = redis_client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(Keyspace(settings.prefix).wake_channel)
    try:
        pubsub.get_message(timeout=1.0)  # the subscribe confirmation

        async def scenario() -> None:
            client = connect(settings)
            try:
                await Store(client, settings).accept_many(
                    [message(run_at=FUTURE - i) for i in range(count)]
                )
            finally:
                await client.aclose()

        asyncio.run(scenario())
        got = [pubsub.get_message(timeout=0.5) for _ in range(2)]
        published = [m for m in got if m is not None]
        assert [int(m["data"]) for m in published] == [FUTURE - count + 1]
    finally:
        pubsub.close()


class OddReplyStore(Store):
    """Redis answers, but the first call's reply trips a bug (nothing Redis-shaped)."""

    failures = 1

    async def accept_many(self, msgs):
        if self.failures:
            self.failures -= 1
            await asyncio.sleep(0.01)  # let more requests queue behind this call
            raise KeyError("a reply nobody expected")
        return await super().accept_many(msgs)


def test_an_unexpected_error_fails_every_waiting_request_and_the_next_ones_are_served(
    redis_url: str, prefix: str, redis_client: redis.Redis
) -> None:
    settings = Settings.from_env({}, redis_url=redis_url, prefix=prefix)

    async def scenario():
        client = connect(settings)
        batcher = AcceptBatcher(OddReplyStore(client, settings), max_batch=4)
        try:
            first = await asyncio.wait_for(
                asyncio.gather(
                    *(batcher.accept(message()) for _ in range(10)), return_exceptions=True
                ),
                5.0,
            )
            after = await asyncio.wait_for(batcher.accept(message()), 5.0)
        finally:
            await client.aclose()
        return first, after

    first, after = asyncio.run(scenario())
    failed = [r for r in first if isinstance(r, Exception)]
    # The call that broke carried the first four; nobody waited forever; the rest went on.
    assert len(failed) == 4
    assert all(isinstance(r, AcceptFailed) and isinstance(r, RedisError) for r in failed)
    assert all(not isinstance(r, Exception) and r.created for r in first[4:])
    assert after.created


def test_the_api_answers_503_json_when_the_batcher_fails_unexpectedly_then_serves_again(
    redis_url: str, prefix: str, redis_client: redis.Redis
) -> None:
    settings = Settings.from_env({}, redis_url=redis_url, prefix=prefix)
    app = create_app(settings)
    body = {"message": "m", "runAt": FUTURE, "uuid": str(uuidlib.uuid4())}
    with TestClient(app) as client:
        store = app.state.store
        real = store.accept_many
        calls = []

        async def broken_once(msgs):
            calls.append(len(msgs))
            if len(calls) == 1:
                raise IndexError("odd reply")
            return await real(msgs)

        store.accept_many = broken_once
        refused = client.post("/api/v1/save-message", json=body)
        assert refused.status_code == 503
        assert refused.json()["field"] is None
        assert "retry with the same uuid" in refused.json()["error"]
        retried = client.post("/api/v1/save-message", json=body)
        assert retried.status_code == 201, retried.text
    assert redis_client.hexists(Keyspace(prefix).messages, uuid_key(body["uuid"]))
