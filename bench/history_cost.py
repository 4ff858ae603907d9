"""What the dashboard's per-minute history costs a process: one flush every 5 s.

Not a target of its own: the hot paths (ingest, the accept/ack/fail scripts, the
worker's loop) do nothing for the history, so B1 and B3 can only see it through
the recorder's one wake-up per ``FLUSH_S``. This times that wake-up's two parts in
a process like a worker's (its counters grown between flushes): reading the
counters (``metrics.history_totals``) and the flush itself (one pipeline of
HINCRBY per grown field and an EXPIRE, against a real Redis on loopback), and says
what share of one core they take at one flush per ``FLUSH_S``.

``python -m bench.history_cost [--count N]``
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from app import metrics
from app.ops.servers import RedisServer
from app.settings import Settings
from app.store import connect
from app.store.history import FLUSH_S, HistoryRecorder
from bench.common import print_table


async def measure(url: str, count: int) -> tuple[float, float]:
    settings = Settings.from_env({}, redis_url=url, prefix="bench-history")
    client = connect(settings)
    recorder = HistoryRecorder(client, settings.prefix)
    try:
        started = time.perf_counter()
        for _ in range(count):
            metrics.history_totals()
        totals_us = (time.perf_counter() - started) / count * 1e6
        flush_s = 0.0
        for i in range(count):
            # What a busy worker's counters do between two flushes.
            metrics.DELIVERED.inc(100)
            metrics.RETRIED.inc()
            for late in (0.001, 0.004, 0.03):
                metrics.LATENESS.labels().observe(late)
            started = time.perf_counter()
            await recorder.flush(29_000_000 + i % 60)
            flush_s += time.perf_counter() - started
        return totals_us, flush_s / count * 1e6
    finally:
        await client.aclose()


def run(count: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        server = RedisServer(Path(folder))
        server.start()
        try:
            totals_us, flush_us = asyncio.run(measure(server.url, count))
        finally:
            server.stop()
    share = (totals_us + flush_us) / (FLUSH_S * 1e6) * 100
    print_table(
        f"history: one flush per {FLUSH_S:g} s, mean of {count}",
        ["part", "µs per flush"],
        [
            ["read the counters (history_totals)", round(totals_us, 1)],
            ["flush (counters read, pipeline to Redis, reply)", round(flush_us, 1)],
            [f"share of one core at one flush per {FLUSH_S:g} s", f"{share:.4f} %"],
        ],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2000)
    run(parser.parse_args().count)


if __name__ == "__main__":
    main()
