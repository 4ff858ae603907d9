"""The Redis client every Store runs on: redis-py's asyncio client with the store's
connection defaults and its one reply-handling change, owned here rather than
patched onto a client from outside.
"""

from __future__ import annotations

from typing import Any, cast

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff

from app.settings import Settings


def _raw_reply(response, **_options):
    return response


class StoreRedis(aioredis.Redis):
    """An asyncio Redis client whose XREADGROUP replies come back as Redis sent them.

    redis-py turns every entry of a read into a dict; ``app.store.store.parse_entry``
    reads the raw field list at half the cost per message (the worker's hot path).
    Only ``Store.read`` sends XREADGROUP on a store's client.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.set_response_callback("XREADGROUP", _raw_reply)


def connect(settings: Settings, **kwargs: Any) -> StoreRedis:
    """A client that returns bytes.

    It retries a failed command twice, quickly, then lets the error out: the API
    must answer 503 in about a second, not after redis-py's default ten retries,
    and the loops of the scheduler and the worker have their own backoff. Every
    script is safe to repeat (accept is idempotent by uuid, promote and ack move
    nothing twice).
    """
    kwargs.setdefault("retry", Retry(ExponentialWithJitterBackoff(base=0.01, cap=0.1), 2))
    kwargs.setdefault("socket_connect_timeout", 1.0)
    kwargs.setdefault("socket_timeout", 5.0)
    kwargs.setdefault("health_check_interval", 15)
    if settings.redis_ca_file:
        kwargs.setdefault("ssl_ca_certs", settings.redis_ca_file)
    # from_url builds an instance of the class it is called on; its annotation says Redis.
    return cast(
        StoreRedis, StoreRedis.from_url(settings.redis_url, decode_responses=False, **kwargs)
    )
