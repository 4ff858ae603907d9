"""The arithmetic of B8 and B9: shares per master, CPU per message, capacities.

Pure functions (no I/O), so each figure the tables print has a unit test.

A master's *share* is the fraction of a workload's messages whose partition it
serves. *Redis CPU per message* is the CPU every master used during a workload
(``INFO cpu``, user + sys, after minus before) summed, divided by the messages of
the workload: what one message costs the cluster, wherever it lands. A master
that runs one core flat out then carries ``1 core / µs per message`` of its own
messages a second (its *capacity*), and the cluster runs out when its busiest
master does: at ``capacity / busiest share`` messages a second, which is
``masters x capacity`` when the shares are even.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

CORE_US = 1_000_000.0  # µs of CPU one core gives per second


def shares(counts: Sequence[int]) -> list[float]:
    """Each master's fraction of the messages (NaN for every master when there are none)."""
    total = sum(counts)
    return [c / total if total else math.nan for c in counts]


def share_deviation(fractions: Sequence[float]) -> float:
    """The largest relative distance of a share from an even one (1 / masters):
    0.15 means some master carries 15 % more or less than its even share."""
    even = 1 / len(fractions)
    return max(abs(f - even) / even for f in fractions)


def counts_by_master(
    per_partition: Sequence[int], owners: Sequence[int], masters: int
) -> list[int]:
    """Messages per master, from messages per partition and the master serving each."""
    out = [0] * masters
    for count, owner in zip(per_partition, owners, strict=True):
        out[owner] += count
    return out


def us_per_message(cpu_seconds: float, messages: int) -> float:
    return cpu_seconds / messages * 1e6 if messages else math.nan


def capacity(us_per_msg: float) -> float:
    """Messages a second one core carries at ``us_per_msg`` µs of CPU each."""
    return CORE_US / us_per_msg if us_per_msg > 0 else math.nan


def projected_capacity(per_master_capacity: float, fractions: Sequence[float]) -> float:
    """Messages a second the cluster carries when its busiest master runs one core:
    ``per_master_capacity / max share`` (``masters x per_master_capacity`` when even)."""
    busiest = max(fractions)
    return per_master_capacity / busiest if busiest > 0 else math.nan


def ratio(value: float, base: float) -> float:
    return value / base if base else math.nan


BYTES_PER_MESSAGE = 351  # B9's measure on every master, 100-byte bodies


def memory_needed(messages: int, bytes_per_msg: float = BYTES_PER_MESSAGE) -> int:
    """Bytes of RAM a backlog of ``messages`` may take on the masters at worst: their
    data twice over, since an AOF rewrite forks each master and, while the child
    runs, every page the parent writes is copied."""
    return int(2 * messages * bytes_per_msg)
