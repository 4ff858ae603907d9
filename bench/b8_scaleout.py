"""B8: scale-out. One Redis against a 3-master Redis Cluster with 16 partitions, on
the same workloads in one run: B2 bulk ingest, a B3 burst, B4 steady rates.

Two shared cores cannot show three masters' throughput, so besides the measured
rates this prints what shows scaling on any machine (``bench.scaling``): each
master's share of the messages (target: within ±15 % of 1/3), Redis CPU per
message summed over the masters (``INFO cpu`` before and after each workload;
target: at most 1.15 x the single Redis'), the capacity per master this implies
(one core ÷ µs per message) and the cluster's projected capacity (that ÷ the
busiest master's share: x 3 when even). The partitions are spread 5/5/6 over
the masters first (``bench.placement``); the shares the cluster as created would
have given are printed from the same messages.

Baseline in the same run: the single Redis, each workload's own row.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import time

import redis

from app.store.codec import uuid_key
from app.store.keys import Keyspace, partition_of
from bench.b2_bulk import post_bulk
from bench.b4_steady import echoed_count
from bench.common import (
    burst_figures,
    lateness_figures,
    print_table,
    stack,
    write_result,
)
from bench.loader import load_due
from bench.poster import send_at_rate
from bench.scaling import (
    capacity,
    counts_by_master,
    projected_capacity,
    ratio,
    share_deviation,
    shares,
    us_per_message,
)

PREFIX = "eat"  # the default: the placement an operator's cluster gets
PARTITIONS = 16
DELAY_S = 2.0
IDLE_S = 3.0


class Masters:
    """A plain client per master of a stack, for ``INFO`` and counts per partition."""

    def __init__(self, s) -> None:
        self.stack = s
        self.clients = [redis.Redis.from_url(m.url) for m in s.masters]

    def cpu(self) -> list[tuple[float, int]]:
        """Each master's CPU seconds so far and the commands it has run."""
        out = []
        for c in self.clients:
            info = c.info("cpu", "stats")
            cpu = info["used_cpu_user"] + info["used_cpu_sys"]
            out.append((cpu, info["total_commands_processed"]))
        return out

    def since(self, before: list[tuple[float, int]]) -> tuple[list[float], int]:
        """Each master's CPU seconds since ``before``, and the commands all of them ran
        (``total_commands_processed``: a script call and each command it runs)."""
        now = self.cpu()
        cpu = [n[0] - b[0] for n, b in zip(now, before, strict=True)]
        return cpu, sum(n[1] - b[1] for n, b in zip(now, before, strict=True))

    def cpu_since(self, before: list[tuple[float, int]]) -> list[float]:
        return self.since(before)[0]

    def close(self) -> None:
        for c in self.clients:
            c.close()


def partitions_of(uuids, count: int) -> list[int]:
    out = [0] * count
    for u in uuids:
        out[partition_of(uuid_key(u), count)] += 1
    return out


def figures(
    s, name: str, per_partition: list[int], cpu: list[float], calls: int = 0, **extra
) -> dict:
    """A workload's row: messages per master (as used and as created) and CPU per master."""
    masters = len(s.masters)
    counts = counts_by_master(per_partition, s.owners, masters)
    created = counts_by_master(per_partition, s.created_owners, masters)
    messages = sum(per_partition)
    us = us_per_message(sum(cpu), messages)
    fractions = shares(counts)
    return {
        "workload": name,
        "messages": messages,
        "counts_by_master": counts,
        "shares": fractions,
        "share_deviation": share_deviation(fractions),
        "created_shares": shares(created),
        "created_share_deviation": share_deviation(shares(created)),
        "cpu_by_master_s": cpu,
        "redis_cpu_us_per_msg": us,
        # Commands Redis ran per message (those a script runs count, the script call
        # too): what partitioning multiplies when a call carries fewer messages.
        "commands_per_msg": calls / messages if messages else float("nan"),
        "per_master_capacity": capacity(us),
        "projected_capacity": projected_capacity(capacity(us), fractions),
        **extra,
    }


