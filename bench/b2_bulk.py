"""B2: bulk ingest through /api/v1/save-messages, 1,000 messages per request.

Four concurrent clients post for ``seconds``; one api process. Baseline in the
same run: redis-benchmark ZADD with -P 16 against the same Redis.
"""

from __future__ import annotations

import asyncio
import time
import uuid as uuidlib

import httpx
import msgspec

from bench.common import print_table, redis_benchmark, stack, write_result

FUTURE = 253402300799999


async def post_bulk(url: str, seconds: float, clients: int, size: int) -> tuple[int, int]:
    accepted = 0
    failed = 0
    deadline = time.monotonic() + seconds

    async def client_loop(http: httpx.AsyncClient) -> None:
        nonlocal accepted, failed
        while time.monotonic() < deadline:
            body = msgspec.json.encode(
                [
                    {"message": "x" * 100, "runAt": FUTURE, "uuid": str(uuidlib.uuid4())}
                    for _ in range(size)
                ]
            )
            reply = await http.post(url, content=body, headers={"Content-Type": "application/json"})
            if reply.status_code == 200:
                accepted += reply.json()["accepted"]
            else:
                failed += size

    async with httpx.AsyncClient(timeout=30.0) as http:
        await asyncio.gather(*(client_loop(http) for _ in range(clients)))
    return accepted, failed


def redis_benchmark_zadd(port: int, count: int) -> float:
    return redis_benchmark(
        port,
        count,
        "ZADD",
        "bench:zadd",
        "__rand_int__",
        "member:__rand_int__",
        extra=("-r", "1000000"),
    )


def run(seconds: float = 10.0, clients: int = 4, size: int = 1000) -> dict:
    with stack(zookeeper=False) as s:
        url = s.api() + "/api/v1/save-messages"
        start = time.monotonic()
        accepted, failed = asyncio.run(post_bulk(url, seconds, clients, size))
        elapsed = time.monotonic() - start
        baseline = redis_benchmark_zadd(s.redis.port, 200_000)
    rate = accepted / elapsed
    print_table(
        f"B2 bulk ingest, {size:,} per request, {clients} clients, {seconds:g} s "
        "(target: >= 60,000/s)",
        ("what", "msgs/s", "accepted", "failed"),
        [
            ("echo-at-time /save-messages", rate, accepted, failed),
            ("redis-benchmark ZADD -P 16 (baseline)", baseline, "", ""),
        ],
    )
    payload = {"rate": rate, "accepted": accepted, "failed": failed, "baseline_zadd": baseline}
    write_result("b2", payload)
    return payload


if __name__ == "__main__":
    run()
