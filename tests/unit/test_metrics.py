"""The lock-free loop metrics must expose exactly what prometheus_client's would."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram

from app.metrics import LoopCounter, LoopHistogram

BUCKETS = (0.001, 0.01, 0.1, 1, 10)
VALUES = st.lists(st.floats(min_value=0, max_value=100, allow_nan=False) | st.sampled_from(BUCKETS))


def samples(metric) -> dict[tuple[str, tuple], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in metric.collect()
        for s in family.samples
        if not s.name.endswith("_created")
    }


@given(VALUES)
def test_a_loop_histogram_without_labels_counts_like_prometheus(values):
    ours = LoopHistogram("h", "test", [], buckets=BUCKETS, registry=CollectorRegistry())
    theirs = Histogram("h", "test", buckets=BUCKETS, registry=CollectorRegistry())
    for value in values:
        ours.labels().observe(value)
        theirs.observe(value)
    assert samples(ours) == samples(theirs)


@given(VALUES, VALUES)
def test_a_labelled_loop_histogram_counts_like_prometheus(first, second):
    ours = LoopHistogram("h", "test", ["route"], buckets=BUCKETS, registry=CollectorRegistry())
    theirs = Histogram("h", "test", ["route"], buckets=BUCKETS, registry=CollectorRegistry())
    for route, values in (("a", first), ("b", second)):
        for value in values:
            ours.labels(route).observe(value)
            theirs.labels(route).observe(value)
    assert samples(ours) == samples(theirs)


def test_a_loop_counter_counts_like_prometheus():
    ours = LoopCounter("c", "test", ["kind"], registry=CollectorRegistry())
    theirs = Counter("c", "test", ["kind"], registry=CollectorRegistry())
    for kind, amount in (("due", 1), ("delayed", 3), ("due", 2.5)):
        ours.labels(kind).inc(amount)
        theirs.labels(kind).inc(amount)
    assert samples(ours) == samples(theirs)
