"""Fixtures of the tests that drive the scripts through Store on a private event loop."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from app.store.keys import Keyspace
from tests.aio import Harness


@pytest.fixture
def h(redis_url: str, prefix: str, redis_client: redis.Redis) -> Iterator[Harness]:
    # redis_client is requested so the test's keys are deleted afterwards.
    harness = Harness(redis_url, prefix)
    try:
        yield harness
    finally:
        harness.close()


@pytest.fixture
def ks(prefix: str) -> Keyspace:
    return Keyspace(prefix)


@pytest.fixture
def r(redis_client: redis.Redis) -> redis.Redis:
    return redis_client
