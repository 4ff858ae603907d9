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

import asyncio
import functools
import weakref
from typing import Any, cast

import redis.asyncio as aioredis
from redis._parsers import AsyncCommandsParser
from redis.asyncio.cluster import RedisCluster
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
# lost); XGROUP CREATE is idempotent (BUSYGROUP means done). The connection's own
# set-up (HELLO, AUTH, SELECT, CLIENT, READONLY, ASKING) and subscriptions are safe too.
SAFE_TO_RETRY = frozenset(
    {
        "PING", "TIME", "INFO", "CONFIG", "SCRIPT", "TYPE", "EXISTS", "GET", "SCAN",
        "HGET", "HMGET", "HGETALL", "HLEN", "HEXISTS", "HRANDFIELD",
        "ZCARD", "ZRANGE", "ZRANGEBYSCORE", "LLEN", "LRANGE",
        "XLEN", "XRANGE", "XREVRANGE", "XINFO", "XINFO GROUPS", "XINFO CONSUMERS",
        "XPENDING", "XREADGROUP", "XGROUP CREATE",
        "HELLO", "AUTH", "SELECT", "CLIENT", "CLIENT SETNAME", "CLIENT SETINFO",
        "READONLY", "ASKING", "CLUSTER", "COMMAND",
        "SUBSCRIBE", "UNSUBSCRIBE", "PSUBSCRIBE", "PUNSUBSCRIBE", "SSUBSCRIBE",
        "SUNSUBSCRIBE",
    }
)  # fmt: skip
_LOST = (RedisConnectionError, RedisTimeoutError, OSError)
# What a command meets when another task closed its connection under it (see
# _NoBlindResend._raise_if_closed_under_us); anything else of these types is a bug.
_CLOSED_UNDER_US = (AttributeError, RuntimeError)


class OutcomeUnknown(RedisError):
    """A change reached Redis (or may have) but its reply was lost: it may or may not
    have been applied. Not retried blindly; see the module's docstring."""


def _changes(command_name: object) -> bool:
    name = command_name.decode() if isinstance(command_name, bytes) else str(command_name)
    return name.upper() not in SAFE_TO_RETRY


class _NoBlindResend:
    """Connection mixin: a change whose reply is lost raises :class:`OutcomeUnknown`.

    It works where every client path meets: the connection. ``pack_command`` and
    ``pack_commands`` note whether the request changes data; ``send_packed_command``
    takes that note before anything else it sends (a health-check PING, the
    connection's set-up) can overwrite it, and arms it once the request is written;
    ``read_response`` turns a lost reply into OutcomeUnknown while it is armed, after
    closing the connection so that a late reply cannot answer a later command.
    OutcomeUnknown is not an error redis-py's retry catches, so nothing is re-sent.
    A single command that failed while being sent was not applied (Redis runs no
    half-received command) and is retried as before; a pipeline runs its commands
    as they arrive, so a failed send of one that changes data is unknown too.
    """

    _next_request: tuple[bool, bool] = (False, False)  # (changes data, pipelined)
    _change_sent = False

    def pack_command(self, *args: Any) -> Any:
        self._next_request = (_changes(args[0]), False)
        return super().pack_command(*args)  # type: ignore[misc]

    def pack_commands(self, commands: Any) -> Any:
        commands = list(commands)
        self._next_request = (any(_changes(args[0]) for args in commands), True)
        return super().pack_commands(commands)  # type: ignore[misc]

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        changes, pipelined = self._next_request
        self._change_sent = False
        try:
            try:
                await super().send_packed_command(command, check_health)  # type: ignore[misc]
            except _CLOSED_UNDER_US as exc:
                self._raise_if_closed_under_us(exc)
                raise
        except _LOST as exc:
            if changes and pipelined:
                raise OutcomeUnknown(f"pipeline not sent whole ({type(exc).__name__})") from exc
            raise
        self._change_sent = changes

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            try:
                return await super().read_response(*args, **kwargs)  # type: ignore[misc]
            except _CLOSED_UNDER_US as exc:
                self._raise_if_closed_under_us(exc)
                raise
        except _LOST as exc:
            if not self._change_sent:
                raise
            self._change_sent = False
            await self.disconnect()  # type: ignore[attr-defined]
            raise OutcomeUnknown(f"reply lost ({type(exc).__name__})") from exc

    def _raise_if_closed_under_us(self, exc: BaseException) -> None:
        """Another task closed this connection while it carried a command: redis-py's
        cluster client disconnects every node's connections, those in use too, when it
        rebuilds its slot map after CLUSTERDOWN (a master failing over), and the command
        then fails inside the stream (no writer, or a closed transport: AttributeError,
        RuntimeError) instead of with a ConnectionError. It is a lost connection: raise it
        as one, so that it is retried, or is an outcome unknown, like any other."""
        writer = getattr(self, "_writer", None)
        if writer is None or writer.transport is None or writer.transport.is_closing():
            raise RedisConnectionError(
                f"connection closed by another task ({type(exc).__name__}: {exc})"
            ) from exc


