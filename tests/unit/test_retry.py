"""workers.retry.backoff_seconds: exponential, capped, equal jitter, deterministic given rand."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from workers.retry import backoff_seconds

ALMOST_ONE = math.nextafter(1.0, 0.0)  # random.random() never returns 1.0


def full(attempt: int, base: float = 1.0, cap: float = 1e9) -> float:
    """The delay at the top of the jitter range (rand -> 1)."""
    return backoff_seconds(attempt, base, cap, rand=lambda: 1.0)


def test_first_failure_waits_about_base():
    assert full(1, base=2.0) == 2.0
    assert backoff_seconds(1, 2.0, 100.0, rand=lambda: 0.0) == 1.0


def test_ceiling_doubles_with_each_attempt():
    assert [full(n, base=0.5) for n in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0]


def test_delay_never_exceeds_the_cap():
    assert [full(n, base=1.0, cap=10.0) for n in range(1, 8)] == [1, 2, 4, 8, 10, 10, 10]


def test_huge_attempt_numbers_stay_at_the_cap_without_overflow():
    assert full(10**9, base=1.0, cap=300.0) == 300.0
    assert backoff_seconds(10**9, 1.0, 300.0, rand=lambda: 0.0) == 150.0


def test_jitter_spans_half_to_full_ceiling():
    assert backoff_seconds(4, 1.0, 100.0, rand=lambda: 0.0) == 4.0
    assert backoff_seconds(4, 1.0, 100.0, rand=lambda: 0.5) == 6.0
    assert 7.99 < backoff_seconds(4, 1.0, 100.0, rand=lambda: ALMOST_ONE) <= 8.0


def test_rand_is_called_once_per_delay():
    calls: list[int] = []

    def rand() -> float:
        calls.append(1)
        return 0.25

    backoff_seconds(3, 1.0, 100.0, rand=rand)
    assert len(calls) == 1


@given(
    attempt=st.integers(min_value=1, max_value=200),
    base=st.floats(min_value=0.001, max_value=100.0),
    extra=st.floats(min_value=0.0, max_value=1000.0),
    r=st.floats(min_value=0.0, max_value=1.0, exclude_max=True),
)
def test_delay_is_between_half_and_the_full_ceiling(
    attempt: int, base: float, extra: float, r: float
):
    cap = base + extra
    ceiling = min(cap, base * 2.0 ** (attempt - 1)) if attempt < 64 else cap
    delay = backoff_seconds(attempt, base, cap, rand=lambda: r)
    assert ceiling / 2 <= delay <= ceiling
    assert delay <= cap


def test_default_rand_stays_within_bounds():
    delays = [backoff_seconds(3, 1.0, 100.0) for _ in range(200)]
    assert all(2.0 <= d < 4.0 for d in delays)
    assert len(set(delays)) > 1


@pytest.mark.parametrize("attempt", [0, -1, -100])
def test_attempt_below_one_raises(attempt: int):
    with pytest.raises(ValueError, match="attempt"):
        backoff_seconds(attempt, 1.0, 10.0, rand=lambda: 0.5)
