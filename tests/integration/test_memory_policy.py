"""Redis' maxmemory-policy: every process refuses an evicting one at start, unless
allowed, and finds it at run time (readiness, metric, error log) without exiting.

These tests run their own Redis (the policy is server-wide), started with
``allkeys-lru`` and switched with CONFIG SET.
"""

from __future__ import annotations

import asyncio
import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from structlog.testing import capture_logs

from app import metrics
from app.http.app import create_app
from app.model import NewMessage
from app.settings import Settings
from app.store import connect
from app.store.memory import ALLOW_SETTING, EvictingPolicyError, MemoryPolicy, read_policy
from election.scheduler import run_scheduler
from tests.aio import open_store, reap
from tests.servers import RedisServer
from tests.wait import async_wait_until, wait_until
from workers.handlers import make_echo
from workers.worker import Worker

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", "Using `httpx` with `starlette.testclient`", UserWarning)
    from starlette.testclient import TestClient

DEADLINE = 5.0


@pytest.fixture(scope="module")
def evicting_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(
        tmp_path_factory.mktemp("evicting-redis"), extra_args=["--maxmemory-policy", "allkeys-lru"]
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def policy_redis(evicting_redis: RedisServer) -> Iterator[redis.Redis]:
    """A client of that Redis, its policy put back to allkeys-lru and its ACL users and
    data removed afterwards."""
    client = redis.Redis.from_url(evicting_redis.url)
    client.config_set("maxmemory-policy", "allkeys-lru")
    try:
        yield client
    finally:
        client.config_set("maxmemory-policy", "allkeys-lru")
        with contextlib.suppress(redis.ResponseError):
            client.acl_deluser("limited")
        client.flushall()
        client.close()


def settings_for(server: RedisServer, prefix: str, **overrides) -> Settings:
    return Settings.from_env({}, redis_url=server.url, prefix=prefix, **overrides)


def exported(policy: str) -> float | None:
    return metrics.REGISTRY.get_sample_value("eat_redis_evicting_policy", {"policy": policy})


# --- the check itself --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "refused"),
    [
        ("allkeys-lru", True),
        ("allkeys-lfu", True),
        ("allkeys-random", True),
        ("noeviction", False),
        # They evict only keys with a TTL: of this service's, only the leader record.
        ("volatile-lru", False),
        ("volatile-ttl", False),
    ],
)
def test_the_start_check_refuses_exactly_the_policies_that_may_evict_this_services_keys(
    evicting_redis: RedisServer, policy_redis: redis.Redis, policy: str, refused: bool
) -> None:
    policy_redis.config_set("maxmemory-policy", policy)

    async def scenario() -> None:
        client = connect(Settings(redis_url=evicting_redis.url))
        try:
            check = MemoryPolicy(client, allow=False, interval=30)
            if refused:
                with pytest.raises(EvictingPolicyError) as caught:
                    await check.require()
                assert policy in str(caught.value) and ALLOW_SETTING in str(caught.value)
                assert not check.ready
            else:
                await check.require()
                assert check.ready
            assert exported(policy) == (1.0 if refused else 0.0)
        finally:
            await client.aclose()

    asyncio.run(scenario())


def test_an_evicting_policy_allowed_by_the_setting_runs_with_a_warning(
    evicting_redis: RedisServer, policy_redis: redis.Redis
) -> None:
    async def scenario() -> None:
        client = connect(Settings(redis_url=evicting_redis.url))
        try:
            check = MemoryPolicy(client, allow=True, interval=30)
            with capture_logs() as logs:
                await check.require()
            assert check.ready and check.evicting
            [line] = logs
            assert line["log_level"] == "warning" and line["policy"] == "allkeys-lru"
        finally:
            await client.aclose()

    asyncio.run(scenario())


def test_a_redis_that_refuses_config_get_is_read_through_info_and_one_refusing_both_is_unknown(
    evicting_redis: RedisServer, policy_redis: redis.Redis
) -> None:
    """Managed Redis services often forbid CONFIG; INFO memory names the policy too. Where
    neither answers the process runs, warned, with policy "unknown"."""
    policy_redis.acl_setuser(
        "limited", enabled=True, passwords=["+pw"], keys=["*"], commands=["+@all", "-config"]
    )
    url = evicting_redis.url.replace("redis://", "redis://limited:pw@")

    async def scenario() -> None:
        client = connect(Settings(redis_url=url))
        try:
            assert await read_policy(client) == "allkeys-lru"
            policy_redis.acl_setuser("limited", commands=["-info"])
            check = MemoryPolicy(client, allow=False, interval=30)
            with capture_logs() as logs:
                await check.require()
            assert (check.policy, check.ready) == ("unknown", True)
            assert logs[0]["log_level"] == "warning"
            assert exported("unknown") == 0.0
        finally:
            await client.aclose()

    asyncio.run(scenario())


# --- each process at start ---------------------------------------------------------------