@functools.cache
def guarded(connection_class: type) -> type:
    """``connection_class`` (plain, TLS or Unix socket) with :class:`_NoBlindResend`."""
    return type(f"Guarded{connection_class.__name__}", (_NoBlindResend, connection_class), {})


def _noted(connection_class: type, opened: weakref.WeakSet[Any]) -> type:
    """``connection_class``, adding every connection it makes to ``opened``."""

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        connection_class.__init__(self, *args, **kwargs)
        opened.add(self)

    return type(connection_class.__name__, (connection_class,), {"__init__": __init__})


def _raw_reply(response, **_options):
    return response


class StoreRedis(aioredis.Redis):
    """An asyncio Redis client whose changes are never re-sent blindly (see the module)
    and whose XREADGROUP replies come back as Redis sent them.

    redis-py turns every entry of a read into a dict; ``app.store.store.parse_entry``
    reads the raw field list at half the cost per message (the worker's hot path).
    Only ``Store.read`` sends XREADGROUP on a store's client.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.set_response_callback("XREADGROUP", _raw_reply)
        pool = self.connection_pool
        pool.connection_class = guarded(pool.connection_class)


class _CommandTableOnce(AsyncCommandsParser):
    """redis-py's command table, read once.

    The cluster client reads the table (COMMAND) from its default node, the first master
    of its slot map, on every refresh of that map, and fails the refresh, so every
    command of every partition, when that node is the master that just died: until the
    failover takes it out of the map, nothing at all is served. The table does not change
    with the topology; the node is still updated (it answers COMMAND GETKEYS).
    """

    async def initialize(self, node: Any = None) -> None:
        if node is not None:
            self.node = node
        if not self.commands:
            await super().initialize(node)


class StoreCluster(RedisCluster):
    """:class:`StoreRedis` for a Redis Cluster: the same guarded connections (on every
    node it learns about, now and after a failover) and raw XREADGROUP replies. Every
    script a store sends touches one partition's keys, so one slot: the cluster client
    routes it to that slot's master, follows MOVED and ASK during a reshard, and loads a
    script on a node that answers NOSCRIPT (a restarted master, a promoted replica).

    :meth:`aclose` closes every connection the client opened. redis-py's closes none
    while the client is marked for a new slot map (it is, from any connection error or
    timeout until the next command), nor those of nodes a refresh dropped: their
    sockets were left open until the garbage collector found them. It is not final:
    redis-py calls it itself to start afresh (CLUSTERDOWN, a slot not covered), and the
    next command builds the slot map and connects again.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.set_response_callback("XREADGROUP", _raw_reply)
        self._opened: weakref.WeakSet[Any] = weakref.WeakSet()
        # Nodes discovered later are built from these kwargs; the seeds exist already.
        connection_class = _noted(guarded(self.connection_kwargs["connection_class"]), self._opened)
        self.connection_kwargs["connection_class"] = connection_class
        for node in self.startup_nodes:
            node.connection_class = connection_class
        self.commands_parser = _CommandTableOnce()

    async def aclose(self) -> None:
        try:
            await super().aclose()
        finally:
            still_open = [c for c in list(self._opened) if c.is_connected]
            await asyncio.gather(*(c.disconnect() for c in still_open), return_exceptions=True)

    async def _determine_slot(self, command: str, *args: Any) -> int:
        # Store.read names one stream (... STREAMS <key> <id>): its slot is that key's.
        # redis-py would ask the default node (COMMAND GETKEYS) on every read, a round trip
        # that fails while that node is a dead master.
        if command.upper() == "XREADGROUP" and len(args) >= 3 and args[-3] == "STREAMS":
            return self.keyslot(args[-2])
        return await super()._determine_slot(command, *args)


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


async def open_client(settings: Settings, **kwargs: Any) -> StoreRedis | StoreCluster:
    """A connected client for ``settings``: a cluster client when EAT_REDIS_CLUSTER says
    so, or (``auto``) when the server at EAT_REDIS_URL reports ``cluster_enabled:1``.

    Raises a RedisError (or OSError) when Redis cannot be reached to find out: the
    caller retries, as it does for every start-up check.
    """
    cluster = settings.redis_cluster == "true"
    if settings.redis_cluster == "auto":
        probe = connect(settings, **kwargs)
        try:
            cluster = (await probe.info("cluster")).get("cluster_enabled") == 1
        finally:
            await probe.aclose()
    if not cluster:
        return connect(settings, **kwargs)
    # redis-py holds at most 100 connections per node by default, and refuses more
    # (MaxConnectionsError): a worker keeps one blocking read per partition on its
    # partition's master, so leave room for every partition besides the usual 100.
    kwargs.setdefault("max_connections", 100 + settings.partitions)
    kwargs.setdefault("socket_connect_timeout", 1.0)
    kwargs.setdefault("socket_timeout", 5.0)
    if settings.redis_ca_file:
        kwargs.setdefault("ssl_ca_certs", settings.redis_ca_file)
    client = StoreCluster.from_url(settings.redis_url, decode_responses=False, **kwargs)
    # Before any concurrent use: concurrent first commands race the slot map
    # (redis-py #3935: intermittent NoScript and IndexError).
    await client.initialize()
    return client
