"""B3: a due burst. 20,000 messages all due at one instant T; seconds from T to the
last echo, messages/s and lateness, with 1 and with 2 worker processes.

Baseline in the same run: redis-benchmark XADD with -P 16 against the same Redis.
"""

from __future__ import annotations

import asyncio
import time
import uuid as uuidlib

from app.model import NewMessage
from app.settings import Settings
from app.store import Store, connect
from bench.common import burst_figures, print_table, redis_benchmark, stack, write_result


async def load(redis_url: str, prefix: str, count: int, run_at: int) -> None:
    settings = Settings.from_env({}, redis_url=redis_url, prefix=prefix)
    client = connect(settings)
    store = Store(client, settings)
    body = "x" * 100
    try:
        for start in range(0, count, 1000):
            batch = [
                NewMessage(str(uuidlib.uuid4()), body, run_at)
                for _ in range(min(1000, count - start))
            ]
            await store.accept_many(batch)
    finally:
        await client.aclose()


def redis_benchmark_xadd(port: int, count: int) -> float:
    return redis_benchmark(port, count, "XADD", "bench:xadd", "*", "m", "x" * 100)


def burst(workers: int, count: int) -> dict:
    with stack() as s:
        s.serve(schedulers=2, workers=workers)
        run_at = int(time.time() * 1000) + 4000
        asyncio.run(load(s.redis.url, "bench", count, run_at))
        if time.time() * 1000 > run_at:
            raise SystemExit("loading took longer than the lead time; raise it")
        lines = s.wait_for_echoes(lambda ls: len(ls) >= count, 120)
        baseline = redis_benchmark_xadd(s.redis.port, 100_000)
    return {
        "workers": workers,
        **burst_figures(lines, run_at, count),
        "baseline_xadd_per_s": baseline,
    }


def run(count: int = 20_000) -> dict:
    results = [burst(1, count), burst(2, count)]
    print_table(
        f"B3 due burst of {count:,} (target: >= 40,000/s with 1 worker, p99 <= 600 ms)",
        (
            "workers",
            "msgs/s",
            "seconds",
            "p50 ms",
            "p99 ms",
            "max ms",
            "lost",
            "XADD -P16/s (baseline)",
        ),
        [
            (
                r["workers"],
                r["rate"],
                r["seconds"],
                r["p50_ms"],
                r["p99_ms"],
                r["max_ms"],
                r["lost"],
                r["baseline_xadd_per_s"],
            )
            for r in results
        ],
    )
    payload = {"count": count, "results": results}
    write_result("b3", payload)
    return payload


if __name__ == "__main__":
    run()
