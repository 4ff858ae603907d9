"""The arithmetic behind B8 and B9's tables (bench.scaling, bench.placement.plan_moves,
bench.b8_scaleout.figures): shares, CPU per message, capacities, the partition moves."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from bench.b8_scaleout import compare, figures
from bench.placement import plan_moves
from bench.scaling import (
    capacity,
    counts_by_master,
    memory_needed,
    projected_capacity,
    ratio,
    share_deviation,
    shares,
    us_per_message,
)


def test_shares_are_each_masters_fraction_of_the_messages():
    assert shares([25, 25, 50]) == [0.25, 0.25, 0.5]


def test_shares_of_no_messages_are_unknown_not_a_division_by_zero():
    assert all(math.isnan(f) for f in shares([0, 0, 0]))


def test_share_deviation_is_the_largest_distance_from_an_even_share_relative_to_it():
    # 5/5/6 of 16 partitions: the master with 6 carries 12.5 % more than a third.
    assert share_deviation([5 / 16, 5 / 16, 6 / 16]) == pytest.approx(0.125)
    # 4/6/6: the master with 4 carries 25 % less, the larger distance.
    assert share_deviation([4 / 16, 6 / 16, 6 / 16]) == pytest.approx(0.25)
    assert share_deviation([1.0]) == 0


def test_counts_by_master_adds_each_partition_to_the_master_serving_it():
    assert counts_by_master([10, 20, 30, 40], [0, 2, 0, 1], 3) == [40, 40, 20]


def test_counts_by_master_refuses_a_placement_of_another_length():
    with pytest.raises(ValueError):
        counts_by_master([1, 2], [0], 3)


def test_us_per_message_is_cpu_seconds_over_messages_in_microseconds():
    assert us_per_message(0.5, 100_000) == pytest.approx(5.0)
    assert math.isnan(us_per_message(0.5, 0))


def test_capacity_is_one_core_over_the_cost_of_a_message():
    assert capacity(5.0) == pytest.approx(200_000)
    assert math.isnan(capacity(0.0))


def test_projected_capacity_is_bounded_by_the_busiest_master():
    assert projected_capacity(100_000, [1 / 3, 1 / 3, 1 / 3]) == pytest.approx(300_000)
    # 6 of 16 partitions on one master: it runs out first, at 16/6 of one master.
    assert projected_capacity(100_000, [5 / 16, 5 / 16, 6 / 16]) == pytest.approx(266_666.67)
    assert projected_capacity(100_000, [1.0]) == pytest.approx(100_000)


def test_ratio_of_a_zero_base_is_unknown():
    assert ratio(3.0, 2.0) == 1.5
    assert math.isnan(ratio(3.0, 0.0))


@pytest.mark.parametrize(
    ("owners", "counts_after"),
    [
        ([0, 1, 2, 2, 0, 1, 2, 2, 0, 1, 1, 2, 0, 1, 1, 2], [5, 5, 6]),  # "eat": 4/6/6
        ([0] * 8 + [1] * 4 + [2] * 4, [6, 5, 5]),
        ([0, 1, 2] * 5 + [0], [6, 5, 5]),  # even already: nothing moves
        ([2] * 16, [5, 5, 6]),
    ],
)
def test_plan_moves_evens_the_partitions_per_master_to_within_one(owners, counts_after):
    moved = list(owners)
    for p, src, dst in plan_moves(owners, 3):
        assert moved[p] == src
        moved[p] = dst
    assert sorted(moved.count(m) for m in range(3)) == sorted(counts_after)
    assert max(moved.count(m) for m in range(3)) - min(moved.count(m) for m in range(3)) <= 1


def test_plan_moves_moves_nothing_when_already_even_and_no_more_than_needed():
    assert plan_moves([0, 1, 2] * 5 + [0], 3) == []
    # 4/6/6 needs exactly one move.
    assert len(plan_moves([0, 1, 2, 2, 0, 1, 2, 2, 0, 1, 1, 2, 0, 1, 1, 2], 3)) == 1


def _stack(owners, created, masters=3):
    return SimpleNamespace(owners=owners, created_owners=created, masters=[None] * masters)


def test_a_workload_row_sums_cpu_over_masters_and_projects_by_the_busiest_share():
    # 4 partitions, 100 messages each; masters 0 and 1 serve one, master 2 two.
    s = _stack([0, 1, 2, 2], created=[0, 0, 1, 2])
    row = figures(s, "B3 burst", [100, 100, 100, 100], [0.001, 0.001, 0.002], calls=200)
    assert row["messages"] == 400
    assert row["counts_by_master"] == [100, 100, 200]
    assert row["shares"] == [0.25, 0.25, 0.5]
    assert row["share_deviation"] == pytest.approx(0.5)
    assert row["created_shares"] == [0.5, 0.25, 0.25]
    assert row["redis_cpu_us_per_msg"] == pytest.approx(10.0)  # 4 ms over 400 messages
    assert row["commands_per_msg"] == 0.5
    assert row["per_master_capacity"] == pytest.approx(100_000)
    assert row["projected_capacity"] == pytest.approx(200_000)  # the busiest has half


def test_compare_sets_each_cluster_row_against_the_single_redis_row_of_its_workload():
    single = [figures(_stack([0], [0], 1), "B2 bulk", [1000], [0.005])]  # 5 us/msg
    cluster = [figures(_stack([0, 1, 2], [0, 1, 2]), "B2 bulk", [1000] * 3, [0.006] * 3)]
    (row,) = compare(single, cluster)
    assert row["cpu_vs_single"] == pytest.approx(1.2)  # 6 us/msg against 5
    # one core carries 200,000/s of 5 us messages; three carry 3 x 166,667/s of 6 us ones
    assert row["capacity_vs_single"] == pytest.approx(2.5)


def test_memory_needed_leaves_room_for_every_master_to_fork_while_written_to():
    # 10 M at B9's 351 B a message: 3.5 GB of data, 7 GB with a copy of every page.
    assert memory_needed(10_000_000) == 7_020_000_000
    assert memory_needed(1_000, bytes_per_msg=100) == 200_000