def bulk(cluster: bool, seconds: float) -> dict:
    with stack(
        zookeeper=False, prefix=PREFIX, cluster_partitions=PARTITIONS if cluster else 0
    ) as s:
        m = Masters(s)
        url = s.api() + "/api/v1/save-messages"
        count = len(s.owners)
        before = m.cpu()
        start = time.monotonic()
        accepted, failed = asyncio.run(post_bulk(url, seconds, 4, 1000))
        elapsed = time.monotonic() - start
        cpu, calls = m.since(before)
        numbers = [None] if count == 1 else range(count)
        per_partition = [
            m.clients[s.owners[i]].hlen(Keyspace(PREFIX, p).messages) for i, p in enumerate(numbers)
        ]
        m.close()
    if sum(per_partition) != accepted:
        raise RuntimeError(f"{accepted:,} accepted but {sum(per_partition):,} stored")
    return figures(s, "B2 bulk", per_partition, cpu, calls, rate=accepted / elapsed, failed=failed)


def until_due(m: Masters, run_at: int) -> list[tuple[float, int]]:
    """Sleep until just before ``run_at`` (epoch ms), then read the masters' CPU: the
    burst's cost starts there, not with the idle wait for it (an idle cluster costs
    its masters about four times what one idle Redis costs)."""
    time.sleep(max(0.0, run_at / 1000 - time.time() - 0.02))
    return m.cpu()


def wait_echoed(s, uuids: set[str], timeout: float) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if echoed_count(s) >= len(uuids) and uuids <= {e["uuid"] for e in s.echo_lines()}:
            break
        time.sleep(0.2)
    return s.echo_lines()


def burst_and_steady(cluster: bool, burst: int, rates: list[float], seconds: float) -> list[dict]:
    rows = []
    with stack(prefix=PREFIX, cluster_partitions=PARTITIONS if cluster else 0) as s:
        m = Masters(s)
        count = len(s.owners)
        url = s.api() + "/api/v1/save-message"
        s.serve(schedulers=2, workers=1)

        # What the running processes cost Redis with nothing to do (promotes and blocked
        # reads timing out, per partition): a fixed cost, not one per message.
        before = m.cpu()
        time.sleep(IDLE_S)
        idle_ms_per_s = sum(m.cpu_since(before)) / IDLE_S * 1000

        # (a) a B3 burst, one worker.
        run_at = int(time.time() * 1000) + 3000 + burst // 5
        asyncio.run(load_due(s.env, burst, run_at))
        if time.time() * 1000 > run_at:
            raise SystemExit("loading the burst took longer than its lead time; raise it")
        before = until_due(m, run_at)
        lines = s.wait_for_echoes(lambda ls: len(ls) >= burst, 120)
        cpu, calls = m.since(before)
        rows.append(
            figures(
                s,
                "B3 burst",
                partitions_of((e["uuid"] for e in lines), count),
                cpu,
                calls,
                idle_ms_per_s=idle_ms_per_s,
                **burst_figures(lines, run_at, burst),
            )
        )

        # (b) B4 steady rates, two workers.
        s.spawn("worker1", ["worker", "--consumer-name", "w1"])
        s.wait_for_log("worker", "worker started", every=True)
        for rate in rates:
            before = m.cpu()
            posted = asyncio.run(send_at_rate(url, rate, seconds, int(DELAY_S * 1000)))
            lines = wait_echoed(s, posted.accepted, DELAY_S + 20)
            cpu, calls = m.since(before)
            mine = [e for e in lines if e["uuid"] in posted.accepted]
            late = [e["handledAt"] - posted.run_ats[e["uuid"]] for e in mine]
            rows.append(
                figures(
                    s,
                    f"B4 {rate:g}/s",
                    partitions_of((e["uuid"] for e in mine), count),
                    cpu,
                    calls,
                    idle_ms_per_s=idle_ms_per_s,
                    rate=rate,
                    posted=len(posted.accepted),
                    lost=len(posted.accepted - {e["uuid"] for e in mine}),
                    early=sum(1 for x in late if x < 0),
                    **lateness_figures(late),
                )
            )
        m.close()
    return rows


