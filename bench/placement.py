"""Which master serves each partition of a local Redis Cluster, and evening it out.

A partition lives in the slot of its hash tag ``{<prefix>:<p>}``, and
``redis-cli --cluster create`` gives each master a contiguous third of the
slots, so how many partitions each master gets depends on where the tags hash:
for the default prefix ``eat``, 16 partitions fall 4, 6 and 6 over three
masters. :func:`balance` moves whole partitions (their slot, while still empty)
from the fullest master to the emptiest until the counts differ by at most one
(16 over 3: 5, 5, 6), as an operator would with ``redis-cli --cluster reshard``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from redis.crc import key_slot

from app.ops.cluster import RedisCluster, redis_command
from app.store.keys import Keyspace


def partition_slot(prefix: str, partition: int) -> int:
    return key_slot(Keyspace(prefix, partition).delayed.encode())


def _slot_map(port: int) -> dict[str, tuple[int, list[tuple[int, int]]]]:
    """node id -> (port, slot ranges) of the masters, as the node at ``port`` sees them."""
    out: dict[str, tuple[int, list[tuple[int, int]]]] = {}
    for line in redis_command(port, "CLUSTER", "NODES").splitlines():
        fields = line.split()
        if len(fields) < 8 or "master" not in fields[2].split(","):
            continue
        node_port = int(fields[1].split("@", 1)[0].rsplit(":", 1)[1])
        ranges = []
        for item in fields[8:]:
            if item.startswith("["):
                continue  # a slot being migrated or imported
            lo, _, hi = item.partition("-")
            ranges.append((int(lo), int(hi or lo)))
        out[fields[0]] = (node_port, ranges)
    return out


def owners(cluster: RedisCluster, prefix: str, count: int, port: int | None = None) -> list[int]:
    """For each partition, the index (in ``cluster.nodes``) of the master serving it, as
    the node at ``port`` (the first node by default) sees it; -1 where it sees none."""
    by_port = {node.port: i for i, node in enumerate(cluster.nodes)}
    slots = _slot_map(cluster.nodes[0].port if port is None else port).values()
    seen = []
    for p in range(count):
        slot = partition_slot(prefix, p)
        found = [port for port, ranges in slots for lo, hi in ranges if lo <= slot <= hi]
        seen.append(by_port[found[0]] if len(found) == 1 else -1)
    return seen


def plan_moves(owner_of: Sequence[int], masters: int) -> list[tuple[int, int, int]]:
    """(partition, from master, to master) moves after which the masters' partition
    counts differ by at most one; the highest-numbered partition of the fullest master
    goes to the emptiest, one at a time (pure: no I/O)."""
    owner = list(owner_of)
    moves = []
    while True:
        counts = [owner.count(m) for m in range(masters)]
        full = max(range(masters), key=lambda m: (counts[m], -m))
        empty = min(range(masters), key=lambda m: (counts[m], m))
        if counts[full] - counts[empty] <= 1:
            return moves
        p = max(i for i, o in enumerate(owner) if o == full)
        owner[p] = empty
        moves.append((p, full, empty))


def move_empty_slot(cluster: RedisCluster, slot: int, src: int, dst: int) -> None:
    """Give ``slot`` (which must hold no keys yet) from master ``src`` to ``dst``
    (indexes in ``cluster.nodes``): the steps of a migration with nothing to migrate."""
    source, target = cluster.nodes[src], cluster.nodes[dst]
    if redis_command(source.port, "CLUSTER", "COUNTKEYSINSLOT", str(slot)) not in ("", "0"):
        raise RuntimeError(f"slot {slot} holds keys: move it with redis-cli --cluster reshard")
    target_id = redis_command(target.port, "CLUSTER", "MYID")
    source_id = redis_command(source.port, "CLUSTER", "MYID")
    _ok(target.port, "CLUSTER", "SETSLOT", str(slot), "IMPORTING", source_id)
    _ok(source.port, "CLUSTER", "SETSLOT", str(slot), "MIGRATING", target_id)
    # The target first, then the source, then the others (Redis' documented order).
    for node in [target, source, *(n for n in cluster.nodes if n not in (source, target))]:
        _ok(node.port, "CLUSTER", "SETSLOT", str(slot), "NODE", target_id)


def _ok(port: int, *command: str) -> None:
    if redis_command(port, *command) != "OK":
        raise RuntimeError(f"{' '.join(command)} on port {port} did not answer OK")


def balance(
    cluster: RedisCluster, prefix: str, count: int, timeout: float = 30.0
) -> tuple[list[int], list[int]]:
    """Even out the partitions over the masters (before any key is written).

    Returns the owners as created and as balanced (see :func:`owners`)."""
    masters = len(cluster.nodes)
    before = owners(cluster, prefix, count)
    after = list(before)
    for p, src, dst in plan_moves(before, masters):
        move_empty_slot(cluster, partition_slot(prefix, p), src, dst)
        after[p] = dst
    # Every node must route the moved slots before a client learns the slot map.
    deadline = time.monotonic() + timeout
    while any(owners(cluster, prefix, count, node.port) != after for node in cluster.nodes):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the cluster did not agree on the moved slots within {timeout} s")
        time.sleep(0.05)
    cluster.wait_until_ok(timeout)
    return before, after
