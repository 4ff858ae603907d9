"""Loading messages straight into Redis, on one Redis or a Redis Cluster, for the
benchmarks that need messages in place before they measure (B8's bursts, B9's backlog).

Two ways:

- :func:`load_due` goes through the product's own ``Partitions.accept_many``
  (``open_client``: the cluster client on a cluster), a thousand messages a
  call: what the bulk endpoint does, without HTTP.
- :func:`load_backlog` is for millions: it calls the accept script itself, on a
  plain connection to each partition's master (no cluster client in between),
  ``batch`` messages a call, several calls in flight at once, each a different
  partition, so every master works while this process builds the next batch.
  The uuids are random 16-byte strings binned by ``partition_of``, so each
  partition gets its natural share, and the runAts ascend within a call and
  across calls, so no call makes a new earliest message and nothing is woken.
  It writes exactly what an accept writes (the script is the product's; an
  integration test reads the messages back through the Store).
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid as uuidlib
import zlib
from collections.abc import Sequence

import redis.asyncio as aioredis
from redis.exceptions import ClusterDownError, TryAgainError

from app.model import NewMessage
from app.settings import Settings
from app.store import open_client
from app.store.partitions import Partitions
from app.store.store import Store

BODY = "x" * 100
CLUSTER_DOWN_RETRIES = 60


async def load_due(env: dict[str, str], count: int, run_at: int, body: str = BODY) -> None:
    """``count`` messages due at ``run_at``, through Partitions.accept_many."""
    settings = Settings.from_env(env)
    client = await open_client(settings)
    parts = Partitions(client, settings)
    try:
        for start in range(0, count, 1000):
            batch = [
                NewMessage(str(uuidlib.uuid4()), body, run_at)
                for _ in range(min(1000, count - start))
            ]
            await parts.accept_many(batch)
    finally:
        await client.aclose()


async def load_backlog(
    env: dict[str, str],
    node_urls: Sequence[str],
    count: int,
    first_run_at: int,
    *,
    batch: int = 10_000,
    in_flight: int = 6,
    body: bytes = BODY.encode(),
) -> list[int]:
    """``count`` messages with runAts ``first_run_at``, ``first_run_at + 1``, ...; partition
    ``p`` is written on the Redis at ``node_urls[p]`` (its master). Returns the messages
    written per partition."""
    settings = Settings.from_env(env)
    partitions = settings.partitions
    clients = {url: aioredis.Redis.from_url(url, socket_timeout=600) for url in set(node_urls)}
    stores = [
        Store(clients[node_urls[p]], settings, partition=None if partitions == 1 else p)
        for p in range(partitions)
    ]
    written = [0] * partitions
    slots = asyncio.Semaphore(in_flight)
    calls: set[asyncio.Task] = set()
    failures: list[BaseException] = []

    async def call(p: int, args: list) -> None:
        try:
            store = stores[p]
            k = store.keys
            head = [k.wake_channel, settings.dead_maxlen, store._keep_ms]  # as accept_many
            keys = [k.messages, k.delayed, k.stream, k.sequence, k.dead, k.retention]
            for attempt in range(CLUSTER_DOWN_RETRIES + 1):
                try:
                    flat = await store.scripts.accept(keys=keys, args=head + args)
                    break
                except (ClusterDownError, TryAgainError):
                    # Refused before it ran (a master thought failed for a moment):
                    # nothing was written, so sending it again is exact.
                    if attempt == CLUSTER_DOWN_RETRIES:
                        raise
                    await asyncio.sleep(0.5)
            written[p] += sum(flat[0 : len(flat) - len(flat) % 3 : 3])
        except BaseException as exc:
            failures.append(exc)
        finally:
            slots.release()

    async def send(p: int, args: list) -> None:
        await slots.acquire()
        if failures:
            raise failures[0]
        task = asyncio.create_task(call(p, args))
        calls.add(task)
        task.add_done_callback(calls.discard)
        await asyncio.sleep(0)  # the call goes out now, while the next batch is built

    buckets: list[list] = [[] for _ in range(partitions)]
    per_call = 3 * batch
    run_at = first_run_at
    try:
        for start in range(0, count, 100_000):
            n = min(100_000, count - start)
            raw = os.urandom(16 * n)
            for i in range(0, 16 * n, 16):
                uuid = raw[i : i + 16]
                p = zlib.crc32(uuid) % partitions
                bucket = buckets[p]
                bucket += (uuid, body, run_at)
                run_at += 1
                if len(bucket) >= per_call:
                    await send(p, bucket)
                    buckets[p] = []
            await asyncio.sleep(0)  # let the calls in flight send and finish
        for p, bucket in enumerate(buckets):
            if bucket:
                await send(p, bucket)
        await asyncio.gather(*list(calls))
        if failures:
            raise failures[0]
    finally:
        for client in clients.values():
            await client.aclose()
    return written


def timed(coro) -> tuple[object, float]:
    """Run ``coro`` to its end: its result and the seconds it took."""
    start = time.monotonic()
    result = asyncio.run(coro)
    return result, time.monotonic() - start
