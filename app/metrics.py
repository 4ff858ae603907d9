"""Prometheus metrics, one registry per process; names follow Prometheus conventions.

Counters count what this process did; the queue gauges are read from Redis
when scraped, so every process reports the same cluster-wide figures.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

REGISTRY = CollectorRegistry(auto_describe=True)


class _LoopFamily(Collector):
    """A labelled metric updated only from the event loop's thread, without locks.

    prometheus_client's children take a threading.Lock on every update. The api
    updates three per ingest request, which profiled at ~4 % of a request under
    B1; its handlers all run on the one event loop thread, so plain additions are
    safe there. Exposed exactly like the prometheus_client metric of the same
    name, type and labels. Not for metrics updated from other threads.
    """

    typ = ""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], object] = {}
        if not self.labelnames:
            # As prometheus_client does: a metric without labels shows zeros from the start.
            self.labels()
        (REGISTRY if registry is None else registry).register(self)

    def labels(self, *values: object):
        key = tuple(str(v) for v in values)
        child = self._children.get(key)
        if child is None:
            if len(key) != len(self.labelnames):
                raise ValueError(f"{self.name} takes labels {self.labelnames}, got {key}")
            child = self._children[key] = self._child()
        return child

    def _child(self) -> object:
        raise NotImplementedError

    def describe(self) -> list[Metric]:
        return [Metric(self.name, self.documentation, self.typ)]

    def collect(self) -> Iterator[Metric]:
        metric = Metric(self.name, self.documentation, self.typ)
        for key, child in list(self._children.items()):
            self._samples(metric, dict(zip(self.labelnames, key, strict=True)), child)
        yield metric

    def _samples(self, metric: Metric, labels: dict[str, str], child) -> None:
        raise NotImplementedError


class _CounterChild:
    __slots__ = ("created", "value")

    def __init__(self) -> None:
        self.value = 0.0
        self.created = time.time()

    def inc(self, amount: float = 1) -> None:
        if amount < 0:
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        self.value += amount


class LoopCounter(_LoopFamily):
    typ = "counter"

    def _child(self) -> _CounterChild:
        return _CounterChild()

    def total(self, *values: object) -> float:
        """The count of one label set, 0 when it was never counted (no child is made)."""
        child = self._children.get(tuple(str(v) for v in values))
        return 0.0 if child is None else child.value

    def _samples(self, metric: Metric, labels: dict[str, str], child: _CounterChild) -> None:
        metric.add_sample(self.name + "_total", labels, child.value)
        metric.add_sample(self.name + "_created", labels, child.created)


class _HistogramChild:
    __slots__ = ("bounds", "counts", "created", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.sum = 0.0
        self.created = time.time()

    def observe(self, amount: float) -> None:
        self.sum += amount
        # The first bucket whose upper bound is >= amount (bounds end with +Inf).
        self.counts[bisect_left(self.bounds, amount)] += 1


class LoopHistogram(_LoopFamily):
    typ = "histogram"

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        buckets: Sequence[float],
        registry: CollectorRegistry | None = None,
    ) -> None:
        bounds = sorted(float(b) for b in buckets)
        if bounds[-1] != float("inf"):
            bounds.append(float("inf"))
        self.bounds = tuple(bounds)
        super().__init__(name, documentation, labelnames, registry)

    def _child(self) -> _HistogramChild:
        return _HistogramChild(self.bounds)

    def _samples(self, metric: Metric, labels: dict[str, str], child: _HistogramChild) -> None:
        total = 0.0
        for bound, count in zip(self.bounds, list(child.counts), strict=True):
            total += count  # buckets are cumulative
            le = floatToGoString(bound)
            metric.add_sample(self.name + "_bucket", {**labels, "le": le}, total)
        metric.add_sample(self.name + "_count", labels, total)
        metric.add_sample(self.name + "_sum", labels, child.sum)
        metric.add_sample(self.name + "_created", labels, child.created)


ACCEPTED = LoopCounter(
    "eat_messages_accepted",
    "Messages posted to the API, by outcome: due, delayed, duplicate, invalid.",
    ["kind"],
)
PROMOTED = Counter(
    "eat_messages_promoted", "Messages moved from the sorted set to the stream.", registry=REGISTRY
)
DELIVERED = Counter(
    "eat_messages_delivered", "Messages handled and acknowledged.", registry=REGISTRY
)
RETRIED = Counter(
    "eat_messages_retried", "Handler failures scheduled for a retry.", registry=REGISTRY
)
DEAD_LETTERED = Counter(
    "eat_messages_dead_lettered", "Messages moved to the dead stream.", registry=REGISTRY
)
RECLAIMED = Counter(
    "eat_messages_reclaimed", "Entries taken over from dead or stalled workers.", registry=REGISTRY
)
QUARANTINED = Counter(
    "eat_quarantined",
    "Records, stream entries and sorted-set members that could not be decoded, moved to the "
    "dead stream (reason 'corrupt ...').",
    registry=REGISTRY,
)
PROMOTE_REFUSED = Counter(
    "eat_promote_refused",
    "Promote calls refused because a newer leader epoch was stored (zombie leader).",
    registry=REGISTRY,
)
SCHEDULE_OCCURRENCES = Counter(
    "eat_schedule_occurrences",
    "Occurrences of recurring schedules the leader accepted as new messages (a repeat, a "
    "duplicate by uuid, is not counted).",
    registry=REGISTRY,
)
SCHEDULE_SKIPPED = Counter(
    "eat_schedule_occurrences_skipped",
    "Occurrences missed while no leader ran that EAT_SCHEDULE_CATCHUP dropped.",
    registry=REGISTRY,
)
# Observed once per handled message, on the worker's event loop: lock-free.
LATENESS = LoopHistogram(
    "eat_delivery_lateness_seconds",
    "Handling time minus runAt.",
    [],
    buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)


LEADER = Gauge("eat_leader", "1 while this scheduler leads and may promote.", registry=REGISTRY)
EPOCH = Gauge(
    "eat_leader_epoch",
    "Epoch of this scheduler's leadership, 0 when not leading.",
    registry=REGISTRY,
)
EVICTING_POLICY = Gauge(
    "eat_redis_evicting_policy",
    "Redis' maxmemory-policy (label; 'unknown' when Redis will not say): 1 when it may evict "
    "this service's data (allkeys-*), else 0.",
    ["policy"],
    registry=REGISTRY,
)
# The queue gauges, one series per partition (label ``partition``, "0" with one): sum()
# gives the totals, and a partition whose master is slow or whose load is skewed shows.
QUEUE_LABELS = ["partition"]
DELAYED = Gauge(
    "eat_delayed_messages",
    "Messages in the delayed sorted set, per partition.",
    QUEUE_LABELS,
    registry=REGISTRY,
)
STREAM_LENGTH = Gauge(
    "eat_stream_length",
    "Entries in the stream (not yet acknowledged), per partition.",
    QUEUE_LABELS,
    registry=REGISTRY,
)
STREAM_LAG = Gauge(
    "eat_stream_lag",
    "Entries not yet delivered to any worker, per partition.",
    QUEUE_LABELS,
    registry=REGISTRY,
)
PENDING = Gauge(
    "eat_stream_pending",
    "Entries delivered but not yet acknowledged, per partition.",
    QUEUE_LABELS,
    registry=REGISTRY,
)
DEAD = Gauge(
    "eat_dead_messages",
    "Entries in the dead stream, per partition.",
    QUEUE_LABELS,
    registry=REGISTRY,
)
CONSUMERS = Gauge(
    "eat_consumers",
    "Consumers in the partition's workers group (every worker joins every partition's: max(), "
    "not sum(), counts workers).",
    QUEUE_LABELS,
    registry=REGISTRY,
)
OLDEST_OVERDUE = Gauge(
    "eat_oldest_overdue_seconds",
    "How long the earliest due message has waited in the partition's delayed set, 0 when none "
    "is due.",
    QUEUE_LABELS,
    registry=REGISTRY,
)
# Only consumers that hold entries: the group keeps every consumer name it ever saw.
CONSUMER_PENDING = Gauge(
    "eat_consumer_pending",
    "Entries delivered to a consumer and not yet acknowledged, per consumer holding any and "
    "partition.",
    ["consumer", "partition"],
    registry=REGISTRY,
)
# The api's per-request metrics: updated on its event loop only.
HTTP_REQUESTS = LoopCounter(
    "eat_http_requests",
    "HTTP requests by route, method and status.",
    ["route", "method", "status"],
)
HTTP_DURATION = LoopHistogram(
    "eat_http_request_duration_seconds",
    "HTTP request latency by route.",
    ["route"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)

# The api's WAITs (EAT_WAIT_REPLICAS), on its event loop only.
REPLICATION_WAITS = LoopCounter(
    "eat_replication_waits",
    "Changes the api sent with WAIT (EAT_WAIT_REPLICAS), by outcome: replicated (enough "
    "replicas confirmed in time, answered 2xx) or timed_out (answered 503, retry).",
    ["outcome"],
)

# Connections an HTTP server closed on its own (app.httpserver), on its event loop only.
HTTP_CONNECTIONS_CLOSED = LoopCounter(
    "eat_http_connections_closed",
    "Connections the HTTP server closed by a limit: header_too_large (431), header_timeout "
    "and body_timeout (408), send_timeout (the client stopped reading), evicted (idlest, "
    "at the connection cap), over_limit (503).",
    ["reason"],
)


class ConsumerFigures(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def pending(self) -> int: ...


class QueueFigures(Protocol):
    """What the queue gauges show (``app.store.QueueStats`` has these)."""

    @property
    def delayed(self) -> int: ...
    @property
    def stream_length(self) -> int: ...
    @property
    def lag(self) -> int: ...
    @property
    def pending(self) -> int: ...
    @property
    def dead(self) -> int: ...
    @property
    def consumers(self) -> int: ...
    @property
    def oldest_overdue_ms(self) -> int | None: ...
    @property
    def members(self) -> Sequence[ConsumerFigures]: ...


_QUEUE_GAUGES = (
    DELAYED,
    STREAM_LENGTH,
    STREAM_LAG,
    PENDING,
    DEAD,
    CONSUMERS,
    OLDEST_OVERDUE,
    CONSUMER_PENDING,
)


def set_queue_gauges(figures: QueueFigures | Sequence[QueueFigures]) -> None:
    """Show ``figures``: each partition's, in partition order (a single one is partition 0)."""
    each = [figures] if not isinstance(figures, Sequence) else figures
    # Only the partitions given show (a process's count is fixed; a test's is not). A
    # consumer that holds nothing any more (it acknowledged, or was reclaimed from) drops
    # out of the exposition instead of staying at 0 for ever.
    for gauge in _QUEUE_GAUGES:
        gauge.clear()
    for number, one in enumerate(each):
        partition = str(number)
        DELAYED.labels(partition).set(one.delayed)
        STREAM_LENGTH.labels(partition).set(one.stream_length)
        STREAM_LAG.labels(partition).set(one.lag)
        PENDING.labels(partition).set(one.pending)
        DEAD.labels(partition).set(one.dead)
        CONSUMERS.labels(partition).set(one.consumers)
        OLDEST_OVERDUE.labels(partition).set((one.oldest_overdue_ms or 0) / 1000)
        for member in one.members:
            if member.pending:
                CONSUMER_PENDING.labels(member.name, partition).set(member.pending)


def _counter_total(counter: Counter) -> float:
    for family in counter.collect():
        for sample in family.samples:
            if sample.name.endswith("_total"):
                return sample.value
    return 0.0


def history_totals() -> dict[str, float]:
    """What this process counted since it started, for the dashboard's per-minute history
    (``app.store.history``): the counters above, read, never updated, so counting for
    the charts costs the hot paths nothing. ``late:<le>`` is the lateness histogram's own
    (not cumulative) bucket count, ``le`` its upper bound in seconds."""
    accepted = ACCEPTED.total("due") + ACCEPTED.total("delayed")
    totals = {
        "accepted": accepted,
        "delivered": _counter_total(DELIVERED),
        "failed": _counter_total(RETRIED),
        "dead": _counter_total(DEAD_LETTERED),
    }
    lateness = LATENESS.labels()
    for bound, count in zip(LATENESS.bounds, list(lateness.counts), strict=True):
        totals["late:" + floatToGoString(bound)] = count
    return totals


def set_memory_policy(policy: str, evicting: bool) -> None:
    """One series: the policy last read."""
    EVICTING_POLICY.clear()
    EVICTING_POLICY.labels(policy).set(1 if evicting else 0)


def exposition() -> tuple[bytes, str]:
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
