"""End to end: each process, started through the console script on a Redis whose
maxmemory-policy may evict its data, refuses to run: exit 2, naming the policy and the
setting that would allow it (as a storage-format refusal does)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.store.memory import ALLOW_SETTING
from tests.e2e.harness import console_script
from tests.servers import RedisServer, free_port

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def evicting_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(
        tmp_path_factory.mktemp("evicting-redis"), extra_args=["--maxmemory-policy", "allkeys-lfu"]
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.parametrize("role", ["api", "scheduler", "worker"])
def test_every_process_refuses_an_evicting_redis_with_exit_2_naming_the_policy_and_setting(
    evicting_redis: RedisServer, prefix: str, tmp_path: Path, role: str
) -> None:
    args = ["--port", str(free_port())] if role == "api" else []
    env = {
        **os.environ,
        "EAT_REDIS_URL": evicting_redis.url,
        "EAT_PREFIX": prefix,
        "EAT_ZK_HOSTS": "127.0.0.1:1",  # never reached: the refusal comes first
        "EAT_LOG_FORMAT": "json",
    }
    done = subprocess.run(
        [console_script(), role, *args],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("echo-at-time: Redis' maxmemory-policy is allkeys-lfu"), last
    assert f"{ALLOW_SETTING}=true" in last
