"""Redis CPU per message of the hot scripts: accept, promote, ack.

Not a target of its own: the profile behind B2 and B3, whose throughput is
bounded by what Redis spends per message. Drives the scripts through
app.store.Store against its own Redis (AOF everysec, as in production) from
this process, in batches of 1,000, and reads Redis' own CPU time
(``INFO cpu``) and the scripts' time (``INFO commandstats``) around each phase.

``python -m bench.scripts_cost [--count N]``
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid as uuidlib

import redis

from app.model import NewMessage
from app.settings import Settings
from app.store import Store, connect
from bench.common import print_table, stack, write_result

BATCH = 1000


def _cpu_s(r: redis.Redis) -> float:
    info = r.info("cpu")
    return info["used_cpu_user"] + info["used_cpu_sys"]


def _script_s(r: redis.Redis) -> float:
    stats = r.info("commandstats")
    return stats.get("cmdstat_evalsha", {}).get("usec", 0) / 1e6


async def _phases(url: str, r: redis.Redis, count: int) -> dict[str, tuple[float, float]]:
    settings = Settings.from_env({}, redis_url=url, prefix="bench")
    client = connect(settings)
    store = Store(client, settings)
    out: dict[str, tuple[float, float]] = {}

    async def measure(name: str, phase) -> None:
        r.config_resetstat()
        cpu = _cpu_s(r)
        await phase()
        out[name] = (_cpu_s(r) - cpu, _script_s(r))

    body = "x" * 100
    try:
        await store.ensure_group()
        # Due after they are all accepted (so accept takes its scheduled path), then promoted.
        soon = int(time.time() * 1000) + 2000 + count // 20

        async def accept() -> None:
            for _ in range(count // BATCH):
                await store.accept_many(
                    [NewMessage(str(uuidlib.uuid4()), body, soon) for _i in range(BATCH)]
                )

        async def promote() -> None:
            while (await store.promote(1, limit=BATCH)).moved:
                pass

        async def read_and_ack() -> None:
            while deliveries := await store.read("bench", BATCH, None):
                await store.ack(deliveries)

        await measure("accept (scheduled)", accept)
        await asyncio.sleep(max(0.0, soon / 1000 - time.time()) + 0.01)
        await measure("promote", promote)
        await measure("read + ack", read_and_ack)
    finally:
        await client.aclose()
    return out


def run(count: int = 50_000) -> dict:
    count = max(BATCH, count - count % BATCH)
    with stack(zookeeper=False) as s:
        r = redis.Redis.from_url(s.redis.url)
        phases = asyncio.run(_phases(s.redis.url, r, count))
        r.close()
    rows = [
        (name, cpu / count * 1e6, script / count * 1e6) for name, (cpu, script) in phases.items()
    ]
    print_table(
        f"Redis cost per message of the hot scripts, {count:,} messages, batches of {BATCH:,}",
        ("phase", "Redis CPU us/msg", "EVALSHA us/msg"),
        rows,
    )
    per_phase = {name: {"cpu_us": cpu, "script_us": script} for name, cpu, script in rows}
    payload = {"count": count, "phases": per_phase}
    write_result("scripts_cost", payload)
    return payload


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=50_000)
    run(parser.parse_args().count)
