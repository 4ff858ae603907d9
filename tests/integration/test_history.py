"""The per-minute history against the real Redis: what a recorder files, when, under which
minute, for how long, and what a failed flush leaves for the next one."""

from __future__ import annotations

import asyncio

import pytest
import redis

from app.settings import Settings
from app.store import connect
from app.store.history import KEEP_S, HistoryRecorder, read_history
from app.store.keys import Keyspace
from tests.aio import reap
from tests.wait import async_wait_until

MINUTE = 29_000_000  # an epoch minute (2025-02-19): tests file under it, whatever the time


class Totals:
    """A process' running totals, as app.metrics.history_totals gives them."""

    def __init__(self) -> None:
        self.values: dict[str, float] = {}

    def add(self, **amounts: float) -> None:
        for name, amount in amounts.items():
            self.values[name] = self.values.get(name, 0.0) + amount

    def __call__(self) -> dict[str, float]:
        return dict(self.values)


@pytest.fixture
def settings(redis_url: str, prefix: str) -> Settings:
    return Settings.from_env({}, redis_url=redis_url, prefix=prefix)


def run(coro):
    return asyncio.run(coro)


def test_a_flush_files_what_grew_since_the_last_one_under_the_minute(
    settings: Settings, redis_client: redis.Redis
) -> None:
    totals = Totals()
    key = Keyspace(settings.prefix).history(MINUTE)

    async def go() -> list[int]:
        client = connect(settings)
        recorder = HistoryRecorder(client, settings.prefix, totals)
        try:
            totals.add(accepted=3, delivered=2, **{"late:0.005": 2})
            first = await recorder.flush(MINUTE)
            totals.add(accepted=4)
            second = await recorder.flush(MINUTE)
            third = await recorder.flush(MINUTE)
            return [first, second, third]
        finally:
            await client.aclose()

    assert run(go()) == [3, 1, 0]
    assert redis_client.hgetall(key) == {b"accepted": b"7", b"delivered": b"2", b"late:0.005": b"2"}
    assert KEEP_S - 5 < redis_client.ttl(key) <= KEEP_S


def test_what_was_counted_before_the_recorder_started_is_not_filed(
    settings: Settings, redis_client: redis.Redis
) -> None:
    totals = Totals()
    totals.add(accepted=40)  # another app of this process, before this one started

    async def go() -> int:
        client = connect(settings)
        try:
            recorder = HistoryRecorder(client, settings.prefix, totals)
            totals.add(accepted=2)
            return await recorder.flush(MINUTE)
        finally:
            await client.aclose()

    assert run(go()) == 1
    assert redis_client.hget(Keyspace(settings.prefix).history(MINUTE), "accepted") == b"2"


def test_nothing_is_written_while_nothing_was_counted(
    settings: Settings, redis_client: redis.Redis
) -> None:
    async def go() -> int:
        client = connect(settings)
        try:
            return await HistoryRecorder(client, settings.prefix, Totals()).flush(MINUTE)
        finally:
            await client.aclose()

    assert run(go()) == 0
    assert not redis_client.exists(Keyspace(settings.prefix).history(MINUTE))


def test_what_a_failed_flush_held_goes_with_the_next_one(
    settings: Settings, redis_url: str, redis_client: redis.Redis
) -> None:
    totals = Totals()
    down = Settings.from_env({}, redis_url="redis://127.0.0.1:1/0", prefix=settings.prefix)

    async def go() -> None:
        dead_client = connect(down)
        recorder = HistoryRecorder(dead_client, settings.prefix, totals)
        totals.add(delivered=5)
        try:
            with pytest.raises((redis.exceptions.ConnectionError, OSError)):
                await recorder.flush(MINUTE)
        finally:
            await dead_client.aclose()
        recorder.client = connect(settings)  # Redis is back
        try:
            totals.add(delivered=1)
            await recorder.flush(MINUTE + 1)
        finally:
            await recorder.client.aclose()

    run(go())
    keys = Keyspace(settings.prefix)
    assert redis_client.hget(keys.history(MINUTE + 1), "delivered") == b"6"
    assert not redis_client.exists(keys.history(MINUTE))


def test_the_history_reads_the_last_hour_oldest_first_with_empty_minutes_as_zeros(
    settings: Settings, redis_client: redis.Redis
) -> None:
    keys = Keyspace(settings.prefix)
    redis_client.hset(keys.history(MINUTE), mapping={"accepted": 4, "late:0.002": 4})
    redis_client.hset(keys.history(MINUTE - 59), mapping={"dead": 1})
    redis_client.hset(keys.history(MINUTE - 60), mapping={"dead": 9})  # over an hour ago

    async def go():
        client = connect(settings)
        try:
            return await read_history(client, settings.prefix, MINUTE * 60 + 59.9)
        finally:
            await client.aclose()

    minutes = run(go())
    assert [m.start for m in minutes] == [(MINUTE - 59 + i) * 60 for i in range(60)]
    assert minutes[0].dead == 1
    assert minutes[-1].accepted == 4
    assert minutes[-1].lateness_quantile(0.5) == pytest.approx(0.0015)  # mid (1 ms, 2 ms]
    assert sum(m.dead for m in minutes) == 1
    assert all(m.accepted == 0 for m in minutes[:-1])


def test_a_running_recorder_flushes_on_its_ticks_and_stops(
    settings: Settings, redis_client: redis.Redis
) -> None:
    totals = Totals()
    keys = Keyspace(settings.prefix)

    async def go() -> None:
        client = connect(settings)
        recorder = HistoryRecorder(client, settings.prefix, totals, interval=0.1)
        stopping = asyncio.Event()
        task = asyncio.create_task(recorder.run(stopping))
        try:
            totals.add(failed=2)

            def filed() -> int:
                return sum(
                    int(redis_client.hget(key, "failed") or 0)
                    for key in redis_client.scan_iter(match=f"{{{settings.prefix}}}:history:*")
                )

            await async_wait_until(lambda: filed() == 2, "the tick's flush", 5)
            stopping.set()
            await asyncio.wait_for(task, 2)
            totals.add(failed=1)
            await recorder.close()  # the owner's last flush, once it counted everything
            assert filed() == 3
        finally:
            await reap(task)
            await client.aclose()

    run(go())
    assert keys.history(0).startswith("{" + settings.prefix + "}:history:")


def test_an_interval_that_does_not_divide_a_minute_is_refused() -> None:
    with pytest.raises(ValueError):
        HistoryRecorder(None, "p", Totals(), interval=7)
