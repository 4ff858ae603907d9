"""B11: what 10,000 schedules with a one-minute cron cost the leader and Redis.

10,000 schedules ``* * * * *`` are stored (one put script each), then the leader's
schedule loop (``election.materialiser.Materialiser``, in this process, its gate opened
by hand: the election is not what is measured) runs as it does in a scheduler, one
pass a second. Each minute, one pass finds every schedule's next occurrence within
the 30 s horizon and turns all 10,000 into delayed messages (10,000 accepts in chunks
of 500, one progress script); the other 59 find nothing due and only read Redis' time
and the definitions' version. Measured: this process' CPU (``time.process_time``) and
Redis' (``INFO cpu``) for each kind of pass, per occurrence and per minute.

``python -m bench.run B11`` (``--quick``: 1,000 schedules, one minute; the full run: two minutes).
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

import redis

from app.ops.servers import RedisServer
from app.recurrence import Definition
from app.settings import Settings
from app.store import open_client
from app.store.partitions import Partitions
from app.store.schedules import Schedules
from bench.common import print_table, redis_cpu, write_result
from election.gate import LeadershipGate, Role
from election.materialiser import Materialiser

EPOCH = 1


async def measure(url: str, count: int, minutes: int) -> dict:
    settings = Settings.from_env({}, redis_url=url, prefix="bench-schedules")
    client = await open_client(settings)
    sync = redis.Redis.from_url(url)
    try:
        schedules = Schedules(Partitions(client, settings))
        every_minute = Definition(message="report", cron="* * * * *")
        started = time.perf_counter()
        for i in range(0, count, 50):
            await asyncio.gather(
                *(schedules.put(f"s{n:05d}", every_minute) for n in range(i, min(count, i + 50)))
            )
        put_s = time.perf_counter() - started
        gate = LeadershipGate()
        gate.set_role(Role.LEADER, EPOCH)
        leader = Materialiser(schedules, gate)

        async def timed_pass() -> tuple[float, float, int]:
            created = leader.stats.created
            cpu, rcpu = time.process_time(), redis_cpu(sync)
            await leader.materialise(EPOCH)
            return (
                time.process_time() - cpu,
                redis_cpu(sync) - rcpu,
                leader.stats.created - created,
            )

        # The first pass loads every definition (and may already find the next minute in
        # the horizon); then one pass a second, as the scheduler's loop makes them.
        load = await timed_pass()
        passes = []
        tick = time.monotonic()
        for _ in range(minutes * 60 + 5):
            tick += 1.0
            await asyncio.sleep(max(0.0, tick - time.monotonic()))
            passes.append(await timed_pass())
        full = [p for p in passes if p[2]]
        idle = [p for p in passes if not p[2]]
        assert all(p[2] == count for p in full), [p[2] for p in full]
        assert len(full) >= minutes - 1, f"{len(full)} full passes in {minutes} minute(s)"
        idle_cpu = sum(p[0] for p in idle) / len(idle)
        idle_redis = sum(p[1] for p in idle) / len(idle)
        full_cpu = sum(p[0] for p in full) / len(full)
        full_redis = sum(p[1] for p in full) / len(full)
        # A minute: one full pass and 59 idle ones.
        per_minute_cpu = full_cpu + 59 * idle_cpu
        per_minute_redis = full_redis + 59 * idle_redis
        return {
            "schedules": count,
            "minutes": minutes,
            "full_passes": len(full),
            "idle_passes": len(idle),
            "put_s": put_s,
            "load_pass_cpu_ms": load[0] * 1000,
            "idle_pass_cpu_ms": idle_cpu * 1000,
            "idle_pass_redis_ms": idle_redis * 1000,
            "full_pass_cpu_ms": full_cpu * 1000,
            "full_pass_redis_ms": full_redis * 1000,
            "leader_us_per_occurrence": per_minute_cpu / count * 1e6,
            "redis_us_per_occurrence": per_minute_redis / count * 1e6,
            "leader_core_share_pct": per_minute_cpu / 60 * 100,
            "redis_core_share_pct": per_minute_redis / 60 * 100,
        }
    finally:
        sync.close()
        await client.aclose()


def run(count: int = 10_000, minutes: int = 2) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        server = RedisServer(Path(folder))
        server.start()
        try:
            result = asyncio.run(measure(server.url, count, minutes))
        finally:
            server.stop()
    write_result("B11", result)
    print_table(
        f"B11: {count:,} schedules '* * * * *', {minutes} minute(s); the leader's loop and Redis",
        ["what", "leader CPU", "Redis CPU"],
        [
            ["store the schedules (put script each)", f"{result['put_s']:.1f} s wall", "-"],
            ["first pass: load every definition", f"{result['load_pass_cpu_ms']:.1f} ms", "-"],
            [
                f"idle pass (mean of {result['idle_passes']})",
                f"{result['idle_pass_cpu_ms']:.2f} ms",
                f"{result['idle_pass_redis_ms']:.2f} ms",
            ],
            [
                f"full pass: {count:,} occurrences (mean of {result['full_passes']})",
                f"{result['full_pass_cpu_ms']:.0f} ms",
                f"{result['full_pass_redis_ms']:.0f} ms",
            ],
            [
                "per occurrence (a minute: 1 full + 59 idle passes)",
                f"{result['leader_us_per_occurrence']:.0f} µs",
                f"{result['redis_us_per_occurrence']:.0f} µs",
            ],
            [
                "share of one core",
                f"{result['leader_core_share_pct']:.2f} %",
                f"{result['redis_core_share_pct']:.2f} %",
            ],
        ],
    )
    return result