def test_a_worker_refuses_to_start_on_an_evicting_policy_unless_allowed(
    evicting_redis: RedisServer, policy_redis: redis.Redis, prefix: str, tmp_path: Path
) -> None:
    async def scenario(fd: int) -> None:
        async with open_store(settings_for(evicting_redis, prefix)) as store:
            worker = Worker(store, make_echo("w", fd), "w")
            with pytest.raises(EvictingPolicyError, match="allkeys-lru"):
                await asyncio.wait_for(worker.run(), DEADLINE)
            assert not await store.client.exists(store.keys.stream), "it started anyway"
        allowed = settings_for(evicting_redis, prefix, allow_eviction=True)
        async with open_store(allowed) as store:
            worker = Worker(store, make_echo("w", fd), "w")
            task = asyncio.create_task(worker.run())
            try:
                await async_wait_until(
                    lambda: policy_redis.exists(store.keys.stream), "the worker", DEADLINE
                )
            finally:
                worker.stop()
                await asyncio.wait_for(task, DEADLINE)

    with open(tmp_path / "echo", "wb") as out:
        asyncio.run(scenario(out.fileno()))


def test_a_scheduler_refuses_to_start_on_an_evicting_policy_before_joining_the_election(
    evicting_redis: RedisServer, policy_redis: redis.Redis, prefix: str
) -> None:
    # No ZooKeeper at that address: the refusal comes first.
    settings = settings_for(evicting_redis, prefix, zk_hosts="127.0.0.1:1")
    with pytest.raises(EvictingPolicyError, match="allkeys-lru"):
        asyncio.run(asyncio.wait_for(run_scheduler(settings), DEADLINE))


def test_the_api_refuses_to_start_on_an_evicting_policy_and_says_why(
    evicting_redis: RedisServer, policy_redis: redis.Redis, prefix: str
) -> None:
    app = create_app(settings_for(evicting_redis, prefix))
    with pytest.raises(EvictingPolicyError, match="allkeys-lru"), TestClient(app):
        pass
    assert isinstance(app.state.refused, EvictingPolicyError)


# --- at run time ---------------------------------------------------------------------------


def test_a_policy_turned_evicting_at_run_time_makes_the_api_unready_and_back_ready(
    evicting_redis: RedisServer, policy_redis: redis.Redis, prefix: str
) -> None:
    policy_redis.config_set("maxmemory-policy", "noeviction")
    settings = settings_for(evicting_redis, prefix, memory_policy_interval=0.05)
    with TestClient(create_app(settings)) as client:
        assert client.get("/readyz").json() == {
            "status": "ok",
            "redis": True,
            "memory_policy": True,
        }
        policy_redis.config_set("maxmemory-policy", "allkeys-lfu")
        wait_until(lambda: client.get("/readyz").status_code == 503, "unready", DEADLINE)
        assert client.get("/readyz").json()["memory_policy"] is False
        metrics_text = client.get("/metrics").text
        assert 'eat_redis_evicting_policy{policy="allkeys-lfu"} 1.0' in metrics_text
        # Still serving: it only stopped saying it is ready.
        assert client.get("/healthz").status_code == 200
        policy_redis.config_set("maxmemory-policy", "noeviction")
        wait_until(lambda: client.get("/readyz").status_code == 200, "ready again", DEADLINE)


def test_a_worker_finds_an_evicting_policy_at_run_time_logs_it_and_keeps_delivering(
    evicting_redis: RedisServer, policy_redis: redis.Redis, prefix: str, tmp_path: Path
) -> None:
    """Exiting would stop it delivering what is accepted, which eviction may take next."""
    policy_redis.config_set("maxmemory-policy", "noeviction")
    settings = settings_for(evicting_redis, prefix, memory_policy_interval=0.05)

    async def scenario(fd: int) -> list[dict]:
        with capture_logs() as logs:
            async with open_store(settings) as store:
                worker = Worker(store, make_echo("w", fd), "w")
                task = asyncio.create_task(worker.run())
                try:
                    await async_wait_until(
                        lambda: worker.memory_policy.policy == "noeviction", "checked", DEADLINE
                    )
                    await store.client.config_set("maxmemory-policy", "allkeys-lru")
                    await async_wait_until(
                        lambda: not worker.memory_policy.ready, "found", DEADLINE
                    )
                    assert not task.done()
                    await store.accept(NewMessage("123e4567-e89b-12d3-a456-426614174000", "m", 1))
                    await async_wait_until(lambda: worker.stats.acked == 1, "acked", DEADLINE)
                finally:
                    worker.stop()
                    try:
                        await asyncio.wait_for(asyncio.shield(task), DEADLINE)
                    finally:
                        await reap(task)
        return logs

    with open(tmp_path / "echo", "wb") as out:
        logs = asyncio.run(scenario(out.fileno()))
    errors = [line for line in logs if line["log_level"] == "error"]
    assert errors and errors[0]["policy"] == "allkeys-lru"
    assert errors[0]["setting"] == ALLOW_SETTING
