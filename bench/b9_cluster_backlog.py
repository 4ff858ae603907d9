"""B9: a large backlog on a Redis Cluster. 10 M not-yet-due messages over 3 masters
with 16 partitions: memory per master, and B6's burst rate and steady p99 on top
of it against the same measurements with a 10 k backlog on the same cluster.

One cluster, one run: a 10 k backlog is loaded, the service measured (bursts
with one worker, median of ``repeats``; then a steady rate with two workers),
the backlog grown to the full count while the service keeps running (as a real
one would), and the same measured again. The backlog goes in through the accept
script, straight to each partition's master, in big batches, several at once
(``bench.loader.load_backlog``); the AOF is rewritten after each load so that no
rewrite forks inside a measurement.

Target: with the full backlog, burst msgs/s and steady p99 within 10 % of the
10 k figures. Memory per master: ``used_memory`` after the load minus that of the
empty master, per message the master holds (B5's figure for one Redis: 327 B).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time

from app.store.keys import Keyspace
from bench.b6_backlog import BACKLOG_AHEAD_MS, DELAY_S, MEDIANS
from bench.b8_scaleout import (
    PARTITIONS,
    PREFIX,
    Masters,
    partitions_of,
    until_due,
    wait_echoed,
)
from bench.common import burst_figures, lateness_figures, print_table, stack, write_result
from bench.loader import load_backlog, load_due, timed
from bench.poster import send_at_rate
from bench.scaling import counts_by_master, memory_needed, ratio, shares, us_per_message

LOAD_TIMEOUT_S = 1800.0  # a load slower than this is a machine too busy to measure on


def mem_available() -> int:
    """Bytes of RAM the kernel says can be had without swapping (``MemAvailable``)."""
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def settle_aof(m: Masters, timeout: float = 900.0) -> float:
    """Rewrite every master's AOF now and wait for all: B6's ``settle_aof``, the masters
    at once."""
    start = time.monotonic()
    requested = [False] * len(m.clients)
    while time.monotonic() < start + timeout:
        done = True
        for i, c in enumerate(m.clients):
            info = c.info("persistence")
            busy = info["aof_rewrite_in_progress"] or info["aof_rewrite_scheduled"]
            if not busy and not requested[i]:
                c.bgrewriteaof()
                requested[i] = True
                done = False
            elif busy:
                done = False
        if done:
            return time.monotonic() - start
        time.sleep(0.2)
    raise RuntimeError(f"AOF rewrites still running after {timeout} s")


def used_memory(m: Masters) -> list[int]:
    for c in m.clients:
        c.memory_purge()
    return [c.info("memory")["used_memory"] for c in m.clients]


def backlog_by_partition(s, m: Masters) -> list[int]:
    return [m.clients[s.owners[p]].zcard(Keyspace(PREFIX, p).delayed) for p in range(len(s.owners))]


def burst_once(s, m: Masters, count: int) -> dict:
    run_at = int(time.time() * 1000) + 3000 + count // 5
    asyncio.run(load_due(s.env, count, run_at))
    if time.time() * 1000 > run_at:
        raise SystemExit("loading the burst took longer than its lead time; raise it")
    before = until_due(m, run_at)
    lines = s.wait_for_echoes(lambda ls: sum(e["runAt"] == run_at for e in ls) >= count, 120)
    cpu = sum(m.cpu_since(before))
    mine = [e for e in lines if e["runAt"] == run_at]
    return {
        **burst_figures(mine, run_at, count),
        "redis_cpu_us_per_msg": us_per_message(cpu, count),
    }


def measure(s, m: Masters, url: str, burst: int, repeats: int, rate: float, seconds: float, n: int):
    """Bursts with the one running worker, then a steady rate with a second worker
    (``worker-steady<n>``, stopped again afterwards)."""
    # The machine's load (other work on the shared cores) next to each figure: on two
    # shared cores it moves the rates and the p99 more than the backlog does.
    load_before = os.getloadavg()[0]
    bursts = [burst_once(s, m, burst) for _ in range(repeats)]
    load_bursts = os.getloadavg()[0]
    worker = f"worker-steady{n}"
    s.spawn(worker, ["worker", "--consumer-name", f"steady{n}"])
    s.wait_for_log(worker, "worker started", every=True)
    posted = asyncio.run(send_at_rate(url, rate, seconds, int(DELAY_S * 1000)))
    lines = wait_echoed(s, posted.accepted, DELAY_S + 20)
    mine = [e for e in lines if e["uuid"] in posted.accepted]
    late = [e["handledAt"] - posted.run_ats[e["uuid"]] for e in mine]
    s.stop_processes([worker])
    return {
        "load_avg": [load_before, load_bursts, os.getloadavg()[0]],
        "burst": {
            "count": burst,
            "lost": sum(b["lost"] for b in bursts),
            **{k: statistics.median(b[k] for b in bursts) for k in MEDIANS},
            "runs": bursts,
        },
        "steady": {
            "rate": rate,
            "posted": len(posted.accepted),
            "lost": len(posted.accepted - {e["uuid"] for e in mine}),
            "early": sum(1 for x in late if x < 0),
            "shares": shares(
                counts_by_master(
                    partitions_of((e["uuid"] for e in mine), len(s.owners)),
                    s.owners,
                    len(s.masters),
                )
            ),
            **lateness_figures(late),
        },
    }


def grow(s, m: Masters, target: int, have: int, base_ms: int) -> dict:
    """Load the backlog from ``have`` to ``target`` messages; settle the AOF."""
    urls = [s.masters[o].url for o in s.owners]
    _, load_s = timed(
        asyncio.wait_for(load_backlog(s.env, urls, target - have, base_ms + have), LOAD_TIMEOUT_S)
    )
    aof_s = settle_aof(m)
    per_partition = backlog_by_partition(s, m)
    if sum(per_partition) != target:
        raise RuntimeError(f"{sum(per_partition):,} scheduled, not {target:,}")
    return {
        "backlog": target,
        "load_s": load_s,
        "load_per_s": (target - have) / load_s,
        "aof_rewrite_s": aof_s,
        "used_memory": used_memory(m),
        "backlog_by_master": counts_by_master(per_partition, s.owners, len(s.masters)),
    }


def run(
    backlog: int = 10_000_000,
    base: int = 10_000,
    burst: int = 20_000,
    repeats: int = 3,
    rate: float = 100.0,
    seconds: float = 20.0,
) -> dict:
    need, have_ram = memory_needed(backlog), mem_available()
    if need > have_ram:
        raise SystemExit(
            f"a backlog of {backlog:,} may need {need / 2**30:.1f} GiB of RAM and "
            f"{have_ram / 2**30:.1f} GiB is available: give a smaller --backlog"
        )
    results = []
    with stack(prefix=PREFIX, cluster_partitions=PARTITIONS) as s:
        m = Masters(s)
        empty = used_memory(m)
        base_ms = int(time.time() * 1000) + BACKLOG_AHEAD_MS
        url = s.api() + "/api/v1/save-message"
        have = 0
        for i, size in enumerate(sorted({base, backlog})):
            print(f"B9: backlog {size:,} ...", flush=True)
            state = grow(s, m, size, have, base_ms)
            have = size
            if i == 0:
                s.serve(schedulers=2, workers=1)
            state.update(measure(s, m, url, burst, repeats, rate, seconds, i))
            state["bytes_per_msg_by_master"] = [
                (used - e) / n if n else float("nan")
                for used, e, n in zip(
                    state["used_memory"], empty, state["backlog_by_master"], strict=True
                )
            ]
            state["bytes_per_msg"] = (sum(state["used_memory"]) - sum(empty)) / size
            state["backlog_left"] = sum(backlog_by_partition(s, m))
            results.append(state)
        m.close()
    first = results[0]
    for r in results:
        r["rate_vs_base"] = ratio(r["burst"]["rate"], first["burst"]["rate"])
        r["p99_vs_base"] = ratio(r["steady"]["p99_ms"], first["steady"]["p99_ms"])
        r["within_10pct"] = r["rate_vs_base"] >= 0.9 and r["p99_vs_base"] <= 1.1
    print_table(
        f"B9 backlog on 3 masters, {PARTITIONS} partitions: median of {repeats} bursts of "
        f"{burst:,} (1 worker), steady {rate:g}/s for {seconds:g} s (2 workers); baseline the "
        f"{first['backlog']:,} row (target: within 10 % on burst msgs/s and steady p99)",
        (
            "backlog",
            "load s",
            "loaded/s",
            "MB per master",
            "B/msg per master",
            "burst msgs/s",
            "% of base",
            "burst p99 ms",
            "Redis us/msg",
            "steady p50 ms",
            "steady p99 ms",
            "p99 % of base",
            "lost",
            "early",
            "within 10 %",
            "load avg",
        ),
        [
            (
                r["backlog"],
                r["load_s"],
                r["load_per_s"],
                "/".join(f"{u / 1e6:,.0f}" for u in r["used_memory"]),
                "/".join(f"{b:,.0f}" for b in r["bytes_per_msg_by_master"]),
                r["burst"]["rate"],
                r["rate_vs_base"] * 100,
                r["burst"]["p99_ms"],
                r["burst"]["redis_cpu_us_per_msg"],
                r["steady"]["p50_ms"],
                r["steady"]["p99_ms"],
                r["p99_vs_base"] * 100,
                r["burst"]["lost"] + r["steady"]["lost"],
                r["steady"]["early"] + r["backlog"] - r["backlog_left"],
                "yes" if r["within_10pct"] else "no",
                "/".join(f"{x:.1f}" for x in r["load_avg"]),
            )
            for r in results
        ],
    )
    last = results[-1]
    print(
        f"  empty masters: {'/'.join(f'{e / 1e6:,.1f}' for e in empty)} MB; "
        f"backlog per master {'/'.join(f'{n:,}' for n in last['backlog_by_master'])}; "
        f"{last['bytes_per_msg']:,.0f} B per message over all masters"
    )
    payload = {
        "backlog": backlog,
        "base": base,
        "burst": burst,
        "repeats": repeats,
        "rate": rate,
        "seconds": seconds,
        "partitions": PARTITIONS,
        "empty_memory": empty,
        "results": results,
    }
    write_result("b9", payload)
    return payload


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backlog", type=int, default=10_000_000, help="the large backlog")
    parser.add_argument("--base", type=int, default=10_000, help="the baseline backlog")
    parser.add_argument("--burst", type=int, default=20_000, help="messages due at one instant")
    parser.add_argument("--repeats", type=int, default=3, help="bursts per size (median)")
    parser.add_argument("--rate", type=float, default=100.0, help="steady messages/s")
    parser.add_argument("--seconds", type=float, default=20.0, help="steady phase length")
    a = parser.parse_args()
    run(a.backlog, a.base, a.burst, a.repeats, a.rate, a.seconds)
