"""Redis CPU per message of the hot scripts: accept, promote, ack.

Not a target of its own: the profile behind B2 and B3, whose throughput is
bounded by what Redis spends per message. Drives the scripts through
app.store.Store against its own Redis (AOF everysec, as in production) from
this process, in batches of 1,000, and reads Redis' own CPU time
(``INFO cpu``) and each command's time (``INFO commandstats``, the commands the
scripts call included) around each phase. ``--backlog N`` first loads N
messages due in a month, as B6 does, to show what a large data set costs.

``python -m bench.scripts_cost [--count N] [--backlog N]``
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
from bench.b6_backlog import PREFIX, load_backlog, settle_aof
from bench.common import print_table, redis_cpu, stack, write_result

BATCH = 1000


def _command_s(r: redis.Redis) -> dict[str, float]:
    """Seconds spent per command since the last CONFIG RESETSTAT."""
    return {
        name.removeprefix("cmdstat_"): stats["usec"] / 1e6
        for name, stats in r.info("commandstats").items()
    }


async def _phases(url: str, r: redis.Redis, count: int) -> dict[str, tuple[float, dict]]:
    settings = Settings.from_env({}, redis_url=url, prefix=PREFIX)
    client = connect(settings)
    store = Store(client, settings)
    out: dict[str, tuple[float, dict]] = {}

    async def measure(name: str, phase) -> None:
        r.config_resetstat()
        cpu = redis_cpu(r)
        await phase()
        out[name] = (redis_cpu(r) - cpu, _command_s(r))

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


# The commands the hot scripts spend their time in, shown per phase.
SHOWN = ("evalsha", "hmget", "hset", "zadd", "xadd", "xack", "xtrim", "zremrangebyrank")


def run(count: int = 50_000, backlog: int = 0) -> dict:
    count = max(BATCH, count - count % BATCH)
    with stack(zookeeper=False, prefix=PREFIX) as s:
        r = redis.Redis.from_url(s.redis.url)
        if backlog:
            asyncio.run(load_backlog(s.redis.url, backlog))
            settle_aof(r)
        phases = asyncio.run(_phases(s.redis.url, r, count))
        r.close()
    per_phase = {
        name: {
            "cpu_us": cpu / count * 1e6,
            **{f"{c}_us": commands.get(c, 0.0) / count * 1e6 for c in SHOWN},
        }
        for name, (cpu, commands) in phases.items()
    }
    print_table(
        f"Redis cost per message of the hot scripts, {count:,} messages in batches of "
        f"{BATCH:,}, {backlog:,} more waiting (us per message)",
        ("phase", "Redis CPU", *SHOWN),
        [
            (name, figures["cpu_us"], *(figures[f"{c}_us"] for c in SHOWN))
            for name, figures in per_phase.items()
        ],
    )
    payload = {"count": count, "backlog": backlog, "phases": per_phase}
    write_result("scripts_cost", payload)
    return payload


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=50_000)
    parser.add_argument("--backlog", type=int, default=0, help="messages waiting meanwhile")
    args = parser.parse_args()
    run(args.count, args.backlog)
