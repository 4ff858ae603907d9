"""The webhook handler against a real receiver on loopback (uvicorn, nothing mocked at the
HTTP level), a real Redis, the promoter and the worker in-process.

The receiver verifies every signature with the Standard Webhooks reference library
(``standardwebhooks``). The allowlist names 127.0.0.1, where the receiver listens: a
loopback address is refused unless named explicitly.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import uuid as uuidlib
from collections.abc import AsyncIterator

import pytest

from app.model import NewMessage, State
from app.settings import Settings
from app.store import Delivery, Store
from app.store.lifecycle import Lifecycle
from app.targets import TargetPolicy
from tests.aio import open_store
from tests.integration.test_worker import running_promoter, running_worker
from tests.receiver import SECRET, Answer, Arrival, Receiver
from tests.servers import free_port
from tests.wait import async_wait_until
from workers.handlers import DeliveryFailed
from workers.webhook import WebhookHandler
from workers.worker import Worker

DEADLINE = 10.0


def now_ms() -> int:
    return int(time.time() * 1000)


@pytest.fixture
def receiver():
    with Receiver() as running:
        yield running


@pytest.fixture
def settings(redis_url: str, prefix: str, redis_client, receiver: Receiver) -> Settings:
    # redis_client: deletes this test's keys afterwards.
    return Settings(
        redis_url=redis_url,
        prefix=prefix,
        webhook_url=receiver.url + "/default",
        webhook_secret=SECRET,
        webhook_allow="127.0.0.1",
        webhook_timeout=1.0,
        retry_base=0.05,
        retry_max=5.0,
        max_deliveries=3,
    )


@contextlib.asynccontextmanager
async def webhook_worker(
    store: Store, settings: Settings, concurrency: int = 16, policy: TargetPolicy | None = None
) -> AsyncIterator[Worker]:
    handler = WebhookHandler.of(settings, policy)
    worker = Worker(store, handler, "w1", concurrency)
    try:
        async with running_worker(worker):
            yield worker
    finally:
        await handler.aclose()


async def accept(store: Store, message: str, target: str | None, run_at: int | None = None) -> str:
    uuid = str(uuidlib.uuid4())
    got = await store.accept(NewMessage(uuid, message, run_at or now_ms(), target))
    assert got.created
    return uuid


async def dead_reason(store: Store, uuid: str) -> tuple[bytes, bytes]:
    record = await store.record(uuid)
    assert record.state is State.DEAD
    entries = await store.client.xrange(store.keys.dead, min=record.ref, max=record.ref)
    fields = entries[0][1]
    return fields[b"reason"], fields[b"a"]


def dead_lettered(
    settings: Settings,
    target: str | None = None,
    worker_settings: Settings | None = None,
    policy: TargetPolicy | None = None,
) -> tuple[str, bytes, bytes]:
    """Accept one message (to ``target``), run a webhook worker until it dead-letters it:
    its uuid, and the dead entry's reason and attempts."""

    async def scenario() -> tuple[str, bytes, bytes]:
        async with open_store(settings) as store, running_promoter(store):
            uuid = await accept(store, "m", target)
            async with webhook_worker(store, worker_settings or settings, policy=policy) as worker:
                await async_wait_until(lambda: worker.stats.dead == 1, "dead", DEADLINE)
            return (uuid, *await dead_reason(store, uuid))

    return asyncio.run(scenario())


