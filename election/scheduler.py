"""The scheduler process: join the election; while leading, promote (and bridge the
legacy lists).

Its loops (promoter, wake-up listener, legacy bridge, the periodic check of Redis'
maxmemory-policy) run under one
:class:`~app.supervise.Supervisor`: if one of them dies, the process leaves the
election at once (deleting its node, so another scheduler leads without waiting
for the session to expire) and :func:`run_scheduler` raises
:class:`~app.supervise.TaskDied`, which ends the process non-zero.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket

from app import metrics
from app.backoff import Stopped, until_done
from app.health import maybe_start
from app.httpserver import HttpLimits
from app.log import get_logger
from app.settings import Settings
from app.store import Store, connect
from app.store.keys import LegacyLists
from app.store.memory import MemoryPolicy
from app.supervise import Supervisor
from election.bridge import LegacyBridge
from election.gate import LeadershipGate, Role
from election.leadership import LeaderElection
from election.promoter import Promoter, listen_for_wakeups

log = get_logger("scheduler")

STOP_GRACE = 2.0  # seconds the loops get to end by themselves once told to stop


def default_identifier() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


async def run_scheduler(settings: Settings, identifier: str | None = None) -> None:
    """Run until SIGTERM/SIGINT; a leader hands over by deleting its election node.

    StorageFormatError (data this release would misread), EvictingPolicyError (a Redis
    that may evict this service's data) and TaskDied (a loop died) go up: the caller
    exits non-zero.
    """
    identifier = identifier or default_identifier()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    client = connect(settings)
    try:
        store = Store(client, settings, identifier=identifier)
        memory_policy = MemoryPolicy(
            client, settings.allow_eviction, settings.memory_policy_interval
        )
        try:
            await until_done(store.check_format, stop, "storage format check")
            await until_done(memory_policy.require, stop, "maxmemory-policy check")
        except Stopped:
            return
        await _lead_while_elected(settings, store, memory_policy, identifier, stop)
    finally:
        await client.aclose()


async def _lead_while_elected(
    settings: Settings,
    store: Store,
    memory_policy: MemoryPolicy,
    identifier: str,
    stop: asyncio.Event,
) -> None:
    loop = asyncio.get_running_loop()
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
        return {
            "redis": await store.answers(),
            "zookeeper": election.client.connected,
            "memory_policy": memory_policy.ready,
        }

    log.info("scheduler starting", identifier=identifier, path=store.keys.zk_election)
    supervisor = Supervisor("scheduler", stop)
    election.start()
    health = None
    try:
        health = await maybe_start(
            settings.health_host,
            settings.health_port,
            ready,
            store.queue_stats,
            HttpLimits.of(settings),
        )
        supervisor.spawn(promoter.run(), "promoter")
        supervisor.spawn(listen_for_wakeups(store, promoter), "wakeups")
        supervisor.spawn(memory_policy.watch(stop), "memory-policy")
        if bridge is not None:
            supervisor.spawn(bridge.run(), "legacy-bridge")
        await supervisor.wait()
    finally:
        log.info("scheduler stopping", identifier=identifier)
        stop.set()  # for the loops that end on it (a loop that died got here without it)
        promoter.stop()
        if bridge is not None:
            bridge.stop()
        gate.set_role(Role.FOLLOWER)
        # Leaving the election deletes this contender's node: if it led, another scheduler
        # leads now rather than after the session timeout.
        await loop.run_in_executor(None, election.stop)
        await supervisor.close(STOP_GRACE)
        if health is not None:
            await health.stop()
        log.info(
            "scheduler stopped",
            promoted=promoter.stats.moved,
            refused=promoter.stats.refused,
            failed=supervisor.failed is not None,
        )
