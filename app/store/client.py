"""The Redis client every Store runs on: redis-py's asyncio client with the store's
connection defaults and its reply handling, owned here rather than patched onto a
client from outside.

**A lost reply is not retried.** redis-py retries a command after a connection
error or a timeout. For a read that is harmless; for a change it is not: a
script whose reply was lost has already run, and running it again answers for
the second run (a message accepted a moment ago reads as a duplicate, a cancel
that worked as "already cancelled"). So a command or pipeline that may change
data, once sent, is not retried: :class:`OutcomeUnknown` says it may or may not
have been applied, and the caller says so (the api answers 503 "outcome
unknown, retry with the same uuid": every change the api makes is idempotent by
uuid or reports the state it finds). A failure before anything was sent
(connecting, a write that did not complete: Redis runs no half-received command)
is retried as before. Reads are retried whatever happened.
"""

from __future__ import annotations

from typing import Any, cast

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from app.settings import Settings

# Commands the service sends that change nothing (or nothing that a second run would
# report differently): retried after a lost reply like any read. Everything else is a
# change. XREADGROUP is here although it delivers: entries a lost reply delivered stay
# pending for this consumer and are reclaimed after the visibility timeout (late, not
# lost); XGROUP CREATE is idempotent (BUSYGROUP means done).
SAFE_TO_RETRY = frozenset(
    {
        "PING", "TIME", "INFO", "CONFIG", "SCRIPT", "TYPE", "EXISTS", "GET", "SCAN",
        "HGET", "HMGET", "HGETALL", "HLEN", "HEXISTS", "HRANDFIELD",
        "ZCARD", "ZRANGE", "ZRANGEBYSCORE", "LLEN", "LRANGE",
        "XLEN", "XRANGE", "XREVRANGE", "XINFO", "XINFO GROUPS", "XINFO CONSUMERS",
        "XPENDING", "XREADGROUP", "XGROUP CREATE",
    }
)  # fmt: skip
_LOST = (RedisConnectionError, RedisTimeoutError, OSError)


class OutcomeUnknown(RedisError):
    """A change reached Redis (or may have) but its reply was lost: it may or may not
    have been applied. Not retried blindly; see the module's docstring."""


def _changes(command_name: object) -> bool:
    name = command_name.decode() if isinstance(command_name, bytes) else str(command_name)
    return name.upper() not in SAFE_TO_RETRY


def _raw_reply(response, **_options):
    return response


class StorePipeline(Pipeline):
    """A pipeline that does not re-send changes whose replies were lost.

    Pipelined commands run as they arrive, so even a failed send may have applied
    some of them: once any command in it changes data, a lost reply means
    :class:`OutcomeUnknown`. The connection is closed first, so no late reply can be
    read as the answer to a later command.
    """

    async def _execute_pipeline(self, connection, commands, raise_on_error):
        try:
            return await super()._execute_pipeline(connection, commands, raise_on_error)
        except _LOST as exc:
            raise await _unknown_if_changed(connection, commands, exc) from exc

    async def _execute_transaction(self, connection, commands, raise_on_error):
        try:
            return await super()._execute_transaction(connection, commands, raise_on_error)
        except _LOST as exc:
            raise await _unknown_if_changed(connection, commands, exc) from exc


async def _unknown_if_changed(connection, commands, exc: BaseException) -> BaseException:
    if not any(_changes(args[0]) for args, _options in commands):
        return exc  # reads only: redis-py's retry may send them again
    await connection.disconnect()
    return OutcomeUnknown(f"pipeline reply lost ({type(exc).__name__}): outcome unknown")


class StoreRedis(aioredis.Redis):
    """An asyncio Redis client whose XREADGROUP replies come back as Redis sent them.

    redis-py turns every entry of a read into a dict; ``app.store.store.parse_entry``
    reads the raw field list at half the cost per message (the worker's hot path).
    Only ``Store.read`` sends XREADGROUP on a store's client.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.set_response_callback("XREADGROUP", _raw_reply)

    def pipeline(self, transaction: bool = True, shard_hint: str | None = None) -> StorePipeline:
        return StorePipeline(self.connection_pool, self.response_callbacks, transaction, shard_hint)

    async def _send_command_parse_response(self, conn, command_name, *args, **options):
        if not _changes(command_name):
            return await super()._send_command_parse_response(conn, command_name, *args, **options)
        # A failure here (connecting, writing) left nothing applied: redis-py retries it.
        await conn.send_command(*args)
        try:
            return await self.parse_response(conn, command_name, **options)
        except _LOST as exc:
            # Sent, no reply: close the connection (a late reply must not answer the next
            # command) and say so instead of running the change a second time.
            await conn.disconnect()
            raise OutcomeUnknown(f"{command_name} reply lost ({type(exc).__name__})") from exc


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
