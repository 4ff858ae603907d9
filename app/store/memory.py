"""Redis' ``maxmemory-policy``, checked: an evicting one loses accepted messages silently.

Under ``allkeys-lru`` (or ``allkeys-lfu``, ``allkeys-random``) a Redis short of memory
deletes whatever keys it likes, this service's included: records vanish (a lookup
answers 404), the stream goes with its consumer group, the sorted set with every
scheduled message, and nothing says so. ``noeviction`` refuses writes instead (the api
answers 503, nothing accepted is lost). The ``volatile-*`` policies evict only keys
with a TTL, and the one key of this service with a TTL is the leader record, which
every promote call writes again: they are safe here (and the default of some managed
Redis services).

Every process (api, scheduler, worker) reads the policy at start and refuses to run
under an evicting one (:class:`EvictingPolicyError`: the process exits 2 naming the
policy and the setting) unless ``EAT_ALLOW_EVICTION`` is true, then re-reads it every
``EAT_MEMORY_POLICY_INTERVAL`` seconds. If the policy turns evicting while it runs, the
process does not exit: it logs an error at each check, reports itself not ready
(``/readyz``) and shows it in ``eat_redis_evicting_policy``. Exiting would stop the
workers and the leader from delivering what is already accepted, which eviction may
take next, and would crash-loop every process until someone fixes the policy;
readiness takes the api out of its Service instead, so no more messages are accepted
into a Redis that may drop them, while what is there drains.

A Redis that answers neither ``CONFIG GET`` (managed services often rename or forbid
it) nor ``INFO memory`` leaves the policy unknown: the process runs, with a warning at
start and ``policy="unknown"`` in the metric. Refusing would make the service unusable
wherever Redis hides its configuration, for a risk only the operator can rule out.
"""

from __future__ import annotations

import asyncio
import contextlib

from redis.exceptions import RedisError, ResponseError

from app import metrics
from app.backoff import describe
from app.log import get_logger

log = get_logger("memory-policy")

# The policies under which Redis may evict this service's keys (none of which has a TTL).
EVICTING = frozenset({"allkeys-lru", "allkeys-lfu", "allkeys-random"})
ALLOW_SETTING = "EAT_ALLOW_EVICTION"
UNKNOWN = "unknown"


class EvictingPolicyError(RuntimeError):
    """Redis' maxmemory-policy may evict this service's data, and that is not allowed."""

    def __init__(self, policy: str) -> None:
        super().__init__(
            f"Redis' maxmemory-policy is {policy}: under memory pressure it deletes this "
            "service's keys, and accepted messages with them. Set maxmemory-policy to "
            f"noeviction (or a volatile-* policy), or set {ALLOW_SETTING}=true to run anyway."
        )
        self.policy = policy


def _text(value: object) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value if isinstance(value, str) else None


async def read_policy(client) -> str | None:
    """The policy from ``CONFIG GET``, else from ``INFO memory``; None when Redis answers
    neither (a refused command). Connection errors go up."""
    with contextlib.suppress(ResponseError):
        reply = await client.config_get("maxmemory-policy")
        for key, value in reply.items():
            if _text(key) == "maxmemory-policy":
                return _text(value)
    with contextlib.suppress(ResponseError):
        info = await client.info("memory")
        for key, value in info.items():
            if _text(key) == "maxmemory_policy":
                return _text(value)
    return None


class MemoryPolicy:
    """What this process knows of Redis' maxmemory-policy, and what it does about it.

    :param client: the process's Redis client.
    :param allow: ``EAT_ALLOW_EVICTION``: run under an evicting policy (with a warning).
    :param interval: seconds between two checks while running.
    """

    def __init__(self, client, allow: bool, interval: float) -> None:
        self.client = client
        self.allow = allow
        self.interval = interval
        self.policy: str | None = None  # None until read; UNKNOWN when Redis will not say

    @property
    def evicting(self) -> bool:
        return self.policy in EVICTING

    @property
    def ready(self) -> bool:
        """False while the policy is evicting and that is not allowed."""
        return self.allow or not self.evicting

    async def check(self) -> str:
        """Read the policy now, export it and log what changed; the policy."""
        policy = await read_policy(self.client) or UNKNOWN
        previous, self.policy = self.policy, policy
        metrics.set_memory_policy(policy, policy in EVICTING)
        if policy != previous:
            self._log_change(policy, previous)
        elif self.evicting and not self.allow:
            log.error("redis may evict this service's data", policy=policy, setting=ALLOW_SETTING)
        return policy

    def _log_change(self, policy: str, previous: str | None) -> None:
        if policy == UNKNOWN:
            log.warning(
                "redis' maxmemory-policy cannot be read (CONFIG GET and INFO refused): make "
                "sure it is noeviction",
                previous=previous,
            )
        elif policy in EVICTING and self.allow:
            log.warning(
                "redis may evict this service's data; allowed by the setting",
                policy=policy,
                setting=ALLOW_SETTING,
            )
        elif policy in EVICTING:
            log.error(
                "redis may evict this service's data: not ready until its policy changes",
                policy=policy,
                previous=previous,
                setting=ALLOW_SETTING,
            )
        else:
            log.info("redis maxmemory-policy", policy=policy, previous=previous)

    async def require(self) -> None:
        """The start-up check: EvictingPolicyError under an evicting policy not allowed."""
        await self.check()
        if not self.ready:
            assert self.policy is not None
            raise EvictingPolicyError(self.policy)

    async def watch(self, stop: asyncio.Event) -> None:
        """Check every ``interval`` seconds until ``stop`` is set. Redis errors keep the
        last policy read (Redis being down shows in readiness already); anything else
        ends the task, which is supervised."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval)
            if stop.is_set():
                return
            try:
                await self.check()
            except (RedisError, OSError) as exc:
                log.warning("maxmemory-policy not checked", error=describe(exc))
