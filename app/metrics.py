"""Prometheus metrics, one registry per process; names follow Prometheus conventions.

Counters count what this process did; the queue gauges are read from Redis
when scraped, so every process reports the same cluster-wide figures.
"""

from __future__ import annotations

import bisect
from collections import Counter as Tally
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

REGISTRY = CollectorRegistry(auto_describe=True)

ACCEPTED = Counter(
    "eat_messages_accepted",
    "Messages posted to the API, by outcome: due, delayed, duplicate, invalid.",
    ["kind"],
    registry=REGISTRY,
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
PROMOTE_REFUSED = Counter(
    "eat_promote_refused",
    "Promote calls refused because a newer leader epoch was stored (zombie leader).",
    registry=REGISTRY,
)
LATENESS = Histogram(
    "eat_delivery_lateness_seconds",
    "Handling time minus runAt.",
    buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
    registry=REGISTRY,
)


def observe_many(histogram: Histogram, values: Iterable[float]) -> None:
    """``histogram.observe`` for each value, at one lock round per bucket, not per value.

    A worker observes the lateness of up to a thousand messages per read; one
    ``observe`` each cost more than the rest of their handling. This reaches into
    prometheus_client's Histogram (``_upper_bounds``, ``_buckets``, ``_sum``,
    stable since 0.4); should those go, it falls back to ``observe``.
    """
    values = list(values)
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if bounds is None or buckets is None or total is None:
        for value in values:
            histogram.observe(value)
        return
    # observe() counts a value in the first bucket whose upper bound is >= it.
    for index, count in Tally(bisect.bisect_left(bounds, v) for v in values).items():
        buckets[index].inc(count)
    total.inc(sum(values))


LEADER = Gauge("eat_leader", "1 while this scheduler leads and may promote.", registry=REGISTRY)
EPOCH = Gauge(
    "eat_leader_epoch",
    "Epoch of this scheduler's leadership, 0 when not leading.",
    registry=REGISTRY,
)
DELAYED = Gauge("eat_delayed_messages", "Messages in the delayed sorted set.", registry=REGISTRY)
STREAM_LENGTH = Gauge(
    "eat_stream_length", "Entries in the stream (not yet acknowledged).", registry=REGISTRY
)
STREAM_LAG = Gauge("eat_stream_lag", "Entries not yet delivered to any worker.", registry=REGISTRY)
PENDING = Gauge(
    "eat_stream_pending", "Entries delivered but not yet acknowledged.", registry=REGISTRY
)
DEAD = Gauge("eat_dead_messages", "Entries in the dead stream.", registry=REGISTRY)
CONSUMERS = Gauge("eat_consumers", "Consumers in the workers group.", registry=REGISTRY)
HTTP_REQUESTS = Counter(
    "eat_http_requests",
    "HTTP requests by route, method and status.",
    ["route", "method", "status"],
    registry=REGISTRY,
)
HTTP_DURATION = Histogram(
    "eat_http_request_duration_seconds",
    "HTTP request latency by route.",
    ["route"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
    registry=REGISTRY,
)


def exposition() -> tuple[bytes, str]:
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
