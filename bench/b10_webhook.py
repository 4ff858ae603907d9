"""B10: webhook delivery. One worker (``--concurrency 64``) POSTing to a local receiver
that answers 200 at once (``bench.webhook_receiver``, a process of its own); beside it,
in the same run, the echo handler's figures for the same load.

- burst: ``count`` messages all due at one instant T; messages/s from T to the last
  delivery (for the webhook: the receiver's arrival time; for echo: the echo line).
- steady: messages posted at 100/s through the api, each due 2 s after it is posted;
  lateness = arrival (or echo) time minus runAt, p50/p99.

Every delivery is a signed request (the receiver does not verify: its cost is not the
service's) to one origin, so at most EAT_WEBHOOK_PER_ORIGIN (its default, 16) are in
flight at once; the other slots of the 64 wait for that origin's.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

from app.ops.child import ChildProcess
from app.ops.servers import free_port
from bench.b3_burst import load
from bench.common import (
    burst_figures,
    lateness_figures,
    print_table,
    stack,
    wait_http,
    write_result,
)
from bench.poster import send_at_rate

SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
CONCURRENCY = 64


def arrivals(path: Path) -> list[tuple[str, int]]:
    data = path.read_bytes() if path.exists() else b""
    out = []
    for line in data[: data.rfind(b"\n") + 1].splitlines():
        webhook_id, _, ms = line.partition(b" ")
        out.append((webhook_id.decode(), int(ms)))
    return out


def start(s, handler: str) -> Path:
    """A receiver (for the webhook handler) and one worker; the file of arrivals."""
    out = s.workdir / "arrivals.txt"
    argv = ["worker", "--consumer-name", "w0", "--concurrency", str(CONCURRENCY)]
    env = dict(s.env)
    if handler == "webhook":
        port = free_port()
        receiver = ChildProcess(
            [
                sys.executable,
                "-m",
                "bench.webhook_receiver",
                "--port",
                str(port),
                "--out",
                f"{out}",
            ],
            env=s.env,
            stdout=s.workdir / "receiver.out",
            stderr=s.workdir / "receiver.err",
        )
        s.processes.append(("receiver", receiver))
        wait_http(f"http://127.0.0.1:{port}/ready")
        out.write_bytes(b"")  # the readiness probe's line
        env.update(
            EAT_WEBHOOK_URL=f"http://127.0.0.1:{port}/hook",
            EAT_WEBHOOK_SECRET=SECRET,
        )
        argv += ["--handler", "webhook"]
    s.spawn("scheduler0", ["scheduler"])
    s.spawn("worker0", argv, env)
    s.wait_until_serving()
    return out


def delivered(s, handler: str, out: Path) -> list[tuple[str, int]]:
    """(uuid, epoch ms it arrived or was echoed) of every delivery so far."""
    if handler == "webhook":
        return arrivals(out)
    return [(e["uuid"], e["handledAt"]) for e in s.echo_lines()]


def wait_for(s, handler: str, out: Path, uuids: set[str], timeout: float) -> list:
    deadline = time.monotonic() + timeout
    while True:
        got = delivered(s, handler, out)
        if uuids <= {u for u, _ in got} or time.monotonic() > deadline:
            return got
        time.sleep(0.2)


def burst(handler: str, count: int) -> dict:
    with stack() as s:
        out = start(s, handler)
        run_at = int(time.time() * 1000) + 4000
        asyncio.run(load(s.redis.url, "bench", count, run_at))
        if time.time() * 1000 > run_at:
            raise SystemExit("loading took longer than the lead time; raise it")
        deadline = time.monotonic() + 120
        got = delivered(s, handler, out)
        while len(got) < count and time.monotonic() < deadline:
            time.sleep(0.2)
            got = delivered(s, handler, out)
    lines = [{"uuid": u, "handledAt": ms} for u, ms in got]
    return {"handler": handler, **burst_figures(lines, run_at, count)}


def steady(handler: str, rate: float, seconds: float, delay: float) -> dict:
    with stack() as s:
        url = s.api() + "/api/v1/save-message"
        out = start(s, handler)
        posted = asyncio.run(send_at_rate(url, rate, seconds, int(delay * 1000)))
        got = wait_for(s, handler, out, posted.accepted, delay + 20)
    late = [ms - posted.run_ats[u] for u, ms in got if u in posted.accepted]
    return {
        "handler": handler,
        "rate": rate,
        "posted": len(posted.accepted),
        "lost": len(posted.accepted - {u for u, _ in got}),
        "early": sum(1 for x in late if x < 0),
        **lateness_figures(late),
    }


def run(count: int = 10_000, seconds: float = 30.0, rate: float = 100.0) -> dict:
    bursts = [burst("echo", count), burst("webhook", count)]
    steadies = [steady("echo", rate, seconds, 2.0), steady("webhook", rate, seconds, 2.0)]
    print_table(
        f"B10 webhook delivery, one worker --concurrency {CONCURRENCY}, a local receiver "
        f"answering 200 at once: a due burst of {count:,}",
        ("handler", "msgs/s", "seconds", "p50 ms", "p99 ms", "max ms", "lost"),
        [
            (
                r["handler"],
                r["rate"],
                r["seconds"],
                r["p50_ms"],
                r["p99_ms"],
                r["max_ms"],
                r["lost"],
            )
            for r in bursts
        ],
    )
    print_table(
        f"B10 steady lateness at {rate:g}/s for {seconds:g} s, due 2 s after posting",
        ("handler", "posted", "lost", "early", "p50 ms", "p99 ms", "max ms"),
        [
            (
                r["handler"],
                r["posted"],
                r["lost"],
                r["early"],
                r["p50_ms"],
                r["p99_ms"],
                r["max_ms"],
            )
            for r in steadies
        ],
    )
    payload = {"count": count, "burst": bursts, "steady": steadies}
    write_result("b10", payload)
    return payload


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args()
    run(args.count, args.seconds)
