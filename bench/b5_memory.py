"""B5: Redis memory per delayed message (1,000,000 messages with 100-byte bodies).

Reports used_memory after loading minus used_memory of the empty instance
(the baseline, measured in the same run), per message, and that figure minus
the 100-byte body: the bytes the service adds per message.
"""

from __future__ import annotations

import argparse
import asyncio
import uuid as uuidlib

import redis

from app.model import NewMessage
from app.settings import Settings
from app.store import Store, connect
from bench.common import print_table, stack, write_result

BODY = 100
FUTURE = 253402300799999


async def load(url: str, count: int) -> None:
    settings = Settings.from_env({}, redis_url=url, prefix="bench")
    client = connect(settings)
    store = Store(client, settings)
    body = "x" * BODY
    try:
        for start in range(0, count, 1000):
            n = min(1000, count - start)
            await store.accept_many(
                [NewMessage(str(uuidlib.uuid4()), body, FUTURE - i) for i in range(n)]
            )
    finally:
        await client.aclose()


def run(count: int = 1_000_000) -> dict:
    with stack(zookeeper=False) as s:
        r = redis.Redis.from_url(s.redis.url)
        r.memory_purge()
        empty = r.info("memory")["used_memory"]
        asyncio.run(load(s.redis.url, count))
        r.memory_purge()
        used = r.info("memory")["used_memory"]
        per_key = {key.decode(): r.memory_usage(key, samples=0) for key in r.scan_iter("{bench}:*")}
        r.close()
    per_message = (used - empty) / count
    rows = [
        ("empty instance (baseline)", empty, "", ""),
        (f"{count:,} delayed messages", used, per_message, per_message - BODY),
    ]
    print_table(
        f"B5 Redis memory per delayed message, {BODY}-byte bodies "
        "(target: <= 300 B including the body)",
        ("state", "used_memory B", "B/message", "B/message beyond the body"),
        rows,
    )
    for key, size in sorted(per_key.items()):
        print(f"  {key}: {size / count:,.1f} B/message")
    payload = {
        "count": count,
        "empty": empty,
        "used": used,
        "per_message": per_message,
        "keys": per_key,
    }
    write_result("b5", payload)
    return payload


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1_000_000)
    run(parser.parse_args().count)
