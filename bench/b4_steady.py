"""B4: steady lateness. Messages posted at a fixed rate, each due 2 s after it is
posted; lateness = handling time minus runAt, per rate.

Starts Redis (AOF everysec), ZooKeeper, one api, two schedulers and two workers
through the console script; posts from this process over loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid as uuidlib

import httpx

from bench.common import percentile, print_table, stack, write_result


async def post_at_rate(url: str, rate: float, seconds: float, delay_ms: int) -> set[str]:
    accepted: set[str] = set()
    interval = 1.0 / rate
    total = int(rate * seconds)
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=10.0, limits=limits) as client:
        sem = asyncio.Semaphore(256)

        async def one(uid: str) -> None:
            async with sem:
                run_at = int(time.time() * 1000) + delay_ms
                reply = await client.post(url, json={"message": "b4", "runAt": run_at, "uuid": uid})
                if reply.status_code == 201:
                    accepted.add(uid)

        loop = asyncio.get_running_loop()
        start = loop.time()
        tasks = []
        for n in range(total):
            pause = start + n * interval - loop.time()
            if pause > 0:
                await asyncio.sleep(pause)
            tasks.append(asyncio.create_task(one(str(uuidlib.uuid4()))))
        await asyncio.gather(*tasks)
    return accepted


def measure(rate: float, seconds: float, delay: float) -> dict:
    with stack() as s:
        url = s.api() + "/api/v1/save-message"
        for i in range(2):
            s.spawn(f"scheduler{i}", ["scheduler"])
        for i in range(2):
            s.spawn(f"worker{i}", ["worker", "--consumer-name", f"w{i}"])
        s.wait_until_serving()
        accepted = asyncio.run(post_at_rate(url, rate, seconds, int(delay * 1000)))
        deadline = time.monotonic() + delay + 20
        lines: list[dict] = []
        while time.monotonic() < deadline:
            lines = s.echo_lines()
            if accepted <= {e["uuid"] for e in lines}:
                break
            time.sleep(0.2)
    late = [e["handledAt"] - e["runAt"] for e in lines if e["uuid"] in accepted]
    return {
        "rate": rate,
        "posted": len(accepted),
        "lost": len(accepted - {e["uuid"] for e in lines}),
        "early": sum(1 for x in late if x < 0),
        "p50_ms": percentile(late, 50),
        "p99_ms": percentile(late, 99),
        "max_ms": max(late, default=float("nan")),
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