def test_200_messages_due_over_5_s_arrive_each_once_signed_and_none_early(
    settings: Settings, receiver: Receiver
) -> None:
    async def scenario() -> None:
        async with open_store(settings) as store, running_promoter(store):
            start = now_ms() + 500
            due = {}
            for i in range(200):
                run_at = start + i * 25  # 200 over 5 s
                target = f"{receiver.url}/hook/{i % 4}" if i % 2 else None
                uuid = await accept(store, f'{{"n": {i}, "text": "ünï"}}', target, run_at)
                due[uuid] = (run_at, target, f'{{"n": {i}, "text": "ünï"}}')
            async with webhook_worker(store, settings, concurrency=64) as worker:
                await async_wait_until(lambda: worker.stats.acked == 200, "200 acked", 15)
            arrivals = list(receiver.arrivals)
            assert sorted(a.id for a in arrivals) == sorted(due), "each once"
            lateness = []
            for arrival in arrivals:
                run_at, target, message = due[arrival.id]
                assert arrival.verified, arrival.headers
                assert arrival.body == message.encode()
                assert arrival.headers["x-eat-run-at"] == str(run_at)
                assert arrival.headers["x-eat-attempt"] == "1"
                assert arrival.headers["content-type"] == "text/plain; charset=utf-8"
                expected_path = "/default" if target is None else target[len(receiver.url) :]
                assert arrival.path == expected_path
                late = arrival.at * 1000 - run_at
                assert late >= 0, f"{arrival.id} arrived {-late:.1f} ms early"
                lateness.append(late)
            lateness.sort()
            p50, p99 = lateness[len(lateness) // 2], lateness[int(len(lateness) * 0.99) - 1]
            print(f"\nwebhook lateness over 200 messages: p50 {p50:.1f} ms, p99 {p99:.1f} ms")
            final = [(await store.record(u)).state for u in due]
            assert final == [State.DELIVERED] * 200

    asyncio.run(scenario())


def _by_attempt(answers: list[Answer]):
    def script(arrival: Arrival) -> Answer:
        return answers[min(arrival.seen_before, len(answers) - 1)]

    return script


def test_a_500_then_a_200_is_delivered_on_the_second_attempt_with_the_same_webhook_id(
    settings: Settings, receiver: Receiver
) -> None:
    receiver.script = _by_attempt([Answer(500, body=b"busy"), Answer(200)])

    async def scenario() -> None:
        async with open_store(settings) as store, running_promoter(store):
            uuid = await accept(store, "m", None)
            async with webhook_worker(store, settings) as worker:
                await async_wait_until(lambda: worker.stats.acked == 1, "delivered", DEADLINE)
            record = await store.record(uuid)
            assert record.state is State.DELIVERED and record.attempts == 2
            got = receiver.by_id(uuid)
            assert [a.headers["x-eat-attempt"] for a in got] == ["1", "2"]
            assert all(a.verified for a in got)

    asyncio.run(scenario())


def test_a_429_with_retry_after_2_is_retried_no_sooner_than_2_s_later(
    settings: Settings, receiver: Receiver
) -> None:
    receiver.script = _by_attempt([Answer(429, {"retry-after": "2"}), Answer(200)])

    async def scenario() -> None:
        async with open_store(settings) as store, running_promoter(store):
            uuid = await accept(store, "m", None)
            async with webhook_worker(store, settings) as worker:
                await async_wait_until(lambda: worker.stats.acked == 1, "delivered", DEADLINE)
            first, second = receiver.by_id(uuid)
            assert second.at - first.at >= 2.0, "Retry-After: 2 was honoured"
            assert (await store.record(uuid)).attempts == 2

    asyncio.run(scenario())


def test_a_410_is_dead_lettered_at_once_with_the_status_and_the_answer(
    settings: Settings, receiver: Receiver
) -> None:
    receiver.script = _by_attempt([Answer(410, body=b"this hook is gone")])
    uuid, reason, attempts = dead_lettered(settings)
    assert reason == b"HTTP 410: this hook is gone"
    assert attempts == b"1"
    assert len(receiver.by_id(uuid)) == 1


def test_5xx_every_time_is_dead_lettered_after_max_deliveries_with_status_and_first_bytes(
    settings: Settings, receiver: Receiver
) -> None:
    receiver.script = _by_attempt([Answer(503, body=b"x" * 5000)])
    uuid, reason, attempts = dead_lettered(settings)
    assert reason == b"HTTP 503: " + b"x" * 200
    assert attempts == b"3"
    assert len(receiver.by_id(uuid)) == 3


def test_a_receiver_hanging_past_the_timeout_is_retried_then_dead_lettered_as_a_timeout(
    settings: Settings, receiver: Receiver
) -> None:
    settings = dataclasses.replace(settings, webhook_timeout=0.3, max_deliveries=2)
    receiver.script = _by_attempt([Answer(200, delay=3.0)])
    uuid, reason, attempts = dead_lettered(settings)
    assert reason == b"timeout: no answer within 0.3 s"
    assert attempts == b"2"
    assert len(receiver.by_id(uuid)) == 2


def test_a_closed_port_is_retried_then_dead_lettered_as_a_network_error(
    settings: Settings,
) -> None:
    closed = f"http://127.0.0.1:{free_port()}/nobody"
    settings = dataclasses.replace(settings, webhook_url=closed, max_deliveries=2)
    _, reason, attempts = dead_lettered(settings)
    assert reason.startswith(b"network error: ConnectError"), reason
    assert attempts == b"2"


def test_a_target_that_resolves_to_a_refused_address_at_delivery_is_dead_lettered_unsent(
    settings: Settings, receiver: Receiver
) -> None:
    # The api saw a public address; by delivery the name points at loopback (DNS rebinding).
    table = {"hooks.example.com": ["93.184.216.34"]}

    async def resolve(host: str, port: int) -> list[str]:
        return table[host]

    settings = dataclasses.replace(settings, webhook_allow="*.example.com")
    policy = TargetPolicy.of(settings, resolve)
    target = f"http://hooks.example.com:{receiver.port}/in"

    asyncio.run(policy.check(target))  # what the api does: allowed
    table["hooks.example.com"] = ["127.0.0.1"]
    _, reason, attempts = dead_lettered(settings, target, policy=policy)
    assert reason == (
        b"target refused at delivery: target host hooks.example.com refused: "
        b"127.0.0.1 is a loopback address"
    )
    assert attempts == b"1"
    assert receiver.count() == 0, "never connected to"


def test_a_target_outside_the_allowlist_at_delivery_is_dead_lettered_unsent(
    settings: Settings, receiver: Receiver
) -> None:
    # Accepted while the list allowed it (or replayed after it narrowed): checked again.
    narrowed = dataclasses.replace(settings, webhook_allow="")
    _, reason, _ = dead_lettered(settings, receiver.url + "/other", worker_settings=narrowed)
    assert reason.startswith(b"target refused: target http://127.0.0.1:")
    assert receiver.count() == 0


def test_a_dead_webhook_message_replayed_is_delivered_with_its_target_and_webhook_id(
    settings: Settings, receiver: Receiver
) -> None:
    receiver.script = _by_attempt([Answer(410), Answer(200)])

    async def scenario() -> None:
        async with open_store(settings) as store, running_promoter(store):
            uuid = await accept(store, "again", receiver.url + "/replayed")
            async with webhook_worker(store, settings) as worker:
                await async_wait_until(lambda: worker.stats.dead == 1, "dead", DEADLINE)
                outcome = await Lifecycle(store).replay(uuid)
                assert outcome.kind == "done"
                await async_wait_until(lambda: worker.stats.acked == 1, "replayed", DEADLINE)
            first, second = receiver.by_id(uuid)
            assert first.path == second.path == "/replayed"
            assert second.body == b"again" and second.verified
            assert (await store.record(uuid)).state is State.DELIVERED

    asyncio.run(scenario())


def test_requests_to_one_origin_never_exceed_the_per_origin_cap(
    settings: Settings, receiver: Receiver
) -> None:
    settings = dataclasses.replace(settings, webhook_per_origin=3)
    receiver.script = _by_attempt([Answer(200, delay=0.2)])

    async def scenario() -> None:
        async with open_store(settings) as store, running_promoter(store):
            for _ in range(12):
                await accept(store, "m", None)
            async with webhook_worker(store, settings, concurrency=12) as worker:
                await async_wait_until(lambda: worker.stats.acked == 12, "delivered", DEADLINE)
        assert receiver.most_in_flight == 3

    asyncio.run(scenario())


def test_a_custom_handler_raising_delivery_failed_dead_letters_now_or_waits_not_before(
    settings: Settings,
) -> None:
    runs: dict[str, list[float]] = {}

    async def handler(delivery: Delivery) -> None:
        runs.setdefault(delivery.message, []).append(time.monotonic())
        if delivery.message == "refused":
            raise DeliveryFailed("the receiver said no", retry=False)
        if delivery.attempts == 0:
            raise DeliveryFailed("come back later", not_before=1.0)

    async def scenario() -> None:
        async with open_store(settings) as store, running_promoter(store):
            refused = await accept(store, "refused", None)
            later = await accept(store, "later", None)
            worker = Worker(store, handler, "w1", 4)
            async with running_worker(worker):
                await async_wait_until(
                    lambda: worker.stats.dead == 1 and worker.stats.acked == 1, "settled", DEADLINE
                )
            reason, attempts = await dead_reason(store, refused)
            assert (reason, attempts) == (b"the receiver said no", b"1")
            assert len(runs["refused"]) == 1
            first, second = runs["later"]
            assert second - first >= 1.0, "not_before was waited (the backoff is 0.05 s)"
            assert (await store.record(later)).state is State.DELIVERED

    asyncio.run(scenario())
