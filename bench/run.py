"""Run the benchmark suite: ``python -m bench.run [B1 B3 B4 B5 ...] [--quick]``.

Each benchmark starts its own servers and processes, measures its baseline in
the same run, prints a table and writes JSON (and B4 a PNG) under bench/results/.
``--quick`` shortens every run, for a smoke check; the figures on
docs/performance.md come from full runs.
"""

from __future__ import annotations

import argparse
import sys

from bench import (
    b1_ingest,
    b2_bulk,
    b3_burst,
    b4_steady,
    b5_memory,
    b6_backlog,
    b7_failover,
    b8_scaleout,
    b9_cluster_backlog,
    b10_webhook,
    b11_schedules,
)

SUITE = {
    "B1": lambda quick: b1_ingest.run(seconds=3 if quick else 10),
    "B2": lambda quick: b2_bulk.run(seconds=3 if quick else 10),
    "B3": lambda quick: b3_burst.run(count=5_000 if quick else 20_000),
    "B4": lambda quick: b4_steady.run([100, 2000], 5 if quick else 30, 2.0),
    "B5": lambda quick: b5_memory.run(50_000 if quick else 1_000_000),
    "B6": lambda quick: b6_backlog.run(
        [10_000, 200_000] if quick else [10_000, 1_000_000, 5_000_000],
        burst=5_000 if quick else 20_000,
        seconds=5 if quick else 20,
    ),
    "B7": lambda quick: b7_failover.run(seconds=10 if quick else 30),
    "B8": lambda quick: b8_scaleout.run(
        seconds=3 if quick else 10,
        burst=5_000 if quick else 20_000,
        steady_s=5 if quick else 15,
    ),
    # 10 M loads in about 1.5 minutes here; python -m bench.b9_cluster_backlog --backlog N
    # for another count.
    "B9": lambda quick: b9_cluster_backlog.run(
        backlog=200_000 if quick else 10_000_000,
        burst=5_000 if quick else 20_000,
        repeats=1 if quick else 3,
        seconds=5 if quick else 20,
    ),
    "B10": lambda quick: b10_webhook.run(
        count=2_000 if quick else 10_000, seconds=5 if quick else 30
    ),
    "B11": lambda quick: b11_schedules.run(1_000 if quick else 10_000, 1 if quick else 2),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "ids", nargs="*", help=f"benchmarks to run (default all: {' '.join(SUITE)})"
    )
    parser.add_argument("--quick", action="store_true", help="short runs, for a smoke check")
    args = parser.parse_args(argv)
    unknown = [i for i in args.ids if i.upper() not in SUITE]
    if unknown:
        parser.error(f"unknown benchmark {unknown[0]!r}; known: {', '.join(SUITE)}")
    for bench_id in [i.upper() for i in args.ids] or list(SUITE):
        SUITE[bench_id](args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
