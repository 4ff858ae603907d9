"""The promotion loop: when to call the promote script (policy).

"Move what is due" is one script call (``Store.promote``); this loop decides
when to make it: at once after a full batch, else when the earliest remaining
message falls due, or when woken (a new earliest message, a leadership
change). The sleep is timed here, in Python, from durations Redis reports
(next due minus Redis' own now), so neither this host's clock nor Redis' 100 ms
``hz`` tick for blocking-command timeouts shows up as lateness.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

from redis.exceptions import RedisError

from app import metrics
from app.backoff import Backoff, describe
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
            except (RedisError, OSError) as exc:
                self.stats.errors += 1
                delay = backoff.next()
                log.warning("promote failed", error=describe(exc), retry_in=delay)
                await self.pause(delay)
                continue
            backoff.reset()
            self.stats.calls += 1
            if result.refused_by is not None:
                self.stats.refused += 1
                metrics.PROMOTE_REFUSED.inc()
                log.warning(
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
                log.debug("promoted", count=result.moved, epoch=epoch)
            if result.moved >= self.store.settings.promote_batch:
                continue
            if result.next_due_ms is None:
                delay = self.max_idle
            else:
                delay = min(max(result.next_due_ms - result.now_ms, 0) / 1000, self.max_idle)
            await self.pause(delay)


async def listen_for_wakeups(store: Store, promoter: Promoter) -> None:
    """Poke the promoter whenever the accept script announces a new earliest message.

    After a (re)subscription it pokes too: a wake-up published while we were
    not subscribed would otherwise be missed until ``max_idle``.
    """
    channel = store.keys.wake_channel
    backoff = Backoff(0.05, 1.0)
    while not promoter.stopping:
        pubsub = store.client.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(channel)
            promoter.poke()
            backoff.reset()
            while not promoter.stopping:
                message = await pubsub.get_message(timeout=0.5)
                if message is not None:
                    promoter.poke()
        except (RedisError, OSError) as exc:
            delay = backoff.next()
            log.warning("wake-up subscription lost", error=describe(exc), retry_in=delay)
            promoter.poke()
            await asyncio.sleep(delay)
        finally:
            with contextlib.suppress(RedisError, OSError):
                await pubsub.aclose()
