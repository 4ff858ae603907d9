"""B6: backlog independence. Promotion rate (a B3 burst, 1 worker) and B4 lateness
(steady rate, 2 workers) with 10 k, 1 M and 5 M not-yet-due messages in the set.

Baseline in the same run: the smallest backlog (10 k). Target: at 5 M, burst
messages/s and steady p99 within 10 % of it. Each backlog size gets its own stack;
the backlog is loaded through Store.accept_many before any service process starts.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid as uuidlib

import redis

from app.model import NewMessage
from app.settings import Settings
from app.store import Store, connect
from app.store.keys import Keyspace
from bench.b3_burst import load as load_burst
from bench.b4_steady import post_at_rate
from bench.common import (
    burst_figures,
    lateness_figures,
    print_table,
    redis_cpu,
    stack,
    write_result,
)

PREFIX = "bench"
BODY = "x" * 100
# Far enough ahead that no backlog message falls due during a run, near enough to be
# an ordinary schedule rather than a sentinel score.
BACKLOG_AHEAD_MS = 30 * 24 * 3600 * 1000
LOADERS = 4  # connections: overlaps building a batch here with the script running in Redis
DELAY_S = 2.0
MEDIANS = ("rate", "seconds", "p50_ms", "p99_ms", "max_ms", "redis_cpu_us_per_msg")


async def load_backlog(url: str, count: int) -> None:
    settings = Settings.from_env({}, redis_url=url, prefix=PREFIX)
    base = int(time.time() * 1000) + BACKLOG_AHEAD_MS
    starts = iter(range(0, count, 1000))

    async def loader() -> None:
        client = connect(settings, socket_timeout=60.0)
        store = Store(client, settings)
        try:
            for start in starts:
                n = min(1000, count - start)
                # Ascending scores: a batch never becomes the earliest, so loading wakes no one.
                await store.accept_many(
                    [NewMessage(str(uuidlib.uuid4()), BODY, base + start + i) for i in range(n)]
                )
        finally:
            await client.aclose()

    await asyncio.gather(*(loader() for _ in range(LOADERS)))


def settle_aof(r: redis.Redis, timeout: float = 600.0) -> float:
    """Rewrite the AOF now and wait: a rewrite the load set off must not fork inside the
    measurement, and every size starts measuring with a fresh AOF base."""
    start = time.monotonic()
    deadline = start + timeout
    requested = False
    while time.monotonic() < deadline:
        info = r.info("persistence")
        busy = info["aof_rewrite_in_progress"] or info["aof_rewrite_scheduled"]
        if not busy and requested:
            return time.monotonic() - start
        if not busy:
            r.bgrewriteaof()
            requested = True
        time.sleep(0.2)
    raise RuntimeError(f"AOF rewrite still running after {timeout} s")


def burst_once(s, r: redis.Redis, count: int) -> dict:
    """One B3 burst on a running stack: ``count`` messages due at one instant T."""
    lead_ms = 3000 + count // 5
    run_at = int(time.time() * 1000) + lead_ms
    asyncio.run(load_burst(s.redis.url, PREFIX, count, run_at))
    if time.time() * 1000 > run_at:
        raise SystemExit("loading the burst took longer than its lead time; raise it")
    # Redis' own CPU per message (promote, read, ack) is steadier than wall time on
    # shared cores, and tells a slower Redis from a busier machine.
    cpu0 = redis_cpu(r)
    lines = s.wait_for_echoes(lambda ls: sum(e["runAt"] == run_at for e in ls) >= count, 120)
    cpu = redis_cpu(r) - cpu0
    mine = [e for e in lines if e["runAt"] == run_at]
    return {**burst_figures(mine, run_at, count), "redis_cpu_us_per_msg": cpu / count * 1e6}


def one_size(backlog: int, burst: int, repeats: int, rate: float, seconds: float) -> dict:
    with stack(prefix=PREFIX) as s:
        r = redis.Redis.from_url(s.redis.url)
        t0 = time.monotonic()
        asyncio.run(load_backlog(s.redis.url, backlog))
        load_s = time.monotonic() - t0
        aof_s = settle_aof(r)
        used = r.info("memory")["used_memory"]
        delayed_key = Keyspace(PREFIX).delayed
        if r.zcard(delayed_key) != backlog:
            raise RuntimeError(f"backlog of {backlog:,} not all scheduled")

        url = s.api() + "/api/v1/save-message"
        s.serve(schedulers=2, workers=1)

        # (a) bursts as B3 with one worker; the median of several, since one burst
        # on two shared cores varies by tens of per cent from run to run.
        bursts = [burst_once(s, r, burst) for _ in range(repeats)]

        # (b) steady lateness, as B4 with two workers.
        s.spawn("worker1", ["worker", "--consumer-name", "w1"])
        s.wait_for_log("worker", "worker started", every=True)
        accepted = asyncio.run(post_at_rate(url, rate, seconds, int(DELAY_S * 1000)))
        lines = s.wait_for_echoes(lambda ls: accepted <= {e["uuid"] for e in ls}, DELAY_S + 20)
        steady = [e["handledAt"] - e["runAt"] for e in lines if e["uuid"] in accepted]
        backlog_left = r.zcard(delayed_key)
        r.close()
    return {
        "backlog": backlog,
        "load_s": load_s,
        "load_per_s": backlog / load_s,
        "aof_rewrite_s": aof_s,
        "used_memory": used,
        "backlog_left": backlog_left,
        "burst": {
            "count": burst,
            "lost": sum(b["lost"] for b in bursts),
            **{k: statistics.median(b[k] for b in bursts) for k in MEDIANS},
            "runs": bursts,
        },
        "steady": {
            "rate": rate,
            "posted": len(accepted),
            "lost": len(accepted - {e["uuid"] for e in lines}),
            "early": sum(1 for x in steady if x < 0),
            **lateness_figures(steady),
        },
    }


def ratio(value: float, base: float) -> float:
    return value / base if base else float("nan")


def run(
    sizes: list[int],
    burst: int = 20_000,
    rate: float = 100.0,
    seconds: float = 20.0,
    repeats: int = 3,
) -> dict:
    results = []
    for size in sorted(sizes):
        print(f"B6: backlog {size:,} ...", flush=True)
        results.append(one_size(size, burst, repeats, rate, seconds))
    base = results[0]
    for r in results:
        r["rate_vs_base"] = ratio(r["burst"]["rate"], base["burst"]["rate"])
        r["p99_vs_base"] = ratio(r["steady"]["p99_ms"], base["steady"]["p99_ms"])
        r["within_10pct"] = r["rate_vs_base"] >= 0.9 and r["p99_vs_base"] <= 1.1
    print_table(
        f"B6 backlog independence: median of {repeats} bursts of {burst:,} (1 worker), "
        f"steady {rate:g}/s for {seconds:g} s (2 workers); baseline the "
        f"{base['backlog']:,} row (target: 5 M within 10 % on burst msgs/s and steady p99)",
        (
            "backlog",
            "load s",
            "MB",
            "burst msgs/s",
            "% of base",
            "burst p50 ms",
            "burst p99 ms",
            "Redis us/msg",
            "steady p50 ms",
            "steady p99 ms",
            "steady max ms",
            "p99 % of base",
            "lost",
            "early",
            "within 10 %",
        ),
        [
            (
                r["backlog"],
                r["load_s"],
                r["used_memory"] / 1e6,
                r["burst"]["rate"],
                r["rate_vs_base"] * 100,
                r["burst"]["p50_ms"],
                r["burst"]["p99_ms"],
                r["burst"]["redis_cpu_us_per_msg"],
                r["steady"]["p50_ms"],
                r["steady"]["p99_ms"],
                r["steady"]["max_ms"],
                r["p99_vs_base"] * 100,
                r["burst"]["lost"] + r["steady"]["lost"],
                r["steady"]["early"] + r["backlog"] - r["backlog_left"],
                "yes" if r["within_10pct"] else "no",
            )
            for r in results
        ],
    )
    payload = {
        "sizes": sorted(sizes),
        "burst": burst,
        "repeats": repeats,
        "rate": rate,
        "seconds": seconds,
        "baseline_backlog": base["backlog"],
        "results": results,
    }
    write_result("b6", payload)
    return payload


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,1000000,5000000", help="comma-separated")
    parser.add_argument("--burst", type=int, default=20_000, help="messages due at one instant")
    parser.add_argument("--repeats", type=int, default=3, help="bursts per size (median)")
    parser.add_argument("--rate", type=float, default=100.0, help="steady messages/s")
    parser.add_argument("--seconds", type=float, default=20.0, help="steady phase length")
    args = parser.parse_args()
    run([int(x) for x in args.sizes.split(",")], args.burst, args.rate, args.seconds, args.repeats)
