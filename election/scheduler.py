"""The scheduler process: join the election; while leading, promote."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket

from redis.exceptions import RedisError

from app import metrics
from app.health import maybe_start
from app.log import get_logger
from app.settings import Settings
from app.store import Store, connect
from app.store.keys import LegacyLists
from election.bridge import LegacyBridge
from election.gate import LeadershipGate, Role
from election.leadership import LeaderElection
from election.promoter import Promoter, listen_for_wakeups

log = get_logger("scheduler")


def default_identifier() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


async def _format_checked(store: Store, stop: asyncio.Event) -> bool:
    """Wait for Redis to confirm its data is in this release's format (False: stopped first).

    StorageFormatError goes up: the process must not run against data it would misread.
    """
    delay = 0.05
    while not stop.is_set():
        try:
            await store.check_format()
            return True
        except (RedisError, OSError) as exc:
            log.warning("redis unavailable, retrying", error=type(exc).__name__)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            delay = min(delay * 2, 2.0)
    return False


async def run_scheduler(settings: Settings, identifier: str | None = None) -> None:
    """Run until SIGTERM/SIGINT; a leader hands over by deleting its election node."""
    identifier = identifier or default_identifier()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    client = connect(settings)
    store = Store(client, settings, identifier=identifier)
    if not await _format_checked(store, stop):
        await client.aclose()
        return
    gate = LeadershipGate()
    promoter = Promoter(store, gate)
    # The legacy list bridge works only while this process leads (the gate is open).
    bridge = LegacyBridge(store, gate, LegacyLists.of(settings)) if settings.legacy_bridge else None

    def export_role() -> None:
        metrics.LEADER.set(1 if gate.is_open else 0)
        metrics.EPOCH.set(gate.epoch or 0)

    gate.on_change(export_role)

    def report(role: Role, epoch: int | None) -> None:
        loop.call_soon_threadsafe(gate.set_role, role, epoch)

    election = LeaderElection(
        settings.zk_hosts,
        store.keys.zk_election,
        identifier,
        settings.zk_session_timeout,
        report,
        auth=settings.zk_auth or None,
    )

    async def ready() -> dict[str, bool]:
        return {"redis": await store.answers(), "zookeeper": election.client.connected}

    log.info("scheduler starting", identifier=identifier, path=store.keys.zk_election)
    election.start()
    health = await maybe_start(settings.health_host, settings.health_port, ready, store.queue_stats)
    tasks = [
        asyncio.create_task(promoter.run(), name="promoter"),
        asyncio.create_task(listen_for_wakeups(store, promoter), name="wakeups"),
    ]
    if bridge is not None:
        tasks.append(asyncio.create_task(bridge.run(), name="legacy-bridge"))
    try:
        await stop.wait()
    finally:
        log.info("scheduler stopping", identifier=identifier)
        promoter.stop()
        if bridge is not None:
            bridge.stop()
        gate.set_role(Role.FOLLOWER)
        await loop.run_in_executor(None, election.stop)
        # Both loops end on their own once stopping; cancellation is the fallback, repeated
        # because Python 3.11's wait_for (inside redis-py) can swallow a cancel.
        _, pending = await asyncio.wait(tasks, timeout=2.0)
        while pending:
            for task in pending:
                task.cancel()
            _, pending = await asyncio.wait(pending, timeout=0.5)
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                task.result()
        if health is not None:
            await health.stop()
        await client.aclose()
        log.info(
            "scheduler stopped",
            promoted=promoter.stats.moved,
            refused=promoter.stats.refused,
        )
