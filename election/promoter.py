"""The promotion loop: when to call the promote script (policy).

"Move what is due" is one script call (``Store.promote``); this loop decides
when to make it: at once after a full batch, else when the earliest remaining
message falls due, or when woken (a new earliest message, a leadership
change). The sleep is timed here, in Python, from durations Redis reports
(next due minus Redis' own now), so neither this host's clock nor Redis' 100 ms
``hz`` tick for blocking-command timeouts shows up as lateness.

With several partitions the leader runs one Promoter per partition, each its own
task with its own sleep and backoff, all behind the one leadership gate: a
partition whose master is slow or failing backs off alone while the others keep
their time. Each call carries the leader's epoch; each partition fences with its
own stored epoch, and one refusal (a newer leader exists) closes the gate for all.
One subscription (:func:`wake_promoters`) listens on every partition's wake
channel and pokes the promoter whose partition it names.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

from app import metrics
from app.backoff import RETRIED, Backoff, describe
from app.log import get_logger
from app.store import Store
from election.gate import LeadershipGate
from election.wakeable import WakeableLoop

log = get_logger("promoter")


@dataclass
class PromoterStats:
    calls: int = 0
    moved: int = 0
    refused: int = 0
    errors: int = 0


class Promoter(WakeableLoop):
    """
    :param store: the Redis client whose ``promote`` moves due messages.
    :param gate: opens with an epoch while this process leads.
    :param max_idle: longest sleep without a due time or a wake-up, seconds: a
        safety net for a lost pub/sub message, not the timing mechanism. Each
        promote call also refreshes the leader record (``Keyspace.leader``,
        TTL ``LEADER_TTL_MS``), so keep this well below that TTL.
    """

    def __init__(self, store: Store, gate: LeadershipGate, max_idle: float = 1.0) -> None:
        super().__init__()
        self.store = store
        self.gate = gate
        self.max_idle = max_idle
        self.stats = PromoterStats()
        # Log lines name the partition when there are several.
        partitioned = store.keys.partition is not None
        self.log = log.bind(partition=store.partition) if partitioned else log
        gate.on_change(self.poke)

    async def run(self) -> None:
        """Until stopped. Redis errors are retried with a backoff; any other exception
        ends the task, and with it the process (it is supervised)."""
        backoff = Backoff(0.05, 1.0)
        while not self.stopping:
            self.rearm()
            if not self.gate.is_open:
                await self.pause(None)
                continue
            epoch = self.gate.epoch
            try:
                result = await self.store.promote(epoch)
            except RETRIED as exc:
                self.stats.errors += 1
                delay = backoff.next()
                self.log.warning("promote failed", error=describe(exc), retry_in=delay)
                await self.pause(delay)
                continue
            backoff.reset()
            self.stats.calls += 1
            if result.refused_by is not None:
                self.stats.refused += 1
                metrics.PROMOTE_REFUSED.inc()
                self.log.warning(
                    "promotion refused: a newer leader exists",
                    epoch=epoch,
                    stored_epoch=result.refused_by,
                    refused_total=self.stats.refused,
                )
                self.gate.mark_stale(epoch)
                continue
            self.stats.moved += result.moved
            metrics.PROMOTED.inc(result.moved)
            if result.moved:
                self.log.debug("promoted", count=result.moved, epoch=epoch)
            if result.moved >= self.store.settings.promote_batch:
                continue
            if result.next_due_ms is None:
                delay = self.max_idle
            else:
                delay = min(max(result.next_due_ms - result.now_ms, 0) / 1000, self.max_idle)
            await self.pause(delay)


async def listen_for_wakeups(store: Store, promoter: Promoter) -> None:
    """:func:`wake_promoters` for one promoter (one partition)."""
    await wake_promoters(store.client, [promoter])


async def wake_promoters(client, promoters: Sequence[Promoter]) -> None:
    """Poke a promoter whenever the accept script announces a new earliest message in
    its partition.

    One pub/sub connection subscribes to every partition's wake channel (on a Redis
    Cluster a plain PUBLISH reaches every node, so one connection to any node hears
    them all). After a (re)subscription it pokes every promoter: a wake-up published
    while we were not subscribed would otherwise be missed until ``max_idle``.
    Runs until the promoters stop.
    """
    by_channel = {p.store.keys.wake_channel.encode(): p for p in promoters}
    backoff = Backoff(0.05, 1.0)

    def stopping() -> bool:
        return all(p.stopping for p in promoters)

    def poke_all() -> None:
        for promoter in promoters:
            promoter.poke()

    while not stopping():
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(*by_channel)
            poke_all()
            backoff.reset()
            while not stopping():
                message = await pubsub.get_message(timeout=0.5)
                if message is None:
                    continue
                promoter = by_channel.get(message.get("channel"))
                if promoter is not None:
                    promoter.poke()
                else:  # not one of ours (cannot happen): look everywhere, as is safe
                    poke_all()
        except RETRIED as exc:
            delay = backoff.next()
            log.warning("wake-up subscription lost", error=describe(exc), retry_in=delay)
            poke_all()
            await asyncio.sleep(delay)
        finally:
            with contextlib.suppress(*RETRIED):
                await pubsub.aclose()