def compare(single: list[dict], cluster: list[dict]) -> list[dict]:
    """Each cluster row with its ratios to the single Redis' row of the same workload."""
    by_name = {r["workload"]: r for r in single}
    for row in cluster:
        base = by_name[row["workload"]]
        row["cpu_vs_single"] = ratio(row["redis_cpu_us_per_msg"], base["redis_cpu_us_per_msg"])
        row["capacity_vs_single"] = ratio(row["projected_capacity"], base["per_master_capacity"])
    return cluster


def _pct(fractions: list[float]) -> str:
    return "/".join("?" if math.isnan(f) else f"{f * 100:.0f}" for f in fractions)


def run(
    seconds: float = 10.0,
    burst: int = 20_000,
    rates: list[float] | None = None,
    steady_s: float = 15.0,
) -> dict:
    rates = rates or [100.0, 2000.0]
    results: dict[str, list[dict]] = {}
    for name, cluster in (("single", False), ("cluster", True)):
        print(f"B8: {name} ...", flush=True)
        results[name] = [bulk(cluster, seconds), *burst_and_steady(cluster, burst, rates, steady_s)]
    compare(results["single"], results["cluster"])
    rows = []
    for single, clustered in zip(results["single"], results["cluster"], strict=True):
        for name, r in (("1 Redis", single), ("3 masters, 16 partitions", clustered)):
            rows.append(
                (
                    r["workload"],
                    name,
                    r["messages"],
                    r["rate"],
                    r.get("p99_ms", ""),
                    r["redis_cpu_us_per_msg"],
                    r.get("cpu_vs_single", ""),
                    r["commands_per_msg"],
                    _pct(r["shares"]),
                    f"{r['share_deviation'] * 100:.0f}",
                    r["per_master_capacity"],
                    r["projected_capacity"],
                    r.get("capacity_vs_single", ""),
                )
            )
    print_table(
        f"B8 scale-out: 1 Redis (baseline) against 3 masters with {PARTITIONS} partitions "
        "(targets: share within ±15 % of 1/3; Redis CPU per message <= 1.15 x 1 Redis')",
        (
            "workload",
            "Redis",
            "messages",
            "msgs/s",
            "p99 ms",
            "Redis us/msg",
            "x 1 Redis",
            "commands/msg",
            "share % per master",
            "max share dev %",
            "msgs/s per core",
            "projected msgs/s",
            "x 1 Redis",
        ),
        rows,
    )
    cluster_rows = results["cluster"]
    print(
        "  shares had the cluster kept the placement it was created with: "
        + ", ".join(
            f"{r['workload']} {_pct(r['created_shares'])} "
            f"(max dev {r['created_share_deviation'] * 100:.0f} %)"
            for r in cluster_rows
        )
    )
    for name in ("single", "cluster"):
        idle = next(r["idle_ms_per_s"] for r in results[name] if "idle_ms_per_s" in r)
        print(f"  Redis CPU with the processes idle, {name}: {idle:.1f} ms/s")
    payload = {"partitions": PARTITIONS, "prefix": PREFIX, **results}
    write_result("b8", payload)
    return payload


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="bulk ingest length")
    parser.add_argument("--burst", type=int, default=20_000, help="messages due at one instant")
    parser.add_argument("--rates", default="100,2000", help="steady messages/s, comma-separated")
    parser.add_argument("--steady-seconds", type=float, default=15.0)
    args = parser.parse_args()
    run(args.seconds, args.burst, [float(r) for r in args.rates.split(",")], args.steady_seconds)
