"""The scheduler process: join the election; while leading, promote (and bridge the
legacy lists).

One election, one leader, every partition: the leader runs one promoter per
partition, concurrently (a slow or failing master holds up its own partitions
only), one wake-up listener for all of them, and the legacy bridge, which accepts
each item into its uuid's partition.

Its loops (promoters, wake-up listener, the schedules' materialiser, legacy bridge,
the periodic check of Redis' maxmemory-policy) run under one
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
from app.store import StoreCluster, open_client
from app.store.keys import LegacyLists
from app.store.memory import MemoryPolicy
from app.store.partitions import Partitions
from app.store.schedules import Schedules
from app.supervise import Supervisor
from election.bridge import LegacyBridge, check_lists_share_a_slot
from election.gate import LeadershipGate, Role
from election.leadership import LeaderElection
from election.materialiser import Materialiser
from election.promoter import Promoter, wake_promoters

log = get_logger("scheduler")

STOP_GRACE = 2.0  # seconds the loops get to end by themselves once told to stop


def default_identifier() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


async def run_scheduler(settings: Settings, identifier: str | None = None) -> None:
    """Run until SIGTERM/SIGINT; a leader hands over by deleting its election node.

    StorageFormatError (data this release would misread, or another partition count),
    EvictingPolicyError (a Redis that may evict this service's data), LegacyListsError
    (legacy lists a cluster cannot bridge) and TaskDied (a loop died) go up: the caller
    exits non-zero.
    """
    identifier = identifier or default_identifier()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    try:
        client = await until_done(lambda: open_client(settings), stop, "connecting to Redis")
    except Stopped:
        return
    try:
        partitions = Partitions(client, settings, identifier=identifier)
        memory_policy = MemoryPolicy(
            client, settings.allow_eviction, settings.memory_policy_interval
        )
        if settings.legacy_bridge and isinstance(client, StoreCluster):
            check_lists_share_a_slot(LegacyLists.of(settings))
        try:
            await until_done(partitions.check, stop, "storage format check")
            await until_done(memory_policy.require, stop, "maxmemory-policy check")
        except Stopped:
            return
        await _lead_while_elected(settings, partitions, memory_policy, identifier, stop)
    finally:
        await client.aclose()


async def _lead_while_elected(
    settings: Settings,
    partitions: Partitions,
    memory_policy: MemoryPolicy,
    identifier: str,
    stop: asyncio.Event,
) -> None:
    loop = asyncio.get_running_loop()
    gate = LeadershipGate()
    promoters = [Promoter(store, gate) for store in partitions]
    # Recurring schedules: their next occurrences become delayed messages, while leading.
    materialiser = Materialiser(Schedules(partitions), gate, settings.schedule_catchup)
    keys = partitions.stores[0].keys
    # The legacy list bridge works only while this process leads (the gate is open).
    bridge = (
        LegacyBridge(partitions, gate, LegacyLists.of(settings)) if settings.legacy_bridge else None
    )

    def export_role() -> None:
        metrics.LEADER.set(1 if gate.is_open else 0)
        metrics.EPOCH.set(gate.epoch or 0)

    gate.on_change(export_role)

    def report(role: Role, epoch: int | None) -> None:
        loop.call_soon_threadsafe(gate.set_role, role, epoch)

    election = LeaderElection(
        settings.zk_hosts,
        keys.zk_election,
        identifier,
        settings.zk_session_timeout,
        report,
        auth=settings.zk_auth or None,
    )

    async def ready() -> dict[str, bool]:
        return {
            "redis": await partitions.answers(),
            "zookeeper": election.client.connected,
            "memory_policy": memory_policy.ready,
        }

    log.info(
        "scheduler starting",
        identifier=identifier,
        path=keys.zk_election,
        partitions=partitions.count,
    )
    supervisor = Supervisor("scheduler", stop)
    election.start()
    health = None
    try:
        health = await maybe_start(
            settings.health_host,
            settings.health_port,
            ready,
            partitions.each_queue_stats,
            HttpLimits.of(settings),
        )
        for promoter in promoters:
            name = "promoter" if len(promoters) == 1 else f"promoter-{promoter.store.partition}"
            supervisor.spawn(promoter.run(), name)
        supervisor.spawn(wake_promoters(partitions.client, promoters), "wakeups")
        supervisor.spawn(materialiser.run(), "schedules")
        supervisor.spawn(memory_policy.watch(stop), "memory-policy")
        if bridge is not None:
            supervisor.spawn(bridge.run(), "legacy-bridge")
        await supervisor.wait()
    finally:
        log.info("scheduler stopping", identifier=identifier)
        stop.set()  # for the loops that end on it (a loop that died got here without it)
        for promoter in promoters:
            promoter.stop()
        materialiser.stop()
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
            promoted=sum(p.stats.moved for p in promoters),
            refused=sum(p.stats.refused for p in promoters),
            occurrences=materialiser.stats.produced,
            failed=supervisor.failed is not None,
        )
