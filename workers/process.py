"""The worker process: signals, Redis connection, one Worker."""

from __future__ import annotations

import asyncio
import os
import signal
import socket

from app.health import maybe_start, redis_ready
from app.settings import Settings
from app.store import Store, connect
from workers.handlers import load_handler
from workers.worker import Worker


def default_consumer_name() -> str:
    """Unique per process and stable for its life: host name and pid."""
    return f"{socket.gethostname()}-{os.getpid()}"


async def run_worker(
    settings: Settings, consumer: str | None, concurrency: int, handler_spec: str
) -> None:
    consumer = consumer or default_consumer_name()
    handler = load_handler(handler_spec, consumer)
    client = connect(settings)
    worker = Worker(Store(client, settings), handler, consumer, concurrency)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    store = worker.store

    async def ready() -> dict[str, bool]:
        return {"redis": await redis_ready(store)}

    health = await maybe_start(settings.health_host, settings.health_port, store, ready)
    try:
        await worker.run()
    finally:
        if health is not None:
            await health.stop()
        await client.aclose()
