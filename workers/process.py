"""The worker process: signals, Redis connection (a Redis Cluster client when the server
is one), the partitions, one Worker reading every partition."""

from __future__ import annotations

import asyncio
import os
import signal
import socket

from redis.exceptions import ConnectionError as RedisConnectionError

from app.backoff import Stopped, until_done
from app.health import maybe_start
from app.httpserver import HttpLimits
from app.settings import Settings
from app.store import open_client
from app.store.history import HistoryRecorder
from app.store.keys import LegacyLists
from app.store.partitions import Partitions
from workers.handlers import HandlerSpecError, load_handler
from workers.worker import Worker


def default_consumer_name() -> str:
    """Unique per process and stable for its life: host name and pid."""
    return f"{socket.gethostname()}-{os.getpid()}"


def check_list_name(settings: Settings, handler_spec: str, list_name: str | None) -> str | None:
    """The list the ``list`` handler pushes onto: ``--list-name``, else EAT_LEGACY_QUEUE.

    Refused while the legacy bridge runs on that list: the bridge would take every
    pushed message back (as a duplicate) before an old consumer could see it.
    """
    if handler_spec != "list":
        return list_name
    name = list_name or settings.legacy_queue
    lists = LegacyLists.of(settings)
    if settings.legacy_bridge and name in (lists.queue, lists.delayed, lists.in_flight):
        raise HandlerSpecError(
            f"--list-name {name!r} is a legacy list the bridge reads while EAT_LEGACY_BRIDGE "
            "is true; set EAT_LEGACY_BRIDGE=false (producers use the API) or choose another "
            "--list-name"
        )
    return name


async def run_worker(
    settings: Settings,
    consumer: str | None,
    concurrency: int,
    handler_spec: str,
    list_name: str | None = None,
    *,
    handler_timeout: float | None = None,
) -> None:
    """Run one worker until SIGTERM/SIGINT; TaskDied goes up when one of its loops died,
    StorageFormatError or EvictingPolicyError when it must not start."""
    consumer = consumer or default_consumer_name()
    list_name = check_list_name(settings, handler_spec, list_name)
    built: list[Worker] = []
    # The list handler shares the worker's client; it asks for it on first use.
    handler = load_handler(
        handler_spec,
        consumer,
        redis_factory=lambda: built[0].store.client,
        list_name=list_name,
        settings=settings,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # Health is served from the start, while Redis may not answer yet (liveness holds,
    # readiness says redis: false), as it was before the client had to be connected to
    # be built (a cluster client learns the slot map first).

    async def ready() -> dict[str, bool]:
        if not built:
            return {"redis": False, "memory_policy": True}
        worker = built[0]
        return {
            "redis": await worker.partitions.answers(),
            "memory_policy": worker.memory_policy.ready,
        }

    async def figures():
        if not built:
            raise RedisConnectionError("not connected to Redis yet")
        return await built[0].partitions.each_queue_stats()

    limits = HttpLimits.of(settings)
    health = await maybe_start(settings.health_host, settings.health_port, ready, figures, limits)
    try:
        await _run(settings, handler, consumer, concurrency, handler_timeout, stop, built)
    finally:
        close = getattr(handler, "aclose", None)  # the webhook handler's connections
        if close is not None:
            await close()
        if health is not None:
            await health.stop()


async def _run(
    settings: Settings,
    handler,
    consumer: str,
    concurrency: int,
    handler_timeout: float | None,
    stop: asyncio.Event,
    built: list[Worker],
) -> None:
    try:
        client = await until_done(lambda: open_client(settings), stop, "connecting to Redis")
    except Stopped:
        return
    try:
        worker = Worker(
            Partitions(client, settings),
            handler,
            consumer,
            concurrency,
            handler_timeout=handler_timeout or settings.handler_timeout,
            history=HistoryRecorder(client, settings.prefix),
        )
        built.append(worker)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, worker.stop)
        if stop.is_set():
            worker.stop()
        await worker.run()
    finally:
        await client.aclose()
