"""app.ops.supervisor.RestartPolicy: when ``echo-at-time up`` starts a dead child again."""

from __future__ import annotations

import pytest

from app.ops.supervisor import RestartPolicy

FULL = 1.0  # the random source at the top of the jitter range: the whole delay
NONE = 0.0  # at the bottom: half of it


def test_a_child_that_keeps_dying_at_start_waits_twice_as_long_each_time_up_to_the_cap() -> None:
    policy = RestartPolicy(first=0.5, cap=10.0, steady_after=5.0, rand=lambda: FULL)
    assert [policy.delay(ran_for=0.1) for _ in range(7)] == [0.5, 1, 2, 4, 8, 10, 10]


def test_a_child_that_stayed_up_for_a_while_is_restarted_after_the_first_delay_again() -> None:
    policy = RestartPolicy(first=0.5, cap=10.0, steady_after=5.0, rand=lambda: FULL)
    for _ in range(4):
        policy.delay(ran_for=0.1)
    assert policy.delay(ran_for=4.9) == 8.0  # not long enough
    assert policy.delay(ran_for=5.0) == 0.5
    assert policy.delay(ran_for=0.1) == 1.0


@pytest.mark.parametrize(
    ("rand", "expected"), [(NONE, [0.25, 0.5, 1.0]), (0.5, [0.375, 0.75, 1.5])]
)
def test_jitter_spreads_children_that_died_together_over_half_to_all_of_the_delay(
    rand: float, expected: list[float]
) -> None:
    policy = RestartPolicy(first=0.5, cap=10.0, rand=lambda: rand)
    assert [policy.delay(ran_for=0.0) for _ in range(3)] == expected
