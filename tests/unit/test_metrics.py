"""observe_many must count exactly what one observe per value would."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram

from app.metrics import observe_many

BUCKETS = (0.001, 0.01, 0.1, 1, 10)


def samples(histogram: Histogram) -> dict[tuple[str, tuple], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for metric in histogram.collect()
        for s in metric.samples
        if not s.name.endswith("_created")
    }


def fresh() -> Histogram:
    return Histogram("h", "test", buckets=BUCKETS, registry=CollectorRegistry())


@given(st.lists(st.floats(min_value=0, max_value=100, allow_nan=False) | st.sampled_from(BUCKETS)))
def test_observe_many_counts_like_one_observe_per_value(values):
    one_by_one, at_once = fresh(), fresh()
    for value in values:
        one_by_one.observe(value)
    observe_many(at_once, values)
    assert samples(at_once) == samples(one_by_one)


def test_observe_many_falls_back_to_observe_without_the_internals():
    seen: list[float] = []

    class Plain:
        def observe(self, value: float) -> None:
            seen.append(value)

    observe_many(Plain(), [0.5, 2.0])  # type: ignore[arg-type]
    assert seen == [0.5, 2.0]
