"""B4: steady lateness. Messages posted at a fixed rate, each due 2 s after it is
posted; lateness = handling time minus runAt, per rate.

Starts Redis (AOF everysec), ZooKeeper, one api, two schedulers and two workers
through the console script; posts from this process over loopback with
``bench.poster``, whose per-request cost is small enough not to starve the
service on the same two cores (httpx's was not: its queue of requests waiting
for a pooled connection delayed them past the runAt they carried).
"""

from __future__ import annotations

import argparse
import asyncio
import time

from bench.common import lateness_figures, print_table, stack, write_result
from bench.poster import send_at_rate


async def post_at_rate(
    url: str, rate: float, seconds: float, delay_ms: int, run_ats: dict[str, int] | None = None
) -> set[str]:
    """The uuids answered 201; ``run_ats``, when given, gets each one's runAt as sent."""
    stats = await send_at_rate(url, rate, seconds, delay_ms)
    if run_ats is not None:
        run_ats.update(stats.run_ats)
    return stats.accepted


def echoed_count(s) -> int:
    """Lines the workers wrote so far: counted without parsing, so polling stays cheap
    while the last messages are still being delivered on the same cores."""
    return sum(
        (s.workdir / f"{name}.out").read_bytes().count(b"\n")
        for name, _ in s.processes
        if name.startswith("worker")
    )


def measure(rate: float, seconds: float, delay: float) -> dict:
    with stack() as s:
        url = s.api() + "/api/v1/save-message"
        s.serve(schedulers=2, workers=2)
        started = time.monotonic()
        posted = asyncio.run(send_at_rate(url, rate, seconds, int(delay * 1000)))
        post_s = time.monotonic() - started
        accepted, run_ats = posted.accepted, posted.run_ats
        deadline = time.monotonic() + delay + 20
        while time.monotonic() < deadline:
            if echoed_count(s) >= len(accepted) and accepted <= {e["uuid"] for e in s.echo_lines()}:
                break
            time.sleep(0.2)
        lines = s.echo_lines()
    # The runAt this process sent, not the one echoed: a service that altered it would show.
    late = [e["handledAt"] - run_ats[e["uuid"]] for e in lines if e["uuid"] in accepted]
    return {
        "rate": rate,
        "sent": posted.sent,
        "post_s": post_s,
        "statuses": {str(k): v for k, v in posted.statuses.items()},
        "broken": posted.broken,
        "posted": len(accepted),
        "lost": len(accepted - {e["uuid"] for e in lines}),
        "early": sum(1 for x in late if x < 0),
        **lateness_figures(late),
        "lateness_ms": late,
    }


def plot(results: list[dict], path: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        ax.hist(r["lateness_ms"], bins=60, histtype="step", label=f"{r['rate']:g}/s")
    ax.set_xlabel("lateness, ms (handled minus runAt)")
    ax.set_ylabel("messages")
    ax.set_title("B4 steady lateness")
    ax.legend()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path


def run(rates: list[float], seconds: float, delay: float) -> dict:
    results = [measure(rate, seconds, delay) for rate in rates]
    print_table(
        f"B4 steady lateness, due {delay:g} s after posting, {seconds:g} s per rate "
        "(target: 100/s p50 <= 2 ms, p99 <= 5 ms; 2,000/s p99 <= 20 ms; never early)",
        ("rate/s", "posted", "lost", "early", "p50 ms", "p99 ms", "max ms"),
        [
            (r["rate"], r["posted"], r["lost"], r["early"], r["p50_ms"], r["p99_ms"], r["max_ms"])
            for r in results
        ],
    )
    from bench.common import RESULTS

    RESULTS.mkdir(exist_ok=True)
    png = plot(results, str(RESULTS / "b4_lateness.png"))
    if png:
        print(f"  lateness distribution: {png}")
    payload = {"results": [{k: v for k, v in r.items() if k != "lateness_ms"} for r in results]}
    write_result("b4", payload)
    return payload


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="100,2000", help="comma-separated messages/s")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--delay", type=float, default=2.0)
    args = parser.parse_args()
    run([float(r) for r in args.rates.split(",")], args.seconds, args.delay)
