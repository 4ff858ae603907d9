"""The worker process: signals, Redis connection, one Worker."""

from __future__ import annotations

import asyncio
import os
import signal
import socket

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
    try:
        await worker.run()
    finally:
        await client.aclose()
