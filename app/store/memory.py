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

On a Redis Cluster every master is asked (each has its own configuration; one that
may evict loses the partitions it serves), and the worst answer counts, naming the
masters that gave it.

A Redis that answers neither ``CONFIG GET`` (managed services often rename or forbid
it) nor ``INFO memory`` leaves the policy unknown: the process runs, with a warning at
start and ``policy="unknown"`` in the metric. Refusing would make the service unusable
wherever Redis hides its configuration, for a risk only the operator can rule out.
"""

from __future__ import annotations

import asyncio
import contextlib

from redis.exceptions import ResponseError

from app import metrics
from app.backoff import RETRIED, describe
from app.log import get_logger

log = get_logger("memory-policy")

# The policies under which Redis may evict this service's keys (none of which has a TTL).
EVICTING = frozenset({"allkeys-lru", "allkeys-lfu", "allkeys-random"})
ALLOW_SETTING = "EAT_ALLOW_EVICTION"
UNKNOWN = "unknown"


class EvictingPolicyError(RuntimeError):
    """Redis' maxmemory-policy may evict this service's data, and that is not allowed."""

    def __init__(self, policy: str, nodes: list[str] | None = None) -> None:
        where = f" on {', '.join(nodes)}" if nodes else ""
        super().__init__(
            f"Redis' maxmemory-policy is {policy}{where}: under memory pressure it deletes this "
            "service's keys, and accepted messages with them. Set maxmemory-policy to "
            f"noeviction (or a volatile-* policy), or set {ALLOW_SETTING}=true to run anyway."
        )
        self.policy = policy
        self.nodes = nodes or []


def _text(value: object) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value if isinstance(value, str) else None


async def _read_one(client, **target) -> str | None:
    """One server's policy from ``CONFIG GET``, else from ``INFO memory``; None when it
    answers neither (a refused command). ``target``: a cluster client's ``target_nodes``."""
    with contextlib.suppress(ResponseError):
        reply = await client.config_get("maxmemory-policy", **target)
        for key, value in reply.items():
            if _text(key) == "maxmemory-policy":
                return _text(value)
    with contextlib.suppress(ResponseError):
        info = await client.info("memory", **target)
        for key, value in info.items():
            if _text(key) == "maxmemory_policy":
                return _text(value)
    return None


async def read_policies(client) -> dict[str, str | None]:
    """The policy of every server this client writes to, by node name: one entry ("")
    on a single Redis, one per master on a Redis Cluster (each master has its own
    configuration, and a cluster client asks CONFIG GET of one node only unless told
    which). Connection errors go up."""
    primaries = getattr(client, "get_primaries", None)
    if primaries is None:
        return {"": await _read_one(client)}
    return {node.name: await _read_one(client, target_nodes=node) for node in primaries()}


def _risk(policy: str | None) -> int:
    if policy in EVICTING:
        return 3
    if policy is None:
        return 2
    return 0 if policy == "noeviction" else 1


def worst_policy(policies: dict[str, str | None]) -> tuple[str | None, list[str]]:
    """The policy that puts the data most at risk (an evicting one, then an unknown one,
    then any but noeviction) and the nodes that have it: one master that may evict is
    enough to lose the partitions it serves."""
    worst = max(policies.values(), key=_risk, default=None)
    return worst, [node for node, policy in policies.items() if policy == worst and node]


async def read_policy(client) -> str | None:
    """The policy (on a cluster, the worst of its masters'); None when it cannot be read."""
    return worst_policy(await read_policies(client))[0]


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
        # On a Redis Cluster, the masters that have that policy (empty on a single Redis).
        self.nodes: list[str] = []

    @property
    def evicting(self) -> bool:
        return self.policy in EVICTING

    @property
    def ready(self) -> bool:
        """False while the policy is evicting and that is not allowed."""
        return self.allow or not self.evicting

    async def check(self) -> str:
        """Read the policy now, export it and log what changed; the policy."""
        read, nodes = worst_policy(await read_policies(self.client))
        policy = read or UNKNOWN
        previous, self.policy, self.nodes = self.policy, policy, nodes
        metrics.set_memory_policy(policy, policy in EVICTING)
        if policy != previous:
            self._log_change(policy, previous)
        elif self.evicting and not self.allow:
            log.error(
                "redis may evict this service's data",
                policy=policy,
                setting=ALLOW_SETTING,
                **self._where(),
            )
        return policy

    def _where(self) -> dict[str, list[str]]:
        """The masters a log line is about, on a cluster."""
        return {"nodes": self.nodes} if self.nodes else {}

    def _log_change(self, policy: str, previous: str | None) -> None:
        where = self._where()
        if policy == UNKNOWN:
            log.warning(
                "redis' maxmemory-policy cannot be read (CONFIG GET and INFO refused): make "
                "sure it is noeviction",
                previous=previous,
                **where,
            )
        elif policy in EVICTING and self.allow:
            log.warning(
                "redis may evict this service's data; allowed by the setting",
                policy=policy,
                setting=ALLOW_SETTING,
                **where,
            )
        elif policy in EVICTING:
            log.error(
                "redis may evict this service's data: not ready until its policy changes",
                policy=policy,
                previous=previous,
                setting=ALLOW_SETTING,
                **where,
            )
        else:
            log.info("redis maxmemory-policy", policy=policy, previous=previous, **where)

    async def require(self) -> None:
        """The start-up check: EvictingPolicyError under an evicting policy not allowed."""
        await self.check()
        if not self.ready:
            assert self.policy is not None
            raise EvictingPolicyError(self.policy, self.nodes)

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
            except RETRIED as exc:
                log.warning("maxmemory-policy not checked", error=describe(exc))
